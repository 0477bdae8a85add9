//! Why a wire message could not be turned into watch-core types.

use watch_core::WatchError;

/// A wire message that does not describe a valid watch-core value.
///
/// Every variant maps to one gRPC status in [`crate::status::from_convert_error`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConvertError {
    /// `WatchCreateRequest.start_revision` is negative. etcd answers this the way it answers a
    /// start below the compaction point (a created-and-canceled reply with the compacted error),
    /// so it is kept apart from [`ConvertError::NegativeField`].
    #[error("start_revision {start_revision} is negative")]
    NegativeStartRevision {
        /// The requested start revision.
        start_revision: i64,
    },
    /// A field that holds a revision or a version, and so is never negative in etcd's model,
    /// is negative.
    #[error("{field} must not be negative, got {value}")]
    NegativeField {
        /// The proto field name, e.g. `"mod_revision"`.
        field: &'static str,
        /// The value received.
        value: i64,
    },
    /// An enum field holds a number the proto does not define (a newer or broken client).
    #[error("{field} holds the unknown enum value {value}")]
    UnknownEnumValue {
        /// The proto field name, e.g. `"filters"`.
        field: &'static str,
        /// The number received.
        value: i32,
    },
    /// A message field or a oneof that must be set is absent. For `WatchRequest.request_union`
    /// this is also what a request type newer than this proto decodes to; etcd ignores such a
    /// request and keeps the stream open, and a server should do the same.
    #[error("{field} is not set")]
    MissingField {
        /// The proto field or oneof name, e.g. `"kv"` or `"request_union"`.
        field: &'static str,
    },
    /// The `(key, range_end)` pair selects no key (see [`watch_core::KeySelector::from_etcd_range`]).
    #[error(transparent)]
    InvalidSelector(#[from] WatchError),
}

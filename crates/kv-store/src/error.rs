//! The typed error of the embedded store.

use watch_core::{Revision, WatchError};

/// Why a [`crate::Store`] operation failed.
///
/// Request errors (the first group) leave the store unchanged and map to etcd's gRPC errors;
/// the storage errors (second group) mean the store cannot serve the request at all.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// A request (or a txn compare or op) has an empty key.
    #[error("key is not provided")]
    EmptyKey,
    /// A txn writes the same key twice in one branch (two puts, or a put inside a deleted range).
    #[error("duplicate key given in txn request")]
    DuplicateKey,
    /// A txn has more compares or ops in one list than the store allows.
    #[error("too many operations in txn request: {count} > {limit}")]
    TooManyOps {
        /// The size of the largest list (compares, success or failure).
        count: usize,
        /// [`crate::StoreConfig::max_txn_ops`] (less what enclosing txns used).
        limit: usize,
    },
    /// A read or watch asked for a revision below the compaction revision, or a compaction asked
    /// for a revision at or below the previous one.
    #[error("required revision {requested} has been compacted (compaction revision {compacted})")]
    Compacted {
        /// The revision asked for.
        requested: Revision,
        /// The current compaction revision: the oldest revision still readable.
        compacted: Revision,
    },
    /// A read or compaction asked for a revision above the current one.
    #[error("required revision {requested} is a future revision (current {current})")]
    FutureRevision {
        /// The revision asked for.
        requested: Revision,
        /// The store's current revision.
        current: Revision,
    },
    /// A put or a lease request named a lease that does not exist (never granted, revoked or
    /// expired).
    #[error("requested lease {lease} not found")]
    LeaseNotFound {
        /// The lease ID asked for.
        lease: i64,
    },
    /// A lease grant asked for an ID that is already in use.
    #[error("lease {lease} already exists")]
    LeaseExists {
        /// The lease ID asked for.
        lease: i64,
    },
    /// A lease grant asked for a TTL above the maximum.
    #[error("lease TTL {ttl}s is too large (maximum {max}s)")]
    LeaseTtlTooLarge {
        /// The TTL asked for, in seconds.
        ttl: i64,
        /// [`crate::MAX_LEASE_TTL`], in seconds.
        max: i64,
    },
    /// A lease grant would exceed [`crate::StoreConfig::max_leases`].
    #[error("too many leases (limit {limit})")]
    TooManyLeases {
        /// The configured limit.
        limit: usize,
    },
    /// A put with `ignore_value` or `ignore_lease` on a key that does not exist.
    #[error("key not found")]
    KeyNotFound,
    /// A put with `ignore_value` also carried a value.
    #[error("value is provided")]
    ValueProvided,
    /// A put with `ignore_lease` also carried a lease.
    #[error("lease is provided")]
    LeaseProvided,
    /// A watch could not be registered (empty range, watcher limit, engine shut down).
    #[error(transparent)]
    Watch(#[from] WatchError),
    /// The event log failed a commit (or is poisoned by an earlier failure). The store is
    /// fail-stop: nothing after the failure was acknowledged, every later write and every read
    /// of unacknowledged state fails with this error until the process reopens the store.
    #[error("the store stopped after an event log failure: {message}")]
    Failed {
        /// What the event log reported.
        message: String,
    },
    /// The store was closed ([`crate::Store::close`]).
    #[error("the store is closed")]
    Closed,
    /// Opening, replaying or querying the event log failed.
    #[error(transparent)]
    Log(#[from] event_log::LogError),
    /// Reading or writing the state snapshot file failed.
    #[error("state snapshot {path}: {message}")]
    Snapshot {
        /// The snapshot file.
        path: String,
        /// The I/O or decoding error.
        message: String,
    },
    /// Opening or reading the lease records file (`leases.redb`) failed.
    #[error("lease records {path}: {message}")]
    LeaseFile {
        /// The file.
        path: String,
        /// The storage error.
        message: String,
    },
    /// The data directory holds a log and a snapshot that do not fit together (the log was
    /// compacted past the snapshot, e.g. by another program or a lost snapshot file).
    #[error("inconsistent data directory: {0}")]
    Inconsistent(String),
    /// A local write (put, delete, txn, compact) on a store that mirrors an upstream etcd
    /// (watch-server's mirror mode): writes go to the upstream, the mirror applies them from its watch.
    #[error("keywatch: this store mirrors an upstream etcd; write through the server or to etcd")]
    MirrorReadOnly,
    /// A watch on keys outside the prefixes a mirror replicates: the mirror has no history of
    /// them, so it refuses rather than stay silent.
    #[error("keywatch: keys outside the mirrored prefixes {scope} cannot be watched here")]
    OutsideMirror {
        /// The mirrored prefixes, for the message.
        scope: String,
    },
    /// A change set from the upstream does not follow the mirror's revision (not increasing):
    /// the upstream broke its ordering guarantee or the data directory mirrors another
    /// cluster. Nothing was applied.
    #[error(
        "keywatch: upstream revision {revision} does not follow the mirror's revision {current}"
    )]
    MirrorOrder {
        /// The upstream revision offered.
        revision: Revision,
        /// The mirror's current revision.
        current: Revision,
    },
    /// An upstream event's `prev_kv` (the key's value before that revision, as etcd holds
    /// it) differs from the mirror's state for the key: the mirror missed or misapplied a
    /// revision. Nothing was applied; the mirror stops rather than serve a diverged history.
    #[error(
        "keywatch: mirror diverged from the upstream at revision {revision}, key {key:?}: \
         upstream previous value {upstream}, mirror has {local}"
    )]
    MirrorDiverged {
        /// The upstream revision being applied.
        revision: Revision,
        /// The key (lossy UTF-8).
        key: String,
        /// The upstream's previous value, summarized (mod revision, version, value bytes).
        upstream: String,
        /// The mirror's value, summarized likewise (`none` when it has no such key).
        local: String,
    },
}

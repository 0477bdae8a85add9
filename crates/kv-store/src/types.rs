//! Request and result types of the embedded store API (etcd's KV model, without protobuf).

use std::ops::Bound;

use bytes::Bytes;
use watch_core::{KeySelector, KeyValue, Revision};

/// A set of keys in etcd's `(key, range_end)` form.
///
/// - `range_end` empty: the single `key`.
/// - `range_end == "\0"`: every key `>= key` (with `key` empty or `"\0"`: every key).
/// - otherwise `[key, range_end)`; a range with `key >= range_end` selects nothing.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct KeyRange {
    /// First key (or the single key).
    pub key: Bytes,
    /// End of the range, see the type's docs.
    pub range_end: Bytes,
}

impl KeyRange {
    /// The single key `key`.
    pub fn key(key: impl Into<Bytes>) -> Self {
        Self {
            key: key.into(),
            range_end: Bytes::new(),
        }
    }

    /// `[key, range_end)` in etcd form (see the type's docs for the special ends).
    pub fn new(key: impl Into<Bytes>, range_end: impl Into<Bytes>) -> Self {
        Self {
            key: key.into(),
            range_end: range_end.into(),
        }
    }

    /// Every key starting with `prefix` (every key for an empty prefix).
    pub fn prefix(prefix: impl Into<Bytes>) -> Self {
        let prefix: Bytes = prefix.into();
        match watch_core::prefix_end(&prefix) {
            Some(end) => Self::new(prefix, end),
            None if prefix.is_empty() => Self::all(),
            None => Self::new(prefix, &b"\0"[..]),
        }
    }

    /// Every key `>= key`.
    pub fn from_key(key: impl Into<Bytes>) -> Self {
        Self::new(key, &b"\0"[..])
    }

    /// Every key.
    pub fn all() -> Self {
        Self::new(&b"\0"[..], &b"\0"[..])
    }

    /// True if the range has no end marker, i.e. names a single key.
    pub fn is_single(&self) -> bool {
        self.range_end.is_empty()
    }

    /// The half-open byte interval `[start, end)` (`None`: unbounded), or `None` when the range
    /// selects nothing.
    pub(crate) fn interval(&self) -> Option<(Bytes, Option<Bytes>)> {
        if self.range_end.is_empty() {
            let mut end = Vec::with_capacity(self.key.len() + 1);
            end.extend_from_slice(&self.key);
            end.push(0);
            return Some((self.key.clone(), Some(end.into())));
        }
        if self.range_end.as_ref() == b"\0" {
            return Some((self.key.clone(), None));
        }
        (self.key < self.range_end).then(|| (self.key.clone(), Some(self.range_end.clone())))
    }

    /// True if `key` is in the range. Allocation-free.
    pub fn contains(&self, key: &[u8]) -> bool {
        let (start, end) = (self.key.as_ref(), self.range_end.as_ref());
        match end {
            b"" => start == key,
            b"\0" => start <= key,
            _ => start <= key && key < end,
        }
    }

    /// The range as BTreeMap bounds, or `None` when it selects nothing.
    pub(crate) fn bounds(&self) -> Option<(Bound<Bytes>, Bound<Bytes>)> {
        let (start, end) = self.interval()?;
        Some((
            Bound::Included(start),
            end.map_or(Bound::Unbounded, Bound::Excluded),
        ))
    }

    /// The same keys as a watch-core selector, for history queries; `None` when the range
    /// selects nothing.
    pub(crate) fn selector(&self) -> Option<KeySelector> {
        KeySelector::from_etcd_range(&self.key, &self.range_end).ok()
    }
}

/// Order of a range's result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SortOrder {
    /// By key, ascending (the natural order), unless a non-key target is set.
    #[default]
    None,
    /// Ascending by the target.
    Ascend,
    /// Descending by the target.
    Descend,
}

/// What a range's result is sorted by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SortTarget {
    /// The key.
    #[default]
    Key,
    /// The version.
    Version,
    /// The create revision.
    Create,
    /// The mod revision.
    Mod,
    /// The value.
    Value,
}

/// A read of a key range, as etcd's `RangeRequest`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct RangeRequest {
    /// The keys read.
    pub range: KeyRange,
    /// Most keys returned; 0 means no limit.
    pub limit: u64,
    /// Read the store as of this revision; 0 means the current revision. A past revision is
    /// served from the event log's history.
    pub revision: Revision,
    /// Result order.
    pub sort_order: SortOrder,
    /// Result sort key.
    pub sort_target: SortTarget,
    /// Return keys without values.
    pub keys_only: bool,
    /// Return only the count.
    pub count_only: bool,
    /// Drop keys whose mod revision is below this (0: no bound).
    pub min_mod_revision: Revision,
    /// Drop keys whose mod revision is above this (0: no bound).
    pub max_mod_revision: Revision,
    /// Drop keys whose create revision is below this (0: no bound).
    pub min_create_revision: Revision,
    /// Drop keys whose create revision is above this (0: no bound).
    pub max_create_revision: Revision,
}

impl RangeRequest {
    /// A read of `range` with every option at its default.
    pub fn new(range: KeyRange) -> Self {
        Self {
            range,
            ..Self::default()
        }
    }
    /// A read of one key.
    pub fn key(key: impl Into<Bytes>) -> Self {
        Self::new(KeyRange::key(key))
    }
    /// A read of every key with `prefix`.
    pub fn prefix(prefix: impl Into<Bytes>) -> Self {
        Self::new(KeyRange::prefix(prefix))
    }
    /// Sets [`RangeRequest::limit`].
    pub fn limit(mut self, limit: u64) -> Self {
        self.limit = limit;
        self
    }
    /// Sets [`RangeRequest::revision`].
    pub fn revision(mut self, revision: Revision) -> Self {
        self.revision = revision;
        self
    }
    /// Sets the sort order and target.
    pub fn sort(mut self, order: SortOrder, target: SortTarget) -> Self {
        self.sort_order = order;
        self.sort_target = target;
        self
    }
    /// Sets [`RangeRequest::keys_only`].
    pub fn keys_only(mut self, on: bool) -> Self {
        self.keys_only = on;
        self
    }
    /// Sets [`RangeRequest::count_only`].
    pub fn count_only(mut self, on: bool) -> Self {
        self.count_only = on;
        self
    }
    /// Sets the mod revision bounds (0: no bound).
    pub fn mod_revision_bounds(mut self, min: Revision, max: Revision) -> Self {
        self.min_mod_revision = min;
        self.max_mod_revision = max;
        self
    }
    /// Sets the create revision bounds (0: no bound).
    pub fn create_revision_bounds(mut self, min: Revision, max: Revision) -> Self {
        self.min_create_revision = min;
        self.max_create_revision = max;
        self
    }
}

/// The result of a range read.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RangeResult {
    /// The store revision when the read was served (etcd's header revision).
    pub revision: Revision,
    /// The keys, after filters, sort and limit.
    pub kvs: Vec<KeyValue>,
    /// True when the limit cut the result short.
    pub more: bool,
    /// Number of keys in the range at the read revision (ignores limit and filters).
    pub count: u64,
}

/// Options of a put, as etcd's `PutRequest` flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct PutOptions {
    /// Lease to attach (0: none). Leases are not implemented yet: any other value fails with
    /// [`crate::StoreError::LeaseNotFound`].
    pub lease: i64,
    /// Return the previous key-value.
    pub prev_kv: bool,
    /// Keep the current value (the put's value must be empty; the key must exist).
    pub ignore_value: bool,
    /// Keep the current lease (the put's lease must be 0; the key must exist).
    pub ignore_lease: bool,
}

impl PutOptions {
    /// Sets [`PutOptions::prev_kv`].
    pub fn prev_kv(mut self, on: bool) -> Self {
        self.prev_kv = on;
        self
    }
    /// Sets [`PutOptions::lease`].
    pub fn lease(mut self, lease: i64) -> Self {
        self.lease = lease;
        self
    }
    /// Sets [`PutOptions::ignore_value`].
    pub fn ignore_value(mut self, on: bool) -> Self {
        self.ignore_value = on;
        self
    }
    /// Sets [`PutOptions::ignore_lease`].
    pub fn ignore_lease(mut self, on: bool) -> Self {
        self.ignore_lease = on;
        self
    }
}

/// The result of a put.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PutResult {
    /// The revision of the write.
    pub revision: Revision,
    /// The previous key-value, when asked for and the key existed.
    pub prev_kv: Option<KeyValue>,
}

/// The result of a delete.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DeleteResult {
    /// The revision of the write, or the current revision when nothing was deleted.
    pub revision: Revision,
    /// Number of keys deleted.
    pub deleted: u64,
    /// The deleted key-values, when asked for.
    pub prev_kvs: Vec<KeyValue>,
}

/// How a compare's operand relates to the key's field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompareOp {
    /// Field == operand.
    Equal,
    /// Field > operand.
    Greater,
    /// Field < operand.
    Less,
    /// Field != operand.
    NotEqual,
}

/// Which field a compare reads, with its operand.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CompareTarget {
    /// The version (0 for a missing key).
    Version(i64),
    /// The create revision (0 for a missing key).
    CreateRevision(i64),
    /// The mod revision (0 for a missing key).
    ModRevision(i64),
    /// The value (a compare on a missing key's value is always false).
    Value(Bytes),
    /// The lease (0 for a missing key).
    Lease(i64),
}

/// One txn guard: every key of `range` must satisfy `field op operand`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compare {
    /// The keys compared (usually one).
    pub range: KeyRange,
    /// The field and operand.
    pub target: CompareTarget,
    /// The relation.
    pub op: CompareOp,
}

/// One operation of a txn branch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TxnOp {
    /// A read; sees the writes of earlier ops of the same txn.
    Range(RangeRequest),
    /// A put.
    Put {
        /// The key.
        key: Bytes,
        /// The value.
        value: Bytes,
        /// Options.
        options: PutOptions,
    },
    /// A delete of a range.
    Delete {
        /// The keys deleted.
        range: KeyRange,
        /// Return the deleted key-values.
        prev_kv: bool,
    },
    /// A nested txn.
    Txn(TxnRequest),
}

/// A transaction: if every compare holds, apply `success`, else `failure`. All writes share
/// one revision; a txn without writes does not create one.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TxnRequest {
    /// Guards.
    pub compare: Vec<Compare>,
    /// Ops applied when every compare holds.
    pub success: Vec<TxnOp>,
    /// Ops applied otherwise.
    pub failure: Vec<TxnOp>,
}

/// The result of one txn op.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TxnOpResult {
    /// Of a [`TxnOp::Range`].
    Range(RangeResult),
    /// Of a [`TxnOp::Put`].
    Put(PutResult),
    /// Of a [`TxnOp::Delete`].
    Delete(DeleteResult),
    /// Of a [`TxnOp::Txn`].
    Txn(TxnResult),
}

/// The result of a txn.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TxnResult {
    /// The revision of the txn's writes, or the current revision when it wrote nothing.
    pub revision: Revision,
    /// True when every compare held.
    pub succeeded: bool,
    /// One result per op of the branch taken.
    pub responses: Vec<TxnOpResult>,
}

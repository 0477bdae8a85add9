//! The typed error of the embedded store.

use event_log::LogError;
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
    Log(#[from] LogError),
    /// Reading or writing the persisted state failed: [`crate::STATE_FILE`] (a damaged row,
    /// a failed checkpoint commit: the store is then fail-stop) or a legacy
    /// [`crate::SNAPSHOT_FILE`] being converted.
    #[error("persisted state {path}: {message}")]
    Snapshot {
        /// The file.
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
    /// The data directory holds a log and a persisted state that do not fit together (the log
    /// was compacted past the state's checkpoint, e.g. by another program or a lost state
    /// file).
    #[error("inconsistent data directory: {0}")]
    Inconsistent(String),
    /// A local write (put, delete, txn, compact) on a store that mirrors an upstream etcd
    /// (watch-server's mirror mode): writes go to the upstream, the mirror applies them from its watch.
    #[error("keywatch: this store mirrors an upstream etcd; write through the server or to etcd")]
    MirrorReadOnly,
    /// A write that adds data was refused by the space quota, or while the NOSPACE alarm is
    /// raised ([`crate::StoreConfig::quota_bytes`]).
    #[error("mvcc: database space exceeded")]
    NoSpace,
    /// A write while the CORRUPT alarm is raised.
    #[error("corrupt cluster")]
    CorruptAlarm,
    /// Reading or writing a backup, or restoring one, failed.
    #[error("backup {path}: {message}")]
    Backup {
        /// The file or directory.
        path: String,
        /// The I/O or format error.
        message: String,
    },
    /// A [`crate::StoreConfig`] setting the store cannot run with (refused by
    /// [`crate::Store::open`]).
    #[error("invalid store setting {field}: {message}")]
    InvalidConfig {
        /// The [`crate::StoreConfig`] field.
        field: &'static str,
        /// Why it was refused.
        message: String,
    },
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

/// How a client sees a [`StoreError`], decided by [`StoreError::class`]. kv-store knows no
/// gRPC, so this is the tonic-free half of the error mapping: the classification is an
/// exhaustive match here, in the crate that defines [`StoreError`], so a new variant cannot
/// reach clients through a catch-all. watch-server turns a class into a `tonic::Status` in one
/// place (`server::convert::store_status`).
///
/// Deliberately not `#[non_exhaustive]` (nor are [`EtcdKind`] and [`CodeClass`]): the one
/// mapping to a status matches them exhaustively, so a class added here breaks its build
/// until it is mapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass<'a> {
    /// etcd answers this case with one of its own errors; the client gets etcd's code and
    /// exact message (the Go client matches on the text).
    Etcd(EtcdKind),
    /// A condition etcd does not have: the client gets the error's `Display` text under this
    /// code, with no "etcdserver:" prefix a client could mistake for an etcd error.
    Own(CodeClass),
    /// A watch-core error, mapped as every watch error is (watch-proto's `from_watch_error`).
    Watch(&'a WatchError),
}

/// The etcd errors a store operation can end in. Each names the watch-proto `EtcdError` of
/// the same name, which holds etcd's code and message (one copy of each text).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EtcdKind {
    /// A revision below the compaction revision.
    Compacted,
    /// A revision above the current one.
    FutureRevision,
    /// A request with an empty key.
    EmptyKey,
    /// `ignore_value`/`ignore_lease` on a key that does not exist.
    KeyNotFound,
    /// `ignore_value` with a value.
    ValueProvided,
    /// `ignore_lease` with a lease.
    LeaseProvided,
    /// A txn writing a key twice.
    DuplicateKey,
    /// A txn with too many compares or ops.
    TooManyOps,
    /// The event log's queue is full.
    TooManyRequests,
    /// An unknown lease.
    LeaseNotFound,
    /// A lease ID already in use.
    LeaseExists,
    /// A lease TTL above the maximum.
    LeaseTtlTooLarge,
    /// The store (or its log) is closed: the server is stopping.
    Stopped,
    /// The space quota is exhausted (etcd's "mvcc: database space exceeded").
    NoSpace,
    /// Stored data failed an integrity check, or the data directory is inconsistent.
    Corrupt,
}

/// The gRPC code of a [`StoreError`] etcd does not have (tonic-free: the codes the store
/// uses, named as gRPC names them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CodeClass {
    /// The request cannot succeed in the store's current mode (a mirror refusing a write).
    FailedPrecondition,
    /// A configured limit was reached.
    ResourceExhausted,
    /// The store cannot serve now (storage failure, fail-stop, mirror stopped); retrying
    /// elsewhere or after a restart may succeed.
    Unavailable,
    /// A server bug or setup problem, not the request's fault.
    Internal,
}

impl StoreError {
    /// How a client sees this error (see [`ErrorClass`]).
    pub fn class(&self) -> ErrorClass<'_> {
        use CodeClass::*;
        use ErrorClass::{Etcd, Own};
        match self {
            Self::EmptyKey => Etcd(EtcdKind::EmptyKey),
            Self::DuplicateKey => Etcd(EtcdKind::DuplicateKey),
            Self::TooManyOps { .. } => Etcd(EtcdKind::TooManyOps),
            Self::Compacted { .. } => Etcd(EtcdKind::Compacted),
            Self::FutureRevision { .. } => Etcd(EtcdKind::FutureRevision),
            Self::LeaseNotFound { .. } => Etcd(EtcdKind::LeaseNotFound),
            Self::LeaseExists { .. } => Etcd(EtcdKind::LeaseExists),
            Self::LeaseTtlTooLarge { .. } => Etcd(EtcdKind::LeaseTtlTooLarge),
            // keywatch's own limit (etcd has none), as for too many watchers.
            Self::TooManyLeases { .. } => Own(ResourceExhausted),
            Self::KeyNotFound => Etcd(EtcdKind::KeyNotFound),
            Self::ValueProvided => Etcd(EtcdKind::ValueProvided),
            Self::LeaseProvided => Etcd(EtcdKind::LeaseProvided),
            Self::Watch(w) => ErrorClass::Watch(w),
            Self::Closed => Etcd(EtcdKind::Stopped),
            // Fail-stop: clients go elsewhere or retry after a restart.
            Self::Failed { .. } => Own(Unavailable),
            Self::Log(l) => log_class(l),
            Self::Inconsistent(_) | Self::CorruptAlarm => Etcd(EtcdKind::Corrupt),
            Self::NoSpace => Etcd(EtcdKind::NoSpace),
            Self::Backup { .. } => Own(Internal),
            // Only from `Store::open`: a setup problem, not a request's.
            Self::InvalidConfig { .. } => Own(Internal),
            Self::Snapshot { .. } | Self::LeaseFile { .. } => Own(Unavailable),
            Self::MirrorReadOnly | Self::OutsideMirror { .. } => Own(FailedPrecondition),
            Self::MirrorOrder { .. } | Self::MirrorDiverged { .. } => Own(Unavailable),
        }
    }
}

/// The class of an event-log error, from its exhaustive [`event_log::ErrorKind`] (the
/// `Display` text of [`StoreError::Log`] is the log error's own).
///
/// | kind (variants) | class |
/// |---|---|
/// | `Compacted` (`Compacted`, `AlreadyCompacted`) | etcd's compacted (etcd answers a compaction at or below the last one the same way) |
/// | `FutureRevision` | etcd's future revision |
/// | `Busy` (`QueueFull`) | etcd's "too many requests" |
/// | `Closed` | etcd's "server stopped" |
/// | `Corrupt` | etcd's "corrupt cluster" (the detail is for the server's log) |
/// | `Unavailable` (`Io`, `Storage`, `Poisoned`) | Unavailable |
/// | `Internal` (`NotIncreasing`, `UnsupportedFormat`) | Internal: server bugs or setup, not the request |
fn log_class(e: &LogError) -> ErrorClass<'static> {
    use CodeClass::*;
    use ErrorClass::{Etcd, Own};
    use event_log::ErrorKind;
    match e.kind() {
        ErrorKind::Compacted => Etcd(EtcdKind::Compacted),
        ErrorKind::FutureRevision => Etcd(EtcdKind::FutureRevision),
        ErrorKind::Busy => Etcd(EtcdKind::TooManyRequests),
        ErrorKind::Closed => Etcd(EtcdKind::Stopped),
        ErrorKind::Corrupt => Etcd(EtcdKind::Corrupt),
        ErrorKind::Unavailable => Own(Unavailable),
        ErrorKind::Internal => Own(Internal),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn log(e: LogError) -> ErrorClass<'static> {
        log_class(&e)
    }

    #[test]
    fn log_errors() {
        use CodeClass::*;
        use ErrorClass::{Etcd, Own};
        assert_eq!(
            log(LogError::Compacted { compacted: 3 }),
            Etcd(EtcdKind::Compacted)
        );
        let already = LogError::AlreadyCompacted {
            requested: 2,
            compacted: 3,
        };
        assert_eq!(log(already), Etcd(EtcdKind::Compacted));
        let future = LogError::FutureRevision {
            requested: 9,
            last: 4,
        };
        assert_eq!(log(future), Etcd(EtcdKind::FutureRevision));
        assert_eq!(log(LogError::QueueFull), Etcd(EtcdKind::TooManyRequests));
        assert_eq!(log(LogError::Closed), Etcd(EtcdKind::Stopped));
        let corrupt = LogError::Corrupt {
            revision: Some(4),
            reason: "crc".into(),
        };
        assert_eq!(log(corrupt), Etcd(EtcdKind::Corrupt));
        let io = LogError::Io(Arc::new(std::io::Error::other("disk")));
        assert_eq!(log(io), Own(Unavailable));
        assert_eq!(log(LogError::Storage("busy".into())), Own(Unavailable));
        let poisoned = LogError::Poisoned {
            cause: "fsync".into(),
        };
        assert_eq!(log(poisoned), Own(Unavailable));
        let not_increasing = LogError::NotIncreasing {
            revision: 1,
            last: 2,
        };
        assert_eq!(log(not_increasing), Own(Internal));
        let format = LogError::UnsupportedFormat {
            found: 9,
            expected: 1,
        };
        assert_eq!(log(format), Own(Internal));
    }

    #[test]
    fn log_error_text_is_the_logs() {
        let e = StoreError::from(LogError::QueueFull);
        assert_eq!(e.to_string(), LogError::QueueFull.to_string());
    }
}

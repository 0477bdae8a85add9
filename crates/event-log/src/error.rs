//! The typed error of every event-log operation.

use std::sync::Arc;

use watch_core::{HistoryError, Revision};

/// Why an event-log operation failed.
///
/// The error is `Clone` because one failed commit is reported to every submitter waiting on it.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum LogError {
    /// The operating system refused an I/O operation (open, read, write, fsync). When it happens
    /// during a commit the log is poisoned as well.
    #[error("event log I/O error: {0}")]
    Io(Arc<std::io::Error>),
    /// The storage backend failed for a reason other than I/O (the text is the backend's).
    #[error("event log storage error: {0}")]
    Storage(String),
    /// Stored bytes fail their checksum or do not decode: the file was altered or damaged.
    /// Nothing is returned for the damaged record; the log does not try to repair it.
    #[error("event log corrupt{}: {reason}", revision.map(|r| format!(" at revision {r}")).unwrap_or_default())]
    Corrupt {
        /// The revision whose record is damaged, when known.
        revision: Option<Revision>,
        /// What check failed.
        reason: String,
    },
    /// An earlier commit failed, so the log refuses every further append until it is reopened
    /// (recovering from what is actually on disk). Nothing after the failure was acknowledged.
    #[error("event log is poisoned by an earlier failed commit: {cause}")]
    Poisoned {
        /// The error of the commit that failed.
        cause: String,
    },
    /// The requested revisions were compacted away. `compacted` is the oldest revision still
    /// readable, so a reader may resume from `compacted - 1`.
    #[error("required revision has been compacted; oldest available is {compacted}")]
    Compacted {
        /// The current compaction revision (the oldest readable revision).
        compacted: Revision,
    },
    /// `compact(requested)` was called at or below the current compaction revision. The
    /// compaction revision never goes backwards and compacting twice to it is refused, as etcd
    /// refuses it.
    #[error("revision {requested} is at or below the compaction revision {compacted}")]
    AlreadyCompacted {
        /// The revision asked for.
        requested: Revision,
        /// The current compaction revision.
        compacted: Revision,
    },
    /// A change set's revision is not above the last accepted one; revisions must strictly
    /// increase. The change set was not written; the log is not poisoned.
    #[error("revision {revision} is not above the last accepted revision {last}")]
    NotIncreasing {
        /// The revision offered.
        revision: Revision,
        /// The last revision accepted.
        last: Revision,
    },
    /// A compaction asked for a revision above the last one written.
    #[error("revision {requested} is above the last revision {last}")]
    FutureRevision {
        /// The revision asked for.
        requested: Revision,
        /// The last revision in the log.
        last: Revision,
    },
    /// `try_append` found the submission queue full; nothing was queued. `append` waits instead.
    #[error("event log submission queue is full")]
    QueueFull,
    /// The log was closed (or its writer thread is gone); nothing was queued.
    #[error("event log is closed")]
    Closed,
    /// The file was written by an incompatible format version of this crate.
    #[error("event log format version {found} is not supported (expected {expected})")]
    UnsupportedFormat {
        /// Version recorded in the file.
        found: u64,
        /// Version this build reads and writes.
        expected: u64,
    },
}

/// The class of a [`LogError`], for callers that turn errors into responses. Unlike
/// `LogError` it is exhaustive: the classification of a new variant is written here, in
/// [`LogError::kind`]'s exhaustive match, and a new class breaks every caller's match at
/// compile time instead of reaching it as a catch-all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The revisions asked for are compacted (`Compacted`, `AlreadyCompacted`).
    Compacted,
    /// A revision above the last one written (`FutureRevision`).
    FutureRevision,
    /// The submission queue is full; retry later (`QueueFull`).
    Busy,
    /// The log is closed (`Closed`).
    Closed,
    /// Stored data is damaged (`Corrupt`).
    Corrupt,
    /// The storage failed; nothing was acknowledged (`Io`, `Storage`, `Poisoned`).
    Unavailable,
    /// A bug or setup error of the caller, not the request (`NotIncreasing`,
    /// `UnsupportedFormat`).
    Internal,
}

impl LogError {
    /// This error's class.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Compacted { .. } | Self::AlreadyCompacted { .. } => ErrorKind::Compacted,
            Self::FutureRevision { .. } => ErrorKind::FutureRevision,
            Self::QueueFull => ErrorKind::Busy,
            Self::Closed => ErrorKind::Closed,
            Self::Corrupt { .. } => ErrorKind::Corrupt,
            Self::Io(_) | Self::Storage(_) | Self::Poisoned { .. } => ErrorKind::Unavailable,
            Self::NotIncreasing { .. } | Self::UnsupportedFormat { .. } => ErrorKind::Internal,
        }
    }
}

impl From<std::io::Error> for LogError {
    fn from(e: std::io::Error) -> Self {
        Self::Io(Arc::new(e))
    }
}

impl From<redb::StorageError> for LogError {
    fn from(e: redb::StorageError) -> Self {
        match e {
            redb::StorageError::Io(io) => Self::Io(Arc::new(io)),
            redb::StorageError::Corrupted(reason) => Self::Corrupt {
                revision: None,
                reason,
            },
            other => Self::Storage(other.to_string()),
        }
    }
}

/// Maps every redb error type through [`redb::Error`], keeping I/O and corruption typed.
macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for LogError {
            fn from(e: $t) -> Self {
                match redb::Error::from(e) {
                    redb::Error::Io(io) => Self::Io(Arc::new(io)),
                    redb::Error::Corrupted(reason) => Self::Corrupt { revision: None, reason },
                    other => Self::Storage(other.to_string()),
                }
            }
        }
    )*};
}
from_redb!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::CommitError,
    redb::Error
);

impl From<LogError> for HistoryError {
    fn from(e: LogError) -> Self {
        match e {
            LogError::Compacted { compacted } => HistoryError::Compacted {
                compact_revision: compacted,
            },
            other => HistoryError::Unavailable(other.to_string()),
        }
    }
}

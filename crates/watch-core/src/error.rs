//! Typed errors of the engine.

use bytes::Bytes;

use crate::types::Revision;

/// Why a watch could not be registered or an engine call was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WatchError {
    /// An exact-key selector with an empty key.
    #[error("key is not provided")]
    EmptyKey,
    /// A range selector whose start is not below its end, so it selects no key.
    #[error("watcher range is empty: start {start:?} is not below end {end:?}")]
    EmptyRange {
        /// The requested start.
        start: Bytes,
        /// The requested (exclusive) end.
        end: Bytes,
    },
    /// The engine-wide watcher limit is reached.
    #[error("too many watchers: the limit is {limit}")]
    TooManyWatchers {
        /// The configured limit ([`crate::EngineConfig::max_watchers`]).
        limit: usize,
    },
    /// A buffer size of 0 was requested; a watcher needs room for at least one message.
    #[error("watch buffer size must be at least 1")]
    ZeroBuffer,
    /// `start_revision` is below the oldest revision history can still replay.
    #[error(
        "required revision {requested} has been compacted; oldest available is {compact_revision}"
    )]
    Compacted {
        /// The requested start revision.
        requested: Revision,
        /// The oldest revision that can be replayed.
        compact_revision: Revision,
    },
    /// The engine's dispatcher has stopped; no new watcher can be served.
    #[error("the watch engine has shut down")]
    Shutdown,
}

/// Why a change set was refused by [`crate::WatchEngine::publish`]. A refusal is a bug in the
/// publisher (the write itself is not affected); the change set is not delivered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PublishError {
    /// The revision is not above the last published one; revisions must strictly increase.
    #[error("revision {revision} is not above the last published revision {last}")]
    NotIncreasing {
        /// The revision offered.
        revision: Revision,
        /// The last revision accepted.
        last: Revision,
    },
}

/// Why a [`crate::History`] could not answer a read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HistoryError {
    /// The requested revisions are no longer retained.
    #[error("required revision has been compacted; oldest available is {compact_revision}")]
    Compacted {
        /// The oldest revision still readable (a reader may resume from it).
        compact_revision: Revision,
    },
    /// The history store failed (I/O, corruption, closed). The text says what happened.
    #[error("history unavailable: {0}")]
    Unavailable(String),
}

/// The class of a [`WatchError`] or [`HistoryError`], for callers that turn errors into
/// responses. Unlike those enums it is exhaustive: a new variant is classified here, in the
/// exhaustive `kind` matches, and a new class breaks every caller's match at compile time
/// instead of reaching it as a catch-all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// An exact-key selector with an empty key ([`WatchError::EmptyKey`]).
    EmptyKey,
    /// A range selector that selects no key ([`WatchError::EmptyRange`]).
    EmptyRange,
    /// The revisions asked for are compacted (both `Compacted` variants).
    Compacted,
    /// The engine stopped ([`WatchError::Shutdown`]).
    Shutdown,
    /// A configured limit is reached ([`WatchError::TooManyWatchers`]).
    LimitReached,
    /// The history store failed ([`HistoryError::Unavailable`]).
    Unavailable,
    /// The caller's setup is wrong, not the request ([`WatchError::ZeroBuffer`]).
    Misconfigured,
}

impl WatchError {
    /// This error's class.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::EmptyKey => ErrorKind::EmptyKey,
            Self::EmptyRange { .. } => ErrorKind::EmptyRange,
            Self::TooManyWatchers { .. } => ErrorKind::LimitReached,
            Self::ZeroBuffer => ErrorKind::Misconfigured,
            Self::Compacted { .. } => ErrorKind::Compacted,
            Self::Shutdown => ErrorKind::Shutdown,
        }
    }
}

impl HistoryError {
    /// This error's class.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Compacted { .. } => ErrorKind::Compacted,
            Self::Unavailable(_) => ErrorKind::Unavailable,
        }
    }
}

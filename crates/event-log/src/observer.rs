//! [`LogObserver`]: a hook the writer thread calls after each commit, so an embedder can export
//! batch sizes and commit latency (e.g. as Prometheus histograms) without this crate depending
//! on a metrics library.

use std::time::Duration;

use crate::error::LogError;

/// Receives commit outcomes from the log's writer thread ([`crate::EventLog::set_observer`]).
///
/// Called on the writer thread between commits, so an implementation must be quick and must
/// not block (record into atomics or a metrics registry); a slow observer delays every append.
pub trait LogObserver: std::fmt::Debug + Send + Sync {
    /// A group commit of `change_sets` change sets (`bytes` encoded bytes) became durable;
    /// `duration` is the storage commit itself, including its fsync under
    /// [`crate::Durability::Fsync`].
    fn batch_committed(&self, change_sets: usize, bytes: usize, duration: Duration);

    /// A commit (of a batch, or a compaction) failed: the log is now poisoned.
    fn commit_failed(&self, error: &LogError);
}

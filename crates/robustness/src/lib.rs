//! keywatch's robustness harness: a randomized workload against a real `watch-server` process
//! (concurrent writers, many watchers that read slowly, stall, disconnect and resume, periodic
//! compaction, kill -9 and restart), recorded completely and validated offline against etcd's
//! watch properties; plus pressure scenarios (1,000 stalled watchers, bounded RSS).
//!
//! - [`workload::run`] runs one seeded randomized workload and returns its [`record::RunRecord`].
//! - [`validate::validate`] checks a record: Ordered, Unique, Atomic, Reliable, Resumable,
//!   Bookmarkable, prev_kv, IsCreate, filters, and that acknowledged writes survive restarts.
//! - [`stalled::run`] is the stalled-watchers pressure scenario (RSS bound, latency figures).
//! - [`server::start`] starts the server child process (testkit's `ServerProcess`, killed on
//!   drop).

pub mod model;
pub mod record;
pub mod server;
pub mod stalled;
pub mod validate;
pub mod wire;
pub mod workload;

/// Errors of the harness itself (not property violations, which [`validate::Report`] lists).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The server could not be started, or did not print `watch-server listening on <addr>`
    /// (the error holds its last output lines).
    #[error(transparent)]
    Server(#[from] testkit::Error),
    /// A request the harness needs (setup or the final read) kept failing.
    #[error("{what}: {status}")]
    Rpc {
        /// What the harness was doing.
        what: String,
        /// The last error.
        status: tonic::Status,
    },
    /// Local I/O (temp dirs).
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// A helper task panicked or was cancelled.
    #[error("task failed: {0}")]
    Task(String),
}

impl From<tokio::task::JoinError> for Error {
    fn from(e: tokio::task::JoinError) -> Self {
        Error::Task(e.to_string())
    }
}

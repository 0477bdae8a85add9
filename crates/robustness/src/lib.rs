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
//!
//! The validator replays acknowledged writes through the reference [`model::Model`]: each
//! revision's events, with their previous values, are what every watcher must have seen.
//!
//! ```
//! use keywatch_robustness::model::Model;
//! use keywatch_robustness::record::Request;
//!
//! let mut model = Model::default();
//! let put = Request::Put { key: b"k".to_vec(), value: b"v1".to_vec() };
//! assert_eq!(model.apply(&put, 2).events.len(), 1);
//! let delete = Request::DeleteRange { key: b"k".to_vec(), range_end: Vec::new() };
//! let applied = model.apply(&delete, 3);
//! assert_eq!(applied.events.len(), 1);
//! assert!(model.state.is_empty());
//! // Deleting a missing key writes nothing: no revision, no event.
//! assert!(model.apply(&delete, 4).events.is_empty());
//! ```
//!
//! # Design
//!
//! The evidence behind "a watcher never silently misses an event": a seeded randomized workload
//! against a real `watch-server` child process, recorded completely and validated offline.
//! `cargo xtask robustness [--duration S] [--seed N]` (also the last step of `cargo xtask ci`).
//!
//! - `workload`: writers (put / delete / delete-range / txn over 8 keys, every value unique),
//!   watch streams of 1–3 watchers with random selectors and options that read healthily,
//!   slowly, stall or disconnect and resume at `last covered + 1` (one in five lists and
//!   watches in one call with keywatch's `initial_state`, and lists again on resume), a
//!   compactor, kill -9 +
//!   restart (clients follow the new port), then a final kill, a final Range and a drain (each
//!   watcher asks for progress until it covers the final revision).
//! - `validate`: replays acknowledged writes through `model` in revision order (checking every
//!   response's prev values and txn branch), resolves unknown-outcome writes from the
//!   *reference* watcher (all keys from revision 1; compaction never passes it), then checks
//!   each watcher: Ordered, Unique, Atomic, Reliable, Resumable, Bookmarkable, prev_kv, IsCreate,
//!   filters, and a listing equal to the model's state at its revision; durability: no revision claimed twice, final state = model.
//! - `stalled`: the pressure scenario (stalled watchers, RSS bound, latency); `server`: the
//!   child process (testkit's `ServerProcess` with the harness's log level). The tests spawn
//!   `robustness-server`, this package's copy of the binary's `main`, because cargo builds no
//!   other package's binary for a test.
//!
//! Invariant: the harness asserts outcomes only; timeouts are liveness guards (a watcher that
//! never catches up is reported), never latency thresholds. Figures: `docs/reliability.md`.

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

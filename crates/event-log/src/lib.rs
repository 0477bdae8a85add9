//! event-log: a durable, batched, queryable history of every keywatch [`ChangeSet`].
//!
//! The state machine appends each committed write's change set here; the watch engine reads
//! history back through the [`watch_core::History`] impl to start watchers at a past revision
//! and to catch up slow ones, and a restarting process replays the log to rebuild its state.
//!
//! - **Group commit.** [`EventLog::append`] queues the change set for one writer OS thread owned
//!   by the log (joined on [`EventLog::close`]). The writer takes what is queued, up to
//!   [`LogConfig::batch_size`] change sets or [`LogConfig::max_batch_bytes`], optionally waits
//!   [`LogConfig::flush_interval`] for more, and makes the batch durable with **one** redb commit
//!   (one fsync under [`Durability::Fsync`]). `append` resolves only then.
//! - **Backpressure, never drops.** The queue is bounded: `append` waits for room,
//!   [`EventLog::try_append`] fails with [`LogError::QueueFull`].
//! - **Poisoning.** A failed commit is reported to every submitter of its batch and the log
//!   refuses every later append with [`LogError::Poisoned`]: nothing after a failed write or
//!   fsync is ever acknowledged. Reopen to recover from what is on disk.
//! - **Queries** by revision range, exact key, prefix or key range ([`KeySelector`]), in
//!   revision order; [`EventLog::replay`] for a full rebuild.
//! - **Compaction** ([`EventLog::compact`], or a [`RetentionPolicy`]) drops old history with
//!   etcd semantics: after `compact(c)`, revisions `>= c` stay readable and older reads fail
//!   with [`LogError::Compacted`].
//! - **Integrity.** redb never exposes a torn commit; each record also carries a CRC-32, so a
//!   damaged value is reported as [`LogError::Corrupt`], never returned as data.
//! - **Crash-safe files.** [`files`] creates redb files whole (under a temporary name, then
//!   renamed) and replaces small files whole; every crate with files in a data directory uses
//!   it, so a kill at any instant leaves them openable.
//!
//! - **Observability.** A [`LogObserver`] set with [`EventLog::set_observer`] hears about every
//!   commit (size, duration) and every failure, for metrics; this crate has no metrics
//!   dependency.
//!
//! Storage sits behind [`LogStore`]; [`RedbStore`] is the default. Records use a small
//! versioned binary codec (see [`codec`]) rather than serde: the layout is fixed, tiny, and
//! must stay readable across releases, which is easier to guarantee written out by hand.
//!
//! See `docs/event-log-design.md` for the commit protocol and crash analysis.
//!
//! ```
//! use event_log::{Durability, EventLog, LogConfig};
//! use watch_core::{ChangeSet, Event, KeyValue};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! let config = LogConfig { durability: Durability::Fsync, ..LogConfig::default() };
//! let rt = tokio::runtime::Builder::new_current_thread().build()?;
//! rt.block_on(async {
//!     let log = EventLog::open(dir.path(), config)?;
//!     for rev in 1..=3u64 {
//!         let kv = KeyValue {
//!             key: format!("/svc/{rev}").into(),
//!             value: "up".into(),
//!             create_revision: rev,
//!             mod_revision: rev,
//!             version: 1,
//!             lease: 0,
//!         };
//!         // Resolves once the change set is durable.
//!         log.append(ChangeSet::new(rev, vec![Event::put(kv, None)])).await?;
//!     }
//!     assert_eq!(log.last_revision(), 3);
//!     let svc2 = log.read_key("/svc/2", 0, 10)?;
//!     assert_eq!(svc2[0].revision, 2);
//!     assert_eq!(log.read_prefix("/svc/", 1, 10)?.len(), 2);
//!
//!     log.compact(2).await?;
//!     assert!(log.read_range(0, 10).is_err()); // revision 1 is gone
//!     let replayed: Vec<_> = log.replay(1).collect::<Result<_, _>>()?;
//!     assert_eq!(replayed.len(), 2);
//!     Ok::<_, event_log::LogError>(())
//! })?;
//! # Ok(())
//! # }
//! ```
//!
//! # Modules
//!
//! - `log` (`EventLog`): bounded submission queue (a tokio `Semaphore` of slots + std `mpsc`) in
//!   front of **one writer OS thread** owned by the log and joined by `close`/drop. The writer
//!   takes what is queued (up to `batch_size` / `max_batch_bytes`, optional `flush_interval`
//!   linger), makes it durable (one frame and `fdatasync` of the write-ahead file `wal`, then
//!   a redb commit without a flush; or one durable redb commit with the file off), then
//!   answers every `AppendAck`. Compaction runs on the same thread in steps of at most 256
//!   revisions (`compact_step_revisions`) alternating with batches (appends are not held by a
//!   long compaction); only the last step commits durably, and the compaction is answered
//!   after it (a crash may undo earlier steps, never an answered compaction); retention runs
//!   between batches. Reads (`read*`, `replay`, the `History`
//!   impl via `spawn_blocking`) go straight to the store.
//! - `store`: the `LogStore` trait (append a batch atomically, read by selector, first change
//!   per key after a revision (what a read at a past revision needs), compact in bounded steps,
//!   retention target) and `RedbStore`, the default: tables `changes` (revision → record),
//!   `key_index` ((key, revision) → ()) and `meta` (format version, last and compacted revision,
//!   record count and bytes, key-index bytes). The counters are updated in the transaction that
//!   appends or compacts, so the bytes in use (`LogStore::bytes_in_use`, served from memory by
//!   `EventLog::bytes_in_use`: records and index entries with a documented per-entry
//!   overhead, an upper bound of the live data) never need a walk; a store from before the
//!   index counter gets it at open.
//! - `codec`: versioned, length-prefixed binary record with a CRC-32 per change set.
//! - `config`: `LogConfig`, `Durability` (`Fsync` / `NoSync` for tests; the one durability type, kv-store re-exports it), `RetentionPolicy`.
//! - `error`: `LogError` (`#[non_exhaustive]`, `Clone` so one failed commit reaches every waiter).
//! - `observer`: `LogObserver`, a hook the writer thread calls after each commit (change sets,
//!   bytes, commit duration with fsync) and on a failed commit; set once with
//!   `EventLog::set_observer`. The server turns it into Prometheus histograms; the crate itself
//!   depends on no metrics library.
//!
//! # Invariants
//!
//! - **Ack only after durable**: an `AppendAck` resolves `Ok` only after the commit holding its
//!   change set returned (fsync under `Durability::Fsync`).
//! - **Poisoning**: a failed commit fails its batch, everything queued behind it, and every later
//!   append (`Poisoned`); there is no retry path. Reopen to continue from what is on disk.
//! - **Never a silent drop**: a full queue makes `append` wait or `try_append` fail `QueueFull`.
//! - Revisions strictly increase (checked on the writer, `NotIncreasing`); `last_revision` and
//!   `compacted_revision` are persisted and never go backwards; after `compact(c)` revisions `>= c`
//!   stay readable (etcd semantics).
//! - A record that fails its checksum is an error (`Corrupt`), never data.

pub mod codec;
mod config;
mod error;
pub mod files;
mod log;
mod observer;
mod store;
mod wal;

pub use config::{
    DEFAULT_CACHE_BYTES, DEFAULT_COMPACT_STEP, Durability, LogConfig, ParseDurabilityError,
    RetentionPolicy,
};
pub use error::{ErrorKind, LogError};
pub use log::{AppendAck, EventLog, Replay, STORE_FILE, WAL_FILE};
pub use observer::LogObserver;
pub use store::{LogStore, RedbOptions, RedbStore, WAL_SUFFIX};
pub use wal::{WalBackend, WalLimits};
pub use watch_core::{ChangeSet, KeySelector, Revision};

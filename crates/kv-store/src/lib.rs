//! kv-store: keywatch's embeddable key-value store. etcd's KV model (revisions, ranges, txns,
//! compaction) and etcd's leases over a durable event log ([`event_log`]), with watches served
//! by watch-core's engine ([`watch_core`]). [`Store`] is the **in-process engine API**: what an
//! application embeds, with no network hop and no protobuf or gRPC in its API or its
//! dependencies. watch-server's gRPC services are a thin translation over it, so the server and
//! an embedder run the same code.
//!
//! ```
//! use kv_store::{Durability, PutOptions, RangeRequest, Store, StoreConfig};
//! use watch_core::{KeySelector, WatchMessage, WatchOptions};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! let rt = tokio::runtime::Runtime::new()?;
//! rt.block_on(async {
//!     // Fsync (fsync before ack) is the default; tests may skip it.
//!     let store = Store::open(dir.path(), StoreConfig::default().durability(Durability::NoSync)).await?;
//!     assert_eq!(store.current_revision(), 1); // a fresh store is at revision 1, as etcd
//!
//!     let mut watch = store.watch(KeySelector::prefix("/svc/"), WatchOptions::default().prev_kv(true))?;
//!     store.put("/svc/a", "up", PutOptions::default()).await?; // revision 2
//!     let put = store.put("/svc/a", "down", PutOptions::default()).await?; // revision 3
//!     assert_eq!(put.revision, 3);
//!
//!     // Writes are acknowledged only once durable and published: the watch has them.
//!     let mut seen = Vec::new();
//!     while seen.len() < 2 {
//!         if let Some(WatchMessage::Events(batch)) = watch.recv().await {
//!             for e in batch.events() {
//!                 seen.push((batch.revision(), e.kv.value.clone(), e.prev_kv.map(|p| p.value.clone())));
//!             }
//!         }
//!     }
//!     assert_eq!(seen[1], (3, "down".into(), Some("up".into())));
//!
//!     // Reads at a past revision come from the event log.
//!     let then = store.range(RangeRequest::key("/svc/a").revision(2)).await?;
//!     assert_eq!(then.kvs[0].value, "up");
//!     store.close().await?;
//!     Ok::<_, kv_store::StoreError>(())
//! })?;
//! # Ok(())
//! # }
//! ```
//!
//! # Model
//!
//! The key-value state is a `BTreeMap` in memory, rebuilt at open by streaming the persisted
//! state [`STATE_FILE`] (a redb table brought up to date incrementally before each
//! compaction, see `checkpoint.rs`) plus a replay of the event log after its revision. A fresh store is
//! at revision 1; one revision per write request (a whole txn counts once; deleting nothing and
//! read-only txns do not bump it). Txns validate as etcd's `checkTxnRequest`/`checkIntervals`
//! (max ops, empty keys, a key written twice in a branch). `state.rs` is pure logic
//! (validation, compares, range options, execution yielding one `ChangeSet`); `lib.rs` holds
//! the write path, reads and compaction.
//!
//! # Write path
//!
//! A write takes the write lock (a tokio mutex: held across awaits, never by readers), runs
//! the request against the state, then hands the resulting change set to `Store::commit`, the
//! one write path every writer (txn, lease revoke and expiry, mirror apply and reset) ends in:
//! it queues the change set on the event log, applies it to the in-memory state and hands the
//! log's acknowledgement to the publisher task, all in revision order and with no await
//! between the log append and the hand-off; then the writer releases the lock. The event log commits in groups. The publisher
//! awaits acknowledgements in revision order, publishes each durable change set to the watch
//! engine and advances the *durable revision*. A write returns once its revision is published,
//! so a client that wrote at revision R and then watches sees R (read-your-writes).
//!
//! # Reads
//!
//! A read serves the in-memory state at its revision N but returns only once the durable
//! revision reaches N: no read ever returns data a crash could still lose. A read at a past
//! revision R is that state with each key changed after R restored to its value at R, found
//! through the event log's key index (one seek per key of the range, never a replay of the
//! history after R); a txn fetches such reads before it takes the write lock.
//!
//! # Failure
//!
//! If the event log fails a commit, the store is fail-stop: the write and every later one fail
//! with [`StoreError::Failed`], reads of state beyond the last durable revision fail too, and
//! [`Store::failed`] resolves so a server can exit. Nothing after the failure is acknowledged.
//!
//! # Tasks
//!
//! [`Store::open`] spawns three tasks on the current tokio runtime: the watch engine's
//! dispatcher, the publisher and the lease expiry task, and one OS thread that writes lease
//! grants ([`LEASES_FILE`]). [`Store::close`] (or dropping every clone) stops them.
//!
//! # List and watch
//!
//! [`Store::watch_with_initial_state`]: the state of a selector's keys at one revision R
//! (PUT events, in key-ordered chunks bounded in bytes), a marker, then every change after R,
//! with no gap and no duplicate. See `list_watch.rs` for filters, chunks and compaction.
//!
//! # Leases
//!
//! [`Store::lease_grant`] and friends: etcd's leases. A revoked or expired lease's keys are
//! deleted in one revision through the write path above; see `lease.rs` for storage, crash
//! consistency and the restart rule.
//!
//! # Maintenance
//!
//! [`Store::backup`] writes a consistent point-in-time backup (keys, leases, revision counter,
//! compaction revision, history) and [`restore`] installs one as a new data directory;
//! [`Store::hash_kv`] hashes the state at a revision; [`Store::defragment`] returns the files'
//! free space to the file system; [`StoreConfig::quota_bytes`] is etcd's space quota, with its
//! NOSPACE [`Alarm`], counted on [`Store::bytes_in_use`] (live data, kept as counters by
//! each commit) rather than the files' lengths. See `maintenance.rs` for the backup format
//! and the quota rules.
//!
//! # Invariants
//!
//! - **Log order = revision order, publish in order, ack after publish.** A write holds the write
//!   lock (tokio mutex; readers never take it) while it computes its change set and passes it to
//!   `Store::commit`, the one write path (txn, lease revoke and expiry, mirror apply and reset):
//!   queue on the event log, apply to the state, hand the log's ack to the publisher task, with
//!   no await between the log append and the hand-off. The publisher awaits acks in revision
//!   order, publishes each durable change set to the engine, then advances the *durable revision*; the write returns only once its revision is published
//!   (read-your-writes through watch). The pipeline slot is reserved before the log append, so a
//!   dropped request can never leave a durable revision unpublished.
//! - **No read returns non-durable data**: a read takes the state at revision N under the state
//!   lock, then waits until the durable revision reaches N.
//! - **Change sets always carry `prev_kv`** for every event with a previous value: watch
//!   `prev_kv` comes straight from the log, and a range at a past revision R is the current range
//!   with each key changed after R restored to the `prev_kv` of its first change after R.
//! - **A read at a past revision costs O(log n) per key, never a replay**: the first change
//!   after R of each key of the range comes from the event log's `(key, revision)` index, one
//!   seek per distinct indexed key (`LogStore::first_changes`; keys deleted since R are found the
//!   same way). Bound: O((K + 1) · log n + result), K = keys of the range changed at any retained
//!   revision (etcd's tree index holds the same keys). A txn fetches its historical reads
//!   before taking the write lock, so a slow one stalls no writer.
//! - **Mirror mode revisions are etcd's**: `mirror_apply` accepts any increasing revision (gaps
//!   are other keys' revisions), never a repeated or lower one; a snapshot install raises the
//!   persisted floor (`mirror.floor`) that acts as the compaction revision, so nothing below it
//!   is ever served with a gap; local writes fail `MirrorReadOnly`.
//! - **Fail-stop**: a failed log commit marks the store failed; that write and every later one
//!   fail, reads beyond the durable revision fail, and `Store::failed` resolves (the server then exits non-zero).
//! - **Compaction keeps restart possible, and costs what changed**: the persisted state
//!   ([`STATE_FILE`]) is checkpointed to a durable revision S >= C-1, in one fsynced redb
//!   transaction writing one row per key changed since the previous checkpoint, before the
//!   log drops revisions below C; neither step holds the write lock (`checkpoint.rs`). Watches and reads
//!   below C fail with etcd's compacted error even while the engine's memory window still has them.

mod checkpoint;
mod clock;
mod error;
mod lease;
mod list_watch;
mod maintenance;
mod mirror;
mod snapshot;
mod state;
pub mod types;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use event_log::{EventLog, LogConfig, LogError};
use tokio::sync::{mpsc, watch};
use watch_core::{
    ChangeSet, EngineConfig, History, KeySelector, KeyValue, MemoryHistoryLimits, Revision,
    WatchEngine, WatchHandle, WatchOptions,
};

pub use checkpoint::{CheckpointInfo, STATE_FILE};
pub use error::{CodeClass, ErrorClass, EtcdKind, StoreError};
use lease::Leases;
pub use lease::{DEFAULT_MIN_LEASE_TTL, LEASES_FILE, LeaseGrant, LeaseTimeToLive, MAX_LEASE_TTL};
pub use list_watch::{
    DEFAULT_INITIAL_CHUNK_BYTES, InitialState, InitialStateReader, ListWatch, ListWatchMessage,
    MAX_RESTARTS,
};
pub use maintenance::{
    Alarm, AlarmMember, BACKUP_MAGIC, BackupInfo, Defragmented, KvHash, RestoreInfo, restore,
};
pub use mirror::{MIRROR_FLOOR_FILE, MirrorScope, MirrorSnapshot};
pub use snapshot::SNAPSHOT_FILE;
use state::{Exec, HistoricReads, KvState};
pub use types::*;

/// How durable a write is when it is acknowledged: the event log's setting, which also
/// governs lease grants in [`LEASES_FILE`]. `Fsync` (the default) fsyncs every group commit
/// before acknowledging its writes; `NoSync` may lose acknowledged writes on kill -9, an OS
/// crash or power loss (redb persists a non-durable commit only with the next durable one), for
/// tests and benchmarks.
pub use event_log::Durability;

/// Default of [`StoreConfig::compact_step_revisions`]: 256 revisions per step.
pub use event_log::DEFAULT_COMPACT_STEP;

/// Settings of a [`Store`]. `Default` matches etcd's defaults where etcd has one.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct StoreConfig {
    /// Commit durability.
    pub durability: Durability,
    /// Most compares or ops in one txn list (etcd `--max-txn-ops`, default 128).
    pub max_txn_ops: usize,
    /// Most watchers registered at once in the engine.
    pub max_watchers: usize,
    /// Most bytes of the engine's in-memory window of recent change sets (counted as
    /// `ChangeSet::mem_size` counts them); older revisions are served from the event log.
    pub window_bytes: usize,
    /// Interval of progress notifications for watchers that asked for them (etcd default
    /// 10 minutes; the engine adds 0–10 % jitter).
    pub progress_interval: Duration,
    /// Most leases alive at once; a grant beyond it fails with
    /// [`StoreError::TooManyLeases`].
    pub max_leases: usize,
    /// Smallest lease TTL in seconds; shorter grants are raised to it (etcd's default: 2).
    pub min_lease_ttl: i64,
    /// Space quota in bytes (etcd's `--quota-backend-bytes`), compared with
    /// [`Store::bytes_in_use`]; 0: none (the store's default; watch-server applies etcd's
    /// 2 GiB). See `maintenance.rs`.
    pub quota_bytes: u64,
    /// Most bytes of keys and values (plus 64 per event) a compaction's checkpoint folds in
    /// memory before writing them into its transaction; a larger window is written in several
    /// flushes (see `checkpoint.rs`). At least [`MIN_CHECKPOINT_FOLD_BYTES`]: [`Store::open`]
    /// refuses less with [`StoreError::InvalidConfig`]. Default
    /// [`DEFAULT_CHECKPOINT_FOLD_BYTES`] (64 MiB).
    pub checkpoint_fold_bytes: usize,
    /// Most bytes of records the event log's write-ahead file takes between two durable commits
    /// of the log (`event_log::WalLimits::max_bytes`; it also hands over every second). The
    /// file is reserved at 1.25× this at open. 0 turns the file off: every batch is then a
    /// durable redb commit (slower; see docs/benchmarks.md). At most [`MAX_WAL_BYTES`]: more
    /// is refused with [`StoreError::InvalidConfig`]. Default [`DEFAULT_WAL_BYTES`] (16 MiB).
    /// Only under [`Durability::Fsync`].
    pub wal_bytes: u64,
    /// Most revisions one step of the log's compaction deletes in one commit
    /// (`event_log::LogConfig::compact_step_revisions`): a commit waits for at most one step,
    /// so smaller steps hold puts for less time during a compaction and make it take longer.
    /// At least 1 ([`StoreError::InvalidConfig`] otherwise). Default [`DEFAULT_COMPACT_STEP`]
    /// (256).
    pub compact_step_revisions: usize,
    /// The member ID the store's own alarms are raised for (etcd's member ID).
    pub member_id: u64,
}

/// Default of [`StoreConfig::wal_bytes`]: 16 MiB.
pub const DEFAULT_WAL_BYTES: u64 = 16 << 20;

/// Largest [`StoreConfig::wal_bytes`]: 1 GiB. The file is reserved (written with zeros) at
/// open and replayed whole after a crash, so its size is bounded.
pub const MAX_WAL_BYTES: u64 = 1 << 30;

/// Default of [`StoreConfig::checkpoint_fold_bytes`]: 64 MiB.
pub const DEFAULT_CHECKPOINT_FOLD_BYTES: usize = 64 << 20;

/// Smallest [`StoreConfig::checkpoint_fold_bytes`]: 1 MiB. Below it a checkpoint would flush
/// after almost every chunk of change sets it reads, writing a key changed in several chunks
/// once per chunk, for no memory worth saving.
pub const MIN_CHECKPOINT_FOLD_BYTES: usize = 1 << 20;

impl StoreConfig {
    /// Refuses settings the store cannot run with.
    fn check(&self) -> Result<(), StoreError> {
        if self.checkpoint_fold_bytes < MIN_CHECKPOINT_FOLD_BYTES {
            return Err(StoreError::InvalidConfig {
                field: "checkpoint_fold_bytes",
                message: format!(
                    "{} bytes is below the minimum of {MIN_CHECKPOINT_FOLD_BYTES}",
                    self.checkpoint_fold_bytes
                ),
            });
        }
        if self.compact_step_revisions == 0 {
            return Err(StoreError::InvalidConfig {
                field: "compact_step_revisions",
                message: "0: a compaction step must delete at least one revision".to_owned(),
            });
        }
        if self.wal_bytes > MAX_WAL_BYTES {
            return Err(StoreError::InvalidConfig {
                field: "wal_bytes",
                message: format!(
                    "{} bytes is above the maximum of {MAX_WAL_BYTES}",
                    self.wal_bytes
                ),
            });
        }
        Ok(())
    }
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            durability: Durability::Fsync,
            max_txn_ops: 128,
            max_watchers: 1_000_000,
            window_bytes: MemoryHistoryLimits::default().max_bytes,
            progress_interval: Duration::from_secs(600),
            max_leases: 1_000_000,
            min_lease_ttl: DEFAULT_MIN_LEASE_TTL,
            quota_bytes: 0,
            checkpoint_fold_bytes: DEFAULT_CHECKPOINT_FOLD_BYTES,
            wal_bytes: DEFAULT_WAL_BYTES,
            compact_step_revisions: DEFAULT_COMPACT_STEP,
            member_id: 0,
        }
    }
}

impl StoreConfig {
    /// Sets [`StoreConfig::durability`].
    pub fn durability(mut self, d: Durability) -> Self {
        self.durability = d;
        self
    }
    /// Sets [`StoreConfig::max_txn_ops`].
    pub fn max_txn_ops(mut self, n: usize) -> Self {
        self.max_txn_ops = n;
        self
    }
    /// Sets [`StoreConfig::max_watchers`].
    pub fn max_watchers(mut self, n: usize) -> Self {
        self.max_watchers = n;
        self
    }
    /// Sets [`StoreConfig::window_bytes`].
    pub fn window_bytes(mut self, bytes: usize) -> Self {
        self.window_bytes = bytes;
        self
    }
    /// Sets [`StoreConfig::progress_interval`].
    pub fn progress_interval(mut self, d: Duration) -> Self {
        self.progress_interval = d;
        self
    }
    /// Sets [`StoreConfig::max_leases`].
    pub fn max_leases(mut self, n: usize) -> Self {
        self.max_leases = n;
        self
    }
    /// Sets [`StoreConfig::quota_bytes`] (0: no quota).
    pub fn quota_bytes(mut self, bytes: u64) -> Self {
        self.quota_bytes = bytes;
        self
    }
    /// Sets [`StoreConfig::checkpoint_fold_bytes`] (at least [`MIN_CHECKPOINT_FOLD_BYTES`],
    /// checked by [`Store::open`]).
    pub fn checkpoint_fold_bytes(mut self, bytes: usize) -> Self {
        self.checkpoint_fold_bytes = bytes;
        self
    }
    /// Sets [`StoreConfig::wal_bytes`] (0: off; at most [`MAX_WAL_BYTES`], checked by
    /// [`Store::open`]).
    pub fn wal_bytes(mut self, bytes: u64) -> Self {
        self.wal_bytes = bytes;
        self
    }
    /// Sets [`StoreConfig::compact_step_revisions`] (at least 1, checked by [`Store::open`]).
    pub fn compact_step_revisions(mut self, revisions: usize) -> Self {
        self.compact_step_revisions = revisions;
        self
    }
    /// Sets [`StoreConfig::member_id`].
    pub fn member_id(mut self, id: u64) -> Self {
        self.member_id = id;
        self
    }
    /// Sets [`StoreConfig::min_lease_ttl`] (seconds, at least 1).
    pub fn min_lease_ttl(mut self, seconds: i64) -> Self {
        self.min_lease_ttl = seconds.max(1);
        self
    }
}

/// The durable revision as the publisher advances it.
#[derive(Debug, Clone, Default)]
struct Durable {
    /// Every revision up to this one is durable and published to the engine.
    revision: Revision,
    /// Set once when the log failed; never cleared.
    failed: Option<String>,
}

/// Proof that the caller holds [`Inner::write_lock`] (see [`Store::commit`]).
type WriteGuard<'a> = tokio::sync::MutexGuard<'a, ()>;

/// Change sets queued on the log, in revision order, with their acknowledgement.
type Pending = (ChangeSet, event_log::AppendAck);

/// Room between writers and the publisher (change sets awaiting durability). Writers wait for
/// room, so it bounds memory; the log's own queue bounds it as well.
const PIPELINE_DEPTH: usize = 4096;

/// Txns with at most this many ops (nested ones included) are checked on the calling task;
/// larger ones on a blocking thread (a check is O(n log n): about a millisecond here).
const INLINE_CHECK_OPS: usize = 1024;

struct Inner {
    dir: PathBuf,
    config: StoreConfig,
    log: Arc<EventLog>,
    engine: WatchEngine,
    /// Read by every request briefly; written by a writer (holding `write_lock`) to apply one
    /// change set, and at open. Never held across an await.
    state: parking_lot::RwLock<KvState>,
    /// Serializes writes from computing a change set until it is queued on the log and applied,
    /// so log order is revision order. Held across awaits (log queue room), never by readers.
    write_lock: tokio::sync::Mutex<()>,
    /// Serializes compactions (state checkpoint + log compaction), mirror resets, backups and
    /// defragmentation.
    compact_lock: tokio::sync::Mutex<()>,
    /// Taken by `close`; writers clone it under `write_lock`.
    pipeline: parking_lot::Mutex<Option<mpsc::Sender<Pending>>>,
    durable: watch::Receiver<Durable>,
    /// Shared with the publisher; also written by the lease code to record a failed lease
    /// records commit (fail-stop).
    durable_tx: Arc<watch::Sender<Durable>>,
    /// Leases (see `lease.rs`); shared with the expiry task.
    leases: Arc<Leases>,
    /// The expiry task, awaited by `close`.
    expiry: parking_lot::Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Current compaction revision (0: never compacted).
    compacted: AtomicU64,
    /// A mirror's floor (0: not a mirror, or never reset): no watcher may start below it.
    /// Raised by a mirror reset under `write_lock` before the watchers are canceled, so a
    /// registration racing the reset sees it ([`Store::watch`]).
    mirror_floor: AtomicU64,
    /// The persisted state ([`STATE_FILE`]; see `checkpoint.rs`).
    state_db: Arc<checkpoint::StateDb>,
    /// Revision of the checkpoint in [`STATE_FILE`] (0: none). Written under `compact_lock`
    /// once the checkpoint is durable.
    checkpoint_revision: AtomicU64,
    /// What the last checkpoint since the open wrote (for tests, metrics and benchmarks).
    last_checkpoint: parking_lot::Mutex<Option<CheckpointInfo>>,
    /// While a compaction runs, the persisted state's bytes in use from before its checkpoint
    /// (`u64::MAX`: none running): [`Store::bytes_in_use`] counts the state at most at this
    /// figure until the log has dropped the history the new rows duplicate. Set and cleared
    /// under `compact_lock` ([`StateInUseCap`]).
    state_in_use_cap: AtomicU64,
    closed: AtomicBool,
    /// Set once when the store becomes an upstream's mirror ([`Store::set_mirror`]): local
    /// writes are then refused and watches must stay inside the scope.
    mirror: std::sync::OnceLock<MirrorScope>,
    /// The publisher and the dispatcher, awaited by `close` (publisher first).
    tasks: parking_lot::Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// When recent revisions were published (written by the publisher, for metrics).
    published: Arc<clock::PublishClock>,
    /// Raised alarms (in memory: a restart clears them, and the next write past the quota
    /// raises NOSPACE again).
    alarms: maintenance::Alarms,
    /// The last [`Store::defragment`]'s sizes and how many ran (for metrics).
    defragmented: parking_lot::Mutex<(Option<Defragmented>, u64)>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Ends the dispatcher task; the publisher ends when the pipeline sender drops.
        self.engine.shutdown();
        self.leases.stop();
    }
}

/// The embedded store: a durable, watchable etcd-model key-value store. Cheap to clone; every
/// clone is the same store.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("dir", &self.inner.dir)
            .field("revision", &self.current_revision())
            .field("compacted", &self.compacted_revision())
            .finish_non_exhaustive()
    }
}

fn log_err(e: LogError) -> StoreError {
    match e {
        LogError::Compacted { compacted } => StoreError::Compacted {
            requested: 0,
            compacted,
        },
        LogError::Poisoned { cause } => StoreError::Failed { message: cause },
        LogError::Closed => StoreError::Closed,
        other => StoreError::Log(other),
    }
}

impl Store {
    /// Opens (creating if needed) the store kept in `dir`: streams the persisted state
    /// ([`STATE_FILE`], converting a legacy [`SNAPSHOT_FILE`] once), replays the event log
    /// after its checkpoint revision, and starts the watch dispatcher and the publisher on the
    /// current tokio runtime (see the module docs). A fresh store is at revision 1, as etcd.
    ///
    /// # Panics
    ///
    /// When called outside a tokio runtime.
    pub async fn open(dir: impl AsRef<Path>, config: StoreConfig) -> Result<Store, StoreError> {
        Self::open_inner(dir.as_ref(), config, None, None).await
    }

    /// As [`Store::open`], with the event log kept in `log_store` instead of the default redb
    /// file in `dir` (the persisted state still lives in `dir`). For other backends and for fault
    /// injection in tests.
    pub async fn open_with_log_store(
        dir: impl AsRef<Path>,
        config: StoreConfig,
        log_store: Arc<dyn event_log::LogStore>,
    ) -> Result<Store, StoreError> {
        Self::open_inner(dir.as_ref(), config, Some(log_store), None).await
    }

    /// As [`Store::open`], with the persisted state ([`STATE_FILE`]) kept on `backend` instead
    /// of the file in `dir`: for fault injection (failed or torn writes) in tests.
    pub async fn open_with_state_backend(
        dir: impl AsRef<Path>,
        config: StoreConfig,
        backend: impl redb::StorageBackend,
    ) -> Result<Store, StoreError> {
        let opener: checkpoint::Opener =
            Box::new(move |b: &redb::Builder| b.create_with_backend(backend));
        Self::open_inner(dir.as_ref(), config, None, Some(opener)).await
    }

    async fn open_inner(
        dir: &Path,
        config: StoreConfig,
        log_store: Option<Arc<dyn event_log::LogStore>>,
        state_opener: Option<checkpoint::Opener>,
    ) -> Result<Store, StoreError> {
        config.check()?;
        let dir = dir.to_path_buf();
        let log_config = LogConfig {
            durability: config.durability,
            wal: (config.wal_bytes > 0).then(|| event_log::WalLimits {
                max_bytes: config.wal_bytes,
                ..event_log::WalLimits::default()
            }),
            compact_step_revisions: config.compact_step_revisions,
            ..LogConfig::default()
        };
        let dir2 = dir.clone();
        // Opening and replaying read the disk: keep them off the async workers.
        let durable_leases = config.durability == Durability::Fsync;
        let (min_ttl, max_leases) = (config.min_lease_ttl.max(1), config.max_leases);
        let (log, state, snap_rev, leases, state_db) = tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(&dir2).map_err(|e| StoreError::Snapshot {
                path: dir2.display().to_string(),
                message: e.to_string(),
            })?;
            let log = match log_store {
                Some(store) => EventLog::with_store(store, log_config)?,
                None => EventLog::open(&dir2, log_config)?,
            };
            let state_db = checkpoint::StateDb::open(&dir2, state_opener)?;
            checkpoint::migrate(&dir2, &state_db)?;
            let mut state = KvState::default();
            let snap_rev = state_db.load(&mut state)?;
            let compacted = log.compacted_revision();
            if compacted > snap_rev + 1 {
                return Err(StoreError::Inconsistent(format!(
                    "the event log is compacted to {compacted} but the persisted state is at \
                     {snap_rev}: revisions in between are lost"
                )));
            }
            for cs in log.replay(snap_rev) {
                state.apply(&cs?);
            }
            state.revision = state.revision.max(log.last_revision()).max(1);
            let leases = Leases::open(&dir2, durable_leases, min_ttl, max_leases)?;
            Ok::<_, StoreError>((log, state, snap_rev, leases, state_db))
        })
        .await
        .map_err(|e| StoreError::Inconsistent(format!("open task failed: {e}")))??;

        let revision = state.revision;
        let log = Arc::new(log);
        let engine_config = EngineConfig::default()
            .max_watchers(config.max_watchers)
            .recent(MemoryHistoryLimits {
                max_bytes: config.window_bytes,
                ..MemoryHistoryLimits::default()
            })
            .progress_interval(config.progress_interval)
            .initial_revision(revision);
        let history: Arc<dyn History> = log.clone();
        let (engine, dispatcher) = WatchEngine::with_history(engine_config, history);
        let dispatcher = tokio::spawn(dispatcher.run());

        let (durable_tx, durable_rx) = watch::channel(Durable {
            revision,
            failed: None,
        });
        let (tx, rx) = mpsc::channel(PIPELINE_DEPTH);
        let durable_tx = Arc::new(durable_tx);
        // A mirror's floor (see `mirror`): history below it was never mirrored.
        let floor = mirror::load_floor(&dir)?;
        let compacted = log.compacted_revision().max(floor);
        let published = Arc::new(clock::PublishClock::new());
        let publisher = tokio::spawn(publish_loop(
            rx,
            engine.clone(),
            durable_tx.clone(),
            published.clone(),
        ));
        tracing::info!(
            dir = %dir.display(),
            revision,
            compacted,
            keys = state.map.len(),
            leases = leases.count(),
            "store opened"
        );
        let store = Store {
            inner: Arc::new(Inner {
                dir,
                config,
                log,
                engine,
                state: parking_lot::RwLock::new(state),
                write_lock: tokio::sync::Mutex::new(()),
                compact_lock: tokio::sync::Mutex::new(()),
                pipeline: parking_lot::Mutex::new(Some(tx)),
                durable: durable_rx,
                durable_tx,
                leases: Arc::new(leases),
                expiry: parking_lot::Mutex::new(None),
                compacted: AtomicU64::new(compacted),
                mirror_floor: AtomicU64::new(floor),
                state_db: Arc::new(state_db),
                checkpoint_revision: AtomicU64::new(snap_rev),
                last_checkpoint: parking_lot::Mutex::new(None),
                state_in_use_cap: AtomicU64::new(u64::MAX),
                closed: AtomicBool::new(false),
                mirror: std::sync::OnceLock::new(),
                tasks: parking_lot::Mutex::new(vec![publisher, dispatcher]),
                published,
                alarms: Default::default(),
                defragmented: Default::default(),
            }),
        };
        // A mirror's keys carry the upstream etcd's lease IDs, which this store never granted
        // (Lease RPCs go upstream): they are not orphans, and a mirror writes nothing of its own.
        if floor == 0 {
            store.remove_orphans().await?;
        }
        *store.inner.expiry.lock() = Some(store.spawn_expiry());
        Ok(store)
    }

    /// Time since `revision` was published to the watch engine, if it is one of the last 4096
    /// revisions (for the publish→deliver latency metric).
    pub fn publish_elapsed(&self, revision: Revision) -> Option<Duration> {
        self.inner.published.elapsed(revision)
    }

    /// Installs the observer of the event log's commits (batch sizes, commit latency, failures;
    /// see [`event_log::LogObserver`]). Only the first call has an effect; returns false after.
    pub fn set_log_observer(&self, observer: Arc<dyn event_log::LogObserver>) -> bool {
        self.inner.log.set_observer(observer)
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// The configuration the store was opened with.
    pub fn config(&self) -> &StoreConfig {
        &self.inner.config
    }

    /// The revision of the last write applied to the state (it may still be on its way to
    /// disk; reads wait for it).
    pub fn current_revision(&self) -> Revision {
        self.inner.state.read().revision
    }

    /// The last revision that is durable and published to watchers.
    pub fn durable_revision(&self) -> Revision {
        self.inner.durable.borrow().revision
    }

    /// The compaction revision: reads and watches below it fail (0: never compacted).
    pub fn compacted_revision(&self) -> Revision {
        self.inner.compacted.load(Ordering::Acquire)
    }

    /// What the last checkpoint of the persisted state wrote (`None` before the first
    /// compaction since the open that needed one; see [`CheckpointInfo`]).
    pub fn last_checkpoint(&self) -> Option<CheckpointInfo> {
        *self.inner.last_checkpoint.lock()
    }

    /// The revision of the persisted state's checkpoint in [`STATE_FILE`] (0: none yet).
    pub fn checkpoint_revision(&self) -> Revision {
        self.inner.checkpoint_revision.load(Ordering::Acquire)
    }

    /// Number of keys in the current state.
    pub fn key_count(&self) -> usize {
        self.inner.state.read().map.len()
    }

    /// Bytes the data directory's files take on disk (event log, persisted state, leases):
    /// three `stat` calls. Not the log's write-ahead file: a fixed reservation (20 MiB by
    /// default) made at open, whatever the data, which neither compaction nor
    /// defragmentation changes. For reporting (etcd's `dbSize`); the quota counts
    /// [`Store::bytes_in_use`], since redb grows a file by doubling it and never shrinks it
    /// without [`Store::defragment`].
    pub fn disk_size(&self) -> u64 {
        [event_log::STORE_FILE, STATE_FILE, LEASES_FILE]
            .iter()
            .filter_map(|f| std::fs::metadata(self.inner.dir.join(f)).ok())
            .map(|m| m.len())
            .sum()
    }

    /// Bytes of live data the store holds, what the space quota
    /// ([`StoreConfig::quota_bytes`]) compares: the event log's records and key index
    /// ([`EventLog::bytes_in_use`]), the persisted state's rows ([`STATE_FILE`], see
    /// `checkpoint.rs`), each with a per-entry overhead of 16 bytes, and 32 bytes per lease
    /// record. Free and partly filled pages of the files are not counted, so it falls when a
    /// compaction drops history, without a defragmentation. A key compacted recently is
    /// counted twice, in the log's history and in the checkpoint, until the log drops it.
    ///
    /// While a compaction runs, the state counts at most what it did before the compaction's
    /// checkpoint: the rows the checkpoint writes copy history the same compaction is about to
    /// drop from the log, so a compaction never raises the figure (the first compaction of a
    /// large keyspace would otherwise count it twice for a moment and refuse writes a
    /// quota of etcd's size admits). Once the log has dropped that history, the rows count.
    ///
    /// Kept as counters updated by each commit: a few memory reads, no file system call.
    pub fn bytes_in_use(&self) -> u64 {
        let state = self
            .inner
            .state_db
            .bytes_in_use()
            .min(self.inner.state_in_use_cap.load(Ordering::Acquire));
        self.inner
            .log
            .bytes_in_use()
            .saturating_add(state)
            .saturating_add(self.inner.leases.count() as u64 * lease::RECORD_BYTES)
    }

    /// [`Store::bytes_in_use`] recomputed by walking the event log's tables and the persisted
    /// state's rows: O(data), for tests and checks of the counters. Equal to `bytes_in_use`
    /// when no write, compaction or lease change runs meanwhile (during a compaction it also
    /// counts the checkpoint's new rows, which `bytes_in_use` leaves out until the log has
    /// dropped the history they copy).
    pub async fn recount_bytes_in_use(&self) -> Result<u64, StoreError> {
        let (log, db) = (self.inner.log.clone(), self.inner.state_db.clone());
        let leases = self.inner.leases.count() as u64 * lease::RECORD_BYTES;
        tokio::task::spawn_blocking(move || {
            let log = log.recount_bytes_in_use().map_err(log_err)?;
            Ok(log + db.recount_bytes_in_use()? + leases)
        })
        .await
        .map_err(|e| StoreError::Inconsistent(format!("recount task failed: {e}")))?
    }

    /// The watch engine (to inspect it; register watches through [`Store::watch`]).
    pub fn engine(&self) -> &WatchEngine {
        &self.inner.engine
    }

    /// The failure message once the event log failed (the store is then fail-stop).
    pub fn failure(&self) -> Option<String> {
        self.inner.durable.borrow().failed.clone()
    }

    /// Resolves when the store has failed (see the module docs), with the failure message.
    pub async fn failed(&self) -> String {
        let mut rx = self.inner.durable.clone();
        // The guard is dropped before any further await (it is not Send).
        let failed = rx
            .wait_for(|d| d.failed.is_some())
            .await
            .map(|d| d.failed.clone().unwrap_or_default());
        match failed {
            Ok(message) => message,
            // The publisher ended (store closed) without a failure: never resolve.
            Err(_) => std::future::pending().await,
        }
    }

    /// Waits until `revision` is durable and published.
    async fn wait_durable(&self, revision: Revision) -> Result<(), StoreError> {
        let mut rx = self.inner.durable.clone();
        let d = rx
            .wait_for(|d| d.revision >= revision || d.failed.is_some())
            .await
            .map_err(|_| StoreError::Closed)?;
        if d.revision >= revision {
            return Ok(());
        }
        Err(StoreError::Failed {
            message: d.failed.clone().unwrap_or_default(),
        })
    }

    fn check_open(&self) -> Result<(), StoreError> {
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(StoreError::Closed);
        }
        if let Some(message) = self.failure() {
            return Err(StoreError::Failed { message });
        }
        Ok(())
    }

    /// Puts `value` at `key`.
    pub async fn put(
        &self,
        key: impl Into<bytes::Bytes>,
        value: impl Into<bytes::Bytes>,
        options: PutOptions,
    ) -> Result<PutResult, StoreError> {
        let op = TxnOp::Put {
            key: key.into(),
            value: value.into(),
            options,
        };
        match self.single(op).await? {
            TxnOpResult::Put(r) => Ok(r),
            _ => unreachable!("a put op yields a put result"),
        }
    }

    /// Deletes every key of `range`. Deleting nothing creates no revision.
    pub async fn delete_range(
        &self,
        range: KeyRange,
        prev_kv: bool,
    ) -> Result<DeleteResult, StoreError> {
        match self.single(TxnOp::Delete { range, prev_kv }).await? {
            TxnOpResult::Delete(r) => Ok(r),
            _ => unreachable!("a delete op yields a delete result"),
        }
    }

    /// Runs one write op as a txn without compares and returns its result, with the revision
    /// of the write (or the current one when it wrote nothing).
    pub async fn single(&self, op: TxnOp) -> Result<TxnOpResult, StoreError> {
        let result = self
            .txn(TxnRequest {
                compare: Vec::new(),
                success: vec![op],
                failure: Vec::new(),
            })
            .await?;
        let revision = result.revision;
        let mut r = result
            .responses
            .into_iter()
            .next()
            .ok_or(StoreError::Closed)?;
        match &mut r {
            TxnOpResult::Put(p) => p.revision = revision,
            TxnOpResult::Delete(d) => d.revision = revision,
            TxnOpResult::Range(x) => x.revision = revision,
            TxnOpResult::Txn(t) => t.revision = revision,
        }
        Ok(r)
    }

    /// Reads a range (see [`RangeRequest`]). A past `revision` is served from the event log;
    /// below the compaction revision it fails with [`StoreError::Compacted`], above the current
    /// one with [`StoreError::FutureRevision`].
    pub async fn range(&self, req: RangeRequest) -> Result<RangeResult, StoreError> {
        self.check_closed()?;
        if req.range.key.is_empty() {
            return Err(StoreError::EmptyKey);
        }
        let (current, kvs) = self.range_at(&req.range, req.revision).await?;
        Ok(state::finish_range(&req, kvs, current))
    }

    fn check_closed(&self) -> Result<(), StoreError> {
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(StoreError::Closed);
        }
        Ok(())
    }

    fn check_readable(&self, requested: Revision, current: Revision) -> Result<(), StoreError> {
        if requested == 0 {
            return Ok(());
        }
        if requested > current {
            return Err(StoreError::FutureRevision { requested, current });
        }
        let compacted = self.compacted_revision();
        if requested < compacted {
            return Err(StoreError::Compacted {
                requested,
                compacted,
            });
        }
        Ok(())
    }

    /// The key-values of `range` at revision `at` (0: the current one), in key order, and the
    /// revision they were read against (the current one, durable when this returns).
    ///
    /// A past revision is read from the event log's key index, not by replaying history: the
    /// current range, with every key changed after `at` restored to the `prev_kv` of its first
    /// change after `at` (removed when that change created it; keys deleted since come back
    /// the same way). Cost: O(log n) per key of the range that changed at any retained
    /// revision, plus the result; see [`event_log::LogStore::first_changes`]. Takes no write
    /// lock: a past revision's state never changes.
    async fn range_at(
        &self,
        range: &KeyRange,
        at: Revision,
    ) -> Result<(Revision, Vec<KeyValue>), StoreError> {
        let (current, kvs) = {
            let st = self.inner.state.read();
            self.check_readable(at, st.revision)?;
            (st.revision, st.range(range))
        };
        // No read returns state a crash could still lose, and the log must hold every change
        // up to `current` for the index read below.
        self.wait_durable(current).await?;
        if at == 0 || at >= current {
            return Ok((current, kvs));
        }
        let Some(selector) = range.selector() else {
            return Ok((current, kvs));
        };
        let firsts = self.first_changes(selector, at, current).await?;
        if firsts.is_empty() {
            return Ok((current, kvs));
        }
        let mut map: std::collections::BTreeMap<bytes::Bytes, KeyValue> =
            kvs.into_iter().map(|kv| (kv.key.clone(), kv)).collect();
        for e in firsts {
            match e.prev_kv {
                Some(kv) => map.insert(e.kv.key, kv),
                None => map.remove(&e.kv.key),
            };
        }
        Ok((current, map.into_values().collect()))
    }

    /// For every key of `selector` changed in `(at, current]`, its first change there (whose
    /// `prev_kv` is the key's value at `at`), in key order: the event log's key index read on a
    /// blocking thread (see [`event_log::LogStore::first_changes`]). Fails with
    /// [`StoreError::Compacted`] when a compaction removed `at + 1`.
    async fn first_changes(
        &self,
        selector: KeySelector,
        at: Revision,
        current: Revision,
    ) -> Result<Vec<watch_core::Event>, StoreError> {
        let log = self.inner.log.clone();
        tokio::task::spawn_blocking(move || log.first_changes(&selector, at, current))
            .await
            .map_err(|e| StoreError::Inconsistent(format!("history read task failed: {e}")))?
            .map_err(|e| match e {
                LogError::Compacted { compacted } => StoreError::Compacted {
                    requested: at,
                    compacted,
                },
                other => log_err(other),
            })
    }

    /// The request checks etcd makes before authorization (op count, empty keys, put flags,
    /// a key written twice in one branch), without running `req`: a service with
    /// authentication refuses a malformed request as such before checking its caller, as etcd
    /// does. [`Store::txn`] runs them again. Hands `req` back when it passes.
    ///
    /// O(n log n) in the ops; a txn of more than 1,024 ops (nested included)
    /// is checked on a blocking thread, so a large crafted txn does not stall the async
    /// workers serving other requests.
    pub async fn validate(&self, req: TxnRequest) -> Result<TxnRequest, StoreError> {
        let max_ops = self.inner.config.max_txn_ops;
        if state::total_ops(&req) <= INLINE_CHECK_OPS {
            return state::validate_txn(&req, max_ops).map(|()| req);
        }
        tokio::task::spawn_blocking(move || state::validate_txn(&req, max_ops).map(|()| req))
            .await
            .map_err(|e| StoreError::Inconsistent(format!("txn check task failed: {e}")))?
    }

    /// Runs a transaction (see [`TxnRequest`]). All its writes share one revision; a txn that
    /// writes nothing does not create one.
    pub async fn txn(&self, req: TxnRequest) -> Result<TxnResult, StoreError> {
        let req = self.validate(req).await?;
        self.check_writable()?;
        self.admit(maintenance::txn_cost(&req))?;
        // Reads at past revisions run before the write lock is taken (a past revision's state
        // never changes), so a slow history read stalls no writer. Under the lock the txn
        // needs every read below the then-current revision; one that became historic while
        // the lock was awaited is fetched in another round (each round fetches at least one
        // more, so this ends).
        let mut history = HistoricReads::new();
        let guard = loop {
            let mut wanted = Vec::new();
            state::historic_reads(&req, self.current_revision().saturating_add(1), &mut wanted);
            for r in wanted {
                let key = (r.range.clone(), r.revision);
                if let std::collections::hash_map::Entry::Vacant(slot) = history.entry(key) {
                    slot.insert(self.range_at(&r.range, r.revision).await?.1);
                }
            }
            let guard = self.inner.write_lock.lock().await;
            self.check_open()?;
            // State cannot change while `write_lock` is held, so this revision stays current.
            let mut wanted = Vec::new();
            state::historic_reads(&req, self.current_revision(), &mut wanted);
            if wanted
                .iter()
                .all(|r| history.contains_key(&(r.range.clone(), r.revision)))
            {
                break guard;
            }
        };
        let (result, changes) = {
            let st = self.inner.state.read();
            let leases = &self.inner.leases;
            Exec::new(&st, &history, &|id| leases.exists(id)).run(&req)?
        };
        let Some(cs) = changes else {
            drop(guard);
            self.wait_durable(result.revision).await?;
            return Ok(result);
        };
        let revision = self.commit(&guard, cs, KvState::apply).await?;
        drop(guard);
        self.wait_durable(revision).await?;
        Ok(result)
    }

    /// **The write path**: the one place a change set enters the pipeline. Reserves a
    /// publisher slot, submits `cs` to the event log, applies it to the state (`apply`: almost
    /// always [`KvState::apply`]; a mirror reset installs a whole snapshot instead) and hands
    /// the log's acknowledgement to the publisher, which publishes `cs` once durable. Txns,
    /// lease revokes and expiries, orphan cleanup, and mirror applies and resets all end here.
    ///
    /// The caller holds the write lock (`_write` proves it) and computed `cs` under it, so
    /// change sets reach the log, the state and the publisher in revision order. Returns
    /// `cs.revision`, queued but not yet durable (see [`Store::wait_durable`]).
    async fn commit(
        &self,
        _write: &WriteGuard<'_>,
        cs: ChangeSet,
        apply: impl FnOnce(&mut KvState, &ChangeSet),
    ) -> Result<Revision, StoreError> {
        // `close` takes the sender under the write lock, after setting `closed`; a caller that
        // passed `check_open` under the lock finds it here.
        let sender = self
            .inner
            .pipeline
            .lock()
            .clone()
            .ok_or(StoreError::Closed)?;
        let revision = cs.revision;
        // The slot is reserved before the log append, because of the invariant below.
        let permit = sender.reserve().await.map_err(|_| StoreError::Closed)?;
        let ack = self.inner.log.submit(&cs).await.map_err(log_err)?;
        // INVARIANT: no await between `submit` and `send`. From here the change set is on the
        // log and will become durable; a request dropped at an await in between would leave a
        // durable revision that is never applied or published, and every later read and write
        // would wait for it forever.
        apply(&mut self.inner.state.write(), &cs);
        permit.send((cs, ack));
        Ok(revision)
    }

    /// Compacts history: afterwards reads and watches below `revision` fail with
    /// [`StoreError::Compacted`]. Fails with `Compacted` when `revision` is at or below the
    /// previous compaction and with [`StoreError::FutureRevision`] above the current revision.
    /// Returns the store revision the compaction was judged against (durable) once it is persisted.
    pub async fn compact(&self, revision: Revision) -> Result<Revision, StoreError> {
        self.check_writable()?;
        self.check_not_corrupt()?;
        self.compact_history(revision).await
    }

    /// [`Store::compact`] without the mirror check (a mirror's own retention uses it).
    async fn compact_history(&self, revision: Revision) -> Result<Revision, StoreError> {
        let _c = self.inner.compact_lock.lock().await;
        self.check_open()?;
        let compacted = self.compacted_revision();
        if revision <= compacted {
            return Err(StoreError::Compacted {
                requested: revision,
                compacted,
            });
        }
        let current = {
            let st = self.inner.state.read();
            if revision > st.revision {
                return Err(StoreError::FutureRevision {
                    requested: revision,
                    current: st.revision,
                });
            }
            st.revision
        };
        self.wait_durable(current).await?;
        // Until this call ends (the log compacted, or a failure): see `bytes_in_use`.
        let _cap = StateInUseCap::set(&self.inner);
        let from = self.inner.checkpoint_revision.load(Ordering::Acquire);
        if from + 1 < revision {
            // No write lock: the checkpoint reads `(from, current]` from the log (durable
            // history never changes) and writes its own file, so writers go on meanwhile.
            let (db, log) = (self.inner.state_db.clone(), self.inner.log.clone());
            let budget = self.inner.config.checkpoint_fold_bytes;
            let done =
                tokio::task::spawn_blocking(move || db.checkpoint(&log, from, current, budget))
                    .await
                    .map_err(|e| {
                        StoreError::Inconsistent(format!("checkpoint task failed: {e}"))
                    })?;
            let info = match done {
                Ok(info) => info,
                Err(e) => {
                    // The file refuses writes after a failed commit, and a failed fsync is
                    // never retried: fail-stop, as for the log. Nothing acknowledged is lost
                    // (the log was not compacted; it still holds every change after `from`).
                    if matches!(e, StoreError::Snapshot { .. }) {
                        self.fail(&e);
                    }
                    return Err(e);
                }
            };
            tracing::debug!(
                from,
                revision = current,
                rows = info.rows,
                bytes = info.bytes,
                elapsed_ms = info.elapsed.as_millis() as u64,
                "state checkpoint written"
            );
            *self.inner.last_checkpoint.lock() = Some(info);
            self.inner
                .checkpoint_revision
                .store(current, Ordering::Release);
        }
        // A log that holds nothing at or above `revision` (a fresh store compacting to 1) has
        // nothing to drop; the compaction revision is still recorded in memory.
        if revision <= self.inner.log.last_revision() {
            self.inner.log.compact(revision).await.map_err(log_err)?;
        }
        self.inner.compacted.fetch_max(revision, Ordering::AcqRel);
        // `current` is durable (waited for above); the live revision may not be yet.
        Ok(current)
    }

    /// Registers a watch (see watch-core's [`WatchEngine::watch`]). A `start_revision` below
    /// the compaction revision fails with [`StoreError::Compacted`], even while the engine's
    /// in-memory window still holds it, as etcd does.
    pub fn watch(
        &self,
        selector: KeySelector,
        options: WatchOptions,
    ) -> Result<WatchHandle, StoreError> {
        self.register(selector, options, |selector, options| {
            let h = self.inner.engine.watch(selector, options)?;
            let created = h.created_revision();
            Ok((h, created))
        })
        .map(|(h, _)| h)
    }

    /// Registers a watch delivering into `outbox` with `tag` (see watch-core's
    /// [`watch_core::Outbox::watch`]), with the same checks as [`Store::watch`]; returns the
    /// registration and its created revision.
    pub fn watch_into(
        &self,
        outbox: &watch_core::Outbox,
        tag: u64,
        selector: KeySelector,
        options: WatchOptions,
    ) -> Result<(watch_core::Registration, Revision), StoreError> {
        self.register(selector, options, |selector, options| {
            outbox.watch(tag, selector, options)
        })
    }

    fn register<T>(
        &self,
        selector: KeySelector,
        options: WatchOptions,
        register: impl FnOnce(
            KeySelector,
            WatchOptions,
        ) -> Result<(T, Revision), watch_core::WatchError>,
    ) -> Result<(T, Revision), StoreError> {
        self.check_closed()?;
        self.check_mirror_watch(&selector)?;
        let compacted = self.compacted_revision();
        if options.start_revision != 0 && options.start_revision < compacted {
            return Err(StoreError::Compacted {
                requested: options.start_revision,
                compacted,
            });
        }
        let start = options.start_revision;
        match register(selector, options) {
            Ok((h, created)) => {
                // A mirror reset racing this registration: the reset raises the floor, then
                // cancels every registered watcher, then publishes its revision. A watcher
                // registered after the cancel but before that publish would start below the
                // floor and be told "no change" (progress, or nothing) across the snapshot;
                // it reads the floor after registering, so it sees the new one and is refused
                // as etcd refuses a watch below the compaction.
                let floor = self.inner.mirror_floor.load(Ordering::Acquire);
                let first = if start == 0 { created + 1 } else { start };
                if first < floor {
                    return Err(StoreError::Compacted {
                        requested: first,
                        compacted: floor,
                    });
                }
                Ok((h, created))
            }
            Err(watch_core::WatchError::Compacted {
                requested,
                compact_revision,
            }) => Err(StoreError::Compacted {
                requested,
                compacted: compact_revision,
            }),
            Err(e) => Err(e.into()),
        }
    }

    /// Closes the store: refuses new requests, waits for queued writes to become durable and be
    /// published, stops the watch engine (watchers receive a shutdown cancel) and closes the
    /// event log. Idempotent.
    ///
    /// The log's file stays locked until every clone of the store and every [`WatchHandle`] is
    /// dropped; only then can the directory be opened again.
    pub async fn close(&self) -> Result<(), StoreError> {
        self.inner.closed.store(true, Ordering::Release);
        // The expiry task finishes the batch it is revoking (it holds the write lock for it).
        self.inner.leases.stop();
        let expiry = self.inner.expiry.lock().take();
        if let Some(expiry) = expiry {
            let _ = expiry.await;
        }
        {
            // Waits for a writer in the middle of queueing; later writers see `closed`.
            let _w = self.inner.write_lock.lock().await;
            drop(self.inner.pipeline.lock().take());
        }
        let tasks = std::mem::take(&mut *self.inner.tasks.lock());
        let mut tasks = tasks.into_iter();
        if let Some(publisher) = tasks.next() {
            let _ = publisher.await;
        }
        self.inner.engine.shutdown();
        for dispatcher in tasks {
            let _ = dispatcher.await;
        }
        let log = self.inner.log.clone();
        let leases = self.inner.leases.clone();
        tokio::task::spawn_blocking(move || {
            leases.close_db();
            log.close()
        })
        .await
        .map_err(|e| StoreError::Inconsistent(format!("close task failed: {e}")))?
        .map_err(log_err)
    }
}

/// Caps the persisted state's share of [`Store::bytes_in_use`] at its value when set, until
/// dropped (see [`Inner::state_in_use_cap`]); held by a compaction from before its checkpoint
/// until the log compaction returned. Dropped on every exit, a cancelled or failed compaction
/// included.
struct StateInUseCap<'a>(&'a Inner);

impl<'a> StateInUseCap<'a> {
    fn set(inner: &'a Inner) -> Self {
        inner
            .state_in_use_cap
            .store(inner.state_db.bytes_in_use(), Ordering::Release);
        Self(inner)
    }
}

impl Drop for StateInUseCap<'_> {
    fn drop(&mut self) {
        self.0.state_in_use_cap.store(u64::MAX, Ordering::Release);
    }
}

/// The publisher: awaits each queued change set's durability in revision order, publishes it to
/// the engine and advances the durable revision. After a failure it only records it.
///
/// One group commit acknowledges several change sets at once; the publisher publishes every
/// one whose acknowledgement is already there and then advances the durable revision once,
/// so each `wait_durable` waiter wakes once per group rather than once per revision.
async fn publish_loop(
    mut rx: mpsc::Receiver<Pending>,
    engine: WatchEngine,
    durable: Arc<watch::Sender<Durable>>,
    published: Arc<clock::PublishClock>,
) {
    // A change set taken from the queue whose acknowledgement was not there yet.
    let mut held: Option<Pending> = None;
    loop {
        let (cs, ack) = match held.take() {
            Some(p) => p,
            None => match rx.recv().await {
                Some(p) => p,
                None => return,
            },
        };
        // Bounds the group, so that a queue that never runs dry still advances the durable
        // revision (and answers the waiters) every this many change sets.
        const MAX_GROUP: usize = 256;
        let mut ready = Some((cs, ack.await));
        let mut newest = None;
        let mut grouped = 0;
        while let Some((cs, result)) = ready.take() {
            grouped += 1;
            let revision = cs.revision;
            match result {
                Ok(_) if durable.borrow().failed.is_none() => {
                    published.record(revision);
                    if let Err(e) = engine.publish(cs) {
                        // A bug (revisions are allocated under the write lock); the write is
                        // durable, only its delivery is lost, so say so loudly.
                        tracing::error!(error = %e, revision, "watch engine refused a change set");
                    }
                    newest = Some(revision);
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::error!(error = %e, revision, "event log failed; the store is now fail-stop");
                    if let Some(r) = newest.take() {
                        durable.send_modify(|d| d.revision = r);
                    }
                    durable.send_modify(|d| {
                        d.failed.get_or_insert_with(|| e.to_string());
                    });
                }
            }
            // The next one, only when its acknowledgement is already there.
            if grouped >= MAX_GROUP {
                break;
            }
            if let Ok((cs, mut ack)) = rx.try_recv() {
                let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
                match std::pin::Pin::new(&mut ack).poll(&mut cx) {
                    std::task::Poll::Ready(result) => ready = Some((cs, result)),
                    std::task::Poll::Pending => held = Some((cs, ack)),
                }
            }
        }
        if let Some(r) = newest {
            durable.send_modify(|d| d.revision = r);
        }
    }
}

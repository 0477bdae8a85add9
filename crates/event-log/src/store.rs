//! The storage seam ([`LogStore`]) and its default redb backend ([`RedbStore`]).
//!
//! Group commit, revision checks, poisoning and retention scheduling live above this trait in
//! [`crate::EventLog`], so every backend gets them. A store only has to make one batch durable
//! atomically and answer reads from committed data.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::Bound;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use redb::{ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use watch_core::{ChangeSet, Event, KeySelector, Revision};

use crate::codec::{self, EncodedChange};
use crate::config::{DEFAULT_CACHE_BYTES, DEFAULT_COMPACT_STEP, Durability, RetentionPolicy};
use crate::error::LogError;
use crate::wal::{Wal, WalLimits};

/// A durable, ordered store of encoded change sets.
///
/// Implementations are called by one writer thread for writes (`append_batch`, `compact`) and
/// by any thread for reads, concurrently. Reads must only see committed batches.
pub trait LogStore: Send + Sync + 'static {
    /// Writes `batch` in one atomic commit. When it returns `Ok` the whole batch is durable (at
    /// the store's configured durability); when it returns `Err` the caller must assume nothing
    /// of it is acknowledged and must stop writing (the log poisons itself).
    ///
    /// The caller guarantees revisions strictly increase, starting above [`Self::last_revision`].
    fn append_batch(&self, batch: &[EncodedChange]) -> Result<(), LogError>;

    /// The last revision written (0 for an empty store). Survives compaction and reopening.
    fn last_revision(&self) -> Result<Revision, LogError>;

    /// The compaction revision: every revision below it is gone, revisions at or above it are
    /// kept. 0 when never compacted.
    fn compacted_revision(&self) -> Result<Revision, LogError>;

    /// Up to `limit` change sets with `after < revision <= until` that hold at least one event
    /// `selector` selects, in revision order, each with all of its events. Fails with
    /// [`LogError::Compacted`] when `after + 1` is below the compaction revision.
    fn read(
        &self,
        selector: &KeySelector,
        after: Revision,
        until: Revision,
        limit: usize,
    ) -> Result<Vec<ChangeSet>, LogError>;

    /// For every key `selector` selects that changed in `(after, until]`, the **first** event of
    /// that key in the window (its `prev_kv` is the key's value at `after`, `None` when the key
    /// did not exist then), in key order. What a read at a past revision `after` needs: the
    /// current state with each of these keys restored to its `prev_kv`. Fails with
    /// [`LogError::Compacted`] when `after + 1` is below the compaction revision.
    ///
    /// The default reads every selected change set of the window through [`Self::read`]
    /// (cost grows with the history after `after`); [`RedbStore`] answers from its key index.
    fn first_changes(
        &self,
        selector: &KeySelector,
        after: Revision,
        until: Revision,
    ) -> Result<Vec<Event>, LogError> {
        const CHUNK: usize = 1024;
        let mut first: BTreeMap<bytes::Bytes, Event> = BTreeMap::new();
        let mut from = after;
        loop {
            let chunk = self.read(selector, from, until, CHUNK)?;
            let n = chunk.len();
            for cs in chunk {
                from = cs.revision;
                for e in cs.events {
                    if selector.matches(e.key()) && !first.contains_key(e.key()) {
                        first.insert(e.kv.key.clone(), e);
                    }
                }
            }
            if n < CHUNK {
                return Ok(first.into_values().collect());
            }
        }
    }

    /// Drops every revision below `revision` and records `revision` as the compaction revision.
    /// May commit in several steps; every step leaves a consistent store whose compaction
    /// revision only grew. The caller checks `compacted < revision <= last`.
    fn compact(&self, revision: Revision) -> Result<(), LogError>;

    /// One bounded step of [`Self::compact`]: drops some revisions below `revision` in one
    /// commit, raising the compaction revision to just past them (never beyond `revision`),
    /// and returns `true` once every revision below `revision` is gone and the compaction
    /// revision is at least `revision`. The step that returns `true` is durable under
    /// [`Durability::Fsync`]; earlier ones need not be (a crash may undo them, never the last
    /// one's outcome). The writer thread interleaves steps with append batches, so a large
    /// compaction never holds appends for longer than one step. The default does the whole
    /// compaction in one call.
    fn compact_step(&self, revision: Revision) -> Result<bool, LogError> {
        self.compact(revision).map(|()| true)
    }

    /// The revision retention should compact to under `policy` at `now_ms` (milliseconds since
    /// the Unix epoch), or `None` when nothing is due. The newest change set is always kept.
    fn retention_target(
        &self,
        policy: &RetentionPolicy,
        now_ms: u64,
    ) -> Result<Option<Revision>, LogError>;

    /// Returns the space the store's files hold but no longer use (deleted and compacted
    /// records) to the file system, and whether anything was reclaimed. Called on the writer
    /// thread, never concurrently with `append_batch` or `compact`. The default reclaims
    /// nothing and returns `Ok(false)`: right for a backend whose files never hold free space
    /// (an in-memory or test store).
    fn defragment(&self) -> Result<bool, LogError> {
        Ok(false)
    }

    /// Bytes of live data the store holds, from counters the store keeps in step with every
    /// commit (never a walk of its data): what a space quota compares, unlike a file's
    /// length, which grows by doubling and shrinks only on [`Self::defragment`]. Compaction
    /// lowers it. An upper bound of the bytes the live entries take, their per-entry
    /// bookkeeping included, not counting the free space of partly filled pages.
    ///
    /// The writer thread reads it after every commit and compaction step
    /// ([`crate::EventLog::bytes_in_use`] serves the figure from memory), so it must be cheap.
    /// The default, 0, means "not counted": a backend without counters (an in-memory or test
    /// store) adds nothing to a quota.
    fn bytes_in_use(&self) -> u64 {
        0
    }

    /// [`Self::bytes_in_use`] recomputed from the data itself, walking every record (O(n)):
    /// what the counters must equal, for tests and offline checks. The default returns
    /// [`Self::bytes_in_use`] (a backend without counters has nothing to check).
    fn recount_bytes_in_use(&self) -> Result<u64, LogError> {
        Ok(self.bytes_in_use())
    }
}

/// Revision -> encoded change set.
const CHANGES: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("changes");
/// (key, revision) -> (): which revisions touched a key.
const KEY_INDEX: TableDefinition<'_, (&[u8], u64), ()> = TableDefinition::new("key_index");
/// Named counters, see the `META_*` names.
const META: TableDefinition<'_, &str, u64> = TableDefinition::new("meta");

const META_FORMAT: &str = "format_version";
const META_LAST: &str = "last_revision";
const META_COMPACTED: &str = "compacted_revision";
const META_COUNT: &str = "record_count";
const META_BYTES: &str = "record_bytes";
/// Bytes of the key index's entries, each counted as [`index_entry_bytes`]. Absent from a
/// store written before it existed: computed once at open (`RedbStore::init`).
const META_INDEX_BYTES: &str = "index_bytes";

/// Bytes counted per change set beyond its encoded record in [`RedbStore`]'s bytes in use:
/// the revision key (8 bytes) and redb's value-length slot (4) in the `changes` leaf, rounded
/// up to 16 for its share of branch pages.
const RECORD_OVERHEAD_BYTES: u64 = 16;

/// Bytes counted per key-index entry beyond its key and revision: the tuple's varint key
/// length (at most 5 bytes) and redb's key-length slot (4), rounded up to 16 for the share of
/// branch pages.
const INDEX_ENTRY_OVERHEAD_BYTES: u64 = 16;

/// The bytes one key-index entry of `key` is counted for: the key, its revision (8 bytes) and
/// [`INDEX_ENTRY_OVERHEAD_BYTES`].
fn index_entry_bytes(key: &[u8]) -> u64 {
    key.len() as u64 + 8 + INDEX_ENTRY_OVERHEAD_BYTES
}

/// Bytes in use from the `meta` counters: every record with its overhead, every index entry.
fn in_use_of(count: u64, record_bytes: u64, index_bytes: u64) -> u64 {
    record_bytes
        .saturating_add(count.saturating_mul(RECORD_OVERHEAD_BYTES))
        .saturating_add(index_bytes)
}

/// The layout version of the tables above; bump on any incompatible change.
pub(crate) const FORMAT_VERSION: u64 = 1;

/// Most key-index entries a selector read scans before it falls back to a filtered scan of the
/// change sets themselves (a wide prefix with a long history).
const INDEX_SCAN_BUDGET: usize = 65_536;

/// Options of a [`RedbStore`].
#[derive(Debug, Clone, Copy)]
pub struct RedbOptions {
    /// Durability of each commit.
    pub durability: Durability,
    /// redb quick repair: commits save allocator state (and use 2-phase commit) so reopening after
    /// a crash takes milliseconds instead of a walk over the whole file. Slower commits.
    pub quick_repair: bool,
    /// Verify every page checksum when opening (reads the whole file). A file altered outside
    /// redb then fails to open with [`LogError::Corrupt`] instead of being trusted.
    pub verify_on_open: bool,
    /// Most bytes redb may cache in memory (its page cache). redb's own default is 1 GiB,
    /// which lets a long-running server's memory grow far past what it needs.
    pub cache_bytes: usize,
    /// Under [`Durability::Fsync`], make each batch durable in a write-ahead file next to the
    /// store (`<path>.wal`, see [`WalLimits`]) and commit it to redb without a flush, handing
    /// the records over with a durable redb commit at these limits. `None`: every batch is a
    /// durable redb commit. Ignored under [`Durability::NoSync`] and by
    /// [`RedbStore::with_backend`] (no file path).
    pub wal: Option<WalLimits>,
    /// Most revisions one compaction step deletes in one commit (0 counts as 1). The writer
    /// runs one step between two append batches, so this bounds how long a compaction delays
    /// a commit. 256 by default (8,192 before); docs/benchmarks.md, "Compaction step size",
    /// has the measurements, which did not show a consistent difference between the two.
    pub compact_step_revisions: usize,
}

impl Default for RedbOptions {
    fn default() -> Self {
        Self {
            durability: Durability::Fsync,
            quick_repair: false,
            verify_on_open: true,
            cache_bytes: DEFAULT_CACHE_BYTES,
            wal: Some(WalLimits::default()),
            compact_step_revisions: DEFAULT_COMPACT_STEP,
        }
    }
}

/// Suffix of a [`RedbStore`]'s write-ahead file: `<store path>` + this.
pub const WAL_SUFFIX: &str = ".wal";

/// A read lock on the database: see [`RedbStore`]'s `db`.
type DbReadGuard<'a> = parking_lot::RwLockReadGuard<'a, redb::Database>;

/// The default [`LogStore`]: one redb file with the tables `changes`, `key_index` and `meta`.
#[derive(Debug, Clone)]
pub struct RedbStore {
    /// Read-locked by every transaction for its whole life (reads and commits); write-locked
    /// only by [`LogStore::defragment`], since redb's `compact` needs the database to itself.
    db: Arc<parking_lot::RwLock<redb::Database>>,
    options: RedbOptions,
    /// [`LogStore::bytes_in_use`] as of the last commit: set at open and after every commit
    /// that changes the `meta` counters, from the values that commit wrote.
    in_use: Arc<AtomicU64>,
    /// The write-ahead file, when batches go through one (see [`RedbOptions::wal`]). Locked by
    /// the writer thread for each write transaction; never by readers.
    wal: Option<Arc<parking_lot::Mutex<Wal>>>,
}

impl RedbStore {
    /// Opens (or creates) the store file at `path`.
    pub fn open(path: impl AsRef<Path>, options: RedbOptions) -> Result<Self, LogError> {
        let path = path.as_ref().to_owned();
        let db_path = path.clone();
        let mut store = Self::guarded_open(options, move |b| {
            crate::files::open_or_create_redb(b, &db_path)
        })?;
        let mut wal_path = path.into_os_string();
        wal_path.push(WAL_SUFFIX);
        let wal_path = std::path::PathBuf::from(wal_path);
        let enabled = options.durability == Durability::Fsync && options.wal.is_some();
        if enabled || wal_path.exists() {
            store.attach_wal(Box::new(crate::wal::open_file(&wal_path)?))?;
            if !enabled {
                // Its frames are in redb durably now; without the file, a later open with the
                // write-ahead file on cannot find stale frames above what redb holds.
                std::fs::remove_file(&wal_path)?;
                crate::files::sync_dir(crate::files::parent(&wal_path))?;
                store.wal = None;
            }
        }
        Ok(store)
    }

    /// Opens (or creates) a store on custom redb and write-ahead backends, e.g. ones that
    /// inject I/O failures in tests. The write-ahead file is used as [`RedbStore::open`] uses
    /// `<path>.wal`: its records above redb's are recovered first, and batches go through it
    /// when `options` has [`Durability::Fsync`] and [`RedbOptions::wal`].
    pub fn with_backends(
        backend: impl redb::StorageBackend,
        wal: impl crate::WalBackend,
        options: RedbOptions,
    ) -> Result<Self, LogError> {
        let mut store = Self::guarded_open(options, move |b| b.create_with_backend(backend))?;
        store.attach_wal(Box::new(wal))?;
        if options.durability != Durability::Fsync || options.wal.is_none() {
            store.wal = None;
        }
        Ok(store)
    }

    /// Recovers the write-ahead file's records above redb's durable revision into redb
    /// (durably) and keeps the file for later batches.
    fn attach_wal(&mut self, backend: Box<dyn crate::WalBackend>) -> Result<(), LogError> {
        // redb holds every revision up to its last durable commit; after a crash the
        // non-durable commits after it are gone and come back from the write-ahead file.
        let limits = self.options.wal.unwrap_or_default();
        let (mut wal, recovered) = Wal::open(backend, limits, self.last_revision()?)?;
        if !recovered.is_empty() {
            self.write_batch(&recovered, true)?;
        }
        wal.rewind();
        if self.options.durability == Durability::Fsync && self.options.wal.is_some() {
            wal.reserve_interval()?;
        }
        self.wal = Some(Arc::new(parking_lot::Mutex::new(wal)));
        Ok(())
    }

    /// Opens (or creates) a store on a custom redb storage backend, e.g. one that injects
    /// I/O failures in tests. No write-ahead file: every batch is a durable redb commit under
    /// [`Durability::Fsync`].
    pub fn with_backend(
        backend: impl redb::StorageBackend,
        options: RedbOptions,
    ) -> Result<Self, LogError> {
        Self::guarded_open(options, move |b| b.create_with_backend(backend))
    }

    fn guarded_open(
        options: RedbOptions,
        open: impl FnOnce(&redb::Builder) -> Result<redb::Database, redb::DatabaseError>,
    ) -> Result<Self, LogError> {
        let mut builder = redb::Database::builder();
        builder.set_check_integrity_on_open(options.verify_on_open);
        builder.set_cache_size(options.cache_bytes);
        // redb may panic instead of returning an error on a file altered outside it (its own
        // docs say so for unverified opens); report that as corruption rather than unwinding
        // through the caller.
        let db = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| open(&builder)))
            .map_err(|_| LogError::Corrupt {
                revision: None,
                reason: "the storage engine panicked while opening the file".into(),
            })??;
        let store = Self {
            db: Arc::new(parking_lot::RwLock::new(db)),
            options,
            in_use: Arc::new(AtomicU64::new(0)),
            wal: None,
        };
        store.init()?;
        Ok(store)
    }

    /// Creates the tables on first open, checks the format version, and counts the key
    /// index's bytes once for a store written before that counter existed.
    fn init(&self) -> Result<(), LogError> {
        let txn = self.begin_write()?;
        let in_use;
        {
            let mut meta = txn.open_table(META)?;
            let found = meta.get(META_FORMAT)?.map(|g| g.value());
            match found {
                None => {
                    meta.insert(META_FORMAT, FORMAT_VERSION)?;
                }
                Some(FORMAT_VERSION) => {}
                Some(found) => {
                    return Err(LogError::UnsupportedFormat {
                        found,
                        expected: FORMAT_VERSION,
                    });
                }
            }
            txn.open_table(CHANGES)?;
            let index = txn.open_table(KEY_INDEX)?;
            if meta.get(META_INDEX_BYTES)?.is_none() {
                // One walk of the index, in the same transaction as the counter it sets.
                let mut bytes = 0u64;
                for entry in index.iter()? {
                    bytes += index_entry_bytes(entry?.0.value().0);
                }
                meta.insert(META_INDEX_BYTES, bytes)?;
            }
            in_use = in_use_of(
                Self::meta_get(&meta, META_COUNT)?,
                Self::meta_get(&meta, META_BYTES)?,
                Self::meta_get(&meta, META_INDEX_BYTES)?,
            );
        }
        txn.commit()?;
        self.in_use.store(in_use, Ordering::Release);
        Ok(())
    }

    /// A write transaction at the store's durability: durable under [`Durability::Fsync`].
    /// Every write but a batch handed to the write-ahead file uses this one; committing it
    /// makes every earlier non-durable commit durable too, so the caller rewinds the file
    /// (see [`Self::lock_wal`]).
    fn begin_write(&self) -> Result<redb::WriteTransaction, LogError> {
        self.begin_write_with(self.options.durability == Durability::Fsync)
    }

    fn begin_write_with(&self, durable: bool) -> Result<redb::WriteTransaction, LogError> {
        // Write transactions run on the writer thread only, as `defragment` does: they never
        // overlap it, so the guard need not outlive this call.
        let mut txn = self.db.read().begin_write()?;
        txn.set_durability(if durable {
            redb::Durability::Immediate
        } else {
            redb::Durability::None
        })
        .map_err(|e| LogError::Storage(e.to_string()))?;
        txn.set_quick_repair(self.options.quick_repair);
        Ok(txn)
    }

    /// Locks the write-ahead file for a durable commit outside `append_batch`; the caller
    /// calls [`Wal::rewind`] on the guard once its commit returned. Taken **before** the write
    /// transaction begins: `append_batch` holds the lock from a frame's write until its
    /// non-durable redb commit, so every frame written before this lock is in redb when the
    /// durable commit begins, and the commit makes it durable. (Rewinding after a commit that
    /// began while a frame's redb commit was still pending would let the next frame overwrite
    /// one that redb holds only non-durably.) Lock order: this lock, then redb's write lock.
    fn lock_wal(&self) -> Option<parking_lot::MutexGuard<'_, Wal>> {
        self.wal.as_ref().map(|w| w.lock())
    }

    /// Writes `batch` in one redb commit, durable or not.
    fn write_batch(&self, batch: &[EncodedChange], durable: bool) -> Result<(), LogError> {
        let Some(newest) = batch.last() else {
            return Ok(());
        };
        let txn = self.begin_write_with(durable)?;
        let in_use;
        {
            let mut changes = txn.open_table(CHANGES)?;
            let mut index = txn.open_table(KEY_INDEX)?;
            let mut meta = txn.open_table(META)?;
            let mut bytes = 0u64;
            let mut index_bytes = 0u64;
            for rec in batch {
                changes.insert(rec.revision, rec.bytes.as_slice())?;
                for key in &rec.keys {
                    // Counted only when new: a key twice in one change set is one entry.
                    if index.insert((key.as_ref(), rec.revision), ())?.is_none() {
                        index_bytes += index_entry_bytes(key);
                    }
                }
                bytes += rec.bytes.len() as u64;
            }
            let count = Self::meta_get(&meta, META_COUNT)? + batch.len() as u64;
            let total = Self::meta_get(&meta, META_BYTES)? + bytes;
            let index_total = Self::meta_get(&meta, META_INDEX_BYTES)? + index_bytes;
            meta.insert(META_COUNT, count)?;
            meta.insert(META_BYTES, total)?;
            meta.insert(META_INDEX_BYTES, index_total)?;
            meta.insert(META_LAST, newest.revision)?;
            in_use = in_use_of(count, total, index_total);
        }
        txn.commit()?;
        self.in_use.store(in_use, Ordering::Release);
        Ok(())
    }

    fn meta_get(meta: &impl ReadableTable<&'static str, u64>, name: &str) -> Result<u64, LogError> {
        Ok(meta.get(name)?.map_or(0, |g| g.value()))
    }

    /// A read transaction for history after `after`, failing with [`LogError::Compacted`]
    /// when `after + 1` is compacted away. One transaction: the compaction check and the data
    /// read in it come from the same snapshot.
    ///
    /// The guard returned with it keeps `defragment` out while the transaction lives: bind it
    /// first, the transaction second, so the transaction is dropped before the guard.
    fn begin_history_read(
        &self,
        after: Revision,
    ) -> Result<(DbReadGuard<'_>, redb::ReadTransaction), LogError> {
        let db = self.db.read();
        let txn = db.begin_read()?;
        let compacted = Self::meta_get(&txn.open_table(META)?, META_COMPACTED)?;
        if after.saturating_add(1) < compacted {
            return Err(LogError::Compacted { compacted });
        }
        Ok((db, txn))
    }

    fn read_meta(&self, name: &str) -> Result<u64, LogError> {
        // Held until the transaction ends: `defragment` must not run under a live read.
        let db = self.db.read();
        let txn = db.begin_read()?;
        let meta = txn.open_table(META)?;
        Self::meta_get(&meta, name)
    }
}

impl LogStore for RedbStore {
    /// From the `meta` counters as of the last commit (an atomic load): every record's encoded
    /// bytes plus 16 per record (its revision key and redb's length slot), and per key-index
    /// entry its key, 8 bytes of revision and 16 more (length prefix and slot).
    fn bytes_in_use(&self) -> u64 {
        self.in_use.load(Ordering::Acquire)
    }

    fn recount_bytes_in_use(&self) -> Result<u64, LogError> {
        // Held until the transaction ends: `defragment` must not run under a live read.
        let db = self.db.read();
        let txn = db.begin_read()?;
        let (mut count, mut bytes, mut index_bytes) = (0u64, 0u64, 0u64);
        for entry in txn.open_table(CHANGES)?.iter()? {
            count += 1;
            bytes += entry?.1.value().len() as u64;
        }
        for entry in txn.open_table(KEY_INDEX)?.iter()? {
            index_bytes += index_entry_bytes(entry?.0.value().0);
        }
        Ok(in_use_of(count, bytes, index_bytes))
    }

    fn defragment(&self) -> Result<bool, LogError> {
        // Every earlier commit durable first (the compaction rewrites pages of the durable
        // state), then the write-ahead file's frames are all in redb.
        let mut wal = self.lock_wal();
        self.begin_write()?.commit()?;
        if let Some(w) = wal.as_mut() {
            w.rewind();
        }
        drop(wal);
        // Waits for in-flight reads; new ones wait for the compaction.
        let mut db = self.db.write();
        db.compact().map_err(|e| LogError::Storage(e.to_string()))
    }

    fn append_batch(&self, batch: &[EncodedChange]) -> Result<(), LogError> {
        if batch.is_empty() {
            return Ok(());
        }
        let Some(wal) = &self.wal else {
            return self.write_batch(batch, self.options.durability == Durability::Fsync);
        };
        let mut wal = wal.lock();
        if wal.due() {
            // This batch's durable commit hands every earlier frame over to redb.
            self.write_batch(batch, true)?;
            wal.rewind();
            return Ok(());
        }
        // Durable once the frame's `fdatasync` returns; the redb commit after it makes the
        // batch readable (no read sees it before it is durable) without a flush of its own.
        wal.append(batch)?;
        self.write_batch(batch, false)
    }

    fn last_revision(&self) -> Result<Revision, LogError> {
        self.read_meta(META_LAST)
    }

    fn compacted_revision(&self) -> Result<Revision, LogError> {
        self.read_meta(META_COMPACTED)
    }

    fn read(
        &self,
        selector: &KeySelector,
        after: Revision,
        until: Revision,
        limit: usize,
    ) -> Result<Vec<ChangeSet>, LogError> {
        let (_db, txn) = self.begin_history_read(after)?;
        let changes = txn.open_table(CHANGES)?;
        if limit == 0 || after >= until {
            return Ok(Vec::new());
        }
        let window = (Bound::Excluded(after), Bound::Included(until));
        let revisions: Vec<Revision> = match selector {
            KeySelector::All => return scan(&changes, window, limit, |_| true),
            KeySelector::Key(key) => {
                let index = txn.open_table(KEY_INDEX)?;
                let mut revs = Vec::new();
                let lo = (key.as_ref(), after.saturating_add(1));
                for entry in index.range(lo..=(key.as_ref(), until))?.take(limit) {
                    revs.push(entry?.0.value().1);
                }
                revs
            }
            _ => {
                let index = txn.open_table(KEY_INDEX)?;
                let (start, end) = selector.bounds();
                let lo = Bound::Included((start.as_ref(), 0u64));
                let hi = match &end {
                    Some(end) => Bound::Excluded((end.as_ref(), 0u64)),
                    None => Bound::Unbounded,
                };
                let mut revs = BTreeSet::new();
                let mut scanned = 0usize;
                let mut over_budget = false;
                for entry in index.range::<(&[u8], u64)>((lo, hi))? {
                    let rev = entry?.0.value().1;
                    if rev > after && rev <= until {
                        revs.insert(rev);
                    }
                    scanned += 1;
                    if scanned > INDEX_SCAN_BUDGET {
                        over_budget = true;
                        break;
                    }
                }
                if over_budget {
                    return scan(&changes, window, limit, |cs| {
                        cs.events.iter().any(|e| selector.matches(e.key()))
                    });
                }
                revs.into_iter().take(limit).collect()
            }
        };
        let mut out = Vec::with_capacity(revisions.len());
        for rev in revisions {
            let Some(bytes) = changes.get(rev)? else {
                return Err(LogError::Corrupt {
                    revision: Some(rev),
                    reason: "key index names a revision with no change set".into(),
                });
            };
            out.push(codec::decode(bytes.value(), rev)?);
        }
        Ok(out)
    }

    /// One index seek per distinct key of the selection that has an index entry: O((K + 1) ·
    /// log n) index work plus decoding each change set named (each once), where K counts the
    /// keys of the selection changed at any retained revision (the index holds no key whose
    /// history was all compacted away). The change sets after `after` are never scanned.
    fn first_changes(
        &self,
        selector: &KeySelector,
        after: Revision,
        until: Revision,
    ) -> Result<Vec<Event>, LogError> {
        let (_db, txn) = self.begin_history_read(after)?;
        if after >= until {
            return Ok(Vec::new());
        }
        let index = txn.open_table(KEY_INDEX)?;
        let changes = txn.open_table(CHANGES)?;
        let mut found = FirstChanges {
            changes: &changes,
            decoded: HashMap::new(),
            out: Vec::new(),
        };
        // The first revision of `key` in the window, by one seek.
        let first_in_window = |key: &[u8]| -> Result<Option<Revision>, LogError> {
            let lo = (key, after + 1);
            match index.range(lo..=(key, until))?.next() {
                Some(entry) => Ok(Some(entry?.0.value().1)),
                None => Ok(None),
            }
        };
        if let KeySelector::Key(key) = selector {
            if let Some(rev) = first_in_window(key)? {
                found.push(key, rev)?;
            }
            return Ok(found.out);
        }
        let (start, end) = selector.bounds();
        let hi = |end: &Option<bytes::Bytes>| match end {
            Some(end) => Bound::Excluded((end.to_vec(), 0u64)),
            None => Bound::Unbounded,
        };
        let hi = hi(&end);
        let mut lo: Bound<(Vec<u8>, u64)> = Bound::Included((start.to_vec(), 0));
        loop {
            // The next distinct key at or after `lo`: one seek.
            let (key, rev) = {
                let mut it = index.range::<(&[u8], u64)>((borrowed(&lo), borrowed(&hi)))?;
                match it.next() {
                    Some(entry) => {
                        let entry = entry?.0;
                        let (k, rev) = entry.value();
                        (k.to_vec(), rev)
                    }
                    None => break,
                }
            };
            // Its entries are contiguous and ascending: the first may already be in the window.
            let first = if rev > after {
                (rev <= until).then_some(rev)
            } else {
                first_in_window(&key)?
            };
            if let Some(rev) = first {
                found.push(&key, rev)?;
            }
            lo = Bound::Excluded((key, u64::MAX));
        }
        Ok(found.out)
    }

    fn compact(&self, revision: Revision) -> Result<(), LogError> {
        while !self.compact_step(revision)? {}
        Ok(())
    }

    /// Deletes at most [`RedbOptions::compact_step_revisions`] revisions (and their key-index entries) per commit.
    fn compact_step(&self, revision: Revision) -> Result<bool, LogError> {
        let mut wal = self.lock_wal();
        // Durable only for the last step (set below, once known): intermediate steps ride on
        // the next durable commit, the write-ahead file's or an append's without it, instead
        // of each flushing every page the appends since the last one dirtied, which stalled
        // appends for a flush per step (docs/benchmarks.md). A crash loses only steps of a
        // compaction not yet answered: the durable compaction revision still only grows.
        let mut txn = self.begin_write_with(false)?;
        let done;
        let in_use;
        {
            let mut changes = txn.open_table(CHANGES)?;
            let mut index = txn.open_table(KEY_INDEX)?;
            let mut meta = txn.open_table(META)?;
            let mut doomed = Vec::new();
            let step = self.options.compact_step_revisions.max(1);
            for entry in changes.range(..revision)?.take(step) {
                let (k, v) = entry?;
                let rev = k.value();
                let cs = codec::decode(v.value(), rev)?;
                doomed.push((rev, v.value().len() as u64, cs));
            }
            done = doomed.len() < step;
            let mut bytes = 0;
            let mut index_bytes = 0;
            for (rev, len, cs) in &doomed {
                changes.remove(*rev)?;
                for e in &cs.events {
                    // Counted only when found, as `append_batch` counts only what it added.
                    if index.remove((e.key(), *rev))?.is_some() {
                        index_bytes += index_entry_bytes(e.key());
                    }
                }
                bytes += len;
            }
            let count = Self::meta_get(&meta, META_COUNT)?.saturating_sub(doomed.len() as u64);
            let total = Self::meta_get(&meta, META_BYTES)?.saturating_sub(bytes);
            let index_total = Self::meta_get(&meta, META_INDEX_BYTES)?.saturating_sub(index_bytes);
            // An intermediate step compacts to just past what it deleted, never beyond the
            // requested revision, so the persisted value only grows.
            let reached = match doomed.last() {
                Some((rev, _, _)) if !done => (rev + 1).min(revision),
                _ => revision,
            };
            let previous = Self::meta_get(&meta, META_COMPACTED)?;
            meta.insert(META_COMPACTED, reached.max(previous))?;
            meta.insert(META_COUNT, count)?;
            meta.insert(META_BYTES, total)?;
            meta.insert(META_INDEX_BYTES, index_total)?;
            in_use = in_use_of(count, total, index_total);
        }
        let durable = done && self.options.durability == Durability::Fsync;
        if durable {
            txn.set_durability(redb::Durability::Immediate)
                .map_err(|e| LogError::Storage(e.to_string()))?;
        }
        txn.commit()?;
        self.in_use.store(in_use, Ordering::Release);
        if durable && let Some(w) = wal.as_mut() {
            w.rewind();
        }
        Ok(done)
    }

    fn retention_target(
        &self,
        policy: &RetentionPolicy,
        now_ms: u64,
    ) -> Result<Option<Revision>, LogError> {
        if policy.is_unbounded() {
            return Ok(None);
        }
        // Held until the transaction ends: `defragment` must not run under a live read.
        let db = self.db.read();
        let txn = db.begin_read()?;
        let meta = txn.open_table(META)?;
        let changes = txn.open_table(CHANGES)?;
        let mut count = Self::meta_get(&meta, META_COUNT)?.max(changes.len()?);
        let mut bytes = Self::meta_get(&meta, META_BYTES)?;
        let cutoff = policy
            .max_age
            .map(|age| now_ms.saturating_sub(u64::try_from(age.as_millis()).unwrap_or(u64::MAX)));
        let mut first = None;
        for entry in changes.iter()? {
            let (k, v) = entry?;
            let rev = k.value();
            first.get_or_insert(rev);
            let too_many = policy.keep_last.is_some_and(|n| count > n.max(1));
            let too_big = policy.max_bytes.is_some_and(|m| bytes > m);
            let too_old = match cutoff {
                Some(cutoff) => codec::decode_header(v.value(), rev)?.time_ms < cutoff,
                None => false,
            };
            // The newest change set is always kept.
            if count <= 1 || !(too_many || too_big || too_old) {
                return Ok((first != Some(rev)).then_some(rev));
            }
            count -= 1;
            bytes = bytes.saturating_sub(v.value().len() as u64);
        }
        Ok(None)
    }
}

/// A key-index bound over an owned key, borrowed for one range call.
fn borrowed(b: &Bound<(Vec<u8>, u64)>) -> Bound<(&[u8], u64)> {
    match b {
        Bound::Included((k, r)) => Bound::Included((k.as_slice(), *r)),
        Bound::Excluded((k, r)) => Bound::Excluded((k.as_slice(), *r)),
        Bound::Unbounded => Bound::Unbounded,
    }
}

/// The output of [`RedbStore::first_changes`], with the change sets it decoded: a txn that
/// touched many keys of the selection is decoded once (the cache is cleared past 1024 entries,
/// bounding memory).
struct FirstChanges<'a> {
    changes: &'a redb::ReadOnlyTable<u64, &'static [u8]>,
    decoded: HashMap<Revision, ChangeSet>,
    out: Vec<Event>,
}

impl FirstChanges<'_> {
    /// Appends the event of `key` in the change set at `rev`, which the key index names.
    fn push(&mut self, key: &[u8], rev: Revision) -> Result<(), LogError> {
        if !self.decoded.contains_key(&rev) {
            let Some(bytes) = self.changes.get(rev)? else {
                return Err(LogError::Corrupt {
                    revision: Some(rev),
                    reason: "key index names a revision with no change set".into(),
                });
            };
            if self.decoded.len() >= 1024 {
                self.decoded.clear();
            }
            self.decoded.insert(rev, codec::decode(bytes.value(), rev)?);
        }
        let event = self.decoded[&rev]
            .events
            .iter()
            .find(|e| e.key() == key)
            .ok_or_else(|| LogError::Corrupt {
                revision: Some(rev),
                reason: "key index names a change set without the key".into(),
            })?;
        self.out.push(event.clone());
        Ok(())
    }
}

/// Change sets in `window` for which `keep` holds, in order, at most `limit`.
fn scan(
    changes: &redb::ReadOnlyTable<u64, &[u8]>,
    window: (Bound<u64>, Bound<u64>),
    limit: usize,
    keep: impl Fn(&ChangeSet) -> bool,
) -> Result<Vec<ChangeSet>, LogError> {
    let mut out = Vec::new();
    for entry in changes.range::<u64>(window)? {
        let (k, v) = entry?;
        let cs = codec::decode(v.value(), k.value())?;
        if keep(&cs) {
            out.push(cs);
            if out.len() == limit {
                break;
            }
        }
    }
    Ok(out)
}

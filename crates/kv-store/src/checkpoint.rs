//! The persisted key-value state: [`STATE_FILE`], a redb file holding every key's latest
//! value and metadata at one *checkpoint revision* `S`, updated incrementally.
//!
//! The event log drops history below a compaction revision, so after a compaction a log replay
//! alone cannot rebuild the state. Before compacting to `C` the store brings the checkpoint to
//! a durable revision `S >= C - 1` ([`StateDb::checkpoint`]); at open it streams the table and
//! replays the log after `S` (which the compaction kept, since `C <= S + 1`).
//!
//! # Cost follows the change
//!
//! A checkpoint from `S0` to `S` reads the change sets `(S0, S]` from the event log (all still
//! there: the log was compacted to at most `S0 + 1`), folds them into each changed key's last
//! event, and writes one row per distinct changed key (a put upserts it, a delete removes it)
//! plus the meta rows, in **one** redb transaction committed with `Durability::Immediate`
//! (one fsync). Bytes written follow the keys changed since the last checkpoint, not the size
//! of the state. The fold holds at most [`crate::StoreConfig::checkpoint_fold_bytes`] (64 MiB
//! by default) of keys and values; a larger window is written in several flushes inside the
//! same transaction (a key changed in two of them is written twice). Nothing here takes the store's write lock: the window is history,
//! which never changes, so writers go on while a checkpoint runs.
//!
//! Opening streams the table row by row into the state map (no whole-file read into memory).
//!
//! # Layout (format version 1)
//!
//! | table | key | value |
//! |---|---|---|
//! | `kv` | key bytes | `crc32 u32 \| create_rev u64 \| mod_rev u64 \| version u64 \| lease i64 \| value` |
//! | `meta` | `&str` name | `u64`: `format_version` (1), `revision` (S), `rows`, `digest`, `row_bytes` |
//!
//! Little-endian. The CRC-32 covers the key and every byte after the CRC, so a damaged row or
//! a row under the wrong key is an error at open, never data. `rows` counts the rows of `kv`
//! and `digest` is the wrapping sum of their CRCs, both kept in step by every checkpoint
//! transaction (an upsert subtracts the old row's CRC): at open the streamed rows must match
//! both, so a damaged B-tree page that would make the iteration silently skip rows is an error
//! too (redb verifies page checksums only when repairing).
//!
//! # Bytes in use
//!
//! `row_bytes` counts every row as its key, its encoded value and [`ROW_OVERHEAD_BYTES`],
//! kept in step by the same transactions (an upsert subtracts the old row's length, a removal
//! the removed row's): the file's share of [`crate::Store::bytes_in_use`], which the space
//! quota compares. A file's length is no such figure: redb grows it by doubling and never
//! shrinks it without a defragmentation. Open streams every row anyway, so it recomputes the
//! sum there and writes it when the counter is missing (a file from before it existed).
//!
//! # Crash safety
//!
//! redb never exposes a torn commit: a crash during a checkpoint leaves the previous one
//! (copy-on-write pages, checksummed commit slots). The log is compacted only after the
//! checkpoint commit returned, so it still holds everything after the checkpoint that
//! survived. A failed checkpoint commit makes the store fail-stop (redb refuses further writes
//! to the file until it is reopened).
//!
//! # Migration
//!
//! Data directories written before this file existed hold `state.snapshot` (the whole state,
//! one event-log record, rewritten at every compaction; see `snapshot.rs`). Open converts it
//! once: its state is written to [`STATE_FILE`] in one durable transaction, and only then is
//! the old file removed (and the directory fsynced). A crash in between finds both at the
//! same revision and only removes the old file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use event_log::EventLog;
use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use watch_core::{EventKind, KeySelector, KeyValue, Revision};

use crate::StoreError;
use crate::state::KvState;

/// File name of the persisted state inside the data directory.
pub const STATE_FILE: &str = "state.redb";

/// Key -> encoded row (see the module docs).
const KV: TableDefinition<'_, &[u8], &[u8]> = TableDefinition::new("kv");
/// Named counters, see the `META_*` names.
const META: TableDefinition<'_, &str, u64> = TableDefinition::new("meta");

const META_FORMAT: &str = "format_version";
const META_REVISION: &str = "revision";
const META_ROWS: &str = "rows";
const META_DIGEST: &str = "digest";
/// Bytes of the rows, each counted by [`row_bytes`] (see the module docs).
const META_ROW_BYTES: &str = "row_bytes";

/// The layout version of the tables above; bump on any incompatible change.
const FORMAT_VERSION: u64 = 1;

/// Bytes of a row's value before the key-value's value: crc, create, mod, version, lease.
const ROW_HEADER: usize = 4 + 8 + 8 + 8 + 8;

/// Bytes counted per row beyond its key and encoded value: redb's key- and value-length
/// slots (4 + 4) in the leaf, rounded up to 16 for the row's share of branch pages.
const ROW_OVERHEAD_BYTES: u64 = 16;

/// The bytes in use of a row of a `key_len`-byte key and a `row_len`-byte encoded value.
fn row_bytes(key_len: usize, row_len: usize) -> u64 {
    (key_len + row_len) as u64 + ROW_OVERHEAD_BYTES
}

/// Change sets read from the event log per chunk while folding a checkpoint window.
const FOLD_CHUNK: usize = 1024;

/// redb's page cache for this file. The state is held in memory by the store; the file is
/// streamed once at open and written by checkpoints, so a small cache suffices.
const CACHE_BYTES: usize = 16 << 20;

/// What one checkpoint wrote ([`crate::Store::last_checkpoint`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct CheckpointInfo {
    /// The previous checkpoint revision: the window was `(from, revision]`.
    pub from: Revision,
    /// The new checkpoint revision.
    pub revision: Revision,
    /// Change sets read from the event log.
    pub change_sets: u64,
    /// Rows written: one per distinct key changed in the window (per fold flush), upserted or
    /// removed. `0` for a checkpoint that only advanced the revision.
    pub rows: u64,
    /// Of `rows`, the keys removed (deleted in the window).
    pub removed: u64,
    /// Bytes of the rows upserted (keys and encoded values).
    pub bytes: u64,
    /// Times the fold was written into the transaction: 1 when the window's changes fit
    /// [`crate::StoreConfig::checkpoint_fold_bytes`], more for a larger window, 0 when
    /// nothing changed.
    pub flushes: u64,
    /// Keys in the table after the checkpoint.
    pub keys: u64,
    /// Wall time of the checkpoint, fold and commit (fsync) included.
    pub elapsed: Duration,
}

/// Opens the redb database of the state file: at `path`, or through a custom backend (fault
/// injection in tests).
pub(crate) type Opener =
    Box<dyn FnOnce(&redb::Builder) -> Result<redb::Database, redb::DatabaseError> + Send>;

/// The state file. Its database is behind a mutex: one checkpoint, conversion or
/// defragmentation at a time (the store also serializes them under its compaction lock).
pub(crate) struct StateDb {
    db: parking_lot::Mutex<redb::Database>,
    path: PathBuf,
    /// `row_bytes` as of the last commit (0 until [`StateDb::load`] or a commit sets it).
    in_use: AtomicU64,
}

fn err(path: &Path, e: impl std::fmt::Display) -> StoreError {
    StoreError::Snapshot {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

/// The encoded row of `kv` (without its key) and its CRC.
fn encode_row(kv: &KeyValue) -> (Vec<u8>, u32) {
    let mut row = Vec::with_capacity(ROW_HEADER + kv.value.len());
    row.extend_from_slice(&[0; 4]);
    row.extend_from_slice(&kv.create_revision.to_le_bytes());
    row.extend_from_slice(&kv.mod_revision.to_le_bytes());
    row.extend_from_slice(&kv.version.to_le_bytes());
    row.extend_from_slice(&kv.lease.to_le_bytes());
    row.extend_from_slice(&kv.value);
    let crc = row_crc(&kv.key, &row[4..]);
    row[..4].copy_from_slice(&crc.to_le_bytes());
    (row, crc)
}

fn row_crc(key: &[u8], rest: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&(key.len() as u64).to_le_bytes());
    h.update(key);
    h.update(rest);
    h.finalize()
}

/// The stored CRC of a row (its first 4 bytes; 0 for a row too short to hold one, which the
/// open check reports).
fn stored_crc(row: &[u8]) -> u32 {
    row.get(..4)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u32::from_le_bytes)
}

/// Decodes the row of `key`, checking its CRC.
fn decode_row(key: &[u8], row: &[u8]) -> Result<(KeyValue, u32), String> {
    if row.len() < ROW_HEADER {
        return Err(format!("row of {} bytes is too short", row.len()));
    }
    let crc = stored_crc(row);
    if row_crc(key, &row[4..]) != crc {
        return Err("row checksum mismatch".into());
    }
    let u = |at: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&row[at..at + 8]);
        u64::from_le_bytes(b)
    };
    let kv = KeyValue {
        key: Bytes::copy_from_slice(key),
        value: Bytes::copy_from_slice(&row[ROW_HEADER..]),
        create_revision: u(4),
        mod_revision: u(12),
        version: u(20),
        lease: u(28) as i64,
    };
    Ok((kv, crc))
}

fn meta_get(meta: &impl ReadableTable<&'static str, u64>, name: &str) -> Result<u64, redb::Error> {
    Ok(meta.get(name)?.map_or(0, |g| g.value()))
}

/// One open write transaction's table updates, keeping `rows`, `digest` and `row_bytes` in
/// step.
struct Writer<'t> {
    kv: redb::Table<'t, &'static [u8], &'static [u8]>,
    rows: u64,
    digest: u64,
    /// `row_bytes`: see [`row_bytes`].
    bytes: u64,
    info: CheckpointInfo,
}

impl Writer<'_> {
    fn put(&mut self, kv: &KeyValue) -> Result<(), redb::Error> {
        let (row, crc) = encode_row(kv);
        let old = self.kv.insert(kv.key.as_ref(), row.as_slice())?;
        match old {
            Some(old) => {
                self.digest = self.digest.wrapping_sub(stored_crc(old.value()).into());
                // Saturating: a counter off by a bug must not wrap to a huge figure.
                self.bytes = self
                    .bytes
                    .saturating_sub(row_bytes(kv.key.len(), old.value().len()));
            }
            None => self.rows += 1,
        }
        self.digest = self.digest.wrapping_add(crc.into());
        self.bytes += row_bytes(kv.key.len(), row.len());
        self.info.rows += 1;
        self.info.bytes += (kv.key.len() + row.len()) as u64;
        Ok(())
    }

    fn remove(&mut self, key: &[u8]) -> Result<(), redb::Error> {
        let old = self.kv.remove(key)?;
        if let Some(old) = old {
            self.digest = self.digest.wrapping_sub(stored_crc(old.value()).into());
            self.bytes = self
                .bytes
                .saturating_sub(row_bytes(key.len(), old.value().len()));
            self.rows -= 1;
        }
        self.info.rows += 1;
        self.info.removed += 1;
        Ok(())
    }

    /// Writes every folded key (its last event of the window) and empties the fold.
    fn flush(&mut self, fold: &mut BTreeMap<Bytes, Option<KeyValue>>) -> Result<(), redb::Error> {
        if fold.is_empty() {
            return Ok(());
        }
        self.info.flushes += 1;
        for (key, kv) in std::mem::take(fold) {
            match kv {
                Some(kv) => self.put(&kv)?,
                None => self.remove(&key)?,
            }
        }
        Ok(())
    }
}

impl StateDb {
    /// Opens (or creates) the state file of `dir`.
    pub(crate) fn open(dir: &Path, opener: Option<Opener>) -> Result<StateDb, StoreError> {
        let path = dir.join(STATE_FILE);
        let opener = opener.unwrap_or_else(|| {
            let path = path.clone();
            Box::new(move |b: &redb::Builder| event_log::files::open_or_create_redb(b, &path))
        });
        let mut builder = redb::Database::builder();
        builder.set_cache_size(CACHE_BYTES);
        // redb may panic instead of returning an error on a file altered outside it; report
        // that as a damaged file rather than unwinding through the caller.
        let db = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| opener(&builder)))
            .map_err(|_| err(&path, "the storage engine panicked while opening the file"))?
            .map_err(|e| err(&path, e))?;
        let state = StateDb {
            db: parking_lot::Mutex::new(db),
            path,
            in_use: AtomicU64::new(0),
        };
        state.init()?;
        Ok(state)
    }

    /// Creates the tables on first open and checks the format version.
    fn init(&self) -> Result<(), StoreError> {
        let db = self.db.lock();
        let run = || -> Result<Result<(), StoreError>, redb::Error> {
            let txn = begin_write(&db)?;
            {
                let mut meta = txn.open_table(META)?;
                let found = meta.get(META_FORMAT)?.map(|g| g.value());
                match found {
                    None => {
                        meta.insert(META_FORMAT, FORMAT_VERSION)?;
                    }
                    Some(FORMAT_VERSION) => {}
                    Some(found) => {
                        return Ok(Err(err(
                            &self.path,
                            format!("format version {found}, this build reads {FORMAT_VERSION}"),
                        )));
                    }
                }
                txn.open_table(KV)?;
            }
            txn.commit()?;
            Ok(Ok(()))
        };
        run().map_err(|e| err(&self.path, e))?
    }

    /// The checkpoint revision (0: nothing checkpointed yet).
    pub(crate) fn revision(&self) -> Result<Revision, StoreError> {
        let db = self.db.lock();
        let run = || -> Result<u64, redb::Error> {
            let txn = db.begin_read()?;
            meta_get(&txn.open_table(META)?, META_REVISION)
        };
        run().map_err(|e| err(&self.path, e))
    }

    /// Streams the table into `state` (which must be empty) and returns the checkpoint
    /// revision. Every row's CRC is checked, and the rows read must match the stored row count
    /// and digest. The rows' bytes in use are summed on the way; a file without the
    /// `row_bytes` counter (or, after a bug, with a wrong one) gets the sum written.
    pub(crate) fn load(&self, state: &mut KvState) -> Result<Revision, StoreError> {
        let db = self.db.lock();
        // (checkpoint revision, rows' bytes summed, the stored counter if any), or why the
        // rows do not match the meta.
        type Loaded = Result<(Revision, u64, Option<u64>), String>;
        let mut run = || -> Result<Loaded, redb::Error> {
            let txn = db.begin_read()?;
            let meta = txn.open_table(META)?;
            let revision = meta_get(&meta, META_REVISION)?;
            let (rows, digest) = (meta_get(&meta, META_ROWS)?, meta_get(&meta, META_DIGEST)?);
            let stored_bytes = meta.get(META_ROW_BYTES)?.map(|g| g.value());
            let kv = txn.open_table(KV)?;
            let (mut seen, mut sum, mut bytes) = (0u64, 0u64, 0u64);
            for row in kv.iter()? {
                let (k, v) = row?;
                let (kv, crc) = match decode_row(k.value(), v.value()) {
                    Ok(x) => x,
                    Err(e) => return Ok(Err(e)),
                };
                seen += 1;
                sum = sum.wrapping_add(crc.into());
                bytes += row_bytes(k.value().len(), v.value().len());
                state.map.insert(kv.key.clone(), kv);
            }
            if (seen, sum) != (rows, digest) {
                return Ok(Err(format!(
                    "the table holds {seen} rows (digest {sum:#x}) but its meta says {rows} \
                     (digest {digest:#x}): rows are missing or damaged"
                )));
            }
            Ok(Ok((revision, bytes, stored_bytes)))
        };
        let (revision, bytes, stored_bytes) = run()
            .map_err(|e| err(&self.path, e))?
            .map_err(|e| err(&self.path, e))?;
        if stored_bytes != Some(bytes) {
            if let Some(stored) = stored_bytes {
                tracing::warn!(
                    stored,
                    counted = bytes,
                    "state.redb's row_bytes counter was off; rewriting it"
                );
            }
            let write = || -> Result<(), redb::Error> {
                let txn = begin_write(&db)?;
                txn.open_table(META)?.insert(META_ROW_BYTES, bytes)?;
                txn.commit()?;
                Ok(())
            };
            write().map_err(|e| err(&self.path, e))?;
        }
        self.in_use.store(bytes, Ordering::Release);
        state.revision = revision;
        state.index_leases();
        Ok(revision)
    }

    /// Bytes in use of the rows (the `row_bytes` counter, see the module docs) as of the last
    /// commit or [`StateDb::load`]: a memory read.
    pub(crate) fn bytes_in_use(&self) -> u64 {
        self.in_use.load(Ordering::Acquire)
    }

    /// [`StateDb::bytes_in_use`] recomputed by walking every row (O(n), blocking): a check of
    /// the counter.
    pub(crate) fn recount_bytes_in_use(&self) -> Result<u64, StoreError> {
        let db = self.db.lock();
        let run = || -> Result<u64, redb::Error> {
            let txn = db.begin_read()?;
            let mut bytes = 0u64;
            for row in txn.open_table(KV)?.iter()? {
                let (k, v) = row?;
                bytes += row_bytes(k.value().len(), v.value().len());
            }
            Ok(bytes)
        };
        run().map_err(|e| err(&self.path, e))
    }

    /// Brings the checkpoint from `from` (its current revision) to `to` with the changes the
    /// event log holds in `(from, to]`: one row per distinct key changed, in one durable
    /// transaction, folding at most `fold_budget` bytes of keys and values (plus 64 per event)
    /// in memory between flushes into the transaction. The caller makes sure `to` is durable
    /// and that the log still holds `from + 1`.
    pub(crate) fn checkpoint(
        &self,
        log: &EventLog,
        from: Revision,
        to: Revision,
        fold_budget: usize,
    ) -> Result<CheckpointInfo, StoreError> {
        let started = Instant::now();
        let db = self.db.lock();
        let base = CheckpointInfo {
            from,
            revision: to,
            change_sets: 0,
            rows: 0,
            removed: 0,
            bytes: 0,
            flushes: 0,
            keys: 0,
            elapsed: Duration::ZERO,
        };
        let mut log_error = None;
        let mut run = || -> Result<(CheckpointInfo, u64), redb::Error> {
            let txn = begin_write(&db)?;
            let info = {
                let mut meta = txn.open_table(META)?;
                let stored = meta_get(&meta, META_REVISION)?;
                if stored != from {
                    return Err(redb::Error::Corrupted(format!(
                        "checkpoint expected at revision {from}, the file is at {stored}"
                    )));
                }
                let mut w = Writer {
                    kv: txn.open_table(KV)?,
                    rows: meta_get(&meta, META_ROWS)?,
                    digest: meta_get(&meta, META_DIGEST)?,
                    bytes: meta_get(&meta, META_ROW_BYTES)?,
                    info: base,
                };
                let mut fold: BTreeMap<Bytes, Option<KeyValue>> = BTreeMap::new();
                let mut fold_bytes = 0usize;
                let mut after = from;
                while after < to {
                    let chunk = match log.read(&KeySelector::All, after, to, FOLD_CHUNK) {
                        Ok(chunk) => chunk,
                        Err(e) => {
                            log_error = Some(e);
                            return Err(redb::Error::Corrupted("event log read failed".into()));
                        }
                    };
                    let Some(last) = chunk.last() else { break };
                    after = last.revision;
                    w.info.change_sets += chunk.len() as u64;
                    for cs in chunk {
                        for e in cs.events {
                            fold_bytes += e.kv.key.len() + e.kv.value.len() + 64;
                            let key = e.kv.key.clone();
                            let kv = match e.kind {
                                EventKind::Put => Some(e.kv),
                                EventKind::Delete => None,
                            };
                            fold.insert(key, kv);
                        }
                    }
                    if fold_bytes >= fold_budget {
                        w.flush(&mut fold)?;
                        fold_bytes = 0;
                    }
                }
                w.flush(&mut fold)?;
                meta.insert(META_REVISION, to)?;
                meta.insert(META_ROWS, w.rows)?;
                meta.insert(META_DIGEST, w.digest)?;
                meta.insert(META_ROW_BYTES, w.bytes)?;
                w.info.keys = w.rows;
                (w.info, w.bytes)
            };
            txn.commit()?;
            Ok(info)
        };
        let result = run();
        if let Some(e) = log_error {
            return Err(crate::log_err(e));
        }
        let (mut info, bytes) = result.map_err(|e| err(&self.path, e))?;
        self.in_use.store(bytes, Ordering::Release);
        info.elapsed = started.elapsed();
        Ok(info)
    }

    /// Replaces the whole table with `kvs` at `revision`, in one durable transaction (a mirror
    /// reset, a restore, the conversion of a legacy snapshot).
    pub(crate) fn replace(
        &self,
        revision: Revision,
        kvs: impl IntoIterator<Item = KeyValue>,
    ) -> Result<(), StoreError> {
        let db = self.db.lock();
        let run = || -> Result<u64, redb::Error> {
            let txn = begin_write(&db)?;
            let bytes = {
                let mut meta = txn.open_table(META)?;
                let mut w = Writer {
                    kv: txn.open_table(KV)?,
                    rows: 0,
                    digest: 0,
                    bytes: 0,
                    info: CheckpointInfo {
                        from: 0,
                        revision,
                        change_sets: 0,
                        rows: 0,
                        removed: 0,
                        bytes: 0,
                        flushes: 0,
                        keys: 0,
                        elapsed: Duration::ZERO,
                    },
                };
                w.kv.retain(|_, _| false)?;
                for kv in kvs {
                    w.put(&kv)?;
                }
                meta.insert(META_REVISION, revision)?;
                meta.insert(META_ROWS, w.rows)?;
                meta.insert(META_DIGEST, w.digest)?;
                meta.insert(META_ROW_BYTES, w.bytes)?;
                w.bytes
            };
            txn.commit()?;
            Ok(bytes)
        };
        let bytes = run().map_err(|e| err(&self.path, e))?;
        self.in_use.store(bytes, Ordering::Release);
        Ok(())
    }

    /// Gives the file's free pages back to the file system (redb `compact`).
    pub(crate) fn defragment(&self) -> Result<bool, StoreError> {
        self.db.lock().compact().map_err(|e| err(&self.path, e))
    }
}

/// A write transaction that is durable (fsync) when its commit returns, whatever the store's
/// durability: the log drops history only once the checkpoint replacing it is on disk.
fn begin_write(db: &redb::Database) -> Result<redb::WriteTransaction, redb::Error> {
    let mut txn = db.begin_write()?;
    txn.set_durability(redb::Durability::Immediate)
        .map_err(|e| redb::Error::Corrupted(e.to_string()))?;
    Ok(txn)
}

/// Converts a legacy `state.snapshot` of `dir`, if any, into `db` (see the module docs): its
/// state is written when it is newer than the table's, then the old file is removed.
pub(crate) fn migrate(dir: &Path, db: &StateDb) -> Result<(), StoreError> {
    let legacy = dir.join(crate::snapshot::SNAPSHOT_FILE);
    // A temporary file of an interrupted legacy snapshot write holds nothing of value.
    let tmp = dir.join(format!("{}.tmp", crate::snapshot::SNAPSHOT_FILE));
    if tmp.exists() {
        std::fs::remove_file(&tmp).map_err(|e| err(&tmp, e))?;
    }
    let Some((revision, kvs)) = crate::snapshot::load(dir)? else {
        return Ok(());
    };
    if revision > db.revision()? {
        tracing::info!(
            revision,
            keys = kvs.len(),
            "converting state.snapshot to state.redb"
        );
        db.replace(revision, kvs)?;
    }
    // Only once the table is durable (`replace` fsyncs).
    std::fs::remove_file(&legacy).map_err(|e| err(&legacy, e))?;
    event_log::files::sync_dir(dir).map_err(|e| err(dir, e))?;
    Ok(())
}

//! Maintenance: backups and restore, hashes, defragmentation, alarms and the space quota.
//!
//! # Backup format
//!
//! A backup ([`Store::backup`]) is keywatch's own format, not etcd's bbolt file. All integers
//! are little-endian:
//!
//! ```text
//! magic "KWBACKUP" | version u32 (1) | revision u64 | compacted u64
//! lease count u64 | (id i64, granted TTL i64) per lease
//! state length u64 | the state at `revision`: one event-log record, a put per key
//! history count u64 | (length u64, event-log record) per change set after the compaction
//! extras count u64 | (name length u64, name, data length u64, data) per extra
//! zero bytes up to the end (a server pads the file for etcdctl's framing)
//! ```
//!
//! Records use event-log's versioned, CRC-checked codec. The history is every change set the
//! event log still holds (from the compaction revision to `revision`), so a restored store
//! serves reads and watches at past revisions exactly as the original did. Extras are named
//! byte strings the embedder adds (watch-server: its users and roles); the store does not
//! read them, [`restore`] hands them back.
//!
//! # Quota
//!
//! With [`crate::StoreConfig::quota_bytes`] set, a write that adds data (a put, a txn with a
//! put, a lease grant) is admitted only while `bytes_in_use + cost < quota`, with etcd's costs
//! (put: 256 + key + value bytes; txn: the larger branch's puts; grant: 64).
//! [`Store::bytes_in_use`] counts live data (the log's records and key index, the persisted
//! state's rows, the leases) from counters each commit keeps, as etcd counts its backend's
//! size in use: not the files' lengths, which redb doubles as they grow and shrinks only on
//! a defragmentation, and which are read by `stat` (three per write, before). A compaction
//! lowers the figure as soon as the log has dropped the history, and never raises it while it
//! runs (its checkpoint's rows count once the history they copy is gone). A refusal raises
//! [`Alarm::NoSpace`]; while it is active every such write fails with
//! [`StoreError::NoSpace`], whatever its size. Reads, deletes, compaction, lease revokes and
//! keep-alives still work, as in etcd. [`Store::deactivate_alarm`] clears it.

use std::collections::BTreeSet;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::Path;

use watch_core::{ChangeSet, Event, EventKind, KeySelector, KeyValue, Revision};

use crate::types::{KeyRange, TxnOp, TxnRequest};
use crate::{Store, StoreError, checkpoint, lease, snapshot};

/// First bytes of every backup.
pub const BACKUP_MAGIC: &[u8; 8] = b"KWBACKUP";
const BACKUP_VERSION: u32 = 1;

/// Change sets read from the log per chunk while writing a backup.
const BACKUP_CHUNK: usize = 1024;

/// etcd's admission cost of a put beyond its key and value (`quota.go`).
const PUT_OVERHEAD: u64 = 256;
/// etcd's admission cost of a lease grant.
const GRANT_COST: u64 = 64;

/// An alarm, as etcd's `AlarmType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Alarm {
    /// etcd's `NONE`: never raised by the store, but a client may activate it (etcd stores it).
    None,
    /// The space quota was exceeded: writes that add data fail until it is deactivated.
    NoSpace,
    /// Data was found corrupt (only ever raised by a client here): every write fails.
    Corrupt,
}

/// A raised alarm: the member that raised it and its type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AlarmMember {
    /// The member ID ([`crate::StoreConfig::member_id`] for the store's own alarms).
    pub member: u64,
    /// The alarm.
    pub alarm: Alarm,
}

/// What [`Store::backup`] wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct BackupInfo {
    /// The revision the backup was taken at (every key as of it).
    pub revision: Revision,
    /// The compaction revision recorded in it (0: never compacted).
    pub compacted: Revision,
    /// Bytes written.
    pub bytes: u64,
}

/// What [`restore`] installed.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RestoreInfo {
    /// The revision of the restored state.
    pub revision: Revision,
    /// The compaction revision of the restored store.
    pub compacted: Revision,
    /// Keys restored.
    pub keys: usize,
    /// Leases restored (each gets its full TTL again when the store opens).
    pub leases: usize,
    /// Change sets of history restored.
    pub history: usize,
    /// The backup's extras (name, data), as [`Store::backup`] was given them.
    pub extras: Vec<(String, Vec<u8>)>,
}

/// A hash of the key-value state at one revision ([`Store::hash_kv`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct KvHash {
    /// CRC-32 (IEEE) over every key-value at the revision (see [`Store::hash_kv`]).
    pub hash: u32,
    /// The compaction revision (0: never compacted).
    pub compacted: Revision,
    /// The store's current (durable) revision.
    pub revision: Revision,
}

/// Sizes of the data files around a [`Store::defragment`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Defragmented {
    /// [`Store::disk_size`] before.
    pub before: u64,
    /// [`Store::disk_size`] after.
    pub after: u64,
}

fn io_err(path: &Path, e: impl std::fmt::Display) -> StoreError {
    StoreError::Backup {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

/// The admission cost of `req` under etcd's quota rules: its puts' bytes, the larger branch.
pub(crate) fn txn_cost(req: &TxnRequest) -> u64 {
    fn branch(ops: &[TxnOp]) -> u64 {
        ops.iter()
            .map(|op| match op {
                TxnOp::Put { key, value, .. } => {
                    PUT_OVERHEAD + key.len() as u64 + value.len() as u64
                }
                TxnOp::Txn(t) => txn_cost(t),
                TxnOp::Range(_) | TxnOp::Delete { .. } => 0,
            })
            .sum()
    }
    branch(&req.success).max(branch(&req.failure))
}

/// Feeds one key-value into a hash: every field, lengths first, so no two states collide by
/// concatenation.
fn hash_kv(h: &mut crc32fast::Hasher, kv: &KeyValue) {
    h.update(&(kv.key.len() as u64).to_le_bytes());
    h.update(&kv.key);
    h.update(&kv.create_revision.to_le_bytes());
    h.update(&kv.mod_revision.to_le_bytes());
    h.update(&kv.version.to_le_bytes());
    h.update(&kv.lease.to_le_bytes());
    h.update(&(kv.value.len() as u64).to_le_bytes());
    h.update(&kv.value);
}

impl Store {
    /// The alarms raised, in (member, alarm) order.
    pub fn alarms(&self) -> Vec<AlarmMember> {
        self.inner.alarms.lock().iter().copied().collect()
    }

    /// Raises `alarm` for `member`. Returns false when it was already raised.
    pub fn activate_alarm(&self, member: u64, alarm: Alarm) -> bool {
        let added = self
            .inner
            .alarms
            .lock()
            .insert(AlarmMember { member, alarm });
        if added {
            tracing::warn!(member, ?alarm, "alarm raised");
        }
        added
    }

    /// Clears `alarm` for `member`. Returns false when it was not raised.
    pub fn deactivate_alarm(&self, member: u64, alarm: Alarm) -> bool {
        let removed = self
            .inner
            .alarms
            .lock()
            .remove(&AlarmMember { member, alarm });
        if removed {
            tracing::info!(member, ?alarm, "alarm cleared");
        }
        removed
    }

    fn alarm_raised(&self, alarm: Alarm) -> bool {
        self.inner.alarms.lock().iter().any(|a| a.alarm == alarm)
    }

    /// Refuses every write while [`Alarm::Corrupt`] is raised (etcd's corrupt applier).
    pub(crate) fn check_not_corrupt(&self) -> Result<(), StoreError> {
        if self.alarm_raised(Alarm::Corrupt) {
            return Err(StoreError::CorruptAlarm);
        }
        Ok(())
    }

    /// etcd's quota admission of a write costing `cost` bytes (see the module docs). A cost of
    /// 0 (reads, deletes) is always admitted.
    pub(crate) fn admit(&self, cost: u64) -> Result<(), StoreError> {
        self.check_not_corrupt()?;
        if cost == 0 {
            return Ok(());
        }
        if self.alarm_raised(Alarm::NoSpace) {
            return Err(StoreError::NoSpace);
        }
        let quota = self.inner.config.quota_bytes;
        if quota != 0 && self.bytes_in_use().saturating_add(cost) >= quota {
            self.activate_alarm(self.inner.config.member_id, Alarm::NoSpace);
            return Err(StoreError::NoSpace);
        }
        Ok(())
    }

    /// [`Store::admit`] for a lease grant.
    pub(crate) fn admit_grant(&self) -> Result<(), StoreError> {
        self.admit(GRANT_COST)
    }

    /// A hash of the key-value state at `revision` (0: the current one): CRC-32 over every
    /// key with its create and mod revisions, version, lease and value, in key order. Two
    /// stores holding the same keys at a revision report the same hash, whatever their
    /// history. Fails with [`StoreError::FutureRevision`] above the current revision and with
    /// [`StoreError::Compacted`] at or below the compaction revision, as etcd's HashKV.
    pub async fn hash_kv(&self, revision: Revision) -> Result<KvHash, StoreError> {
        self.check_closed()?;
        let current = self.current_revision();
        if revision > current {
            return Err(StoreError::FutureRevision {
                requested: revision,
                current,
            });
        }
        let compacted = self.compacted_revision();
        if revision != 0 && compacted != 0 && revision <= compacted {
            return Err(StoreError::Compacted {
                requested: revision,
                compacted,
            });
        }
        // The state at `revision` (the current one for 0), durable; `current` is the revision
        // it was read against.
        let (current, kvs) = self.range_at(&KeyRange::all(), revision).await?;
        let mut h = crc32fast::Hasher::new();
        for kv in &kvs {
            hash_kv(&mut h, kv);
        }
        Ok(KvHash {
            hash: h.finalize(),
            compacted,
            revision: current,
        })
    }

    /// A hash of the whole store: [`Store::hash_kv`]'s input at the current revision, plus
    /// that revision, the compaction revision and every lease (ID and granted TTL). Returns
    /// (hash, revision).
    pub async fn hash(&self) -> Result<(u32, Revision), StoreError> {
        self.check_closed()?;
        let (revision, kvs, leases) = {
            let _w = self.inner.write_lock.lock().await;
            let leases = self.inner.leases.records();
            let st = self.inner.state.read();
            (st.revision, st.range(&KeyRange::all()), leases)
        };
        self.wait_durable(revision).await?;
        let mut h = crc32fast::Hasher::new();
        h.update(&revision.to_le_bytes());
        h.update(&self.compacted_revision().to_le_bytes());
        for kv in &kvs {
            hash_kv(&mut h, kv);
        }
        for (id, ttl) in leases {
            h.update(&id.to_le_bytes());
            h.update(&ttl.to_le_bytes());
        }
        Ok((h.finalize(), revision))
    }

    /// Gives the space the data files no longer use back to the file system: the event log's,
    /// the persisted state's and the lease records' redb files are compacted in place. Writes queue behind it and reads of history wait,
    /// as in etcd, where a defragmentation blocks the member.
    pub async fn defragment(&self) -> Result<Defragmented, StoreError> {
        self.check_open()?;
        let before = self.disk_size();
        // Holding the compaction lock keeps a compaction (many log commits) from interleaving.
        let _c = self.inner.compact_lock.lock().await;
        self.inner.log.defragment().await.map_err(crate::log_err)?;
        let db = self.inner.state_db.clone();
        tokio::task::spawn_blocking(move || db.defragment())
            .await
            .map_err(|e| StoreError::Inconsistent(format!("defragment task failed: {e}")))??;
        self.inner.leases.defragment().await?;
        let after = self.disk_size();
        tracing::info!(before, after, "data files defragmented");
        let done = Defragmented { before, after };
        let mut last = self.inner.defragmented.lock();
        *last = (Some(done), last.1 + 1);
        Ok(done)
    }

    /// The last [`Store::defragment`]'s sizes (`None` before the first) and how many have run
    /// since the store opened.
    pub fn last_defragment(&self) -> (Option<Defragmented>, u64) {
        *self.inner.defragmented.lock()
    }

    /// Writes a consistent backup of the whole store to `out` (created or truncated; see the
    /// module docs for the format): every key at one revision, the leases, the compaction
    /// revision and the history the event log holds. Writes are held only while the state
    /// and the lease table are copied (in memory, sharing the values); compactions wait until
    /// the history is written.
    ///
    /// `extras` are stored as given (see the module docs) and returned by [`restore`].
    pub async fn backup(
        &self,
        out: &Path,
        extras: Vec<(String, Vec<u8>)>,
    ) -> Result<BackupInfo, StoreError> {
        self.check_open()?;
        // Compactions would drop the history this is about to read.
        let _c = self.inner.compact_lock.lock().await;
        let (revision, kvs, leases) = {
            // Under the write lock no put can attach a key to a lease and no revoke can delete
            // one, so the lease table and the keys agree.
            let _w = self.inner.write_lock.lock().await;
            let leases = self.inner.leases.records();
            let st = self.inner.state.read();
            (st.revision, st.range(&KeyRange::all()), leases)
        };
        self.wait_durable(revision).await?;
        let compacted = self.compacted_revision();
        let log = self.inner.log.clone();
        let path = out.to_path_buf();
        tokio::task::spawn_blocking(move || {
            let file = std::fs::File::create(&path).map_err(|e| io_err(&path, e))?;
            let mut w = BufWriter::new(file);
            let mut bytes = 0u64;
            let mut put = |w: &mut BufWriter<std::fs::File>, b: &[u8]| {
                bytes += b.len() as u64;
                w.write_all(b).map_err(|e| io_err(&path, e))
            };
            put(&mut w, BACKUP_MAGIC)?;
            put(&mut w, &BACKUP_VERSION.to_le_bytes())?;
            put(&mut w, &revision.to_le_bytes())?;
            put(&mut w, &compacted.to_le_bytes())?;
            put(&mut w, &(leases.len() as u64).to_le_bytes())?;
            for (id, ttl) in &leases {
                put(&mut w, &id.to_le_bytes())?;
                put(&mut w, &ttl.to_le_bytes())?;
            }
            let events = kvs.into_iter().map(|kv| Event::put(kv, None)).collect();
            let state = event_log::codec::encode(&ChangeSet::new(revision, events), 0);
            put(&mut w, &(state.bytes.len() as u64).to_le_bytes())?;
            put(&mut w, &state.bytes)?;
            // The history: collected first for its count (change sets share their values).
            let mut history = Vec::new();
            let mut after = log.compacted_revision().max(1) - 1;
            loop {
                let chunk = log
                    .read(&KeySelector::All, after, revision, BACKUP_CHUNK)
                    .map_err(crate::log_err)?;
                let n = chunk.len();
                for cs in chunk {
                    after = cs.revision;
                    history.push(event_log::codec::encode(&cs, 0).bytes);
                }
                if n < BACKUP_CHUNK {
                    break;
                }
            }
            put(&mut w, &(history.len() as u64).to_le_bytes())?;
            for rec in &history {
                put(&mut w, &(rec.len() as u64).to_le_bytes())?;
                put(&mut w, rec)?;
            }
            put(&mut w, &(extras.len() as u64).to_le_bytes())?;
            for (name, data) in &extras {
                put(&mut w, &(name.len() as u64).to_le_bytes())?;
                put(&mut w, name.as_bytes())?;
                put(&mut w, &(data.len() as u64).to_le_bytes())?;
                put(&mut w, data)?;
            }
            let file = w.into_inner().map_err(|e| io_err(&path, e.error()))?;
            file.sync_all().map_err(|e| io_err(&path, e))?;
            Ok(BackupInfo {
                revision,
                compacted,
                bytes,
            })
        })
        .await
        .map_err(|e| StoreError::Inconsistent(format!("backup task failed: {e}")))?
    }
}

/// Reads a backup from `backup` (see the module docs; trailing zero bytes are allowed) and
/// installs it as the data directory `dir`, which must not hold a store yet. Opening `dir`
/// afterwards serves every key with its revisions, the revision counter, the compaction
/// revision, the history and the leases (each with its full TTL from the open, as after any
/// restart). Keys whose lease the backup does not hold (revoked while it was taken) are
/// deleted at open, as after a crash mid-revoke.
pub fn restore(backup: impl Read, dir: &Path) -> Result<RestoreInfo, StoreError> {
    let src = Path::new("<backup>");
    for f in [
        event_log::STORE_FILE,
        // Frames left from another store would be replayed into the restored log at open.
        event_log::WAL_FILE,
        checkpoint::STATE_FILE,
        snapshot::SNAPSHOT_FILE,
        lease::LEASES_FILE,
    ] {
        if dir.join(f).exists() {
            return Err(io_err(
                dir,
                format!("{f} exists: restore needs an empty data directory"),
            ));
        }
    }
    fn u64_of(r: &mut impl Read) -> Result<u64, StoreError> {
        let mut b = [0u8; 8];
        r.read_exact(&mut b)
            .map_err(|e| io_err(Path::new("<backup>"), e))?;
        Ok(u64::from_le_bytes(b))
    }
    // Bounded by the input itself: a corrupt length must not allocate first, so a field is
    // read through `take` and its length checked after.
    fn bytes(r: &mut impl Read) -> Result<Vec<u8>, StoreError> {
        let src = Path::new("<backup>");
        let len = u64_of(r)?;
        let mut buf = Vec::new();
        r.take(len)
            .read_to_end(&mut buf)
            .map_err(|e| io_err(src, e))?;
        if buf.len() as u64 != len {
            return Err(io_err(src, "truncated backup"));
        }
        Ok(buf)
    }
    fn record(r: &mut impl Read) -> Result<ChangeSet, StoreError> {
        let buf = bytes(r)?;
        event_log::codec::decode_standalone(&buf).map_err(|e| io_err(Path::new("<backup>"), e))
    }
    let mut r = BufReader::new(backup);
    let mut magic = [0u8; 8];
    r.read_exact(&mut magic).map_err(|e| io_err(src, e))?;
    if &magic != BACKUP_MAGIC {
        return Err(io_err(src, "not a keywatch backup (bad magic)"));
    }
    let mut version = [0u8; 4];
    r.read_exact(&mut version).map_err(|e| io_err(src, e))?;
    let version = u32::from_le_bytes(version);
    if version != BACKUP_VERSION {
        return Err(io_err(
            src,
            format!("backup format version {version}, this build reads {BACKUP_VERSION}"),
        ));
    }
    let revision = u64_of(&mut r)?;
    let compacted = u64_of(&mut r)?;
    let lease_count = u64_of(&mut r)?;
    let mut leases = Vec::new();
    for _ in 0..lease_count {
        let id = u64_of(&mut r)? as i64;
        let ttl = u64_of(&mut r)? as i64;
        leases.push((id, ttl));
    }
    let state = record(&mut r)?;
    if state.revision != revision || state.events.iter().any(|e| e.kind != EventKind::Put) {
        return Err(io_err(src, "the state record does not match the header"));
    }
    let history_count = u64_of(&mut r)?;
    let mut history = Vec::new();
    let mut last = 0;
    for _ in 0..history_count {
        let cs = record(&mut r)?;
        if cs.revision <= last || cs.revision > revision {
            return Err(io_err(src, "history out of order"));
        }
        last = cs.revision;
        history.push(event_log::codec::encode(&cs, 0));
    }
    let extras_count = u64_of(&mut r)?;
    let mut extras = Vec::new();
    for _ in 0..extras_count {
        let name = String::from_utf8(bytes(&mut r)?)
            .map_err(|_| io_err(src, "an extra's name is not UTF-8"))?;
        extras.push((name, bytes(&mut r)?));
    }
    let mut rest = Vec::new();
    r.read_to_end(&mut rest).map_err(|e| io_err(src, e))?;
    if rest.iter().any(|&b| b != 0) {
        return Err(io_err(src, "unexpected bytes after the backup"));
    }
    std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
    let keys = state.events.len();
    let kvs = state.events.into_iter().map(|e| e.kv);
    checkpoint::StateDb::open(dir, None)?.replace(revision, kvs)?;
    lease::write_records(dir, &leases)?;
    let n_history = history.len();
    if !history.is_empty() {
        use event_log::LogStore;
        let log = event_log::RedbStore::open(
            dir.join(event_log::STORE_FILE),
            event_log::RedbOptions::default(),
        )?;
        for chunk in history.chunks(BACKUP_CHUNK) {
            log.append_batch(chunk)?;
        }
        if compacted > 0 && compacted <= last {
            log.compact(compacted)?;
        }
    }
    event_log::files::sync_dir(dir).map_err(|e| io_err(dir, e))?;
    Ok(RestoreInfo {
        revision,
        compacted,
        keys,
        leases: leases.len(),
        history: n_history,
        extras,
    })
}

/// The alarms as a set, for [`crate::Inner`].
pub(crate) type Alarms = parking_lot::Mutex<BTreeSet<AlarmMember>>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Durability, PutOptions, RangeRequest, StoreConfig};

    fn config() -> StoreConfig {
        StoreConfig::default().durability(Durability::NoSync)
    }

    #[test]
    fn txn_cost_is_etcds() {
        let put = |k: &str, v: &str| TxnOp::Put {
            key: k.to_owned().into(),
            value: v.to_owned().into(),
            options: PutOptions::default(),
        };
        let req = TxnRequest {
            compare: Vec::new(),
            success: vec![put("a", "12"), put("bb", "")],
            failure: vec![put("ccc", "1234567")],
        };
        // success: 256+1+2 + 256+2+0 = 517; failure: 256+3+7 = 266.
        assert_eq!(txn_cost(&req), 517);
        let read_only = TxnRequest {
            compare: Vec::new(),
            success: vec![TxnOp::Delete {
                range: KeyRange::key("a"),
                prev_kv: false,
            }],
            failure: Vec::new(),
        };
        assert_eq!(txn_cost(&read_only), 0);
    }

    #[tokio::test]
    async fn backup_restore_keeps_everything() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("a"), config()).await.unwrap();
        let lease = store.lease_grant(0, 600).await.unwrap().id;
        store.put("k", "1", PutOptions::default()).await.unwrap(); // 2
        store.put("k", "2", PutOptions::default()).await.unwrap(); // 3
        store
            .put("l", "x", PutOptions::default().lease(lease))
            .await
            .unwrap(); // 4
        store.compact(3).await.unwrap();
        let file = dir.path().join("backup");
        let extra = ("users".to_owned(), b"alice".to_vec());
        let info = store.backup(&file, vec![extra.clone()]).await.unwrap();
        assert_eq!((info.revision, info.compacted), (4, 3));
        let hash = store.hash_kv(0).await.unwrap().hash;

        // Padding is allowed, anything else after the end is not.
        let mut bytes = std::fs::read(&file).unwrap();
        bytes.extend_from_slice(&[0; 100]);
        let restored = restore(&bytes[..], &dir.path().join("b")).unwrap();
        assert_eq!(
            (
                restored.revision,
                restored.compacted,
                restored.keys,
                restored.leases
            ),
            (4, 3, 2, 1)
        );
        assert!(
            restore(&bytes[..], &dir.path().join("b")).is_err(),
            "not empty"
        );
        bytes.push(1);
        assert!(restore(&bytes[..], &dir.path().join("c")).is_err());
        assert!(restore(&b"NOTAKWBACKUP"[..], &dir.path().join("d")).is_err());

        let copy = Store::open(dir.path().join("b"), config()).await.unwrap();
        assert_eq!(copy.current_revision(), 4);
        assert_eq!(copy.compacted_revision(), 3);
        assert_eq!(copy.hash_kv(0).await.unwrap().hash, hash);
        assert_eq!(copy.leases().unwrap(), vec![lease]);
        let at3 = copy
            .range(RangeRequest::key("k").revision(3))
            .await
            .unwrap();
        assert_eq!(at3.kvs[0].value, "2");
        let l = copy.range(RangeRequest::key("l")).await.unwrap();
        assert_eq!((l.kvs[0].lease, l.kvs[0].create_revision), (lease, 4));
        store.close().await.unwrap();
        copy.close().await.unwrap();
    }

    #[tokio::test]
    async fn quota_raises_nospace_and_spares_deletes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        // A fresh store's bytes in use (its counters start at what an empty store holds).
        let s = Store::open(&path, config()).await.unwrap();
        let base = s.bytes_in_use();
        s.close().await.unwrap();
        drop(s);
        // Room for a small put, not for a 4 KiB one.
        let store = Store::open(&path, config().quota_bytes(base + 1024))
            .await
            .unwrap();
        assert_eq!(store.bytes_in_use(), base);
        store.put("a", "1", PutOptions::default()).await.unwrap();
        let big = vec![b'x'; 4096];
        assert!(matches!(
            store.put("b", big, PutOptions::default()).await,
            Err(StoreError::NoSpace)
        ));
        assert_eq!(
            store.alarms(),
            vec![AlarmMember {
                member: 0,
                alarm: Alarm::NoSpace
            }]
        );
        // Any size now, and lease grants, fail; deletes do not.
        assert!(matches!(
            store.put("c", "", PutOptions::default()).await,
            Err(StoreError::NoSpace)
        ));
        assert!(matches!(
            store.lease_grant(0, 60).await,
            Err(StoreError::NoSpace)
        ));
        store.delete_range(KeyRange::key("a"), false).await.unwrap();
        assert!(store.deactivate_alarm(0, Alarm::NoSpace));
        assert!(!store.deactivate_alarm(0, Alarm::NoSpace));
        store.close().await.unwrap();
    }
}

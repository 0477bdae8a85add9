//! Leases: etcd's time-limited handles that keys attach to. When a lease is revoked or expires,
//! every key attached to it is deleted in **one** revision (one change set of DELETE events,
//! each with its `prev_kv`), through the same write path as any write: under the store's write
//! lock, queued on the event log in revision order, published once durable.
//!
//! # State
//!
//! - The *lessor* (in memory, one `parking_lot` mutex): lease ID -> (granted TTL, deadline),
//!   plus the expiry timer, an ordered set of `(deadline, ID)`. A keep-alive moves one entry
//!   (O(log n)); the expiry task looks only at the first entry. No task per lease, no scan.
//! - The key -> lease attachment is each key's `KeyValue::lease`, already in the event log and
//!   the snapshot; `KvState::leased` indexes it (lease -> keys) and is rebuilt by replay.
//! - The grants (ID, granted TTL) live in [`LEASES_FILE`], a small redb file next to the event
//!   log, written by one thread that commits whatever is queued in one transaction (group
//!   commit) and fsyncs before any grant is acknowledged.
//!
//! # Crash consistency
//!
//! A revoke (or expiry) first removes the lease from the lessor (puts naming it now fail) and,
//! under the same lessor lock, queues the removal of its record from [`LEASES_FILE`]; it waits
//! for that removal to be durable, then deletes its keys through the write path. Record
//! changes are queued in the order of the lessor changes they persist, so a grant reusing the
//! ID (possible once the lessor lock is released) is committed after the removal, never
//! before it. A crash between the last two leaves keys naming a lease with no record: at open,
//! before the store serves anything, each such lease's *orphaned* keys are deleted in one
//! revision, as the interrupted revoke would have. A
//! crash before the record removal leaves the lease and its keys intact (the revoke was never
//! acknowledged). So no key ever stays attached to a lease that no longer exists.
//! (Not in a mirror's data directory: its keys carry the upstream etcd's lease IDs.)
//!
//! # Mirrors
//!
//! A mirror has no lease of its own: grants and revokes fail with
//! [`StoreError::MirrorReadOnly`], and a store holding a lease cannot become a mirror
//! ([`Store::set_mirror`]), so the expiry task of a mirror has nothing to expire. The reverse
//! is refused by the server: `watch-server` without `--upstream` will not start on a mirror's
//! data directory (`mirror::refuse_standalone`). An embedder calling [`Store::open`] on one
//! directly gets no such check: the keys keep the upstream's lease IDs, which this store never
//! granted, so they are not deleted at open (no orphan sweep where a mirror floor exists) and
//! never expire.
//!
//! # Restart
//!
//! Deadlines are not persisted: at open every recovered lease gets a full TTL from the moment
//! the store opens. etcd 3.4 without lease checkpointing also refreshes every lease on
//! restart (`Promote`), but differently: it adds the election timeout to each deadline and
//! pushes back leases whose refreshed deadlines pile up, so that about 750 expire per second
//! (three quarters of its `leaseRevokeRate` of 1,000 revokes per second). keywatch does neither: every recovered lease of the
//! same TTL expires at the same instant, one TTL after the open, revoked in batches of
//! [`EXPIRY_BATCH`] under the write lock (writers wait behind each batch). A lease nobody
//! keeps alive still expires; a process that restarts more often than a TTL keeps unrenewed
//! leases alive (as in etcd 3.4).
//!
//! # Invariants
//!
//! - **One revision per revoked lease**, through the write path; a lease with no keys creates no
//!   revision (as etcd 3.4, measured). Puts check their lease under the write lock, so a put cannot
//!   attach a key to a lease being revoked.
//! - **Grants are durable before acknowledged** in `leases.redb`, a small redb file of its own
//!   (a grant creates no revision, so it is no change set; and a grant then never waits behind a
//!   large change-set batch). A failed commit is fail-stop for the whole store.
//! - **No key outlives its lease**: a revoke makes the record removal durable before deleting the
//!   keys; keys left by a crash in between are deleted at open (not in a mirror's data directory,
//!   whose keys carry the upstream's lease IDs).
//! - **Restart rule**: deadlines are not persisted; every recovered lease gets its full TTL from
//!   the open (etcd 3.4 also refreshes, and spreads expiries; keywatch does not).
//! - Mirrors hold no local lease (grants and revokes fail `MirrorReadOnly`).
//! - Limits: TTL below `StoreConfig::min_lease_ttl` (2 s, as etcd) is raised to it; above etcd's
//!   9,000,000,000 s is `OUT_OF_RANGE`; at most `StoreConfig::max_leases` (1,000,000) live
//!   leases, beyond that `RESOURCE_EXHAUSTED`.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use redb::{ReadableDatabase, ReadableTable};
use tokio::sync::{Notify, oneshot, watch};
use tokio::time::Instant;
use watch_core::{ChangeSet, Event, Revision};

use super::{Inner, KvState, Store, WriteGuard};
use crate::StoreError;

/// File name of the lease records inside the data directory.
pub const LEASES_FILE: &str = "leases.redb";

/// etcd's maximum lease TTL, in seconds (`lease.MaxLeaseTTL`). A larger grant fails with
/// [`StoreError::LeaseTtlTooLarge`].
pub const MAX_LEASE_TTL: i64 = 9_000_000_000;

/// etcd's minimum lease TTL with its default election settings, in seconds: `ceil(1.5 *
/// election timeout)` = `ceil(1.5 s)` (etcd 3.4.23 grants `TTL(2s)` for 1 s, measured). A grant
/// below the minimum is raised to it.
pub const DEFAULT_MIN_LEASE_TTL: i64 = 2;

/// Lease ID -> granted TTL in seconds.
const LEASES: redb::TableDefinition<'_, i64, i64> = redb::TableDefinition::new("leases");

/// Bytes in use counted per live lease ([`crate::Store::bytes_in_use`]): its record's ID and
/// TTL (8 + 8) plus 16 for redb's share of pages. An estimate from the lessor's count, not a
/// walk of [`LEASES_FILE`].
pub(crate) const RECORD_BYTES: u64 = 32;

/// Most expired leases revoked under one hold of the write lock (their records are removed in
/// one commit; each lease's keys still get their own revision, as in etcd). Bounds how long
/// writers wait behind an expiry burst.
const EXPIRY_BATCH: usize = 1024;

/// Most queued record changes committed in one redb transaction.
const DB_BATCH: usize = 4096;

/// The result of a lease grant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct LeaseGrant {
    /// The lease ID (the one asked for, or chosen by the store).
    pub id: i64,
    /// The granted TTL in seconds (the one asked for, raised to the minimum).
    pub ttl: i64,
    /// The store's durable revision when the grant was acknowledged (a grant creates none).
    pub revision: Revision,
}

/// A lease's state, as etcd's `LeaseTimeToLive`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct LeaseTimeToLive {
    /// The lease ID.
    pub id: i64,
    /// Whole seconds left before it expires.
    pub ttl: i64,
    /// The TTL it was granted, in seconds.
    pub granted_ttl: i64,
    /// The keys attached to it, in key order (empty unless asked for).
    pub keys: Vec<Bytes>,
    /// The store revision the keys were read at (durable).
    pub revision: Revision,
}

struct Lease {
    ttl: i64,
    deadline: Instant,
}

/// The in-memory lease table and expiry timer.
#[derive(Default)]
struct Lessor {
    leases: HashMap<i64, Lease>,
    /// Exactly one `(deadline, id)` per entry of `leases`.
    timer: BTreeSet<(Instant, i64)>,
    /// Grants being made durable: their IDs are taken, they are not usable yet.
    pending: HashSet<i64>,
    /// Leases a LeaseRevoke has taken out of `leases` but not yet finished revoking (id ->
    /// granted TTL). A keep-alive meanwhile is answered with the live TTL: the revoke is not
    /// acknowledged yet, so the keep-alive is ordered before it, as in etcd, where a revoke
    /// takes effect only once applied through raft.
    revoking: HashMap<i64, i64>,
    /// Last server-chosen ID.
    next_id: i64,
}

impl Lessor {
    fn insert(&mut self, id: i64, ttl: i64, now: Instant) {
        let deadline = now + ttl_duration(ttl);
        self.timer.insert((deadline, id));
        if let Some(old) = self.leases.insert(id, Lease { ttl, deadline }) {
            self.timer.remove(&(old.deadline, id));
        }
    }

    fn remove(&mut self, id: i64) -> Option<Lease> {
        let lease = self.leases.remove(&id)?;
        self.timer.remove(&(lease.deadline, id));
        Some(lease)
    }

    fn taken(&self, id: i64) -> bool {
        self.leases.contains_key(&id) || self.pending.contains(&id)
    }

    /// A fresh positive ID. Seeded from the wall clock (milliseconds in the high bits) so IDs
    /// chosen after a restart do not repeat earlier ones; taken IDs are skipped.
    fn new_id(&mut self) -> i64 {
        if self.next_id == 0 {
            let ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_millis() as i64);
            self.next_id = (ms & 0xff_ffff_ffff) << 22;
        }
        loop {
            self.next_id = self.next_id.wrapping_add(1) & i64::MAX;
            if self.next_id != 0 && !self.taken(self.next_id) {
                return self.next_id;
            }
        }
    }
}

/// `ttl` seconds as a duration (TTLs are at most [`MAX_LEASE_TTL`], which fits).
fn ttl_duration(ttl: i64) -> Duration {
    Duration::from_secs(u64::try_from(ttl).unwrap_or(0))
}

enum DbOp {
    Put {
        id: i64,
        ttl: i64,
    },
    Remove(Vec<i64>),
    /// Reclaim the file's free space (redb `compact`), between commits.
    Compact,
}

type DbReq = (DbOp, oneshot::Sender<Result<(), String>>);

/// The lease records file and its group-commit writer thread.
struct LeaseDb {
    tx: parking_lot::Mutex<Option<std::sync::mpsc::Sender<DbReq>>>,
    thread: parking_lot::Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl LeaseDb {
    /// Opens (or creates) the records file and returns every record.
    fn open(dir: &Path, durable: bool) -> Result<(LeaseDb, Vec<(i64, i64)>), StoreError> {
        let path = dir.join(LEASES_FILE);
        let err = |e: &dyn std::fmt::Display| StoreError::LeaseFile {
            path: path.display().to_string(),
            message: e.to_string(),
        };
        let db = event_log::files::open_or_create_redb(&redb::Database::builder(), &path)
            .map_err(|e| err(&e))?;
        let records = (|| -> Result<Vec<(i64, i64)>, redb::Error> {
            let txn = db.begin_write()?;
            txn.open_table(LEASES)?;
            txn.commit()?;
            let txn = db.begin_read()?;
            let table = txn.open_table(LEASES)?;
            let mut out = Vec::new();
            for row in table.iter()? {
                let (id, ttl) = row?;
                out.push((id.value(), ttl.value()));
            }
            Ok(out)
        })()
        .map_err(|e| err(&e))?;
        let (tx, rx) = std::sync::mpsc::channel::<DbReq>();
        let thread = std::thread::Builder::new()
            .name("keywatch-leases".into())
            .spawn(move || db_writer(db, rx, durable))
            .map_err(|e| err(&e))?;
        Ok((
            LeaseDb {
                tx: parking_lot::Mutex::new(Some(tx)),
                thread: parking_lot::Mutex::new(Some(thread)),
            },
            records,
        ))
    }

    /// Queues `op`; the writer commits queued ops in queue order. Never blocks (an unbounded
    /// std channel), so callers queue while holding the lessor lock: record ops are then
    /// ordered exactly as the lessor changes they persist.
    fn queue(&self, op: DbOp) -> Result<DbDone, StoreError> {
        let (done, rx) = oneshot::channel();
        let tx = self.tx.lock().clone().ok_or(StoreError::Closed)?;
        tx.send((op, done)).map_err(|_| StoreError::Closed)?;
        Ok(DbDone(rx))
    }
}

/// A queued record op; [`DbDone::wait`] returns once it is durable (fsync unless the store
/// runs without it).
struct DbDone(oneshot::Receiver<Result<(), String>>);

impl DbDone {
    async fn wait(self) -> Result<(), StoreError> {
        self.0
            .await
            .map_err(|_| StoreError::Closed)?
            .map_err(|message| StoreError::Failed {
                message: format!("{LEASES_FILE}: {message}"),
            })
    }
}

impl LeaseDb {
    /// Stops the writer after what is queued and waits for it (releasing the file).
    fn close(&self) {
        drop(self.tx.lock().take());
        if let Some(t) = self.thread.lock().take() {
            let _ = t.join();
        }
    }
}

impl Drop for LeaseDb {
    fn drop(&mut self) {
        self.close();
    }
}

/// The writer thread: commits everything queued in one transaction, then answers each request.
/// After a failed commit every later request fails too (fail-stop, as the event log).
fn db_writer(mut db: redb::Database, rx: std::sync::mpsc::Receiver<DbReq>, durable: bool) {
    let mut failed: Option<String> = None;
    while let Ok(first) = rx.recv() {
        if matches!(first.0, DbOp::Compact) {
            // No transaction is open here: this thread runs every one of them.
            let result = match &failed {
                Some(f) => Err(f.clone()),
                None => db.compact().map(|_| ()).map_err(|e| e.to_string()),
            };
            let _ = first.1.send(result);
            continue;
        }
        let mut batch = vec![first];
        let mut carried = None;
        while batch.len() < DB_BATCH {
            match rx.try_recv() {
                Ok(r) if matches!(r.0, DbOp::Compact) => {
                    carried = Some(r);
                    break;
                }
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        if failed.is_none() {
            let result = (|| -> Result<(), redb::Error> {
                let mut txn = db.begin_write()?;
                if !durable {
                    txn.set_durability(redb::Durability::None)
                        .map_err(|e| redb::Error::Corrupted(e.to_string()))?;
                }
                {
                    let mut table = txn.open_table(LEASES)?;
                    for (op, _) in &batch {
                        match op {
                            DbOp::Put { id, ttl } => {
                                table.insert(id, ttl)?;
                            }
                            DbOp::Remove(ids) => {
                                for id in ids {
                                    table.remove(id)?;
                                }
                            }
                            // Never batched: carried out on its own, below.
                            DbOp::Compact => {}
                        }
                    }
                }
                txn.commit()?;
                Ok(())
            })();
            if let Err(e) = result {
                tracing::error!(error = %e, "lease records commit failed; the store is now fail-stop");
                failed = Some(e.to_string());
            }
        }
        for (_, done) in batch {
            let _ = done.send(failed.clone().map_or(Ok(()), Err));
        }
        if let Some((_, done)) = carried {
            let result = match &failed {
                Some(f) => Err(f.clone()),
                None => db.compact().map(|_| ()).map_err(|e| e.to_string()),
            };
            let _ = done.send(result);
        }
    }
}

/// Writes `records` (id, granted TTL) as the lease records file of `dir`, durably (a restore
/// into a fresh data directory).
pub(crate) fn write_records(dir: &Path, records: &[(i64, i64)]) -> Result<(), StoreError> {
    let path = dir.join(LEASES_FILE);
    let err = |e: &dyn std::fmt::Display| StoreError::LeaseFile {
        path: path.display().to_string(),
        message: e.to_string(),
    };
    let db = event_log::files::open_or_create_redb(&redb::Database::builder(), &path)
        .map_err(|e| err(&e))?;
    let txn = db.begin_write().map_err(|e| err(&e))?;
    {
        let mut table = txn.open_table(LEASES).map_err(|e| err(&e))?;
        for (id, ttl) in records {
            table.insert(id, ttl).map_err(|e| err(&e))?;
        }
    }
    txn.commit().map_err(|e| err(&e))
}

/// The lease state of a store: lessor, records file, and what wakes the expiry task.
pub(super) struct Leases {
    lessor: parking_lot::Mutex<Lessor>,
    db: LeaseDb,
    /// Signalled when a deadline earlier than the timer's first may have been added.
    wake: Notify,
    min_ttl: i64,
    max_leases: usize,
    /// Set by `close`; the expiry task ends when it changes (or when its sender drops).
    stop: watch::Sender<bool>,
}

impl std::fmt::Debug for Leases {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Leases")
            .field("count", &self.lessor.lock().leases.len())
            .finish_non_exhaustive()
    }
}

impl Leases {
    /// Opens the records file in `dir` and loads every lease with a full TTL from now (see
    /// the module docs on restart).
    pub(super) fn open(
        dir: &Path,
        durable: bool,
        min_ttl: i64,
        max_leases: usize,
    ) -> Result<Leases, StoreError> {
        let (db, records) = LeaseDb::open(dir, durable)?;
        let mut lessor = Lessor::default();
        let now = Instant::now();
        for (id, ttl) in records {
            lessor.insert(id, ttl, now);
        }
        Ok(Leases {
            lessor: parking_lot::Mutex::new(lessor),
            db,
            wake: Notify::new(),
            min_ttl,
            max_leases,
            stop: watch::channel(false).0,
        })
    }

    /// True if `id` is a live lease (keys may attach to it).
    pub(super) fn exists(&self, id: i64) -> bool {
        self.lessor.lock().leases.contains_key(&id)
    }

    pub(super) fn count(&self) -> usize {
        self.lessor.lock().leases.len()
    }

    /// Runs `f` (which makes the store a mirror) only if no lease exists or is being granted,
    /// under the lessor lock: a grant checks for a mirror under the same lock, so no lease
    /// can appear in a mirror (where nothing local may write, nor expire).
    pub(super) fn if_empty(&self, f: impl FnOnce()) -> Result<(), StoreError> {
        let l = self.lessor.lock();
        let n = l.leases.len() + l.pending.len();
        if n > 0 {
            return Err(StoreError::Inconsistent(format!(
                "the data directory holds {n} lease(s) of a standalone store; a mirror needs a \
                 fresh data directory"
            )));
        }
        f();
        Ok(())
    }

    /// Tells the expiry task to end; it finishes the batch it is revoking, if any. The records
    /// file stays open until [`Leases::close_db`].
    pub(super) fn stop(&self) {
        self.stop.send_replace(true);
    }

    pub(super) fn close_db(&self) {
        self.db.close();
    }

    /// Reclaims the records file's free space (on its writer thread, between commits).
    pub(super) async fn defragment(&self) -> Result<(), StoreError> {
        self.db.queue(DbOp::Compact)?.wait().await
    }

    /// Every live lease as (id, granted TTL), in ID order.
    pub(super) fn records(&self) -> Vec<(i64, i64)> {
        let mut out: Vec<(i64, i64)> = self
            .lessor
            .lock()
            .leases
            .iter()
            .map(|(id, l)| (*id, l.ttl))
            .collect();
        out.sort_unstable();
        out
    }
}

impl Store {
    /// Grants a lease of `ttl` seconds with ID `id` (0: the store chooses one). A TTL below
    /// the minimum ([`crate::StoreConfig::min_lease_ttl`]) is raised to it. The grant is
    /// durable (fsynced) before this returns.
    ///
    /// Errors: [`StoreError::LeaseTtlTooLarge`] above [`MAX_LEASE_TTL`],
    /// [`StoreError::LeaseExists`] for an ID in use, [`StoreError::TooManyLeases`] at
    /// [`crate::StoreConfig::max_leases`].
    pub async fn lease_grant(&self, id: i64, ttl: i64) -> Result<LeaseGrant, StoreError> {
        self.check_open()?;
        self.admit_grant()?;
        if ttl > MAX_LEASE_TTL {
            return Err(StoreError::LeaseTtlTooLarge {
                ttl,
                max: MAX_LEASE_TTL,
            });
        }
        let leases = &self.inner.leases;
        let ttl = ttl.max(leases.min_ttl);
        let (id, done) = {
            let mut l = leases.lessor.lock();
            // Under the lessor lock: see `Leases::if_empty`.
            self.check_writable()?;
            if id != 0 && l.taken(id) {
                return Err(StoreError::LeaseExists { lease: id });
            }
            if l.leases.len() + l.pending.len() >= leases.max_leases {
                return Err(StoreError::TooManyLeases {
                    limit: leases.max_leases,
                });
            }
            let id = if id == 0 { l.new_id() } else { id };
            // Queued under the lock, as a revoke's Remove is: see `LeaseDb::queue`.
            let done = leases.db.queue(DbOp::Put { id, ttl })?;
            l.pending.insert(id);
            (id, done)
        };
        let stored = done.wait().await;
        let earliest = {
            let mut l = leases.lessor.lock();
            l.pending.remove(&id);
            stored.is_ok() && {
                let now = Instant::now();
                let deadline = now + ttl_duration(ttl);
                let earliest = l.timer.first().is_none_or(|&(first, _)| deadline < first);
                l.insert(id, ttl, now);
                earliest
            }
        };
        if let Err(e) = stored {
            self.fail(&e);
            return Err(e);
        }
        // The expiry task sleeps until the timer's first deadline: only an earlier one needs
        // to wake it (a later one is seen when it next looks).
        if earliest {
            leases.wake.notify_one();
        }
        Ok(LeaseGrant {
            id,
            ttl,
            revision: self.durable_revision(),
        })
    }

    /// Revokes lease `id`: deletes every key attached to it in one revision (none when it has
    /// no keys) and returns the revision of that delete (or the current revision). Completes
    /// even if the caller stops waiting. Fails with [`StoreError::LeaseNotFound`] for an
    /// unknown lease.
    pub async fn lease_revoke(&self, id: i64) -> Result<Revision, StoreError> {
        self.check_not_corrupt()?;
        let store = self.clone();
        // Spawned so a caller that goes away (a gRPC client disconnecting) cannot stop it
        // halfway; halfway is still safe (orphans are removed at open), but needless.
        tokio::spawn(async move {
            let guard = store.inner.write_lock.lock().await;
            store.check_open()?;
            store.check_writable()?;
            let done = {
                let mut l = store.inner.leases.lessor.lock();
                let Some(lease) = l.remove(id) else {
                    return Err(StoreError::LeaseNotFound { lease: id });
                };
                l.revoking.insert(id, lease.ttl);
                // Queued before the lock is released: a grant reusing `id` can only take it
                // after this, so its Put is committed after this Remove (see `LeaseDb::queue`).
                store.inner.leases.db.queue(DbOp::Remove(vec![id]))
            };
            let result = match done {
                Ok(done) => store.revoke_locked(&guard, vec![id], done).await,
                Err(e) => Err(e),
            };
            drop(guard);
            let result = match result {
                Ok(revision) => store.wait_durable(revision).await.map(|()| revision),
                Err(e) => Err(e),
            };
            // Acknowledged (or failed): keep-alives from now on see the lease gone.
            store.inner.leases.lessor.lock().revoking.remove(&id);
            result
        })
        .await
        .map_err(|e| StoreError::Inconsistent(format!("revoke task failed: {e}")))?
    }

    /// Renews lease `id` for its granted TTL from now and returns that TTL in seconds. Fails
    /// with [`StoreError::LeaseNotFound`] for an unknown lease or one whose deadline has
    /// passed (its revoke is under way): the gRPC service then answers TTL 0, as etcd does for
    /// an expired lease, possibly before the expiry task has deleted the lease's keys.
    pub fn lease_keep_alive(&self, id: i64) -> Result<i64, StoreError> {
        self.check_open()?;
        let now = Instant::now();
        let mut l = self.inner.leases.lessor.lock();
        let Some(lease) = l.leases.get_mut(&id) else {
            // A revoke under way but not acknowledged: the lease is still live for this
            // keep-alive (see `Lessor::revoking`); renewing it would be moot.
            return match l.revoking.get(&id) {
                Some(&ttl) => Ok(ttl),
                None => Err(StoreError::LeaseNotFound { lease: id }),
            };
        };
        if lease.deadline <= now {
            return Err(StoreError::LeaseNotFound { lease: id });
        }
        let old = lease.deadline;
        lease.deadline = now + ttl_duration(lease.ttl);
        let (new, ttl) = (lease.deadline, lease.ttl);
        l.timer.remove(&(old, id));
        l.timer.insert((new, id));
        Ok(ttl)
    }

    /// Reports lease `id`'s remaining and granted TTL and, with `keys`, its keys. Fails with
    /// [`StoreError::LeaseNotFound`] for an unknown lease.
    pub async fn lease_time_to_live(
        &self,
        id: i64,
        keys: bool,
    ) -> Result<LeaseTimeToLive, StoreError> {
        self.check_closed()?;
        let (granted_ttl, deadline) = {
            let l = self.inner.leases.lessor.lock();
            let lease = l
                .leases
                .get(&id)
                .ok_or(StoreError::LeaseNotFound { lease: id })?;
            (lease.ttl, lease.deadline)
        };
        let remaining = deadline.saturating_duration_since(Instant::now()).as_secs();
        let (revision, keys) = {
            let st = self.inner.state.read();
            let keys = match (keys, st.leased.get(&id)) {
                (true, Some(k)) => k.iter().cloned().collect(),
                _ => Vec::new(),
            };
            (st.revision, keys)
        };
        self.wait_durable(revision).await?;
        Ok(LeaseTimeToLive {
            id,
            ttl: i64::try_from(remaining).unwrap_or(i64::MAX),
            granted_ttl,
            keys,
            revision,
        })
    }

    /// Every live lease ID, in ascending order.
    pub fn leases(&self) -> Result<Vec<i64>, StoreError> {
        self.check_closed()?;
        let mut ids: Vec<i64> = self
            .inner
            .leases
            .lessor
            .lock()
            .leases
            .keys()
            .copied()
            .collect();
        ids.sort_unstable();
        Ok(ids)
    }

    /// Number of live leases.
    pub fn lease_count(&self) -> usize {
        self.inner.leases.count()
    }

    /// Marks the store failed (fail-stop) after a lease records or state checkpoint commit
    /// failed. A closed store
    /// (the writer is gone because of `close`) is not a failure.
    pub(crate) fn fail(&self, e: &StoreError) {
        if matches!(e, StoreError::Closed) {
            return;
        }
        self.inner.durable_tx.send_modify(|d| {
            d.failed.get_or_insert_with(|| e.to_string());
        });
    }

    /// Waits until the removal of the records of `ids` (`removed`, queued when they left the
    /// lessor) is durable, then deletes each lease's keys in one revision per lease. The
    /// caller holds the write lock. Returns the last revision written (the current revision
    /// when no lease had keys); not yet durable.
    async fn revoke_locked(
        &self,
        write: &WriteGuard<'_>,
        ids: Vec<i64>,
        removed: DbDone,
    ) -> Result<Revision, StoreError> {
        if let Err(e) = removed.wait().await {
            self.fail(&e);
            return Err(e);
        }
        let mut last = self.current_revision();
        for id in ids {
            let deletes = {
                let st = self.inner.state.read();
                st.leased.get(&id).map(|keys| {
                    let rev = st.revision + 1;
                    let events = keys
                        .iter()
                        .filter_map(|k| st.map.get(k))
                        .map(|kv| Event::delete(kv.key.clone(), rev, Some(kv.clone())))
                        .collect();
                    ChangeSet::new(rev, events)
                })
            };
            if let Some(cs) = deletes {
                last = self.commit(write, cs, KvState::apply).await?;
            }
        }
        Ok(last)
    }

    /// At open: deletes every key attached to a lease that has no record (left by a revoke
    /// interrupted by a crash; see the module docs), one revision per such lease, exactly as
    /// the interrupted revoke would have.
    pub(super) async fn remove_orphans(&self) -> Result<(), StoreError> {
        let guard = self.inner.write_lock.lock().await;
        let mut orphans: Vec<i64> = {
            let st = self.inner.state.read();
            let leases = self.inner.leases.lessor.lock();
            st.leased
                .keys()
                .copied()
                .filter(|id| !leases.leases.contains_key(id))
                .collect()
        };
        if orphans.is_empty() {
            return Ok(());
        }
        orphans.sort_unstable();
        tracing::warn!(
            leases = orphans.len(),
            "deleting the keys of leases revoked just before a crash"
        );
        // Their records are already gone: removing them again is a no-op commit.
        let removed = self.inner.leases.db.queue(DbOp::Remove(orphans.clone()))?;
        let revision = self.revoke_locked(&guard, orphans, removed).await?;
        drop(guard);
        self.wait_durable(revision).await
    }

    /// At open: starts the expiry task (see [`expiry_loop`]).
    pub(super) fn spawn_expiry(&self) -> tokio::task::JoinHandle<()> {
        let weak = Arc::downgrade(&self.inner);
        let stop = self.inner.leases.stop.subscribe();
        tokio::spawn(expiry_loop(weak, self.inner.leases.clone(), stop))
    }

    /// Revokes up to [`EXPIRY_BATCH`] leases whose deadline has passed. Returns how many.
    async fn expire_due(&self) -> Result<usize, StoreError> {
        let guard = self.inner.write_lock.lock().await;
        self.check_open()?;
        // A mirror holds no lease (`Leases::if_empty`); nothing local may write in one anyway.
        self.check_writable()?;
        let now = Instant::now();
        let (ids, removed) = {
            let mut l = self.inner.leases.lessor.lock();
            let mut ids = Vec::new();
            while ids.len() < EXPIRY_BATCH {
                match l.timer.first() {
                    Some(&(deadline, id)) if deadline <= now => {
                        l.remove(id);
                        ids.push(id);
                    }
                    _ => break,
                }
            }
            if ids.is_empty() {
                return Ok(0);
            }
            // Queued under the lock: see `lease_revoke`.
            let removed = self.inner.leases.db.queue(DbOp::Remove(ids.clone()))?;
            (ids, removed)
        };
        let n = ids.len();
        self.revoke_locked(&guard, ids, removed).await?;
        drop(guard);
        Ok(n)
    }
}

/// The one expiry task of a store: sleeps until the earliest deadline (or until a grant may
/// have added an earlier one), then revokes what is due. Holds the store only weakly while it
/// sleeps; dropping the store (or `close`) stops it through `Leases::stop`.
async fn expiry_loop(inner: Weak<Inner>, leases: Arc<Leases>, mut stop: watch::Receiver<bool>) {
    loop {
        let next = leases
            .lessor
            .lock()
            .timer
            .first()
            .map(|&(deadline, _)| deadline);
        let sleep = async {
            match next {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = stop.changed() => return,
            _ = leases.wake.notified() => continue,
            _ = sleep => {}
        }
        let Some(strong) = inner.upgrade() else {
            return;
        };
        let store = Store { inner: strong };
        if let Err(e) = store.expire_due().await {
            if !matches!(e, StoreError::Closed | StoreError::MirrorReadOnly) {
                tracing::error!(error = %e, "lease expiry stopped");
            }
            return;
        }
    }
}

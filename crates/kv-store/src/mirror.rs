//! Store hooks for mirror mode (watch-server's `mirror` module drives them): the store replicates an upstream etcd's
//! keyspace (or some prefixes of it) under **etcd's own revision numbers**.
//!
//! - [`Store::mirror_apply`] appends one upstream revision as one change set through the normal
//!   write path (event log, state, publisher), so durability, ordering and read-your-writes are
//!   the ones of a local write. Revisions only have to increase: a mirror's revisions have gaps
//!   (revisions of keys outside the mirrored prefixes), which the event log, the state and the
//!   watch engine all accept. A change set with no events records progress: the upstream is
//!   known complete through that revision, and it survives a restart like any revision.
//! - [`Store::mirror_reset`] replaces the whole state with a fresh upstream snapshot at `R`
//!   (first start, or the upstream compacted past the mirror's position). Revisions `<= R`
//!   were never mirrored event by event, so the *floor* `R + 1` is persisted in
//!   [`MIRROR_FLOOR_FILE`] and acts as the compaction revision: reads and watches below it fail
//!   with etcd's compacted error; every live watcher is canceled as compacted at the floor,
//!   as etcd cancels a watcher whose history was compacted, never a silent gap.
//!
//!   [`Store::mirror_snapshot`] does the same page by page ([`MirrorSnapshot`]): each page
//!   goes into the state being built, so the snapshot is never held whole twice (the state
//!   itself is in memory, as for every store).
//!
//! Crash order of a reset: floor file (tmp + fsync + rename + dir fsync), then the whole
//! persisted state replaced by the snapshot at `R` (one fsynced transaction of
//! [`crate::STATE_FILE`], written row by row from the new state), then an empty change set at
//! `R` through the log. A crash between any two steps reopens a consistent store: a floor
//! above the state only refuses more history than necessary, and a persisted state newer than
//! the log is loaded and the log replay skips
//! everything at or below it.
//!
//! Once [`Store::set_mirror`] is called, local writes fail with
//! [`StoreError::MirrorReadOnly`] (they go to the upstream) and watches outside the scope
//! fail with [`StoreError::OutsideMirror`].

use std::path::Path;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use watch_core::{CancelReason, ChangeSet, KeySelector, KeyValue, Revision};

use super::{KeyRange, KvState, Store, log_err};
use crate::StoreError;

/// File of the data directory holding a mirror's floor (decimal revision): history below it
/// was never mirrored.
pub const MIRROR_FLOOR_FILE: &str = "mirror.floor";

/// The keys a mirror replicates: a set of prefixes, or the whole keyspace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MirrorScope {
    /// Sorted, one per prefix; empty means the whole keyspace.
    prefixes: Vec<Bytes>,
}

impl MirrorScope {
    /// The scope of `prefixes`; no prefix (or an empty one) is the whole keyspace.
    pub fn new(prefixes: impl IntoIterator<Item = Bytes>) -> Self {
        let mut prefixes: Vec<Bytes> = prefixes.into_iter().collect();
        if prefixes.iter().any(|p| p.is_empty()) {
            prefixes.clear();
        }
        prefixes.sort();
        prefixes.dedup();
        Self { prefixes }
    }

    /// True when the whole keyspace is mirrored.
    pub fn is_all(&self) -> bool {
        self.prefixes.is_empty()
    }

    /// The mirrored prefixes (empty: the whole keyspace).
    pub fn prefixes(&self) -> &[Bytes] {
        &self.prefixes
    }

    /// The prefixes as etcd ranges (one `all` range for the whole keyspace).
    pub fn ranges(&self) -> Vec<KeyRange> {
        if self.is_all() {
            return vec![KeyRange::all()];
        }
        self.prefixes
            .iter()
            .cloned()
            .map(KeyRange::prefix)
            .collect()
    }

    /// True if `key` is mirrored.
    pub fn contains_key(&self, key: &[u8]) -> bool {
        self.is_all() || self.prefixes.iter().any(|p| key.starts_with(p))
    }

    /// True if every key of `[start, end)` (`end` `None`: unbounded) lies inside one mirrored
    /// prefix, so the mirror alone can answer for it.
    pub fn covers(&self, start: &[u8], end: Option<&[u8]>) -> bool {
        if self.is_all() {
            return true;
        }
        self.prefixes.iter().any(|p| {
            if !start.starts_with(p) {
                return false;
            }
            match (watch_core::prefix_end(p), end) {
                (None, _) => true,
                (Some(_), None) => false,
                (Some(pe), Some(e)) => e <= pe.as_slice(),
            }
        })
    }

    /// [`MirrorScope::covers`] for an etcd range; a range selecting nothing is covered.
    pub fn covers_range(&self, range: &KeyRange) -> bool {
        match range.interval() {
            None => true,
            Some((start, end)) => self.covers(&start, end.as_deref()),
        }
    }

    /// True if some key of `range` may be mirrored.
    pub fn intersects_range(&self, range: &KeyRange) -> bool {
        let Some((start, end)) = range.interval() else {
            return false;
        };
        self.ranges().iter().any(|r| match r.interval() {
            None => false,
            Some((s, e)) => {
                let below_end = e.as_ref().is_none_or(|e| start < *e);
                let above_start = end.as_ref().is_none_or(|end| s < *end);
                below_end && above_start
            }
        })
    }

    /// The smallest single etcd range holding every mirrored key (what one upstream watch
    /// covers; events outside the prefixes are filtered out).
    pub fn covering(&self) -> KeyRange {
        let ranges = self.ranges();
        let mut start: Option<Bytes> = None;
        let mut end: Option<Option<Bytes>> = None;
        for r in &ranges {
            let Some((s, e)) = r.interval() else { continue };
            start = Some(match start {
                Some(cur) if cur <= s => cur,
                _ => s,
            });
            end = Some(match (end, e) {
                (None, e) => e,
                (Some(None), _) | (_, None) => None,
                (Some(Some(cur)), Some(e)) => Some(cur.max(e)),
            });
        }
        match (start, end) {
            (Some(s), Some(Some(e))) => KeyRange::new(s, e),
            (Some(s), _) => KeyRange::from_key(s),
            _ => KeyRange::all(),
        }
    }
}

impl std::fmt::Display for MirrorScope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.is_all() {
            return f.write_str("(whole keyspace)");
        }
        let shown: Vec<String> = self
            .prefixes
            .iter()
            .map(|p| format!("{:?}", String::from_utf8_lossy(p)))
            .collect();
        f.write_str(&shown.join(", "))
    }
}

/// The persisted floor of `dir` (0 when there is none).
pub(super) fn load_floor(dir: &Path) -> Result<Revision, StoreError> {
    let path = dir.join(MIRROR_FLOOR_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => text.trim().parse().map_err(|e| {
            StoreError::Inconsistent(format!("{}: not a revision: {e}", path.display()))
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(StoreError::Snapshot {
            path: path.display().to_string(),
            message: e.to_string(),
        }),
    }
}

fn write_floor(dir: &Path, floor: Revision) -> Result<(), StoreError> {
    let path = dir.join(MIRROR_FLOOR_FILE);
    event_log::files::replace_file(&path, format!("{floor}\n").as_bytes()).map_err(|e| {
        StoreError::Snapshot {
            path: path.display().to_string(),
            message: e.to_string(),
        }
    })
}

impl Store {
    /// Makes this store a mirror of `scope` (see the module docs). Once only: a second call
    /// with another scope fails with [`StoreError::Inconsistent`], and so does a call on a
    /// store holding leases (a mirror must not grant, revoke or expire leases of its own).
    pub fn set_mirror(&self, scope: MirrorScope) -> Result<(), StoreError> {
        if self.inner.mirror.get().is_none() {
            self.inner.leases.if_empty(|| {
                let _ = self.inner.mirror.set(scope.clone());
            })?;
        }
        let set = self.inner.mirror.get_or_init(|| scope.clone());
        if *set != scope {
            return Err(StoreError::Inconsistent(format!(
                "the store already mirrors {set}, not {scope}"
            )));
        }
        Ok(())
    }

    /// The mirrored scope when this store is a mirror.
    pub fn mirror_scope(&self) -> Option<&MirrorScope> {
        self.inner.mirror.get()
    }

    pub(super) fn check_writable(&self) -> Result<(), StoreError> {
        match self.inner.mirror.get() {
            Some(_) => Err(StoreError::MirrorReadOnly),
            None => Ok(()),
        }
    }

    pub(super) fn check_mirror_watch(&self, selector: &KeySelector) -> Result<(), StoreError> {
        let Some(scope) = self.inner.mirror.get() else {
            return Ok(());
        };
        let (start, end) = selector.bounds();
        if scope.covers(&start, end.as_deref()) {
            Ok(())
        } else {
            Err(StoreError::OutsideMirror {
                scope: scope.to_string(),
            })
        }
    }

    /// Waits until `revision` is durable and published to watchers.
    pub async fn wait_revision(&self, revision: Revision) -> Result<(), StoreError> {
        self.wait_durable(revision).await
    }

    /// Appends one upstream revision (`cs.revision` is the upstream's number; it must be above
    /// the current revision, gaps allowed) through the write path. Each event's `prev_kv` is
    /// recomputed from the mirrored state, so watch `prev_kv` and past reads never depend on
    /// what the upstream sent. Returns once the change set is queued and applied to the
    /// state; [`Store::wait_revision`] waits for its durability.
    pub async fn mirror_apply(&self, mut cs: ChangeSet) -> Result<(), StoreError> {
        let guard = self.inner.write_lock.lock().await;
        self.check_open()?;
        let current = self.current_revision();
        if cs.revision <= current {
            return Err(StoreError::MirrorOrder {
                revision: cs.revision,
                current,
            });
        }
        {
            let st = self.inner.state.read();
            for e in &mut cs.events {
                let local = st.map.get(&e.kv.key).cloned();
                // etcd sends `prev_kv` when it still has the previous version (it omits it
                // when that version was compacted): one it sent must be the mirror's state,
                // or the mirror missed or misapplied a revision (checked here for free: the
                // upstream watch asks for `prev_kv` anyway).
                if let Some(up) = &e.prev_kv
                    && local.as_ref() != Some(up)
                {
                    let summary = |kv: Option<&KeyValue>| match kv {
                        Some(kv) => format!(
                            "(mod {}, version {}, {} bytes)",
                            kv.mod_revision,
                            kv.version,
                            kv.value.len()
                        ),
                        None => "none".to_owned(),
                    };
                    return Err(StoreError::MirrorDiverged {
                        revision: cs.revision,
                        key: String::from_utf8_lossy(&e.kv.key).into_owned(),
                        upstream: summary(Some(up)),
                        local: summary(local.as_ref()),
                    });
                }
                e.prev_kv = local;
            }
        }
        self.commit(&guard, cs, KvState::apply).await?;
        drop(guard);
        Ok(())
    }

    /// Drops the mirror's own history below `revision` (its retention; the upstream is not
    /// touched): as [`Store::compact`], which a mirror refuses because `Compact` requests go
    /// to the upstream.
    pub async fn mirror_compact(&self, revision: Revision) -> Result<Revision, StoreError> {
        self.compact_history(revision).await
    }

    /// Replaces the state with the upstream snapshot `kvs` at `revision` (see the module docs)
    /// and returns how many live watchers were canceled as compacted. `revision` must not be
    /// below the current revision. One page: [`Store::mirror_snapshot`] with one
    /// [`MirrorSnapshot::push`].
    pub async fn mirror_reset(
        &self,
        revision: Revision,
        kvs: Vec<KeyValue>,
    ) -> Result<usize, StoreError> {
        let mut snap = self.mirror_snapshot(revision).await?;
        snap.push(kvs).await?;
        snap.install().await
    }

    /// Starts loading an upstream snapshot at `revision` page by page (see
    /// [`MirrorSnapshot`]). `revision` must not be below the current revision.
    pub async fn mirror_snapshot(&self, revision: Revision) -> Result<MirrorSnapshot, StoreError> {
        self.check_open()?;
        let current = self.current_revision();
        if revision < current {
            return Err(StoreError::MirrorOrder { revision, current });
        }
        Ok(MirrorSnapshot {
            store: self.clone(),
            revision,
            state: KvState::default(),
        })
    }
}

/// An upstream snapshot being loaded page by page ([`Store::mirror_snapshot`], then
/// [`push`](Self::push) per page, then [`install`](Self::install)), so a keyspace of any
/// size is never held twice: each page goes into the state being built (which becomes the
/// store's state, sharing the pages' bytes), then is dropped; `install` writes the persisted
/// state row by row from it. Memory beyond the final state is one page (and, during a
/// resync, the old state, which the store still serves until the install). Nothing is
/// visible to readers, watchers or a restart before `install`; dropping it abandons the load.
#[derive(Debug)]
pub struct MirrorSnapshot {
    store: Store,
    revision: Revision,
    /// The new state, built off the store's lock.
    state: KvState,
}

impl MirrorSnapshot {
    /// The snapshot's revision.
    pub fn revision(&self) -> Revision {
        self.revision
    }

    /// Keys loaded so far.
    pub fn keys(&self) -> usize {
        self.state.map.len()
    }

    /// Adds one page of keys (a key given twice keeps the later one).
    pub async fn push(&mut self, page: Vec<KeyValue>) -> Result<(), StoreError> {
        for kv in page {
            self.state.map.insert(kv.key.clone(), kv);
        }
        Ok(())
    }

    /// Makes the loaded snapshot the store's state at its revision (see the module docs) and
    /// returns how many live watchers were canceled as compacted.
    pub async fn install(self) -> Result<usize, StoreError> {
        let (store, revision) = (self.store, self.revision);
        let mut new = self.state;
        new.revision = revision;
        new.index_leases();
        let inner = &store.inner;
        let _c = inner.compact_lock.lock().await;
        let guard = inner.write_lock.lock().await;
        store.check_open()?;
        let current = store.current_revision();
        if revision < current {
            return Err(StoreError::MirrorOrder { revision, current });
        }
        store.wait_durable(current).await?;
        let floor = revision + 1;
        let dir = inner.dir.clone();
        let db = inner.state_db.clone();
        // The state goes to the blocking thread and comes back: written row by row, never
        // copied whole.
        let mut new = tokio::task::spawn_blocking(move || {
            write_floor(&dir, floor)?;
            db.replace(revision, new.map.values().cloned())?;
            Ok::<_, StoreError>(new)
        })
        .await
        .map_err(|e| StoreError::Inconsistent(format!("snapshot task failed: {e}")))??;
        inner.checkpoint_revision.store(revision, Ordering::Release);
        // Before the state changes: a read of an older revision now fails as compacted.
        inner.compacted.fetch_max(floor, Ordering::AcqRel);
        // Every live watcher ends before the marker at `revision` can reach the dispatcher:
        // once it is dispatched, a progress request or tick would tell a watcher that nothing
        // changed up to `revision` while it never saw the snapshot's difference. The floor is
        // raised first, so a watcher registering after this cancel refuses itself
        // ([`Store::watch`]); the write lock keeps the marker from being published until then.
        inner.mirror_floor.fetch_max(floor, Ordering::AcqRel);
        let canceled = inner.engine.cancel_all(CancelReason::Compacted {
            compact_revision: floor,
        });
        // One state-lock section, an O(1) swap: no reader sees the new keys at the old
        // revision. The old state is dropped after the lock is released.
        let mut old = None;
        {
            let mut install = |st: &mut KvState| {
                new.revision = st.revision.max(revision);
                old = Some(std::mem::replace(st, std::mem::take(&mut new)));
            };
            if revision > current {
                // The marker: an empty change set at `revision`, so the log (and a restart)
                // and the watchers' progress reach it.
                let marker = ChangeSet::new(revision, Vec::new());
                store.commit(&guard, marker, |st, _| install(st)).await?;
            } else {
                install(&mut inner.state.write());
            }
        }
        drop(guard);
        drop(old);
        store.wait_durable(revision).await?;
        let log = &inner.log;
        if revision <= log.last_revision() && revision > log.compacted_revision() {
            // History below the snapshot can never be served again (the floor is above it).
            log.compact(revision).await.map_err(log_err)?;
        }
        Ok(canceled)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use watch_core::{Event, WatchMessage};

    fn scope(p: &[&str]) -> MirrorScope {
        MirrorScope::new(p.iter().map(|s| Bytes::copy_from_slice(s.as_bytes())))
    }

    #[test]
    fn scope_covers_only_ranges_inside_one_prefix() {
        let s = scope(&["/a/", "/c/"]);
        assert!(s.contains_key(b"/a/x"));
        assert!(!s.contains_key(b"/b/x"));
        assert!(s.covers_range(&KeyRange::key("/a/x")));
        assert!(s.covers_range(&KeyRange::prefix("/a/")));
        assert!(s.covers_range(&KeyRange::prefix("/a/x")));
        assert!(!s.covers_range(&KeyRange::prefix("/")));
        assert!(!s.covers_range(&KeyRange::new("/a/", "/d/")));
        assert!(!s.covers_range(&KeyRange::from_key("/a/")));
        assert!(s.intersects_range(&KeyRange::prefix("/")));
        assert!(!s.intersects_range(&KeyRange::prefix("/b/")));
        assert_eq!(s.covering(), KeyRange::new("/a/", "/c0"));
        assert!(scope(&[]).covers_range(&KeyRange::all()));
        assert!(scope(&["", "/a"]).is_all());
        assert_eq!(scope(&[]).covering(), KeyRange::all());
    }

    fn kv(key: &str, value: &str, create: Revision, m: Revision, version: u64) -> KeyValue {
        KeyValue {
            key: Bytes::copy_from_slice(key.as_bytes()),
            create_revision: create,
            mod_revision: m,
            version,
            value: Bytes::copy_from_slice(value.as_bytes()),
            lease: 0,
        }
    }

    fn put(key: &str, value: &str, create: Revision, m: Revision, version: u64) -> Event {
        Event::put(kv(key, value, create, m, version), None)
    }

    async fn open(dir: &Path) -> Store {
        let s = Store::open(
            dir,
            crate::StoreConfig::default().durability(crate::Durability::NoSync),
        )
        .await
        .unwrap();
        s.set_mirror(scope(&["/a/"])).unwrap();
        s
    }

    async fn next(h: &mut watch_core::WatchHandle) -> WatchMessage {
        tokio::time::timeout(std::time::Duration::from_secs(10), h.recv())
            .await
            .expect("a watch message")
            .expect("the watch is open")
    }

    /// Upstream revisions with gaps and empty (progress) change sets are applied under their
    /// own numbers, watchers see them in order with prev_kv from the mirrored state, and a
    /// reopened store is at the last revision, progress included.
    #[tokio::test]
    async fn gaps_progress_and_restart() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path()).await;
        store
            .mirror_reset(10, vec![kv("/a/x", "0", 7, 7, 1)])
            .await
            .unwrap();
        assert_eq!(store.current_revision(), 10);
        let mut w = store
            .watch(
                KeySelector::prefix("/a/"),
                watch_core::WatchOptions::default().prev_kv(true),
            )
            .unwrap();
        store
            .mirror_apply(ChangeSet::new(13, vec![put("/a/x", "1", 7, 13, 2)]))
            .await
            .unwrap();
        store
            .mirror_apply(ChangeSet::new(20, Vec::new()))
            .await
            .unwrap();
        store
            .mirror_apply(ChangeSet::new(
                25,
                vec![
                    Event::delete(Bytes::from_static(b"/a/x"), 25, None),
                    put("/a/y", "2", 25, 25, 1),
                ],
            ))
            .await
            .unwrap();
        store.wait_revision(25).await.unwrap();
        let WatchMessage::Events(b) = next(&mut w).await else {
            panic!("events expected")
        };
        assert_eq!(b.revision(), 13);
        let e = b.to_events();
        assert_eq!(
            e[0].prev_kv.as_ref().map(|p| p.value.clone()),
            Some("0".into())
        );
        let WatchMessage::Events(b) = next(&mut w).await else {
            panic!("events expected")
        };
        assert_eq!(
            (b.revision(), b.len()),
            (25, 2),
            "one revision, one message"
        );
        // A prev_kv that is not the mirror's state: refused as diverged, nothing applied.
        let err = store
            .mirror_apply(ChangeSet::new(
                26,
                vec![Event::put(
                    kv("/a/y", "3", 25, 26, 2),
                    Some(kv("/a/y", "other", 25, 25, 1)),
                )],
            ))
            .await
            .unwrap_err();
        assert!(
            matches!(err, StoreError::MirrorDiverged { revision: 26, .. }),
            "{err}"
        );
        assert_eq!(store.current_revision(), 25);
        // The right prev_kv is accepted.
        store
            .mirror_apply(ChangeSet::new(
                26,
                vec![Event::put(
                    kv("/a/y", "3", 25, 26, 2),
                    Some(kv("/a/y", "2", 25, 25, 1)),
                )],
            ))
            .await
            .unwrap();
        store.wait_revision(26).await.unwrap();
        // Not increasing: refused, nothing applied.
        let err = store
            .mirror_apply(ChangeSet::new(25, Vec::new()))
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::MirrorOrder { .. }), "{err}");
        // Local writes are refused; watches outside the scope too.
        assert!(matches!(
            store.put("/a/z", "v", Default::default()).await,
            Err(StoreError::MirrorReadOnly)
        ));
        assert!(matches!(
            store.watch(KeySelector::prefix("/"), Default::default()),
            Err(StoreError::OutsideMirror { .. })
        ));
        // A past read inside the mirrored history, and below the floor.
        let at20 = store
            .range(crate::RangeRequest::key("/a/x").revision(20))
            .await
            .unwrap();
        assert_eq!(at20.kvs[0].value, "1");
        assert!(matches!(
            store
                .range(crate::RangeRequest::key("/a/x").revision(10))
                .await,
            Err(StoreError::Compacted { compacted: 11, .. })
        ));
        drop(w);
        store.close().await.unwrap();
        drop(store);
        let store = open(dir.path()).await;
        assert_eq!(store.current_revision(), 26);
        assert_eq!(store.compacted_revision(), 11);
        let now = store.range(crate::RangeRequest::key("/a/y")).await.unwrap();
        assert_eq!((now.revision, now.kvs.len()), (26, 1));
        store.close().await.unwrap();
    }

    /// The mirror's own retention: history below the compaction is gone, the state and
    /// later revisions stay, also across a restart.
    #[tokio::test]
    async fn retention_compacts_the_mirror_only() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path()).await;
        store.mirror_reset(3, Vec::new()).await.unwrap();
        for (i, rev) in [7, 9, 15, 30].into_iter().enumerate() {
            store
                .mirror_apply(ChangeSet::new(
                    rev,
                    vec![put("/a/x", &i.to_string(), 7, rev, i as u64 + 1)],
                ))
                .await
                .unwrap();
        }
        store.wait_revision(30).await.unwrap();
        store.mirror_compact(12).await.unwrap();
        assert!(matches!(
            store
                .range(crate::RangeRequest::key("/a/x").revision(9))
                .await,
            Err(StoreError::Compacted { compacted: 12, .. })
        ));
        let at12 = store
            .range(crate::RangeRequest::key("/a/x").revision(12))
            .await
            .unwrap();
        assert_eq!(at12.kvs[0].value, "1");
        store.close().await.unwrap();
        drop(store);
        let store = open(dir.path()).await;
        assert_eq!(
            (store.current_revision(), store.compacted_revision()),
            (30, 12)
        );
        let now = store.range(crate::RangeRequest::key("/a/x")).await.unwrap();
        assert_eq!(now.kvs[0].value, "3");
        store.close().await.unwrap();
    }

    /// A resync must end every live watcher before its revision is dispatched: a progress
    /// answer at or above the snapshot revision would tell a watcher that nothing changed
    /// while it never saw the snapshot's differences. Progress is requested (and ticks every
    /// millisecond) throughout the reset; the watcher's stream must hold no progress at or
    /// above the old revision's successor before its cancel.
    #[tokio::test]
    async fn reset_cancels_before_any_progress_at_the_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(
            dir.path(),
            crate::StoreConfig::default()
                .durability(crate::Durability::NoSync)
                .progress_interval(std::time::Duration::from_millis(1)),
        )
        .await
        .unwrap();
        store.set_mirror(scope(&["/a/"])).unwrap();
        store.mirror_reset(1, Vec::new()).await.unwrap();
        store
            .mirror_apply(ChangeSet::new(5, vec![put("/a/x", "1", 5, 5, 1)]))
            .await
            .unwrap();
        store.wait_revision(5).await.unwrap();
        let mut w = store
            .watch(
                KeySelector::prefix("/a/"),
                watch_core::WatchOptions::default().progress_notify(true),
            )
            .unwrap();
        let done = std::sync::atomic::AtomicBool::new(false);
        let reset = async {
            let r = store
                .mirror_reset(40, vec![kv("/a/q", "9", 33, 33, 1)])
                .await;
            done.store(true, Ordering::Release);
            r
        };
        let ask = async {
            while !done.load(Ordering::Acquire) {
                w.request_progress();
                tokio::task::yield_now().await;
            }
        };
        let (canceled, ()) = tokio::join!(reset, ask);
        assert_eq!(canceled.unwrap(), 1);
        loop {
            match next(&mut w).await {
                WatchMessage::Progress { revision } => {
                    assert!(revision <= 5, "progress at {revision} before the cancel")
                }
                WatchMessage::Canceled(CancelReason::Compacted { compact_revision }) => {
                    assert_eq!(compact_revision, 41);
                    break;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        // A watcher registered after the reset starts at the snapshot revision.
        let w2 = store
            .watch(KeySelector::prefix("/a/"), Default::default())
            .unwrap();
        assert_eq!(w2.created_revision(), 40);
        store.close().await.unwrap();
    }

    /// A snapshot loaded in pages (a key repeated across pages keeps the later one) becomes
    /// the state only at `install`, leases indexed; the file written page by page is what a
    /// restart loads.
    #[tokio::test]
    async fn snapshot_in_pages_installs_at_once_and_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path()).await;
        let mut snap = store.mirror_snapshot(50).await.unwrap();
        let mut leased = kv("/a/l", "l", 9, 9, 1);
        leased.lease = 77;
        snap.push(vec![kv("/a/0", "x", 3, 3, 1), kv("/a/1", "1", 4, 4, 1)])
            .await
            .unwrap();
        snap.push(Vec::new()).await.unwrap();
        snap.push(vec![kv("/a/0", "0", 3, 8, 2), leased.clone()])
            .await
            .unwrap();
        assert_eq!((snap.revision(), snap.keys()), (50, 3));
        // Not visible before the install.
        assert_eq!(store.key_count(), 0);
        assert_eq!(store.current_revision(), 1);
        assert_eq!(snap.install().await.unwrap(), 0);
        let check = |s: &Store| {
            let st = s.inner.state.read();
            assert_eq!(st.revision, 50);
            assert_eq!(st.map.len(), 3);
            assert_eq!(st.map[&Bytes::from_static(b"/a/0")].value, "0");
            assert!(st.leased[&77].contains(&Bytes::from_static(b"/a/l")));
        };
        check(&store);
        assert_eq!(store.compacted_revision(), 51);
        store.close().await.unwrap();
        drop(store);
        let store = open(dir.path()).await;
        check(&store);
        // A snapshot below the current revision is refused before anything is written.
        assert!(matches!(
            store.mirror_snapshot(49).await,
            Err(StoreError::MirrorOrder { .. })
        ));
        store.close().await.unwrap();
    }

    /// A resync over a live store: live watchers end as compacted at the new floor, the state
    /// is the snapshot, and the floor survives a restart.
    #[tokio::test]
    async fn reset_cancels_watchers_and_persists_the_floor() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path()).await;
        store.mirror_reset(1, Vec::new()).await.unwrap();
        store
            .mirror_apply(ChangeSet::new(5, vec![put("/a/x", "1", 5, 5, 1)]))
            .await
            .unwrap();
        store.wait_revision(5).await.unwrap();
        let mut w = store
            .watch(KeySelector::prefix("/a/"), Default::default())
            .unwrap();
        let canceled = store
            .mirror_reset(40, vec![kv("/a/q", "9", 33, 33, 1)])
            .await
            .unwrap();
        assert_eq!(canceled, 1);
        match next(&mut w).await {
            WatchMessage::Canceled(CancelReason::Compacted { compact_revision }) => {
                assert_eq!(compact_revision, 41)
            }
            other => panic!("expected a compacted cancel, got {other:?}"),
        }
        let all = store
            .range(crate::RangeRequest::new(KeyRange::prefix("/a/")))
            .await
            .unwrap();
        assert_eq!(all.revision, 40);
        assert_eq!(all.kvs.len(), 1);
        assert!(matches!(
            store.watch(
                KeySelector::prefix("/a/"),
                watch_core::WatchOptions::default().start_revision(6)
            ),
            Err(StoreError::Compacted { compacted: 41, .. })
        ));
        store.close().await.unwrap();
        drop((w, store));
        let store = open(dir.path()).await;
        assert_eq!(
            (store.current_revision(), store.compacted_revision()),
            (40, 41)
        );
        assert_eq!(store.key_count(), 1);
        store.close().await.unwrap();
    }
}

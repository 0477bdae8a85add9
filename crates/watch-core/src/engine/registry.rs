//! Where watchers are found by key.
//!
//! - exact keys: one hash lookup per event key, in [`ExactIndex`];
//! - prefixes: one hash lookup per *distinct registered prefix length* not longer than the
//!   key, so the cost does not grow with the number of registered prefixes;
//! - ranges and from-key selectors: an interval treap, O(log n + matches);
//! - all-keys watchers: a list.
//!
//! Lock order: a registry lock (a dashmap shard or one of the `RwLock`s) may be held while a
//! watcher's state lock is taken, never the other way round.

use std::hash::BuildHasher;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use dashmap::DashMap;
use parking_lot::RwLock;
use smallvec::SmallVec;

use crate::engine::interval::IntervalSet;
use crate::engine::watcher::{Sel, Watcher};

type Slot = SmallVec<[Arc<Watcher>; 1]>;

/// Exact-key watchers, hashed by key into sharded `hashbrown` tables.
///
/// A `DashMap<Bytes, _>` would store each key twice (the map's `Bytes` and the watcher's, plus
/// the shared-buffer header cloning a `Bytes` allocates). Here a slot holds only the watchers and
/// its key is read from the first watcher's selector. With the compact selector and the lazily
/// allocated queue (see `watcher.rs`) this took `core_memory` from 416 to 252 bytes per idle
/// exact-key watcher (1M watchers, 2026-11-22).
pub(crate) struct ExactIndex {
    hasher: hashbrown::DefaultHashBuilder,
    shards: Box<[RwLock<hashbrown::HashTable<ExactSlot>>]>,
}

/// One watcher inline (by far the common case) or several behind one pointer: 16 bytes per
/// table entry, where a `SmallVec` slot takes 24.
#[allow(clippy::box_collection)] // the box keeps the entry at two words
enum ExactSlot {
    One(Arc<Watcher>),
    Many(Box<Vec<Arc<Watcher>>>),
}

impl ExactSlot {
    fn as_slice(&self) -> &[Arc<Watcher>] {
        match self {
            Self::One(w) => std::slice::from_ref(w),
            Self::Many(v) => v,
        }
    }

    fn push(&mut self, w: Arc<Watcher>) {
        match self {
            Self::One(first) => {
                let first = first.clone();
                let mut v = Vec::with_capacity(2);
                list_push(&mut v, first);
                list_push(&mut v, w);
                *self = Self::Many(Box::new(v));
            }
            Self::Many(v) => list_push(&mut **v, w),
        }
    }

    /// Removes watcher `w`; true when the slot is now empty.
    fn remove(&mut self, w: &Watcher) -> bool {
        match self {
            Self::One(only) => only.id == w.id,
            Self::Many(v) => {
                list_remove(&mut **v, w);
                if let [only] = v.as_slice() {
                    *self = Self::One(only.clone());
                }
                self.as_slice().is_empty()
            }
        }
    }
}

/// Independent locks, so registrations on different keys rarely contend.
const EXACT_SHARDS: usize = 64;

fn slot_key(slot: &ExactSlot) -> &[u8] {
    match slot.as_slice().first().map(|w| &w.selector) {
        Some(Sel::Key(k)) => k,
        _ => &[],
    }
}

impl Default for ExactIndex {
    fn default() -> Self {
        Self {
            hasher: hashbrown::DefaultHashBuilder::default(),
            shards: (0..EXACT_SHARDS).map(|_| RwLock::default()).collect(),
        }
    }
}

impl ExactIndex {
    fn locate(&self, key: &[u8]) -> (u64, &RwLock<hashbrown::HashTable<ExactSlot>>) {
        let hash = self.hasher.hash_one(key);
        (hash, &self.shards[(hash >> 58) as usize % EXACT_SHARDS])
    }

    fn insert(&self, key: &[u8], w: Arc<Watcher>) {
        let (hash, shard) = self.locate(key);
        let mut table = shard.write();
        let hasher = |s: &ExactSlot| self.hasher.hash_one(slot_key(s));
        match table.entry(hash, |s| slot_key(s) == key, hasher) {
            hashbrown::hash_table::Entry::Occupied(mut e) => e.get_mut().push(w),
            hashbrown::hash_table::Entry::Vacant(e) => {
                e.insert(ExactSlot::One(w));
            }
        }
    }

    fn remove(&self, key: &[u8], w: &Watcher) {
        let (hash, shard) = self.locate(key);
        let mut table = shard.write();
        if let Ok(mut e) = table.find_entry(hash, |s| slot_key(s) == key) {
            if e.get_mut().remove(w) {
                e.remove();
            }
        }
    }

    fn for_each_match(&self, key: &[u8], f: &mut impl FnMut(&Arc<Watcher>)) {
        let (hash, shard) = self.locate(key);
        if let Some(slot) = shard.read().find(hash, |s| slot_key(s) == key) {
            slot.as_slice().iter().for_each(f);
        }
    }

    fn for_each(&self, f: &mut impl FnMut(&Arc<Watcher>)) {
        for shard in self.shards.iter() {
            shard
                .read()
                .iter()
                .for_each(|s| s.as_slice().iter().for_each(&mut *f));
        }
    }
}

#[derive(Default)]
pub(crate) struct Registry {
    exact: ExactIndex,
    prefix: DashMap<Bytes, Slot>,
    /// Distinct registered prefix lengths with how many prefixes have each, sorted by length.
    prefix_lens: RwLock<Vec<(usize, usize)>>,
    intervals: RwLock<IntervalSet>,
    all: RwLock<Vec<Arc<Watcher>>>,
}

/// A list of watchers that each know their index (`Watcher::slot_pos`): the list's lock
/// is held by the caller.
trait WatcherList: std::ops::DerefMut<Target = [Arc<Watcher>]> {
    fn push_watcher(&mut self, w: Arc<Watcher>);
    fn swap_remove_at(&mut self, i: usize);
}

impl WatcherList for Vec<Arc<Watcher>> {
    fn push_watcher(&mut self, w: Arc<Watcher>) {
        self.push(w);
    }
    fn swap_remove_at(&mut self, i: usize) {
        self.swap_remove(i);
    }
}

impl WatcherList for Slot {
    fn push_watcher(&mut self, w: Arc<Watcher>) {
        self.push(w);
    }
    fn swap_remove_at(&mut self, i: usize) {
        self.swap_remove(i);
    }
}

/// Appends `w`, recording its index.
fn list_push(list: &mut impl WatcherList, w: Arc<Watcher>) {
    // A list never holds more than the engine's watcher cap, far below u32::MAX; a wrapped
    // index would only make `list_remove` fall back to a scan.
    w.slot_pos.store(list.len() as u32, Ordering::Relaxed);
    list.push_watcher(w);
}

/// Removes `w` in O(1): swap-remove at its recorded index, then record the index of the
/// watcher moved into its place. Falls back to a scan if the index does not hold `w`.
fn list_remove(list: &mut impl WatcherList, w: &Watcher) -> bool {
    let at = w.slot_pos.load(Ordering::Relaxed) as usize;
    let i = if list.get(at).is_some_and(|x| x.id == w.id) {
        at
    } else {
        match list.iter().position(|x| x.id == w.id) {
            Some(i) => i,
            None => return false,
        }
    };
    list.swap_remove_at(i);
    if let Some(moved) = list.get(i) {
        moved.slot_pos.store(i as u32, Ordering::Relaxed);
    }
    true
}

impl Registry {
    pub(crate) fn insert(&self, w: Arc<Watcher>) {
        match &w.selector {
            Sel::Key(k) => {
                let k = k.clone();
                self.exact.insert(&k, w)
            }
            Sel::Prefix(p) => {
                let len = p.len();
                let mut fresh = false;
                let mut slot = self.prefix.entry(p.clone()).or_insert_with(|| {
                    fresh = true;
                    Slot::new()
                });
                list_push(&mut *slot, w);
                // The shard lock goes before `prefix_lens` is taken (it was never held with it).
                drop(slot);
                if fresh {
                    let mut lens = self.prefix_lens.write();
                    match lens.binary_search_by_key(&len, |&(l, _)| l) {
                        Ok(i) => lens[i].1 += 1,
                        Err(i) => lens.insert(i, (len, 1)),
                    }
                }
            }
            Sel::Range(r) => {
                let (start, end) = (r.0.clone(), Some(r.1.clone()));
                self.intervals.write().insert(start, end, w)
            }
            Sel::FromKey(start) => {
                let start = start.clone();
                self.intervals.write().insert(start, None, w)
            }
            Sel::All => list_push(&mut *self.all.write(), w),
        }
    }

    pub(crate) fn remove(&self, w: &Watcher) {
        let id = w.id;
        match &w.selector {
            Sel::Key(k) => self.exact.remove(k, w),
            Sel::Prefix(p) => {
                let emptied = self
                    .prefix
                    .remove_if_mut(p, |_, slot| {
                        list_remove(slot, w);
                        slot.is_empty()
                    })
                    .is_some();
                if emptied {
                    let mut lens = self.prefix_lens.write();
                    if let Ok(i) = lens.binary_search_by_key(&p.len(), |&(l, _)| l) {
                        lens[i].1 -= 1;
                        if lens[i].1 == 0 {
                            lens.remove(i);
                        }
                    }
                }
            }
            Sel::Range(r) => {
                self.intervals.write().remove(&r.0, id);
            }
            Sel::FromKey(start) => {
                self.intervals.write().remove(start, id);
            }
            Sel::All => {
                list_remove(&mut *self.all.write(), w);
            }
        }
    }

    /// Calls `f` for every watcher whose selector matches `key` (filters not applied).
    pub(crate) fn for_each_match(&self, key: &[u8], mut f: impl FnMut(&Arc<Watcher>)) {
        self.exact.for_each_match(key, &mut f);
        if !self.prefix.is_empty() {
            let lens = self.prefix_lens.read();
            for &(len, _) in lens.iter() {
                if len > key.len() {
                    break;
                }
                if let Some(slot) = self.prefix.get(&key[..len]) {
                    slot.iter().for_each(&mut f);
                }
            }
        }
        {
            let iv = self.intervals.read();
            if iv.len() > 0 {
                iv.stab(key, &mut f);
            }
        }
        self.all.read().iter().for_each(&mut f);
    }

    /// Calls `f` for every registered watcher. Used only on rare whole-engine events
    /// (shutdown, a dispatcher that fell out of its window).
    pub(crate) fn for_each(&self, mut f: impl FnMut(&Arc<Watcher>)) {
        self.exact.for_each(&mut f);
        for e in self.prefix.iter() {
            e.value().iter().for_each(&mut f);
        }
        self.intervals.read().for_each(&mut f);
        self.all.read().iter().for_each(&mut f);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::watcher::outbox::{OutboxLimits, OutboxShared};
    use crate::{KeySelector, WatchOptions};

    /// `size_of::<Watcher>()` on 64-bit targets before `slot_pos` was added.
    const WATCHER_SIZE: usize = 104;

    fn watchers(sel: &KeySelector, n: u64) -> Vec<Arc<Watcher>> {
        let outbox = Arc::new(OutboxShared::new(OutboxLimits::default()));
        (0..n)
            .map(|id| {
                Arc::new(Watcher::new(
                    id,
                    id,
                    sel.clone(),
                    &WatchOptions::default(),
                    outbox.clone(),
                ))
            })
            .collect()
    }

    /// Every watcher in a list of two or more sits at its recorded index (so removal never
    /// needs the scan fallback).
    fn assert_positions(r: &Registry) {
        let check = |list: &[Arc<Watcher>]| {
            if list.len() > 1 {
                for (i, w) in list.iter().enumerate() {
                    assert_eq!(w.slot_pos.load(Ordering::Relaxed) as usize, i);
                }
            }
        };
        for shard in r.exact.shards.iter() {
            shard.read().iter().for_each(|s| check(s.as_slice()));
        }
        r.prefix.iter().for_each(|e| check(e.value()));
        check(&r.all.read());
    }

    fn matched(r: &Registry, key: &[u8]) -> Vec<u64> {
        let mut ids = Vec::new();
        r.for_each_match(key, |w| ids.push(w.id));
        ids.sort_unstable();
        ids
    }

    /// `slot_pos` sits in padding: a watcher is no larger than before it had one (memory per
    /// watcher is a target, see docs/benchmarks.md).
    #[test]
    #[cfg(target_pointer_width = "64")]
    fn watcher_size_is_unchanged_by_its_index() {
        assert_eq!(std::mem::size_of::<Watcher>(), WATCHER_SIZE);
    }

    /// Removal by recorded index keeps every list exact, whatever order watchers leave in
    /// (each removal moves the last watcher into the hole and must record its new index).
    #[test]
    fn indexed_removal_keeps_lists_exact() {
        for sel in [
            KeySelector::Key(Bytes::from_static(b"k")),
            KeySelector::Prefix(Bytes::from_static(b"k")),
            KeySelector::All,
        ] {
            let r = Registry::default();
            let ws = watchers(&sel, 200);
            ws.iter().for_each(|w| r.insert(w.clone()));
            let mut left: Vec<u64> = (0..200).collect();
            // A fixed shuffle: every third from the front, then the rest from the back.
            let mut order: Vec<u64> = (0..200).filter(|i| i % 3 == 0).collect();
            order.extend((0..200).rev().filter(|i| i % 3 != 0));
            for (n, id) in order.into_iter().enumerate() {
                r.remove(&ws[id as usize]);
                left.retain(|&x| x != id);
                assert_positions(&r);
                if n % 17 == 0 || left.len() < 3 {
                    assert_eq!(matched(&r, b"k"), left, "{sel:?} after removing {id}");
                }
            }
            assert!(matched(&r, b"k").is_empty());
            // Removing twice is harmless.
            r.remove(&ws[0]);
        }
    }
}

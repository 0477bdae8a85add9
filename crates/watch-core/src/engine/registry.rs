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
            Self::One(first) => *self = Self::Many(Box::new(vec![first.clone(), w])),
            Self::Many(v) => v.push(w),
        }
    }

    /// Removes watcher `id`; true when the slot is now empty.
    fn remove(&mut self, id: u64) -> bool {
        match self {
            Self::One(w) => w.id == id,
            Self::Many(v) => {
                if let Some(i) = v.iter().position(|w| w.id == id) {
                    v.swap_remove(i);
                }
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

    fn remove(&self, key: &[u8], id: u64) {
        let (hash, shard) = self.locate(key);
        let mut table = shard.write();
        if let Ok(mut e) = table.find_entry(hash, |s| slot_key(s) == key) {
            if e.get_mut().remove(id) {
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

fn remove_from_slot(slot: &mut Slot, id: u64) -> bool {
    match slot.iter().position(|w| w.id == id) {
        Some(i) => {
            slot.swap_remove(i);
            true
        }
        None => false,
    }
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
                self.prefix
                    .entry(p.clone())
                    .or_insert_with(|| {
                        fresh = true;
                        Slot::new()
                    })
                    .push(w);
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
            Sel::All => self.all.write().push(w),
        }
    }

    pub(crate) fn remove(&self, w: &Watcher) {
        let id = w.id;
        match &w.selector {
            Sel::Key(k) => self.exact.remove(k, id),
            Sel::Prefix(p) => {
                let emptied = self
                    .prefix
                    .remove_if_mut(p, |_, slot| {
                        remove_from_slot(slot, id);
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
                let mut all = self.all.write();
                if let Some(i) = all.iter().position(|x| x.id == id) {
                    all.swap_remove(i);
                }
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

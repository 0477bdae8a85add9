//! Where watchers are found by key.
//!
//! - exact keys: one hash lookup per event key;
//! - prefixes: one hash lookup per *distinct registered prefix length* not longer than the
//!   key, so the cost does not grow with the number of registered prefixes;
//! - ranges and from-key selectors: an interval treap, O(log n + matches);
//! - all-keys watchers: a list.
//!
//! Lock order: a registry lock (a dashmap shard or one of the `RwLock`s) may be held while a
//! watcher's state lock is taken, never the other way round.

use std::sync::Arc;

use bytes::Bytes;
use dashmap::DashMap;
use parking_lot::RwLock;
use smallvec::SmallVec;

use crate::interval::IntervalSet;
use crate::selector::KeySelector;
use crate::watcher::Watcher;

type Slot = SmallVec<[Arc<Watcher>; 1]>;

#[derive(Default)]
pub(crate) struct Registry {
    exact: DashMap<Bytes, Slot>,
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
            KeySelector::Key(k) => self.exact.entry(k.clone()).or_default().push(w),
            KeySelector::Prefix(p) => {
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
            KeySelector::Range { start, end } => {
                let (start, end) = (start.clone(), Some(end.clone()));
                self.intervals.write().insert(start, end, w)
            }
            KeySelector::FromKey(start) => {
                let start = start.clone();
                self.intervals.write().insert(start, None, w)
            }
            KeySelector::All => self.all.write().push(w),
        }
    }

    pub(crate) fn remove(&self, w: &Watcher) {
        let id = w.id;
        match &w.selector {
            KeySelector::Key(k) => {
                self.exact.remove_if_mut(k, |_, slot| {
                    remove_from_slot(slot, id);
                    slot.is_empty()
                });
            }
            KeySelector::Prefix(p) => {
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
            KeySelector::Range { start, .. } | KeySelector::FromKey(start) => {
                self.intervals.write().remove(start, id);
            }
            KeySelector::All => {
                let mut all = self.all.write();
                if let Some(i) = all.iter().position(|x| x.id == id) {
                    all.swap_remove(i);
                }
            }
        }
    }

    /// Calls `f` for every watcher whose selector matches `key` (filters not applied).
    pub(crate) fn for_each_match(&self, key: &[u8], mut f: impl FnMut(&Arc<Watcher>)) {
        if let Some(slot) = self.exact.get(key) {
            slot.iter().for_each(&mut f);
        }
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
        for e in self.exact.iter() {
            e.value().iter().for_each(&mut f);
        }
        for e in self.prefix.iter() {
            e.value().iter().for_each(&mut f);
        }
        self.intervals.read().for_each(&mut f);
        self.all.read().iter().for_each(&mut f);
    }
}

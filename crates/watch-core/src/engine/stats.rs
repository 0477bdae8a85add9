//! Cheap engine statistics for metrics: relaxed atomic counters the engine updates on
//! registration, unregistration and catch-up transitions (never on [`crate::WatchEngine::publish`]),
//! read as one [`EngineStats`] snapshot by whoever exports them.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use crate::engine::watcher::{Mode, Sel};

/// A point-in-time snapshot of the engine's counters ([`crate::WatchEngine::stats`]). Each
/// field is read separately with relaxed ordering: fields may be a few updates apart from each
/// other, which is fine for metrics and not meant for anything else.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct EngineStats {
    /// Registered exact-key watchers.
    pub key_watchers: usize,
    /// Registered prefix watchers.
    pub prefix_watchers: usize,
    /// Registered key-range watchers (`[start, end)`).
    pub range_watchers: usize,
    /// Registered from-key watchers (`key >= start`).
    pub from_key_watchers: usize,
    /// Registered all-keys watchers.
    pub all_watchers: usize,
    /// Watchers currently catching up from the in-memory window or the external history (their
    /// queue filled, or they started at a past revision); they turn live once caught up.
    pub catching_up: usize,
    /// Catch-ups started since the engine was created (a counter: every time a watcher began
    /// catching up).
    pub catch_ups_started: u64,
}

impl EngineStats {
    /// Every registered watcher, whatever its selector.
    pub fn watchers(&self) -> usize {
        self.key_watchers
            + self.prefix_watchers
            + self.range_watchers
            + self.from_key_watchers
            + self.all_watchers
    }
}

/// The live counters behind [`EngineStats`].
#[derive(Default)]
pub(crate) struct Counters {
    /// Indexed by [`kind_index`].
    by_kind: [AtomicUsize; 5],
    catching_up: AtomicUsize,
    catch_ups_started: AtomicU64,
}

fn kind_index(sel: &Sel) -> usize {
    match sel {
        Sel::Key(_) => 0,
        Sel::Prefix(_) => 1,
        Sel::Range(_) => 2,
        Sel::FromKey(_) => 3,
        Sel::All => 4,
    }
}

impl Counters {
    pub(crate) fn registered(&self, sel: &Sel) {
        self.by_kind[kind_index(sel)].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn unregistered(&self, sel: &Sel) {
        self.by_kind[kind_index(sel)].fetch_sub(1, Ordering::Relaxed);
    }

    /// A watcher left live delivery to catch up.
    pub(crate) fn catch_up_started(&self) {
        self.catching_up.fetch_add(1, Ordering::Relaxed);
        self.catch_ups_started.fetch_add(1, Ordering::Relaxed);
    }

    /// A watcher leaves mode `old` (to live or closed): counted out if it was catching up.
    pub(crate) fn left(&self, old: Mode) {
        if matches!(old, Mode::Lagging { .. } | Mode::Fetching) {
            self.catching_up.fetch_sub(1, Ordering::Relaxed);
        }
    }

    pub(crate) fn snapshot(&self) -> EngineStats {
        let k = |i: usize| self.by_kind[i].load(Ordering::Relaxed);
        EngineStats {
            key_watchers: k(0),
            prefix_watchers: k(1),
            range_watchers: k(2),
            from_key_watchers: k(3),
            all_watchers: k(4),
            catching_up: self.catching_up.load(Ordering::Relaxed),
            catch_ups_started: self.catch_ups_started.load(Ordering::Relaxed),
        }
    }
}

//! One watcher: its selector, options and bounded message queue, and the messages it receives.

pub mod outbox;

use std::sync::Arc;
use std::sync::atomic::AtomicU32;

use bytes::Bytes;
use parking_lot::Mutex;
use smallvec::SmallVec;

use crate::engine::watcher::outbox::OutboxShared;
use crate::options::WatchOptions;
use crate::selector::KeySelector;
use crate::types::{ChangeSet, Event, EventKind, KeyValue, Revision};

/// Identifies a watcher within one engine. Never reused.
pub type WatchId = u64;

/// What a watcher receives.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum WatchMessage {
    /// The events of one revision that this watcher selects (never empty).
    Events(EventBatch),
    /// Every event up to and including `revision` that this watcher selects has been delivered.
    Progress {
        /// The revision the watcher is known to be up to date with.
        revision: Revision,
    },
    /// The watcher has ended; nothing follows. Always the last message.
    Canceled(CancelReason),
}

/// Why the engine ended a watcher.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CancelReason {
    /// The history needed to continue without a gap is gone. Every revision from
    /// `compact_revision` on is still available: re-watch from there, knowing events in
    /// between were missed.
    Compacted {
        /// The oldest revision still available.
        compact_revision: Revision,
    },
    /// The history store failed while catching the watcher up. Everything up to
    /// `resume_after` was delivered; re-watch from `resume_after + 1`.
    HistoryUnavailable {
        /// Last revision the watcher is complete through.
        resume_after: Revision,
        /// What the history store reported.
        message: String,
    },
    /// The engine shut down. Everything up to `resume_after` was delivered.
    Shutdown {
        /// Last revision the watcher is complete through.
        resume_after: Revision,
    },
}

impl std::fmt::Display for CancelReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Compacted { compact_revision } => write!(
                f,
                "required history has been compacted; resume from revision {compact_revision}"
            ),
            Self::HistoryUnavailable {
                resume_after,
                message,
            } => write!(
                f,
                "history unavailable ({message}); resume after revision {resume_after}"
            ),
            Self::Shutdown { resume_after } => {
                write!(
                    f,
                    "watch engine shut down; resume after revision {resume_after}"
                )
            }
        }
    }
}

/// Which events of a change set a watcher receives.
#[derive(Debug, Clone)]
pub(crate) enum Picks {
    All,
    Some(SmallVec<[u32; 2]>),
}

/// The events of one revision delivered to one watcher. Cheap to clone: the change set is
/// shared between every watcher that receives it, never copied.
#[derive(Debug, Clone)]
pub struct EventBatch {
    changes: Arc<ChangeSet>,
    picks: Picks,
    prev_kv: bool,
    catch_up: bool,
}

/// One delivered event, borrowed from the shared change set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WatchEvent<'a> {
    /// Put or delete.
    pub kind: EventKind,
    /// The key after the change.
    pub kv: &'a KeyValue,
    /// The key before the change; only when the watcher asked for `prev_kv` and the publisher
    /// recorded it.
    pub prev_kv: Option<&'a KeyValue>,
}

impl WatchEvent<'_> {
    /// An owned copy (payloads are reference-counted, not copied).
    pub fn to_event(&self) -> Event {
        Event {
            kind: self.kind,
            kv: self.kv.clone(),
            prev_kv: self.prev_kv.cloned(),
        }
    }
}

impl EventBatch {
    /// True when the batch was replayed from history to catch the watcher up (a past start
    /// revision, or a queue that had filled), false when it was delivered live. A consumer may
    /// merge consecutive catch-up batches into one message, as etcd does for unsynced watchers,
    /// while live revisions keep one message each.
    pub fn is_catch_up(&self) -> bool {
        self.catch_up
    }

    /// Approximate payload bytes this batch delivers (keys and values, with prev_kv only when
    /// the watcher asked for it).
    pub fn payload_len(&self) -> usize {
        self.events()
            .map(|e| e.kv.payload_len() + e.prev_kv.map_or(0, KeyValue::payload_len))
            .sum()
    }

    /// The shared change set the batch's events come from (also carries events this watcher
    /// does not receive; see [`EventBatch::picked`]).
    pub fn change_set(&self) -> &Arc<ChangeSet> {
        &self.changes
    }

    /// Indices into [`ChangeSet::events`] of the delivered events, in order; `None` when every
    /// event of the change set is delivered.
    pub fn picked(&self) -> Option<&[u32]> {
        match &self.picks {
            Picks::All => None,
            Picks::Some(idx) => Some(idx),
        }
    }

    /// True when the watcher asked for previous values.
    pub fn with_prev_kv(&self) -> bool {
        self.prev_kv
    }

    /// The revision of every event in the batch.
    pub fn revision(&self) -> Revision {
        self.changes.revision
    }

    /// The delivered events, in the order the write applied them.
    pub fn events(&self) -> impl Iterator<Item = WatchEvent<'_>> + '_ {
        let all = &self.changes.events;
        let picked: Box<dyn Iterator<Item = &Event> + '_> = match &self.picks {
            Picks::All => Box::new(all.iter()),
            Picks::Some(idx) => Box::new(idx.iter().filter_map(|&i| all.get(i as usize))),
        };
        picked.map(move |e| WatchEvent {
            kind: e.kind,
            kv: &e.kv,
            prev_kv: if self.prev_kv {
                e.prev_kv.as_ref()
            } else {
                None
            },
        })
    }

    /// Number of delivered events.
    pub fn len(&self) -> usize {
        match &self.picks {
            Picks::All => self.changes.events.len(),
            Picks::Some(idx) => idx.len(),
        }
    }

    /// Always false: an empty batch is never delivered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Owned copies of the delivered events.
    pub fn to_events(&self) -> Vec<Event> {
        self.events().map(|e| e.to_event()).collect()
    }
}

/// Where a watcher stands in the delivery protocol. Changed only under the watcher's lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// The dispatcher pushes each new revision directly.
    Live,
    /// The queue filled (or the watcher started in the past); live pushes are skipped and the
    /// watcher is caught up from history. `signaled`: a catch-up request is already queued.
    Lagging { signaled: bool },
    /// A read of the external history is in flight for this watcher.
    Fetching,
    /// Terminal: the watcher was canceled or dropped.
    Closed,
}

pub(crate) struct State {
    /// Every revision `<= seen` has been dealt with for this watcher: delivered if selected.
    pub(crate) seen: Revision,
    pub(crate) mode: Mode,
    /// In the registry (cleared exactly once, by whoever unregisters).
    pub(crate) registered: bool,
    /// An event was pushed since the last progress tick (progress is elided then).
    pub(crate) had_events: bool,
    /// A manual progress request waits for the watcher to become live.
    pub(crate) progress_pending: bool,
    /// A `Control::Progress` for this watcher is queued: further requests are coalesced into
    /// it, so the control queue holds at most one per watcher.
    pub(crate) progress_asked: bool,
}

const PREV_KV: u8 = 1;
const NO_PUT: u8 = 2;
const NO_DELETE: u8 = 4;
const PROGRESS: u8 = 8;

/// A selector stored compactly: 40 bytes instead of [`KeySelector`]'s 72, by boxing the rarer
/// two-key range. Exact-key watchers dominate memory, so this is paid per watcher.
pub(crate) enum Sel {
    Key(Bytes),
    Prefix(Bytes),
    FromKey(Bytes),
    Range(Box<(Bytes, Bytes)>),
    All,
}

impl Sel {
    fn new(s: KeySelector) -> Self {
        match s {
            KeySelector::Key(k) => Self::Key(k),
            KeySelector::Prefix(p) => Self::Prefix(p),
            KeySelector::FromKey(k) => Self::FromKey(k),
            KeySelector::Range { start, end } => Self::Range(Box::new((start, end))),
            KeySelector::All => Self::All,
        }
    }

    pub(crate) fn to_selector(&self) -> KeySelector {
        match self {
            Self::Key(k) => KeySelector::Key(k.clone()),
            Self::Prefix(p) => KeySelector::Prefix(p.clone()),
            Self::FromKey(k) => KeySelector::FromKey(k.clone()),
            Self::Range(r) => KeySelector::Range {
                start: r.0.clone(),
                end: r.1.clone(),
            },
            Self::All => KeySelector::All,
        }
    }

    pub(crate) fn matches(&self, key: &[u8]) -> bool {
        match self {
            Self::Key(k) => k.as_ref() == key,
            Self::Prefix(p) => key.starts_with(p),
            Self::FromKey(k) => k.as_ref() <= key,
            Self::Range(r) => r.0.as_ref() <= key && key < r.1.as_ref(),
            Self::All => true,
        }
    }
}

pub(crate) struct Watcher {
    pub(crate) id: WatchId,
    /// The consumer's own name for the watcher (a gRPC stream's client watch ID), carried in
    /// every outbox item so the consumer needs no id map.
    pub(crate) tag: u64,
    pub(crate) selector: Sel,
    flags: u8,
    /// Most of this watcher's messages queued in its outbox at once.
    pub(crate) buffer: u32,
    /// This watcher's messages now in its outbox: incremented by the dispatcher under the
    /// outbox lock, decremented by the consumer as it takes them.
    pub(crate) queued: AtomicU32,
    /// This watcher's index in its registry list (a prefix's, an exact key's or the all-keys
    /// list), so removal is O(1) rather than a scan: cancelling every watcher of one prefix
    /// was quadratic. Read and written only under that list's lock (Relaxed suffices); sits in
    /// padding beside `flags`, so it costs no memory.
    pub(crate) slot_pos: AtomicU32,
    /// Where its messages go; shared by every watcher of one consumer (one gRPC stream).
    pub(crate) outbox: Arc<OutboxShared>,
    pub(crate) state: Mutex<State>,
}

impl Watcher {
    pub(crate) fn new(
        id: WatchId,
        tag: u64,
        selector: KeySelector,
        opts: &WatchOptions,
        outbox: Arc<OutboxShared>,
    ) -> Self {
        let flags = (opts.prev_kv as u8 * PREV_KV)
            | (opts.no_put as u8 * NO_PUT)
            | (opts.no_delete as u8 * NO_DELETE)
            | (opts.progress_notify as u8 * PROGRESS);
        Self {
            id,
            tag,
            selector: Sel::new(selector),
            flags,
            buffer: opts.buffer,
            queued: AtomicU32::new(0),
            slot_pos: AtomicU32::new(0),
            outbox,
            state: Mutex::new(State {
                seen: Revision::MAX,
                mode: Mode::Live,
                registered: true,
                had_events: false,
                progress_pending: false,
                progress_asked: false,
            }),
        }
    }

    pub(crate) fn wants_prev_kv(&self) -> bool {
        self.flags & PREV_KV != 0
    }

    pub(crate) fn wants_progress(&self) -> bool {
        self.flags & PROGRESS != 0
    }

    /// True if the filters let an event of this kind through.
    pub(crate) fn accepts(&self, kind: EventKind) -> bool {
        match kind {
            EventKind::Put => self.flags & NO_PUT == 0,
            EventKind::Delete => self.flags & NO_DELETE == 0,
        }
    }

    /// Which events of `changes` this watcher receives, by selector and filters.
    pub(crate) fn pick(&self, changes: &ChangeSet) -> Option<Picks> {
        let ok = |e: &Event| self.accepts(e.kind) && self.selector.matches(e.key());
        if let [only] = changes.events.as_slice() {
            return ok(only).then_some(Picks::All);
        }
        let idx: SmallVec<[u32; 2]> = changes
            .events
            .iter()
            .enumerate()
            .filter(|(_, e)| ok(e))
            .map(|(i, _)| i as u32)
            .collect();
        if idx.is_empty() {
            None
        } else if idx.len() == changes.events.len() {
            Some(Picks::All)
        } else {
            Some(Picks::Some(idx))
        }
    }

    /// Narrows registry-found event indices by the filters.
    pub(crate) fn filter_picks(
        &self,
        changes: &ChangeSet,
        idx: &SmallVec<[u32; 2]>,
    ) -> Option<Picks> {
        let kept: SmallVec<[u32; 2]> = idx
            .iter()
            .copied()
            .filter(|&i| {
                changes
                    .events
                    .get(i as usize)
                    .is_some_and(|e| self.accepts(e.kind))
            })
            .collect();
        if kept.is_empty() {
            None
        } else if kept.len() == changes.events.len() {
            Some(Picks::All)
        } else {
            Some(Picks::Some(kept))
        }
    }

    pub(crate) fn batch(
        &self,
        changes: Arc<ChangeSet>,
        picks: Picks,
        catch_up: bool,
    ) -> WatchMessage {
        WatchMessage::Events(EventBatch {
            catch_up,
            changes,
            picks,
            prev_kv: self.wants_prev_kv(),
        })
    }
}

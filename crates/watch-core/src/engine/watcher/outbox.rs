//! Outboxes: one bounded delivery queue per consumer, shared by all of its watchers.
//!
//! A server multiplexes many watchers on one client stream. Instead of a queue and a waker per
//! watcher, every watcher of the stream delivers into the stream's [`Outbox`]: the dispatcher
//! appends `(watcher, message)` items in the order it produces them and wakes the one consumer
//! task, which drains everything queued in one lock hold. Per watcher the items keep the
//! engine's order (they are appended by the dispatcher, which handles a watcher's revisions in
//! order), so a consumer that walks a drained batch front to back sees each watcher's messages
//! in order, and can merge consecutive revisions of one watcher into one response.
//!
//! Bounds: the outbox holds at most [`OutboxLimits::max_bytes`] (counted with
//! [`ChangeSet::mem_size`], the real memory an item pins, not payload alone) and
//! [`OutboxLimits::max_messages`] items, and each watcher at most its `buffer` messages.
//! A live push that does not fit turns the watcher *lagging* (nothing is lost: its `seen` does
//! not move) and parks it on the outbox; once the consumer has drained the outbox to half of
//! its bounds, every parked watcher is handed to the dispatcher to be caught up from history.
//! One item is always accepted into an empty outbox, so a revision larger than the byte bound
//! still goes through. Terminal messages (`Canceled`) bypass the bounds: at most one per
//! watcher.
//!
//! Stream-wide progress ([`Outbox::request_progress`]) is one counter per outbox, not one
//! message per watcher: N requests cost one control message and one queued item, answered
//! with N replies once every watcher of the outbox is up to date.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll, Waker};

use parking_lot::Mutex;

use crate::engine::watcher::{Mode, WatchId, WatchMessage, Watcher};
use crate::engine::{Control, Shared};
use crate::error::WatchError;
use crate::options::WatchOptions;
use crate::selector::KeySelector;
use crate::types::Revision;

/// Bounds of an [`Outbox`]. Every limit is explicit; `Default` suits one gRPC stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutboxLimits {
    /// Most bytes of queued messages (each counted as [`ITEM_BYTES`] plus the memory of the
    /// change set it references).
    pub max_bytes: usize,
    /// Most queued messages.
    pub max_messages: usize,
}

impl Default for OutboxLimits {
    fn default() -> Self {
        Self {
            max_bytes: 16 << 20,
            max_messages: 1 << 20,
        }
    }
}

/// Memory one queued item costs beyond the change set it references: the queue slot plus the
/// watcher reference and picked-event indices it carries.
pub const ITEM_BYTES: usize = std::mem::size_of::<Entry>();

/// What a consumer takes out of an [`Outbox`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum OutboxItem {
    /// A message for one watcher.
    Message {
        /// The engine's id of the watcher (never reused), to tell a canceled watcher's
        /// leftovers from a newer watcher that reuses its tag.
        id: WatchId,
        /// The tag the watcher was registered with ([`Outbox::watch`]).
        tag: u64,
        /// The message.
        message: WatchMessage,
    },
    /// The answer to one [`Outbox::request_progress`]: every watcher of the outbox has been
    /// delivered every selected event up to `revision`, and every such event precedes this item.
    Progress {
        /// The revision the whole outbox is complete through.
        revision: Revision,
    },
}

pub(crate) enum Entry {
    Message {
        watcher: Arc<Watcher>,
        message: WatchMessage,
        bytes: usize,
    },
    Progress {
        revision: Revision,
        count: u32,
    },
}

/// What to do with a watcher whose push does not fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OnFull {
    /// It was live: park it and count it as unsynced.
    ParkLive,
    /// It is already lagging (a catch-up push): park it.
    Park,
    /// Leave it as it is (an optional message such as a periodic progress).
    Skip,
}

pub(crate) struct Inner {
    queue: VecDeque<Entry>,
    bytes: usize,
    waker: Option<Waker>,
    /// Lagging watchers waiting for room before their catch-up.
    parked: Vec<Arc<Watcher>>,
    /// Watchers of this outbox that are lagging or fetching (not live, not closed).
    pub(crate) unsynced: usize,
    /// Live watchers registered with a future start revision: (id, its `seen`).
    pub(crate) future: Vec<(WatchId, Revision)>,
    /// Stream-wide progress requests not answered yet.
    pub(crate) progress: u32,
    /// A `Control::StreamProgress` is queued or the dispatcher holds this outbox waiting.
    pub(crate) progress_queued: bool,
    /// The consumer is gone: pushes are dropped.
    closed: bool,
}

pub(crate) struct OutboxShared {
    limits: OutboxLimits,
    pub(crate) inner: Mutex<Inner>,
}

impl OutboxShared {
    pub(crate) fn new(limits: OutboxLimits) -> Self {
        Self {
            limits,
            inner: Mutex::new(Inner {
                queue: VecDeque::new(),
                bytes: 0,
                waker: None,
                parked: Vec::new(),
                unsynced: 0,
                future: Vec::new(),
                progress: 0,
                progress_queued: false,
                closed: false,
            }),
        }
    }

    /// Queues `message` for `w` if it fits. The caller holds `w`'s state lock (lock order:
    /// watcher, then outbox). On `false` the watcher was parked per `on_full`, under the same
    /// hold of the outbox lock as the failed check, so a drain cannot slip in between.
    pub(crate) fn try_push(
        &self,
        w: &Arc<Watcher>,
        message: WatchMessage,
        bytes: usize,
        on_full: OnFull,
    ) -> bool {
        let mut ob = self.inner.lock();
        if ob.closed {
            return true;
        }
        let full = w.queued.load(Ordering::Relaxed) >= w.buffer
            || (!ob.queue.is_empty()
                && (ob.bytes + bytes > self.limits.max_bytes
                    || ob.queue.len() >= self.limits.max_messages));
        if full {
            match on_full {
                OnFull::ParkLive => {
                    ob.unsynced += 1;
                    ob.parked.push(w.clone());
                }
                OnFull::Park => ob.parked.push(w.clone()),
                OnFull::Skip => {}
            }
            return false;
        }
        ob.push(w.clone(), message, bytes);
        true
    }

    /// Queues a terminal or otherwise mandatory message regardless of the bounds (at most one
    /// per watcher per request, so bounded by the watchers).
    pub(crate) fn force_push(&self, w: &Arc<Watcher>, message: WatchMessage) {
        let mut ob = self.inner.lock();
        if !ob.closed {
            ob.push(w.clone(), message, ITEM_BYTES);
        }
    }

    /// Appends the answer to `count` stream progress requests at `revision`.
    pub(crate) fn push_progress(&self, ob: &mut Inner, revision: Revision, count: u32) {
        if ob.closed || count == 0 {
            return;
        }
        // Coalesce with a progress answer at the tail: nothing was queued after it, so the
        // later revision covers both.
        if let Some(Entry::Progress {
            revision: r,
            count: c,
        }) = ob.queue.back_mut()
        {
            *r = revision;
            *c = c.saturating_add(count);
        } else {
            ob.queue.push_back(Entry::Progress { revision, count });
        }
        ob.wake();
    }

    /// Takes every queued item (the consumer), then hands parked watchers back to the
    /// dispatcher if the outbox is at most half full.
    pub(crate) fn drain(
        &self,
        shared: &Shared,
        mut out: impl FnMut(OutboxItem),
        max: usize,
    ) -> usize {
        let mut parked = Vec::new();
        let n = {
            let mut guard = self.inner.lock();
            let ob = &mut *guard;
            let n = ob.queue.len().min(max);
            for entry in ob.queue.drain(..n) {
                match entry {
                    Entry::Message {
                        watcher,
                        message,
                        bytes,
                    } => {
                        ob.bytes -= bytes;
                        watcher.queued.fetch_sub(1, Ordering::Relaxed);
                        out(OutboxItem::Message {
                            id: watcher.id,
                            tag: watcher.tag,
                            message,
                        });
                    }
                    Entry::Progress { revision, count } => {
                        for _ in 0..count {
                            out(OutboxItem::Progress { revision });
                        }
                    }
                }
            }
            if !ob.parked.is_empty()
                && ob.bytes <= self.limits.max_bytes / 2
                && ob.queue.len() <= self.limits.max_messages / 2
            {
                let mut i = 0;
                while i < ob.parked.len() {
                    let w = &ob.parked[i];
                    if w.queued.load(Ordering::Relaxed) <= w.buffer / 2 {
                        parked.push(ob.parked.swap_remove(i));
                    } else {
                        i += 1;
                    }
                }
            }
            n
        };
        // Outbox lock released before taking watcher locks (lock order: watcher, outbox).
        for w in parked {
            let mut st = w.state.lock();
            if st.mode == (Mode::Lagging { signaled: false }) {
                st.mode = Mode::Lagging { signaled: true };
                drop(st);
                shared.control(Control::CatchUp(w));
            }
        }
        n
    }

    pub(crate) fn poll_ready(&self, cx: &mut Context<'_>) -> Poll<()> {
        let mut ob = self.inner.lock();
        if !ob.queue.is_empty() {
            return Poll::Ready(());
        }
        if !ob.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            ob.waker = Some(cx.waker().clone());
        }
        Poll::Pending
    }

    /// Parks lagging `w` (the caller holds its lock and found it without room) unless the
    /// consumer drained meanwhile: the check is repeated under the outbox lock with the
    /// drain's own resume condition, so a drain either sees the watcher parked or left room
    /// that this check sees. Returns false when there is room now (keep going).
    pub(crate) fn park_if_full(&self, w: &Arc<Watcher>) -> bool {
        let mut ob = self.inner.lock();
        let full = w.queued.load(Ordering::Relaxed) > w.buffer / 2
            || ob.bytes > self.limits.max_bytes / 2
            || ob.queue.len() > self.limits.max_messages / 2;
        if full && !ob.closed {
            ob.parked.push(w.clone());
        }
        full
    }

    /// True if `w` may get one more message now.
    pub(crate) fn has_room(&self, w: &Watcher) -> bool {
        if w.queued.load(Ordering::Relaxed) >= w.buffer {
            return false;
        }
        let ob = self.inner.lock();
        ob.queue.is_empty()
            || (ob.bytes < self.limits.max_bytes && ob.queue.len() < self.limits.max_messages)
    }

    /// A watcher left the synced state (live) or came back to it.
    pub(crate) fn unsynced(&self, delta: isize) {
        let mut ob = self.inner.lock();
        ob.unsynced = ob.unsynced.saturating_add_signed(delta);
    }

    /// Forgets `w`'s future start at unregistration.
    pub(crate) fn forget(&self, w: &Watcher) {
        let mut ob = self.inner.lock();
        if !ob.future.is_empty() {
            ob.future.retain(|(id, _)| *id != w.id);
        }
    }
}

impl Inner {
    fn push(&mut self, watcher: Arc<Watcher>, message: WatchMessage, bytes: usize) {
        watcher.queued.fetch_add(1, Ordering::Relaxed);
        self.bytes += bytes;
        self.queue.push_back(Entry::Message {
            watcher,
            message,
            bytes,
        });
        self.wake();
    }

    fn wake(&mut self) {
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }
}

/// The consumer side of a shared delivery queue: register watchers into it with
/// [`Outbox::watch`], take their messages with [`Outbox::poll_drain`]. One per gRPC stream in
/// a server; see the module docs for ordering and bounds.
pub struct Outbox {
    pub(crate) ob: Arc<OutboxShared>,
    pub(crate) shared: Arc<Shared>,
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox")
            .field("limits", &self.ob.limits)
            .finish()
    }
}

impl Outbox {
    /// Registers a watcher delivering into this outbox, as [`crate::WatchEngine::watch`]
    /// does, and returns it with its created revision (see
    /// [`crate::WatchHandle::created_revision`]); `tag` comes back with each of its messages.
    /// `options.buffer` bounds the watcher's own share of the outbox, in messages.
    pub fn watch(
        &self,
        tag: u64,
        selector: KeySelector,
        options: WatchOptions,
    ) -> Result<(Registration, Revision), WatchError> {
        crate::engine::register(&self.shared, &self.ob, tag, selector, options)
    }

    /// Moves every queued item (up to `max`) into `out` and returns how many were moved;
    /// `Pending` (with the waker kept) when nothing is queued.
    pub fn poll_drain(
        &self,
        cx: &mut Context<'_>,
        out: &mut Vec<OutboxItem>,
        max: usize,
    ) -> Poll<usize> {
        match self.ob.drain(&self.shared, |i| out.push(i), max) {
            0 => match self.ob.poll_ready(cx) {
                Poll::Ready(()) => Poll::Ready(self.ob.drain(&self.shared, |i| out.push(i), max)),
                Poll::Pending => Poll::Pending,
            },
            n => Poll::Ready(n),
        }
    }

    /// Waits until something is queued, then drains as [`Outbox::poll_drain`].
    pub async fn drain(&self, out: &mut Vec<OutboxItem>, max: usize) -> usize {
        std::future::poll_fn(|cx| self.poll_drain(cx, out, max)).await
    }

    /// Asks for one [`OutboxItem::Progress`]: it comes once every watcher of the outbox is up
    /// to date (none catching up, none waiting for a future start revision), after every
    /// event it covers. Requests pending together cost one control message; each gets its own
    /// answer. (The engine answers an outbox with no watcher at once; etcd sends nothing on a
    /// stream without watches, which is the caller's rule to apply.)
    pub fn request_progress(&self) {
        let mut ob = self.ob.inner.lock();
        ob.progress = ob.progress.saturating_add(1);
        if !ob.progress_queued {
            ob.progress_queued = true;
            drop(ob);
            self.shared
                .control(Control::StreamProgress(self.ob.clone()));
        }
    }
}

impl Drop for Outbox {
    fn drop(&mut self) {
        let mut ob = self.ob.inner.lock();
        ob.closed = true;
        ob.waker = None;
        // Items hold watcher references; dropping them here frees the queue at once. Counters
        // stay as they are: nobody reads them after the consumer is gone.
        let queue = std::mem::take(&mut ob.queue);
        let parked = std::mem::take(&mut ob.parked);
        drop(ob);
        drop(queue);
        drop(parked);
    }
}

/// One watcher registered into an [`Outbox`]. Dropping it unregisters the watcher; messages
/// already queued stay in the outbox (the consumer skips ids it no longer knows).
pub struct Registration {
    pub(crate) watcher: Arc<Watcher>,
    pub(crate) shared: Arc<Shared>,
}

impl std::fmt::Debug for Registration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registration")
            .field("id", &self.watcher.id)
            .field("tag", &self.watcher.tag)
            .finish()
    }
}

impl Registration {
    /// The watcher's engine id (what [`OutboxItem::Message::id`] carries).
    pub fn id(&self) -> WatchId {
        self.watcher.id
    }

    /// Asks for a [`WatchMessage::Progress`] for this watcher alone, delivered in order after
    /// every event up to its revision; requests pending together are answered once.
    pub fn request_progress(&self) {
        crate::engine::request_progress(&self.shared, &self.watcher);
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        crate::engine::close(&self.shared, &self.watcher);
    }
}

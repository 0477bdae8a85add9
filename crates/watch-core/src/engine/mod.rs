//! The engine: registration, the publish path, the dispatcher task and watch handles.
//!
//! # Delivery protocol
//!
//! Each watcher has a revision `seen`: every revision up to it has been dealt with for that
//! watcher (delivered if selected). The dispatcher walks published change sets in order and
//! pushes each selected revision to every *live* watcher whose `seen` is below it. When a
//! watcher's queue is full the push is skipped and the watcher turns *lagging*: its `seen`
//! stays where it was, so nothing is lost, and once its consumer drains half the queue it is
//! caught up from the in-memory window or the external [`History`], bounded by the
//! dispatcher's position, and turns live again exactly at that position. All of this runs on
//! the one dispatcher task, so the hand-off from history to live delivery cannot race. When no
//! history covers `seen + 1` any more, the watcher ends with [`CancelReason::Compacted`],
//! pushed into the one queue slot always kept free for the terminal message.

mod interval;
mod registry;
pub mod stats;
pub mod watcher;

use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering, fence};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::FutureExt;
use futures_util::stream::{FuturesUnordered, StreamExt};
use smallvec::SmallVec;
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;

use crate::engine::registry::Registry;
use crate::engine::stats::{Counters, EngineStats};
use crate::engine::watcher::outbox::{
    ITEM_BYTES, OnFull, Outbox, OutboxLimits, OutboxShared, Registration,
};
use crate::engine::watcher::{CancelReason, Mode, Picks, WatchId, WatchMessage, Watcher};
use crate::error::{HistoryError, PublishError, WatchError};
use crate::history::{History, MemoryHistory, MemoryHistoryLimits};
use crate::options::WatchOptions;
use crate::selector::KeySelector;
use crate::types::{ChangeSet, Revision};

/// Engine-wide settings. `Default` suits an embedded store; every limit is explicit.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct EngineConfig {
    /// Most watchers registered at once; registration beyond it fails with
    /// [`WatchError::TooManyWatchers`].
    pub max_watchers: usize,
    /// Bounds of the in-memory window of recent change sets (the publish queue and the first
    /// place catch-ups read from).
    pub recent: MemoryHistoryLimits,
    /// Base interval of progress notifications for watchers that asked for them; each tick adds
    /// 0–10 % random jitter so many engines do not tick in step.
    pub progress_interval: Duration,
    /// Change sets read from the external history per catch-up read.
    pub catch_up_batch: usize,
    /// The store's revision when the engine starts; the first published revision must be above.
    pub initial_revision: Revision,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_watchers: 10_000_000,
            recent: MemoryHistoryLimits::default(),
            progress_interval: Duration::from_secs(600),
            catch_up_batch: 256,
            initial_revision: 0,
        }
    }
}

impl EngineConfig {
    /// Sets [`EngineConfig::max_watchers`].
    pub fn max_watchers(mut self, n: usize) -> Self {
        self.max_watchers = n;
        self
    }
    /// Sets [`EngineConfig::recent`].
    pub fn recent(mut self, limits: MemoryHistoryLimits) -> Self {
        self.recent = limits;
        self
    }
    /// Sets [`EngineConfig::progress_interval`].
    pub fn progress_interval(mut self, interval: Duration) -> Self {
        self.progress_interval = interval;
        self
    }
    /// Sets [`EngineConfig::catch_up_batch`].
    pub fn catch_up_batch(mut self, n: usize) -> Self {
        self.catch_up_batch = n.max(1);
        self
    }
    /// Sets [`EngineConfig::initial_revision`].
    pub fn initial_revision(mut self, revision: Revision) -> Self {
        self.initial_revision = revision;
        self
    }
}

/// Work for the dispatcher from other tasks. Bounded by construction, though the channel is
/// not: each kind is sent at most once per watcher or outbox until the dispatcher took it
/// (`Lagging { signaled }`, `State::progress_asked`, the outbox's `progress_queued`), so
/// repeated requests coalesce and the queue never holds more than two entries per watcher plus
/// one per outbox.
pub(crate) enum Control {
    /// The watcher is lagging and has room: catch it up.
    CatchUp(Arc<Watcher>),
    /// A manual progress request for one watcher.
    Progress(Arc<Watcher>),
    /// Stream-wide progress requests of one outbox (the count is in the outbox).
    StreamProgress(Arc<OutboxShared>),
}

pub(crate) struct Shared {
    config: EngineConfig,
    registry: Registry,
    recent: MemoryHistory,
    history: Option<Arc<dyn History>>,
    /// Wakes the dispatcher after a publish or shutdown; `notify_one` keeps a permit, so a
    /// wake-up is never lost.
    wake: Notify,
    /// The dispatcher is (about to be) waiting for a wake-up: set by it before its last look
    /// at the window, cleared by the first publisher that then wakes it. Publishers that find
    /// it clear skip the `Notify`, so a busy dispatcher costs the writer one atomic load.
    idle: AtomicBool,
    control: mpsc::UnboundedSender<Control>,
    next_id: AtomicU64,
    watchers: AtomicUsize,
    prev_kv_watchers: AtomicUsize,
    /// Watchers that asked for periodic progress notifications.
    progress: dashmap::DashMap<WatchId, Arc<Watcher>>,
    closed: AtomicBool,
    /// Metrics counters; updated off the publish path.
    stats: Counters,
}

impl Shared {
    /// Queues work for the dispatcher (see [`Control`] for why this stays bounded).
    pub(crate) fn control(&self, c: Control) {
        let _ = self.control.send(c);
    }

    /// Removes `w` from every index, once; returns false if it was already gone.
    fn unregister(&self, w: &Watcher) -> bool {
        {
            let mut st = w.state.lock();
            if !st.registered {
                return false;
            }
            st.registered = false;
        }
        self.registry.remove(w);
        if w.wants_progress() {
            self.progress.remove(&w.id);
        }
        if w.wants_prev_kv() {
            self.prev_kv_watchers.fetch_sub(1, Ordering::Relaxed);
        }
        self.watchers.fetch_sub(1, Ordering::Relaxed);
        self.stats.unregistered(&w.selector);
        w.outbox.forget(w);
        true
    }

    /// Ends `w` with its terminal message (pushed past the outbox's bounds: one per watcher).
    fn cancel(&self, w: &Arc<Watcher>, reason: CancelReason) {
        {
            let mut st = w.state.lock();
            if !close_locked(self, w, &mut st) {
                return;
            }
            w.outbox.force_push(w, WatchMessage::Canceled(reason));
        }
        self.unregister(w);
    }

    fn first_available(&self) -> Revision {
        let recent = self.recent.first_available();
        match &self.history {
            Some(h) => h.first_available().min(recent),
            None => recent,
        }
    }
}

/// The engine's front: publish change sets, register watchers. Cheap to clone; every clone
/// talks to the same [`Dispatcher`].
#[derive(Clone)]
pub struct WatchEngine {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for WatchEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WatchEngine")
            .field("watchers", &self.watcher_count())
            .field("revision", &self.current_revision())
            .finish()
    }
}

impl WatchEngine {
    /// An engine whose only history is its in-memory window of recent change sets. Spawn the
    /// returned [`Dispatcher`]'s [`Dispatcher::run`] on a tokio runtime: nothing is delivered
    /// until it runs, and the engine spawns nothing by itself.
    pub fn new(config: EngineConfig) -> (Self, Dispatcher) {
        Self::build(config, None)
    }

    /// An engine that catches watchers up from `history` when its in-memory window no longer
    /// covers them. `history` must hold every published change set (append to it before
    /// publishing).
    pub fn with_history(config: EngineConfig, history: Arc<dyn History>) -> (Self, Dispatcher) {
        Self::build(config, Some(history))
    }

    fn build(config: EngineConfig, history: Option<Arc<dyn History>>) -> (Self, Dispatcher) {
        let (tx, rx) = mpsc::unbounded_channel();
        let position = config.initial_revision;
        let shared = Arc::new(Shared {
            recent: MemoryHistory::new(position, config.recent),
            registry: Registry::default(),
            history,
            wake: Notify::new(),
            idle: AtomicBool::new(false),
            control: tx,
            next_id: AtomicU64::new(0),
            watchers: AtomicUsize::new(0),
            prev_kv_watchers: AtomicUsize::new(0),
            progress: dashmap::DashMap::new(),
            closed: AtomicBool::new(false),
            stats: Counters::default(),
            config,
        });
        let next_tick = Instant::now() + jittered(shared.config.progress_interval);
        let dispatcher = Dispatcher {
            shared: shared.clone(),
            control: rx,
            position,
            pending: VecDeque::new(),
            reads: FuturesUnordered::new(),
            groups: HashMap::new(),
            progress_waiting: Vec::new(),
            next_tick,
        };
        (Self { shared }, dispatcher)
    }

    /// Publishes the change set of one committed write. Call once per revision, in increasing
    /// revision order, after the write is durable.
    ///
    /// Never blocks on watchers and costs the same whatever their number: the change set goes
    /// into the in-memory window and the dispatcher is woken. A revision not above the last
    /// one is refused with [`PublishError::NotIncreasing`] (and not delivered).
    pub fn publish(&self, changes: ChangeSet) -> Result<(), PublishError> {
        self.shared.recent.append(Arc::new(changes))?;
        // Pairs with the fence in `Dispatcher::run`: either the dispatcher's last look at the
        // window sees this change set, or this load sees `idle` set and wakes it.
        fence(Ordering::SeqCst);
        if self.shared.idle.load(Ordering::Relaxed)
            && self.shared.idle.swap(false, Ordering::AcqRel)
        {
            self.shared.wake.notify_one();
        }
        Ok(())
    }

    /// True if a watcher selecting `key` asked for previous values, so a state machine reads
    /// the old value only when someone wants it. Constant time when no watcher wants
    /// `prev_kv`; otherwise one registry lookup.
    pub fn wants_prev_kv(&self, key: &[u8]) -> bool {
        if self.shared.prev_kv_watchers.load(Ordering::Relaxed) == 0 {
            return false;
        }
        let mut any = false;
        self.shared
            .registry
            .for_each_match(key, |w| any |= w.wants_prev_kv());
        any
    }

    /// Last published revision.
    pub fn current_revision(&self) -> Revision {
        self.shared.recent.last_revision()
    }

    /// Number of registered watchers.
    pub fn watcher_count(&self) -> usize {
        self.shared.watchers.load(Ordering::Relaxed)
    }

    /// A snapshot of the engine's watcher and catch-up counters, for metrics. Relaxed atomic
    /// loads only: cheap enough to call on every scrape.
    pub fn stats(&self) -> EngineStats {
        self.shared.stats.snapshot()
    }

    /// Oldest revision a new watcher can start at.
    pub fn first_available(&self) -> Revision {
        self.shared.first_available()
    }

    /// Registers a watcher. Its first message is for a revision above
    /// [`WatchHandle::created_revision`] (or at `options.start_revision` when that is set).
    /// The handle has its own queue of `options.buffer` messages; a server multiplexing many
    /// watchers on one consumer registers them into a shared [`Outbox`] instead.
    pub fn watch(
        &self,
        selector: KeySelector,
        options: WatchOptions,
    ) -> Result<WatchHandle, WatchError> {
        let outbox = self.outbox(OutboxLimits {
            max_bytes: usize::MAX,
            max_messages: usize::MAX,
        });
        let (registration, created) = outbox.watch(0, selector, options)?;
        Ok(WatchHandle {
            registration,
            outbox,
            created,
        })
    }

    /// A new outbox: one bounded queue that every watcher registered into it delivers to,
    /// drained by one consumer (see [`Outbox`]).
    pub fn outbox(&self, limits: OutboxLimits) -> Outbox {
        Outbox {
            ob: Arc::new(OutboxShared::new(limits)),
            shared: self.shared.clone(),
        }
    }

    /// Ends every registered watcher now with `reason` (pushed into the slot each queue keeps
    /// free, so it is never lost) and returns how many were ended. Watchers registered after
    /// the call are untouched. For an embedder whose history was replaced under the engine
    /// (keywatch's mirror resync cancels everyone as compacted, as etcd would).
    pub fn cancel_all(&self, reason: CancelReason) -> usize {
        let mut all = Vec::new();
        // Registry lock first, watcher locks after it is released (the engine's lock order).
        self.shared.registry.for_each(|w| all.push(w.clone()));
        for w in &all {
            self.shared.cancel(w, reason.clone());
        }
        all.len()
    }

    /// Stops the dispatcher: every watcher receives [`CancelReason::Shutdown`] and no new
    /// watcher is accepted.
    pub fn shutdown(&self) {
        self.shared.closed.store(true, Ordering::Release);
        self.shared.wake.notify_one();
    }
}

/// Registers a watcher delivering into `ob` (see [`WatchEngine::watch`]).
pub(crate) fn register(
    shared: &Arc<Shared>,
    ob: &Arc<OutboxShared>,
    tag: u64,
    selector: KeySelector,
    options: WatchOptions,
) -> Result<(Registration, Revision), WatchError> {
    if shared.closed.load(Ordering::Acquire) {
        return Err(WatchError::Shutdown);
    }
    if options.buffer == 0 {
        return Err(WatchError::ZeroBuffer);
    }
    let selector = match selector.normalize()? {
        // An exact-size private copy of the key: a caller's `Bytes` may carry slack
        // capacity or need a shared header when cloned, which idle watchers would pay for.
        KeySelector::Key(k) => KeySelector::Key(bytes::Bytes::copy_from_slice(&k)),
        other => other,
    };
    let start = options.start_revision;
    if start != 0 {
        let first = shared.first_available();
        if start < first {
            return Err(WatchError::Compacted {
                requested: start,
                compact_revision: first,
            });
        }
    }
    // Reserve the slot before checking, so racing registrations cannot overshoot.
    let limit = shared.config.max_watchers;
    if shared.watchers.fetch_add(1, Ordering::Relaxed) >= limit {
        shared.watchers.fetch_sub(1, Ordering::Relaxed);
        return Err(WatchError::TooManyWatchers { limit });
    }
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    // Registered before the current revision is read: any revision the dispatcher walks
    // after that read finds the watcher in the registry (the window's lock orders the
    // two), and revisions up to the read are excluded through `seen`.
    let w = Arc::new(Watcher::new(id, tag, selector, &options, ob.clone()));
    if w.wants_prev_kv() {
        shared.prev_kv_watchers.fetch_add(1, Ordering::Relaxed);
    }
    // Counted before it is reachable: once in the registry the dispatcher may close it
    // and count it out, which must not run before this (the gauge is unsigned).
    shared.stats.registered(&w.selector);
    shared.registry.insert(w.clone());
    if w.wants_progress() {
        shared.progress.insert(id, w.clone());
    }
    // Read under the watcher's lock: a revision the dispatcher offers before this block
    // was published before the read (so `seen` excludes it); one offered after sees the
    // final `seen`.
    let (current, past) = {
        let mut st = w.state.lock();
        let current = shared.recent.last_revision();
        let past = start != 0 && start <= current;
        st.seen = if start == 0 { current } else { start - 1 };
        if past {
            st.mode = Mode::Lagging { signaled: true };
            shared.stats.catch_up_started();
            ob.unsynced(1);
        } else if start > current + 1 {
            // Stream-wide progress waits until the dispatcher reaches the start (etcd #20221).
            ob.inner.lock().future.push((id, start - 1));
        }
        (current, past)
    };
    let registration = Registration {
        watcher: w.clone(),
        shared: shared.clone(),
    };
    if past {
        shared.control(Control::CatchUp(w));
    }
    Ok((registration, current))
}

/// Turns `w` closed under its lock; false if it already was. Counts it out of its outbox's
/// unsynced watchers when it was catching up.
fn close_locked(shared: &Shared, w: &Watcher, st: &mut crate::engine::watcher::State) -> bool {
    if st.mode == Mode::Closed {
        return false;
    }
    shared.stats.left(st.mode);
    if st.mode != Mode::Live {
        w.outbox.unsynced(-1);
    }
    st.mode = Mode::Closed;
    true
}

/// Ends a watcher whose registration was dropped: no message, nothing more is queued.
pub(crate) fn close(shared: &Shared, w: &Watcher) {
    {
        let mut st = w.state.lock();
        close_locked(shared, w, &mut st);
    }
    shared.unregister(w);
}

/// A per-watcher progress request, coalesced while one is queued.
pub(crate) fn request_progress(shared: &Shared, w: &Arc<Watcher>) {
    {
        let mut st = w.state.lock();
        if st.progress_asked || st.mode == Mode::Closed {
            return;
        }
        st.progress_asked = true;
    }
    shared.control(Control::Progress(w.clone()));
}

fn jittered(base: Duration) -> Duration {
    base + base.mul_f64(fastrand::f64() * 0.1)
}

/// A registered watcher: receive its messages with [`WatchHandle::recv`] or as a
/// [`futures_core::Stream`]. Dropping the handle unregisters the watcher.
pub struct WatchHandle {
    registration: Registration,
    outbox: Outbox,
    created: Revision,
}

impl std::fmt::Debug for WatchHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WatchHandle")
            .field("id", &self.registration.watcher.id)
            .field(
                "selector",
                &self.registration.watcher.selector.to_selector(),
            )
            .finish()
    }
}

impl WatchHandle {
    /// The watcher's id, unique within the engine.
    pub fn id(&self) -> WatchId {
        self.registration.watcher.id
    }

    /// The store revision when the watcher was registered (etcd's `created` header revision).
    pub fn created_revision(&self) -> Revision {
        self.created
    }

    /// The watcher's normalised selector.
    pub fn selector(&self) -> KeySelector {
        self.registration.watcher.selector.to_selector()
    }

    /// Asks for a [`WatchMessage::Progress`], delivered in order after every event up to its
    /// revision; a watcher still catching up gets it once it is up to date. Requests made
    /// before the first is served are answered once.
    pub fn request_progress(&self) {
        self.registration.request_progress();
    }

    /// The next message; `None` after the terminal message was received.
    pub async fn recv(&mut self) -> Option<WatchMessage> {
        std::future::poll_fn(|cx| self.poll_recv(cx)).await
    }

    /// The next message if one is queued, without waiting.
    pub fn try_recv(&mut self) -> Option<WatchMessage> {
        self.pop()
    }

    fn pop(&self) -> Option<WatchMessage> {
        let mut msg = None;
        self.outbox.ob.drain(
            &self.outbox.shared,
            |item| {
                if let crate::engine::watcher::outbox::OutboxItem::Message { message, .. } = item {
                    msg = Some(message);
                }
            },
            1,
        );
        msg
    }

    /// Polls for the next message.
    pub fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<WatchMessage>> {
        // Closed is read before the queue: the terminal message is queued before the watcher
        // turns closed (under its lock), so a closed watcher's queue already holds it.
        let closed = self.registration.watcher.state.lock().mode == Mode::Closed;
        if let Some(msg) = self.pop() {
            return Poll::Ready(Some(msg));
        }
        if closed {
            return Poll::Ready(None);
        }
        match self.outbox.ob.poll_ready(cx) {
            Poll::Ready(()) => Poll::Ready(self.pop()),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl futures_core::Stream for WatchHandle {
    type Item = WatchMessage;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<WatchMessage>> {
        self.get_mut().poll_recv(cx)
    }
}

/// A finished external-history read for one watcher.
struct ReadResult {
    watcher: Arc<Watcher>,
    after: Revision,
    until: Revision,
    limit: usize,
    result: Result<Vec<Arc<ChangeSet>>, HistoryError>,
}

/// The background task that delivers published change sets. Spawn [`Dispatcher::run`]
/// yourself (the engine has no hidden spawns). Dropping it ends every watcher with
/// [`CancelReason::Shutdown`].
pub struct Dispatcher {
    shared: Arc<Shared>,
    control: mpsc::UnboundedReceiver<Control>,
    /// Every revision `<= position` has been walked.
    position: Revision,
    /// Lagging watchers with room, waiting for a catch-up turn.
    pending: VecDeque<Arc<Watcher>>,
    reads: FuturesUnordered<Pin<Box<dyn std::future::Future<Output = ReadResult> + Send>>>,
    /// Scratch for multi-event change sets: watcher id -> (watcher, selected event indices).
    groups: HashMap<WatchId, (Arc<Watcher>, SmallVec<[u32; 2]>)>,
    /// Outboxes whose stream progress waits for a watcher to catch up or reach its start.
    progress_waiting: Vec<Arc<OutboxShared>>,
    next_tick: Instant,
}

impl std::fmt::Debug for Dispatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dispatcher")
            .field("position", &self.position)
            .finish()
    }
}

/// Change sets walked per pass over the window before control messages get a turn.
const WALK_CHUNK: usize = 256;
/// Catch-ups served per loop turn, so live delivery is never starved by a crowd of laggards.
const CATCH_UP_TURN: usize = 64;

impl Dispatcher {
    /// Delivers until [`WatchEngine::shutdown`] is called.
    pub async fn run(mut self) {
        loop {
            if self.shared.closed.load(Ordering::Acquire) {
                break;
            }
            self.walk();
            while let Ok(c) = self.control.try_recv() {
                self.on_control(c);
            }
            while let Some(Some(r)) = self.reads.next().now_or_never() {
                self.on_read(r);
            }
            for _ in 0..CATCH_UP_TURN {
                let Some(w) = self.pending.pop_front() else {
                    break;
                };
                self.catch_up(&w);
            }
            if !self.progress_waiting.is_empty() {
                self.retry_progress();
            }
            if Instant::now() >= self.next_tick {
                self.progress_tick();
            }
            if !self.pending.is_empty() {
                tokio::task::yield_now().await;
                continue;
            }
            // Announce the wait, then look at the window once more (see `publish`): a change
            // set appended before the announcement is seen here, one appended after wakes us.
            self.shared.idle.store(true, Ordering::Relaxed);
            fence(Ordering::SeqCst);
            if self.shared.recent.last_revision() > self.position {
                self.shared.idle.store(false, Ordering::Relaxed);
                continue;
            }
            let tick = tokio::time::sleep_until(self.next_tick);
            tokio::select! {
                _ = self.shared.wake.notified() => {}
                c = self.control.recv() => if let Some(c) = c { self.on_control(c) },
                Some(r) = self.reads.next(), if !self.reads.is_empty() => self.on_read(r),
                _ = tick => {}
            }
            self.shared.idle.store(false, Ordering::Relaxed);
        }
        self.shutdown_all();
    }

    fn shutdown_all(&mut self) {
        self.shared.closed.store(true, Ordering::Release);
        let mut all = Vec::new();
        self.shared.registry.for_each(|w| all.push(w.clone()));
        for w in all {
            let resume_after = {
                let st = w.state.lock();
                if st.mode == Mode::Live {
                    st.seen.max(self.position)
                } else {
                    st.seen
                }
            };
            self.shared
                .cancel(&w, CancelReason::Shutdown { resume_after });
        }
    }

    /// Walks every published change set after `position`.
    fn walk(&mut self) {
        loop {
            let chunk = match self
                .shared
                .recent
                .chunk(self.position, Revision::MAX, WALK_CHUNK)
            {
                Ok(c) => c,
                Err(HistoryError::Compacted { compact_revision }) => {
                    self.fell_behind(compact_revision - 1);
                    continue;
                }
                Err(HistoryError::Unavailable(_)) => return,
            };
            let n = chunk.len();
            for cs in chunk {
                self.dispatch(cs);
            }
            if n < WALK_CHUNK {
                return;
            }
        }
    }

    /// The window evicted revisions the dispatcher had not walked (it was starved of CPU for
    /// longer than the window lasts). Every live watcher becomes lagging at the old position
    /// and is caught up from the external history, or canceled as compacted when there is none.
    fn fell_behind(&mut self, new_position: Revision) {
        tracing::warn!(
            from = self.position,
            to = new_position,
            "watch dispatcher fell behind its window; catching watchers up from history"
        );
        let mut all = Vec::new();
        self.shared.registry.for_each(|w| all.push(w.clone()));
        for w in all {
            let mut st = w.state.lock();
            if st.mode == Mode::Live && st.seen < new_position {
                st.seen = st.seen.max(self.position);
                st.mode = Mode::Lagging { signaled: true };
                w.outbox.unsynced(1);
                self.shared.stats.catch_up_started();
                drop(st);
                self.pending.push_back(w);
            }
        }
        self.position = new_position;
    }

    fn dispatch(&mut self, cs: Arc<ChangeSet>) {
        let rev = cs.revision;
        let prev = self.position;
        let registry = &self.shared.registry;
        let stats = &self.shared.stats;
        let bytes = ITEM_BYTES + cs.mem_size();
        if let [only] = cs.events.as_slice() {
            let kind = only.kind;
            registry.for_each_match(only.key(), |w| {
                if w.accepts(kind) {
                    offer(w, &cs, Picks::All, prev, bytes, stats);
                }
            });
        } else {
            let groups = &mut self.groups;
            for (i, e) in cs.events.iter().enumerate() {
                registry.for_each_match(e.key(), |w| {
                    groups
                        .entry(w.id)
                        .or_insert_with(|| (w.clone(), SmallVec::new()))
                        .1
                        .push(i as u32);
                });
            }
            for (_, (w, idx)) in self.groups.drain() {
                if let Some(picks) = w.filter_picks(&cs, &idx) {
                    offer(&w, &cs, picks, prev, bytes, stats);
                }
            }
        }
        self.position = rev;
    }

    fn on_control(&mut self, c: Control) {
        // Walk first: a control message can overtake the publish wake-up, and catch-ups and
        // progress answers must be judged against the dispatcher's real position, not a stale
        // one (a stale position made a live watcher look like one waiting on a future start).
        self.walk();
        match c {
            Control::CatchUp(w) => self.catch_up(&w),
            Control::StreamProgress(ob) => {
                if !self.answer_progress(&ob) {
                    self.progress_waiting.push(ob);
                }
            }
            Control::Progress(w) => {
                let mut st = w.state.lock();
                st.progress_asked = false;
                match st.mode {
                    // Pushed past the bounds: requests coalesce, so at most one per watcher.
                    Mode::Live if st.seen <= self.position => w.outbox.force_push(
                        &w,
                        WatchMessage::Progress {
                            revision: self.position,
                        },
                    ),
                    // A watcher waiting for a future start revision gets no progress until it
                    // reaches it (etcd #20221); the client asks again, as etcd clients do.
                    Mode::Live | Mode::Closed => {}
                    Mode::Lagging { .. } | Mode::Fetching => st.progress_pending = true,
                }
            }
        }
    }

    /// Serves one catch-up turn for a lagging watcher from the in-memory window, or starts a
    /// read of the external history when the window no longer reaches back far enough.
    fn catch_up(&mut self, w: &Arc<Watcher>) {
        loop {
            let (seen, room) = {
                let st = w.state.lock();
                match st.mode {
                    Mode::Lagging { .. } => {}
                    Mode::Live | Mode::Fetching | Mode::Closed => return,
                }
                let queued = w.queued.load(Ordering::Relaxed) as usize;
                (st.seen, (w.buffer as usize).saturating_sub(queued))
            };
            if seen >= self.position {
                self.go_live(w);
                return;
            }
            if !w.outbox.has_room(w) {
                self.park(w);
                return;
            }
            match self.shared.recent.chunk(seen, self.position, WALK_CHUNK) {
                Ok(chunk) => {
                    let complete = chunk.len() < WALK_CHUNK;
                    if !self.push_history(w, seen, self.position, &chunk, complete) {
                        return;
                    }
                }
                Err(HistoryError::Compacted { compact_revision }) => {
                    let Some(history) = self.shared.history.clone() else {
                        self.shared
                            .cancel(w, CancelReason::Compacted { compact_revision });
                        return;
                    };
                    w.state.lock().mode = Mode::Fetching;
                    let (w2, until) = (w.clone(), self.position);
                    let selector = w.selector.to_selector();
                    let limit = self.shared.config.catch_up_batch.min(room).max(1);
                    self.reads.push(Box::pin(async move {
                        let mut result = history.read(&selector, seen, until, limit).await;
                        if let Ok(v) = &mut result {
                            v.truncate(limit);
                        }
                        ReadResult {
                            watcher: w2,
                            after: seen,
                            until,
                            limit,
                            result,
                        }
                    }));
                    return;
                }
                Err(HistoryError::Unavailable(message)) => {
                    self.shared.cancel(
                        w,
                        CancelReason::HistoryUnavailable {
                            resume_after: seen,
                            message,
                        },
                    );
                    return;
                }
            }
        }
    }

    fn on_read(&mut self, read: ReadResult) {
        let ReadResult {
            watcher: w,
            after,
            until,
            limit,
            result,
        } = read;
        {
            let mut st = w.state.lock();
            if st.mode != Mode::Fetching || st.seen != after {
                return;
            }
            st.mode = Mode::Lagging { signaled: true };
        }
        match result {
            Ok(chunk) => {
                let complete = chunk.len() < limit;
                if self.push_history(&w, after, until, &chunk, complete) {
                    self.pending.push_back(w);
                }
            }
            Err(HistoryError::Compacted { compact_revision }) => self
                .shared
                .cancel(&w, CancelReason::Compacted { compact_revision }),
            Err(HistoryError::Unavailable(message)) => self.shared.cancel(
                &w,
                CancelReason::HistoryUnavailable {
                    resume_after: after,
                    message,
                },
            ),
        }
    }

    /// Pushes the selected events of `chunk` (change sets in `(after, until]`) while there is
    /// room. `complete`: the chunk holds every change set of the range that could match.
    /// Returns true if the watcher should keep catching up now (room left, not caught up).
    fn push_history(
        &mut self,
        w: &Arc<Watcher>,
        after: Revision,
        until: Revision,
        chunk: &[Arc<ChangeSet>],
        complete: bool,
    ) -> bool {
        let mut st = w.state.lock();
        if st.seen != after || !matches!(st.mode, Mode::Lagging { .. }) {
            return false;
        }
        for cs in chunk {
            if cs.revision <= st.seen || cs.revision > until {
                continue;
            }
            if let Some(picks) = w.pick(cs) {
                let bytes = ITEM_BYTES + cs.mem_size();
                let msg = w.batch(cs.clone(), picks, true);
                if !w.outbox.try_push(w, msg, bytes, OnFull::Park) {
                    // Parked by the outbox in the same lock hold as the failed check.
                    st.mode = Mode::Lagging { signaled: false };
                    return false;
                }
                st.had_events = true;
            }
            st.seen = cs.revision;
        }
        if complete {
            st.seen = until;
        }
        true
    }

    /// The watcher waits for its consumer: back to lagging, unsignaled, unless the consumer
    /// already drained enough while we were filling, in which case it stays in line.
    fn park(&mut self, w: &Arc<Watcher>) {
        let mut st = w.state.lock();
        if st.mode == Mode::Closed {
            return;
        }
        if w.outbox.park_if_full(w) {
            st.mode = Mode::Lagging { signaled: false };
        } else {
            st.mode = Mode::Lagging { signaled: true };
            drop(st);
            self.pending.push_back(w.clone());
        }
    }

    fn go_live(&mut self, w: &Arc<Watcher>) {
        let mut st = w.state.lock();
        if st.mode == Mode::Closed {
            return;
        }
        self.shared.stats.left(st.mode);
        st.mode = Mode::Live;
        w.outbox.unsynced(-1);
        if st.progress_pending && st.seen <= self.position {
            st.progress_pending = false;
            w.outbox.force_push(
                w,
                WatchMessage::Progress {
                    revision: self.position,
                },
            );
        }
    }

    /// Answers an outbox's stream progress requests if every watcher of it is synced: none
    /// catching up, none waiting for a future start revision. Returns false if it must wait.
    fn answer_progress(&mut self, ob: &Arc<OutboxShared>) -> bool {
        let position = self.position;
        let mut inner = ob.inner.lock();
        inner.future.retain(|&(_, seen)| seen > position);
        if inner.unsynced > 0 || !inner.future.is_empty() {
            return false;
        }
        let count = std::mem::take(&mut inner.progress);
        inner.progress_queued = false;
        ob.push_progress(&mut inner, position, count);
        true
    }

    fn retry_progress(&mut self) {
        let waiting = std::mem::take(&mut self.progress_waiting);
        for ob in waiting {
            if !self.answer_progress(&ob) {
                self.progress_waiting.push(ob);
            }
        }
    }

    fn progress_tick(&mut self) {
        let position = self.position;
        for entry in self.shared.progress.iter() {
            let w = entry.value();
            let mut st = w.state.lock();
            let idle = !std::mem::take(&mut st.had_events);
            if idle && st.mode == Mode::Live && st.seen <= position {
                // Only with room: a periodic notification is never worth a catch-up.
                w.outbox.try_push(
                    w,
                    WatchMessage::Progress { revision: position },
                    ITEM_BYTES,
                    OnFull::Skip,
                );
            }
        }
        self.next_tick = Instant::now() + jittered(self.shared.config.progress_interval);
    }
}

/// Live delivery of revision `cs.revision` to `w`; `prev` is the dispatcher's position before
/// this revision. A full outbox turns the watcher lagging at `prev` instead of dropping.
/// `bytes`: what the message costs its outbox (see [`OutboxLimits`]).
fn offer(
    w: &Arc<Watcher>,
    cs: &Arc<ChangeSet>,
    picks: Picks,
    prev: Revision,
    bytes: usize,
    stats: &Counters,
) {
    let mut st = w.state.lock();
    if st.mode != Mode::Live || cs.revision <= st.seen {
        return;
    }
    let msg = w.batch(cs.clone(), picks, false);
    if !w.outbox.try_push(w, msg, bytes, OnFull::ParkLive) {
        // Parked (and counted unsynced) by the outbox under the same lock hold.
        st.seen = st.seen.max(prev);
        st.mode = Mode::Lagging { signaled: false };
        stats.catch_up_started();
        return;
    }
    st.seen = cs.revision;
    st.had_events = true;
}

impl Drop for Dispatcher {
    fn drop(&mut self) {
        if !self.shared.closed.load(Ordering::Acquire) {
            self.shutdown_all();
        }
    }
}

//! watch-core: the embeddable key-watch engine.
//!
//! A state machine publishes each committed write as a [`ChangeSet`] (all events of one
//! revision); watchers registered on an exact key, a byte prefix, a key range, a from-key range
//! or all keys receive the events they select, in revision order, a revision's events
//! together, with no duplicate and never a silent gap.
//!
//! This crate has no protobuf or gRPC dependency: an embedder depends on it alone.
//!
//! # Embedding
//!
//! The state machine owns a [`WatchEngine`] and calls [`WatchEngine::publish`] once per
//! committed write. The engine spawns nothing: the embedder spawns [`Dispatcher::run`].
//! [`WatchEngine::wants_prev_kv`] tells the state machine whether anyone needs the old value,
//! so it reads it only then.
//!
//! ```
//! use std::collections::BTreeMap;
//! use bytes::Bytes;
//! use watch_core::*;
//!
//! /// A tiny key-value state machine that publishes every write.
//! struct Kv {
//!     data: BTreeMap<Bytes, KeyValue>,
//!     revision: Revision,
//!     watch: WatchEngine,
//! }
//!
//! impl Kv {
//!     fn put(&mut self, key: &'static str, value: &'static str) {
//!         self.revision += 1;
//!         let key = Bytes::from_static(key.as_bytes());
//!         let old = self.data.get(&key);
//!         let kv = KeyValue {
//!             key: key.clone(),
//!             value: Bytes::from_static(value.as_bytes()),
//!             create_revision: old.map_or(self.revision, |o| o.create_revision),
//!             mod_revision: self.revision,
//!             version: old.map_or(1, |o| o.version + 1),
//!             lease: 0,
//!         };
//!         // Only look up the previous value when a watcher asked for it.
//!         let prev = if self.watch.wants_prev_kv(&key) { old.cloned() } else { None };
//!         self.data.insert(key, kv.clone());
//!         let changes = ChangeSet::new(self.revision, vec![Event::put(kv, prev)]);
//!         self.watch.publish(changes).expect("revisions increase");
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let (watch, dispatcher) = WatchEngine::new(EngineConfig::default());
//! tokio::spawn(dispatcher.run());
//! let mut kv = Kv { data: BTreeMap::new(), revision: 0, watch: watch.clone() };
//!
//! // Any byte prefix works; here a '/'-delimited one.
//! let mut config = watch
//!     .watch(KeySelector::prefix("/config/"), WatchOptions::default().prev_kv(true))
//!     .expect("valid selector");
//! kv.put("/config/log_level", "info");
//! kv.put("/other", "ignored");
//! kv.put("/config/log_level", "debug");
//!
//! let mut seen = Vec::new();
//! while seen.len() < 2 {
//!     if let Some(WatchMessage::Events(batch)) = config.recv().await {
//!         for event in batch.events() {
//!             let prev = event.prev_kv.map(|p| p.value.clone());
//!             seen.push((batch.revision(), event.kv.value.clone(), prev));
//!         }
//!     }
//! }
//! assert_eq!(seen[0], (1, Bytes::from("info"), None));
//! assert_eq!(seen[1], (3, Bytes::from("debug"), Some(Bytes::from("info"))));
//! # }
//! ```
//!
//! A consumer that multiplexes many watchers (a server's watch stream) registers them into
//! one [`Outbox`] ([`WatchEngine::outbox`]) instead: one bounded queue and one waker for all of
//! them, drained in batches, with stream-wide progress answered once per request
//! ([`Outbox::request_progress`]).
//!
//! # Delivery contract
//!
//! Per watcher: events arrive in revision order, each once, a revision's selected events in one
//! [`WatchMessage::Events`]. A watcher whose bounded queue fills is never silently skipped: it
//! is caught up later from the engine's in-memory window or the external [`History`], or, when
//! no history covers the gap, ended by [`WatchMessage::Canceled`] with
//! [`CancelReason::Compacted`] naming the oldest revision it can resume from. A
//! [`WatchMessage::Progress`] at revision R means every selected event up to R was delivered.
//! In an [`Outbox`], each watcher's items keep this order, and an [`OutboxItem::Progress`] at R
//! follows every item it covers.
//!
//! # Modules
//!
//! - `types`: `Revision` (u64), `KeyValue` (etcd's model), `Event`, `ChangeSet` (all events of one
//!   revision; the unit of atomic delivery). A change set carries one type-erased, lazily set
//!   *attachment* (`ChangeSet::attachment`, a `OnceLock<Box<dyn Any>>`): a consumer's derived
//!   form built once and shared (the server keeps each revision's wire bytes there). Chosen over
//!   a server-side cache keyed by revision because it lives exactly as long as the change set
//!   (window, outboxes, catch-up reads) with no eviction policy, no lock and no lookup, and
//!   watch-core still knows nothing of protobuf; the engine never reads it.
//! - `selector`: `KeySelector` (exact, any byte prefix, `[start, end)`, from-key, all) with etcd's
//!   `(key, range_end)` convention in `from_etcd_range`; normalisation and typed validation.
//! - `history`: the `History` trait (async range reads by selector, `first_available`) and
//!   `MemoryHistory`, a bounded ring of recent change sets.
//! - `engine` holds the delivery core, nested because its parts name each other: the engine
//!   registers watchers into outboxes and outboxes call back into the engine, a watcher points
//!   at its outbox and an outbox holds watchers. So `engine::watcher` contains
//!   `engine::watcher::outbox`, and `engine::{registry, interval, stats}` sit beside
//!   `watcher`; no two sibling modules import each other (boundary rule 8). Paths below are
//!   relative to `engine`.
//! - `registry` (private): exact keys in 64 sharded `hashbrown` tables whose slots hold only the
//!   watchers (the key is read from the watcher, so it is stored once; O(1)); prefixes in a dashmap
//!   probed once per *distinct registered prefix length* (cost independent of how many prefixes
//!   exist); ranges and from-key selectors in an interval treap (`interval.rs`, O(log n +
//!   matches)); all-keys in a list.
//! - `watcher`: per-watcher state under a `parking_lot::Mutex` (`seen`, mode, flags), a 40-byte
//!   selector, the count of its messages queued in its outbox, `WatchMessage`, `EventBatch` (an
//!   `Arc<ChangeSet>` plus selected indices: events are shared, never copied per watcher; the
//!   change set and indices are public so a consumer can use shared encodings), `CancelReason`.
//! - `outbox`: `Outbox`, the one delivery queue of a consumer (a server's watch stream) shared by
//!   all of its watchers: the dispatcher appends `(watcher, message)` items and wakes the one
//!   consumer task, which drains everything queued in one lock hold (`poll_drain`); no per-watcher
//!   queue or waker. Bounded by `OutboxLimits` (bytes, counted as `ITEM_BYTES` + the change set's
//!   `mem_size`, and items) and per watcher by `WatchOptions::buffer`; a push that does not fit
//!   parks the watcher (lagging, `seen` unmoved) on the outbox, in the same lock hold as the
//!   failed check, and the drain that brings the outbox to half hands parked watchers to the
//!   dispatcher for catch-up. `Outbox::request_progress` is a counter per outbox (coalesced: one
//!   control message however many requests), answered with one `OutboxItem::Progress` per request
//!   once no watcher of the outbox is catching up or waiting for a future start. `Registration`
//!   (drop = unregister). `WatchEngine::watch` gives an embedder a `WatchHandle` with a private
//!   outbox, so there is one delivery path.
//! - `engine`: `WatchEngine` (publish, watch, outbox, wants_prev_kv, cancel_all), `WatchHandle`
//!   (RAII, `Stream`), `Dispatcher` (the one background task; the embedder spawns `run()`).
//!   `publish` appends to the window and wakes the dispatcher only if it announced it is idle
//!   (an `AtomicBool` and a SeqCst fence pair: the dispatcher sets the flag, fences, and looks at
//!   the window once more before it waits; the publisher appends, fences and reads the flag), so
//!   a busy dispatcher costs the writer one atomic load instead of a `Notify`.
//! - `stats`: `EngineStats` (`WatchEngine::stats()`): watchers by selector kind, watchers catching
//!   up, catch-ups started. Relaxed atomic counters updated on registration, unregistration and
//!   live↔catch-up transitions, never in `publish`; an exporter reads them at scrape time, so the
//!   engine needs no metrics crate.
//!
//! # Invariants
//!
//! - **Publish never blocks on watchers and never drops.** `publish` appends to the bounded in-memory
//!   window (`MemoryHistory`) and wakes the dispatcher; the window *is* the queue. If the dispatcher
//!   falls out of the window, every live watcher is caught up from the external `History` or
//!   canceled as compacted; nothing is skipped silently.
//! - **Per-watcher delivery**: ordered, unique, a revision's events in one message, no silent gap.
//!   Each watcher carries `seen` (every revision up to it has been dealt with). A full queue turns
//!   the watcher *lagging* without moving `seen`; once its consumer drains half, the dispatcher
//!   catches it up from the window or the external history bounded by its own position and turns it
//!   live at exactly that position. All transitions run on the dispatcher task, so the history→live
//!   hand-off cannot race. When no history covers `seen + 1`, the watcher ends with
//!   `Canceled(Compacted { compact_revision })` pushed into the one queue slot always kept free.
//! - **Registration is gap-free**: the watcher is inserted in the registry before the current
//!   revision is read (under the watcher's lock), so every later revision finds it and every
//!   earlier one is excluded by `seen`.
//! - Progress (`Progress { revision }`) is pushed into the same queue as events, only to live
//!   watchers that are up to date, so it can never overtake an event (etcd #15220), and never to a
//!   watcher waiting for a future start revision (etcd #20221). A stream-wide answer
//!   (`OutboxItem::Progress`) is appended by the dispatcher after it walked to its revision, so
//!   every live event it covers is already ahead of it in the outbox.
//! - **Control work is bounded**: the control channel holds at most one `CatchUp` and one
//!   `Progress` per watcher (`Lagging { signaled }`, `progress_asked`) and one `StreamProgress` per
//!   outbox (`progress_queued`); further requests coalesce into the queued one.
//! - Lock order: watcher lock → outbox lock; the consumer takes watcher locks only after
//!   releasing the outbox's.
//! - Lock order: registry lock (a shard's or a `RwLock`) → watcher lock; never the reverse. The
//!   window's lock is never held while calling into watchers.
//!
//! Dependencies and why: `dashmap` (prefix index and progress set: concurrent registration without a
//! global lock, as d-engine), `hashbrown` (its `HashTable` lets the exact-key index store each key
//! once; the `core_memory` bench measured 416 → 252 bytes per watcher with it and the compact
//! selector and lazy queue),
//! `parking_lot` (small uncontended locks: one byte per watcher), `smallvec` (one-watcher slots and
//! one-event picks without heap), `tokio` (`Notify`, `mpsc` for control, timers), `fastrand` (jitter
//! and treap priorities), `futures-core/util` (`Stream`, `FuturesUnordered` for concurrent history
//! reads inside the dispatcher task). No hand-rolled atomics beyond counters, so no loom tests.
pub mod engine;
pub mod error;
pub mod history;
pub mod options;
pub mod selector;
pub mod types;

pub use engine::stats::EngineStats;
pub use engine::watcher::outbox::{Outbox, OutboxItem, OutboxLimits, Registration};
pub use engine::watcher::{CancelReason, EventBatch, WatchEvent, WatchId, WatchMessage};
pub use engine::{Dispatcher, EngineConfig, WatchEngine, WatchHandle};
pub use error::{ErrorKind, HistoryError, PublishError, WatchError};
pub use history::{History, HistoryFuture, MemoryHistory, MemoryHistoryLimits};
pub use options::WatchOptions;
pub use selector::{KeySelector, prefix_end};
pub use types::{
    ATTACHMENT_FIXED, BYTES_OVERHEAD, ChangeSet, Event, EventKind, KeyValue, Revision,
    WIRE_EVENT_OVERHEAD, WIRE_KV_OVERHEAD,
};

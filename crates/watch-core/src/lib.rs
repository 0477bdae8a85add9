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
pub mod engine;
pub mod error;
pub mod history;
mod interval;
pub mod options;
pub mod outbox;
mod registry;
pub mod selector;
pub mod stats;
pub mod types;
pub mod watcher;

pub use engine::{Dispatcher, EngineConfig, WatchEngine, WatchHandle};
pub use error::{HistoryError, PublishError, WatchError};
pub use history::{History, HistoryFuture, MemoryHistory, MemoryHistoryLimits};
pub use options::WatchOptions;
pub use outbox::{Outbox, OutboxItem, OutboxLimits, Registration};
pub use selector::{KeySelector, prefix_end};
pub use stats::EngineStats;
pub use types::{ChangeSet, Event, EventKind, KeyValue, Revision};
pub use watcher::{CancelReason, EventBatch, WatchEvent, WatchId, WatchMessage};

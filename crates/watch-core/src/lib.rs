//! watch-core: the embeddable key-watch engine.
//!
//! A state machine publishes each committed write as a [`ChangeSet`] (all events of one
//! revision); watchers registered on an exact key, a byte prefix, a key range, a from-key range
//! or all keys receive the events they select, in revision order, a revision's events
//! together, with no duplicate and never a silent gap.
//!
//! This crate has no protobuf or gRPC dependency: an embedder depends on it alone.
pub mod engine;
pub mod error;
pub mod history;
mod interval;
pub mod options;
mod registry;
pub mod selector;
pub mod types;
pub mod watcher;

pub use engine::{Dispatcher, EngineConfig, Publisher, WatchEngine, WatchHandle};
pub use error::{HistoryError, PublishError, WatchError};
pub use history::{History, HistoryFuture, MemoryHistory, MemoryHistoryLimits};
pub use options::WatchOptions;
pub use selector::{KeySelector, prefix_end};
pub use types::{ChangeSet, Event, EventKind, KeyValue, Revision};
pub use watcher::{CancelReason, EventBatch, WatchEvent, WatchId, WatchMessage};

//! Per-watcher options.

use crate::types::Revision;

/// What a watcher wants besides its keys. `Default` is etcd's default: from now, no prev_kv,
/// no filters, no progress notifications, a buffer of 64 messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct WatchOptions {
    /// Attach the previous key-value to each event (when the publisher recorded it).
    pub prev_kv: bool,
    /// Do not deliver put events.
    pub no_put: bool,
    /// Do not deliver delete events.
    pub no_delete: bool,
    /// First revision to deliver; `0` means "after the current revision". A past revision
    /// replays history first, a future one waits for it.
    pub start_revision: Revision,
    /// Send a [`crate::WatchMessage::Progress`] when the watcher had no event for an interval.
    pub progress_notify: bool,
    /// How many messages may wait in this watcher's queue before the engine stops pushing live
    /// events and catches it up from history later. One more slot is always kept for the
    /// terminal cancel message. Must be at least 1.
    pub buffer: u32,
}

impl Default for WatchOptions {
    fn default() -> Self {
        Self {
            prev_kv: false,
            no_put: false,
            no_delete: false,
            start_revision: 0,
            progress_notify: false,
            buffer: 64,
        }
    }
}

impl WatchOptions {
    /// Sets `prev_kv`.
    pub fn prev_kv(mut self, on: bool) -> Self {
        self.prev_kv = on;
        self
    }
    /// Sets the no-put filter.
    pub fn no_put(mut self, on: bool) -> Self {
        self.no_put = on;
        self
    }
    /// Sets the no-delete filter.
    pub fn no_delete(mut self, on: bool) -> Self {
        self.no_delete = on;
        self
    }
    /// Sets the start revision (0 = from now).
    pub fn start_revision(mut self, revision: Revision) -> Self {
        self.start_revision = revision;
        self
    }
    /// Sets periodic progress notifications.
    pub fn progress_notify(mut self, on: bool) -> Self {
        self.progress_notify = on;
        self
    }
    /// Sets the buffer size in messages.
    pub fn buffer(mut self, messages: u32) -> Self {
        self.buffer = messages;
        self
    }
}

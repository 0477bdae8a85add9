//! The one test wrapper over the redb log store: failures to inject into appends and
//! compactions, and a gate that holds the next compaction step until released.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use event_log::codec::EncodedChange;
use event_log::{LogError, LogStore, RedbOptions, RedbStore, RetentionPolicy};
use watch_core::{ChangeSet, KeySelector};

/// Holds a compaction step: once `armed`, the next step reports on `entered` and waits for a
/// message on `release` (between a compaction's checkpoint commit and the log dropping history).
pub(crate) struct Gate {
    pub(crate) armed: AtomicBool,
    entered: tokio::sync::mpsc::UnboundedSender<()>,
    release: Mutex<std::sync::mpsc::Receiver<()>>,
}

impl Gate {
    /// A gate, the receiver that hears a held step and the sender that releases it.
    pub(crate) fn new() -> (
        Self,
        tokio::sync::mpsc::UnboundedReceiver<()>,
        std::sync::mpsc::Sender<()>,
    ) {
        let (entered, entered_rx) = tokio::sync::mpsc::unbounded_channel();
        let (release_tx, release) = std::sync::mpsc::channel();
        let gate = Self {
            armed: AtomicBool::new(false),
            entered,
            release: Mutex::new(release),
        };
        (gate, entered_rx, release_tx)
    }
}

/// A [`RedbStore`] in `dir`'s log file with test hooks; everything else passes through.
pub(crate) struct HookedLog {
    inner: RedbStore,
    /// Set: every append fails (as a failed fsync would).
    pub(crate) fail_append: Arc<AtomicBool>,
    /// Set: every compaction (step) fails.
    pub(crate) fail_compact: Arc<AtomicBool>,
    /// The compaction gate, when the test holds compactions.
    pub(crate) gate: Option<Gate>,
}

impl HookedLog {
    pub(crate) fn open(dir: &std::path::Path) -> Self {
        Self::with_gate(dir, None)
    }

    pub(crate) fn with_gate(dir: &std::path::Path, gate: Option<Gate>) -> Self {
        Self {
            inner: RedbStore::open(dir.join(event_log::STORE_FILE), RedbOptions::default())
                .unwrap(),
            fail_append: Arc::default(),
            fail_compact: Arc::default(),
            gate,
        }
    }

    fn compaction_failure(&self) -> Result<(), LogError> {
        if self.fail_compact.load(Ordering::SeqCst) {
            return Err(LogError::Storage("injected compaction failure".into()));
        }
        Ok(())
    }
}

impl LogStore for HookedLog {
    fn append_batch(&self, batch: &[EncodedChange]) -> Result<(), LogError> {
        if self.fail_append.load(Ordering::SeqCst) {
            return Err(LogError::Storage("injected fsync failure".into()));
        }
        self.inner.append_batch(batch)
    }
    fn last_revision(&self) -> Result<u64, LogError> {
        self.inner.last_revision()
    }
    fn compacted_revision(&self) -> Result<u64, LogError> {
        self.inner.compacted_revision()
    }
    fn read(
        &self,
        selector: &KeySelector,
        after: u64,
        until: u64,
        limit: usize,
    ) -> Result<Vec<ChangeSet>, LogError> {
        self.inner.read(selector, after, until, limit)
    }
    fn first_changes(
        &self,
        selector: &KeySelector,
        after: u64,
        until: u64,
    ) -> Result<Vec<watch_core::Event>, LogError> {
        self.inner.first_changes(selector, after, until)
    }
    fn defragment(&self) -> Result<bool, LogError> {
        self.inner.defragment()
    }
    fn compact(&self, revision: u64) -> Result<(), LogError> {
        self.compaction_failure()?;
        self.inner.compact(revision)
    }
    fn compact_step(&self, revision: u64) -> Result<bool, LogError> {
        self.compaction_failure()?;
        if let Some(gate) = &self.gate
            && gate.armed.swap(false, Ordering::SeqCst)
        {
            let _ = gate.entered.send(());
            let _ = gate.release.lock().unwrap().recv();
        }
        self.inner.compact_step(revision)
    }
    fn retention_target(
        &self,
        policy: &RetentionPolicy,
        now_ms: u64,
    ) -> Result<Option<u64>, LogError> {
        self.inner.retention_target(policy, now_ms)
    }
    fn bytes_in_use(&self) -> u64 {
        self.inner.bytes_in_use()
    }
    fn recount_bytes_in_use(&self) -> Result<u64, LogError> {
        self.inner.recount_bytes_in_use()
    }
}

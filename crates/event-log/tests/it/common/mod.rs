//! Helpers shared by the integration tests.

pub(crate) mod crash_payload;

use std::sync::Arc;
use std::sync::mpsc;

use bytes::Bytes;
use event_log::codec::EncodedChange;
use event_log::{LogError, LogStore, RedbStore, RetentionPolicy};
use parking_lot::Mutex;
use watch_core::{ChangeSet, Event, KeySelector, KeyValue, Revision};

/// A change set at `rev` putting each of `keys` to a value naming the revision.
pub(crate) fn puts(rev: Revision, keys: &[&str]) -> ChangeSet {
    let events = keys
        .iter()
        .map(|k| {
            Event::put(
                KeyValue {
                    key: Bytes::copy_from_slice(k.as_bytes()),
                    value: format!("v{rev}").into(),
                    create_revision: rev,
                    mod_revision: rev,
                    version: 1,
                    lease: 0,
                },
                None,
            )
        })
        .collect();
    ChangeSet::new(rev, events)
}

pub(crate) fn revs(v: &[ChangeSet]) -> Vec<Revision> {
    v.iter().map(|c| c.revision).collect()
}

/// What the next `append_batch` of a [`ScriptedStore`] does.
pub(crate) struct Script {
    /// Signalled when the call starts.
    pub entered: mpsc::Sender<()>,
    /// The call blocks until this receives.
    pub release: mpsc::Receiver<()>,
    /// Fail (instead of delegating) once released.
    pub fail: bool,
}

/// A [`LogStore`] over a real [`RedbStore`] whose next `append_batch` can be made to block
/// and/or fail: the storage seam for fault-injection and backpressure tests.
pub(crate) struct ScriptedStore {
    pub inner: RedbStore,
    pub next: Mutex<Option<Script>>,
}

impl ScriptedStore {
    pub(crate) fn new(inner: RedbStore) -> Arc<Self> {
        Arc::new(Self {
            inner,
            next: Mutex::new(None),
        })
    }

    /// Arms the next `append_batch`: returns (entered, release) handles.
    pub(crate) fn arm(&self, fail: bool) -> (mpsc::Receiver<()>, mpsc::Sender<()>) {
        let (entered_tx, entered_rx) = mpsc::channel();
        let (release_tx, release_rx) = mpsc::channel();
        *self.next.lock() = Some(Script {
            entered: entered_tx,
            release: release_rx,
            fail,
        });
        (entered_rx, release_tx)
    }
}

impl LogStore for ScriptedStore {
    fn append_batch(&self, batch: &[EncodedChange]) -> Result<(), LogError> {
        let script = self.next.lock().take();
        if let Some(script) = script {
            let _ = script.entered.send(());
            let _ = script.release.recv();
            if script.fail {
                return Err(std::io::Error::other("injected fsync failure").into());
            }
        }
        self.inner.append_batch(batch)
    }
    fn last_revision(&self) -> Result<Revision, LogError> {
        self.inner.last_revision()
    }
    fn compacted_revision(&self) -> Result<Revision, LogError> {
        self.inner.compacted_revision()
    }
    fn read(
        &self,
        selector: &KeySelector,
        after: Revision,
        until: Revision,
        limit: usize,
    ) -> Result<Vec<ChangeSet>, LogError> {
        self.inner.read(selector, after, until, limit)
    }
    fn compact(&self, revision: Revision) -> Result<(), LogError> {
        self.inner.compact(revision)
    }
    fn retention_target(
        &self,
        policy: &RetentionPolicy,
        now_ms: u64,
    ) -> Result<Option<Revision>, LogError> {
        self.inner.retention_target(policy, now_ms)
    }
}

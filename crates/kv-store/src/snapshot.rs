//! The state snapshot written before each compaction.
//!
//! The event log drops history below a compaction revision, so after a compaction a log replay
//! alone cannot rebuild the state. Before compacting to `C` the store writes the whole state at
//! a durable revision `S >= C - 1` to [`SNAPSHOT_FILE`]; on open it loads the snapshot and
//! replays the log after `S` (which the compaction kept, since `C <= S + 1`).
//!
//! Format: one change set encoded with event-log's record codec (CRC-checked, versioned):
//! revision `S` and one put per key, each carrying the key's full metadata.
//! Written to a temporary file, fsynced, renamed over the old one, then the directory fsynced,
//! so a crash leaves either the old or the new snapshot, never a torn one.
//!
//! A mirror's upstream snapshot is written the same way but page by page ([`Staged`], its own
//! temporary file [`STAGED_FILE`]), so its size is never held in memory as one buffer.

use std::io::Write;
use std::path::{Path, PathBuf};

use watch_core::{ChangeSet, Event, EventKind, KeyValue, Revision};

use crate::StoreError;

/// File name of the snapshot inside the data directory.
pub const SNAPSHOT_FILE: &str = "state.snapshot";

/// Temporary file of a snapshot written page by page ([`Staged`]); not the compaction's
/// `state.snapshot.tmp`, which a compaction of the current state may write meanwhile.
pub(crate) const STAGED_FILE: &str = "state.snapshot.staged";

fn err(path: &Path, e: impl std::fmt::Display) -> StoreError {
    StoreError::Snapshot {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

/// Loads the snapshot in `dir`: `Ok(None)` when there is none.
pub(crate) fn load(dir: &Path) -> Result<Option<(Revision, Vec<KeyValue>)>, StoreError> {
    let path = dir.join(SNAPSHOT_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(err(&path, e)),
    };
    let cs = event_log::codec::decode_standalone(&bytes).map_err(|e| err(&path, e))?;
    let mut kvs = Vec::with_capacity(cs.events.len());
    for e in cs.events {
        if e.kind != EventKind::Put {
            return Err(err(&path, "snapshot holds a delete"));
        }
        kvs.push(e.kv);
    }
    Ok(Some((cs.revision, kvs)))
}

/// Writes the state at `revision` as the snapshot of `dir`, atomically.
pub(crate) fn write(dir: &Path, revision: Revision, kvs: Vec<KeyValue>) -> Result<(), StoreError> {
    let path = dir.join(SNAPSHOT_FILE);
    let tmp: PathBuf = dir.join(format!("{SNAPSHOT_FILE}.tmp"));
    let events = kvs.into_iter().map(|kv| Event::put(kv, None)).collect();
    let encoded = event_log::codec::encode(&ChangeSet::new(revision, events), 0);
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&encoded.bytes)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, &path)?;
        // Make the rename itself durable.
        std::fs::File::open(dir)?.sync_all()?;
        Ok(())
    };
    write().map_err(|e| err(&path, e))
}

/// A snapshot written page by page into [`STAGED_FILE`] (same format as [`write`]'s), then
/// made the snapshot by [`Staged::commit`]. Blocking I/O: call from a blocking thread.
#[derive(Debug)]
pub(crate) struct Staged {
    path: PathBuf,
    writer: event_log::codec::RecordWriter<std::io::BufWriter<std::fs::File>>,
}

impl Staged {
    /// Starts the snapshot of revision `revision` in `dir` (replacing a staged file a crash
    /// left behind).
    pub(crate) fn create(dir: &Path, revision: Revision) -> Result<Staged, StoreError> {
        let path = dir.join(STAGED_FILE);
        let file = std::fs::File::create(&path).map_err(|e| err(&path, e))?;
        let writer =
            event_log::codec::RecordWriter::new(std::io::BufWriter::new(file), revision, 0)
                .map_err(|e| err(&path, e))?;
        Ok(Staged { path, writer })
    }

    /// Appends one page of keys.
    pub(crate) fn push(&mut self, kvs: &[KeyValue]) -> Result<(), StoreError> {
        let events: Vec<Event> = kvs.iter().map(|kv| Event::put(kv.clone(), None)).collect();
        self.writer.push(&events).map_err(|e| err(&self.path, e))
    }

    /// Completes the file, fsyncs it and renames it over the snapshot of `dir`, then fsyncs
    /// the directory: a crash leaves the old snapshot or this one, never a torn one.
    pub(crate) fn commit(self, dir: &Path) -> Result<(), StoreError> {
        let path = self.path;
        let finish = || -> std::io::Result<()> {
            let file = self
                .writer
                .finish()?
                .into_inner()
                .map_err(|e| e.into_error())?;
            file.sync_all()?;
            drop(file);
            std::fs::rename(&path, dir.join(SNAPSHOT_FILE))?;
            std::fs::File::open(dir)?.sync_all()
        };
        finish().map_err(|e| err(&dir.join(SNAPSHOT_FILE), e))
    }
}

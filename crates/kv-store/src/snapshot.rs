//! The legacy state snapshot, read once to convert it (see `checkpoint.rs`, "Migration").
//!
//! Before [`crate::STATE_FILE`], each compaction wrote the whole state at a durable revision
//! `S` to [`SNAPSHOT_FILE`]: one change set encoded with event-log's record codec
//! (CRC-checked, versioned), revision `S` and one put per key, each carrying the key's full
//! metadata (tmp + fsync + rename + directory fsync). This build only reads it.

use std::path::Path;

use watch_core::{EventKind, KeyValue, Revision};

use crate::StoreError;

/// File name of the legacy snapshot inside the data directory (converted and removed at open).
pub const SNAPSHOT_FILE: &str = "state.snapshot";

fn err(path: &Path, e: impl std::fmt::Display) -> StoreError {
    StoreError::Snapshot {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

/// Loads the legacy snapshot in `dir`: `Ok(None)` when there is none.
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

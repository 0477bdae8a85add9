//! The auth records file, [`AUTH_FILE`] in the data directory: a redb database holding one
//! record, every user and role and the enabled flag ([`AuthData`], as JSON). A change commits
//! the whole record in one write transaction, fsynced before the change is acknowledged or
//! published; users and roles are few, so rewriting them all keeps every change atomic
//! without a schema of several tables.
//!
//! A failed commit is fail-stop: the change is not applied, every later change fails too, and
//! the server stops (see [`super::Auth::failed`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use redb::ReadableDatabase;

use super::data::AuthData;

/// The records file's name in the data directory.
pub const AUTH_FILE: &str = "auth.redb";

const RECORDS: redb::TableDefinition<'_, &str, &[u8]> = redb::TableDefinition::new("auth");
const KEY: &str = "records";

/// Why the auth records file could not be opened, read or written.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum AuthStoreError {
    /// redb failed (I/O, corruption, a failed commit).
    #[error("auth records {path}: {message}")]
    Storage {
        /// The file.
        path: String,
        /// The storage error.
        message: String,
    },
    /// The stored record does not decode.
    #[error("auth records {path}: undecodable record: {message}")]
    Decode {
        /// The file.
        path: String,
        /// The decoding error.
        message: String,
    },
}

/// The open records file.
pub(crate) struct AuthDb {
    db: Arc<redb::Database>,
    path: PathBuf,
    /// Fsync each commit (the store's durability setting; off only in tests and benches).
    durable: bool,
}

impl AuthDb {
    /// Opens (or creates) the records file in `dir`; `None` when it holds no record yet (first
    /// start: the caller seeds it).
    pub(crate) fn open(
        dir: &Path,
        durable: bool,
    ) -> Result<(AuthDb, Option<AuthData>), AuthStoreError> {
        let path = dir.join(AUTH_FILE);
        let storage = |e: &dyn std::fmt::Display| AuthStoreError::Storage {
            path: path.display().to_string(),
            message: e.to_string(),
        };
        let db = event_log::files::open_or_create_redb(&redb::Database::builder(), &path)
            .map_err(|e| storage(&e))?;
        let raw = (|| -> Result<Option<Vec<u8>>, redb::Error> {
            let txn = db.begin_read()?;
            let table = match txn.open_table(RECORDS) {
                Ok(t) => t,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
                Err(e) => return Err(e.into()),
            };
            Ok(table.get(KEY)?.map(|v| v.value().to_vec()))
        })()
        .map_err(|e| storage(&e))?;
        let data = match raw {
            None => None,
            Some(raw) => {
                Some(
                    serde_json::from_slice(&raw).map_err(|e| AuthStoreError::Decode {
                        path: path.display().to_string(),
                        message: e.to_string(),
                    })?,
                )
            }
        };
        Ok((
            AuthDb {
                db: Arc::new(db),
                path,
                durable,
            },
            data,
        ))
    }

    /// Commits `data` as the record (fsynced when durable), on a blocking thread.
    pub(crate) async fn commit(&self, data: &AuthData) -> Result<(), AuthStoreError> {
        let raw = serde_json::to_vec(data).map_err(|e| AuthStoreError::Decode {
            path: self.path.display().to_string(),
            message: e.to_string(),
        })?;
        let (db, durable) = (self.db.clone(), self.durable);
        let result = tokio::task::spawn_blocking(move || -> Result<(), String> {
            let run = || -> Result<(), redb::Error> {
                let mut txn = db.begin_write()?;
                if !durable {
                    txn.set_durability(redb::Durability::None)
                        .map_err(|e| redb::Error::Corrupted(e.to_string()))?;
                }
                txn.open_table(RECORDS)?.insert(KEY, raw.as_slice())?;
                txn.commit()?;
                Ok(())
            };
            run().map_err(|e| e.to_string())
        })
        .await
        .unwrap_or_else(|e| Err(format!("commit task failed: {e}")));
        result.map_err(|message| AuthStoreError::Storage {
            path: self.path.display().to_string(),
            message,
        })
    }
}

/// Writes `raw` (an [`AuthData`] record as [`super::Auth::export`] gives it) as the records
/// file of `dir`, durably: a restore into a fresh data directory. Fails when `raw` does not
/// decode or `dir` already holds records.
pub(crate) fn write_record(dir: &Path, raw: &[u8]) -> Result<(), AuthStoreError> {
    let path = dir.join(AUTH_FILE);
    let storage = |e: &dyn std::fmt::Display| AuthStoreError::Storage {
        path: path.display().to_string(),
        message: e.to_string(),
    };
    serde_json::from_slice::<AuthData>(raw).map_err(|e| AuthStoreError::Decode {
        path: path.display().to_string(),
        message: e.to_string(),
    })?;
    if path.exists() {
        return Err(storage(
            &"exists: restore needs a data directory without one",
        ));
    }
    let db = event_log::files::open_or_create_redb(&redb::Database::builder(), &path)
        .map_err(|e| storage(&e))?;
    let txn = db.begin_write().map_err(|e| storage(&e))?;
    txn.open_table(RECORDS)
        .map_err(|e| storage(&e))?
        .insert(KEY, raw)
        .map_err(|e| storage(&e))?;
    txn.commit().map_err(|e| storage(&e))
}

//! Crash-safe file steps shared by every crate that keeps files in a data directory: creating
//! a redb file, replacing a small file whole, and making a directory entry durable.
//!
//! Why a redb file is not simply `redb::Builder::create`d: on an empty file redb first grows
//! the file, then writes its header, and writes the magic number last. A process killed
//! between the two leaves a non-empty file without the magic, which every later open refuses
//! ("Not a redb database: magic number mismatch"), so a kill -9 during a data directory's
//! very first open would leave it unopenable. [`open_or_create_redb`] therefore builds a new
//! file under a temporary name and renames it into place only once redb has made it whole;
//! a leftover temporary file is an interrupted creation and is discarded.

use std::io::Write;
use std::path::{Path, PathBuf};

/// Suffix of a redb file whose creation has not finished (see the module docs).
pub const CREATING_SUFFIX: &str = ".creating";

/// Opens the redb file at `path`, creating it first when it does not exist, so that a crash
/// at any point of the creation leaves either no file or a whole, empty database.
pub fn open_or_create_redb(
    builder: &redb::Builder,
    path: &Path,
) -> Result<redb::Database, redb::DatabaseError> {
    if !path.exists() {
        let tmp = creating_path(path);
        match std::fs::remove_file(&tmp) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
            _ => {}
        }
        // redb has written (and flushed) the header and its magic when `create` returns;
        // closing before the rename means nothing writes the file under its final name
        // until it is whole.
        builder.create(&tmp)?.close()?;
        std::fs::File::open(&tmp)?.sync_all()?;
        std::fs::rename(&tmp, path)?;
        sync_dir(parent(path))?;
    }
    builder.create(path)
}

/// Replaces the file at `path` whole with `bytes`: a temporary file is written and fsynced,
/// renamed over `path`, and the directory is fsynced, so a crash leaves the old contents or
/// the new ones, never a mix.
pub fn replace_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&tmp, path)?;
    sync_dir(parent(path))
}

/// Fsyncs the directory `dir`, which makes the creations, renames and removals of its
/// entries durable.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

fn creating_path(path: &Path) -> PathBuf {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(CREATING_SUFFIX);
    PathBuf::from(tmp)
}

/// The directory holding `path` (`.` for a bare file name).
pub(crate) fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interrupted_creation_is_discarded_and_the_file_created_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.redb");
        // What a kill between redb's resize and its magic number leaves behind.
        std::fs::write(creating_path(&path), vec![0u8; 4096]).unwrap();
        let db = open_or_create_redb(&redb::Database::builder(), &path).unwrap();
        drop(db);
        assert!(!creating_path(&path).exists());
        // Whole: a plain open (which never initializes) accepts it.
        redb::Database::open(&path).unwrap();
    }

    #[test]
    fn a_partial_file_under_the_final_name_is_still_refused() {
        // Only the temporary name is ever discarded: a damaged final file is an error.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.redb");
        std::fs::write(&path, vec![0u8; 4096]).unwrap();
        assert!(open_or_create_redb(&redb::Database::builder(), &path).is_err());
    }

    #[test]
    fn replace_file_swaps_contents_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta");
        replace_file(&path, b"one").unwrap();
        replace_file(&path, b"two").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}

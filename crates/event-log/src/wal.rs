//! The write-ahead file: what makes a batch durable under [`crate::Durability::Fsync`].
//!
//! # Why
//! A durable redb commit of a small batch writes scattered pages (the record's leaf, the key
//! index's, the counters, every table root, the allocator state and the header) and then
//! calls `fdatasync`, so the disk gets one request per page: about 290 µs per one-change-set
//! commit on our 2-vCPU VM, where the overwrite `fdatasync` of one page takes 0.07–0.13 ms
//! (docs/benchmarks.md, "The write-ahead file"). Here a batch is appended to this file with one `pwrite` and made durable
//! with one `fdatasync` of that sequential range; the same batch then goes into redb with a
//! non-durable commit (visible to readers, written to the page cache, no flush). Every
//! [`WalLimits::max_bytes`] of appended records or [`WalLimits::max_age`], the next batch is
//! committed to redb durably instead, which makes every earlier non-durable commit durable as
//! well, and the file is rewound to offset 0.
//!
//! # Format
//! A sequence of frames, each `len: u32 LE | crc: u32 LE | record: len bytes`, where `record`
//! is the event log's encoded change set ([`crate::codec`], which carries its revision and its
//! own checksum) and `crc` is CRC-32 (IEEE) over `len`'s four bytes and the record.
//!
//! # Recovery, and why a rewind needs no write
//! Frames are read from offset 0 while each is whole, its checksum matches and its revision is
//! above the previous frame's; the first frame that fails any of these ends the scan (a crash
//! tears at most the batch whose `fdatasync` had not returned, and none of it was
//! acknowledged). Frames at or below the revision redb holds durably are skipped; the rest are
//! committed to redb durably before the log serves anything.
//!
//! A rewind only moves the in-memory write offset back to 0: the old frames stay on disk
//! behind the new ones. That is safe because a rewind happens only after a durable redb commit
//! that holds every frame written so far, so every stale frame's revision is at or below what
//! redb holds (skipped if the scan reaches it), and below every frame written after the rewind
//! (so a stale frame right after the new ones ends the scan). Reusing the file's blocks also
//! keeps the steady state on overwrites, which `fdatasync` makes durable without a file-size
//! update.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use watch_core::Revision;

use crate::codec::{self, EncodedChange};
use crate::error::LogError;

/// Frame header bytes: length and checksum.
const FRAME_HEADER: usize = 8;

/// When the write-ahead file hands its records over to redb with a durable commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WalLimits {
    /// Most record bytes appended between two durable redb commits. Bounds the file's size and
    /// the replay at open after a crash (about 1M change sets per second of replay here).
    pub max_bytes: u64,
    /// Longest time between two durable redb commits while records are pending. Bounds how long
    /// redb holds pages freed by non-durable commits (it reuses them only after a durable one).
    pub max_age: Duration,
}

impl Default for WalLimits {
    fn default() -> Self {
        Self {
            max_bytes: 16 << 20,
            max_age: Duration::from_secs(1),
        }
    }
}

/// The write-ahead file of one [`crate::RedbStore`]. Used by the writer thread only (the store
/// keeps it behind a mutex because the store is shared).
#[derive(Debug)]
pub(crate) struct Wal {
    file: Box<dyn WalBackend>,
    limits: WalLimits,
    /// Where the next frame goes; 0 after a rewind.
    end: u64,
    /// The file's length, all of it written (zeros or frames) and durable: appends below it
    /// are overwrites, which `fdatasync` makes durable without a metadata (journal) commit.
    allocated: u64,
    /// Record bytes appended since the last durable redb commit.
    pending_bytes: u64,
    /// When the first record after the last durable redb commit was appended.
    pending_since: Option<Instant>,
    /// Reused frame buffer (one `pwrite` per batch).
    buf: Vec<u8>,
}

/// Where a write-ahead file's bytes go: a [`File`], or in tests one that fails on demand
/// (the write-ahead counterpart of redb's `StorageBackend`). Every method is called from the
/// log's writer thread only, never concurrently.
pub trait WalBackend: std::fmt::Debug + Send + 'static {
    /// The whole file (read once, at open).
    fn read_all(&mut self) -> io::Result<Vec<u8>>;
    /// Writes all of `buf` at `offset`.
    fn write_all_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// `fdatasync`: what makes an acknowledged frame durable. An error is fatal to the log.
    fn sync_data(&mut self) -> io::Result<()>;
    /// `fsync`, the file's length included (after the file grew).
    fn sync_all(&mut self) -> io::Result<()>;
}

impl WalBackend for File {
    fn read_all(&mut self) -> io::Result<Vec<u8>> {
        let mut bytes = Vec::new();
        self.read_to_end(&mut bytes)?;
        Ok(bytes)
    }
    fn write_all_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        FileExt::write_all_at(self, buf, offset)
    }
    fn sync_data(&mut self) -> io::Result<()> {
        File::sync_data(self)
    }
    fn sync_all(&mut self) -> io::Result<()> {
        File::sync_all(self)
    }
}

/// Opens (creating it when missing) the write-ahead file at `path`, its directory entry
/// durable before the first frame can be acknowledged.
pub(crate) fn open_file(path: &Path) -> Result<File, LogError> {
    let existed = path.exists();
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)?;
    if !existed {
        crate::files::sync_dir(crate::files::parent(path))?;
    }
    Ok(file)
}

impl Wal {
    /// Reads the write-ahead file in `backend` and returns it with the records above
    /// `durable` (in revision order, ready for a batch commit), the last revision redb holds durably. The caller commits them to redb
    /// durably and then calls [`Wal::rewind`]. (Revisions need not be contiguous: the store
    /// above may skip some, e.g. kv-store's first change set is revision 2.)
    pub(crate) fn open(
        mut backend: Box<dyn WalBackend>,
        limits: WalLimits,
        durable: Revision,
    ) -> Result<(Self, Vec<EncodedChange>), LogError> {
        let bytes = backend.read_all()?;
        let records: Vec<EncodedChange> = scan(&bytes)?
            .into_iter()
            .filter(|r| r.revision > durable)
            .collect();
        let allocated = bytes.len() as u64;
        drop(bytes);
        let wal = Self {
            file: backend,
            limits,
            end: 0,
            allocated,
            pending_bytes: 0,
            pending_since: None,
            buf: Vec::new(),
        };
        Ok((wal, records))
    }

    /// Reserves room for a full interval of small batches, so that the steady state never
    /// grows the file.
    pub(crate) fn reserve_interval(&mut self) -> Result<(), LogError> {
        self.reserve(
            self.limits
                .max_bytes
                .saturating_add(self.limits.max_bytes / 4),
        )
    }

    /// Grows the file to at least `len` bytes by writing zeros (not `fallocate`: an
    /// unwritten extent's first write is a metadata change again) and syncs it, size included.
    /// Zeros end a recovery scan: a zero header's checksum does not match.
    fn reserve(&mut self, len: u64) -> Result<(), LogError> {
        const CHUNK: u64 = 1 << 20;
        const PAGE: u64 = 4096;
        if len <= self.allocated {
            return Ok(());
        }
        let target = len.div_ceil(PAGE) * PAGE;
        let zeros = vec![0u8; CHUNK as usize];
        let mut at = self.allocated;
        while at < target {
            let n = (target - at).min(CHUNK);
            self.file.write_all_at(&zeros[..n as usize], at)?;
            at += n;
        }
        self.file.sync_all()?;
        self.allocated = target;
        Ok(())
    }

    /// Whether the next batch should go to redb durably instead (the limits are reached).
    pub(crate) fn due(&self) -> bool {
        self.pending_bytes >= self.limits.max_bytes
            || self
                .pending_since
                .is_some_and(|t| t.elapsed() >= self.limits.max_age)
    }

    /// Appends `batch` as frames with one write and makes them durable with one `fdatasync`.
    /// An error leaves the file in an unknown state: the caller poisons the log (a failed
    /// `fdatasync` is never retried).
    pub(crate) fn append(&mut self, batch: &[EncodedChange]) -> Result<(), LogError> {
        self.buf.clear();
        let mut bytes = 0u64;
        for rec in batch {
            let len = u32::try_from(rec.bytes.len()).map_err(|_| {
                LogError::Storage(format!(
                    "change set {} is {} bytes, above the write-ahead file's 4 GiB frame limit",
                    rec.revision,
                    rec.bytes.len()
                ))
            })?;
            self.buf.extend_from_slice(&len.to_le_bytes());
            self.buf
                .extend_from_slice(&frame_crc(len, &rec.bytes).to_le_bytes());
            self.buf.extend_from_slice(&rec.bytes);
            bytes += rec.bytes.len() as u64;
        }
        // Past the reserved length only after a batch larger than the reserve's headroom; the
        // growth is synced on its own, so the frame's write stays an overwrite.
        self.reserve(self.end + self.buf.len() as u64)?;
        self.file.write_all_at(&self.buf, self.end)?;
        self.file.sync_data()?;
        self.end += self.buf.len() as u64;
        self.pending_bytes += bytes;
        self.pending_since.get_or_insert_with(Instant::now);
        Ok(())
    }

    /// Forgets every frame: redb now holds them all durably. No write (see the module docs).
    pub(crate) fn rewind(&mut self) {
        self.end = 0;
        self.pending_bytes = 0;
        self.pending_since = None;
        // A file grown past the reservation (one huge batch) is not shrunk: shrinking needs a
        // size update, and recovery only reads it once. The buffer is, so that one huge batch
        // does not keep its memory.
        self.buf = Vec::new();
    }
}

fn frame_crc(len: u32, record: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&len.to_le_bytes());
    h.update(record);
    h.finalize()
}

/// The valid frames at the start of `bytes` (see the module docs for where the scan stops).
fn scan(bytes: &[u8]) -> Result<Vec<EncodedChange>, LogError> {
    let mut out: Vec<EncodedChange> = Vec::new();
    let mut at = 0usize;
    while bytes.len() - at >= FRAME_HEADER {
        let word =
            |i: usize| u32::from_le_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
        let len = word(at);
        let crc = word(at + 4);
        let start = at + FRAME_HEADER;
        let Some(end) = start
            .checked_add(len as usize)
            .filter(|&e| e <= bytes.len())
        else {
            break;
        };
        let record = &bytes[start..end];
        if frame_crc(len, record) != crc {
            break;
        }
        // The frame checksum matched, so the record is what was written: a record that does
        // not decode is damage inside a whole frame, an error rather than the end of the scan.
        let cs = codec::decode_standalone(record)?;
        let revision = cs.revision;
        if out.last().is_some_and(|last| revision <= last.revision) {
            break;
        }
        out.push(EncodedChange {
            revision,
            time_ms: codec::decode_header(record, revision)?.time_ms,
            keys: cs.events.iter().map(|e| e.kv.key.clone()).collect(),
            bytes: record.to_vec(),
        });
        at = end;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use watch_core::{ChangeSet, Event, KeyValue};

    fn rec(rev: Revision) -> EncodedChange {
        let kv = KeyValue {
            key: format!("k{rev}").into(),
            value: vec![b'v'; (rev % 7) as usize * 10].into(),
            create_revision: rev,
            mod_revision: rev,
            version: 1,
            lease: 0,
        };
        codec::encode(
            &ChangeSet::new(rev, vec![Event::put(kv, None)]),
            1_000 + rev,
        )
    }

    /// Keeps each test's reserved file small.
    const SMALL: WalLimits = WalLimits {
        max_bytes: 4096,
        max_age: Duration::from_secs(3600),
    };

    fn open_at(path: &Path, limits: WalLimits, durable: Revision) -> (Wal, Vec<EncodedChange>) {
        let (mut wal, rec) =
            Wal::open(Box::new(open_file(path).unwrap()), limits, durable).unwrap();
        wal.reserve_interval().unwrap();
        (wal, rec)
    }

    fn revisions(records: &[EncodedChange]) -> Vec<Revision> {
        records.iter().map(|r| r.revision).collect()
    }

    fn reopen(path: &Path, durable: Revision) -> (Wal, Vec<Revision>) {
        let (wal, rec) = open_at(path, SMALL, durable);
        let revs = revisions(&rec);
        (wal, revs)
    }

    #[test]
    fn recovers_what_was_appended_above_the_durable_revision() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wal");
        let (mut wal, revs) = reopen(&path, 0);
        assert!(revs.is_empty());
        wal.append(&[rec(1), rec(2)]).unwrap();
        wal.append(&[rec(3)]).unwrap();
        drop(wal);
        assert_eq!(reopen(&path, 0).1, vec![1, 2, 3]);
        assert_eq!(reopen(&path, 2).1, vec![3]);
        let (_, got) = open_at(&path, SMALL, 0);
        assert_eq!(got[1].bytes, rec(2).bytes);
        assert_eq!(got[1].keys, rec(2).keys);
        assert_eq!(got[1].time_ms, rec(2).time_ms);
    }

    #[test]
    fn a_torn_or_damaged_tail_ends_the_scan() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wal");
        let (mut wal, _) = reopen(&path, 0);
        wal.append(&[rec(1), rec(2), rec(3)]).unwrap();
        drop(wal);
        let whole = std::fs::read(&path).unwrap();
        // Every truncation point: only the whole frames before it come back.
        let ends: Vec<usize> = {
            let mut v = Vec::new();
            let mut at = 0;
            for r in [rec(1), rec(2), rec(3)] {
                at += FRAME_HEADER + r.bytes.len();
                v.push(at);
            }
            v
        };
        // The file is longer than the frames (the reserved zeros).
        assert!(whole.len() >= ends[2] && whole[ends[2]..].iter().all(|&b| b == 0));
        for cut in 0..=ends[2] {
            std::fs::write(&path, &whole[..cut]).unwrap();
            let want = ends.iter().filter(|&&e| e <= cut).count() as u64;
            assert_eq!(
                reopen(&path, 0).1,
                (1..=want).collect::<Vec<_>>(),
                "cut at {cut}"
            );
        }
        // A flipped byte in the second frame drops it and everything after it.
        let mut bad = whole.clone();
        bad[ends[0] + FRAME_HEADER + 3] ^= 0x40;
        std::fs::write(&path, &bad).unwrap();
        assert_eq!(reopen(&path, 0).1, vec![1]);
    }

    #[test]
    fn stale_frames_behind_a_rewind_are_never_returned() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wal");
        let (mut wal, _) = reopen(&path, 0);
        wal.append(&(1..=10).map(rec).collect::<Vec<_>>()).unwrap();
        // redb now holds 1..=10 durably.
        wal.rewind();
        assert!(!wal.due());
        // Nothing new: every frame on disk is stale and at or below what redb holds.
        assert!(reopen(&path, 10).1.is_empty());
        wal.append(&[rec(11)]).unwrap();
        drop(wal);
        // The new frame comes back; the stale ones behind it (revisions below 11) end the scan
        // or are skipped, and never come back.
        assert_eq!(reopen(&path, 10).1, vec![11]);
    }

    #[test]
    fn due_after_the_byte_limit() {
        let dir = tempfile::tempdir().unwrap();
        let limits = WalLimits {
            max_bytes: 100,
            max_age: Duration::from_secs(3600),
        };
        let (mut wal, _) = open_at(&dir.path().join("wal"), limits, 0);
        assert!(!wal.due());
        wal.append(&[rec(1)]).unwrap();
        assert!(!wal.due());
        wal.append(&[rec(2), rec(3), rec(4)]).unwrap();
        assert!(wal.due());
        wal.rewind();
        assert!(!wal.due());
    }
}

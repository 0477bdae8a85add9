//! The on-disk encoding of one change set (format version 1).
//!
//! All integers are little-endian. Layout:
//!
//! ```text
//! version  u8    = 1
//! crc32    u32   CRC-32 (IEEE, crc32fast) of every byte after this field
//! revision u64
//! time_ms  u64   submission time, milliseconds since the Unix epoch (retention by age)
//! count    u32   number of events
//! events:  kind u8 (0 put, 1 delete) | kv | has_prev u8 (0/1) | prev kv if has_prev
//! kv:      key_len u32 | key | value_len u32 | value
//!          | create_revision u64 | mod_revision u64 | version u64 | lease i64
//! ```
//!
//! The decoder checks every length against the bytes left before allocating, so a damaged
//! length can never cause a huge allocation, and rejects trailing bytes.

use bytes::Bytes;
use watch_core::{ChangeSet, Event, EventKind, KeyValue, Revision};

use crate::error::LogError;

/// The format version written by this build.
pub(crate) const RECORD_VERSION: u8 = 1;
/// version + crc.
const PREFIX_LEN: usize = 1 + 4;
/// version + crc + revision + time + count.
pub(crate) const HEADER_LEN: usize = PREFIX_LEN + 8 + 8 + 4;

/// A change set encoded for storage, with what the store needs to index it.
#[derive(Debug, Clone)]
pub struct EncodedChange {
    /// The change set's revision (also inside `bytes`).
    pub revision: Revision,
    /// Submission time in milliseconds since the Unix epoch (also inside `bytes`).
    pub time_ms: u64,
    /// Keys of the events, for the key index.
    pub keys: Vec<Bytes>,
    /// The encoded record.
    pub bytes: Vec<u8>,
}

/// Encodes `cs` stamped with `time_ms`.
pub fn encode(cs: &ChangeSet, time_ms: u64) -> EncodedChange {
    let kv_len = |kv: &KeyValue| 4 + kv.key.len() + 4 + kv.value.len() + 32;
    let size = HEADER_LEN
        + cs.events
            .iter()
            .map(|e| 2 + kv_len(&e.kv) + e.prev_kv.as_ref().map_or(0, kv_len))
            .sum::<usize>();
    let mut out = Vec::with_capacity(size);
    out.push(RECORD_VERSION);
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&cs.revision.to_le_bytes());
    out.extend_from_slice(&time_ms.to_le_bytes());
    put_len(&mut out, cs.events.len());
    for e in &cs.events {
        out.push(match e.kind {
            EventKind::Put => 0,
            EventKind::Delete => 1,
        });
        put_kv(&mut out, &e.kv);
        match &e.prev_kv {
            Some(prev) => {
                out.push(1);
                put_kv(&mut out, prev);
            }
            None => out.push(0),
        }
    }
    let crc = crc32fast::hash(&out[PREFIX_LEN..]);
    out[1..PREFIX_LEN].copy_from_slice(&crc.to_le_bytes());
    EncodedChange {
        revision: cs.revision,
        time_ms,
        keys: cs.events.iter().map(|e| e.kv.key.clone()).collect(),
        bytes: out,
    }
}

// Lengths above u32::MAX cannot be stored; redb caps values at 3 GiB, so a change set that large
// is refused by the store before this saturation could matter.
fn put_len(out: &mut Vec<u8>, len: usize) {
    out.extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_le_bytes());
}

fn put_kv(out: &mut Vec<u8>, kv: &KeyValue) {
    put_len(out, kv.key.len());
    out.extend_from_slice(&kv.key);
    put_len(out, kv.value.len());
    out.extend_from_slice(&kv.value);
    out.extend_from_slice(&kv.create_revision.to_le_bytes());
    out.extend_from_slice(&kv.mod_revision.to_le_bytes());
    out.extend_from_slice(&kv.version.to_le_bytes());
    out.extend_from_slice(&kv.lease.to_le_bytes());
}

/// Header fields of a record, read after the checksum was verified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Header {
    pub(crate) revision: Revision,
    pub(crate) time_ms: u64,
}

/// Verifies the checksum and reads the header. `expected` is the revision the record is
/// stored under; a mismatch is corruption.
pub(crate) fn decode_header(bytes: &[u8], expected: Revision) -> Result<Header, LogError> {
    let corrupt = |reason: &str| LogError::Corrupt {
        revision: Some(expected),
        reason: reason.to_owned(),
    };
    if bytes.len() < HEADER_LEN {
        return Err(corrupt("record shorter than its header"));
    }
    if bytes[0] != RECORD_VERSION {
        return Err(corrupt(&format!("unknown record version {}", bytes[0])));
    }
    let mut r = Reader {
        buf: &bytes[1..],
        revision: expected,
    };
    let crc = r.u32()?;
    if crc32fast::hash(&bytes[PREFIX_LEN..]) != crc {
        return Err(corrupt("checksum mismatch"));
    }
    let revision = r.u64()?;
    if revision != expected {
        return Err(corrupt(&format!(
            "record holds revision {revision}, stored under {expected}"
        )));
    }
    Ok(Header {
        revision,
        time_ms: r.u64()?,
    })
}

/// Decodes a record kept outside the log (no key to say its revision), verifying its checksum;
/// the revision is taken from the record's own header.
pub fn decode_standalone(bytes: &[u8]) -> Result<ChangeSet, LogError> {
    let revision = bytes
        .get(PREFIX_LEN..PREFIX_LEN + 8)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(u64::from_le_bytes)
        .ok_or_else(|| LogError::Corrupt {
            revision: None,
            reason: "record shorter than its header".to_owned(),
        })?;
    decode(bytes, revision)
}

/// Decodes a record stored under revision `expected`, verifying its checksum.
pub fn decode(bytes: &[u8], expected: Revision) -> Result<ChangeSet, LogError> {
    decode_header(bytes, expected)?;
    let mut r = Reader {
        buf: &bytes[HEADER_LEN - 4..],
        revision: expected,
    };
    let count = r.u32()? as usize;
    // Each event takes at least 2 + 2 * 40 bytes, so a damaged count cannot over-allocate.
    let mut events = Vec::with_capacity(count.min(r.buf.len() / 42));
    for _ in 0..count {
        let kind = match r.u8()? {
            0 => EventKind::Put,
            1 => EventKind::Delete,
            k => return Err(r.corrupt(&format!("unknown event kind {k}"))),
        };
        let kv = r.kv()?;
        let prev_kv = match r.u8()? {
            0 => None,
            1 => Some(r.kv()?),
            f => return Err(r.corrupt(&format!("bad prev_kv flag {f}"))),
        };
        events.push(Event { kind, kv, prev_kv });
    }
    if !r.buf.is_empty() {
        return Err(r.corrupt("trailing bytes after the last event"));
    }
    Ok(ChangeSet::new(expected, events))
}

struct Reader<'a> {
    buf: &'a [u8],
    revision: Revision,
}

impl Reader<'_> {
    fn corrupt(&self, reason: &str) -> LogError {
        LogError::Corrupt {
            revision: Some(self.revision),
            reason: reason.to_owned(),
        }
    }

    fn take(&mut self, n: usize) -> Result<&[u8], LogError> {
        if self.buf.len() < n {
            return Err(self.corrupt("record truncated"));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], LogError> {
        let mut a = [0; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn u8(&mut self) -> Result<u8, LogError> {
        Ok(self.array::<1>()?[0])
    }

    fn u32(&mut self) -> Result<u32, LogError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, LogError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn bytes(&mut self) -> Result<Bytes, LogError> {
        let len = self.u32()? as usize;
        Ok(Bytes::copy_from_slice(self.take(len)?))
    }

    fn kv(&mut self) -> Result<KeyValue, LogError> {
        Ok(KeyValue {
            key: self.bytes()?,
            value: self.bytes()?,
            create_revision: self.u64()?,
            mod_revision: self.u64()?,
            version: self.u64()?,
            lease: i64::from_le_bytes(self.array()?),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> ChangeSet {
        let kv = KeyValue {
            key: "k".into(),
            value: "value".into(),
            create_revision: 3,
            mod_revision: 7,
            version: 2,
            lease: -5,
        };
        let prev = KeyValue {
            mod_revision: 3,
            version: 1,
            ..kv.clone()
        };
        ChangeSet::new(
            7,
            vec![
                Event::put(kv, Some(prev.clone())),
                Event::delete("gone".into(), 7, Some(prev)),
                Event::delete("never".into(), 7, None),
            ],
        )
    }

    #[test]
    fn round_trip() {
        let cs = sample();
        let enc = encode(&cs, 42);
        assert_eq!(decode(&enc.bytes, 7).unwrap(), cs);
        assert_eq!(
            decode_header(&enc.bytes, 7).unwrap(),
            Header {
                revision: 7,
                time_ms: 42
            }
        );
        let empty = ChangeSet::new(1, vec![]);
        assert_eq!(decode(&encode(&empty, 0).bytes, 1).unwrap(), empty);
    }

    #[test]
    fn every_flip_and_truncation_is_detected() {
        let enc = encode(&sample(), 42).bytes;
        for i in 0..enc.len() {
            for bit in 0..8 {
                let mut b = enc.clone();
                b[i] ^= 1 << bit;
                assert!(matches!(decode(&b, 7), Err(LogError::Corrupt { .. })));
            }
            assert!(matches!(
                decode(&enc[..i], 7),
                Err(LogError::Corrupt { .. })
            ));
        }
        assert!(matches!(decode(&enc, 8), Err(LogError::Corrupt { .. })));
    }
}

//! Torn tail and damaged file: truncate, zero-pad, overwrite or bit-flip the store file at many
//! offsets and check that opening it either recovers a consistent committed state or fails
//! with a typed error, and that no read ever returns data that differs from what was written.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

use crate::common::crash_payload::change_set;
use event_log::{Durability, EventLog, LogConfig, LogError, STORE_FILE};

const EVENTS: u64 = 300;

#[derive(Debug, Clone, Copy)]
enum Damage {
    Truncate,
    TruncateZeroPad,
    Garbage,
    BitFlip,
}

fn write_log(dir: &Path) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let log = EventLog::open(dir, LogConfig::default()).unwrap();
    rt.block_on(async {
        // Several batches: submit a burst, then wait for it.
        for burst in (1..=EVENTS).collect::<Vec<_>>().chunks(37) {
            let mut acks = Vec::new();
            for &r in burst {
                acks.push(log.submit(&change_set(r)).await.unwrap());
            }
            for a in acks {
                a.await.unwrap();
            }
        }
    });
}

fn damage(path: &Path, offset: u64, how: Damage, rng: &mut fastrand::Rng) {
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let len = f.metadata().unwrap().len();
    match how {
        Damage::Truncate => f.set_len(offset).unwrap(),
        Damage::TruncateZeroPad => {
            f.set_len(offset).unwrap();
            f.set_len(offset.div_ceil(4096) * 4096).unwrap();
        }
        Damage::Garbage => {
            let n = (len - offset).min(4096) as usize;
            let garbage: Vec<u8> = (0..n).map(|_| rng.u8(..)).collect();
            f.seek(SeekFrom::Start(offset)).unwrap();
            f.write_all(&garbage).unwrap();
        }
        Damage::BitFlip => {
            let mut b = [0u8];
            f.seek(SeekFrom::Start(offset)).unwrap();
            f.read_exact(&mut b).unwrap();
            b[0] ^= 1 << rng.u8(..8);
            f.seek(SeekFrom::Start(offset)).unwrap();
            f.write_all(&b).unwrap();
        }
    }
    f.sync_all().unwrap();
}

/// What one damaged copy did.
#[derive(Debug, Default)]
struct Outcomes {
    intact: usize,
    rolled_back: usize,
    open_error: usize,
    read_error: usize,
}

/// Opens the damaged copy and checks it never yields wrong data.
fn check(dir: &Path, out: &mut Outcomes, what: &str) {
    let config = LogConfig {
        durability: Durability::NoSync,
        ..LogConfig::default()
    };
    let log = match EventLog::open(dir, config) {
        Ok(log) => log,
        Err(e) => {
            assert_typed(&e, what);
            out.open_error += 1;
            return;
        }
    };
    let last = log.last_revision();
    assert!(
        last <= EVENTS,
        "{what}: last revision {last} was never written"
    );
    let mut expected = 1;
    for cs in log.replay(0) {
        match cs {
            Ok(cs) => {
                assert_eq!(cs.revision, expected, "{what}: gap or duplicate");
                assert_eq!(cs, change_set(expected), "{what}: wrong data at {expected}");
                expected += 1;
            }
            Err(e) => {
                assert_typed(&e, what);
                out.read_error += 1;
                return;
            }
        }
    }
    assert_eq!(
        expected - 1,
        last,
        "{what}: replay stops short of last_revision"
    );
    if last == EVENTS {
        out.intact += 1;
    } else {
        out.rolled_back += 1;
    }
}

fn assert_typed(e: &LogError, what: &str) {
    assert!(
        matches!(
            e,
            LogError::Corrupt { .. } | LogError::Io(_) | LogError::Storage(_)
        ),
        "{what}: unexpected error {e:?}"
    );
}

#[test]
fn damaged_file_never_yields_wrong_data() {
    let golden = tempfile::tempdir().unwrap();
    write_log(golden.path());
    let golden_file = golden.path().join(STORE_FILE);
    let len = std::fs::metadata(&golden_file).unwrap().len();
    let seed = fastrand::u64(..);
    println!("seed {seed}, file {len} bytes");
    let mut rng = fastrand::Rng::with_seed(seed);

    // Every 4 KiB boundary (and its neighbours) in the last 64 KiB, plus a random sample.
    let mut offsets: Vec<u64> = (0..16u64)
        .flat_map(|p| {
            let b = len.saturating_sub((p + 1) * 4096);
            [b, b + 1, b + 511, b + 2048]
        })
        .collect();
    offsets.extend((0..48).map(|_| rng.u64(0..len)));
    offsets.extend([0, 1, 512, 4096, len - 1]);

    let mut outcomes = BTreeMap::new();
    for &offset in &offsets {
        for how in [
            Damage::Truncate,
            Damage::TruncateZeroPad,
            Damage::Garbage,
            Damage::BitFlip,
        ] {
            let copy = tempfile::tempdir().unwrap();
            let path = copy.path().join(STORE_FILE);
            std::fs::copy(&golden_file, &path).unwrap();
            damage(&path, offset.min(len - 1), how, &mut rng);
            let what = format!("{how:?} at {offset}");
            check(
                copy.path(),
                outcomes.entry(format!("{how:?}")).or_default(),
                &what,
            );
        }
    }
    println!("{outcomes:#?}");
}

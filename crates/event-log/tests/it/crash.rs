//! kill -9 loop: a child process appends under concurrent load with `Durability::Fsync`,
//! compacts behind the appends in small steps, and prints each acknowledged revision and each
//! answered compaction; the parent SIGKILLs it after a random number of acks, reopens the log
//! (every other time with the write-ahead file off) and checks that every answered compaction
//! survived (its compaction steps are not all durable), that every acknowledged change set
//! above the compaction revision survived intact, that the log is gap-free from there, and
//! that appends continue from `last_revision + 1`.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use crate::common::crash_payload::change_set;
use event_log::{Durability, EventLog, LogConfig};

const KILLS: usize = 32;

/// Kills the child if the test fails half-way.
struct Reap(Child);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn kill_9_loses_no_acknowledged_append() {
    let dir = tempfile::tempdir().unwrap();
    let seed = fastrand::u64(..);
    println!("seed {seed}");
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut acked = BTreeSet::new();
    // The highest answered compaction, and how many were answered.
    let mut compacted = 0;
    let mut compactions = 0;
    for round in 0..KILLS {
        // Every fourth round kills right away, possibly during open or crash recovery.
        let kill_after = if round % 4 == 3 { 0 } else { rng.usize(1..400) };
        let mut child = Reap(
            Command::new(env!("CARGO_BIN_EXE_event-log-crash-child"))
                .arg(dir.path())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .unwrap(),
        );
        let stdout = child.0.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let mut seen = 0;
        let mut record = |line: String| match line.split_once(' ') {
            Some(("ack", rev)) => {
                let rev: u64 = rev.parse().unwrap();
                assert!(acked.insert(rev), "revision {rev} acknowledged twice");
                true
            }
            Some(("compacted", rev)) => {
                compacted = compacted.max(rev.parse().unwrap());
                compactions += 1;
                false
            }
            _ => panic!("unexpected line from the child: {line:?}"),
        };
        while seen < kill_after {
            let Some(line) = lines.next() else {
                panic!("child exited after {seen} acks in round {round}");
            };
            if record(line.unwrap()) {
                seen += 1;
            }
        }
        child.0.kill().unwrap();
        // Lines already written to the pipe before the kill count too.
        for line in lines {
            record(line.unwrap());
        }
        child.0.wait().unwrap();
        drop(child);

        // Every other round recovers with the write-ahead file off: its frames must still come
        // back (the file is then removed), and the next child turns it on again.
        let wal_off = round % 2 == 1;
        let config = LogConfig {
            durability: Durability::Fsync,
            wal: if wal_off {
                None
            } else {
                LogConfig::default().wal
            },
            ..LogConfig::default()
        };
        let log = EventLog::open(dir.path(), config).unwrap();
        assert_eq!(
            dir.path().join(event_log::WAL_FILE).exists(),
            !wal_off,
            "round {round}: the write-ahead file is kept only while it is on"
        );
        let last = log.last_revision();
        let max_acked = acked.last().copied().unwrap_or(0);
        assert!(
            last >= max_acked,
            "round {round}: last {last} < acknowledged {max_acked}"
        );
        let floor = log.compacted_revision();
        assert!(
            floor >= compacted,
            "round {round}: compaction revision {floor} < answered compaction {compacted}"
        );
        let mut expected = floor.max(1);
        for cs in log.replay(expected - 1) {
            let cs = cs.unwrap();
            assert_eq!(cs.revision, expected, "round {round}: gap or duplicate");
            assert_eq!(
                cs,
                change_set(expected),
                "round {round}: revision {expected} differs"
            );
            expected += 1;
        }
        assert_eq!(
            expected - 1,
            last,
            "round {round}: replay does not reach last_revision"
        );
        // Unacknowledged appends may have survived; they are then part of the log from now on.
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        assert_eq!(
            rt.block_on(log.append(change_set(last + 1))).unwrap(),
            last + 1
        );
        acked.insert(last + 1);
    }
    assert!(compactions > 0, "the child never answered a compaction");
    println!("{compactions} compactions answered, the last to {compacted}");
    assert!(
        acked.len() > KILLS * 50,
        "too few acknowledged appends: {}",
        acked.len()
    );
}

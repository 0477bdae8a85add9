//! kill -9 loop over the whole store: a child process (`kv-store-crash-child`) writes from
//! concurrent writers with `Durability::Fsync` while compacting every 64 revisions (a state
//! checkpoint, then the log's stepped compaction), printing every acknowledged put. The
//! parent SIGKILLs it after a random number of acks, or right after it announced a
//! compaction (so inside the checkpoint or the log compaction), or at once (possibly during
//! open, the legacy conversion or crash recovery), reopens the store and checks that every
//! acknowledged put survived: each key holds its last acknowledged value, or a later one.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Lines};
use std::process::{Child, ChildStdout, Command, Stdio};

use kv_store::{Durability, KeyRange, RangeRequest, Store, StoreConfig};

const KILLS: usize = 24;

/// Kills the child if the test fails half-way.
struct Reap(Child);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// What the child acknowledged, over every round.
#[derive(Default)]
struct Acked {
    revisions: BTreeSet<u64>,
    /// Key -> (revision, value) of its last acknowledged put.
    last: BTreeMap<String, (u64, String)>,
    compactions: usize,
}

impl Acked {
    /// Records one line of the child; true for an ack.
    fn line(&mut self, line: &str) -> bool {
        if line.starts_with("compact ") {
            self.compactions += 1;
            return false;
        }
        let mut parts = line.splitn(4, ' ');
        assert_eq!(parts.next(), Some("ack"), "unexpected line {line:?}");
        let rev: u64 = parts.next().unwrap().parse().unwrap();
        let key = parts.next().unwrap().to_owned();
        let value = parts.next().unwrap().to_owned();
        assert!(
            self.revisions.insert(rev),
            "revision {rev} acknowledged twice"
        );
        let slot = self.last.entry(key).or_insert((0, String::new()));
        if rev > slot.0 {
            *slot = (rev, value);
        }
        true
    }
}

fn next_line(lines: &mut Lines<BufReader<ChildStdout>>, round: usize) -> String {
    match lines.next() {
        Some(line) => line.unwrap(),
        None => panic!("child exited early in round {round}"),
    }
}

#[test]
fn kill_9_during_writes_and_compactions_loses_no_acknowledged_put() {
    let dir = tempfile::tempdir().unwrap();
    let seed = fastrand::u64(..);
    println!("seed {seed}");
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut acked = Acked::default();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut killed_in_compaction = 0;
    for round in 0..KILLS {
        let mut child = Reap(
            Command::new(env!("CARGO_BIN_EXE_kv-store-crash-child"))
                .arg(dir.path())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .unwrap(),
        );
        let mut lines = BufReader::new(child.0.stdout.take().unwrap()).lines();
        match round % 3 {
            // At once: possibly during open or crash recovery.
            0 if round % 6 == 0 => {}
            // Right after a compaction was announced: inside its checkpoint or log steps.
            1 => {
                let skip = rng.usize(0..3);
                let mut seen = 0;
                loop {
                    let line = next_line(&mut lines, round);
                    if !acked.line(&line) {
                        if seen == skip {
                            break;
                        }
                        seen += 1;
                    }
                }
                killed_in_compaction += 1;
            }
            _ => {
                let kill_after = rng.usize(1..600);
                let mut seen = 0;
                while seen < kill_after {
                    if acked.line(&next_line(&mut lines, round)) {
                        seen += 1;
                    }
                }
            }
        }
        child.0.kill().unwrap();
        // Acks already written to the pipe before the kill count too.
        for line in lines {
            acked.line(&line.unwrap());
        }
        child.0.wait().unwrap();
        drop(child);

        rt.block_on(async {
            let config = StoreConfig::default().durability(Durability::NoSync);
            let store = Store::open(dir.path(), config).await.unwrap();
            let max_acked = acked.revisions.last().copied().unwrap_or(0);
            assert!(
                store.current_revision() >= max_acked,
                "round {round}: revision {} < acknowledged {max_acked}",
                store.current_revision()
            );
            let kvs = store
                .range(RangeRequest::new(KeyRange::all()))
                .await
                .unwrap()
                .kvs;
            let state: BTreeMap<String, (u64, String)> = kvs
                .into_iter()
                .map(|kv| {
                    let key = String::from_utf8(kv.key.to_vec()).unwrap();
                    let value = String::from_utf8(kv.value.to_vec()).unwrap();
                    (key, (kv.mod_revision, value))
                })
                .collect();
            for (key, (rev, value)) in &acked.last {
                let Some((got_rev, got)) = state.get(key) else {
                    panic!("round {round}: {key} (acknowledged at {rev}) is gone");
                };
                assert!(
                    got_rev >= rev,
                    "round {round}: {key} at {got_rev}, acknowledged at {rev}"
                );
                if got_rev == rev {
                    assert_eq!(got, value, "round {round}: {key} at {rev}");
                }
            }
            // Unacknowledged puts that survived are part of the history from now on: the
            // next round's checks start from this state.
            for (key, (rev, value)) in state {
                let slot = acked.last.entry(key).or_insert((0, String::new()));
                if rev > slot.0 {
                    *slot = (rev, value);
                }
            }
            store.close().await.unwrap();
        });
    }
    assert!(
        acked.revisions.len() > KILLS * 50,
        "too few acknowledged puts: {}",
        acked.revisions.len()
    );
    assert!(acked.compactions > 0 && killed_in_compaction > 0);
}

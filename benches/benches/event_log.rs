//! event-log benchmarks: durable append throughput by batch size, append-to-ack latency under
//! concurrent submitters (each with the write-ahead file on and off), replay read throughput,
//! and open (recovery) time.
//!
//! Run: `cargo bench -p keywatch-benches --bench event_log`. Every change set holds one put
//! with a 16-byte key and a 200-byte value. Files live in a temporary directory on the default
//! disk. `KEYWATCH_BENCH_OPEN_EVENTS` sets the size of the log the open bench reopens
//! (default 1,000,000).

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use event_log::{Durability, EventLog, LogConfig};
use latency::Latencies;
use watch_core::{ChangeSet, Event, KeyValue, Revision};

/// A change set with one 200-byte put.
fn change(rev: Revision) -> ChangeSet {
    let kv = KeyValue {
        key: format!("/bench/k{:010}", rev % 100_000).into(),
        value: vec![b'v'; 200].into(),
        create_revision: rev,
        mod_revision: rev,
        version: 1,
        lease: 0,
    };
    ChangeSet::new(rev, vec![Event::put(kv, None)])
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// The write-ahead file on (the default) or off (every batch a durable redb commit, as before
/// it existed): both run in the same bench, side by side.
fn wal_limits(on: bool) -> Option<event_log::WalLimits> {
    on.then(event_log::WalLimits::default)
}

fn variant(wal: bool) -> &'static str {
    if wal { "wal" } else { "redb-only" }
}

/// Durable change sets per second when each commit (one fsync) carries `batch` change sets.
fn append_throughput(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("event_log/append_durable");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(4));
    for (batch, wal) in [1usize, 64, 1024]
        .into_iter()
        .flat_map(|b| [(b, true), (b, false)])
    {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = LogConfig {
            wal: wal_limits(wal),
            durability: Durability::Fsync,
            batch_size: batch,
            // Long enough for a burst of `batch` submissions to fill the batch, which is then
            // committed at once (the writer does not wait once a batch is full).
            flush_interval: Duration::from_millis(5),
            queue_capacity: batch * 2,
            ..LogConfig::default()
        };
        let log = EventLog::open(dir.path(), config).expect("open");
        let mut next: Revision = 1;
        group.throughput(Throughput::Elements(batch as u64));
        group.bench_function(BenchmarkId::new(variant(wal), batch), |b| {
            b.iter(|| {
                rt.block_on(async {
                    let mut acks = Vec::with_capacity(batch);
                    for _ in 0..batch {
                        acks.push(log.submit(&change(next)).await.expect("submit"));
                        next += 1;
                    }
                    for a in acks {
                        a.await.expect("durable");
                    }
                });
            });
        });
    }
    group.finish();
}

mod latency {
    //! Latency samples shared by concurrent submitters.
    use std::sync::Mutex;
    use std::time::Duration;

    #[derive(Default)]
    pub(crate) struct Latencies(Mutex<Vec<Duration>>);

    impl Latencies {
        pub(crate) fn push(&self, d: Duration) {
            if let Ok(mut v) = self.0.lock() {
                v.push(d);
            }
        }

        /// (p50, p99, max) and the sample count, clearing the samples.
        pub(crate) fn take_summary(&self) -> Option<(Duration, Duration, Duration, usize)> {
            let mut v = std::mem::take(&mut *self.0.lock().ok()?);
            if v.is_empty() {
                return None;
            }
            v.sort_unstable();
            let at = |q: f64| v[((v.len() - 1) as f64 * q) as usize];
            Some((at(0.5), at(0.99), v[v.len() - 1], v.len()))
        }
    }
}

/// Time from `append` to its durable acknowledgement with `n` submitters appending at once.
/// Criterion reports the time for one round (every submitter appends once); the p50/p99 per
/// append are printed to stderr.
fn append_latency(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("event_log/append_latency");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(4));
    for (submitters, wal) in [1usize, 16, 256]
        .into_iter()
        .flat_map(|n| [(n, true), (n, false)])
    {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = LogConfig {
            wal: wal_limits(wal),
            ..LogConfig::default()
        };
        let log = Arc::new(EventLog::open(dir.path(), config).expect("open"));
        let next = Arc::new(tokio::sync::Mutex::new(1 as Revision));
        let lat = Arc::new(Latencies::default());
        group.throughput(Throughput::Elements(submitters as u64));
        group.bench_function(BenchmarkId::new(variant(wal), submitters), |b| {
            b.iter(|| {
                rt.block_on(async {
                    let tasks: Vec<_> = (0..submitters)
                        .map(|_| {
                            let (log, next, lat) = (log.clone(), next.clone(), lat.clone());
                            tokio::spawn(async move {
                                let start = Instant::now();
                                let ack = {
                                    let mut n = next.lock().await;
                                    let ack = log.submit(&change(*n)).await.expect("submit");
                                    *n += 1;
                                    ack
                                };
                                ack.await.expect("durable");
                                lat.push(start.elapsed());
                            })
                        })
                        .collect();
                    for t in tasks {
                        t.await.expect("task");
                    }
                });
            });
        });
        if let Some((p50, p99, max, n)) = lat.take_summary() {
            eprintln!(
                "event_log/append_latency/{}/{submitters}: {n} appends, p50 {p50:?}, p99 {p99:?}, max {max:?}",
                variant(wal)
            );
        }
    }
    group.finish();
}

/// Writes `events` change sets without fsync (setup only), in large batches.
fn fill(dir: &std::path::Path, events: u64) -> EventLog {
    let rt = runtime();
    let config = LogConfig {
        durability: Durability::NoSync,
        batch_size: 4096,
        queue_capacity: 16_384,
        ..LogConfig::default()
    };
    let log = EventLog::open(dir, config).expect("open");
    rt.block_on(async {
        let mut acks = Vec::with_capacity(8192);
        for rev in 1..=events {
            acks.push(log.submit(&change(rev)).await.expect("submit"));
            if acks.len() == 8192 {
                for a in acks.drain(..) {
                    a.await.expect("append");
                }
            }
        }
        for a in acks {
            a.await.expect("append");
        }
    });
    log
}

/// Change sets per second read back by `replay` (decode and checksum included).
fn replay_throughput(c: &mut Criterion) {
    const EVENTS: u64 = 200_000;
    let dir = tempfile::tempdir().expect("tempdir");
    let log = fill(dir.path(), EVENTS);
    let mut group = c.benchmark_group("event_log/replay");
    group
        .sample_size(10)
        .throughput(Throughput::Elements(EVENTS));
    group.bench_function(BenchmarkId::from_parameter(EVENTS), |b| {
        b.iter(|| {
            let mut n = 0u64;
            for cs in log.replay(0) {
                n += cs.expect("replay").events.len() as u64;
            }
            assert_eq!(n, EVENTS);
        });
    });
    group.finish();
}

/// Time to open (and close) a log of many change sets, with and without page verification.
fn open_time(c: &mut Criterion) {
    let events: u64 = std::env::var("KEYWATCH_BENCH_OPEN_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let dir = tempfile::tempdir().expect("tempdir");
    let t = Instant::now();
    drop(fill(dir.path(), events));
    let size = std::fs::metadata(dir.path().join(event_log::STORE_FILE)).map_or(0, |m| m.len());
    eprintln!(
        "event_log/open: filled {events} change sets ({:.0} MiB) in {:?}",
        size as f64 / (1 << 20) as f64,
        t.elapsed()
    );
    let mut group = c.benchmark_group("event_log/open");
    group.sample_size(10);
    for verify in [false, true] {
        let name = if verify { "verified" } else { "unverified" };
        group.bench_function(BenchmarkId::new(name, events), |b| {
            b.iter(|| {
                let config = LogConfig {
                    verify_on_open: verify,
                    ..LogConfig::default()
                };
                let log = EventLog::open(dir.path(), config).expect("open");
                assert_eq!(log.last_revision(), events);
            });
        });
    }
    group.finish();
}

// In a private module so the generated `pub fn` needs no doc.
mod harness {
    use super::*;

    criterion_group! {
        name = benches;
        config = Criterion::default().warm_up_time(Duration::from_secs(1));
        targets = append_throughput, append_latency, replay_throughput, open_time
    }
}
criterion_main!(harness::benches);

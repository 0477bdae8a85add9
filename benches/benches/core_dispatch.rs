//! watch-core dispatch benchmarks: publish cost, dispatch cost as watchers grow, prefix
//! dispatch as prefixes grow, and single-core fan-out.
//!
//! Run: `cargo bench -p keywatch-benches --bench core_dispatch`.

use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use watch_core::{
    ChangeSet, EngineConfig, Event, KeySelector, KeyValue, WatchEngine, WatchHandle, WatchMessage,
    WatchOptions,
};

fn put(rev: u64, key: &Bytes) -> ChangeSet {
    let kv = KeyValue {
        key: key.clone(),
        value: Bytes::from_static(b"value-of-some-length"),
        create_revision: rev,
        mod_revision: rev,
        version: 1,
        lease: 0,
    };
    ChangeSet::new(rev, vec![Event::put(kv, None)])
}

fn current_thread() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// Registers `n` exact-key watchers on keys no benchmark event touches.
fn idle_exact(engine: &WatchEngine, n: usize) -> Vec<WatchHandle> {
    (0..n)
        .map(|i| {
            engine
                .watch(
                    KeySelector::key(format!("idle/{i:08}")),
                    WatchOptions::default(),
                )
                .expect("register")
        })
        .collect()
}

async fn drain(h: &mut WatchHandle, n: u64) {
    let mut got = 0;
    while got < n {
        match h.recv().await {
            Some(WatchMessage::Events(_)) => got += 1,
            Some(_) => {}
            None => panic!("watcher ended"),
        }
    }
}

/// Time of `iters` rounds of: publish `batch` puts to `key`, then receive them all on `hit`.
fn timed_rounds(
    iters: u64,
    rt: &tokio::runtime::Runtime,
    engine: &WatchEngine,
    hit: &mut WatchHandle,
    key: &Bytes,
    rev: &mut u64,
    batch: u64,
) -> Duration {
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        let start = Instant::now();
        for _ in 0..batch {
            *rev += 1;
            engine.publish(put(*rev, key)).expect("publish");
        }
        rt.block_on(drain(hit, batch));
        total += start.elapsed();
    }
    total
}

/// Cost of `publish` alone (the state machine's side) with a dispatcher running on another
/// thread, as non-matching watchers grow.
fn publish_cost(c: &mut Criterion) {
    let mut g = c.benchmark_group("publish");
    for n in [0usize, 1_000, 1_000_000] {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let (engine, dispatcher) = WatchEngine::new(EngineConfig::default());
        rt.spawn(dispatcher.run());
        let _idle = idle_exact(&engine, n);
        let key = Bytes::from_static(b"bench/key");
        let mut rev = 0;
        g.bench_function(BenchmarkId::from_parameter(n), |b| {
            b.iter_batched(
                || {
                    rev += 1;
                    put(rev, &key)
                },
                |cs| engine.publish(cs).expect("publish"),
                criterion::BatchSize::SmallInput,
            )
        });
        engine.shutdown();
    }
    g.finish();
}

/// Publish → dispatch → receive time per event for one matching watcher, as non-matching
/// exact-key watchers grow.
fn dispatch_vs_idle_watchers(c: &mut Criterion) {
    let mut g = c.benchmark_group("dispatch_per_event_vs_idle_watchers");
    const BATCH: u64 = 1_000;
    g.throughput(Throughput::Elements(BATCH));
    for n in [1usize, 1_000, 1_000_000] {
        let rt = current_thread();
        let (engine, dispatcher) = WatchEngine::new(EngineConfig::default());
        rt.spawn(dispatcher.run());
        let _idle = idle_exact(&engine, n);
        let key = Bytes::from_static(b"hit");
        let mut hit = engine
            .watch(
                KeySelector::key("hit"),
                WatchOptions::default().buffer(BATCH as u32),
            )
            .expect("register");
        let mut rev = 0;
        g.bench_function(BenchmarkId::from_parameter(n), |b| {
            b.iter_custom(|iters| {
                timed_rounds(iters, &rt, &engine, &mut hit, &key, &mut rev, BATCH)
            })
        });
        engine.shutdown();
    }
    g.finish();
}

/// Per-event time for a key matching one prefix watcher while P other prefixes are registered.
fn prefix_dispatch(c: &mut Criterion) {
    let mut g = c.benchmark_group("prefix_dispatch_vs_registered_prefixes");
    const BATCH: u64 = 1_000;
    g.throughput(Throughput::Elements(BATCH));
    for p in [10usize, 1_000, 1_000_000] {
        let rt = current_thread();
        let (engine, dispatcher) = WatchEngine::new(EngineConfig::default());
        rt.spawn(dispatcher.run());
        let _others: Vec<_> = (0..p)
            .map(|i| {
                engine
                    .watch(
                        KeySelector::prefix(format!("svc/{i}/")),
                        WatchOptions::default(),
                    )
                    .expect("register")
            })
            .collect();
        let mut hit = engine
            .watch(
                KeySelector::prefix("app/"),
                WatchOptions::default().buffer(BATCH as u32),
            )
            .expect("register");
        let key = Bytes::from_static(b"app/instance/10.0.0.7");
        let mut rev = 0;
        g.bench_function(BenchmarkId::from_parameter(p), |b| {
            b.iter_custom(|iters| {
                timed_rounds(iters, &rt, &engine, &mut hit, &key, &mut rev, BATCH)
            })
        });
        engine.shutdown();
    }
    g.finish();
}

/// One prefix, 10k watchers, on one core (current-thread runtime): deliveries per second,
/// counting publish, dispatch and each consumer's receive.
fn fan_out(c: &mut Criterion) {
    let mut g = c.benchmark_group("fan_out_one_prefix");
    const WATCHERS: usize = 10_000;
    const EVENTS: u64 = 8;
    g.throughput(Throughput::Elements(WATCHERS as u64 * EVENTS));
    let rt = current_thread();
    let (engine, dispatcher) = WatchEngine::new(EngineConfig::default());
    rt.spawn(dispatcher.run());
    let mut watchers: Vec<_> = (0..WATCHERS)
        .map(|_| {
            engine
                .watch(
                    KeySelector::prefix("/services/api/"),
                    WatchOptions::default().buffer(16),
                )
                .expect("register")
        })
        .collect();
    let key = Bytes::from_static(b"/services/api/10.0.0.7");
    let mut rev = 0;
    g.bench_function(BenchmarkId::from_parameter(WATCHERS), |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let start = Instant::now();
                for _ in 0..EVENTS {
                    rev += 1;
                    engine.publish(put(rev, &key)).expect("publish");
                }
                rt.block_on(async {
                    for w in watchers.iter_mut() {
                        drain(w, EVENTS).await;
                    }
                });
                total += start.elapsed();
            }
            total
        })
    });
    engine.shutdown();
    g.finish();
}

// In a private module so the generated `pub fn` needs no doc.
mod harness {
    use super::*;

    criterion_group! {
        name = benches;
        config = Criterion::default().sample_size(20).measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
        targets = publish_cost, dispatch_vs_idle_watchers, prefix_dispatch, fan_out
    }
}
criterion_main!(harness::benches);

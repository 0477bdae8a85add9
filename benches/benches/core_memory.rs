//! Memory per idle exact-key watcher: registers 1M watchers on distinct keys and reports the
//! growth of the process's resident set (RSS, from /proc/self/statm) per watcher.
//!
//! Run: `cargo bench -p keywatch-benches --bench core_memory` (optionally `-- <count>`).
//! The handles are kept in a vector allocated before the baseline is taken, so the figure is
//! what the engine holds per watcher: registry entry, watcher state and its key bytes. Measured
//! twice: standalone handles (each has its own queue) and registrations sharing one outbox (a
//! server's watch stream).

use watch_core::{EngineConfig, KeySelector, OutboxLimits, WatchEngine, WatchOptions};

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let count: usize = args
        .iter()
        .find_map(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    match args.iter().find(|a| *a == "handles" || *a == "outbox") {
        Some(v) if v == "handles" => handles(count),
        Some(_) => outbox(count),
        // Each variant in a process of its own: memory the first one freed would otherwise
        // be reused by the second and hide its growth.
        None => {
            let exe = std::env::current_exe().expect("current exe");
            for variant in ["outbox", "handles"] {
                let status = std::process::Command::new(&exe)
                    .arg(count.to_string())
                    .arg(variant)
                    .status()
                    .expect("run variant");
                assert!(status.success(), "{variant}: {status}");
            }
        }
    }
}

/// Registers `count` idle exact-key watchers with `register` and prints the RSS growth per
/// watcher. The vector is allocated before the baseline, so only the engine's side counts.
fn measure<T>(
    count: usize,
    what: &str,
    extra: usize,
    mut register: impl FnMut(usize, String) -> T,
) {
    let mut kept: Vec<T> = Vec::with_capacity(count);
    let warm = register(usize::MAX, "warm-up".to_owned());
    let before = rss_bytes();
    for i in 0..count {
        kept.push(register(i, format!("/svc/api/inst-{i:06}")));
    }
    let after = rss_bytes();
    let per = (after.saturating_sub(before)) as f64 / count as f64;
    eprintln!(
        "core_memory: {count} idle exact-key watchers {what} (20-byte keys): RSS +{:.1} MiB, {per:.0} bytes/watcher (engine side; the caller keeps {extra} bytes more each)",
        (after - before) as f64 / (1 << 20) as f64
    );
    drop(warm);
    drop(kept);
}

/// Standalone handles, each with its own queue (an embedder's watchers).
fn handles(count: usize) {
    let (engine, _dispatcher) = WatchEngine::new(EngineConfig::default());
    measure(
        count,
        "with handles, each its own queue",
        std::mem::size_of::<Option<watch_core::WatchHandle>>(),
        |_, key| {
            engine
                .watch(KeySelector::key(key), WatchOptions::default())
                .ok()
        },
    );
}

/// Watchers sharing one outbox, as a server's watch stream registers them.
fn outbox(count: usize) {
    let (engine, _dispatcher) = WatchEngine::new(EngineConfig::default());
    let outbox = engine.outbox(OutboxLimits::default());
    measure(
        count,
        "in one outbox",
        std::mem::size_of::<Option<watch_core::Registration>>(),
        |i, key| {
            outbox
                .watch(i as u64, KeySelector::key(key), WatchOptions::default())
                .ok()
                .map(|(r, _)| r)
        },
    );
}

//! keywatch-loadgen: an end-to-end load generator that runs the same scenarios against keywatch
//! and etcd, side by side, over the etcd v3 API (watch-proto's generated tonic clients).
//!
//! Each case runs against a freshly started server (loopback, temporary data dir, killed and
//! removed afterwards); the two servers alternate which goes first from one case to the next, so
//! slow drift on a shared machine does not favour either. Every run checks what each watcher
//! received (missing, duplicate, out-of-order events, see [`check`]); a wrong run fails the
//! whole invocation, however fast it was.
//!
//! - [`server`]: keywatch and etcd started through `testkit`, RSS.
//! - [`client`]: connections, watch streams carrying many watchers, writers.
//! - [`scenarios`]: fan-out, spread, history, register, stalled, large.
//! - [`lease`]: lease grant, keep-alive and expiry measurements (`keywatch-lease-bench`).
//! - [`fsync`]: the disk's fsync latency, probed before and after the runs, so put latency is
//!   compared with the durable-write floor of the same run.
//! - [`report`]: JSON, the markdown section of `docs/benchmarks.md`, SVG charts.
//!
//! Every run is checked, not only timed: a watcher's [`check::Seen`] is compared with the
//! [`check::Digest`] of what the writers were told was committed.
//!
//! ```
//! use loadgen::check::{Digest, Seen, Verdict};
//!
//! let mut written = Digest::default();
//! let mut seen = Seen::default();
//! seen.begin_response(false);
//! for rev in [2, 3, 5] {
//!     written.add(rev);
//!     seen.event(rev, true);
//! }
//! let mut verdict = Verdict::default();
//! verdict.watcher(&seen, &written);
//! assert!(verdict.ok(), "{}", verdict.summary());
//!
//! seen.event(5, true); // a duplicate
//! let mut verdict = Verdict::default();
//! verdict.watcher(&seen, &written);
//! assert!(!verdict.ok());
//! ```
//!
//! # Design
//!
//! `keywatch-loadgen` (lib `loadgen` + binary): the end-to-end comparison with etcd. It starts
//! `watch-server` and `etcd` through `testkit` (`server`: which server, RSS), speaks only watch-proto's generated tonic clients
//! (`client`: many watchers per stream, writers that stamp the put time into the value), runs the
//! scenarios fan-out, spread, history, register, stalled, large (`scenarios`; large, the
//! 1M × 1 KiB dataset of issue 14, runs once per server whatever `--repeat` says), alternating
//! which server goes first, and writes the JSON, SVG charts (plotters, SVG backend, no system fonts) and the
//! section of `docs/benchmarks.md` between the `loadgen` markers (`report`). Every run checks each
//! watcher's events (count, sum and sum of squares of revisions, strictly increasing: `check`);
//! a wrong run makes the binary exit non-zero, as does a revision split over two responses
//! without `fragment`. Fan-out cases record each server's CPU seconds (`utime` + `stime` from
//! `/proc/<pid>/stat` before and after the measured phase) per million delivered events; the paced
//! case also runs "busy", with one spinning copy of the load generator per core
//! (`server::Burners`, ended with the case and after at most 600 s). etcd absent: keywatch is
//! measured alone.
//! `keywatch-lease-bench` (`lease` module + `src/bin/lease_bench.rs`) measures leases over the
//! same Lease API on both servers: grants/s, keep-alives/s on one stream, and the expiry of many
//! leased keys seen by a prefix watcher (each DELETE once, one per revision).
//!
//! `crates/loadgen/src/bin/mirror-bench.rs` (`keywatch-mirror-bench`): a keywatch mirror
//! replica side by side with etcd's `grpc-proxy` over one loopback 3-member etcd cluster
//! (optionally TLS): etcd's own watcher gauge, registrations/s and RSS per idle downstream
//! watcher, put → event latency, lost/duplicated events across a leader kill, a watch from a
//! past revision; writes its section of `docs/cluster.md`.

pub mod check;
pub mod client;
pub mod fsync;
pub mod lease;
pub mod report;
pub mod scenarios;
pub mod server;

use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use crate::scenarios::{Case, RunResult};
use crate::server::{Binaries, Server, Target};

/// What can stop a run from measuring at all (as opposed to measuring a wrong result, which is
/// a [`check::Verdict`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// etcd was asked for but is not installed.
    #[error("etcd is not installed")]
    NoEtcd,
    /// A server did not come up (or a local resource for it was missing).
    #[error(transparent)]
    Start(#[from] testkit::Error),
    /// A connection or RPC failure outside a measured run.
    #[error("{0}")]
    Rpc(String),
    /// A local process of the load generator (a CPU burner of a busy case) failed to start.
    #[error("{0}: {1}")]
    Io(String, #[source] std::io::Error),
    /// Drawing a chart failed.
    #[error("chart: {0}")]
    Chart(String),
}

/// Sizes of every scenario.
#[derive(Clone, Debug, Serialize)]
pub struct Sizes {
    /// Fan-out: watcher counts, one case each.
    pub fanout_watchers: Vec<usize>,
    /// Fan-out: connections the watchers are spread over.
    pub fanout_connections: usize,
    /// Fan-out: events delivered per case (puts = this / watchers, clamped).
    pub fanout_events: usize,
    /// Fan-out: fewest and most puts per case.
    pub fanout_puts: (usize, usize),
    /// Paced fan-out: watchers, puts, puts/s. Run twice: on a quiet machine and while
    /// another process loads every core.
    pub paced: (usize, usize, f64),
    /// Spread: watchers, puts, and the writer counts (one case each; the issue-14 targets
    /// are judged on the first).
    pub spread: (usize, usize, Vec<usize>),
    /// History: watchers, past events.
    pub history: (usize, usize),
    /// Register: watchers, connections.
    pub register: (usize, usize),
    /// Stalled: healthy watchers, stalled watchers, puts, puts/s.
    pub stalled: (usize, usize, usize, f64),
    /// Stalled: connections of the stalled watchers.
    pub stalled_connections: usize,
    /// Stalled: value size (large, so stalled streams fill their flow-control windows).
    pub stalled_value_size: usize,
    /// Large dataset: keys, value bytes, writers of the load. Run once per server whatever
    /// [`Sizes::repeat`] says (it is the longest case by far).
    pub large: (usize, usize, usize),
    /// Connections of spread and history watchers.
    pub connections: usize,
    /// Concurrent writers of unpaced fan-out and history setup.
    pub writers: usize,
    /// Value size of every other put (8 bytes of it are the put time).
    pub value_size: usize,
    /// Runs of each case per server; the report keeps each metric's median over them (runs of
    /// the two servers alternate, so drift on a shared machine hits both alike).
    pub repeat: usize,
    /// Scenarios to run (names as [`Case::scenario`] prints them); `None` runs every one.
    pub scenarios: Option<Vec<String>>,
}

impl Sizes {
    /// The defaults of `cargo xtask bench`: a few minutes for both servers on 2 cores.
    pub fn full() -> Sizes {
        Sizes {
            fanout_watchers: vec![100, 1_000, 10_000],
            fanout_connections: 8,
            fanout_events: 500_000,
            fanout_puts: (50, 2_000),
            paced: (1_000, 2_500, 500.0),
            spread: (1_000, 20_000, vec![8, 64]),
            history: (100, 10_000),
            register: (50_000, 4),
            stalled: (100, 1_000, 300, 100.0),
            stalled_connections: 10,
            stalled_value_size: 1024,
            large: (1_000_000, 1024, 64),
            connections: 4,
            writers: 4,
            value_size: 64,
            repeat: 3,
            scenarios: None,
        }
    }

    /// Every scenario, tiny: keeps the code exercised in CI.
    pub fn quick() -> Sizes {
        Sizes {
            fanout_watchers: vec![10, 50],
            fanout_connections: 2,
            fanout_events: 2_000,
            fanout_puts: (20, 50),
            paced: (10, 20, 200.0),
            spread: (20, 200, vec![4]),
            history: (5, 200),
            register: (500, 2),
            stalled: (5, 20, 20, 200.0),
            stalled_connections: 2,
            stalled_value_size: 1024,
            large: (2_000, 1024, 8),
            connections: 2,
            writers: 4,
            value_size: 64,
            repeat: 1,
            scenarios: None,
        }
    }

    /// Every case, grouped by scenario in a fixed order.
    pub fn cases(&self) -> Vec<Vec<Case>> {
        let fanout = self
            .fanout_watchers
            .iter()
            .map(|&w| Case::Fanout {
                watchers: w,
                connections: self.fanout_connections.min(w),
                puts: (self.fanout_events / w.max(1)).clamp(self.fanout_puts.0, self.fanout_puts.1),
                rate: None,
                busy: false,
            })
            .chain([false, true].map(|busy| Case::Fanout {
                watchers: self.paced.0,
                connections: self.fanout_connections.min(self.paced.0),
                puts: self.paced.1,
                rate: Some(self.paced.2),
                busy,
            }))
            .collect();
        let (h, s, p, r) = self.stalled;
        let groups = vec![
            fanout,
            self.spread
                .2
                .iter()
                .map(|&writers| Case::Spread {
                    watchers: self.spread.0,
                    puts: self.spread.1,
                    writers,
                })
                .collect(),
            vec![Case::History {
                watchers: self.history.0,
                puts: self.history.1,
            }],
            vec![Case::Register {
                watchers: self.register.0,
                connections: self.register.1,
            }],
            [0, s]
                .into_iter()
                .map(|stalled| Case::Stalled {
                    healthy: h,
                    stalled,
                    puts: p,
                    rate: r,
                })
                .collect(),
            vec![Case::Large {
                keys: self.large.0,
                value_size: self.large.1,
                writers: self.large.2,
            }],
        ];
        groups
            .into_iter()
            .filter(|g: &Vec<Case>| {
                self.scenarios.as_ref().is_none_or(|only| {
                    g.first()
                        .is_some_and(|c| only.iter().any(|n| n == c.scenario()))
                })
            })
            .collect()
    }
}

/// Runs every case of `sizes` against keywatch and, when `bins.etcd` is set, etcd; alternating
/// which goes first. A run that cannot start is recorded as a failed run, not an abort.
pub async fn run_all(bins: &Binaries, sizes: &Sizes, progress: bool) -> Vec<RunResult> {
    let targets: Vec<Target> = if bins.etcd.is_some() {
        vec![Target::Keywatch, Target::Etcd]
    } else {
        vec![Target::Keywatch]
    };
    let mut results = Vec::new();
    let mut flip = false;
    for group in sizes.cases() {
        let bar = if progress {
            ProgressBar::new((group.len() * targets.len() * sizes.repeat.max(1)) as u64)
        } else {
            ProgressBar::hidden()
        };
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix:>9} [{bar:30}] {pos}/{len} {elapsed:>4} {wide_msg}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        bar.set_prefix(group[0].scenario());
        bar.enable_steady_tick(Duration::from_millis(200));
        for case in &group {
            let mut per_target: Vec<(Target, Vec<RunResult>)> =
                targets.iter().map(|&t| (t, Vec::new())).collect();
            // The large case runs once: it is minutes per server at full size.
            let repeat = match case {
                Case::Large { .. } => 1,
                _ => sizes.repeat.max(1),
            };
            for rep in 0..repeat {
                let mut order = targets.clone();
                if flip {
                    order.reverse();
                }
                flip = !flip;
                for target in order {
                    bar.set_message(format!("{case} on {target} (run {})", rep + 1));
                    let r = run_one(case, target, bins, sizes).await;
                    let line = format!(
                        "{:>9} {:<32} {:<8} {}  {}",
                        case.scenario(),
                        case.to_string(),
                        target.to_string(),
                        report::headline(&r),
                        r.verdict.summary()
                    );
                    // A bar drawn nowhere (not a terminal) would swallow the line.
                    if !bar.is_hidden() {
                        bar.println(line);
                    } else {
                        eprintln!("{line}");
                    }
                    if let Some((_, runs)) = per_target.iter_mut().find(|(t, _)| *t == target) {
                        runs.push(r);
                    }
                    bar.inc(1);
                }
            }
            results.extend(
                per_target
                    .into_iter()
                    .filter_map(|(_, runs)| median_run(runs)),
            );
        }
        bar.finish_with_message("done");
    }
    results
}

/// One result standing for several runs of the same case on the same server: every metric and
/// latency figure is the median over the runs (the upper one of an even count), the verdicts are
/// summed (a wrong run makes the result wrong), the wall times added, and the latency curve is
/// the one of the run whose p99 is the median.
fn median_run(mut runs: Vec<RunResult>) -> Option<RunResult> {
    fn median(mut v: Vec<f64>) -> f64 {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    }
    if runs.len() <= 1 {
        return runs.pop();
    }
    let n = runs.len();
    let mut metrics = std::collections::BTreeMap::new();
    let names: std::collections::BTreeSet<String> = runs
        .iter()
        .flat_map(|r| r.metrics.keys().cloned())
        .collect();
    for name in names {
        let vals: Vec<f64> = runs.iter().filter_map(|r| r.metric(&name)).collect();
        if !vals.is_empty() {
            metrics.insert(name, median(vals));
        }
    }
    let latency = |get: fn(&RunResult) -> Option<&scenarios::Latency>| {
        let all: Vec<&scenarios::Latency> = runs.iter().filter_map(get).collect();
        if all.is_empty() {
            return None;
        }
        let mut by_p99 = all.clone();
        by_p99.sort_by(|a, b| a.p99_ms.total_cmp(&b.p99_ms));
        let mid = by_p99[by_p99.len() / 2];
        Some(scenarios::Latency {
            count: all.iter().map(|l| l.count).sum(),
            p50_ms: median(all.iter().map(|l| l.p50_ms).collect()),
            p99_ms: mid.p99_ms,
            p999_ms: median(all.iter().map(|l| l.p999_ms).collect()),
            max_ms: median(all.iter().map(|l| l.max_ms).collect()),
            curve: mid.curve.clone(),
        })
    };
    let event_latency = latency(|r| r.event_latency.as_ref());
    let put_latency = latency(|r| r.put_latency.as_ref());
    let mut verdict = check::Verdict::default();
    let mut wall_s = 0.0;
    let first = runs.swap_remove(0);
    wall_s += first.wall_s;
    verdict.merge(first.verdict.clone());
    for r in runs {
        wall_s += r.wall_s;
        verdict.merge(r.verdict);
    }
    metrics.insert("runs".to_string(), n as f64);
    Some(RunResult {
        case: first.case,
        target: first.target,
        metrics,
        event_latency,
        put_latency,
        verdict,
        wall_s,
    })
}

async fn run_one(case: &Case, target: Target, bins: &Binaries, sizes: &Sizes) -> RunResult {
    let started = std::time::Instant::now();
    let server = tokio::task::block_in_place(|| Server::start(target, bins));
    let result = match server {
        Ok(mut server) => scenarios::run(case, &mut server, sizes).await,
        Err(e) => Err(e),
    };
    result.unwrap_or_else(|e| {
        let mut verdict = check::Verdict::default();
        verdict.error(format!("run failed: {e}"));
        RunResult {
            case: case.clone(),
            target,
            metrics: Default::default(),
            event_latency: None,
            put_latency: None,
            verdict,
            wall_s: started.elapsed().as_secs_f64(),
        }
    })
}

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
//! - [`scenarios`]: fan-out, spread, history, register, stalled.
//! - [`lease`]: lease grant, keep-alive and expiry measurements (`keywatch-lease-bench`).
//! - [`fsync`]: the disk's fsync latency, probed before and after the runs, so put latency is
//!   compared with the durable-write floor of the same run.
//! - [`report`]: JSON, the markdown section of `docs/benchmarks.md`, SVG charts.

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
    /// Paced fan-out: watchers, puts, puts/s.
    pub paced: (usize, usize, f64),
    /// Spread: watchers, puts, writers.
    pub spread: (usize, usize, usize),
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
    /// Connections of spread and history watchers.
    pub connections: usize,
    /// Concurrent writers of unpaced fan-out and history setup.
    pub writers: usize,
    /// Value size of every other put (8 bytes of it are the put time).
    pub value_size: usize,
}

impl Sizes {
    /// The defaults of `cargo xtask bench`: a few minutes for both servers on 2 cores.
    pub fn full() -> Sizes {
        Sizes {
            fanout_watchers: vec![100, 1_000, 10_000],
            fanout_connections: 8,
            fanout_events: 500_000,
            fanout_puts: (50, 2_000),
            paced: (1_000, 500, 100.0),
            spread: (1_000, 20_000, 64),
            history: (100, 10_000),
            register: (50_000, 4),
            stalled: (100, 1_000, 300, 100.0),
            stalled_connections: 10,
            stalled_value_size: 1024,
            connections: 4,
            writers: 4,
            value_size: 64,
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
            spread: (20, 200, 4),
            history: (5, 200),
            register: (500, 2),
            stalled: (5, 20, 20, 200.0),
            stalled_connections: 2,
            stalled_value_size: 1024,
            connections: 2,
            writers: 4,
            value_size: 64,
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
            })
            .chain(std::iter::once(Case::Fanout {
                watchers: self.paced.0,
                connections: self.fanout_connections.min(self.paced.0),
                puts: self.paced.1,
                rate: Some(self.paced.2),
            }))
            .collect();
        let (h, s, p, r) = self.stalled;
        vec![
            fanout,
            vec![Case::Spread {
                watchers: self.spread.0,
                puts: self.spread.1,
                writers: self.spread.2,
            }],
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
        ]
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
            ProgressBar::new((group.len() * targets.len()) as u64)
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
            let mut order = targets.clone();
            if flip {
                order.reverse();
            }
            flip = !flip;
            for target in order {
                bar.set_message(format!("{case} on {target}"));
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
                results.push(r);
                bar.inc(1);
            }
        }
        bar.finish_with_message("done");
    }
    results
}

async fn run_one(case: &Case, target: Target, bins: &Binaries, sizes: &Sizes) -> RunResult {
    let started = std::time::Instant::now();
    let server = tokio::task::block_in_place(|| Server::start(target, bins));
    let result = match server {
        Ok(server) => scenarios::run(case, &server, sizes).await,
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

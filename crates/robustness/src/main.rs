//! `keywatch-robustness`: runs seeded randomized workloads against a watch-server binary and
//! validates them (`random`), or the stalled-watchers pressure scenario (`stalled`). Usually
//! started by `cargo xtask robustness`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use keywatch_robustness::validate::validate;
use keywatch_robustness::workload::{self, RunConfig};

#[derive(Parser)]
#[command(about = "keywatch robustness runner and validator")]
struct Cli {
    /// The watch-server binary to test [default: the one next to this executable].
    #[arg(long, global = true)]
    server_bin: Option<PathBuf>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Randomized workloads with kills, validated offline. Without --seed: seeds 1 and 2 plus
    /// one random seed (printed).
    Random {
        /// Seconds of workload per seed.
        #[arg(long, default_value_t = 12)]
        duration: u64,
        /// Run only these seeds (repeatable).
        #[arg(long)]
        seed: Vec<u64>,
        /// kill -9 + restart per seed during the workload (one more follows it).
        #[arg(long, default_value_t = 2)]
        kills: usize,
        /// Watch streams per seed.
        #[arg(long, default_value_t = 24)]
        streams: usize,
    },
    /// Stalled watchers while writes happen: RSS bound, latency of healthy watchers.
    Stalled(keywatch_robustness::stalled::StalledArgs),
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let server_bin = testkit::find_watch_server(cli.server_bin)?;
    match cli.command {
        Cmd::Random {
            duration,
            seed,
            kills,
            streams,
        } => {
            let seeds = if seed.is_empty() {
                let random = fastrand::u64(..1 << 48);
                println!("robustness: seeds 1, 2 and random seed {random}");
                vec![1, 2, random]
            } else {
                seed
            };
            let mut failed = Vec::new();
            for s in seeds {
                let started = Instant::now();
                let mut cfg = RunConfig::new(server_bin.clone(), s);
                cfg.duration = Duration::from_secs(duration);
                cfg.kills = kills;
                cfg.streams = streams;
                let run = workload::run(&cfg)
                    .await
                    .with_context(|| format!("seed {s}: the run itself failed"))?;
                let report = validate(&run);
                let sessions: usize = run.watchers.iter().map(|w| w.sessions.len()).sum();
                println!(
                    "robustness: seed {s}: {:.1?}, {} kills survived, final revision {}, {} writes \
                     acknowledged, {} unknown ({} happened), {} compactions, {} watchers / {} \
                     sessions, {} events, {} progress notifications and {} listed keys checked, \
                     {} compacted cancels, {} lease expiries/revokes (one revision each), {} violations",
                    started.elapsed(),
                    run.kills,
                    report.final_revision,
                    report.acked,
                    report.unknown,
                    report.unknown_applied,
                    run.compactions.len(),
                    run.watchers.len(),
                    sessions,
                    report.events_checked,
                    report.progress_checked,
                    report.initial_checked,
                    report.compacted_cancels,
                    report.lease_ends,
                    report.violations.len()
                );
                for v in &report.violations {
                    println!("robustness: VIOLATION seed {s}: {v}");
                }
                if !report.violations.is_empty() {
                    failed.push(s);
                }
            }
            if !failed.is_empty() {
                bail!("violations with seeds {failed:?} (rerun one: --seed N)");
            }
            Ok(())
        }
        Cmd::Stalled(args) => {
            let report = keywatch_robustness::stalled::run(&server_bin, &args).await?;
            println!("{report}");
            if !report.violations.is_empty() {
                bail!("stalled scenario failed");
            }
            Ok(())
        }
    }
}

//! `keywatch-loadgen`: runs every scenario against keywatch and etcd and writes the report.
//! See the library docs and `--help`.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Parser;
use loadgen::report::{self, Meta, Report};
use loadgen::server::Binaries;
use loadgen::{Sizes, run_all};

/// End-to-end load generator: keywatch vs etcd over the etcd v3 API.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// keywatch's `watch-server` binary [default: the one next to this executable].
    #[arg(long)]
    server_bin: Option<PathBuf>,
    /// etcd binary (default: `etcd` on PATH; skipped when absent).
    #[arg(long)]
    etcd_bin: Option<PathBuf>,
    /// Measure keywatch alone even when etcd is installed.
    #[arg(long)]
    no_etcd: bool,
    /// Every scenario, tiny (for CI: checks the code and correctness, not performance).
    #[arg(long)]
    quick: bool,
    /// Write nothing under docs/ (the JSON still goes to --out-dir when given).
    #[arg(long)]
    no_write: bool,
    /// The markdown file whose `loadgen` section is rewritten.
    #[arg(long, default_value = "docs/benchmarks.md")]
    doc: PathBuf,
    /// Where charts and raw JSON go (default: docs/bench, or nowhere with --no-write).
    #[arg(long)]
    out_dir: Option<PathBuf>,
    /// No progress bars.
    #[arg(long)]
    no_progress: bool,
    /// Fan-out watcher counts, comma-separated (overrides the mode's default).
    #[arg(long, value_delimiter = ',')]
    fanout_watchers: Option<Vec<usize>>,
    /// Register scenario watchers (overrides the mode's default).
    #[arg(long)]
    register_watchers: Option<usize>,
    /// Runs of each case per server, alternating the servers; the report keeps the medians
    /// (default: 3, or 1 with --quick).
    #[arg(long)]
    repeat: Option<usize>,
    /// Only these scenarios, comma-separated: fan-out, spread, history, register, stalled,
    /// large.
    #[arg(long, value_delimiter = ',')]
    scenarios: Option<Vec<String>>,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    // A CPU burner of a busy case (see `server::Burners`), not a run.
    if let Some(secs) = std::env::var(loadgen::server::BURN_ENV)
        .ok()
        .and_then(|s| s.parse().ok())
    {
        loadgen::server::burn(secs);
        return Ok(());
    }
    let args = Args::parse();
    let keywatch = testkit::find_watch_server(args.server_bin.clone())?;
    let etcd = if args.no_etcd {
        None
    } else {
        Binaries::find_etcd(args.etcd_bin.clone())
    };
    if etcd.is_none() && !args.no_etcd && testkit::etcd_required() {
        bail!("{}=1 but etcd was not found", testkit::REQUIRE_ETCD);
    }
    if etcd.is_none() {
        println!("etcd: not installed (or --no-etcd): SKIPPED, measuring keywatch alone");
    }
    let bins = Binaries { keywatch, etcd };
    let mut sizes = if args.quick {
        Sizes::quick()
    } else {
        Sizes::full()
    };
    if let Some(w) = args.fanout_watchers.clone() {
        sizes.fanout_watchers = w;
    }
    if let Some(w) = args.register_watchers {
        sizes.register.0 = w;
    }
    if let Some(n) = args.repeat {
        sizes.repeat = n.max(1);
    }
    if let Some(only) = args.scenarios.clone() {
        const NAMES: [&str; 6] = [
            "fan-out", "spread", "history", "register", "stalled", "large",
        ];
        if let Some(bad) = only.iter().find(|n| !NAMES.contains(&n.as_str())) {
            bail!(
                "unknown scenario {bad:?}: expected one of {}",
                NAMES.join(", ")
            );
        }
        sizes.scenarios = Some(only);
    }
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let mut meta = Meta::collect(bins.etcd.as_deref(), command, args.quick);
    let started = std::time::Instant::now();
    let runs = run_all(&bins, &sizes, !args.no_progress).await;
    meta.finish();
    let report = Report::new(meta, sizes, runs);

    let out_dir = match (&args.out_dir, args.no_write) {
        (Some(d), _) => Some(d.clone()),
        (None, false) => Some(PathBuf::from("docs/bench")),
        (None, true) => None,
    };
    let json_name = "loadgen.json";
    let mut charts = Vec::new();
    if let Some(dir) = &out_dir {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        let json = serde_json::to_string_pretty(&report)?;
        std::fs::write(dir.join(json_name), json + "\n")?;
        charts = report::charts(&report, dir)?
            .into_iter()
            .map(|(title, file)| (title, format!("bench/{file}")))
            .collect();
    }
    let section = report::markdown(&report, &charts, json_name);
    if args.no_write {
        println!("\n{section}");
    } else {
        let doc = std::fs::read_to_string(&args.doc).unwrap_or_default();
        std::fs::write(&args.doc, report::splice(&doc, &section))
            .with_context(|| format!("write {}", args.doc.display()))?;
        println!("wrote the loadgen section of {}", args.doc.display());
    }
    println!(
        "loadgen: {} runs in {:.0?}",
        report.runs.len(),
        started.elapsed()
    );
    let wrong: Vec<String> = report
        .runs
        .iter()
        .filter(|r| !r.verdict.ok())
        .map(|r| {
            format!(
                "{} {} on {}: {}",
                r.case.scenario(),
                r.case,
                r.target,
                r.verdict.summary()
            )
        })
        .collect();
    if !wrong.is_empty() {
        bail!(
            "{} run(s) were wrong:\n  {}",
            wrong.len(),
            wrong.join("\n  ")
        );
    }
    Ok(())
}

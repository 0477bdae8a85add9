//! `keywatch-lease-bench`: lease grants/s, keep-alives/s on one stream and the expiry of many
//! leased keys, against keywatch and (when installed) etcd, each freshly started. Prints a
//! markdown table for `docs/benchmarks.md` ("Leases"). See `loadgen::lease`.

use std::path::PathBuf;

use anyhow::Result;
use clap::Parser;
use loadgen::lease;
use loadgen::server::{Binaries, Server, Target};

/// Lease throughput and expiry, keywatch vs etcd.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// keywatch's `watch-server` binary [default: the one next to this executable].
    #[arg(long)]
    server_bin: Option<PathBuf>,
    /// etcd binary (default: `etcd` on PATH; skipped when absent).
    #[arg(long)]
    etcd_bin: Option<PathBuf>,
    /// Measure keywatch alone.
    #[arg(long)]
    no_etcd: bool,
    /// Leases granted in the grant measurement.
    #[arg(long, default_value_t = 20_000)]
    grants: usize,
    /// Concurrent clients (one connection) for grants and the expiry setup.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Keep-alives sent on the one stream.
    #[arg(long, default_value_t = 100_000)]
    keepalives: usize,
    /// Leases (one key each) in the expiry measurement.
    #[arg(long, default_value_t = 100_000)]
    expire: usize,
    /// Seconds from the start of the expiry setup to the leases' common deadline; must exceed
    /// the time to grant them all.
    #[arg(long, default_value_t = 60)]
    ttl: i64,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args = Args::parse();
    let keywatch = testkit::find_watch_server(args.server_bin.clone())?;
    let etcd = if args.no_etcd {
        None
    } else {
        Binaries::find_etcd(args.etcd_bin.clone())
    };
    let bins = Binaries {
        keywatch,
        etcd: etcd.clone(),
    };
    let mut targets = vec![Target::Keywatch];
    if etcd.is_some() {
        targets.push(Target::Etcd);
    } else {
        println!("etcd: not installed (or --no-etcd): SKIPPED, measuring keywatch alone");
    }
    let mut rows = Vec::new();
    for target in targets {
        // A fresh server per measurement, so one's leases do not weigh on the next.
        let s = Server::start(target, &bins)?;
        let grants = lease::grants(&s.endpoint, args.grants, args.concurrency, 600).await?;
        drop(s);
        let s = Server::start(target, &bins)?;
        let keepalives = lease::keepalives(&s.endpoint, args.keepalives).await?;
        drop(s);
        let s = Server::start(target, &bins)?;
        let e = lease::expire(&s.endpoint, args.expire, args.ttl, args.concurrency).await?;
        drop(s);
        println!("{target}: grants/s {grants:.0}, keep-alives/s {keepalives:.0}, expiry {e:?}");
        rows.push((target, grants, keepalives, e));
    }
    println!();
    println!(
        "| server | grants/s ({} leases, {} clients) | keep-alives/s (1 stream, {}) | {} leased keys: grant+put | deadline spread | last deadline → last DELETE | first deadline → last DELETE | expiries/s |",
        args.grants, args.concurrency, args.keepalives, args.expire
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (t, g, k, e) in rows {
        println!(
            "| {t} | {g:.0} | {k:.0} | {:.1} s | {:.2} s | {:.2} s | {:.2} s | {:.0} |",
            e.setup_secs,
            e.deadline_spread_secs,
            e.last_deadline_to_last_delete_secs,
            e.first_deadline_to_last_delete_secs,
            e.expiries_per_sec
        );
    }
    Ok(())
}

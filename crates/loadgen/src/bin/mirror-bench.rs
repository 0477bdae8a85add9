//! `keywatch-mirror-bench`: measures keywatch's mirror mode (docs/cluster.md) over a real
//! loopback etcd cluster and prints a markdown section for docs/benchmarks.md.
//!
//! It starts a 3-member etcd cluster and `--replicas` keywatch replicas mirroring it, then for
//! each downstream watcher count N:
//! - opens N idle exact-key watchers on every replica (streams of 5000),
//! - reads etcd's own watcher gauge (`etcd_debugging_mvcc_watcher_total`, summed over the
//!   members' /metrics): the upstream load,
//! - reads every replica's RSS (`VmRSS`),
//! - writes `--writes` puts to etcd member 0 (the first upstream endpoint, which every replica
//!   watches while it stays up; not necessarily the raft leader) at `--rate` per second and
//!   records, per put, the time from sending it to its event on a direct etcd watch on that
//!   same member and on one watcher per replica (same process, same clock): the tier's
//!   latency is the difference.
//!
//! Run: `cargo build --release -p watch-server -p keywatch-loadgen && \
//! target/release/keywatch-mirror-bench`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use hdrhistogram::Histogram;
use loadgen::client::{connect, histogram, record};
use testkit::{EtcdCluster, ServerProcess};
use tokio_stream::wrappers::ReceiverStream;
use watch_proto::etcdserverpb as pb;
use watch_proto::etcdserverpb::kv_client::KvClient;
use watch_proto::etcdserverpb::watch_client::WatchClient;

/// Mirror-mode measurements over a loopback etcd cluster.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// keywatch's `watch-server` binary [default: the one next to this executable].
    #[arg(long)]
    server_bin: Option<PathBuf>,
    /// etcd binary.
    #[arg(long, default_value = "etcd")]
    etcd_bin: PathBuf,
    /// keywatch replicas.
    #[arg(long, default_value_t = 2)]
    replicas: usize,
    /// Downstream watcher counts per replica, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "0,10000,50000")]
    watchers: Vec<usize>,
    /// Puts per latency run.
    #[arg(long, default_value_t = 1000)]
    writes: usize,
    /// Puts per second.
    #[arg(long, default_value_t = 200)]
    rate: u64,
}

const GUARD: Duration = Duration::from_secs(60);
const STREAM_WATCHERS: usize = 5000;

/// etcd's own count of the watchers it serves, summed over the members.
fn watcher_total(cluster: &EtcdCluster) -> Result<u64> {
    Ok(cluster.metric_sum("etcd_debugging_mvcc_watcher_total")? as u64)
}

fn create(key: &[u8], range_end: &[u8]) -> pb::WatchRequest {
    pb::WatchRequest {
        request_union: Some(pb::watch_request::RequestUnion::CreateRequest(
            pb::WatchCreateRequest {
                key: key.to_vec().into(),
                range_end: range_end.to_vec().into(),
                ..Default::default()
            },
        )),
    }
}

/// Opens `n` idle exact-key watchers on `url` and keeps their streams.
type Held = (
    tokio::sync::mpsc::Sender<pb::WatchRequest>,
    tonic::Streaming<pb::WatchResponse>,
);

async fn idle_watchers(url: &str, offset: usize, n: usize) -> Result<Vec<Held>> {
    let mut streams = Vec::new();
    let mut left = n;
    let mut i = offset;
    while left > 0 {
        let k = left.min(STREAM_WATCHERS);
        let ch = connect(url).await?;
        let (tx, rx) = tokio::sync::mpsc::channel(k);
        let mut s = WatchClient::new(ch)
            .watch(ReceiverStream::new(rx))
            .await?
            .into_inner();
        for _ in 0..k {
            tx.send(create(format!("/idle/{i}").as_bytes(), b""))
                .await?;
            i += 1;
        }
        let mut created = 0;
        while created < k {
            let m = s.message().await?.context("stream closed")?;
            if m.created {
                created += 1;
            }
        }
        // The request side stays open while the stream lives.
        streams.push((tx, s));
        left -= k;
    }
    Ok(streams)
}

/// Every event of the `/bench/` prefix on `url`, with its arrival time, until `n` arrived.
/// `ready` fires once the watch is created.
async fn probe(
    url: String,
    n: usize,
    ready: tokio::sync::oneshot::Sender<()>,
) -> Result<HashMap<i64, Instant>> {
    let ch = connect(&url).await?;
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(create(b"/bench/", b"/bench0")).await?;
    let mut s = WatchClient::new(ch)
        .watch(ReceiverStream::new(rx))
        .await?
        .into_inner();
    let mut seen = HashMap::new();
    let mut ready = Some(ready);
    while seen.len() < n {
        let m = tokio::time::timeout(GUARD, s.message())
            .await
            .context("probe timed out")??
            .context("probe stream closed")?;
        let now = Instant::now();
        if m.created
            && let Some(r) = ready.take()
        {
            let _ = r.send(());
        }
        for e in m.events {
            seen.insert(e.kv.map(|k| k.mod_revision).unwrap_or(0), now);
        }
    }
    drop(tx);
    Ok(seen)
}

fn pct(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args = Args::parse();
    let server_bin = testkit::find_watch_server(args.server_bin.clone())?;
    let cluster = tokio::task::block_in_place(|| {
        EtcdCluster::builder()
            .bin(&args.etcd_bin)
            .temp_prefix("mirror-bench-etcd-")
            .args(["--experimental-watch-progress-notify-interval", "100ms"])
            .start_cluster()
    })?;
    let upstream: Vec<String> = (0..cluster.len()).map(|i| cluster.url(i)).collect();
    let mut replicas = Vec::new();
    for r in 0..args.replicas {
        let p = tokio::task::block_in_place(|| {
            ServerProcess::builder(&server_bin)
                .temp_prefix(format!("mirror-bench-kw{r}-"))
                .args(["--upstream", &upstream.join(",")])
                .start()
        })?;
        let url = p.endpoint();
        replicas.push((p, url));
    }
    // Caught up: a linearizable read through each replica succeeds.
    for (_, url) in &replicas {
        let deadline = Instant::now() + GUARD;
        loop {
            let ok = async {
                KvClient::new(connect(url).await?)
                    .range(pb::RangeRequest {
                        key: "/bench/".into(),
                        ..Default::default()
                    })
                    .await
                    .map_err(anyhow::Error::from)
            }
            .await;
            if ok.is_ok() {
                break;
            }
            if Instant::now() > deadline {
                bail!("replica {url} never caught up");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // A replica answers linearizable reads from its snapshot before its upstream watch is
    // open: wait for etcd to count one watcher per replica.
    let deadline = Instant::now() + GUARD;
    while watcher_total(&cluster)? < args.replicas as u64 {
        if Instant::now() > deadline {
            bail!("the replicas' upstream watches never opened");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut writer = KvClient::new(connect(&upstream[0]).await?);
    let mut rows = Vec::new();
    let mut kept = Vec::new();
    let mut opened = 0;
    for &n in &args.watchers {
        for (_, url) in &replicas {
            kept.extend(idle_watchers(url, opened, n - opened.min(n)).await?);
        }
        opened = n.max(opened);
        let upstream_watchers = watcher_total(&cluster)?;
        let rss: Vec<u64> = replicas
            .iter()
            .map(|(p, _)| p.rss_kib().unwrap_or(0))
            .collect();
        // Latency: one probe per replica and one on etcd itself, on the member the replicas
        // watch (member 0, their first endpoint), so the difference is the tier alone.
        let mut probes = Vec::new();
        let urls = std::iter::once(upstream[0].clone()).chain(replicas.iter().map(|r| r.1.clone()));
        for url in urls {
            let (tx, rx) = tokio::sync::oneshot::channel();
            probes.push(tokio::spawn(probe(url, args.writes, tx)));
            rx.await
                .context("probe failed before its watch was created")?;
        }
        let sent = Arc::new(Mutex::new(HashMap::new()));
        let period = Duration::from_micros(1_000_000 / args.rate.max(1));
        let mut tick = tokio::time::interval(period);
        for i in 0..args.writes {
            tick.tick().await;
            let t = Instant::now();
            let r = writer
                .put(pb::PutRequest {
                    key: format!("/bench/k{}", i % 100).into_bytes().into(),
                    value: vec![b'v'; 128].into(),
                    ..Default::default()
                })
                .await?
                .into_inner();
            let rev = r.header.map(|h| h.revision).unwrap_or(0);
            sent.lock()
                .map_err(|_| anyhow::anyhow!("lock"))?
                .insert(rev, t);
        }
        let sent = sent.lock().map_err(|_| anyhow::anyhow!("lock"))?.clone();
        let mut hists = Vec::new();
        for p in probes {
            let seen = p.await??;
            let mut h = histogram();
            for (rev, t) in &sent {
                if let Some(at) = seen.get(rev) {
                    record(&mut h, at.saturating_duration_since(*t).as_micros() as u64);
                }
            }
            hists.push(h);
        }
        rows.push((n, upstream_watchers, rss, hists));
    }
    drop(kept);

    let date = Command::new("date")
        .arg("-u")
        .arg("+%Y-%m-%d")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    println!(
        "Machine: {cores} cores, {date}. 3 etcd members + {} replicas on loopback; {} puts at {}/s per row.\n",
        args.replicas, args.writes, args.rate
    );
    println!(
        "| downstream watchers per replica | etcd watchers (`etcd_debugging_mvcc_watcher_total`) | replica RSS (MiB) | put → event, etcd direct p50 / p99 (ms) | put → event, via replica p50 / p99 (ms) |"
    );
    println!("|---|---|---|---|---|");
    for (n, up, rss, h) in &rows {
        let rss: Vec<String> = rss
            .iter()
            .map(|k| format!("{:.1}", *k as f64 / 1024.0))
            .collect();
        let via: Vec<String> = h[1..]
            .iter()
            .map(|h| format!("{:.2} / {:.2}", pct(h, 0.5), pct(h, 0.99)))
            .collect();
        println!(
            "| {n} | {up} | {} | {:.2} / {:.2} | {} |",
            rss.join(", "),
            pct(&h[0], 0.5),
            pct(&h[0], 0.99),
            via.join("; ")
        );
    }
    drop(replicas);
    drop(cluster);
    Ok(())
}

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
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use hdrhistogram::Histogram;
use loadgen::client::{connect, histogram, record};
use tokio_stream::wrappers::ReceiverStream;
use watch_proto::etcdserverpb as pb;
use watch_proto::etcdserverpb::kv_client::KvClient;
use watch_proto::etcdserverpb::watch_client::WatchClient;

/// Mirror-mode measurements over a loopback etcd cluster.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// keywatch's `watch-server` binary.
    #[arg(long, default_value = "target/release/watch-server")]
    server_bin: PathBuf,
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

struct Proc {
    child: Child,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Spawns `cmd` and waits for a line containing `ready`; returns the text after it.
fn spawn(cmd: &mut Command, ready: &'static str) -> Result<(Proc, String)> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning {cmd:?}"))?;
    let (tx, rx) = std::sync::mpsc::channel();
    let out: Box<dyn Read + Send> = Box::new(child.stdout.take().context("stdout")?);
    let err: Box<dyn Read + Send> = Box::new(child.stderr.take().context("stderr")?);
    for reader in [out, err] {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(reader).lines() {
                let Ok(line) = line else { break };
                if let Some(i) = line.find(ready) {
                    let _ = tx.send(line[i + ready.len()..].trim().to_owned());
                }
            }
        });
    }
    let proc = Proc { child };
    let found = rx
        .recv_timeout(GUARD)
        .with_context(|| format!("{cmd:?} never printed {ready:?}"))?;
    Ok((proc, found))
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|n| n.parse().ok())
        })
        .unwrap_or(0)
}

fn watcher_total(ports: &[u16]) -> Result<u64> {
    let mut total = 0;
    for p in ports {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", *p))?;
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
        let mut body = String::new();
        s.read_to_string(&mut body)?;
        total += body
            .lines()
            .find_map(|l| l.strip_prefix("etcd_debugging_mvcc_watcher_total "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .context("etcd_debugging_mvcc_watcher_total missing")? as u64;
    }
    Ok(total)
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
    if !args.server_bin.is_file() {
        bail!(
            "{} not found: `cargo build --release -p watch-server`",
            args.server_bin.display()
        );
    }
    let dir = tempfile::tempdir()?;
    let held: Vec<TcpListener> = (0..6)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<_>>()?;
    let ports: Vec<u16> = held
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect::<std::io::Result<_>>()?;
    drop(held);
    let initial: Vec<String> = (0..3)
        .map(|i| format!("m{i}=http://127.0.0.1:{}", ports[2 * i + 1]))
        .collect();
    let mut etcd = Vec::new();
    let mut waits = Vec::new();
    for i in 0..3 {
        let client = format!("http://127.0.0.1:{}", ports[2 * i]);
        let peer = format!("http://127.0.0.1:{}", ports[2 * i + 1]);
        let mut cmd = Command::new(&args.etcd_bin);
        cmd.args(["--name", &format!("m{i}"), "--data-dir"])
            .arg(dir.path().join(format!("m{i}")))
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &initial.join(",")])
            .args(["--experimental-watch-progress-notify-interval", "100ms"]);
        // Members wait for each other: spawn all, then wait.
        waits.push(std::thread::spawn(move || {
            spawn(&mut cmd, "ready to serve client requests")
        }));
    }
    for w in waits {
        etcd.push(
            w.join()
                .map_err(|_| anyhow::anyhow!("etcd spawn thread"))??
                .0,
        );
    }
    let client_ports: Vec<u16> = (0..3).map(|i| ports[2 * i]).collect();
    let upstream: Vec<String> = client_ports
        .iter()
        .map(|p| format!("http://127.0.0.1:{p}"))
        .collect();
    let mut replicas = Vec::new();
    for r in 0..args.replicas {
        let mut cmd = Command::new(&args.server_bin);
        cmd.args(["--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir.path().join(format!("kw{r}")))
            .args(["--upstream", &upstream.join(",")]);
        let (p, addr) = spawn(&mut cmd, "watch-server listening on")?;
        replicas.push((p, format!("http://{addr}")));
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
    while watcher_total(&client_ports)? < args.replicas as u64 {
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
        let upstream_watchers = watcher_total(&client_ports)?;
        let rss: Vec<u64> = replicas
            .iter()
            .map(|(p, _)| rss_kib(p.child.id()))
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
    drop(etcd);
    Ok(())
}

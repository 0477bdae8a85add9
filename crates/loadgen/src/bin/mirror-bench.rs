//! `keywatch-mirror-bench`: keywatch's mirror mode side by side with etcd's own fan-out tier,
//! `etcd grpc-proxy start`, over one loopback 3-member etcd cluster (docs/cluster.md).
//!
//! It starts the cluster (testkit's `EtcdCluster`; with `--tls` serving TLS and requiring
//! client certificates, a throwaway CA made here, and both tiers serving TLS to their
//! clients), one keywatch replica (`ServerProcess`, `--upstream` the three members) and one
//! grpc-proxy (`GrpcProxy`) against it, and measures
//! each tier, the two alternating which goes first from one run to the next:
//!
//! - **Idle watchers** (0 / 10k / 100k by default): the tier is restarted (a fresh process
//!   for the RSS), N exact-key watchers on distinct keys are registered through it
//!   (registrations/s: N / the time until every `created` arrived), then etcd's own gauge
//!   `etcd_debugging_mvcc_watcher_total` (summed over the members, settled) gives the tier's
//!   upstream watchers: the gauge with the tier holding N, minus the gauge while the tier was
//!   down; RSS per downstream watcher is the RSS growth over N.
//! - **Latency**: W prefix watchers on the tier (and, as the floor, on etcd member 0
//!   directly), puts to member 0 at a paced rate, each value stamped with its send time:
//!   put → event p50/p99 over every delivered event.
//! - **Leader kill**: W prefix watchers on the tier (the floor: on a follower directly), puts
//!   on a follower at a paced rate, and a third of the way through the etcd leader is killed
//!   (SIGKILL) and restarted after the last put. Every watcher's events are checked against
//!   etcd's history of the prefix read back afterwards (each put has its own key, so a range
//!   read names every committed revision): lost, and duplicated or re-delivered, events. The
//!   time to resume is the longest pause between two event responses of one stream. For
//!   keywatch the leadership is first moved to the member the replica watches.
//! - **Tier restart**: the same with the tier itself killed (SIGKILL) and started again, the
//!   watchers resuming as clientv3's do (reconnect, watch again from the last revision + 1).
//! - **Past revision**: M puts, then one watcher from the revision before them: the proxy
//!   forwards it to etcd, keywatch serves it from its own log. Time until all M arrived,
//!   checked against the puts' revisions.
//!
//! Every delivered event is checked (loadgen's `check`). A wrong result of keywatch or of etcd
//! itself fails the run (exit non-zero); grpc-proxy's are reported in the table (that is what
//! the comparison is for). The medians of `--repeat` runs are reported. The markdown goes into
//! `--doc` (docs/cluster.md) between the `mirror-bench` markers, unless `--no-write`.
//!
//! Run (the full sizes want a quiet machine): `cargo xtask bench --mirror`, or
//! `cargo build --release -p watch-server -p keywatch-loadgen &&
//! target/release/keywatch-mirror-bench [--tls]`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use clap::Parser;
use hdrhistogram::Histogram;
use loadgen::check::{Digest, Seen, Verdict};
use loadgen::client::{
    self, Counters, Mode, Outcome, Spec, Streams, Written, connect_endpoint, histogram,
};
use loadgen::report::{self, Meta};
use testkit::{EtcdCluster, EtcdTls, GrpcProxy, Pki, ServerProcess};
use tonic::transport::{Channel, Endpoint};
use watch_proto::etcdserverpb as pb;
use watch_proto::etcdserverpb::kv_client::KvClient;
use watch_proto::etcdserverpb::maintenance_client::MaintenanceClient;

/// keywatch's mirror mode against etcd's grpc-proxy over one loopback etcd cluster.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// keywatch's `watch-server` binary [default: the one next to this executable].
    #[arg(long)]
    server_bin: Option<PathBuf>,
    /// etcd binary (grpc-proxy is its `grpc-proxy start` subcommand).
    #[arg(long, default_value = "etcd")]
    etcd_bin: PathBuf,
    /// Tiny sizes, one run each (checks the tool and correctness, not performance).
    #[arg(long)]
    quick: bool,
    /// Print the section instead of writing it into `--doc`.
    #[arg(long)]
    no_write: bool,
    /// The markdown file whose `mirror-bench` section is rewritten.
    #[arg(long, default_value = "docs/cluster.md")]
    doc: PathBuf,
    /// TLS on both sides: etcd serves TLS and requires client certificates (both tiers reach
    /// it with the CA and a client certificate), and both tiers serve their clients TLS.
    #[arg(long)]
    tls: bool,
    /// Idle downstream watcher counts, comma-separated [default: 0,10000,100000; quick:
    /// 0,100].
    #[arg(long, value_delimiter = ',')]
    watchers: Option<Vec<usize>>,
    /// Runs per tier and measurement; medians are reported [default: 3; quick: 1].
    #[arg(long)]
    repeat: Option<usize>,
    /// Watchers of the latency and leader-kill runs [default: 1000; quick: 20].
    #[arg(long)]
    latency_watchers: Option<usize>,
    /// Puts per second of the latency and leader-kill runs [default: 200; quick: 100].
    #[arg(long)]
    rate: Option<f64>,
    /// Puts per latency run [default: 2000; quick: 30].
    #[arg(long)]
    writes: Option<usize>,
    /// Puts per leader-kill run [default: 1600 (8 s at 200/s); quick: 300].
    #[arg(long)]
    kill_writes: Option<usize>,
    /// Puts replayed by the past-revision watch [default: 20000; quick: 100].
    #[arg(long)]
    history: Option<usize>,
    /// etcd's `--experimental-watch-progress-notify-interval`. keywatch's replica needs one of
    /// 100 ms to 1 s below etcd 3.4.25 (docs/cluster.md, deployment rule); grpc-proxy opens
    /// its upstream watches with `progress_notify`, so etcd pays one notification per proxy
    /// watcher per interval, and 100 ms with 10k proxy watchers saturates a member.
    #[arg(long, default_value = "1s")]
    progress_interval: String,
    /// Longest time an idle row waits for its registrations, in seconds; a tier that has not
    /// created them all by then is reported with what it created (grpc-proxy slows to a few
    /// registrations per second at tens of thousands of distinct upstream watches).
    #[arg(long, default_value_t = 180.0)]
    register_timeout: f64,
}

/// The sizes of one invocation.
#[derive(Debug, Clone)]
struct Sizes {
    watchers: Vec<usize>,
    repeat: usize,
    latency_watchers: usize,
    rate: f64,
    writes: usize,
    kill_writes: usize,
    history: usize,
    /// Seconds (see [`Args::register_timeout`]).
    register_timeout: f64,
}

impl Sizes {
    fn of(a: &Args) -> Sizes {
        let q = a.quick;
        Sizes {
            watchers: a.watchers.clone().unwrap_or_else(|| {
                if q {
                    vec![0, 100]
                } else {
                    vec![0, 10_000, 100_000]
                }
            }),
            repeat: a.repeat.unwrap_or(if q { 1 } else { 3 }).max(1),
            latency_watchers: a
                .latency_watchers
                .unwrap_or(if q { 20 } else { 1000 })
                .max(1),
            rate: a.rate.unwrap_or(if q { 100.0 } else { 200.0 }),
            writes: a.writes.unwrap_or(if q { 30 } else { 2000 }).max(1),
            kill_writes: a.kill_writes.unwrap_or(if q { 300 } else { 1600 }).max(3),
            history: a.history.unwrap_or(if q { 100 } else { 20_000 }).max(1),
            register_timeout: a.register_timeout.max(1.0),
        }
    }
}

/// Hang guard of every wait: far above any healthy figure.
const GUARD: Duration = Duration::from_secs(60);
/// No new event or `created` for this long ends a wait.
const IDLE: Duration = Duration::from_secs(20);
/// Watchers per downstream stream (and connection).
const PER_STREAM: usize = 5000;
/// How long a leader-kill put may wait for its answer.
const PUT_TIMEOUT: Duration = Duration::from_secs(1);
/// Value size of every put.
const VALUE: usize = 64;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tier {
    Keywatch,
    Proxy,
    /// etcd itself, no tier: the floor.
    Etcd,
}

impl Tier {
    fn name(self) -> &'static str {
        match self {
            Tier::Keywatch => "keywatch mirror",
            Tier::Proxy => "etcd grpc-proxy",
            Tier::Etcd => "etcd directly (floor)",
        }
    }
}

/// The two tiers in the order of run `i` (alternating, so drift favours neither).
fn order(i: usize) -> [Tier; 2] {
    if i.is_multiple_of(2) {
        [Tier::Keywatch, Tier::Proxy]
    } else {
        [Tier::Proxy, Tier::Keywatch]
    }
}

/// The cluster, both tiers, and how to reach each.
struct Bench {
    cluster: EtcdCluster,
    keywatch: ServerProcess,
    proxy: GrpcProxy,
    pki: Option<Pki>,
}

impl Bench {
    fn start(args: &Args, server_bin: &Path) -> Result<Bench> {
        let pki = if args.tls { Some(Pki::new()?) } else { None };
        let cluster = {
            let mut b = EtcdCluster::builder()
                .bin(&args.etcd_bin)
                .temp_prefix("mirror-bench-etcd-")
                .args([
                    "--experimental-watch-progress-notify-interval",
                    args.progress_interval.as_str(),
                ]);
            if args.quick {
                // Faster elections (etcd's defaults: 100 ms, 1 s), so the leader-kill runs of
                // a quick run stay short.
                b = b.args(["--heartbeat-interval", "50", "--election-timeout", "500"]);
            }
            if let Some(p) = &pki {
                b = b.tls(
                    EtcdTls::new(p.path("ca.pem"), p.path("server.pem"), p.path("server.key"))
                        .client_cert_auth(p.path("client.pem"), p.path("client.key")),
                );
            }
            b.start_cluster()?
        };
        let mut kw_args = vec!["--upstream".to_owned(), cluster.endpoints(0)];
        if let Some(p) = &pki {
            for (flag, file) in [
                ("--upstream-cacert", "ca.pem"),
                ("--upstream-cert", "client.pem"),
                ("--upstream-key", "client.key"),
            ] {
                kw_args.push(flag.to_owned());
                kw_args.push(p.path(file).display().to_string());
            }
        }
        let mut keywatch = ServerProcess::builder(server_bin).temp_prefix("mirror-bench-kw-");
        let proxy = match &pki {
            Some(p) => {
                // Downstream TLS too, with the members' certificate (valid for 127.0.0.1).
                for (flag, file) in [("--cert-file", "server.pem"), ("--key-file", "server.key")] {
                    kw_args.push(flag.to_owned());
                    kw_args.push(p.path(file).display().to_string());
                }
                keywatch = keywatch.https(true);
                GrpcProxy::start_tls(&cluster, p.path("server.pem"), p.path("server.key"))?
            }
            None => GrpcProxy::start(&cluster)?,
        };
        let keywatch = keywatch.args(kw_args).start()?;
        Ok(Bench {
            cluster,
            keywatch,
            proxy,
            pki,
        })
    }

    /// A connection to etcd member `i` (with the client certificate under `--tls`).
    async fn etcd(&self, i: usize) -> Result<Channel> {
        Ok(connect_endpoint(self.etcd_endpoint(i)?).await?)
    }

    fn etcd_endpoint(&self, i: usize) -> Result<Endpoint> {
        let ep = client::endpoint(&self.cluster.url(i))?;
        Ok(match &self.pki {
            Some(p) => {
                let (ca, cert, key) = (
                    std::fs::read(p.path("ca.pem"))?,
                    std::fs::read(p.path("client.pem"))?,
                    std::fs::read(p.path("client.key"))?,
                );
                ep.tls_config(client::tls(&ca, Some((&cert, &key))))?
            }
            None => ep,
        })
    }

    fn endpoint(&self, t: Tier) -> String {
        match t {
            Tier::Keywatch => self.keywatch.endpoint(),
            Tier::Proxy => self.proxy.endpoint(),
            Tier::Etcd => self.cluster.url(0),
        }
    }

    /// `n` connections to tier `t` (etcd member `member` for [`Tier::Etcd`]).
    async fn channels(&self, t: Tier, member: usize, n: usize) -> Result<Vec<Channel>> {
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(self.channel(t, member).await?);
        }
        Ok(out)
    }

    /// One connection to tier `t` (etcd member `member` for [`Tier::Etcd`]); under `--tls`
    /// with the CA (and towards etcd the client certificate).
    async fn channel(&self, t: Tier, member: usize) -> Result<Channel> {
        if t == Tier::Etcd {
            return self.etcd(member).await;
        }
        let ep = client::endpoint(&self.endpoint(t))?;
        Ok(match &self.pki {
            Some(p) => {
                connect_endpoint(
                    ep.tls_config(client::tls(&std::fs::read(p.path("ca.pem"))?, None))?,
                )
                .await?
            }
            None => connect_endpoint(ep).await?,
        })
    }

    fn rss_kib(&self, t: Tier) -> u64 {
        match t {
            Tier::Keywatch => self.keywatch.rss_kib(),
            Tier::Proxy => self.proxy.rss_kib(),
            Tier::Etcd => None,
        }
        .unwrap_or(0)
    }

    fn kill(&mut self, t: Tier) {
        match t {
            Tier::Keywatch => self.keywatch.kill9(),
            Tier::Proxy => self.proxy.kill9(),
            Tier::Etcd => {}
        }
    }

    /// Starts tier `t` again (a fresh process) and waits until it serves.
    async fn restart(&mut self, t: Tier) -> Result<()> {
        match t {
            Tier::Keywatch => tokio::task::block_in_place(|| self.keywatch.restart())?,
            Tier::Proxy => tokio::task::block_in_place(|| self.proxy.restart())?,
            Tier::Etcd => {}
        }
        self.ready(t).await
    }

    /// Waits until a linearizable read through `t` succeeds: the keywatch replica answers it
    /// only once it mirrored etcd's current revision, i.e. its upstream watch is open.
    async fn ready(&self, t: Tier) -> Result<()> {
        let deadline = Instant::now() + GUARD;
        loop {
            let ok = async {
                let ch = self.channel(t, 0).await?;
                KvClient::new(ch)
                    .range(pb::RangeRequest {
                        key: "/ready".into(),
                        count_only: true,
                        ..Default::default()
                    })
                    .await?;
                anyhow::Ok(())
            }
            .await;
            match ok {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() > deadline => {
                    bail!("{} never became ready: {e}", t.name())
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    /// etcd's watcher gauge once it stopped moving (two equal reads 250 ms apart).
    async fn settled_watchers(&self) -> Result<u64> {
        let deadline = Instant::now() + GUARD;
        let mut last = self
            .cluster
            .metric_sum("etcd_debugging_mvcc_watcher_total")?;
        loop {
            tokio::time::sleep(Duration::from_millis(250)).await;
            let now = self
                .cluster
                .metric_sum("etcd_debugging_mvcc_watcher_total")?;
            if now == last || Instant::now() > deadline {
                return Ok(now as u64);
            }
            last = now;
        }
    }

    /// The member that is raft leader, asked of the running members.
    async fn leader(&self) -> Result<usize> {
        let deadline = Instant::now() + GUARD;
        loop {
            let mut ids = Vec::new();
            let mut leader = 0;
            for i in self.cluster.alive() {
                if let Ok(s) = MaintenanceClient::new(self.etcd(i).await?)
                    .status(pb::StatusRequest {})
                    .await
                {
                    let s = s.into_inner();
                    ids.push((i, s.header.map(|h| h.member_id).unwrap_or(0)));
                    leader = leader.max(s.leader);
                }
            }
            if let Some(&(i, _)) = ids.iter().find(|(_, id)| *id == leader && leader != 0) {
                return Ok(i);
            }
            if Instant::now() > deadline {
                bail!("the etcd cluster has no leader");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The etcd member the keywatch replica's upstream session uses: the member whose URL its
    /// last "upstream connected" log line names.
    fn keywatch_member(&self) -> Option<usize> {
        let tail = self.keywatch.output().tail();
        let line = tail
            .lines()
            .rev()
            .find(|l| l.contains("upstream connected"))?;
        (0..self.cluster.len()).find(|&i| {
            let url = self.cluster.url(i);
            // The port must not run on into another digit.
            line.match_indices(&url)
                .any(|(at, _)| !line[at + url.len()..].starts_with(|c: char| c.is_ascii_digit()))
        })
    }

    /// Makes member `to` the raft leader (`etcdctl move-leader`) and waits until it is.
    async fn move_leader(&self, to: usize) -> Result<()> {
        if self.leader().await? == to {
            return Ok(());
        }
        let id = MaintenanceClient::new(self.etcd(to).await?)
            .status(pb::StatusRequest {})
            .await?
            .into_inner()
            .header
            .map_or(0, |h| h.member_id);
        tokio::task::block_in_place(|| {
            self.cluster
                .etcdctl(["move-leader".to_owned(), format!("{id:x}")])
        })?;
        let deadline = Instant::now() + GUARD;
        while self.leader().await? != to {
            if Instant::now() > deadline {
                bail!("leadership did not move to member m{to}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    /// Restarts every member that is down.
    fn heal(&mut self) -> Result<()> {
        for i in 0..self.cluster.len() {
            if self.cluster.pid(i).is_none() {
                tokio::task::block_in_place(|| self.cluster.restart(i))?;
            }
        }
        Ok(())
    }
}

/// Keys `prefix0 .. prefix{n-1}`, one per put.
fn keys(prefix: &str, n: usize) -> Arc<Vec<Bytes>> {
    Arc::new(
        (0..n)
            .map(|i| Bytes::from(format!("{prefix}{i:08}")))
            .collect(),
    )
}

fn prefix_spec(prefix: &str, start_revision: i64) -> Spec {
    Spec {
        key: Bytes::from(prefix.to_owned()),
        prefix: true,
        start_revision,
    }
}

/// `specs` over `ceil(len / PER_STREAM)` streams on tier `t`.
async fn open(b: &Bench, t: Tier, member: usize, specs: Vec<Spec>, mode: Mode) -> Result<Streams> {
    let n = specs.len().div_ceil(PER_STREAM).max(1);
    let mut groups = vec![Vec::new(); n];
    for (i, s) in specs.into_iter().enumerate() {
        groups[i % n].push(s);
    }
    Ok(Streams::open_on(
        b.channels(t, member, n).await?,
        groups,
        mode,
    ))
}

/// Checks every watcher of `outcomes` against `want`.
fn verdict(outcomes: &[Outcome], want: &Digest) -> Verdict {
    let mut v = Verdict::default();
    for o in outcomes {
        for s in &o.seen {
            v.watcher(s, want);
        }
        for e in o.errors.iter().take(3) {
            v.error(e.clone());
        }
    }
    v
}

fn digest(revs: impl IntoIterator<Item = i64>) -> Digest {
    let mut d = Digest::default();
    revs.into_iter().for_each(|r| d.add(r));
    d
}

fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// One idle-watcher run of a tier.
#[derive(Debug, Clone, Copy)]
struct Idle {
    /// Watchers created (`n` unless the registration timed out).
    created: u64,
    upstream: u64,
    reg_per_s: f64,
    rss_kib: u64,
    per_watcher_bytes: f64,
}

async fn idle(b: &mut Bench, t: Tier, n: usize, register_timeout: Duration) -> Result<Idle> {
    b.kill(t);
    let without = b.settled_watchers().await?;
    b.restart(t).await?;
    let rss0 = b.rss_kib(t);
    let mut reg_per_s = f64::NAN;
    let mut streams = None;
    let mut created = 0;
    if n > 0 {
        let specs = (0..n)
            .map(|i| Spec {
                key: Bytes::from(format!("/idle/{i:08}")),
                prefix: false,
                start_revision: 0,
            })
            .collect();
        let started = Instant::now();
        let s = open(b, t, 0, specs, Mode::Check).await?;
        // Err: still progressing at the deadline; Ok(false): no progress for IDLE.
        let progressing =
            tokio::time::timeout(register_timeout, s.counters.wait_created(n as u64, IDLE))
                .await
                .unwrap_or(true);
        created = s.counters.created().min(n as u64);
        // keywatch gets no partial row: a keywatch that cannot register them all in time is a
        // failed run, as its wrong results are (grpc-proxy's are reported).
        if !progressing || (created < n as u64 && t == Tier::Keywatch) {
            bail!("{}: only {created} of {n} watchers created", t.name());
        }
        if created < n as u64 {
            eprintln!(
                "mirror-bench: {}: {created} of {n} watchers created in {:.0} s",
                t.name(),
                register_timeout.as_secs_f64()
            );
        }
        reg_per_s = created as f64 / started.elapsed().as_secs_f64();
        streams = Some(s);
    }
    let with = b.settled_watchers().await?;
    let rss1 = b.rss_kib(t);
    if let Some(s) = streams {
        let complete = created == n as u64;
        let outcomes = s.finish().await;
        let errors: Vec<&String> = outcomes.iter().flat_map(|o| &o.errors).collect();
        // A timed-out registration ends with creates outstanding, which the check reports;
        // the row says how many were created instead.
        if let (true, Some(e)) = (complete, errors.first()) {
            bail!("{} idle watchers: {e}", t.name());
        }
    }
    Ok(Idle {
        created,
        upstream: with.saturating_sub(without),
        reg_per_s,
        rss_kib: rss1,
        // Over the N requested: a tier that timed out has taken every create request (and
        // holds their state) without having answered them all.
        per_watcher_bytes: if n > 0 {
            rss1.saturating_sub(rss0) as f64 * 1024.0 / n as f64
        } else {
            f64::NAN
        },
    })
}

/// One run with watchers on a prefix while puts are made: the latency and the check.
struct Delivery {
    latency: Histogram<u64>,
    verdict: Verdict,
    max_gap: Duration,
    put_errors: usize,
}

async fn latency(b: &Bench, t: Tier, s: &Sizes, run: usize) -> Result<Delivery> {
    let prefix = format!("/lat/{run}/");
    let specs = vec![prefix_spec(&prefix, 0); s.latency_watchers];
    let streams = open(b, t, 0, specs, Mode::Measure).await?;
    if !streams
        .counters
        .wait_created(s.latency_watchers as u64, IDLE)
        .await
    {
        bail!("{}: latency watchers not created", t.name());
    }
    let want = (s.writes * s.latency_watchers) as u64;
    streams.counters.expect_events(want);
    let writer = b.etcd(0).await?;
    let written =
        loadgen::client::put_paced(&writer, keys(&prefix, s.writes), s.writes, s.rate, VALUE).await;
    let expect = (written.puts.len() * s.latency_watchers) as u64;
    streams.counters.wait_events(expect, IDLE).await;
    Ok(delivered(streams, &written).await)
}

async fn delivered(streams: Streams, written: &Written) -> Delivery {
    let want = digest(written.puts.iter().map(|p| p.1));
    let outcomes = streams.finish().await;
    let mut latency = histogram();
    let mut max_gap = Duration::ZERO;
    for o in &outcomes {
        let _ = latency.add(&o.latency);
        max_gap = max_gap.max(o.max_gap);
    }
    Delivery {
        latency,
        verdict: verdict(&outcomes, &want),
        max_gap,
        put_errors: written.errors.len(),
    }
}

/// The leader-kill run of tier `t`.
struct Kill {
    delivery: Delivery,
    killed: usize,
    /// The killed member was the one the tier's upstream watch used.
    own_upstream: bool,
}

async fn leader_kill(b: &mut Bench, t: Tier, s: &Sizes, run: usize) -> Result<Kill> {
    b.heal()?;
    b.ready(t).await?;
    // The worst case for the replica: the member its upstream watch uses is the one killed.
    // (Which member grpc-proxy's watch stream uses cannot be seen from outside.)
    let upstream = if t == Tier::Keywatch {
        b.keywatch_member()
    } else {
        None
    };
    if let Some(m) = upstream {
        b.move_leader(m).await?;
    }
    let leader = b.leader().await?;
    let follower = (0..b.cluster.len())
        .find(|&i| i != leader)
        .context("a cluster of one member has no follower")?;
    let prefix = format!("/kill/{run}/");
    let specs = vec![prefix_spec(&prefix, 0); s.latency_watchers];
    let streams = open(b, t, follower, specs, Mode::Check).await?;
    if !streams
        .counters
        .wait_created(s.latency_watchers as u64, IDLE)
        .await
    {
        bail!("{}: leader-kill watchers not created", t.name());
    }
    // A put stuck on the dead leader's proposal is given up after this (etcd would answer
    // "request timed out" only after about 7 s); etcd's history, read below, says what
    // committed.
    let writer = connect_endpoint(b.etcd_endpoint(follower)?.timeout(PUT_TIMEOUT)).await?;
    let (count, rate, ks) = (s.kill_writes, s.rate, keys(&prefix, s.kill_writes));
    let puts =
        tokio::spawn(
            async move { loadgen::client::put_paced(&writer, ks, count, rate, VALUE).await },
        );
    tokio::time::sleep(Duration::from_secs_f64(count as f64 / rate / 3.0)).await;
    tokio::task::block_in_place(|| b.cluster.kill9(leader));
    let mut written = puts.await?;
    b.heal()?;
    // etcd's history of the prefix: each put has its own key, so the keys' revisions are
    // every committed put, including those whose answer was lost with the leader.
    let all = KvClient::new(b.etcd(follower).await?)
        .range(pb::RangeRequest {
            key: Bytes::from(prefix.clone()),
            range_end: Bytes::from(format!("/kill/{run}0")),
            ..Default::default()
        })
        .await?
        .into_inner();
    written.puts = all.kvs.iter().map(|kv| (0, kv.mod_revision)).collect();
    let expect = (written.puts.len() * s.latency_watchers) as u64;
    streams.counters.wait_events(expect, IDLE).await;
    Ok(Kill {
        delivery: delivered(streams, &written).await,
        killed: leader,
        own_upstream: upstream == Some(leader),
    })
}

/// Watchers on one stream that outlive their server, as clientv3's do: when the stream ends
/// or fails they reconnect (to the tier's endpoint of that moment) and re-create each watch
/// from the last revision it received + 1. Returns each watcher's view, the longest pause
/// between two event responses, and how many times it reconnected.
async fn resuming_stream(
    endpoint: Arc<std::sync::Mutex<String>>,
    ca: Option<Vec<u8>>,
    prefix: Bytes,
    watchers: usize,
    from: i64,
    counters: Arc<Counters>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> (Vec<Seen>, Duration, u64) {
    use tokio_stream::wrappers::UnboundedReceiverStream;
    use watch_proto::etcdserverpb::watch_client::WatchClient;
    let mut seen = vec![Seen::default(); watchers];
    let mut last = vec![from - 1; watchers];
    let mut last_event: Option<Instant> = None;
    let mut max_gap = Duration::ZERO;
    let mut reconnects = 0u64;
    let mut first = true;
    while !*stop.borrow() {
        if !std::mem::take(&mut first) {
            reconnects += 1;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let url = endpoint.lock().map(|u| u.clone()).unwrap_or_default();
        let Ok(ep) = client::endpoint(&url) else {
            continue;
        };
        let ep = match &ca {
            Some(ca) => match ep.tls_config(client::tls(ca, None)) {
                Ok(ep) => ep,
                Err(_) => continue,
            },
            None => ep,
        };
        let Ok(ch) = connect_endpoint(ep).await else {
            continue;
        };
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        for l in &last {
            let create = pb::WatchCreateRequest {
                key: prefix.clone(),
                range_end: client::prefix_end(&prefix),
                start_revision: l + 1,
                ..Default::default()
            };
            // The receiver lives in the call below.
            let _ = tx.send(pb::WatchRequest {
                request_union: Some(pb::watch_request::RequestUnion::CreateRequest(create)),
            });
        }
        let mut client = WatchClient::new(ch);
        let call = client.watch(UnboundedReceiverStream::new(rx));
        let mut stream = tokio::select! {
            r = call => match r {
                Ok(r) => r.into_inner(),
                Err(_) => continue,
            },
            _ = stop.wait_for(|s| *s) => break,
        };
        // Creates are answered in order: the n-th `created` is watcher n.
        let mut ids = std::collections::HashMap::new();
        loop {
            let msg = tokio::select! {
                m = stream.message() => m,
                _ = stop.wait_for(|s| *s) => break,
            };
            let Ok(Some(resp)) = msg else { break };
            if resp.created && !resp.canceled && ids.len() < watchers {
                ids.insert(resp.watch_id, ids.len());
            }
            let Some(&i) = ids.get(&resp.watch_id) else {
                continue;
            };
            if resp.events.is_empty() {
                continue;
            }
            let now = Instant::now();
            if let Some(prev) = last_event {
                max_gap = max_gap.max(now.duration_since(prev));
            }
            last_event = Some(now);
            seen[i].begin_response(resp.fragment);
            for ev in &resp.events {
                let rev = ev.kv.as_ref().map_or(0, |kv| kv.mod_revision);
                seen[i].event(rev, true);
                last[i] = last[i].max(rev);
            }
            counters.add_events(resp.events.len() as u64);
        }
        drop(tx);
    }
    (seen, max_gap, reconnects)
}

/// The tier-restart run of one tier.
struct Restart {
    verdict: Verdict,
    max_gap: Duration,
    /// From the kill until the restarted tier answered a read.
    restart: Duration,
    reconnects: u64,
    put_errors: usize,
}

/// The tier-restart run of `t`: resuming watchers through the tier, puts on etcd, and a
/// third of the way through the tier is killed (SIGKILL) and started again (keywatch on its
/// data directory, at a new port the watchers then use).
async fn tier_restart(b: &mut Bench, t: Tier, s: &Sizes, run: usize) -> Result<Restart> {
    b.heal()?;
    b.ready(t).await?;
    let prefix = format!("/restart/{run}/");
    let from = KvClient::new(b.etcd(0).await?)
        .range(pb::RangeRequest {
            key: "/restart/".into(),
            count_only: true,
            ..Default::default()
        })
        .await?
        .into_inner()
        .header
        .map_or(0, |h| h.revision)
        + 1;
    let endpoint = Arc::new(std::sync::Mutex::new(b.endpoint(t)));
    let ca = match &b.pki {
        Some(p) => Some(std::fs::read(p.path("ca.pem"))?),
        None => None,
    };
    let counters = Counters::new();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let streams = s.latency_watchers.div_ceil(PER_STREAM).max(1);
    let mut tasks = Vec::new();
    for k in 0..streams {
        let n = s.latency_watchers / streams + usize::from(k < s.latency_watchers % streams);
        tasks.push(tokio::spawn(resuming_stream(
            endpoint.clone(),
            ca.clone(),
            Bytes::from(prefix.clone()),
            n,
            from,
            counters.clone(),
            stopped.clone(),
        )));
    }
    let writer = b.etcd(0).await?;
    let (count, rate, ks) = (s.kill_writes, s.rate, keys(&prefix, s.kill_writes));
    let puts =
        tokio::spawn(
            async move { loadgen::client::put_paced(&writer, ks, count, rate, VALUE).await },
        );
    tokio::time::sleep(Duration::from_secs_f64(count as f64 / rate / 3.0)).await;
    b.kill(t);
    let down = Instant::now();
    b.restart(t).await?;
    let restart = down.elapsed();
    if let Ok(mut e) = endpoint.lock() {
        *e = b.endpoint(t);
    }
    let written = puts.await?;
    let want = digest(written.puts.iter().map(|p| p.1));
    counters
        .wait_events(want.count * s.latency_watchers as u64, IDLE)
        .await;
    stop.send_replace(true);
    let mut verdict = Verdict::default();
    let mut max_gap = Duration::ZERO;
    let mut reconnects = 0;
    for task in tasks {
        let (seen, gap, r) = task.await?;
        for w in &seen {
            verdict.watcher(w, &want);
        }
        max_gap = max_gap.max(gap);
        reconnects += r;
    }
    Ok(Restart {
        verdict,
        max_gap,
        restart,
        reconnects,
        put_errors: written.errors.len(),
    })
}

/// The past-revision run: one watcher from `from` on the history prefix.
async fn history(b: &Bench, t: Tier, from: i64, want: &Digest) -> Result<(f64, Verdict)> {
    // Caught up first (the replica's barrier), so the time is the replay alone.
    b.ready(t).await?;
    let started = Instant::now();
    let streams = open(b, t, 0, vec![prefix_spec("/hist/", from)], Mode::Check).await?;
    streams.counters.wait_events(want.count, IDLE).await;
    let secs = started.elapsed().as_secs_f64();
    let outcomes = streams.finish().await;
    Ok((secs, verdict(&outcomes, want)))
}

fn ms(d: f64) -> String {
    report::fmt(d * 1000.0)
}

fn pct(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

/// Per tier: the runs' results, then the table cells.
#[derive(Default)]
struct Rows {
    idle: Vec<(usize, Tier, Vec<Idle>)>,
    latency: Vec<(Tier, Vec<Delivery>)>,
    kill: Vec<(Tier, Vec<Kill>)>,
    restart: Vec<(Tier, Vec<Restart>)>,
    history: Vec<(Tier, Vec<(f64, Verdict)>)>,
}

fn entry<T>(v: &mut Vec<(Tier, Vec<T>)>, t: Tier) -> &mut Vec<T> {
    let i = match v.iter().position(|(x, _)| *x == t) {
        Some(i) => i,
        None => {
            v.push((t, Vec::new()));
            v.len() - 1
        }
    };
    &mut v[i].1
}

fn verdict_cell(vs: &[&Verdict]) -> String {
    let mut all = Verdict::default();
    for v in vs {
        all.merge((*v).clone());
    }
    all.summary()
}

fn markdown(meta: &Meta, s: &Sizes, rows: &Rows, tls: bool, progress_interval: &str) -> String {
    let mut o = String::new();
    o.push_str(markers(tls).0);
    o.push_str(if tls {
        "\n### Measured with TLS on both sides\n\n"
    } else {
        "\n### Measured: keywatch mirror vs etcd grpc-proxy\n\n"
    });
    o.push_str(
        "Generated by `keywatch-mirror-bench` (`crates/loadgen/src/bin/mirror-bench.rs`); \
         everything between its markers is rewritten by each run (`--tls` runs have a section \
         of their own). One 3-member \
         etcd cluster on loopback, one keywatch replica and one `etcd grpc-proxy start` \
         against it, the same downstream watchers and writes through each, the two tiers \
         alternating which goes first. Every delivered event is checked.\n\n",
    );
    o.push_str(&format!(
        "- Machine: {} (load average {} before, {} after).\n- Date: {}. Commit: `{}`.\n\
         - etcd and grpc-proxy: {}; etcd's progress-notify interval: {}.\n- Connections: \
         {}.\n- Command: `{}`.\n- Medians of {} run(s) per tier and row.\n\n",
        meta.machine,
        meta.load_before,
        meta.load_after,
        meta.date,
        meta.commit,
        meta.etcd,
        progress_interval,
        if tls {
            "TLS with client certificates (etcd `--client-cert-auth`), and TLS between the \
             clients and each tier"
        } else {
            "plain HTTP/2 everywhere"
        },
        meta.command,
        s.repeat
    ));
    if meta.quick {
        o.push_str("**Quick mode**: tiny sizes, figures are not meaningful.\n\n");
    }
    o.push_str(
        "#### Idle downstream watchers\n\nExact-key watchers on distinct keys, registered \
         through a freshly started tier. etcd watchers: `etcd_debugging_mvcc_watcher_total` \
         summed over the members, with the tier holding N minus with the tier down. RSS per \
         watcher: the tier's RSS growth over N. Created: `created` answers within the \
         registration timeout; registrations/s counts those.\n\n\
         | downstream watchers | tier | created | etcd watchers | registrations/s | RSS (MiB) | RSS per watcher (KiB) |\n\
         |---|---|---|---|---|---|---|\n",
    );
    for (n, t, runs) in &rows.idle {
        let m = |f: fn(&Idle) -> f64| median(&mut runs.iter().map(f).collect::<Vec<_>>());
        let reg = m(|i| i.reg_per_s);
        let per = m(|i| i.per_watcher_bytes);
        let created = m(|i| i.created as f64) as u64;
        o.push_str(&format!(
            "| {n} | {} | {} | {} | {} | {} | {} |\n",
            t.name(),
            if created == *n as u64 {
                "all".to_owned()
            } else {
                format!(
                    "{created} in {} s (median)",
                    report::fmt(s.register_timeout)
                )
            },
            m(|i| i.upstream as f64) as u64,
            if reg.is_nan() {
                "–".into()
            } else {
                report::fmt(reg)
            },
            report::fmt(m(|i| i.rss_kib as f64) / 1024.0),
            if per.is_nan() {
                "–".into()
            } else {
                report::fmt(per / 1024.0)
            },
        ));
    }
    o.push_str(&format!(
        "\n#### put → event latency\n\n{} prefix watchers per tier, {} puts of {VALUE} bytes \
         at {}/s on etcd member 0; the floor watches member 0 directly. From the put's send \
         to the event's arrival, same process and clock.\n\n\
         | tier | p50 (ms) | p99 (ms) | max (ms) | events |\n|---|---|---|---|---|\n",
        s.latency_watchers, s.writes, s.rate
    ));
    for (t, runs) in &rows.latency {
        let m = |q: f64| median(&mut runs.iter().map(|d| pct(&d.latency, q)).collect::<Vec<_>>());
        o.push_str(&format!(
            "| {} | {} | {} | {} | {} |\n",
            t.name(),
            report::fmt(m(0.5)),
            report::fmt(m(0.99)),
            report::fmt(m(1.0)),
            verdict_cell(&runs.iter().map(|d| &d.verdict).collect::<Vec<_>>())
        ));
    }
    o.push_str(&format!(
        "\n#### etcd leader killed mid-stream\n\n{} prefix watchers per tier; {} puts at {}/s \
         on a follower; a third of the way through, the raft leader gets SIGKILL (restarted \
         after the last put); for keywatch the leadership is first moved (`etcdctl \
         move-leader`) to the member the replica's upstream watch uses, so the kill takes it \
         away. Each watcher is checked against etcd's own history of the \
         prefix (read back after the run, so puts whose answer was lost count too). Longest \
         pause: the longest wait between two event responses on one stream (normally 1/rate); \
         the floor watches the follower directly.\n\n\
         | tier | lost | duplicated or re-delivered | longest pause (ms) | failed puts | result |\n\
         |---|---|---|---|---|---|\n",
        s.latency_watchers, s.kill_writes, s.rate
    ));
    for (t, runs) in &rows.kill {
        let sum = |f: fn(&Verdict) -> u64| runs.iter().map(|k| f(&k.delivery.verdict)).sum::<u64>();
        let gap = median(
            &mut runs
                .iter()
                .map(|k| k.delivery.max_gap.as_secs_f64())
                .collect::<Vec<_>>(),
        );
        o.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} (member m{} killed{}) |\n",
            t.name(),
            sum(|v| v.missing),
            sum(|v| v.duplicates + v.out_of_order),
            ms(gap),
            runs.iter().map(|k| k.delivery.put_errors).sum::<usize>(),
            verdict_cell(&runs.iter().map(|k| &k.delivery.verdict).collect::<Vec<_>>()),
            runs.first().map_or(0, |k| k.killed),
            if runs.iter().all(|k| k.own_upstream) {
                ": the replica's upstream"
            } else {
                ""
            },
        ));
    }
    o.push_str(&format!(
        "\n#### The tier itself restarted mid-stream\n\n{} prefix watchers per tier, each \
         resuming as clientv3 does (when its stream fails it reconnects and watches again \
         from its last revision + 1); {} puts at {}/s on etcd; a third of the way through, \
         the tier gets SIGKILL and is started again (keywatch on its data directory). \
         Checked against the puts' revisions.\n\n\
         | tier | lost | duplicated or re-delivered | longest pause (ms) | kill → serving again (ms) | reconnects | failed puts | result |\n\
         |---|---|---|---|---|---|---|---|\n",
        s.latency_watchers, s.kill_writes, s.rate
    ));
    for (t, runs) in &rows.restart {
        let sum = |f: fn(&Verdict) -> u64| runs.iter().map(|x| f(&x.verdict)).sum::<u64>();
        let med = |f: fn(&Restart) -> f64| median(&mut runs.iter().map(f).collect::<Vec<_>>());
        o.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |\n",
            t.name(),
            sum(|v| v.missing),
            sum(|v| v.duplicates + v.out_of_order),
            ms(med(|x| x.max_gap.as_secs_f64())),
            ms(med(|x| x.restart.as_secs_f64())),
            runs.iter().map(|x| x.reconnects).sum::<u64>(),
            runs.iter().map(|x| x.put_errors).sum::<usize>(),
            verdict_cell(&runs.iter().map(|x| &x.verdict).collect::<Vec<_>>()),
        ));
    }
    o.push_str(&format!(
        "\n#### Watch from a past revision\n\n{} puts, then one prefix watcher from the \
         revision before them: grpc-proxy forwards it to etcd, keywatch replays its own log. \
         Time from opening the stream until the last event, after the tier caught up.\n\n\
         | tier | time (ms) | result |\n|---|---|---|\n",
        s.history
    ));
    for (t, runs) in &rows.history {
        o.push_str(&format!(
            "| {} | {} | {} |\n",
            t.name(),
            ms(median(&mut runs.iter().map(|r| r.0).collect::<Vec<_>>())),
            verdict_cell(&runs.iter().map(|r| &r.1).collect::<Vec<_>>())
        ));
    }
    o.push('\n');
    o.push_str(markers(tls).1);
    o.push('\n');
    o
}

/// The opening and closing markers of the generated section of `--doc`: one section for
/// plain runs, one for `--tls` runs, so both can stand side by side.
fn markers(tls: bool) -> (&'static str, &'static str) {
    if tls {
        (
            "<!-- mirror-bench-tls:begin -->",
            "<!-- mirror-bench-tls:end -->",
        )
    } else {
        ("<!-- mirror-bench:begin -->", "<!-- mirror-bench:end -->")
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args = Args::parse();
    if !testkit::etcd_present("keywatch-mirror-bench") {
        return Ok(());
    }
    let server_bin = testkit::find_watch_server(args.server_bin.clone())?;
    let s = Sizes::of(&args);
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let mut meta = Meta::collect(Some(args.etcd_bin.as_path()), command, args.quick);
    let started = Instant::now();
    let mut b = tokio::task::block_in_place(|| Bench::start(&args, &server_bin))?;
    b.ready(Tier::Keywatch).await?;
    b.ready(Tier::Proxy).await?;
    let mut rows = Rows::default();

    for (row, &n) in s.watchers.iter().enumerate() {
        let mut per: Vec<(Tier, Vec<Idle>)> = Vec::new();
        for r in 0..s.repeat {
            for t in order(row + r) {
                let i = idle(&mut b, t, n, Duration::from_secs_f64(s.register_timeout)).await?;
                eprintln!("mirror-bench: idle {n} {}: {i:?}", t.name());
                entry(&mut per, t).push(i);
            }
        }
        per.sort_by_key(|(t, _)| *t != Tier::Keywatch);
        rows.idle
            .extend(per.into_iter().map(|(t, runs)| (n, t, runs)));
    }
    // A tier whose registrations timed out still holds its backlog of create requests
    // (grpc-proxy keeps opening upstream watches for streams that are gone), which would
    // starve the next phase: every later phase starts on freshly started tiers.
    for t in [Tier::Keywatch, Tier::Proxy] {
        b.kill(t);
        b.settled_watchers().await?;
        b.restart(t).await?;
    }

    eprintln!(
        "mirror-bench: idle watchers done at {:.1?}",
        started.elapsed()
    );
    let mut run = 0;
    for r in 0..s.repeat {
        for t in std::iter::once(Tier::Etcd).chain(order(r)) {
            run += 1;
            let d = latency(&b, t, &s, run).await?;
            eprintln!(
                "mirror-bench: latency {}: p50 {} ms p99 {} ms, {}",
                t.name(),
                pct(&d.latency, 0.5),
                pct(&d.latency, 0.99),
                d.verdict.summary()
            );
            entry(&mut rows.latency, t).push(d);
        }
    }

    eprintln!("mirror-bench: latency done at {:.1?}", started.elapsed());
    for r in 0..s.repeat {
        for t in std::iter::once(Tier::Etcd).chain(order(r)) {
            run += 1;
            let k = leader_kill(&mut b, t, &s, run).await?;
            eprintln!(
                "mirror-bench: leader kill {}: pause {:?}, {}",
                t.name(),
                k.delivery.max_gap,
                k.delivery.verdict.summary()
            );
            entry(&mut rows.kill, t).push(k);
        }
    }

    eprintln!(
        "mirror-bench: leader kills done at {:.1?}",
        started.elapsed()
    );
    for r in 0..s.repeat {
        for t in order(r) {
            run += 1;
            let x = tier_restart(&mut b, t, &s, run).await?;
            eprintln!(
                "mirror-bench: tier restart {}: pause {:?}, {}",
                t.name(),
                x.max_gap,
                x.verdict.summary()
            );
            entry(&mut rows.restart, t).push(x);
        }
    }
    eprintln!(
        "mirror-bench: tier restarts done at {:.1?}",
        started.elapsed()
    );
    b.heal()?;
    let from = KvClient::new(b.etcd(0).await?)
        .range(pb::RangeRequest {
            key: "/hist/".into(),
            count_only: true,
            ..Default::default()
        })
        .await?
        .into_inner()
        .header
        .map_or(0, |h| h.revision)
        + 1;
    let written = loadgen::client::put_unpaced(
        &b.channels(Tier::Etcd, 0, 4).await?,
        keys("/hist/", s.history),
        s.history,
        16,
        VALUE,
        |n, _| n,
    )
    .await;
    if let Some(e) = written.errors.first() {
        bail!("history puts failed: {e}");
    }
    let want = digest(written.puts.iter().map(|p| p.1));
    for r in 0..s.repeat {
        for t in std::iter::once(Tier::Etcd).chain(order(r)) {
            let h = history(&b, t, from, &want).await?;
            eprintln!(
                "mirror-bench: past revision {}: {:.3} s, {}",
                t.name(),
                h.0,
                h.1.summary()
            );
            entry(&mut rows.history, t).push(h);
        }
    }
    drop(b);
    meta.finish();

    let section = markdown(&meta, &s, &rows, args.tls, &args.progress_interval);
    if args.no_write {
        println!("\n{section}");
    } else {
        let doc = std::fs::read_to_string(&args.doc).unwrap_or_default();
        std::fs::write(
            &args.doc,
            report::splice_between(&doc, markers(args.tls).0, markers(args.tls).1, &section),
        )
        .with_context(|| format!("write {}", args.doc.display()))?;
        println!("wrote the mirror-bench section of {}", args.doc.display());
    }
    println!("mirror-bench: done in {:.0?}", started.elapsed());

    // keywatch and etcd itself must be right; grpc-proxy's results are the comparison.
    let mut wrong = Vec::new();
    let judged = |t: Tier| t != Tier::Proxy;
    for (t, runs) in &rows.latency {
        wrong.extend(
            runs.iter()
                .filter(|d| judged(*t) && !d.verdict.ok())
                .map(|d| format!("latency, {}: {}", t.name(), d.verdict.summary())),
        );
    }
    for (t, runs) in &rows.kill {
        wrong.extend(
            runs.iter()
                .filter(|k| judged(*t) && !k.delivery.verdict.ok())
                .map(|k| {
                    format!(
                        "leader kill, {}: {}",
                        t.name(),
                        k.delivery.verdict.summary()
                    )
                }),
        );
    }
    for (t, runs) in &rows.restart {
        wrong.extend(
            runs.iter()
                .filter(|x| judged(*t) && !x.verdict.ok())
                .map(|x| format!("tier restart, {}: {}", t.name(), x.verdict.summary())),
        );
    }
    for (t, runs) in &rows.history {
        wrong.extend(
            runs.iter()
                .filter(|h| judged(*t) && !h.1.ok())
                .map(|h| format!("past revision, {}: {}", t.name(), h.1.summary())),
        );
    }
    if !wrong.is_empty() {
        bail!("{} wrong run(s):\n  {}", wrong.len(), wrong.join("\n  "));
    }
    Ok(())
}

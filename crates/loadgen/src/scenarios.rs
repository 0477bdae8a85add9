//! The scenarios. Each runs against one freshly started server and returns a [`RunResult`]
//! with its figures and its correctness [`Verdict`].

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use serde::Serialize;

use crate::check::{Digest, Verdict};
use crate::client::{self, Mode, Outcome, Spec, Streams, Written};
use crate::server::{Server, Target};
use crate::{Error, Sizes};

mod large;

/// No progress at all for this long fails the run (a correct run never comes close).
const IDLE_GUARD: Duration = Duration::from_secs(30);

/// One scenario with its parameters.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "scenario", rename_all = "lowercase")]
pub enum Case {
    /// W watchers on one prefix over C connections; P puts, unpaced or at `rate` puts/s.
    Fanout {
        /// Watchers.
        watchers: usize,
        /// Connections (one watch stream each).
        connections: usize,
        /// Puts.
        puts: usize,
        /// Puts per second, or `None` for as fast as acknowledged.
        rate: Option<f64>,
        /// Another process keeps every core busy during the case.
        busy: bool,
    },
    /// W watchers on W keys; P puts to random keys from K writers.
    Spread {
        /// Watchers (and keys).
        watchers: usize,
        /// Puts.
        puts: usize,
        /// Concurrent writers.
        writers: usize,
    },
    /// P puts, then W watchers replay them all.
    History {
        /// Watchers.
        watchers: usize,
        /// Past events each replays.
        puts: usize,
    },
    /// W watchers registered on W keys.
    Register {
        /// Watchers.
        watchers: usize,
        /// Connections.
        connections: usize,
    },
    /// H healthy watchers' latency while S watchers on the same prefix never read.
    Stalled {
        /// Healthy watchers (one connection).
        healthy: usize,
        /// Stalled watchers.
        stalled: usize,
        /// Puts, paced.
        puts: usize,
        /// Puts per second.
        rate: f64,
    },
    /// N keys of V bytes loaded by K writers, then memory, disk, a historical one-key Range,
    /// compactions under load and a restart (see `scenarios/large.rs`).
    Large {
        /// Keys.
        keys: usize,
        /// Value bytes.
        value_size: usize,
        /// Concurrent writers of the load.
        writers: usize,
    },
}

impl Case {
    /// The scenario's name.
    pub fn scenario(&self) -> &'static str {
        match self {
            Case::Fanout { .. } => "fan-out",
            Case::Spread { .. } => "spread",
            Case::History { .. } => "history",
            Case::Register { .. } => "register",
            Case::Stalled { .. } => "stalled",
            Case::Large { .. } => "large",
        }
    }
}

impl fmt::Display for Case {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Case::Fanout {
                watchers,
                connections,
                puts,
                rate,
                busy,
            } => {
                write!(f, "W={watchers} C={connections} P={puts} ")?;
                match rate {
                    Some(r) => write!(f, "paced {r}/s")?,
                    None => f.write_str("unpaced")?,
                }
                if *busy {
                    f.write_str(" busy")?;
                }
                Ok(())
            }
            Case::Spread {
                watchers,
                puts,
                writers,
            } => write!(f, "W={watchers} P={puts} K={writers}"),
            Case::History { watchers, puts } => write!(f, "W={watchers} P={puts}"),
            Case::Register {
                watchers,
                connections,
            } => write!(f, "W={watchers} C={connections}"),
            Case::Stalled {
                healthy,
                stalled,
                puts,
                rate,
            } => write!(f, "H={healthy} S={stalled} P={puts} {rate}/s"),
            Case::Large {
                keys,
                value_size,
                writers,
            } => write!(f, "N={keys} V={value_size} K={writers}"),
        }
    }
}

/// Longest a CPU burner of a busy case runs, in seconds.
const BURN_LIMIT_S: u64 = 600;

/// Latency summary in milliseconds, with the quantile curve for the charts.
#[derive(Clone, Debug, Serialize)]
pub struct Latency {
    /// Samples.
    pub count: u64,
    /// Median.
    pub p50_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// 99.9th percentile.
    pub p999_ms: f64,
    /// Largest.
    pub max_ms: f64,
    /// `(quantile, ms)` points.
    pub curve: Vec<(f64, f64)>,
}

impl Latency {
    /// Summarises a histogram in µs.
    pub fn of(h: &Histogram<u64>) -> Option<Latency> {
        if h.is_empty() {
            return None;
        }
        let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        let qs = [
            0.0, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.995, 0.999, 0.9995, 0.9999, 1.0,
        ];
        Some(Latency {
            count: h.len(),
            p50_ms: ms(0.5),
            p99_ms: ms(0.99),
            p999_ms: ms(0.999),
            max_ms: h.max() as f64 / 1000.0,
            curve: qs.iter().map(|&q| (q, ms(q))).collect(),
        })
    }
}

/// What one run of one case against one server measured.
#[derive(Clone, Debug, Serialize)]
pub struct RunResult {
    /// The case.
    pub case: Case,
    /// The server.
    #[serde(serialize_with = "crate::server::serialize_target")]
    pub target: Target,
    /// Named figures (`events_per_s`, `puts_per_s`, `replay_s`, ...).
    pub metrics: BTreeMap<String, f64>,
    /// put→event latency.
    pub event_latency: Option<Latency>,
    /// put round-trip latency.
    pub put_latency: Option<Latency>,
    /// Correctness.
    pub verdict: Verdict,
    /// Wall time of the run, seconds.
    pub wall_s: f64,
}

impl RunResult {
    /// A metric, if measured.
    pub fn metric(&self, name: &str) -> Option<f64> {
        self.metrics.get(name).copied()
    }
}

/// Everything a scenario collects before it is turned into a [`RunResult`].
struct Collected {
    metrics: BTreeMap<String, f64>,
    events: Histogram<u64>,
    puts: Option<Histogram<u64>>,
    verdict: Verdict,
}

impl Collected {
    fn new() -> Collected {
        Collected {
            metrics: BTreeMap::new(),
            events: client::histogram(),
            puts: None,
            verdict: Verdict::default(),
        }
    }

    fn metric(&mut self, name: &str, v: f64) {
        self.metrics.insert(name.to_owned(), v);
    }

    /// Server CPU seconds between two readings, and per million `events` delivered.
    fn server_cpu(&mut self, before: Option<f64>, after: Option<f64>, events: u64) {
        if let (Some(a), Some(b)) = (before, after) {
            let cpu = (b - a).max(0.0);
            self.metric("server_cpu_s", cpu);
            if events > 0 {
                self.metric("server_cpu_s_per_m_events", cpu * 1e6 / events as f64);
            }
        }
    }

    /// Checks every watcher of `outcomes` (grouped as `streams.specs`) against `expected(spec
    /// group, index within group)`, merges latency, and returns the last event time.
    fn outcomes(
        &mut self,
        outcomes: Vec<Outcome>,
        expected: impl Fn(usize, usize) -> Digest,
    ) -> Option<Instant> {
        let mut last = None;
        let responses: u64 = outcomes.iter().map(|o| o.responses).sum();
        let events: u64 = outcomes
            .iter()
            .flat_map(|o| o.seen.iter().map(|s| s.count()))
            .sum();
        if responses > 0 {
            self.metric("events_per_response", events as f64 / responses as f64);
        }
        for (g, o) in outcomes.into_iter().enumerate() {
            for (i, seen) in o.seen.iter().enumerate() {
                self.verdict.watcher(seen, &expected(g, i));
            }
            self.events.add(&o.latency).expect("same histogram bounds");
            for e in o.errors {
                self.verdict.error(e);
            }
            last = last.max(o.last_event);
        }
        last
    }

    fn written(&mut self, w: &Written) {
        for e in &w.errors {
            self.verdict.error(e.clone());
        }
        match &mut self.puts {
            Some(h) => h.add(&w.latency).expect("same histogram bounds"),
            None => self.puts = Some(w.latency.clone()),
        }
    }
}

fn digest_of(puts: &[(usize, i64)], filter: impl Fn(usize) -> bool) -> Digest {
    let mut revs: Vec<i64> = puts
        .iter()
        .filter(|(k, _)| filter(*k))
        .map(|&(_, r)| r)
        .collect();
    revs.sort_unstable();
    let mut d = Digest::default();
    revs.iter().for_each(|&r| d.add(r));
    d
}

fn keys(prefix: &str, n: usize) -> Arc<Vec<Bytes>> {
    Arc::new(
        (0..n)
            .map(|i| Bytes::from(format!("{prefix}{i:07}")))
            .collect(),
    )
}

fn secs(from: Instant, to: Option<Instant>) -> f64 {
    to.map_or(0.0, |t| t.saturating_duration_since(from).as_secs_f64())
}

/// Runs `case` against `server`.
pub async fn run(case: &Case, server: &mut Server, sizes: &Sizes) -> Result<RunResult, Error> {
    let started = Instant::now();
    let c = match *case {
        Case::Fanout {
            watchers,
            connections,
            puts,
            rate,
            busy,
        } => fanout(server, sizes, watchers, connections, puts, rate, busy).await?,
        Case::Spread {
            watchers,
            puts,
            writers,
        } => spread(server, sizes, watchers, puts, writers).await?,
        Case::History { watchers, puts } => history(server, sizes, watchers, puts).await?,
        Case::Register {
            watchers,
            connections,
        } => register(server, watchers, connections).await?,
        Case::Stalled {
            healthy,
            stalled,
            puts,
            rate,
        } => stalled_case(server, sizes, healthy, stalled, puts, rate).await?,
        Case::Large {
            keys,
            value_size,
            writers,
        } => large::large(server, keys, value_size, writers).await?,
    };
    Ok(RunResult {
        case: case.clone(),
        target: server.target,
        metrics: c.metrics,
        event_latency: Latency::of(&c.events),
        put_latency: c.puts.as_ref().and_then(Latency::of),
        verdict: c.verdict,
        wall_s: started.elapsed().as_secs_f64(),
    })
}

async fn writer_channels(
    endpoint: &str,
    n: usize,
) -> Result<Vec<tonic::transport::Channel>, Error> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n.max(1) {
        out.push(client::connect(endpoint).await?);
    }
    Ok(out)
}

async fn fanout(
    server: &Server,
    sizes: &Sizes,
    watchers: usize,
    connections: usize,
    puts: usize,
    rate: Option<f64>,
    busy: bool,
) -> Result<Collected, Error> {
    let mut c = Collected::new();
    let prefix = Bytes::from_static(b"fan/");
    let specs = vec![
        Spec {
            key: prefix,
            prefix: true,
            start_revision: 0,
        };
        watchers
    ];
    let streams = Streams::open(&server.endpoint, specs, connections, Mode::Measure).await?;
    if !streams
        .counters
        .wait_created(watchers as u64, IDLE_GUARD)
        .await
    {
        c.verdict.error(format!(
            "only {} of {watchers} watchers created",
            streams.counters.created()
        ));
    }
    let keys = keys("fan/k", 16);
    let channels = writer_channels(&server.endpoint, 2).await?;
    let want = (watchers * puts) as u64;
    streams.counters.expect_events(want);
    // The load starts before the clock and outlasts the case; bounded so no burner outlives
    // a run that failed.
    let burners = if busy {
        Some(crate::server::Burners::start(BURN_LIMIT_S)?)
    } else {
        None
    };
    let cpu0 = server.cpu_seconds();
    let t0 = Instant::now();
    let written = match rate {
        None => {
            client::put_unpaced(
                &channels,
                keys,
                puts,
                sizes.writers,
                sizes.value_size,
                |n, len| n % len,
            )
            .await
        }
        Some(r) => client::put_paced(&channels[0], keys, puts, r, sizes.value_size).await,
    };
    let write_s = t0.elapsed().as_secs_f64();
    streams.counters.wait_events(want, IDLE_GUARD).await;
    let cpu1 = server.cpu_seconds();
    drop(burners);
    let received = streams.counters.events();
    c.server_cpu(cpu0, cpu1, received);
    let outcomes = streams.finish().await;
    c.written(&written);
    let all = digest_of(&written.puts, |_| true);
    let last = c.outcomes(outcomes, |_, _| all);
    let span = secs(t0, last);
    c.metric("puts_per_s", puts as f64 / write_s);
    c.metric(
        "events_per_s",
        if span > 0.0 {
            received as f64 / span
        } else {
            0.0
        },
    );
    c.metric("delivery_s", span);
    Ok(c)
}

async fn spread(
    server: &Server,
    sizes: &Sizes,
    watchers: usize,
    puts: usize,
    writers: usize,
) -> Result<Collected, Error> {
    let mut c = Collected::new();
    let keys = keys("spr/", watchers);
    let specs = keys
        .iter()
        .map(|k| Spec {
            key: k.clone(),
            prefix: false,
            start_revision: 0,
        })
        .collect();
    let streams = Streams::open(&server.endpoint, specs, sizes.connections, Mode::Measure).await?;
    if !streams
        .counters
        .wait_created(watchers as u64, IDLE_GUARD)
        .await
    {
        c.verdict.error("not every watcher was created");
    }
    let channels = writer_channels(&server.endpoint, 4).await?;
    streams.counters.expect_events(puts as u64);
    let cpu0 = server.cpu_seconds();
    let t0 = Instant::now();
    let written = client::put_unpaced(
        &channels,
        keys.clone(),
        puts,
        writers,
        sizes.value_size,
        |_, len| fastrand::usize(..len),
    )
    .await;
    let write_s = t0.elapsed().as_secs_f64();
    // The server's CPU over the writes (their deliveries included), per acknowledged put.
    if let (Some(a), Some(b)) = (cpu0, server.cpu_seconds())
        && !written.puts.is_empty()
    {
        c.metric(
            "server_cpu_us_per_put",
            (b - a).max(0.0) * 1e6 / written.puts.len() as f64,
        );
    }
    streams.counters.wait_events(puts as u64, IDLE_GUARD).await;
    // A floor under the put latency: the same clients' serializable Ranges, which wait for no
    // disk, run after the writes (what a put takes beyond this is its durable path and the
    // CPU the writes compete for).
    let reads = client::range_unpaced(&channels, keys, puts, writers).await;
    if let Some(e) = reads.errors.first() {
        c.verdict
            .error(format!("{} ranges failed, first: {e}", reads.errors.len()));
    }
    if !reads.latency.is_empty() {
        c.metric(
            "range_p50_ms",
            reads.latency.value_at_quantile(0.5) as f64 / 1e3,
        );
        c.metric(
            "range_p99_ms",
            reads.latency.value_at_quantile(0.99) as f64 / 1e3,
        );
    }
    let groups = streams.specs.len();
    let outcomes = streams.finish().await;
    c.written(&written);
    // Watcher `i` of group `g` watches key `g + i * groups` (round-robin spread).
    let mut per_key = vec![Digest::default(); watchers];
    let mut sorted = written.puts.clone();
    sorted.sort_unstable_by_key(|&(_, r)| r);
    for (k, r) in sorted {
        per_key[k].add(r);
    }
    c.outcomes(outcomes, |g, i| per_key[g + i * groups]);
    c.metric("puts_per_s", written.puts.len() as f64 / write_s);
    Ok(c)
}

async fn history(
    server: &Server,
    sizes: &Sizes,
    watchers: usize,
    puts: usize,
) -> Result<Collected, Error> {
    let mut c = Collected::new();
    let channels = writer_channels(&server.endpoint, 2).await?;
    let written = client::put_unpaced(
        &channels,
        keys("hist/k", 16),
        puts,
        sizes.writers,
        sizes.value_size,
        |n, len| n % len,
    )
    .await;
    c.written(&written);
    let all = digest_of(&written.puts, |_| true);
    let first = written.puts.iter().map(|&(_, r)| r).min().unwrap_or(1);
    let specs = vec![
        Spec {
            key: Bytes::from_static(b"hist/"),
            prefix: true,
            start_revision: first,
        };
        watchers
    ];
    let want = (watchers * puts) as u64;
    let t0 = Instant::now();
    let streams = Streams::open(&server.endpoint, specs, sizes.connections, Mode::Check).await?;
    streams.counters.wait_events(want, IDLE_GUARD).await;
    let outcomes = streams.finish().await;
    let last = c.outcomes(outcomes, |_, _| all);
    let span = secs(t0, last);
    c.metric("replay_s", span);
    c.metric(
        "events_per_s",
        if span > 0.0 { want as f64 / span } else { 0.0 },
    );
    Ok(c)
}

async fn register(
    server: &Server,
    watchers: usize,
    connections: usize,
) -> Result<Collected, Error> {
    let mut c = Collected::new();
    let keys = keys("reg/", watchers);
    let specs = keys
        .iter()
        .map(|k| Spec {
            key: k.clone(),
            prefix: false,
            start_revision: 0,
        })
        .collect();
    // The baseline is taken before the connections: the delta includes their buffers (a few
    // connections, negligible against the watchers).
    let rss_before = server.rss_bytes();
    let t0 = Instant::now();
    let streams = Streams::open(&server.endpoint, specs, connections, Mode::Check).await?;
    let ok = streams
        .counters
        .wait_created(watchers as u64, IDLE_GUARD)
        .await;
    let reg_s = t0.elapsed().as_secs_f64();
    let rss_after = server.rss_bytes();
    if !ok {
        c.verdict.error(format!(
            "only {} of {watchers} watchers created",
            streams.counters.created()
        ));
    }
    // Every registered watcher must also work: one put on a sample of keys.
    let sample: Vec<usize> = (0..watchers).step_by((watchers / 100).max(1)).collect();
    let channels = writer_channels(&server.endpoint, 1).await?;
    streams.counters.expect_events(sample.len() as u64);
    let mut kv = watch_proto::etcdserverpb::kv_client::KvClient::new(channels[0].clone());
    let mut written = Written::new();
    for &i in &sample {
        client::put(&mut kv, &keys, i, 16, &mut written).await;
    }
    streams
        .counters
        .wait_events(sample.len() as u64, IDLE_GUARD)
        .await;
    let groups = streams.specs.len();
    let outcomes = streams.finish().await;
    let mut per_key = vec![Digest::default(); watchers];
    for &(k, r) in &written.puts {
        per_key[k].add(r);
    }
    for e in &written.errors {
        c.verdict.error(e.clone());
    }
    c.outcomes(outcomes, |g, i| per_key[g + i * groups]);
    c.metric("registrations_per_s", watchers as f64 / reg_s);
    if let (Some(b), Some(a)) = (rss_before, rss_after) {
        c.metric("rss_before_mib", b as f64 / (1 << 20) as f64);
        c.metric("rss_after_mib", a as f64 / (1 << 20) as f64);
        c.metric(
            "rss_per_watcher_b",
            a.saturating_sub(b) as f64 / watchers as f64,
        );
    }
    Ok(c)
}

async fn stalled_case(
    server: &Server,
    sizes: &Sizes,
    healthy: usize,
    stalled: usize,
    puts: usize,
    rate: f64,
) -> Result<Collected, Error> {
    let mut c = Collected::new();
    let spec = Spec {
        key: Bytes::from_static(b"st/"),
        prefix: true,
        start_revision: 0,
    };
    let healthy_streams = Streams::open(
        &server.endpoint,
        vec![spec.clone(); healthy],
        1,
        Mode::Measure,
    )
    .await?;
    let stalled_streams = if stalled > 0 {
        let s = Streams::open(
            &server.endpoint,
            vec![spec; stalled],
            sizes.stalled_connections,
            Mode::Stall,
        )
        .await?;
        if !s.counters.wait_created(stalled as u64, IDLE_GUARD).await {
            c.verdict.error("not every stalled watcher was created");
        }
        Some(s)
    } else {
        None
    };
    if !healthy_streams
        .counters
        .wait_created(healthy as u64, IDLE_GUARD)
        .await
    {
        c.verdict.error("not every healthy watcher was created");
    }
    let channels = writer_channels(&server.endpoint, 1).await?;
    let want = (healthy * puts) as u64;
    healthy_streams.counters.expect_events(want);
    let written = client::put_paced(
        &channels[0],
        keys("st/k", 16),
        puts,
        rate,
        sizes.stalled_value_size,
    )
    .await;
    healthy_streams.counters.wait_events(want, IDLE_GUARD).await;
    let outcomes = healthy_streams.finish().await;
    if let Some(s) = stalled_streams {
        // Their content is not checked: they never read.
        s.finish().await;
    }
    c.written(&written);
    let all = digest_of(&written.puts, |_| true);
    c.outcomes(outcomes, |_, _| all);
    if let Some(rss) = server.rss_bytes() {
        c.metric("rss_end_mib", rss as f64 / (1 << 20) as f64);
    }
    Ok(c)
}

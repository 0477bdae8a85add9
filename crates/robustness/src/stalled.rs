//! Pressure scenario: many watchers stop reading while many writes happen.
//!
//! Stalled watchers (all keys, `--per-stream` per stream) stop reading right after `created`;
//! healthy watchers (one stream each) read everything; writers put `--writes` unique values.
//! Then the stalled watchers read again. Asserted (outcomes, not timings): the server's RSS
//! stays under a bound derived from its configuration, healthy watchers get every event
//! (validated like a random run), and each stalled watcher either catches up completely or
//! is canceled with the compaction revision to resume from. Reported: RSS and the healthy
//! watchers' put-to-event latency.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;
use tonic::transport::{Channel, Endpoint};
use watch_proto::etcdserverpb as pb;
use watch_proto::etcdserverpb::kv_client::KvClient;
use watch_proto::etcdserverpb::watch_client::WatchClient;

use crate::Error;
use crate::record::{
    AckDetail, Outcome, Request, Response, RunRecord, Session, SessionEnd, WatchSpec,
    WatcherRecord, WriteRecord,
};
use crate::validate::validate;
use crate::wire;

/// Settings of the stalled scenario.
#[derive(Debug, Clone, clap::Args)]
pub struct StalledArgs {
    /// Watchers that stop reading.
    #[arg(long, default_value_t = 1000)]
    pub stalled: usize,
    /// Stalled watchers per watch stream.
    #[arg(long, default_value_t = 10)]
    pub per_stream: usize,
    /// Healthy watchers (one stream each), whose delivery latency is measured.
    #[arg(long, default_value_t = 10)]
    pub healthy: usize,
    /// Puts in total.
    #[arg(long, default_value_t = 100_000)]
    pub writes: usize,
    /// Concurrent writers.
    #[arg(long, default_value_t = 8)]
    pub writers: usize,
    /// Compact at the midpoint of the writes (stalled watchers then end compacted).
    #[arg(long)]
    pub compact: bool,
    /// The server's `--watch-buffer` (revisions queued per watcher).
    #[arg(long, default_value_t = 64)]
    pub watch_buffer: u32,
    /// The server's `--durability` (no-sync: the scenario is about memory and delivery).
    #[arg(long, default_value = "no-sync")]
    pub durability: String,
}

impl StalledArgs {
    /// Small sizes for tests.
    pub fn small(stalled: usize, writes: usize, compact: bool) -> Self {
        StalledArgs {
            stalled,
            per_stream: 10,
            healthy: 4,
            writes,
            writers: 4,
            compact,
            watch_buffer: 64,
            durability: "no-sync".into(),
        }
    }

    /// The RSS growth bound in KiB, from the configuration (see docs/reliability.md):
    /// the engine's in-memory window (at most 64 MiB of memory; here far less, as 65,536
    /// small change sets at ≤ 512 B each = 32 MiB), per stalled watcher `watch_buffer` queued
    /// batches (≤ 256 B each: an `Arc` and the selected indices), per stream the outbound
    /// queue (≤ 1 MiB of encoded responses, watch-server's `OUTBOUND_BYTES`) plus HTTP/2
    /// buffers (≤ 1 MiB), and 64 MiB for the allocator, redb's page cache and tokio.
    pub fn rss_bound_kib(&self) -> u64 {
        let streams = self.stalled.div_ceil(self.per_stream.max(1)) + self.healthy;
        let window = 32 * 1024;
        let queues = (self.stalled as u64 * self.watch_buffer as u64 * 256) / 1024;
        let per_stream = streams as u64 * (1024 + 1024);
        window + queues + per_stream + 64 * 1024
    }
}

/// Outcome of the stalled scenario.
#[derive(Debug, Clone, Default)]
pub struct StalledReport {
    /// Broken properties (empty: passed).
    pub violations: Vec<String>,
    /// RSS after the watchers were created, before the writes (KiB).
    pub baseline_rss_kib: u64,
    /// Highest RSS sampled during the writes and the catch-up (KiB).
    pub peak_rss_kib: u64,
    /// RSS at the end of the writes (KiB).
    pub end_rss_kib: u64,
    /// Allowed growth over the baseline (KiB).
    pub bound_kib: u64,
    /// Final revision.
    pub final_revision: i64,
    /// Stalled watchers that caught up completely.
    pub caught_up: usize,
    /// Stalled watchers canceled with a compact revision.
    pub compacted: usize,
    /// Healthy put-to-event latency percentiles (p50, p99, max).
    pub latency: (Duration, Duration, Duration),
    /// Events the healthy watchers received.
    pub healthy_events: usize,
    /// How long the writes took.
    pub write_time: Duration,
}

impl fmt::Display for StalledReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "stalled: final revision {}, writes took {:.1?}",
            self.final_revision, self.write_time
        )?;
        writeln!(
            f,
            "stalled: RSS baseline {} KiB, peak {} KiB (+{} KiB), at end of writes {} KiB; bound +{} KiB",
            self.baseline_rss_kib,
            self.peak_rss_kib,
            self.peak_rss_kib.saturating_sub(self.baseline_rss_kib),
            self.end_rss_kib,
            self.bound_kib
        )?;
        writeln!(
            f,
            "stalled: healthy watchers: {} events, put-to-event latency p50 {:.2?}, p99 {:.2?}, max {:.2?}",
            self.healthy_events, self.latency.0, self.latency.1, self.latency.2
        )?;
        writeln!(
            f,
            "stalled: stalled watchers: {} caught up completely, {} canceled with a compact revision",
            self.caught_up, self.compacted
        )?;
        write!(f, "stalled: {} violations", self.violations.len())?;
        for v in &self.violations {
            write!(f, "\nstalled: VIOLATION {v}")?;
        }
        Ok(())
    }
}

fn all_keys(prev_kv: bool) -> WatchSpec {
    WatchSpec {
        key: vec![0],
        range_end: vec![0],
        prev_kv,
        no_put: false,
        no_delete: false,
        progress_notify: false,
        initial_state: false,
    }
}

struct Stream {
    tx: mpsc::Sender<pb::WatchRequest>,
    inbound: Streaming<pb::WatchResponse>,
    /// watch id → index into `watchers`.
    ids: HashMap<i64, usize>,
}

fn rpc(what: &str) -> impl Fn(tonic::Status) -> Error + '_ {
    move |status| Error::Rpc {
        what: what.into(),
        status,
    }
}

async fn channel(endpoint: &str) -> Result<Channel, Error> {
    Endpoint::from_shared(endpoint.to_owned())
        .map_err(|e| rpc("endpoint")(tonic::Status::invalid_argument(e.to_string())))?
        .connect()
        .await
        .map_err(|e| rpc("connect")(tonic::Status::unavailable(e.to_string())))
}

/// Opens a stream with `n` all-keys watches created one by one; records their sessions.
async fn open(
    ch: Channel,
    n: usize,
    prev_kv: bool,
    watchers: &mut Vec<WatcherRecord>,
    behaviour: &str,
) -> Result<Stream, Error> {
    let (tx, rx) = mpsc::channel(16);
    let mut inbound = WatchClient::new(ch)
        .watch(ReceiverStream::new(rx))
        .await
        .map_err(rpc("open a watch stream"))?
        .into_inner();
    let mut ids = HashMap::new();
    for _ in 0..n {
        let spec = all_keys(prev_kv);
        let _ = tx.send(wire::create(&spec, 0)).await;
        let resp = inbound
            .message()
            .await
            .map_err(rpc("create"))?
            .ok_or_else(|| rpc("create")(tonic::Status::unavailable("stream ended")))?;
        if !resp.created || resp.canceled {
            return Err(rpc("create")(tonic::Status::internal(resp.cancel_reason)));
        }
        ids.insert(resp.watch_id, watchers.len());
        watchers.push(WatcherRecord {
            id: watchers.len(),
            spec,
            behaviour: behaviour.into(),
            sessions: vec![Session {
                start_revision: 0,
                created_revision: resp.header.map(|h| h.revision),
                responses: Vec::new(),
                end: SessionEnd::Closed,
            }],
            reference: false,
        });
    }
    Ok(Stream { tx, inbound, ids })
}

/// What a reader took from its stream: per watcher its responses, how it ended, and for each
/// received PUT its value and the instant it arrived.
type Received = (
    Vec<(usize, Vec<Response>, SessionEnd)>,
    Vec<(Vec<u8>, Instant)>,
);

/// Reads a stream until every watch on it is canceled or covered up to `final_rev` (read from
/// `target` once non-zero), asking for progress while waiting.
async fn read(
    mut s: Stream,
    target: Arc<AtomicU64>,
    start: Instant,
    keep_values: bool,
    compacted_before: i64,
) -> Received {
    let mut state: HashMap<usize, (Vec<Response>, i64, bool)> = s
        .ids
        .values()
        .map(|&w| (w, (Vec::new(), 0, false)))
        .collect();
    let mut values = Vec::new();
    let mut ask = tokio::time::interval(Duration::from_millis(100));
    let end = loop {
        let f = target.load(Ordering::Relaxed) as i64;
        if f > 0
            && state
                .values()
                .all(|(_, covered, done)| *done || *covered >= f)
        {
            break SessionEnd::Drained(f);
        }
        tokio::select! {
            msg = s.inbound.message() => {
                let resp = match msg {
                    Ok(Some(r)) => r,
                    Ok(None) => break SessionEnd::Broken("stream ended".into()),
                    Err(e) => break SessionEnd::Broken(e.to_string()),
                };
                let header = resp.header.as_ref().map_or(0, |h| h.revision);
                let targets: Vec<usize> = if resp.watch_id == -1 {
                    state.keys().copied().collect()
                } else {
                    s.ids.get(&resp.watch_id).copied().into_iter().collect()
                };
                let now = Instant::now();
                for w in targets {
                    let Some((rs, covered, done)) = state.get_mut(&w) else { continue };
                    if *done {
                        continue;
                    }
                    if resp.canceled {
                        rs.push(Response::Canceled {
                            compact_revision: resp.compact_revision,
                            reason: resp.cancel_reason.clone(),
                        });
                        *done = true;
                    } else if !resp.events.is_empty() {
                        let events: Vec<_> = resp.events.iter().map(wire::event).collect();
                        if keep_values {
                            values.extend(events.iter().map(|e| (e.kv.value.clone(), now)));
                        }
                        *covered = (*covered).max(events.last().map_or(0, |e| e.kv.mod_revision));
                        rs.push(Response::Events {
                            header_revision: header,
                            events,
                            compacted_before,
                            at: now - start,
                        });
                    } else if !resp.created && header != 0 {
                        rs.push(Response::Progress { revision: header });
                        *covered = (*covered).max(header);
                    }
                }
            }
            _ = ask.tick() => {
                if target.load(Ordering::Relaxed) > 0 {
                    let _ = s.tx.try_send(wire::progress_request());
                }
            }
        }
    };
    let out = state
        .into_iter()
        .map(|(w, (rs, _, done))| {
            let end = if done {
                SessionEnd::Canceled
            } else {
                end.clone()
            };
            (w, rs, end)
        })
        .collect();
    (out, values)
}

/// Runs the scenario against `bin`.
pub async fn run(bin: &Path, args: &StalledArgs) -> Result<StalledReport, Error> {
    let server_args = vec![
        "--watch-buffer".to_owned(),
        args.watch_buffer.to_string(),
        "--durability".to_owned(),
        args.durability.clone(),
    ];
    let b = bin.to_path_buf();
    let server = tokio::task::spawn_blocking(move || {
        crate::server::start(&b, "keywatch-stalled-", &server_args)
    })
    .await??;
    let pid = server.pid().unwrap_or(0);
    let endpoint = server.endpoint();
    let start = Instant::now();
    let mut watchers = Vec::new();

    let healthy_ch = channel(&endpoint).await?;
    let mut healthy = Vec::new();
    for _ in 0..args.healthy {
        healthy.push(open(healthy_ch.clone(), 1, true, &mut watchers, "healthy").await?);
    }
    let mut stalled = Vec::new();
    let mut stalled_ch = channel(&endpoint).await?;
    let mut left = args.stalled;
    while left > 0 {
        // One connection per 100 stalled watchers.
        if stalled.len() % 10 == 9 {
            stalled_ch = channel(&endpoint).await?;
        }
        let n = left.min(args.per_stream.max(1));
        stalled.push(open(stalled_ch.clone(), n, true, &mut watchers, "stalled").await?);
        left -= n;
    }
    let baseline = testkit::rss_kib(pid).unwrap_or(0);

    // prev_kv may be absent at or below a compaction (only with --compact).
    let may_compact = if args.compact { i64::MAX } else { 0 };
    // Healthy readers run throughout; stalled streams are not read.
    let target = Arc::new(AtomicU64::new(0));
    let healthy_tasks: Vec<_> = healthy
        .into_iter()
        .map(|s| tokio::spawn(read(s, target.clone(), start, true, may_compact)))
        .collect();
    let sampling = Arc::new(AtomicBool::new(true));
    let peak = Arc::new(AtomicU64::new(baseline));
    let sampler = {
        let (sampling, peak) = (sampling.clone(), peak.clone());
        tokio::spawn(async move {
            while sampling.load(Ordering::Relaxed) {
                if let Some(rss) = testkit::rss_kib(pid) {
                    peak.fetch_max(rss, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };

    // Writers.
    let kv_ch = channel(&endpoint).await?;
    let write_start = Instant::now();
    let per_writer = args.writes.div_ceil(args.writers.max(1));
    let compact_at = if args.compact {
        args.writes / 2 / args.writers.max(1)
    } else {
        usize::MAX
    };
    let mut writer_tasks = Vec::new();
    for w in 0..args.writers.max(1) {
        let mut kv = KvClient::new(kv_ch.clone());
        writer_tasks.push(tokio::spawn(async move {
            let mut out = Vec::with_capacity(per_writer);
            let mut sent_at = Vec::with_capacity(per_writer);
            for n in 0..per_writer {
                let key = format!("s/{:02}", (n * 7 + w) % 16).into_bytes();
                let value = format!("w{w}-{n}").into_bytes();
                let sent = Instant::now();
                let r = kv
                    .put(pb::PutRequest {
                        key: key.clone().into(),
                        value: value.clone().into(),
                        prev_kv: true,
                        ..Default::default()
                    })
                    .await
                    .map_err(rpc("put"))?
                    .into_inner();
                let revision = r.header.map_or(0, |h| h.revision);
                sent_at.push((value.clone(), sent));
                out.push(WriteRecord {
                    writer: w,
                    sent: sent - start,
                    request: Request::Put { key, value },
                    outcome: Outcome::Ack {
                        revision,
                        detail: AckDetail::Put {
                            prev: r.prev_kv.as_ref().map(wire::kv),
                        },
                    },
                });
                if w == 0 && n == compact_at {
                    kv.compact(pb::CompactionRequest {
                        revision,
                        physical: true,
                    })
                    .await
                    .map_err(rpc("compact"))?;
                }
            }
            Ok::<_, Error>((out, sent_at))
        }));
    }
    let mut writes = Vec::new();
    let mut sent_at: HashMap<Vec<u8>, Instant> = HashMap::new();
    for t in writer_tasks {
        let (w, s) = t.await??;
        writes.extend(w);
        sent_at.extend(s);
    }
    let write_time = write_start.elapsed();
    let end_rss = testkit::rss_kib(pid).unwrap_or(0);

    let range = KvClient::new(kv_ch.clone())
        .range(pb::RangeRequest {
            key: vec![0].into(),
            range_end: vec![0].into(),
            ..Default::default()
        })
        .await
        .map_err(rpc("final range"))?
        .into_inner();
    let final_revision = range.header.map_or(0, |h| h.revision);
    let mut kvs: Vec<_> = range.kvs.iter().map(wire::kv).collect();
    kvs.sort_by(|a, b| a.key.cmp(&b.key));
    target.store(final_revision as u64, Ordering::Relaxed);

    // Healthy watchers drain; then the stalled ones read again.
    let mut received = Vec::new();
    let mut latencies = Vec::new();
    for t in healthy_tasks {
        let (r, values) = t.await?;
        for (v, at) in values {
            if let Some(sent) = sent_at.get(&v) {
                latencies.push(at.saturating_duration_since(*sent));
            }
        }
        received.extend(r);
    }
    let healthy_events = latencies.len();
    let stalled_tasks: Vec<_> = stalled
        .into_iter()
        .map(|s| tokio::spawn(read(s, target.clone(), start, false, may_compact)))
        .collect();
    for t in stalled_tasks {
        received.extend(t.await?.0);
    }
    sampling.store(false, Ordering::Relaxed);
    sampler.await?;
    drop(server);

    let mut caught_up = 0;
    let mut compacted = 0;
    for (w, responses, end) in received {
        if watchers[w].behaviour == "stalled" {
            match end {
                SessionEnd::Drained(_) => caught_up += 1,
                SessionEnd::Canceled => compacted += 1,
                _ => {}
            }
        }
        let session = &mut watchers[w].sessions[0];
        session.responses = responses;
        session.end = end;
    }
    let record = RunRecord {
        seed: 0,
        writes,
        watchers,
        compactions: Vec::new(),
        final_range: Some((final_revision, kvs)),
        kills: 0,
    };
    let report = validate(&record);
    let mut violations: Vec<String> = report.violations.iter().map(|v| v.to_string()).collect();
    let peak = peak.load(Ordering::Relaxed);
    let bound = args.rss_bound_kib();
    if peak.saturating_sub(baseline) > bound {
        violations.push(format!(
            "RSS grew by {} KiB (baseline {baseline} KiB, peak {peak} KiB), over the bound of {bound} KiB",
            peak - baseline
        ));
    }
    if caught_up + compacted != args.stalled {
        violations.push(format!(
            "only {caught_up} stalled watchers caught up and {compacted} were canceled compacted, of {}",
            args.stalled
        ));
    }
    if !args.compact && compacted > 0 {
        violations.push(format!(
            "{compacted} watchers canceled without any compaction"
        ));
    }
    latencies.sort();
    let pct = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    Ok(StalledReport {
        violations,
        baseline_rss_kib: baseline,
        peak_rss_kib: peak,
        end_rss_kib: end_rss,
        bound_kib: bound,
        final_revision,
        caught_up,
        compacted,
        latency: (
            pct(0.5),
            pct(0.99),
            latencies.last().copied().unwrap_or_default(),
        ),
        healthy_events,
        write_time,
    })
}

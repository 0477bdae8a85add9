//! The etcd v3 client side: connections, watch streams carrying many watchers, and writers.
//! Only watch-proto's generated tonic clients are used, so keywatch and etcd see the same
//! requests byte for byte.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use tokio::sync::{Notify, mpsc, watch};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use watch_proto::etcdserverpb::kv_client::KvClient;
use watch_proto::etcdserverpb::watch_client::WatchClient;
use watch_proto::etcdserverpb::watch_request::RequestUnion;
use watch_proto::etcdserverpb::{PutRequest, RangeRequest, WatchCreateRequest, WatchRequest};

use crate::Error;
use crate::check::Seen;

/// The process-wide clock origin: values carry their put time as nanoseconds since it.
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Nanoseconds since `epoch()`.
pub fn now_nanos() -> u64 {
    epoch().elapsed().as_nanos() as u64
}

/// A value of `size` bytes (at least 8) starting with the current time, for latency.
pub fn stamped_value(size: usize) -> Bytes {
    let mut v = vec![b'x'; size.max(8)];
    v[..8].copy_from_slice(&now_nanos().to_le_bytes());
    Bytes::from(v)
}

/// A latency histogram in microseconds (1 µs to 10 min, 3 significant digits).
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds")
}

/// Records `micros`, clamped into the histogram's range.
pub fn record(h: &mut Histogram<u64>, micros: u64) {
    h.saturating_record(micros.max(1));
}

/// The settings of every connection to `endpoint` (connect timeout, no Nagle); add TLS or a
/// request timeout before connecting.
pub fn endpoint(endpoint: &str) -> Result<Endpoint, Error> {
    Ok(Channel::from_shared(endpoint.to_owned())
        .map_err(|e| Error::Rpc(format!("endpoint {endpoint}: {e}")))?
        .connect_timeout(Duration::from_secs(30))
        .tcp_nodelay(true))
}

/// TLS towards a server whose certificate chains to `ca_pem`, presenting `identity`
/// (certificate and key, PEM) when given (etcd's `--client-cert-auth`).
pub fn tls(ca_pem: &[u8], identity: Option<(&[u8], &[u8])>) -> ClientTlsConfig {
    let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca_pem));
    match identity {
        Some((cert, key)) => tls.identity(Identity::from_pem(cert, key)),
        None => tls,
    }
}

/// Connects `ep` (from [`endpoint`]).
pub async fn connect_endpoint(ep: Endpoint) -> Result<Channel, Error> {
    let uri = ep.uri().clone();
    ep.connect()
        .await
        .map_err(|e| Error::Rpc(format!("connect {uri}: {e}")))
}

/// A new HTTP/2 connection to `endpoint`.
pub async fn connect(endpoint: &str) -> Result<Channel, Error> {
    connect_endpoint(self::endpoint(endpoint)?).await
}

/// One watcher: a key, or a prefix when `prefix` is true.
#[derive(Clone, Debug)]
pub struct Spec {
    /// The key or prefix.
    pub key: Bytes,
    /// Watch every key starting with `key`.
    pub prefix: bool,
    /// Replay from this revision (0: from now).
    pub start_revision: i64,
}

impl Spec {
    fn request(&self) -> WatchRequest {
        let range_end = if self.prefix {
            prefix_end(&self.key)
        } else {
            Bytes::new()
        };
        WatchRequest {
            request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
                key: self.key.clone(),
                range_end,
                start_revision: self.start_revision,
                ..Default::default()
            })),
        }
    }

    fn matches(&self, key: &[u8]) -> bool {
        if self.prefix {
            key.starts_with(&self.key)
        } else {
            key == self.key.as_ref()
        }
    }
}

/// etcd's range end for "every key with this prefix".
pub fn prefix_end(prefix: &[u8]) -> Bytes {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Bytes::from(end);
        }
    }
    Bytes::from_static(&[0])
}

/// Counters shared by every stream task of a run, and the wake-up of whoever waits on them.
#[derive(Debug, Default)]
pub struct Counters {
    created: AtomicU64,
    events: AtomicU64,
    want_created: AtomicU64,
    want_events: AtomicU64,
    notify: Notify,
}

impl Counters {
    /// Fresh counters (nobody waiting).
    pub fn new() -> Arc<Counters> {
        let c = Counters::default();
        c.want_created.store(u64::MAX, Ordering::Relaxed);
        c.want_events.store(u64::MAX, Ordering::Relaxed);
        Arc::new(c)
    }

    /// Events received so far.
    pub fn events(&self) -> u64 {
        self.events.load(Ordering::SeqCst)
    }

    /// Watchers created so far.
    pub fn created(&self) -> u64 {
        self.created.load(Ordering::SeqCst)
    }

    fn add_created(&self) {
        let v = self.created.fetch_add(1, Ordering::SeqCst) + 1;
        if v >= self.want_created.load(Ordering::SeqCst) {
            self.notify.notify_one();
        }
    }

    /// Counts `n` more events (wakes a [`Counters::wait_events`] that reached its goal).
    pub fn add_events(&self, n: u64) {
        let v = self.events.fetch_add(n, Ordering::SeqCst) + n;
        if v >= self.want_events.load(Ordering::SeqCst) {
            self.notify.notify_one();
        }
    }

    /// Announces that `want` events are the goal, before the writes start, so the stream
    /// task that reaches it wakes [`Counters::wait_events`].
    pub fn expect_events(&self, want: u64) {
        self.want_events.store(want, Ordering::SeqCst);
    }

    /// Waits until `want` watchers are created; false if no progress for `idle`.
    pub async fn wait_created(&self, want: u64, idle: Duration) -> bool {
        self.want_created.store(want, Ordering::SeqCst);
        self.wait(|c| c.created(), want, idle).await
    }

    /// Waits until `want` events arrived; false if no progress for `idle`.
    pub async fn wait_events(&self, want: u64, idle: Duration) -> bool {
        self.want_events.store(want, Ordering::SeqCst);
        self.wait(|c| c.events(), want, idle).await
    }

    async fn wait(&self, get: fn(&Counters) -> u64, want: u64, idle: Duration) -> bool {
        let mut before = get(self);
        loop {
            let notified = self.notify.notified();
            if get(self) >= want {
                return true;
            }
            if tokio::time::timeout(idle, notified).await.is_err() {
                let now = get(self);
                if now >= want {
                    return true;
                }
                if now == before {
                    return false;
                }
                before = now;
            }
        }
    }
}

/// How a stream task treats its watchers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Read everything, check it, and record put→event latency.
    Measure,
    /// Read everything and check it (no latency: replayed events).
    Check,
    /// Read the `created` replies, then never read again (a stalled client).
    Stall,
}

/// What one stream task saw.
#[derive(Debug)]
pub struct Outcome {
    /// Per watcher, in spec order.
    pub seen: Vec<Seen>,
    /// put→event latency (µs) of every event, in [`Mode::Measure`].
    pub latency: Histogram<u64>,
    /// When the last event arrived.
    pub last_event: Option<Instant>,
    /// The longest wait between two responses carrying events (a stall of the stream, e.g.
    /// across an upstream failure); zero before the second such response.
    pub max_gap: Duration,
    /// Responses that carried events (how the server batches: events / this).
    pub responses: u64,
    /// Anything that went wrong.
    pub errors: Vec<String>,
}

/// Opens one watch stream on `channel` carrying one watcher per spec and reads it until `stop`
/// turns true. Every create is sent up front (before the call, so a server that sends its
/// response headers only with the first message does not deadlock the call).
pub async fn watch_stream(
    channel: Channel,
    specs: Vec<Spec>,
    mode: Mode,
    counters: Arc<Counters>,
    mut stop: watch::Receiver<bool>,
) -> Outcome {
    let mut out = Outcome {
        seen: vec![Seen::default(); specs.len()],
        latency: histogram(),
        last_event: None,
        max_gap: Duration::ZERO,
        responses: 0,
        errors: Vec::new(),
    };
    let (tx, rx) = mpsc::unbounded_channel();
    for s in &specs {
        // The receiver is alive: it is moved into the call below.
        let _ = tx.send(s.request());
    }
    let mut client = WatchClient::new(channel).max_decoding_message_size(usize::MAX);
    let call = client.watch(UnboundedReceiverStream::new(rx));
    let mut stream = tokio::select! {
        r = call => match r {
            Ok(r) => r.into_inner(),
            Err(e) => {
                out.errors.push(format!("open watch stream: {e}"));
                return out;
            }
        },
        _ = stop.wait_for(|s| *s) => return out,
    };
    let mut ids: HashMap<i64, usize> = HashMap::with_capacity(specs.len());
    let mut next = 0usize;
    loop {
        if mode == Mode::Stall && next == specs.len() {
            // Hold the stream open without reading; flow control backs up into the server.
            let _ = stop.wait_for(|s| *s).await;
            drop(tx);
            return out;
        }
        let msg = tokio::select! {
            m = stream.message() => m,
            _ = stop.wait_for(|s| *s) => break,
        };
        let resp = match msg {
            Ok(Some(r)) => r,
            Ok(None) => {
                out.errors.push("watch stream ended".into());
                break;
            }
            Err(e) => {
                out.errors.push(format!("watch stream failed: {e}"));
                break;
            }
        };
        if resp.created {
            if resp.canceled || next >= specs.len() {
                out.errors.push(format!(
                    "create refused or unexpected: {} {}",
                    resp.watch_id, resp.cancel_reason
                ));
            } else {
                ids.insert(resp.watch_id, next);
                next += 1;
                counters.add_created();
            }
        } else if resp.canceled {
            out.errors.push(format!(
                "watch {} canceled (compact {}): {}",
                resp.watch_id, resp.compact_revision, resp.cancel_reason
            ));
        }
        if resp.events.is_empty() {
            continue;
        }
        let Some(&i) = ids.get(&resp.watch_id) else {
            out.errors
                .push(format!("events for unknown watch {}", resp.watch_id));
            continue;
        };
        let now = now_nanos();
        let seen = &mut out.seen[i];
        seen.begin_response(resp.fragment);
        for ev in &resp.events {
            let Some(kv) = ev.kv.as_ref() else {
                out.errors.push("event without kv".into());
                continue;
            };
            seen.event(kv.mod_revision, specs[i].matches(&kv.key));
            if mode == Mode::Measure && kv.value.len() >= 8 {
                let sent = u64::from_le_bytes(kv.value[..8].try_into().expect("8 bytes"));
                record(&mut out.latency, now.saturating_sub(sent) / 1000);
            }
        }
        let arrived = Instant::now();
        if let Some(prev) = out.last_event {
            out.max_gap = out.max_gap.max(arrived.duration_since(prev));
        }
        out.last_event = Some(arrived);
        out.responses += 1;
        counters.add_events(resp.events.len() as u64);
    }
    drop(tx);
    out
}

/// Puts issued by one writer, with their commit revisions.
#[derive(Debug)]
pub struct Written {
    /// `(key index, revision)` of every acknowledged put.
    pub puts: Vec<(usize, i64)>,
    /// Round-trip latency (µs) of every answered request.
    pub latency: Histogram<u64>,
    /// Failed requests.
    pub errors: Vec<String>,
}

impl Written {
    /// Nothing written yet.
    pub fn new() -> Written {
        Written {
            puts: Vec::new(),
            latency: histogram(),
            errors: Vec::new(),
        }
    }

    /// Adds another writer's puts.
    pub fn merge(&mut self, o: Written) {
        self.puts.extend(o.puts);
        self.latency.add(&o.latency).expect("same histogram bounds");
        self.errors.extend(o.errors.into_iter().take(20));
    }
}

impl Default for Written {
    fn default() -> Self {
        Written::new()
    }
}

/// One put of `keys[index]` with a time-stamped value; records into `w`.
pub async fn put(
    kv: &mut KvClient<Channel>,
    keys: &[Bytes],
    index: usize,
    value_size: usize,
    w: &mut Written,
) {
    let started = Instant::now();
    let req = PutRequest {
        key: keys[index].clone(),
        value: stamped_value(value_size),
        ..Default::default()
    };
    match kv.put(req).await {
        Ok(resp) => {
            record(&mut w.latency, started.elapsed().as_micros() as u64);
            match resp.into_inner().header {
                Some(h) => w.puts.push((index, h.revision)),
                None => w.errors.push("put response without header".into()),
            }
        }
        Err(e) => w.errors.push(format!("put: {e}")),
    }
}

/// `count` puts from `writers` concurrent writers, each taking the next put from a shared
/// counter, as fast as the server acknowledges them. `pick` chooses the key index of put `n`.
pub async fn put_unpaced(
    channels: &[Channel],
    keys: Arc<Vec<Bytes>>,
    count: usize,
    writers: usize,
    value_size: usize,
    pick: fn(usize, usize) -> usize,
) -> Written {
    unpaced(channels, keys, count, writers, Some((value_size, pick))).await
}

/// `count` serializable one-key Ranges (key `n % keys.len()`) from `clients` concurrent
/// clients, as fast as the server answers: the round trip of a request that waits for no
/// disk. Run with the clients and channels of [`put_unpaced`], it is a floor under a put's
/// latency: the RPC's own cost, without the durable path or the CPU the writes take (it runs
/// after them). Only `latency` and `errors` of the result are filled.
pub async fn range_unpaced(
    channels: &[Channel],
    keys: Arc<Vec<Bytes>>,
    count: usize,
    clients: usize,
) -> Written {
    unpaced(channels, keys, count, clients, None).await
}

/// What [`unpaced`] puts: the value size, and the key index of put `n` from `(n, keys)`.
type PutSpec = (usize, fn(usize, usize) -> usize);

/// The loop of [`put_unpaced`] (`put: Some(..)`) and [`range_unpaced`] (`None`).
async fn unpaced(
    channels: &[Channel],
    keys: Arc<Vec<Bytes>>,
    count: usize,
    clients: usize,
    put: Option<PutSpec>,
) -> Written {
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for w in 0..clients.max(1) {
        let mut kv = KvClient::new(channels[w % channels.len()].clone());
        let keys = keys.clone();
        let next = next.clone();
        tasks.push(tokio::spawn(async move {
            let mut out = Written::new();
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed) as usize;
                if n >= count {
                    return out;
                }
                match put {
                    Some((value_size, pick)) => {
                        let i = pick(n, keys.len());
                        self::put(&mut kv, &keys, i, value_size, &mut out).await;
                    }
                    None => range(&mut kv, &keys[n % keys.len()], &mut out).await,
                }
            }
        }));
    }
    join_writers(tasks).await
}

/// One serializable Range of `key`; records its round trip into `w`.
async fn range(kv: &mut KvClient<Channel>, key: &Bytes, w: &mut Written) {
    let started = Instant::now();
    let req = RangeRequest {
        key: key.clone(),
        serializable: true,
        ..Default::default()
    };
    match kv.range(req).await {
        Ok(_) => record(&mut w.latency, started.elapsed().as_micros() as u64),
        Err(e) => w.errors.push(format!("range: {e}")),
    }
}

/// `count` puts at `rate` per second (each issued on schedule whatever the previous one is
/// doing, so a slow server does not slow the offered load down).
pub async fn put_paced(
    channel: &Channel,
    keys: Arc<Vec<Bytes>>,
    count: usize,
    rate: f64,
    value_size: usize,
) -> Written {
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate.max(1.0)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut tasks = Vec::with_capacity(count);
    for n in 0..count {
        tick.tick().await;
        let mut kv = KvClient::new(channel.clone());
        let keys = keys.clone();
        tasks.push(tokio::spawn(async move {
            let mut out = Written::new();
            put(&mut kv, &keys, n % keys.len(), value_size, &mut out).await;
            out
        }));
    }
    join_writers(tasks).await
}

async fn join_writers(tasks: Vec<tokio::task::JoinHandle<Written>>) -> Written {
    let mut all = Written::new();
    for t in tasks {
        match t.await {
            Ok(w) => all.merge(w),
            Err(e) => all.errors.push(format!("writer task: {e}")),
        }
    }
    all
}

/// A stop signal for stream tasks, and the handles to collect them.
pub struct Streams {
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<Outcome>>,
    /// Shared counters of every stream.
    pub counters: Arc<Counters>,
    /// Spec lists, in task order.
    pub specs: Vec<Vec<Spec>>,
}

impl Streams {
    /// Spreads `specs` round-robin over `connections` new connections (one stream each) and
    /// starts reading them.
    pub async fn open(
        endpoint: &str,
        specs: Vec<Spec>,
        connections: usize,
        mode: Mode,
    ) -> Result<Streams, Error> {
        let c = connections.clamp(1, specs.len().max(1));
        let mut groups: Vec<Vec<Spec>> = vec![Vec::new(); c];
        for (i, s) in specs.into_iter().enumerate() {
            groups[i % c].push(s);
        }
        let mut channels = Vec::with_capacity(c);
        for _ in 0..c {
            channels.push(connect(endpoint).await?);
        }
        Ok(Streams::open_on(channels, groups, mode))
    }

    /// One stream per channel (connections the caller made, e.g. with [`connect_tls`]), the
    /// `i`th carrying `groups[i]`, and starts reading them.
    pub fn open_on(channels: Vec<Channel>, groups: Vec<Vec<Spec>>, mode: Mode) -> Streams {
        let (stop, rx) = watch::channel(false);
        let counters = Counters::new();
        let tasks = groups
            .iter()
            .zip(channels)
            .map(|(g, ch)| {
                tokio::spawn(watch_stream(
                    ch,
                    g.clone(),
                    mode,
                    counters.clone(),
                    rx.clone(),
                ))
            })
            .collect();
        Streams {
            stop,
            tasks,
            counters,
            specs: groups,
        }
    }

    /// Stops every stream and returns what each saw, in spec-group order.
    pub async fn finish(self) -> Vec<Outcome> {
        let _ = self.stop.send(true);
        let mut out = Vec::new();
        for t in self.tasks {
            match t.await {
                Ok(o) => out.push(o),
                Err(e) => out.push(Outcome {
                    seen: Vec::new(),
                    latency: histogram(),
                    last_event: None,
                    max_gap: Duration::ZERO,
                    responses: 0,
                    errors: vec![format!("stream task: {e}")],
                }),
            }
        }
        out
    }
}

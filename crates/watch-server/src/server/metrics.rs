//! Prometheus metrics: the registry, what the services record, what is read at scrape time,
//! and the `GET /metrics` endpoint.
//!
//! Three sources feed one [`prometheus_client`] registry:
//! - counters and histograms recorded as things happen: RPCs ([`RpcMetricsLayer`], a tower
//!   layer around every gRPC service), watch streams ([`WatchMetrics`]) and event-log commits
//!   ([`LogMetrics`], an [`event_log::LogObserver`]);
//! - a [`Collector`] that reads the store and the watch engine's
//!   [`watch_core::EngineStats`] (relaxed atomics) and the process RSS at scrape time, so
//!   nothing on the write or publish path touches the registry;
//! - nothing else: watch-core and event-log do not depend on a metrics crate.
//!
//! `docs/operations.md` lists every metric.
//!
//! # Parts
//!
//! - `server/metrics.rs`: one `prometheus_client::Registry` per server (no global state): a tower
//!   layer (`RpcMetricsLayer`) records each call's start, duration and gRPC status (from the
//!   trailers-only headers or the body's trailers, so stream statuses and errors are right;
//!   dropped calls count as CANCELLED; method labels come from the served descriptors, unknown
//!   paths are `unknown`) and opens the `grpc` span (method, peer); `WatchMetrics` (streams,
//!   events, cancels by reason, publish→send latency from the store's `PublishClock` ring);
//!   `LogMetrics` (the `LogObserver`); a scrape-time collector (revision, compacted revision,
//!   keys, db size, `EngineStats`, RSS from `/proc/self/statm`); `GET /metrics` via axum on
//!   `--metrics-listen` (off by default). Metrics list: `docs/operations.md`.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http_body::Frame;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use super::listen::{ConnInfo, ConnMetrics};
use kv_store::Store;

/// OpenMetrics text, which Prometheus scrapes natively.
pub(crate) const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    grpc_service: String,
    grpc_method: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HandledLabels {
    grpc_service: String,
    grpc_method: String,
    grpc_code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LimitLabels {
    limit: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

/// Latency buckets in seconds: 50 µs to ~26 s, doubling.
fn latency_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(50e-6, 2.0, 20)
}

/// The server's metrics registry and the handles the services record into. One per
/// [`crate::server::Server`]; nothing is global, so several servers in one process (tests)
/// keep separate counts.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    rpc: Arc<RpcMetrics>,
    watch: WatchMetrics,
    connections: ConnMetrics,
    log: Arc<LogMetrics>,
    /// Mirror mode's status, once the mirror runs (read at scrape time).
    mirror: MirrorSlot,
}

type MirrorSlot = Arc<OnceLock<tokio::sync::watch::Receiver<crate::mirror::MirrorStatus>>>;

impl Metrics {
    /// A registry with every keywatch metric; scrape-time values come from the store put in
    /// `store` once it is open (none are reported before).
    pub fn new(store: Arc<OnceLock<Store>>) -> Self {
        let mut registry = Registry::default();
        let rpc = Arc::new(RpcMetrics::new(&mut registry));
        let watch = WatchMetrics::register(&mut registry);
        let connections = ConnMetrics::register(&mut registry);
        let log = Arc::new(LogMetrics::register(&mut registry));
        registry.register_collector(Box::new(StoreCollector { store }));
        let mirror = MirrorSlot::default();
        registry.register_collector(Box::new(MirrorCollector {
            status: mirror.clone(),
        }));
        Self {
            registry,
            rpc,
            watch,
            connections,
            log,
            mirror,
        }
    }

    /// Reports a mirror's status (mirror mode) as `keywatch_mirror_connected` and
    /// `keywatch_mirror_revision`. Once; later calls are ignored.
    pub fn set_mirror_status(
        &self,
        status: tokio::sync::watch::Receiver<crate::mirror::MirrorStatus>,
    ) {
        let _ = self.mirror.set(status);
    }

    /// The tower layer recording every gRPC call.
    pub fn rpc_layer(&self) -> RpcMetricsLayer {
        RpcMetricsLayer {
            metrics: self.rpc.clone(),
        }
    }

    /// The watch service's handles.
    pub fn watch(&self) -> WatchMetrics {
        self.watch.clone()
    }

    /// The client port's connection handles.
    pub(crate) fn connections(&self) -> ConnMetrics {
        self.connections.clone()
    }

    /// The event-log observer.
    pub fn log_observer(&self) -> Arc<LogMetrics> {
        self.log.clone()
    }

    /// The registry in the OpenMetrics text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail; a collector error would be a bug in this module.
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "encoding metrics");
        }
        out
    }
}

/// Watch-stream metrics, recorded by [`crate::server::WatchService`]. Cheap to clone (shared
/// atomics). `Default` gives unregistered handles, for a service without a registry.
#[derive(Debug, Clone)]
pub struct WatchMetrics {
    streams: Gauge,
    events: Counter,
    responses: Counter,
    cancels: Family<ReasonLabels, Counter>,
    refused: Family<LimitLabels, Counter>,
    publish_to_send: Histogram,
}

impl Default for WatchMetrics {
    fn default() -> Self {
        Self {
            streams: Gauge::default(),
            events: Counter::default(),
            responses: Counter::default(),
            cancels: Family::default(),
            refused: Family::default(),
            publish_to_send: Histogram::new(latency_buckets()),
        }
    }
}

/// Why a watch ended, as the `reason` label of `keywatch_watch_cancels_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CancelKind {
    /// The client sent a cancel request.
    Client,
    /// A create was refused (limit, duplicate id, bad request).
    Refused,
    /// The watch's start revision or its catch-up needed compacted history.
    Compacted,
    /// The history store failed while catching the watcher up.
    HistoryUnavailable,
    /// The engine shut down (server shutdown).
    Shutdown,
    /// The stream ended (client gone or server shutdown) with the watch still active.
    StreamClosed,
    /// Another engine reason.
    Other,
}

impl CancelKind {
    fn label(self) -> &'static str {
        match self {
            Self::Client => "client",
            Self::Refused => "refused",
            Self::Compacted => "compacted",
            Self::HistoryUnavailable => "history_unavailable",
            Self::Shutdown => "shutdown",
            Self::StreamClosed => "stream_closed",
            Self::Other => "other",
        }
    }
}

impl WatchMetrics {
    fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "keywatch_watch_streams",
            "Open Watch RPC streams",
            m.streams.clone(),
        );
        registry.register(
            "keywatch_watch_events_sent",
            "Events sent to watch clients",
            m.events.clone(),
        );
        registry.register(
            "keywatch_watch_responses_sent",
            "Watch responses carrying events sent to clients",
            m.responses.clone(),
        );
        registry.register(
            "keywatch_watch_cancels",
            "Watches ended, by reason",
            m.cancels.clone(),
        );
        registry.register(
            "keywatch_watch_creates_refused",
            "Watch creates refused by a watcher limit, by limit: server (--max-watchers), \
             stream, connection, user (--max-watchers-per-*)",
            m.refused.clone(),
        );
        registry.register(
            "keywatch_watch_publish_to_send_seconds",
            "Time from a revision's publication to the watch engine to its live response \
             being handed to the client's stream (once per revision per batch a stream hands \
             over; catch-up responses are not counted)",
            m.publish_to_send.clone(),
        );
        m
    }

    /// A stream opened; the gauge goes down when the guard drops.
    pub(crate) fn stream_opened(&self) -> StreamGuard {
        self.streams.inc();
        StreamGuard {
            streams: self.streams.clone(),
        }
    }

    /// `responses` responses carrying `events` events in all were handed to the client's
    /// stream.
    pub(crate) fn sent(&self, responses: u64, events: usize) {
        self.responses.inc_by(responses);
        self.events.inc_by(events as u64);
    }

    /// (events, responses) counted as sent.
    #[cfg(test)]
    pub(crate) fn sent_counts(&self) -> (u64, u64) {
        (self.events.get(), self.responses.get())
    }

    pub(crate) fn publish_to_send(&self, elapsed: Duration) {
        self.publish_to_send.observe(elapsed.as_secs_f64());
    }

    /// A create was refused by the watcher limit `limit` (the label).
    pub(crate) fn limit_refused(&self, limit: &'static str) {
        self.refused.get_or_create(&LimitLabels { limit }).inc();
    }

    pub(crate) fn canceled(&self, kind: CancelKind, n: u64) {
        self.cancels
            .get_or_create(&ReasonLabels {
                reason: kind.label(),
            })
            .inc_by(n);
    }
}

/// Decrements the open-streams gauge on drop.
pub(crate) struct StreamGuard {
    streams: Gauge,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.streams.dec();
    }
}

/// Event-log commit metrics; installed on the store's log as its [`event_log::LogObserver`].
#[derive(Debug)]
pub struct LogMetrics {
    batch: Histogram,
    batch_bytes: Histogram,
    commit: Histogram,
    failures: Counter,
}

impl LogMetrics {
    fn register(registry: &mut Registry) -> Self {
        let m = Self {
            batch: Histogram::new(exponential_buckets(1.0, 2.0, 12)),
            batch_bytes: Histogram::new(exponential_buckets(64.0, 4.0, 10)),
            commit: Histogram::new(latency_buckets()),
            failures: Counter::default(),
        };
        registry.register(
            "keywatch_log_batch_change_sets",
            "Change sets (revisions) per event-log group commit",
            m.batch.clone(),
        );
        registry.register(
            "keywatch_log_batch_bytes",
            "Encoded bytes per event-log group commit",
            m.batch_bytes.clone(),
        );
        registry.register(
            "keywatch_log_commit_duration_seconds",
            "Duration of one event-log group commit, fsync included",
            m.commit.clone(),
        );
        registry.register(
            "keywatch_log_commit_failures",
            "Failed event-log commits or compactions (each one stops the store: fail-stop)",
            m.failures.clone(),
        );
        m
    }
}

impl event_log::LogObserver for LogMetrics {
    fn batch_committed(&self, change_sets: usize, bytes: usize, duration: Duration) {
        self.batch.observe(change_sets as f64);
        self.batch_bytes.observe(bytes as f64);
        self.commit.observe(duration.as_secs_f64());
    }

    fn commit_failed(&self, _error: &event_log::LogError) {
        self.failures.inc();
    }
}

/// Reads the store, the engine's counters and the process RSS at scrape time.
#[derive(Debug)]
struct StoreCollector {
    store: Arc<OnceLock<Store>>,
}

fn gauge(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    value: i64,
) -> Result<(), std::fmt::Error> {
    let g = ConstGauge::new(value);
    let e = encoder.encode_descriptor(name, help, None, g.metric_type())?;
    g.encode(e)
}

fn to_i64(v: impl TryInto<i64>) -> i64 {
    v.try_into().unwrap_or(i64::MAX)
}

impl Collector for StoreCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        if let Some(rss) = resident_memory_bytes() {
            gauge(
                &mut encoder,
                "process_resident_memory_bytes",
                "Resident set size of the server process",
                to_i64(rss),
            )?;
        }
        let Some(store) = self.store.get() else {
            return Ok(());
        };
        gauge(
            &mut encoder,
            "keywatch_revision",
            "Current revision: every revision up to it is durable and published to watchers",
            to_i64(store.durable_revision()),
        )?;
        gauge(
            &mut encoder,
            "keywatch_compacted_revision",
            "Compaction revision: reads and watches below it fail (0: never compacted)",
            to_i64(store.compacted_revision()),
        )?;
        gauge(
            &mut encoder,
            "keywatch_keys",
            "Keys in the current state",
            to_i64(store.key_count()),
        )?;
        gauge(
            &mut encoder,
            "keywatch_db_size_bytes",
            "Size of the data files on disk (event log, persisted state, lease records)",
            to_i64(store.disk_size()),
        )?;
        gauge(
            &mut encoder,
            "keywatch_db_size_in_use_bytes",
            "Bytes of live data in the data files (log records and index, persisted state \
             rows, lease records), kept as counters: what the space quota counts",
            to_i64(store.bytes_in_use()),
        )?;
        gauge(
            &mut encoder,
            "keywatch_quota_backend_bytes",
            "Space quota in bytes of data in use (--quota-backend-bytes; 0: none)",
            to_i64(store.config().quota_bytes),
        )?;
        {
            let alarms = store.alarms();
            let mut e = encoder.encode_descriptor(
                "keywatch_alarms",
                "Alarms raised, by type (NOSPACE: past the space quota)",
                None,
                MetricType::Gauge,
            )?;
            for (name, kind) in [
                ("NONE", kv_store::Alarm::None),
                ("NOSPACE", kv_store::Alarm::NoSpace),
                ("CORRUPT", kv_store::Alarm::Corrupt),
            ] {
                let n = alarms.iter().filter(|a| a.alarm == kind).count();
                ConstGauge::new(to_i64(n)).encode(e.encode_family(&[("alarm", name)])?)?;
            }
        }
        let (defrag, defrags) = store.last_defragment();
        gauge(
            &mut encoder,
            "keywatch_defragmentations",
            "Defragmentations (Maintenance.Defragment) since the server started",
            to_i64(defrags),
        )?;
        if let Some(d) = defrag {
            gauge(
                &mut encoder,
                "keywatch_defrag_before_bytes",
                "Size of the data files before the last defragmentation",
                to_i64(d.before),
            )?;
            gauge(
                &mut encoder,
                "keywatch_defrag_after_bytes",
                "Size of the data files after the last defragmentation",
                to_i64(d.after),
            )?;
        }
        let stats = store.engine().stats();
        {
            let mut e = encoder.encode_descriptor(
                "keywatch_watchers",
                "Registered watchers, by selector kind",
                None,
                MetricType::Gauge,
            )?;
            for (kind, n) in [
                ("key", stats.key_watchers),
                ("prefix", stats.prefix_watchers),
                ("range", stats.range_watchers),
                ("from_key", stats.from_key_watchers),
                ("all", stats.all_watchers),
            ] {
                let labels = [("selector", kind)];
                ConstGauge::new(to_i64(n)).encode(e.encode_family(&labels)?)?;
            }
        }
        gauge(
            &mut encoder,
            "keywatch_watchers_catching_up",
            "Watchers catching up from history (slow consumers or past start revisions)",
            to_i64(stats.catching_up),
        )?;
        let c = ConstCounter::new(stats.catch_ups_started);
        let e = encoder.encode_descriptor(
            "keywatch_watch_catch_ups",
            "Times a watcher started catching up from history",
            None,
            c.metric_type(),
        )?;
        c.encode(e)?;
        Ok(())
    }
}

/// The process's resident set size, from the `VmRSS` line of `/proc/self/status` (Linux only;
/// `None` elsewhere). The kernel states it in kB (KiB), whatever the page size.
fn resident_memory_bytes() -> Option<u64> {
    parse_vm_rss(&std::fs::read_to_string("/proc/self/status").ok()?)
}

/// `VmRSS:     1234 kB` in a `/proc/<pid>/status` text, in bytes.
fn parse_vm_rss(status: &str) -> Option<u64> {
    let line = status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?;
    let mut parts = line.split_whitespace();
    let kib: u64 = parts.next()?.parse().ok()?;
    (parts.next()? == "kB").then_some(kib * 1024)
}

/// Serves `GET /metrics` on `listener` until `stop` resolves and every connection ended (an
/// open connection ends once the `listener`'s cut signal turns true).
pub(crate) async fn serve(
    listener: super::cut::CutListener,
    metrics: Arc<Metrics>,
    stop: impl Future<Output = ()> + Send + 'static,
) {
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let metrics = metrics.clone();
            async move {
                (
                    [(http::header::CONTENT_TYPE, CONTENT_TYPE)],
                    metrics.encode(),
                )
            }
        }),
    );
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(stop)
        .await
    {
        tracing::error!(error = %e, "metrics endpoint failed");
    }
}

/// Binds the metrics endpoint's address.
pub(crate) async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Per-method handles, resolved once so a call costs a map lookup and atomic adds.
#[derive(Debug)]
struct MethodMetrics {
    service: String,
    method: String,
    started: Counter,
    duration: Histogram,
    /// `grpc_server_handled_total` by code (index: the numeric gRPC code), created on first use.
    handled: [OnceLock<Counter>; 17],
}

/// RPC metrics: known methods (from the served services' descriptors) are labeled by name;
/// anything else is counted as `unknown`, so a client cannot grow the label set.
#[derive(Debug)]
struct RpcMetrics {
    handled: Family<HandledLabels, Counter>,
    /// Path (`/package.Service/Method`) to its handles.
    methods: HashMap<String, Arc<MethodMetrics>>,
    unknown: Arc<MethodMetrics>,
}

/// `(service, method)` of every RPC in the descriptor sets the server serves.
fn known_methods() -> Vec<(String, String)> {
    use prost::Message;
    let mut out = Vec::new();
    for fds in [
        watch_proto::FILE_DESCRIPTOR_SET,
        tonic_health::pb::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
    ] {
        let Ok(set) = prost_types::FileDescriptorSet::decode(fds) else {
            continue;
        };
        for file in set.file {
            let package = file.package.unwrap_or_default();
            for service in file.service {
                let name = format!("{package}.{}", service.name.unwrap_or_default());
                for method in service.method {
                    out.push((name.clone(), method.name.unwrap_or_default()));
                }
            }
        }
    }
    out
}

impl RpcMetrics {
    fn new(registry: &mut Registry) -> Self {
        let started = Family::<MethodLabels, Counter>::default();
        let handled = Family::<HandledLabels, Counter>::default();
        let duration = Family::<MethodLabels, Histogram>::new_with_constructor(
            (|| Histogram::new(latency_buckets())) as fn() -> Histogram,
        );
        registry.register(
            "keywatch_grpc_server_started",
            "gRPC calls started, by service and method",
            started.clone(),
        );
        registry.register(
            "keywatch_grpc_server_handled",
            "gRPC calls finished, by service, method and status code (streams count when they \
             end)",
            handled.clone(),
        );
        registry.register(
            "keywatch_grpc_server_handling_seconds",
            "gRPC call duration until its status is sent; for streams (Watch, LeaseKeepAlive) \
             the stream's lifetime",
            duration.clone(),
        );
        let resolve = |service: String, method: String| {
            let labels = MethodLabels {
                grpc_service: service.clone(),
                grpc_method: method.clone(),
            };
            Arc::new(MethodMetrics {
                started: started.get_or_create_owned(&labels),
                duration: duration.get_or_create_owned(&labels),
                service,
                method,
                handled: Default::default(),
            })
        };
        let methods = known_methods()
            .into_iter()
            .map(|(s, m)| (format!("/{s}/{m}"), resolve(s, m)))
            .collect();
        let unknown = resolve("unknown".into(), "unknown".into());
        Self {
            handled,
            methods,
            unknown,
        }
    }

    fn method(&self, path: &str) -> Arc<MethodMetrics> {
        self.methods.get(path).unwrap_or(&self.unknown).clone()
    }

    fn handled(&self, m: &MethodMetrics, code: tonic::Code) {
        let i = code as usize;
        let counter = match m.handled.get(i) {
            Some(slot) => slot.get_or_init(|| {
                self.handled.get_or_create_owned(&HandledLabels {
                    grpc_service: m.service.clone(),
                    grpc_method: m.method.clone(),
                    grpc_code: code_name(code),
                })
            }),
            None => return,
        };
        counter.inc();
    }
}

/// The canonical upper-case gRPC code name, as grpc-go's metrics label it.
fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Records one call when its status is known; a call whose response is dropped before a
/// status (the client went away) counts as CANCELLED.
struct CallRecord {
    rpc: Arc<RpcMetrics>,
    method: Arc<MethodMetrics>,
    started: Instant,
    done: bool,
}

impl CallRecord {
    fn finish(&mut self, code: tonic::Code) {
        if self.done {
            return;
        }
        self.done = true;
        self.method
            .duration
            .observe(self.started.elapsed().as_secs_f64());
        self.rpc.handled(&self.method, code);
    }
}

impl Drop for CallRecord {
    fn drop(&mut self) {
        self.finish(tonic::Code::Cancelled);
    }
}

/// The status in a `grpc-status` header or trailer, if there is one.
fn status_of(headers: &http::HeaderMap) -> Option<tonic::Code> {
    let v = headers.get("grpc-status")?;
    let n: i32 = v.to_str().ok()?.parse().ok()?;
    Some(tonic::Code::from_i32(n))
}

/// The tower layer that records every gRPC call's start, status code and duration, and opens
/// a `grpc` tracing span (debug level) with the method and the peer address around it.
#[derive(Debug, Clone)]
pub struct RpcMetricsLayer {
    metrics: Arc<RpcMetrics>,
}

impl<S> tower::Layer<S> for RpcMetricsLayer {
    type Service = RpcMetricsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RpcMetricsService {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

/// See [`RpcMetricsLayer`].
#[derive(Debug, Clone)]
pub struct RpcMetricsService<S> {
    inner: S,
    metrics: Arc<RpcMetrics>,
}

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for RpcMetricsService<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
{
    type Response = http::Response<MetricsBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        let method = self.metrics.method(req.uri().path());
        method.started.inc();
        let peer = req
            .extensions()
            .get::<ConnInfo>()
            .and_then(|i| i.remote_addr());
        // Debug level: free when disabled (the default filter is `info`).
        let span = tracing::debug_span!(
            "grpc",
            method = %req.uri().path(),
            peer = peer.map(tracing::field::display),
        );
        let future = {
            let _enter = span.enter();
            self.inner.call(req)
        };
        ResponseFuture {
            inner: future,
            span,
            record: Some(CallRecord {
                rpc: self.metrics.clone(),
                method,
                started: Instant::now(),
                done: false,
            }),
        }
    }
}

pin_project_lite::pin_project! {
    /// The response future of [`RpcMetricsService`].
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        span: tracing::Span,
        record: Option<CallRecord>,
    }
}

impl<F, ResBody, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<http::Response<ResBody>, E>>,
{
    type Output = Result<http::Response<MetricsBody<ResBody>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let _enter = this.span.enter();
        let result = match this.inner.poll(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(r) => r,
        };
        let mut record = this.record.take();
        match result {
            Ok(resp) => {
                // A trailers-only response (an error before any message) carries its status
                // in the headers; otherwise the status comes in the body's trailers.
                if let (Some(code), Some(r)) = (status_of(resp.headers()), record.as_mut()) {
                    r.finish(code);
                }
                Poll::Ready(Ok(resp.map(|body| MetricsBody {
                    inner: body,
                    record,
                })))
            }
            Err(e) => {
                if let Some(r) = record.as_mut() {
                    r.finish(tonic::Code::Unknown);
                }
                Poll::Ready(Err(e))
            }
        }
    }
}

pin_project_lite::pin_project! {
    /// A response body that records the call's status when its trailers pass.
    pub struct MetricsBody<B> {
        #[pin]
        inner: B,
        record: Option<CallRecord>,
    }
}

impl<B: http_body::Body> http_body::Body for MetricsBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(trailers), Some(r)) = (frame.trailers_ref(), this.record.as_mut()) {
                    r.finish(status_of(trailers).unwrap_or(tonic::Code::Unknown));
                }
            }
            Poll::Ready(Some(Err(_))) => {
                if let Some(r) = this.record.as_mut() {
                    r.finish(tonic::Code::Unknown);
                }
            }
            Poll::Ready(None) => {
                // Ended without trailers: a status was already taken from the headers, or
                // the stream broke.
                if let Some(r) = this.record.as_mut() {
                    r.finish(tonic::Code::Unknown);
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Mirror mode's gauges, read from the mirror's status at scrape time (none in standalone
/// mode).
#[derive(Debug)]
struct MirrorCollector {
    status: MirrorSlot,
}

impl Collector for MirrorCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let Some(rx) = self.status.get() else {
            return Ok(());
        };
        let status = rx.borrow().clone();
        gauge(
            &mut encoder,
            "keywatch_mirror_connected",
            "1 while the mirror's upstream etcd watch is open, 0 otherwise (mirror mode)",
            i64::from(status.is_connected()),
        )?;
        gauge(
            &mut encoder,
            "keywatch_mirror_revision",
            "Upstream revision the mirror has applied (mirror mode)",
            to_i64(status.revision),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_rss_is_read_in_kib() {
        let status = "Name:\twatch-server\nVmPeak:\t  99999 kB\nVmRSS:\t   12345 kB\nThreads:\t4\n";
        assert_eq!(parse_vm_rss(status), Some(12345 * 1024));
        assert_eq!(parse_vm_rss("Name:\tx\n"), None);
        assert_eq!(parse_vm_rss("VmRSS:\t12 pages\n"), None);
    }
}

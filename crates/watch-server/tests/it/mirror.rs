//! Mirror mode against a real etcd cluster (no mocks): a 3-member etcd 3.4 cluster on loopback
//! and keywatch replicas (`watch-server --upstream ...`) spawned as processes.
//!
//! `failover_keeps_every_stream_exact`: writers to etcd directly and through both replicas,
//! downstream watchers on both replicas; the etcd leader is killed (and restarted), another
//! member is killed and restarted, one replica is killed with SIGKILL and restarted. Every
//! downstream watcher's stream is then compared with the history read from etcd itself: same
//! revisions, same events and values, no gap, no duplicate, each revision in one response.
//! Also checked: etcd holds exactly one watcher per replica whatever the downstream count, and
//! every write acknowledged by a replica is readable from that replica at its revision.
//! The checker (`check_stream`) compares with etcd's own history (read back from etcd after
//! the run) instead of reusing `crates/robustness`'s validator: that validator rebuilds the
//! expected history from a model of keywatch's own writes, whereas here etcd is the source of
//! truth and its history is the exact oracle (every revision, value and version as etcd
//! committed them, writes from every client included), so it is the stricter check.
//!
//! `leases_are_forwarded`: Lease RPCs (keep-alive stream included) go to etcd and a revoke
//! reaches the mirror as DELETE events.
//!
//! `compaction_past_the_mirror_resyncs`: a replica down while etcd compacts past its position
//! comes back from a fresh snapshot and refuses older watch starts with the compacted error.
//!
//! `live_resync_cancels_downstream_watchers`: the same while the replica runs: its open
//! downstream watcher ends with the compacted cancel at the new floor.
//!
//! `requested_progress_advances_past_other_keys`: with an upstream whose requested progress
//! notifications are ordered (a standalone keywatch here), writes and reads of other keys move
//! the mirror through progress requests. Needs no etcd.
//!
//! `retention_compacts_the_mirror_history` and `health_and_metrics_follow_the_upstream`:
//! `--upstream-retain-revisions`, and health / `keywatch_mirror_connected` following the
//! upstream connection. Need no etcd.
//!
//! `snapshot_streams_small_pages_at_one_revision`: the first snapshot read in pages of 3 keys
//! (an embedded `Mirror` over its own `Store`) while etcd is written: every key arrives and
//! the state is etcd's.
//!
//! The etcd tests are skipped with a `SKIPPED` line when etcd is not installed; failing when
//! `KEYWATCH_REQUIRE_ETCD=1`.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::GUARD;
use testkit::{EtcdCluster, ServerProcess, etcd_present};
use tokio::sync::watch;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use watch_proto::etcdserverpb as pb;
use watch_proto::etcdserverpb::kv_client::KvClient;
use watch_proto::etcdserverpb::maintenance_client::MaintenanceClient;
use watch_proto::etcdserverpb::watch_client::WatchClient;
use watch_proto::mvccpb;

// ---------------------------------------------------------------------------------------------
// Processes (testkit's), with what these tests need on top.

/// Log lines the tests wait for or assert on: counted over a replica's whole life (and across
/// relaunches), unlike the capped tail.
const OPEN: &str = "upstream watch open";
const ENDED: &str = "upstream session ended";

/// A loopback etcd cluster (killed and removed on drop), and its leader as the members see it.
struct Cluster(EtcdCluster);

impl std::ops::Deref for Cluster {
    type Target = EtcdCluster;
    fn deref(&self) -> &EtcdCluster {
        &self.0
    }
}

impl Cluster {
    fn start(n: usize) -> Cluster {
        Self::start_with(n, "100ms")
    }

    /// A cluster whose periodic progress notifications come every `progress` (etcd's default
    /// is 10m: a mirror then advances past other keys' revisions only on its own events).
    fn start_with(n: usize, progress: &'static str) -> Cluster {
        let cluster = EtcdCluster::builder()
            .members(n)
            .temp_prefix("mirror-etcd-")
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .args(["--experimental-watch-progress-notify-interval", progress])
            .start_cluster()
            .unwrap_or_else(|e| panic!("the etcd cluster did not start: {e}"));
        Cluster(cluster)
    }

    fn restart(&mut self, i: usize) {
        self.0
            .restart(i)
            .unwrap_or_else(|e| panic!("etcd member {i} did not restart: {e}"));
    }

    fn kill(&mut self, i: usize) {
        self.0.kill9(i);
    }

    /// The leader, once every live member agrees on one that is alive (polled).
    async fn leader(&self) -> usize {
        let deadline = tokio::time::Instant::now() + GUARD;
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        loop {
            tick.tick().await;
            assert!(tokio::time::Instant::now() < deadline, "no etcd leader");
            let mut ids = BTreeMap::new();
            let mut leaders = Vec::new();
            for i in self.alive() {
                let Ok(ch) = Endpoint::from_shared(self.url(i))
                    .expect("url")
                    .connect()
                    .await
                else {
                    continue;
                };
                if let Ok(s) = MaintenanceClient::new(ch)
                    .status(pb::StatusRequest {})
                    .await
                {
                    let s = s.into_inner();
                    ids.insert(s.header.map(|h| h.member_id).unwrap_or(0), i);
                    leaders.push(s.leader);
                }
            }
            if leaders.len() == self.alive().len()
                && leaders.iter().all(|l| *l != 0 && *l == leaders[0])
                && let Some(&i) = ids.get(&leaders[0])
            {
                return i;
            }
        }
    }

    /// etcd's own count of the watchers it serves, over the live members.
    fn watcher_total(&self) -> u64 {
        self.metric_sum("etcd_debugging_mvcc_watcher_total")
            .expect("etcd exports etcd_debugging_mvcc_watcher_total") as u64
    }
}

/// A keywatch replica in mirror mode; killed on drop.
struct Replica {
    name: &'static str,
    process: ServerProcess,
    /// Its current client URL (the port changes on restart); downstream tasks read it.
    endpoint: Arc<Mutex<String>>,
    /// Upstream watch opens logged before the current launch.
    opens_before_launch: usize,
}

impl Replica {
    fn start(name: &'static str, upstream: &str, prefixes: &[&str]) -> Replica {
        let mut args = vec!["--upstream".to_owned(), upstream.to_owned()];
        for p in prefixes {
            args.push("--upstream-prefix".into());
            args.push((*p).into());
        }
        Self::with_args(name, args)
    }

    /// A standalone keywatch (no upstream).
    fn standalone(name: &'static str) -> Replica {
        Self::with_args(name, Vec::new())
    }

    fn with_args(name: &'static str, args: Vec<String>) -> Replica {
        let process = ServerProcess::builder(env!("CARGO_BIN_EXE_watch-server"))
            .temp_prefix(format!("mirror-{name}-"))
            .args(args)
            .env("KEYWATCH_LOG", "info")
            .count_lines(OPEN)
            .count_lines(ENDED)
            .start()
            .unwrap_or_else(|e| panic!("replica {name} did not start: {e}"));
        Replica {
            name,
            endpoint: Arc::new(Mutex::new(process.endpoint())),
            process,
            opens_before_launch: 0,
        }
    }

    /// Starts the replica again on its data dir (after [`Replica::kill9`]).
    fn launch(&mut self) {
        self.opens_before_launch = self.count(OPEN);
        self.process
            .restart()
            .unwrap_or_else(|e| panic!("replica {} did not start: {e}", self.name));
        *self.endpoint.lock().unwrap() = self.process.endpoint();
    }

    /// SIGKILL, as a crash.
    fn kill9(&mut self) {
        self.process.kill9();
    }

    fn url(&self) -> String {
        self.endpoint.lock().unwrap().clone()
    }

    /// How many lines holding `marker` ([`OPEN`] or [`ENDED`]) were logged so far.
    fn count(&self, marker: &str) -> usize {
        self.process
            .output()
            .count(marker)
            .expect("a counted marker")
    }

    /// Polls the replica's log until the current launch opened its upstream watch (it answers
    /// linearizable reads from its snapshot already before that).
    async fn await_upstream_watch(&self) {
        let deadline = tokio::time::Instant::now() + GUARD;
        while self.count(OPEN) <= self.opens_before_launch {
            assert!(
                tokio::time::Instant::now() < deadline,
                "replica {} never opened its upstream watch",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

async fn channel(url: &str) -> Result<Channel, tonic::Status> {
    Endpoint::from_shared(url.to_owned())
        .map_err(|e| tonic::Status::invalid_argument(e.to_string()))?
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))
}

/// Runs `f` with a fresh client of `url`, bounded by a failure guard (an unknown outcome is an
/// error like any other for the callers, which tolerate errors).
async fn with_kv<T>(
    url: &str,
    f: impl AsyncFnOnce(KvClient<Channel>) -> Result<T, tonic::Status>,
) -> Result<T, tonic::Status> {
    let ch = channel(url).await?;
    tokio::time::timeout(Duration::from_secs(5), f(KvClient::new(ch)))
        .await
        .unwrap_or_else(|_| Err(tonic::Status::deadline_exceeded("test guard")))
}

/// Puts `value` at `key` through `url` and returns the revision of the write.
async fn put_rev(url: &str, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> i64 {
    let (key, value) = (key.into(), value.into());
    let what = String::from_utf8_lossy(&key).into_owned();
    with_kv(url, async |mut kv| {
        kv.put(pb::PutRequest {
            key: key.into(),
            value: value.into(),
            ..Default::default()
        })
        .await
    })
    .await
    .unwrap_or_else(|e| panic!("put {what} through {url}: {e}"))
    .into_inner()
    .header
    .expect("a put response carries a header")
    .revision
}

/// Polls a linearizable read through `url` until it succeeds: the replica is connected and
/// has mirrored etcd's current revision. Returns that revision.
async fn caught_up(url: &str, key: &str) -> i64 {
    let deadline = tokio::time::Instant::now() + GUARD;
    loop {
        let r = with_kv(url, async |mut kv| {
            kv.range(pb::RangeRequest {
                key: key.as_bytes().to_vec().into(),
                ..Default::default()
            })
            .await
        })
        .await;
        if let Ok(r) = r {
            return r.into_inner().header.map(|h| h.revision).unwrap_or(0);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{url} never caught up"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Events as compared.

/// One event, whole (prev_kv reduced to value and mod revision).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Ev {
    delete: bool,
    key: String,
    value: String,
    create: i64,
    modified: i64,
    version: i64,
    prev: Option<(String, i64)>,
}

fn ev(e: &mvccpb::Event, with_prev: bool) -> Ev {
    let kv = e.kv.clone().unwrap_or_default();
    Ev {
        delete: e.r#type == mvccpb::event::EventType::Delete as i32,
        key: String::from_utf8_lossy(&kv.key).into_owned(),
        value: String::from_utf8_lossy(&kv.value).into_owned(),
        create: kv.create_revision,
        modified: kv.mod_revision,
        version: kv.version,
        prev: if with_prev {
            e.prev_kv.as_ref().map(|p| {
                (
                    String::from_utf8_lossy(&p.value).into_owned(),
                    p.mod_revision,
                )
            })
        } else {
            None
        },
    }
}

/// A downstream watcher's spec.
#[derive(Clone, Debug)]
struct Spec {
    key: &'static str,
    range_end: Vec<u8>,
    prev_kv: bool,
}

impl Spec {
    fn prefix(p: &'static str, prev_kv: bool) -> Spec {
        let mut end = p.as_bytes().to_vec();
        *end.last_mut().expect("non-empty prefix") += 1;
        Spec {
            key: p,
            range_end: end,
            prev_kv,
        }
    }
    fn key(k: &'static str) -> Spec {
        Spec {
            key: k,
            range_end: Vec::new(),
            prev_kv: false,
        }
    }
    fn all() -> Spec {
        Spec {
            key: "\0",
            range_end: vec![0],
            prev_kv: true,
        }
    }
    fn matches(&self, key: &str) -> bool {
        let k = key.as_bytes();
        match self.range_end.as_slice() {
            [] => k == self.key.as_bytes(),
            [0] => k >= self.key.as_bytes(),
            end => k >= self.key.as_bytes() && k < end,
        }
    }
    fn create(&self, start: i64) -> pb::WatchRequest {
        pb::WatchRequest {
            request_union: Some(pb::watch_request::RequestUnion::CreateRequest(
                pb::WatchCreateRequest {
                    key: self.key.as_bytes().to_vec().into(),
                    range_end: self.range_end.clone().into(),
                    start_revision: start,
                    prev_kv: self.prev_kv,
                    ..Default::default()
                },
            )),
        }
    }
}

/// Follows `spec` on the replica at `endpoint` from `start` until it has seen a revision
/// `>= until`, reconnecting (and resuming after the last revision seen) whenever the replica
/// goes away. Returns the events of every response, in arrival order.
async fn downstream(
    endpoint: Arc<Mutex<String>>,
    spec: Spec,
    start: i64,
    mut until: watch::Receiver<i64>,
) -> Vec<Vec<Ev>> {
    let mut responses = Vec::new();
    let mut next = start;
    let deadline = tokio::time::Instant::now() + 4 * GUARD;
    loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "downstream watcher {spec:?} never finished"
        );
        let url = endpoint.lock().unwrap().clone();
        let Ok(ch) = channel(&url).await else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tx.send(spec.create(next)).await.expect("queue the create");
        let Ok(stream) = WatchClient::new(ch).watch(ReceiverStream::new(rx)).await else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        let mut stream = stream.into_inner();
        loop {
            if next > *until.borrow() && *until.borrow() > 0 {
                return responses;
            }
            let msg = tokio::select! {
                m = stream.message() => m,
                _ = until.changed() => continue,
            };
            let Ok(Some(resp)) = msg else { break };
            assert!(
                !resp.canceled,
                "downstream watcher {spec:?} canceled: {:?} (compact revision {})",
                resp.cancel_reason, resp.compact_revision
            );
            if resp.events.is_empty() {
                continue;
            }
            let evs: Vec<Ev> = resp.events.iter().map(|e| ev(e, spec.prev_kv)).collect();
            next = evs.last().map(|e| e.modified + 1).unwrap_or(next);
            responses.push(evs);
        }
        drop(tx);
    }
}

/// Every event of etcd's history in `(after, until]`, by revision, read from etcd itself.
async fn etcd_history(url: &str, after: i64, until: i64) -> BTreeMap<i64, Vec<mvccpb::Event>> {
    let ch = channel(url).await.expect("connect to etcd");
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(Spec::all().create(after + 1)).await.expect("queue");
    let mut stream = WatchClient::new(ch)
        .watch(ReceiverStream::new(rx))
        .await
        .expect("watch etcd")
        .into_inner();
    let mut out: BTreeMap<i64, Vec<mvccpb::Event>> = BTreeMap::new();
    while out.keys().next_back().copied().unwrap_or(0) < until {
        let resp = tokio::time::timeout(GUARD, stream.message())
            .await
            .expect("etcd history in time")
            .expect("etcd watch")
            .expect("etcd watch open");
        for e in resp.events {
            let rev = e.kv.as_ref().map(|k| k.mod_revision).unwrap_or(0);
            if rev <= until {
                out.entry(rev).or_default().push(e);
            }
        }
    }
    out
}

/// Compares one downstream stream with etcd's history: the same revisions with the same
/// events (ordered, no gap, no duplicate), each revision inside one response.
fn check_stream(
    who: &str,
    spec: &Spec,
    got: &[Vec<Ev>],
    history: &BTreeMap<i64, Vec<mvccpb::Event>>,
) -> usize {
    let mut seen_in: BTreeMap<i64, usize> = BTreeMap::new();
    let mut actual: Vec<(i64, Vec<Ev>)> = Vec::new();
    for (i, resp) in got.iter().enumerate() {
        for e in resp {
            match actual.last_mut() {
                Some((rev, evs)) if *rev == e.modified => evs.push(e.clone()),
                _ => {
                    if let Some(prev) = seen_in.insert(e.modified, i) {
                        panic!(
                            "{who}: revision {} split or repeated (responses {prev} and {i})",
                            e.modified
                        );
                    }
                    actual.push((e.modified, vec![e.clone()]));
                }
            }
        }
    }
    let expected: Vec<(i64, Vec<Ev>)> = history
        .iter()
        .filter_map(|(rev, evs)| {
            let picked: Vec<Ev> = evs
                .iter()
                .map(|e| ev(e, spec.prev_kv))
                .filter(|e| spec.matches(&e.key))
                .collect();
            (!picked.is_empty()).then_some((*rev, picked))
        })
        .collect();
    for (i, (a, e)) in actual.iter().zip(&expected).enumerate() {
        assert_eq!(a, e, "{who}: revision #{i} differs from etcd's history");
    }
    assert_eq!(
        actual.len(),
        expected.len(),
        "{who}: {} revisions received, etcd's history has {} (last received {:?}, last expected {:?})",
        actual.len(),
        expected.len(),
        actual.last().map(|a| a.0),
        expected.last().map(|e| e.0)
    );
    actual.iter().map(|(_, e)| e.len()).sum()
}

// ---------------------------------------------------------------------------------------------
// Workload.

/// Op `i` of writer `w`: puts and deletes on mirrored keys (`/m/`), puts outside (`/x/`, which
/// leave revision gaps in a `/m/` mirror) and multi-key txns (atomic change sets).
fn op(w: usize, i: usize) -> pb::TxnRequest {
    let put = |k: String, v: String| pb::RequestOp {
        request: Some(pb::request_op::Request::RequestPut(pb::PutRequest {
            key: k.into_bytes().into(),
            value: v.into_bytes().into(),
            ..Default::default()
        })),
    };
    let ops = match i % 6 {
        0 => vec![pb::RequestOp {
            request: Some(pb::request_op::Request::RequestDeleteRange(
                pb::DeleteRangeRequest {
                    key: format!("/m/k{}", (i / 6) % 10).into_bytes().into(),
                    ..Default::default()
                },
            )),
        }],
        1 => vec![
            put(format!("/m/k{}", i % 10), format!("w{w}-{i}a")),
            put(format!("/m/k{}", (i + 3) % 10), format!("w{w}-{i}b")),
            put(format!("/x/t{}", i % 3), format!("w{w}-{i}c")),
        ],
        2 | 4 => vec![put(format!("/x/k{}", i % 4), format!("w{w}-{i}"))],
        _ => vec![put(format!("/m/k{}", i % 10), format!("w{w}-{i}"))],
    };
    pb::TxnRequest {
        success: ops,
        ..Default::default()
    }
}

/// Writes `n` ops directly to etcd, trying the members in turn; errors (a dead member, an
/// election) are tolerated: etcd's history is the oracle, not the writer's view.
async fn etcd_writer(urls: Vec<String>, from: usize, n: usize) -> usize {
    let mut ok = 0;
    for i in from..from + n {
        for attempt in 0..urls.len() {
            let url = &urls[(i + attempt) % urls.len()];
            if with_kv(url, async |mut kv| kv.txn(op(0, i)).await)
                .await
                .is_ok()
            {
                ok += 1;
                break;
            }
        }
    }
    ok
}

/// Writes `n` ops through the replicas in turn. Each acknowledged write that changed a
/// mirrored key must already be visible in a serializable read of the same replica
/// (read-your-writes).
async fn replica_writer(endpoints: Vec<Arc<Mutex<String>>>, from: usize, n: usize) -> usize {
    let mut ok = 0;
    for i in from..from + n {
        let url = endpoints[i % endpoints.len()].lock().unwrap().clone();
        let req = op(1, i);
        let Ok(resp) = with_kv(&url, async |mut kv| kv.txn(req.clone()).await).await else {
            continue;
        };
        ok += 1;
        let written = resp.into_inner().header.map(|h| h.revision).unwrap_or(0);
        let Some(pb::request_op::Request::RequestPut(p)) =
            req.success.first().and_then(|o| o.request.clone())
        else {
            continue;
        };
        if !p.key.starts_with(b"/m/") {
            continue;
        }
        // At exactly the written revision (other writers may change the key right after).
        let read = with_kv(&url, async |mut kv| {
            kv.range(pb::RangeRequest {
                key: p.key.clone(),
                revision: written,
                serializable: true,
                ..Default::default()
            })
            .await
        })
        .await;
        match read {
            Ok(r) => {
                let r = r.into_inner();
                let kv = r.kvs.first().cloned().unwrap_or_default();
                assert_eq!(
                    (kv.mod_revision, kv.value),
                    (written, p.value.clone()),
                    "read-your-writes: {url} acknowledged revision {written}"
                );
            }
            // The replica loaded its first snapshot after this write: its history starts
            // above it, but its revision must not be below the write.
            Err(e) if e.code() == tonic::Code::OutOfRange => {
                let now = with_kv(&url, async |mut kv| {
                    kv.range(pb::RangeRequest {
                        key: p.key.clone(),
                        serializable: true,
                        ..Default::default()
                    })
                    .await
                })
                .await;
                if let Ok(now) = now {
                    let rev = now.into_inner().header.map(|h| h.revision).unwrap_or(0);
                    assert!(
                        rev >= written,
                        "read-your-writes: {url} at {rev} < {written}"
                    );
                }
            }
            // Only a replica that went away may fail the read otherwise.
            Err(e) => assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}"),
        }
    }
    ok
}

async fn phase(cluster: &Cluster, replicas: &[Arc<Mutex<String>>], from: usize, n: usize) {
    let urls: Vec<String> = cluster
        .alive()
        .into_iter()
        .map(|i| cluster.url(i))
        .collect();
    let (a, b) = tokio::join!(
        etcd_writer(urls, from, n),
        replica_writer(replicas.to_vec(), from, n)
    );
    assert!(
        a > 0 && b > 0,
        "no write succeeded in phase at {from} ({a}, {b})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_keeps_every_stream_exact() {
    if !etcd_present("mirror::failover_keeps_every_stream_exact") {
        return;
    }
    let mut cluster = tokio::task::block_in_place(|| Cluster::start(3));
    let first = cluster.leader().await;
    // The leader first: both replicas attach to it, so killing it breaks their upstream.
    let upstream = cluster.endpoints(first);
    let (mut a, b) = tokio::task::block_in_place(|| {
        (
            Replica::start("a", &upstream, &["/m/"]),
            Replica::start("b", &upstream, &[]),
        )
    });
    // Some history before the watchers start, so they begin mid-stream.
    phase(&cluster, &[a.endpoint.clone(), b.endpoint.clone()], 0, 6).await;
    let r0 = caught_up(&a.url(), "/m/k0")
        .await
        .max(caught_up(&b.url(), "/m/k0").await);

    let (until_tx, until_rx) = watch::channel(0i64);
    let specs = [
        (
            "a /m/ prefix",
            a.endpoint.clone(),
            Spec::prefix("/m/", true),
        ),
        ("a /m/k3", a.endpoint.clone(), Spec::key("/m/k3")),
        ("b all keys", b.endpoint.clone(), Spec::all()),
        (
            "b /m/ prefix",
            b.endpoint.clone(),
            Spec::prefix("/m/", false),
        ),
    ];
    let tasks: Vec<_> = specs
        .iter()
        .map(|(_, ep, spec)| {
            tokio::spawn(downstream(
                ep.clone(),
                spec.clone(),
                r0 + 1,
                until_rx.clone(),
            ))
        })
        .collect();
    // Many more downstream watchers on one stream per replica: etcd still serves one watch
    // per replica.
    let mut idle = Vec::new();
    for r in [&a, &b] {
        let ch = channel(&r.url()).await.expect("connect");
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        for _ in 0..200 {
            tx.send(Spec::prefix("/m/", false).create(0))
                .await
                .expect("queue");
        }
        let mut s = WatchClient::new(ch)
            .watch(ReceiverStream::new(rx))
            .await
            .expect("watch")
            .into_inner();
        for _ in 0..200 {
            let created = s.message().await.expect("stream").expect("open");
            assert!(created.created && !created.canceled);
        }
        idle.push((tx, s));
    }
    a.await_upstream_watch().await;
    b.await_upstream_watch().await;
    assert_eq!(
        cluster.watcher_total(),
        2,
        "etcd must serve exactly one watcher per replica, whatever the downstream count"
    );
    drop(idle);

    let eps = [a.endpoint.clone(), b.endpoint.clone()];
    phase(&cluster, &eps, 100, 25).await;
    // 1. The leader dies; a new one is elected; it comes back.
    cluster.kill(first);
    let second = cluster.leader().await;
    phase(&cluster, &eps, 200, 25).await;
    tokio::task::block_in_place(|| cluster.restart(first));
    phase(&cluster, &eps, 300, 15).await;
    // 2. Another member is killed and restarted: the one the replicas moved to, unless it is
    //    the new leader.
    let next = (0..3).find(|&i| i != first).expect("a second member");
    let other = if next != second {
        next
    } else {
        (0..3)
            .find(|&i| i != first && i != second)
            .expect("a third member")
    };
    cluster.kill(other);
    phase(&cluster, &eps, 400, 15).await;
    tokio::task::block_in_place(|| cluster.restart(other));
    cluster.leader().await;
    // 3. A replica crashes (SIGKILL) and comes back on the same data dir.
    a.kill9();
    phase(&cluster, &eps, 500, 15).await;
    tokio::task::block_in_place(|| a.launch());
    phase(&cluster, &eps, 600, 20).await;

    // The last write, on a key every downstream watcher selects, ends the run.
    let leader = cluster.leader().await;
    let end = put_rev(&cluster.url(leader), "/m/k3", "end").await;
    until_tx.send_replace(end);
    let mut streams = Vec::new();
    for t in tasks {
        streams.push(t.await.expect("downstream task"));
    }
    let history = etcd_history(&cluster.url(leader), r0, end).await;
    let mut checked = 0;
    for ((who, _, spec), got) in specs.iter().zip(&streams) {
        checked += check_stream(who, spec, got, &history);
    }
    assert!(checked > 100, "too few events checked ({checked})");
    for r in [&a, &b] {
        assert!(
            r.count(ENDED) > 0,
            "replica {} never lost its upstream: the failover was not exercised",
            r.name
        );
    }
    println!(
        "mirror failover: {checked} downstream events checked against etcd revisions {}..={end}",
        r0 + 1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_past_the_mirror_resyncs() {
    if !etcd_present("mirror::compaction_past_the_mirror_resyncs") {
        return;
    }
    let cluster = tokio::task::block_in_place(|| Cluster::start(1));
    let upstream = cluster.url(0);
    let mut r = tokio::task::block_in_place(|| Replica::start("c", &upstream, &["/m/"]));
    let eps = [r.endpoint.clone()];
    phase(&cluster, &eps, 0, 12).await;
    let before = caught_up(&r.url(), "/m/k1").await;
    r.kill9();
    let urls = vec![upstream.clone()];
    etcd_writer(urls, 100, 30).await;
    let compact_at = with_kv(&upstream, async |mut kv| {
        kv.range(pb::RangeRequest {
            key: "/m/k1".into(),
            ..Default::default()
        })
        .await
    })
    .await
    .expect("etcd read")
    .into_inner()
    .header
    .map(|h| h.revision)
    .unwrap_or(0);
    with_kv(&upstream, async |mut kv| {
        kv.compact(pb::CompactionRequest {
            revision: compact_at,
            physical: true,
        })
        .await
    })
    .await
    .expect("compact etcd");
    tokio::task::block_in_place(|| r.launch());
    let now = caught_up(&r.url(), "/m/k1").await;
    assert!(now >= compact_at);
    // The mirror resynced: its state is etcd's.
    let all = |url: String, serializable: bool| async move {
        with_kv(&url, async |mut kv| {
            kv.range(pb::RangeRequest {
                key: "/m/".into(),
                range_end: "/m0".into(),
                serializable,
                ..Default::default()
            })
            .await
        })
        .await
        .expect("range")
        .into_inner()
        .kvs
    };
    assert_eq!(all(r.url(), true).await, all(upstream.clone(), false).await);
    // A watch from the old position gets etcd's compacted cancel, with the floor.
    let ch = channel(&r.url()).await.expect("connect");
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(Spec::prefix("/m/", false).create(before + 1))
        .await
        .expect("queue");
    let mut s = WatchClient::new(ch)
        .watch(ReceiverStream::new(rx))
        .await
        .expect("watch")
        .into_inner();
    let mut canceled = None;
    while canceled.is_none() {
        let m = s.message().await.expect("stream").expect("open");
        if m.canceled {
            canceled = Some(m.compact_revision);
        }
    }
    let floor = canceled.unwrap_or(0);
    assert!(
        floor > compact_at.max(before + 1),
        "compact revision {floor} must be the mirror's new floor (etcd compacted at {compact_at})"
    );
}

/// Lease RPCs through a replica reach etcd (grant, keep-alive stream, time-to-live, revoke),
/// and the deletions of a revoked lease arrive through the mirror as ordinary DELETE events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_are_forwarded() {
    use watch_proto::etcdserverpb::lease_client::LeaseClient;
    if !etcd_present("mirror::leases_are_forwarded") {
        return;
    }
    let cluster = tokio::task::block_in_place(|| Cluster::start(1));
    let r = tokio::task::block_in_place(|| Replica::start("l", &cluster.url(0), &["/m/"]));
    let start = caught_up(&r.url(), "/m/l").await + 1;
    let ch = channel(&r.url()).await.expect("connect");
    let mut lease = LeaseClient::new(ch.clone());
    let id = lease
        .lease_grant(pb::LeaseGrantRequest { ttl: 60, id: 0 })
        .await
        .expect("grant through the replica")
        .into_inner()
        .id;
    assert!(id > 0);
    let (ka_tx, ka_rx) = tokio::sync::mpsc::channel(1);
    ka_tx
        .send(pb::LeaseKeepAliveRequest { id })
        .await
        .expect("queue");
    let mut ka = lease
        .lease_keep_alive(ReceiverStream::new(ka_rx))
        .await
        .expect("keep-alive stream")
        .into_inner();
    let renewed = ka.message().await.expect("keep-alive").expect("open");
    assert_eq!(renewed.id, id);
    assert!(renewed.ttl > 0);
    let put = KvClient::new(ch.clone())
        .put(pb::PutRequest {
            key: "/m/l".into(),
            value: "leased".into(),
            lease: id,
            ..Default::default()
        })
        .await
        .expect("leased put")
        .into_inner();
    let ttl = lease
        .lease_time_to_live(pb::LeaseTimeToLiveRequest { id, keys: true })
        .await
        .expect("time to live")
        .into_inner();
    assert_eq!(ttl.keys, vec![bytes::Bytes::from_static(b"/m/l")]);
    let revoked = lease
        .lease_revoke(pb::LeaseRevokeRequest { id })
        .await
        .expect("revoke through the replica")
        .into_inner();
    // The revoke returned once the replica applied its delete: a serializable read (served
    // locally, no barrier) at once sees the key gone, at the revoke's revision.
    let local = KvClient::new(ch.clone())
        .range(pb::RangeRequest {
            key: "/m/l".into(),
            serializable: true,
            ..Default::default()
        })
        .await
        .expect("serializable read")
        .into_inner();
    assert!(
        local.kvs.is_empty(),
        "the revoked lease's key is still there: {local:?}"
    );
    assert!(
        local.header.map(|h| h.revision) >= revoked.header.map(|h| h.revision),
        "the replica is behind the revoke"
    );
    // An unknown lease: etcd's own status comes back unchanged.
    let err = lease
        .lease_revoke(pb::LeaseRevokeRequest { id })
        .await
        .expect_err("revoked twice");
    assert_eq!(err.code(), tonic::Code::NotFound, "{err:?}");
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(Spec::key("/m/l").create(start))
        .await
        .expect("queue");
    let mut s = WatchClient::new(ch)
        .watch(ReceiverStream::new(rx))
        .await
        .expect("watch")
        .into_inner();
    let mut events = Vec::new();
    while events.len() < 2 {
        let m = tokio::time::timeout(GUARD, s.message())
            .await
            .expect("events in time")
            .expect("stream")
            .expect("open");
        events.extend(m.events.iter().map(|e| ev(e, false)));
    }
    let put_rev = put.header.map(|h| h.revision).unwrap_or(0);
    assert_eq!((events[0].delete, events[0].modified), (false, put_rev));
    assert!(events[1].delete && events[1].modified > put_rev);

    // Keys outside the mirrored prefixes: writes and reads go to etcd, watches are refused.
    let mut kv = KvClient::new(channel(&r.url()).await.expect("connect"));
    kv.put(pb::PutRequest {
        key: "/x/out".into(),
        value: "outside".into(),
        ..Default::default()
    })
    .await
    .expect("forwarded put");
    let got = kv
        .range(pb::RangeRequest {
            key: "/x/out".into(),
            ..Default::default()
        })
        .await
        .expect("forwarded range")
        .into_inner();
    assert_eq!(got.kvs[0].value, bytes::Bytes::from_static(b"outside"));
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(Spec::prefix("/x/", false).create(0))
        .await
        .expect("queue");
    let mut s = WatchClient::new(channel(&r.url()).await.expect("connect"))
        .watch(ReceiverStream::new(rx))
        .await
        .expect("watch")
        .into_inner();
    let refused = s.message().await.expect("stream").expect("open");
    assert!(refused.canceled, "{refused:?}");
    assert!(
        refused.cancel_reason.contains("mirrored prefixes"),
        "{refused:?}"
    );
}

/// The live path of a resync: a running replica whose only endpoint is down while etcd
/// compacts past its position reconnects, finds its revision compacted, reloads a snapshot
/// and cancels its open downstream watcher with the new floor, as etcd would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_resync_cancels_downstream_watchers() {
    if !etcd_present("mirror::live_resync_cancels_downstream_watchers") {
        return;
    }
    let mut cluster = tokio::task::block_in_place(|| Cluster::start(3));
    let r = tokio::task::block_in_place(|| Replica::start("r", &cluster.url(0), &["/m/"]));
    let eps = [r.endpoint.clone()];
    phase(&cluster, &eps, 0, 6).await;
    let at = caught_up(&r.url(), "/m/k1").await;
    r.await_upstream_watch().await;
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(Spec::prefix("/m/", false).create(at + 1))
        .await
        .expect("queue");
    let mut s = WatchClient::new(channel(&r.url()).await.expect("connect"))
        .watch(ReceiverStream::new(rx))
        .await
        .expect("watch")
        .into_inner();
    assert!(s.message().await.expect("stream").expect("open").created);
    // The replica's only endpoint goes away; the other two members keep a quorum.
    cluster.kill(0);
    let others = vec![cluster.url(1), cluster.url(2)];
    assert!(etcd_writer(others.clone(), 100, 20).await > 0);
    let compact_at = with_kv(&others[0], async |mut kv| {
        kv.range(pb::RangeRequest {
            key: "/m/k1".into(),
            ..Default::default()
        })
        .await
    })
    .await
    .expect("etcd read")
    .into_inner()
    .header
    .map(|h| h.revision)
    .unwrap_or(0);
    with_kv(&others[0], async |mut kv| {
        kv.compact(pb::CompactionRequest {
            revision: compact_at,
            physical: true,
        })
        .await
    })
    .await
    .expect("compact etcd");
    tokio::task::block_in_place(|| cluster.restart(0));
    // The open downstream watcher ends as compacted, at the replica's new floor; never with
    // events that skip the revisions the replica missed.
    let end = loop {
        let m = tokio::time::timeout(GUARD, s.message())
            .await
            .expect("a cancel in time")
            .expect("stream")
            .expect("open");
        assert!(
            m.events.is_empty() || m.canceled,
            "events delivered across the compacted gap: {m:?}"
        );
        if m.canceled {
            break m;
        }
    };
    assert!(
        end.compact_revision > compact_at,
        "compact revision {} must be above etcd's compaction {compact_at}",
        end.compact_revision
    );
    let now = caught_up(&r.url(), "/m/k1").await;
    assert!(now >= compact_at);
    drop(tx);
}

/// The path taken with an upstream that orders requested progress notifications (etcd >=
/// 3.4.25 / 3.5.8; here a standalone keywatch, which reports 3.5.13 and orders them, and whose
/// periodic notifications are 10 minutes apart, so only requested ones can move the mirror):
/// a write of keys outside the mirrored prefixes still returns only once the mirror passed its
/// revision, and a linearizable read after a direct upstream write of such keys is served at
/// or above that write's revision. Needs no etcd.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requested_progress_advances_past_other_keys() {
    let upstream = tokio::task::block_in_place(|| Replica::standalone("up"));
    let r = tokio::task::block_in_place(|| Replica::start("t", &upstream.url(), &["/m/"]));
    caught_up(&r.url(), "/m/a").await;
    r.await_upstream_watch().await;
    let mut kv = KvClient::new(channel(&r.url()).await.expect("connect"));
    let written = kv
        .put(pb::PutRequest {
            key: "/x/a".into(),
            value: "1".into(),
            ..Default::default()
        })
        .await
        .expect("forwarded put")
        .into_inner()
        .header
        .map(|h| h.revision)
        .unwrap_or(0);
    let read = |serializable: bool| {
        let mut kv = kv.clone();
        async move {
            kv.range(pb::RangeRequest {
                key: "/m/a".into(),
                serializable,
                ..Default::default()
            })
            .await
            .expect("range")
            .into_inner()
            .header
            .map(|h| h.revision)
            .unwrap_or(0)
        }
    };
    assert!(
        read(true).await >= written,
        "the write returned before the mirror passed it"
    );
    let direct = put_rev(&upstream.url(), "/x/b", "2").await;
    assert!(
        read(false).await >= direct,
        "a linearizable read missed an upstream write"
    );
}

/// `--upstream-retain-revisions`: the mirror compacts its own history to the window (watches
/// from before it are canceled as compacted) and keeps serving the window. Needs no etcd
/// (a standalone keywatch is the upstream).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_compacts_the_mirror_history() {
    let upstream = tokio::task::block_in_place(|| Replica::standalone("up2"));
    let mut r = tokio::task::block_in_place(|| Replica::start("ret", &upstream.url(), &["/m/"]));
    r.process.add_args(["--upstream-retain-revisions", "10"]);
    r.kill9();
    tokio::task::block_in_place(|| r.launch());
    caught_up(&r.url(), "/m/a").await;
    let mut last = 0;
    for i in 0..40 {
        last = put_rev(&upstream.url(), format!("/m/k{}", i % 5), format!("v{i}")).await;
    }
    assert!(caught_up(&r.url(), "/m/a").await >= last);
    // A watch from inside the window gets its events.
    let window = last - 5;
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(Spec::prefix("/m/", false).create(window))
        .await
        .expect("queue");
    let mut s = WatchClient::new(channel(&r.url()).await.expect("connect"))
        .watch(ReceiverStream::new(rx))
        .await
        .expect("watch")
        .into_inner();
    let mut got = Vec::new();
    while got.last().copied().unwrap_or(0) < last {
        let m = s.message().await.expect("stream").expect("open");
        assert!(!m.canceled, "{m:?}");
        got.extend(
            m.events
                .iter()
                .map(|e| e.kv.as_ref().map(|k| k.mod_revision).unwrap_or(0)),
        );
    }
    assert_eq!(got, (window..=last).collect::<Vec<_>>());
    // From before the window: compacted (polled: the retention runs in the background).
    let deadline = tokio::time::Instant::now() + GUARD;
    loop {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tx.send(Spec::prefix("/m/", false).create(2))
            .await
            .expect("queue");
        let mut s = WatchClient::new(channel(&r.url()).await.expect("connect"))
            .watch(ReceiverStream::new(rx))
            .await
            .expect("watch")
            .into_inner();
        let mut m = s.message().await.expect("stream").expect("open");
        while m.created && !m.canceled {
            m = s.message().await.expect("stream").expect("open");
        }
        if m.canceled && m.compact_revision > 2 {
            assert!(
                m.compact_revision <= last - 9,
                "compacted inside the window: {m:?}"
            );
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the mirror never compacted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Health and metrics follow the upstream connection: SERVING and
/// `keywatch_mirror_connected 1` once the upstream watch is open; NOT_SERVING and 0 after the
/// upstream dies, while the replica keeps answering serializable reads. Needs no etcd (a
/// standalone keywatch is the upstream).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_metrics_follow_the_upstream() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    let mut upstream = tokio::task::block_in_place(|| Replica::standalone("up3"));
    let mut r = tokio::task::block_in_place(|| Replica::start("h", &upstream.url(), &["/m/"]));
    r.process.add_args(["--metrics-listen", "127.0.0.1:0"]);
    r.kill9();
    tokio::task::block_in_place(|| r.launch());
    let metrics_addr = r
        .process
        .metrics_addr()
        .expect("the replica prints its metrics address")
        .to_string();
    let scrape = |addr: String| {
        let mut s = std::net::TcpStream::connect(&addr).expect("connect for metrics");
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            .expect("request metrics");
        let mut body = String::new();
        s.read_to_string(&mut body).expect("read metrics");
        body.lines()
            .find_map(|l| l.strip_prefix("keywatch_mirror_connected "))
            .map(|v| v.trim().to_owned())
            .unwrap_or_default()
    };
    let status = async |url: String| {
        let ch = channel(&url).await.expect("connect");
        HealthClient::new(ch)
            .check(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            })
            .await
            .map(|r| r.into_inner().status)
            .unwrap_or(-1)
    };
    let deadline = tokio::time::Instant::now() + GUARD;
    while status(r.url()).await != ServingStatus::Serving as i32 {
        assert!(tokio::time::Instant::now() < deadline, "never SERVING");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(scrape(metrics_addr.clone()), "1");
    upstream.kill9();
    while status(r.url()).await != ServingStatus::NotServing as i32 {
        assert!(tokio::time::Instant::now() < deadline, "never NOT_SERVING");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(scrape(metrics_addr), "0");
    // Still answering from local data.
    let read = with_kv(&r.url(), async |mut kv| {
        kv.range(pb::RangeRequest {
            key: "/m/a".into(),
            serializable: true,
            ..Default::default()
        })
        .await
    })
    .await;
    assert!(read.is_ok(), "{read:?}");
}

/// Runs watch-server on `dir` with `args`, expecting it to exit by itself (within the guard);
/// returns whether it exited successfully and everything it printed.
fn run_to_exit(dir: &std::path::Path, args: &[String]) -> (bool, String) {
    let exit = ServerProcess::builder(env!("CARGO_BIN_EXE_watch-server"))
        .data_dir(dir)
        .args(args)
        .env("KEYWATCH_LOG", "info")
        .run_to_exit()
        .unwrap_or_else(|e| panic!("watch-server {args:?} on {}: {e}", dir.display()));
    (
        exit.status.success(),
        format!("{}{}", exit.stdout, exit.stderr),
    )
}

/// Polls until `path` exists (a file a starting process writes).
fn await_file(path: &std::path::Path) {
    let deadline = std::time::Instant::now() + GUARD;
    while !path.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A mirror's data directory is refused by a standalone server (it would accept local writes
/// on a replica's keyspace, and a later mirror start would diverge from etcd silently), and
/// by a mirror of other prefixes: typed error, clear message, non-zero exit. Needs no etcd
/// (the upstream does not have to answer for the record to be written).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_dir_of_another_mode_or_scope_is_refused() {
    tokio::task::block_in_place(|| {
        let dead = format!(
            "http://127.0.0.1:{}",
            testkit::free_ports(1).expect("a free port")[0]
        );
        let mut r = Replica::start("refuse", &dead, &["/a/"]);
        await_file(&r.process.data_dir().join("mirror.toml"));
        r.kill9();
        let (ok, out) = run_to_exit(r.process.data_dir(), &[]);
        assert!(!ok, "standalone accepted a mirror's data dir:\n{out}");
        assert!(
            out.contains("holds a mirror") && out.contains("mirror.toml"),
            "{out}"
        );
        let other = [
            "--upstream".to_owned(),
            dead.clone(),
            "--upstream-prefix".to_owned(),
            "/b/".to_owned(),
        ];
        let (ok, out) = run_to_exit(r.process.data_dir(), &other);
        assert!(!ok, "a mirror of other prefixes was accepted:\n{out}");
        assert!(out.contains("other prefixes"), "{out}");

        // A floor alone (a crash after the reset's first step) is a mirror's too.
        let floor_only = tempfile::tempdir().expect("temp dir");
        std::fs::write(floor_only.path().join("mirror.floor"), "5\n").expect("write floor");
        let (ok, out) = run_to_exit(floor_only.path(), &[]);
        assert!(!ok, "standalone accepted a dir with a floor:\n{out}");
        assert!(out.contains("mirror.floor"), "{out}");
    });
}

/// A replica's data directory mirrors one etcd cluster; restarted against another cluster it
/// stops with a clear error and a non-zero exit instead of mixing two histories.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_cluster_is_refused() {
    if !etcd_present("mirror::another_cluster_is_refused") {
        return;
    }
    let first = tokio::task::block_in_place(|| Cluster::start(1));
    let mut r = tokio::task::block_in_place(|| Replica::start("cluster", &first.url(0), &[]));
    r.await_upstream_watch().await;
    r.kill9();
    let second = tokio::task::block_in_place(|| Cluster::start(1));
    let (ok, out) = tokio::task::block_in_place(|| {
        run_to_exit(
            r.process.data_dir(),
            &["--upstream".to_owned(), second.url(0)],
        )
    });
    assert!(!ok, "a mirror of another cluster was accepted:\n{out}");
    assert!(out.contains("mirrors etcd cluster"), "{out}");
}

/// A delete whose range overlaps the mirrored prefixes but removed only keys outside them
/// produces no mirrored event: the write must not wait for one (with etcd 3.4.23 requested
/// progress is not trusted and periodic progress is set to 10 minutes here, so a wait would
/// end in `Unavailable` after the barrier timeout although etcd applied the delete). Also
/// checked: `prev_kvs` appear in the response only when the client asked for them, for
/// DeleteRange and inside a Txn, and a partly mirrored delete that did remove a mirrored key
/// is visible through the replica when acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partly_mirrored_deletes_do_not_wait_for_other_keys() {
    if !etcd_present("mirror::partly_mirrored_deletes_do_not_wait_for_other_keys") {
        return;
    }
    let cluster = tokio::task::block_in_place(|| Cluster::start_with(1, "10m"));
    let r = tokio::task::block_in_place(|| {
        Replica::with_args(
            "deletes",
            vec![
                "--upstream".into(),
                cluster.url(0),
                "--upstream-prefix".into(),
                "/m/".into(),
                "--upstream-barrier-timeout".into(),
                "10s".into(),
            ],
        )
    });
    r.await_upstream_watch().await;
    let etcd = cluster.url(0);
    // /m/x last: the linearizable read below waits for the last revision to be mirrored.
    for k in ["/a/1", "/a/2", "/z/1", "/m/x"] {
        put_rev(&etcd, k, "v").await;
    }
    caught_up(&r.url(), "/m/x").await;
    let url = r.url();
    let kv = async || KvClient::new(channel(&url).await.expect("connect"));
    let put_etcd = async |k: &'static str| {
        KvClient::new(channel(&etcd).await.expect("connect"))
            .put(pb::PutRequest {
                key: k.into(),
                value: "v".into(),
                ..Default::default()
            })
            .await
            .expect("put to etcd");
    };
    // Partly mirrored, removes /m/x: acknowledged once mirrored; no prev_kvs (not asked).
    let resp = tokio::time::timeout(
        GUARD,
        kv().await.delete_range(pb::DeleteRangeRequest {
            key: "/a/".into(),
            range_end: "/n".into(),
            ..Default::default()
        }),
    )
    .await
    .expect("delete 1: no answer within the guard")
    .expect("delete 1")
    .into_inner();
    assert_eq!(resp.deleted, 3);
    assert!(resp.prev_kvs.is_empty(), "prev_kvs not asked for: {resp:?}");
    let read = kv()
        .await
        .range(pb::RangeRequest {
            key: "/m/x".into(),
            serializable: true,
            ..Default::default()
        })
        .await
        .expect("serializable read")
        .into_inner();
    assert!(
        read.kvs.is_empty(),
        "the acknowledged delete is not mirrored"
    );
    // Partly mirrored, removes only /a/3: must not wait for a mirrored revision.
    put_etcd("/a/3").await;
    let resp = tokio::time::timeout(
        GUARD,
        kv().await.delete_range(pb::DeleteRangeRequest {
            key: "/a/".into(),
            range_end: "/n".into(),
            prev_kv: true,
        }),
    )
    .await
    .expect("delete 2: no answer within the guard")
    .expect("a delete of keys outside the prefixes must succeed")
    .into_inner();
    assert_eq!(resp.deleted, 1);
    assert_eq!(resp.prev_kvs.len(), 1, "prev_kvs asked for: {resp:?}");
    // The same inside a Txn, prev_kv not asked for.
    put_etcd("/a/4").await;
    let del = pb::RequestOp {
        request: Some(pb::request_op::Request::RequestDeleteRange(
            pb::DeleteRangeRequest {
                key: "/a/".into(),
                range_end: "/n".into(),
                ..Default::default()
            },
        )),
    };
    let resp = tokio::time::timeout(
        GUARD,
        kv().await.txn(pb::TxnRequest {
            success: vec![del],
            ..Default::default()
        }),
    )
    .await
    .expect("txn: no answer within the guard")
    .expect("a txn deleting keys outside the prefixes must succeed")
    .into_inner();
    match resp.responses.first().and_then(|r| r.response.as_ref()) {
        Some(pb::response_op::Response::ResponseDeleteRange(d)) => {
            assert_eq!(d.deleted, 1);
            assert!(d.prev_kvs.is_empty(), "prev_kvs not asked for: {d:?}");
        }
        other => panic!("unexpected txn response {other:?}"),
    }
}

/// Opens a downstream watch of `/m/` on `url`, with etcd's `hasleader: true` metadata when
/// `require_leader`; returns the stream (its first message is the created response) or the
/// open's status. The request sender is returned too: dropping it would half-close the stream.
async fn open_watch(
    url: &str,
    require_leader: bool,
) -> Result<
    (
        tonic::Streaming<pb::WatchResponse>,
        tokio::sync::mpsc::Sender<pb::WatchRequest>,
    ),
    tonic::Status,
> {
    let ch = channel(url).await?;
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(Spec::prefix("/m/", false).create(0))
        .await
        .expect("queue the create");
    let mut req = tonic::Request::new(ReceiverStream::new(rx));
    if require_leader {
        req.metadata_mut().insert(
            "hasleader",
            tonic::metadata::MetadataValue::from_static("true"),
        );
    }
    let stream = WatchClient::new(ch).watch(req).await?.into_inner();
    Ok((stream, tx))
}

/// `hasleader` downstream watches follow the upstream connection, as etcd's follow its
/// leader: open while connected, ended with "no leader" (UNAVAILABLE) when the upstream is
/// lost, refused with it while disconnected; watches without the metadata stay served from
/// local data. Needs no etcd (a standalone keywatch is the upstream).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hasleader_watches_follow_the_upstream() {
    let mut upstream = tokio::task::block_in_place(|| Replica::standalone("up-leader"));
    let r = tokio::task::block_in_place(|| Replica::start("leader", &upstream.url(), &["/m/"]));
    r.await_upstream_watch().await;
    // The log line comes from the sync task; the status the watch service reads is set just
    // before it, so an open now sees the mirror connected.
    let (mut led, _led_tx) = open_watch(&r.url(), true)
        .await
        .expect("open while connected");
    let created = tokio::time::timeout(GUARD, led.message())
        .await
        .expect("created within the guard")
        .expect("created")
        .expect("a created response");
    assert!(created.created && !created.canceled, "{created:?}");
    let (mut plain, _plain_tx) = open_watch(&r.url(), false).await.expect("open plain");
    let _ = tokio::time::timeout(GUARD, plain.message())
        .await
        .expect("created within the guard");
    upstream.kill9();
    let ended = tokio::time::timeout(GUARD, led.message())
        .await
        .expect("the hasleader stream ends within the guard");
    let status = ended.expect_err("the hasleader stream must end with an error");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(status.message().contains("no leader"), "{status:?}");
    let refused = open_watch(&r.url(), true).await;
    let status = match refused {
        Err(s) => s,
        Ok((mut s, _tx)) => tokio::time::timeout(GUARD, s.message())
            .await
            .expect("an answer within the guard")
            .expect_err("a hasleader watch on a disconnected mirror must fail"),
    };
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(status.message().contains("no leader"), "{status:?}");
    // Watches without the metadata are still served from local data.
    let (mut later, _later_tx) = open_watch(&r.url(), false).await.expect("open plain");
    let created = tokio::time::timeout(GUARD, later.message())
        .await
        .expect("created within the guard")
        .expect("created")
        .expect("a created response");
    assert!(created.created && !created.canceled, "{created:?}");
}

/// An `https://` upstream without TLS settings (no CA bundle) is refused at start with the
/// reason, not accepted and then retried forever; so is a client certificate without its key.
/// Needs no etcd.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_upstream_without_tls_settings_is_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (ok, out) = tokio::task::block_in_place(|| {
        run_to_exit(
            dir.path(),
            &["--upstream".to_owned(), "https://127.0.0.1:2379".to_owned()],
        )
    });
    assert!(!ok, "an https upstream was accepted:\n{out}");
    assert!(out.contains("--upstream-cacert"), "{out}");
    let pki = crate::tls::Pki::new();
    let (ok, out) = tokio::task::block_in_place(|| {
        run_to_exit(
            dir.path(),
            &[
                "--upstream".to_owned(),
                "127.0.0.1:2379".to_owned(),
                "--upstream-cacert".to_owned(),
                pki.arg("ca.pem"),
                "--upstream-cert".to_owned(),
                pki.arg("client.pem"),
            ],
        )
    });
    assert!(!ok, "a certificate without a key was accepted:\n{out}");
    assert!(
        out.contains("--upstream-cert needs --upstream-key"),
        "{out}"
    );
}

// ---------------------------------------------------------------------------------------------
// Secure upstreams.

/// A linearizable read of `key` through `url` (the replica waits until it mirrored etcd's
/// current revision), its value if any.
async fn value_of(url: &str, key: &str) -> Option<String> {
    let resp = with_kv(url, async |mut kv| {
        kv.range(pb::RangeRequest {
            key: key.as_bytes().to_vec().into(),
            ..Default::default()
        })
        .await
    })
    .await
    .unwrap_or_else(|e| panic!("read {key} through {url}: {e}"))
    .into_inner();
    resp.kvs
        .first()
        .map(|kv| String::from_utf8_lossy(&kv.value).into_owned())
}

/// A replica of a 3-member etcd cluster serving TLS and requiring client certificates: it
/// snapshots, follows (a put made on etcd is read back through it) and forwards (a put made
/// through it lands on etcd), over one upstream watcher.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_upstream_with_client_certificates() {
    if !etcd_present("mirror::tls_upstream_with_client_certificates") {
        return;
    }
    let pki = crate::tls::Pki::new();
    let cluster = tokio::task::block_in_place(|| {
        EtcdCluster::builder()
            .temp_prefix("mirror-tls-etcd-")
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .tls(
                testkit::EtcdTls::new(
                    pki.path("ca.pem"),
                    pki.path("server.pem"),
                    pki.path("server.key"),
                )
                .client_cert_auth(pki.path("client.pem"), pki.path("client.key")),
            )
            .start_cluster()
            .unwrap_or_else(|e| panic!("the TLS etcd cluster did not start: {e}"))
    });
    assert!(cluster.endpoints(0).starts_with("https://"));
    tokio::task::block_in_place(|| cluster.etcdctl(["put", "/a/before", "1"]))
        .expect("etcdctl put over TLS");
    let args = vec![
        "--upstream".to_owned(),
        cluster.endpoints(0),
        "--upstream-prefix".to_owned(),
        "/a/".to_owned(),
        "--upstream-cacert".to_owned(),
        pki.arg("ca.pem"),
        "--upstream-cert".to_owned(),
        pki.arg("client.pem"),
        "--upstream-key".to_owned(),
        pki.arg("client.key"),
    ];
    let r = tokio::task::block_in_place(|| Replica::with_args("tls", args));
    r.await_upstream_watch().await;
    assert_eq!(value_of(&r.url(), "/a/before").await.as_deref(), Some("1"));
    tokio::task::block_in_place(|| cluster.etcdctl(["put", "/a/after", "2"]))
        .expect("etcdctl put over TLS");
    assert_eq!(value_of(&r.url(), "/a/after").await.as_deref(), Some("2"));
    put_rev(&r.url(), "/a/through", "3").await;
    let out = tokio::task::block_in_place(|| cluster.etcdctl(["get", "/a/through"]))
        .expect("etcdctl get over TLS");
    assert!(out.contains("/a/through\n3"), "{out}");
    assert_eq!(
        cluster.metric_sum("etcd_debugging_mvcc_watcher_total").ok(),
        Some(1.0)
    );
}

/// A replica of a 3-member etcd cluster with authentication on, as root by password (given in
/// the environment): it syncs and forwards; once etcd expired its token (a 1 s TTL and no use
/// for 4 s), a forwarded put is refused with `invalid auth token`, and the replica renews the
/// token and retries it once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_upstream_renews_its_token() {
    if !etcd_present("mirror::auth_upstream_renews_its_token") {
        return;
    }
    let cluster = tokio::task::block_in_place(|| {
        EtcdCluster::builder()
            .temp_prefix("mirror-auth-etcd-")
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .args(["--auth-token-ttl", "1"])
            .root_password("s3cret")
            .start_cluster()
            .unwrap_or_else(|e| panic!("the auth etcd cluster did not start: {e}"))
    });
    tokio::task::block_in_place(|| cluster.etcdctl(["put", "/a/before", "1"]))
        .expect("etcdctl put as root");
    let process = tokio::task::block_in_place(|| {
        ServerProcess::builder(env!("CARGO_BIN_EXE_watch-server"))
            .temp_prefix("mirror-auth-")
            .args([
                "--upstream",
                &cluster.endpoints(0),
                "--upstream-user",
                "root",
            ])
            .env("KEYWATCH_UPSTREAM_PASSWORD", "s3cret")
            .env("KEYWATCH_LOG", "info")
            .start()
            .unwrap_or_else(|e| panic!("replica did not start: {e}"))
    });
    let url = process.endpoint();
    assert_eq!(value_of(&url, "/a/before").await.as_deref(), Some("1"));
    put_rev(&url, "/a/through", "2").await;
    // etcd drops a simple token TTL (1 s) after its last use, checked every second.
    tokio::time::sleep(Duration::from_secs(4)).await;
    put_rev(&url, "/a/later", "3").await;
    assert_eq!(value_of(&url, "/a/later").await.as_deref(), Some("3"));
    let log = process.output().tail();
    assert!(log.contains("upstream token refused; renewing it"), "{log}");
    let out = tokio::task::block_in_place(|| cluster.etcdctl(["get", "/a/later"]))
        .expect("etcdctl get as root");
    assert!(out.contains("/a/later\n3"), "{out}");

    // A wrong password: the replica never opens its watch and says why.
    let wrong = tokio::task::block_in_place(|| {
        ServerProcess::builder(env!("CARGO_BIN_EXE_watch-server"))
            .temp_prefix("mirror-auth-wrong-")
            .args([
                "--upstream",
                &cluster.endpoints(0),
                "--upstream-user",
                "root:nope",
            ])
            .env("KEYWATCH_LOG", "info")
            .count_lines("authentication failed")
            .start()
            .unwrap_or_else(|e| panic!("replica did not start: {e}"))
    });
    let deadline = tokio::time::Instant::now() + GUARD;
    while wrong.output().count("authentication failed") == Some(0) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no authentication failure logged:\n{}",
            wrong.output().tail()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!wrong.output().tail().contains(OPEN));
}

// ---------------------------------------------------------------------------------------------
// Compaction.

/// What `url` does below a compaction: a watch of `/m/` from `from` (its cancel's
/// `compact_revision`, or 0 when it opened and stayed open) and a range at `from` (its status
/// code and message, or OK).
async fn below_compaction(url: &str, from: i64) -> (i64, String) {
    let ch = channel(url).await.expect("connect");
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(Spec::prefix("/m/", false).create(from))
        .await
        .expect("queue");
    let mut s = WatchClient::new(ch)
        .watch(ReceiverStream::new(rx))
        .await
        .expect("watch")
        .into_inner();
    let mut canceled = 0;
    // etcd answers a compacted start with a created response then a cancel (or both in one).
    for _ in 0..2 {
        let m = tokio::time::timeout(GUARD, s.message())
            .await
            .expect("a watch answer in time")
            .expect("stream")
            .expect("open");
        if m.canceled {
            canceled = m.compact_revision;
            break;
        }
        if !m.events.is_empty() {
            break;
        }
    }
    drop(tx);
    let read = with_kv(url, async |mut kv| {
        kv.range(pb::RangeRequest {
            key: "/m/k1".into(),
            revision: from,
            serializable: true,
            ..Default::default()
        })
        .await
    })
    .await;
    let read = match read {
        Ok(_) => "OK".to_owned(),
        Err(s) => format!("{:?}: {}", s.code(), s.message()),
    };
    (canceled, read)
}

/// A Compact through a replica, once acknowledged, makes that replica refuse a watch and a
/// read below the revision exactly as etcd does (the same answers, asked of both); another
/// replica learns it from its compaction check, and so does a replica after a compaction made
/// on etcd directly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_through_a_replica_is_honoured() {
    if !etcd_present("mirror::compaction_through_a_replica_is_honoured") {
        return;
    }
    let cluster = tokio::task::block_in_place(|| Cluster::start(3));
    let start = |name| {
        Replica::with_args(
            name,
            vec![
                "--upstream".to_owned(),
                cluster.endpoints(0),
                "--upstream-prefix".to_owned(),
                "/m/".to_owned(),
                "--upstream-compaction-check".to_owned(),
                "100ms".to_owned(),
            ],
        )
    };
    let (a, b) = tokio::task::block_in_place(|| (start("compact-a"), start("compact-b")));
    a.await_upstream_watch().await;
    b.await_upstream_watch().await;
    let mut revs = Vec::new();
    for i in 0..6 {
        revs.push(put_rev(&a.url(), "/m/k1", format!("v{i}")).await);
    }
    let at = revs[3];
    // Before: everything from revs[0] is served.
    assert_eq!(below_compaction(&a.url(), revs[1]).await, (0, "OK".into()));
    with_kv(&a.url(), async |mut kv| {
        kv.compact(pb::CompactionRequest {
            revision: at,
            physical: false,
        })
        .await
    })
    .await
    .expect("compact through the replica");
    let etcd = below_compaction(&cluster.url(0), revs[1]).await;
    assert_eq!(etcd.0, at, "etcd's cancel: {etcd:?}");
    assert!(etcd.1.contains("compacted"), "{etcd:?}");
    assert_eq!(below_compaction(&a.url(), revs[1]).await, etcd);
    // At the compaction revision itself both still serve.
    assert_eq!(below_compaction(&a.url(), at).await, (0, "OK".into()));
    // The other replica, from its compaction check.
    let deadline = tokio::time::Instant::now() + GUARD;
    while below_compaction(&b.url(), revs[1]).await != etcd {
        assert!(
            tokio::time::Instant::now() < deadline,
            "b never applied the compaction"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A compaction made on etcd directly reaches both.
    let direct = revs[5];
    with_kv(&cluster.url(1), async |mut kv| {
        kv.compact(pb::CompactionRequest {
            revision: direct,
            physical: false,
        })
        .await
    })
    .await
    .expect("compact etcd");
    let etcd = below_compaction(&cluster.url(0), revs[4]).await;
    assert_eq!(etcd.0, direct, "etcd's cancel: {etcd:?}");
    for r in [&a, &b] {
        while below_compaction(&r.url(), revs[4]).await != etcd {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} never applied it",
                r.name
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Streaming snapshot.

/// The first snapshot is read in pages of at most 3 keys (and about 64 bytes) and streamed
/// into the store while a writer keeps overwriting the mirrored keys: every key arrives, and
/// the replica's state is etcd's. The pages are one cut: a page read at a later revision
/// would hold a value whose put the watch then replays from `R + 1` with a `prev_kv` the
/// replica does not have, and the divergence check would stop the mirror.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_streams_small_pages_at_one_revision() {
    if !etcd_present("mirror::snapshot_streams_small_pages_at_one_revision") {
        return;
    }
    const KEYS: usize = 40;
    let etcd = tokio::task::block_in_place(|| {
        testkit::Etcd::builder()
            .temp_prefix("mirror-pages-etcd-")
            .start()
            .unwrap_or_else(|e| panic!("etcd did not start: {e}"))
    });
    let url = etcd.endpoint();
    for i in 0..KEYS {
        put_rev(&url, format!("/p/{i:02}"), format!("v{i}")).await;
    }
    put_rev(&url, "/q/outside", "x").await;
    let (stop, stopped) = watch::channel(false);
    let writer = tokio::spawn({
        let url = url.clone();
        async move {
            let mut n = 0;
            while !*stopped.borrow() {
                put_rev(&url, format!("/p/{:02}", n % KEYS), format!("w{n}")).await;
                n += 1;
            }
            n
        }
    });
    let dir = tempfile::tempdir().expect("temp dir");
    let store = kv_store::Store::open(
        dir.path(),
        kv_store::StoreConfig::default().durability(kv_store::Durability::NoSync),
    )
    .await
    .expect("store opens");
    let mut config = watch_server::mirror::MirrorConfig::new(
        vec![url.clone()],
        vec![bytes::Bytes::from_static(b"/p/")],
    );
    config.snapshot_page = 3;
    config.snapshot_page_bytes = 64;
    let mirror =
        watch_server::mirror::Mirror::start(store.clone(), config).expect("the mirror starts");
    let mut status = mirror.status();
    tokio::time::timeout(GUARD, status.wait_for(|s| s.is_connected()))
        .await
        .expect("the upstream watch opens in time")
        .expect("the mirror runs");
    stop.send_replace(true);
    let writes = writer.await.expect("the writer ends");
    assert!(writes > 0);
    let end = put_rev(&url, "/p/end", "e").await;
    let reached = tokio::time::timeout(GUARD, status.wait_for(|s| s.revision >= end as u64))
        .await
        .map(|r| r.map(|_| ()));
    if !matches!(reached, Ok(Ok(()))) {
        panic!(
            "the mirror never reached revision {end}: {:?}",
            *status.borrow()
        );
    }
    // A snapshot was installed (its floor), larger than one page.
    assert!(store.compacted_revision() > KEYS as u64);
    let local = store
        .range(kv_store::RangeRequest::new(kv_store::KeyRange::prefix(
            "/p/",
        )))
        .await
        .expect("local range");
    let upstream = with_kv(&url, async |mut kv| {
        kv.range(pb::RangeRequest {
            key: "/p/".into(),
            range_end: "/p0".into(),
            revision: end,
            ..Default::default()
        })
        .await
    })
    .await
    .expect("etcd range")
    .into_inner();
    let fields =
        |key: &[u8], value: &[u8], c: i64, m: i64, v: i64| (key.to_vec(), value.to_vec(), c, m, v);
    let local: Vec<_> = local
        .kvs
        .iter()
        .map(|kv| {
            fields(
                &kv.key,
                &kv.value,
                kv.create_revision as i64,
                kv.mod_revision as i64,
                kv.version as i64,
            )
        })
        .collect();
    let upstream: Vec<_> = upstream
        .kvs
        .iter()
        .map(|kv| {
            fields(
                &kv.key,
                &kv.value,
                kv.create_revision,
                kv.mod_revision,
                kv.version,
            )
        })
        .collect();
    assert_eq!(local.len(), KEYS + 1);
    assert_eq!(local, upstream);
    mirror.stop().await;
    store.close().await.expect("store closes");
}

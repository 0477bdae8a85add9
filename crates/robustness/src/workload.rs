//! The randomized workload: writers, watchers with random selectors, options and reading
//! behaviours, a compactor and kill -9 + restart of the server, all recorded for the validator.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use watch_proto::etcdserverpb as pb;
use watch_proto::etcdserverpb::kv_client::KvClient;
use watch_proto::etcdserverpb::lease_client::LeaseClient;
use watch_proto::etcdserverpb::watch_client::WatchClient;

use crate::Error;
use crate::record::{
    AckDetail, Outcome, Request, Response, RunRecord, Session, SessionEnd, TxnOp, VersionCompare,
    WatchSpec, WatcherRecord, WriteRecord,
};
use crate::server::{self, ServerProcess};
use crate::wire;

/// The key space: small, so writes collide and every selector kind matches something.
pub const KEYS: &[&str] = &["a/0", "a/1", "a/2", "b/0", "b/1", "b/2", "c/0", "c/1"];

/// Settings of one randomized run.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// The watch-server binary.
    pub server_bin: PathBuf,
    /// Workload seed.
    pub seed: u64,
    /// How long writers run (the drain and validation come after).
    pub duration: Duration,
    /// kill -9 + restart during the run (one more follows the writers).
    pub kills: usize,
    /// Concurrent writers.
    pub writers: usize,
    /// Watch streams over the run (each with 1–3 watchers), besides the reference watcher.
    pub streams: usize,
    /// Extra server flags.
    pub server_args: Vec<String>,
    /// Run the lease task (leased keys that expire or are revoked; see `leaser`).
    pub leases: bool,
}

impl RunConfig {
    /// Defaults for `seed`: 4 writers, 24 streams, 2 kills in 12 s.
    pub fn new(server_bin: PathBuf, seed: u64) -> Self {
        RunConfig {
            server_bin,
            seed,
            duration: Duration::from_secs(12),
            kills: 2,
            writers: 4,
            streams: 24,
            leases: true,
            server_args: vec![
                "--progress-interval".into(),
                "500ms".into(),
                "--watch-buffer".into(),
                "16".into(),
            ],
        }
    }
}

/// How far the run is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Everything runs.
    Running,
    /// Writers and the compactor stop; watchers go on.
    Quiesce,
    /// Watchers read at full speed until a progress notification covers the final revision.
    Draining(i64),
    /// Give up: every task ends now.
    Stop,
}

struct Shared {
    start: Instant,
    endpoint: watch::Receiver<String>,
    phase: watch::Receiver<Phase>,
    /// Highest compaction revision issued.
    compacted: AtomicI64,
    /// Everything up to this revision reached the reference watcher; compaction stays at or
    /// below it, so the reference sees every revision.
    reference_seen: AtomicI64,
    /// Highest acknowledged revision.
    head: AtomicI64,
}

impl Shared {
    fn phase(&self) -> Phase {
        *self.phase.borrow()
    }
}

/// Connects to the current server, following restarts; `None` once the run stops.
async fn connect(sh: &Shared) -> Option<Channel> {
    let mut ep = sh.endpoint.clone();
    let mut phase = sh.phase.clone();
    loop {
        if *phase.borrow() == Phase::Stop {
            return None;
        }
        let url = ep.borrow_and_update().clone();
        if let Ok(endpoint) = Endpoint::from_shared(url) {
            let endpoint = endpoint.connect_timeout(Duration::from_secs(2));
            if let Ok(channel) = endpoint.connect().await {
                return Some(channel);
            }
        }
        // The server is down (being restarted): wait for its new address; retry now and then
        // in case the address did not change.
        tokio::select! {
            _ = ep.changed() => {}
            _ = phase.changed() => {}
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }
}

fn key(rng: &mut fastrand::Rng) -> Vec<u8> {
    KEYS[rng.usize(..KEYS.len())].as_bytes().to_vec()
}

fn distinct_keys(rng: &mut fastrand::Rng, n: usize) -> Vec<Vec<u8>> {
    let mut keys: Vec<Vec<u8>> = KEYS.iter().map(|k| k.as_bytes().to_vec()).collect();
    rng.shuffle(&mut keys);
    keys.truncate(n);
    keys
}

fn gen_request(rng: &mut fastrand::Rng, writer: usize, seq: &mut u64) -> Request {
    let mut value = || {
        *seq += 1;
        format!("w{writer}-{seq}").into_bytes()
    };
    match rng.u8(..100) {
        0..40 => Request::Put {
            key: key(rng),
            value: value(),
        },
        40..50 => Request::DeleteRange {
            key: key(rng),
            range_end: Vec::new(),
        },
        50..60 => {
            let (key, range_end): (&[u8], &[u8]) = match rng.u8(..4) {
                0 => (b"a/", b"a0"),
                1 => (b"b/", b"b0"),
                2 => (b"a/1", b"b/1"),
                _ => (b"b/2", b"\0"),
            };
            Request::DeleteRange {
                key: key.to_vec(),
                range_end: range_end.to_vec(),
            }
        }
        _ => {
            let compare = (0..rng.usize(1..=2))
                .map(|_| VersionCompare {
                    key: key(rng),
                    ordering: rng.i8(-1..=1),
                    version: rng.i64(0..3),
                })
                .collect();
            let n = rng.usize(1..=3);
            let success = distinct_keys(rng, n)
                .into_iter()
                .map(|key| {
                    if rng.u8(..10) < 7 {
                        TxnOp::Put {
                            key,
                            value: value(),
                        }
                    } else {
                        TxnOp::Delete { key }
                    }
                })
                .collect();
            let n = rng.usize(0..=2);
            let failure = distinct_keys(rng, n)
                .into_iter()
                .map(|key| {
                    if rng.bool() {
                        TxnOp::Put {
                            key,
                            value: value(),
                        }
                    } else {
                        TxnOp::Get { key }
                    }
                })
                .collect();
            Request::Txn {
                compare,
                success,
                failure,
            }
        }
    }
}

async fn execute(ch: &Channel, req: &Request) -> Result<Outcome, tonic::Status> {
    let revision = |h: Option<pb::ResponseHeader>| h.map_or(0, |h| h.revision);
    let mut c = KvClient::new(ch.clone());
    Ok(match req {
        Request::LeasePut { key, value, lease } => {
            let r = c
                .put(pb::PutRequest {
                    key: key.clone().into(),
                    value: value.clone().into(),
                    lease: *lease,
                    prev_kv: true,
                    ..Default::default()
                })
                .await?
                .into_inner();
            Outcome::Ack {
                revision: revision(r.header),
                detail: AckDetail::Put {
                    prev: r.prev_kv.as_ref().map(wire::kv),
                },
            }
        }
        Request::Revoke { lease } => {
            let r = LeaseClient::new(ch.clone())
                .lease_revoke(pb::LeaseRevokeRequest { id: *lease })
                .await?
                .into_inner();
            Outcome::Ack {
                revision: revision(r.header),
                detail: AckDetail::Revoke,
            }
        }
        Request::Put { key, value } => {
            let r = c
                .put(pb::PutRequest {
                    key: key.clone().into(),
                    value: value.clone().into(),
                    prev_kv: true,
                    ..Default::default()
                })
                .await?
                .into_inner();
            Outcome::Ack {
                revision: revision(r.header),
                detail: AckDetail::Put {
                    prev: r.prev_kv.as_ref().map(wire::kv),
                },
            }
        }
        Request::DeleteRange { key, range_end } => {
            let r = c
                .delete_range(pb::DeleteRangeRequest {
                    key: key.clone().into(),
                    range_end: range_end.clone().into(),
                    prev_kv: true,
                })
                .await?
                .into_inner();
            Outcome::Ack {
                revision: revision(r.header),
                detail: AckDetail::DeleteRange {
                    prev: r.prev_kvs.iter().map(wire::kv).collect(),
                },
            }
        }
        Request::Txn {
            compare,
            success,
            failure,
        } => {
            let r = c
                .txn(wire::txn(compare, success, failure))
                .await?
                .into_inner();
            Outcome::Ack {
                revision: revision(r.header),
                detail: wire::txn_detail(&r),
            }
        }
    })
}

/// Per-request guard: past it the outcome is unknown (never a verdict by itself).
const REQUEST_GUARD: Duration = Duration::from_secs(10);

async fn writer(sh: Arc<Shared>, id: usize, seed: u64) -> Vec<WriteRecord> {
    let mut rng = fastrand::Rng::with_seed(seed.wrapping_mul(31).wrapping_add(id as u64 + 1));
    let mut seq = 0;
    let mut out = Vec::new();
    let mut client: Option<Channel> = None;
    while sh.phase() == Phase::Running {
        let c = match client.as_ref() {
            Some(c) => c,
            None => match connect(&sh).await {
                Some(ch) => client.insert(ch),
                None => break,
            },
        };
        let request = gen_request(&mut rng, id, &mut seq);
        let sent = sh.start.elapsed();
        let outcome = match tokio::time::timeout(REQUEST_GUARD, execute(c, &request)).await {
            Ok(Ok(o)) => o,
            Ok(Err(status)) if wire::definite(&status) => Outcome::Refused(status.to_string()),
            Ok(Err(status)) => {
                client = None;
                Outcome::Unknown(status.to_string())
            }
            Err(_) => {
                client = None;
                Outcome::Unknown("timed out".into())
            }
        };
        if let Outcome::Ack { revision, .. } = &outcome {
            sh.head.fetch_max(*revision, Ordering::Relaxed);
        }
        out.push(WriteRecord {
            writer: id,
            sent,
            request,
            outcome,
        });
        if rng.u8(..4) == 0 {
            tokio::time::sleep(Duration::from_millis(rng.u64(1..4))).await;
        }
    }
    out
}

/// TTL of the leases the lease task grants (etcd's minimum), seconds.
const LEASE_TTL: i64 = 2;

/// The lease task's own keys. They sort before every range the plain writers delete (`a/..`,
/// `b/..`, from `b/2` on) and no plain write names them, so a revision deleting them can only
/// be a lease's end: an unknown-outcome plain delete can never explain the same events, which
/// would make the validator's resolution ambiguous.
const LEASE_KEYS: &[&str] = &["L/0", "L/1", "L/2", "L/3"];

/// The lease task: grants a lease (not recorded: a grant creates no revision), attaches 1–3
/// of [`LEASE_KEYS`] to it (`LeasePut`, recorded; a key still on an earlier lease moves, which
/// detaches it there), then revokes it (recorded) or lets it expire. Recorded as writer `id`
/// with the writers' value scheme.
async fn leaser(sh: Arc<Shared>, id: usize, seed: u64) -> Vec<WriteRecord> {
    let mut rng = fastrand::Rng::with_seed(seed.wrapping_mul(17).wrapping_add(id as u64));
    let mut seq = 0u64;
    let mut out = Vec::new();
    let mut client: Option<Channel> = None;
    while sh.phase() == Phase::Running {
        let ch = match client.as_ref() {
            Some(c) => c.clone(),
            None => match connect(&sh).await {
                Some(ch) => client.insert(ch).clone(),
                None => break,
            },
        };
        let mut leases = LeaseClient::new(ch.clone());
        let grant = leases.lease_grant(pb::LeaseGrantRequest {
            ttl: LEASE_TTL,
            id: 0,
        });
        let lease = match tokio::time::timeout(REQUEST_GUARD, grant).await {
            Ok(Ok(r)) => r.into_inner().id,
            _ => {
                // The server is down or restarting: reconnect, without spinning.
                client = None;
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let mut keys: Vec<Vec<u8>> = LEASE_KEYS.iter().map(|k| k.as_bytes().to_vec()).collect();
        rng.shuffle(&mut keys);
        keys.truncate(rng.usize(1..=3));
        let mut requests: Vec<Request> = keys
            .into_iter()
            .map(|key| {
                seq += 1;
                Request::LeasePut {
                    key,
                    value: format!("w{id}-{seq}").into_bytes(),
                    lease,
                }
            })
            .collect();
        if rng.bool() {
            requests.push(Request::Revoke { lease });
        }
        for request in requests {
            if sh.phase() != Phase::Running {
                break;
            }
            let sent = sh.start.elapsed();
            let outcome = match tokio::time::timeout(REQUEST_GUARD, execute(&ch, &request)).await {
                Ok(Ok(o)) => o,
                Ok(Err(status)) if wire::definite(&status) => Outcome::Refused(status.to_string()),
                Ok(Err(status)) => {
                    client = None;
                    Outcome::Unknown(status.to_string())
                }
                Err(_) => {
                    client = None;
                    Outcome::Unknown("timed out".into())
                }
            };
            if let Outcome::Ack { revision, .. } = &outcome {
                sh.head.fetch_max(*revision, Ordering::Relaxed);
            }
            let failed = !matches!(outcome, Outcome::Ack { .. });
            out.push(WriteRecord {
                writer: id,
                sent,
                request,
                outcome,
            });
            if failed {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(rng.u64(20..200))).await;
    }
    out
}

async fn compactor(sh: Arc<Shared>, seed: u64) -> Vec<i64> {
    let mut rng = fastrand::Rng::with_seed(seed ^ 0xC0FFEE);
    let mut issued = Vec::new();
    let mut client: Option<KvClient<Channel>> = None;
    loop {
        tokio::time::sleep(Duration::from_millis(rng.u64(400..1200))).await;
        if sh.phase() != Phase::Running {
            break;
        }
        let target = sh.reference_seen.load(Ordering::Relaxed) - rng.i64(0..40);
        if target < 2 || target <= sh.compacted.load(Ordering::Relaxed) {
            continue;
        }
        let c = match client.as_mut() {
            Some(c) => c,
            None => match connect(&sh).await {
                Some(ch) => client.insert(KvClient::new(ch)),
                None => break,
            },
        };
        // Recorded before it is sent: from now on prev_kv at or below it may be absent.
        sh.compacted.fetch_max(target, Ordering::Relaxed);
        issued.push(target);
        let req = pb::CompactionRequest {
            revision: target,
            physical: rng.bool(),
        };
        match tokio::time::timeout(REQUEST_GUARD, c.compact(req)).await {
            Ok(Ok(_)) => {}
            Ok(Err(s)) if wire::definite(&s) => {}
            _ => client = None,
        }
    }
    issued
}

/// How a stream's watchers read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Behaviour {
    /// Reads everything at once.
    Healthy,
    /// Sleeps after every response.
    Slow(u64),
    /// Stops reading for seconds now and then.
    Staller,
    /// Drops the stream now and then and resumes from the last revision + 1.
    Disconnector,
}

struct Slot {
    rec: WatcherRecord,
    /// First start revision (0: now).
    initial_start: i64,
    /// Every selected event up to here was delivered (0: nothing known yet).
    covered: i64,
    /// A session was created once (resumes start at `covered + 1`).
    created_once: bool,
    done: bool,
    /// An `initial_state` session between `created` and its marker: the keys listed so far.
    listing: Option<Vec<crate::record::Kv>>,
}

impl Slot {
    fn next_start(&self) -> i64 {
        if self.rec.spec.initial_state {
            // Every session lists again and watches from its own R: the recovery recipe.
            0
        } else if self.created_once {
            self.covered + 1
        } else {
            self.initial_start
        }
    }

    fn end_session(&mut self, end: SessionEnd) {
        if let Some(s) = self.rec.sessions.last_mut()
            && matches!(s.end, SessionEnd::Broken(ref r) if r == OPEN)
        {
            s.end = end;
        }
    }

    fn on_response(&mut self, resp: &pb::WatchResponse, sh: &Shared) {
        let Some(session) = self.rec.sessions.last_mut() else {
            return;
        };
        let header = resp.header.as_ref().map_or(0, |h| h.revision);
        if let Some(listed) = &mut self.listing
            && !resp.canceled
        {
            listed.extend(resp.events.iter().map(|e| wire::event(e).kv));
            if resp.events.is_empty() {
                // The marker: the state at R is complete; live events follow.
                let kvs = self.listing.take().unwrap_or_default();
                session.responses.push(Response::Initial {
                    revision: header,
                    kvs,
                });
                self.covered = self.covered.max(header);
            }
            return;
        }
        if resp.canceled {
            session.responses.push(Response::Canceled {
                compact_revision: resp.compact_revision,
                reason: resp.cancel_reason.clone(),
            });
            session.end = SessionEnd::Canceled;
            self.done = true;
        } else if !resp.events.is_empty() {
            let events: Vec<_> = resp.events.iter().map(wire::event).collect();
            if let Some(last) = events.last() {
                self.covered = self.covered.max(last.kv.mod_revision);
            }
            session.responses.push(Response::Events {
                header_revision: header,
                events,
                compacted_before: sh.compacted.load(Ordering::Relaxed),
                at: sh.start.elapsed(),
            });
        } else if !resp.created && resp.compact_revision == 0 && header != 0 {
            session
                .responses
                .push(Response::Progress { revision: header });
            self.covered = self.covered.max(header);
        }
        if self.rec.reference {
            sh.reference_seen.fetch_max(self.covered, Ordering::Relaxed);
        }
    }
}

/// Marker of a session still open (replaced when it ends).
const OPEN: &str = "open";

enum StreamExit {
    /// Reconnect and resume.
    Resume,
    /// Every watcher is finished.
    Finished,
}

async fn stream_task(
    sh: Arc<Shared>,
    seed: u64,
    behaviour: Behaviour,
    mut slots: Vec<Slot>,
) -> Vec<WatcherRecord> {
    let mut rng = fastrand::Rng::with_seed(seed);
    while let StreamExit::Resume = stream_once(&sh, &mut rng, behaviour, &mut slots).await {}
    for s in &mut slots {
        s.end_session(SessionEnd::Closed);
    }
    slots.into_iter().map(|s| s.rec).collect()
}

async fn stream_once(
    sh: &Shared,
    rng: &mut fastrand::Rng,
    behaviour: Behaviour,
    slots: &mut [Slot],
) -> StreamExit {
    if slots.iter().all(|s| s.done) || sh.phase() == Phase::Stop {
        return StreamExit::Finished;
    }
    let Some(channel) = connect(sh).await else {
        return StreamExit::Finished;
    };
    let mut client = WatchClient::new(channel);
    let (tx, rx) = mpsc::channel::<pb::WatchRequest>(64);
    let mut stream = match client.watch(ReceiverStream::new(rx)).await {
        Ok(r) => r.into_inner(),
        Err(_) => return StreamExit::Resume,
    };
    let broken = |slots: &mut [Slot], why: String| {
        for s in slots.iter_mut() {
            s.end_session(SessionEnd::Broken(why.clone()));
        }
        StreamExit::Resume
    };
    // Creates, one at a time (as the Go client): responses of earlier watches are routed.
    let mut by_id: HashMap<i64, usize> = HashMap::new();
    for i in 0..slots.len() {
        if slots[i].done {
            continue;
        }
        let start = slots[i].next_start();
        slots[i].rec.sessions.push(Session {
            start_revision: start,
            created_revision: None,
            responses: Vec::new(),
            end: SessionEnd::Broken(OPEN.into()),
        });
        if tx
            .send(wire::create(&slots[i].rec.spec, start))
            .await
            .is_err()
        {
            return broken(slots, "request channel closed".into());
        }
        loop {
            let resp = match stream.message().await {
                Ok(Some(r)) => r,
                Ok(None) => return broken(slots, "stream ended".into()),
                Err(e) => return broken(slots, e.to_string()),
            };
            if resp.created {
                let s = &mut slots[i];
                if resp.canceled && resp.compact_revision == 0 {
                    s.end_session(SessionEnd::Refused(resp.cancel_reason.clone()));
                    s.done = true;
                    break;
                }
                let header = resp.header.as_ref().map_or(0, |h| h.revision);
                if let Some(session) = s.rec.sessions.last_mut() {
                    session.created_revision = Some(header);
                }
                if !s.created_once {
                    s.covered = if start > 0 { start - 1 } else { header };
                    s.created_once = true;
                }
                s.listing = (s.rec.spec.initial_state && !resp.canceled).then(Vec::new);
                if resp.canceled {
                    s.on_response(&resp, sh);
                } else {
                    by_id.insert(resp.watch_id, i);
                }
                break;
            }
            route(&resp, &by_id, slots, sh);
        }
    }

    let now = tokio::time::Instant::now();
    let mut next_progress = now + Duration::from_millis(rng.u64(200..2000));
    let far = now + Duration::from_secs(3600);
    let mut disconnect_at = match behaviour {
        Behaviour::Disconnector => now + Duration::from_millis(rng.u64(300..3000)),
        _ => far,
    };
    let mut stall_at = match behaviour {
        Behaviour::Staller => now + Duration::from_millis(rng.u64(500..3000)),
        _ => far,
    };
    let mut phase_rx = sh.phase.clone();
    loop {
        let phase = *phase_rx.borrow_and_update();
        let live: Vec<usize> = by_id
            .values()
            .copied()
            .filter(|&i| !slots[i].done)
            .collect();
        match phase {
            Phase::Stop => {
                for s in slots.iter_mut() {
                    s.end_session(SessionEnd::Closed);
                }
                return StreamExit::Finished;
            }
            Phase::Draining(f) if live.iter().all(|&i| slots[i].covered >= f) => {
                for &i in &live {
                    slots[i].end_session(SessionEnd::Drained(f));
                    slots[i].done = true;
                }
                return StreamExit::Finished;
            }
            _ => {}
        }
        if live.is_empty() {
            return StreamExit::Resume;
        }
        let draining = matches!(phase, Phase::Draining(_));
        tokio::select! {
            msg = stream.message() => match msg {
                Ok(Some(resp)) => {
                    route(&resp, &by_id, slots, sh);
                    if let (Behaviour::Slow(ms), false) = (behaviour, draining) {
                        tokio::time::sleep(Duration::from_millis(ms)).await;
                    }
                }
                Ok(None) => return broken(slots, "stream ended".into()),
                Err(e) => return broken(slots, e.to_string()),
            },
            _ = tokio::time::sleep_until(next_progress) => {
                let _ = tx.try_send(wire::progress_request());
                next_progress = tokio::time::Instant::now() + if draining {
                    Duration::from_millis(150)
                } else {
                    Duration::from_millis(rng.u64(200..3000))
                };
            }
            _ = tokio::time::sleep_until(disconnect_at), if !draining => {
                for s in slots.iter_mut() {
                    s.end_session(SessionEnd::Closed);
                }
                return StreamExit::Resume;
            }
            _ = tokio::time::sleep_until(stall_at), if !draining => {
                tokio::time::sleep(Duration::from_millis(rng.u64(1000..4000))).await;
                stall_at = tokio::time::Instant::now() + Duration::from_millis(rng.u64(1000..4000));
            }
            _ = phase_rx.changed() => {
                if let Phase::Draining(_) = *phase_rx.borrow() {
                    next_progress = tokio::time::Instant::now();
                }
            }
        }
        if disconnect_at <= tokio::time::Instant::now() && draining {
            disconnect_at = far;
        }
    }
}

fn route(resp: &pb::WatchResponse, by_id: &HashMap<i64, usize>, slots: &mut [Slot], sh: &Shared) {
    if resp.watch_id == -1 && !resp.created && !resp.canceled {
        // The stream-wide answer to a progress request: it covers every watch of the stream.
        for &i in by_id.values() {
            if !slots[i].done {
                slots[i].on_response(resp, sh);
            }
        }
    } else if let Some(&i) = by_id.get(&resp.watch_id)
        && !slots[i].done
    {
        slots[i].on_response(resp, sh);
    }
}

fn random_spec(rng: &mut fastrand::Rng) -> WatchSpec {
    let (key, range_end): (Vec<u8>, Vec<u8>) = match rng.u8(..10) {
        0..3 => (key(rng), Vec::new()),
        3..6 => {
            let p = [b"a/", b"b/", b"c/"][rng.usize(..3)];
            let mut end = p.to_vec();
            end[1] += 1;
            (p.to_vec(), end)
        }
        6..8 => match rng.u8(..3) {
            0 => (b"a/1".to_vec(), b"b/1".to_vec()),
            1 => (b"b/0".to_vec(), b"c/1".to_vec()),
            _ => (b"b/1".to_vec(), b"\0".to_vec()),
        },
        _ => (b"\0".to_vec(), b"\0".to_vec()),
    };
    let filter = rng.u8(..10);
    WatchSpec {
        key,
        range_end,
        prev_kv: rng.bool(),
        no_put: filter == 0,
        no_delete: filter == 1,
        progress_notify: rng.u8(..10) < 3,
        initial_state: rng.u8(..10) < 2,
    }
}

/// Runs one randomized workload and returns what happened. Property violations are found
/// afterwards by [`crate::validate::validate`].
pub async fn run(cfg: &RunConfig) -> Result<RunRecord, Error> {
    let (bin, args) = (cfg.server_bin.clone(), cfg.server_args.clone());
    let mut server =
        tokio::task::spawn_blocking(move || server::start(&bin, "keywatch-robustness-", &args))
            .await??;
    let (ep_tx, ep_rx) = watch::channel(server.endpoint());
    let (phase_tx, phase_rx) = watch::channel(Phase::Running);
    let sh = Arc::new(Shared {
        start: Instant::now(),
        endpoint: ep_rx,
        phase: phase_rx,
        compacted: AtomicI64::new(0),
        reference_seen: AtomicI64::new(0),
        head: AtomicI64::new(1),
    });
    let mut rng = fastrand::Rng::with_seed(cfg.seed);
    let mut next_id = 0;
    let mut streams: Vec<JoinHandle<Vec<WatcherRecord>>> = Vec::new();
    let new_slot = |id: usize, spec: WatchSpec, start: i64, behaviour: &str, reference| Slot {
        rec: WatcherRecord {
            id,
            spec,
            behaviour: behaviour.to_owned(),
            sessions: Vec::new(),
            reference,
        },
        initial_start: start,
        covered: 0,
        created_once: false,
        done: false,
        listing: None,
    };
    // The reference watcher: everything from revision 1, healthy.
    let reference = WatchSpec {
        key: b"\0".to_vec(),
        range_end: b"\0".to_vec(),
        prev_kv: true,
        no_put: false,
        no_delete: false,
        progress_notify: true,
        initial_state: false,
    };
    streams.push(tokio::spawn(stream_task(
        sh.clone(),
        rng.u64(..),
        Behaviour::Healthy,
        vec![new_slot(0, reference, 1, "reference", true)],
    )));
    next_id += 1;

    let mut writers: Vec<_> = (0..cfg.writers)
        .map(|i| tokio::spawn(writer(sh.clone(), i, cfg.seed)))
        .collect();
    if cfg.leases {
        writers.push(tokio::spawn(leaser(sh.clone(), cfg.writers, cfg.seed)));
    }
    let compactor = tokio::spawn(compactor(sh.clone(), cfg.seed));

    // Streams open at random times; kills at spread-out random times.
    let started = Instant::now();
    let mut kill_times: Vec<Duration> = (0..cfg.kills)
        .map(|k| {
            let slot = cfg.duration.as_secs_f64() / cfg.kills as f64;
            Duration::from_secs_f64(slot * (k as f64 + 0.3 + 0.5 * rng.f64()))
        })
        .collect();
    kill_times.reverse();
    let mut kills = 0;
    let mut opened = 0;
    while started.elapsed() < cfg.duration {
        if opened < cfg.streams && (opened < cfg.streams / 3 || rng.u8(..3) == 0) {
            let behaviour = match rng.u8(..10) {
                0..4 => Behaviour::Healthy,
                4..6 => Behaviour::Slow(rng.u64(2..30)),
                6..8 => Behaviour::Staller,
                _ => Behaviour::Disconnector,
            };
            let slots = (0..rng.usize(1..=3))
                .map(|_| {
                    let head = sh.head.load(Ordering::Relaxed);
                    let start = if head > 2 && rng.bool() {
                        rng.i64((head - 300).max(1)..=head)
                    } else {
                        0
                    };
                    let slot = new_slot(
                        next_id,
                        random_spec(&mut rng),
                        start,
                        &format!("{behaviour:?}"),
                        false,
                    );
                    next_id += 1;
                    slot
                })
                .collect();
            streams.push(tokio::spawn(stream_task(
                sh.clone(),
                rng.u64(..),
                behaviour,
                slots,
            )));
            opened += 1;
        }
        if kill_times.last().is_some_and(|t| started.elapsed() >= *t) {
            kill_times.pop();
            server = restart(server).await?;
            kills += 1;
            let _ = ep_tx.send(server.endpoint());
        }
        tokio::time::sleep(Duration::from_millis(rng.u64(100..400))).await;
    }

    // Writers and the compactor stop; then one more kill, the final read and the drain.
    let _ = phase_tx.send(Phase::Quiesce);
    let mut writes = Vec::new();
    for w in writers {
        writes.extend(w.await?);
    }
    let compactions = compactor.await?;
    server = restart(server).await?;
    kills += 1;
    let _ = ep_tx.send(server.endpoint());
    let final_range = final_range(&sh).await?;
    let _ = phase_tx.send(Phase::Draining(final_range.0));
    let mut watchers = Vec::new();
    let drain_guard = tokio::time::sleep(Duration::from_secs(120));
    tokio::pin!(drain_guard);
    for mut handle in streams {
        let recs = tokio::select! {
            r = &mut handle => r?,
            _ = &mut drain_guard => {
                let _ = phase_tx.send(Phase::Stop);
                handle.await?
            }
        };
        watchers.extend(recs);
    }
    let _ = phase_tx.send(Phase::Stop);
    drop(server);
    watchers.sort_by_key(|w| w.id);
    Ok(RunRecord {
        seed: cfg.seed,
        writes,
        watchers,
        compactions,
        final_range: Some(final_range),
        kills,
    })
}

async fn restart(mut server: ServerProcess) -> Result<ServerProcess, Error> {
    Ok(tokio::task::spawn_blocking(move || server.restart().map(|()| server)).await??)
}

async fn final_range(sh: &Shared) -> Result<(i64, Vec<crate::record::Kv>), Error> {
    let mut last = None;
    for _ in 0..20 {
        let Some(ch) = connect(sh).await else { break };
        let req = pb::RangeRequest {
            key: b"\0".to_vec().into(),
            range_end: b"\0".to_vec().into(),
            ..Default::default()
        };
        match KvClient::new(ch).range(req).await {
            Ok(r) => {
                let r = r.into_inner();
                let mut kvs: Vec<_> = r.kvs.iter().map(wire::kv).collect();
                kvs.sort_by(|a, b| a.key.cmp(&b.key));
                return Ok((r.header.map_or(0, |h| h.revision), kvs));
            }
            Err(s) => last = Some(s),
        }
    }
    Err(Error::Rpc {
        what: "final range".into(),
        status: last.unwrap_or_else(|| tonic::Status::unavailable("run stopped")),
    })
}

//! The Watch service: one task per client stream multiplexes every watch of the stream.
//!
//! Delivery path: every watcher of a stream is registered into the stream's one engine
//! [`Outbox`]. The dispatcher appends each watcher's messages there and wakes the stream task
//! (not one waker per watcher); the task drains everything queued at once, turns it into
//! responses and hands them to tonic through a byte-bounded outbound queue. Responses are
//! [`WireResponse`]s: a small per-watcher head followed by event bytes encoded once per change
//! set (and per `prev_kv` variant) and shared by every watcher and stream
//! ([`watch_proto::wire`]), written by the Watch service's own codec without re-encoding.
//!
//! Ordering holds by construction, since one task owns the stream:
//! - a create is answered (`created`) before the task next drains the outbox, so no event of
//!   that watch precedes it;
//! - creates, cancels and progress requests are answered in request order;
//! - a cancel drops the registration before the `canceled` reply, and items of a watch the
//!   stream no longer holds (matched by the engine's never-reused id) are skipped;
//! - a create with keywatch's `initial_state` extension (field 100) sends `created`, the
//!   state at R and its marker from this task before it registers the watcher at R + 1, so
//!   no live event of that watch precedes them (`create_listing`);
//! - a manual progress request is one counter on the outbox; the engine appends the answer
//!   behind every event it covers once every watcher of the stream is synced, and the task
//!   sends everything drained before it first. Each request gets its answer (etcd sends one
//!   per request), and N pending requests cost one engine message, not N × watchers.
//!
//! Merging: within one drain, consecutive event messages of one watch (a watch that is behind,
//! whether caught up from the log or live) go out in one response, up to
//! [`MAX_MERGED_REVISIONS`] revisions and `max_request_bytes`, as etcd does for unsynced
//! watchers. A merge never spans a created, canceled or progress response, and never splits a
//! revision (a revision alone may exceed the cap; with `fragment` it is then split as etcd
//! splits it).
//!
//! Memory per stream is bounded in bytes: the outbox (`watch_stream_bytes`, counting each
//! queued item and the change set it holds), what one drain takes out of it (at most the same),
//! and the outbound queue ([`OUTBOUND_BYTES`] of encoded responses). When the client stops
//! reading, the outbound queue fills, the task stops reading requests (HTTP/2 flow control then
//! pushes back on the client, the connection stays up) and stops draining; the outbox fills and
//! its watchers turn lagging, to be caught up from the event log later by the dispatcher, which
//! serves catch-ups in bounded turns and reads the log off its task, so live delivery to other
//! streams is not held up.
//!
//! # Invariants
//!
//! - **Watch stream ordering by construction**: one task owns a stream's outbox (all its
//!   watchers), its requests and its outbound queue. `created` is sent before the task drains the
//!   outbox again; a cancel drops the registration before replying and later items of that
//!   watcher are skipped (matched by engine id, never reused); a progress request bumps the
//!   outbox's counter and the engine appends the answer behind the events it covers, and each
//!   request gets its own `watch_id = -1` reply. Within one drain a watch's consecutive revisions
//!   are merged into one response (≤ 1000 revisions and `--max-request-bytes`; never across a
//!   created/canceled/progress response; a revision is never split unless `fragment` allows it).
//! - **Bounded memory per slow client, in bytes**: per stream ≤ `--watch-stream-bytes` (outbox,
//!   counting each item and the change set it holds) + the same again for one drain being turned
//!   into responses + `OUTBOUND_BYTES` (1 MiB of encoded responses waiting for tonic) + h2's
//!   buffers; per watcher at most `--watch-buffer` messages of that. When the outbound queue is
//!   full the stream stops reading requests (HTTP/2 flow control pushes back; the connection
//!   stays) and stops draining; the outbox fills and its watchers are caught up from the log
//!   later by the dispatcher (bounded turns, log reads off its task), so other streams' live
//!   delivery is not held up. Per server: streams × that + the window.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::StreamExt;
// foldhash, not SipHash: both maps are probed once per delivered item.
use hashbrown::HashMap;
use tokio::sync::{Semaphore, mpsc, watch};
use tonic::{Request, Response, Status, Streaming};
use watch_core::{
    CancelReason, ChangeSet, Event, EventBatch, Outbox, OutboxItem, OutboxLimits, Registration,
    Revision, WatchError, WatchMessage, WatchOptions,
};
use watch_proto::etcdserverpb as pb;
use watch_proto::from_proto::{self, WatchCommand};
use watch_proto::status::{EtcdError, from_convert_error};
use watch_proto::wire::{self, WireResponse};
use watch_proto::{ConvertError, to_proto};

use super::admit::{ConnWatchers, WatchBudget, WatchLimit, WatchSlot};
use super::convert::{header, store_status};
use super::listen::ConnInfo;
use super::metrics::{CancelKind, WatchMetrics};
use crate::auth::{Caller, Gate, Perm, token_of};
use kv_store::{ErrorClass, InitialState, Store, StoreError};
use tracing::Instrument;

/// Bytes of encoded responses buffered per stream between its task and the client. Enough for
/// tens of thousands of small `created` replies to pipelined creates before the stream stops
/// reading requests (etcd's gRPC buffers are of that order).
pub const OUTBOUND_BYTES: usize = 1 << 20;

/// gRPC overhead etcd adds to `--max-request-bytes` for its receive limit and for the size at
/// which watch responses are fragmented (512 KiB).
pub const GRPC_OVERHEAD_BYTES: usize = 512 * 1024;

/// Most revisions merged into one response, etcd's `watchBatchMaxRevs`.
pub const MAX_MERGED_REVISIONS: usize = 1000;

/// Most outbox items taken per drain, so one drain's responses go out before the next is taken.
const DRAIN_ITEMS: usize = 4096;

/// Settings of the watch service.
#[derive(Debug, Clone)]
pub struct WatchSettings {
    /// Most watches on one stream; a create beyond it is refused (created + canceled).
    pub max_watchers_per_stream: usize,
    /// Most watchers on one client connection, over all its streams (refused the same way).
    pub max_watchers_per_connection: usize,
    /// Most watchers of one user, authentication on (refused the same way).
    pub max_watchers_per_user: usize,
    /// Most messages of one watcher queued in its stream's outbox (revisions).
    pub watch_buffer: u32,
    /// Most bytes queued in one stream's outbox (each message counted with the memory of the
    /// change set it holds); beyond it the stream's watchers are caught up from the log.
    pub watch_stream_bytes: usize,
    /// etcd `--max-request-bytes`; responses of fragment-enabled watches are split at this
    /// plus [`GRPC_OVERHEAD_BYTES`], and merged responses stop growing at this.
    pub max_request_bytes: usize,
}

/// etcd's `Watch` service over a [`Store`].
#[derive(Debug, Clone)]
pub struct WatchService {
    store: Store,
    settings: WatchSettings,
    /// Becomes true at shutdown: every stream task ends.
    shutdown: watch::Receiver<bool>,
    metrics: WatchMetrics,
    /// Mirror mode: the upstream connection. Streams opened with etcd's `hasleader: true`
    /// metadata are refused, or ended, with etcd's "no leader" while it is not connected.
    leader: Option<watch::Receiver<crate::mirror::MirrorStatus>>,
    /// Authorization of every watch create (off: one branch).
    gate: Gate,
    /// The per-connection and per-user watcher limits, shared by every stream.
    limits: WatchBudget,
}

/// etcd's metadata key (value `true`) asking that a stream fail while the member has no
/// leader (clientv3 `WithRequireLeader`).
const REQUIRE_LEADER_KEY: &str = "hasleader";

impl WatchService {
    /// The service; streams end when `shutdown` turns true.
    pub fn new(store: Store, settings: WatchSettings, shutdown: watch::Receiver<bool>) -> Self {
        let limits = WatchBudget::new(
            settings.max_watchers_per_connection,
            settings.max_watchers_per_user,
        );
        Self {
            store,
            settings,
            shutdown,
            metrics: WatchMetrics::default(),
            leader: None,
            gate: Gate::off(),
            limits,
        }
    }

    /// Mirror mode: `hasleader` streams follow the mirror's upstream connection in `status`
    /// (refused at open, ended when it drops, with etcd's "no leader", as an etcd member that
    /// loses its leader does), so a client fails over instead of waiting on a stale replica.
    pub fn with_mirror_status(
        mut self,
        status: watch::Receiver<crate::mirror::MirrorStatus>,
    ) -> Self {
        self.leader = Some(status);
        self
    }

    /// Records streams, events, cancels and publish→send latency into `metrics`.
    pub fn with_metrics(mut self, metrics: WatchMetrics) -> Self {
        self.metrics = metrics;
        self
    }

    /// Checks every watch create against `gate`'s users and roles.
    pub fn with_gate(mut self, gate: Gate) -> Self {
        self.gate = gate;
        self
    }
}

/// The outbound side of a stream: responses in order, bounded by [`OUTBOUND_BYTES`] of
/// encoded size. They arrive in [`Outgoing`] batches; the budget is returned as tonic takes
/// the responses, every [`RETURN_BYTES`] and at the end of each batch. (Returning a batch's
/// budget only once its last response was taken halved the effective bound at 10,000
/// watchers: stream tasks waited, their watchers fell behind and were caught up from the log,
/// which cost more CPU per event than it saved.)
pub struct WatchResponseStream {
    rx: mpsc::UnboundedReceiver<Result<Outgoing, Status>>,
    budget: Arc<Semaphore>,
    /// The batch being handed to tonic.
    current: std::vec::IntoIter<WireResponse>,
    /// Budget of the responses of `current` already taken, not yet returned.
    owed: usize,
    /// Budget of `current` not yet accounted (a last batch sent unbudgeted has none).
    unowned: usize,
}

/// Budget returned to the stream task in steps of at least this many bytes (one semaphore
/// operation per step rather than per response).
const RETURN_BYTES: usize = 64 << 10;

impl futures_core::Stream for WatchResponseStream {
    type Item = Result<WireResponse, Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if let Some(resp) = this.current.next() {
                let c = cost(&resp).min(this.unowned);
                this.unowned -= c;
                this.owed += c;
                if this.current.len() == 0 || this.owed >= RETURN_BYTES {
                    // The batch's last response takes what rounding left (none).
                    if this.current.len() == 0 {
                        this.owed += std::mem::take(&mut this.unowned);
                    }
                    if this.owed > 0 {
                        this.budget.add_permits(std::mem::take(&mut this.owed));
                    }
                }
                return Poll::Ready(Some(Ok(resp)));
            }
            match std::task::ready!(this.rx.poll_recv(cx)) {
                Some(Ok(out)) => {
                    this.current = out.responses.into_iter();
                    this.unowned = out.cost;
                }
                Some(Err(status)) => return Poll::Ready(Some(Err(status))),
                None => return Poll::Ready(None),
            }
        }
    }
}

/// Responses one step of the stream task produced (a drain, a request), handed to tonic with
/// one channel send and one budget acquisition rather than one per response: at 1,000
/// watchers a drain makes hundreds of one-event responses.
#[derive(Default)]
pub struct Outgoing {
    responses: Vec<WireResponse>,
    /// Budget acquired for them (the sum of their [`cost`]s; ≤ [`OUTBOUND_BYTES`]), or 0 for a
    /// last batch sent unbudgeted as the stream ends.
    cost: usize,
}

/// A batch being assembled by the stream task, with what it counts once handed over.
#[derive(Default)]
struct Batch {
    out: Outgoing,
    /// Responses carrying events, and their events.
    event_responses: u64,
    events: usize,
    /// Revisions of live batches in it, adjacent duplicates removed, for the
    /// publish→send latency (observed once per revision per batch).
    live: Vec<Revision>,
}

impl Drop for WatchResponseStream {
    fn drop(&mut self) {
        // Wakes a stream task waiting for room: nothing will be taken any more.
        self.budget.close();
    }
}

/// Budget a response takes from the outbound bound (a response larger than the whole bound
/// takes all of it, so it waits for an empty queue rather than forever).
fn cost(resp: &WireResponse) -> usize {
    resp.encoded_len().clamp(1, OUTBOUND_BYTES)
}

#[tonic::async_trait]
impl wire::watch_server::Watch for WatchService {
    type WatchStream = WatchResponseStream;

    async fn watch(
        &self,
        request: Request<Streaming<pb::WatchRequest>>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        // The client connection's shared state (absent for a call that came through no
        // listener, e.g. an embedder's in-process service).
        let conn = request.extensions().get::<ConnInfo>().cloned();
        let peer = conn.as_ref().and_then(ConnInfo::remote_addr);
        let require_leader = request
            .metadata()
            .get(REQUIRE_LEADER_KEY)
            .is_some_and(|v| v.as_bytes() == b"true");
        let leader = match &self.leader {
            Some(status) if require_leader => {
                if !status.borrow().is_connected() {
                    return Err(EtcdError::NoLeader.status());
                }
                Some(status.clone())
            }
            _ => None,
        };
        // etcd reads the stream's token at every create, so a token that expires while the
        // stream is open refuses later creates; keep it, not the caller.
        // Kept whether authentication is on or not: it can be turned on while the stream is
        // open, and each create is checked as things stand then.
        let token = match self.gate.manager() {
            Some(_) => token_of(request.metadata()).map(str::to_owned),
            None => None,
        };
        let inbound = request.into_inner();
        let (mut stream, responses) = WatchStream::new(
            self.store.clone(),
            self.settings.clone(),
            self.metrics.clone(),
            self.gate.clone(),
            token,
        );
        stream.limits = self.limits.clone();
        stream.conn = conn.map(|c| c.watchers().clone());
        let span = tracing::debug_span!("watch_stream", peer = peer.map(tracing::field::display));
        tokio::spawn(
            stream
                .run(inbound, self.shutdown.clone(), leader)
                .instrument(span),
        );
        Ok(Response::new(responses))
    }
}

/// One watch of the stream. Dropping it unregisters the engine watcher.
struct Watch {
    registration: Registration,
    prev_kv: bool,
    fragment: bool,
    progress_notify: bool,
    /// This watch's share of its connection's and user's watcher budgets.
    _slot: WatchSlot,
}

/// A response being assembled from one drain.
struct Pending {
    resp: WireResponse,
    watch_id: i64,
    /// Last revision in the response (its header revision).
    revision: Revision,
    revisions: usize,
    fragment: bool,
    /// Revision of the first live (not catch-up) batch, for the publish→send latency.
    live: Option<Revision>,
}

/// The client went away (the outbound channel closed): end the stream task.
struct Gone;

struct WatchStream {
    store: Store,
    settings: WatchSettings,
    outbox: Outbox,
    out: mpsc::UnboundedSender<Result<Outgoing, Status>>,
    budget: Arc<Semaphore>,
    /// Responses of the current step, not yet handed to tonic (empty between steps).
    batch: Batch,
    /// By client watch ID.
    watches: HashMap<i64, Watch>,
    next_id: i64,
    metrics: WatchMetrics,
    gate: Gate,
    /// The `token` metadata of the stream's request.
    token: Option<String>,
    /// The server's per-connection and per-user watcher limits.
    limits: WatchBudget,
    /// The watcher count of the stream's connection (none for an in-process call).
    conn: Option<ConnWatchers>,
    /// Reused buffers of one drain.
    items: Vec<OutboxItem>,
    pending: Vec<Pending>,
    open: HashMap<i64, usize>,
}

impl WatchStream {
    fn new(
        store: Store,
        settings: WatchSettings,
        metrics: WatchMetrics,
        gate: Gate,
        token: Option<String>,
    ) -> (Self, WatchResponseStream) {
        let (tx, rx) = mpsc::unbounded_channel();
        let budget = Arc::new(Semaphore::new(OUTBOUND_BYTES));
        let outbox = store.engine().outbox(OutboxLimits {
            max_bytes: settings.watch_stream_bytes,
            max_messages: usize::MAX,
        });
        // Replaced by the service's shared limits; a stream on its own (tests) has its own.
        let limits = WatchBudget::new(
            settings.max_watchers_per_connection,
            settings.max_watchers_per_user,
        );
        let stream = Self {
            store,
            settings,
            outbox,
            out: tx,
            budget: budget.clone(),
            batch: Batch::default(),
            watches: HashMap::new(),
            next_id: 0,
            metrics,
            limits,
            conn: None,
            gate,
            token,
            items: Vec::new(),
            pending: Vec::new(),
            open: HashMap::new(),
        };
        (
            stream,
            WatchResponseStream {
                rx,
                budget,
                current: Vec::new().into_iter(),
                owed: 0,
                unowned: 0,
            },
        )
    }

    async fn run(
        mut self,
        mut inbound: Streaming<pb::WatchRequest>,
        mut shutdown: watch::Receiver<bool>,
        mut leader: Option<watch::Receiver<crate::mirror::MirrorStatus>>,
    ) {
        let _open = self.metrics.stream_opened();
        tracing::debug!("watch stream opened");
        let mut client_open = true;
        loop {
            if !client_open && self.watches.is_empty() {
                // Half-closed and nothing left to watch: nothing more can happen.
                break;
            }
            // Requests are read and the outbox drained only while responses can be queued: a
            // client that does not read stops being read (flow control), not disconnected.
            let room = self.budget.available_permits() > 0;
            let budget = self.budget.clone();
            let (outbox, items) = (&self.outbox, &mut self.items);
            let step = tokio::select! {
                req = inbound.next(), if client_open && room => match req {
                    Some(Ok(req)) => self.on_request(&req).await,
                    Some(Err(status)) => {
                        // Undecodable bytes (or a broken transport): end the stream with the
                        // receive error (INTERNAL for a decode error), as etcd does, not OK.
                        tracing::debug!(%status, "watch stream receive error");
                        self.end_with(status);
                        break;
                    }
                    // The client half-closed; keep streaming, as etcd does.
                    None => {
                        client_open = false;
                        Ok(())
                    }
                },
                _ = std::future::poll_fn(|cx| outbox.poll_drain(cx, items, DRAIN_ITEMS)), if room => {
                    self.deliver().await
                }
                r = budget.acquire(), if !room => match r {
                    Ok(_) => Ok(()),
                    // Closed by the response stream's drop: the client is gone.
                    Err(_) => break,
                },
                _ = self.out.closed() => break,
                _ = async {
                    match &mut leader {
                        Some(l) => drop(l.wait_for(|s| !s.is_connected()).await),
                        None => std::future::pending().await,
                    }
                } => {
                    // A `hasleader` stream on a mirror that lost its upstream: etcd ends such
                    // a stream with "no leader" when the member loses its leader.
                    self.end_with(EtcdError::NoLeader.status());
                    break;
                }
                _ = async { drop(shutdown.wait_for(|s| *s).await) } => {
                    // The server is stopping: end the stream with a status clients retry on
                    // (etcd's "server stopped", UNAVAILABLE), not a silent OK.
                    self.end_with(EtcdError::Stopped.status());
                    break;
                }
            };
            if step.is_err() {
                break;
            }
        }
        if !self.watches.is_empty() {
            self.metrics
                .canceled(CancelKind::StreamClosed, self.watches.len() as u64);
        }
        tracing::debug!(watches = self.watches.len(), "watch stream ended");
    }

    /// Adds one response to the step's batch, handing the batch over first if this response
    /// would take it past [`OUTBOUND_BYTES`]. `events`: how many events it carries (one
    /// fragment counts as one response), counted only once the stream took it, and before the
    /// client can read it. `live`: revision of a live batch in it, whose publish-to-send time
    /// is observed. Every step ends with [`WatchStream::commit`].
    async fn send_wire(
        &mut self,
        resp: WireResponse,
        events: usize,
        live: Option<Revision>,
    ) -> Result<(), Gone> {
        if self.out.is_closed() {
            return Err(Gone);
        }
        let c = cost(&resp);
        if self.batch.out.cost + c > OUTBOUND_BYTES {
            self.commit().await?;
        }
        let b = &mut self.batch;
        b.out.cost += c;
        b.out.responses.push(resp);
        if events > 0 {
            b.event_responses += 1;
            b.events += events;
        }
        if let Some(r) = live
            && b.live.last() != Some(&r)
        {
            b.live.push(r);
        }
        Ok(())
    }

    /// Hands the step's batch to tonic once the outbound bound has room for all of it.
    async fn commit(&mut self) -> Result<(), Gone> {
        if self.batch.out.responses.is_empty() {
            return Ok(());
        }
        let b = std::mem::take(&mut self.batch);
        // ≤ OUTBOUND_BYTES by construction (send_wire), so the semaphore can satisfy it.
        let n = u32::try_from(b.out.cost).unwrap_or(u32::MAX);
        // The response stream closes the budget when tonic drops it (client gone).
        let permit = self.budget.acquire_many(n).await.map_err(|_| Gone)?;
        // Given back by the response stream once tonic takes the batch's last response.
        permit.forget();
        if b.events > 0 {
            self.metrics.sent(b.event_responses, b.events);
        }
        for r in b.live {
            if let Some(elapsed) = self.store.publish_elapsed(r) {
                self.metrics.publish_to_send(elapsed);
            }
        }
        self.out.send(Ok(b.out)).map_err(|_| Gone)
    }

    /// Ends the stream with `status`, after whatever the step had assembled (sent without
    /// waiting for budget: the stream is ending, and one batch is at most OUTBOUND_BYTES).
    fn end_with(&mut self, status: Status) {
        let mut b = std::mem::take(&mut self.batch);
        if !b.out.responses.is_empty() {
            b.out.cost = 0;
            let _ = self.out.send(Ok(b.out));
        }
        let _ = self.out.send(Err(status));
    }

    async fn send(&mut self, resp: pb::WatchResponse) -> Result<(), Gone> {
        self.send_wire(WireResponse::message(&resp), 0, None).await
    }

    fn current(&self) -> Revision {
        self.store.durable_revision()
    }

    /// `created + canceled` with `watch_id = -1`: etcd's answer to a create it refuses.
    async fn refuse(&mut self, reason: &str) -> Result<(), Gone> {
        self.metrics.canceled(CancelKind::Refused, 1);
        tracing::debug!(reason, "watch create refused");
        self.send(pb::WatchResponse {
            header: Some(header(self.current())),
            watch_id: -1,
            created: true,
            canceled: true,
            cancel_reason: reason.to_owned(),
            ..Default::default()
        })
        .await
    }

    /// etcd's `isWatchPermitted`: a watch needs a valid token and read on every key it
    /// could report. Returns the caller (authentication on), whose watchers count against
    /// `--max-watchers-per-user`.
    fn watch_permission(&self, c: &pb::WatchCreateRequest) -> Result<Option<Caller>, EtcdError> {
        // Resolved at each create: a token invalidated, or a permission revoked, since the
        // stream opened refuses the next create.
        let Some(caller) = self.gate.caller_for(self.token.as_deref())? else {
            return Ok(None);
        };
        // An empty key means "\0" for a watch, as in etcd.
        let key: &[u8] = if c.key.is_empty() { b"\0" } else { &c.key };
        caller.check(Perm::Read, key, &c.range_end)?;
        Ok(Some(caller))
    }

    /// Handles one request and hands its responses over.
    async fn on_request(&mut self, req: &pb::WatchRequest) -> Result<(), Gone> {
        self.handle_request(req).await?;
        self.commit().await
    }

    async fn handle_request(&mut self, req: &pb::WatchRequest) -> Result<(), Gone> {
        let mut caller = None;
        if let Some(pb::watch_request::RequestUnion::CreateRequest(c)) = &req.request_union {
            match self.watch_permission(c) {
                Ok(c) => caller = c,
                // etcd's answer: created + canceled, with Go's rendering of its gRPC error
                // (permission denied, user name is empty, invalid auth token) as the reason.
                Err(e) => return self.refuse(&e.go_status_text()).await,
            }
        }
        match from_proto::watch_request(req) {
            Ok(WatchCommand::Create(c)) => self.create(c, caller.as_ref()).await,
            Ok(WatchCommand::Cancel { watch_id }) => self.cancel(watch_id).await,
            Ok(WatchCommand::Progress) => {
                // etcd: no response on a stream without watchers.
                if !self.watches.is_empty() {
                    self.outbox.request_progress();
                }
                Ok(())
            }
            // An unknown request type (or none): ignored, the stream stays open, as etcd.
            Err(ConvertError::MissingField { .. }) => Ok(()),
            Err(e) => self.refuse(from_convert_error(&e).message()).await,
            // WatchCommand is #[non_exhaustive]: ignore commands this server does not know.
            #[allow(unreachable_patterns)]
            Ok(_) => Ok(()),
        }
    }

    /// Refuses a create over one of the fair-share limits (as the engine's server-wide cap
    /// is refused, see [`WatchLimit`]).
    async fn refuse_limit(&mut self, e: WatchLimit) -> Result<(), Gone> {
        self.metrics.limit_refused(e.label());
        self.refuse(e.status().message()).await
    }

    async fn create(
        &mut self,
        c: from_proto::WatchCreate,
        caller: Option<&Caller>,
    ) -> Result<(), Gone> {
        let id = if c.watch_id != 0 {
            // -1 marks stream-wide replies (progress, refused creates); a client-chosen
            // negative id would be indistinguishable from them.
            if c.watch_id < 0 {
                return self.refuse("keywatch: watch_id must not be negative").await;
            }
            if self.watches.contains_key(&c.watch_id) {
                return self.refuse(EtcdError::DuplicateWatchId.message()).await;
            }
            c.watch_id
        } else {
            while self.watches.contains_key(&self.next_id) {
                self.next_id += 1;
            }
            self.next_id += 1;
            self.next_id - 1
        };
        if self.watches.len() >= self.settings.max_watchers_per_stream {
            let limit = self.settings.max_watchers_per_stream;
            return self.refuse_limit(WatchLimit::Stream { limit }).await;
        }
        // Before the engine's server-wide cap: a client over its own share is told so, and
        // takes nothing from the server's budget.
        let slot = match self
            .limits
            .admit(self.conn.as_ref(), caller.map(Caller::name))
        {
            Ok(slot) => slot,
            Err(e) => return self.refuse_limit(e).await,
        };
        let options = c.options.buffer(self.settings.watch_buffer.max(1));
        if c.initial_state {
            return self.create_listing(id, c, options, slot).await;
        }
        // The tag is the client's id (never negative here), so items need no lookup table.
        let tag = id as u64;
        match self
            .store
            .watch_into(&self.outbox, tag, c.selector, options)
        {
            Ok((registration, created)) => {
                tracing::debug!(watch_id = id, revision = created, "watch created");
                // Sent before the task drains the outbox again: no event precedes it.
                self.send(pb::WatchResponse {
                    header: Some(header(created)),
                    watch_id: id,
                    created: true,
                    ..Default::default()
                })
                .await?;
                self.watches.insert(
                    id,
                    Watch {
                        registration,
                        prev_kv: options.prev_kv,
                        fragment: c.fragment,
                        progress_notify: options.progress_notify,
                        _slot: slot,
                    },
                );
                Ok(())
            }
            Err(StoreError::Compacted { compacted, .. }) => {
                // etcd: the watch is created, then canceled with the compaction revision.
                self.send(pb::WatchResponse {
                    header: Some(header(self.current())),
                    watch_id: id,
                    created: true,
                    ..Default::default()
                })
                .await?;
                self.compacted_cancel(id, compacted).await
            }
            Err(e) => {
                if let ErrorClass::Watch(WatchError::TooManyWatchers { .. }) = e.class() {
                    self.metrics.limit_refused("server");
                }
                self.refuse(store_status(&e).message()).await
            }
        }
    }

    /// etcd's cancel of a watch whose history was compacted (a header whose revision is 0).
    async fn compacted_cancel(&mut self, id: i64, compacted: Revision) -> Result<(), Gone> {
        self.metrics.canceled(CancelKind::Compacted, 1);
        tracing::debug!(watch_id = id, compacted, "watch history compacted");
        self.send(pb::WatchResponse {
            header: Some(header(0)),
            watch_id: id,
            canceled: true,
            compact_revision: to_proto::revision(compacted),
            ..Default::default()
        })
        .await
    }

    /// A create with keywatch's `initial_state` extension (field 100): `created`, the state
    /// at R as PUT events in key order (one response per chunk of at most
    /// `--max-request-bytes`, header R), the marker (an event-less response of this watch at
    /// R), then the watcher registered at R + 1 delivers the changes after R.
    ///
    /// Ordering by construction: this task sends every initial response before it registers
    /// the watcher, so no live event of the watch can precede them; the stream's other watches
    /// wait meanwhile (their outbox fills and they are caught up from the log later, as for a
    /// slow client), and the outbound bound holds the read back to the client's pace, one
    /// chunk in memory at a time. A compaction past R before the read or the registration is
    /// done cancels the watch as compacted (etcd's cancel: watch again); one before the first
    /// chunk restarts the read at a newer R (see kv-store's `list_watch`).
    async fn create_listing(
        &mut self,
        id: i64,
        c: from_proto::WatchCreate,
        options: WatchOptions,
        slot: WatchSlot,
    ) -> Result<(), Gone> {
        let chunk = InitialState::default().chunk_bytes(self.settings.max_request_bytes);
        let mut reader = match self
            .store
            .initial_reader(&c.selector, options.start_revision, chunk)
        {
            Ok(reader) => reader,
            Err(StoreError::Compacted { compacted, .. }) => {
                self.send(pb::WatchResponse {
                    header: Some(header(self.current())),
                    watch_id: id,
                    created: true,
                    ..Default::default()
                })
                .await?;
                return self.compacted_cancel(id, compacted).await;
            }
            Err(e) => return self.refuse(store_status(&e).message()).await,
        };
        // NOPUT drops every initial event: nothing to read. The first chunk is read before
        // `created`, so the header names R after any restart of the read.
        let mut read = if options.no_put {
            Ok(None)
        } else {
            reader.next_chunk().await
        };
        self.send(pb::WatchResponse {
            header: Some(header(reader.revision())),
            watch_id: id,
            created: true,
            ..Default::default()
        })
        .await?;
        loop {
            match read {
                Ok(Some(kvs)) => {
                    let revision = reader.revision();
                    let events = kvs.into_iter().map(|kv| Event::put(kv, None)).collect();
                    let cs = ChangeSet::new(revision, events);
                    let mut resp = WireResponse::events(header(revision), id, false);
                    wire::encoded(&cs, false, |enc| resp.push_events(enc, None));
                    let n = resp.event_count();
                    self.send_wire(resp, n, None).await?;
                }
                Ok(None) => break,
                Err(StoreError::Compacted { compacted, .. }) => {
                    return self.compacted_cancel(id, compacted).await;
                }
                Err(e) => return self.failed_cancel(id, &e).await,
            }
            read = reader.next_chunk().await;
        }
        let revision = reader.revision();
        let live = options.start_revision(revision + 1);
        match self
            .store
            .watch_into(&self.outbox, id as u64, c.selector, live)
        {
            Ok((registration, _)) => {
                tracing::debug!(watch_id = id, revision, "initial state sent");
                // The marker, before the task drains the outbox again: every live event of
                // the watch follows it.
                self.send(pb::WatchResponse {
                    header: Some(header(revision)),
                    watch_id: id,
                    ..Default::default()
                })
                .await?;
                self.watches.insert(
                    id,
                    Watch {
                        registration,
                        prev_kv: options.prev_kv,
                        fragment: c.fragment,
                        progress_notify: options.progress_notify,
                        _slot: slot,
                    },
                );
                Ok(())
            }
            Err(StoreError::Compacted { compacted, .. }) => {
                self.compacted_cancel(id, compacted).await
            }
            Err(e) => self.failed_cancel(id, &e).await,
        }
    }

    /// The cancel of a created watch the store could not go on serving (closed, failed).
    async fn failed_cancel(&mut self, id: i64, e: &StoreError) -> Result<(), Gone> {
        self.metrics.canceled(CancelKind::Other, 1);
        self.send(pb::WatchResponse {
            header: Some(header(self.current())),
            watch_id: id,
            canceled: true,
            cancel_reason: store_status(e).message().to_owned(),
            ..Default::default()
        })
        .await
    }

    async fn cancel(&mut self, id: i64) -> Result<(), Gone> {
        // Dropping the registration ends the engine watcher now; its items still queued are
        // skipped by `deliver` (the id no longer matches).
        if self.watches.remove(&id).is_none() {
            // etcd sends nothing for an unknown watch ID.
            return Ok(());
        }
        self.metrics.canceled(CancelKind::Client, 1);
        tracing::debug!(watch_id = id, "watch canceled by the client");
        self.send(pb::WatchResponse {
            header: Some(header(self.current())),
            watch_id: id,
            canceled: true,
            ..Default::default()
        })
        .await
    }

    /// Turns one drain of the outbox into responses and sends them: a watch's consecutive
    /// event messages are merged, everything before a stream progress answer goes out before
    /// it.
    async fn deliver(&mut self) -> Result<(), Gone> {
        let mut items = std::mem::take(&mut self.items);
        let compacted = self.store.compacted_revision();
        let mut result = Ok(());
        for item in items.drain(..) {
            match item {
                OutboxItem::Message { id, tag, message } => {
                    let watch_id = tag as i64;
                    let Some(w) = self.watches.get(&watch_id) else {
                        continue;
                    };
                    if w.registration.id() != id {
                        // A canceled watch's leftovers, its client id reused since.
                        continue;
                    }
                    let flags = (w.prev_kv, w.fragment, w.progress_notify);
                    match message {
                        WatchMessage::Events(batch) => {
                            self.add_events(watch_id, flags.0, flags.1, &batch, compacted);
                        }
                        WatchMessage::Progress { revision } => {
                            self.open.remove(&watch_id);
                            if flags.2 {
                                self.pending.push(Pending::message(
                                    pb::WatchResponse {
                                        header: Some(header(revision)),
                                        watch_id,
                                        ..Default::default()
                                    },
                                    watch_id,
                                ));
                            }
                        }
                        WatchMessage::Canceled(reason) => {
                            self.open.remove(&watch_id);
                            self.watches.remove(&watch_id);
                            let resp = self.engine_cancel(watch_id, reason);
                            self.pending.push(Pending::message(resp, watch_id));
                        }
                        // WatchMessage is #[non_exhaustive]: a new kind is not for clients
                        // until mapped.
                        #[allow(unreachable_patterns)]
                        _ => {}
                    }
                }
                OutboxItem::Progress { revision } => {
                    if let Err(g) = self.flush().await {
                        result = Err(g);
                        break;
                    }
                    let resp = pb::WatchResponse {
                        header: Some(header(revision)),
                        watch_id: -1,
                        ..Default::default()
                    };
                    if let Err(g) = self.send(resp).await {
                        result = Err(g);
                        break;
                    }
                }
                // OutboxItem is #[non_exhaustive].
                #[allow(unreachable_patterns)]
                _ => {}
            }
        }
        items.clear();
        self.items = items;
        result?;
        self.flush().await?;
        self.commit().await
    }

    /// Adds one revision of watch `watch_id` to its open response, or opens a new one when
    /// merging would pass the caps.
    fn add_events(
        &mut self,
        watch_id: i64,
        prev_kv: bool,
        fragment: bool,
        batch: &EventBatch,
        compacted: Revision,
    ) {
        // etcd reads prev_kv at `revision - 1`, which is gone when that is below the
        // compaction revision: then it sends no prev_kv (the log still has it).
        let prev_kv = prev_kv && batch.revision() > compacted;
        let live = (!batch.is_catch_up()).then(|| batch.revision());
        let cap = self.settings.max_request_bytes;
        wire::encoded(batch.change_set(), prev_kv, |enc| {
            if let Some(&i) = self.open.get(&watch_id) {
                let p = &mut self.pending[i];
                let add = enc.picked_len(batch.picked());
                if p.revisions < MAX_MERGED_REVISIONS && p.resp.encoded_len() + add <= cap {
                    p.resp.push_events(enc, batch.picked());
                    p.revision = batch.revision();
                    p.revisions += 1;
                    p.live = p.live.or(live);
                    return;
                }
            }
            let mut resp = WireResponse::events(header(batch.revision()), watch_id, false);
            resp.push_events(enc, batch.picked());
            self.open.insert(watch_id, self.pending.len());
            self.pending.push(Pending {
                resp,
                watch_id,
                revision: batch.revision(),
                revisions: 1,
                fragment,
                live,
            });
        });
    }

    /// Sends every assembled response, in the order they were opened.
    async fn flush(&mut self) -> Result<(), Gone> {
        self.open.clear();
        // Taken out and put back so its capacity is reused by the next drain (a drain at
        // 10,000 watchers assembles thousands of responses; regrowing the buffers each time
        // copied them over and over).
        let mut pending = std::mem::take(&mut self.pending);
        self.batch.out.responses.reserve(pending.len());
        let mut result = Ok(());
        for p in pending.drain(..) {
            if result.is_err() {
                break;
            }
            result = self.send_pending(p).await;
        }
        self.pending = pending;
        result
    }

    async fn send_pending(&mut self, p: Pending) -> Result<(), Gone> {
        let events = p.resp.event_count();
        if events == 0 {
            return self.send_wire(p.resp, 0, None).await;
        }
        // The header of a merged response names its last revision.
        let mut resp = p.resp;
        if p.revisions > 1 {
            resp.set_header(header(p.revision), p.watch_id, false);
        }
        let limit = self.settings.max_request_bytes + GRPC_OVERHEAD_BYTES;
        if !p.fragment || resp.encoded_len() < limit || events < 2 {
            return self.send_wire(resp, events, p.live).await;
        }
        // etcd's `sendFragments`: every piece but the last has `fragment = true`; one event
        // is never split.
        let mut live = p.live;
        let mut cur = WireResponse::events(header(p.revision), p.watch_id, true);
        let parts: Vec<_> = resp.into_events().collect();
        let last = parts.len().saturating_sub(1);
        for (i, part) in parts.into_iter().enumerate() {
            if cur.event_count() > 0 && cur.encoded_len() + part.len() >= limit {
                let n = cur.event_count();
                let full = std::mem::replace(
                    &mut cur,
                    WireResponse::events(header(p.revision), p.watch_id, true),
                );
                self.send_wire(full, n, live.take()).await?;
            }
            cur.push_part(part, 1);
            if i == last {
                cur.set_header(header(p.revision), p.watch_id, false);
            }
        }
        let n = cur.event_count();
        self.send_wire(cur, n, live.take()).await
    }

    /// The response to an engine cancel, with metrics and a log line.
    fn engine_cancel(&self, watch_id: i64, reason: CancelReason) -> pb::WatchResponse {
        let mut resp = pb::WatchResponse {
            header: Some(header(self.current())),
            watch_id,
            canceled: true,
            ..Default::default()
        };
        let kind = match &reason {
            CancelReason::Compacted { .. } => CancelKind::Compacted,
            CancelReason::HistoryUnavailable { .. } => CancelKind::HistoryUnavailable,
            CancelReason::Shutdown { .. } => CancelKind::Shutdown,
            _ => CancelKind::Other,
        };
        self.metrics.canceled(kind, 1);
        tracing::debug!(watch_id, %reason, "watch canceled by the engine");
        match reason {
            CancelReason::Compacted { compact_revision } => {
                resp.header = Some(header(0));
                resp.compact_revision = to_proto::revision(compact_revision);
            }
            CancelReason::HistoryUnavailable { message, .. } => {
                resp.cancel_reason = format!("keywatch: history unavailable: {message}");
            }
            CancelReason::Shutdown { .. } => {
                resp.cancel_reason = EtcdError::Stopped.message().to_owned();
            }
            other => resp.cancel_reason = format!("keywatch: {other}"),
        }
        resp
    }
}

impl Pending {
    fn message(resp: pb::WatchResponse, watch_id: i64) -> Self {
        Self {
            resp: WireResponse::message(&resp),
            watch_id,
            revision: 0,
            revisions: 0,
            fragment: false,
            live: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kv_store::{Durability, StoreConfig};

    fn event_response(n: usize) -> WireResponse {
        WireResponse::message(&pb::WatchResponse {
            watch_id: 1,
            events: vec![Default::default(); n],
            ..Default::default()
        })
    }

    /// A store in a temporary directory and one stream over it (no task: tests drive it).
    async fn stream(
        watch_buffer: u32,
        metrics: WatchMetrics,
    ) -> (tempfile::TempDir, Store, WatchStream, WatchResponseStream) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(
            dir.path(),
            StoreConfig::default().durability(Durability::NoSync),
        )
        .await
        .unwrap();
        let (stream, responses) = WatchStream::new(
            store.clone(),
            WatchSettings {
                max_watchers_per_stream: 10,
                max_watchers_per_connection: 10,
                max_watchers_per_user: 10,
                watch_buffer,
                watch_stream_bytes: 1 << 20,
                max_request_bytes: 1 << 20,
            },
            metrics,
            Gate::off(),
            None,
        );
        (dir, store, stream, responses)
    }

    #[tokio::test]
    async fn events_are_counted_only_once_the_stream_took_them() {
        let metrics = WatchMetrics::default();
        let (_dir, store, mut stream, mut responses) = stream(16, metrics.clone()).await;
        assert!(stream.send_wire(event_response(2), 2, None).await.is_ok());
        // Assembled, not yet handed over: not counted.
        assert_eq!(metrics.sent_counts(), (0, 0));
        assert!(stream.commit().await.is_ok());
        assert!(responses.next().await.is_some());
        assert_eq!(metrics.sent_counts(), (2, 1));
        // The client is gone: the send fails and nothing is counted.
        drop(responses);
        assert!(stream.send_wire(event_response(3), 3, None).await.is_err());
        assert_eq!(metrics.sent_counts(), (2, 1));
        drop(stream);
        store.close().await.unwrap();
    }

    #[tokio::test]
    async fn a_client_that_does_not_read_stops_being_read_without_losing_the_stream() {
        let (_dir, store, mut stream, mut responses) = stream(16, WatchMetrics::default()).await;
        // Fill the outbound bound exactly.
        let big = WireResponse::message(&pb::WatchResponse {
            cancel_reason: "x".repeat(OUTBOUND_BYTES - 16),
            ..Default::default()
        });
        assert!(cost(&big) > OUTBOUND_BYTES - 32);
        stream.send_wire(big, 0, None).await.ok().unwrap();
        stream.commit().await.ok().unwrap();
        assert!(stream.budget.available_permits() < 32);
        // The next hand-over waits for the client, and completes once it reads.
        stream
            .send_wire(event_response(40), 40, None)
            .await
            .ok()
            .unwrap();
        {
            let send = stream.commit();
            tokio::pin!(send);
            assert!(futures_util::poll!(&mut send).is_pending());
            assert!(responses.next().await.is_some());
            assert!(send.await.is_ok());
        }
        assert!(responses.next().await.is_some());
        drop(stream);
        store.close().await.unwrap();
    }

    #[tokio::test]
    async fn budget_is_returned_in_steps_as_a_batch_is_taken() {
        let (_dir, store, mut stream, mut responses) = stream(16, WatchMetrics::default()).await;
        let each = cost(&event_response(1));
        for _ in 0..3 {
            stream
                .send_wire(event_response(1), 1, None)
                .await
                .ok()
                .unwrap();
        }
        // A response that does not fit beside the three hands them over first.
        let big = WireResponse::message(&pb::WatchResponse {
            cancel_reason: "x".repeat(OUTBOUND_BYTES - 16),
            ..Default::default()
        });
        let big_cost = cost(&big);
        stream.send_wire(big, 0, None).await.ok().unwrap();
        assert_eq!(stream.budget.available_permits(), OUTBOUND_BYTES - 3 * each);
        assert_eq!(stream.batch.out.responses.len(), 1);
        assert!(responses.next().await.is_some());
        assert!(responses.next().await.is_some());
        assert_eq!(stream.budget.available_permits(), OUTBOUND_BYTES - 3 * each);
        assert!(responses.next().await.is_some());
        assert_eq!(stream.budget.available_permits(), OUTBOUND_BYTES);
        stream.commit().await.ok().unwrap();
        assert_eq!(stream.budget.available_permits(), OUTBOUND_BYTES - big_cost);
        assert!(responses.next().await.is_some());
        assert_eq!(stream.budget.available_permits(), OUTBOUND_BYTES);
        // Twenty 16 KiB responses: budget comes back every RETURN_BYTES, not only at the end.
        let mid = || {
            WireResponse::message(&pb::WatchResponse {
                cancel_reason: "y".repeat(16 << 10),
                ..Default::default()
            })
        };
        let mid_cost = cost(&mid());
        for _ in 0..20 {
            stream.send_wire(mid(), 0, None).await.ok().unwrap();
        }
        stream.commit().await.ok().unwrap();
        let steps = RETURN_BYTES.div_ceil(mid_cost);
        for _ in 0..steps - 1 {
            assert!(responses.next().await.is_some());
        }
        assert_eq!(
            stream.budget.available_permits(),
            OUTBOUND_BYTES - 20 * mid_cost
        );
        assert!(responses.next().await.is_some());
        assert_eq!(
            stream.budget.available_permits(),
            OUTBOUND_BYTES - (20 - steps) * mid_cost
        );
        for _ in steps..20 {
            assert!(responses.next().await.is_some());
        }
        assert_eq!(stream.budget.available_permits(), OUTBOUND_BYTES);
        drop(stream);
        store.close().await.unwrap();
    }

    fn decode(resp: WireResponse) -> pb::WatchResponse {
        use prost::Message;
        pb::WatchResponse::decode(resp.to_bytes()).unwrap()
    }

    #[tokio::test]
    async fn revisions_waiting_for_one_watch_go_out_in_one_response() {
        let (_dir, store, mut stream, mut responses) = stream(64, WatchMetrics::default()).await;
        for (id, key) in [(5, "a"), (6, "b")] {
            let create = pb::WatchRequest {
                request_union: Some(pb::watch_request::RequestUnion::CreateRequest(
                    pb::WatchCreateRequest {
                        key: key.into(),
                        watch_id: id,
                        prev_kv: true,
                        ..Default::default()
                    },
                )),
            };
            assert!(stream.on_request(&create).await.is_ok());
            assert!(decode(responses.next().await.unwrap().unwrap()).created);
        }
        // Five revisions for watch 5 and one for watch 6 wait while the stream does not drain.
        for v in 0..5 {
            store
                .put("a", format!("v{v}"), Default::default())
                .await
                .unwrap();
        }
        store.put("b", "x", Default::default()).await.unwrap();
        stream.outbox.request_progress();
        while !stream
            .items
            .iter()
            .any(|i| matches!(i, OutboxItem::Progress { .. }))
        {
            stream.outbox.drain(&mut stream.items, usize::MAX).await;
        }
        assert!(stream.deliver().await.is_ok());
        let merged = decode(responses.next().await.unwrap().unwrap());
        assert_eq!(merged.watch_id, 5);
        let revs: Vec<i64> = merged
            .events
            .iter()
            .map(|e| e.kv.as_ref().unwrap().mod_revision)
            .collect();
        assert_eq!(revs, [2, 3, 4, 5, 6]);
        // The header names the last revision; prev_kv is shared-encoded per variant.
        assert_eq!(merged.header.unwrap().revision, 6);
        assert_eq!(&merged.events[1].prev_kv.as_ref().unwrap().value[..], b"v0");
        let other = decode(responses.next().await.unwrap().unwrap());
        assert_eq!((other.watch_id, other.events.len()), (6, 1));
        // The progress answer follows every event it covers.
        let progress = decode(responses.next().await.unwrap().unwrap());
        assert_eq!(
            (progress.watch_id, progress.header.unwrap().revision),
            (-1, 7)
        );
        drop(stream);
        store.close().await.unwrap();
    }
}

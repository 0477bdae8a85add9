//! The Watch service: one task per client stream multiplexes every watch of the stream.
//!
//! The task owns the stream's watch handles (in one [`SelectAll`]), reads client requests and
//! writes responses into a bounded channel that tonic drains to the client. Because one task
//! does everything, ordering holds by construction:
//! - a create is answered (`created`) before its handle joins the set, so no event precedes it;
//! - creates, cancels and progress requests are answered in request order;
//! - a cancel drops the handle before the `canceled` reply, so no event follows it;
//! - a manual progress request asks every handle for a progress message, which the engine
//!   orders after that watcher's events; the stream's single `watch_id = -1` reply is sent once
//!   every watcher answered, so it follows every event it covers.
//!
//! A watcher catching up from history (a past start revision, or a queue that filled) gets its
//! consecutive catch-up revisions merged into one response, up to 1000 revisions or
//! `max_request_bytes` of payload, as etcd batches its unsynced watchers; live revisions keep
//! one response each, as etcd's synced watchers do.
//!
//! Memory is bounded: the outbound channel holds [`OUTBOUND_DEPTH`] responses, and each
//! watcher's engine queue holds `watch_buffer` batches. When the client stops reading, sends
//! block, the queues fill, and the engine stops pushing and later catches the watchers up from
//! the event log.

use std::collections::{HashMap, HashSet};
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use futures_util::StreamExt;
use futures_util::stream::SelectAll;
use prost::Message;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use watch_core::{CancelReason, EventBatch, Revision, WatchHandle, WatchMessage};
use watch_proto::etcdserverpb as pb;
use watch_proto::from_proto::{self, WatchCommand};
use watch_proto::status::{EtcdError, from_convert_error};
use watch_proto::{ConvertError, to_proto};

use super::convert::{header, store_status};
use super::metrics::{CancelKind, WatchMetrics};
use crate::auth::{Gate, Perm, token_of};
use kv_store::Store;
use kv_store::StoreError;
use tracing::Instrument;

/// Responses buffered per stream between its task and the client.
pub const OUTBOUND_DEPTH: usize = 32;

/// gRPC overhead etcd adds to `--max-request-bytes` for its receive limit and for the size at
/// which watch responses are fragmented (512 KiB).
pub const GRPC_OVERHEAD_BYTES: usize = 512 * 1024;

/// Settings of the watch service.
#[derive(Debug, Clone)]
pub struct WatchSettings {
    /// Most watches on one stream; a create beyond it is refused (created + canceled).
    pub max_watchers_per_stream: usize,
    /// Engine queue size of each watcher, in revisions.
    pub watch_buffer: u32,
    /// etcd `--max-request-bytes`; responses of fragment-enabled watches are split at this
    /// plus [`GRPC_OVERHEAD_BYTES`].
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
}

/// etcd's metadata key (value `true`) asking that a stream fail while the member has no
/// leader (clientv3 `WithRequireLeader`).
const REQUIRE_LEADER_KEY: &str = "hasleader";

impl WatchService {
    /// The service; streams end when `shutdown` turns true.
    pub fn new(store: Store, settings: WatchSettings, shutdown: watch::Receiver<bool>) -> Self {
        Self {
            store,
            settings,
            shutdown,
            metrics: WatchMetrics::default(),
            leader: None,
            gate: Gate::off(),
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

type WatchResponseStream = ReceiverStream<Result<pb::WatchResponse, Status>>;

#[tonic::async_trait]
impl pb::watch_server::Watch for WatchService {
    type WatchStream = WatchResponseStream;

    async fn watch(
        &self,
        request: Request<Streaming<pb::WatchRequest>>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let peer = request.remote_addr();
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
        let (tx, rx) = mpsc::channel(OUTBOUND_DEPTH);
        let stream = WatchStream {
            store: self.store.clone(),
            settings: self.settings.clone(),
            out: tx,
            watches: SelectAll::new(),
            meta: HashMap::new(),
            next_id: 0,
            progress: None,
            metrics: self.metrics.clone(),
            gate: self.gate.clone(),
            token,
        };
        let span = tracing::debug_span!("watch_stream", peer = peer.map(tracing::field::display));
        tokio::spawn(
            stream
                .run(inbound, self.shutdown.clone(), leader)
                .instrument(span),
        );
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// Most revisions merged into one response, etcd's `watchBatchMaxRevs`.
const MAX_MERGED_REVISIONS: usize = 1000;

/// What a [`Slot`] yields: one engine message, or consecutive catch-up batches merged into one
/// response (etcd sends an unsynced watcher's backlog in multi-revision responses; live
/// revisions keep one response each, as etcd's synced watchers do).
enum Delivery {
    Message(WatchMessage),
    CatchUp(Vec<EventBatch>),
}

/// One watch in the stream's [`SelectAll`]. `handle` is taken to cancel the watch; the saved
/// waker then lets `SelectAll` poll the slot once more so it drops out of the set.
struct Slot {
    id: i64,
    handle: Option<WatchHandle>,
    waker: Option<Waker>,
    /// A message read while merging that did not belong in the merge; yielded next. Boxed:
    /// rarely set, and a slot exists per watcher.
    held: Option<Box<WatchMessage>>,
    /// Payload bytes a merged response may reach (one batch alone may exceed it).
    merge_bytes: u32,
}

impl futures_core::Stream for Slot {
    type Item = (i64, Delivery);

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        let Some(handle) = this.handle.as_mut() else {
            this.held = None;
            return Poll::Ready(None);
        };
        let first = match this.held.take() {
            Some(m) => *m,
            None => match handle.poll_recv(cx) {
                Poll::Ready(Some(m)) => m,
                Poll::Ready(None) => {
                    this.handle = None;
                    return Poll::Ready(None);
                }
                Poll::Pending => {
                    this.waker = Some(cx.waker().clone());
                    return Poll::Pending;
                }
            },
        };
        let WatchMessage::Events(batch) = first else {
            return Poll::Ready(Some((this.id, Delivery::Message(first))));
        };
        if !batch.is_catch_up() {
            return Poll::Ready(Some((
                this.id,
                Delivery::Message(WatchMessage::Events(batch)),
            )));
        }
        let mut bytes = batch.payload_len();
        let mut merged = vec![batch];
        while merged.len() < MAX_MERGED_REVISIONS {
            match handle.try_recv() {
                Some(WatchMessage::Events(next))
                    if next.is_catch_up()
                        && bytes + next.payload_len() <= this.merge_bytes as usize =>
                {
                    bytes += next.payload_len();
                    merged.push(next);
                }
                Some(other) => {
                    this.held = Some(Box::new(other));
                    break;
                }
                None => break,
            }
        }
        Poll::Ready(Some((this.id, Delivery::CatchUp(merged))))
    }
}

/// Per-watch flags the responses need.
#[derive(Debug, Clone, Copy)]
struct Meta {
    prev_kv: bool,
    fragment: bool,
    progress_notify: bool,
}

/// A manual progress request waiting for every watcher to report.
struct ProgressRound {
    waiting: HashSet<i64>,
    /// Lowest revision reported so far: every watcher is complete through it.
    revision: Revision,
}

/// The client went away (the outbound channel closed): end the stream task.
struct Gone;

struct WatchStream {
    store: Store,
    settings: WatchSettings,
    out: mpsc::Sender<Result<pb::WatchResponse, Status>>,
    watches: SelectAll<Slot>,
    meta: HashMap<i64, Meta>,
    next_id: i64,
    progress: Option<ProgressRound>,
    metrics: WatchMetrics,
    gate: Gate,
    /// The `token` metadata of the stream's request.
    token: Option<String>,
}

impl WatchStream {
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
            if !client_open && self.meta.is_empty() {
                // Half-closed and nothing left to watch: nothing more can happen.
                break;
            }
            let step = tokio::select! {
                req = inbound.next(), if client_open => match req {
                    Some(Ok(req)) => self.on_request(&req).await,
                    Some(Err(status)) => {
                        tracing::debug!(%status, "watch stream receive error");
                        break;
                    }
                    // The client half-closed; keep streaming, as etcd does.
                    None => {
                        client_open = false;
                        Ok(())
                    }
                },
                Some((id, delivery)) = self.watches.next(), if !self.watches.is_empty() => {
                    match delivery {
                        Delivery::Message(msg) => self.on_message(id, msg).await,
                        Delivery::CatchUp(batches) => self.on_catch_up(id, &batches).await,
                    }
                }
                _ = self.out.closed() => break,
                _ = async {
                    match &mut leader {
                        Some(l) => drop(l.wait_for(|s| !s.is_connected()).await),
                        None => std::future::pending().await,
                    }
                } => {
                    // A `hasleader` stream on a mirror that lost its upstream: etcd ends such
                    // a stream with "no leader" when the member loses its leader.
                    let _ = self.out.send(Err(EtcdError::NoLeader.status())).await;
                    break;
                }
                _ = async { drop(shutdown.wait_for(|s| *s).await) } => {
                    // The server is stopping: end the stream with a status clients retry on
                    // (etcd's "server stopped", UNAVAILABLE), not a silent OK.
                    // A client not reading keeps this waiting until the transport is cut
                    // (`--shutdown-timeout`), which fails the send and ends the task.
                    let _ = self.out.send(Err(EtcdError::Stopped.status())).await;
                    break;
                }
            };
            if step.is_err() {
                break;
            }
        }
        if !self.meta.is_empty() {
            self.metrics
                .canceled(CancelKind::StreamClosed, self.meta.len() as u64);
        }
        tracing::debug!(watches = self.meta.len(), "watch stream ended");
    }

    async fn send(&self, resp: pb::WatchResponse) -> Result<(), Gone> {
        self.out.send(Ok(resp)).await.map_err(|_| Gone)
    }

    /// Sends a response carrying events (one fragment counts as one response), counting it
    /// only once the stream took it: the slot is reserved first (fails if the client is
    /// gone, then nothing is counted), and the count is made before the response becomes
    /// readable, so a client that saw the events also sees them counted. `live` is the
    /// revision of a live (not catch-up) response, whose publish-to-send time is observed.
    async fn send_events(
        &self,
        resp: pb::WatchResponse,
        live: Option<Revision>,
    ) -> Result<(), Gone> {
        let permit = self.out.reserve().await.map_err(|_| Gone)?;
        self.metrics.sent(resp.events.len());
        if let Some(elapsed) = live.and_then(|r| self.store.publish_elapsed(r)) {
            self.metrics.publish_to_send(elapsed);
        }
        permit.send(Ok(resp));
        Ok(())
    }

    fn current(&self) -> Revision {
        self.store.durable_revision()
    }

    /// `created + canceled` with `watch_id = -1`: etcd's answer to a create it refuses.
    async fn refuse(&self, reason: &str) -> Result<(), Gone> {
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
    /// could report.
    fn watch_permission(&self, c: &pb::WatchCreateRequest) -> Result<(), EtcdError> {
        // Resolved at each create: a token invalidated, or a permission revoked, since the
        // stream opened refuses the next create.
        let Some(caller) = self.gate.caller_for(self.token.as_deref())? else {
            return Ok(());
        };
        // An empty key means "\0" for a watch, as in etcd.
        let key: &[u8] = if c.key.is_empty() { b"\0" } else { &c.key };
        caller.check(Perm::Read, key, &c.range_end)
    }

    async fn on_request(&mut self, req: &pb::WatchRequest) -> Result<(), Gone> {
        if let Some(pb::watch_request::RequestUnion::CreateRequest(c)) = &req.request_union
            && let Err(e) = self.watch_permission(c)
        {
            // etcd's answer: created + canceled, with Go's rendering of its gRPC error
            // (permission denied, user name is empty, invalid auth token) as the reason.
            return self.refuse(&e.go_status_text()).await;
        }
        match from_proto::watch_request(req) {
            Ok(WatchCommand::Create(c)) => self.create(c).await,
            Ok(WatchCommand::Cancel { watch_id }) => self.cancel(watch_id).await,
            Ok(WatchCommand::Progress) => {
                self.request_progress();
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

    async fn create(&mut self, c: from_proto::WatchCreate) -> Result<(), Gone> {
        let id = if c.watch_id != 0 {
            // -1 marks stream-wide replies (progress, refused creates); a client-chosen
            // negative id would be indistinguishable from them.
            if c.watch_id < 0 {
                return self.refuse("keywatch: watch_id must not be negative").await;
            }
            if self.meta.contains_key(&c.watch_id) {
                return self.refuse(EtcdError::DuplicateWatchId.message()).await;
            }
            c.watch_id
        } else {
            while self.meta.contains_key(&self.next_id) {
                self.next_id += 1;
            }
            self.next_id += 1;
            self.next_id - 1
        };
        if self.meta.len() >= self.settings.max_watchers_per_stream {
            let reason = format!(
                "keywatch: too many watches on this stream (the limit is {})",
                self.settings.max_watchers_per_stream
            );
            return self.refuse(&reason).await;
        }
        let options = c.options.buffer(self.settings.watch_buffer.max(1));
        match self.store.watch(c.selector, options) {
            Ok(handle) => {
                tracing::debug!(
                    watch_id = id,
                    revision = handle.created_revision(),
                    "watch created"
                );
                self.send(pb::WatchResponse {
                    header: Some(header(handle.created_revision())),
                    watch_id: id,
                    created: true,
                    ..Default::default()
                })
                .await?;
                self.meta.insert(
                    id,
                    Meta {
                        prev_kv: options.prev_kv,
                        fragment: c.fragment,
                        progress_notify: options.progress_notify,
                    },
                );
                self.watches.push(Slot {
                    id,
                    handle: Some(handle),
                    waker: None,
                    held: None,
                    merge_bytes: u32::try_from(self.settings.max_request_bytes).unwrap_or(u32::MAX),
                });
                Ok(())
            }
            Err(StoreError::Compacted { compacted, .. }) => {
                self.metrics.canceled(CancelKind::Compacted, 1);
                tracing::debug!(watch_id = id, compacted, "watch start revision compacted");
                // etcd: the watch is created, then canceled with the compaction revision (and a
                // header whose revision is 0).
                self.send(pb::WatchResponse {
                    header: Some(header(self.current())),
                    watch_id: id,
                    created: true,
                    ..Default::default()
                })
                .await?;
                self.send(pb::WatchResponse {
                    header: Some(header(0)),
                    watch_id: id,
                    canceled: true,
                    compact_revision: to_proto::revision(compacted),
                    ..Default::default()
                })
                .await
            }
            Err(e) => self.refuse(store_status(&e).message()).await,
        }
    }

    /// Drops the watch's handle (its engine registration ends now); true if it existed.
    fn drop_watch(&mut self, id: i64) -> bool {
        if self.meta.remove(&id).is_none() {
            return false;
        }
        for slot in self.watches.iter_mut() {
            if slot.id == id && slot.handle.is_some() {
                slot.handle = None;
                if let Some(w) = slot.waker.take() {
                    w.wake();
                }
            }
        }
        true
    }

    async fn cancel(&mut self, id: i64) -> Result<(), Gone> {
        if !self.drop_watch(id) {
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
        .await?;
        self.progress_done(id).await
    }

    fn request_progress(&mut self) {
        if self.meta.is_empty() {
            // etcd: no response on a stream without watchers.
            return;
        }
        // A new request restarts the round: a watcher that cannot answer yet (catching up, or
        // waiting for a future start revision) holds the reply back, as etcd drops the request
        // until every watcher is synced, and the client asks again.
        let mut waiting = HashSet::with_capacity(self.meta.len());
        for slot in self.watches.iter() {
            if let Some(h) = &slot.handle {
                h.request_progress();
                waiting.insert(slot.id);
            }
        }
        self.progress = Some(ProgressRound {
            waiting,
            revision: Revision::MAX,
        });
    }

    /// Removes `id` from the pending progress round and sends the round's reply if it was the
    /// last one missing.
    async fn progress_done(&mut self, id: i64) -> Result<(), Gone> {
        let Some(round) = &mut self.progress else {
            return Ok(());
        };
        if !round.waiting.remove(&id) || !round.waiting.is_empty() {
            return Ok(());
        }
        let revision = if round.revision == Revision::MAX {
            self.current()
        } else {
            round.revision
        };
        self.progress = None;
        self.send(pb::WatchResponse {
            header: Some(header(revision)),
            watch_id: -1,
            ..Default::default()
        })
        .await
    }

    /// Sends consecutive catch-up batches of one watch as one response (fragmented when the
    /// watch allows it), each event with prev_kv only where etcd would have it.
    async fn on_catch_up(&mut self, id: i64, batches: &[EventBatch]) -> Result<(), Gone> {
        let (Some(meta), Some(last)) = (self.meta.get(&id).copied(), batches.last()) else {
            return Ok(());
        };
        let compacted = self.store.compacted_revision();
        let events = batches
            .iter()
            .flat_map(|b| to_proto::batch_events(b, meta.prev_kv && b.revision() > compacted))
            .collect();
        let resp = pb::WatchResponse {
            header: Some(header(last.revision())),
            watch_id: id,
            events,
            ..Default::default()
        };
        if meta.fragment {
            self.send_fragments(resp, None).await
        } else {
            self.send_events(resp, None).await
        }
    }

    async fn on_message(&mut self, id: i64, msg: WatchMessage) -> Result<(), Gone> {
        let Some(meta) = self.meta.get(&id).copied() else {
            // A message that raced with a cancel: the watch is gone for the client.
            return Ok(());
        };
        match msg {
            WatchMessage::Events(batch) => {
                // etcd reads prev_kv at `revision - 1`, which is gone when that is below the
                // compaction revision: then it sends no prev_kv (the log still has it).
                let prev_kv = meta.prev_kv && batch.revision() > self.store.compacted_revision();
                let resp = to_proto::events_response(header(batch.revision()), id, &batch, prev_kv);
                let live = (!batch.is_catch_up()).then(|| batch.revision());
                if meta.fragment {
                    self.send_fragments(resp, live).await
                } else {
                    self.send_events(resp, live).await
                }
            }
            WatchMessage::Progress { revision } => {
                let in_round = self
                    .progress
                    .as_ref()
                    .is_some_and(|r| r.waiting.contains(&id));
                if in_round {
                    if let Some(r) = &mut self.progress {
                        r.revision = r.revision.min(revision);
                    }
                    return self.progress_done(id).await;
                }
                if !meta.progress_notify {
                    return Ok(());
                }
                self.send(pb::WatchResponse {
                    header: Some(header(revision)),
                    watch_id: id,
                    ..Default::default()
                })
                .await
            }
            WatchMessage::Canceled(reason) => {
                self.meta.remove(&id);
                let mut resp = pb::WatchResponse {
                    header: Some(header(self.current())),
                    watch_id: id,
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
                tracing::debug!(watch_id = id, %reason, "watch canceled by the engine");
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
                self.send(resp).await?;
                self.progress_done(id).await
            }
            // WatchMessage is #[non_exhaustive]: a new kind is not for clients until mapped.
            #[allow(unreachable_patterns)]
            _ => Ok(()),
        }
    }

    /// etcd's `sendFragments`: a response of 2+ events whose encoded size reaches the limit is
    /// split; every piece but the last has `fragment = true`; one event is never split.
    /// `live`: as for [`WatchStream::send_events`], observed with the first fragment.
    async fn send_fragments(
        &self,
        resp: pb::WatchResponse,
        mut live: Option<Revision>,
    ) -> Result<(), Gone> {
        let limit = self.settings.max_request_bytes + GRPC_OVERHEAD_BYTES;
        if resp.encoded_len() < limit || resp.events.len() < 2 {
            return self.send_events(resp, live).await;
        }
        let mut events = resp.events.into_iter().peekable();
        let base = pb::WatchResponse {
            events: Vec::new(),
            fragment: true,
            ..resp
        };
        while events.peek().is_some() {
            let mut cur = base.clone();
            let mut size = cur.encoded_len();
            while let Some(ev) = events.peek() {
                // Tag (1 byte) + length prefix + the event.
                let len = ev.encoded_len();
                let add = 1 + prost::length_delimiter_len(len) + len;
                if !cur.events.is_empty() && size + add >= limit {
                    break;
                }
                size += add;
                if let Some(ev) = events.next() {
                    cur.events.push(ev);
                }
            }
            cur.fragment = events.peek().is_some();
            self.send_events(cur, live.take()).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kv_store::{Durability, StoreConfig};

    fn event_response(n: usize) -> pb::WatchResponse {
        pb::WatchResponse {
            watch_id: 1,
            events: vec![Default::default(); n],
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn events_are_counted_only_once_the_stream_took_them() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(
            dir.path(),
            StoreConfig::default().durability(Durability::NoSync),
        )
        .await
        .unwrap();
        let (tx, mut rx) = mpsc::channel(1);
        let metrics = WatchMetrics::default();
        let stream = WatchStream {
            store: store.clone(),
            settings: WatchSettings {
                max_watchers_per_stream: 10,
                watch_buffer: 16,
                max_request_bytes: 1 << 20,
            },
            out: tx,
            watches: SelectAll::new(),
            meta: HashMap::new(),
            next_id: 0,
            progress: None,
            metrics: metrics.clone(),
            gate: Gate::off(),
            token: None,
        };
        assert!(stream.send_events(event_response(2), None).await.is_ok());
        assert!(rx.recv().await.is_some());
        assert_eq!(metrics.sent_counts(), (2, 1));
        // The client is gone: the send fails and nothing is counted.
        drop(rx);
        assert!(stream.send_events(event_response(3), None).await.is_err());
        assert_eq!(metrics.sent_counts(), (2, 1));
        drop(stream);
        store.close().await.unwrap();
    }
}

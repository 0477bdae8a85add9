//! etcd's Lock (`v3lockpb.Lock`) and Election (`v3electionpb.Election`) services, with the
//! server-side semantics of etcd's `v3lock` and `v3election` (which run clientv3's
//! `concurrency` recipes in process), built on the store's lease, txn, range and watch calls:
//!
//! - A lock or candidacy is the key `<name>/<lease ID, lowercase hex>`, attached to the
//!   caller's lease (lease 0: the server grants a 60 s lease and never keeps it alive). The
//!   holder is the key under `<name>/` with the lowest create revision; a waiter watches only
//!   its predecessor (the newest key created before its own) until that key is deleted, then
//!   looks again. Lease expiry deletes the key, so it releases a lock or leadership.
//! - A caller that goes away while waiting has its key deleted (Lock) or resigns (Campaign),
//!   as etcd does.
//! - Every error is answered with code Unknown and etcd's message, as etcd's in-process client
//!   turns them into plain errors (measured: "etcdserver: requested lease not found",
//!   "election: not leader", "election: no leader", code 2).
//! - Every request passes [`super::admit`]: the size limit, then, with authentication on, the
//!   caller needs what the recipe's KV calls need: read on
//!   `<name>/` and write on its key (Lock, Campaign), write on the key (Unlock, Resign,
//!   Proclaim), read on `<name>/` (Leader, Observe).

use std::pin::Pin;

use bytes::Bytes;
use futures_core::Stream;
use kv_store::{
    Compare, CompareOp, CompareTarget, KeyRange, PutOptions, RangeRequest, SortOrder, SortTarget,
    Store, StoreError, TxnOp, TxnOpResult, TxnRequest,
};
use tokio::sync::mpsc;
use tonic::{Request, Response, Status};
use watch_core::{
    CancelReason, EventKind, KeySelector, KeyValue, Revision, WatchMessage, WatchOptions,
};
use watch_proto::status::EtcdError;
use watch_proto::to_proto;
use watch_proto::v3electionpb as epb;
use watch_proto::v3lockpb as lpb;

use super::admit::Admission;
use super::convert::{header, store_status};
use crate::auth::{Gate, Perm};

/// TTL of the lease the server grants for a Lock or Campaign sent with lease 0 (clientv3's
/// default session TTL), in seconds. It is never kept alive.
pub const SESSION_TTL: i64 = 60;

/// etcd's `ErrElectionNotLeader`.
const NOT_LEADER: &str = "election: not leader";
/// etcd's `ErrElectionNoLeader`.
const NO_LEADER: &str = "election: no leader";
/// etcd's `ErrMissingLeaderKey`.
const MISSING_LEADER: &str = "\"leader\" field must be provided";
/// clientv3's `waitDelete` when its watch ends without the delete.
const LOST_WATCHER: &str = "lost watcher waiting for delete";

/// What the Lock and Election services share: the store, the admission checks and the
/// shutdown signal (waits and Observe streams end with "etcdserver: server stopped").
#[derive(Debug, Clone)]
struct Recipes {
    store: Store,
    admit: Admission,
    shutdown: tokio::sync::watch::Receiver<bool>,
}

/// Any error as the in-process client returns it: code Unknown, the message kept.
fn unknown(status: Status) -> Status {
    Status::unknown(status.message().to_owned())
}

fn store_err(e: &StoreError) -> Status {
    unknown(store_status(e))
}

/// `<name>/`.
fn prefix_of(name: &[u8]) -> Bytes {
    let mut p = Vec::with_capacity(name.len() + 1);
    p.extend_from_slice(name);
    p.push(b'/');
    p.into()
}

/// `<prefix><lease ID as lowercase hex>` (Go's `%x` of the lease ID).
fn key_of(prefix: &[u8], lease: i64) -> Bytes {
    let mut k = prefix.to_vec();
    k.extend_from_slice(format!("{lease:x}").as_bytes());
    k.into()
}

/// Deletes a waiter's key if the call is dropped (the client went away) before it
/// succeeded: a lock waiter's key (Lock), or a candidacy still at its create revision
/// (Campaign's resign).
struct Abandon {
    store: Option<Store>,
    key: Bytes,
    /// `Some(rev)`: delete only while the key's create revision is `rev`.
    rev: Option<i64>,
}

impl Abandon {
    fn disarm(mut self) {
        self.store = None;
    }
}

impl Drop for Abandon {
    fn drop(&mut self) {
        let Some(store) = self.store.take() else {
            return;
        };
        let (key, rev) = (self.key.clone(), self.rev);
        // Dropped outside a runtime only at process exit, where the lease expiry cleans up.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let result = match rev {
                    None => store
                        .delete_range(KeyRange::key(key), false)
                        .await
                        .map(drop),
                    Some(rev) => store.txn(resign_txn(key, rev)).await.map(drop),
                };
                if let Err(e) = result {
                    tracing::debug!(error = %e, "releasing an abandoned lock or campaign key");
                }
            });
        }
    }
}

/// `if create_revision(key) == rev then delete(key)`.
fn resign_txn(key: Bytes, rev: i64) -> TxnRequest {
    TxnRequest {
        compare: vec![Compare {
            range: KeyRange::key(key.clone()),
            target: CompareTarget::CreateRevision(rev),
            op: CompareOp::Equal,
        }],
        success: vec![TxnOp::Delete {
            range: KeyRange::key(key),
            prev_kv: false,
        }],
        failure: Vec::new(),
    }
}

/// clientv3's `WithFirstCreate` (or `WithLastCreate`) over `prefix`: the oldest (newest) key.
fn by_create(prefix: &Bytes, order: SortOrder) -> RangeRequest {
    RangeRequest::new(KeyRange::prefix(prefix.clone()))
        .sort(order, SortTarget::Create)
        .limit(1)
}

fn range_kvs(r: Option<&TxnOpResult>) -> &[KeyValue] {
    match r {
        Some(TxnOpResult::Range(r)) => &r.kvs,
        _ => &[],
    }
}

impl Recipes {
    /// The session lease: the caller's, or a new one of [`SESSION_TTL`] for lease 0.
    async fn session(&self, lease: i64) -> Result<i64, Status> {
        if lease != 0 {
            return Ok(lease);
        }
        self.store
            .lease_grant(0, SESSION_TTL)
            .await
            .map(|g| g.id)
            .map_err(|e| store_err(&e))
    }

    /// The admission checks (size, then the permissions the recipe's KV calls need), as
    /// the in-process client reports them.
    fn check<T: prost::Message>(
        &self,
        request: &Request<T>,
        checks: &[(Perm, &[u8], &[u8])],
    ) -> Result<(), Status> {
        self.admit.recipe(request, checks).map_err(unknown)
    }

    /// `perms` on every key under `<name>/` (what the recipe's ranges and puts there need).
    fn check_names<T: prost::Message>(
        &self,
        request: &Request<T>,
        name: &[u8],
        perms: &[Perm],
    ) -> Result<(), Status> {
        let range = KeyRange::prefix(prefix_of(name));
        let checks: Vec<_> = perms
            .iter()
            .map(|p| (*p, &range.key[..], &range.range_end[..]))
            .collect();
        self.check(request, &checks)
    }

    /// clientv3's `waitDeletes`: until no key under `prefix` has a create revision at most
    /// `max_create_rev`, waits for the newest such key to be deleted. Returns the revision
    /// of the last range.
    async fn wait_deletes(
        &self,
        prefix: &Bytes,
        max_create_rev: Revision,
    ) -> Result<Revision, Status> {
        loop {
            let mut req = by_create(prefix, SortOrder::Descend);
            req.max_create_revision = max_create_rev;
            let r = self.store.range(req).await.map_err(|e| store_err(&e))?;
            let Some(last) = r.kvs.first() else {
                return Ok(r.revision);
            };
            self.wait_delete(last.key.clone(), r.revision).await?;
        }
    }

    /// clientv3's `waitDelete`: watches `key` from `rev` until it is deleted.
    async fn wait_delete(&self, key: Bytes, rev: Revision) -> Result<(), Status> {
        let mut watch = self
            .store
            .watch(
                KeySelector::key(key),
                WatchOptions::default().start_revision(rev),
            )
            .map_err(|e| store_err(&e))?;
        let mut shutdown = self.shutdown.clone();
        loop {
            let msg = tokio::select! {
                m = watch.recv() => m,
                _ = shutdown.wait_for(|s| *s) => return Err(unknown(EtcdError::Stopped.status())),
            };
            match msg {
                Some(WatchMessage::Events(batch)) => {
                    if batch.events().any(|e| e.kind == EventKind::Delete) {
                        return Ok(());
                    }
                }
                Some(WatchMessage::Canceled(CancelReason::Compacted { .. })) => {
                    return Err(unknown(EtcdError::Compacted.status()));
                }
                Some(WatchMessage::Canceled(_)) | None => {
                    return Err(Status::unknown(LOST_WATCHER));
                }
                Some(_) => {}
            }
        }
    }

    /// etcd's `Mutex.Lock`: returns the key and the revision of the header to answer with.
    async fn lock(&self, name: &[u8], lease: i64) -> Result<(Bytes, Revision), Status> {
        let prefix = prefix_of(name);
        let key = key_of(&prefix, lease);
        let owner = TxnOp::Range(by_create(&prefix, SortOrder::Ascend));
        let resp = self
            .store
            .txn(TxnRequest {
                compare: vec![Compare {
                    range: KeyRange::key(key.clone()),
                    target: CompareTarget::CreateRevision(0),
                    op: CompareOp::Equal,
                }],
                success: vec![
                    TxnOp::Put {
                        key: key.clone(),
                        value: Bytes::new(),
                        options: PutOptions::default().lease(lease),
                    },
                    owner.clone(),
                ],
                failure: vec![TxnOp::Range(RangeRequest::key(key.clone())), owner],
            })
            .await
            .map_err(|e| store_err(&e))?;
        let my_rev = if resp.succeeded {
            resp.revision
        } else {
            range_kvs(resp.responses.first())
                .first()
                .map_or(resp.revision, |kv| kv.create_revision)
        };
        let holder = range_kvs(resp.responses.get(1)).first();
        if holder.is_none_or(|kv| kv.create_revision == my_rev) {
            return Ok((key, resp.revision));
        }
        let abandon = Abandon {
            store: Some(self.store.clone()),
            key: key.clone(),
            rev: None,
        };
        match self.wait_deletes(&prefix, my_rev.saturating_sub(1)).await {
            Ok(rev) => {
                abandon.disarm();
                Ok((key, rev))
            }
            // As etcd: a failed wait releases the key (the guard's drop does it).
            Err(e) => Err(e),
        }
    }

    /// etcd's `Election.Campaign`: returns the leader key and the txn's revision.
    async fn campaign(
        &self,
        name: &[u8],
        lease: i64,
        value: Bytes,
    ) -> Result<(epb::LeaderKey, Revision), Status> {
        let prefix = prefix_of(name);
        let key = key_of(&prefix, lease);
        let resp = self
            .store
            .txn(TxnRequest {
                compare: vec![Compare {
                    range: KeyRange::key(key.clone()),
                    target: CompareTarget::CreateRevision(0),
                    op: CompareOp::Equal,
                }],
                success: vec![TxnOp::Put {
                    key: key.clone(),
                    value: value.clone(),
                    options: PutOptions::default().lease(lease),
                }],
                failure: vec![TxnOp::Range(RangeRequest::key(key.clone()))],
            })
            .await
            .map_err(|e| store_err(&e))?;
        let mut rev = resp.revision;
        if !resp.succeeded
            && let Some(kv) = range_kvs(resp.responses.first()).first()
        {
            rev = kv.create_revision;
            if kv.value != value {
                // Already campaigning with another value: proclaim the new one.
                let wire_rev = to_proto::revision(rev);
                if let Err(e) = self.proclaim(&key, wire_rev, lease, value).await {
                    let _ = self.store.txn(resign_txn(key.clone(), wire_rev)).await;
                    return Err(e);
                }
            }
        }
        let abandon = Abandon {
            store: Some(self.store.clone()),
            key: key.clone(),
            rev: Some(to_proto::revision(rev)),
        };
        let waited = self.wait_deletes(&prefix, rev.saturating_sub(1)).await;
        // As etcd: only a caller that went away (the guard's drop) resigns; a failed wait
        // leaves the candidacy to its lease.
        abandon.disarm();
        waited?;
        Ok((
            epb::LeaderKey {
                name: Bytes::copy_from_slice(name),
                key,
                rev: to_proto::revision(rev),
                lease,
            },
            resp.revision,
        ))
    }

    /// etcd's `Election.Proclaim`: returns the txn's revision.
    async fn proclaim(
        &self,
        key: &Bytes,
        rev: i64,
        lease: i64,
        value: Bytes,
    ) -> Result<Revision, Status> {
        let resp = self
            .store
            .txn(TxnRequest {
                compare: vec![Compare {
                    range: KeyRange::key(key.clone()),
                    target: CompareTarget::CreateRevision(rev),
                    op: CompareOp::Equal,
                }],
                success: vec![TxnOp::Put {
                    key: key.clone(),
                    value,
                    options: PutOptions::default().lease(lease),
                }],
                failure: Vec::new(),
            })
            .await
            .map_err(|e| store_err(&e))?;
        if !resp.succeeded {
            return Err(Status::unknown(NOT_LEADER));
        }
        Ok(resp.revision)
    }

    /// The oldest key under `<name>/`, or "election: no leader".
    async fn leader(&self, name: &[u8]) -> Result<(KeyValue, Revision), Status> {
        let r = self
            .store
            .range(by_create(&prefix_of(name), SortOrder::Ascend))
            .await
            .map_err(|e| store_err(&e))?;
        match r.kvs.into_iter().next() {
            Some(kv) => Ok((kv, r.revision)),
            None => Err(Status::unknown(NO_LEADER)),
        }
    }

    /// etcd's `Election.observe`: sends the leader, each new value of it, and the next leader
    /// after it goes; ends when `out` is closed, the store fails or the server stops.
    async fn observe(self, name: Bytes, out: mpsc::Sender<Result<epb::LeaderResponse, Status>>) {
        let prefix = prefix_of(&name);
        let mut shutdown = self.shutdown.clone();
        let run = async {
            loop {
                let r = self
                    .store
                    .range(by_create(&prefix, SortOrder::Ascend))
                    .await
                    .map_err(|e| store_err(&e))?;
                let (kv, rev) = match r.kvs.into_iter().next() {
                    Some(kv) => (kv, r.revision),
                    // No leader: wait for the first put under the prefix.
                    None => self.first_put(&prefix, r.revision).await?,
                };
                if out.send(Ok(leader_response(&kv, rev))).await.is_err() {
                    return Ok(());
                }
                let mut watch = self
                    .store
                    .watch(
                        KeySelector::key(kv.key.clone()),
                        WatchOptions::default().start_revision(rev + 1),
                    )
                    .map_err(|e| store_err(&e))?;
                'leader: loop {
                    match watch.recv().await {
                        Some(WatchMessage::Events(batch)) => {
                            // Owned (payloads are reference-counted): the send awaits.
                            let events = batch.to_events();
                            for ev in events {
                                if ev.kind == EventKind::Delete {
                                    break 'leader;
                                }
                                let resp = leader_response(&ev.kv, batch.revision());
                                if out.send(Ok(resp)).await.is_err() {
                                    return Ok(());
                                }
                            }
                        }
                        Some(WatchMessage::Canceled(_)) | None => {
                            return Err(Status::unknown(LOST_WATCHER));
                        }
                        Some(_) => {}
                    }
                }
            }
        };
        let ended: Result<(), Status> = tokio::select! {
            r = run => r,
            _ = out.closed() => Ok(()),
            _ = shutdown.wait_for(|s| *s) => Err(EtcdError::Stopped.status()),
        };
        if let Err(e) = ended {
            let _ = out.send(Err(e)).await;
        }
    }

    /// Waits for the first put under `prefix` after `rev`.
    async fn first_put(
        &self,
        prefix: &Bytes,
        rev: Revision,
    ) -> Result<(KeyValue, Revision), Status> {
        let mut watch = self
            .store
            .watch(
                KeySelector::prefix(prefix.clone()),
                WatchOptions::default().start_revision(rev),
            )
            .map_err(|e| store_err(&e))?;
        loop {
            match watch.recv().await {
                Some(WatchMessage::Events(batch)) => {
                    if let Some(ev) = batch.events().find(|e| e.kind == EventKind::Put) {
                        return Ok((ev.kv.clone(), batch.revision()));
                    }
                }
                Some(WatchMessage::Canceled(_)) | None => {
                    return Err(Status::unknown(LOST_WATCHER));
                }
                Some(_) => {}
            }
        }
    }
}

fn leader_response(kv: &KeyValue, rev: Revision) -> epb::LeaderResponse {
    epb::LeaderResponse {
        header: Some(header(rev)),
        kv: Some(to_proto::key_value(kv)),
    }
}

/// etcd's `v3lockpb.Lock` service.
#[derive(Debug, Clone)]
pub struct LockService(Recipes);

impl LockService {
    /// The service over `store`, refusing requests larger than `max_request_bytes`; waits
    /// end with "server stopped" when `shutdown` turns true.
    pub fn new(
        store: Store,
        max_request_bytes: usize,
        shutdown: tokio::sync::watch::Receiver<bool>,
    ) -> Self {
        LockService(Recipes {
            store,
            admit: Admission::new(max_request_bytes),
            shutdown,
        })
    }

    /// Checks every request against `gate`'s users and roles.
    pub fn with_gate(mut self, gate: Gate) -> Self {
        self.0.admit = self.0.admit.with_gate(gate);
        self
    }
}

#[tonic::async_trait]
impl lpb::lock_server::Lock for LockService {
    async fn lock(
        &self,
        request: Request<lpb::LockRequest>,
    ) -> Result<Response<lpb::LockResponse>, Status> {
        let r = request.get_ref();
        self.0
            .check_names(&request, &r.name, &[Perm::Read, Perm::Write])?;
        let lease = self.0.session(r.lease).await?;
        let (key, rev) = self.0.lock(&r.name, lease).await?;
        Ok(Response::new(lpb::LockResponse {
            header: Some(header(rev)),
            key,
        }))
    }

    async fn unlock(
        &self,
        request: Request<lpb::UnlockRequest>,
    ) -> Result<Response<lpb::UnlockResponse>, Status> {
        let key = request.get_ref().key.clone();
        if key.is_empty() {
            return Err(unknown(EtcdError::EmptyKey.status()));
        }
        self.0.check(&request, &[(Perm::Write, &key, b"")])?;
        let r = self
            .0
            .store
            .delete_range(KeyRange::key(key), false)
            .await
            .map_err(|e| store_err(&e))?;
        Ok(Response::new(lpb::UnlockResponse {
            header: Some(header(r.revision)),
        }))
    }
}

/// etcd's `v3electionpb.Election` service.
#[derive(Debug, Clone)]
pub struct ElectionService(Recipes);

impl ElectionService {
    /// The service over `store`, refusing requests larger than `max_request_bytes`; waits and
    /// Observe streams end with "server stopped" when `shutdown` turns true.
    pub fn new(
        store: Store,
        max_request_bytes: usize,
        shutdown: tokio::sync::watch::Receiver<bool>,
    ) -> Self {
        ElectionService(Recipes {
            store,
            admit: Admission::new(max_request_bytes),
            shutdown,
        })
    }

    /// Checks every request against `gate`'s users and roles.
    pub fn with_gate(mut self, gate: Gate) -> Self {
        self.0.admit = self.0.admit.with_gate(gate);
        self
    }

    /// Proclaim's and Resign's leader key: present, and the caller may read and write it.
    fn leader_key<'a, T: prost::Message>(
        &self,
        request: &Request<T>,
        leader: Option<&'a epb::LeaderKey>,
    ) -> Result<&'a epb::LeaderKey, Status> {
        let leader = leader.ok_or_else(|| Status::unknown(MISSING_LEADER))?;
        self.0.check(
            request,
            &[
                (Perm::Read, &leader.key, b""),
                (Perm::Write, &leader.key, b""),
            ],
        )?;
        Ok(leader)
    }
}

/// Observe's response stream.
type ObserveStream = Pin<Box<dyn Stream<Item = Result<epb::LeaderResponse, Status>> + Send>>;

#[tonic::async_trait]
impl epb::election_server::Election for ElectionService {
    async fn campaign(
        &self,
        request: Request<epb::CampaignRequest>,
    ) -> Result<Response<epb::CampaignResponse>, Status> {
        let r = request.get_ref();
        self.0
            .check_names(&request, &r.name, &[Perm::Read, Perm::Write])?;
        let lease = self.0.session(r.lease).await?;
        let (leader, rev) = self.0.campaign(&r.name, lease, r.value.clone()).await?;
        Ok(Response::new(epb::CampaignResponse {
            header: Some(header(rev)),
            leader: Some(leader),
        }))
    }

    async fn proclaim(
        &self,
        request: Request<epb::ProclaimRequest>,
    ) -> Result<Response<epb::ProclaimResponse>, Status> {
        let r = request.get_ref();
        let leader = self.leader_key(&request, r.leader.as_ref())?;
        // As etcd's resumed session: lease 0 gets a new session lease for the put.
        let lease = self.0.session(leader.lease).await?;
        let rev = self
            .0
            .proclaim(&leader.key, leader.rev, lease, r.value.clone())
            .await?;
        Ok(Response::new(epb::ProclaimResponse {
            header: Some(header(rev)),
        }))
    }

    async fn leader(
        &self,
        request: Request<epb::LeaderRequest>,
    ) -> Result<Response<epb::LeaderResponse>, Status> {
        self.0
            .check_names(&request, &request.get_ref().name, &[Perm::Read])?;
        let (kv, rev) = self.0.leader(&request.get_ref().name).await?;
        Ok(Response::new(leader_response(&kv, rev)))
    }

    type ObserveStream = ObserveStream;

    async fn observe(
        &self,
        request: Request<epb::LeaderRequest>,
    ) -> Result<Response<Self::ObserveStream>, Status> {
        self.0
            .check_names(&request, &request.get_ref().name, &[Perm::Read])?;
        let name = request.into_inner().name;
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(self.0.clone().observe(name, tx));
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn resign(
        &self,
        request: Request<epb::ResignRequest>,
    ) -> Result<Response<epb::ResignResponse>, Status> {
        let r = request.get_ref();
        let leader = self.leader_key(&request, r.leader.as_ref())?;
        // A failed compare (no longer the leader) still succeeds, as in etcd.
        let resp = self
            .0
            .store
            .txn(resign_txn(leader.key.clone(), leader.rev))
            .await
            .map_err(|e| store_err(&e))?;
        Ok(Response::new(epb::ResignResponse {
            header: Some(header(resp.revision)),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_name_slash_lease_hex() {
        let p = prefix_of(b"mylock");
        assert_eq!(
            &key_of(&p, 0x5e80a241e25d25a5)[..],
            b"mylock/5e80a241e25d25a5"
        );
        assert_eq!(&key_of(&p, 10)[..], b"mylock/a");
    }
}

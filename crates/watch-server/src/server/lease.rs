//! etcd's `Lease` service over a [`Store`]: a thin translation to [`Store::lease_grant`],
//! [`Store::lease_revoke`], [`Store::lease_keep_alive`], [`Store::lease_time_to_live`] and
//! [`Store::leases`], with etcd 3.4's answers for unknown leases:
//!
//! - LeaseRevoke: `NotFound` "etcdserver: requested lease not found".
//! - LeaseKeepAlive: a response with `TTL = 0` (the Go client turns it into its own
//!   "lease expired or revoked" / not-found error), the stream stays open.
//! - LeaseTimeToLive: a response with `TTL = -1`, `grantedTTL = 0`, no keys.

use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use watch_proto::etcdserverpb as pb;
use watch_proto::status::EtcdError;

use super::convert::{header, store_status};
use crate::auth::{Caller, Gate, Perm};
use kv_store::Store;
use kv_store::StoreError;

/// Keep-alive responses buffered per stream between its task and the client.
const KEEPALIVE_DEPTH: usize = 64;

/// etcd's `Lease` service over a [`Store`].
#[derive(Debug, Clone)]
pub struct LeaseService {
    store: Store,
    /// Becomes true at shutdown: every keep-alive stream ends.
    shutdown: watch::Receiver<bool>,
    /// Authorization (off: one branch). On: every RPC needs a valid caller; LeaseRevoke
    /// needs write and TimeToLive{keys} read on every key of the lease, unless root (etcd's
    /// `checkLeasePuts` / `checkLeaseTimeToLive`).
    gate: Gate,
}

impl LeaseService {
    /// The service; keep-alive streams end when `shutdown` turns true.
    pub fn new(store: Store, shutdown: watch::Receiver<bool>) -> Self {
        Self {
            store,
            shutdown,
            gate: Gate::off(),
        }
    }

    /// Checks every request against `gate`'s users and roles (see the field docs).
    pub fn with_gate(mut self, gate: Gate) -> Self {
        self.gate = gate;
        self
    }
}

/// `perm` on every key attached to lease `id` for a non-root caller (an unknown lease has
/// none, as in etcd).
pub(crate) async fn check_lease_keys(
    store: &Store,
    caller: &Caller,
    perm: Perm,
    id: i64,
) -> Result<(), Status> {
    if caller.is_root() {
        return Ok(());
    }
    let keys = match store.lease_time_to_live(id, true).await {
        Ok(t) => t.keys,
        Err(StoreError::LeaseNotFound { .. }) => return Ok(()),
        Err(e) => return Err(store_status(&e)),
    };
    caller
        .check_keys(perm, keys.iter().map(|k| &k[..]))
        .map_err(EtcdError::status)
}

/// Every lease a put of `r` attaches, in either branch and in nested txns, once each: a txn
/// gets the same lease check as a plain Put (etcd 3.4 skips it for txns, which would let a
/// txn do what the Put is refused).
pub(crate) fn txn_leases(r: &pb::TxnRequest) -> Vec<i64> {
    fn walk(r: &pb::TxnRequest, out: &mut Vec<i64>) {
        for op in r.success.iter().chain(&r.failure) {
            match &op.request {
                Some(pb::request_op::Request::RequestPut(p)) if p.lease != 0 => out.push(p.lease),
                Some(pb::request_op::Request::RequestTxn(t)) => walk(t, out),
                _ => {}
            }
        }
    }
    let mut out = Vec::new();
    walk(r, &mut out);
    out.sort_unstable();
    out.dedup();
    out
}

type KeepAliveStream = ReceiverStream<Result<pb::LeaseKeepAliveResponse, Status>>;

#[tonic::async_trait]
impl pb::lease_server::Lease for LeaseService {
    async fn lease_grant(
        &self,
        request: Request<pb::LeaseGrantRequest>,
    ) -> Result<Response<pb::LeaseGrantResponse>, Status> {
        self.gate.caller(&request)?;
        let r = request.into_inner();
        let g = self
            .store
            .lease_grant(r.id, r.ttl)
            .await
            .map_err(|e| store_status(&e))?;
        Ok(Response::new(pb::LeaseGrantResponse {
            header: Some(header(g.revision)),
            id: g.id,
            ttl: g.ttl,
            error: String::new(),
        }))
    }

    async fn lease_revoke(
        &self,
        request: Request<pb::LeaseRevokeRequest>,
    ) -> Result<Response<pb::LeaseRevokeResponse>, Status> {
        if let Some(caller) = self.gate.caller(&request)? {
            check_lease_keys(&self.store, &caller, Perm::Write, request.get_ref().id).await?;
        }
        let revision = self
            .store
            .lease_revoke(request.into_inner().id)
            .await
            .map_err(|e| store_status(&e))?;
        Ok(Response::new(pb::LeaseRevokeResponse {
            header: Some(header(revision)),
        }))
    }

    type LeaseKeepAliveStream = KeepAliveStream;

    async fn lease_keep_alive(
        &self,
        request: Request<Streaming<pb::LeaseKeepAliveRequest>>,
    ) -> Result<Response<Self::LeaseKeepAliveStream>, Status> {
        // Checked once when the stream opens.
        self.gate.caller(&request)?;
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(KEEPALIVE_DEPTH);
        let store = self.store.clone();
        let mut shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            loop {
                let req = tokio::select! {
                    _ = async { drop(shutdown.wait_for(|s| *s).await) } => return,
                    req = inbound.message() => req,
                };
                let id = match req {
                    Ok(Some(r)) => r.id,
                    // The client closed its side or the transport failed: nothing to answer.
                    Ok(None) | Err(_) => return,
                };
                let reply = match store.lease_keep_alive(id) {
                    Ok(ttl) => Ok(ttl),
                    Err(StoreError::LeaseNotFound { .. }) => Ok(0),
                    Err(e) => Err(store_status(&e)),
                };
                let end = reply.is_err();
                let reply = reply.map(|ttl| pb::LeaseKeepAliveResponse {
                    header: Some(header(store.durable_revision())),
                    id,
                    ttl,
                });
                // A client that does not read its replies must not hold up shutdown.
                let sent = tokio::select! {
                    _ = async { drop(shutdown.wait_for(|s| *s).await) } => return,
                    sent = tx.send(reply) => sent,
                };
                if sent.is_err() || end {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn lease_time_to_live(
        &self,
        request: Request<pb::LeaseTimeToLiveRequest>,
    ) -> Result<Response<pb::LeaseTimeToLiveResponse>, Status> {
        if let Some(caller) = self.gate.caller(&request)?
            && request.get_ref().keys
        {
            check_lease_keys(&self.store, &caller, Perm::Read, request.get_ref().id).await?;
        }
        let r = request.into_inner();
        match self.store.lease_time_to_live(r.id, r.keys).await {
            Ok(t) => Ok(Response::new(pb::LeaseTimeToLiveResponse {
                header: Some(header(t.revision)),
                id: t.id,
                ttl: t.ttl,
                granted_ttl: t.granted_ttl,
                keys: t.keys,
            })),
            Err(StoreError::LeaseNotFound { .. }) => {
                Ok(Response::new(pb::LeaseTimeToLiveResponse {
                    header: Some(header(self.store.durable_revision())),
                    id: r.id,
                    ttl: -1,
                    granted_ttl: 0,
                    keys: Vec::new(),
                }))
            }
            Err(e) => Err(store_status(&e)),
        }
    }

    async fn lease_leases(
        &self,
        request: Request<pb::LeaseLeasesRequest>,
    ) -> Result<Response<pb::LeaseLeasesResponse>, Status> {
        // etcd lists every lease id to any authenticated user (ids name no key).
        self.gate.caller(&request)?;
        let ids = self.store.leases().map_err(|e| store_status(&e))?;
        Ok(Response::new(pb::LeaseLeasesResponse {
            header: Some(header(self.store.durable_revision())),
            leases: ids.into_iter().map(|id| pb::LeaseStatus { id }).collect(),
        }))
    }
}

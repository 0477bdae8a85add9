//! etcd's `Lease` service: every request passes [`super::admit`] (a valid caller; permissions
//! on a lease's keys for LeaseRevoke and TimeToLive{keys}), then its backend. Locally a thin
//! translation to [`Store::lease_grant`], [`Store::lease_revoke`], [`Store::lease_keep_alive`],
//! [`Store::lease_time_to_live`] and [`Store::leases`]; in mirror mode every RPC is forwarded
//! to the upstream etcd ([`super::forward`]), whose lease expiry reaches the mirror as
//! ordinary DELETE events. The local answers for unknown leases are etcd 3.4's:
//!
//! - LeaseRevoke: `NotFound` "etcdserver: requested lease not found".
//! - LeaseKeepAlive: a response with `TTL = 0` (the Go client turns it into its own
//!   "lease expired or revoked" / not-found error), the stream stays open.
//! - LeaseTimeToLive: a response with `TTL = -1`, `grantedTTL = 0`, no keys.

use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use watch_proto::etcdserverpb as pb;

use super::admit::{Admission, Backend};
use super::convert::{header, store_status};
use super::forward::{Forward, KeepAliveStream};
use crate::auth::Gate;
use crate::mirror::Mirror;
use kv_store::{Store, StoreError};

/// Keep-alive responses buffered per stream between its task and the client.
const KEEPALIVE_DEPTH: usize = 64;

/// etcd's `Lease` service over a [`Store`], or forwarding to a [`Mirror`]'s upstream.
///
/// With authentication on, every RPC needs a valid caller (etcd: "user name is empty" /
/// "invalid auth token"); `LeaseRevoke` needs write and `LeaseTimeToLive{keys}` read on every
/// key attached to the lease, unless the caller is root (etcd's `checkLeasePuts` /
/// `checkLeaseTimeToLive`). Grant, keep-alive and `LeaseLeases` need only a valid caller, as
/// in etcd.
#[derive(Debug, Clone)]
pub struct LeaseService {
    /// Lease requests are a few integers: no size limit beyond the transport's.
    admit: Admission,
    backend: Backend,
    /// Local mode: becomes true at shutdown, and every keep-alive stream ends. Mirror mode:
    /// none; a forwarded stream ends with the client's or the upstream's.
    shutdown: Option<watch::Receiver<bool>>,
}

impl LeaseService {
    /// The service over `store`; keep-alive streams end when `shutdown` turns true.
    pub fn new(store: Store, shutdown: watch::Receiver<bool>) -> Self {
        Self {
            admit: Admission::new(usize::MAX),
            backend: Backend::Local(store),
            shutdown: Some(shutdown),
        }
    }

    /// Mirror mode's service: every RPC forwarded to `mirror`'s upstream etcd, whose answer
    /// or status is returned unchanged; a keep-alive stream ends with the client's or the
    /// upstream's.
    pub fn mirror(mirror: Mirror) -> Self {
        Self {
            admit: Admission::new(usize::MAX),
            backend: Backend::Mirror(Forward::new(mirror)),
            shutdown: None,
        }
    }

    /// Checks every request against `gate`'s users and roles (see the type docs).
    pub fn with_gate(mut self, gate: Gate) -> Self {
        self.admit = self.admit.with_gate(gate);
        self
    }
}

/// A local keep-alive stream: one task answering each request from `store` until the client
/// closes its side, the transport fails, a store error is sent, or `shutdown` turns true.
fn keep_alive(
    store: Store,
    shutdown: Option<watch::Receiver<bool>>,
    mut inbound: Streaming<pb::LeaseKeepAliveRequest>,
) -> KeepAliveStream {
    let (tx, rx) = mpsc::channel(KEEPALIVE_DEPTH);
    /// Resolves once `shutdown` turns true; never without one.
    async fn stopped(shutdown: &mut Option<watch::Receiver<bool>>) {
        match shutdown {
            Some(s) => drop(s.wait_for(|s| *s).await),
            None => std::future::pending().await,
        }
    }
    let mut shutdown = shutdown;
    tokio::spawn(async move {
        loop {
            let req = tokio::select! {
                _ = stopped(&mut shutdown) => return,
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
                _ = stopped(&mut shutdown) => return,
                sent = tx.send(reply) => sent,
            };
            if sent.is_err() || end {
                return;
            }
        }
    });
    Box::pin(ReceiverStream::new(rx))
}

#[tonic::async_trait]
impl pb::lease_server::Lease for LeaseService {
    async fn lease_grant(
        &self,
        request: Request<pb::LeaseGrantRequest>,
    ) -> Result<Response<pb::LeaseGrantResponse>, Status> {
        self.admit.lease(&request)?;
        let r = request.into_inner();
        let store = match &self.backend {
            Backend::Local(store) => store,
            Backend::Mirror(forward) => return forward.lease_grant(r).await,
        };
        let g = store
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
        self.admit.lease_revoke(&self.backend, &request).await?;
        let r = request.into_inner();
        let store = match &self.backend {
            Backend::Local(store) => store,
            Backend::Mirror(forward) => return forward.lease_revoke(r).await,
        };
        let revision = store
            .lease_revoke(r.id)
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
        // Checked once when the stream opens (etcd checks its token there too).
        self.admit.lease(&request)?;
        let inbound = request.into_inner();
        let stream = match &self.backend {
            Backend::Local(store) => keep_alive(store.clone(), self.shutdown.clone(), inbound),
            Backend::Mirror(forward) => forward.lease_keep_alive(inbound).await?,
        };
        Ok(Response::new(stream))
    }

    async fn lease_time_to_live(
        &self,
        request: Request<pb::LeaseTimeToLiveRequest>,
    ) -> Result<Response<pb::LeaseTimeToLiveResponse>, Status> {
        self.admit
            .lease_time_to_live(&self.backend, &request)
            .await?;
        let r = request.into_inner();
        let store = match &self.backend {
            Backend::Local(store) => store,
            Backend::Mirror(forward) => return forward.lease_time_to_live(r).await,
        };
        match store.lease_time_to_live(r.id, r.keys).await {
            Ok(t) => Ok(Response::new(pb::LeaseTimeToLiveResponse {
                header: Some(header(t.revision)),
                id: t.id,
                ttl: t.ttl,
                granted_ttl: t.granted_ttl,
                keys: t.keys,
            })),
            Err(StoreError::LeaseNotFound { .. }) => {
                Ok(Response::new(pb::LeaseTimeToLiveResponse {
                    header: Some(header(store.durable_revision())),
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
        self.admit.lease(&request)?;
        let r = request.into_inner();
        let store = match &self.backend {
            Backend::Local(store) => store,
            Backend::Mirror(forward) => return forward.lease_leases(r).await,
        };
        let ids = store.leases().map_err(|e| store_status(&e))?;
        Ok(Response::new(pb::LeaseLeasesResponse {
            header: Some(header(store.durable_revision())),
            leases: ids.into_iter().map(|id| pb::LeaseStatus { id }).collect(),
        }))
    }
}

//! The KV and Lease services of a mirror: reads served locally, everything else forwarded.
//!
//! - `Range` inside one mirrored prefix: served from the mirror at its revision.
//!   Serializable: at once. Linearizable (etcd's default): first the upstream's current
//!   revision is read (a linearizable `count_only` range of the request's first key on etcd),
//!   then the read waits until the mirror has applied it ([`Mirror::wait_for`]).
//! - `Range` reaching outside the mirrored prefixes: forwarded to etcd as is.
//! - `Put`, `DeleteRange`, `Txn`, `Compact` and every Lease RPC: forwarded to etcd; etcd's
//!   response or gRPC status is returned unchanged. A write that changed a mirrored key returns
//!   only once the mirror applied its revision (read-your-writes through the same replica);
//!   with an upstream whose requested progress notifications are ordered, every write does.
//!   A delete whose range lies only partly inside the mirrored prefixes is forwarded with
//!   `prev_kv` (etcd names the removed keys only there), so a delete that removed only keys
//!   outside the prefixes does not wait for a mirrored revision that never comes; the
//!   `prev_kvs` the client did not ask for are dropped from the response.
//!   `Compact` compacts etcd only: the mirror keeps its own history.

use std::pin::Pin;

use prost::Message;
use tonic::{Request, Response, Status, Streaming};
use watch_proto::etcdserverpb as pb;
use watch_proto::etcdserverpb::kv_client::KvClient;
use watch_proto::etcdserverpb::lease_client::LeaseClient;
use watch_proto::status::EtcdError;

use super::Mirror;
use crate::auth::{Caller, Gate, Perm};
use crate::server::convert::{self, store_status};
use kv_store::KeyRange;

/// The revision of an upstream answer's header, the target of a barrier. A missing header (or
/// a revision below 1) is an error: a barrier at 0 would pass at once and break
/// read-your-writes and linearizable reads silently.
fn header_revision(header: Option<&pb::ResponseHeader>) -> Result<u64, Status> {
    header
        .and_then(|h| u64::try_from(h.revision).ok())
        .filter(|r| *r > 0)
        .ok_or_else(|| {
            Status::unavailable(
                "keywatch mirror: the upstream answer has no revision header; its outcome \
                 cannot be awaited on the mirror",
            )
        })
}

/// Where a delete's range lies relative to the mirrored scope.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DeleteScope {
    /// Inside one mirrored prefix.
    Inside,
    /// Partly inside: the deleted keys decide.
    Partly,
    /// Disjoint from every mirrored prefix.
    Outside,
}

/// etcd's `KV` service over a [`Mirror`] (see the module docs).
#[derive(Debug, Clone)]
pub struct MirrorKvService {
    mirror: Mirror,
    /// Largest accepted request, in encoded bytes (etcd `--max-request-bytes`).
    max_request_bytes: usize,
    /// keywatch's own authorization, checked before anything is served or forwarded (off:
    /// one branch).
    gate: Gate,
}

impl MirrorKvService {
    /// The service over `mirror`, refusing requests larger than `max_request_bytes`.
    pub fn new(mirror: Mirror, max_request_bytes: usize) -> Self {
        Self {
            mirror,
            max_request_bytes,
            gate: Gate::off(),
        }
    }

    /// Checks every request against `gate`'s users and roles, as the local KV service does.
    pub fn with_gate(mut self, gate: Gate) -> Self {
        self.gate = gate;
        self
    }

    fn check_size(&self, m: &impl Message) -> Result<(), Status> {
        if m.encoded_len() > self.max_request_bytes {
            return Err(EtcdError::RequestTooLarge.status());
        }
        Ok(())
    }

    /// With authentication on, etcd's pre-authorization checks of a put or delete (size, then
    /// the op `op` builds), so a malformed request is refused as such before any auth error.
    /// Off, etcd makes them when the request is forwarded.
    fn validate_first(
        &self,
        m: &impl Message,
        op: impl FnOnce() -> kv_store::TxnOp,
    ) -> Result<(), Status> {
        if self.gate.auth().is_none() {
            return Ok(());
        }
        self.check_size(m)?;
        let req = kv_store::TxnRequest {
            compare: Vec::new(),
            success: vec![op()],
            failure: Vec::new(),
        };
        self.mirror
            .store()
            .validate(&req)
            .map_err(|e| store_status(&e))
    }

    fn upstream(&self) -> KvClient<tonic::transport::Channel> {
        KvClient::new(self.mirror.channel())
            .max_decoding_message_size(self.mirror.inner.config.max_response_bytes)
    }

    /// Waits for the mirror to apply the write's revision when the write changed a mirrored
    /// key (its own event advances the mirror), or for any write when the upstream's requested
    /// progress notifications are ordered (one progress round trip advances the mirror past a
    /// revision of other keys). Otherwise (etcd < 3.4.25 / 3.5.8 and no mirrored key changed)
    /// it returns at once: waiting would last until the next periodic notification.
    async fn after_write(
        &self,
        header: Option<&pb::ResponseHeader>,
        changed: bool,
    ) -> Result<(), Status> {
        let changed = changed || self.mirror.progress_trusted();
        if !changed {
            return Ok(());
        }
        self.mirror.wait_for(header_revision(header)?).await
    }

    fn changed_put(&self, key: &[u8]) -> bool {
        self.mirror.scope().contains_key(key)
    }

    /// How a delete of `[key, range_end)` is judged: a range inside one mirrored prefix
    /// changed a mirrored key iff it deleted something; a range disjoint from the scope never
    /// did; a range overlapping the scope only partly needs the deleted keys themselves, so it
    /// is forwarded with `prev_kv` (the only way etcd names the keys a delete removed).
    fn delete_scope(&self, key: &[u8], range_end: &[u8]) -> DeleteScope {
        let range = KeyRange::new(
            bytes::Bytes::copy_from_slice(key),
            bytes::Bytes::copy_from_slice(range_end),
        );
        let scope = self.mirror.scope();
        if scope.covers_range(&range) {
            DeleteScope::Inside
        } else if scope.intersects_range(&range) {
            DeleteScope::Partly
        } else {
            DeleteScope::Outside
        }
    }

    /// Asks for `prev_kv` on a partly mirrored delete (see [`Self::delete_scope`]); returns
    /// what the client asked for.
    fn prepare_delete(&self, d: &mut pb::DeleteRangeRequest) -> bool {
        let asked = d.prev_kv;
        if self.delete_scope(&d.key, &d.range_end) == DeleteScope::Partly {
            d.prev_kv = true;
        }
        asked
    }

    /// True if the delete `d` (as sent by the client), answered by `resp` (forwarded after
    /// [`Self::prepare_delete`]), removed a mirrored key; then drops the `prev_kvs` the client
    /// did not ask for.
    fn finish_delete(
        &self,
        d: &pb::DeleteRangeRequest,
        resp: &mut pb::DeleteRangeResponse,
    ) -> bool {
        let changed = match self.delete_scope(&d.key, &d.range_end) {
            DeleteScope::Inside => resp.deleted > 0,
            DeleteScope::Outside => false,
            DeleteScope::Partly => resp
                .prev_kvs
                .iter()
                .any(|kv| self.mirror.scope().contains_key(&kv.key)),
        };
        if !d.prev_kv {
            resp.prev_kvs.clear();
        }
        changed
    }

    /// [`Self::prepare_delete`] for every delete of `t`, both branches, nested txns included.
    fn prepare_txn(&self, t: &mut pb::TxnRequest) {
        use pb::request_op::Request as Q;
        for op in t.success.iter_mut().chain(t.failure.iter_mut()) {
            match &mut op.request {
                Some(Q::RequestDeleteRange(d)) => {
                    self.prepare_delete(d);
                }
                Some(Q::RequestTxn(t)) => self.prepare_txn(t),
                _ => {}
            }
        }
    }

    /// True if the executed branch of `req` (as sent by the client), answered by `resp`
    /// (forwarded after [`Self::prepare_txn`]), changed a mirrored key; then drops the
    /// `prev_kvs` the client did not ask for.
    fn finish_txn(&self, req: &pb::TxnRequest, resp: &mut pb::TxnResponse) -> bool {
        use pb::request_op::Request as Q;
        use pb::response_op::Response as A;
        let ops = if resp.succeeded {
            &req.success
        } else {
            &req.failure
        };
        let mut changed = false;
        for (op, r) in ops.iter().zip(&mut resp.responses) {
            changed |= match (&op.request, &mut r.response) {
                (Some(Q::RequestPut(p)), _) => self.changed_put(&p.key),
                (Some(Q::RequestDeleteRange(d)), Some(A::ResponseDeleteRange(dr))) => {
                    self.finish_delete(d, dr)
                }
                (Some(Q::RequestTxn(t)), Some(A::ResponseTxn(tr))) => self.finish_txn(t, tr),
                _ => false,
            };
        }
        changed
    }
}

#[tonic::async_trait]
impl pb::kv_server::Kv for MirrorKvService {
    async fn range(
        &self,
        request: Request<pb::RangeRequest>,
    ) -> Result<Response<pb::RangeResponse>, Status> {
        // As etcd: a malformed request is refused as such before any auth error.
        let caller = self.gate.caller(&request);
        let r = request.into_inner();
        self.check_size(&r)?;
        let req = convert::range_request(&r)?;
        if r.key.is_empty() {
            return Err(EtcdError::EmptyKey.status());
        }
        if let Some(caller) = caller? {
            caller.check_range(&r)?;
        }
        if !self.mirror.scope().covers_range(&req.range) {
            return self.upstream().range(r).await;
        }
        // A past revision the mirror already holds is immutable: no barrier needed.
        let held = req.revision != 0 && req.revision <= self.mirror.store().current_revision();
        if !r.serializable && !held {
            let probe = pb::RangeRequest {
                key: r.key.clone(),
                count_only: true,
                ..Default::default()
            };
            let current = self.upstream().range(probe).await?.into_inner();
            let target = header_revision(current.header.as_ref())?;
            self.mirror.wait_for(target).await?;
        }
        let result = self
            .mirror
            .store()
            .range(req)
            .await
            .map_err(|e| store_status(&e))?;
        Ok(Response::new(convert::range_response(result)))
    }

    async fn put(
        &self,
        request: Request<pb::PutRequest>,
    ) -> Result<Response<pb::PutResponse>, Status> {
        self.validate_first(request.get_ref(), || convert::put_op(request.get_ref()))?;
        if let Some(caller) = self.gate.caller(&request)? {
            caller.check_put(request.get_ref())?;
            // etcd's checkLeasePuts: attaching a lease needs write on the keys it already
            // holds (its holder could not revoke it otherwise).
            let lease = request.get_ref().lease;
            if lease != 0 && !caller.is_root() {
                let keys = lease_keys(&self.mirror, lease).await?;
                caller.check_keys(Perm::Write, keys.iter().map(|k| &k[..]))?;
            }
        }
        let r = request.into_inner();
        self.check_size(&r)?;
        let changed = self.changed_put(&r.key);
        let resp = self.upstream().put(r).await?;
        self.after_write(resp.get_ref().header.as_ref(), changed)
            .await?;
        Ok(resp)
    }

    async fn delete_range(
        &self,
        request: Request<pb::DeleteRangeRequest>,
    ) -> Result<Response<pb::DeleteRangeResponse>, Status> {
        self.validate_first(request.get_ref(), || convert::delete_op(request.get_ref()))?;
        if let Some(caller) = self.gate.caller(&request)? {
            caller.check_delete(request.get_ref())?;
        }
        let r = request.into_inner();
        self.check_size(&r)?;
        let mut fwd = r.clone();
        self.prepare_delete(&mut fwd);
        let mut resp = self.upstream().delete_range(fwd).await?;
        let changed = self.finish_delete(&r, resp.get_mut());
        self.after_write(resp.get_ref().header.as_ref(), changed)
            .await?;
        Ok(resp)
    }

    async fn txn(
        &self,
        request: Request<pb::TxnRequest>,
    ) -> Result<Response<pb::TxnResponse>, Status> {
        if self.gate.auth().is_some() {
            self.check_size(request.get_ref())?;
            let req = convert::txn_request(request.get_ref())?;
            self.mirror
                .store()
                .validate(&req)
                .map_err(|e| store_status(&e))?;
        }
        if let Some(caller) = self.gate.caller(&request)? {
            caller.check_txn(request.get_ref())?;
            if !caller.is_root() {
                for lease in crate::server::lease::txn_leases(request.get_ref()) {
                    let keys = lease_keys(&self.mirror, lease).await?;
                    caller.check_keys(Perm::Write, keys.iter().map(|k| &k[..]))?;
                }
            }
        }
        let r = request.into_inner();
        self.check_size(&r)?;
        let mut fwd = r.clone();
        self.prepare_txn(&mut fwd);
        let mut resp = self.upstream().txn(fwd).await?;
        let changed = self.finish_txn(&r, resp.get_mut());
        self.after_write(resp.get_ref().header.as_ref(), changed)
            .await?;
        Ok(resp)
    }

    async fn compact(
        &self,
        request: Request<pb::CompactionRequest>,
    ) -> Result<Response<pb::CompactionResponse>, Status> {
        if let Some(caller) = self.gate.caller(&request)? {
            caller.check_admin()?;
        }
        self.upstream().compact(request.into_inner()).await
    }
}

/// The keys attached to lease `id` upstream (none for an unknown or expired lease), for
/// etcd's per-key lease checks. Not atomic with the forwarded call: a key attached upstream
/// between the two is not checked (etcd checks inside its apply loop).
async fn lease_keys(mirror: &Mirror, id: i64) -> Result<Vec<bytes::Bytes>, Status> {
    let resp = LeaseClient::new(mirror.channel())
        .max_decoding_message_size(usize::MAX)
        .lease_time_to_live(pb::LeaseTimeToLiveRequest { id, keys: true })
        .await?;
    Ok(resp.into_inner().keys)
}

/// etcd's `Lease` service of a mirror: every RPC forwarded to the upstream, whose lease
/// expiry reaches the mirror as ordinary DELETE events through the upstream watch.
///
/// With authentication on, every RPC needs a valid caller (etcd: "user name is empty" /
/// "invalid auth token"); `LeaseRevoke` needs write and `LeaseTimeToLive{keys}` read on every
/// key attached to the lease, unless the caller is root (etcd's `checkLeasePuts` /
/// `checkLeaseTimeToLive`). Grant, keep-alive and `LeaseLeases` need only a valid caller, as
/// in etcd.
#[derive(Debug, Clone)]
pub struct MirrorLeaseService {
    mirror: Mirror,
    /// keywatch's own authorization (off: one branch).
    gate: Gate,
}

impl MirrorLeaseService {
    /// The service over `mirror`.
    pub fn new(mirror: Mirror) -> Self {
        Self {
            mirror,
            gate: Gate::off(),
        }
    }

    /// Checks every request against `gate`'s users and roles (see the type docs).
    pub fn with_gate(mut self, gate: Gate) -> Self {
        self.gate = gate;
        self
    }

    fn upstream(&self) -> LeaseClient<tonic::transport::Channel> {
        LeaseClient::new(self.mirror.channel())
            .max_decoding_message_size(self.mirror.inner.config.max_response_bytes)
    }

    /// `perm` on every key of lease `id` for a non-root caller.
    async fn check_lease(&self, caller: &Caller, perm: Perm, id: i64) -> Result<(), Status> {
        if caller.is_root() {
            return Ok(());
        }
        let keys = lease_keys(&self.mirror, id).await?;
        caller
            .check_keys(perm, keys.iter().map(|k| &k[..]))
            .map_err(EtcdError::status)
    }
}

type KeepAliveStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::LeaseKeepAliveResponse, Status>> + Send>>;

#[tonic::async_trait]
impl pb::lease_server::Lease for MirrorLeaseService {
    async fn lease_grant(
        &self,
        request: Request<pb::LeaseGrantRequest>,
    ) -> Result<Response<pb::LeaseGrantResponse>, Status> {
        self.gate.caller(&request)?;
        self.upstream().lease_grant(request.into_inner()).await
    }

    async fn lease_revoke(
        &self,
        request: Request<pb::LeaseRevokeRequest>,
    ) -> Result<Response<pb::LeaseRevokeResponse>, Status> {
        if let Some(caller) = self.gate.caller(&request)? {
            self.check_lease(&caller, Perm::Write, request.get_ref().id)
                .await?;
        }
        self.upstream().lease_revoke(request.into_inner()).await
    }

    type LeaseKeepAliveStream = KeepAliveStream;

    async fn lease_keep_alive(
        &self,
        request: Request<Streaming<pb::LeaseKeepAliveRequest>>,
    ) -> Result<Response<Self::LeaseKeepAliveStream>, Status> {
        use tokio_stream::StreamExt;
        // Checked once when the stream opens (etcd checks its token there too).
        self.gate.caller(&request)?;
        // The client's stream ends the upstream one when it ends or fails.
        let inbound = request.into_inner().map_while(Result::ok);
        let upstream = self.upstream().lease_keep_alive(inbound).await?;
        Ok(Response::new(Box::pin(upstream.into_inner())))
    }

    async fn lease_time_to_live(
        &self,
        request: Request<pb::LeaseTimeToLiveRequest>,
    ) -> Result<Response<pb::LeaseTimeToLiveResponse>, Status> {
        if let Some(caller) = self.gate.caller(&request)? {
            let r = request.get_ref();
            if r.keys {
                self.check_lease(&caller, Perm::Read, r.id).await?;
            }
        }
        self.upstream()
            .lease_time_to_live(request.into_inner())
            .await
    }

    async fn lease_leases(
        &self,
        request: Request<pb::LeaseLeasesRequest>,
    ) -> Result<Response<pb::LeaseLeasesResponse>, Status> {
        // etcd lists every lease id to any authenticated user (ids name no key).
        self.gate.caller(&request)?;
        self.upstream().lease_leases(request.into_inner()).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_header_is_no_barrier_target() {
        assert!(header_revision(None).is_err());
        let h = |revision| pb::ResponseHeader {
            revision,
            ..Default::default()
        };
        assert!(header_revision(Some(&h(0))).is_err());
        assert!(header_revision(Some(&h(-3))).is_err());
        assert_eq!(header_revision(Some(&h(42))).unwrap(), 42);
    }
}

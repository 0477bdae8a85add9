//! The mirror backend of the KV and Lease services ([`super::admit::Backend::Mirror`]): reads
//! served locally, everything else forwarded. Requests arrive here admitted (size, shape,
//! authorization: [`super::admit`]).
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
//!   `Compact` compacts etcd, then the mirror at the same revision (see [`Forward::compact`]).

use std::future::Future;
use std::pin::Pin;

use tonic::{Response, Status, Streaming};
use watch_proto::etcdserverpb as pb;
use watch_proto::etcdserverpb::kv_client::KvClient;
use watch_proto::etcdserverpb::lease_client::LeaseClient;

use super::convert::{self, barrier_status, store_status};
use crate::mirror::{Mirror, Resend, UpstreamChannel};
use kv_store::{KeyRange, RangeRequest, Store};

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

/// The mirror backend: a [`Mirror`] and its upstream (see the module docs). Cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct Forward {
    mirror: Mirror,
}

impl Forward {
    /// Serves and forwards for `mirror`.
    pub(crate) fn new(mirror: Mirror) -> Self {
        Self { mirror }
    }

    /// The mirror's store.
    pub(crate) fn store(&self) -> &Store {
        self.mirror.store()
    }

    /// One KV call upstream through [`Mirror::call`] (renewing an expired token once; sent to
    /// the next endpoint on the transport errors `resend` allows).
    async fn kv<T, F, Fut>(&self, resend: Resend, call: F) -> Result<T, Status>
    where
        F: Fn(KvClient<UpstreamChannel>) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        let max = self.mirror.max_response_bytes();
        self.mirror
            .call(resend, |ch| {
                call(KvClient::new(ch).max_decoding_message_size(max))
            })
            .await
    }

    /// One Lease call upstream, as [`Self::kv`].
    async fn lease<T, F, Fut>(&self, resend: Resend, call: F) -> Result<T, Status>
    where
        F: Fn(LeaseClient<UpstreamChannel>) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        let max = self.mirror.max_response_bytes();
        self.mirror
            .call(resend, |ch| {
                call(LeaseClient::new(ch).max_decoding_message_size(max))
            })
            .await
    }

    /// The keys attached to lease `id` upstream (none for an unknown or expired lease), for
    /// etcd's per-key lease checks.
    pub(crate) async fn lease_keys(&self, id: i64) -> Result<Vec<bytes::Bytes>, Status> {
        let resp = self
            .lease(Resend::Read, |mut c| async move {
                c.lease_time_to_live(pb::LeaseTimeToLiveRequest { id, keys: true })
                    .await
            })
            .await?;
        Ok(resp.into_inner().keys)
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
        self.mirror
            .wait_for(header_revision(header)?)
            .await
            .map_err(|e| barrier_status(&e))
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

    /// Range `r` (store form `req`): served by the mirror inside one mirrored prefix, after a
    /// barrier at the upstream's current revision unless serializable or at a revision the
    /// mirror already holds; forwarded otherwise.
    pub(crate) async fn range(
        &self,
        r: pb::RangeRequest,
        req: RangeRequest,
    ) -> Result<Response<pb::RangeResponse>, Status> {
        if !self.mirror.scope().covers_range(&req.range) {
            return self
                .kv(Resend::Read, |mut c| {
                    let r = r.clone();
                    async move { c.range(r).await }
                })
                .await;
        }
        // A past revision the mirror already holds is immutable: no barrier needed.
        let held = req.revision != 0 && req.revision <= self.store().current_revision();
        if !r.serializable && !held {
            let probe = pb::RangeRequest {
                key: r.key.clone(),
                count_only: true,
                ..Default::default()
            };
            let current = self
                .kv(Resend::Read, |mut c| {
                    let r = probe.clone();
                    async move { c.range(r).await }
                })
                .await?
                .into_inner();
            let target = header_revision(current.header.as_ref())?;
            self.mirror
                .wait_for(target)
                .await
                .map_err(|e| barrier_status(&e))?;
        }
        let result = self
            .store()
            .range(req)
            .await
            .map_err(|e| store_status(&e))?;
        Ok(Response::new(convert::range_response(result)))
    }

    /// Put: forwarded; returns once the mirror applied it (see [`Self::after_write`]).
    pub(crate) async fn put(&self, r: pb::PutRequest) -> Result<Response<pb::PutResponse>, Status> {
        let changed = self.changed_put(&r.key);
        let resp = self
            .kv(Resend::Write, |mut c| {
                let r = r.clone();
                async move { c.put(r).await }
            })
            .await?;
        self.after_write(resp.get_ref().header.as_ref(), changed)
            .await?;
        Ok(resp)
    }

    /// DeleteRange: forwarded (with `prev_kv` when partly mirrored, see
    /// [`Self::delete_scope`]); returns once the mirror applied it.
    pub(crate) async fn delete_range(
        &self,
        r: pb::DeleteRangeRequest,
    ) -> Result<Response<pb::DeleteRangeResponse>, Status> {
        let mut fwd = r.clone();
        self.prepare_delete(&mut fwd);
        let mut resp = self
            .kv(Resend::Write, |mut c| {
                let r = fwd.clone();
                async move { c.delete_range(r).await }
            })
            .await?;
        let changed = self.finish_delete(&r, resp.get_mut());
        self.after_write(resp.get_ref().header.as_ref(), changed)
            .await?;
        Ok(resp)
    }

    /// Txn: forwarded (its deletes prepared as [`Self::delete_range`]'s); returns once the
    /// mirror applied it.
    pub(crate) async fn txn(&self, r: pb::TxnRequest) -> Result<Response<pb::TxnResponse>, Status> {
        let mut fwd = r.clone();
        self.prepare_txn(&mut fwd);
        let mut resp = self
            .kv(Resend::Write, |mut c| {
                let r = fwd.clone();
                async move { c.txn(r).await }
            })
            .await?;
        let changed = self.finish_txn(&r, resp.get_mut());
        self.after_write(resp.get_ref().header.as_ref(), changed)
            .await?;
        Ok(resp)
    }

    /// Compact: forwarded; once etcd acknowledged it, the mirror drops its own history below
    /// the revision (after applying up to it), so reads and watches below it fail on this
    /// replica as on etcd before the answer returns.
    pub(crate) async fn compact(
        &self,
        r: pb::CompactionRequest,
    ) -> Result<Response<pb::CompactionResponse>, Status> {
        let resp = self
            .kv(Resend::Write, |mut c| async move { c.compact(r).await })
            .await?;
        if let Ok(revision) = u64::try_from(r.revision) {
            self.mirror
                .upstream_compacted(revision)
                .await
                .map_err(|e| barrier_status(&e))?;
        }
        Ok(resp)
    }

    /// LeaseGrant, forwarded: a mirror holds no local lease; the upstream's lease expiry
    /// reaches it as ordinary DELETE events through the upstream watch.
    pub(crate) async fn lease_grant(
        &self,
        r: pb::LeaseGrantRequest,
    ) -> Result<Response<pb::LeaseGrantResponse>, Status> {
        self.lease(Resend::Write, |mut c| async move { c.lease_grant(r).await })
            .await
    }

    /// LeaseRevoke, forwarded; returns once the mirror applied the deletes of the lease's
    /// mirrored keys (as a forwarded write does, [`Self::after_write`]): the keys are read
    /// first (`LeaseTimeToLive` with keys), since etcd's answer names none. A key attached
    /// between that read and the revoke is deleted all the same, only not awaited.
    pub(crate) async fn lease_revoke(
        &self,
        r: pb::LeaseRevokeRequest,
    ) -> Result<Response<pb::LeaseRevokeResponse>, Status> {
        let keys = self.lease_keys(r.id).await?;
        let changed = keys.iter().any(|k| self.changed_put(k));
        let resp = self
            .lease(
                Resend::Write,
                |mut c| async move { c.lease_revoke(r).await },
            )
            .await?;
        self.after_write(resp.get_ref().header.as_ref(), changed)
            .await?;
        Ok(resp)
    }

    /// LeaseKeepAlive, forwarded as one upstream stream; the client's stream ends the
    /// upstream one when it ends or fails.
    pub(crate) async fn lease_keep_alive(
        &self,
        inbound: Streaming<pb::LeaseKeepAliveRequest>,
    ) -> Result<KeepAliveStream, Status> {
        use tokio_stream::StreamExt;
        // A stream is sent once: its requests are consumed, so no token retry.
        let upstream = LeaseClient::new(self.mirror.channel())
            .max_decoding_message_size(self.mirror.max_response_bytes())
            .lease_keep_alive(inbound.map_while(Result::ok))
            .await?;
        Ok(Box::pin(upstream.into_inner()))
    }

    /// LeaseTimeToLive, forwarded.
    pub(crate) async fn lease_time_to_live(
        &self,
        r: pb::LeaseTimeToLiveRequest,
    ) -> Result<Response<pb::LeaseTimeToLiveResponse>, Status> {
        self.lease(Resend::Read, |mut c| async move {
            c.lease_time_to_live(r).await
        })
        .await
    }

    /// LeaseLeases, forwarded.
    pub(crate) async fn lease_leases(
        &self,
        r: pb::LeaseLeasesRequest,
    ) -> Result<Response<pb::LeaseLeasesResponse>, Status> {
        self.lease(Resend::Read, |mut c| async move { c.lease_leases(r).await })
            .await
    }
}

/// The keep-alive responses of one LeaseKeepAlive stream, local or forwarded.
pub(crate) type KeepAliveStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::LeaseKeepAliveResponse, Status>> + Send>>;

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

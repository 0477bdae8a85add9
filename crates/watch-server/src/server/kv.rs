//! etcd's KV service: every request passes [`super::admit`] (size, shape, authorization),
//! then its backend: the local [`Store`] (a thin translation), or in mirror mode the mirror
//! (reads of mirrored keys) and the upstream etcd (everything else, [`super::forward`]).

use tonic::{Request, Response, Status};
use watch_proto::etcdserverpb as pb;
use watch_proto::status::EtcdError;

use super::admit::{Admission, Backend};
use super::convert::{self, store_status};
use super::forward::Forward;
use crate::auth::Gate;
use crate::mirror::Mirror;
use kv_store::Store;

/// etcd's `KV` service over a [`Store`], or over a [`Mirror`] in mirror mode.
#[derive(Debug, Clone)]
pub struct KvService {
    admit: Admission,
    backend: Backend,
}

impl KvService {
    /// The service over `store`, refusing requests larger than `max_request_bytes`.
    pub fn new(store: Store, max_request_bytes: usize) -> Self {
        Self {
            admit: Admission::new(max_request_bytes),
            backend: Backend::Local(store),
        }
    }

    /// Mirror mode's service: reads inside the mirrored prefixes served from `mirror` (after
    /// a barrier at the upstream's revision unless serializable), everything else forwarded
    /// to its upstream etcd, whose answer or status is returned unchanged. Requests larger
    /// than `max_request_bytes` are refused before anything is forwarded.
    pub fn mirror(mirror: Mirror, max_request_bytes: usize) -> Self {
        Self {
            admit: Admission::new(max_request_bytes),
            backend: Backend::Mirror(Forward::new(mirror)),
        }
    }

    /// Checks every request against `gate`'s users and roles.
    pub fn with_gate(mut self, gate: Gate) -> Self {
        self.admit = self.admit.with_gate(gate);
        self
    }
}

#[tonic::async_trait]
impl pb::kv_server::Kv for KvService {
    async fn range(
        &self,
        request: Request<pb::RangeRequest>,
    ) -> Result<Response<pb::RangeResponse>, Status> {
        let (r, req) = self.admit.range(request)?;
        match &self.backend {
            Backend::Local(store) => {
                let result = store.range(req).await.map_err(|e| store_status(&e))?;
                tracing::trace!(revision = result.revision, "range");
                Ok(Response::new(convert::range_response(result)))
            }
            Backend::Mirror(forward) => forward.range(r, req).await,
        }
    }

    async fn put(
        &self,
        request: Request<pb::PutRequest>,
    ) -> Result<Response<pb::PutResponse>, Status> {
        self.admit.put(&self.backend, &request).await?;
        let store = match &self.backend {
            Backend::Local(store) => store,
            Backend::Mirror(forward) => return forward.put(request.into_inner()).await,
        };
        let r = request.get_ref();
        let p = store
            .put(r.key.clone(), r.value.clone(), convert::put_options(r))
            .await
            .map_err(|e| store_status(&e))?;
        tracing::debug!(revision = p.revision, "put");
        Ok(Response::new(convert::put_response(p)))
    }

    async fn delete_range(
        &self,
        request: Request<pb::DeleteRangeRequest>,
    ) -> Result<Response<pb::DeleteRangeResponse>, Status> {
        self.admit.delete_range(&self.backend, &request)?;
        let store = match &self.backend {
            Backend::Local(store) => store,
            Backend::Mirror(forward) => return forward.delete_range(request.into_inner()).await,
        };
        let r = request.get_ref();
        let d = store
            .delete_range(convert::delete_range(r), r.prev_kv)
            .await
            .map_err(|e| store_status(&e))?;
        tracing::debug!(revision = d.revision, "delete_range");
        Ok(Response::new(convert::delete_response(d)))
    }

    async fn txn(
        &self,
        request: Request<pb::TxnRequest>,
    ) -> Result<Response<pb::TxnResponse>, Status> {
        let (r, req) = self.admit.txn(&self.backend, request).await?;
        let store = match &self.backend {
            Backend::Local(store) => store,
            Backend::Mirror(forward) => return forward.txn(r).await,
        };
        let req = match req {
            Some(req) => req,
            None => convert::txn_request(&r)?,
        };
        let result = store.txn(req).await.map_err(|e| store_status(&e))?;
        tracing::debug!(revision = result.revision, "txn");
        Ok(Response::new(convert::txn_response(result)))
    }

    async fn compact(
        &self,
        request: Request<pb::CompactionRequest>,
    ) -> Result<Response<pb::CompactionResponse>, Status> {
        self.admit.compact(&request)?;
        let r = request.into_inner();
        let store = match &self.backend {
            Backend::Local(store) => store,
            Backend::Mirror(forward) => return forward.compact(r).await,
        };
        // etcd treats a revision <= 0 like any revision at or below the compaction point.
        let revision = u64::try_from(r.revision).unwrap_or(0);
        if revision == 0 {
            return Err(EtcdError::Compacted.status());
        }
        let current = store
            .compact(revision)
            .await
            .map_err(|e| store_status(&e))?;
        Ok(Response::new(pb::CompactionResponse {
            header: Some(convert::header(current)),
        }))
    }
}

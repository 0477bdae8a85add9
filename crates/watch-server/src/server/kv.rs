//! The KV service: a thin translation over [`Store`].

use prost::Message;
use tonic::{Request, Response, Status};
use watch_proto::etcdserverpb as pb;
use watch_proto::status::EtcdError;

use super::convert::{self, store_status};
use crate::store::{Store, TxnOpResult};

/// etcd's `KV` service over a [`Store`].
#[derive(Debug, Clone)]
pub struct KvService {
    store: Store,
    /// Largest accepted request, in encoded bytes (etcd `--max-request-bytes`).
    max_request_bytes: usize,
}

impl KvService {
    /// The service over `store`, refusing requests larger than `max_request_bytes`.
    pub fn new(store: Store, max_request_bytes: usize) -> Self {
        Self {
            store,
            max_request_bytes,
        }
    }

    fn check_size(&self, m: &impl Message) -> Result<(), Status> {
        if m.encoded_len() > self.max_request_bytes {
            return Err(EtcdError::RequestTooLarge.status());
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl pb::kv_server::Kv for KvService {
    async fn range(
        &self,
        request: Request<pb::RangeRequest>,
    ) -> Result<Response<pb::RangeResponse>, Status> {
        let r = request.into_inner();
        self.check_size(&r)?;
        let req = convert::range_request(&r)?;
        let result = self.store.range(req).await.map_err(|e| store_status(&e))?;
        tracing::trace!(revision = result.revision, "range");
        Ok(Response::new(convert::range_response(result)))
    }

    async fn put(
        &self,
        request: Request<pb::PutRequest>,
    ) -> Result<Response<pb::PutResponse>, Status> {
        let r = request.into_inner();
        self.check_size(&r)?;
        match self
            .store
            .single(convert::put_op(&r))
            .await
            .map_err(|e| store_status(&e))?
        {
            TxnOpResult::Put(p) => {
                tracing::debug!(revision = p.revision, "put");
                Ok(Response::new(convert::put_response(p)))
            }
            _ => Err(Status::internal("a put returned another result kind")),
        }
    }

    async fn delete_range(
        &self,
        request: Request<pb::DeleteRangeRequest>,
    ) -> Result<Response<pb::DeleteRangeResponse>, Status> {
        let r = request.into_inner();
        self.check_size(&r)?;
        match self
            .store
            .single(convert::delete_op(&r))
            .await
            .map_err(|e| store_status(&e))?
        {
            TxnOpResult::Delete(d) => {
                tracing::debug!(revision = d.revision, "delete_range");
                Ok(Response::new(convert::delete_response(d)))
            }
            _ => Err(Status::internal("a delete returned another result kind")),
        }
    }

    async fn txn(
        &self,
        request: Request<pb::TxnRequest>,
    ) -> Result<Response<pb::TxnResponse>, Status> {
        let r = request.into_inner();
        self.check_size(&r)?;
        let req = convert::txn_request(&r)?;
        let result = self.store.txn(req).await.map_err(|e| store_status(&e))?;
        tracing::debug!(revision = result.revision, "txn");
        Ok(Response::new(convert::txn_response(result)))
    }

    async fn compact(
        &self,
        request: Request<pb::CompactionRequest>,
    ) -> Result<Response<pb::CompactionResponse>, Status> {
        let r = request.into_inner();
        // etcd treats a revision <= 0 like any revision at or below the compaction point.
        let revision = u64::try_from(r.revision).unwrap_or(0);
        let current = if revision == 0 {
            return Err(EtcdError::Compacted.status());
        } else {
            self.store
                .compact(revision)
                .await
                .map_err(|e| store_status(&e))?
        };
        Ok(Response::new(pb::CompactionResponse {
            header: Some(convert::header(current)),
        }))
    }
}

//! The KV service: a thin translation over [`Store`].

use prost::Message;
use tonic::{Request, Response, Status};
use watch_proto::etcdserverpb as pb;
use watch_proto::status::EtcdError;

use super::convert::{self, store_status};
use crate::auth::{Gate, Perm};
use kv_store::{Store, TxnOp, TxnOpResult, TxnRequest};

/// etcd's `KV` service over a [`Store`].
#[derive(Debug, Clone)]
pub struct KvService {
    store: Store,
    /// Largest accepted request, in encoded bytes (etcd `--max-request-bytes`).
    max_request_bytes: usize,
    /// Authorization of every request (off: one branch).
    gate: Gate,
}

impl KvService {
    /// The service over `store`, refusing requests larger than `max_request_bytes`.
    pub fn new(store: Store, max_request_bytes: usize) -> Self {
        Self {
            store,
            max_request_bytes,
            gate: Gate::off(),
        }
    }

    /// Checks every request against `gate`'s users and roles.
    pub fn with_gate(mut self, gate: Gate) -> Self {
        self.gate = gate;
        self
    }

    /// The store's pre-authorization checks of one put or delete (see [`Store::validate`]);
    /// with authentication off the store's own run of them is enough.
    fn validate_op(&self, op: &TxnOp) -> Result<(), Status> {
        if self.gate.auth().is_none() {
            return Ok(());
        }
        self.store
            .validate(&TxnRequest {
                compare: Vec::new(),
                success: vec![op.clone()],
                failure: Vec::new(),
            })
            .map_err(|e| store_status(&e))
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
        let result = self.store.range(req).await.map_err(|e| store_status(&e))?;
        tracing::trace!(revision = result.revision, "range");
        Ok(Response::new(convert::range_response(result)))
    }

    async fn put(
        &self,
        request: Request<pb::PutRequest>,
    ) -> Result<Response<pb::PutResponse>, Status> {
        // As etcd: a malformed request is refused as such before any auth error.
        self.check_size(request.get_ref())?;
        let op = convert::put_op(request.get_ref());
        self.validate_op(&op)?;
        if let Some(caller) = self.gate.caller(&request)? {
            caller.check_put(request.get_ref())?;
            // etcd's checkLeasePuts: attaching a lease needs write on the keys it holds.
            let lease = request.get_ref().lease;
            if lease != 0 {
                super::lease::check_lease_keys(&self.store, &caller, Perm::Write, lease).await?;
            }
        }
        match self.store.single(op).await.map_err(|e| store_status(&e))? {
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
        self.check_size(request.get_ref())?;
        let op = convert::delete_op(request.get_ref());
        self.validate_op(&op)?;
        if let Some(caller) = self.gate.caller(&request)? {
            caller.check_delete(request.get_ref())?;
        }
        match self.store.single(op).await.map_err(|e| store_status(&e))? {
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
        let caller = self.gate.caller(&request);
        let r = request.into_inner();
        self.check_size(&r)?;
        let req = convert::txn_request(&r)?;
        if self.gate.auth().is_some() {
            self.store.validate(&req).map_err(|e| store_status(&e))?;
        }
        if let Some(caller) = caller? {
            caller.check_txn(&r)?;
            for lease in super::lease::txn_leases(&r) {
                super::lease::check_lease_keys(&self.store, &caller, Perm::Write, lease).await?;
            }
        }
        let result = self.store.txn(req).await.map_err(|e| store_status(&e))?;
        tracing::debug!(revision = result.revision, "txn");
        Ok(Response::new(convert::txn_response(result)))
    }

    async fn compact(
        &self,
        request: Request<pb::CompactionRequest>,
    ) -> Result<Response<pb::CompactionResponse>, Status> {
        // Stricter than etcd 3.4, which checks nothing here: compaction discards the history
        // every watcher resumes from, so it is an admin (root role) operation.
        if let Some(caller) = self.gate.caller(&request)? {
            caller.check_admin()?;
        }
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

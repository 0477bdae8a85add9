//! Maintenance.Status and Cluster.MemberList.

use tonic::{Request, Response, Status};
use watch_proto::etcdserverpb as pb;

use super::convert::{self, MEMBER_ID, RAFT_TERM};
use kv_store::Store;

/// The etcd version reported by Status. Kubernetes enables its consistent reads from the
/// watch cache (which rely on ordered progress notifications) only for etcd >= 3.5.13.
pub const ETCD_VERSION: &str = "3.5.13";

/// etcd's `Maintenance` service: `Status` only.
#[derive(Debug, Clone)]
pub struct MaintenanceService {
    store: Store,
}

impl MaintenanceService {
    /// The service over `store`.
    pub fn new(store: Store) -> Self {
        Self { store }
    }
}

#[tonic::async_trait]
impl pb::maintenance_server::Maintenance for MaintenanceService {
    async fn status(
        &self,
        _request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let revision = self.store.durable_revision();
        let size = i64::try_from(self.store.disk_size()).unwrap_or(i64::MAX);
        let errors = self.store.failure().into_iter().collect();
        Ok(Response::new(pb::StatusResponse {
            header: Some(convert::header(revision)),
            version: ETCD_VERSION.to_owned(),
            db_size: size,
            leader: MEMBER_ID,
            raft_index: revision,
            raft_term: RAFT_TERM,
            raft_applied_index: revision,
            errors,
            db_size_in_use: size,
            is_learner: false,
            ..Default::default()
        }))
    }
}

/// etcd's `Cluster` service: `MemberList` reports this single member.
#[derive(Debug, Clone)]
pub struct ClusterService {
    store: Store,
    client_url: String,
}

impl ClusterService {
    /// The service; `client_url` is the URL clients reach this server at.
    pub fn new(store: Store, client_url: String) -> Self {
        Self { store, client_url }
    }
}

#[tonic::async_trait]
impl pb::cluster_server::Cluster for ClusterService {
    async fn member_list(
        &self,
        _request: Request<pb::MemberListRequest>,
    ) -> Result<Response<pb::MemberListResponse>, Status> {
        // etcd's cluster service fills no revision in its header (its cluster server builds
        // the header from the cluster, not from the KV store).
        let header = pb::ResponseHeader {
            revision: 0,
            ..convert::header(self.store.durable_revision())
        };
        Ok(Response::new(pb::MemberListResponse {
            header: Some(header),
            members: vec![pb::Member {
                id: MEMBER_ID,
                name: "keywatch".to_owned(),
                peer_ur_ls: Vec::new(),
                client_ur_ls: vec![self.client_url.clone()],
                is_learner: false,
            }],
        }))
    }
}

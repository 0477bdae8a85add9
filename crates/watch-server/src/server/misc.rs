//! The Maintenance service (Status, Alarm, Hash, HashKV, Snapshot, Defragment, MoveLeader)
//! and Cluster.MemberList.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use watch_proto::etcdserverpb as pb;
use watch_proto::status::EtcdError;

use super::convert::{self, MEMBER_ID, RAFT_TERM, store_status};
use crate::auth::Gate;
use kv_store::{Alarm, AlarmMember, Store};

/// The etcd version reported by Status. Kubernetes enables its consistent reads from the
/// watch cache (which rely on ordered progress notifications) only for etcd >= 3.5.13.
pub const ETCD_VERSION: &str = "3.5.13";

/// Bytes per Snapshot message, as etcd (`32 * 1024`).
pub const SNAPSHOT_CHUNK: usize = 32 * 1024;

/// `etcdctl snapshot save` accepts a file only when its size is `512 * n + 32` (a bbolt file
/// is page-sized, plus the SHA-256): the backup is padded with zeros to a multiple of this.
const SNAPSHOT_ALIGN: u64 = 512;

/// Snapshot messages queued ahead of a slow client (bounded memory: 8 × 32 KiB).
const SNAPSHOT_DEPTH: usize = 8;

/// etcd's `Maintenance` service over the store. Defragment, Hash, HashKV and Snapshot need
/// the root role when authentication is on, as in etcd.
#[derive(Debug, Clone)]
pub struct MaintenanceService {
    store: Store,
    gate: Gate,
}

impl MaintenanceService {
    /// The service over `store`, with authentication off until [`Self::with_gate`]. Removes
    /// the temporary backup files a crash during a Snapshot may have left in the data
    /// directory.
    pub fn new(store: Store) -> Self {
        if let Ok(entries) = std::fs::read_dir(store.dir()) {
            for e in entries.flatten() {
                let name = e.file_name();
                let name = name.to_string_lossy();
                if name.starts_with(SNAPSHOT_TMP_PREFIX) && name.ends_with(".tmp") {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        Self {
            store,
            gate: Gate::off(),
        }
    }

    /// Checks callers through `gate`.
    pub fn with_gate(mut self, gate: Gate) -> Self {
        self.gate = gate;
        self
    }

    /// etcd's admin check of Snapshot, Hash, HashKV and Defragment: root only, refused with
    /// etcd's unconverted "auth: permission denied" (code Unknown, measured).
    fn check_admin<T>(&self, request: &Request<T>) -> Result<(), Status> {
        if let Some(caller) = self.gate.caller(request)? {
            caller
                .check_admin()
                .map_err(|_| EtcdError::AdminPermissionDenied)?;
        }
        Ok(())
    }
}

fn alarm_type(a: Alarm) -> pb::AlarmType {
    match a {
        Alarm::None => pb::AlarmType::None,
        Alarm::NoSpace => pb::AlarmType::Nospace,
        Alarm::Corrupt => pb::AlarmType::Corrupt,
    }
}

fn alarm_member(a: AlarmMember) -> pb::AlarmMember {
    pb::AlarmMember {
        member_id: a.member,
        alarm: alarm_type(a.alarm) as i32,
    }
}

/// An active alarm as etcd writes it in Status `errors`: the proto text form, trailing space.
pub fn alarm_text(a: AlarmMember) -> String {
    format!(
        "memberID:{} alarm:{} ",
        a.member,
        alarm_type(a.alarm).as_str_name()
    )
}

/// Why [`restore_snapshot`] failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RestoreError {
    /// The snapshot file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not a snapshot stream's content: too short, or its SHA-256 trailer does
    /// not match (as `etcdctl snapshot restore` checks).
    #[error("{path}: {message}")]
    Checksum {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The backup inside could not be installed.
    #[error(transparent)]
    Store(#[from] kv_store::StoreError),
    /// The users and roles inside could not be installed.
    #[error(transparent)]
    Auth(#[from] crate::auth::AuthStoreError),
}

/// Installs a snapshot as Maintenance.Snapshot streamed it (the backup, zero padding, then
/// the SHA-256 of both: what `etcdctl snapshot save` writes) as the new data directory
/// `data_dir`, after checking the digest. See [`kv_store::restore`].
pub fn restore_snapshot(
    file: &std::path::Path,
    data_dir: &std::path::Path,
) -> Result<kv_store::RestoreInfo, RestoreError> {
    use std::io::{Read, Seek, SeekFrom};
    let read_err = |source| RestoreError::Read {
        path: file.to_owned(),
        source,
    };
    let mut f = std::fs::File::open(file).map_err(read_err)?;
    let len = f.metadata().map_err(read_err)?.len();
    let digest_len = Sha256::output_size() as u64;
    if len < digest_len {
        return Err(RestoreError::Checksum {
            path: file.to_owned(),
            message: format!("{len} bytes: too short to hold a SHA-256 trailer"),
        });
    }
    let body = len - digest_len;
    let mut digest = Sha256::new();
    std::io::copy(&mut (&mut f).take(body), &mut digest).map_err(read_err)?;
    let mut expected = vec![0u8; digest_len as usize];
    f.read_exact(&mut expected).map_err(read_err)?;
    if digest.finalize().as_slice() != expected.as_slice() {
        return Err(RestoreError::Checksum {
            path: file.to_owned(),
            message: "the SHA-256 trailer does not match the content".to_owned(),
        });
    }
    f.seek(SeekFrom::Start(0)).map_err(read_err)?;
    let info = kv_store::restore(f.take(body), data_dir)?;
    for (name, data) in &info.extras {
        match name.as_str() {
            AUTH_EXTRA => crate::auth::import_records(data_dir, data)?,
            other => tracing::warn!(
                extra = other,
                "backup extra unknown to this version; skipped"
            ),
        }
    }
    Ok(info)
}

/// A backup file being streamed; removed when dropped.
struct TempBackup(PathBuf);

impl Drop for TempBackup {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The backup extra holding the users and roles (the records file's content).
const AUTH_EXTRA: &str = "auth";

/// Name prefix of the temporary backup files in the data directory.
const SNAPSHOT_TMP_PREFIX: &str = "snapshot-";

/// Distinguishes concurrent snapshots' temporary files.
static SNAPSHOT_SEQ: AtomicU64 = AtomicU64::new(0);

type SnapshotStream = ReceiverStream<Result<pb::SnapshotResponse, Status>>;

#[tonic::async_trait]
impl pb::maintenance_server::Maintenance for MaintenanceService {
    async fn alarm(
        &self,
        request: Request<pb::AlarmRequest>,
    ) -> Result<Response<pb::AlarmResponse>, Status> {
        let r = request.into_inner();
        let alarm = match pb::AlarmType::try_from(r.alarm) {
            Ok(pb::AlarmType::None) => Alarm::None,
            Ok(pb::AlarmType::Nospace) => Alarm::NoSpace,
            Ok(pb::AlarmType::Corrupt) => Alarm::Corrupt,
            Err(_) => return Err(Status::invalid_argument("unknown alarm type")),
        };
        let changed = |done: bool| {
            done.then(|| {
                alarm_member(AlarmMember {
                    member: r.member_id,
                    alarm,
                })
            })
        };
        let alarms = match pb::alarm_request::AlarmAction::try_from(r.action) {
            // etcd lists every alarm for NONE, else those of that type (any member).
            Ok(pb::alarm_request::AlarmAction::Get) => self
                .store
                .alarms()
                .into_iter()
                .filter(|a| alarm == Alarm::None || a.alarm == alarm)
                .map(alarm_member)
                .collect(),
            Ok(pb::alarm_request::AlarmAction::Activate) => {
                changed(self.store.activate_alarm(r.member_id, alarm))
                    .into_iter()
                    .collect()
            }
            Ok(pb::alarm_request::AlarmAction::Deactivate) => {
                changed(self.store.deactivate_alarm(r.member_id, alarm))
                    .into_iter()
                    .collect()
            }
            Err(_) => return Err(Status::invalid_argument("unknown alarm action")),
        };
        // etcd's Alarm response carries no header (measured).
        Ok(Response::new(pb::AlarmResponse {
            header: None,
            alarms,
        }))
    }

    async fn status(
        &self,
        _request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let revision = self.store.durable_revision();
        let size = self.store.disk_size();
        // What the quota counts (live data); capped at the files' size, as etcd's in-use
        // figure never exceeds its file (a freshly defragmented file could hold less than
        // the per-entry overheads `bytes_in_use` adds).
        let in_use = i64::try_from(self.store.bytes_in_use().min(size)).unwrap_or(i64::MAX);
        let size = i64::try_from(size).unwrap_or(i64::MAX);
        let mut errors: Vec<String> = self.store.failure().into_iter().collect();
        errors.extend(self.store.alarms().into_iter().map(alarm_text));
        Ok(Response::new(pb::StatusResponse {
            header: Some(convert::header(revision)),
            version: ETCD_VERSION.to_owned(),
            db_size: size,
            leader: MEMBER_ID,
            // No raft: the revision is the index of the last applied (and committed) write.
            raft_index: revision,
            raft_term: RAFT_TERM,
            raft_applied_index: revision,
            errors,
            db_size_in_use: in_use,
            is_learner: false,
            // `dbSizeQuota` (3.6) stays unset, as etcd 3.4 leaves it.
            ..Default::default()
        }))
    }

    async fn defragment(
        &self,
        request: Request<pb::DefragmentRequest>,
    ) -> Result<Response<pb::DefragmentResponse>, Status> {
        self.check_admin(&request)?;
        self.store
            .defragment()
            .await
            .map_err(|e| store_status(&e))?;
        Ok(Response::new(pb::DefragmentResponse {
            header: Some(convert::header(self.store.durable_revision())),
        }))
    }

    async fn hash(
        &self,
        request: Request<pb::HashRequest>,
    ) -> Result<Response<pb::HashResponse>, Status> {
        self.check_admin(&request)?;
        let (hash, revision) = self.store.hash().await.map_err(|e| store_status(&e))?;
        Ok(Response::new(pb::HashResponse {
            header: Some(convert::header(revision)),
            hash,
        }))
    }

    async fn hash_kv(
        &self,
        request: Request<pb::HashKvRequest>,
    ) -> Result<Response<pb::HashKvResponse>, Status> {
        self.check_admin(&request)?;
        let revision = request.into_inner().revision;
        // A negative revision is taken as 0, the current state (etcd hashes no key for it).
        let h = self
            .store
            .hash_kv(u64::try_from(revision).unwrap_or(0))
            .await
            .map_err(|e| store_status(&e))?;
        Ok(Response::new(pb::HashKvResponse {
            header: Some(convert::header(h.revision)),
            hash: h.hash,
            // etcd reports -1 when never compacted (measured).
            compact_revision: match h.compacted {
                0 => -1,
                c => i64::try_from(c).unwrap_or(i64::MAX),
            },
        }))
    }

    type SnapshotStream = SnapshotStream;

    async fn snapshot(
        &self,
        request: Request<pb::SnapshotRequest>,
    ) -> Result<Response<Self::SnapshotStream>, Status> {
        self.check_admin(&request)?;
        if self.store.mirror_scope().is_some() {
            // A mirror's keys carry the upstream's lease IDs, and its history starts at its
            // own floor: restored standalone, it would not be the upstream's data. Back up
            // the upstream etcd instead.
            return Err(Status::failed_precondition(
                "keywatch: this server mirrors an upstream etcd; take the snapshot from etcd",
            ));
        }
        let seq = SNAPSHOT_SEQ.fetch_add(1, Ordering::Relaxed);
        let path = self.store.dir().join(format!(
            "{SNAPSHOT_TMP_PREFIX}{}-{seq}.tmp",
            std::process::id()
        ));
        let file = TempBackup(path);
        // The users and roles travel with the store (etcd's snapshot holds them too).
        let mut extras = Vec::new();
        if let Some(auth) = self.gate.manager() {
            extras.push((AUTH_EXTRA.to_owned(), auth.export().await));
        }
        let info = self
            .store
            .backup(&file.0, extras)
            .await
            .map_err(|e| store_status(&e))?;
        let total = info.bytes.div_ceil(SNAPSHOT_ALIGN) * SNAPSHOT_ALIGN;
        tracing::info!(
            revision = info.revision,
            bytes = total,
            "sending a snapshot"
        );
        let mut f = tokio::fs::File::open(&file.0)
            .await
            .map_err(|e| Status::internal(format!("opening the backup: {e}")))?;
        let (tx, rx) = mpsc::channel(SNAPSHOT_DEPTH);
        tokio::spawn(async move {
            // Owns the file until the stream ends (or the client goes away).
            let _file = file;
            let mut digest = Sha256::new();
            let mut sent = 0u64;
            while sent < total {
                let want = usize::try_from((total - sent).min(SNAPSHOT_CHUNK as u64))
                    .unwrap_or(SNAPSHOT_CHUNK);
                let mut blob = vec![0u8; want];
                // Past the file's end the blob stays zero: the padding.
                let mut filled = 0;
                while filled < want {
                    match f.read(&mut blob[filled..]).await {
                        Ok(0) => break,
                        Ok(n) => filled += n,
                        Err(e) => {
                            let _ = tx
                                .send(Err(Status::internal(format!("reading the backup: {e}"))))
                                .await;
                            return;
                        }
                    }
                }
                digest.update(&blob);
                sent += want as u64;
                let msg = pb::SnapshotResponse {
                    header: None,
                    remaining_bytes: total - sent,
                    blob: blob.into(),
                };
                if tx.send(Ok(msg)).await.is_err() {
                    return;
                }
            }
            let _ = tx
                .send(Ok(pb::SnapshotResponse {
                    header: None,
                    remaining_bytes: 0,
                    blob: digest.finalize().to_vec().into(),
                }))
                .await;
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn move_leader(
        &self,
        request: Request<pb::MoveLeaderRequest>,
    ) -> Result<Response<pb::MoveLeaderResponse>, Status> {
        // A single member is always the leader: it can transfer only to itself (a no-op
        // that succeeds, as on a single-member etcd).
        if request.into_inner().target_id != MEMBER_ID {
            return Err(EtcdError::BadLeaderTransferee.into());
        }
        Ok(Response::new(pb::MoveLeaderResponse {
            header: Some(convert::header(self.store.durable_revision())),
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

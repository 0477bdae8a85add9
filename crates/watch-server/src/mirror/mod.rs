//! Mirror mode: keywatch as a watch fan-out tier over an etcd cluster (`docs/cluster.md`).
//!
//! A [`Mirror`] keeps a [`Store`] a replica of an upstream etcd's keyspace (or of some
//! prefixes of it) under **etcd's own revision numbers**:
//!
//! 1. First start: a snapshot of the mirrored ranges at one revision `R` (paginated `Range`,
//!    every page pinned to `R`), installed with [`Store`]'s mirror reset (floor `R + 1`).
//! 2. Then **one** upstream watch per replica, from the mirror's revision + 1, with `prev_kv`
//!    and progress notifications. It covers the smallest single range holding every mirrored
//!    prefix; events outside the prefixes are dropped (their revision still advances the
//!    mirror). One watch, not one per prefix: etcd orders one watch's responses and never
//!    splits a revision across them, so every response ends on a revision boundary and the
//!    mirror's position is simply the last revision seen; merging several watches would need
//!    progress from all of them before any revision is complete.
//! 3. Each upstream revision becomes one change set (atomic delivery downstream), appended
//!    through the store's write path; a progress notification advances the position by an
//!    empty change set, so the position is durable and a restart resumes at position + 1.
//! 4. Failure: a broken stream, a member without leader (`hasleader` metadata makes etcd end
//!    the stream) or a dead endpoint → the next endpoint, resuming at position + 1 (no gap,
//!    no duplicate: the store refuses a revision that does not increase). An upstream
//!    compacted past the position → a fresh snapshot, and every downstream watcher is
//!    canceled as compacted at the new floor, as etcd does.
//!
//! Which progress notifications are trusted: those a watch sends on its own (periodic,
//! `watch_id` of the watch) go through the watch's event channel in every etcd version. The
//! ones answering a `WatchProgressRequest` (`watch_id` -1) were sent out of order with events
//! before etcd 3.4.25 / 3.5.8 (etcd #15220), so they are used only when the upstream reports
//! a fixed version in `Maintenance.Status`.
//!
//! [`Mirror::status`] publishes a [`MirrorStatus`] (connected or not, mirrored revision,
//! endpoint) for health checks and metrics.
//!
//! # Parts
//!
//! - `mirror` (mirror mode, `--upstream`; design and guarantees in `docs/cluster.md`): `Mirror`
//!   (start, `status()` = `watch::Receiver<MirrorStatus>` for health/metrics, `wait_for`: the
//!   barrier of linearizable reads and forwarded writes, failing with a typed `BarrierError`;
//!   mirror imports nothing of the server), `sync` (the one task per replica:
//!   paginated snapshot pinned at one revision, then one upstream watch over the prefixes'
//!   covering range with `prev_kv`, progress and `hasleader`; endpoint rotation; resync on
//!   upstream compaction); the mirror's own retention
//!   (`--upstream-retain-revisions`, compaction off the apply path). The store side
//!   (`mirror_apply`, `mirror_reset`, `MirrorScope`) is kv-store's `mirror.rs`. Uses only watch-proto's generated
//!   clients (no etcd-client in product code). The server starts the mirror once the store is
//!   open (a standalone server refuses a mirror's data dir: `mirror::refuse_standalone`); health
//!   follows its connection (`follow_mirror`: the health handle's own mirror input, NOT_SERVING
//!   unless the upstream watch is open), `hasleader` watch streams end with "no leader" while it
//!   is not (`WatchService::with_mirror_status`), and `server/metrics.rs` exports `keywatch_mirror_connected` and
//!   `keywatch_mirror_revision`.

mod sync;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, watch};
use tonic::transport::{Channel, Endpoint};
use watch_core::Revision;

use kv_store::StoreError;
use kv_store::{MirrorScope, Store};

/// Default [`MirrorConfig::max_response_bytes`]: etcd clientv3's receive limit
/// (`math.MaxInt32`), so every answer etcd can give (a snapshot page of large values) fits.
pub const DEFAULT_MAX_RESPONSE_BYTES: usize = i32::MAX as usize;

/// File of the data directory recording what it mirrors (prefixes, upstream cluster ID).
pub const MIRROR_META_FILE: &str = "mirror.toml";

/// Settings of a [`Mirror`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct MirrorConfig {
    /// Upstream etcd client URLs (`http://host:port`; a bare `host:port` gets `http://`).
    pub endpoints: Vec<String>,
    /// Mirrored key prefixes; none (or an empty one) mirrors the whole keyspace.
    pub prefixes: Vec<Bytes>,
    /// Keys per page of the snapshot `Range` (default 1000).
    pub snapshot_page: usize,
    /// Longest a linearizable read or a forwarded write waits for the mirror to reach the
    /// upstream's revision before failing with `Unavailable` (default 5 s).
    pub barrier_timeout: Duration,
    /// Timeout of a TCP connect to an endpoint (default 2 s, etcdctl's dial timeout).
    pub connect_timeout: Duration,
    /// The mirror's own retention: keep the history of the last this many upstream revisions
    /// and compact the rest (the state is kept whole). `None` (default): keep everything.
    pub retain_revisions: Option<u64>,
    /// Largest response accepted from the upstream, in bytes (snapshot pages, forwarded
    /// answers, watch responses; default [`DEFAULT_MAX_RESPONSE_BYTES`]). A larger one fails
    /// that call (a snapshot is retried; lower `snapshot_page` if pages are too large).
    pub max_response_bytes: usize,
}

impl MirrorConfig {
    /// Mirrors `prefixes` (none: everything) of the etcd cluster at `endpoints`.
    pub fn new(endpoints: Vec<String>, prefixes: Vec<Bytes>) -> Self {
        Self {
            endpoints,
            prefixes,
            snapshot_page: 1000,
            barrier_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(2),
            retain_revisions: None,
            max_response_bytes: DEFAULT_MAX_RESPONSE_BYTES,
        }
    }
}

/// Where the mirror stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum MirrorState {
    /// No usable upstream (starting, or every endpoint failed lately): local data may be stale.
    #[default]
    Disconnected,
    /// Connected and loading a fresh snapshot (first start or after an upstream compaction).
    Syncing,
    /// The upstream watch is open and being applied.
    Connected,
}

/// What a mirror publishes for health checks and metrics ([`Mirror::status`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct MirrorStatus {
    /// Connection state.
    pub state: MirrorState,
    /// The mirrored revision: every upstream revision up to it is applied locally.
    pub revision: Revision,
    /// The endpoint in use (or last tried).
    pub endpoint: Option<String>,
    /// The last upstream error, cleared when a watch is established.
    pub error: Option<String>,
}

impl MirrorStatus {
    /// True when the upstream watch is open (health: SERVING).
    pub fn is_connected(&self) -> bool {
        self.state == MirrorState::Connected
    }
}

/// Why a mirror could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MirrorError {
    /// No upstream endpoint was given.
    #[error("mirror mode needs at least one upstream endpoint")]
    NoEndpoints,
    /// An endpoint is not a valid URL.
    #[error("invalid upstream endpoint {endpoint:?}: {message}")]
    Endpoint {
        /// The endpoint as given.
        endpoint: String,
        /// The parser's message.
        message: String,
    },
    /// The data directory holds a store that is not a mirror, or mirrors other prefixes.
    #[error("data directory {dir}: {message}")]
    DataDir {
        /// The data directory.
        dir: String,
        /// What does not match.
        message: String,
    },
    /// The store refused to become a mirror.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A standalone server (no `--upstream`) was given a mirror's data directory: serving it
    /// would accept local writes on a replica's keyspace, and a later mirror start would
    /// diverge silently from etcd.
    #[error(
        "data directory {dir} holds a mirror of an etcd cluster ({file} present); start it \
         with --upstream, or use a fresh data directory for a standalone server"
    )]
    MirrorDirWithoutUpstream {
        /// The data directory.
        dir: String,
        /// The mirror file found in it.
        file: &'static str,
    },
}

/// Why [`Mirror::wait_for`] failed. The server maps it to a gRPC status in one place, with
/// the store's errors.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BarrierError {
    /// The mirror did not apply the target revision within
    /// [`MirrorConfig::barrier_timeout`] (the upstream is unreachable or slow): a client
    /// should retry or go elsewhere.
    #[error(
        "keywatch mirror: upstream revision {target} not mirrored within {timeout:?} (mirror \
         at {mirrored}, {state:?})"
    )]
    Timeout {
        /// The upstream revision waited for.
        target: Revision,
        /// The barrier timeout.
        timeout: Duration,
        /// The mirror's revision when it gave up.
        mirrored: Revision,
        /// The mirror's connection state then.
        state: MirrorState,
    },
    /// The store failed or closed while waiting.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Refuses a mirror's data directory (one holding [`MIRROR_META_FILE`] or
/// [`kv_store::MIRROR_FLOOR_FILE`]) for a standalone server.
pub fn refuse_standalone(dir: &Path) -> Result<(), MirrorError> {
    for file in [MIRROR_META_FILE, kv_store::MIRROR_FLOOR_FILE] {
        if dir.join(file).exists() {
            return Err(MirrorError::MirrorDirWithoutUpstream {
                dir: dir.display().to_string(),
                file,
            });
        }
    }
    Ok(())
}

/// The mirror's record in the data directory.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Meta {
    /// Mirrored prefixes, hex-encoded (keys are bytes).
    prefixes: Vec<String>,
    /// The upstream's cluster ID once known; another cluster is refused.
    cluster_id: Option<u64>,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl Meta {
    fn path(dir: &Path) -> std::path::PathBuf {
        dir.join(MIRROR_META_FILE)
    }

    fn load(dir: &Path) -> Result<Option<Meta>, String> {
        match std::fs::read_to_string(Self::path(dir)) {
            Ok(text) => toml::from_str(&text).map(Some).map_err(|e| e.to_string()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Writes atomically (tmp + fsync + rename + dir fsync).
    fn store(&self, dir: &Path) -> Result<(), String> {
        use std::io::Write;
        let text = toml::to_string(self).map_err(|e| e.to_string())?;
        let tmp = dir.join(format!("{MIRROR_META_FILE}.tmp"));
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(text.as_bytes())?;
            f.sync_all()?;
            drop(f);
            std::fs::rename(&tmp, Self::path(dir))?;
            std::fs::File::open(dir)?.sync_all()
        };
        write().map_err(|e| e.to_string())
    }
}

/// True when `version` (etcd's `Maintenance.Status` version) orders requested progress
/// notifications with events: 3.4.25+, 3.5.8+, 3.6+ (etcd #15220, PR #15237).
fn progress_ordered(version: &str) -> bool {
    let mut parts = version.split('.').map(|p| {
        p.chars()
            .take_while(char::is_ascii_digit)
            .collect::<String>()
            .parse::<u64>()
            .unwrap_or(0)
    });
    let (major, minor, patch) = (
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
    );
    match (major, minor) {
        (3, 4) => patch >= 25,
        (3, 5) => patch >= 8,
        (3, m) => m > 5,
        (m, _) => m > 3,
    }
}

pub(crate) struct Inner {
    store: Store,
    config: MirrorConfig,
    scope: MirrorScope,
    /// One lazily connected channel per endpoint, in `config.endpoints` order.
    channels: Vec<(String, Channel)>,
    /// The endpoint the upstream watch uses; forwarded requests go to it too.
    current: AtomicUsize,
    /// True when the upstream's requested progress notifications are ordered (see the module
    /// docs); set by each session from the endpoint's version.
    progress_trusted: AtomicBool,
    /// Barrier waiters ask the session for a progress request.
    progress_wanted: Notify,
    status: watch::Sender<MirrorStatus>,
    /// Set once when the mirror cannot go on (another cluster, a store failure).
    fatal: watch::Sender<Option<String>>,
    task: parking_lot::Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// True while a retention compaction runs (at most one at a time).
    compacting: Arc<AtomicBool>,
    /// The last retention compaction task, awaited by [`Mirror::stop`] so none runs on into
    /// the store's close.
    retention: parking_lot::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// A running mirror. Cheap to clone; every clone is the same mirror.
#[derive(Clone)]
pub struct Mirror {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Mirror {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mirror")
            .field("scope", &self.inner.scope)
            .field("status", &*self.inner.status.borrow())
            .finish_non_exhaustive()
    }
}

impl Mirror {
    /// Makes `store` a mirror of the upstream in `config` and starts the sync task on the
    /// current tokio runtime. Returns at once: the mirror connects, snapshots and follows in
    /// the background ([`Mirror::status`] tells where it is). Fails when the data directory
    /// holds a non-mirror store or mirrors other prefixes.
    pub fn start(store: Store, config: MirrorConfig) -> Result<Mirror, MirrorError> {
        if config.endpoints.is_empty() {
            return Err(MirrorError::NoEndpoints);
        }
        let mut channels = Vec::with_capacity(config.endpoints.len());
        for e in &config.endpoints {
            let url = if e.contains("://") {
                e.clone()
            } else {
                format!("http://{e}")
            };
            if !url.starts_with("http://") {
                // tonic would accept an https:// URL and then fail every connect (no TLS
                // configured), retrying forever: refuse it here with the reason.
                return Err(MirrorError::Endpoint {
                    endpoint: e.clone(),
                    message: "only http:// endpoints are supported (upstream TLS is not)"
                        .to_owned(),
                });
            }
            let endpoint =
                Endpoint::from_shared(url.clone()).map_err(|err| MirrorError::Endpoint {
                    endpoint: e.clone(),
                    message: err.to_string(),
                })?;
            let channel = endpoint
                .connect_timeout(config.connect_timeout)
                .tcp_nodelay(true)
                // A member that vanished without closing TCP is noticed within ~15 s.
                .http2_keep_alive_interval(Duration::from_secs(10))
                .keep_alive_timeout(Duration::from_secs(5))
                .keep_alive_while_idle(true)
                .connect_lazy();
            channels.push((url, channel));
        }
        let scope = MirrorScope::new(config.prefixes.iter().cloned());
        let dir = store.dir().to_path_buf();
        let data_dir = |message: String| MirrorError::DataDir {
            dir: dir.display().to_string(),
            message,
        };
        let prefixes: Vec<String> = scope.prefixes().iter().map(|p| hex(p)).collect();
        match Meta::load(&dir).map_err(data_dir)? {
            Some(meta) if meta.prefixes != prefixes => {
                return Err(data_dir(format!(
                    "it mirrors other prefixes (hex {:?}); use a fresh data directory",
                    meta.prefixes
                )));
            }
            Some(_) => {}
            None if store.current_revision() > 1 || store.key_count() > 0 => {
                return Err(data_dir(
                    "it holds a standalone store, not a mirror; use a fresh data directory"
                        .to_owned(),
                ));
            }
            None => Meta {
                prefixes,
                cluster_id: None,
            }
            .store(&dir)
            .map_err(data_dir)?,
        }
        store.set_mirror(scope.clone())?;
        let (status, _) = watch::channel(MirrorStatus {
            revision: store.current_revision(),
            ..MirrorStatus::default()
        });
        let (fatal, _) = watch::channel(None);
        let inner = Arc::new(Inner {
            store,
            config,
            scope,
            channels,
            current: AtomicUsize::new(0),
            progress_trusted: AtomicBool::new(false),
            progress_wanted: Notify::new(),
            status,
            fatal,
            task: parking_lot::Mutex::new(None),
            compacting: Arc::new(AtomicBool::new(false)),
            retention: parking_lot::Mutex::new(None),
        });
        let task = tokio::spawn(sync::run(inner.clone()));
        *inner.task.lock() = Some(task);
        Ok(Mirror { inner })
    }

    /// The mirror's status, updated as it connects, syncs and applies revisions. Health checks
    /// and metrics subscribe here.
    pub fn status(&self) -> watch::Receiver<MirrorStatus> {
        self.inner.status.subscribe()
    }

    /// The mirrored scope.
    pub fn scope(&self) -> &MirrorScope {
        &self.inner.scope
    }

    /// The store kept in sync.
    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    /// Resolves with a message when the mirror stopped for good (the data directory mirrors
    /// another cluster, or the store failed); a server then shuts down.
    pub async fn failed(&self) -> String {
        let mut rx = self.inner.fatal.subscribe();
        let msg = rx.wait_for(|f| f.is_some()).await.map(|f| f.clone());
        match msg {
            Ok(Some(m)) => m,
            _ => std::future::pending().await,
        }
    }

    /// Stops the sync task and waits for a retention compaction in flight to finish (it is
    /// not aborted halfway: its snapshot write runs on a blocking thread anyway). The store
    /// stays open; close it separately, after this.
    pub async fn stop(&self) {
        let task = self.inner.task.lock().take();
        if let Some(task) = task {
            task.abort();
            let _ = task.await;
        }
        // The sync task is gone: no new retention task can start.
        let retention = self.inner.retention.lock().take();
        if let Some(r) = retention {
            let _ = r.await;
        }
    }

    /// True when the upstream in use orders requested progress notifications with events
    /// (see the module docs).
    pub fn progress_trusted(&self) -> bool {
        self.inner.progress_trusted.load(Ordering::Acquire)
    }

    /// A channel to the endpoint in use, for forwarded requests.
    pub(crate) fn channel(&self) -> Channel {
        let i = self.inner.current.load(Ordering::Acquire) % self.inner.channels.len();
        self.inner.channels[i].1.clone()
    }

    /// Largest response accepted from the upstream ([`MirrorConfig::max_response_bytes`]).
    pub(crate) fn max_response_bytes(&self) -> usize {
        self.inner.config.max_response_bytes
    }

    /// Waits until the mirror has applied (durably) every upstream revision up to `target`,
    /// asking the upstream for progress every 100 ms while it waits (as Kubernetes' watch cache
    /// does) when those answers are trusted. Fails with [`BarrierError::Timeout`] after the
    /// barrier timeout.
    pub async fn wait_for(&self, target: Revision) -> Result<(), BarrierError> {
        let store = &self.inner.store;
        let deadline = tokio::time::Instant::now() + self.inner.config.barrier_timeout;
        loop {
            if self.inner.progress_trusted.load(Ordering::Acquire)
                && store.current_revision() < target
            {
                self.inner.progress_wanted.notify_one();
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Err(BarrierError::Timeout {
                    target,
                    timeout: self.inner.config.barrier_timeout,
                    mirrored: store.current_revision(),
                    state: self.inner.status.borrow().state,
                });
            }
            let step = (deadline - now).min(Duration::from_millis(100));
            match tokio::time::timeout(step, store.wait_revision(target)).await {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(e)) => return Err(e.into()),
                Err(_) => continue,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_ordering_by_version() {
        assert!(!progress_ordered("3.4.23"));
        assert!(progress_ordered("3.4.25"));
        assert!(!progress_ordered("3.5.7"));
        assert!(progress_ordered("3.5.13"));
        assert!(progress_ordered("3.6.0"));
        assert!(!progress_ordered("garbage"));
    }
}

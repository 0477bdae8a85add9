//! Mirror mode: keywatch as a watch fan-out tier over an etcd cluster (`docs/cluster.md`).
//!
//! A [`Mirror`] keeps a [`Store`] a replica of an upstream etcd's keyspace (or of some
//! prefixes of it) under **etcd's own revision numbers**:
//!
//! 1. First start: a snapshot of the mirrored ranges at one revision `R` (paginated `Range`,
//!    every page pinned to `R`, pages sized in bytes), each page streamed into a
//!    [`Store::mirror_snapshot`] and dropped, installed at once at the end (floor `R + 1`).
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
//!   paginated snapshot pinned at one revision, streamed page by page into the store, then one upstream watch over the prefixes'
//!   covering range with `prev_kv`, progress and `hasleader`; endpoint rotation; resync on
//!   upstream compaction); the mirror's own retention
//!   (`--upstream-retain-revisions`, compaction off the apply path). The store side
//!   (`mirror_apply`, `mirror_snapshot`, `MirrorScope`) is kv-store's `mirror.rs`. Uses only watch-proto's generated
//!   clients (no etcd-client in product code). The server starts the mirror once the store is
//!   open (a standalone server refuses a mirror's data dir: `mirror::refuse_standalone`); health
//!   follows its connection (`follow_mirror`: the health handle's own mirror input, NOT_SERVING
//!   unless the upstream watch is open), `hasleader` watch streams end with "no leader" while it
//!   is not (`WatchService::with_mirror_status`), and `server/metrics.rs` exports `keywatch_mirror_connected` and
//!   `keywatch_mirror_revision`.

mod sync;
mod upstream;

pub(crate) use upstream::Resend;
pub use upstream::{TOKEN_REFRESH, TokenInterceptor, UpstreamAuth, UpstreamChannel, UpstreamTls};

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, watch};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use watch_core::Revision;

use kv_store::StoreError;
use kv_store::{MirrorScope, Store};

/// Default [`MirrorConfig::max_response_bytes`]: etcd clientv3's receive limit
/// (`math.MaxInt32`), so every answer etcd can give (a snapshot page of large values) fits.
pub const DEFAULT_MAX_RESPONSE_BYTES: usize = i32::MAX as usize;

/// Default [`MirrorConfig::snapshot_page_bytes`]: 4 MiB per page, a few thousand typical
/// Kubernetes objects, a few etcd round trips per second of loading.
pub const DEFAULT_SNAPSHOT_PAGE_BYTES: usize = 4 << 20;

/// Keys the first snapshot page asks for at most, before any size is known (about 16 MiB
/// with etcd's largest values of 1.5 MiB).
pub const FIRST_SNAPSHOT_PAGE_KEYS: usize = 10;

/// File of the data directory recording what it mirrors (prefixes, upstream cluster ID).
pub const MIRROR_META_FILE: &str = "mirror.toml";

/// Settings of a [`Mirror`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct MirrorConfig {
    /// Upstream etcd client URLs (`http://host:port` or `https://host:port`; a bare
    /// `host:port` gets `http://`, or `https://` when [`tls`](Self::tls) is set).
    pub endpoints: Vec<String>,
    /// TLS towards the upstream; required by https endpoints.
    pub tls: Option<UpstreamTls>,
    /// etcd credentials (`None`: etcd without authentication, or one that authenticates by
    /// the client certificate's common name).
    pub auth: Option<UpstreamAuth>,
    /// Mirrored key prefixes; none (or an empty one) mirrors the whole keyspace.
    pub prefixes: Vec<Bytes>,
    /// Most keys per page of the snapshot `Range` (default 1000).
    pub snapshot_page: usize,
    /// Bytes (keys + values) a snapshot page aims at (default
    /// [`DEFAULT_SNAPSHOT_PAGE_BYTES`]): each page asks for as many keys as fit at the
    /// previous page's average size, from 1 to `snapshot_page` (the first asks for
    /// [`FIRST_SNAPSHOT_PAGE_KEYS`] at most). With the pages streamed into the store, this
    /// bounds what the snapshot holds beyond the state itself (a single key larger than it is
    /// still read: one key per page).
    pub snapshot_page_bytes: usize,
    /// Longest a linearizable read or a forwarded write waits for the mirror to reach the
    /// upstream's revision before failing with `Unavailable` (default 5 s).
    pub barrier_timeout: Duration,
    /// Timeout of a TCP connect to an endpoint (default 2 s, etcdctl's dial timeout).
    pub connect_timeout: Duration,
    /// The mirror's own retention: keep the history of the last this many upstream revisions
    /// and compact the rest (the state is kept whole). `None` (default): keep everything.
    pub retain_revisions: Option<u64>,
    /// How often the mirror asks etcd whether it was compacted past the mirror's own
    /// compaction (one serializable `count_only` range at the mirror's compaction revision;
    /// a binary search only when it was), so a compaction made directly on etcd, or through
    /// another replica, reaches this one within about this long (default 10 s). `None`:
    /// never (only compactions sent through this replica are applied).
    pub compaction_check: Option<Duration>,
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
            tls: None,
            auth: None,
            prefixes,
            snapshot_page: 1000,
            snapshot_page_bytes: DEFAULT_SNAPSHOT_PAGE_BYTES,
            barrier_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(2),
            retain_revisions: None,
            compaction_check: Some(Duration::from_secs(10)),
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
    /// The upstream TLS settings or credentials are unusable (a token that is not ASCII, TLS
    /// without a CA bundle).
    #[error("upstream credentials: {message}")]
    Credentials {
        /// What is wrong.
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
        let text = toml::to_string(self).map_err(|e| e.to_string())?;
        event_log::files::replace_file(&Self::path(dir), text.as_bytes()).map_err(|e| e.to_string())
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
    /// One lazily connected channel per endpoint, in `config.endpoints` order (without the
    /// token: [`Inner::upstream`] adds it).
    channels: Vec<(String, Channel)>,
    /// The etcd credentials and the token in use.
    credentials: upstream::Credentials,
    /// Background tasks (renewing a password's token every [`TOKEN_REFRESH`], checking
    /// etcd's compaction every `config.compaction_check`), aborted by [`Mirror::stop`].
    background: parking_lot::Mutex<Vec<tokio::task::JoinHandle<()>>>,
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

impl Inner {
    fn current_index(&self) -> usize {
        self.current.load(Ordering::Acquire) % self.channels.len()
    }

    /// A channel to endpoint `idx` carrying the token.
    fn upstream(&self, idx: usize) -> UpstreamChannel {
        self.credentials.wrap(self.channels[idx].1.clone())
    }

    /// Fetches a fresh token from endpoint `idx` (no-op without a password).
    async fn reauthenticate(&self, idx: usize) -> Result<(), tonic::Status> {
        self.credentials
            .authenticate(self.channels[idx].1.clone())
            .await
    }
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
        let credentials = upstream::Credentials::new(config.auth.clone())
            .map_err(|message| MirrorError::Credentials { message })?;
        let tls = match &config.tls {
            None => None,
            Some(t) => {
                let ca = t.ca_pem.as_ref().ok_or_else(|| MirrorError::Credentials {
                    message: "upstream TLS needs a CA bundle (--upstream-cacert): the \
                              system's roots are not loaded"
                        .to_owned(),
                })?;
                let mut c = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
                if let Some((cert, key)) = &t.identity {
                    c = c.identity(Identity::from_pem(cert, key));
                }
                Some(c)
            }
        };
        let mut channels = Vec::with_capacity(config.endpoints.len());
        for e in &config.endpoints {
            let url = if e.contains("://") {
                e.clone()
            } else if tls.is_some() {
                format!("https://{e}")
            } else {
                format!("http://{e}")
            };
            let endpoint_error = |message: String| MirrorError::Endpoint {
                endpoint: e.clone(),
                message,
            };
            let mut endpoint = Endpoint::from_shared(url.clone())
                .map_err(|err| endpoint_error(err.to_string()))?;
            if url.starts_with("https://") {
                // tonic would accept an https:// URL without TLS settings and then fail every
                // connect, retrying forever: refuse it here with the reason.
                let Some(tls) = &tls else {
                    return Err(endpoint_error(
                        "an https:// endpoint needs upstream TLS settings (--upstream-cacert)"
                            .to_owned(),
                    ));
                };
                endpoint = endpoint
                    .tls_config(tls.clone())
                    .map_err(|err| endpoint_error(err.to_string()))?;
            } else if !url.starts_with("http://") {
                return Err(endpoint_error(
                    "the scheme must be http:// or https://".to_owned(),
                ));
            }
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
            credentials,
            background: parking_lot::Mutex::new(Vec::new()),
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
        if inner.credentials.renewable() {
            let weak = Arc::downgrade(&inner);
            let refresh = tokio::spawn(async move {
                let mut tick = tokio::time::interval(TOKEN_REFRESH);
                tick.tick().await; // the first tick is immediate: the session authenticates
                loop {
                    tick.tick().await;
                    let Some(inner) = weak.upgrade() else { return };
                    if let Err(e) = inner.reauthenticate(inner.current_index()).await {
                        tracing::warn!(error = %e.message(), "renewing the upstream token failed");
                    }
                }
            });
            inner.background.lock().push(refresh);
        }
        if let Some(every) = inner.config.compaction_check {
            let weak = Arc::downgrade(&inner);
            let check = tokio::spawn(async move {
                let mut tick = tokio::time::interval(every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    let Some(inner) = weak.upgrade() else { return };
                    let mirror = Mirror { inner };
                    if let Err(e) = mirror.check_compaction().await {
                        tracing::debug!(error = %e, "upstream compaction check failed");
                    }
                }
            });
            inner.background.lock().push(check);
        }
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
        let background = std::mem::take(&mut *self.inner.background.lock());
        for b in background {
            b.abort();
            let _ = b.await;
        }
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
    pub(crate) fn channel(&self) -> UpstreamChannel {
        self.inner.upstream(self.inner.current_index())
    }

    /// Sends one upstream call (`call` builds it on a channel) to the endpoint in use; on a
    /// transport error that `resend` allows ([`Resend`]), to the next endpoints in turn (each
    /// at most once). On each endpoint, when etcd refuses the mirror's token as expired and
    /// the token is renewable, a fresh one is fetched and the call sent once more. A call
    /// before the first token (the sync task fetches it at its session's start) fetches it
    /// first: without one etcd refuses with `user name is empty`.
    pub(crate) async fn call<T, F, Fut>(&self, resend: Resend, call: F) -> Result<T, tonic::Status>
    where
        F: Fn(UpstreamChannel) -> Fut,
        Fut: std::future::Future<Output = Result<T, tonic::Status>>,
    {
        let n = self.inner.channels.len();
        let first = self.inner.current_index();
        let mut attempt = 0;
        loop {
            let idx = (first + attempt) % n;
            match self.call_on(idx, &call).await {
                Err(s) if attempt + 1 < n && resend.allows(&s) => {
                    tracing::debug!(
                        endpoint = %self.inner.channels[idx].0,
                        error = %s.message(),
                        "forwarded call failed in transport; sending it to the next endpoint"
                    );
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    async fn call_on<T, F, Fut>(&self, idx: usize, call: &F) -> Result<T, tonic::Status>
    where
        F: Fn(UpstreamChannel) -> Fut,
        Fut: std::future::Future<Output = Result<T, tonic::Status>>,
    {
        if self.inner.credentials.needs_token() {
            self.inner.reauthenticate(idx).await?;
        }
        match call(self.inner.upstream(idx)).await {
            Err(s) if upstream::is_invalid_token(&s) && self.inner.credentials.renewable() => {
                tracing::info!(error = %s.message(), "upstream token refused; renewing it and retrying once");
                self.inner.reauthenticate(idx).await?;
                call(self.inner.upstream(idx)).await
            }
            other => other,
        }
    }

    /// Applies an upstream compaction at `revision` to the mirror: once the mirror holds
    /// `revision`, its history below it goes, so reads and watches below it fail as etcd's
    /// do. A revision at or below the mirror's own compaction is already in force.
    pub(crate) async fn upstream_compacted(&self, revision: Revision) -> Result<(), BarrierError> {
        if revision <= self.inner.store.compacted_revision() {
            return Ok(());
        }
        self.wait_for(revision).await?;
        match self.inner.store.mirror_compact(revision).await {
            Ok(_) => {
                tracing::info!(revision, "upstream compaction applied to the mirror");
                Ok(())
            }
            // Retention (or a concurrent check) compacted at least as far meanwhile.
            Err(StoreError::Compacted { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// One compaction check ([`MirrorConfig::compaction_check`]): a serializable
    /// `count_only` range at the mirror's compaction revision; when etcd answers that it is
    /// compacted, a binary search (same probe) up to etcd's revision finds etcd's compaction
    /// revision (the lowest readable one), which is then applied when the mirror holds it
    /// (a lagging mirror applies it at a later check).
    async fn check_compaction(&self) -> Result<(), tonic::Status> {
        let key: Bytes = self
            .inner
            .scope
            .prefixes()
            .iter()
            .find(|p| !p.is_empty())
            .cloned()
            .unwrap_or_else(|| Bytes::from_static(b"\0"));
        let max = self.inner.config.max_response_bytes;
        // Ok(Some(etcd revision)): readable; Ok(None): compacted.
        let probe = |revision: u64| {
            let key = key.clone();
            async move {
                let r = self
                    .call(Resend::Read, |ch| {
                        let key = key.clone();
                        async move {
                            watch_proto::etcdserverpb::kv_client::KvClient::new(ch)
                                .max_decoding_message_size(max)
                                .range(watch_proto::etcdserverpb::RangeRequest {
                                    key,
                                    revision: i64::try_from(revision).unwrap_or(i64::MAX),
                                    serializable: true,
                                    count_only: true,
                                    ..Default::default()
                                })
                                .await
                        }
                    })
                    .await;
                match r {
                    Ok(resp) => Ok(Some(
                        resp.into_inner()
                            .header
                            .and_then(|h| u64::try_from(h.revision).ok())
                            .unwrap_or(0),
                    )),
                    Err(s) if s.message().contains("required revision has been compacted") => {
                        Ok(None)
                    }
                    Err(s) => Err(s),
                }
            }
        };
        let floor = self.inner.store.compacted_revision().max(1);
        if probe(floor).await?.is_some() {
            return Ok(());
        }
        // etcd's compaction C is in (floor, etcd's revision]: revisions below C are compacted,
        // C is readable. `lo` compacted, `hi` readable.
        let mut hi = match probe(0).await? {
            Some(current) if current > floor => current,
            _ => return Ok(()),
        };
        let mut lo = floor;
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            match probe(mid).await? {
                Some(_) => hi = mid,
                None => lo = mid,
            }
        }
        if hi <= self.inner.store.current_revision() {
            self.upstream_compacted(hi)
                .await
                .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        }
        Ok(())
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

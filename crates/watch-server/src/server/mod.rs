//! The gRPC server: etcd's KV, Watch, Maintenance (Status), Cluster (MemberList), Lease,
//! Auth, Lock and Election services over one [`Store`], plus the standard gRPC health and
//! reflection services and an optional Prometheus endpoint. The same port also serves etcd's
//! HTTP/JSON gateway and `/health`, `/version`, `/metrics` over HTTP/1.1 and HTTP/2 (see
//! [`gateway`]).
//!
//! # Lifecycle
//!
//! 1. [`Server::start`] (or [`Server::with_store`], [`Server::with_store_future`]) binds the
//!    gRPC address and the metrics address. Nothing is opened yet, so a bind error comes
//!    first and fast.
//! 2. [`Server::run`] serves at once: health answers NOT_SERVING and the etcd services answer
//!    UNAVAILABLE while the store opens (event-log replay). Once it is open the services are
//!    installed and health turns SERVING.
//! 3. When the shutdown future resolves (or the store fails: fail-stop) health turns
//!    NOT_SERVING, the transport stops accepting, every watch stream ends with UNAVAILABLE
//!    "etcdserver: server stopped", in-flight requests finish (for at most
//!    `shutdown_timeout`; then their connections are cut, so no connection task outlives
//!    [`Server::run`]) and the store is closed (the event log flushed and fsynced). The
//!    metrics endpoint is waited for after that, bounded the same way.
//!
//! [`HealthHandle`] lets an embedder force NOT_SERVING for reasons of its own.
//!
//! # Lifecycle and connections
//!
//! - `server/mod.rs` (`Server`): lifecycle. `start`/`with_store`/`with_store_future` bind first;
//!   `run` serves at once and opens the store meanwhile: health NOT_SERVING, etcd services behind
//!   `health::Gated` (UNAVAILABLE "starting" until filled), then the services are installed and
//!   health turns SERVING. Shutdown: health NOT_SERVING (health watch streams end), stop
//!   accepting, watch streams end with UNAVAILABLE "etcdserver: server stopped", in-flight calls
//!   get `--shutdown-timeout` (then their connections are cut, so `run` returns with no
//!   connection task left holding the store), the store closes (log flushed), then the metrics
//!   endpoint is waited for (bounded by the same grace, then cut, then aborted).
//! - `server/listen.rs`: the client port's accept loop: `--max-connections` (beyond it a
//!   connection is closed at once), a pause of 1 ms doubling to 1 s after an accept error (out
//!   of descriptors), and each connection's `ConnInfo` (peer, watcher count) in its requests.
//! - `server/cut.rs`: `CutIo` wraps every accepted socket (gRPC and metrics) so its reads and
//!   writes fail once the grace expired: tonic and axum run each connection as a task of its
//!   own, which dropping the serve future would not stop.

mod admit;
pub mod auth;
pub mod concurrency;
pub mod convert;
mod cut;
mod forward;
pub mod gateway;
mod health;
pub mod kv;
pub mod lease;
mod listen;
pub mod metrics;
pub mod misc;
pub mod watch;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};

use tokio::net::TcpListener;
use tokio_stream::Stream;
use watch_proto::etcdserverpb as pb;
use watch_proto::{v3electionpb, v3lockpb};

use crate::auth::{Auth, Gate};
use crate::config::ServerConfig;
use crate::mirror::{Mirror, MirrorError};
use kv_store::{Store, StoreError};

pub use auth::AuthService;
pub use concurrency::{ElectionService, LockService};
use cut::Conn;
use health::Gated;
pub use health::HealthHandle;
pub use listen::ConnInfo;
pub use metrics::{Metrics, WatchMetrics};

pub use kv::KvService;
pub use lease::LeaseService;
pub use misc::{ClusterService, ETCD_VERSION, MaintenanceService, RestoreError, restore_snapshot};
pub use watch::{GRPC_OVERHEAD_BYTES, WatchService, WatchSettings};

/// HTTP/2 connection flow-control window, bytes (see where the server is built).
const CONNECTION_WINDOW: u32 = 16 << 20;
/// HTTP/2 per-stream flow-control window, bytes: h2's default.
const STREAM_WINDOW: u32 = 65_535;

/// Why the server could not start or stopped abnormally.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// The listen address could not be bound.
    #[error("binding {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The store failed to open, failed while serving (fail-stop), or failed to close.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The auth records file could not be opened, or a commit to it failed (fail-stop).
    #[error(transparent)]
    AuthStore(#[from] crate::auth::AuthStoreError),
    /// The gRPC transport failed.
    #[error("gRPC transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The metrics address could not be bound.
    #[error("binding the metrics endpoint {addr}: {source}")]
    MetricsBind {
        /// The address asked for.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The TLS configuration could not be built (checked at load, so not expected here).
    #[error("TLS: {0}")]
    Tls(String),
    /// The reflection service could not be built from the descriptor sets.
    #[error("building the gRPC reflection service: {0}")]
    Reflection(String),
    /// Mirror mode could not start (see [`MirrorError`]).
    #[error("mirror: {0}")]
    Mirror(#[from] MirrorError),
    /// The mirror stopped for good while serving (another cluster, store failure).
    #[error("mirror stopped: {0}")]
    MirrorStopped(String),
}

/// The future that yields the store to serve.
type Opening = Pin<Box<dyn Future<Output = Result<Store, StoreError>> + Send>>;

/// A started server: its sockets are bound. Serve with [`Server::run`], which also opens the
/// store (see the module docs).
pub struct Server {
    listener: TcpListener,
    addr: SocketAddr,
    config: ServerConfig,
    metrics_listener: Option<TcpListener>,
    metrics_addr: Option<SocketAddr>,
    /// Yields the store; awaited by `run` while health says NOT_SERVING.
    opening: Opening,
    /// The store once open (read by the metrics collector).
    store: Arc<OnceLock<Store>>,
    health: HealthHandle,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("addr", &self.addr)
            .field("metrics_addr", &self.metrics_addr)
            .field("store", &self.store.get())
            .finish_non_exhaustive()
    }
}

impl Server {
    /// Binds `config.listen` (and `config.metrics_listen`); [`Server::run`] opens the store in
    /// `config.data_dir` while already answering health checks.
    pub async fn start(config: ServerConfig) -> Result<Server, ServerError> {
        let dir = config.data_dir.clone();
        // The store raises its own alarms (NOSPACE) for this member.
        let store_config = config.store_config().member_id(convert::MEMBER_ID);
        Self::with_store_future(config, async move { Store::open(dir, store_config).await }).await
    }

    /// Binds `config.listen` (and `config.metrics_listen`) to serve an already open store.
    pub async fn with_store(store: Store, config: ServerConfig) -> Result<Server, ServerError> {
        Self::with_store_future(config, async move { Ok(store) }).await
    }

    /// Binds `config.listen` (and `config.metrics_listen`); [`Server::run`] serves health
    /// (NOT_SERVING) and answers the etcd services with UNAVAILABLE until `open` yields the
    /// store, e.g. one an embedder first fills from elsewhere. If `open` fails, `run` stops and
    /// returns its error.
    pub async fn with_store_future(
        config: ServerConfig,
        open: impl Future<Output = Result<Store, StoreError>> + Send + 'static,
    ) -> Result<Server, ServerError> {
        let listener =
            TcpListener::bind(&config.listen)
                .await
                .map_err(|source| ServerError::Bind {
                    addr: config.listen.clone(),
                    source,
                })?;
        let addr = listener.local_addr().map_err(|source| ServerError::Bind {
            addr: config.listen.clone(),
            source,
        })?;
        let (metrics_listener, metrics_addr) = match config.metrics_listen {
            Some(want) => {
                let bind_err = |source| ServerError::MetricsBind { addr: want, source };
                let l = metrics::bind(want).await.map_err(bind_err)?;
                let a = l.local_addr().map_err(bind_err)?;
                (Some(l), Some(a))
            }
            None => (None, None),
        };
        let store = Arc::new(OnceLock::new());
        let health = HealthHandle::new(tonic_health::server::HealthReporter::new()).await;
        let metrics = Arc::new(Metrics::new(store.clone()));
        Ok(Server {
            listener,
            addr,
            config,
            metrics_listener,
            metrics_addr,
            opening: Box::pin(open),
            store,
            health,
            metrics,
        })
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The metrics endpoint's bound address, when `metrics_listen` is set.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The handle to this server's health status (see [`HealthHandle`]).
    pub fn health(&self) -> HealthHandle {
        self.health.clone()
    }

    /// This server's metrics registry.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// Serves until `shutdown` resolves or the store fails, then shuts down gracefully (see the
    /// module docs): health NOT_SERVING, stop accepting, end every watch stream, let in-flight
    /// requests finish (at most `shutdown_timeout`, then cut their connections), close the
    /// store (flushing the log), stop the metrics endpoint (same bound). Returns the store's failure if it
    /// failed, or its open error if it could not be opened.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> Result<(), ServerError> {
        let Server {
            listener,
            addr,
            config,
            metrics_listener,
            metrics_addr,
            opening,
            store: slot,
            health,
            metrics,
        } = self;
        // Mirror mode's mirror, started once the store is open.
        let mirror_slot: Arc<OnceLock<Mirror>> = Arc::new(OnceLock::new());
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let mut stopping = stop_rx.clone();
        // The server's users and roles, opened from the data directory with the store.
        let auth_slot: Arc<OnceLock<Arc<Auth>>> = Arc::new(OnceLock::new());
        // The gRPC receive limit is etcd's: max request bytes plus the gRPC overhead.
        let recv_limit = config.max_request_bytes + GRPC_OVERHEAD_BYTES;
        let kv = Gated::<pb::kv_server::KvServer<KvService>>::new();
        let watch = Gated::<watch_proto::wire::watch_server::WatchServer<WatchService>>::new();
        let maintenance =
            Gated::<pb::maintenance_server::MaintenanceServer<MaintenanceService>>::new();
        let cluster = Gated::<pb::cluster_server::ClusterServer<ClusterService>>::new();
        let lease = Gated::<pb::lease_server::LeaseServer<LeaseService>>::new();
        let auth = Gated::<pb::auth_server::AuthServer<AuthService>>::new();
        let lock = Gated::<v3lockpb::lock_server::LockServer<LockService>>::new();
        let election =
            Gated::<v3electionpb::election_server::ElectionServer<ElectionService>>::new();
        let mirror_config = config.mirror_config();
        let mirrored = mirror_config.is_some();
        let install = {
            let (lock, election) = (lock.clone(), election.clone());
            let (kv, watch, maintenance, cluster, lease, auth) = (
                kv.clone(),
                watch.clone(),
                maintenance.clone(),
                cluster.clone(),
                lease.clone(),
                auth.clone(),
            );
            let watch_metrics = metrics.watch();
            let config = config.clone();
            let scheme = if config.tls.is_some() {
                "https"
            } else {
                "http"
            };
            move |store: &Store, mirror: Option<&Mirror>, gate: Gate| {
                // Mirror mode's KV and Lease serve mirrored reads locally and forward the rest
                // to etcd; both pass the same admission as the local services.
                let (kv_service, lease_service) = match mirror {
                    Some(m) => (
                        KvService::mirror(m.clone(), config.max_request_bytes),
                        LeaseService::mirror(m.clone()),
                    ),
                    None => {
                        // Lock and Election write under their names: local stores only.
                        let limit = config.max_request_bytes;
                        lock.fill(
                            v3lockpb::lock_server::LockServer::new(
                                LockService::new(store.clone(), limit, stop_rx.clone())
                                    .with_gate(gate.clone()),
                            )
                            .max_decoding_message_size(recv_limit),
                        );
                        election.fill(
                            v3electionpb::election_server::ElectionServer::new(
                                ElectionService::new(store.clone(), limit, stop_rx.clone())
                                    .with_gate(gate.clone()),
                            )
                            .max_decoding_message_size(recv_limit),
                        );
                        (
                            KvService::new(store.clone(), config.max_request_bytes),
                            LeaseService::new(store.clone(), stop_rx.clone()),
                        )
                    }
                };
                kv.fill(
                    pb::kv_server::KvServer::new(kv_service.with_gate(gate.clone()))
                        .max_decoding_message_size(recv_limit)
                        .max_encoding_message_size(usize::MAX),
                );
                lease.fill(
                    pb::lease_server::LeaseServer::new(lease_service.with_gate(gate.clone()))
                        .max_decoding_message_size(recv_limit),
                );
                let mut watch_service = WatchService::new(
                    store.clone(),
                    WatchSettings {
                        max_watchers_per_stream: config.max_watchers_per_stream,
                        max_watchers_per_connection: config.max_watchers_per_connection,
                        max_watchers_per_user: config.max_watchers_per_user,
                        watch_buffer: config.watch_buffer,
                        watch_stream_bytes: config.watch_stream_bytes,
                        max_request_bytes: config.max_request_bytes,
                    },
                    stop_rx.clone(),
                )
                .with_metrics(watch_metrics)
                .with_gate(gate.clone());
                if let Some(m) = mirror {
                    watch_service = watch_service.with_mirror_status(m.status());
                }
                watch.fill(
                    watch_proto::wire::watch_server::WatchServer::new(watch_service)
                        .max_decoding_message_size(recv_limit)
                        .max_encoding_message_size(usize::MAX),
                );
                maintenance.fill(
                    pb::maintenance_server::MaintenanceServer::new(
                        MaintenanceService::new(store.clone()).with_gate(gate.clone()),
                    )
                    .max_decoding_message_size(recv_limit),
                );
                cluster.fill(
                    pb::cluster_server::ClusterServer::new(ClusterService::new(
                        store.clone(),
                        format!("{scheme}://{addr}"),
                    ))
                    .max_decoding_message_size(recv_limit),
                );
                auth.fill(
                    pb::auth_server::AuthServer::new(AuthService::new(store.clone(), gate.clone()))
                        .max_decoding_message_size(recv_limit),
                );
            }
        };
        let health_service = health.service();
        let reflection = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(watch_proto::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        };
        let reflection_v1 = reflection()
            .build_v1()
            .map_err(|e| ServerError::Reflection(e.to_string()))?;
        // grpcurl and older tools still ask v1alpha.
        let reflection_v1alpha = reflection()
            .build_v1alpha()
            .map_err(|e| ServerError::Reflection(e.to_string()))?;

        let (ended_tx, ended_rx) = tokio::sync::watch::channel(false);
        // Turns true when the grace period expired: every accepted connection (gRPC and
        // metrics) then fails its next read or write and ends (see `cut`).
        let (cut_tx, cut_rx) = tokio::sync::watch::channel(false);
        let metrics_task = metrics_listener.map(|l| {
            let mut ended = ended_rx.clone();
            if let Some(addr) = metrics_addr {
                tracing::info!(%addr, "serving metrics on /metrics");
            }
            let l = cut::CutListener::new(l, cut_rx.clone());
            tokio::spawn(metrics::serve(l, metrics.clone(), async move {
                let _ = ended.wait_for(|e| *e).await;
            }))
        });

        // Makes an open store live: metrics, services, then health.
        let activate = {
            let (slot, health, metrics) = (slot.clone(), health.clone(), metrics.clone());
            let data_dir = config.data_dir.clone();
            let mirror_slot = mirror_slot.clone();
            let auth_slot = auth_slot.clone();
            let auth_settings = config.auth.clone();
            move |store: Store| async move {
                store.set_log_observer(metrics.log_observer());
                let _ = slot.set(store.clone());
                let durable = store.config().durability == kv_store::Durability::Fsync;
                let auth = Arc::new(Auth::open(store.dir(), &auth_settings, durable).await?);
                let _ = auth_slot.set(auth.clone());
                let mirror = match mirror_config {
                    Some(m) => Some(Mirror::start(store.clone(), m)?),
                    None => {
                        crate::mirror::refuse_standalone(store.dir())?;
                        None
                    }
                };
                if let Some(m) = &mirror {
                    // NOT_SERVING until the upstream watch is open (before `set_ready`, so
                    // SERVING never shows early), then following the connection.
                    health.set_mirror_connected(false).await;
                    tokio::spawn(follow_mirror(m.status(), health.clone()));
                    metrics.set_mirror_status(m.status());
                    let _ = mirror_slot.set(m.clone());
                }
                install(&store, mirror.as_ref(), Gate::on(auth));
                health.set_ready().await;
                tracing::info!(%addr, data_dir = %data_dir.display(), "ready");
                Ok::<_, ServerError>(store)
            }
        };
        let mut opening = opening;
        // An already open store (`with_store`) goes live before the first connection is
        // accepted, so no client of an embedded server ever sees the startup UNAVAILABLE.
        let early = match futures_util::FutureExt::now_or_never(&mut opening) {
            Some(Ok(store)) => Some(activate.clone()(store).await?),
            Some(Err(e)) => return Err(e.into()),
            None => None,
        };
        let open_error = Arc::new(parking_lot::Mutex::new(None));
        let mirror_stopped = Arc::new(parking_lot::Mutex::new(None));
        let stop = {
            let (health, open_error) = (health.clone(), open_error.clone());
            let (mirror_slot, mirror_stopped) = (mirror_slot.clone(), mirror_stopped.clone());
            let auth_slot = auth_slot.clone();
            async move {
                tokio::pin!(shutdown);
                let opened = match early {
                    Some(store) => Some(Ok(store)),
                    None => tokio::select! {
                        r = opening => match r {
                            Ok(store) => Some(activate(store).await),
                            Err(e) => Some(Err(e.into())),
                        },
                        _ = &mut shutdown => None,
                    },
                };
                match opened {
                    Some(Ok(store)) => {
                        let mirror_failed = async {
                            match mirror_slot.get() {
                                Some(m) => m.failed().await,
                                None => std::future::pending().await,
                            }
                        };
                        let auth_failed = async {
                            match auth_slot.get() {
                                Some(a) => a.failed().await,
                                None => std::future::pending().await,
                            }
                        };
                        tokio::select! {
                            _ = &mut shutdown => tracing::info!("shutdown requested"),
                            msg = store.failed() => {
                                tracing::error!(error = %msg, "store failed; shutting down (fail-stop)")
                            }
                            msg = auth_failed => {
                                tracing::error!(error = %msg, "auth records failed; shutting down (fail-stop)");
                                *open_error.lock() = Some(ServerError::AuthStore(
                                    crate::auth::AuthStoreError::Storage {
                                        path: crate::auth::AUTH_FILE.to_owned(),
                                        message: msg,
                                    },
                                ));
                            }
                            msg = mirror_failed => {
                                tracing::error!(error = %msg, "mirror stopped; shutting down");
                                *mirror_stopped.lock() = Some(msg);
                            }
                        }
                    }
                    Some(Err(e)) => {
                        tracing::error!(error = %e, "opening the store failed");
                        *open_error.lock() = Some(e);
                    }
                    None => tracing::info!("shutdown requested while opening the store"),
                }
                health.set_stopping().await;
                // Ends every watch stream so the transport's graceful shutdown can complete.
                let _ = stop_tx.send(true);
            }
        };
        tracing::info!(
            %addr,
            data_dir = %config.data_dir.display(),
            tls = config.tls.is_some(),
            client_cert_auth = config.tls.as_ref().is_some_and(|t| t.client_cert_auth()),
            auth_seed = config.auth.has_seed(),
            "serving; opening the store"
        );
        let grace = config.shutdown_timeout;
        // `--max-connections` and the back-off on accept errors (see `listen`); TCP_NODELAY
        // is set there.
        let incoming = tokio_stream::StreamExt::map(
            listen::incoming(listener, config.max_connections, metrics.connections()),
            {
                let cut_rx = cut_rx.clone();
                move |conn| conn.map(|io| cut::CutIo::new(io, cut_rx.clone()))
            },
        );
        // TLS is ours, not tonic's, so it can offer ALPN http/1.1 beside h2 (see `crate::tls`).
        let incoming: Pin<Box<dyn Stream<Item = _> + Send>> = match &config.tls {
            Some(tls) => {
                let rustls = tls
                    .rustls_config()
                    .map_err(|e| ServerError::Tls(e.to_string()))?;
                Box::pin(tokio_stream::StreamExt::map(
                    crate::tls::accept(incoming, rustls, tls.handshake_timeout()),
                    |conn| conn.map(|io| Conn::Tls(Box::new(io))),
                ))
            }
            None => Box::pin(tokio_stream::StreamExt::map(incoming, |conn| {
                conn.map(Conn::Plain)
            })),
        };
        let builder = tonic::transport::Server::builder();
        let serve = builder
            // Clients ping long watch streams (etcdctl every ~10 s); answer, never punish.
            .http2_keepalive_interval(Some(std::time::Duration::from_secs(7200)))
            // A stream whose responses are not read stops reading requests, so HTTP/2 flow
            // control stops its sender (as etcd's). h2 closes a connection (GOAWAY
            // ENHANCE_YOUR_CALM) once the small DATA frames it buffers exceed half the
            // connection window in framing overhead (~250 bytes a frame): with the 64 KiB
            // default that is ~130 pipelined watch requests. A 16 MiB connection window allows
            // 8 MiB: three streams each stalled with a full 64 KiB stream window of the
            // smallest requests (7 bytes), or six of creates. Memory: at most the connection
            // window of request bytes per connection, plus that overhead.
            .initial_connection_window_size(Some(CONNECTION_WINDOW))
            .initial_stream_window_size(Some(STREAM_WINDOW))
            // etcd's gateway clients speak HTTP/1.1 on the client port.
            .accept_http1(true)
            // Outermost: HTTP/JSON requests are answered by the gateway, whose own gRPC calls
            // then pass the RPC metrics layer like any client's (see `gateway`).
            .layer(gateway::GatewayLayer::new(gateway::GatewaySettings {
                max_json_bytes: gateway::max_json_bytes(config.max_request_bytes),
                health: health.clone(),
                metrics: metrics.clone(),
            }))
            .layer(metrics.rpc_layer())
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(kv)
            .add_service(watch)
            .add_service(maintenance)
            .add_service(cluster)
            .add_service(lease)
            .add_service(auth)
            // Lock and Election write under their names: not in a (read-only) mirror.
            .add_optional_service((!mirrored).then_some(lock))
            .add_optional_service((!mirrored).then_some(election))
            // Our own listener (bound early to report the port), so tonic's builder-level
            // nodelay does not apply: `listen` sets it. Without it small watch responses wait
            // for the peer's delayed ACK (~40 ms), which showed as a 40 ms p99 in the benches.
            .serve_with_incoming_shutdown(incoming, stop);
        tokio::pin!(serve);
        let served = tokio::select! {
            r = &mut serve => r,
            // Streams this server does not end itself (a client's long call) get `grace`;
            // then their connections are cut (tonic runs each connection as a task of its own,
            // which dropping `serve` would not stop) and the store still closes cleanly.
            _ = async {
                let _ = stopping.wait_for(|s| *s).await;
                tokio::time::sleep(grace).await;
            } => {
                tracing::warn!(?grace, "graceful shutdown timed out; cutting remaining calls");
                let _ = cut_tx.send(true);
                // `serve` returns once every connection task ended, which a cut connection
                // does at its next poll; the bound only guards against a transport bug.
                match tokio::time::timeout(grace, &mut serve).await {
                    Ok(r) => r,
                    Err(_) => {
                        tracing::error!("cut connections did not end; dropping the transport");
                        Ok(())
                    }
                }
            }
        };
        // The metrics endpoint stops accepting now; it is waited for after the store closed,
        // so a stalled scrape cannot keep the store open.
        let _ = ended_tx.send(true);
        if let Some(m) = mirror_slot.get() {
            m.stop().await;
        }
        let closed = match (
            close(&slot, open_error, served).await,
            mirror_stopped.lock().take(),
        ) {
            (Ok(()), Some(message)) => Err(ServerError::MirrorStopped(message)),
            (r, _) => r,
        };
        if let Some(mut task) = metrics_task
            && tokio::time::timeout(grace, &mut task).await.is_err()
        {
            tracing::warn!(
                ?grace,
                "metrics endpoint did not stop; cutting its connections"
            );
            let _ = cut_tx.send(true);
            if tokio::time::timeout(grace, &mut task).await.is_err() {
                tracing::error!("metrics endpoint did not end after the cut; aborting it");
                task.abort();
            }
        }
        closed
    }
}

/// Closes the store in `slot` (if it was opened) and says how the run ended: the open error,
/// the store's failure, the close error or the transport's error, in that order.
async fn close(
    slot: &OnceLock<Store>,
    open_error: Arc<parking_lot::Mutex<Option<ServerError>>>,
    served: Result<(), tonic::transport::Error>,
) -> Result<(), ServerError> {
    let open_error = open_error.lock().take();
    if let Some(e) = open_error {
        return Err(e);
    }
    let Some(store) = slot.get().cloned() else {
        // Stopped before the store was open: nothing to close.
        return Ok(served?);
    };
    let failure = store.failure();
    let closed = store.close().await;
    served?;
    if let Some(message) = failure {
        return Err(StoreError::Failed { message }.into());
    }
    closed?;
    tracing::info!("store closed");
    Ok(())
}

/// Health of a mirror follows its upstream connection: SERVING only while the upstream watch
/// is open (the mirror may be stale otherwise). Publishes only on changes of connectivity.
async fn follow_mirror(
    mut status: tokio::sync::watch::Receiver<crate::mirror::MirrorStatus>,
    health: HealthHandle,
) {
    let mut last = None;
    loop {
        let connected = status.borrow_and_update().is_connected();
        if last != Some(connected) {
            health.set_mirror_connected(connected).await;
            last = Some(connected);
        }
        if status.changed().await.is_err() {
            return;
        }
    }
}

//! The gRPC server: etcd's KV, Watch, Maintenance (Status), Cluster (MemberList), Lease and
//! Auth services over one [`Store`].

pub mod convert;
pub mod kv;
pub mod misc;
pub mod watch;

use std::future::Future;
use std::net::SocketAddr;

use tokio::net::TcpListener;
use watch_proto::etcdserverpb as pb;

use crate::config::ServerConfig;
use crate::error::StoreError;
use crate::mirror::{Mirror, MirrorError, MirrorKvService, MirrorLeaseService};
use crate::store::Store;

pub use kv::KvService;
pub use misc::{AuthService, ClusterService, ETCD_VERSION, LeaseService, MaintenanceService};
pub use watch::{GRPC_OVERHEAD_BYTES, WatchService, WatchSettings};

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
    /// The gRPC transport failed.
    #[error("gRPC transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// Mirror mode could not start, or stopped for good (another cluster, store failure).
    #[error("mirror: {0}")]
    Mirror(#[from] MirrorError),
    /// The mirror stopped for good while serving.
    #[error("mirror stopped: {0}")]
    MirrorStopped(String),
}

/// A started server: the store is open and the socket bound. Serve with [`Server::run`].
#[derive(Debug)]
pub struct Server {
    store: Store,
    listener: TcpListener,
    addr: SocketAddr,
    config: ServerConfig,
    /// Mirror mode's sync task (`config.upstream` set).
    mirror: Option<Mirror>,
}

impl Server {
    /// Opens the store in `config.data_dir` and binds `config.listen`.
    pub async fn start(config: ServerConfig) -> Result<Server, ServerError> {
        let store = Store::open(&config.data_dir, config.store_config()).await?;
        Self::with_store(store, config).await
    }

    /// Binds `config.listen` to serve an already open store.
    pub async fn with_store(store: Store, config: ServerConfig) -> Result<Server, ServerError> {
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
        let mirror = match config.mirror_config() {
            Some(m) => Some(Mirror::start(store.clone(), m)?),
            None => None,
        };
        Ok(Server {
            store,
            listener,
            addr,
            config,
            mirror,
        })
    }

    /// The mirror in mirror mode (its status feeds health checks and metrics).
    pub fn mirror(&self) -> Option<&Mirror> {
        self.mirror.as_ref()
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The store served.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Serves until `shutdown` resolves or the store fails, then shuts down gracefully: stops
    /// accepting, ends every watch stream, lets in-flight requests finish and closes the store
    /// (flushing the log). Returns the store's failure if it failed.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> Result<(), ServerError> {
        let Server {
            store,
            listener,
            addr,
            config,
            mirror,
        } = self;
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        // The gRPC receive limit is etcd's: max request bytes plus the gRPC overhead.
        let recv_limit = config.max_request_bytes + GRPC_OVERHEAD_BYTES;
        // Mirror mode replaces KV and Lease with services that forward to etcd.
        let kv = mirror.is_none().then(|| {
            pb::kv_server::KvServer::new(KvService::new(store.clone(), config.max_request_bytes))
                .max_decoding_message_size(recv_limit)
                .max_encoding_message_size(usize::MAX)
        });
        let mirror_kv = mirror.as_ref().map(|m| {
            pb::kv_server::KvServer::new(MirrorKvService::new(m.clone(), config.max_request_bytes))
                .max_decoding_message_size(recv_limit)
                .max_encoding_message_size(usize::MAX)
        });
        let mirror_lease = mirror
            .as_ref()
            .map(|m| pb::lease_server::LeaseServer::new(MirrorLeaseService::new(m.clone())));
        let watch = pb::watch_server::WatchServer::new(WatchService::new(
            store.clone(),
            WatchSettings {
                max_watchers_per_stream: config.max_watchers_per_stream,
                watch_buffer: config.watch_buffer,
                max_request_bytes: config.max_request_bytes,
            },
            stop_rx,
        ))
        .max_decoding_message_size(recv_limit)
        .max_encoding_message_size(usize::MAX);
        let maintenance =
            pb::maintenance_server::MaintenanceServer::new(MaintenanceService::new(store.clone()));
        let cluster = pb::cluster_server::ClusterServer::new(ClusterService::new(
            store.clone(),
            format!("http://{addr}"),
        ));
        let lease = mirror
            .is_none()
            .then(|| pb::lease_server::LeaseServer::new(LeaseService));
        let auth = pb::auth_server::AuthServer::new(AuthService);

        let failed_store = store.clone();
        let failed_mirror = mirror.clone();
        let mirror_stopped = std::sync::Arc::new(parking_lot::Mutex::new(None));
        let mirror_stopped2 = mirror_stopped.clone();
        let stop = async move {
            let mirror_failed = async {
                match &failed_mirror {
                    Some(m) => m.failed().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = shutdown => tracing::info!("shutdown requested"),
                msg = failed_store.failed() => {
                    tracing::error!(error = %msg, "store failed; shutting down (fail-stop)")
                }
                msg = mirror_failed => {
                    tracing::error!(error = %msg, "mirror stopped; shutting down");
                    *mirror_stopped2.lock() = Some(msg);
                }
            }
            // Ends every watch stream so the transport's graceful shutdown can complete.
            let _ = stop_tx.send(true);
        };
        tracing::info!(%addr, data_dir = %config.data_dir.display(), "serving");
        let served = tonic::transport::Server::builder()
            // Clients ping long watch streams (etcdctl every ~10 s); answer, never punish.
            .http2_keepalive_interval(Some(std::time::Duration::from_secs(7200)))
            .add_optional_service(kv)
            .add_optional_service(mirror_kv)
            .add_service(watch)
            .add_service(maintenance)
            .add_service(cluster)
            .add_optional_service(lease)
            .add_optional_service(mirror_lease)
            .add_service(auth)
            // Our own listener (bound early to report the port), so tonic's builder-level
            // nodelay does not apply: set it here. Without it small watch responses wait for
            // the peer's delayed ACK (~40 ms), which showed as a 40 ms p99 in the benches.
            .serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
                stop,
            )
            .await;
        if let Some(m) = &mirror {
            m.stop();
        }
        let failure = store.failure();
        let closed = store.close().await;
        served?;
        if let Some(message) = mirror_stopped.lock().take() {
            return Err(ServerError::MirrorStopped(message));
        }
        if let Some(message) = failure {
            return Err(StoreError::Failed { message }.into());
        }
        closed?;
        Ok(())
    }
}

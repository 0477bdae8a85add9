//! Readiness: the gRPC health service's status, and the gate that answers UNAVAILABLE for the
//! etcd services until the store is open.
//!
//! The server binds and serves first, then opens the store (which replays the event log and
//! can take a while). Meanwhile the health service answers NOT_SERVING and every etcd service
//! answers UNAVAILABLE with a message, through [`Gated`]. Once the store is open the gates are
//! filled and health turns SERVING; at shutdown it turns NOT_SERVING again before anything
//! stops.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use tonic::body::Body;
use tonic::server::NamedService;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;
use tower::ServiceExt;

/// The etcd services the health service reports on by name (besides the overall `""`).
const SERVICES: [&str; 6] = [
    "etcdserverpb.KV",
    "etcdserverpb.Watch",
    "etcdserverpb.Lease",
    "etcdserverpb.Cluster",
    "etcdserverpb.Maintenance",
    "etcdserverpb.Auth",
];

#[derive(Debug, Clone, Copy)]
struct Inputs {
    /// The store is open and the services are installed.
    ready: bool,
    /// Shutdown began.
    stopping: bool,
    /// What [`HealthHandle::set_serving`] last said (true unless someone said otherwise).
    operator: bool,
}

/// Flips the gRPC health status (`grpc.health.v1.Health`) of this server: the overall status
/// (service `""`) and each etcd service (`etcdserverpb.KV`, ...).
///
/// The status is SERVING only when all of these hold: the store is open (the server sets this),
/// shutdown has not begun (the server sets this), and the embedder has not called
/// `set_serving(false)`. Embedders use [`HealthHandle::set_serving`] for conditions the server
/// cannot see, e.g. a mirror that lost its upstream: `set_serving(false)` takes the server out
/// of load balancers while it keeps answering reads; `set_serving(true)` puts it back (once
/// ready). Cheap to clone.
#[derive(Debug, Clone)]
pub struct HealthHandle {
    reporter: HealthReporter,
    /// Serializes recompute-and-publish, so concurrent changes publish in order.
    inputs: Arc<tokio::sync::Mutex<Inputs>>,
    /// Turns true once the store is open and the services installed; never back.
    ready: tokio::sync::watch::Sender<bool>,
}

impl HealthHandle {
    /// A handle over `reporter`; the status starts NOT_SERVING (not ready yet).
    pub(crate) async fn new(reporter: HealthReporter) -> Self {
        let h = Self {
            reporter,
            inputs: Arc::new(tokio::sync::Mutex::new(Inputs {
                ready: false,
                stopping: false,
                operator: true,
            })),
            ready: tokio::sync::watch::Sender::new(false),
        };
        h.update(|_| {}).await;
        h
    }

    /// Sets the embedder's input: `false` forces NOT_SERVING; `true` lets the status follow the
    /// server's own readiness.
    pub async fn set_serving(&self, serving: bool) {
        self.update(|i| i.operator = serving).await;
    }

    pub(crate) fn reporter(&self) -> HealthReporter {
        self.reporter.clone()
    }

    /// The status currently published.
    pub async fn is_serving(&self) -> bool {
        let i = *self.inputs.lock().await;
        Self::serving(i)
    }

    /// Resolves once the server has opened its store and installed the etcd services (at
    /// once if it already has). Independent of [`HealthHandle::set_serving`] and of shutdown.
    pub async fn ready(&self) {
        let mut rx = self.ready.subscribe();
        let _ = rx.wait_for(|r| *r).await;
    }

    pub(crate) async fn set_ready(&self) {
        self.update(|i| i.ready = true).await;
        self.ready.send_replace(true);
    }

    /// NOT_SERVING, then ends every `Health/Watch` stream (after it delivered NOT_SERVING) so
    /// the graceful shutdown does not wait for them; `Health/Check` answers NOT_FOUND after.
    pub(crate) async fn set_stopping(&self) {
        self.update(|i| i.stopping = true).await;
        let mut reporter = self.reporter.clone();
        reporter.clear_service_status("").await;
        for name in SERVICES {
            reporter.clear_service_status(name).await;
        }
    }

    fn serving(i: Inputs) -> bool {
        i.ready && !i.stopping && i.operator
    }

    async fn update(&self, change: impl FnOnce(&mut Inputs)) {
        let mut inputs = self.inputs.lock().await;
        change(&mut inputs);
        let status = if Self::serving(*inputs) {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        self.reporter.set_service_status("", status).await;
        for name in SERVICES {
            self.reporter.set_service_status(name, status).await;
        }
    }
}

/// A service that answers UNAVAILABLE until [`Gated::fill`] installs the real one. Clones share
/// the slot, so the router's copy sees the fill.
#[derive(Debug)]
pub(crate) struct Gated<S> {
    slot: Arc<OnceLock<S>>,
}

impl<S> Clone for Gated<S> {
    fn clone(&self) -> Self {
        Self {
            slot: self.slot.clone(),
        }
    }
}

impl<S> Gated<S> {
    pub(crate) fn new() -> Self {
        Self {
            slot: Arc::new(OnceLock::new()),
        }
    }

    /// Installs the service; later calls do nothing.
    pub(crate) fn fill(&self, service: S) {
        let _ = self.slot.set(service);
    }
}

impl<S: NamedService> NamedService for Gated<S> {
    const NAME: &'static str = S::NAME;
}

type BoxFuture = Pin<Box<dyn Future<Output = Result<http::Response<Body>, Infallible>> + Send>>;

impl<S> tower::Service<http::Request<Body>> for Gated<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // The generated tonic servers are always ready; readiness is checked per call.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> BoxFuture {
        match self.slot.get() {
            Some(service) => Box::pin(service.clone().oneshot(req)),
            None => Box::pin(async {
                Ok(tonic::Status::unavailable(
                    "keywatch: starting: the data directory is being opened (event log replay); \
                     retry shortly",
                )
                .into_http())
            }),
        }
    }
}

//! Readiness: the gRPC health service's status, and the gate that answers UNAVAILABLE for the
//! etcd services until the store is open.
//!
//! The server binds and serves first, then opens the store (which replays the event log and
//! can take a while). Meanwhile the health service answers NOT_SERVING and every etcd service
//! answers UNAVAILABLE with a message, through [`Gated`]. Once the store is open the gates are
//! filled and health turns SERVING; at shutdown it turns NOT_SERVING again before anything
//! stops, and stays so: `Health/Check` answers NOT_SERVING for the rest of the shutdown, while
//! every `Health/Watch` stream ends (after delivering NOT_SERVING) through a stop signal of
//! its own ([`HealthHandle::service`]), so the transport's graceful shutdown need not wait for
//! health watchers.
//!
//! # Parts
//!
//! - `server/health.rs`: `HealthHandle` (tonic-health reporter; SERVING = ready ∧ ¬stopping ∧ the
//!   embedder's `set_serving` ∧ (mirror mode) the upstream watch open; once stopping, NOT_SERVING is final and `Check` keeps answering
//!   it), `StoppableHealth` (tonic-health's service whose `Watch` streams end on a stop signal
//!   of their own), `Gated<S>` (a service slot filled once the store is open; UNAVAILABLE
//!   `EtcdError::Starting` until then).
//!   gRPC reflection (tonic-reflection, v1 and v1alpha) serves watch-proto's
//!   `FILE_DESCRIPTOR_SET` and the health descriptors.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use tokio_stream::Stream;
use tonic::body::Body;
use tonic::server::NamedService;
use tonic_health::ServingStatus;
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};
use tonic_health::server::{HealthReporter, HealthService};
use tower::ServiceExt;
use watch_proto::status::EtcdError;

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
    /// Mirror mode: the upstream watch is open (always true without a mirror). The server's
    /// own input, separate from `operator`, so neither overrides the other.
    mirror: bool,
}

/// Flips the gRPC health status (`grpc.health.v1.Health`) of this server: the overall status
/// (service `""`) and each etcd service (`etcdserverpb.KV`, ...).
///
/// The status is SERVING only when all of these hold: the store is open (the server sets this),
/// shutdown has not begun (the server sets this), in mirror mode the upstream watch is open
/// (the server sets this, as its own input), and the embedder has not called
/// `set_serving(false)`. Embedders use [`HealthHandle::set_serving`] for conditions the server
/// cannot see, e.g. a dependency of their own: `set_serving(false)` takes the server out
/// of load balancers while it keeps answering reads; `set_serving(true)` puts it back (once
/// ready). Cheap to clone.
#[derive(Debug, Clone)]
pub struct HealthHandle {
    reporter: HealthReporter,
    /// Serializes recompute-and-publish, so concurrent changes publish in order.
    inputs: Arc<tokio::sync::Mutex<Inputs>>,
    /// Turns true once the store is open and the services installed; never back.
    ready: tokio::sync::watch::Sender<bool>,
    /// Turns true once shutdown began and NOT_SERVING is published; ends `Health/Watch`
    /// streams ([`StoppableHealth`]). Never back.
    stopped: tokio::sync::watch::Sender<bool>,
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
                mirror: true,
            })),
            ready: tokio::sync::watch::Sender::new(false),
            stopped: tokio::sync::watch::Sender::new(false),
        };
        h.update(|_| {}).await;
        h
    }

    /// Sets the embedder's input: `false` forces NOT_SERVING; `true` lets the status follow the
    /// server's own readiness. Once shutdown began the status stays NOT_SERVING whatever this
    /// says.
    pub async fn set_serving(&self, serving: bool) {
        self.update(|i| i.operator = serving).await;
    }

    /// The `grpc.health.v1.Health` service answering from this handle's statuses.
    pub(crate) fn service(&self) -> HealthServer<StoppableHealth> {
        HealthServer::new(StoppableHealth {
            inner: HealthService::from_health_reporter(self.reporter.clone()),
            stopped: self.stopped.subscribe(),
        })
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

    /// Mirror mode's input: false while the upstream watch is not open.
    pub(crate) async fn set_mirror_connected(&self, connected: bool) {
        self.update(|i| i.mirror = connected).await;
    }

    pub(crate) async fn set_ready(&self) {
        self.update(|i| i.ready = true).await;
        self.ready.send_replace(true);
    }

    /// NOT_SERVING for good (`Health/Check` keeps answering it), then ends every
    /// `Health/Watch` stream (after it delivered NOT_SERVING) so the graceful shutdown does
    /// not wait for them.
    pub(crate) async fn set_stopping(&self) {
        self.update(|i| i.stopping = true).await;
        self.stopped.send_replace(true);
    }

    fn serving(i: Inputs) -> bool {
        i.ready && !i.stopping && i.operator && i.mirror
    }

    /// Applies `change` and publishes the result, under the lock. Once stopping, NOT_SERVING
    /// is published and final: later changes (a racing `set_serving(true)`, a late
    /// `set_ready`) are ignored, so nothing turns the status back or recreates an entry.
    async fn update(&self, change: impl FnOnce(&mut Inputs)) {
        let mut inputs = self.inputs.lock().await;
        if inputs.stopping {
            return;
        }
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

/// tonic-health's service, whose `Watch` streams also end once the server is stopping.
///
/// tonic-health ends a watch stream only when its service's status entry is removed, which
/// would also make `Check` answer NOT_FOUND during the shutdown; this keeps the entries.
#[derive(Debug)]
pub(crate) struct StoppableHealth {
    inner: HealthService,
    stopped: tokio::sync::watch::Receiver<bool>,
}

#[tonic::async_trait]
impl Health for StoppableHealth {
    async fn check(
        &self,
        request: tonic::Request<HealthCheckRequest>,
    ) -> Result<tonic::Response<HealthCheckResponse>, tonic::Status> {
        self.inner.check(request).await
    }

    type WatchStream = StoppableWatch;

    async fn watch(
        &self,
        request: tonic::Request<HealthCheckRequest>,
    ) -> Result<tonic::Response<Self::WatchStream>, tonic::Status> {
        let inner = self.inner.watch(request).await?.into_inner();
        let mut stopped = self.stopped.clone();
        Ok(tonic::Response::new(StoppableWatch {
            inner,
            stopping: Box::pin(async move {
                let _ = stopped.wait_for(|s| *s).await;
            }),
            stopped: false,
        }))
    }
}

/// A `Health/Watch` stream that ends once the server is stopping, after delivering every
/// status already published (NOT_SERVING is published before the stop signal).
pub(crate) struct StoppableWatch {
    inner: tonic_health::server::WatchStream,
    stopping: Pin<Box<dyn Future<Output = ()> + Send>>,
    stopped: bool,
}

impl std::fmt::Debug for StoppableWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoppableWatch")
            .field("stopped", &self.stopped)
            .finish_non_exhaustive()
    }
}

impl Stream for StoppableWatch {
    type Item = Result<HealthCheckResponse, tonic::Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if !this.stopped && this.stopping.as_mut().poll(cx).is_ready() {
            this.stopped = true;
        }
        match Pin::new(&mut this.inner).poll_next(cx) {
            Poll::Ready(Some(item)) => Poll::Ready(Some(item)),
            Poll::Ready(None) => Poll::Ready(None),
            // Nothing more published: once stopping, that means NOT_SERVING went out.
            Poll::Pending if this.stopped => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
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
            None => Box::pin(async { Ok(EtcdError::Starting.status().into_http()) }),
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio_stream::StreamExt;
    use tonic_health::pb::health_check_response::ServingStatus as Wire;

    use super::*;

    fn req(service: &str) -> tonic::Request<HealthCheckRequest> {
        tonic::Request::new(HealthCheckRequest {
            service: service.into(),
        })
    }

    async fn check(svc: &StoppableHealth, service: &str) -> Wire {
        let r = svc.check(req(service)).await.unwrap().into_inner();
        Wire::try_from(r.status).unwrap()
    }

    fn status(item: Option<Result<HealthCheckResponse, tonic::Status>>) -> Wire {
        Wire::try_from(item.expect("a health update").unwrap().status).unwrap()
    }

    /// The mirror's connection and the embedder's switch are separate inputs: a reconnecting
    /// mirror does not undo an operator's `set_serving(false)`, and an operator's
    /// `set_serving(true)` does not hide a disconnected mirror.
    #[tokio::test]
    async fn mirror_and_operator_inputs_are_independent() {
        let h = HealthHandle::new(HealthReporter::new()).await;
        h.set_mirror_connected(false).await;
        h.set_ready().await;
        assert!(!h.is_serving().await);
        h.set_serving(true).await;
        assert!(
            !h.is_serving().await,
            "operator true must not hide the mirror"
        );
        h.set_mirror_connected(true).await;
        assert!(h.is_serving().await);
        h.set_serving(false).await;
        h.set_mirror_connected(true).await;
        assert!(
            !h.is_serving().await,
            "mirror reconnect must not undo the operator"
        );
        h.set_serving(true).await;
        assert!(h.is_serving().await);
    }

    #[tokio::test]
    async fn shutdown_is_final_not_serving_and_ends_watches() {
        let h = HealthHandle::new(HealthReporter::new()).await;
        let svc = StoppableHealth {
            inner: HealthService::from_health_reporter(h.reporter.clone()),
            stopped: h.stopped.subscribe(),
        };
        h.set_ready().await;
        assert_eq!(check(&svc, "").await, Wire::Serving);
        let mut watch = svc.watch(req("")).await.unwrap().into_inner();
        assert_eq!(status(watch.next().await), Wire::Serving);

        h.set_stopping().await;
        // A racing embedder flip or a late readiness cannot turn it back.
        h.set_serving(true).await;
        h.set_ready().await;
        assert!(!h.is_serving().await);
        // Check keeps answering NOT_SERVING (not NOT_FOUND) for every name.
        for name in std::iter::once("").chain(SERVICES) {
            assert_eq!(check(&svc, name).await, Wire::NotServing, "{name}");
        }
        // The open watch delivers NOT_SERVING, then ends.
        assert_eq!(status(watch.next().await), Wire::NotServing);
        assert!(watch.next().await.is_none());
        // A watch opened during the shutdown gets the status, then ends.
        let mut late = svc
            .watch(req("etcdserverpb.KV"))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(status(late.next().await), Wire::NotServing);
        assert!(late.next().await.is_none());
    }
}

//! etcd's HTTP/JSON gateway and its plain HTTP endpoints (`/health`, `/version`, `/metrics`)
//! on the client port, beside the gRPC services.
//!
//! [`GatewayLayer`] wraps the server's gRPC router. An HTTP/2 request whose content type is
//! `application/grpc` goes to the router unchanged; every other request (HTTP/1.x, or HTTP/2
//! without that content type) is answered here, as etcd answers it:
//!
//! - `POST /v3/<service>/<method>` (and the `/v3beta/` alias): the JSON body is decoded into
//!   the method's protobuf request (canonical JSON, see `watch_proto`'s serde impls), framed as
//!   gRPC and sent **through the same router** (so the same service code, auth gate, health gate
//!   and RPC metrics apply), with the `Authorization` header as the `token` metadata. The
//!   response becomes JSON, or a gRPC error becomes etcd's error body and HTTP status.
//! - Streams (`/v3/watch`, `/v3/lease/keepalive`): the body is read as a run of JSON objects,
//!   each one sent as it completes; each response message goes out as `{"result":...}\n`.
//!   As etcd's, the response never ends on its own: the end of the request body stops input
//!   only, and the client closing the connection ends the call.
//! - `/health`, `/version`, `/metrics`; anything else is 404.
//!
//! Limits: a unary body, and any one object of a stream, may hold at most
//! [`GatewaySettings::max_json_bytes`]; more is refused (unary: 400; a stream's first object:
//! 500, as a malformed one) or ends a stream's input (a later object).

mod grpc;
mod routes;

/// Error type of the bodies the gateway reads.
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::TryFutureExt;
use futures_util::future::Either;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use tonic::body::Body;
use tower::ServiceExt;

use super::health::HealthHandle;
use super::metrics::Metrics;
use routes::{Kind, Parsed};

/// What the gateway needs from the server.
#[derive(Clone)]
pub struct GatewaySettings {
    /// The largest JSON body (unary) or JSON object (stream) accepted, in bytes.
    pub max_json_bytes: usize,
    /// Readiness for `/health` (the gRPC health service's status).
    pub health: HealthHandle,
    /// The registry `/metrics` serves.
    pub metrics: Arc<Metrics>,
}

impl std::fmt::Debug for GatewaySettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewaySettings")
            .field("max_json_bytes", &self.max_json_bytes)
            .finish_non_exhaustive()
    }
}

/// The JSON body limit derived from the gRPC request limit: a request's bytes grow by a third
/// as base64, plus field names; twice the gRPC limit plus 1 MiB covers that with room.
pub fn max_json_bytes(max_request_bytes: usize) -> usize {
    max_request_bytes.saturating_mul(2).saturating_add(1 << 20)
}

/// Tower layer putting the gateway in front of the gRPC router (see the module docs).
#[derive(Debug, Clone)]
pub struct GatewayLayer {
    settings: Arc<GatewaySettings>,
}

impl GatewayLayer {
    /// A layer answering with `settings`.
    pub fn new(settings: GatewaySettings) -> Self {
        Self {
            settings: Arc::new(settings),
        }
    }
}

impl<S> tower::Layer<S> for GatewayLayer {
    type Service = Gateway<S>;

    fn layer(&self, inner: S) -> Gateway<S> {
        Gateway {
            inner,
            settings: self.settings.clone(),
        }
    }
}

/// See [`GatewayLayer`].
#[derive(Debug, Clone)]
pub struct Gateway<S> {
    inner: S,
    settings: Arc<GatewaySettings>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// The gRPC router as the gateway calls it (boxed once per call, so the gateway's functions
/// need no generics over the router's types).
type Router = tower::util::BoxService<Request<Body>, Response<Body>, String>;

impl<S, ResBody> tower::Service<Request<Body>> for Gateway<S>
where
    S: tower::Service<Request<Body>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: std::fmt::Display + Send + 'static,
    ResBody: http_body::Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    type Response = Response<Body>;
    type Error = S::Error;
    /// gRPC calls pass through unboxed (no allocation added to the gRPC path); HTTP answers
    /// are boxed.
    type Future = futures_util::future::Either<
        futures_util::future::MapOk<S::Future, fn(Response<ResBody>) -> Response<Body>>,
        BoxFuture<Result<Response<Body>, S::Error>>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        if is_grpc(&req) {
            let boxed: fn(Response<ResBody>) -> Response<Body> = |r| r.map(Body::new);
            return Either::Left(self.inner.call(req).map_ok(boxed));
        }
        // The router stays ready (tonic's router always is), so a clone serves the gateway's
        // own call; `self.inner` keeps the readiness `poll_ready` reserved.
        let inner = Router::new(
            self.inner
                .clone()
                .map_response(|r| r.map(Body::new))
                .map_err(|e| e.to_string()),
        );
        let settings = self.settings.clone();
        Either::Right(Box::pin(async move {
            let mut resp = handle(inner, &settings, req).await;
            cors(resp.headers_mut());
            Ok(resp)
        }))
    }
}

/// etcd's split: HTTP/2 with a gRPC content type is gRPC; everything else is HTTP.
fn is_grpc<B>(req: &Request<B>) -> bool {
    req.version() == http::Version::HTTP_2
        && req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/grpc"))
}

/// etcd's CORS headers, on every HTTP answer.
fn cors(h: &mut http::HeaderMap) {
    h.insert(
        "access-control-allow-headers",
        HeaderValue::from_static("accept, content-type, authorization"),
    );
    h.insert(
        "access-control-allow-methods",
        HeaderValue::from_static("POST, GET, OPTIONS, PUT, DELETE"),
    );
    h.insert("access-control-allow-origin", HeaderValue::from_static("*"));
}

async fn handle(inner: Router, settings: &GatewaySettings, req: Request<Body>) -> Response<Body> {
    if req.method() == Method::OPTIONS {
        return Response::new(Body::empty());
    }
    let path = req.uri().path();
    let path = match path.strip_prefix("/v3beta/") {
        Some(rest) => format!("/v3/{rest}"),
        None => path.to_owned(),
    };
    match path.as_str() {
        "/health" => {
            if req.method() != Method::GET {
                return method_not_allowed(true);
            }
            let (status, body) = if settings.health.is_serving().await {
                (StatusCode::OK, r#"{"health":"true"}"#)
            } else {
                (StatusCode::SERVICE_UNAVAILABLE, r#"{"health":"false"}"#)
            };
            return with_type(
                status,
                "text/plain; charset=utf-8",
                Bytes::from_static(body.as_bytes()),
            );
        }
        "/version" => {
            if req.method() != Method::GET {
                return method_not_allowed(true);
            }
            let body = format!(
                r#"{{"etcdserver":"{}","etcdcluster":"{}"}}"#,
                super::ETCD_VERSION,
                cluster_version(super::ETCD_VERSION)
            );
            return with_type(StatusCode::OK, "application/json", Bytes::from(body));
        }
        "/metrics" => {
            return with_type(
                StatusCode::OK,
                super::metrics::CONTENT_TYPE,
                Bytes::from(settings.metrics.encode()),
            );
        }
        _ => {}
    }
    if !path.starts_with("/v3/") {
        return text(StatusCode::NOT_FOUND, "404 page not found\n");
    }
    let Some(route) = routes::lookup(&path) else {
        return text(StatusCode::NOT_FOUND, "Not Found\n");
    };
    if req.method() != Method::POST {
        return method_not_allowed(false);
    }
    match route.kind {
        Kind::Unary => match one_request(settings, route, req).await {
            Ok((parts, frame)) => grpc::unary(inner, route, &parts, frame).await,
            Err(refused) => refused,
        },
        Kind::ServerStream => match one_request(settings, route, req).await {
            Ok((parts, frame)) => grpc::server_stream(inner, route, &parts, frame).await,
            Err(refused) => refused,
        },
        Kind::Stream => grpc::stream(inner, settings.max_json_bytes, route, req).await,
    }
}

/// `major.minor.0`: etcd's cluster version next to its server version.
fn cluster_version(server: &str) -> String {
    let mut parts = server.splitn(3, '.');
    match (parts.next(), parts.next()) {
        (Some(major), Some(minor)) => format!("{major}.{minor}.0"),
        _ => server.to_owned(),
    }
}

/// The one request object of a unary or server-streaming call, framed, or the HTTP answer
/// refusing it.
async fn one_request(
    settings: &GatewaySettings,
    route: routes::Route,
    req: Request<Body>,
) -> Result<(http::request::Parts, Bytes), Response<Body>> {
    let (parts, body) = req.into_parts();
    let json = match http_body_util::Limited::new(body, settings.max_json_bytes)
        .collect()
        .await
    {
        Ok(c) => c.to_bytes(),
        Err(e) => {
            let status = match e.downcast_ref::<http_body_util::LengthLimitError>() {
                Some(_) => tonic::Status::invalid_argument(format!(
                    "request body exceeds {} bytes",
                    settings.max_json_bytes
                )),
                None => tonic::Status::invalid_argument(format!("reading the request body: {e}")),
            };
            return Err(grpc::error_response(&status));
        }
    };
    // As etcd's gateway: the first JSON value counts and anything after it is ignored; an
    // empty body is an empty request.
    let frame = match (route.parse)(&json) {
        Parsed::Message(frame, _) => frame,
        Parsed::Incomplete(false) => (route.empty)(),
        Parsed::Incomplete(true) => {
            return Err(grpc::error_response(&tonic::Status::invalid_argument(
                "unexpected EOF",
            )));
        }
        Parsed::Invalid(message) => {
            return Err(grpc::error_response(&tonic::Status::invalid_argument(
                message,
            )));
        }
    };
    Ok((parts, frame))
}

fn with_type(status: StatusCode, content_type: &'static str, body: Bytes) -> Response<Body> {
    let mut resp = Response::new(Body::new(http_body_util::Full::new(body)));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

/// Go's `http.Error`: a text body, `nosniff`.
fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut resp = with_type(
        status,
        "text/plain; charset=utf-8",
        Bytes::from_static(body.as_bytes()),
    );
    resp.headers_mut().insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    resp
}

/// 405; `/health` and `/version` also say `Allow: GET`, as etcd's do.
fn method_not_allowed(allow_get: bool) -> Response<Body> {
    let mut resp = text(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed\n");
    if allow_get {
        resp.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET"));
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_version_is_major_minor_zero() {
        assert_eq!(cluster_version("3.5.13"), "3.5.0");
        assert_eq!(cluster_version("3"), "3");
    }

    #[test]
    fn only_http2_with_a_grpc_content_type_is_grpc() {
        let req = |v, ct: &str| {
            Request::builder()
                .version(v)
                .header(header::CONTENT_TYPE, ct)
                .body(())
                .unwrap()
        };
        assert!(is_grpc(&req(http::Version::HTTP_2, "application/grpc")));
        assert!(is_grpc(&req(
            http::Version::HTTP_2,
            "application/grpc+proto"
        )));
        assert!(!is_grpc(&req(http::Version::HTTP_2, "application/json")));
        assert!(!is_grpc(&req(http::Version::HTTP_11, "application/grpc")));
    }
}

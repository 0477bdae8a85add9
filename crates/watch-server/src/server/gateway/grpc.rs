//! The gateway's side of a gRPC call: the synthetic request sent through the router, the
//! reading of gRPC frames and status from its response, and etcd's HTTP form of both.

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use serde::Serialize;
use tonic::body::Body;
use tonic::{Code, Status};
use tower::ServiceExt;

use super::routes::{Parsed, Route};
use super::{BoxError, Router};
use crate::auth::TOKEN_METADATA;

/// grpc-gateway's `HTTPStatusFromCode` (v1.9.5, the version etcd 3.4 ships).
pub(super) fn http_status(code: Code) -> StatusCode {
    match code {
        Code::Ok => StatusCode::OK,
        Code::Cancelled => StatusCode::REQUEST_TIMEOUT,
        Code::Unknown | Code::Internal | Code::DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
        Code::InvalidArgument | Code::OutOfRange => StatusCode::BAD_REQUEST,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::FailedPrecondition => StatusCode::PRECONDITION_FAILED,
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
    }
}

/// etcd's unary error body (field order as etcd writes it; `code` is never 0 here).
#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
    message: &'a str,
    code: i32,
}

/// etcd's error chunk inside a stream (grpc-gateway's `StreamError`, proto field names).
#[derive(Serialize)]
struct StreamError<'a> {
    grpc_code: i32,
    http_code: u16,
    message: &'a str,
    http_status: &'a str,
}

fn json_response(status: StatusCode, body: Body) -> Response<Body> {
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// A failed call as etcd's gateway answers it: HTTP status by code, JSON error body.
pub(super) fn error_response(status: &Status) -> Response<Body> {
    let body = ErrorBody {
        error: status.message(),
        message: status.message(),
        code: status.code() as i32,
    };
    // Strings and integers only: serializing cannot fail.
    let bytes = serde_json::to_vec(&body).unwrap_or_default();
    json_response(http_status(status.code()), full(Bytes::from(bytes)))
}

fn stream_error_chunk(status: &Status) -> Bytes {
    let http = http_status(status.code());
    let chunk = serde_json::json!({ "error": StreamError {
        grpc_code: status.code() as i32,
        http_code: http.as_u16(),
        message: status.message(),
        http_status: http.canonical_reason().unwrap_or(""),
    }});
    let mut bytes = serde_json::to_vec(&chunk).unwrap_or_default();
    bytes.push(b'\n');
    Bytes::from(bytes)
}

fn full(bytes: Bytes) -> Body {
    Body::new(http_body_util::Full::new(bytes))
}

/// A success: etcd's headers (its gateway forwards the gRPC response's content type as
/// `Grpc-Metadata-Content-Type`).
fn ok_response(body: Body) -> Response<Body> {
    let mut resp = json_response(StatusCode::OK, body);
    resp.headers_mut().insert(
        "grpc-metadata-content-type",
        HeaderValue::from_static("application/grpc"),
    );
    resp
}

/// The synthetic gRPC request for `route`, carrying the HTTP request's connection info (peer
/// address, TLS certificates) and its `Authorization` header as the `token` metadata.
fn grpc_request(route: Route, parts: &http::request::Parts, body: Body) -> Request<Body> {
    let mut req = Request::new(body);
    *req.version_mut() = http::Version::HTTP_2;
    *req.method_mut() = http::Method::POST;
    *req.uri_mut() = http::Uri::from_static(route.grpc_path);
    *req.extensions_mut() = parts.extensions.clone();
    let h = req.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    h.insert(header::TE, HeaderValue::from_static("trailers"));
    if let Some(token) = parts.headers.get(header::AUTHORIZATION) {
        h.insert(TOKEN_METADATA, token.clone());
    }
    req
}

/// What the next read of a gRPC response yields.
enum Next {
    /// One message (protobuf bytes, without the 5-byte prefix).
    Message(Bytes),
    /// The call ended with this status (OK included).
    End(Status),
}

/// Reads gRPC messages and the final status from a response body.
struct Frames {
    body: Body,
    buf: BytesMut,
    /// Status from trailers-only response headers, if the response had them.
    early: Option<Status>,
}

impl Frames {
    fn new<B>(resp: Response<B>) -> Frames
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let early = Status::from_header_map(resp.headers());
        Frames {
            body: Body::new(resp.into_body()),
            buf: BytesMut::new(),
            early,
        }
    }

    async fn next(&mut self) -> Next {
        if let Some(s) = self.early.take() {
            return Next::End(s);
        }
        loop {
            if self.buf.len() >= 5 {
                if self.buf[0] != 0 {
                    return Next::End(Status::internal("compressed gRPC message from the server"));
                }
                let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]])
                    as usize;
                if self.buf.len() >= 5 + len {
                    self.buf.advance(5);
                    return Next::Message(self.buf.split_to(len).freeze());
                }
            }
            match self.body.frame().await {
                Some(Ok(frame)) => {
                    match frame.into_data() {
                        Ok(data) => self.buf.extend_from_slice(&data),
                        Err(frame) => {
                            if let Some(t) = frame.trailers_ref() {
                                return Next::End(Status::from_header_map(t).unwrap_or_else(
                                    || Status::unknown("no grpc-status in trailers"),
                                ));
                            }
                        }
                    }
                }
                Some(Err(e)) => return Next::End(Status::from_error(e.into())),
                None => return Next::End(Status::unknown("gRPC response ended without a status")),
            }
        }
    }
}

/// One unary call through the router; the HTTP answer.
pub(super) async fn unary(
    inner: Router,
    route: Route,
    parts: &http::request::Parts,
    frame: Bytes,
) -> Response<Body> {
    let req = grpc_request(route, parts, full(frame));
    let resp = match inner.oneshot(req).await {
        Ok(r) => r,
        Err(e) => return error_response(&Status::internal(e)),
    };
    let mut frames = Frames::new(resp);
    let message = match frames.next().await {
        Next::Message(m) => m,
        Next::End(s) if s.code() == Code::Ok => {
            return error_response(&Status::internal("gRPC call ended without a response"));
        }
        Next::End(s) => return error_response(&s),
    };
    match frames.next().await {
        Next::End(s) if s.code() == Code::Ok => {}
        Next::End(s) => return error_response(&s),
        Next::Message(_) => {
            return error_response(&Status::internal("unary gRPC call sent two responses"));
        }
    }
    match (route.render)(&message) {
        Ok(json) => ok_response(full(Bytes::from(json))),
        Err(e) => error_response(&Status::internal(e)),
    }
}

/// Feeds the HTTP request body to the gRPC call as frames, one per complete JSON object.
/// The input ends (the gRPC half-close) at the end of the body, at something that is not a
/// request, or at an object over the limit, as etcd's gateway does; the service then decides,
/// as over gRPC: Watch keeps streaming, LeaseKeepAlive ends the call.
struct Input {
    body: Body,
    buf: BytesMut,
    max: usize,
    parse: fn(&[u8]) -> Parsed,
}

/// What the next read of a stream's input yields.
enum Read {
    /// One request, framed.
    Frame(Bytes),
    /// The body ended cleanly (between objects).
    End,
    /// Not a request: malformed, cut off by the end of the body, or over the limit.
    Malformed(String),
}

impl Input {
    async fn read(&mut self) -> Read {
        loop {
            match (self.parse)(&self.buf) {
                Parsed::Message(frame, used) => {
                    self.buf.advance(used);
                    return Read::Frame(frame);
                }
                Parsed::Invalid(message) => return Read::Malformed(message),
                Parsed::Incomplete(_) if self.buf.len() > self.max => {
                    return Read::Malformed(format!("request object exceeds {} bytes", self.max));
                }
                Parsed::Incomplete(partial) => match self.body.frame().await {
                    Some(Ok(f)) => {
                        if let Ok(data) = f.into_data() {
                            self.buf.extend_from_slice(&data);
                        }
                    }
                    Some(Err(e)) => return Read::Malformed(e.to_string()),
                    None if partial => return Read::Malformed("unexpected EOF".to_owned()),
                    None => return Read::End,
                },
            }
        }
    }

    /// The next frame to send; `None` ends the input (logged when it was not a clean end).
    async fn next_frame(&mut self) -> Option<Bytes> {
        match self.read().await {
            Read::Frame(f) => Some(f),
            Read::End => None,
            Read::Malformed(message) => {
                tracing::debug!(%message, "gateway stream: input is not a request; input ends");
                None
            }
        }
    }
}

/// A bidi streaming call (watch, lease keep-alive) as etcd's gateway runs it.
pub(super) async fn stream(
    inner: Router,
    max_json_bytes: usize,
    route: Route,
    req: Request<Body>,
) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let mut input = Input {
        body,
        buf: BytesMut::new(),
        max: max_json_bytes,
        parse: route.parse,
    };
    // etcd's gateway reads the first object before calling: a malformed one is an HTTP error
    // (code 2, as its decoder's error carries no gRPC code); an empty body opens the call
    // with its input already ended.
    let first = match input.read().await {
        Read::Frame(f) => Some(f),
        Read::End => None,
        Read::Malformed(message) => return error_response(&Status::unknown(message)),
    };
    let frames = futures_util::stream::unfold((first, input), |(first, mut input)| async move {
        let frame = match first {
            Some(f) => f,
            None => input.next_frame().await?,
        };
        Some((
            Ok::<_, Status>(http_body::Frame::data(frame)),
            (None, input),
        ))
    });
    let body = Body::new(http_body_util::StreamBody::new(frames));
    stream_response(inner, route, &parts, body).await
}

/// A server-streaming call (Election.Observe): one request, a stream of results.
pub(super) async fn server_stream(
    inner: Router,
    route: Route,
    parts: &http::request::Parts,
    frame: Bytes,
) -> Response<Body> {
    stream_response(inner, route, parts, full(frame)).await
}

/// Sends `body` as the call's request stream and answers with etcd's stream of results.
async fn stream_response(
    inner: Router,
    route: Route,
    parts: &http::request::Parts,
    body: Body,
) -> Response<Body> {
    let resp = match inner.oneshot(grpc_request(route, parts, body)).await {
        Ok(r) => r,
        Err(e) => return error_response(&Status::internal(e)),
    };
    let mut frames = Frames::new(resp);
    // Headers go out with the first message, as etcd's.
    let first = match frames.next().await {
        Next::Message(m) => m,
        Next::End(s) if s.code() == Code::Ok => return ok_response(Body::empty()),
        // grpc-gateway writes the error chunk with the status of its code.
        Next::End(s) => {
            return json_response(http_status(s.code()), full(stream_error_chunk(&s)));
        }
    };
    let render = route.render;
    let chunks = futures_util::stream::unfold(
        (Some(first), Some(frames)),
        move |(first, frames)| async move {
            let mut frames = frames?;
            let message = match first {
                Some(m) => m,
                None => match frames.next().await {
                    Next::Message(m) => m,
                    Next::End(s) if s.code() == Code::Ok => return None,
                    Next::End(s) => {
                        let chunk = stream_error_chunk(&s);
                        return Some((
                            Ok::<_, Status>(http_body::Frame::data(chunk)),
                            (None, None),
                        ));
                    }
                },
            };
            let chunk = match render(&message) {
                Ok(json) => {
                    let mut out = Vec::with_capacity(json.len() + 12);
                    out.extend_from_slice(b"{\"result\":");
                    out.extend_from_slice(&json);
                    out.extend_from_slice(b"}\n");
                    Bytes::from(out)
                }
                Err(e) => stream_error_chunk(&Status::internal(e)),
            };
            Some((Ok(http_body::Frame::data(chunk)), (None, Some(frames))))
        },
    );
    ok_response(Body::new(http_body_util::StreamBody::new(chunks)))
}

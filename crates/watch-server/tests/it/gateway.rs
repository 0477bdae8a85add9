//! The HTTP/JSON gateway, differentially: the same HTTP requests go to keywatch and to a real
//! etcd, and the two transcripts (status, the headers clients read, the JSON body) must be
//! equal once the values that legitimately differ are masked: cluster and member ids, raft
//! terms and indexes, the server version, tokens, remaining lease TTLs, and the decoder's
//! wording of a malformed body (Go's and serde's messages differ; status and code must not).
//!
//! Covers KV, Lease (unary and the keep-alive stream), Maintenance status, Cluster member
//! list, Lock and Election (Observe's server stream), the watch stream (create, events, progress, a second watcher, cancel, a compacted
//! start), auth (token in `Authorization`), errors (bad JSON, bad base64, unknown path, wrong
//! method, `/v3alpha/`), the `/v3beta/` alias, CORS, `/health`, `/version`, `/metrics`; and
//! the Python gateway client `etcd3gw` driving both servers with one script.

use crate::common::{GUARD, Server, Target};
use crate::compat_auth::Secured;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::Value;

/// One HTTP answer, as far as the comparison goes.
#[derive(Debug, Clone, PartialEq)]
struct Answer {
    status: u16,
    content_type: String,
    cors: String,
    body: Body,
}

#[derive(Debug, Clone, PartialEq)]
enum Body {
    Json(Value),
    Text(String),
}

/// Which fields to mask in a body, besides the ids every header carries.
#[derive(Clone, Copy)]
enum Mask {
    /// Only `cluster_id`, `member_id`, `raft_term` (everywhere).
    Ids,
    /// Also `TTL` (a remaining lease TTL, which depends on time).
    Ttl,
    /// Also Status's server facts.
    Status,
    /// Also the members' ids, names and client URLs; peer URLs are dropped (keywatch has no
    /// peers).
    Members,
    /// Also `token`.
    Token,
    /// Also the error wording of a malformed request (`error`, `message`).
    Wording,
    /// Also both version strings of `/version`.
    Version,
}

fn masked_keys(mask: Mask) -> &'static [&'static str] {
    match mask {
        Mask::Ids => &[],
        Mask::Ttl => &["TTL"],
        Mask::Status => &[
            "version",
            "dbSize",
            "dbSizeInUse",
            "leader",
            "raftIndex",
            "raftTerm",
            "raftAppliedIndex",
        ],
        Mask::Members => &["ID", "name", "clientURLs"],
        Mask::Token => &["token"],
        Mask::Wording => &["error", "message"],
        Mask::Version => &["etcdserver", "etcdcluster"],
    }
}

fn normalize(v: &mut Value, mask: Mask) {
    match v {
        Value::Object(map) => {
            // keywatch has no peers, so no peer URLs.
            if matches!(mask, Mask::Members) {
                map.remove("peerURLs");
            }
            for (k, v) in map.iter_mut() {
                if ["cluster_id", "member_id", "raft_term"].contains(&k.as_str())
                    || masked_keys(mask).contains(&k.as_str())
                {
                    *v = Value::String("<masked>".into());
                } else {
                    normalize(v, mask);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|i| normalize(i, mask)),
        _ => {}
    }
}

fn parse_body(bytes: &[u8], mask: Mask) -> Body {
    match serde_json::from_slice::<Value>(bytes) {
        Ok(mut v) => {
            normalize(&mut v, mask);
            Body::Json(v)
        }
        Err(_) => Body::Text(String::from_utf8_lossy(bytes).into_owned()),
    }
}

/// `host:port` of a server's client URL.
fn authority(server: &Server) -> String {
    server
        .endpoint()
        .trim_start_matches("http://")
        .trim_start_matches("https://")
        .to_owned()
}

async fn send<B>(addr: &str, req: http::Request<B>) -> http::Response<Incoming>
where
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .expect("HTTP/1.1 handshake");
    tokio::spawn(conn);
    tokio::time::timeout(GUARD, sender.send_request(req))
        .await
        .expect("an answer within the guard")
        .expect("an HTTP answer")
}

fn request(addr: &str, method: &str, path: &str, auth: Option<&str>) -> http::request::Builder {
    let mut b = http::Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"))
        .header(http::header::HOST, addr);
    if let Some(token) = auth {
        b = b.header(http::header::AUTHORIZATION, token);
    }
    b
}

/// One request with a whole body; the answer, masked.
async fn call(
    addr: &str,
    method: &str,
    path: &str,
    body: &str,
    auth: Option<&str>,
    mask: Mask,
) -> Answer {
    let req = request(addr, method, path, auth)
        .body(Full::new(Bytes::from(body.to_owned())))
        .expect("request");
    let resp = send(addr, req).await;
    let header = |name: &str| {
        resp.headers()
            .get(name)
            .map(|v| v.to_str().unwrap_or("").to_owned())
            .unwrap_or_default()
    };
    let (status, content_type, cors) = (
        resp.status().as_u16(),
        header("content-type"),
        header("access-control-allow-origin"),
    );
    let bytes = tokio::time::timeout(GUARD, resp.into_body().collect())
        .await
        .expect("the body within the guard")
        .expect("the body")
        .to_bytes();
    Answer {
        status,
        content_type,
        cors,
        body: parse_body(&bytes, mask),
    }
}

/// The response's body, the value (`header`, fields) of a `POST` expected to succeed.
async fn ok(addr: &str, path: &str, body: &str) -> Value {
    let a = call(addr, "POST", path, body, None, Mask::Ids).await;
    assert_eq!(a.status, 200, "{path} {body}: {a:?}");
    match a.body {
        Body::Json(v) => v,
        Body::Text(t) => panic!("{path}: not JSON: {t}"),
    }
}

/// An open gateway stream: its whole body sent at once (etcd 3.4 answers an HTTP/1.1 stream
/// only once the request body ended), answer lines read one by one as they come.
struct Stream {
    status: u16,
    body: Incoming,
    buf: Vec<u8>,
}

impl Stream {
    async fn open(addr: &str, path: &str, objects: &str, auth: Option<&str>) -> Stream {
        let req = request(addr, "POST", path, auth)
            .body(Full::new(Bytes::from(objects.to_owned())))
            .expect("request");
        let resp = send(addr, req).await;
        Stream {
            status: resp.status().as_u16(),
            body: resp.into_body(),
            buf: Vec::new(),
        }
    }

    /// The next `\n`-terminated answer, parsed and masked.
    async fn line(&mut self, mask: Mask) -> Value {
        loop {
            if let Some(i) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=i).collect();
                let mut v: Value = serde_json::from_slice(&line).unwrap_or_else(|e| {
                    panic!("stream line {:?}: {e}", String::from_utf8_lossy(&line))
                });
                normalize(&mut v, mask);
                return v;
            }
            let frame = tokio::time::timeout(GUARD, self.body.frame())
                .await
                .expect("a stream line within the guard")
                .expect("the stream went on")
                .expect("a frame");
            if let Ok(data) = frame.into_data() {
                self.buf.extend_from_slice(&data);
            }
        }
    }
}

/// A gateway watch on `foo`, its `created` answer read.
async fn watch_foo(addr: &str) -> Stream {
    let mut w = Stream::open(
        addr,
        "/v3/watch",
        r#"{"create_request":{"key":"Zm9v"}}"#,
        None,
    )
    .await;
    assert_eq!(w.line(Mask::Ids).await["result"]["created"], true);
    w
}

/// Runs `script` against keywatch and etcd (started by `start`) and asserts equal
/// transcripts; keywatch alone, or SKIPPED, when etcd is absent (a failure under
/// `KEYWATCH_REQUIRE_ETCD=1`).
async fn differential<S, F, Fut>(name: &str, start: S, script: F)
where
    S: Fn(Target) -> (Server, Option<tempfile::TempDir>),
    F: Fn(String) -> Fut,
    Fut: std::future::Future<Output = Vec<(String, Value)>>,
{
    let (keywatch, _k) = tokio::task::block_in_place(|| start(Target::Keywatch));
    let ours = script(authority(&keywatch)).await;
    if !crate::common::etcd_and_etcdctl_present(&format!("{name}::etcd")) {
        return;
    }
    let (etcd, _e) = tokio::task::block_in_place(|| start(Target::Etcd));
    let theirs = script(authority(&etcd)).await;
    assert_eq!(
        ours.len(),
        theirs.len(),
        "{name}: transcripts differ in length"
    );
    for ((step, a), (_, b)) in ours.iter().zip(&theirs) {
        assert_eq!(
            a, b,
            "{name}: step `{step}` differs (left keywatch, right etcd)"
        );
    }
}

fn plain(target: Target, name: &str) -> (Server, Option<tempfile::TempDir>) {
    (Server::start(target, name), None)
}

fn answer_json(a: Answer) -> Value {
    serde_json::json!({
        "status": a.status,
        "content_type": a.content_type,
        "cors": a.cors,
        "body": match a.body { Body::Json(v) => v, Body::Text(t) => Value::String(t) },
    })
}

/// A transcript under construction.
struct Script {
    addr: String,
    steps: Vec<(String, Value)>,
}

impl Script {
    fn new(addr: String) -> Script {
        Script {
            addr,
            steps: Vec::new(),
        }
    }

    async fn req(&mut self, method: &str, path: &str, body: &str, auth: Option<&str>, mask: Mask) {
        let a = call(&self.addr, method, path, body, auth, mask).await;
        self.steps
            .push((format!("{method} {path} {body}"), answer_json(a)));
    }

    async fn post(&mut self, path: &str, body: &str) {
        self.req("POST", path, body, None, Mask::Ids).await;
    }

    async fn post_masked(&mut self, path: &str, body: &str, mask: Mask) {
        self.req("POST", path, body, None, mask).await;
    }

    fn note(&mut self, step: &str, v: Value) {
        self.steps.push((step.to_owned(), v));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_lease_cluster_and_errors() {
    differential("kv_lease_cluster_and_errors", |t| plain(t, "gw-kv"), |addr| async move {
        let mut s = Script::new(addr);
        // etcd's documented examples (foo=bar, foo=baz).
        s.post("/v3/kv/put", r#"{"key":"Zm9v","value":"YmFy"}"#).await;
        s.post("/v3/kv/put", r#"{"key":"Zm9v","value":"YmF6","prev_kv":true}"#).await;
        s.post("/v3/kv/range", r#"{"key":"Zm9v"}"#).await;
        s.post("/v3beta/kv/range", r#"{"key":"Zm9v"}"#).await;
        for (k, v) in [("azE=", "MQ=="), ("azI=", "Mg=="), ("azM=", "Mw==")] {
            s.post("/v3/kv/put", &format!(r#"{{"key":"{k}","value":"{v}"}}"#)).await;
        }
        // int64 as a number or a string, enums by name or number, unknown fields ignored.
        s.post("/v3/kv/range", r#"{"key":"aw==","range_end":"bA==","limit":1}"#).await;
        s.post("/v3/kv/range", r#"{"key":"aw==","range_end":"bA==","limit":"2","sort_order":"DESCEND","sort_target":"KEY","nope":1}"#).await;
        s.post("/v3/kv/range", r#"{"key":"aw==","range_end":"bA==","sort_order":1,"keys_only":true}"#).await;
        s.post("/v3/kv/range", r#"{"key":"aw==","range_end":"bA==","count_only":true}"#).await;
        s.post("/v3/kv/range", r#"{"key":"bm9uZQ=="}"#).await;
        s.post("/v3/kv/range", r#"{"key":"Zm9v","revision":"2"}"#).await;
        s.post("/v3/kv/deleterange", r#"{"key":"azI=","prev_kv":true}"#).await;
        s.post("/v3/kv/deleterange", r#"{"key":"azI="}"#).await;
        let txn = r#"{"compare":[{"key":"Zm9v","result":"EQUAL","target":"VALUE","value":"YmF6"}],"success":[{"request_put":{"key":"Zm9v","value":"cXV4"}},{"request_range":{"key":"Zm9v"}}],"failure":[{"request_range":{"key":"Zm9v"}}]}"#;
        s.post("/v3/kv/txn", txn).await;
        s.post("/v3/kv/txn", txn).await;
        s.post("/v3/kv/txn", r#"{"compare":[{"key":"Zm9v","target":"MOD","result":"GREATER","mod_revision":"1"}],"success":[{"request_delete_range":{"key":"azM=","prev_kv":true}}]}"#).await;
        s.post("/v3/kv/compaction", r#"{"revision":"3","physical":true}"#).await;
        s.post("/v3/kv/compaction", r#"{"revision":"3"}"#).await;
        s.post("/v3/kv/range", r#"{"key":"Zm9v","revision":"2"}"#).await;
        s.post("/v3/kv/range", r#"{"key":"Zm9v","revision":"999"}"#).await;
        // Leases, with fixed IDs so both servers agree.
        s.post("/v3/lease/grant", r#"{"TTL":60,"ID":1234}"#).await;
        s.post("/v3/lease/grant", r#"{"TTL":"60","ID":"1234"}"#).await;
        s.post("/v3/kv/put", r#"{"key":"bGs=","value":"dg==","lease":"1234"}"#).await;
        s.post_masked("/v3/lease/timetolive", r#"{"ID":"1234","keys":true}"#, Mask::Ttl).await;
        s.post_masked("/v3/kv/lease/timetolive", r#"{"ID":1234}"#, Mask::Ttl).await;
        s.post("/v3/lease/leases", "{}").await;
        s.post("/v3/kv/lease/leases", "").await;
        let mut ka = Stream::open(
            &s.addr,
            "/v3/lease/keepalive",
            r#"{"ID":"1234"} {"ID":"999"}"#,
            None,
        )
        .await;
        let first = ka.line(Mask::Ttl).await;
        let second = ka.line(Mask::Ids).await;
        s.note("keepalive", serde_json::json!([ka.status, first, second]));
        s.post("/v3/lease/revoke", r#"{"ID":"1234"}"#).await;
        s.post("/v3/kv/lease/revoke", r#"{"ID":"1234"}"#).await;
        s.post("/v3/lease/timetolive", r#"{"ID":"1234"}"#).await;
        s.post("/v3/kv/range", r#"{"key":"bGs="}"#).await;
        // Cluster and maintenance.
        s.post_masked("/v3/cluster/member/list", "{}", Mask::Members).await;
        s.post_masked("/v3/maintenance/status", "{}", Mask::Status).await;
        // Errors.
        s.post("/v3/kv/range", "").await;
        s.post("/v3/kv/put", r#"{"value":"YmFy"}"#).await;
        s.post_masked("/v3/kv/range", "{bad", Mask::Wording).await;
        s.post_masked("/v3/kv/range", r#"{"key":"Zm9"}"#, Mask::Wording).await;
        s.post_masked("/v3/kv/range", "[]", Mask::Wording).await;
        s.post_masked("/v3/kv/range", r#"{"key":"Zm9v","sort_order":"nope"}"#, Mask::Wording).await;
        s.post_masked("/v3/kv/range", r#"{"key":"Zm9v""#, Mask::Wording).await;
        s.post("/v3/kv/range", r#"{"key":"Zm9v"} trailing"#).await;
        s.post("/v3/nope", "{}").await;
        s.post("/v3alpha/kv/range", r#"{"key":"Zm9v"}"#).await;
        s.post("/nope", "").await;
        s.req("GET", "/v3/kv/range", "", None, Mask::Ids).await;
        s.req("PUT", "/v3/kv/put", "{}", None, Mask::Ids).await;
        s.req("OPTIONS", "/v3/kv/range", "", None, Mask::Ids).await;
        // Auth is off: Authenticate is refused, and so is any request carrying a token.
        s.post("/v3/auth/authenticate", r#"{"name":"root","password":"x"}"#).await;
        s.req("POST", "/v3/kv/range", r#"{"key":"Zm9v"}"#, Some("garbage"), Mask::Ids).await;
        // Plain endpoints.
        s.req("GET", "/health", "", None, Mask::Ids).await;
        s.req("POST", "/health", "", None, Mask::Ids).await;
        s.req("GET", "/version", "", None, Mask::Version).await;
        s.req("POST", "/version", "", None, Mask::Ids).await;
        s.steps
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_stream() {
    differential(
        "watch_stream",
        |t| plain(t, "gw-watch"),
        |addr| async move {
            let mut s = Script::new(addr.clone());
            // Several objects in one body: a range watcher with prev_kv,
            // a second watcher with its own id, a progress request (newline-separated, as clients send them).
            let mut w = Stream::open(
                &addr,
                "/v3/watch",
                concat!(
                    r#"{"create_request":{"key":"dw==","range_end":"eA==","prev_kv":true}}"#,
                    "\n",
                    r#"{"create_request":{"key":"eg==","watch_id":7}}"#,
                    "\n",
                    r#"{"progress_request":{}}"#,
                ),
                None,
            )
            .await;
            let mut lines = vec![serde_json::json!(w.status)];
            for _ in 0..3 {
                lines.push(w.line(Mask::Ids).await);
            }
            ok(&addr, "/v3/kv/put", r#"{"key":"dzE=","value":"YQ=="}"#).await;
            lines.push(w.line(Mask::Ids).await);
            ok(&addr, "/v3/kv/put", r#"{"key":"dzE=","value":"Yg=="}"#).await;
            lines.push(w.line(Mask::Ids).await);
            ok(&addr, "/v3/kv/deleterange", r#"{"key":"dzE="}"#).await;
            lines.push(w.line(Mask::Ids).await);
            ok(&addr, "/v3/kv/put", r#"{"key":"eg==","value":"Yw=="}"#).await;
            lines.push(w.line(Mask::Ids).await);
            s.note("watch", Value::Array(lines));
            drop(w);
            // Create and cancel in one body; the response stays open after the cancel.
            let mut w = Stream::open(
                &addr,
                "/v3/watch",
                r#"{"create_request":{"key":"dw=="}}{"cancel_request":{"watch_id":"0"}}"#,
                None,
            )
            .await;
            let lines = vec![w.line(Mask::Ids).await, w.line(Mask::Ids).await];
            s.note("create then cancel", Value::Array(lines));
            drop(w);
            // A watcher from a compacted revision: created, then canceled with the compaction.
            ok(&addr, "/v3/kv/compaction", r#"{"revision":"4"}"#).await;
            let mut w = Stream::open(
                &addr,
                "/v3/watch",
                r#"{"create_request":{"key":"dw==","start_revision":"2","watch_id":"9"}}"#,
                None,
            )
            .await;
            let lines = vec![w.line(Mask::Ids).await, w.line(Mask::Ids).await];
            s.note("compacted start", Value::Array(lines));
            drop(w);
            // The first object malformed: an HTTP error, code 2.
            s.post_masked("/v3/watch", "{", Mask::Wording).await;
            s.steps
        },
    )
    .await;
}

/// keywatch's `initial_state` extension through the gateway: the JSON request maps to the same
/// proto field (100), so a gateway client lists and watches in one call (keywatch only: etcd
/// ignores the field).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_with_initial_state() {
    let server = tokio::task::block_in_place(|| Server::start(Target::Keywatch, "gw-initial"));
    let addr = authority(&server);
    // w1 = dzE=, w2 = dzI=, x = eA==
    ok(&addr, "/v3/kv/put", r#"{"key":"dzE=","value":"YQ=="}"#).await;
    ok(&addr, "/v3/kv/put", r#"{"key":"dzI=","value":"Yg=="}"#).await;
    ok(&addr, "/v3/kv/put", r#"{"key":"dzE=","value":"Yw=="}"#).await;
    let mut w = Stream::open(
        &addr,
        "/v3/watch",
        r#"{"create_request":{"key":"dw==","range_end":"eA==","initial_state":true}}"#,
        None,
    )
    .await;
    let created = w.line(Mask::Ids).await;
    assert_eq!(created["result"]["created"], true, "{created}");
    assert_eq!(created["result"]["header"]["revision"], "4", "{created}");
    let initial = w.line(Mask::Ids).await;
    let events = initial["result"]["events"]
        .as_array()
        .expect("initial events");
    let kvs: Vec<_> = events
        .iter()
        .map(|e| {
            (
                e["kv"]["key"].clone(),
                e["kv"]["value"].clone(),
                e["kv"]["version"].clone(),
            )
        })
        .collect();
    assert_eq!(
        kvs,
        [
            ("dzE=".into(), "Yw==".into(), "2".into()),
            ("dzI=".into(), "Yg==".into(), "1".into())
        ]
    );
    let marker = w.line(Mask::Ids).await;
    assert!(marker["result"].get("events").is_none(), "{marker}");
    assert_eq!(marker["result"]["header"]["revision"], "4", "{marker}");
    ok(&addr, "/v3/kv/put", r#"{"key":"dzI=","value":"ZA=="}"#).await;
    let live = w.line(Mask::Ids).await;
    assert_eq!(live["result"]["header"]["revision"], "5", "{live}");
    assert_eq!(live["result"]["events"][0]["kv"]["value"], "ZA==", "{live}");
}

/// Lock and Election through the gateway, with a lease of a fixed ID so both servers name
/// the same keys (`<name>/<lease ID in hex>`); Observe is a server stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_and_election() {
    differential(
        "lock_and_election",
        |t| plain(t, "gw-lock"),
        |addr| async move {
            let mut s = Script::new(addr.clone());
            s.post("/v3/lease/grant", r#"{"TTL":60,"ID":4660}"#).await;
            // "mylock" = bXlsb2Nr; its key "mylock/1234" = bXlsb2NrLzEyMzQ=
            s.post("/v3/lock/lock", r#"{"name":"bXlsb2Nr","lease":"4660"}"#)
                .await;
            s.post("/v3/lock/unlock", r#"{"key":"bXlsb2NrLzEyMzQ="}"#)
                .await;
            s.post("/v3/lock/unlock", "{}").await;
            // "ele" = ZWxl; its key "ele/1234" = ZWxlLzEyMzQ=
            s.post(
                "/v3/election/campaign",
                r#"{"name":"ZWxl","lease":"4660","value":"YQ=="}"#,
            )
            .await;
            s.post("/v3/election/leader", r#"{"name":"ZWxl"}"#).await;
            let mut observe =
                Stream::open(&addr, "/v3/election/observe", r#"{"name":"ZWxl"}"#, None).await;
            let current = observe.line(Mask::Ids).await;
            let leader = r#"{"name":"ZWxl","key":"ZWxlLzEyMzQ=","rev":"4","lease":"4660"}"#;
            s.post(
                "/v3/election/proclaim",
                &format!(r#"{{"leader":{leader},"value":"Yg=="}}"#),
            )
            .await;
            let proclaimed = observe.line(Mask::Ids).await;
            s.note(
                "observe",
                serde_json::json!([observe.status, current, proclaimed]),
            );
            drop(observe);
            s.post("/v3/election/proclaim", r#"{"value":"Yw=="}"#).await;
            s.post("/v3/election/resign", &format!(r#"{{"leader":{leader}}}"#))
                .await;
            s.post("/v3/election/leader", r#"{"name":"ZWxl"}"#).await;
            s.steps
        },
    )
    .await;
}

/// compat_auth's users; the cases use alice (role app: readwrite on the prefix `/app/`).
fn secured(target: Target) -> (Server, Option<tempfile::TempDir>) {
    let s = Secured::start(target, "gw-auth", &[]);
    (s.server, s._config)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_token_in_authorization() {
    differential("auth_token_in_authorization", secured, |addr| async move {
        let mut s = Script::new(addr.clone());
        s.post_masked(
            "/v3/auth/authenticate",
            r#"{"name":"alice","password":"wrong"}"#,
            Mask::Token,
        )
        .await;
        s.post_masked(
            "/v3/auth/authenticate",
            r#"{"name":"alice","password":"alicepw"}"#,
            Mask::Token,
        )
        .await;
        let login = ok(
            &addr,
            "/v3/auth/authenticate",
            r#"{"name":"alice","password":"alicepw"}"#,
        )
        .await;
        let token = login["token"].as_str().expect("a token").to_owned();
        let t = Some(token.as_str());
        let bearer = format!("Bearer {token}");
        // "/app/a" = L2FwcC9h, "/other" = L290aGVy
        for (path, body, auth) in [
            ("/v3/kv/put", r#"{"key":"L2FwcC9h","value":"MQ=="}"#, None),
            ("/v3/kv/put", r#"{"key":"L2FwcC9h","value":"MQ=="}"#, t),
            ("/v3/kv/range", r#"{"key":"L2FwcC9h"}"#, t),
            ("/v3/kv/put", r#"{"key":"L290aGVy","value":"MQ=="}"#, t),
            ("/v3/kv/range", r#"{"key":"L2FwcC9h"}"#, Some("garbage.1")),
            (
                "/v3/kv/range",
                r#"{"key":"L2FwcC9h"}"#,
                Some(bearer.as_str()),
            ),
            // Management needs the root role.
            ("/v3/auth/user/list", "{}", t),
            ("/v3/auth/role/get", r#"{"role":"app"}"#, t),
        ] {
            s.req("POST", path, body, auth, Mask::Ids).await;
        }
        let mut w = Stream::open(
            &addr,
            "/v3/watch",
            r#"{"create_request":{"key":"L2FwcC8=","range_end":"L2FwcDA="}}"#,
            t,
        )
        .await;
        let created = w.line(Mask::Ids).await;
        ok_with(
            &addr,
            "/v3/kv/put",
            r#"{"key":"L2FwcC9i","value":"Mg=="}"#,
            t,
        )
        .await;
        let event = w.line(Mask::Ids).await;
        s.note(
            "watch with a token",
            serde_json::json!([w.status, created, event]),
        );
        s.steps
    })
    .await;
}

async fn ok_with(addr: &str, path: &str, body: &str, auth: Option<&str>) {
    let a = call(addr, "POST", path, body, auth, Mask::Ids).await;
    assert_eq!(a.status, 200, "{path} {body}: {a:?}");
}

/// keywatch only: `/metrics` on the client port (etcd's families differ by design), gRPC
/// and HTTP/2 JSON on the same port as HTTP/1.1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_port_serves_grpc_json_and_metrics() {
    // A small request limit, so the JSON body limit (2 × it + 1 MiB) is cheap to exceed.
    let server = tokio::task::block_in_place(|| {
        Server::start_with(
            Target::Keywatch,
            "gw-port",
            &["--max-request-bytes", "1024"],
        )
    });
    let addr = authority(&server);
    let mut grpc = server.client().await;
    grpc.put("from-grpc", "1", None).await.expect("gRPC put");
    // HTTP/1.1 JSON sees the gRPC write.
    let v = ok(&addr, "/v3/kv/range", r#"{"key":"ZnJvbS1ncnBj"}"#).await;
    assert_eq!(v["kvs"][0]["value"], "MQ==", "{v}");
    // HTTP/2 (prior knowledge) JSON: routed by content type, not by protocol version.
    let tcp = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    let (mut h2, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        TokioIo::new(tcp),
    )
    .await
    .expect("h2 handshake");
    tokio::spawn(conn);
    let req = http::Request::builder()
        .method("POST")
        .uri(format!("http://{addr}/v3/kv/range"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(br#"{"key":"ZnJvbS1ncnBj"}"#)))
        .expect("request");
    let resp = h2.send_request(req).await.expect("h2 answer");
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    let v: Value = serde_json::from_slice(&body).expect("JSON");
    assert_eq!(v["count"], "1", "{v}");
    // /metrics: Prometheus text with the gateway's own call counted as a gRPC Range.
    let a = call(&addr, "GET", "/metrics", "", None, Mask::Ids).await;
    assert_eq!(a.status, 200);
    let Body::Text(text) = a.body else {
        panic!("metrics as text")
    };
    assert!(
        text.lines()
            .any(|l| l.contains("grpc_server_started_total{")
                && l.contains("grpc_method=\"Range\"")
                && !l.ends_with(" 0")),
        "{text}"
    );
    // A body over the JSON limit is refused before it is decoded; a request over the gRPC
    // limit meets the gRPC service's own answer.
    let big = format!(
        r#"{{"key":"Zm9v","value":"{}"}}"#,
        "A".repeat((1 << 20) + 4096)
    );
    let a = call(&addr, "POST", "/v3/kv/put", &big, None, Mask::Ids).await;
    assert_eq!(a.status, 400, "{a:?}");
    let Body::Json(v) = &a.body else {
        panic!("{a:?}")
    };
    assert!(
        v["message"].as_str().is_some_and(|m| m.contains("exceeds")),
        "{v}"
    );
    let over = format!(r#"{{"key":"Zm9v","value":"{}"}}"#, "A".repeat(4096));
    let a = call(&addr, "POST", "/v3/kv/put", &over, None, Mask::Ids).await;
    assert_eq!(a.status, 400, "{a:?}");
    // Hanging up a gateway watch ends its gRPC stream (no watcher is left behind).
    let streams = |text: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix("keywatch_watch_streams "))
            .map(str::to_owned)
    };
    let w = watch_foo(&addr).await;
    let metrics = |addr: String| async move {
        match call(&addr, "GET", "/metrics", "", None, Mask::Ids)
            .await
            .body
        {
            Body::Text(t) => t,
            Body::Json(v) => panic!("metrics as JSON: {v}"),
        }
    };
    assert_eq!(streams(&metrics(addr.clone()).await).as_deref(), Some("1"));
    drop(w);
    // Polled: the server learns of the hang-up asynchronously; the guard only bounds a hang.
    tokio::time::timeout(GUARD, async {
        while streams(&metrics(addr.clone()).await).as_deref() != Some("0") {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the watch stream ended after the client hung up");
    // A gRPC call still answers on the same port after all that.
    grpc.get("from-grpc", None).await.expect("gRPC get");
}

/// The same script through `etcd3gw` (a PyPI gateway client, discovering the API path from
/// `/version`) against both servers; it prints what it saw, which must be equal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd3gw_client() {
    if !python_client_present() {
        return;
    }
    let run = |server: &Server| {
        let url = server.endpoint().to_owned();
        let out = std::process::Command::new("python3")
            .arg("-c")
            .arg(ETCD3GW_SCRIPT)
            .arg(&url)
            .output()
            .expect("run python3");
        assert!(
            out.status.success(),
            "etcd3gw against {}: {}\n{}",
            server.target,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let keywatch = tokio::task::block_in_place(|| Server::start(Target::Keywatch, "gw-py"));
    let ours = tokio::task::block_in_place(|| run(&keywatch));
    if !crate::common::etcd_and_etcdctl_present("etcd3gw_client::etcd") {
        return;
    }
    let etcd = tokio::task::block_in_place(|| Server::start(Target::Etcd, "gw-py"));
    let theirs = tokio::task::block_in_place(|| run(&etcd));
    assert_eq!(ours, theirs, "etcd3gw: left keywatch, right etcd");
}

/// The environment variable that turns a missing `etcd3gw` into a failure (set by `.ci/run`
/// once it installed the client).
const REQUIRE_CLIENT: &str = "KEYWATCH_REQUIRE_GATEWAY_CLIENT";

fn python_client_present() -> bool {
    let found = std::process::Command::new("python3")
        .args(["-c", "import etcd3gw"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        if std::env::var(REQUIRE_CLIENT).as_deref() == Ok("1") {
            panic!("{REQUIRE_CLIENT}=1 but python3 cannot import etcd3gw");
        }
        println!("SKIPPED (python3 with etcd3gw not installed): etcd3gw_client");
    }
    found
}

/// Drives a server at argv[1] the way an application does with etcd3gw; prints one line per
/// observation. Timeouts only guard against a hang; no outcome depends on them.
const ETCD3GW_SCRIPT: &str = r#"
import sys, threading
from etcd3gw.client import Etcd3Client
from urllib.parse import urlparse

u = urlparse(sys.argv[1])
c = Etcd3Client(host=u.hostname, port=u.port, protocol=u.scheme, timeout=30)
print("api", c.api_path)
print("put", c.put("/cfg/a", "1"), c.put("/cfg/b", "2"))
print("get", c.get("/cfg/a"))
print("prefix", sorted(c.get_prefix("/cfg/")))
print("create", c.create("/cfg/a", "x"), c.create("/cfg/c", "3"))
print("replace", c.replace("/cfg/a", "1", "11"), c.replace("/cfg/a", "1", "12"))
lease = c.lease(ttl=60)
print("lease ttl", lease.ttl() > 0)
print("put leased", c.put("/cfg/l", "v", lease=lease))
print("lease keys", lease.keys())
print("refresh", lease.refresh() > 0)
print("revoke", lease.revoke())
print("leased gone", c.get("/cfg/l"))
events = []
ready = threading.Event()
def watch():
    ready.set()
    events.append(c.watch_once("/cfg/w", timeout=30))
t = threading.Thread(target=watch)
t.start()
ready.wait()
# watch_once registers asynchronously: keep writing until the watcher saw one.
n = 0
while t.is_alive() and n < 600:
    c.put("/cfg/w", "w")
    t.join(0.05)
    n += 1
ev = events[0]
print("watch", ev["kv"]["key"], ev["kv"]["value"], ev.get("type", "PUT"))
print("delete", c.delete("/cfg/b"), c.delete("/cfg/b"))
print("delete prefix", c.delete_prefix("/cfg/"))
print("empty", c.get_prefix("/cfg/"))
print("members", len(c.members()))
print("status has version", "version" in c.status())
"#;

/// keywatch only (embedded): the gateway follows the server's lifecycle. Before the store is
/// open `/health` is 503 and calls answer 503 code 14; once open both work; at shutdown an
/// open gateway watch gets grpc-gateway's error chunk and ends, and `run` returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_follows_startup_and_shutdown() {
    use kv_store::{Durability, Store, StoreConfig};
    use watch_server::config::ServerConfig;
    let dir = tempfile::tempdir().expect("temp dir");
    let mut config = ServerConfig::default();
    config.listen = "127.0.0.1:0".into();
    config.data_dir = dir.path().to_path_buf();
    config.durability = Durability::NoSync;
    let (open_tx, open_rx) = tokio::sync::oneshot::channel::<()>();
    let data = dir.path().to_path_buf();
    let server = watch_server::server::Server::with_store_future(config, async move {
        let _ = open_rx.await;
        let mut store_config = StoreConfig::default();
        store_config.durability = Durability::NoSync;
        Store::open(data, store_config).await
    })
    .await
    .expect("bind");
    let addr = server.local_addr().to_string();
    let health = server.health();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(server.run(async {
        let _ = stop_rx.await;
    }));

    let a = call(&addr, "GET", "/health", "", None, Mask::Ids).await;
    assert_eq!(
        (a.status, &a.body),
        (503, &Body::Json(serde_json::json!({"health": "false"})))
    );
    let a = call(
        &addr,
        "POST",
        "/v3/kv/range",
        r#"{"key":"Zm9v"}"#,
        None,
        Mask::Ids,
    )
    .await;
    assert_eq!(a.status, 503, "{a:?}");
    let Body::Json(v) = &a.body else {
        panic!("{a:?}")
    };
    assert_eq!(v["code"], 14, "{v}");

    open_tx.send(()).expect("opening");
    health.ready().await;
    let a = call(&addr, "GET", "/health", "", None, Mask::Ids).await;
    assert_eq!(
        (a.status, &a.body),
        (200, &Body::Json(serde_json::json!({"health": "true"})))
    );
    let mut w = watch_foo(&addr).await;

    stop_tx.send(()).expect("stopping");
    let end = w.line(Mask::Ids).await;
    assert_eq!(
        end,
        serde_json::json!({"error": {
            "grpc_code": 14,
            "http_code": 503,
            "message": "etcdserver: server stopped",
            "http_status": "Service Unavailable",
        }})
    );
    let rest = tokio::time::timeout(GUARD, w.body.frame())
        .await
        .expect("the stream ends within the guard");
    assert!(rest.is_none(), "the stream ended: {rest:?}");
    tokio::time::timeout(GUARD, run)
        .await
        .expect("run returns within the guard")
        .expect("run task")
        .expect("a clean shutdown");
}

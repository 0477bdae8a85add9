//! Hostile clients (issue 17): each case attacks keywatch and a real etcd the same way and
//! asserts the outcome, never a timing: memory growth below a stated bound (RSS from /proc),
//! every request answered, other clients unaffected. Loops are bounded in count; waits are
//! hang guards only. Figures and the longer runs: docs/reliability.md.

use tokio_stream::wrappers::ReceiverStream;
use watch_proto::etcdserverpb as pb;

use crate::common::{GUARD, Server, Target, Watch, compat_test};

/// A Watch stream fed from a channel, on its own connection.
struct RawStream {
    channel: tonic::transport::Channel,
    requests: tokio::sync::mpsc::Sender<pb::WatchRequest>,
    responses: tonic::Streaming<pb::WatchResponse>,
}

impl RawStream {
    /// Opens the stream and sends `first` (grpc-go servers send response headers with the
    /// first response only, so the call completes after that request is answered).
    async fn open(server: &Server, first: pb::WatchRequest) -> RawStream {
        // grpc-go's (etcd clients') stream receive window, not hyper's megabytes: a client
        // that does not read stalls the server after 64 KiB of responses. The connection
        // window stays large: h2 (this client's too) closes a connection whose buffered small
        // DATA frames exceed half of it in framing overhead, and etcd sends each response in
        // its own frame.
        let channel = tonic::transport::Endpoint::from_shared(server.endpoint())
            .expect("endpoint")
            .initial_stream_window_size(Some(65_535))
            .initial_connection_window_size(Some(16 << 20))
            .connect()
            .await
            .expect("connect");
        let (requests, rx) = tokio::sync::mpsc::channel(1);
        requests.send(first).await.expect("first request");
        let mut client = pb::watch_client::WatchClient::new(channel.clone());
        let responses = tokio::time::timeout(GUARD, client.watch(ReceiverStream::new(rx)))
            .await
            .expect("watch call within the guard")
            .expect("watch call")
            .into_inner();
        RawStream {
            channel,
            requests,
            responses,
        }
    }

    async fn next(&mut self) -> pb::WatchResponse {
        tokio::time::timeout(GUARD, self.responses.message())
            .await
            .expect("a watch response within the guard")
            .expect("watch stream error")
            .expect("watch stream ended")
    }
}

fn create(key: String) -> pb::WatchRequest {
    pb::WatchRequest {
        request_union: Some(pb::watch_request::RequestUnion::CreateRequest(
            pb::WatchCreateRequest {
                key: key.into(),
                ..Default::default()
            },
        )),
    }
}

fn progress() -> pb::WatchRequest {
    pb::WatchRequest {
        request_union: Some(pb::watch_request::RequestUnion::ProgressRequest(
            pb::WatchProgressRequest {},
        )),
    }
}

/// Issue 17, item 1: a client with 500 watchers on one stream sends 50,000 progress requests
/// (~350 KB) without reading. keywatch fanned each request out to every watcher and kept
/// reading: RSS grew by GiBs. Now requests pending together cost one round, a stream whose
/// replies cannot go out stops reading (HTTP/2 flow control stops the sender, as etcd's), and
/// each request still gets its reply.
async fn progress_request_flood(server: Server) {
    const WATCHERS: usize = 500;
    const REQUESTS: usize = 50_000;
    /// RSS growth allowed, KiB: far above both servers' (a few MiB), far below the GiBs of
    /// the fan-out.
    const BOUND_KIB: u64 = 128 * 1024;

    let mut c = server.client().await;
    c.put("warm", "up", None).await.expect("put");
    let before = server.rss_kib();

    let mut s = RawStream::open(&server, create("k0".into())).await;
    assert!(s.next().await.created);
    for i in 1..WATCHERS {
        s.requests
            .send(create(format!("k{i}")))
            .await
            .expect("create");
        assert!(s.next().await.created);
    }
    // Sent by a task: once the server stops reading, the sends wait on flow control.
    let requests = s.requests.clone();
    let sender = tokio::spawn(async move {
        for _ in 0..REQUESTS {
            if requests.send(progress()).await.is_err() {
                return false;
            }
        }
        true
    });

    // Others are unaffected meanwhile.
    c.put("other", "v", None)
        .await
        .expect("put from another client");
    let got = c.get("other", None).await.expect("get from another client");
    assert_eq!(got.kvs()[0].value(), b"v");

    // Read every reply, watching the server's RSS as the replies drain.
    let mut peak = server.rss_kib();
    let mut replies = 0;
    while replies < REQUESTS {
        let r = s.next().await;
        assert!(
            r.watch_id == -1 && r.events.is_empty() && !r.created && !r.canceled,
            "not a stream progress reply: {r:?}"
        );
        replies += 1;
        if replies % 1000 == 0 {
            peak = peak.max(server.rss_kib());
        }
    }
    assert!(sender.await.expect("sender"), "the stream stayed open");
    let growth = peak.saturating_sub(before);
    println!(
        "{}: progress flood: RSS {before} KiB before, peak {peak} KiB (+{growth} KiB)",
        server.target
    );
    assert!(
        growth <= BOUND_KIB,
        "{}: RSS grew by {growth} KiB (bound {BOUND_KIB} KiB)",
        server.target
    );
}
compat_test!(progress_request_flood);

/// Issue 17, item 4: a client pipelines 20,000 watch creates on one stream without reading
/// the replies. keywatch stopped reading the stream and h2 closed the whole connection
/// (GOAWAY ENHANCE_YOUR_CALM, its limit on buffered small DATA frames) after ~6,800 creates,
/// ending every RPC on it; etcd creates them all. Now the connection stays up: a unary call on
/// the same connection succeeds meanwhile, and every create is answered.
async fn pipelined_watch_creates(server: Server) {
    const CREATES: usize = 20_000;
    let mut s = RawStream::open(&server, create("p0".into())).await;
    let requests = s.requests.clone();
    let sender = tokio::spawn(async move {
        for i in 1..CREATES {
            if requests.send(create(format!("p{i}"))).await.is_err() {
                return false;
            }
        }
        true
    });
    // The same connection serves other calls while the stream is stalled.
    let mut kv = pb::kv_client::KvClient::new(s.channel.clone());
    let put = tokio::time::timeout(
        GUARD,
        kv.put(pb::PutRequest {
            key: "same-connection".into(),
            value: "v".into(),
            ..Default::default()
        }),
    )
    .await
    .expect("put within the guard");
    put.expect("a put on the stalled stream's connection");
    let mut ids = std::collections::HashSet::new();
    for _ in 0..CREATES {
        let r = s.next().await;
        assert!(r.created && !r.canceled, "not a created reply: {r:?}");
        ids.insert(r.watch_id);
    }
    assert_eq!(ids.len(), CREATES, "distinct watch ids");
    assert!(sender.await.expect("sender"), "the stream stayed open");
}
compat_test!(pipelined_watch_creates);

/// Issue 17, item 2: 100 watchers on distinct keys, on one stream that is not read, while
/// 2,000 puts of 64 KiB values (125 MiB) go by. Each watcher used to pin up to
/// `--watch-buffer` change sets of any size (16 here: 100 MiB, growing with writes and
/// watchers). Now the stream's buffers and the window are bounded in bytes (4 and 8 MiB here,
/// small so the test is quick) and the watchers are caught up from the log later: growth stays
/// below those bounds plus redb's cache and slack; then every watcher receives every one of its
/// events. keywatch only: etcd's RSS grows with its memory-mapped data file, whatever the
/// watchers do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_watchers_bounded_in_bytes() {
    const WATCHERS: usize = 100;
    const ROUNDS: usize = 20;
    /// RSS growth allowed, KiB: the 8 MiB window, 2 × 4 MiB for the stream's buffers, the
    /// HTTP/2 windows, redb's cache (up to 64 MiB) and the allocator; pinning by revisions
    /// alone would hold 100 MiB of values on top of those.
    const BOUND_KIB: u64 = 96 * 1024;
    let server = Server::start_with(
        crate::common::Target::Keywatch,
        "slow_watchers_bounded_in_bytes",
        &[
            "--durability",
            "no-sync",
            "--watch-buffer",
            "16",
            "--watch-window-bytes",
            "8388608",
            "--watch-stream-bytes",
            "4194304",
        ],
    );
    let mut c = server.client().await;
    c.put("warm", "up", None).await.expect("put");
    let before = server.rss_kib();
    let mut s = RawStream::open(&server, create("s0".into())).await;
    assert!(s.next().await.created);
    for i in 1..WATCHERS {
        s.requests
            .send(create(format!("s{i}")))
            .await
            .expect("create");
        assert!(s.next().await.created);
    }
    let value = vec![b'x'; 64 << 10];
    let mut peak = before;
    for round in 0..ROUNDS {
        for i in 0..WATCHERS {
            c.put(format!("s{i}"), value.clone(), None)
                .await
                .expect("put");
        }
        if round % 5 == 4 {
            peak = peak.max(server.rss_kib());
        }
    }
    let growth = peak.saturating_sub(before);
    println!("slow watchers: RSS {before} KiB before, peak {peak} KiB (+{growth} KiB)");
    assert!(
        growth <= BOUND_KIB,
        "RSS grew by {growth} KiB (bound {BOUND_KIB} KiB)"
    );
    // Nothing lost: every watcher gets its ROUNDS events once the client reads.
    let mut events = std::collections::HashMap::<i64, usize>::new();
    let mut total = 0;
    while total < WATCHERS * ROUNDS {
        let r = s.next().await;
        assert!(!r.canceled, "{:?}", r.cancel_reason);
        *events.entry(r.watch_id).or_default() += r.events.len();
        total += r.events.len();
    }
    assert_eq!(events.len(), WATCHERS);
    assert!(events.values().all(|&n| n == ROUNDS), "{events:?}");
}

/// The next response of `w`, which must be a refused create (etcd's way: created + canceled,
/// `watch_id = -1`) naming `limit` in its reason.
async fn assert_refused_by(w: &mut Watch, limit: &str) {
    let r = w.next().await;
    assert!(
        r.created() && r.canceled() && r.watch_id() == -1,
        "expected a refused create, got {r:?}"
    );
    assert!(
        r.cancel_reason().contains(limit),
        "refused for another reason: {r:?}"
    );
}

/// Opens a stream on `client` with `n` watchers on `{prefix}{i}`, each created.
async fn watchers(client: &mut etcd_client::Client, prefix: &str, n: usize) -> Watch {
    let (mut w, _) = Watch::open(client, &format!("{prefix}0"), None).await;
    for i in 1..n {
        let r = w.add(&format!("{prefix}{i}"), None).await;
        assert!(!r.canceled(), "watcher {i} refused: {r:?}");
    }
    w
}

/// Issue 17, item 5: one client took the whole server's watcher budget (10 streams × 100k
/// reached the 1M cap) and every other client's watch was refused. Now a connection holds at
/// most `--max-watchers-per-connection`, over all its streams: here the server's cap is 30
/// and a connection's 20; the first client fills its 20 on two streams and is refused the
/// 21st, and a client on another connection still creates its watchers. keywatch only: etcd
/// has no per-client limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_connection_cannot_take_every_watcher() {
    let server = Server::start_with(
        Target::Keywatch,
        "one_connection_cannot_take_every_watcher",
        &[
            "--max-watchers-per-connection",
            "20",
            "--max-watchers",
            "30",
        ],
    );
    let mut greedy = server.client().await;
    let mut first = watchers(&mut greedy, "g", 10).await;
    let mut second = watchers(&mut greedy, "h", 10).await;
    second
        .stream
        .watch("over", None)
        .await
        .expect("send create");
    assert_refused_by(&mut second, "connection").await;

    // Another connection is unaffected.
    let mut other = server.client().await;
    let mut fair = watchers(&mut other, "f", 10).await;

    // A canceled watch gives its share back, and the refused client's watchers still work.
    first.stream.cancel(0).await.expect("send cancel");
    let canceled = first.next().await;
    assert!(
        canceled.canceled() && canceled.watch_id() == 0,
        "{canceled:?}"
    );
    first.add("again", None).await;
    greedy.put("g1", "v", None).await.expect("put");
    greedy.put("f1", "v", None).await.expect("put");
    assert_eq!(first.events(1).await[0].1.kv.key, "g1");
    assert_eq!(fair.events(1).await[0].1.kv.key, "f1");
}

/// Issue 17, item 5, with authentication on: a user's watchers count over all its
/// connections, at most `--max-watchers-per-user`, so one user cannot starve another: alice
/// fills her 6 over two connections and is refused the 7th; bob, under the same server cap
/// (12), still gets his 6.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_user_cannot_starve_another() {
    let s = crate::compat_auth::Secured::start(
        Target::Keywatch,
        "one_user_cannot_starve_another",
        &["--max-watchers-per-user", "6", "--max-watchers", "12"],
    );
    let mut alice = s.client("alice", "alicepw").await;
    let mut alice_again = s.client("alice", "alicepw").await;
    let _a = watchers(&mut alice, "/app/a", 3).await;
    let mut b = watchers(&mut alice_again, "/app/b", 3).await;
    b.stream
        .watch("/app/over", None)
        .await
        .expect("send create");
    assert_refused_by(&mut b, "user").await;

    let mut bob = s.client("bob", "bobpw").await;
    let mut fair = watchers(&mut bob, "/app/c", 6).await;
    alice.put("/app/c5", "v", None).await.expect("put");
    assert_eq!(fair.events(1).await[0].1.kv.key, "/app/c5");
}

/// `GET /metrics` over one kept-alive HTTP/1.1 connection to the client port: it is opened
/// before the server runs out of connections or descriptors, and keeps answering after.
struct Scraper {
    sender: hyper::client::conn::http1::SendRequest<http_body_util::Empty<bytes::Bytes>>,
    authority: String,
}

impl Scraper {
    async fn open(authority: &str) -> Scraper {
        let tcp = tokio::net::TcpStream::connect(authority)
            .await
            .expect("connect");
        let (sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
                .await
                .expect("HTTP/1.1 handshake");
        tokio::spawn(conn);
        Scraper {
            sender,
            authority: authority.to_owned(),
        }
    }

    /// The value of the sample named `name` (no labels).
    async fn metric(&mut self, name: &str) -> f64 {
        use http_body_util::BodyExt;
        let req = http::Request::get(format!("http://{}/metrics", self.authority))
            .body(http_body_util::Empty::new())
            .expect("request");
        // The previous exchange is over once its body was read; the connection may still
        // be settling into its next one.
        tokio::time::timeout(GUARD, self.sender.ready())
            .await
            .expect("metrics connection ready within the guard")
            .expect("metrics connection open");
        let resp = tokio::time::timeout(GUARD, self.sender.send_request(req))
            .await
            .expect("metrics within the guard")
            .expect("metrics answer");
        assert_eq!(resp.status(), 200);
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        let text = String::from_utf8(body.to_vec()).expect("UTF-8");
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no sample {name} in:\n{text}"))
    }

    /// Scrapes until `name` satisfies `done` (a hang guard bounds the wait; no sleeping).
    async fn wait_for(&mut self, name: &str, done: impl Fn(f64) -> bool) -> f64 {
        tokio::time::timeout(GUARD, async {
            loop {
                let v = self.metric(name).await;
                if done(v) {
                    return v;
                }
                tokio::task::yield_now().await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{name} did not reach the expected value within the guard"))
    }
}

/// A gRPC connection (one TCP connection) to `endpoint`, and a put through it.
async fn connected(endpoint: &str) -> tonic::transport::Channel {
    let channel = tonic::transport::Endpoint::from_shared(endpoint.to_owned())
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    put_through(&channel, "connected").await;
    channel
}

async fn put_through(channel: &tonic::transport::Channel, key: &str) {
    let mut kv = pb::kv_client::KvClient::new(channel.clone());
    let put = pb::PutRequest {
        key: key.as_bytes().to_vec().into(),
        value: "v".into(),
        ..Default::default()
    };
    tokio::time::timeout(GUARD, kv.put(put))
        .await
        .expect("put within the guard")
        .expect("put");
}

/// Whether the server closed `tcp` (EOF or reset) rather than leaving it open: read within
/// the guard.
async fn closed_by_server(tcp: &mut tokio::net::TcpStream) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 64];
    matches!(
        tokio::time::timeout(GUARD, tcp.read(&mut buf)).await,
        Ok(Ok(0) | Err(_))
    )
}

/// Issue 17, item 7: connections beyond `--max-connections` (4 here: a metrics scraper and
/// three gRPC clients) are accepted and closed at once, counted; the admitted ones keep
/// working; once one closes, a new connection is admitted. keywatch only (etcd has no
/// connection limit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_limit_are_closed() {
    let server = Server::start_with(
        Target::Keywatch,
        "connections_beyond_the_limit_are_closed",
        &["--max-connections", "4"],
    );
    let endpoint = server.endpoint();
    let authority = endpoint.trim_start_matches("http://").to_owned();
    let mut scraper = Scraper::open(&authority).await;
    let mut admitted = Vec::new();
    for _ in 0..3 {
        admitted.push(connected(&endpoint).await);
    }
    for _ in 0..3 {
        let mut extra = tokio::net::TcpStream::connect(&authority)
            .await
            .expect("the kernel accepts the TCP handshake");
        assert!(
            closed_by_server(&mut extra).await,
            "a connection beyond the limit stayed open"
        );
    }
    assert_eq!(
        scraper.metric("keywatch_connections_refused_total").await,
        3.0
    );
    for (i, c) in admitted.iter().enumerate() {
        put_through(c, &format!("still-{i}")).await;
    }
    // One closes; once the server saw it, a new connection is admitted.
    drop(admitted.pop());
    scraper.wait_for("keywatch_connections", |n| n <= 3.0).await;
    admitted.push(connected(&endpoint).await);
    assert_eq!(
        scraper.metric("keywatch_connections_refused_total").await,
        3.0
    );
}

/// Issue 17, item 7: under `ulimit -n 64`, 120 connections exhaust the server's descriptors
/// (the rest wait in the listen backlog, 128).
/// The accept loop used to retry at once and spin on a core (93 % under `ulimit -n 512` with
/// 700 connections). Now each failed accept is counted and followed by a pause, 1 ms
/// doubling to 1 s, reset by a successful accept: at most 12 errors per run of failures
/// plus one per second of it. The test asserts that count bound (a spinning loop exceeds it
/// by orders of magnitude within milliseconds) and that the server keeps serving its
/// connections meanwhile and new ones afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_descriptors_accept_backs_off() {
    /// More than the descriptors, fewer than they and the backlog (128) together: a connection
    /// beyond both would wait on SYN retries.
    const FLOOD: usize = 120;
    let server = tokio::task::block_in_place(|| {
        testkit::ServerProcess::builder(env!("CARGO_BIN_EXE_watch-server"))
            .temp_prefix("hostile-out-of-descriptors-")
            .args(["--durability", "no-sync"])
            .open_files_limit(64)
            .start()
            .expect("keywatch starts under ulimit -n 64")
    });
    let endpoint = server.endpoint();
    let authority = endpoint.trim_start_matches("http://").to_owned();
    let mut scraper = Scraper::open(&authority).await;
    let healthy = connected(&endpoint).await;
    assert_eq!(scraper.metric("keywatch_accept_errors_total").await, 0.0);
    let accepted_before = scraper.metric("keywatch_connections_accepted_total").await;

    let flood_started = std::time::Instant::now();
    let mut flood = Vec::new();
    for _ in 0..FLOOD {
        flood.push(
            tokio::net::TcpStream::connect(&authority)
                .await
                .expect("the kernel queues the connection"),
        );
    }
    // Out of descriptors: accepts fail; the open connections are still served.
    scraper
        .wait_for("keywatch_accept_errors_total", |n| n >= 1.0)
        .await;
    for i in 0..50 {
        put_through(&healthy, &format!("during-{i}")).await;
    }
    // Long enough for the pauses to reach their 1 s cap (12 errors take ≥ 1.023 s).
    let errors = scraper
        .wait_for("keywatch_accept_errors_total", |n| n >= 12.0)
        .await;
    let elapsed = flood_started.elapsed();
    let accepted = scraper.metric("keywatch_connections_accepted_total").await - accepted_before;
    // Each accepted connection may have reset the back-off once (at most FLOOD of them).
    let resets = accepted.min(FLOOD as f64);
    let bound = (resets + 1.0) * 12.0 + elapsed.as_secs_f64().ceil();
    println!(
        "out of descriptors: {errors} accept errors in {elapsed:?}, {accepted} accepted, bound {bound}"
    );
    assert!(
        errors <= bound,
        "{errors} accept errors in {elapsed:?} ({accepted} accepts): the loop does not back off"
    );

    // Descriptors come back: the server accepts again.
    drop(flood);
    let fresh = connected(&endpoint).await;
    put_through(&fresh, "after").await;
    put_through(&healthy, "after-healthy").await;
}

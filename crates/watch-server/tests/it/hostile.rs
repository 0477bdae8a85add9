//! Hostile clients (issue 17): each case attacks keywatch and a real etcd the same way and
//! asserts the outcome, never a timing: memory growth below a stated bound (RSS from /proc),
//! every request answered, other clients unaffected. Loops are bounded in count; waits are
//! hang guards only. Figures and the longer runs: docs/reliability.md.

use tokio_stream::wrappers::ReceiverStream;
use watch_proto::etcdserverpb as pb;

use crate::common::{GUARD, Server, compat_test};

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
/// 2,000 puts of 128 KiB values (250 MiB) go by. Each watcher used to pin up to
/// `--watch-buffer` (64) change sets of any size: ~250 MiB here, growing with writes. Now the
/// stream's buffers are bounded in bytes and the watchers are caught up from the log later:
/// growth stays below the window (64 MiB) plus the stream's bound and slack; then every
/// watcher receives every one of its events. keywatch only: etcd's RSS grows with its
/// memory-mapped data file, whatever the watchers do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_watchers_bounded_in_bytes() {
    const WATCHERS: usize = 100;
    const ROUNDS: usize = 20;
    /// RSS growth allowed, KiB: the 64 MiB window, 32 MiB for the stream's buffers, the
    /// HTTP/2 windows, redb's cache and the allocator; the pinning grew by ~360 MiB.
    const BOUND_KIB: u64 = 192 * 1024;
    let server = Server::start_with(
        crate::common::Target::Keywatch,
        "slow_watchers_bounded_in_bytes",
        &["--durability", "no-sync"],
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
    let value = vec![b'x'; 128 << 10];
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

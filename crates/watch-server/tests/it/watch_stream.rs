//! Raw gRPC behaviour of the server's watch streams and limits, checked at the wire level (the
//! compat suite drives the same server through etcd clients, which hide watch IDs).

use std::time::Duration;

use kv_store::{Durability, Store, StoreConfig};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;
use watch_proto::etcdserverpb as pb;
use watch_proto::etcdserverpb::watch_request::RequestUnion;
use watch_server::config::{Cli, FileConfig, ServerConfig};
use watch_server::server::Server;

struct Running {
    addr: String,
    _dir: tempfile::TempDir,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        tokio::time::timeout(Duration::from_secs(10), &mut self.task)
            .await
            .expect("server stops")
            .unwrap();
    }
}

async fn start(per_stream: usize) -> Running {
    start_with(Cli {
        max_watchers_per_stream: Some(per_stream),
        ..Cli::default()
    })
    .await
}

/// A server on port 0 with these flags.
async fn start_with(cli: Cli) -> Running {
    let dir = tempfile::tempdir().unwrap();
    let cli = Cli {
        listen: Some("127.0.0.1:0".into()),
        ..cli
    };
    let config = ServerConfig::merge(cli, FileConfig::default()).unwrap();
    let store = Store::open(
        dir.path(),
        StoreConfig::default().durability(Durability::NoSync),
    )
    .await
    .unwrap();
    let server = Server::with_store(store, config).await.unwrap();
    let addr = format!("http://{}", server.local_addr());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        server
            .run(async {
                let _ = rx.await;
            })
            .await
            .unwrap();
    });
    Running {
        addr,
        _dir: dir,
        stop: Some(tx),
        task,
    }
}

struct Stream {
    tx: mpsc::Sender<pb::WatchRequest>,
    rx: Streaming<pb::WatchResponse>,
}

impl Stream {
    async fn open(addr: &str) -> Stream {
        let mut client = pb::watch_client::WatchClient::connect(addr.to_owned())
            .await
            .unwrap();
        let (tx, rx) = mpsc::channel(16);
        let rx = client
            .watch(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        Stream { tx, rx }
    }

    async fn send(&self, r: RequestUnion) {
        self.tx
            .send(pb::WatchRequest {
                request_union: Some(r),
            })
            .await
            .unwrap();
    }

    async fn create(&self, key: &str, range_end: &str, watch_id: i64) {
        self.send(RequestUnion::CreateRequest(pb::WatchCreateRequest {
            key: key.to_owned().into(),
            range_end: range_end.to_owned().into(),
            watch_id,
            ..Default::default()
        }))
        .await
    }

    async fn next(&mut self) -> pb::WatchResponse {
        let r = tokio::time::timeout(Duration::from_secs(5), self.rx.message())
            .await
            .expect("a response in time")
            .unwrap()
            .expect("stream open");
        assert!(r.header.is_some(), "every response has a header: {r:?}");
        r
    }
}

#[tokio::test]
async fn watch_ids_duplicates_bad_ranges_and_limits() {
    let server = start(3).await;
    let mut s = Stream::open(&server.addr).await;

    // Client-chosen 1, then auto IDs start at 0 and skip 1.
    s.create("a", "", 1).await;
    let r = s.next().await;
    assert!(r.created && !r.canceled);
    assert_eq!(r.watch_id, 1);
    s.create("b", "", 0).await;
    assert_eq!(s.next().await.watch_id, 0);

    // A duplicate client ID is refused.
    s.create("c", "", 1).await;
    let r = s.next().await;
    assert!(r.created && r.canceled);
    assert_eq!(r.watch_id, -1);
    assert_eq!(
        r.cancel_reason,
        "mvcc: duplicate watch ID provided on the WatchStream"
    );

    // key >= range_end is refused.
    s.create("z", "a", 0).await;
    let r = s.next().await;
    assert!(r.created && r.canceled);
    assert_eq!(r.watch_id, -1);
    assert_eq!(r.cancel_reason, "mvcc: watcher range is empty");

    // The third watch fits, the fourth hits the per-stream limit of 3.
    s.create("d", "", 0).await;
    assert_eq!(s.next().await.watch_id, 2);
    s.create("e", "", 0).await;
    let r = s.next().await;
    assert!(r.created && r.canceled && r.watch_id == -1, "{r:?}");
    assert!(r.cancel_reason.contains("too many watches"), "{r:?}");

    // Cancel of an unknown ID: no response; a known one: canceled.
    s.send(RequestUnion::CancelRequest(pb::WatchCancelRequest {
        watch_id: 99,
    }))
    .await;
    s.send(RequestUnion::CancelRequest(pb::WatchCancelRequest {
        watch_id: 0,
    }))
    .await;
    let r = s.next().await;
    assert!(r.canceled && !r.created);
    assert_eq!(r.watch_id, 0);

    // A progress request: one response for the stream, watch_id -1, no events.
    s.send(RequestUnion::ProgressRequest(pb::WatchProgressRequest {}))
        .await;
    let r = s.next().await;
    assert_eq!(r.watch_id, -1);
    assert!(!r.created && !r.canceled && r.events.is_empty());
    assert_eq!(r.header.unwrap().revision, 1);

    // An empty request is ignored and the stream keeps working.
    s.tx.send(pb::WatchRequest::default()).await.unwrap();
    let mut kv = pb::kv_client::KvClient::connect(server.addr.clone())
        .await
        .unwrap();
    kv.put(pb::PutRequest {
        key: "a".into(),
        value: "1".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let r = s.next().await;
    assert_eq!(r.watch_id, 1);
    assert_eq!(r.events.len(), 1);
    assert_eq!(r.header.unwrap().revision, 2);

    // Half-closing the client side keeps the stream delivering.
    let Stream { tx, mut rx } = s;
    drop(tx);
    kv.put(pb::PutRequest {
        key: "a".into(),
        value: "2".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let r = tokio::time::timeout(Duration::from_secs(5), rx.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(r.header.unwrap().revision, 3);
    drop(rx);
    server.stop().await;
}

#[tokio::test]
async fn status_limits_and_unimplemented() {
    let server = start(10).await;
    let mut m = pb::maintenance_client::MaintenanceClient::connect(server.addr.clone())
        .await
        .unwrap();
    let st = m.status(pb::StatusRequest {}).await.unwrap().into_inner();
    assert_eq!(st.version, "3.5.13");
    let h = st.header.unwrap();
    assert!(h.cluster_id != 0 && h.member_id != 0);
    assert_eq!((h.revision, h.raft_term), (1, 1));

    let mut kv = pb::kv_client::KvClient::connect(server.addr.clone())
        .await
        .unwrap();
    let big = vec![b'x'; 1_600_000];
    let e = kv
        .put(pb::PutRequest {
            key: "big".into(),
            value: big.into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert_eq!(e.message(), "etcdserver: request is too large");
    let e = kv.put(pb::PutRequest::default()).await.unwrap_err();
    assert_eq!(e.message(), "etcdserver: key is not provided");
    let e = kv
        .range(pb::RangeRequest {
            key: "a".into(),
            sort_order: 9,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    let e = kv
        .txn(pb::TxnRequest {
            success: vec![pb::RequestOp { request: None }],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);

    let mut lease = pb::lease_client::LeaseClient::connect(server.addr.clone())
        .await
        .unwrap();
    let g = lease
        .lease_grant(pb::LeaseGrantRequest { ttl: 5, id: 0 })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(g.ttl, 5);
    // An open keep-alive stream must not hold up the graceful shutdown below.
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(pb::LeaseKeepAliveRequest { id: g.id })
        .await
        .unwrap();
    let mut keep = lease
        .lease_keep_alive(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(keep.message().await.unwrap().unwrap().ttl, 5);
    server.stop().await;
    drop(tx);
}

/// A watch replaying history gets its backlog in multi-revision responses (etcd's unsynced
/// batching), in order and complete; a negative client watch ID is refused, since -1 marks
/// stream-wide replies.
#[tokio::test]
async fn history_backlog_is_merged_and_negative_ids_are_refused() {
    let server = start(8).await;
    let mut kv = pb::kv_client::KvClient::connect(server.addr.clone())
        .await
        .unwrap();
    for i in 0..10 {
        kv.put(pb::PutRequest {
            key: "m".into(),
            value: format!("v{i}").into(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    let mut s = Stream::open(&server.addr).await;
    s.send(RequestUnion::CreateRequest(pb::WatchCreateRequest {
        key: "m".into(),
        start_revision: 2,
        watch_id: -1,
        ..Default::default()
    }))
    .await;
    let r = s.next().await;
    assert!(r.created && r.canceled && r.watch_id == -1, "{r:?}");
    assert!(r.cancel_reason.contains("negative"), "{r:?}");

    s.send(RequestUnion::CreateRequest(pb::WatchCreateRequest {
        key: "m".into(),
        start_revision: 2,
        ..Default::default()
    }))
    .await;
    assert!(s.next().await.created);
    let mut revisions = Vec::new();
    let mut responses = 0;
    while revisions.len() < 10 {
        let r = s.next().await;
        responses += 1;
        revisions.extend(r.events.iter().map(|e| e.kv.as_ref().unwrap().mod_revision));
    }
    assert_eq!(revisions, (2..=11).collect::<Vec<_>>());
    // The engine pushes a catch-up chunk under the watcher's lock, so the stream finds all ten
    // revisions queued at once and merges them.
    assert_eq!(responses, 1);
    server.stop().await;
}

/// keywatch's `initial_state` extension (WatchCreateRequest field 100) through the generated
/// gRPC client: `created` at R, the state at R as PUT events in key order over several
/// responses (each at most `--max-request-bytes`), the marker (an event-less response of the
/// watch at R), then the changes after R. NOPUT leaves only the marker; a start revision below
/// the compaction is canceled as etcd cancels a compacted watch.
#[tokio::test]
async fn initial_state_then_marker_then_changes() {
    let server = start_with(Cli {
        max_request_bytes: Some(1024),
        ..Cli::default()
    })
    .await;
    let channel = tonic::transport::Endpoint::from_shared(server.addr.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut kv = pb::kv_client::KvClient::new(channel);
    let put = |key: String, value: String| pb::PutRequest {
        key: key.into(),
        value: value.into(),
        ..Default::default()
    };
    for i in 0..20 {
        kv.put(put(format!("/p/k{i:02}"), "x".repeat(100)))
            .await
            .unwrap();
    }
    kv.put(put("/p/k03".into(), "again".into())).await.unwrap();
    kv.put(put("/q".into(), "outside".into())).await.unwrap();
    kv.delete_range(pb::DeleteRangeRequest {
        key: "/p/k07".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let want = kv
        .range(pb::RangeRequest {
            key: "/p/".into(),
            range_end: "/p0".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let r = want.header.unwrap().revision;
    assert_eq!(want.kvs.len(), 19);

    let mut s = Stream::open(&server.addr).await;
    s.send(RequestUnion::CreateRequest(pb::WatchCreateRequest {
        key: "/p/".into(),
        range_end: "/p0".into(),
        watch_id: 7,
        prev_kv: true,
        initial_state: true,
        ..Default::default()
    }))
    .await;
    let created = s.next().await;
    assert!(created.created && !created.canceled, "{created:?}");
    assert_eq!((created.watch_id, created.header.unwrap().revision), (7, r));
    let mut initial = Vec::new();
    let mut responses = 0;
    let marker = loop {
        let resp = s.next().await;
        assert_eq!(resp.watch_id, 7, "{resp:?}");
        assert!(!resp.created && !resp.canceled, "{resp:?}");
        assert_eq!(resp.header.as_ref().unwrap().revision, r);
        if resp.events.is_empty() {
            break resp;
        }
        responses += 1;
        for e in resp.events {
            assert_eq!(e.r#type, 0, "initial events are PUTs");
            assert!(e.prev_kv.is_none(), "initial events carry no prev_kv");
            initial.push(e.kv.unwrap());
        }
    };
    // The state at R, exactly as a range read at R gives it (create/mod revisions, versions).
    assert_eq!(initial, want.kvs);
    assert!(
        responses > 1,
        "2 KiB of values go out in several responses of at most 1 KiB"
    );
    assert_eq!(marker.header.unwrap().revision, r);

    kv.put(put("/p/k03".into(), "live".into())).await.unwrap();
    let live = s.next().await;
    assert_eq!((live.watch_id, live.header.unwrap().revision), (7, r + 1));
    assert_eq!(live.events.len(), 1);
    assert_eq!(
        &live.events[0].prev_kv.as_ref().unwrap().value[..],
        b"again"
    );

    // NOPUT drops the initial events: created, then the marker.
    s.send(RequestUnion::CreateRequest(pb::WatchCreateRequest {
        key: "/p/".into(),
        range_end: "/p0".into(),
        watch_id: 8,
        filters: vec![pb::watch_create_request::FilterType::Noput as i32],
        initial_state: true,
        ..Default::default()
    }))
    .await;
    assert!(s.next().await.created);
    let marker = s.next().await;
    assert_eq!((marker.watch_id, marker.events.len()), (8, 0));
    assert_eq!(marker.header.unwrap().revision, r + 1);

    // The state at a compacted revision: created, then canceled with the compaction.
    kv.compact(pb::CompactionRequest {
        revision: r + 1,
        ..Default::default()
    })
    .await
    .unwrap();
    s.send(RequestUnion::CreateRequest(pb::WatchCreateRequest {
        key: "/p/".into(),
        range_end: "/p0".into(),
        watch_id: 9,
        start_revision: 2,
        initial_state: true,
        ..Default::default()
    }))
    .await;
    assert!(s.next().await.created);
    let canceled = s.next().await;
    assert!(canceled.canceled, "{canceled:?}");
    assert_eq!((canceled.watch_id, canceled.compact_revision), (9, r + 1));
    drop(s);
    server.stop().await;
}

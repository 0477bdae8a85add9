//! Pressure behaviours against a real server process, asserting outcomes (never timings):
//! stalled watchers keep RSS bounded and end complete or compacted; a resume after kill -9
//! gets exactly the missed events; a short randomized run (slow watchers racing compaction,
//! kills, resumes) validates clean.

use std::path::PathBuf;
use std::time::Duration;

use keywatch_robustness::server;
use keywatch_robustness::stalled::{self, StalledArgs};
use keywatch_robustness::validate::validate;
use keywatch_robustness::workload::{self, RunConfig};
use tokio_stream::wrappers::ReceiverStream;
use watch_proto::etcdserverpb as pb;
use watch_proto::etcdserverpb::kv_client::KvClient;
use watch_proto::etcdserverpb::watch_client::WatchClient;

fn server_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_robustness-server"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_watchers_keep_rss_bounded_and_catch_up() {
    let report = stalled::run(&server_bin(), &StalledArgs::small(200, 2000, false))
        .await
        .expect("scenario ran");
    assert!(report.violations.is_empty(), "{report}");
    assert_eq!(report.caught_up, 200, "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_watchers_racing_compaction_end_complete_or_compacted() {
    let report = stalled::run(&server_bin(), &StalledArgs::small(100, 2000, true))
        .await
        .expect("scenario ran");
    // run() itself checks each one caught up completely or was canceled with a revision.
    assert!(report.violations.is_empty(), "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_random_run_with_kills_validates() {
    let mut cfg = RunConfig::new(server_bin(), 42);
    cfg.duration = Duration::from_secs(4);
    cfg.kills = 1;
    cfg.streams = 10;
    let run = workload::run(&cfg).await.expect("run");
    let report = validate(&run);
    assert!(report.violations.is_empty(), "{:?}", report.violations);
    assert_eq!(run.kills, 2);
}

async fn put(kv: &mut KvClient<tonic::transport::Channel>, key: &str, value: &str) -> i64 {
    kv.put(pb::PutRequest {
        key: key.as_bytes().to_vec().into(),
        value: value.as_bytes().to_vec().into(),
        ..Default::default()
    })
    .await
    .expect("put")
    .into_inner()
    .header
    .map_or(0, |h| h.revision)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_after_kill_gets_exactly_the_missed_events() {
    let bin = server_bin();
    let mut server = tokio::task::spawn_blocking(move || server::start(&bin, "pressure-", &[]))
        .await
        .expect("join")
        .expect("start");
    let mut kv = KvClient::connect(server.endpoint()).await.expect("connect");
    let mut last_seen = 0;
    for i in 0..10 {
        last_seen = put(&mut kv, &format!("k{}", i % 3), &format!("before-{i}")).await;
    }
    // The watcher saw everything up to `last_seen`; then the server dies.
    server = tokio::task::spawn_blocking(move || {
        server.restart().expect("restart");
        server
    })
    .await
    .expect("join");
    let mut kv = KvClient::connect(server.endpoint()).await.expect("connect");
    let mut missed = Vec::new();
    for i in 0..10 {
        let rev = put(&mut kv, &format!("k{}", i % 3), &format!("after-{i}")).await;
        missed.push((rev, format!("after-{i}")));
    }
    assert_eq!(
        missed[0].0,
        last_seen + 1,
        "acknowledged revisions survived the kill"
    );
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut client = WatchClient::connect(server.endpoint())
        .await
        .expect("connect");
    let mut stream = client
        .watch(ReceiverStream::new(rx))
        .await
        .expect("watch")
        .into_inner();
    tx.send(pb::WatchRequest {
        request_union: Some(pb::watch_request::RequestUnion::CreateRequest(
            pb::WatchCreateRequest {
                key: vec![0].into(),
                range_end: vec![0].into(),
                start_revision: last_seen + 1,
                ..Default::default()
            },
        )),
    })
    .await
    .expect("send");
    let mut got = Vec::new();
    while got.len() < missed.len() {
        let resp = stream.message().await.expect("message").expect("open");
        assert!(!resp.canceled, "{resp:?}");
        for e in resp.events {
            let kv = e.kv.expect("kv");
            got.push((
                kv.mod_revision,
                String::from_utf8_lossy(&kv.value).into_owned(),
            ));
        }
    }
    assert_eq!(got, missed);
    // Nothing beyond: a progress request is answered at the last revision, with no events.
    tx.send(keywatch_robustness::wire::progress_request())
        .await
        .expect("send");
    let resp = stream.message().await.expect("message").expect("open");
    assert!(resp.events.is_empty());
    assert_eq!(resp.header.map_or(0, |h| h.revision), missed[9].0);
}

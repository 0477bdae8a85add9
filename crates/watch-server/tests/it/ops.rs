//! The operations surface: Prometheus metrics after a workload, health transitions (startup,
//! embedder flips, shutdown), gRPC reflection, configuration errors, `--help`, JSON logs, and a
//! graceful SIGTERM that keeps every acknowledged write across a restart.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;

use kv_store::{Durability, Store, StoreConfig, StoreError};
use testkit::{ServerProcess, Signal};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};
use watch_proto::etcdserverpb as pb;
use watch_proto::etcdserverpb::kv_client::KvClient;
use watch_proto::etcdserverpb::watch_client::WatchClient;
use watch_proto::etcdserverpb::watch_request::RequestUnion;
use watch_server::config::ServerConfig;
use watch_server::server::Server;

fn config(dir: &Path) -> ServerConfig {
    let mut c = ServerConfig::default();
    c.listen = "127.0.0.1:0".into();
    c.data_dir = dir.to_path_buf();
    c.durability = Durability::NoSync;
    c.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    c
}

async fn channel(addr: SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

/// `GET /metrics` over a plain socket; returns the body.
async fn scrape(addr: SocketAddr) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: keywatch\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let (head, body) = out.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("application/openmetrics-text"), "{head}");
    body.to_owned()
}

/// Sample lines (`name{labels} value`) to their values.
fn samples(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_owned(), v.parse().ok()?))
        })
        .collect()
}

fn sample(m: &HashMap<String, f64>, key: &str) -> f64 {
    match m.get(key) {
        Some(v) => *v,
        None => panic!("no sample {key}; have:\n{:#?}", {
            let mut k: Vec<_> = m.keys().collect();
            k.sort();
            k
        }),
    }
}

fn handled(service: &str, method: &str, code: &str) -> String {
    format!(
        "keywatch_grpc_server_handled_total{{grpc_service=\"{service}\",grpc_method=\"{method}\",grpc_code=\"{code}\"}}"
    )
}

fn create(id: i64, key: &str, range_end: &[u8]) -> pb::WatchRequest {
    pb::WatchRequest {
        request_union: Some(RequestUnion::CreateRequest(pb::WatchCreateRequest {
            key: key.as_bytes().to_vec().into(),
            range_end: range_end.to_vec().into(),
            watch_id: id,
            ..Default::default()
        })),
    }
}

fn put(key: &str, value: &str) -> pb::PutRequest {
    pb::PutRequest {
        key: key.as_bytes().to_vec().into(),
        value: value.as_bytes().to_vec().into(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_after_a_workload() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(config(dir.path())).await.unwrap();
    let (addr, maddr) = (server.local_addr(), server.metrics_addr().unwrap());
    let (health, metrics) = (server.health(), server.metrics());
    let (stop, stopped) = oneshot::channel::<()>();
    let run = tokio::spawn(server.run(async {
        let _ = stopped.await;
    }));
    health.ready().await;

    let ch = channel(addr).await;
    let mut kv = KvClient::new(ch.clone());
    let (wtx, wrx) = mpsc::channel(8);
    let mut stream = WatchClient::new(ch.clone())
        .watch(ReceiverStream::new(wrx))
        .await
        .unwrap()
        .into_inner();
    // A prefix watch on /svc/ and an exact-key watch on /svc/a.
    wtx.send(create(1, "/svc/", b"/svc0")).await.unwrap();
    wtx.send(create(2, "/svc/a", b"")).await.unwrap();
    for _ in 0..2 {
        assert!(stream.message().await.unwrap().unwrap().created);
    }
    for (k, v) in [("/svc/a", "1"), ("/svc/b", "2"), ("/other", "3")] {
        kv.put(put(k, v)).await.unwrap();
    }
    let mut events = 0;
    while events < 3 {
        events += stream.message().await.unwrap().unwrap().events.len();
    }
    // A request error: a read at a future revision is OUT_OF_RANGE.
    let err = kv
        .range(pb::RangeRequest {
            key: b"/svc/a".to_vec().into(),
            revision: 1000,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::OutOfRange);
    // The client cancels the exact-key watch.
    wtx.send(pb::WatchRequest {
        request_union: Some(RequestUnion::CancelRequest(pb::WatchCancelRequest {
            watch_id: 2,
        })),
    })
    .await
    .unwrap();
    assert!(stream.message().await.unwrap().unwrap().canceled);

    let m = samples(&scrape(maddr).await);
    assert_eq!(sample(&m, "keywatch_watchers{selector=\"prefix\"}"), 1.0);
    assert_eq!(sample(&m, "keywatch_watchers{selector=\"key\"}"), 0.0);
    assert_eq!(sample(&m, "keywatch_watch_streams"), 1.0);
    assert_eq!(sample(&m, "keywatch_watch_events_sent_total"), 3.0);
    assert_eq!(
        sample(&m, "keywatch_watch_cancels_total{reason=\"client\"}"),
        1.0
    );
    // Live responses are timed from their publication once per revision per batch the
    // stream hands over: /svc/a's revision reached both watches (one or two batches,
    // depending on whether the stream drained between the dispatcher's two pushes), /svc/b's
    // one watch.
    let timed = sample(&m, "keywatch_watch_publish_to_send_seconds_count");
    assert!((2.0..=3.0).contains(&timed), "{timed}");
    assert_eq!(sample(&m, &handled("etcdserverpb.KV", "Put", "OK")), 3.0);
    assert_eq!(
        sample(&m, &handled("etcdserverpb.KV", "Range", "OUT_OF_RANGE")),
        1.0
    );
    assert_eq!(
        sample(
            &m,
            "keywatch_grpc_server_started_total{grpc_service=\"etcdserverpb.Watch\",grpc_method=\"Watch\"}"
        ),
        1.0
    );
    assert_eq!(
        sample(
            &m,
            "keywatch_grpc_server_handling_seconds_count{grpc_service=\"etcdserverpb.KV\",grpc_method=\"Put\"}"
        ),
        3.0
    );
    // Three writes, each acknowledged after its own or a shared group commit.
    let batches = sample(&m, "keywatch_log_batch_change_sets_count");
    assert!((1.0..=3.0).contains(&batches), "{batches}");
    assert_eq!(sample(&m, "keywatch_log_batch_change_sets_sum"), 3.0);
    assert_eq!(
        sample(&m, "keywatch_log_commit_duration_seconds_count"),
        batches
    );
    assert_eq!(sample(&m, "keywatch_log_commit_failures_total"), 0.0);
    // Quota, alarms and defragmentation.
    assert_eq!(sample(&m, "keywatch_quota_backend_bytes"), 2147483648.0);
    // Live data (three small puts, counted with their bookkeeping), far below the files' size.
    let in_use = sample(&m, "keywatch_db_size_in_use_bytes");
    assert!(
        in_use > 0.0 && in_use < sample(&m, "keywatch_db_size_bytes"),
        "{in_use}"
    );
    assert_eq!(sample(&m, "keywatch_alarms{alarm=\"NOSPACE\"}"), 0.0);
    assert_eq!(sample(&m, "keywatch_defragmentations"), 0.0);
    pb::maintenance_client::MaintenanceClient::new(ch.clone())
        .defragment(pb::DefragmentRequest {})
        .await
        .unwrap();
    let m = samples(&scrape(maddr).await);
    assert_eq!(sample(&m, "keywatch_defragmentations"), 1.0);
    let (before, after) = (
        sample(&m, "keywatch_defrag_before_bytes"),
        sample(&m, "keywatch_defrag_after_bytes"),
    );
    assert!(after > 0.0 && after <= before, "{before} -> {after}");
    assert_eq!(sample(&m, "keywatch_revision"), 4.0);
    assert_eq!(sample(&m, "keywatch_compacted_revision"), 0.0);
    assert_eq!(sample(&m, "keywatch_keys"), 3.0);
    assert_eq!(sample(&m, "keywatch_watchers_catching_up"), 0.0);
    assert!(sample(&m, "process_resident_memory_bytes") > 0.0);

    // Shutdown ends the open watch stream with etcd's UNAVAILABLE "server stopped".
    stop.send(()).unwrap();
    let status = loop {
        match stream.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the watch stream ended without a status"),
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), tonic::Code::Unavailable);
    assert!(status.message().contains("server stopped"), "{status}");
    run.await.unwrap().unwrap();
    let m = samples(&metrics.encode());
    assert_eq!(
        sample(&m, &handled("etcdserverpb.Watch", "Watch", "UNAVAILABLE")),
        1.0
    );
    assert_eq!(
        sample(&m, "keywatch_watch_cancels_total{reason=\"stream_closed\"}"),
        1.0
    );
    assert_eq!(sample(&m, "keywatch_watch_streams"), 0.0);
}

async fn next_status(s: &mut tonic::Streaming<HealthCheckResponse>) -> ServingStatus {
    let msg = s.message().await.unwrap().expect("a health update");
    ServingStatus::try_from(msg.status).unwrap()
}

async fn check(h: &mut HealthClient<Channel>, service: &str) -> ServingStatus {
    let r = h
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .unwrap()
        .into_inner();
    ServingStatus::try_from(r.status).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_follows_startup_embedder_and_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let (store_tx, store_rx) = oneshot::channel::<Store>();
    // The store arrives only when the test sends it: "still opening" is observable without
    // timing.
    let server = Server::with_store_future(config(dir.path()), async move {
        store_rx.await.map_err(|_| StoreError::Closed)
    })
    .await
    .unwrap();
    let addr = server.local_addr();
    let handle = server.health();
    let (stop, stopped) = oneshot::channel::<()>();
    let run = tokio::spawn(server.run(async {
        let _ = stopped.await;
    }));

    let ch = channel(addr).await;
    let mut health = HealthClient::new(ch.clone());
    let mut kv = KvClient::new(ch.clone());
    assert_eq!(check(&mut health, "").await, ServingStatus::NotServing);
    assert_eq!(
        check(&mut health, "etcdserverpb.KV").await,
        ServingStatus::NotServing
    );
    let err = kv.put(put("k", "v")).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable);
    assert!(err.message().contains("starting"), "{err}");
    let mut updates = health
        .watch(HealthCheckRequest { service: "".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(next_status(&mut updates).await, ServingStatus::NotServing);

    let store = Store::open(
        dir.path(),
        StoreConfig::default().durability(Durability::NoSync),
    )
    .await
    .unwrap();
    store_tx.send(store).unwrap();
    assert_eq!(next_status(&mut updates).await, ServingStatus::Serving);
    handle.ready().await;
    assert_eq!(
        check(&mut health, "etcdserverpb.Watch").await,
        ServingStatus::Serving
    );
    kv.put(put("k", "v")).await.unwrap();

    // The embedder's own condition (e.g. a lost upstream) overrides readiness, and back.
    handle.set_serving(false).await;
    assert_eq!(next_status(&mut updates).await, ServingStatus::NotServing);
    assert_eq!(
        check(&mut health, "etcdserverpb.KV").await,
        ServingStatus::NotServing
    );
    kv.put(put("k", "still served")).await.unwrap();
    handle.set_serving(true).await;
    assert_eq!(next_status(&mut updates).await, ServingStatus::Serving);

    // Shutdown: NOT_SERVING first, then the health stream ends.
    stop.send(()).unwrap();
    assert_eq!(next_status(&mut updates).await, ServingStatus::NotServing);
    assert!(updates.message().await.unwrap().is_none());
    run.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_lists_and_describes_services() {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(config(dir.path())).await.unwrap();
    let addr = server.local_addr();
    let (stop, stopped) = oneshot::channel::<()>();
    let run = tokio::spawn(server.run(async {
        let _ = stopped.await;
    }));
    let mut client = ServerReflectionClient::new(channel(addr).await);
    let requests = tokio_stream::iter([
        ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        },
        ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::FileContainingSymbol(
                "etcdserverpb.KV".into(),
            )),
        },
    ]);
    let mut responses = client
        .server_reflection_info(requests)
        .await
        .unwrap()
        .into_inner();
    let listed = match responses.next().await.unwrap().unwrap().message_response {
        Some(MessageResponse::ListServicesResponse(l)) => l,
        other => panic!("expected a service list, got {other:?}"),
    };
    let names: Vec<_> = listed.service.into_iter().map(|s| s.name).collect();
    for want in [
        "etcdserverpb.KV",
        "etcdserverpb.Watch",
        "etcdserverpb.Lease",
        "etcdserverpb.Maintenance",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
    ] {
        assert!(names.iter().any(|n| n == want), "{want} not in {names:?}");
    }
    match responses.next().await.unwrap().unwrap().message_response {
        Some(MessageResponse::FileDescriptorResponse(f)) => {
            assert!(!f.file_descriptor_proto.is_empty())
        }
        other => panic!("expected a file descriptor, got {other:?}"),
    }
    drop(responses);
    stop.send(()).unwrap();
    run.await.unwrap().unwrap();
}

// ---- the binary ----

const BIN: &str = env!("CARGO_BIN_EXE_watch-server");

/// Runs the binary with exactly `args` to its exit (hang-guarded, inherited `KEYWATCH_*`
/// variables removed); returns (exit code, stdout, stderr).
fn run_to_end(args: &[&str]) -> (Option<i32>, String, String) {
    let out = ServerProcess::builder(BIN)
        .bare()
        .args(args)
        .run_to_exit()
        .unwrap();
    (out.status.code(), out.stdout, out.stderr)
}

#[test]
fn invalid_config_exits_before_binding() {
    // Hold a port: had the binary bound before checking, it would report a bind error.
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let listen = held.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let file = dir.path().join("bad.toml");
    std::fs::write(&file, "listen = \"127.0.0.1:0\"\nno_such_key = 1\n").unwrap();
    let cases: [(Vec<&str>, &str); 5] = [
        (vec!["--metrics-listen", "everywhere"], "metrics_listen"),
        (
            vec!["--progress-interval", "10 parsecs"],
            "progress_interval",
        ),
        (vec!["--max-watchers", "0"], "max_watchers"),
        (vec!["--log-filter", "=["], "log_filter"),
        (vec!["--config", file.to_str().unwrap()], "no_such_key"),
    ];
    for (extra, needle) in cases {
        let mut args = vec!["--listen", &listen, "--data-dir", data.to_str().unwrap()];
        args.extend(extra.iter().copied());
        let (code, stdout, stderr) = run_to_end(&args);
        assert_eq!(code, Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains("invalid configuration"), "{stderr}");
        assert!(stderr.contains(needle), "{needle} not in {stderr}");
        assert!(!stdout.contains("bound"), "{stdout}");
        assert!(
            !data.exists(),
            "the data directory was created for {args:?}"
        );
    }
    drop(held);
}

#[test]
fn help_lists_every_flag_with_its_default() {
    let (code, help, _) = run_to_end(&["--help"]);
    assert_eq!(code, Some(0));
    // Each flag's block (from its `--name` line to the next flag) states a default.
    let mut blocks: Vec<String> = Vec::new();
    for line in help.lines() {
        let t = line.trim_start();
        if t.starts_with("--") || t.starts_with("-h,") || t.starts_with("-V,") {
            blocks.push(String::new());
        }
        if let Some(b) = blocks.last_mut() {
            b.push_str(line);
            b.push('\n');
        }
    }
    let flags: Vec<&String> = blocks
        .iter()
        .filter(|b| !b.contains("--help") && !b.contains("--version"))
        .collect();
    assert!(flags.len() >= 14, "{help}");
    for b in flags {
        assert!(b.contains("default"), "no default stated:\n{b}");
        assert!(b.contains("KEYWATCH_"), "no environment variable:\n{b}");
    }
    assert!(help.contains("Precedence"), "{help}");
    for flag in ["--metrics-listen", "--log-format", "--shutdown-timeout"] {
        assert!(help.contains(flag), "{flag} missing:\n{help}");
    }
}

/// The binary on `data` with `extra` flags, started on port 0 and ready (testkit's process,
/// killed on drop so a failed assertion leaves no live server behind).
fn spawn(data: &Path, extra: &[&str]) -> ServerProcess {
    spawn_env(data, extra, &[])
}

fn spawn_env(data: &Path, extra: &[&str], env: &[(&str, &str)]) -> ServerProcess {
    let mut builder = ServerProcess::builder(BIN).data_dir(data).args(extra);
    for (k, v) in env {
        builder = builder.env(k, v);
    }
    builder.start().unwrap()
}

/// Waits for the process to exit; returns its status and stderr. The testkit's guard makes a
/// shutdown that never ends fail the test instead of hanging it; it is not a timing assertion.
fn wait_exit(p: &mut ServerProcess) -> (std::process::ExitStatus, String) {
    let exit = tokio::task::block_in_place(|| p.wait_exit()).unwrap();
    (exit.status, exit.stderr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_flushes_and_a_restart_keeps_acknowledged_writes() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut p = spawn(&data, &["--durability", "fsync"]);
    let ch = channel(p.addr()).await;
    let mut health = HealthClient::new(ch.clone());
    assert_eq!(check(&mut health, "").await, ServingStatus::Serving);
    let mut kv = KvClient::new(ch.clone());
    let mut last = 0;
    for i in 0..20 {
        last = kv
            .put(put(&format!("/k/{i}"), &format!("v{i}")))
            .await
            .unwrap()
            .into_inner()
            .header
            .unwrap()
            .revision;
    }
    let (wtx, wrx) = mpsc::channel(4);
    let mut stream = WatchClient::new(ch.clone())
        .watch(ReceiverStream::new(wrx))
        .await
        .unwrap()
        .into_inner();
    wtx.send(create(1, "/k/", b"/k0")).await.unwrap();
    assert!(stream.message().await.unwrap().unwrap().created);

    p.signal(Signal::Term).unwrap();
    let status = stream.message().await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status}");
    let (exit, stderr) = wait_exit(&mut p);
    assert!(exit.success(), "{exit}: {stderr}");
    assert!(stderr.contains("store closed"), "{stderr}");
    drop((kv, health, stream, ch));

    // Restart on the same directory, with JSON logs and the metrics endpoint (from the
    // environment) this time.
    let mut p = spawn_env(
        &data,
        &["--log-format", "json"],
        &[("KEYWATCH_METRICS_LISTEN", "127.0.0.1:0")],
    );
    let mut kv = KvClient::new(channel(p.addr()).await);
    let r = kv
        .range(pb::RangeRequest {
            key: b"/k/".to_vec().into(),
            range_end: b"/k0".to_vec().into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.count, 20);
    assert_eq!(r.header.unwrap().revision, last);
    assert!(
        r.kvs
            .iter()
            .any(|kv| &kv.key[..] == b"/k/19" && &kv.value[..] == b"v19")
    );
    let m = samples(&scrape(p.metrics_addr().expect("a metrics line")).await);
    assert_eq!(sample(&m, "keywatch_revision"), last as f64);
    assert_eq!(sample(&m, "keywatch_keys"), 20.0);
    assert_eq!(sample(&m, &handled("etcdserverpb.KV", "Range", "OK")), 1.0);
    p.signal(Signal::Int).unwrap();
    let (exit, stderr) = wait_exit(&mut p);
    assert!(exit.success(), "{exit}: {stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert!(!lines.is_empty());
    for line in &lines {
        assert!(
            line.starts_with('{') && line.ends_with('}'),
            "not a JSON log line: {line}"
        );
    }
    assert!(
        lines.iter().any(|l| l.contains("\"message\":\"ready\"")),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_cuts_a_stuck_shutdown() {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;

    let dir = tempfile::tempdir().unwrap();
    // A graceful shutdown that would wait an hour for the open call below.
    let mut p = spawn(&dir.path().join("data"), &["--shutdown-timeout", "1h"]);
    let ch = channel(p.addr()).await;
    let mut updates = HealthClient::new(ch.clone())
        .watch(HealthCheckRequest { service: "".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(next_status(&mut updates).await, ServingStatus::Serving);
    // A bidirectional call the client keeps open: the server cannot end it by itself.
    let (tx, rx) = mpsc::channel(1);
    tx.send(ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    })
    .await
    .unwrap();
    let mut open = ServerReflectionClient::new(ch.clone())
        .server_reflection_info(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    assert!(open.message().await.unwrap().is_some());

    p.signal(Signal::Term).unwrap();
    // The shutdown has begun (health said so) and now waits for the open call.
    assert_eq!(next_status(&mut updates).await, ServingStatus::NotServing);
    p.signal(Signal::Term).unwrap();
    let (exit, stderr) = wait_exit(&mut p);
    assert_eq!(exit.code(), Some(130), "{stderr}");
    assert!(stderr.contains("second signal"), "{stderr}");
    drop(tx);
}

/// A bidirectional reflection call the client keeps open (the server cannot end it by
/// itself), after its first answer; returns the request sender with it.
async fn open_reflection_call(
    ch: Channel,
) -> (
    mpsc::Sender<tonic_reflection::pb::v1::ServerReflectionRequest>,
    tonic::Streaming<tonic_reflection::pb::v1::ServerReflectionResponse>,
) {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;

    let (tx, rx) = mpsc::channel(1);
    tx.send(ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    })
    .await
    .unwrap();
    let mut open = ServerReflectionClient::new(ch)
        .server_reflection_info(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    assert!(open.message().await.unwrap().is_some());
    (tx, open)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_metrics_connection_does_not_hold_up_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = spawn(
        &dir.path().join("data"),
        &[
            "--metrics-listen",
            "127.0.0.1:0",
            "--shutdown-timeout",
            "1s",
        ],
    );
    let maddr = p.metrics_addr().expect("a metrics line");
    // A request whose headers never end.
    let mut stalled = tokio::net::TcpStream::connect(maddr).await.unwrap();
    stalled
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: keywatch\r\n")
        .await
        .unwrap();
    // A complete scrape on a second connection, accepted after the stalled one (the listen
    // queue is FIFO): the stalled connection is being served by now.
    scrape(maddr).await;

    p.signal(Signal::Term).unwrap();
    let (exit, stderr) = wait_exit(&mut p);
    assert!(exit.success(), "{exit}: {stderr}");
    assert!(stderr.contains("store closed"), "{stderr}");
    drop(stalled);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shutdown_timeout_cuts_calls_that_do_not_end() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = spawn(&dir.path().join("data"), &["--shutdown-timeout", "1s"]);
    let ch = channel(p.addr()).await;
    let (tx, _open) = open_reflection_call(ch.clone()).await;
    p.signal(Signal::Term).unwrap();
    let (exit, stderr) = wait_exit(&mut p);
    assert!(exit.success(), "{exit}: {stderr}");
    assert!(stderr.contains("cutting remaining calls"), "{stderr}");
    assert!(stderr.contains("store closed"), "{stderr}");
    drop(tx);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_embedded_run_cuts_the_connections_it_leaves() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path());
    c.shutdown_timeout = std::time::Duration::from_secs(1);
    let server = Server::start(c).await.unwrap();
    let (addr, health) = (server.local_addr(), server.health());
    let (stop, stopped) = oneshot::channel::<()>();
    let run = tokio::spawn(server.run(async {
        let _ = stopped.await;
    }));
    health.ready().await;
    let (tx, mut open) = open_reflection_call(channel(addr).await).await;
    stop.send(()).unwrap();
    run.await.unwrap().unwrap();
    // tonic runs each connection as a task of its own, which outlives `run` unless cut: the
    // open call then never ends. The 30 s bound is a hang guard, not a timing assertion.
    let end = tokio::time::timeout(std::time::Duration::from_secs(30), open.message())
        .await
        .expect("the open call outlived run(): its connection was not cut");
    assert!(!matches!(end, Ok(Some(_))), "{end:?}");
    drop(tx);
}

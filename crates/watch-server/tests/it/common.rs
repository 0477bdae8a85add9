//! Harness of the black-box compatibility suite.
//!
//! Every case runs twice: once against keywatch's `watch-server` binary and once against a real
//! etcd, each started on loopback ports with its own temporary data dir and killed (dir removed)
//! on drop (the processes are `testkit`'s). The same assertions must pass on both; that is what
//! proves each expectation is etcd's real behaviour. The `compat_test!` macro generates the two
//! `#[tokio::test]` wrappers (`<case>::keywatch` and `<case>::etcd`), so
//! `cargo test --test it compat::` runs one module and `::etcd` one side only.

use std::fmt;
use std::future::Future;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;

use etcd_client::{
    Client, ConnectOptions, Event, EventType, KeyValue, WatchOptions, WatchResponse, WatchStream,
};
use testkit::{AnyServer, Etcd, ServerProcess};

/// Which server a case runs against.
pub(crate) use testkit::Target;

/// Failure guard for anything that waits on a server: startup, one watch response, one etcdctl
/// line. Generous on purpose; a correct run never comes close, so it never decides an outcome.
pub(crate) use testkit::GUARD;

/// Generates `mod <case> { keywatch(), etcd() }`: two thin `#[tokio::test]` wrappers around
/// `async fn <case>(server: Server)`. `flags = f` starts each server with `f(target)` as extra
/// flags. `keywatch_only` generates only the keywatch wrapper; use it solely for etcd 3.4.23 bugs
/// that later etcd releases fixed, and cite the issue at the case.
macro_rules! compat_test {
    ($case:ident) => {
        mod $case {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn keywatch() {
                $crate::common::run(
                    $crate::common::Target::Keywatch,
                    stringify!($case),
                    super::$case,
                )
                .await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn etcd() {
                $crate::common::run(
                    $crate::common::Target::Etcd,
                    stringify!($case),
                    super::$case,
                )
                .await;
            }
        }
    };
    ($case:ident, flags = $flags:ident) => {
        mod $case {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn keywatch() {
                let target = $crate::common::Target::Keywatch;
                $crate::common::run_with(
                    target,
                    stringify!($case),
                    &super::$flags(target),
                    super::$case,
                )
                .await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn etcd() {
                let target = $crate::common::Target::Etcd;
                $crate::common::run_with(
                    target,
                    stringify!($case),
                    &super::$flags(target),
                    super::$case,
                )
                .await;
            }
        }
    };
    ($case:ident, keywatch_only) => {
        mod $case {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn keywatch() {
                $crate::common::run(
                    $crate::common::Target::Keywatch,
                    stringify!($case),
                    super::$case,
                )
                .await;
            }
        }
    };
}
pub(crate) use compat_test;

/// Starts `target` for the case `name` and runs `case` against it, or prints `SKIPPED` and
/// returns when the target cannot run here (etcd absent and not required).
pub(crate) async fn run<F, Fut>(target: Target, name: &str, case: F)
where
    F: FnOnce(Server) -> Fut,
    Fut: Future<Output = ()>,
{
    run_with(target, name, &[], case).await;
}

/// [`run`] with extra server flags (each target spells its flags its own way).
pub(crate) async fn run_with<F, Fut>(target: Target, name: &str, flags: &[&str], case: F)
where
    F: FnOnce(Server) -> Fut,
    Fut: Future<Output = ()>,
{
    if target == Target::Etcd && !etcd_and_etcdctl_present(&format!("{name}::etcd")) {
        return;
    }
    let server = tokio::task::block_in_place(|| Server::start_with(target, name, flags));
    case(server).await;
}

/// True when etcd and etcdctl are installed; otherwise `testkit`'s SKIPPED line (or a panic
/// when `KEYWATCH_REQUIRE_ETCD=1`).
pub(crate) fn etcd_and_etcdctl_present(test: &str) -> bool {
    testkit::tools_present(test, &["etcd", "etcdctl"], "etcd")
}

/// True when the server was given a certificate by flag (both servers name it `--cert-file`),
/// by keywatch's environment variable or in keywatch's config file (`--config <path>` or
/// `KEYWATCH_CONFIG` with a `cert_file` key): its endpoint is then `https`.
fn https(args: &[&str], env: &[(&str, String)]) -> bool {
    let by_flag = args.contains(&"--cert-file");
    let by_env = env.iter().any(|(k, _)| *k == "KEYWATCH_CERT_FILE");
    let config = args
        .iter()
        .position(|a| *a == "--config")
        .and_then(|i| args.get(i + 1))
        .map(std::path::PathBuf::from)
        .or_else(|| {
            env.iter()
                .find(|(k, _)| *k == "KEYWATCH_CONFIG")
                .map(|(_, v)| v.into())
        });
    let by_file = config.is_some_and(|path| {
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("read the config file {}: {e}", path.display()));
        let table: toml::Table = toml::from_str(&text)
            .unwrap_or_else(|e| panic!("parse the config file {}: {e}", path.display()));
        table.contains_key("cert_file")
    });
    by_flag || by_env || by_file
}

/// A running keywatch or etcd with its data dir.
pub(crate) struct Server {
    /// Which server this is.
    pub(crate) target: Target,
    name: String,
    process: AnyServer,
}

impl Server {
    /// Starts `target` with default flags.
    pub(crate) fn start(target: Target, name: &str) -> Server {
        Server::start_with(target, name, &[])
    }

    /// Starts `target` with extra command-line flags.
    pub(crate) fn start_with(target: Target, name: &str, extra_args: &[&str]) -> Server {
        Server::start_with_env(target, name, extra_args, &[])
    }

    /// Starts `target` with extra command-line flags and environment variables (keywatch's
    /// only: etcd is configured by flags here).
    pub(crate) fn start_with_env(
        target: Target,
        name: &str,
        extra_args: &[&str],
        env: &[(&str, String)],
    ) -> Server {
        let https = https(extra_args, env);
        let process = match target {
            Target::Keywatch => {
                let mut builder = ServerProcess::builder(env!("CARGO_BIN_EXE_watch-server"))
                    .temp_prefix(format!("compat-{target}-{name}-"))
                    .args(extra_args)
                    .https(https);
                for (k, v) in env {
                    builder = builder.env(k, v);
                }
                AnyServer::Keywatch(
                    builder
                        .start()
                        .unwrap_or_else(|e| panic!("keywatch did not start ({name}): {e}")),
                )
            }
            Target::Etcd => {
                assert!(
                    env.is_empty(),
                    "etcd takes flags, not environment variables"
                );
                AnyServer::Etcd(
                    Etcd::builder()
                        .temp_prefix(format!("compat-{target}-{name}-"))
                        .args(extra_args.iter().copied())
                        .https(https)
                        .start()
                        .unwrap_or_else(|e| panic!("etcd did not start ({name}): {e}")),
                )
            }
        };
        Server {
            target,
            name: name.to_owned(),
            process,
        }
    }

    /// Starts keywatch on an existing data dir (e.g. one `watch-server restore` made). The
    /// dir is the caller's: it outlives the server and is removed by the caller.
    pub(crate) fn start_keywatch_in(name: &str, dir: &std::path::Path) -> Server {
        let process = ServerProcess::builder(env!("CARGO_BIN_EXE_watch-server"))
            .data_dir(dir)
            .start()
            .unwrap_or_else(|e| panic!("keywatch did not start ({name}): {e}"));
        Server {
            target: Target::Keywatch,
            name: name.to_owned(),
            process: AnyServer::Keywatch(process),
        }
    }

    /// The client URL, e.g. `http://127.0.0.1:40123`.
    pub(crate) fn endpoint(&self) -> String {
        self.process.endpoint()
    }

    /// A new client connection. `hasleader` metadata is set as etcdctl and Kubernetes do.
    pub(crate) async fn client(&self) -> Client {
        let options = ConnectOptions::new()
            .with_require_leader(true)
            .with_connect_timeout(GUARD);
        let endpoint = self.endpoint();
        Client::connect([endpoint.as_str()], Some(options))
            .await
            .unwrap_or_else(|e| panic!("{}: connect to {endpoint}: {e}", self.target))
    }

    /// Kills the process (SIGKILL: acknowledged writes must already be durable) and starts it
    /// again on the same data dir. keywatch may come back on a new port; take a new client.
    pub(crate) fn restart(&mut self) {
        let restarted = tokio::task::block_in_place(|| self.process.restart());
        restarted
            .unwrap_or_else(|e| panic!("{} did not restart ({}): {e}", self.target, self.name));
    }

    /// True when etcdctl is on PATH; otherwise the case is skipped (`testkit::tools_present`).
    pub(crate) fn has_etcdctl(&self) -> bool {
        testkit::tools_present(
            &format!("{}::{}", self.name, self.target),
            &["etcdctl"],
            "etcdctl",
        )
    }

    /// Runs `etcdctl <args>` against this server and returns its stdout; panics on failure.
    pub(crate) fn etcdctl(&self, args: &[&str]) -> String {
        let out = self.etcdctl_output(args, "");
        assert!(
            out.status.success(),
            "{}: etcdctl {args:?} failed: {}\n{}",
            self.target,
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("etcdctl prints UTF-8")
    }

    /// Runs `etcdctl <args>` with `stdin` as its input and returns whatever it did.
    pub(crate) fn etcdctl_output(&self, args: &[&str], stdin: &str) -> std::process::Output {
        run_guarded(
            self.etcdctl_command(args),
            stdin,
            &format!("{}: etcdctl {args:?}", self.target),
        )
    }

    fn etcdctl_command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("etcdctl");
        cmd.env("ETCDCTL_API", "3")
            .arg("--endpoints")
            .arg(self.endpoint())
            .args(args)
            .stdin(Stdio::null());
        cmd
    }

    /// Spawns a long-running etcdctl (e.g. `watch`) whose stdout is read line by line.
    pub(crate) fn etcdctl_spawn(&self, args: &[&str]) -> Etcdctl {
        let mut child = self
            .etcdctl_command(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn etcdctl");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let mut stderr = child.stderr.take().expect("piped stderr");
        let stderr = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = std::io::Read::read_to_string(&mut stderr, &mut text);
            text
        });
        Etcdctl {
            child,
            lines,
            stderr: Some(stderr),
        }
    }
}

/// A running etcdctl; killed on drop.
pub(crate) struct Etcdctl {
    child: Child,
    lines: mpsc::Receiver<String>,
    /// Reads stderr to its end (etcdctl's exit); joined only to report a missing line.
    stderr: Option<std::thread::JoinHandle<String>>,
}

impl Etcdctl {
    /// The next `n` stdout lines.
    pub(crate) fn lines(&mut self, n: usize) -> Vec<String> {
        (0..n)
            .map(|i| {
                self.lines.recv_timeout(GUARD).unwrap_or_else(|_| {
                    let _ = self.child.kill();
                    let stderr = self.stderr.take().and_then(|t| t.join().ok());
                    panic!(
                        "etcdctl: line {} of {n} did not arrive; stderr:\n{}",
                        i + 1,
                        stderr.unwrap_or_default()
                    )
                })
            })
            .collect()
    }
}

impl Drop for Etcdctl {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------------
// Values compared by the cases.

/// A `mvccpb.KeyValue` with UTF-8 key and value, compared whole.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Kv {
    pub(crate) key: String,
    pub(crate) value: String,
    pub(crate) create: i64,
    pub(crate) modified: i64,
    pub(crate) version: i64,
    pub(crate) lease: i64,
}

impl Kv {
    pub(crate) fn from(kv: &KeyValue) -> Kv {
        Kv {
            key: String::from_utf8(kv.key().to_vec()).expect("UTF-8 key"),
            value: String::from_utf8(kv.value().to_vec()).expect("UTF-8 value"),
            create: kv.create_revision(),
            modified: kv.mod_revision(),
            version: kv.version(),
            lease: kv.lease(),
        }
    }
}

/// The kv of a live key: `(key, value, create_revision, mod_revision, version)`.
pub(crate) fn kv(key: &str, value: &str, create: i64, modified: i64, version: i64) -> Kv {
    Kv {
        key: key.into(),
        value: value.into(),
        create,
        modified,
        version,
        lease: 0,
    }
}

/// A `mvccpb.Event`, compared whole.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Ev {
    pub(crate) delete: bool,
    pub(crate) kv: Kv,
    pub(crate) prev: Option<Kv>,
}

impl Ev {
    pub(crate) fn from(ev: &Event) -> Ev {
        Ev {
            delete: ev.event_type() == EventType::Delete,
            kv: Kv::from(ev.kv().expect("every event carries a kv")),
            prev: ev.prev_kv().map(Kv::from),
        }
    }

    /// The same event with `prev_kv` attached.
    pub(crate) fn prev(mut self, prev: Kv) -> Ev {
        self.prev = Some(prev);
        self
    }
}

/// A PUT event.
pub(crate) fn put(key: &str, value: &str, create: i64, modified: i64, version: i64) -> Ev {
    Ev {
        delete: false,
        kv: kv(key, value, create, modified, version),
        prev: None,
    }
}

/// A DELETE event: only the key and the deletion revision are set (etcd's shape).
pub(crate) fn del(key: &str, modified: i64) -> Ev {
    Ev {
        delete: true,
        kv: kv(key, "", 0, modified, 0),
        prev: None,
    }
}

/// The events of one response.
pub(crate) fn events(resp: &WatchResponse) -> Vec<Ev> {
    resp.events().iter().map(Ev::from).collect()
}

/// The header revision of a watch response (the header must be present: the Go client
/// dereferences it unconditionally).
pub(crate) fn rev(resp: &WatchResponse) -> i64 {
    resp.header()
        .expect("every watch response carries a header")
        .revision()
}

// ---------------------------------------------------------------------------------------------
// Watch streams.

/// One watch stream with a guard on every read.
pub(crate) struct Watch {
    pub(crate) stream: WatchStream,
}

impl Watch {
    /// Opens a stream with its first watch and returns it with the `created` response.
    pub(crate) async fn open(
        client: &mut Client,
        key: &str,
        options: Option<WatchOptions>,
    ) -> (Watch, WatchResponse) {
        let stream = client.watch(key, options).await.expect("open watch stream");
        let mut watch = Watch { stream };
        let created = watch.next().await;
        assert!(
            created.created(),
            "first response is `created`: {created:?}"
        );
        (watch, created)
    }

    /// Adds a watch on this stream and returns its `created` response (creates are answered in
    /// order, one at a time, as the Go client expects).
    pub(crate) async fn add(&mut self, key: &str, options: Option<WatchOptions>) -> WatchResponse {
        self.stream.watch(key, options).await.expect("send create");
        let created = self.next().await;
        assert!(created.created(), "expected `created`, got {created:?}");
        created
    }

    /// The next response; panics on a stream error or end.
    pub(crate) async fn next(&mut self) -> WatchResponse {
        match tokio::time::timeout(GUARD, self.stream.message()).await {
            Ok(Ok(Some(resp))) => resp,
            Ok(Ok(None)) => panic!("watch stream ended"),
            Ok(Err(e)) => panic!("watch stream failed: {e}"),
            Err(_) => panic!("no watch response within {GUARD:?}"),
        }
    }

    /// Reads responses until `n` events have arrived in total; returns `(watch_id, event)` pairs
    /// in arrival order. Panics on any non-event response on the way.
    pub(crate) async fn events(&mut self, n: usize) -> Vec<(i64, Ev)> {
        let mut out = Vec::new();
        while out.len() < n {
            let resp = self.next().await;
            assert!(
                !resp.created() && !resp.canceled() && !resp.events().is_empty(),
                "expected events, got {resp:?}"
            );
            out.extend(resp.events().iter().map(|e| (resp.watch_id(), Ev::from(e))));
        }
        assert_eq!(out.len(), n, "more events than expected: {out:?}");
        out
    }
}

/// The gRPC status of a failed call; panics if the call succeeded or failed otherwise.
pub(crate) fn status<T: fmt::Debug>(result: Result<T, etcd_client::Error>) -> tonic::Status {
    match result {
        Err(etcd_client::Error::GRpcStatus(status)) => status,
        other => panic!("expected a gRPC error status, got {other:?}"),
    }
}

/// `message` as a raw gRPC request, with `token` (an auth token) in its metadata.
pub(crate) fn with_token<T>(message: T, token: Option<&str>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(token) = token {
        request
            .metadata_mut()
            .insert("token", token.parse().expect("ASCII token"));
    }
    request
}

/// A raw gRPC call failed with exactly `code` and `message` (as [`assert_status`] for
/// etcd-client calls).
pub(crate) fn assert_code<T: fmt::Debug>(
    r: Result<T, tonic::Status>,
    code: tonic::Code,
    message: &str,
) {
    let status = r.expect_err("the call must fail");
    assert_eq!(
        (status.code(), status.message()),
        (code, message),
        "{status:?}"
    );
}

/// Asserts a gRPC error by code and message. The message is part of the contract: the Go
/// client maps errors back to its typed errors (`rpctypes.ErrCompacted`, ...) by message text.
pub(crate) fn assert_status<T: fmt::Debug>(
    result: Result<T, etcd_client::Error>,
    code: tonic::Code,
    message: &str,
) {
    let status = status(result);
    assert_eq!(
        (status.code(), status.message()),
        (code, message),
        "unexpected error status {status:?}"
    );
}

/// Runs `cmd` to its end with `stdin` as its input, under the hang guard: a process stuck on
/// a misbehaving server is killed by pid after [`GUARD`] and the test fails naming `what`.
pub(crate) fn run_guarded(mut cmd: Command, stdin: &str, what: &str) -> std::process::Output {
    use std::io::Write;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{what}: spawn: {e}"));
    let mut input = child.stdin.take().expect("piped stdin");
    input.write_all(stdin.as_bytes()).expect("write stdin");
    drop(input);
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(GUARD) {
        Ok(output) => output.unwrap_or_else(|e| panic!("{what}: wait: {e}")),
        Err(_) => {
            let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
            panic!("{what} did not finish within {GUARD:?}")
        }
    }
}

//! Harness of the black-box compatibility suite.
//!
//! Every case runs twice: once against keywatch's `watch-server` binary and once against a real
//! etcd, each started on loopback ports with its own temporary data dir and killed (dir removed)
//! on drop. The same assertions must pass on both; that is what proves each expectation is etcd's
//! real behaviour. The `compat_test!` macro in each test file generates the two `#[tokio::test]`
//! wrappers (`<case>::keywatch` and `<case>::etcd`), so `cargo test --test compat ::etcd` runs
//! one side only.

// Each test file compiles its own copy of this module and uses only part of it.
#![allow(dead_code, unreachable_pub)]

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{
    Client, ConnectOptions, Event, EventType, KeyValue, WatchOptions, WatchResponse, WatchStream,
};
use tempfile::TempDir;

/// Failure guard for anything that waits on a server: startup, one watch response, one etcdctl
/// line. Generous on purpose; a correct run never comes close, so it never decides an outcome.
pub const GUARD: Duration = Duration::from_secs(30);

/// The environment variable that turns a missing etcd into a failure (set by `.ci/run`).
pub const REQUIRE_ETCD: &str = "KEYWATCH_REQUIRE_ETCD";

/// Which server a case runs against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// keywatch's `watch-server` binary from this package.
    Keywatch,
    /// The real etcd on PATH (3.4.23 here).
    Etcd,
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Target::Keywatch => "keywatch",
            Target::Etcd => "etcd",
        })
    }
}

/// Generates `mod <case> { keywatch(), etcd() }`: two thin `#[tokio::test]` wrappers around
/// `async fn <case>(server: Server)`. `flags = f` starts each server with `f(target)` as extra
/// flags. `keywatch_only` generates only the keywatch wrapper; use it solely for etcd 3.4.23 bugs
/// that later etcd releases fixed, and cite the issue at the case.
#[macro_export]
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

/// Starts `target` for the case `name` and runs `case` against it, or prints `SKIPPED` and
/// returns when the target cannot run here (etcd absent and not required).
pub async fn run<F, Fut>(target: Target, name: &str, case: F)
where
    F: FnOnce(Server) -> Fut,
    Fut: Future<Output = ()>,
{
    run_with(target, name, &[], case).await;
}

/// [`run`] with extra server flags (each target spells its flags its own way).
pub async fn run_with<F, Fut>(target: Target, name: &str, flags: &[&str], case: F)
where
    F: FnOnce(Server) -> Fut,
    Fut: Future<Output = ()>,
{
    if target == Target::Etcd
        && !tools_present(&format!("{name}::etcd"), &["etcd", "etcdctl"], "etcd")
    {
        return;
    }
    let server = tokio::task::block_in_place(|| Server::start_with(target, name, flags));
    case(server).await;
}

/// True when every tool is on PATH. Otherwise prints the skip line and returns false, or panics
/// when `KEYWATCH_REQUIRE_ETCD=1`.
pub fn tools_present(test: &str, tools: &[&str], what: &str) -> bool {
    let missing: Vec<&str> = tools
        .iter()
        .copied()
        .filter(|t| find_on_path(t).is_none())
        .collect();
    if missing.is_empty() {
        return true;
    }
    if std::env::var(REQUIRE_ETCD).as_deref() == Ok("1") {
        panic!("{REQUIRE_ETCD}=1 but {missing:?} not found on PATH ({test})");
    }
    println!("SKIPPED ({what} not installed): {test}");
    false
}

fn find_on_path(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(tool))
        .find(|p| p.is_file())
}

/// Two distinct free loopback ports. Both listeners are held at once so the ports differ; a
/// race with another process grabbing one afterwards is handled by retrying the start.
fn free_ports() -> (u16, u16) {
    let a = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    let b = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    let ports = (
        a.local_addr().expect("local addr").port(),
        b.local_addr().expect("local addr").port(),
    );
    drop((a, b));
    ports
}

/// Output of a server process, kept to be printed when the case fails.
#[derive(Clone, Default)]
struct Log(Arc<Mutex<VecDeque<String>>>);

impl Log {
    const KEEP: usize = 200;

    fn push(&self, line: String) {
        let mut lines = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if lines.len() == Self::KEEP {
            lines.pop_front();
        }
        lines.push_back(line);
    }

    fn dump(&self) -> String {
        let lines = self.0.lock().unwrap_or_else(|e| e.into_inner());
        lines
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// Reads `reader` line by line on a thread for the life of the process: every line goes to the
/// log, and lines for which `watch` returns `Some` are also sent on the returned channel (used
/// to learn readiness without sleeping).
fn drain<R: Read + Send + 'static>(
    reader: R,
    log: Log,
    watch: fn(&str) -> Option<String>,
) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(reader).lines() {
            let Ok(line) = line else { break };
            if let Some(found) = watch(&line) {
                let _ = tx.send(found);
            }
            log.push(line);
        }
    });
    rx
}

/// A running keywatch or etcd with its data dir.
pub struct Server {
    /// Which server this is.
    pub target: Target,
    name: String,
    endpoint: String,
    child: Option<Child>,
    log: Log,
    dir: TempDir,
    /// etcd's (client, peer) ports, reused on restart because etcd stores its peer URL.
    etcd_ports: Option<(u16, u16)>,
    extra_args: Vec<String>,
    /// Extra environment variables of the server process.
    extra_env: Vec<(String, String)>,
}

impl Server {
    /// Starts `target` with default flags.
    pub fn start(target: Target, name: &str) -> Server {
        Server::start_with(target, name, &[])
    }

    /// Starts `target` with extra command-line flags.
    pub fn start_with(target: Target, name: &str, extra_args: &[&str]) -> Server {
        Server::start_with_env(target, name, extra_args, &[])
    }

    /// Starts `target` with extra command-line flags and environment variables.
    pub fn start_with_env(
        target: Target,
        name: &str,
        extra_args: &[&str],
        env: &[(&str, String)],
    ) -> Server {
        let mut server = Server {
            target,
            name: name.to_owned(),
            endpoint: String::new(),
            child: None,
            log: Log::default(),
            dir: tempfile::Builder::new()
                .prefix(&format!("compat-{target}-{name}-"))
                .tempdir()
                .expect("create a temp data dir"),
            etcd_ports: None,
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
            extra_env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
        };
        server.launch(true);
        server
    }

    /// Starts keywatch on an existing data dir (e.g. one `watch-server restore` made); the dir
    /// is removed with the server.
    pub fn start_keywatch_in(name: &str, dir: TempDir) -> Server {
        let mut server = Server {
            target: Target::Keywatch,
            name: name.to_owned(),
            endpoint: String::new(),
            child: None,
            log: Log::default(),
            dir,
            etcd_ports: None,
            extra_args: Vec::new(),
            extra_env: Vec::new(),
        };
        server.launch(false);
        server
    }

    /// The client URL, e.g. `http://127.0.0.1:40123`.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The data dir.
    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }

    /// A new client connection. `hasleader` metadata is set as etcdctl and Kubernetes do.
    pub async fn client(&self) -> Client {
        let options = ConnectOptions::new()
            .with_require_leader(true)
            .with_connect_timeout(GUARD);
        Client::connect([self.endpoint.as_str()], Some(options))
            .await
            .unwrap_or_else(|e| panic!("{}: connect to {}: {e}", self.target, self.endpoint))
    }

    /// Kills the process (SIGKILL: acknowledged writes must already be durable) and starts it
    /// again on the same data dir. keywatch may come back on a new port; take a new client.
    pub fn restart(&mut self) {
        self.kill();
        tokio::task::block_in_place(|| self.launch(false));
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn launch(&mut self, fresh: bool) {
        match self.target {
            Target::Keywatch => self.launch_keywatch(),
            Target::Etcd => {
                // A port picked by `free_ports` can be taken by someone else before etcd binds
                // it; only then is a fresh pair tried (never on restart, where the peer URL is
                // fixed in the data dir).
                for attempt in 1..=3 {
                    match self.launch_etcd() {
                        Ok(()) => return,
                        Err(out) if fresh && attempt < 3 && out.contains("in use") => {
                            self.etcd_ports = None;
                            self.dir = tempfile::Builder::new()
                                .prefix(&format!("compat-etcd-{}-", self.name))
                                .tempdir()
                                .expect("create a temp data dir");
                        }
                        Err(out) => panic!("etcd did not start ({}):\n{out}", self.name),
                    }
                }
            }
        }
    }

    fn launch_keywatch(&mut self) {
        let mut child = Command::new(env!("CARGO_BIN_EXE_watch-server"))
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--data-dir")
            .arg(self.dir.path())
            .args(&self.extra_args)
            .envs(self.extra_env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn watch-server");
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        self.child = Some(child);
        let ready = drain(stdout, self.log.clone(), |line| {
            line.strip_prefix("watch-server listening on ")
                .map(|addr| addr.trim().to_owned())
        });
        drain(stderr, self.log.clone(), |_| None);
        match ready.recv_timeout(GUARD) {
            Ok(addr) => self.endpoint = format!("{}://{addr}", self.scheme()),
            Err(_) => panic!(
                "watch-server printed no `watch-server listening on` line ({}):\n{}",
                self.name,
                self.log.dump()
            ),
        }
    }

    fn launch_etcd(&mut self) -> Result<(), String> {
        let (client, peer) = *self.etcd_ports.get_or_insert_with(free_ports);
        let client_url = format!("{}://127.0.0.1:{client}", self.scheme());
        let peer_url = format!("http://127.0.0.1:{peer}");
        let mut child = Command::new("etcd")
            .args(["--name", "t", "--data-dir"])
            .arg(self.dir.path())
            .args(["--listen-client-urls", &client_url])
            .args(["--advertise-client-urls", &client_url])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("t={peer_url}")])
            .args(&self.extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn etcd");
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        self.child = Some(child);
        drain(stdout, self.log.clone(), |_| None);
        // The sender is dropped when stderr closes, so an etcd that dies early ends the wait.
        let ready = drain(stderr, self.log.clone(), |line| {
            line.contains("ready to serve client requests")
                .then(String::new)
        });
        match ready.recv_timeout(GUARD) {
            Ok(_) => {
                self.endpoint = client_url;
                Ok(())
            }
            Err(_) => {
                self.kill();
                Err(self.log.dump())
            }
        }
    }

    /// `https` when the server was given a certificate by flag (both servers name it
    /// `--cert-file`), by keywatch's environment variable or in keywatch's config file
    /// (`--config <path>` with a `cert_file` key), else `http`.
    fn scheme(&self) -> &'static str {
        let by_flag = self.extra_args.iter().any(|a| a == "--cert-file");
        let by_env = self
            .extra_env
            .iter()
            .any(|(k, _)| k == "KEYWATCH_CERT_FILE");
        let config = self
            .extra_args
            .iter()
            .position(|a| a == "--config")
            .and_then(|i| self.extra_args.get(i + 1))
            .map(std::path::PathBuf::from)
            .or_else(|| {
                self.extra_env
                    .iter()
                    .find(|(k, _)| k == "KEYWATCH_CONFIG")
                    .map(|(_, v)| v.into())
            });
        let by_file = config.is_some_and(|path| {
            let text = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("read the config file {}: {e}", path.display()));
            let table: toml::Table = toml::from_str(&text)
                .unwrap_or_else(|e| panic!("parse the config file {}: {e}", path.display()));
            table.contains_key("cert_file")
        });
        if by_flag || by_env || by_file {
            "https"
        } else {
            "http"
        }
    }

    /// True when etcdctl is on PATH; otherwise the case is skipped (see [`tools_present`]).
    pub fn has_etcdctl(&self) -> bool {
        tools_present(
            &format!("{}::{}", self.name, self.target),
            &["etcdctl"],
            "etcdctl",
        )
    }

    /// Runs `etcdctl <args>` against this server and returns its stdout; panics on failure.
    pub fn etcdctl(&self, args: &[&str]) -> String {
        let out = self.etcdctl_command(args).output().expect("run etcdctl");
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
    pub fn etcdctl_output(&self, args: &[&str], stdin: &str) -> std::process::Output {
        use std::io::Write;
        let mut child = self
            .etcdctl_command(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn etcdctl");
        let mut input = child.stdin.take().expect("piped stdin");
        input
            .write_all(stdin.as_bytes())
            .expect("write etcdctl stdin");
        drop(input);
        // Failure guard only: an etcdctl stuck on a misbehaving server is killed by pid.
        let pid = child.id();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(child.wait_with_output());
        });
        match rx.recv_timeout(GUARD) {
            Ok(output) => output.expect("wait for etcdctl"),
            Err(_) => {
                let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
                panic!(
                    "{}: etcdctl {args:?} did not finish within {GUARD:?}",
                    self.target
                )
            }
        }
    }

    fn etcdctl_command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("etcdctl");
        cmd.env("ETCDCTL_API", "3")
            .arg("--endpoints")
            .arg(&self.endpoint)
            .args(args)
            .stdin(Stdio::null());
        cmd
    }

    /// Spawns a long-running etcdctl (e.g. `watch`) whose stdout is read line by line.
    pub fn etcdctl_spawn(&self, args: &[&str]) -> Etcdctl {
        let mut child = self
            .etcdctl_command(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn etcdctl");
        let log = Log::default();
        let lines = drain(
            child.stdout.take().expect("piped stdout"),
            Log::default(),
            |line| Some(line.to_owned()),
        );
        drain(
            child.stderr.take().expect("piped stderr"),
            log.clone(),
            |_| None,
        );
        Etcdctl {
            child,
            lines,
            stderr: log,
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "---- {} log ({}, last lines) ----\n{}",
                self.target,
                self.name,
                self.log.dump()
            );
        }
    }
}

/// A running etcdctl; killed on drop.
pub struct Etcdctl {
    child: Child,
    lines: mpsc::Receiver<String>,
    stderr: Log,
}

impl Etcdctl {
    /// The next `n` stdout lines.
    pub fn lines(&mut self, n: usize) -> Vec<String> {
        (0..n)
            .map(|i| {
                self.lines.recv_timeout(GUARD).unwrap_or_else(|_| {
                    panic!(
                        "etcdctl: line {} of {n} did not arrive; stderr:\n{}",
                        i + 1,
                        self.stderr.dump()
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
pub struct Kv {
    pub key: String,
    pub value: String,
    pub create: i64,
    pub modified: i64,
    pub version: i64,
    pub lease: i64,
}

impl Kv {
    pub fn from(kv: &KeyValue) -> Kv {
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
pub fn kv(key: &str, value: &str, create: i64, modified: i64, version: i64) -> Kv {
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
pub struct Ev {
    pub delete: bool,
    pub kv: Kv,
    pub prev: Option<Kv>,
}

impl Ev {
    pub fn from(ev: &Event) -> Ev {
        Ev {
            delete: ev.event_type() == EventType::Delete,
            kv: Kv::from(ev.kv().expect("every event carries a kv")),
            prev: ev.prev_kv().map(Kv::from),
        }
    }

    /// The same event with `prev_kv` attached.
    pub fn prev(mut self, prev: Kv) -> Ev {
        self.prev = Some(prev);
        self
    }
}

/// A PUT event.
pub fn put(key: &str, value: &str, create: i64, modified: i64, version: i64) -> Ev {
    Ev {
        delete: false,
        kv: kv(key, value, create, modified, version),
        prev: None,
    }
}

/// A DELETE event: only the key and the deletion revision are set (etcd's shape).
pub fn del(key: &str, modified: i64) -> Ev {
    Ev {
        delete: true,
        kv: kv(key, "", 0, modified, 0),
        prev: None,
    }
}

/// The events of one response.
pub fn events(resp: &WatchResponse) -> Vec<Ev> {
    resp.events().iter().map(Ev::from).collect()
}

/// The header revision of a watch response (the header must be present: the Go client
/// dereferences it unconditionally).
pub fn rev(resp: &WatchResponse) -> i64 {
    resp.header()
        .expect("every watch response carries a header")
        .revision()
}

// ---------------------------------------------------------------------------------------------
// Watch streams.

/// One watch stream with a guard on every read.
pub struct Watch {
    pub stream: WatchStream,
}

impl Watch {
    /// Opens a stream with its first watch and returns it with the `created` response.
    pub async fn open(
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
    pub async fn add(&mut self, key: &str, options: Option<WatchOptions>) -> WatchResponse {
        self.stream.watch(key, options).await.expect("send create");
        let created = self.next().await;
        assert!(created.created(), "expected `created`, got {created:?}");
        created
    }

    /// The next response; panics on a stream error or end.
    pub async fn next(&mut self) -> WatchResponse {
        match tokio::time::timeout(GUARD, self.stream.message()).await {
            Ok(Ok(Some(resp))) => resp,
            Ok(Ok(None)) => panic!("watch stream ended"),
            Ok(Err(e)) => panic!("watch stream failed: {e}"),
            Err(_) => panic!("no watch response within {GUARD:?}"),
        }
    }

    /// Reads responses until `n` events have arrived in total; returns `(watch_id, event)` pairs
    /// in arrival order. Panics on any non-event response on the way.
    pub async fn events(&mut self, n: usize) -> Vec<(i64, Ev)> {
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
pub fn status<T: fmt::Debug>(result: Result<T, etcd_client::Error>) -> tonic::Status {
    match result {
        Err(etcd_client::Error::GRpcStatus(status)) => status,
        other => panic!("expected a gRPC error status, got {other:?}"),
    }
}

/// Asserts a gRPC error by code and message. The message is part of the contract: the Go
/// client maps errors back to its typed errors (`rpctypes.ErrCompacted`, ...) by message text.
pub fn assert_status<T: fmt::Debug>(
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

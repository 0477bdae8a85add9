//! [`Etcd`] (one member) and [`EtcdCluster`] (several members on loopback), etcd 3.4 as the
//! compatibility tests, the mirror tests and the benchmarks run it.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Instant;

use tempfile::TempDir;

use crate::output::{Output, spawn_watched};
use crate::{Error, GUARD, free_ports};

/// How many of each member's last lines are kept for error messages.
const KEEP_LINES: usize = 300;

/// The line etcd logs once it serves clients.
const READY: &str = "ready to serve client requests";

/// Configures an [`EtcdCluster`] (or, through [`Etcd::builder`], an [`Etcd`]).
#[derive(Debug)]
#[must_use]
pub struct EtcdBuilder {
    bin: Option<PathBuf>,
    members: usize,
    args: Vec<String>,
    https: bool,
    tls: Option<EtcdTls>,
    root_password: Option<String>,
    temp_prefix: String,
}

/// TLS of an [`EtcdCluster`]'s client URLs ([`EtcdBuilder::tls`]): PEM files the caller made
/// (the kit generates no certificate).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct EtcdTls {
    /// The CA the server certificate (and client certificates) chain to.
    pub ca: PathBuf,
    /// The members' server certificate (valid for 127.0.0.1) and its key.
    pub server: (PathBuf, PathBuf),
    /// A client certificate and key signed by `ca`: with it etcd requires one from every
    /// client (`--client-cert-auth`), and [`EtcdCluster::etcdctl`] presents it.
    pub client: Option<(PathBuf, PathBuf)>,
}

impl EtcdTls {
    /// Server TLS only: clients verify the members with `ca`.
    pub fn new(ca: impl Into<PathBuf>, cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        Self {
            ca: ca.into(),
            server: (cert.into(), key.into()),
            client: None,
        }
    }

    /// Requires client certificates signed by the CA (`--client-cert-auth`); `cert`/`key` is
    /// the one the kit's own tools use.
    pub fn client_cert_auth(mut self, cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        self.client = Some((cert.into(), key.into()));
        self
    }
}

impl EtcdBuilder {
    /// The etcd binary (default: `etcd` on `PATH`).
    pub fn bin(mut self, bin: impl Into<PathBuf>) -> Self {
        self.bin = Some(bin.into());
        self
    }

    /// How many members (default 3).
    pub fn members(mut self, n: usize) -> Self {
        self.members = n;
        self
    }

    /// More flags for every member, after the URL and cluster flags.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Client URLs are `https://` (pass `--cert-file`/`--key-file` with [`args`](Self::args)).
    pub fn https(mut self, https: bool) -> Self {
        self.https = https;
        self
    }

    /// The temporary directory's name starts with `prefix` (default `etcd-`).
    pub fn temp_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.temp_prefix = prefix.into();
        self
    }

    /// Client URLs are `https://` with these certificates (implies [`https`](Self::https)).
    /// Metrics move to a plain-HTTP port of their own per member (`--listen-metrics-urls`), so
    /// [`EtcdCluster::metric_sum`] keeps working.
    pub fn tls(mut self, tls: EtcdTls) -> Self {
        self.https = true;
        self.tls = Some(tls);
        self
    }

    /// Once started, the cluster gets a `root` user with this password and authentication
    /// enabled (through etcdctl, found next to the etcd binary or on `PATH`);
    /// [`EtcdCluster::etcdctl`] then logs in as root.
    pub fn root_password(mut self, password: impl Into<String>) -> Self {
        self.root_password = Some(password.into());
        self
    }

    /// Starts every member, then waits until each logged that it serves clients (a member
    /// waits for a quorum first, so all are spawned before any is awaited). A port taken by
    /// another process between [`free_ports`] and etcd's bind is retried twice with fresh
    /// ports and a fresh directory. Blocking.
    pub fn start_cluster(self) -> Result<EtcdCluster, Error> {
        let bin = match &self.bin {
            Some(bin) => bin.clone(),
            None => crate::find_on_path("etcd").ok_or_else(|| Error::NotFound {
                what: "etcd".into(),
                tried: vec![PathBuf::from("etcd on PATH")],
            })?,
        };
        let mut attempt = 1;
        loop {
            let mut cluster = self.spawn_cluster(&bin)?;
            match cluster.await_all() {
                Ok(()) => {
                    if let Some(password) = &self.root_password {
                        cluster.etcdctl(["user", "add", &format!("root:{password}")])?;
                        cluster.etcdctl(["auth", "enable"])?;
                        cluster.root_password = Some(password.clone());
                    }
                    return Ok(cluster);
                }
                Err(Error::NotReady { output, .. }) if attempt < 3 && output.contains("in use") => {
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn spawn_cluster(&self, bin: &Path) -> Result<EtcdCluster, Error> {
        let n = self.members.max(1);
        let per = if self.tls.is_some() { 3 } else { 2 };
        let ports = free_ports(per * n)?;
        let dir = tempfile::Builder::new()
            .prefix(&self.temp_prefix)
            .tempdir()
            .map_err(|source| Error::Io {
                what: "create a temporary etcd directory".into(),
                source,
            })?;
        // The directory's unique name keeps two clusters from ever joining each other.
        let token = dir
            .path()
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default();
        let members = (0..n)
            .map(|i| Member {
                name: format!("m{i}"),
                client: ports[per * i],
                peer: ports[per * i + 1],
                metrics: (per == 3).then(|| ports[per * i + 2]),
                running: None,
                output: Output::new(KEEP_LINES, &[]),
            })
            .collect();
        let mut cluster = EtcdCluster {
            bin: bin.to_path_buf(),
            dir,
            token,
            members,
            args: self.args.clone(),
            https: self.https,
            tls: self.tls.clone(),
            root_password: None,
            pending: Vec::new(),
        };
        for i in 0..n {
            let ready = cluster.spawn(i)?;
            cluster.pending.push((i, ready));
        }
        Ok(cluster)
    }
}

/// One etcd member's process.
#[derive(Debug)]
struct Member {
    name: String,
    client: u16,
    peer: u16,
    /// A plain-HTTP metrics port, with TLS client URLs.
    metrics: Option<u16>,
    running: Option<(Child, Vec<JoinHandle<()>>)>,
    output: Output,
}

/// A loopback etcd cluster of [`EtcdBuilder`]'s member count (3 by default), members `m0`,
/// `m1`, ... on free ports, data in one temporary directory. Every member is killed and the
/// directory removed on drop; the members' last lines go to stderr when dropped during a
/// panic.
///
/// ```no_run
/// // no_run: needs etcd installed, which a doc test cannot count on.
/// let cluster = testkit::EtcdCluster::builder()
///     .args(["--experimental-watch-progress-notify-interval", "100ms"])
///     .start_cluster()?;
/// let upstream = cluster.endpoints(0); // "http://127.0.0.1:a,http://127.0.0.1:b,..."
/// let watchers = cluster.metric_sum("etcd_debugging_mvcc_watcher_total")?;
/// # let _ = (upstream, watchers);
/// # Ok::<(), testkit::Error>(())
/// ```
#[derive(Debug)]
pub struct EtcdCluster {
    bin: PathBuf,
    dir: TempDir,
    token: String,
    members: Vec<Member>,
    args: Vec<String>,
    https: bool,
    tls: Option<EtcdTls>,
    /// Set once authentication is enabled.
    root_password: Option<String>,
    /// Members spawned and not yet awaited, with their readiness channels.
    pending: Vec<(usize, mpsc::Receiver<()>)>,
}

impl EtcdCluster {
    /// A builder for 3 members.
    pub fn builder() -> EtcdBuilder {
        EtcdBuilder {
            bin: None,
            members: 3,
            args: Vec::new(),
            https: false,
            tls: None,
            root_password: None,
            temp_prefix: "etcd-".into(),
        }
    }

    fn scheme(&self) -> &'static str {
        if self.https { "https" } else { "http" }
    }

    fn spawn(&mut self, i: usize) -> Result<mpsc::Receiver<()>, Error> {
        let initial: Vec<String> = self
            .members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer))
            .collect();
        let client = self.url(i);
        let m = &self.members[i];
        let peer = format!("http://127.0.0.1:{}", m.peer);
        let mut tls_args: Vec<std::ffi::OsString> = Vec::new();
        if let Some(tls) = &self.tls {
            tls_args.extend([
                "--cert-file".into(),
                tls.server.0.clone().into(),
                "--key-file".into(),
                tls.server.1.clone().into(),
            ]);
            if tls.client.is_some() {
                tls_args.extend([
                    "--client-cert-auth".into(),
                    "--trusted-ca-file".into(),
                    tls.ca.clone().into(),
                ]);
            }
        }
        if let Some(port) = m.metrics {
            tls_args.extend([
                "--listen-metrics-urls".into(),
                format!("http://127.0.0.1:{port}").into(),
            ]);
        }
        let mut cmd = Command::new(&self.bin);
        cmd.args(["--name", &m.name, "--data-dir"])
            .arg(self.dir.path().join(&m.name))
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &initial.join(",")])
            .args(["--initial-cluster-token", &self.token])
            .args(&tls_args)
            .args(&self.args);
        let (child, readers, rx) = spawn_watched(&mut cmd, &m.output, READY)?;
        self.members[i].running = Some((child, readers));
        Ok(rx)
    }

    fn await_all(&mut self) -> Result<(), Error> {
        let deadline = Instant::now() + GUARD;
        let pending = std::mem::take(&mut self.pending);
        let started: Vec<usize> = pending.iter().map(|(i, _)| *i).collect();
        for (i, ready) in pending {
            let left = deadline.saturating_duration_since(Instant::now());
            if ready.recv_timeout(left).is_err() {
                // What this call started goes; members already serving stay.
                for &j in &started {
                    self.kill9(j);
                }
                return Err(Error::NotReady {
                    what: format!("etcd member {}", self.members[i].name),
                    output: self.members[i].output.tail(),
                });
            }
        }
        Ok(())
    }

    /// How many members.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// True when it has no member (never: a cluster has at least one).
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Member `i`'s client URL, `http://127.0.0.1:<port>` (`https://` per the builder).
    pub fn url(&self, i: usize) -> String {
        format!("{}://127.0.0.1:{}", self.scheme(), self.members[i].client)
    }

    /// Every member's URL, comma-separated, `first`'s first (a mirror attaches to its first
    /// endpoint).
    pub fn endpoints(&self, first: usize) -> String {
        std::iter::once(first)
            .chain((0..self.members.len()).filter(|&i| i != first))
            .map(|i| self.url(i))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The members currently running.
    pub fn alive(&self) -> Vec<usize> {
        (0..self.members.len())
            .filter(|&i| self.members[i].running.is_some())
            .collect()
    }

    /// Member `i`'s process id, while running.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.members[i].running.as_ref().map(|(c, _)| c.id())
    }

    /// SIGKILL member `i` and reap it. Nothing happens when it is not running.
    pub fn kill9(&mut self, i: usize) {
        if let Some((mut child, readers)) = self.members[i].running.take() {
            let _ = child.kill();
            let _ = child.wait();
            for r in readers {
                let _ = r.join();
            }
        }
    }

    /// [`kill9`](Self::kill9) member `i` (if running), then start it again on its data
    /// directory and ports (etcd keeps its peer URL in the directory) and wait until it serves
    /// clients. Blocking.
    pub fn restart(&mut self, i: usize) -> Result<(), Error> {
        self.kill9(i);
        let ready = self.spawn(i)?;
        self.pending.push((i, ready));
        self.await_all()
    }

    /// The sum over the running members of the Prometheus sample `name` (no labels) from each
    /// one's `GET /metrics` on its client port, e.g. `etcd_debugging_mvcc_watcher_total`: the
    /// watchers etcd itself serves. Plain HTTP: with [`EtcdBuilder::tls`], from each
    /// member's metrics port.
    pub fn metric_sum(&self, name: &str) -> Result<f64, Error> {
        let mut total = 0.0;
        for i in self.alive() {
            let port = self.members[i].metrics.unwrap_or(self.members[i].client);
            total += metric(port, name)?;
        }
        Ok(total)
    }
}

/// The Prometheus sample `name` (no labels) from `GET /metrics` on a loopback plain-HTTP
/// `port` (an etcd member's or a grpc-proxy's).
pub(crate) fn metric(port: u16, name: &str) -> Result<f64, Error> {
    let io = |source| Error::Io {
        what: format!("GET /metrics from port {port}"),
        source,
    };
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).map_err(io)?;
    s.set_read_timeout(Some(GUARD)).map_err(io)?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .map_err(io)?;
    let mut body = String::new();
    s.read_to_string(&mut body).map_err(io)?;
    let prefix = format!("{name} ");
    body.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .ok_or_else(|| Error::NoMetric {
            name: name.to_owned(),
            port,
        })
}

impl EtcdCluster {
    /// The etcd binary the members run (grpc-proxy is one of its subcommands).
    pub fn bin(&self) -> &Path {
        &self.bin
    }

    /// The TLS settings of the client URLs, when [`EtcdBuilder::tls`] was given.
    pub fn tls(&self) -> Option<&EtcdTls> {
        self.tls.as_ref()
    }

    /// Runs `etcdctl` (next to the etcd binary, else on `PATH`) against the running members
    /// with the cluster's TLS files and, once auth is on, as root; returns its stdout.
    /// Blocking; etcdctl's own timeouts (2 s dial, 5 s per command) bound it.
    pub fn etcdctl<I, S>(&self, args: I) -> Result<String, Error>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let beside = self.bin.with_file_name("etcdctl");
        let bin = if beside.exists() {
            beside
        } else {
            crate::find_on_path("etcdctl").ok_or_else(|| Error::NotFound {
                what: "etcdctl".into(),
                tried: vec![beside, PathBuf::from("etcdctl on PATH")],
            })?
        };
        let endpoints: Vec<String> = self.alive().into_iter().map(|i| self.url(i)).collect();
        let mut cmd = Command::new(&bin);
        cmd.env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", endpoints.join(",")));
        if let Some(tls) = &self.tls {
            cmd.arg("--cacert").arg(&tls.ca);
            if let Some((cert, key)) = &tls.client {
                cmd.arg("--cert").arg(cert).arg("--key").arg(key);
            }
        }
        if let Some(password) = &self.root_password {
            cmd.arg(format!("--user=root:{password}"));
        }
        let args: Vec<std::ffi::OsString> =
            args.into_iter().map(|a| a.as_ref().to_owned()).collect();
        let out = cmd
            .args(&args)
            .stdin(Stdio::null())
            .output()
            .map_err(|source| Error::Spawn {
                bin: bin.clone(),
                source,
            })?;
        if !out.status.success() {
            return Err(Error::Failed {
                what: format!("etcdctl {args:?}"),
                output: String::from_utf8_lossy(&out.stderr).into_owned(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill9(i);
            if std::thread::panicking() {
                eprintln!(
                    "---- etcd {} (last lines) ----\n{}",
                    self.members[i].name,
                    self.members[i].output.tail()
                );
            }
        }
    }
}

/// One etcd on free loopback ports with a temporary data directory: an [`EtcdCluster`] of one
/// member. Killed and the directory removed on drop.
///
/// ```no_run
/// // no_run: needs etcd installed, which a doc test cannot count on.
/// if testkit::etcd_present("my_test") {
///     let mut etcd = testkit::Etcd::builder().start()?;
///     let endpoint = etcd.endpoint(); // http://127.0.0.1:<port>
///     etcd.restart()?; // kill -9, then the same directory and ports
///     # let _ = endpoint;
/// }
/// # Ok::<(), testkit::Error>(())
/// ```
#[derive(Debug)]
pub struct Etcd(EtcdCluster);

/// Configures an [`Etcd`]: [`EtcdBuilder`] for one member.
#[derive(Debug)]
#[must_use]
pub struct SingleEtcdBuilder(EtcdBuilder);

impl SingleEtcdBuilder {
    /// See [`EtcdBuilder::bin`].
    pub fn bin(self, bin: impl Into<PathBuf>) -> Self {
        SingleEtcdBuilder(self.0.bin(bin))
    }

    /// See [`EtcdBuilder::args`].
    pub fn args<I, S>(self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        SingleEtcdBuilder(self.0.args(args))
    }

    /// See [`EtcdBuilder::https`].
    pub fn https(self, https: bool) -> Self {
        SingleEtcdBuilder(self.0.https(https))
    }

    /// See [`EtcdBuilder::temp_prefix`].
    pub fn temp_prefix(self, prefix: impl Into<String>) -> Self {
        SingleEtcdBuilder(self.0.temp_prefix(prefix))
    }

    /// Starts it and waits until it serves clients. Blocking.
    pub fn start(self) -> Result<Etcd, Error> {
        self.0.start_cluster().map(Etcd)
    }
}

impl Etcd {
    /// A builder for one member.
    pub fn builder() -> SingleEtcdBuilder {
        let mut b = EtcdCluster::builder();
        b.members = 1;
        SingleEtcdBuilder(b)
    }

    /// The client URL.
    pub fn endpoint(&self) -> String {
        self.0.url(0)
    }

    /// The process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.0.pid(0)
    }

    /// SIGKILL, then start again on the same directory and ports. Blocking.
    pub fn restart(&mut self) -> Result<(), Error> {
        self.0.restart(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_member_starts_serves_metrics_and_restarts_on_its_ports() {
        if !crate::etcd_present("testkit::etcd::one_member_starts_serves_metrics_and_restarts") {
            return;
        }
        let mut etcd = Etcd::builder().start().expect("etcd starts");
        let endpoint = etcd.endpoint();
        assert!(endpoint.starts_with("http://127.0.0.1:"), "{endpoint}");
        let watchers = etcd
            .0
            .metric_sum("etcd_debugging_mvcc_watcher_total")
            .expect("etcd exports its watcher gauge");
        assert_eq!(watchers, 0.0);
        let pid = etcd.pid();
        etcd.restart().expect("etcd restarts");
        assert_eq!(etcd.endpoint(), endpoint, "a restart keeps the ports");
        assert_ne!(etcd.pid(), pid, "a restart is a new process");
        assert!(matches!(
            etcd.0.metric_sum("no_such_metric"),
            Err(Error::NoMetric { .. })
        ));
    }
}

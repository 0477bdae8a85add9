//! Starting keywatch and etcd on loopback, each with a fresh temporary data dir, and learning
//! readiness from their output (never by sleeping). The process is killed and the dir removed
//! on drop.

use std::fmt;
use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde::Serialize;
use tempfile::TempDir;

use crate::Error;

/// How long a server may take to say it is ready. Generous; a healthy start takes well under a
/// second, so it never decides an outcome.
const READY_GUARD: Duration = Duration::from_secs(60);

/// Which server a run is against.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    /// keywatch's `watch-server`.
    Keywatch,
    /// etcd.
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

/// Where the server binaries are.
#[derive(Clone, Debug)]
pub struct Binaries {
    /// keywatch's `watch-server`.
    pub keywatch: PathBuf,
    /// etcd, when present.
    pub etcd: Option<PathBuf>,
}

impl Binaries {
    /// `etcd` from `explicit` or, failing that, from PATH.
    pub fn find_etcd(explicit: Option<PathBuf>) -> Option<PathBuf> {
        if let Some(p) = explicit {
            return p.is_file().then_some(p);
        }
        let path = std::env::var_os("PATH")?;
        std::env::split_paths(&path)
            .map(|dir| dir.join("etcd"))
            .find(|p| p.is_file())
    }
}

/// A running server with its data dir; killed and removed on drop.
pub struct Server {
    /// Which server.
    pub target: Target,
    /// Client URL, `http://127.0.0.1:<port>`.
    pub endpoint: String,
    child: Child,
    _dir: TempDir,
}

impl Server {
    /// Starts `target` fresh.
    pub fn start(target: Target, bins: &Binaries) -> Result<Server, Error> {
        match target {
            Target::Keywatch => Self::start_keywatch(&bins.keywatch),
            Target::Etcd => {
                let bin = bins.etcd.as_deref().ok_or(Error::NoEtcd)?;
                // A free port can be taken by another process before etcd binds it; only then
                // is a fresh pair tried.
                let mut last = None;
                for _ in 0..3 {
                    match Self::start_etcd(bin) {
                        Ok(s) => return Ok(s),
                        Err(Error::Start { output, .. }) if output.contains("in use") => {
                            last = Some(output);
                        }
                        Err(e) => return Err(e),
                    }
                }
                Err(Error::Start {
                    what: "etcd".into(),
                    output: last.unwrap_or_default(),
                })
            }
        }
    }

    fn start_keywatch(bin: &Path) -> Result<Server, Error> {
        let dir = tempdir("keywatch")?;
        let mut child = Command::new(bin)
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--data-dir")
            .arg(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| Error::Io(format!("spawn {}", bin.display()), e))?;
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        let ready = drain(stdout, |l| {
            l.strip_prefix("watch-server listening on ")
                .map(|a| a.trim().to_owned())
        });
        let log = drain(stderr, |l| Some(l.to_owned()));
        let mut server = Server {
            target: Target::Keywatch,
            endpoint: String::new(),
            child,
            _dir: dir,
        };
        match ready.recv_timeout(READY_GUARD) {
            Ok(addr) => {
                server.endpoint = format!("http://{addr}");
                Ok(server)
            }
            Err(_) => Err(Error::Start {
                what: "watch-server".into(),
                output: log.try_iter().collect::<Vec<_>>().join("\n"),
            }),
        }
    }

    fn start_etcd(bin: &Path) -> Result<Server, Error> {
        let dir = tempdir("etcd")?;
        let (client, peer) = free_ports()?;
        let client_url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let mut child = Command::new(bin)
            .args(["--name", "loadgen", "--data-dir"])
            .arg(dir.path())
            .args(["--listen-client-urls", &client_url])
            .args(["--advertise-client-urls", &client_url])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("loadgen={peer_url}")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| Error::Io(format!("spawn {}", bin.display()), e))?;
        let stderr = child.stderr.take().expect("piped stderr");
        // Every line is forwarded; the channel closes when etcd dies, which ends the wait.
        let lines = drain(stderr, |l| Some(l.to_owned()));
        let mut server = Server {
            target: Target::Etcd,
            endpoint: client_url,
            child,
            _dir: dir,
        };
        let deadline = std::time::Instant::now() + READY_GUARD;
        let mut output = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match lines.recv_timeout(left) {
                Ok(line) if line.contains("ready to serve client requests") => {
                    // Keep draining so etcd never blocks on a full stderr pipe.
                    std::thread::spawn(move || for _ in lines {});
                    return Ok(server);
                }
                Ok(line) => output.push(line),
                Err(_) => {
                    server.kill();
                    return Err(Error::Start {
                        what: "etcd".into(),
                        output: output.join("\n"),
                    });
                }
            }
        }
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// CPU time the server process has used so far (user + system), in seconds, from
    /// `utime` and `stime` of `/proc/<pid>/stat`.
    pub fn cpu_seconds(&self) -> Option<f64> {
        cpu_seconds(self.pid())
    }

    /// Resident set size of the server process, in bytes (`VmRSS` of `/proc/<pid>/status`).
    pub fn rss_bytes(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).ok()?;
        let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
        let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kb * 1024)
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

fn tempdir(what: &str) -> Result<TempDir, Error> {
    tempfile::Builder::new()
        .prefix(&format!("loadgen-{what}-"))
        .tempdir()
        .map_err(|e| Error::Io("create a temp data dir".into(), e))
}

/// Two distinct free loopback ports (both listeners held at once so they differ).
fn free_ports() -> Result<(u16, u16), Error> {
    let bind =
        || TcpListener::bind("127.0.0.1:0").map_err(|e| Error::Io("bind a free port".into(), e));
    let (a, b) = (bind()?, bind()?);
    let port = |l: &TcpListener| {
        l.local_addr()
            .map(|a| a.port())
            .map_err(|e| Error::Io("local addr".into(), e))
    };
    Ok((port(&a)?, port(&b)?))
}

/// Reads `reader` line by line on a thread for the life of the process; lines for which `pick`
/// returns `Some` are sent on the returned channel. The channel closes with the pipe.
fn drain<R: Read + Send + 'static>(
    reader: R,
    pick: fn(&str) -> Option<String>,
) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(reader).lines() {
            let Ok(line) = line else { break };
            if let Some(found) = pick(&line) {
                // The receiver may be gone; keep reading so the child never blocks.
                let _ = tx.send(found);
            }
        }
    });
    rx
}

/// User + system CPU seconds of process `pid` (`utime` + `stime` of `/proc/<pid>/stat`, in
/// clock ticks of `getconf CLK_TCK`, 100 on Linux when it cannot be asked).
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count from the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state is field 3, utime field 14, stime field 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / clock_ticks())
}

fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .filter(|&t: &f64| t > 0.0)
            .unwrap_or(100.0)
    })
}

/// Processes that keep every core busy while a case runs ("another process loads both
/// cores"): each is this executable re-run with [`BURN_ENV`] set, which spins until killed or
/// until its deadline. Killed when dropped.
pub struct Burners(Vec<Child>);

/// Environment variable that turns the load generator into a CPU burner for that many seconds.
pub const BURN_ENV: &str = "KEYWATCH_LOADGEN_BURN_SECONDS";

impl Burners {
    /// Starts one burner per core (at most `max_seconds` each, so none outlives a crashed run).
    pub fn start(max_seconds: u64) -> Result<Burners, Error> {
        let exe = std::env::current_exe().map_err(|e| Error::Io("current_exe".into(), e))?;
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let mut out = Vec::with_capacity(cores);
        for _ in 0..cores {
            let child = Command::new(&exe)
                .env(BURN_ENV, max_seconds.to_string())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .map_err(|e| Error::Io(format!("start burner {}", exe.display()), e))?;
            out.push(child);
        }
        Ok(Burners(out))
    }
}

impl Drop for Burners {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The burner's body: spins until `seconds` have passed.
pub fn burn(seconds: u64) {
    let end = std::time::Instant::now() + std::time::Duration::from_secs(seconds);
    let mut x: u64 = 1;
    while std::time::Instant::now() < end {
        for _ in 0..100_000 {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
        }
    }
}

//! The two servers a run measures, started fresh through `testkit` (loopback, temporary data
//! dir, readiness read from their output, killed and removed on drop).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use testkit::{AnyServer, Etcd, ServerProcess};

use crate::Error;

/// Which server a run is against (serialized as `"keywatch"` / `"etcd"`).
pub use testkit::Target;

/// [`Target`] as its name, for `#[serde(serialize_with)]` (testkit carries no serde).
pub fn serialize_target<S: serde::Serializer>(target: &Target, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(target.as_str())
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
        match explicit {
            Some(p) => p.is_file().then_some(p),
            None => testkit::find_on_path("etcd"),
        }
    }
}

/// A running server with its data dir; killed and removed on drop.
pub struct Server {
    /// Which server.
    pub target: Target,
    /// Client URL, `http://127.0.0.1:<port>`.
    pub endpoint: String,
    process: AnyServer,
}

impl Server {
    /// Starts `target` fresh. Blocking.
    pub fn start(target: Target, bins: &Binaries) -> Result<Server, Error> {
        let process = match target {
            Target::Keywatch => AnyServer::Keywatch(
                ServerProcess::builder(&bins.keywatch)
                    .temp_prefix("loadgen-keywatch-")
                    .start()?,
            ),
            Target::Etcd => {
                let bin = bins.etcd.as_deref().ok_or(Error::NoEtcd)?;
                AnyServer::Etcd(
                    Etcd::builder()
                        .bin(bin)
                        .temp_prefix("loadgen-etcd-")
                        .start()?,
                )
            }
        };
        let endpoint = process.endpoint();
        Ok(Server {
            target,
            endpoint,
            process,
        })
    }

    /// The server's process id.
    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }

    /// CPU time the server process has used so far (user + system), in seconds, from
    /// `utime` and `stime` of `/proc/<pid>/stat`.
    pub fn cpu_seconds(&self) -> Option<f64> {
        cpu_seconds(self.pid()?)
    }

    /// Resident set size of the server process, in bytes.
    pub fn rss_bytes(&self) -> Option<u64> {
        testkit::rss_kib(self.pid()?).map(|kib| kib * 1024)
    }

    /// kill -9, then start again on the same data directory (keywatch binds a new port:
    /// `endpoint` is updated). Blocking.
    pub fn restart(&mut self) -> Result<(), Error> {
        self.process.restart()?;
        self.endpoint = self.process.endpoint();
        Ok(())
    }

    /// Bytes the server's data directory takes on disk (allocated blocks of every file under
    /// the `--data-dir` of its command line).
    pub fn data_dir_bytes(&self) -> Option<u64> {
        let cmdline = std::fs::read(format!("/proc/{}/cmdline", self.pid()?)).ok()?;
        let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
        let i = args.iter().position(|a| *a == b"--data-dir")?;
        let dir = std::str::from_utf8(args.get(i + 1)?).ok()?;
        Some(dir_bytes(std::path::Path::new(dir)))
    }
}

/// Allocated bytes (512-byte blocks) of every file under `dir`, recursively.
fn dir_bytes(dir: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.blocks() * 512,
            Err(_) => 0,
        })
        .sum()
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

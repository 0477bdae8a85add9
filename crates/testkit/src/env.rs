//! What the machine offers a test: free loopback ports, tools on `PATH`, the watch-server
//! binary, a process's memory.

use std::net::TcpListener;
use std::path::PathBuf;

use crate::Error;

/// The environment variable that turns a missing etcd or etcdctl into a failure instead of a
/// skip (CI sets it to `1`).
pub const REQUIRE_ETCD: &str = "KEYWATCH_REQUIRE_ETCD";

/// `n` distinct free loopback ports. All listeners are held at once so the ports differ, then
/// released: another process may take one before the caller binds it, which is why
/// [`Etcd`](crate::Etcd) and [`EtcdCluster`](crate::EtcdCluster) retry a start whose port
/// turned out to be in use. A server that can bind port 0 itself (watch-server) needs none.
pub fn free_ports(n: usize) -> Result<Vec<u16>, Error> {
    let io = |source| Error::Io {
        what: "bind a free loopback port".into(),
        source,
    };
    let held = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").map_err(io))
        .collect::<Result<Vec<_>, _>>()?;
    held.iter()
        .map(|l| l.local_addr().map(|a| a.port()).map_err(io))
        .collect()
}

/// The first file named `tool` in a directory of `PATH`.
pub fn find_on_path(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(tool))
        .find(|p| p.is_file())
}

/// True when every tool is on `PATH`. Otherwise prints `SKIPPED (<what> not installed): <test>`
/// and returns false, or panics when [`REQUIRE_ETCD`]` = 1` (CI must not skip silently).
pub fn tools_present(test: &str, tools: &[&str], what: &str) -> bool {
    let missing: Vec<&str> = tools
        .iter()
        .copied()
        .filter(|t| find_on_path(t).is_none())
        .collect();
    if missing.is_empty() {
        return true;
    }
    if etcd_required() {
        panic!("{REQUIRE_ETCD}=1 but {missing:?} not found on PATH ({test})");
    }
    println!("SKIPPED ({what} not installed): {test}");
    false
}

/// [`tools_present`] for `etcd` alone.
pub fn etcd_present(test: &str) -> bool {
    tools_present(test, &["etcd"], "etcd")
}

/// True when [`REQUIRE_ETCD`] is `1`.
pub fn etcd_required() -> bool {
    std::env::var(REQUIRE_ETCD).as_deref() == Ok("1")
}

/// The `watch-server` binary built alongside the running executable: in the same directory
/// (`target/<profile>/`), or one up when the executable is a test in `target/<profile>/deps/`.
///
/// A test of the watch-server package should pass `env!("CARGO_BIN_EXE_watch-server")`
/// instead: cargo builds that binary before the test. A test of another package cannot rely on
/// this function either (cargo does not build another package's binaries for it); it is meant
/// for tools (`keywatch-loadgen`, `keywatch-robustness`) built in the same target directory.
pub fn watch_server_bin() -> Result<PathBuf, Error> {
    let exe = std::env::current_exe().map_err(|source| Error::Io {
        what: "find the running executable".into(),
        source,
    })?;
    let mut tried = Vec::new();
    let mut dir = exe.parent();
    for _ in 0..2 {
        let Some(d) = dir else { break };
        let candidate = d.join(format!("watch-server{}", std::env::consts::EXE_SUFFIX));
        if candidate.is_file() {
            return Ok(candidate);
        }
        tried.push(candidate);
        dir = d.parent().filter(|_| d.ends_with("deps"));
    }
    Err(Error::NotFound {
        what: "watch-server (cargo build -p watch-server)".into(),
        tried,
    })
}

/// The `watch-server` a tool runs: `explicit` (its `--server-bin`), or else
/// [`watch_server_bin`]; [`Error::NotFound`] when that is not a file.
pub fn find_watch_server(explicit: Option<PathBuf>) -> Result<PathBuf, Error> {
    let bin = match explicit {
        Some(bin) => bin,
        None => watch_server_bin()?,
    };
    if bin.is_file() {
        Ok(bin)
    } else {
        Err(Error::NotFound {
            what: "watch-server (build it: cargo build -p watch-server)".into(),
            tried: vec![bin],
        })
    }
}

/// Resident set size of process `pid` in KiB (`VmRSS` of `/proc/<pid>/status`); `None` where
/// that file cannot be read (the process is gone, or not Linux).
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

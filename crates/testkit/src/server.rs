//! [`ServerProcess`]: a `watch-server` child process on port 0.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;

use tempfile::TempDir;

use crate::output::{Output, Stream, drain};
use crate::{Error, GUARD};

/// How many of a process's last lines are kept: for error messages, [`Output::tail`] and
/// [`Exit`].
const KEEP_LINES: usize = 1_000;

/// The line watch-server prints once it is bound (health answers NOT_SERVING while the store
/// opens).
const BOUND: &str = "watch-server bound ";
/// The line watch-server prints once every service answers: readiness, and the address.
const LISTENING: &str = "watch-server listening on ";
/// The line watch-server prints for `--metrics-listen`, before [`LISTENING`].
const METRICS: &str = "watch-server metrics on http://";

/// A Unix signal [`ServerProcess::signal`] sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Signal {
    /// SIGTERM: graceful shutdown.
    Term,
    /// SIGINT: graceful shutdown, as Ctrl-C.
    Int,
}

impl Signal {
    fn flag(self) -> &'static str {
        match self {
            Signal::Term => "-TERM",
            Signal::Int => "-INT",
        }
    }
}

/// How a process ended, and what it printed on each stream since it was (re)started (within
/// the last 1,000 lines).
#[derive(Debug)]
pub struct Exit {
    /// Its exit status.
    pub status: ExitStatus,
    /// Its standard output, line by line.
    pub stdout: String,
    /// Its standard error, line by line.
    pub stderr: String,
}

/// Where the data directory is.
#[derive(Debug)]
enum DataDir {
    /// Made by the builder, removed on drop.
    Temp(TempDir),
    /// Given by the caller, left in place.
    Given(PathBuf),
}

impl DataDir {
    fn path(&self) -> &Path {
        match self {
            DataDir::Temp(t) => t.path(),
            DataDir::Given(p) => p,
        }
    }
}

/// Configures a [`ServerProcess`]: made by [`ServerProcess::builder`].
#[derive(Debug)]
#[must_use]
pub struct ServerBuilder {
    bin: PathBuf,
    data_dir: Option<PathBuf>,
    temp_prefix: String,
    args: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    https: bool,
    markers: Vec<String>,
    /// Only `args`: no `--listen`/`--data-dir` ([`ServerBuilder::bare`]).
    bare: bool,
    /// Written to the process's standard input, which is then closed (else it is null).
    stdin: Option<Vec<u8>>,
    /// The process's open-file limit (`RLIMIT_NOFILE`, soft and hard), else inherited.
    open_files: Option<u64>,
}

impl ServerBuilder {
    /// Runs on `dir` (created by the server when absent, never removed) instead of a fresh
    /// temporary directory.
    pub fn data_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.data_dir = Some(dir.into());
        self
    }

    /// The temporary data directory's name starts with `prefix` (default `watch-server-`),
    /// which tells a left-over directory's test.
    pub fn temp_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.temp_prefix = prefix.into();
        self
    }

    /// More command-line arguments, after `--listen 127.0.0.1:0 --data-dir <dir>`.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// An environment variable of the process. Inherited `KEYWATCH_*` variables other than
    /// `KEYWATCH_LOG` are removed (a developer's `KEYWATCH_CONFIG` must not change a test);
    /// only those set here reach the server.
    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// The server speaks TLS: [`ServerProcess::endpoint`] is `https://...` (the builder cannot
    /// tell from the flags, which may come from the environment or a config file).
    pub fn https(mut self, https: bool) -> Self {
        self.https = https;
        self
    }

    /// Counts the lines holding `marker` over the process's life, restarts included
    /// ([`Output::count`]).
    pub fn count_lines(mut self, marker: impl Into<String>) -> Self {
        self.markers.push(marker.into());
        self
    }

    /// Passes only the [`args`](Self::args), without `--listen 127.0.0.1:0 --data-dir <dir>`:
    /// for `--help`, subcommands and tests that choose both flags themselves (with
    /// [`run_to_exit`](Self::run_to_exit)).
    pub fn bare(mut self) -> Self {
        self.bare = true;
        self
    }

    /// Writes `input` to the process's standard input, then closes it (by default it reads
    /// nothing).
    pub fn stdin(mut self, input: impl Into<Vec<u8>>) -> Self {
        self.stdin = Some(input.into());
        self
    }

    /// Runs the process with at most `n` open files (`RLIMIT_NOFILE`, soft and hard; set by
    /// `sh`'s `ulimit -n`, which then `exec`s the server, so the process id is the server's):
    /// for tests of running out of file descriptors.
    pub fn open_files_limit(mut self, n: u64) -> Self {
        self.open_files = Some(n);
        self
    }

    fn data(&self) -> Result<DataDir, Error> {
        match &self.data_dir {
            Some(dir) => Ok(DataDir::Given(dir.clone())),
            None => tempfile::Builder::new()
                .prefix(&self.temp_prefix)
                .tempdir()
                .map(DataDir::Temp)
                .map_err(|source| Error::Io {
                    what: "create a temporary data directory".into(),
                    source,
                }),
        }
    }

    /// Starts the server and returns once it printed `watch-server listening on <addr>`.
    /// Blocking: from async code, call it inside `tokio::task::block_in_place` or
    /// `spawn_blocking`.
    pub fn start(self) -> Result<ServerProcess, Error> {
        let mut server = self.into_process()?;
        server.launch()?;
        Ok(server)
    }

    /// Runs the server expecting it to exit by itself (a refused configuration, a refused data
    /// directory) and returns how it ended. A process still running after the guard is killed
    /// and reported as [`Error::StillRunning`]. Blocking.
    pub fn run_to_exit(self) -> Result<Exit, Error> {
        let mut server = self.into_process()?;
        let (_lines, running) = server.spawn()?;
        server.running = Some(running);
        server.wait_exit()
    }

    fn into_process(self) -> Result<ServerProcess, Error> {
        Ok(ServerProcess {
            data: self.data()?,
            output: Output::new(KEEP_LINES, &self.markers),
            config: self,
            running: None,
            addr: None,
            metrics_addr: None,
        })
    }
}

/// A `watch-server` child process started with `--listen 127.0.0.1:0` on a temporary (or
/// given) data directory. The address is read from its `watch-server listening on <addr>`
/// line, which it prints once every service answers: no sleeping, no guessed port. Killed
/// (SIGKILL) and its temporary directory removed on drop; the last lines it printed go to
/// stderr when dropped during a panic.
///
/// ```no_run
/// // no_run: needs a built watch-server binary, which a doc test cannot count on.
/// let mut server = testkit::ServerProcess::builder("target/debug/watch-server")
///     .args(["--progress-interval", "300ms"])
///     .start()?;
/// let endpoint = server.endpoint(); // http://127.0.0.1:<port>
/// server.restart()?; // kill -9, then the same data directory again (on a new port)
/// assert_ne!(server.endpoint(), "");
/// # let _ = endpoint;
/// # Ok::<(), testkit::Error>(())
/// ```
#[derive(Debug)]
pub struct ServerProcess {
    config: ServerBuilder,
    data: DataDir,
    output: Output,
    running: Option<Running>,
    addr: Option<SocketAddr>,
    metrics_addr: Option<SocketAddr>,
}

/// One launch of the process.
#[derive(Debug)]
struct Running {
    child: Child,
    /// The stdout and stderr readers: both end when the process has exited.
    readers: Vec<JoinHandle<()>>,
    /// [`Output::mark`] at launch: what [`Exit`] reports starts here.
    mark: u64,
}

/// A readiness line seen on stdout.
enum Line {
    Bound(SocketAddr),
    Metrics(SocketAddr),
    Listening(SocketAddr),
}

fn parse_line(line: &str) -> Option<Line> {
    if let Some(rest) = line.strip_prefix(LISTENING) {
        return rest.trim().parse().ok().map(Line::Listening);
    }
    if let Some(rest) = line.strip_prefix(METRICS) {
        return rest
            .strip_suffix("/metrics")
            .and_then(|a| a.parse().ok())
            .map(Line::Metrics);
    }
    let rest = line.strip_prefix(BOUND)?;
    let addr = rest.split([';', ' ']).next()?;
    addr.parse().ok().map(Line::Bound)
}

impl ServerProcess {
    /// A builder for `bin` (in a watch-server test: `env!("CARGO_BIN_EXE_watch-server")`;
    /// elsewhere see [`watch_server_bin`](crate::watch_server_bin)).
    pub fn builder(bin: impl Into<PathBuf>) -> ServerBuilder {
        ServerBuilder {
            bin: bin.into(),
            data_dir: None,
            temp_prefix: "watch-server-".into(),
            args: Vec::new(),
            env: Vec::new(),
            https: false,
            markers: Vec::new(),
            bare: false,
            stdin: None,
            open_files: None,
        }
    }

    fn spawn(&mut self) -> Result<(mpsc::Receiver<Line>, Running), Error> {
        let mut cmd = match self.config.open_files {
            // `$0` is the server binary, `$@` its arguments (added below).
            Some(n) => {
                let mut sh = Command::new("sh");
                sh.arg("-c")
                    .arg(format!("ulimit -n {n} && exec \"$0\" \"$@\""))
                    .arg(&self.config.bin);
                sh
            }
            None => Command::new(&self.config.bin),
        };
        if !self.config.bare {
            cmd.arg("--listen")
                .arg("127.0.0.1:0")
                .arg("--data-dir")
                .arg(self.data.path());
        }
        cmd.args(&self.config.args);
        for (key, _) in std::env::vars_os() {
            let name = key.to_string_lossy();
            if name.starts_with("KEYWATCH_") && name != "KEYWATCH_LOG" {
                cmd.env_remove(&key);
            }
        }
        let stdin = match self.config.stdin {
            Some(_) => Stdio::piped(),
            None => Stdio::null(),
        };
        let mut child = cmd
            .envs(self.config.env.iter().map(|(k, v)| (k, v)))
            .stdin(stdin)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| Error::Spawn {
                bin: self.config.bin.clone(),
                source,
            })?;
        if let (Some(input), Some(mut pipe)) = (self.config.stdin.clone(), child.stdin.take()) {
            // A thread, so a process that does not read cannot block the caller; a failed
            // write (the process exited first) shows in its exit and output.
            std::thread::spawn(move || {
                use std::io::Write;
                let _ = pipe.write_all(&input);
            });
        }
        let mark = self.output.mark();
        let (tx, rx) = mpsc::channel();
        let mut readers = Vec::new();
        if let Some(stdout) = child.stdout.take() {
            readers.push(drain(
                stdout,
                Stream::Stdout,
                self.output.clone(),
                move |l| {
                    if let Some(line) = parse_line(l) {
                        // The receiver is gone once the start is over; keep reading.
                        let _ = tx.send(line);
                    }
                },
            ));
        }
        if let Some(stderr) = child.stderr.take() {
            readers.push(drain(stderr, Stream::Stderr, self.output.clone(), |_| {}));
        }
        Ok((
            rx,
            Running {
                child,
                readers,
                mark,
            },
        ))
    }

    fn launch(&mut self) -> Result<(), Error> {
        let (lines, running) = self.spawn()?;
        self.running = Some(running);
        self.metrics_addr = None;
        let deadline = std::time::Instant::now() + GUARD;
        let mut bound = None;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match lines.recv_timeout(left) {
                Ok(Line::Listening(addr)) => {
                    self.addr = Some(addr);
                    return Ok(());
                }
                Ok(Line::Bound(addr)) => bound = Some(addr),
                Ok(Line::Metrics(addr)) => self.metrics_addr = Some(addr),
                Err(e) => {
                    // Disconnected: stdout closed, the process is exiting or gone.
                    self.kill9();
                    let state = match (e, bound) {
                        (mpsc::RecvTimeoutError::Disconnected, _) => "exited".to_owned(),
                        (mpsc::RecvTimeoutError::Timeout, Some(addr)) => {
                            format!("bound {addr} but never said it was listening")
                        }
                        (mpsc::RecvTimeoutError::Timeout, None) => "printed no address".into(),
                    };
                    return Err(Error::NotReady {
                        what: format!("{} ({state})", self.config.bin.display()),
                        output: self.output.tail(),
                    });
                }
            }
        }
    }

    /// `http://<addr>` (or `https://` when built with [`ServerBuilder::https`]) of the current
    /// or last launch.
    pub fn endpoint(&self) -> String {
        let scheme = if self.config.https { "https" } else { "http" };
        match self.addr {
            Some(addr) => format!("{scheme}://{addr}"),
            None => String::new(),
        }
    }

    /// The gRPC address of the current or last launch.
    pub fn addr(&self) -> SocketAddr {
        self.addr
            .expect("a started ServerProcess has printed its address")
    }

    /// The metrics endpoint's address, when started with `--metrics-listen` (read from its
    /// `watch-server metrics on http://<addr>/metrics` line).
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        self.data.path()
    }

    /// Everything it printed (the kept tail) and the counted markers.
    pub fn output(&self) -> &Output {
        &self.output
    }

    /// The process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.running.as_ref().map(|r| r.child.id())
    }

    /// Resident set size in KiB, while running ([`rss_kib`](crate::rss_kib)).
    pub fn rss_kib(&self) -> Option<u64> {
        crate::rss_kib(self.pid()?)
    }

    /// Arguments added for the next [`restart`](Self::restart).
    pub fn add_args<I, S>(&mut self, args: I)
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.config.args.extend(args.into_iter().map(Into::into));
    }

    /// SIGKILL and reap: no shutdown path runs, so only what was durable survives. Nothing
    /// happens when it is not running.
    pub fn kill9(&mut self) {
        if let Some(mut running) = self.running.take() {
            let _ = running.child.kill();
            let _ = running.child.wait();
            // The pipes closed with the process: the readers finish, and the output is whole.
            for r in running.readers {
                let _ = r.join();
            }
        }
    }

    /// [`kill9`](Self::kill9) (if running), then start again on the same data directory with
    /// the same arguments; watch-server binds a new port, so take a new client. Blocking.
    pub fn restart(&mut self) -> Result<(), Error> {
        self.kill9();
        self.launch()
    }

    /// Sends `signal` to the running process (with `kill(1)`, so this crate needs no libc
    /// binding).
    pub fn signal(&self, signal: Signal) -> Result<(), Error> {
        let pid = self.pid().ok_or(Error::NotRunning)?;
        let status = Command::new("kill")
            .arg(signal.flag())
            .arg(pid.to_string())
            .status()
            .map_err(|source| Error::Spawn {
                bin: "kill".into(),
                source,
            })?;
        if status.success() {
            Ok(())
        } else {
            Err(Error::Io {
                what: format!("kill {} {pid}", signal.flag()),
                source: std::io::Error::other(status.to_string()),
            })
        }
    }

    /// Waits for the running process to exit by itself (after a [`signal`](Self::signal), or
    /// on its own) and returns how it ended. Past the guard it is killed and the result is
    /// [`Error::StillRunning`]. Blocking.
    pub fn wait_exit(&mut self) -> Result<Exit, Error> {
        let mut running = self.running.take().ok_or(Error::NotRunning)?;
        // The readers end at end of file, when the process has exited: waiting for them
        // waits for the exit without polling, and afterwards the output is complete.
        let (tx, rx) = mpsc::channel();
        let readers = std::mem::take(&mut running.readers);
        std::thread::spawn(move || {
            for r in readers {
                let _ = r.join();
            }
            let _ = tx.send(());
        });
        if rx.recv_timeout(GUARD).is_err() {
            let _ = running.child.kill();
            let _ = running.child.wait();
            return Err(Error::StillRunning {
                what: self.config.bin.display().to_string(),
                output: self.output.tail(),
            });
        }
        let status = running.child.wait().map_err(|source| Error::Io {
            what: "wait for the server".into(),
            source,
        })?;
        Ok(Exit {
            status,
            stdout: self.output.since(running.mark, Stream::Stdout),
            stderr: self.output.since(running.mark, Stream::Stderr),
        })
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            eprintln!(
                "---- {} on {} (last lines) ----\n{}",
                self.config.bin.display(),
                self.data.path().display(),
                self.output.tail()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_lines_parse() {
        assert!(matches!(
            parse_line("watch-server listening on 127.0.0.1:5"),
            Some(Line::Listening(a)) if a.port() == 5
        ));
        assert!(matches!(
            parse_line("watch-server bound 127.0.0.1:6; opening the data directory"),
            Some(Line::Bound(a)) if a.port() == 6
        ));
        assert!(matches!(
            parse_line("watch-server metrics on http://127.0.0.1:7/metrics"),
            Some(Line::Metrics(a)) if a.port() == 7
        ));
        assert!(parse_line("something else").is_none());
    }

    #[test]
    fn a_binary_that_exits_at_once_is_not_ready() {
        // `false` exits without printing: the start must fail fast, not wait for the guard.
        let bin = crate::find_on_path("false").expect("`false` is on PATH");
        let err = ServerProcess::builder(bin)
            .start()
            .expect_err("`false` never listens");
        assert!(
            matches!(&err, Error::NotReady { what, .. } if what.contains("exited")),
            "{err}"
        );
    }
}

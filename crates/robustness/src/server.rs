//! A watch-server child process: started on port 0 (the address is read from its stdout line,
//! never guessed or slept for), killed with SIGKILL and restarted on the same data dir, always
//! killed when dropped.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use crate::Error;

/// How long a server may take to print its address before the run gives up (a guard against a
/// hung start, not a readiness wait: readiness is the printed line).
const START_GUARD: Duration = Duration::from_secs(60);

/// The last lines a server wrote, for error messages.
#[derive(Clone, Default)]
struct Tail(Arc<Mutex<VecDeque<String>>>);

impl Tail {
    fn push(&self, line: String) {
        let mut lines = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if lines.len() == 50 {
            lines.pop_front();
        }
        lines.push_back(line);
    }
    fn dump(&self) -> String {
        let lines = self.0.lock().unwrap_or_else(|e| e.into_inner());
        lines.iter().cloned().collect::<Vec<_>>().join("\n")
    }
}

/// A running watch-server.
pub struct ServerProcess {
    bin: PathBuf,
    dir: PathBuf,
    args: Vec<String>,
    child: Option<Child>,
    endpoint: String,
    tail: Tail,
}

impl std::fmt::Debug for ServerProcess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerProcess")
            .field("endpoint", &self.endpoint)
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl ServerProcess {
    /// Starts `bin --listen 127.0.0.1:0 --data-dir <dir> <args>` and waits for its address.
    /// Blocking: call from a blocking context.
    pub fn start(bin: &Path, dir: &Path, args: &[String]) -> Result<ServerProcess, Error> {
        let mut server = ServerProcess {
            bin: bin.to_path_buf(),
            dir: dir.to_path_buf(),
            args: args.to_vec(),
            child: None,
            endpoint: String::new(),
            tail: Tail::default(),
        };
        server.launch()?;
        Ok(server)
    }

    fn launch(&mut self) -> Result<(), Error> {
        let mut child = Command::new(&self.bin)
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--data-dir")
            .arg(&self.dir)
            .args(&self.args)
            .env("KEYWATCH_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| Error::Spawn {
                bin: self.bin.display().to_string(),
                source,
            })?;
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        self.child = Some(child);
        let (tx, rx) = mpsc::channel();
        if let Some(out) = stdout {
            drain(out, self.tail.clone(), Some(tx));
        }
        if let Some(err) = stderr {
            drain(err, self.tail.clone(), None);
        }
        match rx.recv_timeout(START_GUARD) {
            Ok(addr) => {
                self.endpoint = format!("http://{addr}");
                Ok(())
            }
            Err(_) => Err(Error::NotReady {
                log: self.tail.dump(),
            }),
        }
    }

    /// `http://host:port` of the running process.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL and reap: no shutdown path runs, so only what was durable survives.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// [`ServerProcess::kill`], then start again on the same data dir (a new port). Blocking.
    pub fn restart(&mut self) -> Result<(), Error> {
        self.kill();
        self.launch()
    }

    /// Resident set size in KiB (`VmRSS` of `/proc/<pid>/status`), if readable.
    pub fn rss_kib(&self) -> Option<u64> {
        rss_kib(self.pid()?)
    }

    /// The last lines the server wrote.
    pub fn log_tail(&self) -> String {
        self.tail.dump()
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `VmRSS` of a process in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

fn drain<R: Read + Send + 'static>(reader: R, tail: Tail, ready: Option<mpsc::Sender<String>>) {
    std::thread::spawn(move || {
        for line in BufReader::new(reader).lines() {
            let Ok(line) = line else { break };
            if let (Some(tx), Some(addr)) =
                (&ready, line.strip_prefix("watch-server listening on "))
            {
                let _ = tx.send(addr.trim().to_owned());
            }
            tail.push(line);
        }
    });
}

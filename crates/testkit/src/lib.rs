//! keywatch's test kit: the processes a test, a benchmark or the robustness runner starts, in
//! one place.
//!
//! - [`ServerProcess`]: the `watch-server` binary on `--listen 127.0.0.1:0` with a temporary
//!   (or given) data directory. Ready, with its address, when it prints
//!   `watch-server listening on <addr>` (its `watch-server bound <addr>` and metrics lines are
//!   read too); kill -9, restart on the same directory, signals and exit status.
//! - [`Etcd`] (one member) and [`EtcdCluster`] (3 members by default) on free loopback ports
//!   with a temporary directory, ready when etcd logs that it serves clients.
//! - [`Target`] and [`AnyServer`]: either one behind one type, for what runs the same case
//!   against both.
//! - [`GrpcProxy`]: etcd's `grpc-proxy` in front of a cluster (plain or TLS towards its
//!   clients); [`Pki`]: a throwaway CA with server and client certificates for TLS runs.
//! - [`free_ports`], [`find_on_path`], [`tools_present`] / [`etcd_present`] (print a `SKIPPED`
//!   line, or panic when [`REQUIRE_ETCD`]`=1` as in CI), [`watch_server_bin`], [`rss_kib`].
//!
//! Every process is killed and every temporary directory removed on drop, also when a test
//! panics (the process's last lines are then printed to stderr). Nothing sleeps to wait for
//! readiness: a start reads the process's own output, bounded by a hang guard ([`GUARD`])
//! that a healthy start never comes near. Starts block the calling thread; async tests call
//! them inside `tokio::task::block_in_place`.
//!
//! The kit speaks no protocol (no gRPC client, no tonic): what a test does with a server is
//! the test's business. Errors are [`Error`]; tests usually `expect` them, tools report them.
//!
//! ```
//! // Distinct free loopback ports, e.g. for a server that cannot bind port 0 itself.
//! let ports = testkit::free_ports(3)?;
//! assert_eq!(ports.len(), 3);
//! assert!(ports[0] != ports[1] && ports[1] != ports[2] && ports[0] != ports[2]);
//!
//! // A binary that cannot be spawned is a typed error, not a hang.
//! let err = testkit::ServerProcess::builder("/nonexistent/watch-server")
//!     .start()
//!     .unwrap_err();
//! assert!(matches!(err, testkit::Error::Spawn { .. }));
//! # Ok::<(), testkit::Error>(())
//! ```
//!
//! # Design
//!
//! The one place that starts processes for tests, benchmarks and the robustness runner.
//! `ServerProcess` runs `watch-server` on `--listen 127.0.0.1:0` with a temporary (or given) data
//! dir; it is ready, with its address, when it prints `watch-server listening on <addr>` (the
//! `bound` and `metrics on` lines are read too), and offers kill -9, restart on the same dir,
//! signals, exit status and output (a bounded tail, plus exact counts of registered marker
//! lines). `Etcd` and `EtcdCluster` (3 members by default) run etcd on free loopback ports in a
//! temporary dir, ready when etcd logs that it serves clients; a port lost to another process
//! between picking and binding is retried. `Target`/`AnyServer` put keywatch or etcd behind one
//! type; `tools_present`/`etcd_present` print the `SKIPPED` line, or panic under
//! `KEYWATCH_REQUIRE_ETCD=1`; `free_ports`, `watch_server_bin` (the binary next to the running
//! one: the default `--server-bin` of loadgen, the benches and the robustness runner),
//! `rss_kib`. Everything is killed and removed on drop; nothing sleeps for readiness. No protocol
//! client and no tonic: dependencies are `tempfile`, `thiserror` and `rcgen` (for `Pki`).

mod env;
mod etcd;
mod output;
mod pki;
mod proxy;
mod server;
mod target;

use std::path::PathBuf;
use std::time::Duration;

pub use env::{
    REQUIRE_ETCD, etcd_present, etcd_required, find_on_path, find_watch_server, free_ports,
    rss_kib, tools_present, watch_server_bin,
};
pub use etcd::{Etcd, EtcdBuilder, EtcdCluster, EtcdTls, SingleEtcdBuilder};
pub use output::Output;
pub use pki::Pki;
pub use proxy::GrpcProxy;
pub use server::{Exit, ServerBuilder, ServerProcess, Signal};
pub use target::{AnyServer, Target};

/// Default hang guard of a start or an exit: generous, so it never decides an outcome on a
/// loaded machine; a healthy start takes well under a second.
pub const GUARD: Duration = Duration::from_secs(60);

/// Why the kit could not do what it was asked.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A binary could not be spawned (missing, not executable).
    #[error("spawning {}: {source}", bin.display())]
    Spawn {
        /// The binary.
        bin: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A process exited, or passed the guard, before saying it was ready.
    #[error("{what} did not become ready; its last output:\n{output}")]
    NotReady {
        /// Which process, and what it did instead.
        what: String,
        /// Its last lines.
        output: String,
    },
    /// A process expected to exit was still running after the guard (it was killed).
    #[error("{what} was still running after the guard; its last output:\n{output}")]
    StillRunning {
        /// Which process.
        what: String,
        /// Its last lines.
        output: String,
    },
    /// A tool the kit ran (etcdctl) exited unsuccessfully.
    #[error("{what} failed: {output}")]
    Failed {
        /// The command.
        what: String,
        /// Its stderr.
        output: String,
    },
    /// The process is not running (killed, or exited and already waited for).
    #[error("the process is not running")]
    NotRunning,
    /// A binary the caller needs is not where it was looked for.
    #[error("{what} not found (looked at {tried:?})")]
    NotFound {
        /// What, and how to get it.
        what: String,
        /// Where it was looked for.
        tried: Vec<PathBuf>,
    },
    /// etcd's `/metrics` did not hold the asked sample.
    #[error("etcd on port {port} exports no sample {name}")]
    NoMetric {
        /// The sample's name.
        name: String,
        /// The member's client port.
        port: u16,
    },
    /// Local I/O: a temporary directory, a port, a pipe, a signal.
    #[error("{what}: {source}")]
    Io {
        /// What the kit was doing.
        what: String,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
}

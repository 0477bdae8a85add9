//! The two servers a run measures, started fresh through `testkit` (loopback, temporary data
//! dir, readiness read from their output, killed and removed on drop).

use std::path::PathBuf;

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

    /// Resident set size of the server process, in bytes.
    pub fn rss_bytes(&self) -> Option<u64> {
        testkit::rss_kib(self.pid()?).map(|kib| kib * 1024)
    }
}

//! [`Target`] and [`AnyServer`]: keywatch or etcd behind one type, for what runs the same
//! thing against both (the compatibility tests, the load generator).

use std::fmt;

use crate::{Error, Etcd, ServerProcess};

/// Which server.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Target {
    /// keywatch's `watch-server`.
    Keywatch,
    /// etcd.
    Etcd,
}

impl Target {
    /// `keywatch` or `etcd`.
    pub fn as_str(self) -> &'static str {
        match self {
            Target::Keywatch => "keywatch",
            Target::Etcd => "etcd",
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A started keywatch or etcd (each started with its own builder).
#[derive(Debug)]
pub enum AnyServer {
    /// keywatch.
    Keywatch(ServerProcess),
    /// etcd.
    Etcd(Etcd),
}

impl AnyServer {
    /// Which server it is.
    pub fn target(&self) -> Target {
        match self {
            AnyServer::Keywatch(_) => Target::Keywatch,
            AnyServer::Etcd(_) => Target::Etcd,
        }
    }

    /// The client URL.
    pub fn endpoint(&self) -> String {
        match self {
            AnyServer::Keywatch(p) => p.endpoint(),
            AnyServer::Etcd(e) => e.endpoint(),
        }
    }

    /// The process id, while running.
    pub fn pid(&self) -> Option<u32> {
        match self {
            AnyServer::Keywatch(p) => p.pid(),
            AnyServer::Etcd(e) => e.pid(),
        }
    }

    /// SIGKILL, then start again on the same data directory (keywatch binds a new port, etcd
    /// keeps its ports). Blocking.
    pub fn restart(&mut self) -> Result<(), Error> {
        match self {
            AnyServer::Keywatch(p) => p.restart(),
            AnyServer::Etcd(e) => e.restart(),
        }
    }
}

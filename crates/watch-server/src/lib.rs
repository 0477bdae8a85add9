//! watch-server: keywatch's etcd v3 compatible server: the gRPC, HTTP, configuration and
//! operations layer over the embeddable store, [`kv_store::Store`] (which an application can
//! embed without this crate, its gRPC stack or its configuration).
//!
//! - [`server`]: the gRPC services (KV, Watch, Lease, Maintenance.Status, Cluster.MemberList,
//!   every Auth RPC, and etcd's Lock and Election services), a thin translation over the
//!   store, plus gRPC health
//!   ([`server::HealthHandle`]) and reflection, Prometheus metrics ([`server::metrics`]) and
//!   the startup/shutdown lifecycle ([`server::Server`]).
//! - [`auth`]: users and roles (durable in the data directory, seeded from the config file's
//!   `[auth]`), tokens, and the key-range permission check every KV request and watch create
//!   passes ([`auth::Gate`]).
//! - [`tls`]: TLS and mutual TLS for the listener (rustls through tonic).
//! - [`config`]: the binary's flags, environment variables and TOML file.
//! - [`mirror`]: mirror mode (`--upstream`): the store follows an etcd cluster through one
//!   upstream watch and serves watchers and reads locally (docs/cluster.md).
//!
//! Serving a store opened in-process (the binary does the same from its configuration):
//!
//! ```
//! use kv_store::{Durability, Store, StoreConfig};
//! use watch_server::config::ServerConfig;
//! use watch_server::server::Server;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! let rt = tokio::runtime::Runtime::new()?;
//! rt.block_on(async {
//!     let store = Store::open(dir.path(), StoreConfig::default().durability(Durability::NoSync)).await?;
//!     let mut config = ServerConfig::default();
//!     config.listen = "127.0.0.1:0".to_owned(); // any free port
//!     let server = Server::with_store(store, config).await?;
//!     assert_ne!(server.local_addr().port(), 0);
//!     // Serves until the shutdown future resolves (here at once), then closes the store.
//!     server.run(async {}).await?;
//!     Ok::<_, Box<dyn std::error::Error>>(())
//! })?;
//! # Ok(())
//! # }
//! ```

pub mod auth;
pub mod config;
mod config_error;
pub mod mirror;
pub mod server;
pub mod tls;

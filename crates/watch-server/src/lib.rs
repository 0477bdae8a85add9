//! watch-server: keywatch's etcd v3 compatible KV + watch server, and the embeddable store the
//! gRPC services wrap.
//!
//! - [`store`]: the **in-process engine API**. [`Store::open`] opens a data directory (a
//!   durable event log plus a state snapshot), rebuilds the key-value state and serves etcd's
//!   KV model (put, range, delete, txn, compact; one revision per write, `create_revision`,
//!   `mod_revision`, `version`, reads at past revisions) and watches through watch-core's
//!   engine, with the event log as the watch history; and etcd's leases (grant, revoke,
//!   keep-alive, time-to-live; a revoked or expired lease's keys are deleted in one revision).
//!   No protobuf types in its API.
//! - [`server`]: the gRPC services (KV, Watch, Lease, Maintenance.Status, Cluster.MemberList,
//!   Auth's Authenticate and AuthStatus), a thin translation over the store, plus gRPC health
//!   ([`server::HealthHandle`]) and reflection, Prometheus metrics ([`server::metrics`]) and
//!   the startup/shutdown lifecycle ([`server::Server`]).
//! - [`auth`]: users and roles from the config file, tokens, and the key-range permission
//!   check every KV request and watch create passes ([`auth::Gate`]).
//! - [`tls`]: TLS and mutual TLS for the listener (rustls through tonic).
//! - [`config`]: the binary's flags, environment variables and TOML file.
//! - [`mirror`]: mirror mode (`--upstream`): the store follows an etcd cluster through one
//!   upstream watch and serves watchers and reads locally (docs/cluster.md).
//!
//! Embedding the store (no network hop):
//!
//! ```
//! use watch_core::{KeySelector, WatchMessage, WatchOptions};
//! use watch_server::store::{PutOptions, RangeRequest};
//! use watch_server::{Durability, Store, StoreConfig};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! let rt = tokio::runtime::Runtime::new()?;
//! rt.block_on(async {
//!     // Fsync is the default; tests may skip it.
//!     let store = Store::open(dir.path(), StoreConfig::default().durability(Durability::NoSync)).await?;
//!     assert_eq!(store.current_revision(), 1); // a fresh store is at revision 1, as etcd
//!
//!     let mut watch = store.watch(KeySelector::prefix("/svc/"), WatchOptions::default().prev_kv(true))?;
//!     store.put("/svc/a", "up", PutOptions::default()).await?; // revision 2
//!     let put = store.put("/svc/a", "down", PutOptions::default()).await?; // revision 3
//!     assert_eq!(put.revision, 3);
//!
//!     // Writes are acknowledged only once durable and published: the watch has them.
//!     let mut seen = Vec::new();
//!     while seen.len() < 2 {
//!         if let Some(WatchMessage::Events(batch)) = watch.recv().await {
//!             for e in batch.events() {
//!                 seen.push((batch.revision(), e.kv.value.clone(), e.prev_kv.map(|p| p.value.clone())));
//!             }
//!         }
//!     }
//!     assert_eq!(seen[1], (3, "down".into(), Some("up".into())));
//!
//!     // Reads at a past revision come from the event log.
//!     let then = store.range(RangeRequest::key("/svc/a").revision(2)).await?;
//!     assert_eq!(then.kvs[0].value, "up");
//!     store.close().await?;
//!     Ok::<_, watch_server::StoreError>(())
//! })?;
//! # Ok(())
//! # }
//! ```

pub mod auth;
pub mod config;
mod config_error;
pub mod error;
pub mod mirror;
pub mod server;
pub mod store;
pub mod tls;

pub use error::StoreError;
pub use store::{Durability, Store, StoreConfig};

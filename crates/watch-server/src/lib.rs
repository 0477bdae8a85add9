//! watch-server: keywatch's etcd v3 compatible KV + watch server, and the embeddable store the
//! gRPC services wrap.

pub mod config;
pub mod error;
pub mod server;
pub mod store;

pub use error::StoreError;
pub use store::{Durability, Store, StoreConfig};

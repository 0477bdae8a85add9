//! kv-store's integration tests in one binary, a module per area.
//!
//! - `store`: etcd's revision model, txns, range options, reads at a past revision,
//!   compaction, restart and fail-stop.
//! - `lease_store`: leases, their record file and crash recovery between the two files.

mod lease_store;
mod store;

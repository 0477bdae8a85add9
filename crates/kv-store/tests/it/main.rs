//! kv-store's integration tests in one binary, a module per area.
//!
//! - `checkpoint`: the persisted state (`state.redb`): rows written per compaction, the
//!   legacy `state.snapshot` conversion, torn and failed checkpoint commits, damaged rows.
//! - `crash`: kill -9 of a child process writing and compacting (`kv-store-crash-child`).
//! - `hooked_log`: the one wrapper over the redb log store that injects failures and holds
//!   compaction steps (used by `store` and `quota`).
//! - `history`: reads at past revisions (and txns reading them) against a replay model,
//!   across compactions, deletes, re-created keys and reopening (regressions in
//!   `history.proptest-regressions` beside it).
//! - `store`: etcd's revision model, txns, range options, reads at a past revision,
//!   compaction, restart and fail-stop.
//! - `list_watch`: list and watch in one call against a replay model, with writers, deletes,
//!   re-creates and compactions between the initial chunks, and the recovery after a cancel.
//! - `lease_store`: leases, their record file and crash recovery between the two files.
//! - `quota`: the space quota on bytes in use: rewrites with compactions between stay
//!   admitted, new data past it is refused, compaction frees overwritten history, and the
//!   counters survive reopening and equal a recount.

mod checkpoint;
mod crash;
mod history;
mod hooked_log;
mod lease_store;
mod list_watch;
mod quota;
mod store;

//! event-log's integration tests in one binary, a module per area (one link instead of five).
//!
//! - `log`: append, query, compaction, recovery, backpressure and the History impl.
//! - `fault`: a failed commit poisons the log; nothing after it is acknowledged.
//! - `model`: property test against an in-memory model (regressions in
//!   `model.proptest-regressions` beside it).
//! - `torn_tail`: a damaged store file recovers consistently or fails typed.
//! - `crash`: kill -9 of `event-log-crash-child`, which stays a binary of its own: it must be
//!   a separate process to be killed mid-commit.
//! - `common`: change-set builders and a scripted store; `common/crash_payload.rs` is also
//!   compiled into the crash child (by `#[path]`), so both sides agree on every change set.

mod common;

mod crash;
mod fault;
mod log;
mod model;
mod torn_tail;

//! kv-store's integration tests in one binary, a module per area.
//!
//! - `history`: reads at past revisions (and txns reading them) against a replay model,
//!   across compactions, deletes, re-created keys and reopening (regressions in
//!   `history.proptest-regressions` beside it).

mod history;

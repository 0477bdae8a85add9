//! keywatch-robustness's integration tests in one binary (one link instead of one per file).
//!
//! - `pressure`: behaviours against a real server process (`robustness-server`, this
//!   package's copy of the watch-server binary, since cargo builds no other package's binary
//!   for a test): stalled watchers, a resume after kill -9, a short randomized run.
//! - `validator`: the offline validator catches each property it claims to check.

mod pressure;
mod validator;

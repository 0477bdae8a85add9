//! watch-core's integration tests in one binary, a module per area (one link instead of
//! four): `engine` (behaviour through the public API), `model` (property test against a
//! reference model; regressions in `model.proptest-regressions` beside it), `outbox` (many
//! watchers delivering into one bounded queue), `stats` (`WatchEngine::stats`).

mod engine;
mod model;
mod outbox;
mod stats;

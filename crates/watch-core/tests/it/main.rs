//! watch-core's integration tests in one binary, a module per area (one link instead of
//! three): `engine` (behaviour through the public API), `model` (property test against a
//! reference model; regressions in `model.proptest-regressions` beside it), `stats`
//! (`WatchEngine::stats`).

mod engine;
mod model;
mod stats;

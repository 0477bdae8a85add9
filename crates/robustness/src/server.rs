//! The server under test: a `testkit::ServerProcess` (port 0, the address read from its stdout
//! line, never guessed or slept for; SIGKILL and restart on the same data dir; killed and its
//! temporary data dir removed on drop) with this harness's defaults.

use std::path::Path;

pub use testkit::ServerProcess;

use crate::Error;

/// Starts `bin` on a fresh temporary data dir (named `<prefix>…`) with `args`, logging
/// warnings and errors only (a run's info lines would bury the last lines an error reports).
/// Blocking: call it from a blocking context.
pub fn start(bin: &Path, prefix: &str, args: &[String]) -> Result<ServerProcess, Error> {
    Ok(ServerProcess::builder(bin)
        .temp_prefix(prefix)
        .args(args)
        .env("KEYWATCH_LOG", "warn")
        .start()?)
}

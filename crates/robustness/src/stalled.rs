//! Pressure scenario: many stalled watchers while many writes happen.

use std::fmt;
use std::path::Path;

use crate::Error;

/// Settings of the stalled scenario.
#[derive(Debug, Clone, clap::Args)]
pub struct StalledArgs {
    /// Watchers that stop reading.
    #[arg(long, default_value_t = 1000)]
    pub stalled: usize,
}

/// Outcome of the stalled scenario.
#[derive(Debug, Clone, Default)]
pub struct StalledReport {
    /// Violations.
    pub violations: Vec<String>,
}

impl fmt::Display for StalledReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.violations)
    }
}

/// Runs the scenario.
pub async fn run(_bin: &Path, _args: &StalledArgs) -> Result<StalledReport, Error> {
    Err(Error::Task("the stalled scenario is not implemented yet".into()))
}

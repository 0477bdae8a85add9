//! [`ConfigError`], the one error type of loading a configuration. A leaf module of its own
//! so that [`crate::config`] (which composes the settings) and the modules whose settings it
//! loads ([`crate::auth`], [`crate::tls`]) all use it without importing each other in a circle.

use std::path::PathBuf;

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("reading config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The config file is not valid TOML for [`crate::config::FileConfig`].
    #[error("parsing config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        message: String,
    },
    /// A value is out of its allowed range or malformed.
    #[error("invalid {field}: {message}")]
    Invalid {
        /// The setting.
        field: &'static str,
        /// What is wrong.
        message: String,
    },
}

//! The `[auth]` section of the config file and its validation into [`AuthSettings`].
//!
//! ```toml
//! [auth.users.alice]
//! password_hash = "$2b$10$..."          # from `watch-server hash-password`
//! roles = ["app"]
//!
//! [auth.roles.app]
//! permissions = [
//!   { type = "readwrite", prefix = "/app/" },
//!   { type = "read", key = "/shared/config" },
//!   { type = "write", key = "a", range_end = "c" },     # [a, c)
//!   { type = "read", key = "m", range_end = "\u0000" },  # every key from m on
//! ]
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;

use crate::config::ConfigError;

use super::range::Interval;

/// etcd's role that grants every permission and the admin operations.
pub const ROOT_ROLE: &str = "root";

/// etcd's default `--auth-token-ttl`: 300 s.
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(300);

/// `[auth]`: users and roles. Its presence turns authentication on.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthFileConfig {
    /// Users by name.
    #[serde(default)]
    pub users: BTreeMap<String, UserFileConfig>,
    /// Roles by name (`root` is built in and cannot be defined).
    #[serde(default)]
    pub roles: BTreeMap<String, RoleFileConfig>,
}

/// `[auth.users.<name>]`.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserFileConfig {
    /// bcrypt hash of the password (`watch-server hash-password` prints one).
    pub password_hash: String,
    /// Names of the user's roles.
    #[serde(default)]
    pub roles: Vec<String>,
}

impl fmt::Debug for UserFileConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UserFileConfig")
            .field("password_hash", &"<bcrypt hash>")
            .field("roles", &self.roles)
            .finish()
    }
}

/// `[auth.roles.<name>]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoleFileConfig {
    /// The role's key permissions.
    #[serde(default)]
    pub permissions: Vec<PermissionFileConfig>,
}

/// The access a permission grants (etcd's `READ`, `WRITE`, `READWRITE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PermissionType {
    /// Range and watch.
    Read,
    /// Put and delete.
    Write,
    /// Both.
    Readwrite,
}

/// One permission: `type` and either `key` (with an optional etcd `range_end`) or `prefix`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PermissionFileConfig {
    /// The access granted.
    #[serde(rename = "type")]
    pub kind: PermissionType,
    /// A key, or the start of a range with `range_end`.
    pub key: Option<String>,
    /// etcd's range end: the end (exclusive) of a range starting at `key`, or `"\u0000"` for
    /// every key from `key` on.
    pub range_end: Option<String>,
    /// Every key starting with this (the empty prefix: every key).
    pub prefix: Option<String>,
}

/// A user as validated: the password hash and the key ranges it may read and write.
#[derive(Clone)]
pub(crate) struct UserSettings {
    pub(crate) password_hash: String,
    pub(crate) root: bool,
    pub(crate) read: Vec<Interval>,
    pub(crate) write: Vec<Interval>,
}

/// Validated authentication settings: turns authentication on when present in
/// [`ServerConfig`](crate::config::ServerConfig).
#[derive(Clone)]
pub struct AuthSettings {
    pub(crate) users: BTreeMap<String, UserSettings>,
    /// How long a token stays valid after its last use.
    pub token_ttl: Duration,
}

impl fmt::Debug for AuthSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthSettings")
            .field("users", &self.users.keys().collect::<Vec<_>>())
            .field("token_ttl", &self.token_ttl)
            .finish()
    }
}

fn invalid(message: String) -> ConfigError {
    ConfigError::Invalid {
        field: "auth",
        message,
    }
}

impl AuthSettings {
    /// Validates the file's `[auth]` section: every hash is a bcrypt hash, every role a user
    /// names exists, every permission names exactly one key, range or prefix.
    pub fn from_file(file: &AuthFileConfig, token_ttl: Duration) -> Result<Self, ConfigError> {
        if file.users.is_empty() {
            return Err(invalid(
                "[auth] is present (authentication is on) but defines no user".to_owned(),
            ));
        }
        if file.roles.contains_key(ROOT_ROLE) {
            return Err(invalid(format!(
                "role {ROOT_ROLE:?} is built in (every permission and the admin operations) and cannot be defined"
            )));
        }
        let mut roles = BTreeMap::new();
        for (name, role) in &file.roles {
            let mut read = Vec::new();
            let mut write = Vec::new();
            for (i, p) in role.permissions.iter().enumerate() {
                let interval = permission_interval(p)
                    .map_err(|m| invalid(format!("roles.{name}.permissions[{i}]: {m}")))?;
                if matches!(p.kind, PermissionType::Read | PermissionType::Readwrite) {
                    read.push(interval.clone());
                }
                if matches!(p.kind, PermissionType::Write | PermissionType::Readwrite) {
                    write.push(interval);
                }
            }
            roles.insert(name.as_str(), (read, write));
        }
        let mut users = BTreeMap::new();
        for (name, user) in &file.users {
            if name.is_empty() {
                return Err(invalid("a user name is empty".to_owned()));
            }
            if let Err(e) = bcrypt::HashParts::from_str(&user.password_hash) {
                return Err(invalid(format!(
                    "users.{name}.password_hash is not a bcrypt hash ({e}); make one with `watch-server hash-password`"
                )));
            }
            let mut settings = UserSettings {
                password_hash: user.password_hash.clone(),
                root: false,
                read: Vec::new(),
                write: Vec::new(),
            };
            for role in &user.roles {
                if role == ROOT_ROLE {
                    settings.root = true;
                    continue;
                }
                let Some((read, write)) = roles.get(role.as_str()) else {
                    return Err(invalid(format!(
                        "users.{name}.roles names the undefined role {role:?}"
                    )));
                };
                settings.read.extend(read.iter().cloned());
                settings.write.extend(write.iter().cloned());
            }
            users.insert(name.clone(), settings);
        }
        if token_ttl.is_zero() {
            return Err(ConfigError::Invalid {
                field: "auth_token_ttl",
                message: "must be at least 1s".to_owned(),
            });
        }
        Ok(AuthSettings { users, token_ttl })
    }
}

fn permission_interval(p: &PermissionFileConfig) -> Result<Interval, String> {
    match (&p.key, &p.range_end, &p.prefix) {
        (Some(key), range_end, None) => {
            let end = range_end.as_deref().unwrap_or("");
            if key.is_empty() && end != "\0" {
                return Err("key is empty (use prefix = \"\" for every key)".to_owned());
            }
            if !end.is_empty() && end != "\0" && end.as_bytes() <= key.as_bytes() {
                return Err(format!(
                    "range_end {end:?} is not after key {key:?}, so the range holds no key"
                ));
            }
            Ok(Interval::from_etcd(key.as_bytes(), end.as_bytes()))
        }
        (None, None, Some(prefix)) => Ok(Interval::prefix(prefix.as_bytes())),
        (None, Some(_), Some(_)) | (Some(_), _, Some(_)) => {
            Err("give either key (with an optional range_end) or prefix, not both".to_owned())
        }
        (None, _, None) => Err("needs key (with an optional range_end) or prefix".to_owned()),
    }
}

/// A bcrypt hash of `password` at `cost` (etcd's default cost is 10; 4 to 31). Passwords
/// longer than 72 bytes are refused rather than silently truncated.
pub fn hash_password(password: &str, cost: u32) -> Result<String, bcrypt::BcryptError> {
    bcrypt::non_truncating_hash(password, cost)
}

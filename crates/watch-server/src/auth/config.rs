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

use crate::config_error::ConfigError;

use super::range::Interval;

/// etcd's role that grants every permission and the admin operations.
pub const ROOT_ROLE: &str = "root";

/// etcd's default `--auth-token-ttl`: 300 s.
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(300);

/// The longest accepted `--auth-token-ttl`: one year (a longer TTL is a configuration
/// mistake, and bounds `now + ttl` far from `Instant`'s range).
pub const MAX_TOKEN_TTL: Duration = Duration::from_secs(365 * 24 * 3600);

/// The highest accepted bcrypt cost (etcd's default is 10; each step doubles the time to
/// check a password: cost 16 takes seconds per login on one core, higher costs make logins a
/// denial of service on the server itself).
pub const MAX_BCRYPT_COST: u32 = 16;

/// The longest user name accepted in the config and by `Authenticate`, in bytes (longer names
/// are refused before any password check).
pub const MAX_USER_NAME_BYTES: usize = 256;

/// The longest password bcrypt hashes in full, in bytes (as Go's bcrypt, which etcd uses).
pub const MAX_PASSWORD_BYTES: usize = 72;

/// Default bound on logins waiting for a password check (beyond the ones running): later
/// ones are refused with "etcdserver: too many requests".
pub const DEFAULT_LOGIN_QUEUE: usize = 64;

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
    /// How long a token stays valid after its last use (at most [`MAX_TOKEN_TTL`]).
    pub token_ttl: Duration,
    /// Password checks (CPU-bound bcrypt, on blocking threads) running at once; default: the
    /// CPUs (`--auth-max-concurrent-hashes`).
    pub max_concurrent_hashes: usize,
    /// Logins waiting for a password check beyond those running; more are refused with
    /// "etcdserver: too many requests" (`--auth-max-queued-logins`, default
    /// [`DEFAULT_LOGIN_QUEUE`]).
    pub max_queued_logins: usize,
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
            if name.len() > MAX_USER_NAME_BYTES {
                return Err(invalid(format!(
                    "user name {:?}... is longer than {MAX_USER_NAME_BYTES} bytes",
                    name.chars().take(32).collect::<String>()
                )));
            }
            match bcrypt::HashParts::from_str(&user.password_hash) {
                Err(e) => {
                    return Err(invalid(format!(
                        "users.{name}.password_hash is not a bcrypt hash ({e}); make one with `watch-server hash-password`"
                    )));
                }
                Ok(parts) if parts.get_cost() > MAX_BCRYPT_COST => {
                    return Err(invalid(format!(
                        "users.{name}.password_hash has bcrypt cost {}, above the maximum {MAX_BCRYPT_COST} (each login would cost the server seconds of CPU)",
                        parts.get_cost()
                    )));
                }
                Ok(_) => {}
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
        if token_ttl > MAX_TOKEN_TTL {
            return Err(ConfigError::Invalid {
                field: "auth_token_ttl",
                message: format!(
                    "{token_ttl:?} is above the maximum of one year ({}s)",
                    MAX_TOKEN_TTL.as_secs()
                ),
            });
        }
        Ok(AuthSettings {
            users,
            token_ttl,
            max_concurrent_hashes: std::thread::available_parallelism().map_or(2, |n| n.get()),
            max_queued_logins: DEFAULT_LOGIN_QUEUE,
        })
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

/// A bcrypt hash of `password` at `cost` (etcd's default cost is 10; 4 to
/// [`MAX_BCRYPT_COST`]). Passwords of up to 72 bytes are hashed in full (as Go's bcrypt
/// does); longer ones are refused rather than silently truncated.
pub fn hash_password(password: &str, cost: u32) -> Result<String, bcrypt::BcryptError> {
    if password.len() > MAX_PASSWORD_BYTES {
        return Err(bcrypt::BcryptError::Truncation(password.len()));
    }
    if cost > MAX_BCRYPT_COST {
        return Err(bcrypt::BcryptError::CostNotAllowed(cost));
    }
    // Not `non_truncating_hash`: it counts the terminating NUL bcrypt appends, so it refuses
    // exactly 72 bytes, which Go (etcd) accepts. Up to 72 bytes nothing is truncated.
    bcrypt::hash(password, cost)
}

/// True if `password` matches the bcrypt `hash`; false for a password over 72 bytes (which
/// no hash made by [`hash_password`] or Go's bcrypt can match) or a malformed hash.
pub(crate) fn verify_password(password: &[u8], hash: &str) -> bool {
    password.len() <= MAX_PASSWORD_BYTES && bcrypt::verify(password, hash).unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_of_72_bytes_hash_in_full() {
        let pw72 = "p".repeat(72);
        let hash = hash_password(&pw72, 4).unwrap();
        assert!(verify_password(pw72.as_bytes(), &hash));
        // Byte 72 counts: a 71-byte prefix does not match.
        assert!(!verify_password(&pw72.as_bytes()[..71], &hash));
        // 73 bytes: refused, and never matches (no silent truncation to the 72-byte hash).
        let pw73 = "p".repeat(73);
        assert!(hash_password(&pw73, 4).is_err());
        assert!(!verify_password(pw73.as_bytes(), &hash));
        assert!(hash_password("pw", MAX_BCRYPT_COST + 1).is_err());
    }

    #[test]
    fn limits_refused_with_clear_errors() {
        let hash = hash_password("pw", 4).unwrap();
        let file = |text: String| toml::from_str::<AuthFileConfig>(&text).unwrap();
        let ok = file(format!("[users.a]\npassword_hash = \"{hash}\""));
        let err = AuthSettings::from_file(&ok, Duration::from_secs(u64::MAX))
            .unwrap_err()
            .to_string();
        assert!(err.contains("maximum of one year"), "{err}");
        assert!(AuthSettings::from_file(&ok, MAX_TOKEN_TTL).is_ok());
        // A cost-17 hash (the format only: its salt and digest are never checked here).
        let costly = hash.replacen("$04$", "$17$", 1);
        let err = AuthSettings::from_file(
            &file(format!("[users.a]\npassword_hash = \"{costly}\"")),
            DEFAULT_TOKEN_TTL,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("cost 17"), "{err}");
        let long = "n".repeat(MAX_USER_NAME_BYTES + 1);
        let err = AuthSettings::from_file(
            &file(format!("[users.{long}]\npassword_hash = \"{hash}\"")),
            DEFAULT_TOKEN_TTL,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("longer than 256 bytes"), "{err}");
    }
}

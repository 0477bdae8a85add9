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

use super::data::{AuthData, PermKind, Permission, ROOT_ROLE, UserRecord};

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

/// `[auth]`: users and roles that seed a new data directory, with authentication on.
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

/// Authentication settings: the login limits, and the users and roles of the config file's
/// `[auth]` section, which seed the auth records file on first start (see
/// [`super::Auth::open`] and docs/security.md).
#[derive(Clone)]
pub struct AuthSettings {
    /// `[auth]` as records (authentication on), when the config file has the section.
    pub(crate) seed: Option<AuthData>,
    /// How long a token stays valid after its last use (at most [`MAX_TOKEN_TTL`]).
    pub token_ttl: Duration,
    /// Password checks and hashes (CPU-bound bcrypt, on blocking threads) running at once;
    /// default: the CPUs (`--auth-max-concurrent-hashes`).
    pub max_concurrent_hashes: usize,
    /// Logins waiting for a password check beyond those running; more are refused with
    /// "etcdserver: too many requests" (`--auth-max-queued-logins`, default
    /// [`DEFAULT_LOGIN_QUEUE`]).
    pub max_queued_logins: usize,
    /// bcrypt cost of passwords set by UserAdd and UserChangePassword (etcd's
    /// `--bcrypt-cost`, default [`DEFAULT_BCRYPT_COST`]; 4 to [`MAX_BCRYPT_COST`]).
    pub bcrypt_cost: u32,
}

/// etcd's default `--bcrypt-cost`.
pub const DEFAULT_BCRYPT_COST: u32 = 10;

impl Default for AuthSettings {
    /// No `[auth]` section: authentication off until enabled at run time, etcd's defaults.
    fn default() -> Self {
        AuthSettings {
            seed: None,
            token_ttl: DEFAULT_TOKEN_TTL,
            max_concurrent_hashes: std::thread::available_parallelism().map_or(2, |n| n.get()),
            max_queued_logins: DEFAULT_LOGIN_QUEUE,
            bcrypt_cost: DEFAULT_BCRYPT_COST,
        }
    }
}

impl fmt::Debug for AuthSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthSettings")
            .field(
                "seed_users",
                &self
                    .seed
                    .as_ref()
                    .map(|d| d.users.keys().collect::<Vec<_>>()),
            )
            .field("token_ttl", &self.token_ttl)
            .finish_non_exhaustive()
    }
}

fn invalid(message: String) -> ConfigError {
    ConfigError::Invalid {
        field: "auth",
        message,
    }
}

impl AuthSettings {
    /// True when the config file has an `[auth]` section (it seeds the records file).
    pub fn has_seed(&self) -> bool {
        self.seed.is_some()
    }

    /// Checks and sets the token TTL (1 s to [`MAX_TOKEN_TTL`]).
    pub fn with_token_ttl(mut self, token_ttl: Duration) -> Result<Self, ConfigError> {
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
        self.token_ttl = token_ttl;
        Ok(self)
    }

    /// Validates the file's `[auth]` section into seed records: every hash is a bcrypt hash,
    /// every role a user names exists, every permission names exactly one key, range or
    /// prefix. A user given the `root` role gets the `root` role record too, and the seed has
    /// authentication on (the section's presence turns it on).
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
        let mut data = AuthData {
            enabled: true,
            ..AuthData::default()
        };
        for (name, role) in &file.roles {
            let mut perms = Vec::new();
            for (i, p) in role.permissions.iter().enumerate() {
                perms.push(
                    permission_record(p)
                        .map_err(|m| invalid(format!("roles.{name}.permissions[{i}]: {m}")))?,
                );
            }
            data.roles.insert(name.clone(), Vec::new());
            for p in perms {
                data.role_grant_permission(name, p)
                    .map_err(|e| invalid(format!("roles.{name}: {}", e.message())))?;
            }
        }
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
            for role in &user.roles {
                if role != ROOT_ROLE && !data.roles.contains_key(role) {
                    return Err(invalid(format!(
                        "users.{name}.roles names the undefined role {role:?}"
                    )));
                }
            }
            data.users.insert(
                name.clone(),
                UserRecord {
                    password_hash: Some(user.password_hash.clone()),
                    roles: user.roles.iter().cloned().collect(),
                },
            );
        }
        if data.users.values().any(|u| u.roles.contains(ROOT_ROLE)) {
            data.roles.insert(ROOT_ROLE.to_owned(), Vec::new());
        }
        data.revision = 1;
        let settings = AuthSettings {
            seed: Some(data),
            ..AuthSettings::default()
        };
        settings.with_token_ttl(token_ttl)
    }
}

/// A config permission in etcd's `(key, range_end)` form (a prefix becomes `[p, p+1)`, or
/// every key from `p` on when no key is above all of them, as etcdctl's `--prefix` does).
fn permission_record(p: &PermissionFileConfig) -> Result<Permission, String> {
    let kind = match p.kind {
        PermissionType::Read => PermKind::Read,
        PermissionType::Write => PermKind::Write,
        PermissionType::Readwrite => PermKind::ReadWrite,
    };
    let (key, range_end) = match (&p.key, &p.range_end, &p.prefix) {
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
            (key.as_bytes().to_vec(), end.as_bytes().to_vec())
        }
        (None, None, Some(prefix)) => (
            prefix.as_bytes().to_vec(),
            watch_core::prefix_end(prefix.as_bytes()).unwrap_or_else(|| vec![0]),
        ),
        (None, Some(_), Some(_)) | (Some(_), _, Some(_)) => {
            return Err(
                "give either key (with an optional range_end) or prefix, not both".to_owned(),
            );
        }
        (None, _, None) => {
            return Err("needs key (with an optional range_end) or prefix".to_owned());
        }
    };
    Ok(Permission {
        kind,
        key,
        range_end,
    })
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

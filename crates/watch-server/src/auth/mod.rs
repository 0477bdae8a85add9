//! Authentication (etcd's simple tokens) and key-range authorization (etcd's permission
//! model), for users and roles read from the config file's `[auth]` section.
//!
//! - [`Auth`]: the users, their bcrypt password hashes and the token map. `Authenticate`
//!   exchanges a name and password for a token; clients send it in the `token` gRPC metadata
//!   (what etcdctl `--user` and etcd client libraries do).
//! - [`Gate`]: what every service holds. Off (no `[auth]`), every check is one branch on an
//!   `Option` and nothing else. On, [`Gate::caller`] resolves the request's token to a
//!   [`Caller`], whose [`Caller::check`] tests one access to one etcd `(key, range_end)`.
//!
//! **How a service checks a request** (every KV, Lease and Watch method does this; a new
//! service that touches keys must too). The KV and Lease services do it in one place, the
//! server's admission layer, which knows which keys each wire request reads and writes; this
//! module knows only etcd's `(key, range_end)` model, no wire type.
//!
//! ```
//! use tonic::{Request, Status};
//! use watch_server::auth::{Gate, Perm};
//!
//! /// A request that reads etcd's `(key, range_end)` and writes `key`.
//! fn check<T>(gate: &Gate, request: &Request<T>, key: &[u8], range_end: &[u8]) -> Result<(), Status> {
//!     // Before `into_inner`: the token is in the request's metadata.
//!     gate.check(request, Perm::Read, key, range_end)?;
//!     // Several checks on one request resolve the caller (a token lookup) once:
//!     if let Some(caller) = gate.caller(request)? {
//!         caller.check(Perm::Write, key, b"")?;
//!         caller.check_admin()?;
//!     }
//!     Ok(())
//! }
//! // Off (no `[auth]`): everything passes after one branch.
//! assert!(check(&Gate::off(), &Request::new(()), b"/app/x", b"").is_ok());
//! ```
//!
//! Errors are etcd's: no token → "etcdserver: user name is empty" (InvalidArgument), an
//! unknown or expired token → "etcdserver: invalid auth token" (Unauthenticated), a missing
//! permission → "etcdserver: permission denied" (PermissionDenied).

mod config;
mod range;
mod token;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::Semaphore;
use tonic::metadata::MetadataMap;
use tonic::{Request, Status};
use watch_proto::status::EtcdError;

pub use config::{
    AuthFileConfig, AuthSettings, DEFAULT_LOGIN_QUEUE, DEFAULT_TOKEN_TTL, MAX_BCRYPT_COST,
    MAX_PASSWORD_BYTES, MAX_TOKEN_TTL, MAX_USER_NAME_BYTES, PermissionFileConfig, PermissionType,
    ROOT_ROLE, RoleFileConfig, UserFileConfig, hash_password,
};
use range::{Interval, RangeSet};
use token::Tokens;

/// The gRPC metadata key etcd clients put their token in.
pub const TOKEN_METADATA: &str = "token";

/// A kind of access to keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Perm {
    /// Range, watch, txn compares, `prev_kv` of a write.
    Read,
    /// Put and delete.
    Write,
}

/// An authenticated user: what it may read and write.
#[derive(Debug)]
pub(crate) struct User {
    name: String,
    /// The `root` role: every key, and the admin operations.
    root: bool,
    read: RangeSet,
    write: RangeSet,
}

impl User {
    #[cfg(test)]
    pub(crate) fn for_tests(name: &str) -> User {
        User {
            name: name.to_owned(),
            root: false,
            read: RangeSet::default(),
            write: RangeSet::default(),
        }
    }
}

/// The user a request comes from, resolved from its token.
#[derive(Debug, Clone)]
pub struct Caller(Arc<User>);

impl Caller {
    /// The user's name.
    pub fn name(&self) -> &str {
        &self.0.name
    }

    /// Allows `perm` on etcd's `(key, range_end)` (empty `range_end`: the key alone; `"\0"`:
    /// every key from `key` on) only if the user's roles grant it on every key of the range.
    pub fn check(&self, perm: Perm, key: &[u8], range_end: &[u8]) -> Result<(), EtcdError> {
        if self.0.root {
            return Ok(());
        }
        let granted = match perm {
            Perm::Read => &self.0.read,
            Perm::Write => &self.0.write,
        };
        if granted.covers(&Interval::from_etcd(key, range_end)) {
            Ok(())
        } else {
            Err(EtcdError::PermissionDenied)
        }
    }

    /// Allows admin operations (compaction) to users with the `root` role only.
    pub fn check_admin(&self) -> Result<(), EtcdError> {
        if self.0.root {
            Ok(())
        } else {
            Err(EtcdError::PermissionDenied)
        }
    }

    /// True for a user with the `root` role (every key, admin operations).
    pub fn is_root(&self) -> bool {
        self.0.root
    }

    /// etcd's `checkLeasePuts` / `checkLeaseTimeToLive`: `perm` on every key attached to a
    /// lease (revoking a lease deletes its keys; its time-to-live with `keys` names them).
    pub fn check_keys<'a>(
        &self,
        perm: Perm,
        keys: impl IntoIterator<Item = &'a [u8]>,
    ) -> Result<(), EtcdError> {
        if self.0.root {
            return Ok(());
        }
        keys.into_iter().try_for_each(|k| self.check(perm, k, b""))
    }
}

/// A configured user: its bcrypt hash and permissions.
struct Account {
    password_hash: String,
    user: Arc<User>,
}

/// The users and live tokens of a server with authentication on.
pub struct Auth {
    users: HashMap<String, Account>,
    tokens: Tokens,
    /// A hash checked when the user is unknown, so a wrong name costs as long as a wrong
    /// password and timing does not reveal which users exist.
    decoy_hash: String,
    /// Bounds concurrent bcrypt checks (CPU-bound, run on blocking threads). A permit moves
    /// into the blocking task, so a canceled login keeps it until its hash is done.
    hashing: Arc<Semaphore>,
    /// Bounds logins admitted to wait for or run a check (`hashing` + queue permits); held
    /// like a `hashing` permit.
    admitted: Arc<Semaphore>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("users", &self.users.len())
            .finish_non_exhaustive()
    }
}

impl Auth {
    /// The users of `settings`, with no token issued yet.
    pub fn new(settings: &AuthSettings) -> Auth {
        let mut users = HashMap::new();
        let mut decoy_hash = String::new();
        let mut costs = std::collections::BTreeSet::new();
        for (name, u) in &settings.users {
            let user = Arc::new(User {
                name: name.clone(),
                root: u.root,
                read: RangeSet::new(u.read.clone()),
                write: RangeSet::new(u.write.clone()),
            });
            // Any configured hash has a realistic cost; for an unknown name its result is
            // ignored.
            if decoy_hash.is_empty() {
                decoy_hash = u.password_hash.clone();
            }
            if let Ok(parts) = u.password_hash.parse::<bcrypt::HashParts>() {
                costs.insert(parts.get_cost());
            }
            users.insert(
                name.clone(),
                Account {
                    password_hash: u.password_hash.clone(),
                    user,
                },
            );
        }
        if costs.len() > 1 {
            // The decoy costs as much as one user's hash: with other costs, the time of a
            // failed login tells apart unknown names from users of another cost.
            tracing::warn!(
                ?costs,
                "auth: password hashes have different bcrypt costs; the time of a failed login \
                 can then reveal which user names exist (re-hash all at one cost)"
            );
        }
        let running = settings.max_concurrent_hashes.max(1);
        Auth {
            users,
            tokens: Tokens::new(settings.token_ttl),
            decoy_hash,
            hashing: Arc::new(Semaphore::new(running)),
            admitted: Arc::new(Semaphore::new(
                running.saturating_add(settings.max_queued_logins),
            )),
        }
    }

    /// etcd's Authenticate: a new token when `password` is `name`'s password, else
    /// [`EtcdError::AuthFailed`] (same error for an unknown user). A name over
    /// [`MAX_USER_NAME_BYTES`] or a password over [`MAX_PASSWORD_BYTES`] (neither can match
    /// a configured user) fails at once, before any hashing. More logins than
    /// `max_concurrent_hashes + max_queued_logins` at once: [`EtcdError::TooManyRequests`].
    pub async fn authenticate(&self, name: &str, password: &str) -> Result<String, Status> {
        if name.len() > MAX_USER_NAME_BYTES || password.len() > MAX_PASSWORD_BYTES {
            return Err(EtcdError::AuthFailed.status());
        }
        let known = self.users.get(name);
        let hash = known.map_or(&self.decoy_hash, |k| &k.password_hash).clone();
        let password = password.to_owned();
        let admitted = self
            .admitted
            .clone()
            .try_acquire_owned()
            .map_err(|e| match e {
                tokio::sync::TryAcquireError::NoPermits => EtcdError::TooManyRequests.status(),
                tokio::sync::TryAcquireError::Closed => EtcdError::Stopped.status(),
            })?;
        let running = self
            .hashing
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| EtcdError::Stopped.status())?;
        let matched = tokio::task::spawn_blocking(move || {
            let _permits = (admitted, running);
            config::verify_password(password.as_bytes(), &hash)
        })
        .await
        // The blocking task panicked or the runtime is shutting down.
        .map_err(|_| EtcdError::Stopped.status())?;
        match known {
            Some(k) if matched => self
                .tokens
                .issue(k.user.clone(), Instant::now())
                .map_err(|_| EtcdError::TokenSource.status()),
            _ => Err(EtcdError::AuthFailed.status()),
        }
    }

    /// The caller a token belongs to. No token: "user name is empty"; unknown or expired:
    /// "invalid auth token".
    pub fn caller(&self, token: Option<&str>) -> Result<Caller, EtcdError> {
        let token = token.ok_or(EtcdError::UserEmpty)?;
        self.tokens
            .user(token, Instant::now())
            .map(Caller)
            .ok_or(EtcdError::InvalidAuthToken)
    }
}

/// The token an etcd client sent, if any.
pub fn token_of(metadata: &MetadataMap) -> Option<&str> {
    metadata.get(TOKEN_METADATA).and_then(|v| v.to_str().ok())
}

/// Authentication as seen by a service: off, or the server's [`Auth`].
#[derive(Debug, Clone, Default)]
pub struct Gate(Option<Arc<Auth>>);

impl Gate {
    /// Authentication off: every request is allowed.
    pub fn off() -> Gate {
        Gate(None)
    }

    /// Authentication on with `auth`'s users.
    pub fn on(auth: Arc<Auth>) -> Gate {
        Gate(Some(auth))
    }

    /// The server's [`Auth`], when on.
    pub fn auth(&self) -> Option<&Arc<Auth>> {
        self.0.as_ref()
    }

    /// `None` when authentication is off, else the request's caller or etcd's error.
    pub fn caller<T>(&self, request: &Request<T>) -> Result<Option<Caller>, Status> {
        match &self.0 {
            // Off: the metadata is not even looked at.
            None => Ok(None),
            Some(auth) => auth
                .caller(token_of(request.metadata()))
                .map(Some)
                .map_err(EtcdError::status),
        }
    }

    /// One check: `perm` on `(key, range_end)` for the request's caller.
    pub fn check<T>(
        &self,
        request: &Request<T>,
        perm: Perm,
        key: &[u8],
        range_end: &[u8],
    ) -> Result<(), Status> {
        match self.caller(request)? {
            None => Ok(()),
            Some(caller) => caller
                .check(perm, key, range_end)
                .map_err(EtcdError::status),
        }
    }
}

/// Users and roles for unit tests: `root`, `alice` (roles `app`: readwrite `/app/`, read
/// `/shared`; `other`: write from `w` on) and `nobody`, all with password `pw`.
#[cfg(test)]
pub(crate) fn test_settings() -> AuthSettings {
    let hash = hash_password("pw", 4).unwrap();
    let file: AuthFileConfig = toml::from_str(&format!(
        r#"
        [users.root]
        password_hash = "{hash}"
        roles = ["root"]
        [users.alice]
        password_hash = "{hash}"
        roles = ["app", "other"]
        [users.nobody]
        password_hash = "{hash}"
        [roles.app]
        permissions = [
          {{ type = "readwrite", prefix = "/app/" }},
          {{ type = "read", key = "/shared" }},
        ]
        [roles.other]
        permissions = [{{ type = "write", key = "w", range_end = "\u0000" }}]
        "#
    ))
    .unwrap();
    AuthSettings::from_file(&file, DEFAULT_TOKEN_TTL).unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn authenticate_and_check() {
        let auth = Auth::new(&test_settings());
        assert_eq!(
            auth.authenticate("alice", "nope")
                .await
                .unwrap_err()
                .message(),
            EtcdError::AuthFailed.message()
        );
        assert_eq!(
            auth.authenticate("mallory", "pw")
                .await
                .unwrap_err()
                .message(),
            EtcdError::AuthFailed.message()
        );
        let token = auth.authenticate("alice", "pw").await.unwrap();
        let alice = auth.caller(Some(&token)).unwrap();
        assert_eq!(alice.name(), "alice");
        assert_eq!(auth.caller(None).unwrap_err(), EtcdError::UserEmpty);
        assert_eq!(
            auth.caller(Some("forged")).unwrap_err(),
            EtcdError::InvalidAuthToken
        );

        assert!(alice.check(Perm::Write, b"/app/x", b"").is_ok());
        assert!(alice.check(Perm::Read, b"/shared", b"").is_ok());
        assert_eq!(
            alice.check(Perm::Write, b"/shared", b""),
            Err(EtcdError::PermissionDenied)
        );
        // Roles add up: "other" grants write from "w" on.
        assert!(alice.check(Perm::Write, b"zz", b"\0").is_ok());
        assert!(alice.check(Perm::Read, b"zz", b"").is_err());
        assert!(alice.check_admin().is_err());

        let root = auth
            .caller(Some(&auth.authenticate("root", "pw").await.unwrap()))
            .unwrap();
        assert!(root.check(Perm::Write, b"\0", b"\0").is_ok());
        assert!(root.check_admin().is_ok());
        let nobody = auth
            .caller(Some(&auth.authenticate("nobody", "pw").await.unwrap()))
            .unwrap();
        assert!(nobody.check(Perm::Read, b"/app/x", b"").is_err());
    }

    /// A canceled login keeps its hashing permits until its bcrypt check is done, and logins
    /// beyond the running + queued bound are refused at once.
    #[test]
    fn canceled_login_keeps_its_permit_and_waiters_are_bounded() {
        use futures_util::FutureExt;
        // One blocking thread, held by `blocker`: the login's hash task stays queued, holding
        // whatever permits moved into it, until the blocker is released.
        let rt = tokio::runtime::Builder::new_current_thread()
            .max_blocking_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let mut s = test_settings();
        s.max_concurrent_hashes = 1;
        s.max_queued_logins = 0;
        let auth = Auth::new(&s);
        rt.block_on(async {
            let (release, held) = std::sync::mpsc::channel::<()>();
            let blocker = tokio::task::spawn_blocking(move || held.recv());
            // Polled once (spawns the hash task), then dropped: the caller went away.
            assert!(auth.authenticate("alice", "pw").now_or_never().is_none());
            let refused = auth.authenticate("alice", "pw").await.unwrap_err();
            assert_eq!(refused.message(), EtcdError::TooManyRequests.message());
            release.send(()).unwrap();
            blocker.await.unwrap().unwrap();
            // Once the canceled hash is done, its permits are back.
            let guard = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
            loop {
                match auth.authenticate("alice", "pw").await {
                    Ok(_) => break,
                    Err(e) if e.message() == EtcdError::TooManyRequests.message() => {
                        assert!(
                            tokio::time::Instant::now() < guard,
                            "permits never returned"
                        );
                        tokio::task::yield_now().await;
                    }
                    Err(e) => panic!("{e}"),
                }
            }
        });
    }

    #[tokio::test]
    async fn overlong_names_and_passwords_fail_like_wrong_ones() {
        let auth = Auth::new(&test_settings());
        let long_name = "a".repeat(MAX_USER_NAME_BYTES + 1);
        let long_pw = "p".repeat(MAX_PASSWORD_BYTES + 1);
        for (name, pw) in [(long_name.as_str(), "pw"), ("alice", long_pw.as_str())] {
            let e = auth.authenticate(name, pw).await.unwrap_err();
            assert_eq!(e.message(), EtcdError::AuthFailed.message());
        }
    }

    #[test]
    fn config_errors() {
        let hash = hash_password("pw", 4).unwrap();
        let bad = |text: String| {
            let file: AuthFileConfig = toml::from_str(&text).unwrap();
            AuthSettings::from_file(&file, DEFAULT_TOKEN_TTL)
                .unwrap_err()
                .to_string()
        };
        assert!(bad("[users.a]\npassword_hash = \"plain\"".into()).contains("not a bcrypt hash"));
        assert!(
            bad(format!(
                "[users.a]\npassword_hash = \"{hash}\"\nroles = [\"x\"]"
            ))
            .contains("undefined role \"x\"")
        );
        assert!(bad("[roles.a]\npermissions = []".into()).contains("no user"));
        assert!(
            bad(format!(
                "[users.a]\npassword_hash = \"{hash}\"\n[roles.r]\npermissions = [{{ type = \"read\", key = \"b\", range_end = \"a\" }}]"
            ))
            .contains("holds no key")
        );
        assert!(
            bad(format!(
                "[users.a]\npassword_hash = \"{hash}\"\n[roles.r]\npermissions = [{{ type = \"read\", key = \"b\", prefix = \"a\" }}]"
            ))
            .contains("not both")
        );
        assert!(
            bad(format!(
                "[users.a]\npassword_hash = \"{hash}\"\n[roles.root]"
            ))
            .contains("built in")
        );
        assert!(
            toml::from_str::<AuthFileConfig>(
                "[roles.r]\npermissions = [{ type = \"all\", prefix = \"\" }]"
            )
            .is_err()
        );
    }
}

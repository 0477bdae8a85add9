//! Authentication (etcd's simple tokens) and key-range authorization (etcd's permission
//! model), for users and roles managed at run time with etcd's Auth RPCs and kept in the data
//! directory (`auth.redb`); the config file's `[auth]` section seeds a new data directory.
//!
//! - [`Auth`]: the users and roles (durable records plus a published view the checks read),
//!   whether authentication is on, and the token map. `Authenticate` exchanges a name and
//!   password for a token; clients send it in the `token` gRPC metadata (what etcdctl `--user`
//!   and etcd client libraries do). A change applies to the next request.
//! - [`Gate`]: what every service holds. Authentication off: one atomic load (and a request
//!   that still carries a token is refused, as etcd does). On, [`Gate::caller`] resolves the
//!   request's token to a [`Caller`] with its current permissions, whose [`Caller::check`]
//!   tests one access to one etcd `(key, range_end)`.
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
//!
//! # Parts
//!
//! - `auth`: users and roles. `data.rs`: the records (`AuthData`: users with bcrypt hashes and
//!   role names, roles with etcd `(key, range_end)` permissions, the enabled flag, the auth
//!   revision) and etcd's rules for changing them, pure and unit-tested. `persist.rs`:
//!   `auth.redb` in the data directory, one redb record (JSON) rewritten whole per change and
//!   fsynced before the change is published or acknowledged (users and roles are few; one
//!   record keeps a change atomic); a failed commit is fail-stop (`Auth::failed` stops the
//!   server). `Auth` (`mod.rs`): the records behind an async mutex (changes apply one at a time,
//!   in commit order) and a published `View` (`RwLock<Arc<_>>`, users with compiled grants) that
//!   request checks read; tokens map to a user and its *incarnation* (new on add and password
//!   change), so a deleted or re-passworded user's tokens stop resolving while permission
//!   changes apply to live tokens' next request. `config.rs`: the file's `[auth]` validated into
//!   seed records (`AuthSettings`), used only when `auth.redb` holds none; key intervals and
//!   their merged union per user (`range.rs`: one binary search per check), etcd simple tokens
//!   with an idle TTL (`token.rs`), and `Gate`, the one hook every service calls (auth off: one
//!   atomic load). Guide: `docs/security.md`.

mod config;
mod data;
mod persist;
mod range;
mod token;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use parking_lot::RwLock;

use tokio::sync::Semaphore;
use tonic::metadata::MetadataMap;
use tonic::{Request, Status};
use watch_proto::status::EtcdError;

pub use config::{
    AuthFileConfig, AuthSettings, DEFAULT_BCRYPT_COST, DEFAULT_LOGIN_QUEUE, DEFAULT_TOKEN_TTL,
    MAX_BCRYPT_COST, MAX_PASSWORD_BYTES, MAX_TOKEN_TTL, MAX_USER_NAME_BYTES, PermissionFileConfig,
    PermissionType, RoleFileConfig, UserFileConfig, hash_password,
};
pub(crate) use data::AuthData;
pub use data::{PermKind, Permission, ROOT_ROLE, ROOT_USER};
pub use persist::{AUTH_FILE, AuthStoreError};
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
    /// Tokens resolve to the user only while this matches (see [`Records::incarnations`]).
    incarnation: u64,
    /// `None`: a `no_password` user.
    password_hash: Option<String>,
    /// The `root` role: every key, and the admin operations.
    root: bool,
    /// Role names, sorted.
    roles: Vec<String>,
    read: RangeSet,
    write: RangeSet,
}

impl User {
    #[cfg(test)]
    pub(crate) fn for_tests(name: &str) -> User {
        User {
            name: name.to_owned(),
            incarnation: 0,
            password_hash: None,
            root: false,
            roles: Vec::new(),
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

    /// True if the user holds `role`.
    pub fn has_role(&self, role: &str) -> bool {
        self.0.roles.iter().any(|r| r == role)
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

/// The published view of the records: what request checks read, swapped whole on a change.
#[derive(Debug, Default)]
struct View {
    enabled: bool,
    revision: u64,
    /// Every user, with its roles' permissions compiled.
    users: HashMap<String, Arc<User>>,
}

/// The users, roles and live tokens of a server, and whether authentication is on. Changes
/// (the Auth management RPCs) are durable in the records file before they are acknowledged,
/// and apply to the next request: a token names a user, whose permissions are looked up at
/// each request.
pub struct Auth {
    /// Read by every request check (a read lock and an `Arc` clone); replaced by changes.
    view: RwLock<Arc<View>>,
    /// Mirrors `view.enabled`, so a server with authentication off pays one atomic load.
    enabled: AtomicBool,
    /// The authoritative records and the file they are committed to. Held across a commit,
    /// so changes apply one at a time, in commit order.
    records: tokio::sync::Mutex<Records>,
    tokens: Tokens,
    /// A bcrypt hash at the default cost, checked when the user is unknown (or has no
    /// password), so a wrong name costs about as long as a wrong password.
    decoy_hash: &'static str,
    /// Bounds concurrent bcrypt work (CPU-bound, run on blocking threads). A permit moves
    /// into the blocking task, so a canceled login keeps it until its hash is done.
    hashing: Arc<Semaphore>,
    /// Bounds logins admitted to wait for or run a check (`hashing` + queue permits); held
    /// like a `hashing` permit.
    admitted: Arc<Semaphore>,
    bcrypt_cost: u32,
    /// Set (once) when a commit failed: the server stops (fail-stop).
    failure: tokio::sync::watch::Sender<Option<String>>,
    /// Source of [`User::incarnation`].
    incarnations: AtomicU64,
}

struct Records {
    data: AuthData,
    /// `None`: in memory only ([`Auth::new`], for embedders and tests).
    db: Option<persist::AuthDb>,
    /// Incarnation of each user: new on add and on a password change, so the tokens of a
    /// deleted or re-passworded user stop resolving.
    incarnations: HashMap<String, u64>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let view = self.view.read();
        f.debug_struct("Auth")
            .field("enabled", &view.enabled)
            .field("users", &view.users.len())
            .finish_non_exhaustive()
    }
}

/// A bcrypt hash (cost [`DEFAULT_BCRYPT_COST`]) of a random password nobody knows.
const DECOY_HASH: &str = "$2b$10$N9qo8uLOickgx2ZMRZoMyeIjZAgcfl7p92ldGxad68LJZdL17lhWy";

impl Auth {
    /// In-memory auth (nothing persisted) with `settings`' seed users and roles, if any; off
    /// without a seed.
    pub fn new(settings: &AuthSettings) -> Auth {
        let data = settings.seed.clone().unwrap_or_default();
        Auth::with_records(settings, data, None)
    }

    /// Opens the records file in `dir` (creating it). On first start (no records yet) it is
    /// seeded from `settings`' `[auth]` section, or left empty with authentication off; once
    /// it holds records, they are the truth and the `[auth]` section is not read again (a
    /// warning says so when the section differs).
    pub async fn open(
        dir: &Path,
        settings: &AuthSettings,
        durable: bool,
    ) -> Result<Auth, AuthStoreError> {
        let dir = dir.to_owned();
        let (db, stored) =
            tokio::task::spawn_blocking(move || persist::AuthDb::open(&dir, durable))
                .await
                .map_err(|e| AuthStoreError::Storage {
                    path: persist::AUTH_FILE.to_owned(),
                    message: format!("open task failed: {e}"),
                })??;
        let data = match stored {
            Some(data) => {
                if let Some(seed) = &settings.seed
                    && (seed.users != data.users || seed.roles != data.roles)
                {
                    tracing::warn!(
                        "auth: the config file's [auth] section differs from the users and roles \
                         in the data directory; it only seeds a new data directory, so the \
                         stored ones apply (manage them with the Auth RPCs, e.g. etcdctl user/role)"
                    );
                }
                data
            }
            None => {
                let data = settings.seed.clone().unwrap_or_default();
                db.commit(&data).await?;
                if settings.seed.is_some() {
                    tracing::info!(
                        users = data.users.len(),
                        roles = data.roles.len(),
                        "auth: records seeded from the config file's [auth] section"
                    );
                }
                data
            }
        };
        Ok(Auth::with_records(settings, data, Some(db)))
    }

    /// Every user and role and the enabled flag, encoded as the records file holds them (a
    /// backup's extra; [`import_records`] installs it).
    pub async fn export(&self) -> Vec<u8> {
        let records = self.records.lock().await;
        // Serializing plain maps and strings cannot fail.
        serde_json::to_vec(&records.data).unwrap_or_default()
    }

    fn with_records(settings: &AuthSettings, data: AuthData, db: Option<persist::AuthDb>) -> Auth {
        let costs: std::collections::BTreeSet<u32> = data
            .users
            .values()
            .filter_map(|u| u.password_hash.as_ref()?.parse::<bcrypt::HashParts>().ok())
            .map(|p| p.get_cost())
            .collect();
        if costs.iter().any(|c| *c != DEFAULT_BCRYPT_COST) {
            // The decoy costs as much as a default-cost hash: with other costs, the time of a
            // failed login tells apart unknown names from users of another cost.
            tracing::warn!(
                ?costs,
                "auth: some password hashes have a bcrypt cost other than {DEFAULT_BCRYPT_COST}; \
                 the time of a failed login can then reveal which user names exist"
            );
        }
        let running = settings.max_concurrent_hashes.max(1);
        let incarnations = AtomicU64::new(1);
        let user_incarnations = data
            .users
            .keys()
            .map(|n| (n.clone(), incarnations.fetch_add(1, Ordering::Relaxed)))
            .collect();
        let view = compile(&data, &user_incarnations);
        Auth {
            enabled: AtomicBool::new(view.enabled),
            view: RwLock::new(Arc::new(view)),
            records: tokio::sync::Mutex::new(Records {
                data,
                db,
                incarnations: user_incarnations,
            }),
            tokens: Tokens::new(settings.token_ttl),
            decoy_hash: DECOY_HASH,
            hashing: Arc::new(Semaphore::new(running)),
            admitted: Arc::new(Semaphore::new(
                running.saturating_add(settings.max_queued_logins),
            )),
            bcrypt_cost: settings.bcrypt_cost.clamp(4, MAX_BCRYPT_COST),
            failure: tokio::sync::watch::channel(None).0,
            incarnations,
        }
    }

    /// Whether authentication is on.
    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Acquire)
    }

    /// etcd's auth revision: incremented by every change.
    pub fn revision(&self) -> u64 {
        self.view.read().revision
    }

    /// Resolves when a commit of the records file failed (fail-stop), with the error.
    pub async fn failed(&self) -> String {
        let mut rx = self.failure.subscribe();
        // The guard (not `Send`) is dropped before any other await.
        let failed = rx.wait_for(Option::is_some).await.map(|v| v.clone());
        match failed {
            Ok(message) => message.unwrap_or_default(),
            // The sender lives in `self`, which outlives this borrow.
            Err(_) => std::future::pending().await,
        }
    }

    /// Runs bcrypt work on a blocking thread under the login bounds (see
    /// [`Auth::authenticate`]).
    async fn hash_work<R: Send + 'static>(
        &self,
        work: impl FnOnce() -> R + Send + 'static,
    ) -> Result<R, EtcdError> {
        let admitted = self
            .admitted
            .clone()
            .try_acquire_owned()
            .map_err(|e| match e {
                tokio::sync::TryAcquireError::NoPermits => EtcdError::TooManyRequests,
                tokio::sync::TryAcquireError::Closed => EtcdError::Stopped,
            })?;
        let running = self
            .hashing
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| EtcdError::Stopped)?;
        tokio::task::spawn_blocking(move || {
            let _permits = (admitted, running);
            work()
        })
        .await
        // The blocking task panicked or the runtime is shutting down.
        .map_err(|_| EtcdError::Stopped)
    }

    /// etcd's Authenticate: a new token when `password` is `name`'s password, else
    /// [`EtcdError::AuthFailed`] (same error for an unknown user). Authentication off:
    /// [`EtcdError::AuthNotEnabled`]. A name over [`MAX_USER_NAME_BYTES`] or a password over
    /// [`MAX_PASSWORD_BYTES`] (neither can match a user) fails at once, before any hashing.
    /// More logins than `max_concurrent_hashes + max_queued_logins` at once:
    /// [`EtcdError::TooManyRequests`].
    pub async fn authenticate(&self, name: &str, password: &str) -> Result<String, EtcdError> {
        if !self.enabled() {
            return Err(EtcdError::AuthNotEnabled);
        }
        if name.len() > MAX_USER_NAME_BYTES || password.len() > MAX_PASSWORD_BYTES {
            return Err(EtcdError::AuthFailed);
        }
        let known = self.view.read().users.get(name).cloned();
        if let Some(user) = &known
            && user.password_hash.is_none()
        {
            return Err(EtcdError::NoPasswordUser);
        }
        let hash = known
            .as_ref()
            .and_then(|u| u.password_hash.clone())
            .unwrap_or_else(|| self.decoy_hash.to_owned());
        let password = password.to_owned();
        let matched = self
            .hash_work(move || config::verify_password(password.as_bytes(), &hash))
            .await?;
        match known {
            Some(user) if matched => self
                .tokens
                .issue(user, Instant::now())
                .map_err(|_| EtcdError::TokenSource),
            _ => Err(EtcdError::AuthFailed),
        }
    }

    /// The caller a token belongs to, with its current permissions. No token: "user name is
    /// empty"; unknown, expired, or of a user since deleted or given a new password: "invalid
    /// auth token".
    pub fn caller(&self, token: Option<&str>) -> Result<Caller, EtcdError> {
        let token = token.ok_or(EtcdError::UserEmpty)?;
        let issued = self
            .tokens
            .user(token, Instant::now())
            .ok_or(EtcdError::InvalidAuthToken)?;
        match self.view.read().users.get(&issued.name) {
            Some(now) if now.incarnation == issued.incarnation => Ok(Caller(now.clone())),
            _ => Err(EtcdError::InvalidAuthToken),
        }
    }

    /// A bcrypt hash of `password` at the configured cost, under the login bounds.
    pub(crate) async fn hash(&self, password: &str) -> Result<String, EtcdError> {
        if password.len() > MAX_PASSWORD_BYTES {
            return Err(EtcdError::PasswordTooLong);
        }
        let (password, cost) = (password.to_owned(), self.bcrypt_cost);
        self.hash_work(move || hash_password(&password, cost))
            .await?
            .map_err(|_| EtcdError::PasswordTooLong)
    }

    /// Applies `change` to the records, commits them (fsynced) and publishes them. Nothing
    /// changes when `change` refuses; a failed commit is fail-stop.
    pub(crate) async fn change(
        &self,
        change: impl FnOnce(&mut AuthData) -> Result<Effect, EtcdError>,
    ) -> Result<(), EtcdError> {
        let mut records = self.records.lock().await;
        if self.failure.borrow().is_some() {
            return Err(EtcdError::AuthStoreFailed);
        }
        let mut next = records.data.clone();
        let effect = change(&mut next)?;
        next.revision = next.revision.wrapping_add(1);
        if let Some(db) = &records.db
            && let Err(e) = db.commit(&next).await
        {
            tracing::error!(error = %e, "auth records commit failed; stopping (fail-stop)");
            self.failure.send_replace(Some(e.to_string()));
            return Err(EtcdError::AuthStoreFailed);
        }
        match &effect {
            Effect::None => {}
            Effect::NewIncarnation(name) => {
                let n = self.incarnations.fetch_add(1, Ordering::Relaxed);
                records.incarnations.insert(name.clone(), n);
            }
        }
        records
            .incarnations
            .retain(|n, _| next.users.contains_key(n));
        for name in next.users.keys() {
            if !records.incarnations.contains_key(name) {
                let n = self.incarnations.fetch_add(1, Ordering::Relaxed);
                records.incarnations.insert(name.clone(), n);
            }
        }
        let view = compile(&next, &records.incarnations);
        let was_enabled = records.data.enabled;
        records.data = next;
        if was_enabled && !view.enabled {
            // etcd drops every token when authentication is turned off.
            self.tokens.clear();
        }
        self.enabled.store(view.enabled, Ordering::Release);
        *self.view.write() = Arc::new(view);
        Ok(())
    }

    /// A read of the records (the management Get and List calls).
    pub(crate) async fn read<R>(&self, f: impl FnOnce(&AuthData) -> R) -> R {
        f(&self.records.lock().await.data)
    }
}

/// What a change does to existing tokens besides what [`compile`] sees.
pub(crate) enum Effect {
    /// Nothing.
    None,
    /// The user's existing tokens stop resolving (a password change).
    NewIncarnation(String),
}

/// The view of `data`: each user with the union of its roles' permissions.
fn compile(data: &AuthData, incarnations: &HashMap<String, u64>) -> View {
    let users = data
        .users
        .iter()
        .map(|(name, u)| {
            let mut read = Vec::new();
            let mut write = Vec::new();
            for role in &u.roles {
                for p in data.roles.get(role).into_iter().flatten() {
                    let interval = Interval::from_etcd(&p.key, &p.range_end);
                    if p.kind.reads() {
                        read.push(interval.clone());
                    }
                    if p.kind.writes() {
                        write.push(interval);
                    }
                }
            }
            let user = User {
                name: name.clone(),
                incarnation: incarnations.get(name).copied().unwrap_or(0),
                password_hash: u.password_hash.clone(),
                root: u.roles.contains(ROOT_ROLE),
                roles: u.roles.iter().cloned().collect(),
                read: RangeSet::new(read),
                write: RangeSet::new(write),
            };
            (name.clone(), Arc::new(user))
        })
        .collect();
    View {
        enabled: data.enabled,
        revision: data.revision,
        users,
    }
}

/// The token an etcd client sent, if any.
pub fn token_of(metadata: &MetadataMap) -> Option<&str> {
    metadata.get(TOKEN_METADATA).and_then(|v| v.to_str().ok())
}

/// Installs `raw` ([`Auth::export`]'s bytes) as the records file of the fresh data directory
/// `dir` (a restore).
pub fn import_records(dir: &Path, raw: &[u8]) -> Result<(), AuthStoreError> {
    persist::write_record(dir, raw)
}

/// Authentication as seen by a service: off, or the server's [`Auth`].
#[derive(Debug, Clone, Default)]
pub struct Gate(Option<Arc<Auth>>);

impl Gate {
    /// No auth at all (an embedder's services without users): every request is allowed.
    pub fn off() -> Gate {
        Gate(None)
    }

    /// Checks against `auth`'s users and roles while its authentication is on.
    pub fn on(auth: Arc<Auth>) -> Gate {
        Gate(Some(auth))
    }

    /// The server's [`Auth`], when authentication is on.
    pub fn auth(&self) -> Option<&Arc<Auth>> {
        self.0.as_ref().filter(|a| a.enabled())
    }

    /// The server's [`Auth`], on or off (the Auth service manages it either way).
    pub fn manager(&self) -> Option<&Arc<Auth>> {
        self.0.as_ref()
    }

    /// `None` when authentication is off, else the request's caller or etcd's error.
    pub fn caller<T>(&self, request: &Request<T>) -> Result<Option<Caller>, Status> {
        self.caller_for(token_of(request.metadata()))
            .map_err(EtcdError::status)
    }

    /// [`Gate::caller`] for a token kept from a stream's metadata. With authentication off, a
    /// request that still carries a token is refused as etcd refuses it (every token was
    /// dropped when authentication was turned off): "invalid auth token".
    pub fn caller_for(&self, token: Option<&str>) -> Result<Option<Caller>, EtcdError> {
        match &self.0 {
            None => Ok(None),
            Some(auth) if !auth.enabled() => match token {
                None => Ok(None),
                Some(_) => Err(EtcdError::InvalidAuthToken),
            },
            Some(auth) => auth.caller(token).map(Some),
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

    #[test]
    fn decoy_hash_costs_as_much_as_a_default_hash() {
        let parts: bcrypt::HashParts = DECOY_HASH.parse().unwrap();
        assert_eq!(parts.get_cost(), DEFAULT_BCRYPT_COST);
    }

    #[tokio::test]
    async fn changes_are_durable_and_seed_only_a_new_directory() {
        let dir = tempfile::tempdir().unwrap();
        let seeded = test_settings();
        let auth = Auth::open(dir.path(), &seeded, true).await.unwrap();
        assert!(auth.enabled());
        let token = auth.authenticate("alice", "pw").await.unwrap();
        auth.change(|d| d.user_revoke_role("alice", "app").map(|()| Effect::None))
            .await
            .unwrap();
        // The same token, the new permissions.
        let alice = auth.caller(Some(&token)).unwrap();
        assert_eq!(
            alice.check(Perm::Read, b"/app/x", b""),
            Err(EtcdError::PermissionDenied)
        );
        auth.change(|d| {
            d.user_change_password("alice", hash_password("new", 4).unwrap())?;
            Ok(Effect::NewIncarnation("alice".into()))
        })
        .await
        .unwrap();
        assert_eq!(
            auth.caller(Some(&token)).unwrap_err(),
            EtcdError::InvalidAuthToken
        );
        drop(auth);
        // Reopened with the seed: the stored records win.
        let auth = Auth::open(dir.path(), &seeded, true).await.unwrap();
        assert!(auth.authenticate("alice", "pw").await.is_err());
        let token = auth.authenticate("alice", "new").await.unwrap();
        let alice = auth.caller(Some(&token)).unwrap();
        assert!(!alice.has_role("app") && alice.has_role("other"));
        auth.change(|d| {
            d.disable();
            Ok(Effect::None)
        })
        .await
        .unwrap();
        drop(auth);
        let auth = Auth::open(dir.path(), &AuthSettings::default(), true)
            .await
            .unwrap();
        assert!(!auth.enabled());
        assert_eq!(
            auth.authenticate("alice", "new").await.unwrap_err(),
            EtcdError::AuthNotEnabled
        );
    }

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
                    Err(e) => panic!("{e:?}"),
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

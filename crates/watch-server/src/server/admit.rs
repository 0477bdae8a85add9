//! Admission: the checks every KV, Lease, Lock and Election request passes before its
//! [`Backend`] (the local store, or forwarding to the upstream etcd in mirror mode) or the
//! recipe ([`super::concurrency`]) sees it. Each check is written once here, whichever
//! backend serves the request.
//!
//! The order is etcd's: **size, then shape** (conversion, empty key, the store's structural
//! validation), **then authorization** (the caller's token, its permissions on the request's
//! keys, and for a lease its permissions on the keys the lease holds: etcd's
//! `checkLeasePuts` / `checkLeaseTimeToLive`). So a malformed request is refused as such
//! before any auth error. With authentication off the structural validation of a write is
//! left to the backend (the store runs it; etcd does when a request is forwarded), so the
//! off path costs one branch.
//!
//! Watch creates are admitted here too, for the fair-share limits ([`WatchBudget`]): after the
//! stream's own limit, a create takes one watcher of its connection's budget
//! (`--max-watchers-per-connection`) and, authentication on, of its user's
//! (`--max-watchers-per-user`), before the engine's server-wide cap (`--max-watchers`); a
//! refusal ([`WatchLimit`]) is sent as etcd refuses a create.
//!
//! The wire-walking permission checks (which keys a Range, Put, DeleteRange or Txn reads and
//! writes) live here too, so [`crate::auth`] knows only etcd's `(key, range_end)` model and
//! no wire type.
//!
//! # The gate invariant
//!
//! - **Every request that touches keys passes the gate before the store sees it.** A service
//!   holds a `Gate` (set with `with_gate`: `KvService` and `LeaseService` through their
//!   `Admission`, local or mirror alike, and `WatchService`) and, before `into_inner()` (the token is request
//!   metadata), calls `gate.caller(&request)?` → `Option<Caller>`; `None` means auth is off (the
//!   only cost: one branch, the metadata is not read). With a caller it calls the check for the
//!   request: `server/admit.rs`'s `check_range`/`check_put`/`check_delete`/`check_txn` for KV
//!   shapes (auth itself knows only `(key, range_end)`), or
//!   `check(Perm::Read | Perm::Write, key, range_end)` with etcd's `(key, range_end)` for anything
//!   else, and `check_admin()` for root-only operations; each returns an `EtcdError` that `?` turns
//!   into etcd's status. A stream keeps the token (`auth::token_of`) and checks each new item with
//!   `Auth::caller(token)`, as etcd re-reads the stream's token per watch create. Structural
//!   validation (`Store::validate`, empty key, size) runs before the gate, as in etcd.
//!   `LeaseService` passes the same admission: a valid caller for every Lease RPC, and
//!   `Caller::check_keys` over the lease's keys (from the store, or upstream in mirror mode) for LeaseRevoke, TimeToLive{keys}
//!   and a Put naming a lease (etcd's `checkLeasePuts`). A service added later must do the same.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use hashbrown::HashMap;
use prost::Message;
use tonic::{Request, Status};
use watch_proto::etcdserverpb as pb;
use watch_proto::status::EtcdError;

use super::convert::{self, store_status};
use super::forward::Forward;
use crate::auth::{Caller, Gate, Perm};
use kv_store::{RangeRequest, Store, StoreError, TxnOp, TxnRequest};

/// Where an admitted KV or Lease request goes.
#[derive(Debug, Clone)]
pub(crate) enum Backend {
    /// The local store.
    Local(Store),
    /// Mirror mode: reads of mirrored keys served by the mirror's store, everything else
    /// forwarded to the upstream etcd.
    Mirror(Forward),
}

impl Backend {
    /// The store whose limits validate requests (the mirror's own store in mirror mode).
    fn store(&self) -> &Store {
        match self {
            Backend::Local(store) => store,
            Backend::Mirror(forward) => forward.store(),
        }
    }

    /// The keys attached to lease `id`; none for an unknown lease, as in etcd.
    async fn lease_keys(&self, id: i64) -> Result<Vec<Bytes>, Status> {
        match self {
            Backend::Local(store) => match store.lease_time_to_live(id, true).await {
                Ok(t) => Ok(t.keys),
                Err(StoreError::LeaseNotFound { .. }) => Ok(Vec::new()),
                Err(e) => Err(store_status(&e)),
            },
            Backend::Mirror(forward) => forward.lease_keys(id).await,
        }
    }
}

/// The admission checks of one service: its request size limit and its [`Gate`].
#[derive(Debug, Clone)]
pub(crate) struct Admission {
    /// Largest accepted request, in encoded bytes (etcd `--max-request-bytes`).
    max_request_bytes: usize,
    /// Authorization of every request (off: one branch).
    gate: Gate,
}

impl Admission {
    /// Requests up to `max_request_bytes` encoded bytes, authentication off.
    pub(crate) fn new(max_request_bytes: usize) -> Self {
        Self {
            max_request_bytes,
            gate: Gate::off(),
        }
    }

    /// Checks every request against `gate`'s users and roles.
    pub(crate) fn with_gate(mut self, gate: Gate) -> Self {
        self.gate = gate;
        self
    }

    fn check_size(&self, m: &impl Message) -> Result<(), Status> {
        if m.encoded_len() > self.max_request_bytes {
            return Err(EtcdError::RequestTooLarge.status());
        }
        Ok(())
    }

    /// With authentication on, the store's pre-authorization checks of one put or delete
    /// (see [`Store::validate`]), so a malformed write is refused as such before any auth
    /// error. Off, the backend makes them.
    async fn validate_op(
        &self,
        backend: &Backend,
        op: impl FnOnce() -> TxnOp,
    ) -> Result<(), Status> {
        if self.gate.auth().is_none() {
            return Ok(());
        }
        backend
            .store()
            .validate(TxnRequest {
                compare: Vec::new(),
                success: vec![op()],
                failure: Vec::new(),
            })
            .await
            .map(drop)
            .map_err(|e| store_status(&e))
    }

    /// `perm` on every key attached to lease `id`, for a non-root caller (an unknown lease
    /// has none, as in etcd). Not atomic with the request: a key attached between the two is
    /// not checked (etcd checks inside its apply loop).
    async fn check_lease_keys(
        &self,
        backend: &Backend,
        caller: &Caller,
        perm: Perm,
        id: i64,
    ) -> Result<(), Status> {
        if caller.is_root() {
            return Ok(());
        }
        let keys = backend.lease_keys(id).await?;
        caller
            .check_keys(perm, keys.iter().map(|k| &k[..]))
            .map_err(EtcdError::status)
    }

    /// Range: size, conversion, empty key, then read on the range. Returns the wire request
    /// and its store form.
    pub(crate) fn range(
        &self,
        request: Request<pb::RangeRequest>,
    ) -> Result<(pb::RangeRequest, RangeRequest), Status> {
        // The caller is resolved before `into_inner` (the token is metadata), its error
        // reported only after the shape checks.
        let caller = self.gate.caller(&request);
        let r = request.into_inner();
        self.check_size(&r)?;
        let req = convert::range_request(&r)?;
        if r.key.is_empty() {
            return Err(EtcdError::EmptyKey.status());
        }
        if let Some(caller) = caller? {
            check_range(&caller, &r)?;
        }
        Ok((r, req))
    }

    /// Put: size, validation, then write (and read for `prev_kv`) on the key, and write on
    /// the keys of the lease it attaches.
    pub(crate) async fn put(
        &self,
        backend: &Backend,
        request: &Request<pb::PutRequest>,
    ) -> Result<(), Status> {
        let r = request.get_ref();
        self.check_size(r)?;
        self.validate_op(backend, || convert::put_op(r)).await?;
        if let Some(caller) = self.gate.caller(request)? {
            check_put(&caller, r)?;
            // etcd's checkLeasePuts: attaching a lease needs write on the keys it already
            // holds (its holder could not revoke it otherwise).
            if r.lease != 0 {
                self.check_lease_keys(backend, &caller, Perm::Write, r.lease)
                    .await?;
            }
        }
        Ok(())
    }

    /// DeleteRange: size, validation, then write (and read for `prev_kv`) on the range.
    pub(crate) async fn delete_range(
        &self,
        backend: &Backend,
        request: &Request<pb::DeleteRangeRequest>,
    ) -> Result<(), Status> {
        let r = request.get_ref();
        self.check_size(r)?;
        self.validate_op(backend, || convert::delete_op(r)).await?;
        if let Some(caller) = self.gate.caller(request)? {
            check_delete(&caller, r)?;
        }
        Ok(())
    }

    /// Txn: size, then (authentication on) conversion and validation, then every compare and
    /// operation as [`check_txn`] and the keys of every lease a put attaches. Returns the wire
    /// request and, when it was converted here, its store form.
    pub(crate) async fn txn(
        &self,
        backend: &Backend,
        request: Request<pb::TxnRequest>,
    ) -> Result<(pb::TxnRequest, Option<TxnRequest>), Status> {
        let caller = self.gate.caller(&request);
        let r = request.into_inner();
        self.check_size(&r)?;
        let req = if self.gate.auth().is_some() {
            let req = convert::txn_request(&r)?;
            let req = backend
                .store()
                .validate(req)
                .await
                .map_err(|e| store_status(&e))?;
            Some(req)
        } else {
            None
        };
        if let Some(caller) = caller? {
            check_txn(&caller, &r)?;
            for lease in txn_leases(&r) {
                self.check_lease_keys(backend, &caller, Perm::Write, lease)
                    .await?;
            }
        }
        Ok((r, req))
    }

    /// Lock and Election, which etcd runs as in-process clientv3 recipes: size, then the
    /// permissions the recipe's KV calls need, each `(perm, key, range_end)`.
    pub(crate) fn recipe<T: Message>(
        &self,
        request: &Request<T>,
        checks: &[(Perm, &[u8], &[u8])],
    ) -> Result<(), Status> {
        self.check_size(request.get_ref())?;
        if let Some(caller) = self.gate.caller(request)? {
            for (perm, key, end) in checks {
                caller.check(*perm, key, end).map_err(EtcdError::status)?;
            }
        }
        Ok(())
    }

    /// Compact: root only. Stricter than etcd 3.4, which checks nothing here: compaction
    /// discards the history every watcher resumes from, so it is an admin operation.
    pub(crate) fn compact(&self, request: &Request<pb::CompactionRequest>) -> Result<(), Status> {
        if let Some(caller) = self.gate.caller(request)? {
            caller.check_admin()?;
        }
        Ok(())
    }

    /// LeaseGrant, LeaseKeepAlive (once, when the stream opens) and LeaseLeases: a valid
    /// caller (etcd lists every lease id to any authenticated user: ids name no key).
    pub(crate) fn lease<T>(&self, request: &Request<T>) -> Result<(), Status> {
        self.gate.caller(request)?;
        Ok(())
    }

    /// LeaseRevoke: write on every key of the lease (revoking deletes them).
    pub(crate) async fn lease_revoke(
        &self,
        backend: &Backend,
        request: &Request<pb::LeaseRevokeRequest>,
    ) -> Result<(), Status> {
        if let Some(caller) = self.gate.caller(request)? {
            self.check_lease_keys(backend, &caller, Perm::Write, request.get_ref().id)
                .await?;
        }
        Ok(())
    }

    /// LeaseTimeToLive: a valid caller, and read on every key of the lease when it asks for
    /// them (`keys`).
    pub(crate) async fn lease_time_to_live(
        &self,
        backend: &Backend,
        request: &Request<pb::LeaseTimeToLiveRequest>,
    ) -> Result<(), Status> {
        if let Some(caller) = self.gate.caller(request)?
            && request.get_ref().keys
        {
            self.check_lease_keys(backend, &caller, Perm::Read, request.get_ref().id)
                .await?;
        }
        Ok(())
    }
}

/// etcd's checks for a Range: read on its range.
pub(crate) fn check_range(caller: &Caller, r: &pb::RangeRequest) -> Result<(), EtcdError> {
    caller.check(Perm::Read, &r.key, &r.range_end)
}

/// etcd's checks for a Put: write on its key, and read too when it asks for `prev_kv`.
pub(crate) fn check_put(caller: &Caller, r: &pb::PutRequest) -> Result<(), EtcdError> {
    caller.check(Perm::Write, &r.key, b"")?;
    if r.prev_kv {
        caller.check(Perm::Read, &r.key, b"")?;
    }
    Ok(())
}

/// etcd's checks for a DeleteRange: write on its range, and read too for `prev_kv`.
pub(crate) fn check_delete(caller: &Caller, r: &pb::DeleteRangeRequest) -> Result<(), EtcdError> {
    caller.check(Perm::Write, &r.key, &r.range_end)?;
    if r.prev_kv {
        caller.check(Perm::Read, &r.key, &r.range_end)?;
    }
    Ok(())
}

/// etcd's checks for a Txn: read on every compare's range, and every operation of both
/// branches (nested txns included) as if sent alone, whichever branch would run.
pub(crate) fn check_txn(caller: &Caller, r: &pb::TxnRequest) -> Result<(), EtcdError> {
    use pb::request_op::Request as Q;
    for c in &r.compare {
        caller.check(Perm::Read, &c.key, &c.range_end)?;
    }
    for op in r.success.iter().chain(&r.failure) {
        match &op.request {
            Some(Q::RequestRange(r)) => check_range(caller, r)?,
            Some(Q::RequestPut(r)) => check_put(caller, r)?,
            Some(Q::RequestDeleteRange(r)) => check_delete(caller, r)?,
            Some(Q::RequestTxn(r)) => check_txn(caller, r)?,
            // An empty op is refused by the txn's own validation.
            None => {}
        }
    }
    Ok(())
}

/// Every lease a put of `r` attaches, in either branch and in nested txns, once each: a txn
/// gets the same lease check as a plain Put (etcd 3.4 skips it for txns, which would let a
/// txn do what the Put is refused).
fn txn_leases(r: &pb::TxnRequest) -> Vec<i64> {
    fn walk(r: &pb::TxnRequest, out: &mut Vec<i64>) {
        for op in r.success.iter().chain(&r.failure) {
            match &op.request {
                Some(pb::request_op::Request::RequestPut(p)) if p.lease != 0 => out.push(p.lease),
                Some(pb::request_op::Request::RequestTxn(t)) => walk(t, out),
                _ => {}
            }
        }
    }
    let mut out = Vec::new();
    walk(r, &mut out);
    out.sort_unstable();
    out.dedup();
    out
}

/// Why a watch create was refused by one of the server's fair-share limits (the server-wide
/// cap is the engine's, `WatchError::TooManyWatchers`). Sent the way etcd refuses a create:
/// `created + canceled` with `watch_id = -1` and this text as `cancel_reason`, the text of its
/// status ([`WatchLimit::status`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum WatchLimit {
    /// The stream already holds `--max-watchers-per-stream` watches.
    #[error("keywatch: too many watches on this stream (the limit is {limit})")]
    Stream {
        /// The configured limit.
        limit: usize,
    },
    /// The client's connection already holds `--max-watchers-per-connection` watchers, over
    /// all its streams.
    #[error("keywatch: too many watchers on this connection (the limit is {limit})")]
    Connection {
        /// The configured limit.
        limit: usize,
    },
    /// The stream's user (authentication on) already holds `--max-watchers-per-user`
    /// watchers, over all its connections.
    #[error("keywatch: too many watchers for this user (the limit is {limit})")]
    User {
        /// The configured limit.
        limit: usize,
    },
}

impl WatchLimit {
    /// The one mapping to a gRPC status: RESOURCE_EXHAUSTED with the limit's text, as the
    /// engine's server-wide cap (`WatchError::TooManyWatchers`) is mapped.
    pub(crate) fn status(&self) -> Status {
        Status::resource_exhausted(self.to_string())
    }

    /// The `limit` label of `keywatch_watch_creates_refused`.
    pub(crate) fn label(&self) -> &'static str {
        match self {
            Self::Stream { .. } => "stream",
            Self::Connection { .. } => "connection",
            Self::User { .. } => "user",
        }
    }
}

/// Watchers held by one client connection, over all its streams: shared by the connection's
/// requests (its [`super::listen::ConnInfo`]) and released as each watch ends.
pub(crate) type ConnWatchers = Arc<AtomicUsize>;

/// The per-connection and per-user watcher limits of one server, checked at each watch create
/// after the per-stream limit and before the engine's server-wide cap.
#[derive(Debug, Clone)]
pub(crate) struct WatchBudget {
    per_connection: usize,
    per_user: usize,
    /// Watchers per user name, authentication on; an entry is removed at zero, so the map
    /// holds only users with watchers. Locked for one increment or decrement.
    users: UserWatchers,
}

/// Watchers per user name (see [`WatchBudget`]).
type UserWatchers = Arc<parking_lot::Mutex<HashMap<String, usize>>>;

impl WatchBudget {
    /// At most `per_connection` watchers per connection and `per_user` per user.
    pub(crate) fn new(per_connection: usize, per_user: usize) -> Self {
        Self {
            per_connection,
            per_user,
            users: Arc::default(),
        }
    }

    /// Takes one watcher of `conn`'s budget (none when the stream has no connection, e.g. an
    /// in-process call) and of `user`'s (authentication on); the [`WatchSlot`] gives both back
    /// when dropped.
    pub(crate) fn admit(
        &self,
        conn: Option<&ConnWatchers>,
        user: Option<&str>,
    ) -> Result<WatchSlot, WatchLimit> {
        let mut slot = WatchSlot {
            conn: None,
            user: None,
        };
        if let Some(conn) = conn {
            let limit = self.per_connection;
            conn.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < limit).then_some(n + 1)
            })
            .map_err(|_| WatchLimit::Connection { limit })?;
            slot.conn = Some(conn.clone());
        }
        if let Some(name) = user {
            let mut users = self.users.lock();
            if users.get(name).is_some_and(|&n| n >= self.per_user) {
                // Dropping `slot` gives the connection's watcher back.
                return Err(WatchLimit::User {
                    limit: self.per_user,
                });
            }
            *users.entry_ref(name).or_insert(0) += 1;
            slot.user = Some((self.users.clone(), name.to_owned()));
        }
        Ok(slot)
    }
}

/// One watcher's share of its connection's and user's budgets, given back on drop (held by
/// the watch for its whole life).
#[derive(Debug)]
pub(crate) struct WatchSlot {
    conn: Option<ConnWatchers>,
    user: Option<(UserWatchers, String)>,
}

impl Drop for WatchSlot {
    fn drop(&mut self) {
        if let Some(conn) = &self.conn {
            conn.fetch_sub(1, Ordering::AcqRel);
        }
        if let Some((users, name)) = &self.user {
            let mut users = users.lock();
            if let Some(n) = users.get_mut(name.as_str()) {
                *n -= 1;
                if *n == 0 {
                    users.remove(name.as_str());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{Auth, test_settings};

    #[tokio::test]
    async fn txn_checks_every_compare_and_op() {
        let auth = Auth::new(&test_settings());
        let alice = auth
            .caller(Some(&auth.authenticate("alice", "pw").await.unwrap()))
            .unwrap();
        let put = |k: &str| pb::RequestOp {
            request: Some(pb::request_op::Request::RequestPut(pb::PutRequest {
                key: k.as_bytes().to_vec().into(),
                ..Default::default()
            })),
        };
        let ok = pb::TxnRequest {
            compare: vec![pb::Compare {
                key: "/shared".into(),
                ..Default::default()
            }],
            success: vec![put("/app/a")],
            failure: vec![put("/app/b")],
        };
        assert!(check_txn(&alice, &ok).is_ok());
        // A forbidden op in the branch that would not run still refuses the txn.
        let mut bad = ok.clone();
        bad.failure.push(put("/secret"));
        assert_eq!(check_txn(&alice, &bad), Err(EtcdError::PermissionDenied));
        // A compare is a read.
        let mut bad = ok.clone();
        bad.compare[0].key = "/secret".into();
        assert_eq!(check_txn(&alice, &bad), Err(EtcdError::PermissionDenied));
        // Nested txns are checked too.
        let mut bad = ok.clone();
        bad.success.push(pb::RequestOp {
            request: Some(pb::request_op::Request::RequestTxn(pb::TxnRequest {
                success: vec![put("/secret")],
                ..Default::default()
            })),
        });
        assert_eq!(check_txn(&alice, &bad), Err(EtcdError::PermissionDenied));
        // prev_kv on a put needs read: alice may write "w..." but not read it.
        let put_prev = pb::PutRequest {
            key: "wx".into(),
            prev_kv: true,
            ..Default::default()
        };
        assert_eq!(
            check_put(&alice, &put_prev),
            Err(EtcdError::PermissionDenied)
        );
    }

    #[test]
    fn txn_leases_walks_both_branches_and_nested_txns_once_each() {
        let put = |lease| pb::RequestOp {
            request: Some(pb::request_op::Request::RequestPut(pb::PutRequest {
                key: "k".into(),
                lease,
                ..Default::default()
            })),
        };
        let r = pb::TxnRequest {
            compare: Vec::new(),
            success: vec![put(7), put(0)],
            failure: vec![
                put(3),
                pb::RequestOp {
                    request: Some(pb::request_op::Request::RequestTxn(pb::TxnRequest {
                        success: vec![put(7), put(9)],
                        ..Default::default()
                    })),
                },
            ],
        };
        assert_eq!(txn_leases(&r), vec![3, 7, 9]);
    }
}

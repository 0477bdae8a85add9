//! The one mapping from keywatch errors (watch-core's and [`ConvertError`]) to gRPC statuses,
//! and etcd's error table ([`EtcdError`]). kv-store classifies its own errors, event-log's
//! included, into that table without knowing gRPC (`kv_store::ErrorClass`); watch-server's
//! `store_status` maps the classes through here.
//!
//! Where etcd defines an error, the status carries etcd's exact code and message
//! ([`EtcdError`]): the Go client (`rpctypes.Error`) recognises errors by message text, so
//! `errors.Is(err, rpctypes.ErrCompacted)` only works with the exact text. Errors etcd does not
//! have keep their own `Display` text under the closest code.
//!
//! The message of a status built here also serves as `WatchResponse.cancel_reason` when a
//! watch create fails, which is where etcd puts the same texts (e.g. "mvcc: watcher range is
//! empty" for an empty range).

use tonic::{Code, Status};
use watch_core::{ErrorKind, HistoryError, WatchError};

use crate::error::ConvertError;

/// The etcd server errors keywatch reproduces, with etcd's gRPC code and message
/// (etcd `api/v3rpc/rpctypes/error.go`; the two `mvcc:` watch texts are from `mvcc/watcher.go`).
///
/// Every etcd error keywatch sends is built from here, never from a message written at the
/// call site: the Go client matches on the text, so one copy of each text keeps them exact.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum EtcdError {
    /// The requested revision is below the compaction point.
    Compacted,
    /// The requested revision is above the current store revision.
    FutureRevision,
    /// A request needs a key and has none.
    EmptyKey,
    /// A txn operation with no request set (etcd's `ErrGRPCKeyNotFound`, despite the name).
    KeyNotFound,
    /// A put with `ignore_value` that also carries a value.
    ValueProvided,
    /// A put with `ignore_lease` that also carries a lease.
    LeaseProvided,
    /// A range request whose `sort_order` or `sort_target` is not a known enum value.
    InvalidSortOption,
    /// A transaction writes the same key twice.
    DuplicateKey,
    /// A transaction has more operations than the server allows.
    TooManyOps,
    /// A request is larger than the server accepts.
    RequestTooLarge,
    /// The server is overloaded and sheds requests.
    TooManyRequests,
    /// A request names a lease that does not exist.
    LeaseNotFound,
    /// A lease grant asks for an ID already in use.
    LeaseExists,
    /// A lease grant asks for a TTL above etcd's maximum (9,000,000,000 s).
    LeaseTtlTooLarge,
    /// No leader is known (returned to `hasleader` streams).
    NoLeader,
    /// The server is shutting down.
    Stopped,
    /// An auth request to a server without authentication (no `[auth]` in its config).
    AuthNotEnabled,
    /// Stored data failed an integrity check, or the CORRUPT alarm is raised.
    Corrupt,
    /// The space quota is exhausted or the NOSPACE alarm is raised (`--quota-backend-bytes`).
    NoSpace,
    /// MoveLeader to a member that is not in the cluster (or a learner).
    BadLeaderTransferee,
    /// A caller without the root role asked for Snapshot, Hash, HashKV or Defragment: etcd
    /// 3.4 returns its auth package's error there without converting it (code Unknown).
    AdminPermissionDenied,
    /// A watch create whose `key >= range_end` (etcd sends it only as `cancel_reason`).
    WatcherRangeEmpty,
    /// A watch create reusing a watch ID in use on its stream (sent as `cancel_reason`).
    DuplicateWatchId,
    /// Authentication is on and the request carries no token.
    UserEmpty,
    /// Authenticate with an unknown user or a wrong password.
    AuthFailed,
    /// The request's token is unknown or expired.
    InvalidAuthToken,
    /// The user's roles do not grant the access the request needs.
    PermissionDenied,
    /// keywatch's own (etcd has no such state): the server is up but still opening its data
    /// directory (event-log replay); UNAVAILABLE, so clients retry.
    Starting,
    /// keywatch's own: the operating system's random source failed while issuing an auth
    /// token (etcd panics); UNAVAILABLE, so clients retry.
    TokenSource,
    /// UserAdd of a name already taken.
    UserAlreadyExist,
    /// A user management request names an unknown user.
    UserNotFound,
    /// RoleAdd of a name already taken.
    RoleAlreadyExist,
    /// A request names an unknown role.
    RoleNotFound,
    /// RoleAdd with an empty name.
    RoleEmpty,
    /// AuthEnable without a user named `root`.
    RootUserNotExist,
    /// AuthEnable while the `root` user lacks the `root` role.
    RootRoleNotExist,
    /// UserRevokeRole of a role the user does not have.
    RoleNotGranted,
    /// RoleRevokePermission of a permission the role does not have.
    PermissionNotGranted,
    /// RoleGrantPermission without a permission.
    PermissionNotGiven,
    /// With authentication on: deleting the root user or role, or revoking the root role from
    /// the root user.
    InvalidAuthMgmt,
    /// Authenticate with a password for a user added with `no_password` (etcd answers it with
    /// code Unknown and this text, without the `etcdserver:` prefix).
    NoPasswordUser,
    /// keywatch's own: UserAdd or UserChangePassword with a password over 72 bytes, which bcrypt
    /// cannot hash in full (keywatch refuses it rather than truncate it silently).
    PasswordTooLong,
    /// keywatch's own: the auth records file failed a commit; the server stops (fail-stop) and
    /// the change was not applied.
    AuthStoreFailed,
}

impl EtcdError {
    /// etcd's gRPC code for this error.
    pub fn code(self) -> Code {
        match self {
            Self::Compacted | Self::FutureRevision => Code::OutOfRange,
            Self::EmptyKey
            | Self::KeyNotFound
            | Self::ValueProvided
            | Self::LeaseProvided
            | Self::InvalidSortOption
            | Self::DuplicateKey
            | Self::TooManyOps
            | Self::RequestTooLarge
            | Self::WatcherRangeEmpty
            | Self::DuplicateWatchId
            | Self::UserEmpty
            | Self::AuthFailed
            | Self::RoleEmpty
            | Self::PermissionNotGiven
            | Self::InvalidAuthMgmt
            | Self::PasswordTooLong => Code::InvalidArgument,
            Self::UserAlreadyExist
            | Self::UserNotFound
            | Self::RoleAlreadyExist
            | Self::RoleNotFound
            | Self::RootUserNotExist
            | Self::RootRoleNotExist
            | Self::RoleNotGranted
            | Self::PermissionNotGranted => Code::FailedPrecondition,
            Self::NoPasswordUser => Code::Unknown,
            Self::AuthStoreFailed => Code::Unavailable,
            Self::InvalidAuthToken => Code::Unauthenticated,
            Self::PermissionDenied => Code::PermissionDenied,
            Self::TooManyRequests => Code::ResourceExhausted,
            Self::LeaseNotFound => Code::NotFound,
            Self::LeaseExists => Code::FailedPrecondition,
            Self::LeaseTtlTooLarge => Code::OutOfRange,
            Self::NoLeader | Self::Stopped | Self::Starting | Self::TokenSource => {
                Code::Unavailable
            }
            Self::AuthNotEnabled => Code::FailedPrecondition,
            Self::Corrupt => Code::DataLoss,
            Self::NoSpace => Code::ResourceExhausted,
            Self::BadLeaderTransferee => Code::FailedPrecondition,
            Self::AdminPermissionDenied => Code::Unknown,
        }
    }

    /// etcd's message for this error, byte for byte.
    pub fn message(self) -> &'static str {
        match self {
            Self::Compacted => "etcdserver: mvcc: required revision has been compacted",
            Self::FutureRevision => "etcdserver: mvcc: required revision is a future revision",
            Self::EmptyKey => "etcdserver: key is not provided",
            Self::KeyNotFound => "etcdserver: key not found",
            Self::ValueProvided => "etcdserver: value is provided",
            Self::LeaseProvided => "etcdserver: lease is provided",
            Self::InvalidSortOption => "etcdserver: invalid sort option",
            Self::DuplicateKey => "etcdserver: duplicate key given in txn request",
            Self::TooManyOps => "etcdserver: too many operations in txn request",
            Self::RequestTooLarge => "etcdserver: request is too large",
            Self::TooManyRequests => "etcdserver: too many requests",
            Self::LeaseNotFound => "etcdserver: requested lease not found",
            Self::LeaseExists => "etcdserver: lease already exists",
            Self::LeaseTtlTooLarge => "etcdserver: too large lease TTL",
            Self::NoLeader => "etcdserver: no leader",
            Self::Stopped => "etcdserver: server stopped",
            Self::AuthNotEnabled => "etcdserver: authentication is not enabled",
            Self::Corrupt => "etcdserver: corrupt cluster",
            Self::NoSpace => "etcdserver: mvcc: database space exceeded",
            Self::BadLeaderTransferee => "etcdserver: bad leader transferee",
            Self::AdminPermissionDenied => "auth: permission denied",
            Self::WatcherRangeEmpty => "mvcc: watcher range is empty",
            Self::DuplicateWatchId => "mvcc: duplicate watch ID provided on the WatchStream",
            Self::UserEmpty => "etcdserver: user name is empty",
            Self::AuthFailed => "etcdserver: authentication failed, invalid user ID or password",
            Self::InvalidAuthToken => "etcdserver: invalid auth token",
            Self::PermissionDenied => "etcdserver: permission denied",
            Self::Starting => {
                "keywatch: starting: the data directory is being opened (event log replay); \
                 retry shortly"
            }
            Self::TokenSource => "keywatch: no random source to issue an auth token; retry",
            Self::UserAlreadyExist => "etcdserver: user name already exists",
            Self::UserNotFound => "etcdserver: user name not found",
            Self::RoleAlreadyExist => "etcdserver: role name already exists",
            Self::RoleNotFound => "etcdserver: role name not found",
            Self::RoleEmpty => "etcdserver: role name is empty",
            Self::RootUserNotExist => "etcdserver: root user does not exist",
            Self::RootRoleNotExist => "etcdserver: root user does not have root role",
            Self::RoleNotGranted => "etcdserver: role is not granted to the user",
            Self::PermissionNotGranted => "etcdserver: permission is not granted to the role",
            Self::PermissionNotGiven => "etcdserver: permission not given",
            Self::InvalidAuthMgmt => "etcdserver: invalid auth management",
            Self::NoPasswordUser => {
                "auth: authentication failed, password was given for no password user"
            }
            Self::PasswordTooLong => {
                "keywatch: password is longer than 72 bytes, which bcrypt cannot hash in full"
            }
            Self::AuthStoreFailed => {
                "keywatch: the auth records file failed a commit; the server is stopping"
            }
        }
    }

    /// The text of this error as Go's gRPC status prints it (`rpc error: code = X desc = Y`).
    /// etcd puts that text, not the bare message, in the `cancel_reason` of a watch create it
    /// refuses for lack of permission.
    pub fn go_status_text(self) -> String {
        // tonic's `Code` Debug names are Go's code names (`PermissionDenied`, `InvalidArgument`).
        format!(
            "rpc error: code = {:?} desc = {}",
            self.code(),
            self.message()
        )
    }

    /// The status etcd returns for this error.
    pub fn status(self) -> Status {
        Status::new(self.code(), self.message())
    }
}

impl From<EtcdError> for Status {
    fn from(e: EtcdError) -> Self {
        e.status()
    }
}

/// The status for a watch-core [`WatchError`], by its exhaustive [`ErrorKind`]:
///
/// | kind | code | message |
/// |---|---|---|
/// | `EmptyKey` | InvalidArgument | etcd's empty key |
/// | `EmptyRange` | InvalidArgument | "mvcc: watcher range is empty" |
/// | `Compacted` | OutOfRange | etcd's compacted |
/// | `Shutdown` | Unavailable | "etcdserver: server stopped" |
/// | `LimitReached` | ResourceExhausted | the error's text (etcd has no watcher limit) |
/// | `Unavailable` | Unavailable | the error's text |
/// | `Misconfigured` | Internal | the error's text: the server configured it, not the client |
pub fn from_watch_error(e: &WatchError) -> Status {
    from_watch_kind(e.kind(), &e.to_string())
}

/// The status for a watch-core [`HistoryError`], by its [`ErrorKind`] as in
/// [`from_watch_error`]: a failing history store is Unavailable, so clients retry.
pub fn from_history_error(e: &HistoryError) -> Status {
    from_watch_kind(e.kind(), &e.to_string())
}

/// The status for a watch-core error of class `kind` whose text is `text` (the table of
/// [`from_watch_error`]).
fn from_watch_kind(kind: ErrorKind, text: &str) -> Status {
    match kind {
        ErrorKind::EmptyKey => EtcdError::EmptyKey.status(),
        ErrorKind::EmptyRange => EtcdError::WatcherRangeEmpty.status(),
        ErrorKind::Compacted => EtcdError::Compacted.status(),
        ErrorKind::Shutdown => EtcdError::Stopped.status(),
        ErrorKind::LimitReached => Status::resource_exhausted(text),
        ErrorKind::Unavailable => Status::unavailable(text),
        ErrorKind::Misconfigured => Status::internal(text),
    }
}

/// The status for a [`ConvertError`].
///
/// A negative `start_revision` is etcd's compacted error (what current etcd answers); a bad
/// selector maps as in [`from_watch_error`]; every other malformed field is InvalidArgument
/// with the error's text.
pub fn from_convert_error(e: &ConvertError) -> Status {
    match e {
        ConvertError::NegativeStartRevision { .. } => EtcdError::Compacted.status(),
        ConvertError::InvalidSelector(inner) => from_watch_error(inner),
        ConvertError::NegativeField { .. }
        | ConvertError::UnknownEnumValue { .. }
        | ConvertError::MissingField { .. } => Status::invalid_argument(e.to_string()),
    }
}

impl From<ConvertError> for Status {
    fn from(e: ConvertError) -> Self {
        from_convert_error(&e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const COMPACTED: &str = "etcdserver: mvcc: required revision has been compacted";

    fn check(s: Status, code: Code, message: &str) {
        assert_eq!((s.code(), s.message()), (code, message));
    }

    #[test]
    fn etcd_table() {
        check(EtcdError::Compacted.into(), Code::OutOfRange, COMPACTED);
        check(
            EtcdError::FutureRevision.into(),
            Code::OutOfRange,
            "etcdserver: mvcc: required revision is a future revision",
        );
        check(
            EtcdError::EmptyKey.into(),
            Code::InvalidArgument,
            "etcdserver: key is not provided",
        );
        check(
            EtcdError::KeyNotFound.into(),
            Code::InvalidArgument,
            "etcdserver: key not found",
        );
        check(
            EtcdError::ValueProvided.into(),
            Code::InvalidArgument,
            "etcdserver: value is provided",
        );
        check(
            EtcdError::LeaseProvided.into(),
            Code::InvalidArgument,
            "etcdserver: lease is provided",
        );
        check(
            EtcdError::InvalidSortOption.into(),
            Code::InvalidArgument,
            "etcdserver: invalid sort option",
        );
        check(
            EtcdError::DuplicateKey.into(),
            Code::InvalidArgument,
            "etcdserver: duplicate key given in txn request",
        );
        check(
            EtcdError::TooManyOps.into(),
            Code::InvalidArgument,
            "etcdserver: too many operations in txn request",
        );
        check(
            EtcdError::RequestTooLarge.into(),
            Code::InvalidArgument,
            "etcdserver: request is too large",
        );
        check(
            EtcdError::TooManyRequests.into(),
            Code::ResourceExhausted,
            "etcdserver: too many requests",
        );
        check(
            EtcdError::LeaseNotFound.into(),
            Code::NotFound,
            "etcdserver: requested lease not found",
        );
        check(
            EtcdError::LeaseExists.into(),
            Code::FailedPrecondition,
            "etcdserver: lease already exists",
        );
        check(
            EtcdError::LeaseTtlTooLarge.into(),
            Code::OutOfRange,
            "etcdserver: too large lease TTL",
        );
        check(
            EtcdError::NoLeader.into(),
            Code::Unavailable,
            "etcdserver: no leader",
        );
        check(
            EtcdError::Stopped.into(),
            Code::Unavailable,
            "etcdserver: server stopped",
        );
        check(
            EtcdError::AuthNotEnabled.into(),
            Code::FailedPrecondition,
            "etcdserver: authentication is not enabled",
        );
        check(
            EtcdError::Corrupt.into(),
            Code::DataLoss,
            "etcdserver: corrupt cluster",
        );
        check(
            EtcdError::NoSpace.into(),
            Code::ResourceExhausted,
            "etcdserver: mvcc: database space exceeded",
        );
        check(
            EtcdError::AdminPermissionDenied.into(),
            Code::Unknown,
            "auth: permission denied",
        );
        check(
            EtcdError::BadLeaderTransferee.into(),
            Code::FailedPrecondition,
            "etcdserver: bad leader transferee",
        );
        check(
            EtcdError::WatcherRangeEmpty.into(),
            Code::InvalidArgument,
            "mvcc: watcher range is empty",
        );
        check(
            EtcdError::DuplicateWatchId.into(),
            Code::InvalidArgument,
            "mvcc: duplicate watch ID provided on the WatchStream",
        );
        check(
            EtcdError::Starting.into(),
            Code::Unavailable,
            "keywatch: starting: the data directory is being opened (event log replay); \
             retry shortly",
        );
        check(
            EtcdError::UserEmpty.into(),
            Code::InvalidArgument,
            "etcdserver: user name is empty",
        );
        check(
            EtcdError::AuthFailed.into(),
            Code::InvalidArgument,
            "etcdserver: authentication failed, invalid user ID or password",
        );
        check(
            EtcdError::InvalidAuthToken.into(),
            Code::Unauthenticated,
            "etcdserver: invalid auth token",
        );
        check(
            EtcdError::PermissionDenied.into(),
            Code::PermissionDenied,
            "etcdserver: permission denied",
        );
        assert_eq!(
            EtcdError::PermissionDenied.go_status_text(),
            "rpc error: code = PermissionDenied desc = etcdserver: permission denied"
        );
    }

    #[test]
    fn watch_errors() {
        check(
            from_watch_error(&WatchError::EmptyKey),
            Code::InvalidArgument,
            "etcdserver: key is not provided",
        );
        check(
            from_watch_error(&WatchError::EmptyRange {
                start: "b".into(),
                end: "a".into(),
            }),
            Code::InvalidArgument,
            "mvcc: watcher range is empty",
        );
        check(
            from_watch_error(&WatchError::Compacted {
                requested: 1,
                compact_revision: 5,
            }),
            Code::OutOfRange,
            COMPACTED,
        );
        check(
            from_watch_error(&WatchError::Shutdown),
            Code::Unavailable,
            "etcdserver: server stopped",
        );
        check(
            from_watch_error(&WatchError::TooManyWatchers { limit: 3 }),
            Code::ResourceExhausted,
            "too many watchers: the limit is 3",
        );
        check(
            from_watch_error(&WatchError::ZeroBuffer),
            Code::Internal,
            "watch buffer size must be at least 1",
        );
    }

    #[test]
    fn history_errors() {
        check(
            from_history_error(&HistoryError::Compacted {
                compact_revision: 4,
            }),
            Code::OutOfRange,
            COMPACTED,
        );
        check(
            from_history_error(&HistoryError::Unavailable("disk gone".into())),
            Code::Unavailable,
            "history unavailable: disk gone",
        );
    }

    #[test]
    fn convert_errors() {
        check(
            ConvertError::NegativeStartRevision { start_revision: -1 }.into(),
            Code::OutOfRange,
            COMPACTED,
        );
        check(
            ConvertError::InvalidSelector(WatchError::EmptyKey).into(),
            Code::InvalidArgument,
            "etcdserver: key is not provided",
        );
        check(
            ConvertError::NegativeField {
                field: "mod_revision",
                value: -2,
            }
            .into(),
            Code::InvalidArgument,
            "mod_revision must not be negative, got -2",
        );
        check(
            ConvertError::UnknownEnumValue {
                field: "filters",
                value: 9,
            }
            .into(),
            Code::InvalidArgument,
            "filters holds the unknown enum value 9",
        );
        check(
            ConvertError::MissingField { field: "kv" }.into(),
            Code::InvalidArgument,
            "kv is not set",
        );
    }
}

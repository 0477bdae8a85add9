//! etcd's `Auth` service. Users and roles come from the config file, so only the token
//! exchange (`Authenticate`) and `AuthStatus` are served; every management method answers
//! UNIMPLEMENTED with a message pointing to the config file.

use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tonic::{Request, Response, Status};
use watch_proto::etcdserverpb as pb;
use watch_proto::status::EtcdError;

use super::convert;
use crate::auth::Gate;
use kv_store::Store;

/// etcd's `Auth` service over the server's [`Gate`].
#[derive(Debug, Clone)]
pub struct AuthService {
    store: Store,
    gate: Gate,
    failures: Arc<FailureLog>,
}

impl AuthService {
    /// The service; `gate` is off when the config has no `[auth]` section.
    pub fn new(store: Store, gate: Gate) -> Self {
        Self {
            store,
            gate,
            failures: Arc::default(),
        }
    }

    fn header(&self) -> Option<pb::ResponseHeader> {
        Some(convert::header(self.store.durable_revision()))
    }
}

/// Failed logins logged at info per second; more go to debug (a flood of bad logins, e.g.
/// over-long passwords that fail without hashing, cannot flood the log).
const FAILURES_LOGGED_PER_SECOND: u32 = 10;

/// Bytes of a user name shown in the log (escaped), so a client cannot forge or flood lines.
const NAME_SHOWN_BYTES: usize = 64;

/// Rate limit of the failed-login info lines: a one-second window and its count.
#[derive(Debug)]
struct FailureLog(Mutex<(Instant, u32)>);

impl Default for FailureLog {
    fn default() -> Self {
        FailureLog(Mutex::new((Instant::now(), 0)))
    }
}

impl FailureLog {
    /// `Some(n)` if this failure may be logged at info, `n` failures having been demoted to
    /// debug since the last info line; `None` to log it at debug.
    fn admit(&self, now: Instant) -> Option<u32> {
        let mut w = self.0.lock();
        if now.saturating_duration_since(w.0) >= Duration::from_secs(1) {
            let demoted = w.1.saturating_sub(FAILURES_LOGGED_PER_SECOND);
            *w = (now, 1);
            return Some(demoted);
        }
        w.1 = w.1.saturating_add(1);
        (w.1 <= FAILURES_LOGGED_PER_SECOND).then_some(0)
    }
}

/// A user name as logged: at most [`NAME_SHOWN_BYTES`] (on a char boundary), with a marker
/// when cut; the caller logs it with `?` (Debug), which escapes quotes and control characters.
fn shown_name(name: &str) -> String {
    if name.len() <= NAME_SHOWN_BYTES {
        return name.to_owned();
    }
    let mut end = NAME_SHOWN_BYTES;
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...({} bytes)", &name[..end], name.len())
}

/// The answer to every user and role management method.
fn managed_in_config(method: &str) -> Status {
    Status::unimplemented(format!(
        "keywatch: {method} is not supported: users, roles and whether authentication is on are \
         set in the config file's [auth] section (see docs/security.md); restart to apply changes"
    ))
}

#[tonic::async_trait]
impl pb::auth_server::Auth for AuthService {
    async fn authenticate(
        &self,
        request: Request<pb::AuthenticateRequest>,
    ) -> Result<Response<pb::AuthenticateResponse>, Status> {
        let Some(auth) = self.gate.auth() else {
            return Err(EtcdError::AuthNotEnabled.status());
        };
        let peer = request.remote_addr();
        let r = request.into_inner();
        let token = match auth.authenticate(&r.name, &r.password).await {
            Ok(token) => token,
            Err(status) => {
                // Operators watch these for password guessing; the password is never logged.
                let user = shown_name(&r.name);
                let code = status.code();
                match self.failures.admit(Instant::now()) {
                    Some(demoted) => tracing::info!(
                        ?user,
                        ?peer,
                        ?code,
                        demoted_to_debug = demoted,
                        "authentication failed"
                    ),
                    None => tracing::debug!(?user, ?peer, ?code, "authentication failed"),
                }
                return Err(status);
            }
        };
        tracing::debug!(user = ?shown_name(&r.name), ?peer, "authenticated");
        Ok(Response::new(pb::AuthenticateResponse {
            header: self.header(),
            token,
        }))
    }

    async fn auth_status(
        &self,
        _request: Request<pb::AuthStatusRequest>,
    ) -> Result<Response<pb::AuthStatusResponse>, Status> {
        let enabled = self.gate.auth().is_some();
        Ok(Response::new(pb::AuthStatusResponse {
            header: self.header(),
            enabled,
            // Users and roles never change while the server runs: one revision when on.
            auth_revision: u64::from(enabled),
        }))
    }

    async fn auth_enable(
        &self,
        _request: Request<pb::AuthEnableRequest>,
    ) -> Result<Response<pb::AuthEnableResponse>, Status> {
        Err(managed_in_config("AuthEnable"))
    }

    async fn auth_disable(
        &self,
        _request: Request<pb::AuthDisableRequest>,
    ) -> Result<Response<pb::AuthDisableResponse>, Status> {
        Err(managed_in_config("AuthDisable"))
    }

    async fn user_add(
        &self,
        _request: Request<pb::AuthUserAddRequest>,
    ) -> Result<Response<pb::AuthUserAddResponse>, Status> {
        Err(managed_in_config("UserAdd"))
    }

    async fn user_get(
        &self,
        _request: Request<pb::AuthUserGetRequest>,
    ) -> Result<Response<pb::AuthUserGetResponse>, Status> {
        Err(managed_in_config("UserGet"))
    }

    async fn user_list(
        &self,
        _request: Request<pb::AuthUserListRequest>,
    ) -> Result<Response<pb::AuthUserListResponse>, Status> {
        Err(managed_in_config("UserList"))
    }

    async fn user_delete(
        &self,
        _request: Request<pb::AuthUserDeleteRequest>,
    ) -> Result<Response<pb::AuthUserDeleteResponse>, Status> {
        Err(managed_in_config("UserDelete"))
    }

    async fn user_change_password(
        &self,
        _request: Request<pb::AuthUserChangePasswordRequest>,
    ) -> Result<Response<pb::AuthUserChangePasswordResponse>, Status> {
        Err(managed_in_config("UserChangePassword"))
    }

    async fn user_grant_role(
        &self,
        _request: Request<pb::AuthUserGrantRoleRequest>,
    ) -> Result<Response<pb::AuthUserGrantRoleResponse>, Status> {
        Err(managed_in_config("UserGrantRole"))
    }

    async fn user_revoke_role(
        &self,
        _request: Request<pb::AuthUserRevokeRoleRequest>,
    ) -> Result<Response<pb::AuthUserRevokeRoleResponse>, Status> {
        Err(managed_in_config("UserRevokeRole"))
    }

    async fn role_add(
        &self,
        _request: Request<pb::AuthRoleAddRequest>,
    ) -> Result<Response<pb::AuthRoleAddResponse>, Status> {
        Err(managed_in_config("RoleAdd"))
    }

    async fn role_get(
        &self,
        _request: Request<pb::AuthRoleGetRequest>,
    ) -> Result<Response<pb::AuthRoleGetResponse>, Status> {
        Err(managed_in_config("RoleGet"))
    }

    async fn role_list(
        &self,
        _request: Request<pb::AuthRoleListRequest>,
    ) -> Result<Response<pb::AuthRoleListResponse>, Status> {
        Err(managed_in_config("RoleList"))
    }

    async fn role_delete(
        &self,
        _request: Request<pb::AuthRoleDeleteRequest>,
    ) -> Result<Response<pb::AuthRoleDeleteResponse>, Status> {
        Err(managed_in_config("RoleDelete"))
    }

    async fn role_grant_permission(
        &self,
        _request: Request<pb::AuthRoleGrantPermissionRequest>,
    ) -> Result<Response<pb::AuthRoleGrantPermissionResponse>, Status> {
        Err(managed_in_config("RoleGrantPermission"))
    }

    async fn role_revoke_permission(
        &self,
        _request: Request<pb::AuthRoleRevokePermissionRequest>,
    ) -> Result<Response<pb::AuthRoleRevokePermissionResponse>, Status> {
        Err(managed_in_config("RoleRevokePermission"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_logins_logged_at_info_at_a_bounded_rate() {
        let log = FailureLog::default();
        let t0 = Instant::now();
        let admitted = (0..100).filter(|_| log.admit(t0).is_some()).count();
        assert_eq!(admitted, FAILURES_LOGGED_PER_SECOND as usize);
        // The next window logs again and reports how many went to debug.
        assert_eq!(log.admit(t0 + Duration::from_secs(1)), Some(90));
        assert_eq!(log.admit(t0 + Duration::from_secs(1)), Some(0));
    }

    #[test]
    fn names_are_cut_and_escaped() {
        assert_eq!(shown_name("alice"), "alice");
        let forged = format!("x\nINFO forged line{}", "é".repeat(100));
        let shown = shown_name(&forged);
        assert!(shown.len() < NAME_SHOWN_BYTES + 20, "{shown}");
        assert!(shown.ends_with(&format!("({} bytes)", forged.len())));
        // Debug, as logged, escapes the newline.
        assert!(!format!("{shown:?}").contains('\n'));
    }
}

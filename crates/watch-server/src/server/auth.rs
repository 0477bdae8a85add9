//! etcd's `Auth` service: Authenticate, AuthStatus, and the user and role management
//! methods with etcd's rules (`auth/store.go`, `apply_auth.go`): while authentication is on,
//! every management method needs the root role, except UserGet of one's own user and RoleGet
//! of one's own roles. Changes are durable before they are acknowledged and apply to the
//! next request (see [`crate::auth::Auth`]).

use std::sync::Arc;
use std::time::Instant;

use tonic::{Request, Response, Status};
use watch_proto::authpb;
use watch_proto::etcdserverpb as pb;
use watch_proto::status::EtcdError;

use super::convert;
use super::listen::{ConnInfo, LogRate};
use crate::auth::{
    Auth, AuthData, Effect, Gate, MAX_BCRYPT_COST, MAX_USER_NAME_BYTES, PermKind, Permission,
};
use kv_store::Store;

/// etcd's `Auth` service over the server's [`Gate`].
#[derive(Debug, Clone)]
pub struct AuthService {
    store: Store,
    gate: Gate,
    /// Failed logins are logged at info at a bounded rate; more go to debug (a flood of bad
    /// logins, e.g. over-long passwords that fail without hashing, cannot flood the log).
    failures: Arc<LogRate>,
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

/// Bytes of a user name shown in the log (escaped), so a client cannot forge or flood lines.
const NAME_SHOWN_BYTES: usize = 64;

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

/// A permission from the wire.
fn permission(p: &authpb::Permission) -> Result<Permission, Status> {
    let kind = match authpb::permission::Type::try_from(p.perm_type) {
        Ok(authpb::permission::Type::Read) => PermKind::Read,
        Ok(authpb::permission::Type::Write) => PermKind::Write,
        Ok(authpb::permission::Type::Readwrite) => PermKind::ReadWrite,
        Err(_) => {
            return Err(Status::invalid_argument(format!(
                "keywatch: unknown permission type {}",
                p.perm_type
            )));
        }
    };
    Ok(Permission {
        kind,
        key: p.key.to_vec(),
        range_end: p.range_end.to_vec(),
    })
}

/// A permission for the wire.
fn wire_permission(p: &Permission) -> authpb::Permission {
    let t = match p.kind {
        PermKind::Read => authpb::permission::Type::Read,
        PermKind::Write => authpb::permission::Type::Write,
        PermKind::ReadWrite => authpb::permission::Type::Readwrite,
    };
    authpb::Permission {
        perm_type: t as i32,
        key: p.key.clone().into(),
        range_end: p.range_end.clone().into(),
    }
}

impl AuthService {
    /// The server's auth; a service built on [`Gate::off`] manages nothing.
    fn manager(&self) -> Result<&Arc<Auth>, Status> {
        self.gate
            .manager()
            .ok_or_else(|| Status::unimplemented("keywatch: this server has no auth store"))
    }

    /// etcd's `IsAdminPermitted`: with authentication on, the caller needs the root role.
    fn admin<T>(&self, request: &Request<T>) -> Result<(), Status> {
        match self.gate.caller(request)? {
            Some(c) if !c.is_root() => Err(EtcdError::PermissionDenied.status()),
            _ => Ok(()),
        }
    }

    /// Runs an admin change and answers with a header.
    async fn change<T>(
        &self,
        request: &Request<T>,
        change: impl FnOnce(&mut AuthData) -> Result<Effect, EtcdError>,
    ) -> Result<Option<pb::ResponseHeader>, Status> {
        self.admin(request)?;
        self.manager()?
            .change(change)
            .await
            .map_err(EtcdError::status)?;
        Ok(self.header())
    }

    /// The password hash for UserAdd and UserChangePassword: etcd 3.5's `hashedPassword`
    /// when given (a bcrypt hash of an accepted cost), else a hash of `password`.
    async fn password_hash(&self, password: &str, hashed: &str) -> Result<String, Status> {
        if !hashed.is_empty() {
            return match hashed.parse::<bcrypt::HashParts>() {
                Ok(parts) if parts.get_cost() <= MAX_BCRYPT_COST => Ok(hashed.to_owned()),
                _ => Err(Status::invalid_argument(format!(
                    "keywatch: hashedPassword is not a bcrypt hash of cost at most {MAX_BCRYPT_COST}"
                ))),
            };
        }
        self.manager()?
            .hash(password)
            .await
            .map_err(EtcdError::status)
    }
}

#[tonic::async_trait]
impl pb::auth_server::Auth for AuthService {
    async fn authenticate(
        &self,
        request: Request<pb::AuthenticateRequest>,
    ) -> Result<Response<pb::AuthenticateResponse>, Status> {
        let Some(auth) = self.gate.manager() else {
            return Err(EtcdError::AuthNotEnabled.status());
        };
        let peer = request
            .extensions()
            .get::<ConnInfo>()
            .and_then(ConnInfo::remote_addr);
        let r = request.into_inner();
        let token = match auth.authenticate(&r.name, &r.password).await {
            Ok(token) => token,
            Err(e) => {
                // Operators watch these for password guessing; the password is never logged.
                let user = shown_name(&r.name);
                let status = e.status();
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
        let (enabled, auth_revision) = self
            .gate
            .manager()
            .map_or((false, 0), |a| (a.enabled(), a.revision()));
        Ok(Response::new(pb::AuthStatusResponse {
            header: self.header(),
            enabled,
            auth_revision,
        }))
    }

    async fn auth_enable(
        &self,
        request: Request<pb::AuthEnableRequest>,
    ) -> Result<Response<pb::AuthEnableResponse>, Status> {
        let header = self
            .change(&request, |d| d.enable().map(|()| Effect::None))
            .await?;
        tracing::info!("authentication enabled");
        Ok(Response::new(pb::AuthEnableResponse { header }))
    }

    async fn auth_disable(
        &self,
        request: Request<pb::AuthDisableRequest>,
    ) -> Result<Response<pb::AuthDisableResponse>, Status> {
        let header = self
            .change(&request, |d| {
                d.disable();
                Ok(Effect::None)
            })
            .await?;
        tracing::info!("authentication disabled");
        Ok(Response::new(pb::AuthDisableResponse { header }))
    }

    async fn user_add(
        &self,
        request: Request<pb::AuthUserAddRequest>,
    ) -> Result<Response<pb::AuthUserAddResponse>, Status> {
        // The admin check comes before any hashing, so only root spends bcrypt time here.
        self.admin(&request)?;
        let r = request.get_ref();
        if r.name.len() > MAX_USER_NAME_BYTES {
            return Err(Status::invalid_argument(format!(
                "keywatch: user name is longer than {MAX_USER_NAME_BYTES} bytes"
            )));
        }
        if r.name.is_empty() {
            return Err(EtcdError::UserEmpty.status());
        }
        let no_password = r.options.as_ref().is_some_and(|o| o.no_password);
        let hash = if no_password {
            None
        } else {
            Some(self.password_hash(&r.password, &r.hashed_password).await?)
        };
        let name = r.name.clone();
        let header = self
            .change(&request, move |d| {
                d.user_add(&name, hash).map(|()| Effect::None)
            })
            .await?;
        Ok(Response::new(pb::AuthUserAddResponse { header }))
    }

    async fn user_get(
        &self,
        request: Request<pb::AuthUserGetRequest>,
    ) -> Result<Response<pb::AuthUserGetResponse>, Status> {
        // A user may read its own record.
        if let Some(c) = self.gate.caller(&request)?
            && !c.is_root()
            && c.name() != request.get_ref().name
        {
            return Err(EtcdError::PermissionDenied.status());
        }
        let name = &request.get_ref().name;
        let roles = self
            .manager()?
            .read(|d| d.users.get(name).map(|u| u.roles.iter().cloned().collect()))
            .await
            .ok_or_else(|| EtcdError::UserNotFound.status())?;
        Ok(Response::new(pb::AuthUserGetResponse {
            header: self.header(),
            roles,
        }))
    }

    async fn user_list(
        &self,
        request: Request<pb::AuthUserListRequest>,
    ) -> Result<Response<pb::AuthUserListResponse>, Status> {
        self.admin(&request)?;
        let users = self
            .manager()?
            .read(|d| d.users.keys().cloned().collect())
            .await;
        Ok(Response::new(pb::AuthUserListResponse {
            header: self.header(),
            users,
        }))
    }

    async fn user_delete(
        &self,
        request: Request<pb::AuthUserDeleteRequest>,
    ) -> Result<Response<pb::AuthUserDeleteResponse>, Status> {
        let name = request.get_ref().name.clone();
        // The user's tokens stop resolving: a re-added user gets a new incarnation.
        let header = self
            .change(&request, |d| d.user_delete(&name).map(|()| Effect::None))
            .await?;
        Ok(Response::new(pb::AuthUserDeleteResponse { header }))
    }

    async fn user_change_password(
        &self,
        request: Request<pb::AuthUserChangePasswordRequest>,
    ) -> Result<Response<pb::AuthUserChangePasswordResponse>, Status> {
        self.admin(&request)?;
        let r = request.get_ref();
        let hash = self.password_hash(&r.password, &r.hashed_password).await?;
        let name = r.name.clone();
        let header = self
            .change(&request, move |d| {
                d.user_change_password(&name, hash)?;
                Ok(Effect::NewIncarnation(name))
            })
            .await?;
        Ok(Response::new(pb::AuthUserChangePasswordResponse { header }))
    }

    async fn user_grant_role(
        &self,
        request: Request<pb::AuthUserGrantRoleRequest>,
    ) -> Result<Response<pb::AuthUserGrantRoleResponse>, Status> {
        let r = request.get_ref().clone();
        let header = self
            .change(&request, |d| {
                d.user_grant_role(&r.user, &r.role).map(|()| Effect::None)
            })
            .await?;
        Ok(Response::new(pb::AuthUserGrantRoleResponse { header }))
    }

    async fn user_revoke_role(
        &self,
        request: Request<pb::AuthUserRevokeRoleRequest>,
    ) -> Result<Response<pb::AuthUserRevokeRoleResponse>, Status> {
        let r = request.get_ref().clone();
        let header = self
            .change(&request, |d| {
                d.user_revoke_role(&r.name, &r.role).map(|()| Effect::None)
            })
            .await?;
        Ok(Response::new(pb::AuthUserRevokeRoleResponse { header }))
    }

    async fn role_add(
        &self,
        request: Request<pb::AuthRoleAddRequest>,
    ) -> Result<Response<pb::AuthRoleAddResponse>, Status> {
        let name = request.get_ref().name.clone();
        let header = self
            .change(&request, |d| d.role_add(&name).map(|()| Effect::None))
            .await?;
        Ok(Response::new(pb::AuthRoleAddResponse { header }))
    }

    async fn role_get(
        &self,
        request: Request<pb::AuthRoleGetRequest>,
    ) -> Result<Response<pb::AuthRoleGetResponse>, Status> {
        // A user may read the roles it holds.
        if let Some(c) = self.gate.caller(&request)?
            && !c.is_root()
            && !c.has_role(&request.get_ref().role)
        {
            return Err(EtcdError::PermissionDenied.status());
        }
        let role = &request.get_ref().role;
        let perm = self
            .manager()?
            .read(|d| {
                d.roles
                    .get(role)
                    .map(|perms| perms.iter().map(wire_permission).collect())
            })
            .await
            .ok_or_else(|| EtcdError::RoleNotFound.status())?;
        Ok(Response::new(pb::AuthRoleGetResponse {
            header: self.header(),
            perm,
        }))
    }

    async fn role_list(
        &self,
        request: Request<pb::AuthRoleListRequest>,
    ) -> Result<Response<pb::AuthRoleListResponse>, Status> {
        self.admin(&request)?;
        let roles = self
            .manager()?
            .read(|d| d.roles.keys().cloned().collect())
            .await;
        Ok(Response::new(pb::AuthRoleListResponse {
            header: self.header(),
            roles,
        }))
    }

    async fn role_delete(
        &self,
        request: Request<pb::AuthRoleDeleteRequest>,
    ) -> Result<Response<pb::AuthRoleDeleteResponse>, Status> {
        let role = request.get_ref().role.clone();
        let header = self
            .change(&request, |d| d.role_delete(&role).map(|()| Effect::None))
            .await?;
        Ok(Response::new(pb::AuthRoleDeleteResponse { header }))
    }

    async fn role_grant_permission(
        &self,
        request: Request<pb::AuthRoleGrantPermissionRequest>,
    ) -> Result<Response<pb::AuthRoleGrantPermissionResponse>, Status> {
        self.admin(&request)?;
        let r = request.get_ref();
        let perm = permission(
            r.perm
                .as_ref()
                .ok_or_else(|| EtcdError::PermissionNotGiven.status())?,
        )?;
        let name = r.name.clone();
        let header = self
            .change(&request, |d| {
                d.role_grant_permission(&name, perm).map(|()| Effect::None)
            })
            .await?;
        Ok(Response::new(pb::AuthRoleGrantPermissionResponse {
            header,
        }))
    }

    async fn role_revoke_permission(
        &self,
        request: Request<pb::AuthRoleRevokePermissionRequest>,
    ) -> Result<Response<pb::AuthRoleRevokePermissionResponse>, Status> {
        let r = request.get_ref().clone();
        let header = self
            .change(&request, |d| {
                d.role_revoke_permission(&r.role, &r.key, &r.range_end)
                    .map(|()| Effect::None)
            })
            .await?;
        Ok(Response::new(pb::AuthRoleRevokePermissionResponse {
            header,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::super::listen::LINES_PER_SECOND;
    use super::*;
    use std::time::Duration;

    #[test]
    fn failed_logins_logged_at_info_at_a_bounded_rate() {
        let log = LogRate::default();
        let t0 = Instant::now();
        let admitted = (0..100).filter(|_| log.admit(t0).is_some()).count();
        assert_eq!(admitted, LINES_PER_SECOND as usize);
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

//! etcd's `Auth` service. Users and roles come from the config file, so only the token
//! exchange (`Authenticate`) and `AuthStatus` are served; every management method answers
//! UNIMPLEMENTED with a message pointing to the config file.

use tonic::{Request, Response, Status};
use watch_proto::etcdserverpb as pb;
use watch_proto::status::EtcdError;

use super::convert;
use crate::auth::Gate;
use crate::store::Store;

/// etcd's `Auth` service over the server's [`Gate`].
#[derive(Debug, Clone)]
pub struct AuthService {
    store: Store,
    gate: Gate,
}

impl AuthService {
    /// The service; `gate` is off when the config has no `[auth]` section.
    pub fn new(store: Store, gate: Gate) -> Self {
        Self { store, gate }
    }

    fn header(&self) -> Option<pb::ResponseHeader> {
        Some(convert::header(self.store.durable_revision()))
    }
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
                tracing::info!(user = %r.name, ?peer, code = ?status.code(), "authentication failed");
                return Err(status);
            }
        };
        tracing::debug!(user = %r.name, ?peer, "authenticated");
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

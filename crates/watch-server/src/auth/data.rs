//! The auth records (users, roles, whether authentication is on) and etcd's rules for
//! changing them (etcd `auth/store.go`). Pure data: [`super::Auth`] runs a change on a copy,
//! makes it durable ([`super::persist`]), then publishes it.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use watch_proto::status::EtcdError;

/// etcd's role that grants every permission and the admin operations.
pub const ROOT_ROLE: &str = "root";

/// etcd's root user: AuthEnable needs it (with the root role), and it cannot be deleted while
/// authentication is on.
pub const ROOT_USER: &str = "root";

/// The access a permission grants (etcd's `authpb.Permission.Type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PermKind {
    /// Range and watch (etcd `READ` = 0).
    Read,
    /// Put and delete (etcd `WRITE` = 1).
    Write,
    /// Both (etcd `READWRITE` = 2).
    ReadWrite,
}

impl PermKind {
    /// True if it grants read.
    pub fn reads(self) -> bool {
        matches!(self, PermKind::Read | PermKind::ReadWrite)
    }

    /// True if it grants write.
    pub fn writes(self) -> bool {
        matches!(self, PermKind::Write | PermKind::ReadWrite)
    }
}

/// One key permission of a role, in etcd's `(key, range_end)` form: an empty `range_end` is
/// the key alone, `"\0"` every key from `key` on, else `[key, range_end)`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Permission {
    /// The access granted.
    pub kind: PermKind,
    /// The key, or the start of the range.
    pub key: Vec<u8>,
    /// etcd's range end (see the type docs).
    pub range_end: Vec<u8>,
}

/// A stored user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct UserRecord {
    /// bcrypt hash of the password; `None` for a user added with `no_password`, which can
    /// never authenticate with a password (etcd's `UserAddOptions.no_password`).
    pub(crate) password_hash: Option<String>,
    /// Role names, sorted (etcd keeps them sorted). May name `root` without a `root` role
    /// existing, as etcd allows.
    pub(crate) roles: BTreeSet<String>,
}

/// Every auth record. Serialized whole into the records file on each change (users and roles
/// are few; one record keeps a change atomic).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct AuthData {
    /// Whether authentication is on.
    pub(crate) enabled: bool,
    /// etcd's auth revision: incremented by every change.
    pub(crate) revision: u64,
    pub(crate) users: BTreeMap<String, UserRecord>,
    /// Roles and their permissions, sorted by `(key, range_end)`.
    pub(crate) roles: BTreeMap<String, Vec<Permission>>,
}

impl AuthData {
    fn user_mut(&mut self, name: &str) -> Result<&mut UserRecord, EtcdError> {
        self.users.get_mut(name).ok_or(EtcdError::UserNotFound)
    }

    /// UserAdd with an already hashed password (`None`: no password).
    pub(crate) fn user_add(
        &mut self,
        name: &str,
        password_hash: Option<String>,
    ) -> Result<(), EtcdError> {
        if name.is_empty() {
            return Err(EtcdError::UserEmpty);
        }
        if self.users.contains_key(name) {
            return Err(EtcdError::UserAlreadyExist);
        }
        self.users.insert(
            name.to_owned(),
            UserRecord {
                password_hash,
                roles: BTreeSet::new(),
            },
        );
        Ok(())
    }

    /// UserDelete: the root user cannot go while authentication is on.
    pub(crate) fn user_delete(&mut self, name: &str) -> Result<(), EtcdError> {
        if self.enabled && name == ROOT_USER {
            return Err(EtcdError::InvalidAuthMgmt);
        }
        self.users
            .remove(name)
            .map(drop)
            .ok_or(EtcdError::UserNotFound)
    }

    /// UserChangePassword with an already hashed password. A `no_password` user keeps that
    /// option (as in etcd): it still cannot authenticate.
    pub(crate) fn user_change_password(
        &mut self,
        name: &str,
        password_hash: String,
    ) -> Result<(), EtcdError> {
        let user = self.user_mut(name)?;
        if user.password_hash.is_some() {
            user.password_hash = Some(password_hash);
        }
        Ok(())
    }

    /// UserGrantRole: `root` needs no role record; a repeated grant is a silent no-op.
    pub(crate) fn user_grant_role(&mut self, name: &str, role: &str) -> Result<(), EtcdError> {
        if !self.users.contains_key(name) {
            return Err(EtcdError::UserNotFound);
        }
        if role != ROOT_ROLE && !self.roles.contains_key(role) {
            return Err(EtcdError::RoleNotFound);
        }
        self.user_mut(name)?.roles.insert(role.to_owned());
        Ok(())
    }

    /// UserRevokeRole: the root role stays with the root user while authentication is on.
    pub(crate) fn user_revoke_role(&mut self, name: &str, role: &str) -> Result<(), EtcdError> {
        if self.enabled && name == ROOT_USER && role == ROOT_ROLE {
            return Err(EtcdError::InvalidAuthMgmt);
        }
        if self.user_mut(name)?.roles.remove(role) {
            Ok(())
        } else {
            Err(EtcdError::RoleNotGranted)
        }
    }

    /// RoleAdd.
    pub(crate) fn role_add(&mut self, name: &str) -> Result<(), EtcdError> {
        if name.is_empty() {
            return Err(EtcdError::RoleEmpty);
        }
        if self.roles.contains_key(name) {
            return Err(EtcdError::RoleAlreadyExist);
        }
        self.roles.insert(name.to_owned(), Vec::new());
        Ok(())
    }

    /// RoleDelete: also revoked from every user. The root role stays while authentication is
    /// on.
    pub(crate) fn role_delete(&mut self, name: &str) -> Result<(), EtcdError> {
        if self.enabled && name == ROOT_ROLE {
            return Err(EtcdError::InvalidAuthMgmt);
        }
        self.roles.remove(name).ok_or(EtcdError::RoleNotFound)?;
        for user in self.users.values_mut() {
            user.roles.remove(name);
        }
        Ok(())
    }

    /// RoleGrantPermission: a permission on the same `(key, range_end)` has its kind replaced.
    pub(crate) fn role_grant_permission(
        &mut self,
        name: &str,
        perm: Permission,
    ) -> Result<(), EtcdError> {
        let perms = self.roles.get_mut(name).ok_or(EtcdError::RoleNotFound)?;
        match perms.binary_search_by(|p| (&p.key, &p.range_end).cmp(&(&perm.key, &perm.range_end)))
        {
            Ok(i) => perms[i].kind = perm.kind,
            Err(i) => perms.insert(i, perm),
        }
        Ok(())
    }

    /// RoleRevokePermission of exactly `(key, range_end)`.
    pub(crate) fn role_revoke_permission(
        &mut self,
        name: &str,
        key: &[u8],
        range_end: &[u8],
    ) -> Result<(), EtcdError> {
        let perms = self.roles.get_mut(name).ok_or(EtcdError::RoleNotFound)?;
        let before = perms.len();
        perms.retain(|p| !(p.key == key && p.range_end == range_end));
        if perms.len() == before {
            return Err(EtcdError::PermissionNotGranted);
        }
        Ok(())
    }

    /// AuthEnable: needs the root user, holding the root role. Already on: nothing changes.
    pub(crate) fn enable(&mut self) -> Result<(), EtcdError> {
        if self.enabled {
            return Ok(());
        }
        let root = self
            .users
            .get(ROOT_USER)
            .ok_or(EtcdError::RootUserNotExist)?;
        if !root.roles.contains(ROOT_ROLE) {
            return Err(EtcdError::RootRoleNotExist);
        }
        self.enabled = true;
        Ok(())
    }

    /// AuthDisable.
    pub(crate) fn disable(&mut self) {
        self.enabled = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn perm(kind: PermKind, key: &str, end: &str) -> Permission {
        Permission {
            kind,
            key: key.into(),
            range_end: end.into(),
        }
    }

    #[test]
    fn etcd_rules() {
        let mut d = AuthData::default();
        assert_eq!(d.enable(), Err(EtcdError::RootUserNotExist));
        d.user_add("root", Some("h".into())).unwrap();
        assert_eq!(d.user_add("root", None), Err(EtcdError::UserAlreadyExist));
        assert_eq!(d.user_add("", None), Err(EtcdError::UserEmpty));
        assert_eq!(d.enable(), Err(EtcdError::RootRoleNotExist));
        // The root role needs no record to be granted.
        d.user_grant_role("root", ROOT_ROLE).unwrap();
        assert_eq!(d.user_grant_role("root", "x"), Err(EtcdError::RoleNotFound));
        assert_eq!(
            d.user_grant_role("x", ROOT_ROLE),
            Err(EtcdError::UserNotFound)
        );
        d.enable().unwrap();
        assert_eq!(d.user_delete("root"), Err(EtcdError::InvalidAuthMgmt));
        assert_eq!(
            d.user_revoke_role("root", ROOT_ROLE),
            Err(EtcdError::InvalidAuthMgmt)
        );
        assert_eq!(d.role_delete(ROOT_ROLE), Err(EtcdError::InvalidAuthMgmt));
        d.role_add("r").unwrap();
        assert_eq!(d.role_add("r"), Err(EtcdError::RoleAlreadyExist));
        assert_eq!(d.role_add(""), Err(EtcdError::RoleEmpty));
        d.role_grant_permission("r", perm(PermKind::Read, "b", ""))
            .unwrap();
        d.role_grant_permission("r", perm(PermKind::Write, "a", "z"))
            .unwrap();
        // Same (key, range_end): the kind is replaced, not added.
        d.role_grant_permission("r", perm(PermKind::ReadWrite, "b", ""))
            .unwrap();
        assert_eq!(
            d.roles["r"],
            vec![
                perm(PermKind::Write, "a", "z"),
                perm(PermKind::ReadWrite, "b", "")
            ]
        );
        d.role_revoke_permission("r", b"b", b"").unwrap();
        assert_eq!(
            d.role_revoke_permission("r", b"b", b""),
            Err(EtcdError::PermissionNotGranted)
        );
        d.user_add("alice", None).unwrap();
        d.user_grant_role("alice", "r").unwrap();
        d.user_grant_role("alice", "r").unwrap();
        d.role_delete("r").unwrap();
        assert!(d.users["alice"].roles.is_empty());
        assert_eq!(
            d.user_revoke_role("alice", "r"),
            Err(EtcdError::RoleNotGranted)
        );
        d.disable();
        d.user_revoke_role("root", ROOT_ROLE).unwrap();
        d.user_delete("root").unwrap();
    }
}

//! Runtime user and role management (every Auth RPC) against keywatch and a real etcd: both
//! start with authentication off and no users, and each case builds its users and roles
//! through the Auth RPCs (the etcd-client crate, raw gRPC, or etcdctl). The same codes,
//! messages and outputs must hold on both.

use crate::common::{Server, Watch, assert_code, assert_status, compat_test, with_token};
use etcd_client::{Client, ConnectOptions, Permission, RoleRevokePermissionOptions, WatchOptions};
use tonic::Code;
use tonic::transport::Channel;
use watch_proto::etcdserverpb as pb;

const DENIED: &str = "etcdserver: permission denied";
const INVALID_TOKEN: &str = "etcdserver: invalid auth token";

async fn login(server: &Server, user: &str, password: &str) -> Client {
    let options = ConnectOptions::new()
        .with_user(user, password)
        .with_connect_timeout(crate::common::GUARD);
    Client::connect([server.endpoint()], Some(options))
        .await
        .unwrap_or_else(|e| panic!("{}: connect as {user}: {e}", server.target))
}

async fn channel(server: &Server) -> Channel {
    Channel::from_shared(server.endpoint().to_owned())
        .expect("endpoint URL")
        .connect()
        .await
        .expect("connect")
}

/// root (root role), with authentication still off.
async fn add_root(client: &mut Client) {
    client
        .user_add("root", "rootpw", None)
        .await
        .expect("add root");
    client.role_add("root").await.expect("add role root");
    client
        .user_grant_role("root", "root")
        .await
        .expect("grant root");
}

async fn token(auth: &mut pb::auth_client::AuthClient<Channel>, user: &str, pw: &str) -> String {
    auth.authenticate(pb::AuthenticateRequest {
        name: user.into(),
        password: pw.into(),
    })
    .await
    .unwrap_or_else(|e| panic!("authenticate {user}: {e}"))
    .into_inner()
    .token
}

// Every management RPC with etcd's rules and errors, through the etcd-client crate.
async fn management_rules(server: Server) {
    let mut c = server.client().await;
    assert_status(
        c.auth_enable().await,
        Code::FailedPrecondition,
        "etcdserver: root user does not exist",
    );
    c.user_add("root", "rootpw", None).await.expect("add root");
    assert_status(
        c.user_add("root", "x", None).await,
        Code::FailedPrecondition,
        "etcdserver: user name already exists",
    );
    assert_status(
        c.user_add("", "x", None).await,
        Code::InvalidArgument,
        "etcdserver: user name is empty",
    );
    assert_status(
        c.auth_enable().await,
        Code::FailedPrecondition,
        "etcdserver: root user does not have root role",
    );
    c.role_add("root").await.expect("add role root");
    c.user_grant_role("root", "root").await.expect("grant root");
    c.role_add("reader").await.expect("add reader");
    assert_status(
        c.role_add("reader").await,
        Code::FailedPrecondition,
        "etcdserver: role name already exists",
    );
    assert_status(
        c.role_add("").await,
        Code::InvalidArgument,
        "etcdserver: role name is empty",
    );
    for perm in [
        Permission::read("foo"),
        Permission::read_write("k").with_prefix(),
        Permission::write("a").with_range_end("z"),
        Permission::read("from").with_from_key(),
    ] {
        c.role_grant_permission("reader", perm)
            .await
            .expect("grant");
    }
    // Same (key, range_end): the type is replaced.
    c.role_grant_permission("reader", Permission::write("foo"))
        .await
        .expect("regrant");
    let perms = c.role_get("reader").await.expect("role get").permissions();
    let shown: Vec<(i32, String, String)> = perms
        .iter()
        .map(|p| {
            (
                p.get_type(),
                String::from_utf8_lossy(p.key()).into_owned(),
                String::from_utf8_lossy(p.range_end()).into_owned(),
            )
        })
        .collect();
    assert_eq!(
        shown,
        vec![
            (1, "a".into(), "z".into()),
            (1, "foo".into(), "".into()),
            (0, "from".into(), "\0".into()),
            (2, "k".into(), "l".into()),
        ]
    );
    c.role_revoke_permission("reader", "foo", None)
        .await
        .expect("revoke");
    assert_status(
        c.role_revoke_permission("reader", "foo", None).await,
        Code::FailedPrecondition,
        "etcdserver: permission is not granted to the role",
    );
    c.role_revoke_permission(
        "reader",
        "k",
        Some(RoleRevokePermissionOptions::new().with_prefix()),
    )
    .await
    .expect("revoke a prefix");
    for r in [
        c.role_get("nobody").await.map(drop),
        c.role_delete("nobody").await.map(drop),
        c.user_grant_role("root", "nope").await.map(drop),
    ] {
        assert_status(
            r,
            Code::FailedPrecondition,
            "etcdserver: role name not found",
        );
    }
    c.user_add("alice", "alicepw", None)
        .await
        .expect("add alice");
    // An empty password is a password (etcdctl prompts for one; the RPC takes it).
    c.user_add("emptypw", "", None)
        .await
        .expect("empty password");
    c.user_delete("emptypw").await.expect("delete");
    // A repeated grant is a silent no-op.
    c.user_grant_role("alice", "reader").await.expect("grant");
    c.user_grant_role("alice", "reader")
        .await
        .expect("grant again");
    for r in [
        c.user_grant_role("nobody", "reader").await.map(drop),
        c.user_get("nobody").await.map(drop),
        c.user_delete("nobody").await.map(drop),
        c.user_change_password("nobody", "x").await.map(drop),
        c.user_revoke_role("nobody", "reader").await.map(drop),
    ] {
        assert_status(
            r,
            Code::FailedPrecondition,
            "etcdserver: user name not found",
        );
    }
    assert_eq!(
        c.user_get("alice").await.expect("get").roles(),
        &["reader".to_owned()]
    );
    assert_eq!(
        c.user_list().await.expect("list").users(),
        &["alice".to_owned(), "root".to_owned()]
    );
    assert_eq!(
        c.role_list().await.expect("list").roles(),
        &["reader".to_owned(), "root".to_owned()]
    );
    c.role_add("temp").await.expect("add temp");
    c.user_grant_role("alice", "temp")
        .await
        .expect("grant temp");
    c.user_revoke_role("alice", "temp")
        .await
        .expect("revoke temp");
    assert_status(
        c.user_revoke_role("alice", "temp").await,
        Code::FailedPrecondition,
        "etcdserver: role is not granted to the user",
    );
    // Deleting a role revokes it from every user.
    c.user_grant_role("alice", "temp")
        .await
        .expect("grant temp");
    c.role_delete("temp").await.expect("delete temp");
    assert_eq!(
        c.user_get("alice").await.expect("get").roles(),
        &["reader".to_owned()]
    );
    c.user_change_password("alice", "newpw")
        .await
        .expect("change password");
    c.auth_enable().await.expect("enable");

    // Authentication on: a client without a token manages nothing.
    assert_status(
        c.user_list().await,
        Code::InvalidArgument,
        "etcdserver: user name is empty",
    );
    let mut alice = login(&server, "alice", "newpw").await;
    assert_status(alice.user_list().await, Code::PermissionDenied, DENIED);
    assert_status(alice.auth_disable().await, Code::PermissionDenied, DENIED);
    assert_status(
        alice.user_add("x", "y", None).await,
        Code::PermissionDenied,
        DENIED,
    );
    assert_status(alice.role_get("root").await, Code::PermissionDenied, DENIED);
    assert_status(alice.user_get("root").await, Code::PermissionDenied, DENIED);
    // Its own user and roles it may read.
    assert_eq!(
        alice.user_get("alice").await.expect("own user").roles(),
        &["reader".to_owned()]
    );
    assert_eq!(
        alice
            .role_get("reader")
            .await
            .expect("own role")
            .permissions()
            .len(),
        2
    );
    let mut root = login(&server, "root", "rootpw").await;
    for r in [
        root.user_delete("root").await.map(drop),
        root.user_revoke_role("root", "root").await.map(drop),
        root.role_delete("root").await.map(drop),
    ] {
        assert_status(
            r,
            Code::InvalidArgument,
            "etcdserver: invalid auth management",
        );
    }
    // Enabling again succeeds.
    root.auth_enable().await.expect("enable again");
    root.auth_disable().await.expect("disable");
    let mut anonymous = server.client().await;
    anonymous.put("k", "v", None).await.expect("auth is off");
}
compat_test!(management_rules);

// Which tokens a change invalidates, and Authenticate's errors (raw gRPC, tokens by hand).
async fn token_invalidation(server: Server) {
    let mut c = server.client().await;
    add_root(&mut c).await;
    c.user_add("alice", "alicepw", None)
        .await
        .expect("add alice");
    c.user_add("bob", "bobpw", None).await.expect("add bob");
    let mut opts = etcd_client::UserAddOptions::new();
    opts = opts.with_no_pwd();
    c.user_add("nopw", "", Some(opts)).await.expect("add nopw");
    c.role_add("app").await.expect("role");
    c.role_grant_permission("app", Permission::read_write("/app/").with_prefix())
        .await
        .expect("grant");
    c.user_grant_role("alice", "app").await.expect("grant");
    let mut auth = pb::auth_client::AuthClient::new(channel(&server).await);
    assert_code(
        auth.authenticate(pb::AuthenticateRequest {
            name: "root".into(),
            password: "rootpw".into(),
        })
        .await,
        Code::FailedPrecondition,
        "etcdserver: authentication is not enabled",
    );
    c.auth_enable().await.expect("enable");
    assert_code(
        auth.authenticate(pb::AuthenticateRequest {
            name: "nopw".into(),
            password: "x".into(),
        })
        .await,
        Code::Unknown,
        "auth: authentication failed, password was given for no password user",
    );
    let root_token = token(&mut auth, "root", "rootpw").await;
    let alice_token = token(&mut auth, "alice", "alicepw").await;
    let mut kv = pb::kv_client::KvClient::new(channel(&server).await);
    let range = |t: &str| {
        with_token(
            pb::RangeRequest {
                key: "/app/a".into(),
                ..Default::default()
            },
            Some(t),
        )
    };
    kv.range(range(&alice_token)).await.expect("alice reads");
    let root = Some(root_token.as_str());
    // Deleting another user leaves the token alone.
    auth.user_delete(with_token(
        pb::AuthUserDeleteRequest { name: "bob".into() },
        root,
    ))
    .await
    .expect("delete bob");
    kv.range(range(&alice_token)).await.expect("still valid");
    // A password change invalidates the user's tokens.
    auth.user_change_password(with_token(
        pb::AuthUserChangePasswordRequest {
            name: "alice".into(),
            password: "new".into(),
            ..Default::default()
        },
        root,
    ))
    .await
    .expect("change password");
    assert_code(
        kv.range(range(&alice_token)).await,
        Code::Unauthenticated,
        INVALID_TOKEN,
    );
    let alice_token = token(&mut auth, "alice", "new").await;
    kv.range(range(&alice_token)).await.expect("new token");
    // A revoked permission applies to the next request of a live token.
    auth.role_revoke_permission(with_token(
        pb::AuthRoleRevokePermissionRequest {
            role: "app".into(),
            key: "/app/".into(),
            range_end: "/app0".into(),
        },
        root,
    ))
    .await
    .expect("revoke");
    assert_code(
        kv.range(range(&alice_token)).await,
        Code::PermissionDenied,
        DENIED,
    );
    // Deleting the user invalidates its tokens; re-adding the name does not revive them.
    auth.user_delete(with_token(
        pb::AuthUserDeleteRequest {
            name: "alice".into(),
        },
        root,
    ))
    .await
    .expect("delete alice");
    auth.user_add(with_token(
        pb::AuthUserAddRequest {
            name: "alice".into(),
            password: "new".into(),
            ..Default::default()
        },
        root,
    ))
    .await
    .expect("re-add alice");
    assert_code(
        kv.range(range(&alice_token)).await,
        Code::Unauthenticated,
        INVALID_TOKEN,
    );
    // Disabling drops every token: a request that still carries one is refused, one without
    // is served.
    auth.auth_disable(with_token(pb::AuthDisableRequest {}, root))
        .await
        .expect("disable");
    assert_code(
        kv.range(range(&root_token)).await,
        Code::Unauthenticated,
        INVALID_TOKEN,
    );
    kv.range(with_token(
        pb::RangeRequest {
            key: "/app/a".into(),
            ..Default::default()
        },
        None,
    ))
    .await
    .expect("no token, auth off");
}
compat_test!(token_invalidation);

// An open watch stream re-checks each create: a permission revoked after the stream opened
// refuses the next create.
async fn watch_create_rechecks(server: Server) {
    let mut c = server.client().await;
    add_root(&mut c).await;
    c.user_add("alice", "alicepw", None)
        .await
        .expect("add alice");
    c.role_add("app").await.expect("role");
    c.role_grant_permission("app", Permission::read("/app/").with_prefix())
        .await
        .expect("grant");
    c.user_grant_role("alice", "app").await.expect("grant");
    c.auth_enable().await.expect("enable");
    let mut alice = login(&server, "alice", "alicepw").await;
    let (mut watch, created) = Watch::open(&mut alice, "/app/a", None).await;
    assert!(!created.canceled(), "{created:?}");
    let mut root = login(&server, "root", "rootpw").await;
    root.role_revoke_permission(
        "app",
        "/app/",
        Some(RoleRevokePermissionOptions::new().with_prefix()),
    )
    .await
    .expect("revoke");
    let refused = watch.add("/app/b", None).await;
    assert!(refused.canceled(), "{refused:?}");
    assert_eq!(
        refused.cancel_reason(),
        "rpc error: code = PermissionDenied desc = etcdserver: permission denied"
    );
    // Granted again (as a role given to the user): the next create on the same stream passes.
    root.role_add("again").await.expect("role");
    root.role_grant_permission("again", Permission::read("/app/b"))
        .await
        .expect("grant");
    root.user_grant_role("alice", "again").await.expect("grant");
    let ok = watch.add("/app/b", Some(WatchOptions::new())).await;
    assert!(!ok.canceled(), "{ok:?}");
}
compat_test!(watch_create_rechecks);

// Users, roles and the enabled flag survive a kill -9 and restart.
async fn durable_across_restart(mut server: Server) {
    let mut c = server.client().await;
    add_root(&mut c).await;
    c.user_add("alice", "alicepw", None)
        .await
        .expect("add alice");
    c.role_add("app").await.expect("role");
    c.role_grant_permission("app", Permission::read_write("/app/").with_prefix())
        .await
        .expect("grant");
    c.user_grant_role("alice", "app").await.expect("grant");
    c.auth_enable().await.expect("enable");
    let mut root = login(&server, "root", "rootpw").await;
    root.user_change_password("alice", "changed")
        .await
        .expect("change");
    drop((c, root));
    server.restart();
    let mut anonymous = server.client().await;
    assert_status(
        anonymous.put("/app/x", "v", None).await,
        Code::InvalidArgument,
        "etcdserver: user name is empty",
    );
    let mut alice = login(&server, "alice", "changed").await;
    alice
        .put("/app/x", "v", None)
        .await
        .expect("alice writes /app/");
    assert_status(
        alice.put("/other", "v", None).await,
        Code::PermissionDenied,
        DENIED,
    );
    let mut root = login(&server, "root", "rootpw").await;
    assert_eq!(
        root.role_list().await.expect("roles").roles(),
        &["app".to_owned(), "root".to_owned()]
    );
}
compat_test!(durable_across_restart);

/// Runs etcdctl: (exit code, stdout, the last line of stderr). Lines before it are the
/// client library's JSON retry logs, which carry timestamps and ports.
fn ctl(server: &Server, args: &[&str], stdin: &str) -> (Option<i32>, String, String) {
    let out = server.etcdctl_output(args, stdin);
    let stderr = String::from_utf8_lossy(&out.stderr);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr.trim_end().lines().last().unwrap_or("").to_owned(),
    )
}

async fn etcdctl_transcript(server: Server) {
    if !server.has_etcdctl() {
        return;
    }
    let ok = |args: &[&str], out: &str| {
        let (code, stdout, stderr) = ctl(&server, args, "");
        assert_eq!(
            (code, stdout.as_str()),
            (Some(0), out),
            "{args:?}: {stderr}"
        );
    };
    let fails = |args: &[&str], err: &str| {
        let (code, _, stderr) = ctl(&server, args, "");
        assert_eq!((code, stderr.trim_end()), (Some(1), err), "{args:?}");
    };
    tokio::task::block_in_place(|| {
        fails(
            &["auth", "enable"],
            "Error: etcdserver: root user does not exist",
        );
        ok(&["user", "add", "root:rootpw"], "User root created\n");
        fails(
            &["user", "add", "root:again"],
            "Error: etcdserver: user name already exists",
        );
        ok(&["user", "add", "alice:alicepw"], "User alice created\n");
        ok(
            &["user", "add", "bob", "--no-password"],
            "User bob created\n",
        );
        ok(&["user", "get", "alice"], "User: alice\nRoles:\n");
        fails(
            &["user", "get", "nobody"],
            "Error: etcdserver: user name not found",
        );
        ok(&["role", "add", "reader"], "Role reader created\n");
        fails(
            &["role", "add", "reader"],
            "Error: etcdserver: role name already exists",
        );
        fails(
            &["role", "get", "nobody"],
            "Error: etcdserver: role name not found",
        );
        fails(
            &["role", "delete", "nobody"],
            "Error: etcdserver: role name not found",
        );
        for perm in [
            &["role", "grant-permission", "reader", "read", "foo"][..],
            &[
                "role",
                "grant-permission",
                "reader",
                "readwrite",
                "k",
                "--prefix",
            ],
            &["role", "grant-permission", "reader", "write", "a", "z"],
            &[
                "role",
                "grant-permission",
                "reader",
                "read",
                "from",
                "--from-key",
            ],
        ] {
            ok(perm, "Role reader updated\n");
        }
        ok(
            &["role", "get", "reader"],
            "Role reader\nKV Read:\n\tfoo\n\t[from, <open ended>\n\t[k, l) (prefix k)\nKV Write:\n\t[a, z)\n\t[k, l) (prefix k)\n",
        );
        ok(
            &["role", "revoke-permission", "reader", "foo"],
            "Permission of key foo is revoked from role reader\n",
        );
        fails(
            &["role", "revoke-permission", "reader", "foo"],
            "Error: etcdserver: permission is not granted to the role",
        );
        ok(
            &["role", "revoke-permission", "reader", "k", "--prefix"],
            "Permission of range [k, l) is revoked from role reader\n",
        );
        for _ in 0..2 {
            ok(
                &["user", "grant-role", "alice", "reader"],
                "Role reader is granted to user alice\n",
            );
        }
        fails(
            &["user", "grant-role", "alice", "nope"],
            "Error: etcdserver: role name not found",
        );
        fails(
            &["user", "grant-role", "nobody", "reader"],
            "Error: etcdserver: user name not found",
        );
        ok(&["user", "get", "alice"], "User: alice\nRoles: reader\n");
        ok(&["user", "list"], "alice\nbob\nroot\n");
        ok(&["role", "list"], "reader\n");
        ok(
            &["user", "revoke-role", "alice", "reader"],
            "Role reader is revoked from user alice\n",
        );
        fails(
            &["user", "revoke-role", "alice", "reader"],
            "Error: etcdserver: role is not granted to the user",
        );
        let (code, stdout, stderr) = ctl(
            &server,
            &["user", "passwd", "alice", "--interactive=false"],
            "newpw\n",
        );
        assert_eq!(
            (code, stdout.as_str()),
            (Some(0), "Password updated\n"),
            "{stderr}"
        );
        ok(&["user", "delete", "bob"], "User bob deleted\n");
        ok(&["role", "add", "gone"], "Role gone created\n");
        ok(&["role", "delete", "gone"], "Role gone deleted\n");
        // etcdctl adds the root role and grants it when the server says root lacks it.
        ok(&["auth", "enable"], "Authentication Enabled\n");
        fails(&["user", "list"], "Error: etcdserver: user name is empty");
        fn as_root<'a>(args: &[&'a str]) -> Vec<&'a str> {
            [&["--user", "root:rootpw"][..], args].concat()
        }
        ok(&as_root(&["role", "list"]), "reader\nroot\n");
        for args in [
            &["user", "delete", "root"][..],
            &["user", "revoke-role", "root", "root"],
            &["role", "delete", "root"],
        ] {
            fails(&as_root(args), "Error: etcdserver: invalid auth management");
        }
        fails(
            &["--user", "alice:newpw", "user", "list"],
            "Error: etcdserver: permission denied",
        );
        let (code, _, stderr) = ctl(&server, &["--user", "alice:wrong", "user", "list"], "");
        assert_eq!(
            (code, stderr.trim_end()),
            (
                Some(2),
                "Error: etcdserver: authentication failed, invalid user ID or password"
            )
        );
        ok(&as_root(&["auth", "disable"]), "Authentication Disabled\n");
        ok(&["user", "list"], "alice\nroot\n");
    });
}
compat_test!(etcdctl_transcript);

//! Authorization of the local Lease service and of writes that attach a lease.
//!
//! `revoke_and_attach` runs against keywatch AND a real etcd 3.4.23 given the same users and
//! roles through etcdctl: revoking a lease needs write on every key attached to it, and a Put
//! attaching a lease needs write on the keys it already holds (etcd's `checkLeasePuts`).
//! `stricter_than_etcd` is keywatch-only: keywatch also requires a valid caller for every
//! Lease RPC, read on the keys for `TimeToLive{keys}` and the lease check for a put inside a
//! Txn, where etcd 3.4.23 (measured with etcdctl) lets an anonymous client grant, list, keep
//! alive and read `TimeToLive{keys}`, and skips the lease check in a txn.
//!
//! | user | role | grants |
//! |---|---|---|
//! | root | root | everything |
//! | alice | app | readwrite prefix `/app/` |
//! | bob | reader | read prefix `/app/` |

mod common;

use common::{Server, Target, assert_status};
use etcd_client::{Client, ConnectOptions, LeaseTimeToLiveOptions, PutOptions, Txn, TxnOp};
use tempfile::TempDir;
use tonic::Code;

const DENIED: &str = "etcdserver: permission denied";
const USER_EMPTY: &str = "etcdserver: user name is empty";

/// A server with the users above, and the config dir keywatch reads them from.
struct Secured {
    server: Server,
    _config: Option<TempDir>,
}

impl Secured {
    fn start(target: Target, name: &str) -> Secured {
        match target {
            Target::Keywatch => {
                let dir = tempfile::tempdir().expect("config dir");
                let path = dir.path().join("keywatch.toml");
                // The lowest bcrypt cost keeps the test fast; the format is the same.
                let hash = |pw: &str| watch_server::auth::hash_password(pw, 4).expect("hash");
                std::fs::write(
                    &path,
                    format!(
                        r#"
[auth.users.root]
password_hash = "{}"
roles = ["root"]

[auth.users.alice]
password_hash = "{}"
roles = ["app"]

[auth.users.bob]
password_hash = "{}"
roles = ["reader"]

[auth.roles.app]
permissions = [{{ type = "readwrite", prefix = "/app/" }}]

[auth.roles.reader]
permissions = [{{ type = "read", prefix = "/app/" }}]
"#,
                        hash("rootpw"),
                        hash("alicepw"),
                        hash("bobpw"),
                    ),
                )
                .expect("write the config");
                let path = path.display().to_string();
                let server = Server::start_with(target, name, &["--config", path.as_str()]);
                Secured {
                    server,
                    _config: Some(dir),
                }
            }
            Target::Etcd => {
                let server = Server::start(target, name);
                for args in [
                    &["user", "add", "root:rootpw"][..],
                    &["role", "add", "root"],
                    &["user", "grant-role", "root", "root"],
                    &["role", "add", "app"],
                    &[
                        "role",
                        "grant-permission",
                        "app",
                        "--prefix=true",
                        "readwrite",
                        "/app/",
                    ],
                    &["role", "add", "reader"],
                    &[
                        "role",
                        "grant-permission",
                        "reader",
                        "--prefix=true",
                        "read",
                        "/app/",
                    ],
                    &["user", "add", "alice:alicepw"],
                    &["user", "grant-role", "alice", "app"],
                    &["user", "add", "bob:bobpw"],
                    &["user", "grant-role", "bob", "reader"],
                    &["auth", "enable"],
                ] {
                    server.etcdctl(args);
                }
                Secured {
                    server,
                    _config: None,
                }
            }
        }
    }

    async fn client(&self, user: &str, password: &str) -> Client {
        let options = ConnectOptions::new()
            .with_user(user, password)
            .with_connect_timeout(common::GUARD);
        Client::connect([self.server.endpoint()], Some(options))
            .await
            .unwrap_or_else(|e| panic!("{}: connect as {user}: {e}", self.server.target))
    }

    /// A client that sends no token.
    async fn anonymous(&self) -> Client {
        self.server.client().await
    }
}

async fn run<F, Fut>(target: Target, name: &str, case: F)
where
    F: FnOnce(Secured) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    if target == Target::Etcd
        && !common::tools_present(&format!("{name}::etcd"), &["etcd", "etcdctl"], "etcd")
    {
        return;
    }
    let secured = tokio::task::block_in_place(|| Secured::start(target, name));
    case(secured).await;
}

async fn value(client: &mut Client, key: &str) -> Option<String> {
    let resp = client.get(key, None).await.expect("get");
    resp.kvs()
        .first()
        .map(|kv| String::from_utf8_lossy(kv.value()).into_owned())
}

/// Root's lease holding `/other/secret`, which alice and bob may not write.
async fn secret_lease(root: &mut Client) -> i64 {
    let id = root.lease_grant(60, None).await.expect("grant").id();
    root.put("/other/secret", "s", Some(PutOptions::new().with_lease(id)))
        .await
        .expect("leased put");
    id
}

mod revoke_and_attach {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn keywatch() {
        run(
            Target::Keywatch,
            "revoke_and_attach",
            super::revoke_and_attach,
        )
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn etcd() {
        run(Target::Etcd, "revoke_and_attach", super::revoke_and_attach).await;
    }
}

async fn revoke_and_attach(s: Secured) {
    let mut root = s.client("root", "rootpw").await;
    let secret = secret_lease(&mut root).await;
    let mut alice = s.client("alice", "alicepw").await;
    let mut anon = s.anonymous().await;

    // Revoking deletes the lease's keys: anonymous and non-writers are refused, the key stays.
    assert_status(
        anon.lease_revoke(secret).await,
        Code::InvalidArgument,
        USER_EMPTY,
    );
    assert_status(
        alice.lease_revoke(secret).await,
        Code::PermissionDenied,
        DENIED,
    );
    let mut bob = s.client("bob", "bobpw").await;
    let own = alice.lease_grant(60, None).await.expect("grant").id();
    alice
        .put("/app/l", "x", Some(PutOptions::new().with_lease(own)))
        .await
        .expect("alice attaches her own lease to her key");
    // Read on the key is not enough.
    assert_status(bob.lease_revoke(own).await, Code::PermissionDenied, DENIED);
    assert_eq!(
        value(&mut root, "/other/secret").await.as_deref(),
        Some("s")
    );
    assert_eq!(value(&mut root, "/app/l").await.as_deref(), Some("x"));

    // Attaching a lease to a key she may write needs write on the keys it already holds.
    assert_status(
        alice
            .put("/app/m", "x", Some(PutOptions::new().with_lease(secret)))
            .await,
        Code::PermissionDenied,
        DENIED,
    );
    assert_eq!(value(&mut root, "/app/m").await, None);

    // Write on every key: the revoke passes and deletes them.
    alice
        .lease_revoke(own)
        .await
        .expect("alice revokes her lease");
    assert_eq!(value(&mut root, "/app/l").await, None);
    // Root may revoke any lease.
    root.lease_revoke(secret).await.expect("root revokes");
    assert_eq!(value(&mut root, "/other/secret").await, None);
}

// keywatch only (see the file docs for what etcd 3.4.23 does instead).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stricter_than_etcd() {
    run(Target::Keywatch, "stricter_than_etcd", |s| async move {
        let mut root = s.client("root", "rootpw").await;
        let secret = secret_lease(&mut root).await;
        let with_keys = || Some(LeaseTimeToLiveOptions::new().with_keys());

        // Every Lease RPC needs a valid caller.
        let mut anon = s.anonymous().await;
        assert_status(
            anon.lease_grant(60, None).await,
            Code::InvalidArgument,
            USER_EMPTY,
        );
        assert_status(anon.leases().await, Code::InvalidArgument, USER_EMPTY);
        assert_status(
            anon.lease_time_to_live(secret, None).await,
            Code::InvalidArgument,
            USER_EMPTY,
        );
        assert_status(
            anon.lease_time_to_live(secret, with_keys()).await,
            Code::InvalidArgument,
            USER_EMPTY,
        );
        assert_status(
            anon.lease_keep_alive(secret).await,
            Code::InvalidArgument,
            USER_EMPTY,
        );

        // TimeToLive{keys} names the keys: read on each; without keys any caller may ask.
        let mut alice = s.client("alice", "alicepw").await;
        assert_status(
            alice.lease_time_to_live(secret, with_keys()).await,
            Code::PermissionDenied,
            DENIED,
        );
        let ttl = alice
            .lease_time_to_live(secret, None)
            .await
            .expect("time-to-live without keys");
        assert!(ttl.keys().is_empty());
        assert!(ttl.ttl() > 0);
        assert!(
            alice
                .leases()
                .await
                .expect("leases")
                .leases()
                .iter()
                .any(|l| l.id() == secret)
        );
        let own = alice.lease_grant(60, None).await.expect("grant").id();
        alice
            .put("/app/l", "x", Some(PutOptions::new().with_lease(own)))
            .await
            .expect("leased put");
        let (mut keeper, mut responses) = alice.lease_keep_alive(own).await.expect("keep-alive");
        keeper.keep_alive().await.expect("send keep-alive");
        let reply = responses
            .message()
            .await
            .expect("keep-alive reply")
            .expect("a reply");
        assert_eq!((reply.id(), reply.ttl()), (own, 60));
        // Bob reads /app/: he may list the keys of alice's lease.
        let mut bob = s.client("bob", "bobpw").await;
        let ttl = bob
            .lease_time_to_live(own, with_keys())
            .await
            .expect("bob reads the keys");
        assert_eq!(ttl.keys(), [b"/app/l".to_vec()]);

        // A put inside a txn attaching a lease gets the same check as a plain Put, in either
        // branch (etcd 3.4.23 lets this one through).
        for txn in [
            Txn::new().and_then([TxnOp::put(
                "/app/t",
                "x",
                Some(PutOptions::new().with_lease(secret)),
            )]),
            Txn::new().or_else([TxnOp::txn(Txn::new().and_then([TxnOp::put(
                "/app/t",
                "x",
                Some(PutOptions::new().with_lease(secret)),
            )]))]),
        ] {
            assert_status(alice.txn(txn).await, Code::PermissionDenied, DENIED);
        }
        assert_eq!(value(&mut root, "/app/t").await, None);
        alice
            .txn(Txn::new().and_then([TxnOp::put(
                "/app/t",
                "x",
                Some(PutOptions::new().with_lease(own)),
            )]))
            .await
            .expect("a txn attaching her own lease");
        let ttl = root
            .lease_time_to_live(secret, with_keys())
            .await
            .expect("root reads any lease");
        assert_eq!(ttl.keys(), [b"/other/secret".to_vec()]);
    })
    .await;
}

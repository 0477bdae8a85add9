//! etcd's Lock and Election services (the etcd-client crate's lock and election calls), and
//! etcdctl `lock` and `elect` (which run the same recipes client-side over KV, Watch and
//! Lease), against keywatch and a real etcd.
//!
//! Waiting is asserted without timing: a waiter's key is seen in the store (it is queued),
//! its call has not returned, and it returns once the holder goes.

use crate::common::{Server, assert_status, compat_test};
use etcd_client::{
    Client, GetOptions, LeaderKey, LockOptions, ProclaimOptions, ResignOptions, SortOrder,
    SortTarget,
};
use tonic::Code;

/// Keys under `prefix`, oldest first.
async fn keys(client: &mut Client, prefix: &str) -> Vec<String> {
    let resp = client
        .get(
            prefix,
            Some(
                GetOptions::new()
                    .with_prefix()
                    .with_sort(SortTarget::Create, SortOrder::Ascend),
            ),
        )
        .await
        .expect("get");
    resp.kvs()
        .iter()
        .map(|kv| String::from_utf8_lossy(kv.key()).into_owned())
        .collect()
}

/// Waits (bounded by the guard) until `prefix` holds `n` keys.
async fn until_keys(client: &mut Client, prefix: &str, n: usize) -> Vec<String> {
    let deadline = tokio::time::Instant::now() + crate::common::GUARD;
    loop {
        let k = keys(client, prefix).await;
        if k.len() == n {
            return k;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{prefix}: {n} keys never appeared: {k:?}"
        );
        tokio::task::yield_now().await;
    }
}

async fn lease(client: &mut Client, ttl: i64) -> i64 {
    client.lease_grant(ttl, None).await.expect("grant").id()
}

/// The result of a task that must end (bounded by the guard).
async fn finish<T>(task: tokio::task::JoinHandle<T>) -> T {
    tokio::time::timeout(crate::common::GUARD, task)
        .await
        .expect("the waiter never returned")
        .expect("the waiter panicked")
}

// Lock: the key layout, a second locker waiting for the first, Unlock, lease expiry
// releasing the lock, and the errors.
async fn lock_service(server: Server) {
    let mut c = server.client().await;
    let l1 = lease(&mut c, 60).await;
    let held = c
        .lock("mylock", Some(LockOptions::new().with_lease(l1)))
        .await
        .expect("lock");
    assert_eq!(held.key(), format!("mylock/{l1:x}").as_bytes());
    let l2 = lease(&mut c, 60).await;
    let mut c2 = server.client().await;
    let waiter = tokio::spawn(async move {
        c2.lock("mylock", Some(LockOptions::new().with_lease(l2)))
            .await
            .map(|r| r.key().to_vec())
    });
    let queued = until_keys(&mut c, "mylock/", 2).await;
    assert_eq!(queued[1], format!("mylock/{l2:x}"));
    assert!(!waiter.is_finished(), "the second locker did not wait");
    let unlocked = c.unlock(held.key()).await.expect("unlock");
    assert!(unlocked.header().is_some());
    let got = finish(waiter).await.expect("second lock");
    assert_eq!(got, format!("mylock/{l2:x}").into_bytes());
    // A waiter that goes away has its key deleted by the server.
    let l4 = lease(&mut c, 60).await;
    let mut c4 = server.client().await;
    let gone = tokio::spawn(async move {
        c4.lock("mylock", Some(LockOptions::new().with_lease(l4)))
            .await
            .map(drop)
    });
    until_keys(&mut c, "mylock/", 2).await;
    gone.abort();
    until_keys(&mut c, "mylock/", 1).await;
    // Unlock leaves the lease alone; unlocking a missing key succeeds.
    c.lease_time_to_live(l1, None)
        .await
        .expect("lease still there");
    c.unlock(held.key()).await.expect("unlock again");
    c.unlock(got).await.expect("unlock the second");

    // Lease expiry releases the lock to the next waiter.
    let short = lease(&mut c, 2).await;
    c.lock("expiring", Some(LockOptions::new().with_lease(short)))
        .await
        .expect("lock");
    let l3 = lease(&mut c, 60).await;
    let mut c3 = server.client().await;
    let waiter = tokio::spawn(async move {
        c3.lock("expiring", Some(LockOptions::new().with_lease(l3)))
            .await
            .map(|r| r.key().to_vec())
    });
    until_keys(&mut c, "expiring/", 2).await;
    let got = finish(waiter).await.expect("lock after expiry");
    assert_eq!(got, format!("expiring/{l3:x}").into_bytes());
    assert_eq!(
        keys(&mut c, "expiring/").await,
        vec![format!("expiring/{l3:x}")]
    );

    // Lease 0: the server grants a lease of its own.
    let own = c.lock("auto", None).await.expect("lock without a lease");
    let id = std::str::from_utf8(own.key())
        .unwrap()
        .strip_prefix("auto/")
        .map(|hex| i64::from_str_radix(hex, 16).expect("hex lease ID"))
        .expect("auto/<lease>");
    let ttl = c.lease_time_to_live(id, None).await.expect("ttl");
    assert_eq!(ttl.granted_ttl(), 60);

    assert_status(
        c.lock("x", Some(LockOptions::new().with_lease(12345)))
            .await,
        Code::Unknown,
        "etcdserver: requested lease not found",
    );
    assert_status(
        c.unlock("").await,
        Code::Unknown,
        "etcdserver: key is not provided",
    );
}
compat_test!(lock_service);

/// The value of the next Observe message.
async fn next(o: &mut etcd_client::ObserveStream) -> String {
    let msg = tokio::time::timeout(crate::common::GUARD, o.message())
        .await
        .expect("an Observe message")
        .expect("observe stream")
        .expect("observe stream ended");
    String::from_utf8_lossy(msg.kv().expect("kv").value()).into_owned()
}

// Election: Campaign, Leader, Observe, Proclaim, a second candidate waiting, Resign handing
// over, lease expiry ending leadership, and the errors.
async fn election_service(server: Server) {
    let mut c = server.client().await;
    assert_status(
        c.leader("myelec").await,
        Code::Unknown,
        "election: no leader",
    );
    let l1 = lease(&mut c, 60).await;
    let resp = c.campaign("myelec", "alpha", l1).await.expect("campaign");
    let leader = resp.leader().expect("leader key").clone();
    assert_eq!(leader.name(), b"myelec");
    assert_eq!(leader.key(), format!("myelec/{l1:x}").as_bytes());
    assert_eq!(leader.lease(), l1);
    let rev = resp.header().expect("header").revision();
    assert_eq!(leader.rev(), rev);
    let now = c.leader("myelec").await.expect("leader");
    assert_eq!(now.kv().expect("kv").value(), b"alpha");

    let mut observer = server.client().await;
    let mut observe = observer.observe("myelec").await.expect("observe");
    assert_eq!(next(&mut observe).await, "alpha");
    c.proclaim(
        "alpha2",
        Some(ProclaimOptions::new().with_leader(leader.clone())),
    )
    .await
    .expect("proclaim");
    assert_eq!(next(&mut observe).await, "alpha2");

    let l2 = lease(&mut c, 60).await;
    let mut c2 = server.client().await;
    let candidate = tokio::spawn(async move { c2.campaign("myelec", "beta", l2).await });
    until_keys(&mut c, "myelec/", 2).await;
    assert!(
        !candidate.is_finished(),
        "the second candidate did not wait"
    );
    c.resign(Some(ResignOptions::new().with_leader(leader.clone())))
        .await
        .expect("resign");
    let beta = finish(candidate).await.expect("second campaign");
    let beta = beta.leader().expect("leader key").clone();
    assert_eq!(beta.key(), format!("myelec/{l2:x}").as_bytes());
    assert_eq!(next(&mut observe).await, "beta");
    // The old leadership: Proclaim fails, Resign still succeeds.
    assert_status(
        c.proclaim(
            "stale",
            Some(ProclaimOptions::new().with_leader(leader.clone())),
        )
        .await,
        Code::Unknown,
        "election: not leader",
    );
    c.resign(Some(ResignOptions::new().with_leader(leader)))
        .await
        .expect("a second resign");
    // Campaigning again on a held key with another value proclaims it.
    let again = c.campaign("myelec", "beta2", l2).await.expect("recampaign");
    assert_eq!(again.leader().expect("leader").rev(), beta.rev());
    assert_eq!(next(&mut observe).await, "beta2");
    // Lease expiry (here a revoke) ends the leadership.
    c.lease_revoke(l2).await.expect("revoke");
    assert_status(
        c.leader("myelec").await,
        Code::Unknown,
        "election: no leader",
    );
    // A leader key with nothing in it: the proclaim's txn has an empty key.
    assert_status(
        c.proclaim(
            "x",
            Some(ProclaimOptions::new().with_leader(LeaderKey::new())),
        )
        .await,
        Code::Unknown,
        "etcdserver: key is not provided",
    );
}
compat_test!(election_service);

// etcdctl lock: the second locker prints its key only after the first's session lease
// expires (the first etcdctl is killed, so nothing revokes it).
async fn etcdctl_lock(server: Server) {
    if !server.has_etcdctl() {
        return;
    }
    let mut c = server.client().await;
    let mut first = server.etcdctl_spawn(&["lock", "--ttl=2", "mylock"]);
    let line = tokio::task::block_in_place(|| first.lines(1)).remove(0);
    assert!(line.starts_with("mylock/"), "{line}");
    let mut second = server.etcdctl_spawn(&["lock", "--ttl=2", "mylock"]);
    let queued = until_keys(&mut c, "mylock/", 2).await;
    assert_eq!(queued[0], line);
    drop(first);
    let got = tokio::task::block_in_place(|| second.lines(1)).remove(0);
    assert_eq!(got, queued[1]);
}
compat_test!(etcdctl_lock);

// etcdctl elect: a candidate waits behind the leader (here campaigned through the Election
// service), an observer (`elect -l`) prints each leader, and the candidate takes over when
// the leader's lease goes.
async fn etcdctl_elect(server: Server) {
    if !server.has_etcdctl() {
        return;
    }
    let mut c = server.client().await;
    let l1 = lease(&mut c, 60).await;
    c.campaign("myelec", "alpha", l1).await.expect("campaign");
    let mut listener = server.etcdctl_spawn(&["elect", "-l", "myelec"]);
    let seen = tokio::task::block_in_place(|| listener.lines(2));
    assert_eq!(seen, vec![format!("myelec/{l1:x}"), "alpha".to_owned()]);
    let mut beta = server.etcdctl_spawn(&["elect", "myelec", "beta"]);
    let queued = until_keys(&mut c, "myelec/", 2).await;
    c.lease_revoke(l1).await.expect("revoke");
    let won = tokio::task::block_in_place(|| beta.lines(2));
    assert_eq!(won, vec![queued[1].clone(), "beta".to_owned()]);
    let seen = tokio::task::block_in_place(|| listener.lines(2));
    assert_eq!(seen, won);
}
compat_test!(etcdctl_elect);

// With authentication on, Lock and Campaign need read and write under `<name>/`, Leader read:
// the recipe's KV calls are checked with the caller's token.
async fn lock_and_election_with_auth(server: Server) {
    let mut c = server.client().await;
    c.user_add("root", "rootpw", None).await.expect("add root");
    c.role_add("root").await.expect("role root");
    c.user_grant_role("root", "root").await.expect("grant root");
    c.user_add("alice", "alicepw", None)
        .await
        .expect("add alice");
    c.role_add("locks").await.expect("role");
    c.role_grant_permission(
        "locks",
        etcd_client::Permission::read_write("mine/").with_prefix(),
    )
    .await
    .expect("grant");
    c.user_grant_role("alice", "locks").await.expect("grant");
    c.auth_enable().await.expect("enable");
    let options = etcd_client::ConnectOptions::new().with_user("alice", "alicepw");
    let mut alice = Client::connect([server.endpoint()], Some(options))
        .await
        .expect("connect as alice");
    let held = alice
        .lock("mine", None)
        .await
        .expect("lock under a granted prefix");
    alice.unlock(held.key()).await.expect("unlock");
    let refused = alice.lock("theirs", None).await;
    let status = crate::common::status(refused);
    assert_eq!(
        status.message(),
        "etcdserver: permission denied",
        "{status:?}"
    );
    let status = crate::common::status(alice.leader("theirs").await);
    assert_eq!(
        status.message(),
        "etcdserver: permission denied",
        "{status:?}"
    );
    let mut anonymous = server.client().await;
    let status = crate::common::status(anonymous.lock("mine", None).await);
    assert_eq!(
        status.message(),
        "etcdserver: user name is empty",
        "{status:?}"
    );
}
compat_test!(lock_and_election_with_auth);

// A Lock or Campaign whose name is over --max-request-bytes (1.5 MiB by default) is refused
// as the recipe's put would be, with the in-process client's code Unknown, and nothing is
// written.
async fn recipes_refuse_large_requests(server: Server) {
    let mut c = server.client().await;
    let l = lease(&mut c, 60).await;
    let name = "n".repeat(1_600_000);
    assert_status(
        c.lock(name.as_str(), Some(LockOptions::new().with_lease(l)))
            .await,
        Code::Unknown,
        "etcdserver: request is too large",
    );
    assert_status(
        c.campaign(name.as_str(), "v", l).await,
        Code::Unknown,
        "etcdserver: request is too large",
    );
    assert!(keys(&mut c, "n").await.is_empty());
}
compat_test!(recipes_refuse_large_requests);

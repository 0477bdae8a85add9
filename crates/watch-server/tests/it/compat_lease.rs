//! Black-box compatibility suite for leases: every case runs against keywatch and a real etcd
//! (3.4.23) with the same assertions. Grant (TTL rules, client-chosen IDs, errors), keys
//! attached by put, keep-alive, time-to-live with keys, revoke and expiry (all of a lease's
//! keys deleted in one revision, seen by watchers with prev_kv), etcdctl's `lease` commands,
//! and (keywatch only) a kill -9 restart with live leases.
//!
//! Waiting for an expiry is event driven: the case waits for the DELETE on a watch, with the
//! harness's failure guard as the only timeout.

use crate::common::{Ev, Kv, Server, Watch, assert_status, compat_test, del};
use etcd_client::{
    Client, Compare, CompareOp, GetOptions, LeaseGrantOptions, LeaseTimeToLiveOptions, PutOptions,
    TxnOp, WatchOptions,
};
use tonic::Code;
use watch_proto::etcdserverpb as pb;

const NOT_FOUND: &str = "etcdserver: requested lease not found";

async fn raw_lease(server: &Server) -> pb::lease_client::LeaseClient<tonic::transport::Channel> {
    pb::lease_client::LeaseClient::connect(server.endpoint().to_owned())
        .await
        .expect("connect the raw lease client")
}

fn leased(key: &str, value: &str, create: i64, modified: i64, version: i64, lease: i64) -> Kv {
    Kv {
        lease,
        ..crate::common::kv(key, value, create, modified, version)
    }
}

async fn get_kv(c: &mut Client, key: &str) -> Option<Kv> {
    let r = c.get(key, None).await.expect("get");
    r.kvs().first().map(Kv::from)
}

async fn ttl_keys(c: &mut Client, id: i64) -> (i64, i64, Vec<String>) {
    let r = c
        .lease_time_to_live(id, Some(LeaseTimeToLiveOptions::new().with_keys()))
        .await
        .expect("time to live");
    let mut keys: Vec<String> = r
        .keys()
        .iter()
        .map(|k| String::from_utf8(k.clone()).expect("UTF-8 key"))
        .collect();
    // etcd lists a lease's keys in map order; compare them as a set.
    keys.sort();
    (r.ttl(), r.granted_ttl(), keys)
}

// [lease/lessor.go Grant, etcdserver/v3_server.go LeaseGrant] TTL below the minimum is raised
// to it (2 s with default election settings), above 9e9 s is OUT_OF_RANGE, a client-chosen ID
// is honoured and a second grant of it is FAILED_PRECONDITION; a grant creates no revision.
async fn grant_rules(server: Server) {
    let mut c = server.client().await;
    let g = c.lease_grant(1, None).await.expect("grant 1s");
    assert_eq!(g.ttl(), 2, "TTL below the minimum is raised to it");
    assert!(g.id() > 0, "server-chosen IDs are positive: {}", g.id());
    assert_eq!(g.header().expect("header").revision(), 1);
    let g = c.lease_grant(0, None).await.expect("grant 0s");
    assert_eq!(g.ttl(), 2);
    assert_status(
        c.lease_grant(9_000_000_001, None).await,
        Code::OutOfRange,
        "etcdserver: too large lease TTL",
    );
    let g = c.lease_grant(9_000_000_000, None).await.expect("max TTL");
    assert_eq!(g.ttl(), 9_000_000_000);
    let g = c
        .lease_grant(60, Some(LeaseGrantOptions::new().with_id(42)))
        .await
        .expect("grant ID 42");
    assert_eq!((g.id(), g.ttl()), (42, 60));
    assert_status(
        c.lease_grant(60, Some(LeaseGrantOptions::new().with_id(42)))
            .await,
        Code::FailedPrecondition,
        "etcdserver: lease already exists",
    );
    // Raw: a negative TTL is raised to the minimum too.
    let mut raw = raw_lease(&server).await;
    let g = raw
        .lease_grant(pb::LeaseGrantRequest { ttl: -5, id: 7 })
        .await
        .expect("negative TTL")
        .into_inner();
    assert_eq!((g.id, g.ttl), (7, 2));
    let mut ids: Vec<i64> = c
        .leases()
        .await
        .expect("leases")
        .leases()
        .iter()
        .map(|l| l.id())
        .collect();
    ids.sort();
    assert_eq!(ids.len(), 5, "{ids:?}");
    assert!(ids.contains(&42) && ids.contains(&7), "{ids:?}");
    assert_eq!(
        c.get("x", None)
            .await
            .expect("get")
            .header()
            .unwrap()
            .revision(),
        1
    );
}
compat_test!(grant_rules);

// [etcdserver/apply.go checkRequestPut, clientv3/integration/lease_test.go] a put attaches a
// key to a lease, `ignore_lease` keeps it, a put with another (or no) lease and a delete detach
// it; unknown leases are NOT_FOUND in puts and txns; revoking a lease without keys creates no
// revision.
async fn put_attach_detach(server: Server) {
    let mut c = server.client().await;
    let id = c
        .lease_grant(100, Some(LeaseGrantOptions::new().with_id(100)))
        .await
        .expect("grant")
        .id();
    let other = c
        .lease_grant(100, Some(LeaseGrantOptions::new().with_id(200)))
        .await
        .expect("grant")
        .id();
    let with = |l: i64| Some(PutOptions::new().with_lease(l));
    c.put("a", "1", with(id)).await.expect("put a"); // 2
    c.put("b", "1", with(id)).await.expect("put b"); // 3
    c.put("c", "1", with(id)).await.expect("put c"); // 4
    assert_eq!(
        get_kv(&mut c, "a").await,
        Some(leased("a", "1", 2, 2, 1, id))
    );
    let (ttl, granted, keys) = ttl_keys(&mut c, id).await;
    assert!((1..=100).contains(&ttl), "remaining {ttl}");
    assert_eq!(
        (granted, keys),
        (100, vec!["a".into(), "b".into(), "c".into()])
    );

    // ignore_lease keeps the lease; the value changes.
    c.put("a", "2", Some(PutOptions::new().with_ignore_lease()))
        .await
        .expect("ignore_lease"); // 5
    assert_eq!(
        get_kv(&mut c, "a").await,
        Some(leased("a", "2", 2, 5, 2, id))
    );
    assert_status(
        c.put(
            "a",
            "3",
            Some(PutOptions::new().with_ignore_lease().with_lease(id)),
        )
        .await,
        Code::InvalidArgument,
        "etcdserver: lease is provided",
    );
    // Moving a key to another lease or to none detaches it; so does deleting it.
    c.put("b", "2", with(other)).await.expect("move b"); // 6
    c.put("c", "2", None).await.expect("detach c"); // 7
    assert_eq!(ttl_keys(&mut c, id).await.2, vec!["a".to_owned()]);
    assert_eq!(ttl_keys(&mut c, other).await.2, vec!["b".to_owned()]);
    c.delete("a", None).await.expect("delete a"); // 8
    assert_eq!(ttl_keys(&mut c, id).await.2, Vec::<String>::new());

    // Unknown leases.
    assert_status(c.put("d", "1", with(999)).await, Code::NotFound, NOT_FOUND);
    let txn = etcd_client::Txn::new()
        .when([Compare::version("d", CompareOp::Equal, 0)])
        .and_then([TxnOp::put("d", "1", with(999))]);
    assert_status(c.txn(txn).await, Code::NotFound, NOT_FOUND);
    // The branch not taken is not checked (etcd checks the ops it applies).
    let txn = etcd_client::Txn::new()
        .when([Compare::version("d", CompareOp::Equal, 0)])
        .and_then([TxnOp::put("d", "1", None)])
        .or_else([TxnOp::put("d", "1", with(999))]);
    assert!(c.txn(txn).await.expect("txn").succeeded()); // 9

    // A lease without keys: revoking it creates no revision.
    let r = c.lease_revoke(id).await.expect("revoke");
    assert_eq!(r.header().expect("header").revision(), 9);
    assert_status(c.lease_revoke(id).await, Code::NotFound, NOT_FOUND);
    assert_status(c.put("e", "1", with(id)).await, Code::NotFound, NOT_FOUND);
    let r = c.get("zzz", None).await.expect("get");
    assert_eq!(r.header().expect("header").revision(), 9);
    // The other lease still holds b.
    assert_eq!(
        get_kv(&mut c, "b").await,
        Some(leased("b", "2", 3, 6, 2, other))
    );
}
compat_test!(put_attach_detach);

fn prefix_watch() -> Option<WatchOptions> {
    Some(WatchOptions::new().with_prefix().with_prev_key())
}

/// The DELETE events of one response, in key order (etcd orders a revoke's deletes by its
/// key map, which is unordered).
async fn one_revision_of_deletes(w: &mut Watch, n: usize) -> (i64, Vec<Ev>) {
    let resp = w.next().await;
    let mut evs = crate::common::events(&resp);
    assert_eq!(
        evs.len(),
        n,
        "all of the lease's keys in one response: {evs:?}"
    );
    evs.sort_by(|a, b| a.kv.key.cmp(&b.kv.key));
    (crate::common::rev(&resp), evs)
}

// [lease/lessor.go Revoke] revoke deletes every attached key in ONE revision; watchers get the
// DELETEs (with prev_kv when asked) in one response at that revision; unrelated keys stay. After
// it: TimeToLive answers TTL -1, keep-alive answers TTL 0 (the stream stays usable).
async fn revoke_deletes_in_one_revision(server: Server) {
    let mut c = server.client().await;
    let id = c.lease_grant(100, None).await.expect("grant").id();
    let (mut w, _) = Watch::open(&mut c, "/svc/", prefix_watch()).await;
    let with = Some(PutOptions::new().with_lease(id));
    c.put("/svc/a", "1", with.clone()).await.expect("put"); // 2
    c.put("/svc/b", "1", with.clone()).await.expect("put"); // 3
    c.put("/svc/c", "1", None).await.expect("put"); // 4
    c.put("/svc/a", "2", with).await.expect("put"); // 5
    assert_eq!(w.events(4).await.len(), 4);
    let r = c.lease_revoke(id).await.expect("revoke");
    assert_eq!(r.header().expect("header").revision(), 6);
    let (rev, evs) = one_revision_of_deletes(&mut w, 2).await;
    assert_eq!(rev, 6);
    assert_eq!(
        evs,
        vec![
            del("/svc/a", 6).prev(leased("/svc/a", "2", 2, 5, 2, id)),
            del("/svc/b", 6).prev(leased("/svc/b", "1", 3, 3, 1, id)),
        ]
    );
    let r = c
        .get("/svc/", Some(GetOptions::new().with_prefix()))
        .await
        .expect("get");
    let keys: Vec<Kv> = r.kvs().iter().map(Kv::from).collect();
    assert_eq!(keys, vec![crate::common::kv("/svc/c", "1", 4, 4, 1)]);

    let mut raw = raw_lease(&server).await;
    let t = raw
        .lease_time_to_live(pb::LeaseTimeToLiveRequest { id, keys: true })
        .await
        .expect("time to live of a revoked lease")
        .into_inner();
    assert_eq!((t.id, t.ttl, t.granted_ttl, t.keys.len()), (id, -1, 0, 0));
    assert_eq!(t.header.expect("header").revision, 6);

    // Keep-alive: an unknown lease gets TTL 0 and the stream goes on.
    let live = c.lease_grant(50, None).await.expect("grant").id();
    // etcd sends the stream's response headers with its first response, so the first request
    // is queued before the call is awaited.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(pb::LeaseKeepAliveRequest { id })
        .await
        .expect("send");
    let mut responses = raw
        .lease_keep_alive(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("keep-alive stream")
        .into_inner();
    for ask in [id, live, 12345] {
        if ask != id {
            tx.send(pb::LeaseKeepAliveRequest { id: ask })
                .await
                .expect("send");
        }
        let resp = tokio::time::timeout(crate::common::GUARD, responses.message())
            .await
            .expect("keep-alive response in time")
            .expect("keep-alive response")
            .expect("stream open");
        let expect = if ask == live { 50 } else { 0 };
        assert_eq!((resp.id, resp.ttl), (ask, expect));
        assert_eq!(resp.header.expect("header").revision, 6);
    }
}
compat_test!(revoke_deletes_in_one_revision);

// [lease expiry, TestWatchEventType] an expired lease's keys are deleted in one revision and
// watchers see ordinary DELETE events carrying prev_kv; a kept-alive lease outlives it.
async fn expiry_deletes_in_one_revision(server: Server) {
    let mut c = server.client().await;
    // 5 s, not the 2 s minimum: the three puts and the watch must land before it expires, even
    // on a loaded machine (the test then waits for the expiry, so longer costs only time).
    let short = c.lease_grant(5, None).await.expect("grant").id();
    let long = c.lease_grant(600, None).await.expect("grant").id();
    let (mut w, _) = Watch::open(&mut c, "/e/", prefix_watch()).await;
    let with = |l: i64| Some(PutOptions::new().with_lease(l));
    c.put("/e/1", "x", with(short)).await.expect("put"); // 2
    c.put("/e/2", "y", with(short)).await.expect("put"); // 3
    c.put("/e/3", "z", with(long)).await.expect("put"); // 4
    assert_eq!(w.events(3).await.len(), 3);
    // No clock here: the expiry is whatever comes next on the watch (guarded by GUARD).
    let (rev, evs) = one_revision_of_deletes(&mut w, 2).await;
    assert_eq!(rev, 5);
    assert_eq!(
        evs,
        vec![
            del("/e/1", 5).prev(leased("/e/1", "x", 2, 2, 1, short)),
            del("/e/2", 5).prev(leased("/e/2", "y", 3, 3, 1, short)),
        ]
    );
    assert_eq!(
        get_kv(&mut c, "/e/3").await,
        Some(leased("/e/3", "z", 4, 4, 1, long))
    );
    let (ttl, granted, keys) = ttl_keys(&mut c, long).await;
    assert!((1..=600).contains(&ttl), "remaining {ttl}");
    assert_eq!((granted, keys), (600, vec!["/e/3".to_owned()]));
}
compat_test!(expiry_deletes_in_one_revision);

// [clientv3 KeepAlive] keep-alive through the client: the first response carries the granted
// TTL; TimeToLive then reports at most that.
async fn keep_alive_renews(server: Server) {
    let mut c = server.client().await;
    let id = c.lease_grant(20, None).await.expect("grant").id();
    let (mut keeper, mut stream) = c.lease_keep_alive(id).await.expect("keep alive");
    keeper.keep_alive().await.expect("send keep-alive");
    let resp = tokio::time::timeout(crate::common::GUARD, stream.message())
        .await
        .expect("keep-alive response in time")
        .expect("keep-alive response")
        .expect("stream open");
    assert_eq!((resp.id(), resp.ttl()), (id, 20));
    let (ttl, granted, _) = ttl_keys(&mut c, id).await;
    assert!((1..=20).contains(&ttl) && granted == 20, "{ttl} {granted}");
    // The client refuses to keep an unknown lease alive (the server answered TTL 0).
    assert!(c.lease_keep_alive(777).await.is_err());
}
compat_test!(keep_alive_renews);

/// `lease <hex id> ...` lines with the ID replaced by `ID` and the remaining seconds by `R`
/// (the clock differs between runs).
fn portable(out: &str, id: &str) -> String {
    let out = out.replace(id, "ID");
    match out.find("remaining(") {
        Some(at) => {
            let digits = at + "remaining(".len();
            let end = out[digits..]
                .find(|c: char| !c.is_ascii_digit())
                .map_or(out.len(), |n| n + digits);
            format!("{}remaining(R{}", &out[..at], &out[end..])
        }
        None => out,
    }
}

// [tests/e2e/ctl_v3_lease_test.go] etcdctl lease grant / put --lease / timetolive --keys /
// keep-alive --once / list / revoke print the same text against both servers.
async fn etcdctl_lease(server: Server) {
    if !server.has_etcdctl() {
        return;
    }
    let ctl = |args: &[&str]| server.etcdctl(args);
    let out = ctl(&["lease", "grant", "100"]);
    let id = out
        .split_whitespace()
        .nth(1)
        .expect("lease <id> granted ...")
        .to_owned();
    assert_eq!(portable(&out, &id), "lease ID granted with TTL(100s)\n");
    assert_eq!(ctl(&["put", "--lease", &id, "k", "v"]), "OK\n");
    assert_eq!(
        portable(&ctl(&["lease", "timetolive", &id, "--keys"]), &id),
        "lease ID granted with TTL(100s), remaining(Rs), attached keys([k])\n"
    );
    assert_eq!(
        portable(&ctl(&["lease", "keep-alive", "--once", &id]), &id),
        "lease ID keepalived with TTL(100)\n"
    );
    assert_eq!(
        portable(&ctl(&["lease", "list"]), &id),
        "found 1 leases\nID\n"
    );
    assert_eq!(ctl(&["get", "k"]), "k\nv\n");
    assert_eq!(
        portable(&ctl(&["lease", "revoke", &id]), &id),
        "lease ID revoked\n"
    );
    assert_eq!(ctl(&["get", "k"]), "");
    assert_eq!(
        portable(&ctl(&["lease", "timetolive", &id]), &id),
        "lease ID already expired\n"
    );
    let out = server.etcdctl_output(&["lease", "revoke", &id], "");
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("Error: failed to revoke lease (etcdserver: requested lease not found)"),
        "{out:?}"
    );
    let out = server.etcdctl_output(&["put", "--lease", &id, "k", "v"], "");
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("Error: etcdserver: requested lease not found"),
        "{out:?}"
    );
}
compat_test!(etcdctl_lease);

// keywatch only (a restart is keywatch's own contract; etcd's restart needs its raft state):
// after kill -9, live leases and their keys are back, a lease's TTL is at most its granted TTL,
// keep-alive works, and a lease nobody renews still expires (its keys' DELETEs follow the last
// revision written before the kill).
async fn restart_with_live_leases(mut server: Server) {
    let mut c = server.client().await;
    let kept = c.lease_grant(300, None).await.expect("grant").id();
    let unrenewed = c.lease_grant(2, None).await.expect("grant").id();
    let with = |l: i64| Some(PutOptions::new().with_lease(l));
    c.put("/r/kept", "1", with(kept)).await.expect("put"); // 2
    c.put("/r/gone1", "1", with(unrenewed)).await.expect("put"); // 3
    c.put("/r/gone2", "1", with(unrenewed)).await.expect("put"); // 4
    drop(c);
    server.restart();
    let mut c = server.client().await;
    // Whether or not the short lease already expired, its DELETEs are revision 5.
    let (mut w, _) = Watch::open(
        &mut c,
        "/r/",
        Some(
            WatchOptions::new()
                .with_prefix()
                .with_prev_key()
                .with_start_revision(5),
        ),
    )
    .await;
    let (rev, evs) = one_revision_of_deletes(&mut w, 2).await;
    assert_eq!(rev, 5);
    assert_eq!(
        evs,
        vec![
            del("/r/gone1", 5).prev(leased("/r/gone1", "1", 3, 3, 1, unrenewed)),
            del("/r/gone2", 5).prev(leased("/r/gone2", "1", 4, 4, 1, unrenewed)),
        ]
    );
    assert_eq!(
        get_kv(&mut c, "/r/kept").await,
        Some(leased("/r/kept", "1", 2, 2, 1, kept))
    );
    let (ttl, granted, keys) = ttl_keys(&mut c, kept).await;
    assert!((1..=300).contains(&ttl), "remaining {ttl}");
    assert_eq!((granted, keys), (300, vec!["/r/kept".to_owned()]));
    let (mut keeper, mut stream) = c.lease_keep_alive(kept).await.expect("keep alive");
    keeper.keep_alive().await.expect("send");
    let resp = tokio::time::timeout(crate::common::GUARD, stream.message())
        .await
        .expect("in time")
        .expect("response")
        .expect("open");
    assert_eq!((resp.id(), resp.ttl()), (kept, 300));
    let ids: Vec<i64> = c
        .leases()
        .await
        .expect("leases")
        .leases()
        .iter()
        .map(|l| l.id())
        .collect();
    assert_eq!(ids, vec![kept]);
}
compat_test!(restart_with_live_leases, keywatch_only);

// A keep-alive sent on its stream, then a LeaseRevoke: the keep-alive is answered by the state
// when it arrived, the live lease, not by the revoke that came after it (issue 15: keywatch
// answered TTL 0 in 16 of 20 tries). keywatch only: etcd 3.4 itself answers TTL 0 now and
// then (1 in 20 measured), since it renews outside raft while the revoke goes through it, so
// the exact ordering cannot be asserted of it. keywatch holds a revoked lease as live for
// keep-alives until the revoke is acknowledged.
async fn keep_alive_then_revoke(server: Server) {
    let mut c = server.client().await;
    for i in 0..20 {
        let id = c.lease_grant(60, None).await.expect("grant").id();
        // A key makes the revoke a real write (a revision), as in the measured case.
        c.put(
            format!("/ka/{i}"),
            "v",
            Some(PutOptions::new().with_lease(id)),
        )
        .await
        .expect("put");
        let (mut keeper, mut stream) = c.lease_keep_alive(id).await.expect("keep alive");
        keeper.keep_alive().await.expect("send keep-alive");
        c.lease_revoke(id).await.expect("revoke");
        let resp = tokio::time::timeout(crate::common::GUARD, stream.message())
            .await
            .expect("in time")
            .expect("response")
            .expect("open");
        assert_eq!(
            (resp.id(), resp.ttl()),
            (id, 60),
            "try {i}: the keep-alive was sent before the revoke"
        );
    }
}
compat_test!(keep_alive_then_revoke, keywatch_only);

//! Black-box compatibility suite, KV side: Range options, Put/DeleteRange `prev_kv`, Txn
//! compares and branches, and the error statuses of bad requests, driven through the
//! `etcd-client` crate against keywatch and against a real etcd. Each case starts from a fresh
//! store (revision 1).

use crate::common::{Kv, Server, assert_status, compat_test, kv};
use etcd_client::{
    Client, Compare, CompareOp, DeleteOptions, GetOptions, GetResponse, PutOptions, SortOrder,
    SortTarget, Txn, TxnOp, TxnOpResponse,
};
use tonic::Code;

fn kvs(resp: &GetResponse) -> Vec<Kv> {
    resp.kvs().iter().map(Kv::from).collect()
}

fn keys(resp: &GetResponse) -> Vec<String> {
    resp.kvs().iter().map(|kv| Kv::from(kv).key).collect()
}

async fn get(c: &mut Client, key: &str, options: GetOptions) -> GetResponse {
    c.get(key, Some(options)).await.expect("get")
}

/// Writes a..e plus "ab" and returns the store at revision 8:
/// a=1@2, c=333@4, d=4444@5, e=5@6, b=b2@7 (created at 3), ab=x@8.
async fn seed(c: &mut Client) {
    for (key, value) in [
        ("a", "1"),
        ("b", "22"),
        ("c", "333"),
        ("d", "4444"),
        ("e", "5"),
        ("b", "b2"),
        ("ab", "x"),
    ] {
        c.put(key, value, None).await.expect("put");
    }
}

// Range: prefix, range, from-key, limit with more and count, count_only, keys_only, sort, a
// past revision, and the header (always the current revision).
async fn range_options(server: Server) {
    let mut c = server.client().await;
    seed(&mut c).await;
    let all = || GetOptions::new().with_all_keys();

    let resp = get(&mut c, "a", GetOptions::new().with_prefix()).await;
    assert_eq!(kvs(&resp), [kv("a", "1", 2, 2, 1), kv("ab", "x", 8, 8, 1)]);
    assert_eq!(resp.header().expect("header").revision(), 8);
    assert_eq!(
        keys(&get(&mut c, "b", GetOptions::new().with_range("d")).await),
        ["b", "c"]
    );
    assert_eq!(
        keys(&get(&mut c, "c", GetOptions::new().with_from_key()).await),
        ["c", "d", "e"]
    );
    let absent = get(&mut c, "zz", GetOptions::new()).await;
    assert_eq!(
        (absent.kvs().len(), absent.count(), absent.more()),
        (0, 0, false)
    );

    // limit: `more` says there is more, `count` ignores the limit.
    let limited = get(&mut c, "", all().with_limit(2)).await;
    assert_eq!(keys(&limited), ["a", "ab"]);
    assert_eq!((limited.more(), limited.count()), (true, 6));
    let exact = get(&mut c, "", all().with_limit(6)).await;
    assert_eq!(
        (exact.kvs().len(), exact.more(), exact.count()),
        (6, false, 6)
    );

    let counted = get(&mut c, "", all().with_count_only()).await;
    assert_eq!(
        (counted.kvs().len(), counted.count(), counted.more()),
        (0, 6, false)
    );

    let keys_only = get(&mut c, "b", GetOptions::new().with_keys_only()).await;
    assert_eq!(
        kvs(&keys_only),
        [Kv {
            value: String::new(),
            ..kv("b", "b2", 3, 7, 2)
        }],
        "keys_only drops only the value"
    );

    let sorted = |target, order| all().with_sort(target, order);
    assert_eq!(
        keys(&get(&mut c, "", sorted(SortTarget::Key, SortOrder::Descend)).await),
        ["e", "d", "c", "b", "ab", "a"]
    );
    assert_eq!(
        keys(&get(&mut c, "", sorted(SortTarget::Mod, SortOrder::Ascend)).await),
        ["a", "c", "d", "e", "b", "ab"]
    );
    assert_eq!(
        keys(&get(&mut c, "", sorted(SortTarget::Create, SortOrder::Descend)).await),
        ["ab", "e", "d", "c", "b", "a"]
    );
    assert_eq!(
        keys(&get(&mut c, "", sorted(SortTarget::Value, SortOrder::Ascend)).await),
        ["a", "c", "d", "e", "b", "ab"]
    );
    // Sort then limit: the first two of the sorted order, with `more`.
    let top = get(
        &mut c,
        "",
        sorted(SortTarget::Version, SortOrder::Descend).with_limit(1),
    )
    .await;
    assert_eq!(
        (keys(&top), top.more(), top.count()),
        (vec!["b".into()], true, 6)
    );

    // A past revision serves the state then; the header still says the current revision.
    let then = get(&mut c, "", all().with_revision(3)).await;
    assert_eq!(then.header().expect("header").revision(), 8);
    assert_eq!(kvs(&then), [kv("a", "1", 2, 2, 1), kv("b", "22", 3, 3, 1)]);
    assert_status(
        c.get("a", Some(GetOptions::new().with_revision(9))).await,
        Code::OutOfRange,
        "etcdserver: mvcc: required revision is a future revision",
    );
}
compat_test!(range_options);

// Put and DeleteRange with prev_kv; a delete over a range.
async fn put_and_delete_prev_kv(server: Server) {
    let mut c = server.client().await;
    seed(&mut c).await;

    let created = c
        .put("new", "n", Some(PutOptions::new().with_prev_key()))
        .await
        .expect("put");
    assert_eq!(
        created.prev_key().map(Kv::from),
        None,
        "no prev_kv for a create"
    );
    assert_eq!(created.header().expect("header").revision(), 9);
    let updated = c
        .put("c", "c2", Some(PutOptions::new().with_prev_key()))
        .await
        .expect("put");
    assert_eq!(
        updated.prev_key().map(Kv::from),
        Some(kv("c", "333", 4, 4, 1))
    );
    let plain = c.put("c", "c3", None).await.expect("put");
    assert_eq!(
        plain.prev_key().map(Kv::from),
        None,
        "prev_kv only when asked"
    );

    let deleted = c
        .delete(
            "a",
            Some(DeleteOptions::new().with_range("c").with_prev_key()),
        )
        .await
        .expect("delete");
    assert_eq!(deleted.deleted(), 3);
    assert_eq!(deleted.header().expect("header").revision(), 12);
    assert_eq!(
        deleted.prev_kvs().iter().map(Kv::from).collect::<Vec<_>>(),
        [
            kv("a", "1", 2, 2, 1),
            kv("ab", "x", 8, 8, 1),
            kv("b", "b2", 3, 7, 2)
        ]
    );
    assert_eq!(
        keys(&get(&mut c, "", GetOptions::new().with_all_keys()).await),
        ["c", "d", "e", "new"]
    );
    let again = c
        .delete("a", Some(DeleteOptions::new().with_prefix()))
        .await
        .expect("delete");
    assert_eq!(
        (again.deleted(), again.header().expect("header").revision()),
        (0, 12)
    );
}
compat_test!(put_and_delete_prev_kv);

// Txn compares on value, version, create and mod revision (present and absent keys), the
// success and failure branches, and one revision per txn.
async fn txn_compares_and_branches(server: Server) {
    let mut c = server.client().await;
    c.put("k", "v1", None).await.expect("put"); // 2
    c.put("k", "v2", None).await.expect("put"); // 3: create 2, mod 3, version 2

    let cases: Vec<(&str, Compare, bool)> = vec![
        (
            "value ==",
            Compare::value("k", CompareOp::Equal, "v2"),
            true,
        ),
        (
            "value == old",
            Compare::value("k", CompareOp::Equal, "v1"),
            false,
        ),
        (
            "value !=",
            Compare::value("k", CompareOp::NotEqual, "v1"),
            true,
        ),
        (
            "value >",
            Compare::value("k", CompareOp::Greater, "v1"),
            true,
        ),
        ("value <", Compare::value("k", CompareOp::Less, "v1"), false),
        (
            "version ==",
            Compare::version("k", CompareOp::Equal, 2),
            true,
        ),
        (
            "version == 1",
            Compare::version("k", CompareOp::Equal, 1),
            false,
        ),
        (
            "version >",
            Compare::version("k", CompareOp::Greater, 1),
            true,
        ),
        (
            "version <",
            Compare::version("k", CompareOp::Less, 2),
            false,
        ),
        (
            "create ==",
            Compare::create_revision("k", CompareOp::Equal, 2),
            true,
        ),
        (
            "create == 3",
            Compare::create_revision("k", CompareOp::Equal, 3),
            false,
        ),
        (
            "mod ==",
            Compare::mod_revision("k", CompareOp::Equal, 3),
            true,
        ),
        (
            "mod == 2",
            Compare::mod_revision("k", CompareOp::Equal, 2),
            false,
        ),
        (
            "mod <",
            Compare::mod_revision("k", CompareOp::Less, 4),
            true,
        ),
        (
            "mod >",
            Compare::mod_revision("k", CompareOp::Greater, 3),
            false,
        ),
        // An absent key has version, create and mod revision 0 (Kubernetes' create guard)...
        (
            "absent mod == 0",
            Compare::mod_revision("x", CompareOp::Equal, 0),
            true,
        ),
        (
            "absent create == 0",
            Compare::create_revision("x", CompareOp::Equal, 0),
            true,
        ),
        (
            "absent version == 0",
            Compare::version("x", CompareOp::Equal, 0),
            true,
        ),
        (
            "absent version > 0",
            Compare::version("x", CompareOp::Greater, 0),
            false,
        ),
        // ...but no value: any value compare against it fails.
        (
            "absent value == \"\"",
            Compare::value("x", CompareOp::Equal, ""),
            false,
        ),
        (
            "absent value != v",
            Compare::value("x", CompareOp::NotEqual, "v"),
            false,
        ),
    ];
    for (name, compare, want) in cases {
        // Success reads k, failure reads the absent key: the responses show the branch taken.
        let txn = Txn::new()
            .when([compare])
            .and_then([TxnOp::get("k", None)])
            .or_else([TxnOp::get("x", None)]);
        let resp = c.txn(txn).await.expect("txn");
        assert_eq!(resp.succeeded(), want, "{name}");
        assert_eq!(
            resp.header().expect("header").revision(),
            3,
            "{name}: reads only"
        );
        let ops = resp.op_responses();
        let [TxnOpResponse::Get(got)] = ops.as_slice() else {
            panic!("{name}: one range response expected, got {ops:?}")
        };
        assert_eq!(got.kvs().len(), usize::from(want), "{name}: branch taken");
    }

    // Several compares are ANDed.
    let both = Txn::new().when([
        Compare::value("k", CompareOp::Equal, "v2"),
        Compare::version("k", CompareOp::Equal, 1),
    ]);
    assert!(!c.txn(both).await.expect("txn").succeeded());

    // A successful txn with several writes is one revision; reads see its own writes.
    let txn = Txn::new()
        .when([Compare::value("k", CompareOp::Equal, "v2")])
        .and_then([
            TxnOp::put("a", "1", None),
            TxnOp::put("b", "2", Some(PutOptions::new().with_prev_key())),
            TxnOp::get("a", None),
        ]);
    let resp = c.txn(txn).await.expect("txn");
    assert!(resp.succeeded());
    assert_eq!(resp.header().expect("header").revision(), 4);
    let ops = resp.op_responses();
    let [
        TxnOpResponse::Put(_),
        TxnOpResponse::Put(_),
        TxnOpResponse::Get(read),
    ] = ops.as_slice()
    else {
        panic!("put, put, range responses expected, got {ops:?}")
    };
    assert_eq!(kvs(read), [kv("a", "1", 4, 4, 1)]);

    // The failure branch writes too.
    let txn = Txn::new()
        .when([Compare::value("k", CompareOp::Equal, "nope")])
        .and_then([TxnOp::put("never", "1", None)])
        .or_else([TxnOp::put("k", "v3", None), TxnOp::delete("a", None)]);
    let resp = c.txn(txn).await.expect("txn");
    assert!(!resp.succeeded());
    assert_eq!(resp.header().expect("header").revision(), 5);
    assert_eq!(
        kvs(&get(&mut c, "", GetOptions::new().with_all_keys()).await),
        [kv("b", "2", 4, 4, 1), kv("k", "v3", 2, 5, 3)]
    );
}
compat_test!(txn_compares_and_branches);

// Bad requests: empty key, the same key twice in a txn, a request over 1.5 MiB. A 1 MiB value
// round-trips. The store is unchanged by the rejected requests.
async fn invalid_requests_and_large_values(server: Server) {
    let mut c = server.client().await;
    assert_status(
        c.put("", "v", None).await,
        Code::InvalidArgument,
        "etcdserver: key is not provided",
    );
    assert_status(
        c.get("", None).await,
        Code::InvalidArgument,
        "etcdserver: key is not provided",
    );
    assert_status(
        c.delete("", None).await,
        Code::InvalidArgument,
        "etcdserver: key is not provided",
    );
    assert_status(
        c.txn(Txn::new().and_then([TxnOp::put("d", "1", None), TxnOp::put("d", "2", None)]))
            .await,
        Code::InvalidArgument,
        "etcdserver: duplicate key given in txn request",
    );
    assert_status(
        c.txn(Txn::new().and_then([TxnOp::put("d", "1", None), TxnOp::delete("d", None)]))
            .await,
        Code::InvalidArgument,
        "etcdserver: duplicate key given in txn request",
    );

    // etcd's default --max-txn-ops is 128.
    let ops: Vec<TxnOp> = (0..129)
        .map(|i| TxnOp::put(format!("op{i}"), "v", None))
        .collect();
    assert_status(
        c.txn(Txn::new().and_then(ops)).await,
        Code::InvalidArgument,
        "etcdserver: too many operations in txn request",
    );
    let ops: Vec<TxnOp> = (0..128)
        .map(|i| TxnOp::get(format!("op{i}"), None))
        .collect();
    let at_limit = c.txn(Txn::new().and_then(ops)).await.expect("128 ops");
    assert_eq!(at_limit.op_responses().len(), 128);

    let mib = "m".repeat(1024 * 1024);
    let put = c.put("big", mib.as_str(), None).await.expect("1 MiB put");
    assert_eq!(put.header().expect("header").revision(), 2);
    let got = get(&mut c, "big", GetOptions::new()).await;
    assert_eq!(kvs(&got), [kv("big", &mib, 2, 2, 1)]);

    // 1.6 MB: over etcd's default --max-request-bytes (1.5 MiB) and under the client's 2 MiB
    // send limit, so the server itself refuses it.
    let too_big = "t".repeat(1_600_000);
    assert_status(
        c.put("huge", too_big.as_str(), None).await,
        Code::InvalidArgument,
        "etcdserver: request is too large",
    );

    let after = get(
        &mut c,
        "",
        GetOptions::new().with_all_keys().with_keys_only(),
    )
    .await;
    assert_eq!(
        after.header().expect("header").revision(),
        2,
        "nothing else was written"
    );
    assert_eq!(keys(&after), ["big"]);
}
compat_test!(invalid_requests_and_large_values);

//! Black-box compatibility suite, watch side: the expectations of etcd's own watch tests
//! (reference `etcd-watch.md` §4), driven through the `etcd-client` crate against keywatch and
//! against a real etcd. Each case starts from a fresh store (revision 1).

use std::collections::BTreeMap;

use crate::common::{Ev, Server, Watch, compat_test, del, events, kv, put, rev};
use etcd_client::{Client, CompactionOptions, Txn, TxnOp, WatchFilterType, WatchOptions};

/// Put `key` and return the revision it was written at.
async fn put_rev(client: &mut Client, key: &str, value: &str) -> i64 {
    let resp = client.put(key, value, None).await.expect("put");
    resp.header().expect("put header").revision()
}

/// Reads responses until one carries an event on `stop_key`, and returns every event read,
/// grouped by watch id. Only for synced watches on one stream, whose responses arrive in
/// revision order, so a later write to `stop_key` is a barrier: anything sent for an earlier
/// revision (wanted or not) has arrived once its event has.
async fn events_until(w: &mut Watch, stop_key: &str) -> BTreeMap<i64, Vec<Ev>> {
    let mut by_id: BTreeMap<i64, Vec<Ev>> = BTreeMap::new();
    loop {
        let resp = w.next().await;
        assert!(
            !resp.created() && !resp.canceled() && !resp.events().is_empty(),
            "expected events, got {resp:?}"
        );
        let evs = events(&resp);
        let stop = evs.iter().any(|e| e.kv.key == stop_key);
        by_id.entry(resp.watch_id()).or_default().extend(evs);
        if stop {
            return by_id;
        }
    }
}

// [TestV3WatchFromCurrentRevision, TestV3WatchEmptyKey] Creation header, first revision,
// create/mod/version over several puts, empty values, identical values.
async fn watch_create_and_put_revisions(server: Server) {
    let mut c = server.client().await;
    let (mut w, created) = Watch::open(&mut c, "foo", None).await;
    assert_eq!(
        (created.watch_id(), created.canceled(), rev(&created)),
        (0, false, 1),
        "a fresh store is at revision 1 and auto watch ids start at 0: {created:?}"
    );
    assert!(events(&created).is_empty());

    for (i, value) in (0..).zip(["a", "b", "c"]) {
        assert_eq!(put_rev(&mut c, "foo", value).await, 2 + i);
        let resp = w.next().await;
        assert_eq!((resp.watch_id(), rev(&resp)), (0, 2 + i));
        assert_eq!(events(&resp), [put("foo", value, 2, 2 + i, 1 + i)]);
    }

    // An empty value is a normal PUT; an unchanged value still bumps revision and version.
    assert_eq!(put_rev(&mut c, "foo", "").await, 5);
    assert_eq!(events(&w.next().await), [put("foo", "", 2, 5, 4)]);
    assert_eq!(put_rev(&mut c, "foo", "").await, 6);
    assert_eq!(events(&w.next().await), [put("foo", "", 2, 6, 5)]);

    let got = c.get("foo", None).await.expect("get");
    assert_eq!(got.header().expect("header").revision(), 6);
    assert_eq!(
        got.kvs()
            .iter()
            .map(crate::common::Kv::from)
            .collect::<Vec<_>>(),
        [kv("foo", "", 2, 6, 5)]
    );
}
compat_test!(watch_create_and_put_revisions);

// [TestV3WatchFromCurrentRevision, TestV3WatchWrongRange] Key, prefix, range, from-key and
// all-keys selection on one stream; nothing is delivered to a watch that does not match.
async fn watch_key_selection(server: Server) {
    let mut c = server.client().await;
    let (mut w, first) = Watch::open(&mut c, "foo", None).await;
    let ids = [
        first.watch_id(),
        w.add("foo", Some(WatchOptions::new().with_prefix()))
            .await
            .watch_id(),
        w.add("b", Some(WatchOptions::new().with_range("d")))
            .await
            .watch_id(),
        w.add("m", Some(WatchOptions::new().with_from_key()))
            .await
            .watch_id(),
        w.add("", Some(WatchOptions::new().with_all_keys()))
            .await
            .watch_id(),
    ];
    assert_eq!(ids, [0, 1, 2, 3, 4], "auto ids go up by one");

    // key >= range_end: created and canceled at once, with no id.
    for (key, end) in [("a", "a"), ("b", "a")] {
        let resp = w.add(key, Some(WatchOptions::new().with_range(end))).await;
        assert!(resp.canceled(), "{key}..{end} is an empty range: {resp:?}");
        assert_eq!(resp.watch_id(), -1, "{resp:?}");
        assert!(!resp.cancel_reason().is_empty(), "{resp:?}");
    }

    for key in ["foo", "fooLong", "fop", "c", "d", "m", "zed"] {
        put_rev(&mut c, key, "v").await;
    }
    // One more write, matched only by the all-keys watch, closes the collection.
    c.put("\x00end", "v", None).await.expect("put");
    let got = events_until(&mut w, "\x00end").await;

    let keys = |id: i64| -> Vec<(String, i64)> {
        got.get(&id)
            .map(|evs| {
                evs.iter()
                    .map(|e| (e.kv.key.clone(), e.kv.modified))
                    .collect()
            })
            .unwrap_or_default()
    };
    let want = |list: &[(&str, i64)]| -> Vec<(String, i64)> {
        list.iter().map(|(k, r)| (k.to_string(), *r)).collect()
    };
    assert_eq!(keys(0), want(&[("foo", 2)]), "single key");
    assert_eq!(keys(1), want(&[("foo", 2), ("fooLong", 3)]), "prefix foo");
    assert_eq!(keys(2), want(&[("c", 5)]), "range [b, d)");
    assert_eq!(keys(3), want(&[("m", 7), ("zed", 8)]), "from key m");
    assert_eq!(
        keys(4),
        want(&[
            ("foo", 2),
            ("fooLong", 3),
            ("fop", 4),
            ("c", 5),
            ("d", 6),
            ("m", 7),
            ("zed", 8),
            ("\x00end", 9),
        ]),
        "all keys"
    );
    assert_eq!(got.len(), 5, "no responses for other ids: {got:?}");
}
compat_test!(watch_key_selection);

// [TestV3WatchWithFilter, TestV3WatchWithPrevKV] NOPUT / NODELETE filters, prev_kv on update
// and delete but not on create, and the DELETE event shape (key and mod_revision only).
async fn watch_filters_and_prev_kv(server: Server) {
    let mut c = server.client().await;
    let (mut w, _) = Watch::open(
        &mut c,
        "foo",
        Some(WatchOptions::new().with_filters([WatchFilterType::NoPut])),
    )
    .await;
    w.add(
        "foo",
        Some(WatchOptions::new().with_filters([WatchFilterType::NoDelete])),
    )
    .await;
    w.add("foo", Some(WatchOptions::new().with_prev_key()))
        .await;
    w.add("sentinel", None).await;

    put_rev(&mut c, "foo", "v1").await; // 2: create
    put_rev(&mut c, "foo", "v2").await; // 3: update
    let deleted = c.delete("foo", None).await.expect("delete"); // 4
    assert_eq!(
        (
            deleted.deleted(),
            deleted.header().expect("header").revision()
        ),
        (1, 4)
    );
    put_rev(&mut c, "foo", "v3").await; // 5: re-create, version restarts at 1
    put_rev(&mut c, "sentinel", "x").await; // 6
    let got = events_until(&mut w, "sentinel").await;

    // A NOPUT watch gets only the DELETE; the responses whose events were all filtered out are
    // not sent at all.
    assert_eq!(got.get(&0).map(Vec::as_slice), Some(&[del("foo", 4)][..]));
    assert_eq!(
        got.get(&1).map(Vec::as_slice),
        Some(
            &[
                put("foo", "v1", 2, 2, 1),
                put("foo", "v2", 2, 3, 2),
                put("foo", "v3", 5, 5, 1),
            ][..]
        )
    );
    assert_eq!(
        got.get(&2).map(Vec::as_slice),
        Some(
            &[
                put("foo", "v1", 2, 2, 1),
                put("foo", "v2", 2, 3, 2).prev(kv("foo", "v1", 2, 2, 1)),
                del("foo", 4).prev(kv("foo", "v2", 2, 3, 2)),
                put("foo", "v3", 5, 5, 1),
            ][..]
        )
    );
    assert_eq!(
        got.get(&3).map(Vec::as_slice),
        Some(&[put("sentinel", "x", 6, 6, 1)][..])
    );
    assert_eq!(got.len(), 4, "{got:?}");
}
compat_test!(watch_filters_and_prev_kv);

// [TestV3WatchMultipleEventsPutUnsynced, TestV3WatchFutureRevision] Catch-up from a past
// start_revision in revision order, then live with no gap or duplicate; a future start_revision.
async fn watch_history_and_future_start(server: Server) {
    let mut c = server.client().await;
    put_rev(&mut c, "a", "1").await; // 2
    put_rev(&mut c, "b", "1").await; // 3
    put_rev(&mut c, "a", "2").await; // 4
    put_rev(&mut c, "b", "2").await; // 5
    c.delete("a", None).await.expect("delete"); // 6

    let (mut w, created) = Watch::open(
        &mut c,
        "",
        Some(
            WatchOptions::new()
                .with_all_keys()
                .with_start_revision(1)
                .with_prev_key(),
        ),
    )
    .await;
    assert_eq!(rev(&created), 6, "created carries the current revision");
    // Catch-up may batch several revisions into one response (never split one revision); each
    // response's header is at least its last event's revision.
    let mut replay = Vec::new();
    while replay.len() < 5 {
        let resp = w.next().await;
        let evs = events(&resp);
        assert!(!evs.is_empty(), "{resp:?}");
        let last = evs.last().map(|e| e.kv.modified).unwrap_or_default();
        assert!(rev(&resp) >= last, "header below its events: {resp:?}");
        replay.extend(evs);
    }
    assert_eq!(
        replay,
        [
            put("a", "1", 2, 2, 1),
            put("b", "1", 3, 3, 1),
            put("a", "2", 2, 4, 2).prev(kv("a", "1", 2, 2, 1)),
            put("b", "2", 3, 5, 2).prev(kv("b", "1", 3, 3, 1)),
            del("a", 6).prev(kv("a", "2", 2, 4, 2)),
        ]
    );
    // Live after replay, with no gap and no duplicate.
    put_rev(&mut c, "c", "1").await; // 7
    assert_eq!(events(&w.next().await), [put("c", "1", 7, 7, 1)]);

    // A second stream from the middle of history.
    let (mut w2, _) = Watch::open(
        &mut c,
        "b",
        Some(WatchOptions::new().with_start_revision(4)),
    )
    .await;
    assert_eq!(
        w2.events(1).await,
        [(0, put("b", "2", 3, 5, 2))],
        "only revisions >= 4 of b"
    );

    // Future start: created at once at the current revision; the first event is the one at the
    // start revision even though the key changes before it.
    let (mut w3, created) = Watch::open(
        &mut c,
        "f",
        Some(WatchOptions::new().with_start_revision(10)),
    )
    .await;
    assert_eq!(rev(&created), 7);
    for (i, want) in (8..).zip([8, 9, 10, 11]) {
        assert_eq!(put_rev(&mut c, "f", &format!("v{i}")).await, want);
    }
    let first = w3.next().await;
    assert_eq!(rev(&first), 10, "{first:?}");
    assert_eq!(events(&first), [put("f", "v10", 8, 10, 3)]);
    assert_eq!(events(&w3.next().await), [put("f", "v11", 8, 11, 4)]);
}
compat_test!(watch_history_and_future_start);

// [TestWatchCompactRevision, TestWatchCompacted] Watching below the compaction point cancels
// the watch with compact_revision; at the compaction point it replays; KV errors around it.
async fn compaction(server: Server) {
    let mut c = server.client().await;
    for v in ["v2", "v3", "v4"] {
        put_rev(&mut c, "foo", v).await; // 2, 3, 4
    }
    c.delete("foo", None).await.expect("delete"); // 5
    put_rev(&mut c, "foo", "v6").await; // 6
    let compacted = c
        .compact(4, Some(CompactionOptions::new().with_physical()))
        .await
        .expect("compact");
    assert_eq!(
        compacted.header().expect("header").revision(),
        6,
        "compaction creates no revision"
    );

    // Below the compaction point: `created`, then a cancel carrying compact_revision (the Go
    // client turns it into ErrCompacted, etcdctl into "required revision has been compacted").
    let (mut w, created) = Watch::open(
        &mut c,
        "foo",
        Some(WatchOptions::new().with_start_revision(2)),
    )
    .await;
    assert!(!created.canceled(), "{created:?}");
    let canceled = w.next().await;
    assert!(canceled.canceled(), "{canceled:?}");
    assert_eq!(
        (canceled.watch_id(), canceled.compact_revision()),
        (created.watch_id(), 4),
        "{canceled:?}"
    );
    assert!(canceled.header().is_some(), "headers are always sent");
    assert!(events(&canceled).is_empty());

    // At the compaction point: the revision-4 event is still there. Its prev_kv (revision 3) is
    // compacted and left out; the DELETE's prev_kv (revision 4) is not.
    let (mut w, _) = Watch::open(
        &mut c,
        "foo",
        Some(WatchOptions::new().with_start_revision(4).with_prev_key()),
    )
    .await;
    let evs: Vec<Ev> = w.events(3).await.into_iter().map(|(_, e)| e).collect();
    assert_eq!(
        evs,
        [
            put("foo", "v4", 2, 4, 3),
            del("foo", 5).prev(kv("foo", "v4", 2, 4, 3)),
            put("foo", "v6", 6, 6, 1),
        ]
    );

    // KV side.
    let at4 = c
        .get("foo", Some(etcd_client::GetOptions::new().with_revision(4)))
        .await
        .expect("get at the compaction revision");
    assert_eq!(
        at4.kvs()
            .iter()
            .map(crate::common::Kv::from)
            .collect::<Vec<_>>(),
        [kv("foo", "v4", 2, 4, 3)]
    );
    crate::common::assert_status(
        c.get("foo", Some(etcd_client::GetOptions::new().with_revision(3)))
            .await,
        tonic::Code::OutOfRange,
        "etcdserver: mvcc: required revision has been compacted",
    );
    crate::common::assert_status(
        c.get("foo", Some(etcd_client::GetOptions::new().with_revision(7)))
            .await,
        tonic::Code::OutOfRange,
        "etcdserver: mvcc: required revision is a future revision",
    );
    crate::common::assert_status(
        c.compact(4, None).await,
        tonic::Code::OutOfRange,
        "etcdserver: mvcc: required revision has been compacted",
    );
    crate::common::assert_status(
        c.compact(7, None).await,
        tonic::Code::OutOfRange,
        "etcdserver: mvcc: required revision is a future revision",
    );
}
compat_test!(compaction);

// [TestDeleteEventDrop_Issue18089, TestStartWatcherFromCompactedRevision] Compacting exactly at
// a DELETE's revision keeps the tombstone, so a watch from there sees the DELETE.
async fn compaction_keeps_tombstone_at_compact_revision(server: Server) {
    let mut c = server.client().await;
    for v in ["v2", "v3", "v4"] {
        put_rev(&mut c, "foo", v).await; // 2, 3, 4
    }
    c.delete("foo", None).await.expect("delete"); // 5
    put_rev(&mut c, "foo", "v6").await; // 6
    c.compact(5, Some(CompactionOptions::new().with_physical()))
        .await
        .expect("compact");
    let (mut w, _) = Watch::open(
        &mut c,
        "foo",
        Some(WatchOptions::new().with_start_revision(5)),
    )
    .await;
    // A later write bounds the read, so a missing DELETE shows as a wrong list, not a wait.
    put_rev(&mut c, "foo", "v7").await; // 7
    let mut evs = Vec::new();
    while evs.last().is_none_or(|e: &Ev| e.kv.modified < 7) {
        evs.extend(events(&w.next().await));
    }
    assert_eq!(
        evs,
        [
            del("foo", 5),
            put("foo", "v6", 6, 6, 1),
            put("foo", "v7", 6, 7, 2)
        ]
    );
}
// etcd 3.4.23 drops this DELETE (etcd-io/etcd#18089, fixed in 3.4.34 by keeping the tombstone;
// also #19179, fixed in 3.4.36), so the case runs against keywatch only.
compat_test!(
    compaction_keeps_tombstone_at_compact_revision,
    keywatch_only
);

// [TestV3WatchMultipleWatchers*, TestV3WatchMultipleStreams*, TestV3WatchCancel*,
// TestWatcherRequestsCustomID] Several watches on one stream get one response each, tagged with
// their id; a cancel is acknowledged and ends delivery; ids are per stream.
async fn watch_multiplexing_and_cancel(server: Server) {
    let mut c = server.client().await;
    let (mut w, _) = Watch::open(&mut c, "foo", None).await;
    for _ in 0..3 {
        w.add("foo", None).await;
    }
    assert_eq!(
        w.add("fo", Some(WatchOptions::new().with_prefix()))
            .await
            .watch_id(),
        4
    );

    // Each put is a barrier for the previous one: responses come in revision order.
    put_rev(&mut c, "foo", "1").await; // 2
    let mut ids: Vec<i64> = Vec::new();
    for _ in 0..5 {
        let resp = w.next().await;
        assert_eq!(events(&resp), [put("foo", "1", 2, 2, 1)], "{resp:?}");
        ids.push(resp.watch_id());
    }
    ids.sort_unstable();
    assert_eq!(ids, [0, 1, 2, 3, 4], "one response per watch");
    put_rev(&mut c, "fo", "1").await; // 3
    let resp = w.next().await;
    assert_eq!(
        (resp.watch_id(), events(&resp)),
        (4, vec![put("fo", "1", 3, 3, 1)])
    );

    w.stream.cancel(0).await.expect("send cancel");
    let canceled = w.next().await;
    assert!(
        canceled.canceled() && !canceled.created() && canceled.watch_id() == 0,
        "{canceled:?}"
    );
    // Cancelling an unknown id is ignored: no response (checked by the put below being next).
    w.stream.cancel(99).await.expect("send cancel");

    // A client-chosen id is honoured; a duplicate is refused with created + canceled, id -1.
    let custom = w
        .add("foo", Some(WatchOptions::new().with_watch_id(100)))
        .await;
    assert_eq!((custom.watch_id(), custom.canceled()), (100, false));
    let dup = w
        .add("foo", Some(WatchOptions::new().with_watch_id(100)))
        .await;
    assert!(dup.canceled() && dup.watch_id() == -1, "{dup:?}");
    assert!(!dup.cancel_reason().is_empty(), "{dup:?}");
    // Auto ids keep increasing: the cancelled id 0 is not handed out again.
    let auto = w.add("foo", None).await.watch_id();
    assert!(auto > 4 && auto != 100, "auto id {auto}");

    // A second stream numbers its watches from 0 again and sees the same event.
    let (mut w2, created2) = Watch::open(&mut c, "foo", None).await;
    assert_eq!(created2.watch_id(), 0);

    put_rev(&mut c, "foo", "2").await; // 4
    let want = put("foo", "2", 2, 4, 2);
    let mut ids: Vec<i64> = Vec::new();
    for _ in 0..6 {
        let resp = w.next().await;
        assert_eq!(events(&resp), std::slice::from_ref(&want), "{resp:?}");
        ids.push(resp.watch_id());
    }
    ids.sort_unstable();
    let mut want_ids = vec![1, 2, 3, 4, 100, auto];
    want_ids.sort_unstable();
    assert_eq!(ids, want_ids, "no event for the cancelled watch");
    let resp = w2.next().await;
    assert_eq!((resp.watch_id(), events(&resp)), (0, vec![want]));

    // Nothing more on the first stream: the next response is for the next write.
    put_rev(&mut c, "fo", "2").await; // 5
    let resp = w.next().await;
    assert_eq!(
        (resp.watch_id(), events(&resp)),
        (4, vec![put("fo", "2", 3, 5, 2)])
    );
}
compat_test!(watch_multiplexing_and_cancel);

// [TestV3WatchMultipleEventsTxn*] A txn is one revision: its events arrive in one response, in
// op order. Writes that change nothing (a delete of nothing, a read-only txn) create no
// revision and no event.
async fn watch_txn_grouping(server: Server) {
    let mut c = server.client().await;
    let (mut w, _) = Watch::open(&mut c, "k", Some(WatchOptions::new().with_prefix())).await;

    let txn = Txn::new().and_then([
        TxnOp::put("k1", "a", None),
        TxnOp::put("k2", "b", None),
        TxnOp::put("k3", "c", None),
    ]);
    let resp = c.txn(txn).await.expect("txn");
    assert_eq!(resp.header().expect("header").revision(), 2);
    let got = w.next().await;
    assert_eq!(rev(&got), 2);
    assert_eq!(
        events(&got),
        [
            put("k1", "a", 2, 2, 1),
            put("k2", "b", 2, 2, 1),
            put("k3", "c", 2, 2, 1),
        ],
        "one response, op order"
    );

    let txn = Txn::new().and_then([TxnOp::put("k4", "d", None), TxnOp::delete("k1", None)]);
    assert_eq!(
        c.txn(txn)
            .await
            .expect("txn")
            .header()
            .expect("header")
            .revision(),
        3
    );
    assert_eq!(
        events(&w.next().await),
        [put("k4", "d", 3, 3, 1), del("k1", 3)]
    );

    let nothing = c.delete("k-absent", None).await.expect("delete");
    assert_eq!(
        (
            nothing.deleted(),
            nothing.header().expect("header").revision()
        ),
        (0, 3),
        "a delete that matches nothing does not bump the revision"
    );
    let nothing = c
        .delete(
            "k5",
            Some(etcd_client::DeleteOptions::new().with_range("k9")),
        )
        .await
        .expect("delete range");
    assert_eq!(
        (
            nothing.deleted(),
            nothing.header().expect("header").revision()
        ),
        (0, 3)
    );
    let read_only = c
        .txn(Txn::new().and_then([TxnOp::get("k2", None)]))
        .await
        .expect("txn");
    assert_eq!(read_only.header().expect("header").revision(), 3);

    // Barrier: the next response is this write's, so the above produced no event.
    assert_eq!(put_rev(&mut c, "k-end", "e").await, 4);
    assert_eq!(events(&w.next().await), [put("k-end", "e", 4, 4, 1)]);
}
compat_test!(watch_txn_grouping);

// [TestWatchRequestProgress] A progress request answers with an event-less response at the
// current revision, including writes the stream does not watch.
async fn watch_progress_request(server: Server) {
    let mut c = server.client().await;
    let (mut w, _) = Watch::open(&mut c, "foo", None).await;
    put_rev(&mut c, "foo", "1").await; // 2
    put_rev(&mut c, "foo", "2").await; // 3
    assert_eq!(w.events(2).await.len(), 2);

    w.stream.request_progress().await.expect("send progress");
    let progress = w.next().await;
    assert_progress(&progress, 3);

    put_rev(&mut c, "other", "x").await; // 4, not watched
    w.stream.request_progress().await.expect("send progress");
    assert_progress(&w.next().await, 4);
}
compat_test!(watch_progress_request);

// Three progress requests in a row get three answers, as etcd (3.4.23 and later) sends one per
// request; pending requests are coalesced in keywatch but each is still answered.
async fn watch_progress_requests_each_answered(server: Server) {
    let mut c = server.client().await;
    let (mut w, _) = Watch::open(&mut c, "foo", None).await;
    let at = put_rev(&mut c, "foo", "1").await;
    assert_eq!(w.events(1).await.len(), 1);
    for _ in 0..3 {
        w.stream.request_progress().await.expect("send progress");
    }
    for _ in 0..3 {
        assert_progress(&w.next().await, at);
    }
    // Nothing more: the next response is the next write's event.
    let next = put_rev(&mut c, "foo", "2").await;
    assert_eq!(
        events(&w.next().await)
            .iter()
            .map(|e| e.kv.modified)
            .collect::<Vec<_>>(),
        [next]
    );
}
compat_test!(watch_progress_requests_each_answered);

/// A progress notification as the Go client recognises one (`IsProgressNotify`), sent for the
/// whole stream (`watch_id` -1), at revision `at`.
fn assert_progress(resp: &etcd_client::WatchResponse, at: i64) {
    assert!(
        resp.events().is_empty()
            && !resp.created()
            && !resp.canceled()
            && resp.compact_revision() == 0,
        "not a progress notification: {resp:?}"
    );
    assert_eq!((resp.watch_id(), rev(resp)), (-1, at), "{resp:?}");
}

// [TestV3WatchProgressWaitsForSync, etcd-io/etcd#15220] A progress response must not overtake
// an event: after an acknowledged put, a progress request is answered after that put's event.
// etcd 3.4.23 sends manual progress on its control channel, which can overtake pending events
// (#15220, fixed in 3.4.25 by PR #15237): a race there, so the case runs against keywatch only.
async fn watch_progress_ordered_with_events(server: Server) {
    let mut c = server.client().await;
    let (mut w, _) = Watch::open(&mut c, "foo", None).await;
    for i in 0..20 {
        let at = put_rev(&mut c, "foo", "v").await;
        w.stream.request_progress().await.expect("send progress");
        let first = w.next().await;
        assert_eq!(
            events(&first)
                .iter()
                .map(|e| e.kv.modified)
                .collect::<Vec<_>>(),
            [at],
            "round {i}: the event comes first: {first:?}"
        );
        assert_progress(&w.next().await, at);
    }
}
compat_test!(watch_progress_ordered_with_events, keywatch_only);

// [TestV3WatchCurrentPutOverlap] Watches created while another task writes: each watch's first
// event is exactly at its created revision + 1 and its events have no gap up to the last write.
async fn watch_no_gap_under_concurrent_puts(server: Server) {
    let mut c = server.client().await;
    let mut writer = server.client().await;
    let puts = tokio::spawn(async move {
        let mut last = 0;
        for i in 0..200 {
            last = put_rev(&mut writer, "foo", &format!("v{i}")).await;
        }
        last
    });
    let mut watches = Vec::new();
    for _ in 0..5 {
        let (w, created) = Watch::open(&mut c, "foo", None).await;
        watches.push((w, rev(&created)));
    }
    let last = puts.await.expect("writer task");
    for (w, created_at) in &mut watches {
        let mut next = *created_at + 1;
        while next <= last {
            let resp = w.next().await;
            for ev in events(&resp) {
                assert_eq!(ev.kv.modified, next, "gap or duplicate after {created_at}");
                next += 1;
            }
        }
    }
}
compat_test!(watch_no_gap_under_concurrent_puts);

// [TestWatchFragmentEnable] A catch-up over more data than one message may carry (six 1 MiB
// values, about 6 MiB, against the client's 4 MiB receive limit) arrives complete when the
// watch allows fragments; no response is over the limit, or the stream would fail.
async fn watch_fragmented_catch_up(server: Server) {
    let mut c = server.client().await;
    let value = "x".repeat(1024 * 1024);
    for i in 0..6 {
        put_rev(&mut c, &format!("big{i}"), &value).await;
    }
    let (mut w, _) = Watch::open(
        &mut c,
        "big",
        Some(
            WatchOptions::new()
                .with_prefix()
                .with_start_revision(1)
                .with_fragment(),
        ),
    )
    .await;
    let got = w.events(6).await;
    let keys: Vec<String> = got.iter().map(|(_, e)| e.kv.key.clone()).collect();
    assert_eq!(keys, ["big0", "big1", "big2", "big3", "big4", "big5"]);
    assert!(got.iter().all(|(_, e)| e.kv.value == value));
}
compat_test!(watch_fragmented_catch_up);

// Restart keeps data and revisions: values, create/mod revisions, history and the revision
// sequence survive a kill (SIGKILL) and restart on the same data dir.
async fn restart_keeps_data_and_revisions(mut server: Server) {
    let mut c = server.client().await;
    put_rev(&mut c, "a", "1").await; // 2
    put_rev(&mut c, "b", "1").await; // 3
    put_rev(&mut c, "a", "2").await; // 4
    c.delete("b", None).await.expect("delete"); // 5
    drop(c);

    server.restart();
    let mut c = server.client().await;
    let got = c
        .get("", Some(etcd_client::GetOptions::new().with_all_keys()))
        .await
        .expect("get");
    assert_eq!(got.header().expect("header").revision(), 5);
    assert_eq!(
        got.kvs()
            .iter()
            .map(crate::common::Kv::from)
            .collect::<Vec<_>>(),
        [kv("a", "2", 2, 4, 2)]
    );
    let status = c.status().await.expect("status");
    assert_eq!(status.header().expect("header").revision(), 5);

    assert_eq!(put_rev(&mut c, "c", "1").await, 6, "the sequence continues");
    let (mut w, _) = Watch::open(
        &mut c,
        "",
        Some(WatchOptions::new().with_all_keys().with_start_revision(1)),
    )
    .await;
    let evs: Vec<Ev> = w.events(5).await.into_iter().map(|(_, e)| e).collect();
    assert_eq!(
        evs,
        [
            put("a", "1", 2, 2, 1),
            put("b", "1", 3, 3, 1),
            put("a", "2", 2, 4, 2),
            del("b", 5),
            put("c", "1", 6, 6, 1),
        ]
    );
    drop((w, c));

    // A compaction survives a restart too: history below it stays gone, the rest stays.
    let mut c = server.client().await;
    c.compact(4, Some(CompactionOptions::new().with_physical()))
        .await
        .expect("compact");
    drop(c);
    server.restart();
    let mut c = server.client().await;
    crate::common::assert_status(
        c.get("a", Some(etcd_client::GetOptions::new().with_revision(3)))
            .await,
        tonic::Code::OutOfRange,
        "etcdserver: mvcc: required revision has been compacted",
    );
    let (mut w, created) = Watch::open(
        &mut c,
        "a",
        Some(WatchOptions::new().with_start_revision(2)),
    )
    .await;
    let canceled = w.next().await;
    assert!(canceled.canceled(), "{canceled:?}");
    assert_eq!(
        (canceled.watch_id(), canceled.compact_revision()),
        (created.watch_id(), 4)
    );
    let (mut w, _) = Watch::open(
        &mut c,
        "a",
        Some(WatchOptions::new().with_start_revision(4)),
    )
    .await;
    assert_eq!(w.events(1).await, [(0, put("a", "2", 2, 4, 2))]);
    assert_eq!(
        put_rev(&mut c, "d", "1").await,
        7,
        "compaction created no revision"
    );
}
compat_test!(restart_keeps_data_and_revisions);

/// Server flags for a short periodic progress interval.
fn fast_progress(target: crate::common::Target) -> Vec<&'static str> {
    match target {
        crate::common::Target::Etcd => {
            vec!["--experimental-watch-progress-notify-interval", "300ms"]
        }
        crate::common::Target::Keywatch => vec!["--progress-interval", "300ms"],
    }
}

// [TestWatchWithProgressNotify, TestConfigurableWatchProgressNotifyInterval] An idle watch with
// progress_notify gets event-less responses tagged with its own id at the current revision; a
// watch without it on the same stream gets none.
async fn watch_periodic_progress(server: Server) {
    let mut c = server.client().await;
    let (mut w, _) = Watch::open(
        &mut c,
        "foo",
        Some(WatchOptions::new().with_progress_notify()),
    )
    .await;
    w.add("bar", None).await;

    // The interval decides when, not whether: wait for the first one (failure guard only).
    let first = w.next().await;
    assert_periodic_progress(&first, 0, 1);

    // Any response before the put's event is another progress for watch 0, never for watch 1.
    assert_eq!(put_rev(&mut c, "bar", "x").await, 2);
    loop {
        let resp = w.next().await;
        if resp.events().is_empty() {
            assert_periodic_progress(&resp, 0, 1);
            continue;
        }
        assert_eq!(
            (resp.watch_id(), events(&resp)),
            (1, vec![put("bar", "x", 2, 2, 1)])
        );
        break;
    }
    // After an unwatched write, the next periodic notification carries the new revision.
    loop {
        let resp = w.next().await;
        assert!(resp.events().is_empty(), "{resp:?}");
        if rev(&resp) == 2 {
            assert_periodic_progress(&resp, 0, 2);
            break;
        }
        assert_periodic_progress(&resp, 0, 1);
    }
}
compat_test!(watch_periodic_progress, flags = fast_progress);

fn assert_periodic_progress(resp: &etcd_client::WatchResponse, id: i64, at: i64) {
    assert!(
        resp.events().is_empty()
            && !resp.created()
            && !resp.canceled()
            && resp.compact_revision() == 0,
        "not a progress notification: {resp:?}"
    );
    assert_eq!((resp.watch_id(), rev(resp)), (id, at), "{resp:?}");
}

// [TestV3WatchProgressWaitsForSync] A manual progress request on a stream with a catching-up
// watch is answered only once every event up to the reported revision has been delivered
// (Bookmarkable). Current etcd drops a request made while unsynced, so the client asks again
// once it has everything: that one must be answered at the current revision.
// etcd 3.4.23 answers at once, ahead of the catch-up (etcd-io/etcd#15220, fixed in 3.4.25 by
// PR #15237), so the case runs against keywatch only.
async fn watch_progress_waits_for_catch_up(server: Server) {
    let mut c = server.client().await;
    let mut last = 0;
    for i in 0..300 {
        last = put_rev(&mut c, &format!("k{}", i % 7), "v").await;
    }
    let (mut w, _) = Watch::open(
        &mut c,
        "k",
        Some(WatchOptions::new().with_prefix().with_start_revision(1)),
    )
    .await;
    w.stream.request_progress().await.expect("send progress");
    let mut seen = 1;
    while seen < last {
        let resp = w.next().await;
        if resp.events().is_empty() {
            assert_progress(&resp, rev(&resp));
            assert!(
                rev(&resp) <= seen,
                "progress at {} before the events up to it (delivered up to {seen})",
                rev(&resp)
            );
            continue;
        }
        for ev in events(&resp) {
            assert_eq!(ev.kv.modified, seen + 1, "gap or duplicate");
            seen += 1;
        }
    }
    w.stream.request_progress().await.expect("send progress");
    loop {
        let resp = w.next().await;
        assert!(resp.events().is_empty(), "no events remain: {resp:?}");
        // The first request may still be answered (at a revision already delivered).
        if rev(&resp) == last {
            assert_progress(&resp, last);
            break;
        }
        assert_progress(&resp, rev(&resp));
    }
}
compat_test!(watch_progress_waits_for_catch_up, keywatch_only);

// A negative start_revision is refused at creation like a compacted one: created + canceled,
// watch_id -1, with the compacted error as the reason. etcd 3.4.23 instead created the watch
// and cancelled it with compact_revision (fixed by PRs #20707/#20709/#20711 in 3.6.6, 3.5.24 and
// 3.4.38), so the case runs against keywatch only.
async fn watch_negative_start_revision(server: Server) {
    let mut c = server.client().await;
    put_rev(&mut c, "foo", "1").await;
    let (_w, resp) = Watch::open(
        &mut c,
        "foo",
        Some(WatchOptions::new().with_start_revision(-1)),
    )
    .await;
    assert!(resp.canceled(), "{resp:?}");
    assert_eq!(resp.watch_id(), -1, "{resp:?}");
    assert_eq!(
        resp.cancel_reason(),
        "etcdserver: mvcc: required revision has been compacted",
        "{resp:?}"
    );
}
compat_test!(watch_negative_start_revision, keywatch_only);

/// Sends `frames` (each an encoded message, possibly not a valid one) on a Watch stream as raw
/// gRPC messages, half-closes, and returns how the stream ended.
async fn raw_watch(server: &Server, frames: Vec<bytes::Bytes>) -> tonic::Status {
    use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

    /// Messages as raw bytes in both directions.
    #[derive(Default)]
    struct Raw;
    impl Encoder for Raw {
        type Item = bytes::Bytes;
        type Error = tonic::Status;
        fn encode(
            &mut self,
            item: bytes::Bytes,
            dst: &mut EncodeBuf<'_>,
        ) -> Result<(), Self::Error> {
            bytes::BufMut::put(dst, item);
            Ok(())
        }
    }
    impl Decoder for Raw {
        type Item = bytes::Bytes;
        type Error = tonic::Status;
        fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Self::Item>, Self::Error> {
            let n = bytes::Buf::remaining(src);
            Ok(Some(bytes::Buf::copy_to_bytes(src, n)))
        }
    }
    impl Codec for Raw {
        type Encode = bytes::Bytes;
        type Decode = bytes::Bytes;
        type Encoder = Raw;
        type Decoder = Raw;
        fn encoder(&mut self) -> Raw {
            Raw
        }
        fn decoder(&mut self) -> Raw {
            Raw
        }
    }

    let channel = tonic::transport::Endpoint::from_shared(server.endpoint())
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.expect("ready");
    let path = http::uri::PathAndQuery::from_static("/etcdserverpb.Watch/Watch");
    let requests = tokio_stream::iter(frames);
    let mut responses = match grpc
        .streaming(tonic::Request::new(requests), path, Raw)
        .await
    {
        Ok(r) => r.into_inner(),
        Err(status) => return status,
    };
    loop {
        match responses.message().await {
            Ok(Some(_)) => {}
            Ok(None) => return tonic::Status::ok(""),
            Err(status) => return status,
        }
    }
}

// A Watch stream that receives bytes that are not a WatchRequest ends with INTERNAL, as etcd's
// (grpc-go's "failed to unmarshal"; keywatch's message is tonic's "failed to decode"). It used
// to end with OK, as if the client had finished.
async fn undecodable_watch_request(server: Server) {
    let status = raw_watch(&server, vec![bytes::Bytes::from_static(&[0xff; 4])]).await;
    assert_eq!(status.code(), tonic::Code::Internal, "{status:?}");
}
compat_test!(undecodable_watch_request);

// keywatch's `initial_state` extension (WatchCreateRequest field 100) is opt-in: an unmodified
// etcd client never sets it, and gets etcd's watch exactly: no initial events for keys that
// already exist, `created` at the current revision, then only later changes; from a past start
// revision, history as etcd replays it; and a progress request answered as etcd answers it.
async fn watch_without_initial_state_is_etcds(server: Server) {
    let mut c = server.client().await;
    for (k, v) in [("cfg/a", "1"), ("cfg/b", "2"), ("cfg/c", "3")] {
        put_rev(&mut c, k, v).await;
    }
    let prefix = || Some(WatchOptions::new().with_prefix());
    let (mut w, created) = Watch::open(&mut c, "cfg/", prefix()).await;
    assert_eq!(rev(&created), 4);
    assert!(events(&created).is_empty(), "no initial state: {created:?}");
    w.stream.request_progress().await.expect("send progress");
    let progress = w.next().await;
    assert!(events(&progress).is_empty(), "{progress:?}");
    assert_eq!(rev(&progress), 4);

    assert_eq!(put_rev(&mut c, "cfg/b", "two").await, 5);
    let resp = w.next().await;
    assert_eq!(
        events(&resp),
        [put("cfg/b", "two", 3, 5, 2)],
        "only the change"
    );

    // From a past revision: etcd's history replay, not a state listing.
    let from = Some(WatchOptions::new().with_prefix().with_start_revision(3));
    let id = w.add("cfg/", from).await.watch_id();
    let mut got = Vec::new();
    while got.len() < 3 {
        let resp = w.next().await;
        assert_eq!(resp.watch_id(), id);
        got.extend(events(&resp));
    }
    assert_eq!(
        got,
        [
            put("cfg/b", "2", 3, 3, 1),
            put("cfg/c", "3", 4, 4, 1),
            put("cfg/b", "two", 3, 5, 2)
        ]
    );
}
compat_test!(watch_without_initial_state_is_etcds);

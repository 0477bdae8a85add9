//! Behaviour of the embedded store: etcd's revision model, txns, range options, reads at a
//! past revision, compaction, restart and fail-stop.

use std::time::Duration;

use bytes::Bytes;
use kv_store::{
    Compare, CompareOp, CompareTarget, KeyRange, PutOptions, RangeRequest, SortOrder, SortTarget,
    TxnOp, TxnOpResult, TxnRequest,
};
use kv_store::{Durability, Store, StoreConfig, StoreError};
use watch_core::{EventKind, KeySelector, WatchMessage, WatchOptions};

use crate::hooked_log::HookedLog;

fn config() -> StoreConfig {
    StoreConfig::default().durability(Durability::NoSync)
}

async fn open(dir: &tempfile::TempDir) -> Store {
    Store::open(dir.path(), config()).await.unwrap()
}

async fn get(store: &Store, key: &str) -> Option<watch_core::KeyValue> {
    store
        .range(RangeRequest::key(key.to_owned()))
        .await
        .unwrap()
        .kvs
        .into_iter()
        .next()
}

fn put_op(key: &str, value: &str) -> TxnOp {
    TxnOp::Put {
        key: Bytes::from(key.to_owned()),
        value: Bytes::from(value.to_owned()),
        options: PutOptions::default(),
    }
}

#[tokio::test]
async fn revision_model_matches_etcd() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(&dir).await;
    assert_eq!(s.current_revision(), 1, "a fresh store is at revision 1");
    let r = s.put("a", "1", PutOptions::default()).await.unwrap();
    assert_eq!(r.revision, 2, "the first write gets revision 2");
    let a = get(&s, "a").await.unwrap();
    assert_eq!((a.create_revision, a.mod_revision, a.version), (2, 2, 1));

    // Same value again still bumps revision and version.
    let r = s
        .put("a", "1", PutOptions::default().prev_kv(true))
        .await
        .unwrap();
    assert_eq!(r.revision, 3);
    assert_eq!(r.prev_kv.unwrap().version, 1);
    let a = get(&s, "a").await.unwrap();
    assert_eq!((a.create_revision, a.mod_revision, a.version), (2, 3, 2));

    // A delete that matches nothing does not bump the revision.
    let d = s.delete_range(KeyRange::key("zz"), false).await.unwrap();
    assert_eq!((d.revision, d.deleted), (3, 0));
    assert_eq!(s.current_revision(), 3);

    // Delete + recreate resets version and create_revision.
    let d = s.delete_range(KeyRange::key("a"), true).await.unwrap();
    assert_eq!((d.revision, d.deleted), (4, 1));
    assert_eq!(d.prev_kvs[0].value, "1");
    s.put("a", "2", PutOptions::default()).await.unwrap();
    let a = get(&s, "a").await.unwrap();
    assert_eq!((a.create_revision, a.mod_revision, a.version), (5, 5, 1));
}

#[tokio::test]
async fn txn_counts_once_and_checks_keys() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(&dir).await;
    s.put("k", "v", PutOptions::default()).await.unwrap(); // rev 2
    let cmp = |rev| Compare {
        range: KeyRange::key("k"),
        target: CompareTarget::ModRevision(rev),
        op: CompareOp::Equal,
    };
    let r = s
        .txn(TxnRequest {
            compare: vec![cmp(2)],
            success: vec![
                put_op("x", "1"),
                put_op("y", "2"),
                TxnOp::Range(RangeRequest::key("x")),
            ],
            failure: vec![TxnOp::Range(RangeRequest::key("k"))],
        })
        .await
        .unwrap();
    assert!(r.succeeded);
    assert_eq!(r.revision, 3, "a whole txn is one revision");
    match &r.responses[2] {
        TxnOpResult::Range(rr) => assert_eq!(rr.kvs[0].value, "1", "reads see earlier ops"),
        other => panic!("{other:?}"),
    }
    // Failed compare: the failure branch (a read) runs; no revision.
    let r = s
        .txn(TxnRequest {
            compare: vec![cmp(99)],
            success: vec![put_op("x", "no")],
            failure: vec![TxnOp::Range(RangeRequest::key("k"))],
        })
        .await
        .unwrap();
    assert!(!r.succeeded);
    assert_eq!(r.revision, 3);
    // Missing key: mod revision compares as 0 (Kubernetes' create guard).
    let r = s
        .txn(TxnRequest {
            compare: vec![Compare {
                range: KeyRange::key("new"),
                target: CompareTarget::ModRevision(0),
                op: CompareOp::Equal,
            }],
            success: vec![put_op("new", "1")],
            failure: vec![],
        })
        .await
        .unwrap();
    assert!(r.succeeded);
    // A value compare on a missing key is false.
    let r = s
        .txn(TxnRequest {
            compare: vec![Compare {
                range: KeyRange::key("missing"),
                target: CompareTarget::Value(Bytes::new()),
                op: CompareOp::Equal,
            }],
            ..TxnRequest::default()
        })
        .await
        .unwrap();
    assert!(!r.succeeded);

    let dup = s
        .txn(TxnRequest {
            success: vec![put_op("d", "1"), put_op("d", "2")],
            ..TxnRequest::default()
        })
        .await;
    assert!(matches!(dup, Err(StoreError::DuplicateKey)), "{dup:?}");
    let dup = s
        .txn(TxnRequest {
            success: vec![
                TxnOp::Delete {
                    range: KeyRange::prefix("d"),
                    prev_kv: false,
                },
                put_op("d1", "2"),
            ],
            ..TxnRequest::default()
        })
        .await;
    assert!(matches!(dup, Err(StoreError::DuplicateKey)), "{dup:?}");
    let many = s
        .txn(TxnRequest {
            success: (0..129).map(|i| put_op(&format!("m{i}"), "v")).collect(),
            ..TxnRequest::default()
        })
        .await;
    assert!(
        matches!(many, Err(StoreError::TooManyOps { .. })),
        "{many:?}"
    );
    let empty = s.put("", "v", PutOptions::default()).await;
    assert!(matches!(empty, Err(StoreError::EmptyKey)));
    let lease = s.put("l", "v", PutOptions::default().lease(7)).await;
    assert!(matches!(lease, Err(StoreError::LeaseNotFound { lease: 7 })));
    let ign = s
        .put("nothere", "", PutOptions::default().ignore_value(true))
        .await;
    assert!(matches!(ign, Err(StoreError::KeyNotFound)));
    assert_eq!(
        s.current_revision(),
        4,
        "failed requests create no revision"
    );
}

#[tokio::test]
async fn range_options() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(&dir).await;
    for (k, v) in [("a", "3"), ("b", "1"), ("c", "2"), ("d", "0")] {
        s.put(k, v, PutOptions::default()).await.unwrap(); // revs 2..=5
    }
    s.put("b", "9", PutOptions::default()).await.unwrap(); // rev 6, b version 2
    let all = s.range(RangeRequest::new(KeyRange::all())).await.unwrap();
    assert_eq!(all.count, 4);
    assert_eq!(all.revision, 6);
    let keys =
        |r: &kv_store::RangeResult| r.kvs.iter().map(|kv| kv.key.clone()).collect::<Vec<_>>();
    let lim = s
        .range(RangeRequest::new(KeyRange::all()).limit(2))
        .await
        .unwrap();
    assert_eq!(keys(&lim), vec!["a", "b"]);
    assert!(lim.more);
    assert_eq!(lim.count, 4);
    let desc = s
        .range(RangeRequest::new(KeyRange::all()).sort(SortOrder::Descend, SortTarget::Key))
        .await
        .unwrap();
    assert_eq!(keys(&desc), vec!["d", "c", "b", "a"]);
    let by_value = s
        .range(RangeRequest::new(KeyRange::all()).sort(SortOrder::None, SortTarget::Value))
        .await
        .unwrap();
    assert_eq!(keys(&by_value), vec!["d", "c", "a", "b"]);
    let by_mod_desc = s
        .range(
            RangeRequest::new(KeyRange::all())
                .sort(SortOrder::Descend, SortTarget::Mod)
                .limit(1),
        )
        .await
        .unwrap();
    assert_eq!(keys(&by_mod_desc), vec!["b"]);
    let count = s
        .range(RangeRequest::prefix("").count_only(true))
        .await
        .unwrap();
    assert_eq!((count.count, count.kvs.len()), (4, 0));
    let ko = s
        .range(RangeRequest::new(KeyRange::from_key("c")).keys_only(true))
        .await
        .unwrap();
    assert_eq!(keys(&ko), vec!["c", "d"]);
    assert!(ko.kvs.iter().all(|kv| kv.value.is_empty()));
    let filtered = s
        .range(RangeRequest::new(KeyRange::all()).mod_revision_bounds(3, 5))
        .await
        .unwrap();
    assert_eq!(keys(&filtered), vec!["c", "d"]);
    assert_eq!(filtered.count, 4, "count ignores filters");
    let created = s
        .range(RangeRequest::new(KeyRange::all()).create_revision_bounds(0, 3))
        .await
        .unwrap();
    assert_eq!(keys(&created), vec!["a", "b"]);
    let range = s
        .range(RangeRequest::new(KeyRange::new("b", "d")))
        .await
        .unwrap();
    assert_eq!(keys(&range), vec!["b", "c"]);
    let empty = s
        .range(RangeRequest::new(KeyRange::new("d", "b")))
        .await
        .unwrap();
    assert!(empty.kvs.is_empty());
    assert!(matches!(
        s.range(RangeRequest::key("")).await,
        Err(StoreError::EmptyKey)
    ));
}

#[tokio::test]
async fn range_at_past_revision_and_compaction() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(&dir).await;
    s.put("p/a", "1", PutOptions::default()).await.unwrap(); // 2
    s.put("p/b", "1", PutOptions::default()).await.unwrap(); // 3
    s.put("p/a", "2", PutOptions::default()).await.unwrap(); // 4
    s.delete_range(KeyRange::key("p/b"), false).await.unwrap(); // 5
    s.put("p/c", "1", PutOptions::default()).await.unwrap(); // 6

    let at = |rev| RangeRequest::prefix("p/").revision(rev);
    let vals = |r: kv_store::RangeResult| {
        r.kvs
            .into_iter()
            .map(|kv| (kv.key, kv.value, kv.mod_revision))
            .collect::<Vec<_>>()
    };
    assert_eq!(vals(s.range(at(1)).await.unwrap()), vec![]);
    assert_eq!(
        vals(s.range(at(3)).await.unwrap()),
        vec![
            (Bytes::from("p/a"), Bytes::from("1"), 2),
            (Bytes::from("p/b"), Bytes::from("1"), 3)
        ]
    );
    let r4 = s.range(at(4)).await.unwrap();
    assert_eq!(r4.revision, 6, "the header is the current revision");
    assert_eq!(r4.kvs[0].value, "2");
    assert_eq!(vals(s.range(at(5)).await.unwrap()).len(), 1);
    assert!(matches!(
        s.range(at(7)).await,
        Err(StoreError::FutureRevision {
            requested: 7,
            current: 6
        })
    ));

    // A txn read at a past revision.
    let t = s
        .txn(TxnRequest {
            success: vec![TxnOp::Range(at(3))],
            ..TxnRequest::default()
        })
        .await
        .unwrap();
    match &t.responses[0] {
        TxnOpResult::Range(r) => assert_eq!(r.kvs.len(), 2),
        other => panic!("{other:?}"),
    }

    assert_eq!(s.compact(4).await.unwrap(), 6);
    assert_eq!(s.compacted_revision(), 4);
    assert!(matches!(
        s.range(at(3)).await,
        Err(StoreError::Compacted {
            requested: 3,
            compacted: 4
        })
    ));
    assert_eq!(s.range(at(4)).await.unwrap().kvs.len(), 2);
    assert!(matches!(
        s.compact(4).await,
        Err(StoreError::Compacted { .. })
    ));
    assert!(matches!(
        s.compact(3).await,
        Err(StoreError::Compacted { .. })
    ));
    assert!(matches!(
        s.compact(9).await,
        Err(StoreError::FutureRevision { .. })
    ));
    assert!(matches!(
        s.watch(
            KeySelector::prefix("p/"),
            WatchOptions::default().start_revision(2)
        ),
        Err(StoreError::Compacted { compacted: 4, .. })
    ));
    // Compaction survives a restart: the snapshot plus the log rebuild the same state.
    s.close().await.unwrap();
    drop(s);
    let s = open(&dir).await;
    assert_eq!(s.current_revision(), 6);
    assert_eq!(s.compacted_revision(), 4);
    let now = s.range(RangeRequest::prefix("p/")).await.unwrap();
    assert_eq!(
        now.kvs.iter().map(|kv| kv.key.clone()).collect::<Vec<_>>(),
        vec!["p/a", "p/c"]
    );
    assert_eq!(s.range(at(4)).await.unwrap().kvs.len(), 2);
    assert!(matches!(
        s.range(at(3)).await,
        Err(StoreError::Compacted { .. })
    ));
    assert_eq!(
        s.put("p/d", "1", PutOptions::default())
            .await
            .unwrap()
            .revision,
        7
    );
}

#[tokio::test]
async fn restart_keeps_data_and_revisions() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = open(&dir).await;
        for i in 0..10 {
            s.put(format!("k{i}"), format!("v{i}"), PutOptions::default())
                .await
                .unwrap();
        }
        s.delete_range(KeyRange::key("k3"), false).await.unwrap();
        s.put("k1", "again", PutOptions::default()).await.unwrap();
        assert_eq!(s.current_revision(), 13);
        s.close().await.unwrap();
    }
    let s = open(&dir).await;
    assert_eq!(s.current_revision(), 13);
    assert!(get(&s, "k3").await.is_none());
    let k1 = get(&s, "k1").await.unwrap();
    assert_eq!(
        (
            k1.value.as_ref(),
            k1.create_revision,
            k1.mod_revision,
            k1.version
        ),
        (&b"again"[..], 3, 13, 2)
    );
    assert_eq!(
        s.put("k1", "x", PutOptions::default())
            .await
            .unwrap()
            .revision,
        14
    );
    // History from before the restart is served to a watch.
    let mut w = s
        .watch(
            KeySelector::key("k1"),
            WatchOptions::default().start_revision(2).prev_kv(true),
        )
        .unwrap();
    let mut revs = Vec::new();
    while revs.len() < 3 {
        match tokio::time::timeout(Duration::from_secs(5), w.recv())
            .await
            .unwrap()
        {
            Some(WatchMessage::Events(b)) => revs.push(b.revision()),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(revs, vec![3, 13, 14]);
}

#[tokio::test]
async fn watch_sees_acknowledged_write_with_prev_kv() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(&dir).await;
    s.put("w", "old", PutOptions::default()).await.unwrap();
    let mut w = s
        .watch(KeySelector::key("w"), WatchOptions::default().prev_kv(true))
        .unwrap();
    assert_eq!(w.created_revision(), 2);
    s.put("w", "new", PutOptions::default()).await.unwrap();
    s.delete_range(KeyRange::key("w"), false).await.unwrap();
    let mut seen = Vec::new();
    while seen.len() < 2 {
        match tokio::time::timeout(Duration::from_secs(5), w.recv())
            .await
            .unwrap()
        {
            Some(WatchMessage::Events(b)) => {
                for e in b.events() {
                    seen.push((e.kind, b.revision(), e.prev_kv.map(|p| p.value.clone())));
                }
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(
        seen,
        vec![
            (EventKind::Put, 3, Some(Bytes::from("old"))),
            (EventKind::Delete, 4, Some(Bytes::from("new")))
        ]
    );
}

#[tokio::test]
async fn concurrent_writes_get_distinct_ordered_revisions() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(&dir).await;
    let mut w = s
        .watch(KeySelector::All, WatchOptions::default().buffer(1024))
        .unwrap();
    let mut tasks = Vec::new();
    for t in 0..8 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let mut revs = Vec::new();
            for i in 0..25 {
                let r = s
                    .put(format!("t{t}/{i}"), "v", PutOptions::default())
                    .await
                    .unwrap();
                // Read-your-writes: the acknowledged revision is readable.
                assert!(s.durable_revision() >= r.revision);
                revs.push(r.revision);
            }
            revs
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all.sort();
    assert_eq!(all, (2..202).collect::<Vec<_>>());
    for want in 2..202 {
        match tokio::time::timeout(Duration::from_secs(5), w.recv())
            .await
            .unwrap()
        {
            Some(WatchMessage::Events(b)) => assert_eq!(b.revision(), want),
            other => panic!("{other:?}"),
        }
    }
}

#[tokio::test]
async fn closed_store_refuses_requests() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(&dir).await;
    s.put("a", "1", PutOptions::default()).await.unwrap();
    s.close().await.unwrap();
    assert!(matches!(
        s.put("a", "2", PutOptions::default()).await,
        Err(StoreError::Closed)
    ));
    assert!(matches!(
        s.range(RangeRequest::key("a")).await,
        Err(StoreError::Closed)
    ));
}

#[tokio::test]
async fn failed_log_commit_is_fail_stop() {
    let dir = tempfile::tempdir().unwrap();
    let flaky = HookedLog::open(dir.path());
    let fail = flaky.fail_append.clone();
    let s = Store::open_with_log_store(dir.path(), config(), std::sync::Arc::new(flaky))
        .await
        .unwrap();
    s.put("a", "1", PutOptions::default()).await.unwrap();
    let mut w = s.watch(KeySelector::All, WatchOptions::default()).unwrap();
    fail.store(true, std::sync::atomic::Ordering::SeqCst);
    let r = s.put("a", "2", PutOptions::default()).await;
    assert!(matches!(r, Err(StoreError::Failed { .. })), "{r:?}");
    assert!(s.failure().is_some());
    tokio::time::timeout(Duration::from_secs(5), s.failed())
        .await
        .unwrap();
    // Nothing after the failure is acknowledged or visible: later writes fail, reads of the
    // unacknowledged state fail, and the watch never sees revision 3.
    assert!(matches!(
        s.put("b", "1", PutOptions::default()).await,
        Err(StoreError::Failed { .. })
    ));
    assert!(matches!(
        s.range(RangeRequest::key("a")).await,
        Err(StoreError::Failed { .. })
    ));
    assert!(w.try_recv().is_none());
    assert_eq!(s.durable_revision(), 2);
    drop(w);
    s.close().await.ok();
    drop(s);
    // Reopening recovers what is on disk: revision 2, value "1".
    let s = open(&dir).await;
    assert_eq!(s.current_revision(), 2);
    assert_eq!(get(&s, "a").await.unwrap().value, "1");
}

/// A txn above the inline threshold (1,024 ops) is checked on a blocking thread: the request
/// comes back intact and runs, and a duplicate key deep in it is still refused.
#[tokio::test]
async fn large_txn_checked_off_the_workers() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path(), config().max_txn_ops(4096))
        .await
        .unwrap();
    let ops: Vec<TxnOp> = (0..3000)
        .map(|i| put_op(&format!("l{i:04}"), "v"))
        .collect();
    let req = TxnRequest {
        success: ops.clone(),
        ..TxnRequest::default()
    };
    assert_eq!(s.validate(req.clone()).await.unwrap(), req);
    let r = s.txn(req).await.unwrap();
    assert_eq!(r.responses.len(), 3000);
    assert!(get(&s, "l2999").await.is_some());

    let mut dup = ops;
    dup.push(TxnOp::Delete {
        range: KeyRange::prefix("l1"),
        prev_kv: false,
    });
    let dup = TxnRequest {
        success: dup,
        ..TxnRequest::default()
    };
    assert!(matches!(
        s.validate(dup.clone()).await,
        Err(StoreError::DuplicateKey)
    ));
    assert!(matches!(s.txn(dup).await, Err(StoreError::DuplicateKey)));
}

/// A compaction that stops after its state checkpoint and before the log's compaction (a
/// crash or a failed log commit in between) loses nothing: the reopened store has the new
/// checkpoint ahead of the log's compaction, replays the log after it, and compacts again.
#[tokio::test]
async fn a_compaction_cut_between_checkpoint_and_log_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let flaky = HookedLog::open(dir.path());
    let fail_compact = flaky.fail_compact.clone();
    let s = Store::open_with_log_store(dir.path(), config(), std::sync::Arc::new(flaky))
        .await
        .unwrap();
    for i in 0..40 {
        s.put(format!("k{i:02}"), "a", PutOptions::default())
            .await
            .unwrap();
    }
    let first = s.current_revision();
    s.compact(first).await.unwrap();
    for i in 0..20 {
        s.put(format!("k{i:02}"), "b", PutOptions::default())
            .await
            .unwrap();
    }
    s.delete_range(KeyRange::key("k39"), false).await.unwrap();
    let second = s.current_revision();
    fail_compact.store(true, std::sync::atomic::Ordering::SeqCst);
    assert!(s.compact(second).await.is_err());
    // The checkpoint was written before the log's compaction failed.
    assert_eq!(s.last_checkpoint().unwrap().revision, second);
    let want = s
        .range(RangeRequest::new(KeyRange::all()))
        .await
        .unwrap()
        .kvs;
    let _ = s.close().await;
    drop(s);

    let s = open(&dir).await;
    assert_eq!(s.checkpoint_revision(), second);
    assert_eq!(
        s.compacted_revision(),
        first,
        "the log kept its old compaction"
    );
    assert_eq!(
        s.range(RangeRequest::new(KeyRange::all()))
            .await
            .unwrap()
            .kvs,
        want
    );
    // History between the two is still served, and the next compaction goes through.
    let old = s
        .range(RangeRequest::key("k00").revision(first))
        .await
        .unwrap();
    assert_eq!(old.kvs[0].value, "a");
    s.put("k00", "c", PutOptions::default()).await.unwrap();
    s.put("k01", "c", PutOptions::default()).await.unwrap();
    s.compact(s.current_revision()).await.unwrap();
    let next = s.last_checkpoint().unwrap();
    assert_eq!((next.from, next.rows), (second, 2));
    s.close().await.unwrap();
}

/// `wal_bytes` turns the log's write-ahead file on (the default, under fsync) or off, and a
/// size above the maximum is refused before any file is touched.
#[tokio::test]
async fn wal_bytes_turns_the_write_ahead_file_on_and_off() {
    let dir = tempfile::tempdir().unwrap();
    let wal = dir.path().join(event_log::WAL_FILE);
    let fsync = StoreConfig::default().durability(Durability::Fsync);
    let s = Store::open(dir.path(), fsync.clone()).await.unwrap();
    s.put("a", "1", PutOptions::default()).await.unwrap();
    assert!(wal.exists());
    s.close().await.unwrap();
    drop(s);
    // Off: the file's frames are replayed, then it is removed.
    let s = Store::open(dir.path(), fsync.clone().wal_bytes(0))
        .await
        .unwrap();
    assert!(!wal.exists());
    assert_eq!(get(&s, "a").await.unwrap().value, "1");
    s.put("a", "2", PutOptions::default()).await.unwrap();
    s.close().await.unwrap();
    drop(s);
    let s = Store::open(dir.path(), fsync.clone()).await.unwrap();
    assert_eq!(get(&s, "a").await.unwrap().value, "2");
    s.close().await.unwrap();

    let fresh = tempfile::tempdir().unwrap();
    refused(
        &fresh.path().join("d"),
        fsync.wal_bytes(kv_store::MAX_WAL_BYTES + 1),
        "wal_bytes",
    )
    .await;
}

/// A compaction step must delete something: 0 revisions per step is refused at open, and a
/// small step still compacts everything it was asked to.
#[tokio::test]
async fn compact_step_revisions_is_positive_and_used() {
    let dir = tempfile::tempdir().unwrap();
    refused(
        &dir.path().join("d"),
        config().compact_step_revisions(0),
        "compact_step_revisions",
    )
    .await;
    let s = Store::open(dir.path(), config().compact_step_revisions(3))
        .await
        .unwrap();
    for i in 0..20 {
        s.put("k", format!("{i}"), PutOptions::default())
            .await
            .unwrap();
    }
    let rev = s.current_revision();
    s.compact(rev).await.unwrap();
    assert_eq!(s.compacted_revision(), rev);
    assert_eq!(get(&s, "k").await.unwrap().value, "19");
    s.close().await.unwrap();
}

/// Opening `dir` with `config` fails with `InvalidConfig` naming `field`, before the directory
/// is created.
async fn refused(dir: &std::path::Path, config: StoreConfig, field: &str) {
    match Store::open(dir, config).await {
        Err(StoreError::InvalidConfig { field: f, .. }) => assert_eq!(f, field),
        other => panic!(
            "expected InvalidConfig({field}), got {:?}",
            other.map(|_| ())
        ),
    }
    assert!(!dir.exists());
}

//! Leases through the embedded store API: persistence of grants, the lease -> keys index after
//! a snapshot, the crash-consistency rule for revokes (orphaned keys deleted at open in one
//! revision), the lease limit, expiry of more leases than one expiry batch, a grant racing a
//! revoke of its ID, and no local leases in a mirror.

use std::time::Duration;

use kv_store::{Durability, Store, StoreConfig, StoreError};
use kv_store::{LEASES_FILE, MirrorScope, PutOptions, RangeRequest, TxnOp, TxnRequest};
use watch_core::{EventKind, KeySelector, WatchHandle, WatchMessage, WatchOptions};

/// Failure guard for one watch message; a correct run never gets near it.
const GUARD: Duration = Duration::from_secs(60);

fn config() -> StoreConfig {
    StoreConfig::default().durability(Durability::NoSync)
}

fn leased(lease: i64) -> PutOptions {
    PutOptions::default().lease(lease)
}

/// The next event batch: (revision, [(kind, key, prev_kv lease)]).
async fn next_batch(w: &mut WatchHandle) -> (u64, Vec<(EventKind, String, Option<i64>)>) {
    loop {
        let msg = tokio::time::timeout(GUARD, w.recv())
            .await
            .expect("a watch message in time")
            .expect("watch open");
        if let WatchMessage::Events(b) = msg {
            let evs = b
                .events()
                .map(|e| {
                    (
                        e.kind,
                        String::from_utf8(e.kv.key.to_vec()).unwrap(),
                        e.prev_kv.map(|p| p.lease),
                    )
                })
                .collect();
            return (b.revision(), evs);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grants_and_attachments_survive_reopen_and_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), config()).await.unwrap();
    let a = store.lease_grant(0, 300).await.unwrap();
    let b = store.lease_grant(77, 5).await.unwrap();
    assert_eq!((b.id, b.ttl), (77, 5));
    store.put("/k/a", "1", leased(a.id)).await.unwrap(); // 2
    store.put("/k/b", "1", leased(b.id)).await.unwrap(); // 3
    // The snapshot written by a compaction carries each key's lease; the index is rebuilt
    // from it at open.
    store.compact(3).await.unwrap();
    store.close().await.unwrap();
    drop(store);

    let store = Store::open(dir.path(), config()).await.unwrap();
    let mut want = vec![77, a.id];
    want.sort_unstable();
    assert_eq!(store.leases().unwrap(), want);
    let t = store.lease_time_to_live(a.id, true).await.unwrap();
    assert_eq!(
        (t.granted_ttl, t.keys),
        (300, vec![bytes::Bytes::from("/k/a")])
    );
    assert!(
        (1..=300).contains(&t.ttl),
        "restart gives a full TTL at most: {}",
        t.ttl
    );
    assert_eq!(store.lease_keep_alive(77).unwrap(), 5);
    assert!(matches!(
        store.lease_grant(77, 10).await,
        Err(StoreError::LeaseExists { lease: 77 })
    ));
    store.close().await.unwrap();
}

/// A revoke that removed the lease record and then crashed before its deletes were written
/// leaves keys naming a lease with no record; the next open deletes them in one revision.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orphaned_keys_are_deleted_at_open_in_one_revision() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), config()).await.unwrap();
    let gone = store.lease_grant(0, 300).await.unwrap().id;
    let kept = store.lease_grant(0, 300).await.unwrap().id;
    store.put("/o/1", "x", leased(gone)).await.unwrap(); // 2
    store.put("/o/2", "y", leased(gone)).await.unwrap(); // 3
    store.put("/o/3", "z", leased(kept)).await.unwrap(); // 4
    store.put("/o/4", "w", PutOptions::default()).await.unwrap(); // 5
    store.close().await.unwrap();
    drop(store);

    // The first half of a revoke: the record is gone, the keys are not.
    {
        let db = redb::Database::create(dir.path().join(LEASES_FILE)).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let table: redb::TableDefinition<'_, i64, i64> = redb::TableDefinition::new("leases");
            let mut t = txn.open_table(table).unwrap();
            assert!(t.remove(gone).unwrap().is_some());
        }
        txn.commit().unwrap();
    }

    let store = Store::open(dir.path(), config()).await.unwrap();
    assert_eq!(store.current_revision(), 6);
    let mut w = store
        .watch(
            KeySelector::prefix("/o/"),
            WatchOptions::default().start_revision(6).prev_kv(true),
        )
        .unwrap();
    let (rev, evs) = next_batch(&mut w).await;
    assert_eq!(rev, 6);
    assert_eq!(
        evs,
        vec![
            (EventKind::Delete, "/o/1".into(), Some(gone)),
            (EventKind::Delete, "/o/2".into(), Some(gone)),
        ]
    );
    let left = store.range(RangeRequest::prefix("/o/")).await.unwrap();
    let keys: Vec<_> = left.kvs.iter().map(|kv| kv.key.clone()).collect();
    assert_eq!(keys, vec!["/o/3", "/o/4"]);
    assert_eq!(store.leases().unwrap(), vec![kept]);
    drop(w);
    store.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_limit_and_errors() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), config().max_leases(2))
        .await
        .unwrap();
    let a = store.lease_grant(0, 60).await.unwrap().id;
    store.lease_grant(0, 60).await.unwrap();
    assert!(matches!(
        store.lease_grant(0, 60).await,
        Err(StoreError::TooManyLeases { limit: 2 })
    ));
    assert!(matches!(
        store.lease_grant(0, 9_000_000_001).await,
        Err(StoreError::LeaseTtlTooLarge { .. })
    ));
    store.lease_revoke(a).await.unwrap();
    store.lease_grant(0, 60).await.unwrap();
    assert!(matches!(
        store.lease_revoke(a).await,
        Err(StoreError::LeaseNotFound { .. })
    ));
    assert!(matches!(
        store.lease_keep_alive(a),
        Err(StoreError::LeaseNotFound { .. })
    ));
    assert!(matches!(
        store.put("k", "v", leased(a)).await,
        Err(StoreError::LeaseNotFound { .. })
    ));
    store.close().await.unwrap();
}

/// More expiring leases than one expiry batch: every lease's keys go in their own revision,
/// all of them, nothing else is deleted.
/// (Leases of 1 s: a lease may expire before its keys are written; it is then left out.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_leases_expire_each_in_one_revision() {
    const LEASES: usize = 2500;
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), config().min_lease_ttl(1))
        .await
        .unwrap();
    let mut w = store
        .watch(
            KeySelector::prefix("/m/"),
            WatchOptions::default().prev_kv(true),
        )
        .unwrap();
    let mut ids = Vec::with_capacity(LEASES);
    let mut puts = 0;
    for i in 0..LEASES {
        let id = store.lease_grant(0, 1).await.unwrap().id;
        let put = |k: &str| TxnOp::Put {
            key: format!("/m/{i}/{k}").into(),
            value: "x".into(),
            options: leased(id),
        };
        // Both keys in one txn: attached together, or (the lease already expired on a slow
        // machine) not at all.
        let txn = TxnRequest {
            compare: Vec::new(),
            success: vec![put("a"), put("b")],
            failure: Vec::new(),
        };
        match store.txn(txn).await {
            Ok(_) => {
                ids.push(id);
                puts += 1;
            }
            Err(StoreError::LeaseNotFound { .. }) => {}
            Err(e) => panic!("{e}"),
        }
    }
    store
        .put("/m/plain", "x", PutOptions::default())
        .await
        .unwrap();
    // Expiries start while leases are still being granted: read puts and deletes as they come.
    let txns = puts + 1;
    let mut puts = 0;
    let mut expired = std::collections::HashSet::new();
    let mut last = 0;
    while puts < txns || expired.len() < ids.len() {
        let (rev, evs) = next_batch(&mut w).await;
        assert!(rev > last, "revisions increase");
        last = rev;
        if evs[0].0 == EventKind::Put {
            puts += 1;
            continue;
        }
        assert_eq!(evs.len(), 2, "a lease's two keys in one revision: {evs:?}");
        let lease = evs[0].2.expect("prev_kv");
        assert!(
            evs.iter()
                .all(|e| e.0 == EventKind::Delete && e.2 == Some(lease))
        );
        assert!(expired.insert(lease), "lease {lease} expired twice");
    }
    assert_eq!(expired, ids.iter().copied().collect());
    assert_eq!(store.lease_count(), 0);
    assert_eq!(store.key_count(), 1);
    drop(w);
    store.close().await.unwrap();
}

/// A key moved off a lease (plain put, txn put, put to another lease) is not deleted with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn detached_keys_survive_the_revoke() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), config()).await.unwrap();
    let a = store.lease_grant(0, 300).await.unwrap().id;
    let b = store.lease_grant(0, 300).await.unwrap().id;
    for k in ["k1", "k2", "k3", "k4"] {
        store.put(k, "x", leased(a)).await.unwrap();
    }
    store.put("k1", "y", PutOptions::default()).await.unwrap();
    store
        .txn(TxnRequest {
            compare: Vec::new(),
            success: vec![TxnOp::Put {
                key: "k2".into(),
                value: "y".into(),
                options: PutOptions::default(),
            }],
            failure: Vec::new(),
        })
        .await
        .unwrap();
    store.put("k3", "y", leased(b)).await.unwrap();
    let rev = store.lease_revoke(a).await.unwrap();
    assert_eq!(rev, store.current_revision());
    let left = store.range(RangeRequest::prefix("k")).await.unwrap();
    let keys: Vec<_> = left
        .kvs
        .iter()
        .map(|kv| (kv.key.clone(), kv.lease))
        .collect();
    assert_eq!(
        keys,
        vec![("k1".into(), 0), ("k2".into(), 0), ("k3".into(), b)]
    );
    store.close().await.unwrap();
}

/// A revoke and a grant of the same client-chosen ID racing: whenever the grant is
/// acknowledged, its record survives a reopen (the revoke's record removal was queued before
/// the ID became free, so it cannot be committed after the grant's record).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_racing_a_revoke_of_its_id_stays_durable() {
    const N: i64 = 300;
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), config()).await.unwrap();
    for id in 1..=N {
        store.lease_grant(id, 300).await.unwrap();
    }
    let mut tasks = Vec::new();
    for id in 1..=N {
        let (s1, s2) = (store.clone(), store.clone());
        let revoke = tokio::spawn(async move { s1.lease_revoke(id).await });
        let grant = tokio::spawn(async move { s2.lease_grant(id, 300).await });
        tasks.push((id, revoke, grant));
    }
    let mut acked = Vec::new();
    for (id, revoke, grant) in tasks {
        revoke.await.unwrap().unwrap();
        match grant.await.unwrap() {
            Ok(g) => acked.push(g.id),
            Err(StoreError::LeaseExists { .. }) => {}
            Err(e) => panic!("grant {id}: {e}"),
        }
    }
    assert_eq!(store.leases().unwrap(), acked);
    store.close().await.unwrap();
    drop(store);

    let store = Store::open(dir.path(), config()).await.unwrap();
    assert_eq!(store.leases().unwrap(), acked, "every acknowledged grant");
    store.close().await.unwrap();
}

/// A mirror grants, revokes and expires no lease of its own: a store holding leases cannot
/// become one, and a mirror refuses grants and revokes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirror_has_no_local_leases() {
    let scope = || MirrorScope::new([bytes::Bytes::from("/m/")]);
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), config()).await.unwrap();
    let g = store.lease_grant(0, 300).await.unwrap();
    assert!(matches!(
        store.set_mirror(scope()),
        Err(StoreError::Inconsistent(_))
    ));
    assert!(store.mirror_scope().is_none());
    store.lease_revoke(g.id).await.unwrap();
    store.set_mirror(scope()).unwrap();
    assert!(matches!(
        store.lease_grant(0, 300).await,
        Err(StoreError::MirrorReadOnly)
    ));
    assert!(matches!(
        store.lease_revoke(g.id).await,
        Err(StoreError::MirrorReadOnly)
    ));
    assert_eq!(store.lease_count(), 0);
    store.close().await.unwrap();
}

//! `WatchEngine::stats`: watchers by selector kind, and the catching-up gauge through a slow
//! consumer's lag, catch-up and drop.

use bytes::Bytes;
use watch_core::*;

fn put(rev: Revision, key: &'static str) -> ChangeSet {
    let kv = KeyValue {
        key: Bytes::from_static(key.as_bytes()),
        value: Bytes::from_static(b"v"),
        create_revision: rev,
        mod_revision: rev,
        version: 1,
        lease: 0,
    };
    ChangeSet::new(rev, vec![Event::put(kv, None)])
}

/// Yields to the dispatcher until `f` holds for the engine's stats. A hang guard (not a
/// timing assertion): a regression that never reaches the condition fails after 30 s instead
/// of hanging the test run.
async fn until(engine: &WatchEngine, f: impl Fn(&EngineStats) -> bool) -> EngineStats {
    let wait = async {
        loop {
            let s = engine.stats();
            if f(&s) {
                return s;
            }
            tokio::task::yield_now().await;
        }
    };
    match tokio::time::timeout(std::time::Duration::from_secs(30), wait).await {
        Ok(s) => s,
        Err(_) => panic!(
            "the engine's stats never reached the expected state; last: {:?}",
            engine.stats()
        ),
    }
}

#[tokio::test(flavor = "current_thread")]
async fn counts_watchers_by_kind_and_catching_up() {
    let (engine, dispatcher) = WatchEngine::new(EngineConfig::default());
    tokio::spawn(dispatcher.run());
    let opts = WatchOptions::default();
    let a = engine.watch(KeySelector::key("a"), opts).unwrap();
    let p = engine.watch(KeySelector::prefix("a"), opts).unwrap();
    let r = engine.watch(KeySelector::range("a", "b"), opts).unwrap();
    let f = engine.watch(KeySelector::from_key("a"), opts).unwrap();
    let all = engine.watch(KeySelector::All, opts).unwrap();
    let s = engine.stats();
    assert_eq!(
        (
            s.key_watchers,
            s.prefix_watchers,
            s.range_watchers,
            s.from_key_watchers,
            s.all_watchers,
            s.watchers()
        ),
        (1, 1, 1, 1, 1, 5)
    );
    assert_eq!((s.catching_up, s.catch_ups_started), (0, 0));
    drop((a, p, r, f, all));
    assert_eq!(engine.stats().watchers(), 0);

    // A watcher with room for one revision falls behind on the second and catches up once its
    // consumer drains.
    let mut slow = engine
        .watch(KeySelector::key("k"), WatchOptions::default().buffer(1))
        .unwrap();
    for rev in 1..=3 {
        engine.publish(put(rev, "k")).unwrap();
    }
    let s = until(&engine, |s| s.catching_up == 1).await;
    assert_eq!(s.catch_ups_started, 1);
    let mut seen = Vec::new();
    while seen.len() < 3 {
        if let Some(WatchMessage::Events(b)) = slow.recv().await {
            seen.push(b.revision());
        }
    }
    assert_eq!(seen, [1, 2, 3]);
    until(&engine, |s| s.catching_up == 0).await;

    // Dropping a lagging watcher takes it out of the gauge too.
    for rev in 4..=6 {
        engine.publish(put(rev, "k")).unwrap();
    }
    until(&engine, |s| s.catching_up == 1).await;
    drop(slow);
    let s = engine.stats();
    assert_eq!(
        (s.catching_up, s.watchers(), s.catch_ups_started),
        (0, 0, 2)
    );
}

//! Behaviour of the engine through its public API: selectors, options, slow watchers,
//! history catch-up, progress, limits and shutdown.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use watch_core::{
    CancelReason, ChangeSet, EngineConfig, Event, EventKind, History, KeySelector, KeyValue,
    MemoryHistory, MemoryHistoryLimits, Revision, WatchEngine, WatchError, WatchHandle,
    WatchMessage, WatchOptions,
};

fn put(rev: Revision, key: &str, value: &str, prev: Option<&str>) -> Event {
    let kv = KeyValue {
        key: Bytes::copy_from_slice(key.as_bytes()),
        value: Bytes::copy_from_slice(value.as_bytes()),
        create_revision: rev,
        mod_revision: rev,
        version: 1,
        lease: 0,
    };
    let prev = prev.map(|p| KeyValue {
        key: kv.key.clone(),
        value: Bytes::copy_from_slice(p.as_bytes()),
        create_revision: 1,
        mod_revision: rev - 1,
        version: 1,
        lease: 0,
    });
    Event::put(kv, prev)
}

fn del(rev: Revision, key: &str) -> Event {
    Event::delete(Bytes::copy_from_slice(key.as_bytes()), rev, None)
}

fn engine(config: EngineConfig) -> WatchEngine {
    let (engine, dispatcher) = WatchEngine::new(config);
    tokio::spawn(dispatcher.run());
    engine
}

/// Receives one events message and returns (revision, keys).
async fn next_events(h: &mut WatchHandle) -> (Revision, Vec<String>) {
    match h.recv().await {
        Some(WatchMessage::Events(b)) => (
            b.revision(),
            b.events()
                .map(|e| String::from_utf8_lossy(&e.kv.key).into_owned())
                .collect(),
        ),
        other => panic!("expected events, got {other:?}"),
    }
}

/// Waits for a progress message at `rev` (requesting it), collecting events before it.
async fn events_until_progress(h: &mut WatchHandle, rev: Revision) -> Vec<(Revision, Vec<String>)> {
    let mut out = Vec::new();
    h.request_progress();
    loop {
        match h.recv().await {
            Some(WatchMessage::Events(b)) => out.push((
                b.revision(),
                b.events()
                    .map(|e| String::from_utf8_lossy(&e.kv.key).into_owned())
                    .collect(),
            )),
            Some(WatchMessage::Progress { revision }) if revision >= rev => return out,
            Some(WatchMessage::Progress { .. }) => h.request_progress(),
            other => panic!("unexpected {other:?}"),
        }
    }
}

/// The revisions of the events received before a progress at `rev`.
async fn revisions_until_progress(h: &mut WatchHandle, rev: Revision) -> Vec<Revision> {
    events_until_progress(h, rev)
        .await
        .iter()
        .map(|x| x.0)
        .collect()
}

/// Publishes one put of `key` per revision in `revs`.
fn publish_puts(e: &WatchEngine, revs: std::ops::RangeInclusive<Revision>, key: &str) {
    for r in revs {
        e.publish(ChangeSet::new(r, vec![put(r, key, "v", None)]))
            .unwrap();
    }
}

#[tokio::test]
async fn exact_prefix_range_fromkey_all() {
    let e = engine(EngineConfig::default());
    let opts = WatchOptions::default();
    let mut exact = e.watch(KeySelector::key("foo"), opts).unwrap();
    // Any byte prefix, not only '/'-delimited: "fo" matches "foo" and "fox".
    let mut prefix = e.watch(KeySelector::prefix("fo"), opts).unwrap();
    let mut range = e.watch(KeySelector::range("b", "fop"), opts).unwrap();
    let mut from = e.watch(KeySelector::from_key("foz"), opts).unwrap();
    let mut all = e.watch(KeySelector::All, opts).unwrap();
    assert_eq!(exact.created_revision(), 0);

    e.publish(ChangeSet::new(1, vec![put(1, "foo", "1", None)]))
        .unwrap();
    e.publish(ChangeSet::new(2, vec![put(2, "fox", "2", None)]))
        .unwrap();
    e.publish(ChangeSet::new(3, vec![put(3, "a", "3", None)]))
        .unwrap();
    e.publish(ChangeSet::new(4, vec![put(4, "zzz", "4", None)]))
        .unwrap();

    assert_eq!(
        events_until_progress(&mut exact, 4).await,
        vec![(1, vec!["foo".into()])]
    );
    assert_eq!(
        events_until_progress(&mut prefix, 4).await,
        vec![(1, vec!["foo".into()]), (2, vec!["fox".into()])]
    );
    assert_eq!(
        events_until_progress(&mut range, 4).await,
        vec![(1, vec!["foo".into()])]
    );
    assert_eq!(
        events_until_progress(&mut from, 4).await,
        vec![(4, vec!["zzz".into()])]
    );
    assert_eq!(events_until_progress(&mut all, 4).await.len(), 4);
}

#[tokio::test]
async fn invalid_selectors_are_typed_errors() {
    let e = engine(EngineConfig::default());
    let o = WatchOptions::default();
    assert_eq!(
        e.watch(KeySelector::key(""), o).unwrap_err(),
        WatchError::EmptyKey
    );
    assert!(matches!(
        e.watch(KeySelector::range("b", "a"), o).unwrap_err(),
        WatchError::EmptyRange { .. }
    ));
    assert_eq!(
        e.watch(KeySelector::key("k"), o.buffer(0)).unwrap_err(),
        WatchError::ZeroBuffer
    );
    assert_eq!(e.watcher_count(), 0);
}

#[tokio::test]
async fn prev_kv_and_filters() {
    let e = engine(EngineConfig::default());
    let o = WatchOptions::default();
    let mut with_prev = e.watch(KeySelector::key("k"), o.prev_kv(true)).unwrap();
    let mut without = e.watch(KeySelector::key("k"), o).unwrap();
    let mut no_put = e.watch(KeySelector::key("k"), o.no_put(true)).unwrap();
    let mut no_del = e.watch(KeySelector::key("k"), o.no_delete(true)).unwrap();
    assert!(e.wants_prev_kv(b"k"));
    assert!(!e.wants_prev_kv(b"other"));

    e.publish(ChangeSet::new(5, vec![put(5, "k", "new", Some("old"))]))
        .unwrap();
    e.publish(ChangeSet::new(6, vec![del(6, "k")])).unwrap();

    let Some(WatchMessage::Events(b)) = with_prev.recv().await else {
        panic!()
    };
    let ev: Vec<_> = b.events().collect();
    assert_eq!(
        ev[0].prev_kv.map(|p| p.value.clone()),
        Some(Bytes::from("old"))
    );
    let Some(WatchMessage::Events(b)) = without.recv().await else {
        panic!()
    };
    assert!(b.events().all(|e| e.prev_kv.is_none()));

    let Some(WatchMessage::Events(b)) = no_put.recv().await else {
        panic!()
    };
    assert_eq!(
        (b.revision(), b.events().next().map(|e| e.kind)),
        (6, Some(EventKind::Delete))
    );
    let Some(WatchMessage::Events(b)) = no_del.recv().await else {
        panic!()
    };
    assert_eq!(
        (b.revision(), b.events().next().map(|e| e.kind)),
        (5, Some(EventKind::Put))
    );
    // The filtered watchers got nothing else up to revision 6.
    assert!(events_until_progress(&mut no_put, 6).await.is_empty());
    assert!(events_until_progress(&mut no_del, 6).await.is_empty());
    drop(with_prev);
    assert!(!e.wants_prev_kv(b"k"));
}

#[tokio::test]
async fn change_set_is_delivered_atomically_and_filtered_per_watcher() {
    let e = engine(EngineConfig::default());
    let mut pfx = e
        .watch(KeySelector::prefix("a/"), WatchOptions::default())
        .unwrap();
    let mut all = e.watch(KeySelector::All, WatchOptions::default()).unwrap();
    e.publish(ChangeSet::new(
        1,
        vec![
            put(1, "a/1", "x", None),
            put(1, "b/1", "x", None),
            put(1, "a/2", "x", None),
        ],
    ))
    .unwrap();
    assert_eq!(
        next_events(&mut pfx).await,
        (1, vec!["a/1".into(), "a/2".into()])
    );
    assert_eq!(
        next_events(&mut all).await,
        (1, vec!["a/1".into(), "b/1".into(), "a/2".into()])
    );
}

#[tokio::test]
async fn past_start_replays_then_continues_live_without_gap_or_duplicate() {
    let e = engine(EngineConfig::default());
    publish_puts(&e, 1..=10, "k");
    let mut h = e
        .watch(
            KeySelector::key("k"),
            WatchOptions::default().start_revision(4),
        )
        .unwrap();
    assert_eq!(h.created_revision(), 10);
    publish_puts(&e, 11..=20, "k");
    let got: Vec<Revision> = revisions_until_progress(&mut h, 20).await;
    assert_eq!(got, (4..=20).collect::<Vec<_>>());
}

#[tokio::test]
async fn future_start_waits_for_its_revision() {
    let e = engine(EngineConfig::default());
    let mut h = e
        .watch(
            KeySelector::key("k"),
            WatchOptions::default().start_revision(3),
        )
        .unwrap();
    publish_puts(&e, 1..=4, "k");
    assert_eq!(next_events(&mut h).await.0, 3);
    assert_eq!(next_events(&mut h).await.0, 4);
}

#[tokio::test]
async fn compacted_start_is_refused_with_the_oldest_revision() {
    let cfg = EngineConfig::default().recent(MemoryHistoryLimits {
        max_changes: 4,
        max_bytes: 1 << 20,
    });
    let e = engine(cfg);
    publish_puts(&e, 1..=10, "k");
    assert_eq!(
        e.watch(
            KeySelector::key("k"),
            WatchOptions::default().start_revision(2)
        )
        .unwrap_err(),
        WatchError::Compacted {
            requested: 2,
            compact_revision: 7
        }
    );
    // Starting exactly at the oldest retained revision is allowed and delivers it.
    let mut h = e
        .watch(
            KeySelector::key("k"),
            WatchOptions::default().start_revision(7),
        )
        .unwrap();
    assert_eq!(next_events(&mut h).await.0, 7);
}

#[tokio::test]
async fn slow_watcher_is_caught_up_from_the_window_without_loss() {
    let e = engine(EngineConfig::default());
    let mut slow = e
        .watch(KeySelector::prefix("k"), WatchOptions::default().buffer(2))
        .unwrap();
    for r in 1..=500 {
        e.publish(ChangeSet::new(
            r,
            vec![put(r, &format!("k{}", r % 7), "v", None)],
        ))
        .unwrap();
    }
    let got: Vec<Revision> = revisions_until_progress(&mut slow, 500).await;
    assert_eq!(got, (1..=500).collect::<Vec<_>>());
}

#[tokio::test]
async fn slow_watcher_beyond_all_history_is_canceled_with_compact_revision() {
    let cfg = EngineConfig::default().recent(MemoryHistoryLimits {
        max_changes: 8,
        max_bytes: 1 << 20,
    });
    let e = engine(cfg);
    let mut slow = e
        .watch(KeySelector::key("k"), WatchOptions::default().buffer(2))
        .unwrap();
    let mut fast = e
        .watch(KeySelector::key("k"), WatchOptions::default().buffer(1000))
        .unwrap();
    for r in 1..=100 {
        e.publish(ChangeSet::new(r, vec![put(r, "k", "v", None)]))
            .unwrap();
        // Let the dispatcher walk each revision so the fast watcher is live throughout.
        tokio::task::yield_now().await;
    }
    let mut got = Vec::new();
    let reason = loop {
        match slow.recv().await {
            Some(WatchMessage::Events(b)) => got.push(b.revision()),
            Some(WatchMessage::Canceled(reason)) => break reason,
            other => panic!("unexpected {other:?}"),
        }
    };
    // What it did get is a gap-free prefix; then a terminal cancel pointing past the gap.
    assert_eq!(got, (1..=got.len() as u64).collect::<Vec<_>>());
    let CancelReason::Compacted { compact_revision } = reason else {
        panic!("{reason:?}")
    };
    assert!(
        compact_revision > got.len() as u64 + 1,
        "{compact_revision} {}",
        got.len()
    );
    assert!(slow.recv().await.is_none());
    assert_eq!(events_until_progress(&mut fast, 100).await.len(), 100);
    assert_eq!(
        e.watcher_count(),
        1,
        "a canceled watcher leaves the registry"
    );
}

#[tokio::test]
async fn external_history_catches_up_what_the_window_lost() {
    let external = Arc::new(MemoryHistory::new(0, MemoryHistoryLimits::default()));
    let cfg = EngineConfig::default()
        .recent(MemoryHistoryLimits {
            max_changes: 4,
            max_bytes: 1 << 20,
        })
        .catch_up_batch(3);
    let (e, d) = WatchEngine::with_history(cfg, external.clone());
    tokio::spawn(d.run());
    let mut slow = e
        .watch(KeySelector::key("k"), WatchOptions::default().buffer(2))
        .unwrap();
    for r in 1..=200 {
        let cs = ChangeSet::new(
            r,
            vec![put(r, if r % 2 == 0 { "k" } else { "j" }, "v", None)],
        );
        external.append(Arc::new(cs.clone())).unwrap();
        e.publish(cs).unwrap();
    }
    let got: Vec<Revision> = revisions_until_progress(&mut slow, 200).await;
    assert_eq!(got, (1..=100).map(|r| r * 2).collect::<Vec<_>>());
    // A watcher can also start from revisions only the external history still has.
    assert_eq!(e.first_available(), 1);
    let mut old = e
        .watch(
            KeySelector::key("j"),
            WatchOptions::default().start_revision(1),
        )
        .unwrap();
    assert_eq!(events_until_progress(&mut old, 200).await.len(), 100);
    assert_eq!(external.first_available(), 1);
}

#[tokio::test(start_paused = true)]
async fn periodic_progress_only_when_idle_and_asked() {
    let e = engine(EngineConfig::default().progress_interval(Duration::from_secs(1)));
    let mut p = e
        .watch(
            KeySelector::key("k"),
            WatchOptions::default().progress_notify(true),
        )
        .unwrap();
    let mut quiet = e
        .watch(KeySelector::key("k"), WatchOptions::default())
        .unwrap();
    e.publish(ChangeSet::new(1, vec![put(1, "other", "v", None)]))
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    match p.recv().await {
        Some(WatchMessage::Progress { revision }) => assert_eq!(revision, 1),
        other => panic!("{other:?}"),
    }
    assert!(quiet.try_recv().is_none());
}

#[tokio::test]
async fn manual_progress_is_ordered_after_events() {
    let e = engine(EngineConfig::default());
    let mut h = e
        .watch(KeySelector::key("k"), WatchOptions::default())
        .unwrap();
    e.publish(ChangeSet::new(1, vec![put(1, "k", "v", None)]))
        .unwrap();
    e.publish(ChangeSet::new(2, vec![put(2, "k", "v", None)]))
        .unwrap();
    h.request_progress();
    // Whatever the interleaving, a progress at revision R is never ahead of an event <= R.
    let mut last_event = 0;
    loop {
        match h.recv().await {
            Some(WatchMessage::Events(b)) => last_event = b.revision(),
            Some(WatchMessage::Progress { revision }) => {
                assert!(revision >= last_event);
                if revision == 2 {
                    assert_eq!(last_event, 2);
                    break;
                }
                h.request_progress();
            }
            other => panic!("{other:?}"),
        }
    }
}

#[tokio::test]
async fn drop_unregisters_and_limit_is_enforced() {
    let e = engine(EngineConfig::default().max_watchers(2));
    let a = e
        .watch(KeySelector::key("a"), WatchOptions::default())
        .unwrap();
    let b = e
        .watch(KeySelector::prefix("p"), WatchOptions::default())
        .unwrap();
    assert_eq!(
        e.watch(KeySelector::All, WatchOptions::default())
            .unwrap_err(),
        WatchError::TooManyWatchers { limit: 2 }
    );
    drop(a);
    drop(b);
    assert_eq!(e.watcher_count(), 0);
    let _c = e
        .watch(KeySelector::range("a", "b"), WatchOptions::default())
        .unwrap();
    assert_eq!(e.watcher_count(), 1);
}

#[tokio::test]
async fn shutdown_cancels_every_watcher_with_resume_revision() {
    let e = engine(EngineConfig::default());
    let mut h = e
        .watch(KeySelector::key("k"), WatchOptions::default())
        .unwrap();
    e.publish(ChangeSet::new(1, vec![put(1, "k", "v", None)]))
        .unwrap();
    assert_eq!(next_events(&mut h).await.0, 1);
    e.shutdown();
    match h.recv().await {
        Some(WatchMessage::Canceled(CancelReason::Shutdown { resume_after })) => {
            assert_eq!(resume_after, 1)
        }
        other => panic!("{other:?}"),
    }
    assert!(h.recv().await.is_none());
    assert_eq!(
        e.watch(KeySelector::key("k"), WatchOptions::default())
            .unwrap_err(),
        WatchError::Shutdown
    );
}

#[test]
fn publish_refuses_non_increasing_revisions() {
    let (e, _d) = WatchEngine::new(EngineConfig::default().initial_revision(10));
    assert!(e.publish(ChangeSet::new(10, vec![])).is_err());
    assert!(e.publish(ChangeSet::new(11, vec![])).is_ok());
    assert!(e.publish(ChangeSet::new(11, vec![])).is_err());
    assert_eq!(e.current_revision(), 11);
}

/// Registrations racing a publisher on another thread: each watcher gets exactly the
/// revisions after its created revision, none missing, none twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_racing_dispatch_has_no_gap() {
    let e = engine(EngineConfig::default());
    const N: u64 = 2000;
    let publisher = {
        let e = e.clone();
        std::thread::spawn(move || {
            for r in 1..=N {
                e.publish(ChangeSet::new(r, vec![put(r, "k", "v", None)]))
                    .unwrap();
            }
        })
    };
    let mut handles = Vec::new();
    for i in 0..200 {
        let sel = if i % 2 == 0 {
            KeySelector::key("k")
        } else {
            KeySelector::prefix("k")
        };
        handles.push(e.watch(sel, WatchOptions::default().buffer(8)).unwrap());
        tokio::task::yield_now().await;
    }
    publisher.join().unwrap();
    for mut h in handles {
        let created = h.created_revision();
        let got: Vec<Revision> = revisions_until_progress(&mut h, N).await;
        assert_eq!(got, (created + 1..=N).collect::<Vec<_>>());
    }
}

#[tokio::test]
async fn replayed_batches_are_marked_catch_up_and_live_ones_are_not() {
    let e = engine(EngineConfig::default());
    publish_puts(&e, 1..=3, "k");
    let mut h = e
        .watch(
            KeySelector::key("k"),
            WatchOptions::default().start_revision(2),
        )
        .unwrap();
    publish_puts(&e, 4..=4, "k");
    let mut seen = Vec::new();
    while seen.len() < 3 {
        if let Some(WatchMessage::Events(b)) = h.recv().await {
            seen.push((b.revision(), b.is_catch_up()));
        }
    }
    // 2 and 3 come from history. 4 is live unless the dispatcher walked it before the
    // catch-up ran, in which case history delivered it too: either way never live-then-replayed.
    assert_eq!(&seen[..2], &[(2, true), (3, true)]);
    assert_eq!(seen[2].0, 4);
    let mut live = e
        .watch(KeySelector::key("k"), WatchOptions::default())
        .unwrap();
    publish_puts(&e, 5..=5, "k");
    let Some(WatchMessage::Events(b)) = live.recv().await else {
        panic!()
    };
    assert_eq!((b.revision(), b.is_catch_up()), (5, false));
}

/// Revisions with gaps and empty change sets (an embedder mirroring another store's revision
/// numbers): watchers get the events under the published numbers, progress reports the last
/// published revision, a watcher started in a gap begins at the next event, and
/// `cancel_all` ends every watcher with the given reason.
#[tokio::test]
async fn revision_gaps_empty_sets_and_cancel_all() {
    let e = engine(EngineConfig::default().initial_revision(10));
    let mut all = e.watch(KeySelector::All, WatchOptions::default()).unwrap();
    e.publish(ChangeSet::new(13, vec![put(13, "a", "1", None)]))
        .unwrap();
    e.publish(ChangeSet::new(20, Vec::new())).unwrap();
    e.publish(ChangeSet::new(
        27,
        vec![put(27, "b", "2", None), del(27, "a")],
    ))
    .unwrap();
    assert!(e.publish(ChangeSet::new(27, Vec::new())).is_err());
    assert_eq!(next_events(&mut all).await, (13, vec!["a".into()]));
    assert_eq!(
        next_events(&mut all).await,
        (27, vec!["b".into(), "a".into()])
    );
    let mut from_gap = e
        .watch(KeySelector::All, WatchOptions::default().start_revision(15))
        .unwrap();
    assert_eq!(next_events(&mut from_gap).await.0, 27);
    assert!(events_until_progress(&mut all, 27).await.is_empty());
    assert_eq!(e.current_revision(), 27);
    assert_eq!(
        e.cancel_all(CancelReason::Compacted {
            compact_revision: 31
        }),
        2
    );
    for h in [&mut all, &mut from_gap] {
        match h.recv().await {
            Some(WatchMessage::Canceled(CancelReason::Compacted { compact_revision })) => {
                assert_eq!(compact_revision, 31)
            }
            other => panic!("expected a compacted cancel, got {other:?}"),
        }
    }
    assert_eq!(e.watcher_count(), 0);
}

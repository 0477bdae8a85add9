//! Outboxes: many watchers delivering into one bounded queue drained by one consumer.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use watch_core::{
    ChangeSet, EngineConfig, Event, History, KeySelector, KeyValue, MemoryHistory,
    MemoryHistoryLimits, Outbox, OutboxItem, OutboxLimits, Revision, WatchEngine, WatchMessage,
    WatchOptions,
};

fn put(rev: Revision, key: &str, value_len: usize) -> ChangeSet {
    let kv = KeyValue {
        key: Bytes::copy_from_slice(key.as_bytes()),
        value: Bytes::from(vec![b'v'; value_len]),
        create_revision: rev,
        mod_revision: rev,
        version: 1,
        lease: 0,
    };
    ChangeSet::new(rev, vec![Event::put(kv, None)])
}

/// Drains until `done` says stop, returning every item in order.
async fn drain_until(ob: &Outbox, mut done: impl FnMut(&[OutboxItem]) -> bool) -> Vec<OutboxItem> {
    let mut all = Vec::new();
    while !done(&all) {
        ob.drain(&mut all, usize::MAX).await;
    }
    all
}

/// (tag, revision) of every event message, in order.
fn events(items: &[OutboxItem]) -> Vec<(u64, Revision)> {
    items
        .iter()
        .filter_map(|i| match i {
            OutboxItem::Message {
                tag,
                message: WatchMessage::Events(b),
                ..
            } => Some((*tag, b.revision())),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn watchers_of_one_outbox_each_get_their_revisions_in_order() {
    let (engine, dispatcher) = WatchEngine::new(EngineConfig::default());
    tokio::spawn(dispatcher.run());
    let ob = engine.outbox(OutboxLimits::default());
    let (_a, _) = ob
        .watch(7, KeySelector::prefix("a/"), WatchOptions::default())
        .unwrap();
    let (_b, _) = ob
        .watch(9, KeySelector::key("a/x"), WatchOptions::default())
        .unwrap();
    for rev in 1..=20 {
        let key = if rev % 2 == 0 { "a/x" } else { "a/y" };
        engine.publish(put(rev, key, 8)).unwrap();
    }
    let items = drain_until(&ob, |all| events(all).len() == 30).await;
    let ev = events(&items);
    let mine = |tag| {
        ev.iter()
            .filter(|(t, _)| *t == tag)
            .map(|(_, r)| *r)
            .collect::<Vec<_>>()
    };
    assert_eq!(mine(7), (1..=20).collect::<Vec<_>>());
    assert_eq!(mine(9), (1..=20).filter(|r| r % 2 == 0).collect::<Vec<_>>());
}

#[tokio::test]
async fn three_stream_progress_requests_get_three_answers_after_the_events() {
    let (engine, dispatcher) = WatchEngine::new(EngineConfig::default());
    tokio::spawn(dispatcher.run());
    let ob = engine.outbox(OutboxLimits::default());
    let (_a, _) = ob
        .watch(1, KeySelector::prefix("k"), WatchOptions::default())
        .unwrap();
    for rev in 1..=5 {
        engine.publish(put(rev, "k", 1)).unwrap();
    }
    ob.request_progress();
    ob.request_progress();
    ob.request_progress();
    let items = drain_until(&ob, |all| {
        all.iter()
            .filter(|i| matches!(i, OutboxItem::Progress { .. }))
            .count()
            == 3
    })
    .await;
    let first_progress = items
        .iter()
        .position(|i| matches!(i, OutboxItem::Progress { .. }))
        .unwrap();
    // Every event the answer covers precedes it.
    assert_eq!(events(&items[..first_progress]).len(), 5);
    for i in &items[first_progress..] {
        assert!(matches!(i, OutboxItem::Progress { revision: 5 }), "{i:?}");
    }
}

#[tokio::test]
async fn a_full_outbox_turns_watchers_lagging_and_they_catch_up_without_gap() {
    let history = Arc::new(MemoryHistory::new(0, MemoryHistoryLimits::default()));
    let (engine, dispatcher) = WatchEngine::with_history(
        EngineConfig::default().recent(MemoryHistoryLimits {
            max_changes: 4,
            max_bytes: usize::MAX,
        }),
        history.clone() as Arc<dyn History>,
    );
    tokio::spawn(dispatcher.run());
    // Room for about four 1 KiB revisions per outbox.
    let ob = engine.outbox(OutboxLimits {
        max_bytes: 4 * 1400,
        max_messages: 1 << 20,
    });
    let mut regs = Vec::new();
    for tag in 0..3 {
        regs.push(
            ob.watch(tag, KeySelector::prefix("p"), WatchOptions::default())
                .unwrap(),
        );
    }
    let n = 200;
    for rev in 1..=n {
        let cs = put(rev, "p", 1024);
        history.append(Arc::new(cs.clone())).unwrap();
        engine.publish(cs).unwrap();
        // Let the dispatcher walk each revision live, so the outbox bound (not the window)
        // is what makes the watchers lag.
        tokio::task::yield_now().await;
    }
    let items = drain_until(&ob, |all| events(all).len() == 3 * n as usize).await;
    let mut next: HashMap<u64, Revision> = HashMap::new();
    for (tag, rev) in events(&items) {
        let want = next.entry(tag).or_insert(1);
        assert_eq!(rev, *want, "watcher {tag}: gap, duplicate or reorder");
        *want += 1;
    }
    assert!(
        engine.stats().catch_ups_started > 0,
        "the byte bound must have turned watchers lagging"
    );
}

#[tokio::test]
async fn stream_progress_waits_for_a_watcher_with_a_future_start() {
    let (engine, dispatcher) = WatchEngine::new(EngineConfig::default());
    tokio::spawn(dispatcher.run());
    let ob = engine.outbox(OutboxLimits::default());
    engine.publish(put(1, "k", 1)).unwrap();
    let (_f, created) = ob
        .watch(
            1,
            KeySelector::key("k"),
            WatchOptions::default().start_revision(4),
        )
        .unwrap();
    assert_eq!(created, 1);
    ob.request_progress();
    engine.publish(put(2, "other", 1)).unwrap();
    engine.publish(put(3, "other", 1)).unwrap();
    engine.publish(put(4, "k", 1)).unwrap();
    let items = drain_until(&ob, |all| {
        all.iter().any(|i| matches!(i, OutboxItem::Progress { .. }))
    })
    .await;
    // The answer comes only once the dispatcher reached the start, after its event.
    assert_eq!(events(&items), vec![(1, 4)]);
    assert!(matches!(
        items.last(),
        Some(OutboxItem::Progress { revision: 4 })
    ));
}

#[tokio::test]
async fn dropping_a_registration_stops_its_messages() {
    let (engine, dispatcher) = WatchEngine::new(EngineConfig::default());
    tokio::spawn(dispatcher.run());
    let ob = engine.outbox(OutboxLimits::default());
    let (a, _) = ob
        .watch(1, KeySelector::key("k"), WatchOptions::default())
        .unwrap();
    let (_b, _) = ob
        .watch(2, KeySelector::key("k"), WatchOptions::default())
        .unwrap();
    engine.publish(put(1, "k", 1)).unwrap();
    let first = drain_until(&ob, |all| events(all).len() == 2).await;
    assert_eq!(events(&first).len(), 2);
    drop(a);
    engine.publish(put(2, "k", 1)).unwrap();
    let second = drain_until(&ob, |all| !events(all).is_empty()).await;
    assert_eq!(events(&second), vec![(2, 2)]);
    assert_eq!(engine.watcher_count(), 1);
}

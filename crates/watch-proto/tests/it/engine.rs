//! A watch-core engine batch turned into the WatchResponse an etcd client receives.

use std::time::Duration;

use watch_core::{
    ChangeSet, EngineConfig, Event, KeySelector, KeyValue, WatchEngine, WatchMessage, WatchOptions,
};
use watch_proto::etcdserverpb::ResponseHeader;
use watch_proto::mvccpb::event::EventType;
use watch_proto::{from_proto, to_proto};

fn kv(key: &'static str, value: &'static str, rev: u64, version: u64) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: value.into(),
        create_revision: 1,
        mod_revision: rev,
        version,
        lease: 0,
    }
}

#[tokio::test]
async fn batch_becomes_watch_response() {
    let (engine, dispatcher) = WatchEngine::new(EngineConfig::default());
    tokio::spawn(dispatcher.run());
    let mut watch = engine
        .watch(
            KeySelector::prefix("a/"),
            WatchOptions::default().prev_kv(true),
        )
        .unwrap();

    let put = Event::put(kv("a/1", "new", 2, 2), Some(kv("a/1", "old", 1, 1)));
    let other = Event::put(kv("b/1", "x", 2, 1), None);
    let delete = Event::delete("a/2".into(), 2, Some(kv("a/2", "v", 1, 1)));
    engine
        .publish(ChangeSet::new(2, vec![put.clone(), other, delete.clone()]))
        .unwrap();

    let msg = tokio::time::timeout(Duration::from_secs(5), watch.recv())
        .await
        .unwrap()
        .unwrap();
    let WatchMessage::Events(batch) = msg else {
        panic!("expected events, got {msg:?}");
    };
    let header = ResponseHeader {
        revision: to_proto::revision(batch.revision()),
        ..Default::default()
    };
    let resp = to_proto::events_response(header, 3, &batch, true);
    assert_eq!(resp.watch_id, 3);
    assert_eq!(resp.header.as_ref().map(|h| h.revision), Some(2));
    assert!(!resp.created && !resp.canceled);
    let types: Vec<_> = resp.events.iter().map(|e| e.r#type).collect();
    assert_eq!(types, [EventType::Put as i32, EventType::Delete as i32]);
    let back: Vec<_> = resp
        .events
        .iter()
        .map(|e| from_proto::event(e).unwrap())
        .collect();
    assert_eq!(back, [put, delete]);

    // The same batch for a client that did not ask for prev_kv.
    let bare = to_proto::batch_events(&batch, false);
    assert!(bare.iter().all(|e| e.prev_kv.is_none()));
}

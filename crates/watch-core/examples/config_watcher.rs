//! A config watcher: one task writes settings under `/config/`, another reacts to each change
//! and prints what changed, starting with a replay of everything written before it subscribed.
//!
//! Run with `cargo run -p watch-core --example config_watcher`. An application embedding
//! kv-store lists and watches in one call instead, and recovers from a compaction the same way:
//! kv-store's `list_watch` example.

use bytes::Bytes;
use watch_core::{
    ChangeSet, EngineConfig, Event, KeySelector, KeyValue, WatchEngine, WatchMessage, WatchOptions,
};

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let (engine, dispatcher) = WatchEngine::new(EngineConfig::default());
    tokio::spawn(dispatcher.run());

    let settings = [
        ("/config/log_level", "info"),
        ("/config/port", "8080"),
        ("/config/log_level", "debug"),
    ];
    let mut revision = 0;
    let mut versions = std::collections::HashMap::new();
    for (key, value) in settings {
        revision += 1;
        let version = versions.entry(key).and_modify(|v| *v += 1).or_insert(1u64);
        let kv = KeyValue {
            key: Bytes::from_static(key.as_bytes()),
            value: Bytes::from_static(value.as_bytes()),
            create_revision: revision,
            mod_revision: revision,
            version: *version,
            lease: 0,
        };
        engine
            .publish(ChangeSet::new(revision, vec![Event::put(kv, None)]))
            .expect("increasing");
    }

    // Subscribe after the fact, from revision 1: history is replayed, then live changes follow.
    let mut watcher = engine
        .watch(
            KeySelector::prefix("/config/"),
            WatchOptions::default().start_revision(1),
        )
        .expect("valid selector");
    let mut received = 0;
    while received < settings.len() {
        match watcher.recv().await {
            Some(WatchMessage::Events(batch)) => {
                for e in batch.events() {
                    received += 1;
                    println!(
                        "rev {:>2}  {} = {} (version {})",
                        batch.revision(),
                        String::from_utf8_lossy(&e.kv.key),
                        String::from_utf8_lossy(&e.kv.value),
                        e.kv.version
                    );
                }
            }
            Some(other) => println!("{other:?}"),
            None => break,
        }
    }
    engine.shutdown();
}

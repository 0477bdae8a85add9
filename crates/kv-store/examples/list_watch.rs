//! A config watcher that lists and watches in one call, and recovers from a compaction the
//! same way: the embedded counterpart of watch-core's `config_watcher` example.
//!
//! The watcher keeps a local copy of `/config/`: it receives the keys as they stand at one
//! revision R, the marker "initial state complete at R", then every change after R. When a
//! burst of writes outruns it past a compaction, the watch ends with `Compacted`; the recovery
//! is to watch again with initial state and replace the copy: no gap, no duplicate, no
//! separate read-then-watch dance.
//!
//! Run with `cargo run -p kv-store --example list_watch`.

use std::collections::BTreeMap;

use bytes::Bytes;
use kv_store::{
    Durability, InitialState, ListWatch, ListWatchMessage, PutOptions, Store, StoreConfig,
    StoreError,
};
use watch_core::{CancelReason, EventKind, KeySelector, WatchMessage, WatchOptions};

/// The local copy of `/config/` and the revision it is complete through.
#[derive(Default)]
struct Config {
    values: BTreeMap<Bytes, Bytes>,
    revision: u64,
}

fn list_watch(store: &Store) -> Result<ListWatch, StoreError> {
    store.watch_with_initial_state(
        KeySelector::prefix("/config/"),
        // A tiny buffer, so the burst below makes the watcher fall behind.
        WatchOptions::default().buffer(2),
        InitialState::default(),
    )
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), StoreError> {
    let dir = tempfile::tempdir().expect("temporary directory");
    let config = StoreConfig::default().durability(Durability::NoSync);
    let store = Store::open(dir.path(), config).await?;
    store
        .put("/config/log_level", "info", PutOptions::default())
        .await?;
    store
        .put("/config/port", "8080", PutOptions::default())
        .await?;

    let mut copy = Config::default();
    // While listing, the copy being built; it replaces `copy` at the marker.
    let mut building = BTreeMap::new();
    let mut watch = list_watch(&store)?;
    let mut burst_done = false;
    loop {
        match watch.recv().await? {
            Some(ListWatchMessage::Initial(events)) => {
                for e in events {
                    building.insert(e.kv.key, e.kv.value);
                }
            }
            Some(ListWatchMessage::InitialComplete { revision }) => {
                copy.values = std::mem::take(&mut building);
                copy.revision = revision;
                println!("state at revision {revision}: {} keys", copy.values.len());
                if !burst_done {
                    // A burst while nobody reads, then a compaction past it.
                    for i in 0..50 {
                        let v = format!("{i}");
                        store
                            .put("/config/counter", v, PutOptions::default())
                            .await?;
                    }
                    store.compact(store.current_revision()).await?;
                    burst_done = true;
                }
            }
            Some(ListWatchMessage::Watch(WatchMessage::Events(batch))) => {
                for e in batch.events() {
                    match e.kind {
                        EventKind::Put => copy.values.insert(e.kv.key.clone(), e.kv.value.clone()),
                        EventKind::Delete => copy.values.remove(&e.kv.key),
                    };
                }
                copy.revision = batch.revision();
                if copy.revision == store.current_revision() {
                    break;
                }
            }
            Some(ListWatchMessage::Watch(WatchMessage::Canceled(CancelReason::Compacted {
                compact_revision,
            }))) => {
                // The recovery recipe: the state again, then the changes after it.
                println!("compacted at {compact_revision}: listing again");
                building.clear();
                watch = list_watch(&store)?;
            }
            Some(other) => println!("{other:?}"),
            None => break,
        }
        if burst_done
            && watch.initial_revision().is_none()
            && copy.revision == store.current_revision()
        {
            break;
        }
    }
    for (k, v) in &copy.values {
        println!(
            "{} = {}",
            String::from_utf8_lossy(k),
            String::from_utf8_lossy(v)
        );
    }
    assert_eq!(
        copy.values.get(&b"/config/counter"[..]).map(|v| &v[..]),
        Some(&b"49"[..])
    );
    store.close().await
}

//! Publishes many single-put change sets to an engine with idle exact-key watchers, for
//! instruction counts of `WatchEngine::publish` under callgrind:
//!
//! ```text
//! cargo build --release -p watch-core --example publish_cost
//! valgrind --tool=callgrind target/release/examples/publish_cost 100000 1000
//! callgrind_annotate callgrind.out.* | grep publish
//! ```
//!
//! Arguments: change sets to publish (default 100000), idle watchers (default 1000). Every 64
//! publishes the task yields so the dispatcher (same thread) drains, as a server's writer does
//! between requests; the dispatcher is then sometimes busy and sometimes parked.

use bytes::Bytes;
use watch_core::{
    ChangeSet, EngineConfig, Event, KeySelector, KeyValue, WatchEngine, WatchOptions,
};

fn main() {
    let mut args = std::env::args().skip(1).map(|a| a.parse::<u64>().ok());
    let n = args.next().flatten().unwrap_or(100_000);
    let watchers = args.next().flatten().unwrap_or(1_000);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let (engine, dispatcher) = WatchEngine::new(EngineConfig::default());
        tokio::spawn(dispatcher.run());
        let _idle: Vec<_> = (0..watchers)
            .map(|i| {
                engine
                    .watch(
                        KeySelector::key(format!("idle/{i}")),
                        WatchOptions::default(),
                    )
                    .expect("watch")
            })
            .collect();
        let key = Bytes::from_static(b"/svc/api/inst-000001");
        let value = Bytes::from_static(b"01234567890123456789");
        for rev in 1..=n {
            let kv = KeyValue {
                key: key.clone(),
                value: value.clone(),
                create_revision: 1,
                mod_revision: rev,
                version: rev,
                lease: 0,
            };
            engine
                .publish(ChangeSet::new(rev, vec![Event::put(kv, None)]))
                .expect("increasing");
            if rev % 64 == 0 {
                tokio::task::yield_now().await;
            }
        }
        engine.shutdown();
    });
}

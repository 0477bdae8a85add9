//! A read at an old revision, both ways, in one run: `RedbStore::first_changes` (one key-index
//! seek per key) against the trait's default (reading every selected change set after the
//! revision, which is what kv-store's reads at a past revision did before). Builds a log of N
//! single-put change sets over K keys (`NoSync`: only the read is measured), then reads one key,
//! a 1%-of-keys range and every key at revision 1.
//!
//! ```text
//! cargo run --release -p event-log --example history_read -- 200000 1000
//! ```

use std::time::Instant;

use event_log::codec::EncodedChange;
use event_log::{
    ChangeSet, Durability, KeySelector, LogError, LogStore, RedbOptions, RedbStore,
    RetentionPolicy, Revision,
};
use watch_core::{Event, KeyValue};

/// Delegates everything but `first_changes`, so the trait's default answers it.
struct Replaying(RedbStore);

impl LogStore for Replaying {
    fn append_batch(&self, batch: &[EncodedChange]) -> Result<(), LogError> {
        self.0.append_batch(batch)
    }
    fn last_revision(&self) -> Result<Revision, LogError> {
        self.0.last_revision()
    }
    fn compacted_revision(&self) -> Result<Revision, LogError> {
        self.0.compacted_revision()
    }
    fn read(
        &self,
        selector: &KeySelector,
        after: Revision,
        until: Revision,
        limit: usize,
    ) -> Result<Vec<ChangeSet>, LogError> {
        self.0.read(selector, after, until, limit)
    }
    fn compact(&self, revision: Revision) -> Result<(), LogError> {
        self.0.compact(revision)
    }
    fn retention_target(
        &self,
        policy: &RetentionPolicy,
        now_ms: u64,
    ) -> Result<Option<Revision>, LogError> {
        self.0.retention_target(policy, now_ms)
    }
}

fn key(i: u64) -> String {
    format!("/k/{i:07}")
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let n: u64 = args.next().map_or(Ok(200_000), |a| a.parse())?;
    let keys: u64 = args.next().map_or(Ok(1000), |a| a.parse())?.max(1);
    let dir = tempfile::tempdir()?;
    let store = RedbStore::open(
        dir.path().join("events.redb"),
        RedbOptions {
            durability: Durability::NoSync,
            ..RedbOptions::default()
        },
    )?;
    let mut batch = Vec::new();
    for rev in 1..=n {
        let k = (rev - 1) % keys;
        let kv = |r: Revision| KeyValue {
            key: key(k).into(),
            value: vec![b'v'; 64].into(),
            create_revision: k + 1,
            mod_revision: r,
            version: (r - 1) / keys + 1,
            lease: 0,
        };
        let prev = (rev > keys).then(|| kv(rev - keys));
        let cs = ChangeSet::new(rev, vec![Event::put(kv(rev), prev)]);
        batch.push(event_log::codec::encode(&cs, 0));
        if batch.len() == 1024 {
            store.append_batch(&batch)?;
            batch.clear();
        }
    }
    store.append_batch(&batch)?;
    let replaying = Replaying(store.clone());
    let one = KeySelector::key(key(0));
    let some = KeySelector::range(key(0), key(keys.div_ceil(100)));
    let all = KeySelector::All;
    for (what, selector) in [
        ("one key", &one),
        ("1% of the keys", &some),
        ("every key", &all),
    ] {
        let t = Instant::now();
        let indexed = store.first_changes(selector, 1, n)?;
        let by_index = t.elapsed();
        let t = Instant::now();
        let replayed = replaying.first_changes(selector, 1, n)?;
        let by_replay = t.elapsed();
        assert_eq!(indexed, replayed, "both ways must agree");
        println!(
            "{what} at revision 1 of {n} ({keys} keys): key index {by_index:?}, replay \
             {by_replay:?} ({} keys restored)",
            indexed.len()
        );
    }
    Ok(())
}

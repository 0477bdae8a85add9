//! Reads at past revisions (served from the event log's key index) against a replay model:
//! every retained revision, every key alone, prefixes, partial ranges and the whole keyspace,
//! across compactions, deletes, re-created keys, multi-key txns and reopening; and txns whose
//! reads are historical.

use std::collections::BTreeMap;

use bytes::Bytes;
use kv_store::{
    Durability, KeyRange, PutOptions, RangeRequest, Store, StoreConfig, StoreError, TxnOp,
    TxnOpResult, TxnRequest,
};
use proptest::prelude::*;
use watch_core::{KeyValue, Revision};

const KEYS: [&str; 6] = ["a", "a/1", "a/2", "b", "b/1", "c"];

#[derive(Debug, Clone)]
enum Op {
    Put(usize, u8),
    /// Puts of several distinct keys in one txn (one revision).
    PutMany(Vec<usize>, u8),
    Delete(usize),
    DeletePrefix(usize),
    /// Compacts to the revision `f/255` of the way from the compaction to the current one.
    Compact(u8),
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..KEYS.len(), any::<u8>()).prop_map(|(k, v)| Op::Put(k, v)),
        2 => (proptest::collection::btree_set(0..KEYS.len(), 2..4), any::<u8>())
            .prop_map(|(ks, v)| Op::PutMany(ks.into_iter().collect(), v)),
        3 => (0..KEYS.len()).prop_map(Op::Delete),
        1 => (0..KEYS.len()).prop_map(Op::DeletePrefix),
        1 => any::<u8>().prop_map(Op::Compact),
        1 => Just(Op::Reopen),
    ]
}

type State = BTreeMap<Bytes, KeyValue>;

/// The state after each revision (index = revision).
struct Model {
    states: Vec<State>,
    compacted: Revision,
}

impl Model {
    fn current(&self) -> Revision {
        (self.states.len() - 1) as Revision
    }

    /// Applies one revision's writes (`None`: delete), if any changed something.
    fn commit(&mut self, writes: Vec<(Bytes, Option<Bytes>)>) {
        let rev = self.current() + 1;
        let mut next = self.states.last().cloned().unwrap_or_default();
        let mut changed = false;
        for (key, value) in writes {
            match value {
                Some(value) => {
                    let prev = next.get(&key);
                    let kv = KeyValue {
                        key: key.clone(),
                        value,
                        create_revision: prev.map_or(rev, |p| p.create_revision),
                        mod_revision: rev,
                        version: prev.map_or(1, |p| p.version + 1),
                        lease: 0,
                    };
                    next.insert(key, kv);
                    changed = true;
                }
                None => changed |= next.remove(&key).is_some(),
            }
        }
        if changed {
            self.states.push(next);
        }
    }
}

fn ranges() -> Vec<KeyRange> {
    let mut out: Vec<KeyRange> = KEYS.iter().map(|k| KeyRange::key(*k)).collect();
    out.push(KeyRange::key("missing"));
    out.push(KeyRange::prefix("a"));
    out.push(KeyRange::prefix("b/"));
    out.push(KeyRange::new("a/2", "b/1"));
    out.push(KeyRange::from_key("b"));
    out.push(KeyRange::all());
    out
}

fn expected(state: &State, range: &KeyRange) -> Vec<KeyValue> {
    state
        .values()
        .filter(|kv| range.contains(&kv.key))
        .cloned()
        .collect()
}

async fn open(dir: &std::path::Path) -> Store {
    Store::open(dir, StoreConfig::default().durability(Durability::NoSync))
        .await
        .unwrap()
}

async fn check_all(store: &Store, model: &Model) -> Result<(), TestCaseError> {
    let current = model.current();
    prop_assert_eq!(store.current_revision(), current);
    let first = model.compacted.max(1);
    for rev in first..=current {
        for range in ranges() {
            let got = store
                .range(RangeRequest::new(range.clone()).revision(rev))
                .await
                .unwrap();
            let want = expected(&model.states[rev as usize], &range);
            prop_assert_eq!(got.revision, current);
            prop_assert_eq!(&got.kvs, &want, "range {:?} at {}", range, rev);
        }
    }
    if first > 1 {
        let below = store
            .range(RangeRequest::new(KeyRange::all()).revision(first - 1))
            .await;
        let compacted = matches!(below, Err(StoreError::Compacted { .. }));
        prop_assert!(compacted, "{:?}", below);
    }
    Ok(())
}

async fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(dir.path()).await;
    // A fresh store is at revision 1 with nothing in it.
    let mut model = Model {
        states: vec![State::new(), State::new()],
        compacted: 0,
    };
    for op in ops {
        match op {
            Op::Put(k, v) => {
                let value = Bytes::from(vec![v]);
                store
                    .put(KEYS[k], value.clone(), PutOptions::default())
                    .await
                    .unwrap();
                model.commit(vec![(Bytes::from(KEYS[k]), Some(value))]);
            }
            Op::PutMany(ks, v) => {
                let success = ks
                    .iter()
                    .map(|k| TxnOp::Put {
                        key: Bytes::from(KEYS[*k]),
                        value: Bytes::from(vec![v]),
                        options: PutOptions::default(),
                    })
                    .collect();
                store
                    .txn(TxnRequest {
                        compare: Vec::new(),
                        success,
                        failure: Vec::new(),
                    })
                    .await
                    .unwrap();
                model.commit(
                    ks.iter()
                        .map(|k| (Bytes::from(KEYS[*k]), Some(Bytes::from(vec![v]))))
                        .collect(),
                );
            }
            Op::Delete(k) => {
                store
                    .delete_range(KeyRange::key(KEYS[k]), false)
                    .await
                    .unwrap();
                model.commit(vec![(Bytes::from(KEYS[k]), None)]);
            }
            Op::DeletePrefix(k) => {
                let range = KeyRange::prefix(KEYS[k]);
                store.delete_range(range.clone(), false).await.unwrap();
                let gone = model
                    .states
                    .last()
                    .unwrap()
                    .keys()
                    .filter(|key| range.contains(key))
                    .map(|key| (key.clone(), None))
                    .collect();
                model.commit(gone);
            }
            Op::Compact(f) => {
                let (lo, hi) = (model.compacted.max(1), model.current());
                let target = lo + (hi - lo) * Revision::from(f) / 255;
                if target > model.compacted {
                    store.compact(target).await.unwrap();
                    model.compacted = target;
                }
            }
            Op::Reopen => {
                store.close().await.unwrap();
                drop(store);
                store = open(dir.path()).await;
            }
        }
    }
    check_all(&store, &model).await?;
    store.close().await.unwrap();
    drop(store);
    // After a restart the same history answers the same.
    let store = open(dir.path()).await;
    check_all(&store, &model).await?;
    store.close().await.unwrap();
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn historical_ranges_match_a_replay_model(ops in proptest::collection::vec(op(), 1..40)) {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(run(ops))?;
    }
}

fn read_all(rev: Revision) -> TxnOp {
    TxnOp::Range(RangeRequest::new(KeyRange::all()).revision(rev))
}

fn put(key: &'static str, value: &'static str) -> TxnOp {
    TxnOp::Put {
        key: Bytes::from(key),
        value: Bytes::from(value),
        options: PutOptions::default(),
    }
}

fn triples(r: &TxnOpResult) -> Vec<(Bytes, Bytes, Revision)> {
    match r {
        TxnOpResult::Range(x) => x
            .kvs
            .iter()
            .map(|kv| (kv.key.clone(), kv.value.clone(), kv.create_revision))
            .collect(),
        other => panic!("not a range: {other:?}"),
    }
}

/// A txn reading past revisions (at the compaction boundary, before a delete, a re-created
/// key) gets the same answers as plain ranges, and its writes still apply; below the
/// compaction it fails whole.
#[tokio::test]
async fn txn_with_historical_reads() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path()).await;
    let r_a1 = store
        .put("a", "1", PutOptions::default())
        .await
        .unwrap()
        .revision;
    let r_b1 = store
        .put("b", "1", PutOptions::default())
        .await
        .unwrap()
        .revision;
    let r_del = store
        .delete_range(KeyRange::key("a"), false)
        .await
        .unwrap()
        .revision;
    store.put("a", "2", PutOptions::default()).await.unwrap();
    store.compact(r_b1).await.unwrap();
    let txn = |success| TxnRequest {
        compare: Vec::new(),
        success,
        failure: Vec::new(),
    };
    let result = store
        .txn(txn(vec![read_all(r_b1), read_all(r_del), put("c", "3")]))
        .await
        .unwrap();
    assert_eq!(
        triples(&result.responses[0]),
        vec![
            (Bytes::from("a"), Bytes::from("1"), r_a1),
            (Bytes::from("b"), Bytes::from("1"), r_b1)
        ]
    );
    assert_eq!(
        triples(&result.responses[1]),
        vec![(Bytes::from("b"), Bytes::from("1"), r_b1)]
    );
    let now = store.range(RangeRequest::key("c")).await.unwrap();
    assert_eq!(now.kvs[0].value, "3");
    let below = store.txn(txn(vec![read_all(r_a1), put("d", "4")])).await;
    assert!(
        matches!(below, Err(StoreError::Compacted { .. })),
        "{below:?}"
    );
    assert!(
        store
            .range(RangeRequest::key("d"))
            .await
            .unwrap()
            .kvs
            .is_empty()
    );
    store.close().await.unwrap();
}

//! List and watch in one call (`Store::watch_with_initial_state`) against a replay model: for
//! every watcher, its initial state is the model's state at its revision R, and that state
//! plus its events equals the model's state at every later revision, with writers running
//! while the initial chunks are read (one key per chunk), ranges deleted and re-created between
//! chunks, and compactions racing the initial read (a canceled watcher recovers by watching
//! again with initial state, and is checked again from its new R).

use std::collections::BTreeMap;

use bytes::Bytes;
use kv_store::{
    Durability, InitialState, KeyRange, ListWatch, ListWatchMessage, PutOptions, Store,
    StoreConfig, StoreError,
};
use proptest::prelude::*;
use watch_core::{
    CancelReason, Event, EventKind, KeySelector, KeyValue, Revision, WatchMessage, WatchOptions,
};

/// Every selector of these tests includes [`SENTINEL`], written last, so every watcher knows
/// when it has seen everything.
const KEYS: [&str; 8] = [
    "/a/1", "/a/2", "/a/3", "/a/4", "/b/1", "/b/2", "/c", SENTINEL,
];
const SENTINEL: &str = "/a/zz";

fn selectors() -> Vec<KeySelector> {
    vec![
        KeySelector::prefix("/a/"),
        KeySelector::All,
        KeySelector::range("/a/2", "/b/2"),
        KeySelector::key(SENTINEL),
        KeySelector::from_key("/a/3"),
    ]
}

type State = BTreeMap<Bytes, KeyValue>;

/// One write as the model replays it.
#[derive(Debug, Clone)]
enum Write {
    Put(Bytes, Bytes),
    DeletePrefix(Bytes),
}

/// The state after each revision (index = revision; a fresh store is at revision 1, empty).
struct Model {
    states: Vec<State>,
}

impl Model {
    fn new() -> Self {
        Self {
            states: vec![State::new(), State::new()],
        }
    }

    /// Applies the writes that made revisions, in revision order.
    fn from_writes(mut writes: Vec<(Revision, Write)>) -> Self {
        writes.sort_by_key(|(r, _)| *r);
        let mut model = Self::new();
        for (rev, w) in writes {
            assert_eq!(rev, model.states.len() as Revision, "a revision is missing");
            model.apply(&w);
        }
        model
    }

    fn apply(&mut self, w: &Write) {
        let rev = self.states.len() as Revision;
        let mut next = self.states.last().cloned().unwrap_or_default();
        match w {
            Write::Put(key, value) => {
                let prev = next.get(key);
                let kv = KeyValue {
                    key: key.clone(),
                    value: value.clone(),
                    create_revision: prev.map_or(rev, |p| p.create_revision),
                    mod_revision: rev,
                    version: prev.map_or(1, |p| p.version + 1),
                    lease: 0,
                };
                next.insert(key.clone(), kv);
            }
            Write::DeletePrefix(p) => next.retain(|k, _| !k.starts_with(p)),
        }
        self.states.push(next);
    }

    fn at(&self, rev: Revision, sel: &KeySelector) -> State {
        self.states[rev as usize]
            .iter()
            .filter(|(k, _)| sel.matches(k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}

/// What one watcher received, in order.
#[derive(Debug, Clone)]
enum Got {
    Initial(Vec<Event>),
    Complete(Revision),
    Batch(Revision, Vec<Event>),
    Compacted,
}

/// One watcher (and its recoveries): the messages of each attempt.
struct Watcher {
    selector: KeySelector,
    options: WatchOptions,
    initial: InitialState,
    watch: ListWatch,
    attempts: Vec<Vec<Got>>,
    /// The attempt saw the sentinel's revision (or started at it).
    done: bool,
    last: Revision,
}

impl Watcher {
    fn start(store: &Store, selector: KeySelector, prev_kv: bool, chunk_bytes: usize) -> Self {
        let options = WatchOptions::default().prev_kv(prev_kv).buffer(4);
        let initial = InitialState::default().chunk_bytes(chunk_bytes);
        let watch = store
            .watch_with_initial_state(selector.clone(), options, initial)
            .unwrap();
        Self {
            selector,
            options,
            initial,
            watch,
            attempts: vec![Vec::new()],
            done: false,
            last: 0,
        }
    }

    fn initial_phase(&self) -> bool {
        self.watch.initial_revision().is_some()
    }

    /// Receives one message; a compaction cancel starts the recovery: watch again with initial
    /// state. `end`: the sentinel's revision, once written.
    async fn step(&mut self, store: &Store, end: Option<Revision>) {
        let msg = self.watch.recv().await.unwrap().expect("the watch ended");
        let got = match msg {
            ListWatchMessage::Initial(events) => Got::Initial(events),
            ListWatchMessage::InitialComplete { revision } => {
                self.last = revision;
                Got::Complete(revision)
            }
            ListWatchMessage::Watch(WatchMessage::Events(batch)) => {
                self.last = batch.revision();
                let events = batch.events().map(|e| e.to_event()).collect();
                Got::Batch(batch.revision(), events)
            }
            ListWatchMessage::Watch(WatchMessage::Canceled(CancelReason::Compacted { .. })) => {
                Got::Compacted
            }
            other => panic!("unexpected message {other:?}"),
        };
        let recover = matches!(got, Got::Compacted);
        self.attempts.last_mut().unwrap().push(got);
        if recover {
            // The recovery recipe: the state again, then the changes after it.
            self.watch = store
                .watch_with_initial_state(self.selector.clone(), self.options, self.initial)
                .unwrap();
            self.attempts.push(Vec::new());
            self.last = 0;
        }
        if let Some(end) = end {
            self.done = self.last >= end;
        }
    }

    /// Checks every attempt against the model; the last must reach `end`.
    fn check(&self, model: &Model, end: Revision) {
        let sel = &self.selector;
        for (i, attempt) in self.attempts.iter().enumerate() {
            let mut view = State::new();
            let mut at: Option<Revision> = None;
            let mut last_key: Option<Bytes> = None;
            for got in attempt {
                match got {
                    Got::Initial(events) => {
                        assert!(at.is_none(), "initial events after the marker");
                        assert!(!self.options.no_put, "no_put drops initial events");
                        for e in events {
                            assert_eq!(e.kind, EventKind::Put);
                            assert!(e.prev_kv.is_none(), "initial events carry no prev_kv");
                            assert!(last_key.as_ref().is_none_or(|k| *k < e.kv.key), "key order");
                            last_key = Some(e.kv.key.clone());
                            view.insert(e.kv.key.clone(), e.kv.clone());
                        }
                    }
                    Got::Complete(r) => {
                        assert!(at.is_none(), "two markers");
                        assert_eq!(view, model.at(*r, sel), "initial state of {sel:?} at {r}");
                        at = Some(*r);
                    }
                    Got::Batch(rev, events) => {
                        let from = at.expect("an event before the marker");
                        assert!(*rev > from, "revision {rev} not after {from}: duplicate");
                        for r in from..*rev {
                            assert_eq!(view, model.at(r, sel), "{sel:?} at {r}: a gap");
                        }
                        for e in events {
                            assert!(sel.matches(&e.kv.key));
                            match e.kind {
                                EventKind::Put => view.insert(e.kv.key.clone(), e.kv.clone()),
                                EventKind::Delete => view.remove(&e.kv.key),
                            };
                        }
                        assert_eq!(view, model.at(*rev, sel), "{sel:?} at {rev}");
                        at = Some(*rev);
                    }
                    Got::Compacted => {
                        assert!(i + 1 < self.attempts.len(), "a cancel ends an attempt")
                    }
                }
            }
            if i + 1 == self.attempts.len() {
                let at = at.expect("the last attempt completed its initial state");
                for r in at..=end {
                    assert_eq!(view, model.at(r, sel), "{sel:?} at {r}");
                }
            }
        }
    }
}

async fn open(dir: &std::path::Path) -> Store {
    Store::open(dir, StoreConfig::default().durability(Durability::NoSync))
        .await
        .unwrap()
}

async fn put(store: &Store, key: &str, value: &str) -> (Revision, Write) {
    let r = store
        .put(key.to_owned(), value.to_owned(), PutOptions::default())
        .await;
    let rev = r.unwrap().revision;
    (
        rev,
        Write::Put(key.to_owned().into(), value.to_owned().into()),
    )
}

async fn delete_prefix(store: &Store, prefix: &str) -> Option<(Revision, Write)> {
    let r = store
        .delete_range(KeyRange::prefix(prefix.to_owned()), false)
        .await
        .unwrap();
    (r.deleted > 0).then(|| (r.revision, Write::DeletePrefix(prefix.to_owned().into())))
}

/// Writes the sentinel, drains every watcher to it, and checks them all.
async fn finish(store: &Store, mut watchers: Vec<Watcher>, mut writes: Vec<(Revision, Write)>) {
    let (end, w) = put(store, SENTINEL, "end").await;
    writes.push((end, w));
    for w in &mut watchers {
        while !w.done {
            w.step(store, Some(end)).await;
        }
    }
    let model = Model::from_writes(writes);
    for w in &watchers {
        w.check(&model, end);
    }
}

#[derive(Debug, Clone)]
enum Op {
    Put(usize, u8),
    DeletePrefix(usize),
    /// Re-creates every `/a/` key in one revision each.
    RecreateA,
    /// Compacts to the current revision (racing every initial read in progress).
    Compact,
    /// Starts a watcher: selector, prev_kv, chunk bytes (1: one key per chunk).
    Watch(usize, bool, usize),
    /// One message of the watcher at this index (modulo), while it is in its initial phase.
    Pull(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (0..KEYS.len() - 1, any::<u8>()).prop_map(|(k, v)| Op::Put(k, v)),
        1 => (0..3usize).prop_map(Op::DeletePrefix),
        1 => Just(Op::RecreateA),
        1 => Just(Op::Compact),
        2 => (0..5usize, any::<bool>(), prop_oneof![Just(1usize), Just(300), Just(1 << 20)])
            .prop_map(|(s, p, c)| Op::Watch(s, p, c)),
        6 => (0..8usize).prop_map(Op::Pull),
    ]
}

async fn run(ops: Vec<Op>) {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path()).await;
    let mut writes = Vec::new();
    let mut watchers: Vec<Watcher> = Vec::new();
    let prefixes = ["/a/", "/b/", "/"];
    for (i, k) in KEYS.iter().enumerate().take(5) {
        writes.push(put(&store, k, &format!("init{i}")).await);
    }
    for op in ops {
        match op {
            Op::Put(k, v) => writes.push(put(&store, KEYS[k], &v.to_string()).await),
            Op::DeletePrefix(p) => writes.extend(delete_prefix(&store, prefixes[p]).await),
            Op::RecreateA => {
                for k in &KEYS[..4] {
                    writes.push(put(&store, k, "again").await);
                }
            }
            Op::Compact => {
                let current = store.current_revision();
                match store.compact(current).await {
                    Ok(_) | Err(StoreError::Compacted { .. }) => {}
                    Err(e) => panic!("compaction failed: {e}"),
                }
            }
            Op::Watch(s, prev_kv, chunk) => {
                watchers.push(Watcher::start(
                    &store,
                    selectors()[s].clone(),
                    prev_kv,
                    chunk,
                ));
            }
            Op::Pull(i) => {
                if watchers.is_empty() {
                    continue;
                }
                let n = watchers.len();
                let w = &mut watchers[i % n];
                if w.initial_phase() {
                    w.step(&store, None).await;
                }
            }
        }
    }
    finish(&store, watchers, writes).await;
    store.close().await.unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn initial_state_plus_events_matches_the_model(ops in proptest::collection::vec(op(), 1..60)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(run(ops));
    }
}

/// The range a watcher is listing is deleted and re-created between its chunks, and the
/// history it needs is compacted away before its first chunk (restart at a newer R) and after
/// it (canceled as compacted, recovered by watching again).
#[tokio::test]
async fn deletes_recreates_and_compactions_between_initial_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path()).await;
    let mut writes = Vec::new();
    for k in &KEYS[..5] {
        writes.push(put(&store, k, "v1").await);
    }
    let a = KeySelector::prefix("/a/");
    // Deleted and re-created between chunks: still the state at R, then the changes.
    let mut w1 = Watcher::start(&store, a.clone(), true, 1);
    let r1 = w1.watch.initial_revision().unwrap();
    w1.step(&store, None).await;
    writes.extend(delete_prefix(&store, "/a/").await);
    for k in &KEYS[..4] {
        writes.push(put(&store, k, "v2").await);
    }
    while w1.initial_phase() {
        w1.step(&store, None).await;
    }
    assert!(matches!(w1.attempts[0][..], [.., Got::Complete(r)] if r == r1));
    let chunks = w1.attempts[0]
        .iter()
        .filter(|g| matches!(g, Got::Initial(_)))
        .count();
    assert_eq!(chunks, 4, "one key per chunk");

    // Compacted before the first chunk: the read restarts at the current revision.
    let mut w2 = Watcher::start(&store, a.clone(), false, 1);
    let before = w2.watch.initial_revision().unwrap();
    writes.push(put(&store, "/a/1", "v3").await);
    store.compact(store.current_revision()).await.unwrap();
    w2.step(&store, None).await;
    assert!(
        w2.watch.initial_revision().unwrap() > before,
        "restarted at a newer R"
    );
    assert!(matches!(w2.attempts[0][0], Got::Initial(_)));

    // Compacted after the first chunk: canceled as compacted, then recovered.
    writes.push(put(&store, "/a/2", "v3").await);
    store.compact(store.current_revision()).await.unwrap();
    let mut w3 = Watcher::start(&store, a.clone(), false, 1);
    w3.step(&store, None).await;
    writes.push(put(&store, "/a/3", "v3").await);
    store.compact(store.current_revision()).await.unwrap();
    w3.step(&store, None).await;
    assert!(matches!(
        w3.attempts[0][..],
        [Got::Initial(_), Got::Compacted]
    ));
    assert_eq!(w3.attempts.len(), 2, "recovered by watching again");

    // no_put drops the initial events; the marker still comes.
    let options = WatchOptions::default().no_put(true);
    let mut w4 = store
        .watch_with_initial_state(a.clone(), options, InitialState::default())
        .unwrap();
    let r4 = w4.initial_revision().unwrap();
    assert!(matches!(
        w4.recv().await.unwrap(),
        Some(ListWatchMessage::InitialComplete { revision }) if revision == r4
    ));
    finish(&store, vec![w1, w2, w3], writes).await;
    store.close().await.unwrap();
}

/// Writers run on other threads while watchers list in one-key chunks and a compactor races
/// them; the model is rebuilt from the revisions the writes returned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_and_compactions() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path()).await;
    let mut writes = Vec::new();
    for k in &KEYS[..7] {
        writes.push(put(&store, k, "v0").await);
    }
    let writer = |seed: u64| {
        let store = store.clone();
        tokio::spawn(async move {
            let mut rng = fastrand::Rng::with_seed(seed);
            let mut out = Vec::new();
            for i in 0..150 {
                match rng.u8(0..10) {
                    0 => out.extend(delete_prefix(&store, ["/a/", "/b/"][rng.usize(0..2)]).await),
                    1 if i % 25 == 0 => {
                        let c = store.current_revision();
                        match store.compact(c).await {
                            Ok(_) | Err(StoreError::Compacted { .. }) => {}
                            Err(e) => panic!("compaction failed: {e}"),
                        }
                    }
                    _ => out.push(put(&store, KEYS[rng.usize(0..7)], &format!("{seed}-{i}")).await),
                }
            }
            out
        })
    };
    let writers = [writer(1), writer(2)];
    let mut watchers = Vec::new();
    for (i, sel) in selectors().into_iter().enumerate() {
        let mut w = Watcher::start(&store, sel, i % 2 == 0, 1);
        // Each lists while the writers run.
        while w.initial_phase() {
            w.step(&store, None).await;
        }
        watchers.push(w);
    }
    for w in writers {
        writes.extend(w.await.unwrap());
    }
    finish(&store, watchers, writes).await;
    store.close().await.unwrap();
}

//! Append, query, compaction, recovery, backpressure and the History impl.

use std::sync::Arc;
use std::time::Duration;

use crate::common::{ScriptedStore, puts, revs};
use event_log::{
    DEFAULT_COMPACT_STEP, Durability, EventLog, LogConfig, LogError, RedbOptions, RedbStore,
    RetentionPolicy, STORE_FILE,
};
use futures_util::FutureExt;
use watch_core::{History, HistoryError, KeySelector};

fn fast() -> LogConfig {
    LogConfig {
        durability: Durability::NoSync,
        ..LogConfig::default()
    }
}

#[tokio::test]
async fn append_query_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let log = EventLog::open(dir.path(), LogConfig::default()).unwrap();
        assert_eq!(log.last_revision(), 0);
        assert_eq!(log.first_available(), 1);
        assert_eq!(log.append(puts(1, &["/a/1"])).await.unwrap(), 1);
        assert_eq!(log.append(puts(2, &["/a/2", "/b/1"])).await.unwrap(), 2);
        assert_eq!(log.append(puts(5, &["/a/1"])).await.unwrap(), 5);
        assert_eq!(log.append(puts(7, &["/c"])).await.unwrap(), 7);

        assert_eq!(revs(&log.read_range(0, 10).unwrap()), [1, 2, 5, 7]);
        assert_eq!(revs(&log.read_range(2, 1).unwrap()), [5]);
        assert_eq!(revs(&log.read_key("/a/1", 0, 10).unwrap()), [1, 5]);
        assert_eq!(revs(&log.read_key("/a/1", 1, 10).unwrap()), [5]);
        assert_eq!(revs(&log.read_key("/a", 0, 10).unwrap()), Vec::<u64>::new());
        assert_eq!(revs(&log.read_prefix("/a/", 0, 10).unwrap()), [1, 2, 5]);
        assert_eq!(revs(&log.read_prefix("/a/", 0, 2).unwrap()), [1, 2]);
        assert_eq!(revs(&log.read_key_range("/a/2", "/c", 0, 10).unwrap()), [2]);
        let sel = KeySelector::from_key("/b");
        assert_eq!(revs(&log.read(&sel, 0, 5, 10).unwrap()), [2]);
        assert_eq!(revs(&log.read(&sel, 0, 100, 10).unwrap()), [2, 7]);
        // A change set is returned whole, with events the selector did not pick.
        assert_eq!(
            log.read_key("/b/1", 0, 1).unwrap()[0],
            puts(2, &["/a/2", "/b/1"])
        );
        log.close().unwrap();
        assert!(matches!(
            log.append(puts(8, &["x"])).await,
            Err(LogError::Closed)
        ));
    }
    let log = EventLog::open(dir.path(), LogConfig::default()).unwrap();
    assert_eq!(log.last_revision(), 7);
    let all: Vec<_> = log.replay(0).collect::<Result<_, _>>().unwrap();
    assert_eq!(
        all,
        vec![
            puts(1, &["/a/1"]),
            puts(2, &["/a/2", "/b/1"]),
            puts(5, &["/a/1"]),
            puts(7, &["/c"])
        ]
    );
    assert_eq!(log.append(puts(8, &["/d"])).await.unwrap(), 8);
}

#[tokio::test]
async fn revisions_must_increase() {
    let dir = tempfile::tempdir().unwrap();
    let log = EventLog::open(dir.path(), fast()).unwrap();
    log.append(puts(3, &["k"])).await.unwrap();
    for bad in [3, 2, 0] {
        assert!(matches!(
            log.append(puts(bad, &["k"])).await,
            Err(LogError::NotIncreasing { revision, last: 3 }) if revision == bad
        ));
    }
    // A refused change set does not poison the log.
    assert_eq!(log.append(puts(4, &["k"])).await.unwrap(), 4);
}

#[tokio::test]
async fn compaction_semantics_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let log = EventLog::open(dir.path(), fast()).unwrap();
        for r in 1..=10 {
            log.append(puts(
                r,
                &["k", if r.is_multiple_of(2) { "even" } else { "odd" }],
            ))
            .await
            .unwrap();
        }
        assert!(matches!(
            log.compact(11).await,
            Err(LogError::FutureRevision {
                requested: 11,
                last: 10
            })
        ));
        log.compact(4).await.unwrap();
        assert_eq!(log.compacted_revision(), 4);
        assert_eq!(log.first_available(), 4);
        // After compact(4): revision 4 is readable, a read needing 3 fails.
        assert_eq!(
            revs(&log.read_range(3, 100).unwrap()),
            [4, 5, 6, 7, 8, 9, 10]
        );
        assert!(matches!(
            log.read_range(2, 1),
            Err(LogError::Compacted { compacted: 4 })
        ));
        assert!(matches!(
            log.read_key("k", 0, 1),
            Err(LogError::Compacted { compacted: 4 })
        ));
        assert_eq!(revs(&log.read_key("even", 3, 100).unwrap()), [4, 6, 8, 10]);
        for again in [4, 2] {
            assert!(matches!(
                log.compact(again).await,
                Err(LogError::AlreadyCompacted { compacted: 4, .. })
            ));
        }
        log.compact(10).await.unwrap();
        assert_eq!(revs(&log.read_range(9, 100).unwrap()), [10]);
    }
    let log = EventLog::open(dir.path(), fast()).unwrap();
    assert_eq!(log.compacted_revision(), 10);
    assert_eq!(log.last_revision(), 10);
    assert!(matches!(
        log.read_prefix("", 5, 1),
        Err(LogError::Compacted { compacted: 10 })
    ));
    // The index entries of compacted revisions are gone too.
    assert_eq!(
        revs(&log.read_key("odd", 9, 100).unwrap()),
        Vec::<u64>::new()
    );
    assert_eq!(log.append(puts(11, &["k"])).await.unwrap(), 11);
}

#[tokio::test]
async fn large_compaction_commits_in_steps() {
    let dir = tempfile::tempdir().unwrap();
    let log = EventLog::open(dir.path(), fast()).unwrap();
    let mut acks = Vec::new();
    for r in 1..=20_000u64 {
        acks.push(log.submit(&puts(r, &["k"])).await.unwrap());
    }
    for a in acks {
        a.await.unwrap();
    }
    let full = log.bytes_in_use();
    log.compact(19_990).await.unwrap();
    assert_eq!(revs(&log.read_key("k", 19_989, 100).unwrap()).len(), 11);
    assert!(log.read_range(19_988, 1).is_err());
    // Every step (three of them) kept the counters in step with what it deleted.
    assert_eq!(log.bytes_in_use(), log.recount_bytes_in_use().unwrap());
    // 11 of 20,000 similar records are left.
    assert!(
        log.bytes_in_use() < full / 1000,
        "{full} -> {}",
        log.bytes_in_use()
    );
}

/// What one change set adds to the bytes in use: its encoded record plus 16, and per distinct
/// key its key, 8 bytes of revision and 16 (the documented per-entry overheads).
/// A `RedbStore` in `dir` without fsync (these tests crash nothing), deleting at most
/// `compact_step_revisions` revisions per compaction step.
fn nosync_store(dir: &std::path::Path, compact_step_revisions: usize) -> RedbStore {
    RedbStore::open(
        dir.join(STORE_FILE),
        RedbOptions {
            durability: Durability::NoSync,
            compact_step_revisions,
            ..RedbOptions::default()
        },
    )
    .unwrap()
}

fn in_use_of(cs: &watch_core::ChangeSet) -> u64 {
    let record = event_log::codec::encode(cs, 0).bytes.len() as u64 + 16;
    let keys: std::collections::BTreeSet<&[u8]> = cs.events.iter().map(|e| e.key()).collect();
    record + keys.iter().map(|k| k.len() as u64 + 8 + 16).sum::<u64>()
}

/// `bytes_in_use` follows appends and compaction exactly (the documented per-record and
/// per-index-entry counts), equals a walk of the tables, survives reopening, and is computed
/// at open for a store written before the key-index counter existed.
#[tokio::test]
async fn bytes_in_use_counts_records_and_index_entries() {
    let dir = tempfile::tempdir().unwrap();
    let sets = vec![
        puts(1, &["/a", "/bb"]),
        puts(2, &["/a"]),
        // The same key twice in one change set is one index entry.
        puts(3, &["/ccc", "/ccc"]),
        puts(4, &["/a", "/dddd", "/e"]),
        puts(5, &["/bb"]),
    ];
    let expected = |from: usize| sets[from..].iter().map(in_use_of).sum::<u64>();
    let in_use = {
        let log = EventLog::open(dir.path(), fast()).unwrap();
        assert_eq!(log.bytes_in_use(), 0);
        for cs in &sets {
            log.append(cs.clone()).await.unwrap();
        }
        assert_eq!(log.bytes_in_use(), expected(0));
        assert_eq!(log.recount_bytes_in_use().unwrap(), expected(0));
        log.compact(3).await.unwrap();
        assert_eq!(log.bytes_in_use(), expected(2));
        assert_eq!(log.recount_bytes_in_use().unwrap(), expected(2));
        // Retention compacts through the same steps.
        let keep_one = LogConfig {
            retention: RetentionPolicy {
                keep_last: Some(1),
                ..RetentionPolicy::UNBOUNDED
            },
            ..fast()
        };
        drop(log);
        let log = EventLog::open(dir.path(), keep_one).unwrap();
        assert_eq!(log.apply_retention().await.unwrap(), Some(5));
        assert_eq!(log.bytes_in_use(), expected(4));
        log.bytes_in_use()
    };
    // Reopened: the counters were persisted with the commits.
    let log = EventLog::open(dir.path(), fast()).unwrap();
    assert_eq!(log.bytes_in_use(), in_use);
    drop(log);

    // A store from before the key-index counter: it is counted once at open.
    {
        let db = redb::Database::open(dir.path().join(STORE_FILE)).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let meta: redb::TableDefinition<'_, &str, u64> = redb::TableDefinition::new("meta");
            let mut meta = txn.open_table(meta).unwrap();
            assert!(meta.remove("index_bytes").unwrap().is_some());
        }
        txn.commit().unwrap();
    }
    let log = EventLog::open(dir.path(), fast()).unwrap();
    assert_eq!(log.bytes_in_use(), in_use);
    assert_eq!(log.recount_bytes_in_use().unwrap(), in_use);
    // And it is kept from then on.
    log.append(puts(6, &["/f"])).await.unwrap();
    assert_eq!(log.bytes_in_use(), in_use + in_use_of(&puts(6, &["/f"])));
    assert_eq!(log.recount_bytes_in_use().unwrap(), log.bytes_in_use());
}

#[tokio::test]
async fn defragment_returns_compacted_space() {
    let dir = tempfile::tempdir().unwrap();
    let log = EventLog::open(dir.path(), fast()).unwrap();
    let keys: Vec<String> = (0..50).map(|i| format!("key/{i:04}")).collect();
    let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
    for r in 1..=200u64 {
        log.append(puts(r, &keys)).await.unwrap();
    }
    let size = || {
        std::fs::metadata(dir.path().join(STORE_FILE))
            .unwrap()
            .len()
    };
    log.compact(200).await.unwrap();
    let before = size();
    assert!(
        log.defragment().await.unwrap(),
        "compacted history leaves free pages"
    );
    let after = size();
    assert!(after < before, "{before} -> {after}");
    // Everything kept is still there, and the log keeps appending.
    assert_eq!(revs(&log.read_range(199, 10).unwrap()), vec![200]);
    log.append(puts(201, &["k"])).await.unwrap();
    assert_eq!(revs(&log.read_key("k", 199, 10).unwrap()), vec![201]);
    log.close().unwrap();
}

#[tokio::test]
async fn history_impl() {
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(EventLog::open(dir.path(), fast()).unwrap());
    for r in 1..=6 {
        log.append(puts(r, &[if r.is_multiple_of(2) { "/x/a" } else { "/y" }]))
            .await
            .unwrap();
    }
    let h: Arc<dyn History> = log.clone();
    assert_eq!(h.first_available(), 1);
    let got = h.read(&KeySelector::prefix("/x/"), 0, 5, 10).await.unwrap();
    assert_eq!(got.iter().map(|c| c.revision).collect::<Vec<_>>(), [2, 4]);
    let got = h.read(&KeySelector::All, 1, 6, 2).await.unwrap();
    assert_eq!(got.iter().map(|c| c.revision).collect::<Vec<_>>(), [2, 3]);
    log.compact(3).await.unwrap();
    assert_eq!(h.first_available(), 3);
    assert_eq!(
        h.read(&KeySelector::All, 1, 6, 10).await.unwrap_err(),
        HistoryError::Compacted {
            compact_revision: 3
        }
    );
    assert_eq!(h.read(&KeySelector::All, 2, 6, 10).await.unwrap().len(), 4);
    // The History future is Send (spawnable).
    let h2 = h.clone();
    let n =
        tokio::spawn(async move { h2.read(&KeySelector::All, 2, 6, 10).await.map(|v| v.len()) })
            .await
            .unwrap()
            .unwrap();
    assert_eq!(n, 4);
}

#[test]
fn history_read_works_outside_a_runtime() {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let log = EventLog::open(dir.path(), fast()).unwrap();
    rt.block_on(log.append(puts(1, &["k"]))).unwrap();
    let got = History::read(&log, &KeySelector::All, 0, 1, 1).now_or_never();
    assert_eq!(got.unwrap().unwrap().len(), 1);
}

/// The queue is bounded: with the writer stuck in a commit, `try_append` reports `QueueFull`
/// once the queue is full and `append` waits (backpressure) instead of dropping.
#[tokio::test]
async fn full_queue_backpressure() {
    let dir = tempfile::tempdir().unwrap();
    let store = ScriptedStore::new(nosync_store(dir.path(), DEFAULT_COMPACT_STEP));
    let config = LogConfig {
        queue_capacity: 2,
        batch_size: 1,
        ..fast()
    };
    let log = EventLog::with_store(store.clone(), config).unwrap();
    let (entered, release) = store.arm(false);
    let first = log.try_append(&puts(1, &["k"])).unwrap();
    entered.recv().unwrap(); // the writer holds revision 1 in a commit
    let second = log.try_append(&puts(2, &["k"])).unwrap();
    let third = log.try_append(&puts(3, &["k"])).unwrap();
    assert!(matches!(
        log.try_append(&puts(4, &["k"])),
        Err(LogError::QueueFull)
    ));
    // `append` cannot get a slot either: it stays pending rather than dropping.
    let mut waiting = Box::pin(log.append(puts(4, &["k"])));
    assert!((&mut waiting).now_or_never().is_none());
    release.send(()).unwrap();
    assert_eq!(first.await.unwrap(), 1);
    assert_eq!(second.await.unwrap(), 2);
    assert_eq!(third.await.unwrap(), 3);
    assert_eq!(waiting.await.unwrap(), 4);
    assert_eq!(revs(&log.read_range(0, 10).unwrap()), [1, 2, 3, 4]);
}

#[tokio::test]
async fn retention_keep_last_and_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let retention = RetentionPolicy {
        keep_last: Some(5),
        check_interval: Duration::ZERO,
        ..RetentionPolicy::UNBOUNDED
    };
    let log = EventLog::open(
        dir.path(),
        LogConfig {
            retention,
            ..fast()
        },
    )
    .unwrap();
    for r in 1..=20 {
        log.append(puts(r, &["k"])).await.unwrap();
    }
    // Retention runs on the writer after a commit; this request queues behind it, so once it
    // answers the automatic pass is done and there is nothing left to compact.
    assert_eq!(log.apply_retention().await.unwrap(), None);
    assert_eq!(log.compacted_revision(), 16);
    assert_eq!(
        revs(&log.read_range(15, 100).unwrap()),
        [16, 17, 18, 19, 20]
    );
    drop(log);

    let dir = tempfile::tempdir().unwrap();
    let one = event_log::codec::encode(&puts(1, &["k"]), 0).bytes.len() as u64;
    let retention = RetentionPolicy {
        max_bytes: Some(3 * one),
        check_interval: Duration::ZERO,
        ..RetentionPolicy::UNBOUNDED
    };
    let log = EventLog::open(
        dir.path(),
        LogConfig {
            retention,
            ..fast()
        },
    )
    .unwrap();
    for r in 1..=9 {
        log.append(puts(r, &["k"])).await.unwrap();
    }
    assert_eq!(log.apply_retention().await.unwrap(), None);
    assert_eq!(log.compacted_revision(), 7);

    let dir = tempfile::tempdir().unwrap();
    let retention = RetentionPolicy {
        max_age: Some(Duration::ZERO),
        check_interval: Duration::ZERO,
        ..RetentionPolicy::UNBOUNDED
    };
    let log = EventLog::open(
        dir.path(),
        LogConfig {
            retention,
            ..fast()
        },
    )
    .unwrap();
    for r in 1..=4 {
        log.append(puts(r, &["k"])).await.unwrap();
    }
    // Everything is older than zero seconds once written, but the newest is always kept.
    log.apply_retention().await.unwrap();
    assert_eq!(log.compacted_revision(), 4);
    assert_eq!(revs(&log.read_range(3, 10).unwrap()), [4]);
}

#[tokio::test]
async fn concurrent_submitters_batch_together() {
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(EventLog::open(dir.path(), LogConfig::default()).unwrap());
    let next = Arc::new(tokio::sync::Mutex::new(1u64));
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let (log, next) = (log.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut got = Vec::new();
            for _ in 0..50 {
                let ack = {
                    let mut n = next.lock().await;
                    let ack = log.submit(&puts(*n, &["k"])).await.unwrap();
                    *n += 1;
                    ack
                };
                got.push(ack.await.unwrap());
            }
            got
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all.sort_unstable();
    assert_eq!(all, (1..=800).collect::<Vec<_>>());
    assert_eq!(log.replay(0).count(), 800);
}

/// A store whose compaction steps wait for the test: step 1 reports "not done" (after doing
/// the real work), step 2 finishes.
struct GatedCompaction {
    inner: RedbStore,
    steps: std::sync::Mutex<std::sync::mpsc::Receiver<()>>,
    entered: std::sync::Mutex<std::sync::mpsc::Sender<()>>,
    calls: std::sync::atomic::AtomicUsize,
}

impl event_log::LogStore for GatedCompaction {
    fn append_batch(&self, batch: &[event_log::codec::EncodedChange]) -> Result<(), LogError> {
        self.inner.append_batch(batch)
    }
    fn last_revision(&self) -> Result<u64, LogError> {
        self.inner.last_revision()
    }
    fn compacted_revision(&self) -> Result<u64, LogError> {
        self.inner.compacted_revision()
    }
    fn read(
        &self,
        selector: &KeySelector,
        after: u64,
        until: u64,
        limit: usize,
    ) -> Result<Vec<watch_core::ChangeSet>, LogError> {
        self.inner.read(selector, after, until, limit)
    }
    fn compact(&self, revision: u64) -> Result<(), LogError> {
        self.inner.compact(revision)
    }
    fn compact_step(&self, revision: u64) -> Result<bool, LogError> {
        let _ = self.entered.lock().unwrap().send(());
        self.steps.lock().unwrap().recv().unwrap();
        let done = self.inner.compact_step(revision)?;
        let call = self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(done && call > 0)
    }
    fn retention_target(
        &self,
        policy: &RetentionPolicy,
        now_ms: u64,
    ) -> Result<Option<u64>, LogError> {
        self.inner.retention_target(policy, now_ms)
    }
}

/// A compaction in progress does not hold appends: an append queued during its first step is
/// committed and acknowledged before the compaction's next step, and the compaction then ends.
#[tokio::test]
async fn appends_are_committed_between_compaction_steps() {
    let dir = tempfile::tempdir().unwrap();
    let inner = nosync_store(dir.path(), DEFAULT_COMPACT_STEP);
    let (step_tx, step_rx) = std::sync::mpsc::channel();
    let (entered_tx, entered_rx) = std::sync::mpsc::channel();
    let store = GatedCompaction {
        inner,
        steps: std::sync::Mutex::new(step_rx),
        entered: std::sync::Mutex::new(entered_tx),
        calls: std::sync::atomic::AtomicUsize::new(0),
    };
    let log = Arc::new(EventLog::with_store(Arc::new(store), fast()).unwrap());
    for rev in 1..=3 {
        log.append(puts(rev, &["/a"])).await.unwrap();
    }
    let compaction = tokio::spawn({
        let log = log.clone();
        async move { log.compact(3).await }
    });
    // The writer is inside step 1; queue an append behind it, then let the step finish.
    tokio::task::spawn_blocking({
        let entered = std::sync::Mutex::new(entered_rx);
        move || {
            entered.lock().unwrap().recv().unwrap();
            entered
        }
    })
    .await
    .unwrap();
    let ack = log.submit(&puts(4, &["/b"])).await.unwrap();
    step_tx.send(()).unwrap();
    // Step 2 is gated until after the append's acknowledgement: it cannot have run first.
    assert_eq!(ack.await.unwrap(), 4);
    assert!(!compaction.is_finished());
    step_tx.send(()).unwrap();
    compaction.await.unwrap().unwrap();
    assert_eq!(log.compacted_revision(), 3);
    assert_eq!(revs(&log.read_range(2, 10).unwrap()), [3, 4]);
    assert!(matches!(
        log.read_range(0, 10),
        Err(LogError::Compacted { compacted: 3 })
    ));
}

/// `RedbStore::first_changes` (key-index seeks) answers as the trait's default (reading every
/// selected change set of the window, here through `ScriptedStore`), for every window start,
/// key, prefix, range, from-key and all, including keys changed in several change sets of one
/// window, keys changed only before it, and after a compaction.
#[test]
fn first_changes_by_index_match_the_replay() {
    use event_log::LogStore;
    let dir = tempfile::tempdir().unwrap();
    let store = ScriptedStore::new(nosync_store(dir.path(), DEFAULT_COMPACT_STEP));
    let history: [&[&str]; 8] = [
        &["/a/1", "/b"],
        &["/a/2"],
        &["/a/1"],
        &["/c", "/a/2", "/b/x"],
        &["/b"],
        &["/a/1", "/a/3"],
        &["/d"],
        &["/b/x"],
    ];
    let batch: Vec<_> = history
        .iter()
        .zip(1u64..)
        .map(|(keys, rev)| event_log::codec::encode(&puts(rev, keys), 0))
        .collect();
    store.append_batch(&batch).unwrap();
    let selectors = [
        KeySelector::key("/a/1"),
        KeySelector::key("/zz"),
        KeySelector::prefix("/a/"),
        KeySelector::prefix("/b"),
        KeySelector::range("/a/2", "/c"),
        KeySelector::from_key("/b"),
        KeySelector::All,
    ];
    let check = |from: u64| {
        for sel in &selectors {
            for after in from..=8 {
                for until in after..=8 {
                    let by_index = store.inner.first_changes(sel, after, until).unwrap();
                    let replayed = store.first_changes(sel, after, until).unwrap();
                    assert_eq!(by_index, replayed, "{sel:?} ({after}, {until}]");
                }
            }
        }
    };
    check(0);
    store.compact(4).unwrap();
    check(3);
    assert!(matches!(
        store.inner.first_changes(&KeySelector::All, 2, 8),
        Err(LogError::Compacted { compacted: 4 })
    ));
}

/// A compaction step deletes at most `compact_step_revisions` revisions, raising the persisted
/// compaction revision to just past what it deleted, until the last step reaches the target.
#[test]
fn compaction_steps_delete_at_most_the_configured_revisions() {
    let dir = tempfile::tempdir().unwrap();
    let store = nosync_store(dir.path(), 10);
    let batch: Vec<_> = (1..=35)
        .map(|rev| event_log::codec::encode(&puts(rev, &["/k"]), 0))
        .collect();
    event_log::LogStore::append_batch(&store, &batch).unwrap();
    let mut reached = Vec::new();
    loop {
        let done = event_log::LogStore::compact_step(&store, 36).unwrap();
        reached.push(event_log::LogStore::compacted_revision(&store).unwrap());
        if done {
            break;
        }
    }
    assert_eq!(reached, [11, 21, 31, 36]);
}

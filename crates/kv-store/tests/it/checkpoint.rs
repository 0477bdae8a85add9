//! The persisted state (`state.redb`): a compaction writes one row per key changed since the
//! last checkpoint, open rebuilds the same state, a legacy `state.snapshot` is converted once,
//! and a checkpoint commit cut short at any byte (a torn or failed write) loses no
//! acknowledged write.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io;
use std::ops::Bound;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use event_log::LogStore;
use kv_store::{
    Durability, KeyRange, PutOptions, RangeRequest, SNAPSHOT_FILE, STATE_FILE, Store, StoreConfig,
    StoreError,
};
use redb::backends::FileBackend;
use redb::{BackendError, StorageBackend};
use watch_core::{ChangeSet, Event, KeyValue};

fn config() -> StoreConfig {
    StoreConfig::default().durability(Durability::NoSync)
}

async fn all(store: &Store) -> Vec<KeyValue> {
    store
        .range(RangeRequest::new(KeyRange::all()))
        .await
        .unwrap()
        .kvs
}

async fn put(store: &Store, key: &str, value: &str) -> u64 {
    store
        .put(key.to_owned(), value.to_owned(), PutOptions::default())
        .await
        .unwrap()
        .revision
}

async fn delete(store: &Store, key: &str) {
    let r = store
        .delete_range(KeyRange::key(key.to_owned()), false)
        .await
        .unwrap();
    assert_eq!(r.deleted, 1);
}

/// Rows written per compaction equal the distinct keys changed since the last checkpoint,
/// however many keys the state holds and however often each changed.
#[tokio::test]
async fn a_compaction_writes_one_row_per_changed_key() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), config()).await.unwrap();
    for i in 0..300 {
        put(&store, &format!("k{i:04}"), "v0").await;
    }
    store.compact(store.current_revision()).await.unwrap();
    let first = store.last_checkpoint().unwrap();
    assert_eq!((first.from, first.rows, first.removed), (0, 300, 0));
    assert_eq!(first.keys, 300);

    // 10 keys rewritten 5 times each, 3 deleted, 2 created (one of them deleted again):
    // 10 + 3 + 2 distinct keys changed.
    for round in 1..=5 {
        for i in 0..10 {
            put(&store, &format!("k{i:04}"), &format!("v{round}")).await;
        }
    }
    for i in 100..103 {
        delete(&store, &format!("k{i:04}")).await;
    }
    put(&store, "new-a", "x").await;
    put(&store, "new-b", "x").await;
    delete(&store, "new-b").await;
    let before = all(&store).await;
    store.compact(store.current_revision()).await.unwrap();
    let second = store.last_checkpoint().unwrap();
    assert_eq!(second.from, first.revision);
    assert_eq!(second.change_sets, 50 + 3 + 3);
    assert_eq!(second.rows, 15, "{second:?}");
    assert_eq!(
        second.removed, 4,
        "3 deleted keys and one created and deleted"
    );
    assert_eq!(second.keys, 298);
    assert!(second.bytes < first.bytes / 10, "{second:?} vs {first:?}");

    // Nothing changed: the next checkpoint writes no row.
    put(&store, "k0000", "v6").await;
    put(&store, "k0000", "v7").await;
    store.compact(store.current_revision()).await.unwrap();
    let third = store.last_checkpoint().unwrap();
    assert_eq!(third.rows, 1);
    let after = all(&store).await;
    store.close().await.unwrap();
    drop(store);

    // Reopening streams the table (the log holds nothing below the compaction).
    let store = Store::open(dir.path(), config()).await.unwrap();
    assert_eq!(store.checkpoint_revision(), third.revision);
    assert_eq!(all(&store).await, after);
    assert_ne!(before, after);
    store.close().await.unwrap();
}

/// A fold budget far below the window (`StoreConfig::checkpoint_fold_bytes` at its minimum)
/// writes the checkpoint in several flushes inside its one transaction; the state it
/// persists, its row count and its bytes-in-use counter are those of one flush. A budget
/// below the minimum is refused at open.
#[tokio::test]
async fn a_small_fold_budget_flushes_several_times_and_persists_the_same_state() {
    let dir = tempfile::tempdir().unwrap();
    let refused = Store::open(
        dir.path(),
        config().checkpoint_fold_bytes(kv_store::MIN_CHECKPOINT_FOLD_BYTES - 1),
    )
    .await;
    assert!(
        matches!(
            refused,
            Err(StoreError::InvalidConfig {
                field: "checkpoint_fold_bytes",
                ..
            })
        ),
        "{refused:?}"
    );
    let small = config().checkpoint_fold_bytes(kv_store::MIN_CHECKPOINT_FOLD_BYTES);
    let store = Store::open(dir.path(), small.clone()).await.unwrap();
    // 3,100 change sets of one 1 KiB value over 50 keys: each read chunk of 1,024 change sets
    // folds about 1.1 MiB (values + 64 per event), past the 1 MiB budget, so the fold is
    // flushed after each of the three full chunks and once at the end.
    for i in 0..3100u32 {
        let value = format!("{i:0>1024}");
        put(&store, &format!("k{:02}", i % 50), &value).await;
    }
    let before = all(&store).await;
    store.compact(store.current_revision()).await.unwrap();
    let info = store.last_checkpoint().unwrap();
    assert_eq!(info.change_sets, 3100);
    assert_eq!(info.flushes, 4, "{info:?}");
    // Every key once per full chunk, and the 28 keys of the last one.
    assert_eq!((info.rows, info.keys), (3 * 50 + 28, 50), "{info:?}");
    let in_use = store.bytes_in_use();
    assert_eq!(store.recount_bytes_in_use().await.unwrap(), in_use);
    store.close().await.unwrap();
    drop(store);

    let store = Store::open(dir.path(), small).await.unwrap();
    assert_eq!(all(&store).await, before);
    assert_eq!(store.bytes_in_use(), in_use);
    store.close().await.unwrap();
}

/// Writes `state.snapshot` as the pre-`state.redb` code did: one event-log record of puts.
fn write_legacy_snapshot(dir: &Path, revision: u64, kvs: &[KeyValue]) {
    let events = kvs.iter().map(|kv| Event::put(kv.clone(), None)).collect();
    let encoded = event_log::codec::encode(&ChangeSet::new(revision, events), 0);
    std::fs::write(dir.join(SNAPSHOT_FILE), &encoded.bytes).unwrap();
}

/// A data directory from before `state.redb` (a `state.snapshot` and a log compacted past
/// what a replay alone can rebuild) opens with the same state; the old file is converted
/// once and removed; a crash between the conversion and the removal is harmless.
#[tokio::test]
async fn a_legacy_snapshot_is_converted_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), config()).await.unwrap();
    for i in 0..50 {
        put(&store, &format!("k{i:02}"), &format!("v{i}")).await;
    }
    delete(&store, "k07").await;
    let snap_rev = store.current_revision();
    let at_snapshot = all(&store).await;
    put(&store, "k01", "after").await;
    put(&store, "z", "after").await;
    let want = all(&store).await;
    store.close().await.unwrap();
    drop(store);

    // The legacy layout: state.snapshot at `snap_rev`, the log compacted to it, no state.redb.
    write_legacy_snapshot(dir.path(), snap_rev, &at_snapshot);
    std::fs::remove_file(dir.path().join(STATE_FILE)).unwrap();
    {
        let log = event_log::RedbStore::open(
            dir.path().join(event_log::STORE_FILE),
            event_log::RedbOptions::default(),
        )
        .unwrap();
        log.compact(snap_rev).unwrap();
    }

    let store = Store::open(dir.path(), config()).await.unwrap();
    assert_eq!(all(&store).await, want);
    assert_eq!(store.checkpoint_revision(), snap_rev);
    assert!(!dir.path().join(SNAPSHOT_FILE).exists(), "converted once");
    assert!(dir.path().join(STATE_FILE).exists());
    let rev = put(&store, "k02", "later").await;
    store.close().await.unwrap();
    drop(store);

    // A crash after the conversion but before the removal leaves both at the same revision.
    write_legacy_snapshot(dir.path(), snap_rev, &at_snapshot);
    let store = Store::open(dir.path(), config()).await.unwrap();
    assert!(!dir.path().join(SNAPSHOT_FILE).exists());
    let now = all(&store).await;
    assert_eq!(now.len(), want.len());
    assert!(
        now.iter()
            .any(|kv| kv.key == "k02" && kv.mod_revision == rev)
    );
    // The converted table takes incremental checkpoints from there.
    store.compact(rev).await.unwrap();
    assert_eq!(store.last_checkpoint().unwrap().from, snap_rev);
    store.close().await.unwrap();
}

/// A storage backend over the real state file that "crashes" after `budget` more bytes once
/// armed: the write that crosses the budget is torn (only its first bytes reach the file),
/// it and every later write and fsync fail, and nothing more reaches the file: what a power
/// cut or a process death in the middle of a checkpoint commit leaves behind.
///
/// With `hold`, an armed fsync instead announces itself and waits to be released: a
/// checkpoint commit kept in the middle of its fsync for as long as a test needs.
#[derive(Debug)]
struct Crashing {
    inner: FileBackend,
    armed: Arc<AtomicBool>,
    budget: Arc<AtomicU64>,
    dead: Arc<AtomicBool>,
    /// Bytes written while armed.
    written: Arc<AtomicU64>,
    hold: Option<Hold>,
}

/// The fsync gate of [`Crashing`]: `entered` hears of a held fsync, `release` lets it go.
#[derive(Debug)]
struct Hold {
    entered: std::sync::mpsc::Sender<()>,
    release: std::sync::Mutex<std::sync::mpsc::Receiver<()>>,
}

fn crashed() -> io::Error {
    io::Error::from_raw_os_error(5) // EIO
}

impl StorageBackend for Crashing {
    fn len(&self) -> Result<u64, io::Error> {
        self.inner.len()
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), io::Error> {
        self.inner.read(offset, out)
    }
    fn set_len(&self, len: u64) -> Result<(), io::Error> {
        if self.dead.load(Ordering::SeqCst) {
            return Err(crashed());
        }
        self.inner.set_len(len)
    }
    fn sync_data(&self) -> Result<(), io::Error> {
        if self.dead.load(Ordering::SeqCst) {
            return Err(crashed());
        }
        if let Some(hold) = self
            .hold
            .as_ref()
            .filter(|_| self.armed.load(Ordering::SeqCst))
        {
            let _ = hold.entered.send(());
            let _ = hold.release.lock().unwrap().recv();
        }
        self.inner.sync_data()
    }
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), io::Error> {
        if self.dead.load(Ordering::SeqCst) {
            return Err(crashed());
        }
        if self.armed.load(Ordering::SeqCst) {
            let left = self.budget.load(Ordering::SeqCst);
            if (data.len() as u64) > left {
                self.dead.store(true, Ordering::SeqCst);
                self.inner.write(offset, &data[..left as usize])?;
                return Err(crashed());
            }
            self.budget.fetch_sub(data.len() as u64, Ordering::SeqCst);
            self.written.fetch_add(data.len() as u64, Ordering::SeqCst);
        }
        self.inner.write(offset, data)
    }
    fn close(&self) -> Result<(), io::Error> {
        self.inner.close()
    }
    fn try_lock_range(&self, s: Bound<u64>, e: Bound<u64>) -> Result<bool, BackendError> {
        self.inner.try_lock_range(s, e)
    }
    fn try_lock_shared_range(&self, s: Bound<u64>, e: Bound<u64>) -> Result<bool, BackendError> {
        self.inner.try_lock_shared_range(s, e)
    }
    fn lock_range(&self, s: Bound<u64>, e: Bound<u64>) -> Result<(), BackendError> {
        self.inner.lock_range(s, e)
    }
    fn lock_shared_range(&self, s: Bound<u64>, e: Bound<u64>) -> Result<(), BackendError> {
        self.inner.lock_shared_range(s, e)
    }
    fn unlock_range(&self, s: Bound<u64>, e: Bound<u64>) -> Result<(), BackendError> {
        self.inner.unlock_range(s, e)
    }
    fn query_lock_range(&self, s: Bound<u64>, e: Bound<u64>) -> Result<bool, BackendError> {
        self.inner.query_lock_range(s, e)
    }
}

/// One round: a store with a checkpoint at some revision, more acknowledged writes, then a
/// compaction whose checkpoint commit is cut after `budget` bytes. Returns whether the
/// compaction succeeded (the budget covered the whole commit) and the bytes it wrote.
async fn cut_checkpoint(dir: &Path, budget: u64) -> (bool, u64) {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(dir.join(STATE_FILE))
        .unwrap();
    let armed = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicU64::new(0));
    let backend = Crashing {
        written: written.clone(),
        inner: FileBackend::new(file).unwrap(),
        armed: armed.clone(),
        budget: Arc::new(AtomicU64::new(budget)),
        dead: Arc::new(AtomicBool::new(false)),
        hold: None,
    };
    let store = Store::open_with_state_backend(dir, config(), backend)
        .await
        .unwrap();
    // Every write below is acknowledged before the checkpoint starts.
    let mut model: BTreeMap<String, String> = all(&store)
        .await
        .into_iter()
        .map(|kv| {
            let k = String::from_utf8(kv.key.to_vec()).unwrap();
            (k, String::from_utf8(kv.value.to_vec()).unwrap())
        })
        .collect();
    let base = store.current_revision();
    for i in 0..40u64 {
        let key = format!("k{:03}", (base * 7 + i * 13) % 200);
        let value = format!("v{base}-{i}-{}", "x".repeat(100));
        put(&store, &key, &value).await;
        model.insert(key, value);
    }
    let gone = format!("k{:03}", base % 200);
    if model.remove(&gone).is_some() {
        delete(&store, &gone).await;
    }
    armed.store(true, Ordering::SeqCst);
    let compacted = store.compact(store.current_revision()).await;
    let ok = match &compacted {
        Ok(_) => true,
        Err(StoreError::Snapshot { .. }) => {
            // Fail-stop: nothing is acknowledged after a failed checkpoint commit.
            assert!(
                store.failure().is_some(),
                "a failed checkpoint stops the store"
            );
            assert!(store.put("late", "x", PutOptions::default()).await.is_err());
            false
        }
        Err(e) => panic!("budget {budget}: unexpected error {e}"),
    };
    // The log is intact; only the state file is "dead".
    store.close().await.unwrap();
    drop(store);

    // After the "crash", the real file: every acknowledged write is there.
    let store = Store::open(dir, config()).await.unwrap();
    let got: BTreeMap<String, String> = all(&store)
        .await
        .into_iter()
        .map(|kv| {
            let k = String::from_utf8(kv.key.to_vec()).unwrap();
            (k, String::from_utf8(kv.value.to_vec()).unwrap())
        })
        .collect();
    assert_eq!(
        got, model,
        "budget {budget}: state after the cut checkpoint"
    );
    // And the next compaction works from whichever checkpoint survived.
    put(&store, "k000", "next").await;
    store.compact(store.current_revision()).await.unwrap();
    store.close().await.unwrap();
    (ok, written.load(Ordering::SeqCst))
}

/// A checkpoint commit cut at 40 points spread over its bytes and at each of its last bytes'
/// boundaries (torn page writes, a torn commit slot, a failed fsync) never loses an
/// acknowledged write: the previous checkpoint plus the log, which was not compacted, rebuild
/// the state.
#[tokio::test]
async fn a_torn_checkpoint_loses_no_acknowledged_write() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = Store::open(dir.path(), config()).await.unwrap();
        for i in 0..200 {
            put(&store, &format!("k{i:03}"), "initial").await;
        }
        store.compact(store.current_revision()).await.unwrap();
        store.close().await.unwrap();
    }
    // How many bytes a checkpoint of this shape writes (each round's is alike).
    let (ok, bytes) = cut_checkpoint(dir.path(), u64::MAX).await;
    assert!(ok && bytes > 0);
    let mut cuts: Vec<u64> = (0..40).map(|i| bytes * i / 40).collect();
    // The commit ends with the commit slot (header) write: cut inside it too.
    cuts.extend(
        [1, 8, 64, 512, 4096]
            .iter()
            .filter(|&&d| d < bytes)
            .map(|d| bytes - d),
    );
    let mut failed = 0;
    for budget in cuts {
        if !cut_checkpoint(dir.path(), budget).await.0 {
            failed += 1;
        }
    }
    // The cuts really fell inside commits.
    assert!(failed >= 20, "only {failed} cut commits");
}

/// A damaged row (bytes changed outside redb) is an error at open, never data.
#[tokio::test]
async fn a_damaged_state_file_fails_to_open() {
    let dir = tempfile::tempdir().unwrap();
    let marker = "M".repeat(64);
    {
        let store = Store::open(dir.path(), config()).await.unwrap();
        put(&store, "a", &marker).await;
        put(&store, "b", "2").await;
        store.compact(store.current_revision()).await.unwrap();
        store.close().await.unwrap();
    }
    let path = dir.path().join(STATE_FILE);
    let mut bytes = std::fs::read(&path).unwrap();
    let at = bytes
        .windows(marker.len())
        .position(|w| w == marker.as_bytes())
        .expect("the value is stored in the file");
    bytes[at + 10] ^= 0x20;
    std::fs::write(&path, &bytes).unwrap();
    match Store::open(dir.path(), config()).await {
        Err(StoreError::Snapshot { message, .. }) => {
            assert!(message.contains("checksum"), "{message}")
        }
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("a damaged row was loaded"),
    }
}

/// A checkpoint stalls no writer: while a compaction's checkpoint commit is held in its fsync,
/// puts, deletes, a txn and a read at a past revision all complete (acknowledged, durable in
/// the log); the compaction then finishes and a reopened store has every write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_go_on_while_a_checkpoint_commits() {
    let dir = tempfile::tempdir().unwrap();
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(dir.path().join(STATE_FILE))
        .unwrap();
    let (entered_tx, entered) = std::sync::mpsc::channel();
    let (release, release_rx) = std::sync::mpsc::channel();
    let armed = Arc::new(AtomicBool::new(false));
    let backend = Crashing {
        inner: FileBackend::new(file).unwrap(),
        armed: armed.clone(),
        budget: Arc::new(AtomicU64::new(u64::MAX)),
        dead: Arc::new(AtomicBool::new(false)),
        written: Arc::new(AtomicU64::new(0)),
        hold: Some(Hold {
            entered: entered_tx,
            release: std::sync::Mutex::new(release_rx),
        }),
    };
    let store = Store::open_with_state_backend(dir.path(), config(), backend)
        .await
        .unwrap();
    for i in 0..100 {
        put(&store, &format!("k{i:03}"), "before").await;
    }
    let old = store.current_revision();
    armed.store(true, Ordering::SeqCst);
    let compaction = tokio::spawn({
        let store = store.clone();
        async move { store.compact(old).await }
    });
    // The checkpoint is now inside its commit's fsync, and stays there until released.
    tokio::task::spawn_blocking(move || entered.recv().unwrap())
        .await
        .unwrap();
    assert!(!compaction.is_finished());
    // A liveness guard, not a latency bound: a writer waiting on the held checkpoint would
    // wait forever.
    let writes = async {
        for i in 0..50 {
            put(&store, &format!("k{i:03}"), "during").await;
        }
        delete(&store, "k099").await;
        store
            .txn(kv_store::TxnRequest {
                compare: Vec::new(),
                success: vec![kv_store::TxnOp::Range(
                    RangeRequest::new(KeyRange::key("k000")).revision(old),
                )],
                failure: Vec::new(),
            })
            .await
            .unwrap()
    };
    let txn = tokio::time::timeout(std::time::Duration::from_secs(60), writes)
        .await
        .expect("writes stalled behind a checkpoint");
    let kv_store::TxnOpResult::Range(r) = &txn.responses[0] else {
        panic!("a range op yields a range result")
    };
    assert_eq!(r.kvs[0].value, "before");
    assert!(
        !compaction.is_finished(),
        "the checkpoint was held throughout"
    );
    armed.store(false, Ordering::SeqCst);
    release.send(()).unwrap();
    compaction.await.unwrap().unwrap();
    assert_eq!(store.last_checkpoint().unwrap().revision, old);
    let want = all(&store).await;
    store.close().await.unwrap();
    drop(store);

    let store = Store::open(dir.path(), config()).await.unwrap();
    assert_eq!(all(&store).await, want);
    assert_eq!(want.len(), 99);
    assert_eq!(want[0].value, "during");
    store.close().await.unwrap();
}

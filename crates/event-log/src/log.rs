//! [`EventLog`]: the group-committing writer thread, queries and the `History` impl.

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, TryRecvError};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::thread::JoinHandle;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, TryAcquireError, oneshot};
use watch_core::{ChangeSet, History, HistoryFuture, KeySelector, Revision};

use crate::codec::{self, EncodedChange};
use crate::config::LogConfig;
use crate::error::LogError;
use crate::observer::LogObserver;
use crate::store::{LogStore, RedbOptions, RedbStore};

/// File name of the redb store inside the directory given to [`EventLog::open`].
pub const STORE_FILE: &str = "events.redb";

/// File name of the log's write-ahead file in its directory: [`STORE_FILE`] followed by
/// [`crate::WAL_SUFFIX`] (present when [`LogConfig::wal`] is on).
pub const WAL_FILE: &str = "events.redb.wal";

/// A durable, group-committed, queryable history of change sets.
///
/// Appends go through a bounded queue to one writer thread that commits them in batches (one
/// store commit, hence one fsync, per batch) and acknowledges each change set only once its
/// batch is durable. Reads go straight to the store and see committed data only.
///
/// Dropping the log closes it (see [`EventLog::close`]).
pub struct EventLog {
    state: Arc<State>,
    // Taken (dropped) by `close`, which makes the writer drain the queue and exit.
    sender: Mutex<Option<mpsc::Sender<Command>>>,
    // Counts free queue slots: a submitter holds one from acquisition until the writer dequeues
    // its change set. Closed by `close`, which wakes every waiting submitter with `Closed`.
    permits: Arc<Semaphore>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

/// What the writer thread and the handle share.
struct State {
    store: Arc<dyn LogStore>,
    config: LogConfig,
    /// Last revision acknowledged durable. Written by the writer only.
    last: AtomicU64,
    /// Current compaction revision (0: never compacted). Written by the writer only.
    compacted: AtomicU64,
    /// The store's [`LogStore::bytes_in_use`] after the last commit or compaction step. Written
    /// by the writer only (and at open).
    in_use: AtomicU64,
    /// Set once, by the writer, when a commit fails; never cleared.
    poison: OnceLock<String>,
    /// Told about every commit, once set ([`EventLog::set_observer`]).
    observer: OnceLock<Arc<dyn LogObserver>>,
}

impl State {
    fn poisoned(&self) -> Result<(), LogError> {
        match self.poison.get() {
            Some(cause) => Err(LogError::Poisoned {
                cause: cause.clone(),
            }),
            None => Ok(()),
        }
    }
}

enum Command {
    Append {
        record: EncodedChange,
        reply: oneshot::Sender<Result<Revision, LogError>>,
        permit: OwnedSemaphorePermit,
    },
    Compact {
        revision: Revision,
        reply: oneshot::Sender<Result<(), LogError>>,
    },
    Retain {
        reply: oneshot::Sender<Result<Option<Revision>, LogError>>,
    },
    Defragment {
        reply: oneshot::Sender<Result<bool, LogError>>,
    },
}

/// Resolves when a submitted change set is durable (or failed). Returned by
/// [`EventLog::submit`] and [`EventLog::try_append`]; dropping it does not cancel the append.
#[derive(Debug)]
#[must_use = "the append is acknowledged only through this future"]
pub struct AppendAck {
    rx: oneshot::Receiver<Result<Revision, LogError>>,
}

impl Future for AppendAck {
    type Output = Result<Revision, LogError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.rx)
            .poll(cx)
            .map(|r| r.unwrap_or(Err(LogError::Closed)))
    }
}

impl EventLog {
    /// Opens (creating if needed) the log kept in directory `dir` (file [`STORE_FILE`]) and
    /// starts its writer thread. `last_revision` and `compacted_revision` come back as they were
    /// at the last durable commit.
    pub fn open(dir: impl AsRef<Path>, config: LogConfig) -> Result<Self, LogError> {
        std::fs::create_dir_all(dir.as_ref())?;
        let store = RedbStore::open(
            dir.as_ref().join(STORE_FILE),
            RedbOptions {
                durability: config.durability,
                quick_repair: config.quick_repair,
                verify_on_open: config.verify_on_open,
                cache_bytes: config.cache_bytes,
                wal: config.wal,
                compact_step_revisions: config.compact_step_revisions,
            },
        )?;
        Self::with_store(Arc::new(store), config)
    }

    /// Runs a log over any [`LogStore`]. `config.durability`, `quick_repair` and
    /// `verify_on_open` are the store's business and ignored here.
    pub fn with_store(store: Arc<dyn LogStore>, config: LogConfig) -> Result<Self, LogError> {
        let last = store.last_revision()?;
        let compacted = store.compacted_revision()?;
        let in_use = store.bytes_in_use();
        let config = LogConfig {
            batch_size: config.batch_size.max(1),
            queue_capacity: config.queue_capacity.max(1),
            ..config
        };
        let state = Arc::new(State {
            store,
            config,
            last: AtomicU64::new(last),
            compacted: AtomicU64::new(compacted),
            in_use: AtomicU64::new(in_use),
            poison: OnceLock::new(),
            observer: OnceLock::new(),
        });
        let (tx, rx) = mpsc::channel();
        let writer_state = Arc::clone(&state);
        let writer = std::thread::Builder::new()
            .name("event-log-writer".into())
            .spawn(move || Writer::new(writer_state).run(rx))?;
        Ok(Self {
            state,
            sender: Mutex::new(Some(tx)),
            permits: Arc::new(Semaphore::new(config.queue_capacity)),
            writer: Mutex::new(Some(writer)),
        })
    }

    /// Appends `cs` and resolves once it is durable, with its revision.
    ///
    /// Waits for queue space when the queue is full (backpressure, never a drop). Fails with
    /// [`LogError::NotIncreasing`] when `cs.revision` is not above the last accepted revision,
    /// with the commit's error when its batch failed, and with [`LogError::Poisoned`] after any
    /// failed commit.
    pub async fn append(&self, cs: ChangeSet) -> Result<Revision, LogError> {
        self.submit(&cs).await?.await
    }

    /// Queues `cs`, waiting for queue space, and returns the future of its acknowledgement.
    ///
    /// Change sets are committed in the order they are queued, so a caller that allocates
    /// revisions from several tasks holds its own lock across allocation and `submit` (not across
    /// the returned future) to keep revisions increasing.
    pub async fn submit(&self, cs: &ChangeSet) -> Result<AppendAck, LogError> {
        self.state.poisoned()?;
        let permit = Arc::clone(&self.permits)
            .acquire_owned()
            .await
            .map_err(|_| LogError::Closed)?;
        self.enqueue(cs, permit)
    }

    /// Queues `cs` without waiting: fails with [`LogError::QueueFull`] (nothing queued) when the
    /// queue is full. Await the returned future for durability.
    pub fn try_append(&self, cs: &ChangeSet) -> Result<AppendAck, LogError> {
        self.state.poisoned()?;
        let permit = match Arc::clone(&self.permits).try_acquire_owned() {
            Ok(p) => p,
            Err(TryAcquireError::NoPermits) => return Err(LogError::QueueFull),
            Err(TryAcquireError::Closed) => return Err(LogError::Closed),
        };
        self.enqueue(cs, permit)
    }

    fn enqueue(&self, cs: &ChangeSet, permit: OwnedSemaphorePermit) -> Result<AppendAck, LogError> {
        let record = codec::encode(cs, now_ms());
        let (reply, rx) = oneshot::channel();
        let sender = self.sender.lock();
        sender
            .as_ref()
            .ok_or(LogError::Closed)?
            .send(Command::Append {
                record,
                reply,
                permit,
            })
            .map_err(|_| LogError::Closed)?;
        Ok(AppendAck { rx })
    }

    /// Drops history below `revision`: afterwards revisions `>= revision` remain readable and
    /// reads starting lower fail with [`LogError::Compacted`]. The compaction revision is
    /// persisted and never goes backwards.
    ///
    /// Fails with [`LogError::AlreadyCompacted`] when `revision` is at or below the current
    /// compaction revision (nothing changes) and with [`LogError::FutureRevision`] when it is
    /// above the last acknowledged revision. Runs on the writer thread in steps
    /// ([`LogStore::compact_step`]: at most [`LogConfig::compact_step_revisions`] each) alternating with append
    /// batches, so appends keep being committed while a large compaction runs.
    pub async fn compact(&self, revision: Revision) -> Result<(), LogError> {
        let (reply, rx) = oneshot::channel();
        self.command(Command::Compact { revision, reply })?;
        rx.await.unwrap_or(Err(LogError::Closed))
    }

    /// Applies the retention policy now, on the writer thread after everything queued before it,
    /// and returns the new compaction revision if it compacted. (The writer also applies it by
    /// itself after commits, every [`crate::RetentionPolicy::check_interval`].)
    pub async fn apply_retention(&self) -> Result<Option<Revision>, LogError> {
        let (reply, rx) = oneshot::channel();
        self.command(Command::Retain { reply })?;
        rx.await.unwrap_or(Err(LogError::Closed))
    }

    /// Gives the space the store file no longer uses back to the file system (redb's
    /// `compact`), on the writer thread between batches: appends queue behind it, reads wait
    /// for it (the store's reads and its compaction exclude each other). Returns whether the
    /// backend reclaimed anything ([`LogStore::defragment`]).
    pub async fn defragment(&self) -> Result<bool, LogError> {
        let (reply, rx) = oneshot::channel();
        self.command(Command::Defragment { reply })?;
        rx.await.unwrap_or(Err(LogError::Closed))
    }

    fn command(&self, command: Command) -> Result<(), LogError> {
        self.state.poisoned()?;
        let sender = self.sender.lock();
        sender
            .as_ref()
            .ok_or(LogError::Closed)?
            .send(command)
            .map_err(|_| LogError::Closed)
    }

    /// Last revision acknowledged durable (0 for an empty log).
    pub fn last_revision(&self) -> Revision {
        self.state.last.load(Ordering::Acquire)
    }

    /// The compaction revision: revisions below it are gone (0 when never compacted).
    pub fn compacted_revision(&self) -> Revision {
        self.state.compacted.load(Ordering::Acquire)
    }

    /// Bytes of live data the log holds ([`LogStore::bytes_in_use`]: records and key index,
    /// with their per-entry bookkeeping; 0 for a store that does not count), as of the last
    /// commit or compaction step. A memory read, cheap enough for every write's quota check;
    /// unlike the file's length it falls when a compaction drops history.
    pub fn bytes_in_use(&self) -> u64 {
        self.state.in_use.load(Ordering::Acquire)
    }

    /// [`EventLog::bytes_in_use`] recomputed by walking every record and index entry
    /// ([`LogStore::recount_bytes_in_use`]): O(n) and blocking, a check of the counters for
    /// tests and offline tools. Equal to `bytes_in_use` when no commit runs meanwhile.
    pub fn recount_bytes_in_use(&self) -> Result<u64, LogError> {
        self.state.store.recount_bytes_in_use()
    }

    /// The oldest revision a read can return: the compaction revision, or 1.
    pub fn first_available(&self) -> Revision {
        self.compacted_revision().max(1)
    }

    /// Installs the observer told about every later commit (batch size, commit latency,
    /// failures). Only one observer can be set; returns false (and drops `observer`) if one
    /// already was.
    pub fn set_observer(&self, observer: Arc<dyn LogObserver>) -> bool {
        self.state.observer.set(observer).is_ok()
    }

    /// The cause if a failed commit poisoned the log.
    pub fn poisoned(&self) -> Option<&str> {
        self.state.poison.get().map(String::as_str)
    }

    /// Up to `limit` change sets with `after < revision <= until` that hold an event `selector`
    /// selects, in revision order, each with all its events. Blocking (a store read).
    pub fn read(
        &self,
        selector: &KeySelector,
        after: Revision,
        until: Revision,
        limit: usize,
    ) -> Result<Vec<ChangeSet>, LogError> {
        self.state.store.read(selector, after, until, limit)
    }

    /// For every key `selector` selects that changed in `(after, until]`, its first event in
    /// that window, in key order: the `prev_kv` of each is the key's value at `after` (see
    /// [`LogStore::first_changes`]). With [`RedbStore`], from the key index: no scan of the
    /// history after `after`. Blocking (a store read).
    pub fn first_changes(
        &self,
        selector: &KeySelector,
        after: Revision,
        until: Revision,
    ) -> Result<Vec<watch_core::Event>, LogError> {
        self.state.store.first_changes(selector, after, until)
    }

    /// Up to `limit` change sets after revision `after`.
    pub fn read_range(&self, after: Revision, limit: usize) -> Result<Vec<ChangeSet>, LogError> {
        self.read(&KeySelector::All, after, Revision::MAX, limit)
    }

    /// Up to `limit` change sets after `after` that changed exactly `key` (via the key index).
    pub fn read_key(
        &self,
        key: impl Into<Bytes>,
        after: Revision,
        limit: usize,
    ) -> Result<Vec<ChangeSet>, LogError> {
        self.read(&KeySelector::key(key), after, Revision::MAX, limit)
    }

    /// Up to `limit` change sets after `after` that changed a key starting with `prefix`.
    pub fn read_prefix(
        &self,
        prefix: impl Into<Bytes>,
        after: Revision,
        limit: usize,
    ) -> Result<Vec<ChangeSet>, LogError> {
        self.read(&KeySelector::prefix(prefix), after, Revision::MAX, limit)
    }

    /// Up to `limit` change sets after `after` that changed a key in `[start, end)`.
    pub fn read_key_range(
        &self,
        start: impl Into<Bytes>,
        end: impl Into<Bytes>,
        after: Revision,
        limit: usize,
    ) -> Result<Vec<ChangeSet>, LogError> {
        self.read(&KeySelector::range(start, end), after, Revision::MAX, limit)
    }

    /// Every change set after `after`, in order, read in chunks: what a state machine replays to
    /// rebuild itself. Stops after the first error.
    pub fn replay(&self, after: Revision) -> Replay {
        Replay {
            store: Arc::clone(&self.state.store),
            after,
            buffer: Vec::new().into_iter(),
            done: false,
        }
    }

    /// Closes the log: refuses new appends, lets the writer commit everything already queued,
    /// and joins the writer thread. Blocks for at most one commit per queued batch. Idempotent.
    pub fn close(&self) -> Result<(), LogError> {
        self.permits.close();
        drop(self.sender.lock().take());
        let writer = self.writer.lock().take();
        if let Some(writer) = writer {
            writer
                .join()
                .map_err(|_| LogError::Storage("event-log writer thread panicked".into()))?;
        }
        Ok(())
    }
}

impl Drop for EventLog {
    fn drop(&mut self) {
        if let Err(e) = self.close() {
            tracing::error!(error = %e, "closing the event log");
        }
    }
}

impl std::fmt::Debug for EventLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventLog")
            .field("last_revision", &self.last_revision())
            .field("compacted_revision", &self.compacted_revision())
            .field("poisoned", &self.poisoned())
            .finish_non_exhaustive()
    }
}

/// Reads run on tokio's blocking pool when called inside a runtime (a redb read may touch the
/// disk), inline otherwise. The future owns what it uses, so it is `Send`.
impl History for EventLog {
    fn read(
        &self,
        selector: &KeySelector,
        after: Revision,
        until: Revision,
        limit: usize,
    ) -> HistoryFuture<'_> {
        let store = Arc::clone(&self.state.store);
        let selector = selector.clone();
        Box::pin(async move {
            let read = move || store.read(&selector, after, until, limit);
            let result = match tokio::runtime::Handle::try_current() {
                Ok(handle) => handle
                    .spawn_blocking(read)
                    .await
                    .unwrap_or_else(|e| Err(LogError::Storage(format!("history read: {e}")))),
                Err(_) => read(),
            };
            Ok(result?.into_iter().map(Arc::new).collect())
        })
    }

    fn first_available(&self) -> Revision {
        EventLog::first_available(self)
    }
}

/// Iterator over every change set after a revision; see [`EventLog::replay`].
pub struct Replay {
    store: Arc<dyn LogStore>,
    after: Revision,
    buffer: std::vec::IntoIter<ChangeSet>,
    done: bool,
}

/// Change sets fetched per store read while replaying.
const REPLAY_CHUNK: usize = 4096;

impl Iterator for Replay {
    type Item = Result<ChangeSet, LogError>;

    fn next(&mut self) -> Option<Self::Item> {
        if let Some(cs) = self.buffer.next() {
            self.after = cs.revision;
            return Some(Ok(cs));
        }
        if self.done {
            return None;
        }
        match self
            .store
            .read(&KeySelector::All, self.after, Revision::MAX, REPLAY_CHUNK)
        {
            Ok(chunk) => {
                self.done = chunk.len() < REPLAY_CHUNK;
                self.buffer = chunk.into_iter();
                let cs = self.buffer.next()?;
                self.after = cs.revision;
                Some(Ok(cs))
            }
            Err(e) => {
                self.done = true;
                Some(Err(e))
            }
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The writer thread's state. It alone writes to the store.
struct Writer {
    state: Arc<State>,
    /// Last revision accepted into a batch (equals the durable last between batches).
    last: Revision,
    last_retention: Option<Instant>,
    /// A [`EventLog::compact`] in progress: its target and reply. Advanced one store step
    /// ([`LogStore::compact_step`]) after each batch, or whenever the queue is empty.
    compacting: Option<(Revision, oneshot::Sender<Result<(), LogError>>)>,
}

struct Pending {
    record: EncodedChange,
    reply: oneshot::Sender<Result<Revision, LogError>>,
}

impl Writer {
    fn new(state: Arc<State>) -> Self {
        let last = state.last.load(Ordering::Acquire);
        Self {
            state,
            last,
            last_retention: None,
            compacting: None,
        }
    }

    fn run(mut self, rx: mpsc::Receiver<Command>) {
        let cfg = self.state.config;
        // A command that did not fit the previous batch, handled first in the next round.
        let mut carried: Option<Command> = None;
        loop {
            let first = match carried.take() {
                Some(c) => c,
                // A compaction in progress advances whenever nothing is queued.
                None if self.compacting.is_some() => match rx.try_recv() {
                    Ok(c) => c,
                    Err(TryRecvError::Empty) => {
                        self.compact_step();
                        continue;
                    }
                    Err(TryRecvError::Disconnected) => {
                        self.finish_compaction();
                        return;
                    }
                },
                None => match rx.recv() {
                    Ok(c) => c,
                    // Every sender is gone and the queue is drained: the log is closed.
                    Err(_) => return,
                },
            };
            let mut batch = Vec::new();
            let mut bytes = 0usize;
            match first {
                Command::Compact { revision, reply } => {
                    // One compaction at a time: a second one waits for the first to finish.
                    self.finish_compaction();
                    match self.check_compact(revision) {
                        Ok(()) => self.compacting = Some((revision, reply)),
                        Err(e) => {
                            let _ = reply.send(Err(e));
                        }
                    }
                    continue;
                }
                Command::Retain { reply } => {
                    let _ = reply.send(self.retain());
                    continue;
                }
                Command::Defragment { reply } => {
                    let _ = reply.send(
                        self.state
                            .poisoned()
                            .and_then(|()| self.state.store.defragment()),
                    );
                    continue;
                }
                Command::Append {
                    record,
                    reply,
                    permit,
                } => {
                    drop(permit);
                    bytes += record.bytes.len();
                    batch.push(Pending { record, reply });
                }
            }
            let deadline = Instant::now() + cfg.flush_interval;
            while batch.len() < cfg.batch_size && bytes < cfg.max_batch_bytes {
                let next = match rx.try_recv() {
                    Ok(c) => c,
                    Err(TryRecvError::Empty) if !cfg.flush_interval.is_zero() => {
                        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                            Ok(c) => c,
                            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => {
                                break;
                            }
                        }
                    }
                    Err(_) => break,
                };
                match next {
                    Command::Append {
                        record,
                        reply,
                        permit,
                    } if bytes + record.bytes.len() <= cfg.max_batch_bytes => {
                        drop(permit);
                        bytes += record.bytes.len();
                        batch.push(Pending { record, reply });
                    }
                    other => {
                        carried = Some(other);
                        break;
                    }
                }
            }
            self.commit(batch);
            // Batches and compaction steps alternate: a long compaction delays a commit by at
            // most one step (at most `COMPACT_CHUNK` revisions deleted in one commit).
            if self.compacting.is_some() {
                self.compact_step();
            }
            self.apply_retention();
        }
    }

    /// Commits one batch and answers every submitter in it.
    fn commit(&mut self, batch: Vec<Pending>) {
        if let Err(e) = self.state.poisoned() {
            for p in batch {
                let _ = p.reply.send(Err(e.clone()));
            }
            return;
        }
        let mut records = Vec::with_capacity(batch.len());
        let mut replies = Vec::with_capacity(batch.len());
        let mut last = self.last;
        for p in batch {
            if p.record.revision <= last {
                let _ = p.reply.send(Err(LogError::NotIncreasing {
                    revision: p.record.revision,
                    last,
                }));
                continue;
            }
            last = p.record.revision;
            replies.push((p.record.revision, p.reply));
            records.push(p.record);
        }
        if records.is_empty() {
            return;
        }
        let started = Instant::now();
        let committed = self.state.store.append_batch(&records);
        if let (Some(o), Ok(())) = (self.state.observer.get(), &committed) {
            let bytes = records.iter().map(|r| r.bytes.len()).sum();
            o.batch_committed(records.len(), bytes, started.elapsed());
        }
        match committed {
            Ok(()) => {
                self.last = last;
                self.state.last.store(last, Ordering::Release);
                self.refresh_in_use();
                for (rev, reply) in replies {
                    let _ = reply.send(Ok(rev));
                }
            }
            Err(e) => {
                // fsyncgate: a failed commit is never retried and then acknowledged. Every
                // submitter of this batch gets the error and the log refuses further writes.
                self.poison(&e);
                for (_, reply) in replies {
                    let _ = reply.send(Err(e.clone()));
                }
            }
        }
    }

    fn poison(&self, e: &LogError) {
        tracing::error!(error = %e, "event-log commit failed; the log is poisoned");
        if let Some(o) = self.state.observer.get() {
            o.commit_failed(e);
        }
        let _ = self.state.poison.set(e.to_string());
    }

    /// Whether compacting to `revision` is allowed now.
    fn check_compact(&self, revision: Revision) -> Result<(), LogError> {
        self.state.poisoned()?;
        let compacted = self.state.compacted.load(Ordering::Acquire);
        if revision <= compacted {
            return Err(LogError::AlreadyCompacted {
                requested: revision,
                compacted,
            });
        }
        if revision > self.last {
            return Err(LogError::FutureRevision {
                requested: revision,
                last: self.last,
            });
        }
        Ok(())
    }

    /// Publishes the store's bytes in use after a commit or a compaction step.
    fn refresh_in_use(&self) {
        self.state
            .in_use
            .store(self.state.store.bytes_in_use(), Ordering::Release);
    }

    /// Compacts to `revision` at once (retention).
    fn compact(&mut self, revision: Revision) -> Result<(), LogError> {
        self.check_compact(revision)?;
        let result = self.state.store.compact(revision);
        // Some steps may have committed even when a later one failed.
        self.refresh_in_use();
        self.compacted(revision, result)
    }

    /// Advances the compaction in progress by one store step; answers it when done or failed.
    fn compact_step(&mut self) {
        let Some((revision, _)) = &self.compacting else {
            return;
        };
        let revision = *revision;
        let result = match self.state.poisoned() {
            Ok(()) => self.state.store.compact_step(revision),
            Err(e) => Err(e),
        };
        self.refresh_in_use();
        if let Ok(false) = result {
            return;
        }
        let outcome = self.compacted(revision, result.map(|_| ()));
        if let Some((_, reply)) = self.compacting.take() {
            let _ = reply.send(outcome);
        }
    }

    /// Runs the compaction in progress, if any, to its end.
    fn finish_compaction(&mut self) {
        while self.compacting.is_some() {
            self.compact_step();
        }
    }

    /// Records the outcome of a compaction to `revision` that ran on the store.
    fn compacted(
        &mut self,
        revision: Revision,
        result: Result<(), LogError>,
    ) -> Result<(), LogError> {
        match result {
            Ok(()) => {
                // `fetch_max`: a retention compaction may have gone further meanwhile.
                self.state.compacted.fetch_max(revision, Ordering::AcqRel);
                Ok(())
            }
            Err(e) => {
                // Some compaction steps may have committed; report what is on disk.
                if let Ok(c) = self.state.store.compacted_revision() {
                    self.state.compacted.fetch_max(c, Ordering::AcqRel);
                }
                if self.state.poison.get().is_none() {
                    self.poison(&e);
                }
                Err(e)
            }
        }
    }

    /// Compacts by the retention policy when a check is due.
    fn apply_retention(&mut self) {
        let policy = self.state.config.retention;
        if policy.is_unbounded() || self.state.poison.get().is_some() {
            return;
        }
        if self
            .last_retention
            .is_some_and(|t| t.elapsed() < policy.check_interval)
        {
            return;
        }
        if let Err(e) = self.retain() {
            tracing::error!(error = %e, "retention failed");
        }
    }

    /// Compacts to what the retention policy allows; returns the new compaction revision.
    fn retain(&mut self) -> Result<Option<Revision>, LogError> {
        self.state.poisoned()?;
        self.last_retention = Some(Instant::now());
        let policy = self.state.config.retention;
        match self.state.store.retention_target(&policy, now_ms())? {
            Some(target) if target > self.state.compacted.load(Ordering::Acquire) => {
                self.compact(target).map(|()| Some(target))
            }
            _ => Ok(None),
        }
    }
}

//! List and watch in one call: a watcher that first receives the current state of its keys,
//! then a marker, then every change after it, with no gap and no duplicate.
//!
//! [`Store::watch_with_initial_state`] returns a [`ListWatch`], which delivers, in order:
//!
//! 1. [`ListWatchMessage::Initial`]: every key the selector matches, as it stands at one
//!    revision R, as PUT events in key order carrying their real `create_revision`,
//!    `mod_revision`, `version` and lease, a chunk at a time;
//! 2. [`ListWatchMessage::InitialComplete`] `{ revision: R }`, once;
//! 3. [`ListWatchMessage::Watch`]: what the engine delivers from R + 1 on (events, progress,
//!    cancel), as a watcher started at R + 1 gets it.
//!
//! R is the durable revision when the watch starts (`start_revision` 0), or
//! `start_revision - 1` when one is given (the state at S - 1, then the changes from S; S - 1
//! must not be compacted or in the future). Every key of the state at R has
//! `mod_revision <= R`, and every change after R comes from the engine, so nothing is
//! delivered twice or skipped.
//!
//! # Options
//!
//! - `prev_kv`: initial events carry none (they are not changes); live events as usual.
//! - `no_put`: initial events are puts, so it drops them all; the marker still comes.
//! - `no_delete`: no effect on initial events.
//! - `progress_notify`, `buffer`: for the live watcher, registered when the marker is
//!   delivered.
//!
//! # Chunks and memory
//!
//! The state is read in key order, one chunk per [`ListWatch::recv`], never held whole. A
//! chunk holds keys until their memory ([`KeyValue::heap_size`] plus one [`Event`] struct
//! each) reaches [`InitialState::chunk_bytes`] (at least one key). Each chunk is read
//! consistently at R: the current keys of the chunk's key span, with every key of the span
//! changed after R restored to its value at R (the store's historical read, one index seek per
//! such key, see [`event_log::LogStore::first_changes`]). That restore also sees the keys of
//! the span deleted since R: a chunk over a range deleted since R briefly holds those keys'
//! first changes before it is cut back to `chunk_bytes` (the same cost as etcd's range read at
//! a past revision).
//!
//! # Compaction racing the initial read
//!
//! The initial read needs the history after R until it is done (to restore keys changed since).
//! If a compaction removes revision R + 1 before the **first** chunk was delivered and the
//! watch asked for "now" (`start_revision` 0), the read starts again at the new current
//! revision, transparently (at most [`MAX_RESTARTS`] times). Later, or for an explicit start
//! revision, the watch ends with `Watch(Canceled(Compacted { compact_revision }))`, exactly
//! as a watcher that fell behind a compaction does; the recovery is the same in both cases:
//! watch again with initial state (see `examples/list_watch.rs`). The live watcher is
//! registered at R + 1 when the marker is delivered; a compaction past R + 1 by then ends the
//! watch the same way.

use std::collections::BTreeMap;

use bytes::Bytes;
use watch_core::{
    CancelReason, Event, KeySelector, KeyValue, Revision, WatchHandle, WatchMessage, WatchOptions,
};

use crate::{Store, StoreError};

/// Default [`InitialState::chunk_bytes`]: 1 MiB of key-values per chunk.
pub const DEFAULT_INITIAL_CHUNK_BYTES: usize = 1 << 20;

/// Most times a watch asked for "now" restarts its initial read at a newer revision because a
/// compaction removed the history it needed before its first chunk was delivered.
pub const MAX_RESTARTS: u32 = 8;

/// How a [`ListWatch`] reads its initial state. `Default`: chunks of
/// [`DEFAULT_INITIAL_CHUNK_BYTES`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct InitialState {
    /// Memory of one chunk's key-values, in bytes (see the module docs); at least one key is
    /// always read.
    pub chunk_bytes: usize,
}

impl Default for InitialState {
    fn default() -> Self {
        Self {
            chunk_bytes: DEFAULT_INITIAL_CHUNK_BYTES,
        }
    }
}

impl InitialState {
    /// Sets [`InitialState::chunk_bytes`].
    pub fn chunk_bytes(mut self, bytes: usize) -> Self {
        self.chunk_bytes = bytes;
        self
    }
}

/// Memory one initial key-value costs in a chunk: its key and value and the event around it.
fn chunk_cost(kv: &KeyValue) -> usize {
    kv.heap_size() + std::mem::size_of::<Event>()
}

/// Reads the keys a selector matches as they stood at one revision, in key-ordered chunks
/// (see the module docs). What [`ListWatch`] uses; a server that delivers chunks into its own
/// stream uses it directly.
#[derive(Debug)]
pub struct InitialStateReader {
    store: Store,
    revision: Revision,
    /// First key of the selector (where a restart begins).
    start: Bytes,
    /// Next key to read (inclusive); `None` once every chunk was read.
    cursor: Option<Bytes>,
    /// End of the selector (exclusive; `None`: unbounded).
    end: Option<Bytes>,
    chunk_bytes: usize,
    /// The watch asked for "now": a read compacted away before its first chunk may restart.
    restartable: bool,
    /// A chunk was returned: from then on R is fixed.
    delivered: bool,
    restarts: u32,
}

impl InitialStateReader {
    /// The revision R the state is read at (it moves only when the read restarts before its
    /// first chunk, see the module docs).
    pub fn revision(&self) -> Revision {
        self.revision
    }

    /// The next chunk of key-values at R, in key order, or `None` when all were read. Fails with
    /// [`StoreError::Compacted`] when a compaction removed the history after R that the read
    /// needs (after restarting at a newer R where the module docs allow), and with the store's
    /// errors when it is closed or failed.
    pub async fn next_chunk(&mut self) -> Result<Option<Vec<KeyValue>>, StoreError> {
        while let Some(start) = self.cursor.clone() {
            let read = self
                .store
                .chunk_at(&start, self.end.as_ref(), self.revision, self.chunk_bytes)
                .await;
            let (kvs, next) = match read {
                Err(StoreError::Compacted { .. })
                    if self.restartable && !self.delivered && self.restarts < MAX_RESTARTS =>
                {
                    // Nothing was delivered: start over at the durable revision (at or above
                    // the compaction, which never passes it).
                    self.restarts += 1;
                    self.revision = self.store.durable_revision();
                    self.cursor = Some(self.start.clone());
                    continue;
                }
                other => other?,
            };
            self.cursor = next;
            if !kvs.is_empty() {
                self.delivered = true;
                return Ok(Some(kvs));
            }
        }
        Ok(None)
    }
}

/// One message of a [`ListWatch`], in the order the module docs give.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum ListWatchMessage {
    /// A chunk of the initial state: PUT events in key order, without `prev_kv`.
    Initial(Vec<Event>),
    /// Every key of the state at `revision` was delivered; what follows are the changes after
    /// it.
    InitialComplete {
        /// R: the revision the initial state was read at.
        revision: Revision,
    },
    /// What the engine delivers from R + 1 on (or the compaction cancel of the module docs).
    Watch(WatchMessage),
}

/// A watch that starts with the state of its keys (see the module docs). Dropping it ends the
/// watch.
#[derive(Debug)]
pub struct ListWatch {
    store: Store,
    selector: KeySelector,
    options: WatchOptions,
    phase: Phase,
}

#[derive(Debug)]
enum Phase {
    /// Reading the initial state.
    Initial(InitialStateReader),
    Live(WatchHandle),
    Ended,
}

impl ListWatch {
    /// The revision R the initial state is (being) read at; `None` once live.
    pub fn initial_revision(&self) -> Option<Revision> {
        match &self.phase {
            Phase::Initial(reader) => Some(reader.revision()),
            _ => None,
        }
    }

    /// The next message, `Ok(None)` once the watch ended (after a cancel, or when the engine
    /// shut down). Fails when the store is closed or failed during the initial read.
    pub async fn recv(&mut self) -> Result<Option<ListWatchMessage>, StoreError> {
        loop {
            match &mut self.phase {
                Phase::Ended => return Ok(None),
                Phase::Live(handle) => {
                    let msg = handle.recv().await;
                    if msg.is_none() {
                        self.phase = Phase::Ended;
                    }
                    return Ok(msg.map(ListWatchMessage::Watch));
                }
                Phase::Initial(reader) => match reader.next_chunk().await {
                    Ok(Some(kvs)) => {
                        if self.options.no_put {
                            continue;
                        }
                        let events = kvs.into_iter().map(|kv| Event::put(kv, None)).collect();
                        return Ok(Some(ListWatchMessage::Initial(events)));
                    }
                    Ok(None) => {
                        let revision = reader.revision();
                        let live = self.options.start_revision(revision + 1);
                        return Ok(Some(match self.store.watch(self.selector.clone(), live) {
                            Ok(handle) => {
                                self.phase = Phase::Live(handle);
                                ListWatchMessage::InitialComplete { revision }
                            }
                            Err(StoreError::Compacted { compacted, .. }) => {
                                self.compacted(compacted)
                            }
                            Err(e) => {
                                self.phase = Phase::Ended;
                                return Err(e);
                            }
                        }));
                    }
                    Err(StoreError::Compacted { compacted, .. }) => {
                        return Ok(Some(self.compacted(compacted)));
                    }
                    Err(e) => {
                        self.phase = Phase::Ended;
                        return Err(e);
                    }
                },
            }
        }
    }

    /// Ends the watch with the compaction cancel a lagging watcher gets.
    fn compacted(&mut self, compacted: Revision) -> ListWatchMessage {
        self.phase = Phase::Ended;
        ListWatchMessage::Watch(WatchMessage::Canceled(CancelReason::Compacted {
            compact_revision: compacted,
        }))
    }
}

impl Store {
    /// Lists and watches in one call: the state of the keys `selector` matches at one revision
    /// R, then a marker, then every change after R (see [`ListWatch`] and the `list_watch`
    /// module docs for R, filters, chunks and compaction). Fails as [`Store::watch`], and with
    /// [`StoreError::FutureRevision`] when `options.start_revision - 1` is above the current
    /// revision.
    pub fn watch_with_initial_state(
        &self,
        selector: KeySelector,
        options: WatchOptions,
        initial: InitialState,
    ) -> Result<ListWatch, StoreError> {
        let reader = self.initial_reader(&selector, options.start_revision, initial)?;
        Ok(ListWatch {
            store: self.clone(),
            selector,
            options,
            phase: Phase::Initial(reader),
        })
    }

    /// A reader of the state of `selector`'s keys at `start_revision - 1` (`start_revision`
    /// 0: at the durable revision), in chunks of `initial.chunk_bytes`. Checks the selector,
    /// the mirror scope and the revision as [`Store::watch`] does (the live watcher a caller
    /// registers at R + 1 afterwards is checked again then).
    pub fn initial_reader(
        &self,
        selector: &KeySelector,
        start_revision: Revision,
        initial: InitialState,
    ) -> Result<InitialStateReader, StoreError> {
        self.check_closed()?;
        selector.validate()?;
        self.check_mirror_watch(selector)?;
        let revision = match start_revision {
            // Durable: every key at it is readable, and R + 1 is the next publish.
            0 => self.durable_revision(),
            s => s - 1,
        };
        let current = self.current_revision();
        if revision > current {
            return Err(StoreError::FutureRevision {
                requested: revision,
                current,
            });
        }
        let compacted = self.compacted_revision();
        if revision < compacted {
            return Err(StoreError::Compacted {
                requested: revision,
                compacted,
            });
        }
        let (start, end) = selector.bounds();
        Ok(InitialStateReader {
            store: self.clone(),
            revision,
            start: start.clone(),
            cursor: Some(start),
            end,
            chunk_bytes: initial.chunk_bytes,
            restartable: start_revision == 0,
            delivered: false,
            restarts: 0,
        })
    }

    /// One chunk of the state at `at` from `start` (inclusive) to `end` (exclusive, `None`:
    /// unbounded): its key-values in key order, at most `chunk_bytes` of them (at least one),
    /// and where the next chunk starts (`None`: the range is done).
    ///
    /// The chunk's key span runs from `start` to just after the last current key taken (or to
    /// `end`); every key of the span that changed after `at` is restored to its value at `at`
    /// from the event log, then the result is cut back to `chunk_bytes`.
    async fn chunk_at(
        &self,
        start: &Bytes,
        end: Option<&Bytes>,
        at: Revision,
        chunk_bytes: usize,
    ) -> Result<(Vec<KeyValue>, Option<Bytes>), StoreError> {
        use std::ops::Bound;
        let upper = end.map_or(Bound::Unbounded, |e| Bound::Excluded(e.clone()));
        let (current, mut next, kvs) = {
            let st = self.inner.state.read();
            // Checked here so a compaction already past `at` fails fast; one that runs after
            // this check fails the history read below instead (the log refuses `at + 1` below
            // its compaction revision), and with `at == current` no later revision is needed.
            let compacted = self.compacted_revision();
            if at < compacted {
                return Err(StoreError::Compacted {
                    requested: at,
                    compacted,
                });
            }
            let mut kvs = Vec::new();
            let mut bytes = 0;
            let mut next = None;
            for (key, kv) in st.map.range((Bound::Included(start.clone()), upper)) {
                if bytes >= chunk_bytes.max(1) {
                    // Stop before `key`: the span is `[start, key)`.
                    next = Some(key.clone());
                    break;
                }
                bytes += chunk_cost(kv);
                kvs.push(kv.clone());
            }
            (st.revision, next, kvs)
        };
        // No read returns state a crash could still lose, and the log must hold every change
        // up to `current` for the index read below.
        self.wait_durable(current).await?;
        let mut map: BTreeMap<Bytes, KeyValue> =
            kvs.into_iter().map(|kv| (kv.key.clone(), kv)).collect();
        if at < current {
            // The span: `[start, next)`, or `[start, end)` when the current keys ran out.
            let selector = match (&next, end) {
                (Some(e), _) | (None, Some(e)) => KeySelector::range(start.clone(), e.clone()),
                (None, None) => KeySelector::from_key(start.clone()),
            }
            .normalize()?;
            let firsts = self.first_changes(selector, at, current).await?;
            for e in firsts {
                match e.prev_kv {
                    Some(kv) => map.insert(e.kv.key, kv),
                    None => map.remove(&e.kv.key),
                };
            }
        }
        // Cut back to `chunk_bytes` (restored keys may have added some); the next chunk starts
        // at the first key left out.
        let mut out = Vec::with_capacity(map.len());
        let mut bytes = 0;
        for (key, kv) in map {
            if bytes >= chunk_bytes.max(1) {
                next = Some(key);
                break;
            }
            bytes += chunk_cost(&kv);
            out.push(kv);
        }
        Ok((out, next))
    }
}

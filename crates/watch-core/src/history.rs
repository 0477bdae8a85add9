//! History sources: where the engine reads change sets it could not (or did not yet) deliver live.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use parking_lot::Mutex;

use crate::error::{HistoryError, PublishError};
use crate::selector::KeySelector;
use crate::types::{ChangeSet, Revision};

/// The future a [`History::read`] returns.
pub type HistoryFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Vec<Arc<ChangeSet>>, HistoryError>> + Send + 'a>>;

/// A readable record of past change sets, in revision order.
///
/// The engine uses it to start watchers at a past revision and to catch up watchers that fell
/// behind. [`MemoryHistory`] keeps a bounded recent window in memory; the `event-log` crate
/// implements it over durable storage.
pub trait History: Send + Sync + 'static {
    /// Change sets with `after < revision <= until`, in increasing revision order, at most
    /// `limit` of them.
    ///
    /// Each returned change set holds at least every event `selector` selects; it may hold
    /// others (the engine filters again), and change sets with no selected event may be left
    /// out. Fewer than `limit` change sets means the whole range `(after, until]` was covered.
    /// When revision `after + 1` is no longer retained the read fails with
    /// [`HistoryError::Compacted`].
    fn read(
        &self,
        selector: &KeySelector,
        after: Revision,
        until: Revision,
        limit: usize,
    ) -> HistoryFuture<'_>;

    /// The oldest revision a read can still start at: a read with `after + 1 >= first_available()`
    /// does not fail with `Compacted`.
    fn first_available(&self) -> Revision;
}

/// Bounds of a [`MemoryHistory`]. The newest change set is always kept, whatever its size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryHistoryLimits {
    /// Most change sets kept.
    pub max_changes: usize,
    /// Most payload bytes (keys and values, see [`ChangeSet::payload_len`]) kept.
    pub max_bytes: usize,
}

impl Default for MemoryHistoryLimits {
    fn default() -> Self {
        Self {
            max_changes: 65_536,
            max_bytes: 64 << 20,
        }
    }
}

/// Most evicted change sets left for a reader to free (see `Ring::dead`).
const DEAD_MAX: usize = 4096;
/// Most payload bytes of evicted change sets left for a reader to free.
const DEAD_BYTES: usize = 1 << 20;

/// A bounded in-memory window of the most recent change sets.
///
/// The engine keeps one as its publish queue: [`crate::WatchEngine::publish`] appends here and
/// the dispatcher reads from here, so a lagging dispatcher never makes the publisher block or
/// drop. It also serves embedders and tests as a [`History`].
#[derive(Debug)]
pub struct MemoryHistory {
    limits: MemoryHistoryLimits,
    // Held by publishers for one push (and rare evictions) and by readers while they clone a
    // chunk of `Arc`s; never across an await or a call into user code.
    ring: Mutex<Ring>,
}

#[derive(Debug)]
struct Ring {
    /// Change sets with the bytes each was counted as (so eviction need not recount).
    changes: VecDeque<(Arc<ChangeSet>, usize)>,
    /// Evicted change sets not freed yet: the publisher only moves them here and the next
    /// reader (the dispatcher, walking) frees them outside the lock, so freeing a change set's
    /// events is not on the writer's path. At most [`DEAD_MAX`] of them and [`DEAD_BYTES`];
    /// beyond that the publisher frees.
    dead: Vec<Arc<ChangeSet>>,
    dead_bytes: usize,
    bytes: usize,
    /// Every revision `<= evicted_through` is gone (or predates this history).
    evicted_through: Revision,
    /// Last revision appended (or the starting revision).
    last: Revision,
}

impl MemoryHistory {
    /// An empty history of a store currently at `revision`: revisions `<= revision` are not
    /// readable from it.
    pub fn new(revision: Revision, limits: MemoryHistoryLimits) -> Self {
        Self {
            limits,
            ring: Mutex::new(Ring {
                changes: VecDeque::new(),
                dead: Vec::new(),
                dead_bytes: 0,
                bytes: 0,
                evicted_through: revision,
                last: revision,
            }),
        }
    }

    /// Appends the next change set, evicting the oldest beyond the limits.
    pub fn append(&self, changes: Arc<ChangeSet>) -> Result<(), PublishError> {
        let bytes = changes.payload_len();
        let mut ring = self.ring.lock();
        if changes.revision <= ring.last {
            return Err(PublishError::NotIncreasing {
                revision: changes.revision,
                last: ring.last,
            });
        }
        ring.last = changes.revision;
        ring.bytes += bytes;
        ring.changes.push_back((changes, bytes));
        let mut free = Vec::new();
        while ring.changes.len() > 1
            && (ring.changes.len() > self.limits.max_changes || ring.bytes > self.limits.max_bytes)
        {
            if let Some((old, old_bytes)) = ring.changes.pop_front() {
                ring.bytes -= old_bytes;
                ring.evicted_through = old.revision;
                if ring.dead.len() < DEAD_MAX && ring.dead_bytes + old_bytes <= DEAD_BYTES {
                    ring.dead_bytes += old_bytes;
                    ring.dead.push(old);
                } else {
                    free.push(old);
                }
            }
        }
        drop(ring);
        // Nobody read the window for a while (no dispatcher): free here, outside the lock.
        drop(free);
        Ok(())
    }

    /// Last revision appended (or the starting revision when none was).
    pub fn last_revision(&self) -> Revision {
        self.ring.lock().last
    }

    /// Up to `limit` change sets with `after < revision <= until`, unfiltered.
    pub fn chunk(
        &self,
        after: Revision,
        until: Revision,
        limit: usize,
    ) -> Result<Vec<Arc<ChangeSet>>, HistoryError> {
        let mut ring = self.ring.lock();
        let dead = std::mem::take(&mut ring.dead);
        ring.dead_bytes = 0;
        let out = Self::chunk_locked(&ring, after, until, limit);
        drop(ring);
        drop(dead);
        out
    }

    fn chunk_locked(
        ring: &Ring,
        after: Revision,
        until: Revision,
        limit: usize,
    ) -> Result<Vec<Arc<ChangeSet>>, HistoryError> {
        if after < ring.evicted_through {
            return Err(HistoryError::Compacted {
                compact_revision: ring.evicted_through + 1,
            });
        }
        let start = ring.changes.partition_point(|(c, _)| c.revision <= after);
        Ok(ring
            .changes
            .range(start..)
            .take_while(|(c, _)| c.revision <= until)
            .take(limit)
            .map(|(c, _)| c.clone())
            .collect())
    }

    /// Number of change sets held.
    pub fn len(&self) -> usize {
        self.ring.lock().changes.len()
    }

    /// True when no change set is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl History for MemoryHistory {
    fn read(
        &self,
        selector: &KeySelector,
        after: Revision,
        until: Revision,
        limit: usize,
    ) -> HistoryFuture<'_> {
        let result = (|| {
            let mut out = Vec::new();
            let mut from = after;
            // Scan in chunks so the ring lock is never held across a long filter pass.
            const CHUNK: usize = 1024;
            loop {
                let chunk = self.chunk(from, until, CHUNK)?;
                let done = chunk.len() < CHUNK;
                for c in chunk {
                    from = c.revision;
                    if c.events.iter().any(|e| selector.matches(e.key())) {
                        out.push(c);
                        if out.len() == limit {
                            return Ok(out);
                        }
                    }
                }
                if done {
                    return Ok(out);
                }
            }
        })();
        Box::pin(std::future::ready(result))
    }

    fn first_available(&self) -> Revision {
        self.ring.lock().evicted_through + 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{Event, KeyValue};

    fn cs(rev: Revision, key: &'static str) -> Arc<ChangeSet> {
        let kv = KeyValue {
            key: key.into(),
            value: "v".into(),
            create_revision: rev,
            mod_revision: rev,
            version: 1,
            lease: 0,
        };
        Arc::new(ChangeSet::new(rev, vec![Event::put(kv, None)]))
    }

    #[tokio::test]
    async fn bounded_and_compacted() {
        let h = MemoryHistory::new(
            0,
            MemoryHistoryLimits {
                max_changes: 3,
                max_bytes: 1 << 20,
            },
        );
        for r in 1..=5 {
            h.append(cs(r, if r % 2 == 0 { "a" } else { "b" })).unwrap();
        }
        assert_eq!(h.len(), 3);
        assert_eq!(h.first_available(), 3);
        let all = h.read(&KeySelector::All, 2, 5, 10).await.unwrap();
        assert_eq!(
            all.iter().map(|c| c.revision).collect::<Vec<_>>(),
            vec![3, 4, 5]
        );
        let a = h.read(&KeySelector::key("a"), 2, 5, 10).await.unwrap();
        assert_eq!(a.iter().map(|c| c.revision).collect::<Vec<_>>(), vec![4]);
        assert_eq!(
            h.read(&KeySelector::All, 1, 5, 10).await.unwrap_err(),
            HistoryError::Compacted {
                compact_revision: 3
            }
        );
        assert!(matches!(
            h.append(cs(5, "a")),
            Err(PublishError::NotIncreasing { .. })
        ));
    }
}

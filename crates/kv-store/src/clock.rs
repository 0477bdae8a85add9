//! When each recent revision was published to the watch engine, for the publish→deliver
//! latency metric.
//!
//! A fixed ring of [`SLOTS`] (revision, time) pairs written by the publisher task only and read
//! by watch streams. Each slot is a tiny seqlock: the writer clears the revision, writes the
//! time, then writes the revision; a reader accepts the time only when it read the revision it
//! wanted both before and after the time. A torn or overwritten slot reads as "unknown".

use std::sync::atomic::{AtomicU64, Ordering, fence};
use std::time::{Duration, Instant};

use watch_core::Revision;

/// Revisions remembered; older ones report no latency.
const SLOTS: usize = 4096;

struct Slot {
    revision: AtomicU64,
    /// Nanoseconds since [`PublishClock::epoch`].
    nanos: AtomicU64,
}

pub(crate) struct PublishClock {
    epoch: Instant,
    slots: Box<[Slot]>,
}

impl PublishClock {
    pub(crate) fn new() -> Self {
        Self {
            epoch: Instant::now(),
            slots: (0..SLOTS)
                .map(|_| Slot {
                    revision: AtomicU64::new(0),
                    nanos: AtomicU64::new(0),
                })
                .collect(),
        }
    }

    fn slot(&self, revision: Revision) -> &Slot {
        &self.slots[(revision % SLOTS as u64) as usize]
    }

    /// Records that `revision` is being published now. Single writer (the publisher task).
    pub(crate) fn record(&self, revision: Revision) {
        let nanos = u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
        let slot = self.slot(revision);
        slot.revision.store(0, Ordering::Relaxed);
        fence(Ordering::Release);
        slot.nanos.store(nanos, Ordering::Relaxed);
        slot.revision.store(revision, Ordering::Release);
    }

    /// Time since `revision` was published, if it is still in the ring.
    pub(crate) fn elapsed(&self, revision: Revision) -> Option<Duration> {
        let slot = self.slot(revision);
        if slot.revision.load(Ordering::Acquire) != revision {
            return None;
        }
        let nanos = slot.nanos.load(Ordering::Relaxed);
        fence(Ordering::Acquire);
        if slot.revision.load(Ordering::Relaxed) != revision {
            return None;
        }
        let published = self.epoch + Duration::from_nanos(nanos);
        Some(Instant::now().saturating_duration_since(published))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_recent_revisions_only() {
        let c = PublishClock::new();
        c.record(5);
        assert!(c.elapsed(5).is_some());
        assert!(c.elapsed(6).is_none());
        c.record(5 + SLOTS as u64);
        assert!(c.elapsed(5).is_none(), "overwritten by a newer revision");
        assert!(c.elapsed(5 + SLOTS as u64).is_some());
    }
}

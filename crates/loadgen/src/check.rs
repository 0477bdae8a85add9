//! Correctness of delivered events: every watcher must see exactly the revisions written to its
//! keys, each once, in increasing order.
//!
//! Per watcher only O(1) state is kept: the last revision, the count, and a sum and a sum of
//! squares of the revisions, compared with the same figures of what the writers were told was
//! committed. Strictly increasing revisions rule out duplicates and reordering; equal count, sum
//! and sum of squares then rule out a missing event replaced by a foreign one.

use serde::Serialize;

/// What a set of revisions adds up to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Digest {
    /// How many.
    pub count: u64,
    /// Sum of the revisions (wrapping).
    pub sum: u64,
    /// Sum of the squared revisions (wrapping).
    pub sum_sq: u64,
}

impl Digest {
    /// Adds one revision.
    pub fn add(&mut self, rev: i64) {
        let r = rev as u64;
        self.count += 1;
        self.sum = self.sum.wrapping_add(r);
        self.sum_sq = self.sum_sq.wrapping_add(r.wrapping_mul(r));
    }

    /// Adds another digest.
    pub fn merge(&mut self, other: &Digest) {
        self.count += other.count;
        self.sum = self.sum.wrapping_add(other.sum);
        self.sum_sq = self.sum_sq.wrapping_add(other.sum_sq);
    }
}

/// One watcher's view of what it received.
#[derive(Clone, Debug, Default)]
pub struct Seen {
    last: i64,
    digest: Digest,
    duplicates: u64,
    out_of_order: u64,
    foreign: u64,
    /// Revisions whose events came in two responses without `fragment`.
    splits: u64,
    /// The next event is the first of a response.
    first_of_response: bool,
    /// The previous response had `fragment = true` (the revision may continue).
    continued: bool,
    /// The current response has `fragment = true`.
    fragment: bool,
}

impl Seen {
    /// Starts a response (call before its events); `fragment`: more of its last revision
    /// follows in the next response, as etcd's fragmentation allows.
    pub fn begin_response(&mut self, fragment: bool) {
        self.first_of_response = true;
        self.continued = std::mem::replace(&mut self.fragment, fragment);
    }

    /// Records one received event of revision `rev`; `ours` is false for an event on a key the
    /// watcher did not ask for.
    pub fn event(&mut self, rev: i64, ours: bool) {
        // The previous response ended with this revision and did not say it continues: one
        // revision was split over two responses.
        if std::mem::take(&mut self.first_of_response)
            && rev == self.last
            && rev != 0
            && !self.continued
        {
            self.splits += 1;
        }
        if !ours {
            self.foreign += 1;
        } else if rev == self.last {
            self.duplicates += 1;
        } else if rev < self.last {
            self.out_of_order += 1;
        } else {
            self.last = rev;
            self.digest.add(rev);
        }
    }

    /// Events accepted so far.
    pub fn count(&self) -> u64 {
        self.digest.count
    }
}

/// Correctness of one run, summed over its watchers.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Verdict {
    /// Events expected in total.
    pub expected: u64,
    /// Events received in order, once.
    pub received: u64,
    /// Expected events never received.
    pub missing: u64,
    /// Events received more than once.
    pub duplicates: u64,
    /// Events received after a later revision.
    pub out_of_order: u64,
    /// Revisions split over two responses without `fragment`.
    pub split_revisions: u64,
    /// Events on keys the watcher did not ask for, or more events than were written.
    pub unexpected: u64,
    /// Watchers whose set of revisions differs from what was written.
    pub wrong_watchers: u64,
    /// Anything else that went wrong (a refused create, a canceled watch, an error).
    pub errors: Vec<String>,
}

impl Verdict {
    /// True when nothing went wrong.
    pub fn ok(&self) -> bool {
        self.missing == 0
            && self.duplicates == 0
            && self.out_of_order == 0
            && self.split_revisions == 0
            && self.unexpected == 0
            && self.wrong_watchers == 0
            && self.errors.is_empty()
    }

    /// Compares what one watcher saw with what it should have.
    pub fn watcher(&mut self, seen: &Seen, expected: &Digest) {
        self.expected += expected.count;
        self.received += seen.digest.count;
        self.missing += expected.count.saturating_sub(seen.digest.count);
        self.unexpected += seen.digest.count.saturating_sub(expected.count) + seen.foreign;
        self.duplicates += seen.duplicates;
        self.out_of_order += seen.out_of_order;
        self.split_revisions += seen.splits;
        if seen.digest != *expected {
            self.wrong_watchers += 1;
        }
    }

    /// Adds an error.
    pub fn error(&mut self, e: impl Into<String>) {
        if self.errors.len() < 20 {
            self.errors.push(e.into());
        }
    }

    /// Adds another verdict.
    pub fn merge(&mut self, o: Verdict) {
        self.expected += o.expected;
        self.received += o.received;
        self.missing += o.missing;
        self.duplicates += o.duplicates;
        self.out_of_order += o.out_of_order;
        self.split_revisions += o.split_revisions;
        self.unexpected += o.unexpected;
        self.wrong_watchers += o.wrong_watchers;
        for e in o.errors {
            self.error(e);
        }
    }

    /// One line for the report.
    pub fn summary(&self) -> String {
        if self.ok() {
            return format!("ok ({} events checked)", self.received);
        }
        let mut s = format!(
            "WRONG: {} missing, {} duplicate, {} out of order, {} split revisions, {} unexpected, {} wrong watchers",
            self.missing,
            self.duplicates,
            self.out_of_order,
            self.split_revisions,
            self.unexpected,
            self.wrong_watchers
        );
        if let Some(e) = self.errors.first() {
            s.push_str(&format!("; {e}"));
            if self.errors.len() > 1 {
                s.push_str(&format!(" (+{} more)", self.errors.len() - 1));
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(revs: &[i64]) -> Digest {
        let mut d = Digest::default();
        revs.iter().for_each(|&r| d.add(r));
        d
    }

    fn verdict(got: &[i64], want: &[i64]) -> Verdict {
        let mut seen = Seen::default();
        got.iter().for_each(|&r| seen.event(r, true));
        let mut v = Verdict::default();
        v.watcher(&seen, &digest(want));
        v
    }

    #[test]
    fn exact_delivery_is_ok() {
        assert!(verdict(&[2, 3, 5], &[2, 3, 5]).ok());
    }

    #[test]
    fn each_fault_is_named() {
        assert_eq!(verdict(&[2, 5], &[2, 3, 5]).missing, 1);
        assert_eq!(verdict(&[2, 3, 3, 5], &[2, 3, 5]).duplicates, 1);
        assert_eq!(verdict(&[2, 5, 3], &[2, 3, 5]).out_of_order, 1);
        // Same count, a foreign revision in place of a missing one.
        let v = verdict(&[2, 4, 5], &[2, 3, 5]);
        assert_eq!((v.wrong_watchers, v.ok()), (1, false));
    }

    #[test]
    fn a_revision_split_over_responses_is_named_unless_fragmented() {
        // Revision 3 has two events; they arrive in two responses.
        let run = |fragment: bool| {
            let mut seen = Seen::default();
            seen.begin_response(fragment);
            seen.event(2, true);
            seen.event(3, true);
            seen.begin_response(false);
            seen.event(3, true);
            seen.splits
        };
        assert_eq!(run(false), 1);
        assert_eq!(run(true), 0);
    }
}

//! Key intervals and the union of a user's granted intervals, for permission checks.
//!
//! Every etcd `(key, range_end)` pair becomes a half-open interval `[start, end)`: a single
//! key `k` is `[k, k\0)` (the next key after `k`), `range_end = "\0"` is unbounded, a prefix
//! `p` ends at `p` with its last byte below 0xff incremented. A request is allowed when its
//! whole interval lies inside the union of the intervals granted for its kind of access, as
//! etcd's `checkKeyInterval` decides (including a from-key request, which etcd 3.4's watch
//! checked as a single key: that bypass was fixed later, and keywatch checks the full range).

/// Where an interval ends: before a key (exclusive), or past every key. `Key < Unbounded`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum End {
    /// Every key below this one.
    Key(Vec<u8>),
    /// Every key.
    Unbounded,
}

/// `[start, end)` over byte-string keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Interval {
    pub(crate) start: Vec<u8>,
    pub(crate) end: End,
}

impl Interval {
    /// etcd's `(key, range_end)`: empty `range_end` is the key alone, `"\0"` is every key from
    /// `key` on, anything else is `[key, range_end)`.
    pub(crate) fn from_etcd(key: &[u8], range_end: &[u8]) -> Interval {
        let end = match range_end {
            [] => End::Key(successor(key)),
            [0] => End::Unbounded,
            end => End::Key(end.to_vec()),
        };
        Interval {
            start: key.to_vec(),
            end,
        }
    }

    /// Every key starting with `prefix` (every key at all for the empty prefix).
    #[cfg(test)]
    pub(crate) fn prefix(prefix: &[u8]) -> Interval {
        let mut end = prefix.to_vec();
        while end.last() == Some(&0xff) {
            end.pop();
        }
        let end = match end.last_mut() {
            Some(last) => {
                *last += 1;
                End::Key(end)
            }
            None => End::Unbounded,
        };
        Interval {
            start: prefix.to_vec(),
            end,
        }
    }

    /// No key lies in it.
    fn is_empty(&self) -> bool {
        matches!(&self.end, End::Key(e) if e.as_slice() <= self.start.as_slice())
    }
}

/// The smallest key after `key`.
fn successor(key: &[u8]) -> Vec<u8> {
    let mut next = Vec::with_capacity(key.len() + 1);
    next.extend_from_slice(key);
    next.push(0);
    next
}

/// A union of intervals, kept sorted, disjoint and with touching intervals joined, so a
/// covering test is one binary search.
#[derive(Debug, Clone, Default)]
pub(crate) struct RangeSet {
    intervals: Vec<Interval>,
}

impl RangeSet {
    /// The union of `intervals`.
    pub(crate) fn new(mut intervals: Vec<Interval>) -> RangeSet {
        intervals.retain(|i| !i.is_empty());
        intervals.sort_by(|a, b| a.start.cmp(&b.start));
        let mut merged: Vec<Interval> = Vec::with_capacity(intervals.len());
        for next in intervals {
            if let Some(last) = merged.last_mut() {
                // `next` starts at or before the end of `last`: they overlap or touch.
                if End::Key(next.start.clone()) <= last.end {
                    if next.end > last.end {
                        last.end = next.end;
                    }
                    continue;
                }
            }
            merged.push(next);
        }
        RangeSet { intervals: merged }
    }

    /// True when every key of `want` is in the set. An empty request interval (`range_end`
    /// at or below `key`, which reads nothing) is checked as its first key, so a request can
    /// never pass on a technicality.
    pub(crate) fn covers(&self, want: &Interval) -> bool {
        let end = if want.is_empty() {
            End::Key(successor(&want.start))
        } else {
            want.end.clone()
        };
        let after = self
            .intervals
            .partition_point(|i| i.start.as_slice() <= want.start.as_slice());
        let Some(candidate) = after.checked_sub(1).map(|i| &self.intervals[i]) else {
            return false;
        };
        candidate.end >= end
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(items: &[Interval]) -> RangeSet {
        RangeSet::new(items.to_vec())
    }

    #[test]
    fn single_key_prefix_and_range() {
        let s = set(&[
            Interval::from_etcd(b"k", b""),
            Interval::prefix(b"/app/"),
            Interval::from_etcd(b"a", b"c"),
        ]);
        assert!(s.covers(&Interval::from_etcd(b"k", b"")));
        assert!(!s.covers(&Interval::from_etcd(b"k1", b"")));
        assert!(!s.covers(&Interval::from_etcd(b"k", b"l")));
        assert!(s.covers(&Interval::from_etcd(b"/app/x", b"")));
        assert!(s.covers(&Interval::prefix(b"/app/")));
        assert!(s.covers(&Interval::prefix(b"/app/sub/")));
        assert!(!s.covers(&Interval::prefix(b"/ap")));
        assert!(!s.covers(&Interval::from_etcd(b"/app/", b"\0")));
        assert!(s.covers(&Interval::from_etcd(b"a", b"c")));
        assert!(s.covers(&Interval::from_etcd(b"b", b"bz")));
        assert!(!s.covers(&Interval::from_etcd(b"b", b"d")));
        assert!(!s.covers(&Interval::from_etcd(b"0", b"b")));
    }

    #[test]
    fn touching_grants_join() {
        let s = set(&[
            Interval::from_etcd(b"b", b"c"),
            Interval::from_etcd(b"a", b"b"),
            Interval::from_etcd(b"c", b"\0"),
        ]);
        assert!(s.covers(&Interval::from_etcd(b"a", b"\0")));
        assert!(!s.covers(&Interval::from_etcd(b"\0", b"\0")));
    }

    #[test]
    fn prefix_ends() {
        assert_eq!(Interval::prefix(b"a\xff").end, End::Key(b"b".to_vec()));
        assert_eq!(Interval::prefix(b"\xff\xff").end, End::Unbounded);
        assert_eq!(Interval::prefix(b"").end, End::Unbounded);
        // The empty prefix grants every key, from-key requests included.
        assert!(set(&[Interval::prefix(b"")]).covers(&Interval::from_etcd(b"\0", b"\0")));
    }

    #[test]
    fn empty_requests_are_checked_as_their_key() {
        let s = set(&[Interval::from_etcd(b"b", b"")]);
        assert!(s.covers(&Interval::from_etcd(b"b", b"a")));
        assert!(!s.covers(&Interval::from_etcd(b"c", b"a")));
        assert!(!set(&[]).covers(&Interval::from_etcd(b"b", b"")));
    }
}

//! An interval treap: the set of range and from-key watchers, answering "which intervals
//! contain this key" in O(log n + matches) expected time.
//!
//! Nodes are ordered by `(start, id)`; each node also stores the largest end in its subtree, so
//! a stabbing query skips every subtree whose intervals all end at or before the key.

use std::cmp::Ordering;
use std::sync::Arc;

use bytes::Bytes;

use crate::engine::watcher::Watcher;

type Link = Option<Box<Node>>;

struct Node {
    start: Bytes,
    /// Exclusive end; `None` is unbounded.
    end: Option<Bytes>,
    id: u64,
    watcher: Arc<Watcher>,
    priority: u32,
    /// Largest `end` in this subtree (`None` = unbounded, the largest possible).
    max_end: Option<Bytes>,
    left: Link,
    right: Link,
}

/// `a > key` where `None` is +infinity.
fn end_above(end: &Option<Bytes>, key: &[u8]) -> bool {
    end.as_ref().is_none_or(|e| e.as_ref() > key)
}

fn max_end(a: &Option<Bytes>, b: &Option<Bytes>) -> Option<Bytes> {
    match (a, b) {
        (None, _) | (_, None) => None,
        (Some(x), Some(y)) => Some(if x >= y { x.clone() } else { y.clone() }),
    }
}

impl Node {
    fn update(&mut self) {
        let mut m = self.end.clone();
        if let Some(l) = &self.left {
            m = max_end(&m, &l.max_end);
        }
        if let Some(r) = &self.right {
            m = max_end(&m, &r.max_end);
        }
        self.max_end = m;
    }

    fn cmp_key(&self, start: &[u8], id: u64) -> Ordering {
        self.start.as_ref().cmp(start).then(self.id.cmp(&id))
    }
}

/// The set of interval watchers.
#[derive(Default)]
pub(crate) struct IntervalSet {
    root: Link,
    len: usize,
}

impl IntervalSet {
    pub(crate) fn insert(&mut self, start: Bytes, end: Option<Bytes>, watcher: Arc<Watcher>) {
        let id = watcher.id;
        let node = Box::new(Node {
            max_end: end.clone(),
            start,
            end,
            id,
            watcher,
            priority: fastrand::u32(..),
            left: None,
            right: None,
        });
        let (l, r) = split(self.root.take(), &node.start, id);
        self.root = merge(merge(l, Some(node)), r);
        self.len += 1;
    }

    /// Removes the interval of watcher `id` that starts at `start`; false if absent.
    pub(crate) fn remove(&mut self, start: &[u8], id: u64) -> bool {
        let removed = remove(&mut self.root, start, id);
        if removed {
            self.len -= 1;
        }
        removed
    }

    /// Calls `f` for every watcher whose interval contains `key`.
    pub(crate) fn stab(&self, key: &[u8], f: &mut impl FnMut(&Arc<Watcher>)) {
        stab(&self.root, key, f);
    }

    pub(crate) fn for_each(&self, f: &mut impl FnMut(&Arc<Watcher>)) {
        fn walk(link: &Link, f: &mut impl FnMut(&Arc<Watcher>)) {
            if let Some(n) = link {
                walk(&n.left, f);
                f(&n.watcher);
                walk(&n.right, f);
            }
        }
        walk(&self.root, f);
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }
}

/// Splits into (nodes ordered before `(start, id)`, the rest).
fn split(link: Link, start: &[u8], id: u64) -> (Link, Link) {
    match link {
        None => (None, None),
        Some(mut n) => {
            if n.cmp_key(start, id) == Ordering::Less {
                let (l, r) = split(n.right.take(), start, id);
                n.right = l;
                n.update();
                (Some(n), r)
            } else {
                let (l, r) = split(n.left.take(), start, id);
                n.left = r;
                n.update();
                (l, Some(n))
            }
        }
    }
}

/// Joins two treaps where every key of `a` orders before every key of `b`.
fn merge(a: Link, b: Link) -> Link {
    match (a, b) {
        (None, b) => b,
        (a, None) => a,
        (Some(mut a), Some(mut b)) => {
            if a.priority >= b.priority {
                a.right = merge(a.right.take(), Some(b));
                a.update();
                Some(a)
            } else {
                b.left = merge(Some(a), b.left.take());
                b.update();
                Some(b)
            }
        }
    }
}

fn remove(link: &mut Link, start: &[u8], id: u64) -> bool {
    let Some(n) = link else { return false };
    let removed = match n.cmp_key(start, id) {
        Ordering::Equal => {
            let (l, r) = (n.left.take(), n.right.take());
            *link = merge(l, r);
            return true;
        }
        Ordering::Greater => remove(&mut n.left, start, id),
        Ordering::Less => remove(&mut n.right, start, id),
    };
    if removed {
        n.update();
    }
    removed
}

fn stab(link: &Link, key: &[u8], f: &mut impl FnMut(&Arc<Watcher>)) {
    let Some(n) = link else { return };
    if !end_above(&n.max_end, key) {
        return;
    }
    stab(&n.left, key, f);
    if n.start.as_ref() <= key {
        if end_above(&n.end, key) {
            f(&n.watcher);
        }
        stab(&n.right, key, f);
    }
}

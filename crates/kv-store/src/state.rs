//! The in-memory key-value state and the pure (lock-free, I/O-free) txn logic over it:
//! validation, compares, range options and the execution that yields one change set.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::Bound;

use bytes::Bytes;
use watch_core::{ChangeSet, Event, EventKind, KeyValue, Revision};

use super::types::{
    Compare, CompareOp, CompareTarget, DeleteResult, KeyRange, PutResult, RangeRequest,
    RangeResult, SortOrder, SortTarget, TxnOp, TxnOpResult, TxnRequest, TxnResult,
};
use crate::StoreError;

/// The current key-value state at `revision`.
#[derive(Debug, Clone, Default)]
pub(crate) struct KvState {
    pub(crate) map: BTreeMap<Bytes, KeyValue>,
    /// The revision of the last applied change set (1 for a fresh store, as etcd).
    pub(crate) revision: Revision,
    /// Lease ID -> the keys attached to it (every key of `map` whose `lease != 0`, and only
    /// those). Maintained by [`KvState::apply`], so a log replay rebuilds it.
    pub(crate) leased: HashMap<i64, BTreeSet<Bytes>>,
}

impl KvState {
    /// Applies a committed change set (from a write or a log replay).
    pub(crate) fn apply(&mut self, cs: &ChangeSet) {
        for e in &cs.events {
            let old = match e.kind {
                EventKind::Put => {
                    let old = self.map.insert(e.kv.key.clone(), e.kv.clone());
                    if e.kv.lease != 0 && old.as_ref().is_none_or(|o| o.lease != e.kv.lease) {
                        self.leased
                            .entry(e.kv.lease)
                            .or_default()
                            .insert(e.kv.key.clone());
                    }
                    old.filter(|o| o.lease != e.kv.lease)
                }
                EventKind::Delete => self.map.remove(&e.kv.key),
            };
            if let Some(old) = old.filter(|o| o.lease != 0) {
                self.detach(old.lease, &old.key);
            }
        }
        self.revision = self.revision.max(cs.revision);
    }

    fn detach(&mut self, lease: i64, key: &Bytes) {
        if let Some(keys) = self.leased.get_mut(&lease) {
            keys.remove(key);
            if keys.is_empty() {
                self.leased.remove(&lease);
            }
        }
    }

    /// Rebuilds the lease index from `map` (after loading a snapshot into `map`).
    pub(crate) fn index_leases(&mut self) {
        self.leased.clear();
        for (key, kv) in &self.map {
            if kv.lease != 0 {
                self.leased.entry(kv.lease).or_default().insert(key.clone());
            }
        }
    }

    /// The key-values of `range`, in key order.
    pub(crate) fn range(&self, range: &KeyRange) -> Vec<KeyValue> {
        match range.bounds() {
            None => Vec::new(),
            Some(b) => self.map.range(b).map(|(_, kv)| kv.clone()).collect(),
        }
    }
}

/// Results of historic reads a txn needs, fetched before it runs: (range, revision) -> the
/// range's key-values at that revision, in key order.
pub(crate) type HistoricReads = HashMap<(KeyRange, Revision), Vec<KeyValue>>;

/// Static checks of a txn (etcd's `checkTxnRequest` and `checkIntervals`): sizes, empty keys,
/// put flags, and no key written twice in one branch. Whether a named lease exists is checked
/// when the op runs. O(n log n) in the txn's ops (see [`check_intervals`]); etcd runs all of
/// them in its gRPC layer, before authorization, so a malformed request is refused as such.
pub(crate) fn validate_txn(req: &TxnRequest, max_ops: usize) -> Result<(), StoreError> {
    check_txn(req, max_ops)?;
    check_intervals(&req.success)?;
    check_intervals(&req.failure)?;
    Ok(())
}

/// Every op of `req`, nested ones included (a nested txn counts as one op plus its own).
pub(crate) fn total_ops(req: &TxnRequest) -> usize {
    let mut n = req.compare.len();
    for op in req.success.iter().chain(&req.failure) {
        n += 1;
        if let TxnOp::Txn(t) = op {
            n += total_ops(t);
        }
    }
    n
}

fn check_txn(req: &TxnRequest, max_ops: usize) -> Result<(), StoreError> {
    let opc = req
        .compare
        .len()
        .max(req.success.len())
        .max(req.failure.len());
    if opc > max_ops {
        return Err(StoreError::TooManyOps {
            count: opc,
            limit: max_ops,
        });
    }
    if req.compare.iter().any(|c| c.range.key.is_empty()) {
        return Err(StoreError::EmptyKey);
    }
    for op in req.success.iter().chain(&req.failure) {
        check_op(op, max_ops - opc)?;
    }
    Ok(())
}

pub(crate) fn check_op(op: &TxnOp, max_ops: usize) -> Result<(), StoreError> {
    match op {
        TxnOp::Range(r) if r.range.key.is_empty() => Err(StoreError::EmptyKey),
        TxnOp::Range(_) => Ok(()),
        TxnOp::Put {
            key,
            value,
            options,
        } => {
            if key.is_empty() {
                return Err(StoreError::EmptyKey);
            }
            if options.ignore_value && !value.is_empty() {
                return Err(StoreError::ValueProvided);
            }
            if options.ignore_lease && options.lease != 0 {
                return Err(StoreError::LeaseProvided);
            }
            // Whether `options.lease` exists is checked when the op runs ([`Exec`]), under the
            // write lock, so a revoke cannot slip in between the check and the write.
            Ok(())
        }
        TxnOp::Delete { range, .. } if range.key.is_empty() => Err(StoreError::EmptyKey),
        TxnOp::Delete { .. } => Ok(()),
        TxnOp::Txn(t) => check_txn(t, max_ops),
    }
}

/// etcd's `checkIntervals`: the puts of one branch (nested txns included, their two branches
/// being exclusive) must not repeat a key nor fall in a range the branch deletes.
///
/// Returns the branch's put keys and deleted ranges. O(n log n) per level: sets are merged
/// smaller-into-larger and every overlap test walks the smaller side, so a key nested `d`
/// levels deep is not rescanned against every delete of every level (the linear scan this
/// replaces made a 0.9 MB txn cost seconds of CPU).
fn check_intervals(ops: &[TxnOp]) -> Result<(BTreeSet<Bytes>, Dels), StoreError> {
    let mut dels = Dels::default();
    for op in ops {
        if let TxnOp::Delete { range, .. } = op {
            dels.insert_range(range);
        }
    }
    let mut puts: BTreeSet<Bytes> = BTreeSet::new();
    for op in ops {
        let TxnOp::Txn(t) = op else { continue };
        let (puts_then, dels_then) = check_intervals(&t.success)?;
        let (puts_else, dels_else) = check_intervals(&t.failure)?;
        // A key in both branches of the same nested txn is fine: only one branch runs. Any key
        // either branch puts must be new to this branch and outside the ranges deleted so far
        // (this level's and earlier nested txns'), as etcd checks them.
        let child = union_keys(puts_then, puts_else);
        if intersects(&puts, &child) || dels.hits_any(&child) {
            return Err(StoreError::DuplicateKey);
        }
        puts = union_keys(puts, child);
        dels = dels.union(dels_then).union(dels_else);
    }
    for op in ops {
        let TxnOp::Put { key, .. } = op else { continue };
        if dels.contains(key) || !puts.insert(key.clone()) {
            return Err(StoreError::DuplicateKey);
        }
    }
    Ok((puts, dels))
}

/// `a ∪ b`, inserting the smaller set into the larger.
fn union_keys(a: BTreeSet<Bytes>, b: BTreeSet<Bytes>) -> BTreeSet<Bytes> {
    let (mut large, small) = if a.len() >= b.len() { (a, b) } else { (b, a) };
    large.extend(small);
    large
}

/// Whether `a` and `b` share a key, walking the smaller set.
fn intersects(a: &BTreeSet<Bytes>, b: &BTreeSet<Bytes>) -> bool {
    let (large, small) = if a.len() >= b.len() { (a, b) } else { (b, a) };
    small.iter().any(|k| large.contains(k))
}

/// The key ranges one txn branch deletes, as disjoint half-open intervals `[start, end)`
/// keyed by start (`None` end: unbounded). Overlapping or touching ranges are merged on
/// insert, so a point lookup is one ordered-map probe.
#[derive(Debug, Default)]
struct Dels(BTreeMap<Bytes, Option<Bytes>>);

impl Dels {
    fn insert_range(&mut self, range: &KeyRange) {
        // `interval` is `None` for a range that selects nothing (end before start), which
        // `KeyRange::contains` never matches either.
        if let Some((start, end)) = range.interval() {
            self.insert(start, end);
        }
    }

    fn insert(&mut self, mut start: Bytes, mut end: Option<Bytes>) {
        // The interval starting at or before `start`, if it reaches it, absorbs the new one.
        let before = self
            .0
            .range::<[u8], _>((Bound::Unbounded, Bound::Included(&start[..])))
            .next_back()
            .filter(|(_, e)| e.as_ref().is_none_or(|e| *e >= start))
            .map(|(s, e)| (s.clone(), e.clone()));
        if let Some((s, e)) = before {
            self.0.remove(&s);
            start = s;
            end = max_end(end, e);
        }
        // Every interval starting inside `[start, end]` is absorbed.
        loop {
            let next = self
                .0
                .range::<[u8], _>((Bound::Included(&start[..]), Bound::Unbounded))
                .next()
                .filter(|(s, _)| end.as_ref().is_none_or(|end| *s <= end))
                .map(|(s, e)| (s.clone(), e.clone()));
            let Some((s, e)) = next else { break };
            self.0.remove(&s);
            end = max_end(end, e);
        }
        self.0.insert(start, end);
    }

    /// Whether `key` falls in a deleted range.
    fn contains(&self, key: &[u8]) -> bool {
        self.0
            .range::<[u8], _>((Bound::Unbounded, Bound::Included(key)))
            .next_back()
            .is_some_and(|(_, e)| e.as_ref().is_none_or(|e| key < &e[..]))
    }

    /// Whether any of `keys` falls in a deleted range, walking the smaller side.
    fn hits_any(&self, keys: &BTreeSet<Bytes>) -> bool {
        if keys.len() <= self.0.len() {
            return keys.iter().any(|k| self.contains(k));
        }
        self.0.iter().any(|(s, e)| {
            let hi = e
                .as_ref()
                .map_or(Bound::Unbounded, |e| Bound::Excluded(&e[..]));
            keys.range::<[u8], _>((Bound::Included(&s[..]), hi))
                .next()
                .is_some()
        })
    }

    /// `self ∪ other`, inserting the smaller into the larger.
    fn union(self, other: Dels) -> Dels {
        let (mut large, small) = if self.0.len() >= other.0.len() {
            (self, other)
        } else {
            (other, self)
        };
        for (s, e) in small.0 {
            large.insert(s, e);
        }
        large
    }
}

/// The later of two interval ends (`None`: unbounded).
fn max_end(a: Option<Bytes>, b: Option<Bytes>) -> Option<Bytes> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.max(b)),
        _ => None,
    }
}

/// Every (range, revision) a txn reads at a past revision (`0 < revision < current`), so the
/// caller can fetch them from history before running it.
pub(crate) fn historic_reads(req: &TxnRequest, current: Revision, out: &mut Vec<RangeRequest>) {
    for op in req.success.iter().chain(&req.failure) {
        match op {
            TxnOp::Range(r) if r.revision > 0 && r.revision < current => out.push(r.clone()),
            TxnOp::Txn(t) => historic_reads(t, current, out),
            _ => {}
        }
    }
}

/// Applies etcd's range options to `kvs` (the range's key-values in key order at the read
/// revision): count, min/max filters, sort, limit, keys_only.
pub(crate) fn finish_range(
    req: &RangeRequest,
    mut kvs: Vec<KeyValue>,
    revision: Revision,
) -> RangeResult {
    let count = kvs.len() as u64;
    if req.count_only {
        return RangeResult {
            revision,
            kvs: Vec::new(),
            more: false,
            count,
        };
    }
    let bound = |v: Revision, min: Revision, max: Revision| {
        (min == 0 || v >= min) && (max == 0 || v <= max)
    };
    kvs.retain(|kv| {
        bound(kv.mod_revision, req.min_mod_revision, req.max_mod_revision)
            && bound(
                kv.create_revision,
                req.min_create_revision,
                req.max_create_revision,
            )
    });
    let mut order = req.sort_order;
    if req.sort_target != SortTarget::Key && order == SortOrder::None {
        // etcd: a non-key target without an order sorts ascending.
        order = SortOrder::Ascend;
    }
    match (req.sort_target, order) {
        (_, SortOrder::None) | (SortTarget::Key, SortOrder::Ascend) => {}
        (SortTarget::Key, SortOrder::Descend) => kvs.reverse(),
        (target, order) => {
            // Stable, so ties stay in key order.
            match target {
                SortTarget::Version => kvs.sort_by_key(|kv| kv.version),
                SortTarget::Create => kvs.sort_by_key(|kv| kv.create_revision),
                SortTarget::Mod => kvs.sort_by_key(|kv| kv.mod_revision),
                SortTarget::Value => kvs.sort_by(|a, b| a.value.cmp(&b.value)),
                SortTarget::Key => {}
            }
            if order == SortOrder::Descend {
                kvs.reverse();
            }
        }
    }
    let mut more = false;
    if req.limit > 0 && kvs.len() as u64 > req.limit {
        kvs.truncate(req.limit as usize);
        more = true;
    }
    if req.keys_only {
        for kv in &mut kvs {
            kv.value = Bytes::new();
        }
    }
    RangeResult {
        revision,
        kvs,
        more,
        count,
    }
}

/// Answers whether a lease exists (the lessor's view, read under the store's write lock).
pub(crate) type LeaseExists<'a> = &'a dyn Fn(i64) -> bool;

/// One txn's execution over the state: reads see the txn's own earlier writes.
pub(crate) struct Exec<'a> {
    base: &'a KvState,
    history: &'a HistoricReads,
    lease_exists: LeaseExists<'a>,
    /// Writes of this txn so far: key -> new value (`None`: deleted).
    overlay: BTreeMap<Bytes, Option<KeyValue>>,
    events: Vec<Event>,
    /// The revision the txn's writes get.
    rev: Revision,
}

impl<'a> Exec<'a> {
    pub(crate) fn new(
        base: &'a KvState,
        history: &'a HistoricReads,
        lease_exists: LeaseExists<'a>,
    ) -> Self {
        Self {
            base,
            history,
            lease_exists,
            overlay: BTreeMap::new(),
            events: Vec::new(),
            rev: base.revision + 1,
        }
    }

    /// Runs `req` and returns its result and the change set to commit (`None`: no write).
    pub(crate) fn run(
        mut self,
        req: &TxnRequest,
    ) -> Result<(TxnResult, Option<ChangeSet>), StoreError> {
        let mut result = self.txn(req)?;
        if self.events.is_empty() {
            result.revision = self.base.revision;
            return Ok((result, None));
        }
        result.revision = self.rev;
        set_revision(&mut result, self.rev);
        Ok((result, Some(ChangeSet::new(self.rev, self.events))))
    }

    fn get(&self, key: &[u8]) -> Option<&KeyValue> {
        match self.overlay.get(key) {
            Some(v) => v.as_ref(),
            None => self.base.map.get(key),
        }
    }

    /// The working view of `range`, in key order.
    fn view(&self, range: &KeyRange) -> Vec<KeyValue> {
        let Some(bounds) = range.bounds() else {
            return Vec::new();
        };
        let base = self.base.map.range(bounds.clone());
        if self.overlay.is_empty() {
            return base.map(|(_, kv)| kv.clone()).collect();
        }
        let mut merged: BTreeMap<&Bytes, &KeyValue> = base
            .filter(|(k, _)| !self.overlay.contains_key(*k))
            .collect();
        for (k, v) in self.overlay.range(bounds) {
            if let Some(kv) = v {
                merged.insert(k, kv);
            }
        }
        merged.into_values().cloned().collect()
    }

    fn txn(&mut self, req: &TxnRequest) -> Result<TxnResult, StoreError> {
        let succeeded = req.compare.iter().all(|c| self.compare(c));
        let ops = if succeeded {
            &req.success
        } else {
            &req.failure
        };
        let mut responses = Vec::with_capacity(ops.len());
        for op in ops {
            responses.push(self.op(op)?);
        }
        Ok(TxnResult {
            revision: 0,
            succeeded,
            responses,
        })
    }

    fn compare(&self, c: &Compare) -> bool {
        let kvs = self.view(&c.range);
        if kvs.is_empty() {
            if matches!(c.target, CompareTarget::Value(_)) {
                // etcd: a value compare on a missing key always fails.
                return false;
            }
            return compare_kv(c, &KeyValue::default());
        }
        kvs.iter().all(|kv| compare_kv(c, kv))
    }

    fn op(&mut self, op: &TxnOp) -> Result<TxnOpResult, StoreError> {
        Ok(match op {
            TxnOp::Range(r) => TxnOpResult::Range(self.read(r)?),
            TxnOp::Put {
                key,
                value,
                options,
            } => {
                let prev = self.get(key).cloned();
                if (options.ignore_value || options.ignore_lease) && prev.is_none() {
                    return Err(StoreError::KeyNotFound);
                }
                if options.lease != 0 && !(self.lease_exists)(options.lease) {
                    return Err(StoreError::LeaseNotFound {
                        lease: options.lease,
                    });
                }
                // Stored bytes are private, exact-size copies: a request's `Bytes` may be a
                // slice of a whole received gRPC buffer, which the state, the in-memory window
                // and every watcher's batch would otherwise keep alive (measured: ~5 KiB of RSS
                // per small put). An existing key's stored bytes are reused as they are.
                let value = match (&prev, options.ignore_value) {
                    (Some(p), true) => p.value.clone(),
                    _ => bytes::Bytes::copy_from_slice(value),
                };
                let key = match &prev {
                    Some(p) => p.key.clone(),
                    None => bytes::Bytes::copy_from_slice(key),
                };
                let key = &key;
                let lease = match (&prev, options.ignore_lease) {
                    (Some(p), true) => p.lease,
                    _ => options.lease,
                };
                let kv = KeyValue {
                    key: key.clone(),
                    value,
                    create_revision: prev.as_ref().map_or(self.rev, |p| p.create_revision),
                    mod_revision: self.rev,
                    version: prev.as_ref().map_or(1, |p| p.version + 1),
                    lease,
                };
                self.overlay.insert(key.clone(), Some(kv.clone()));
                self.events.push(Event::put(kv, prev.clone()));
                TxnOpResult::Put(PutResult {
                    revision: self.rev,
                    prev_kv: if options.prev_kv { prev } else { None },
                })
            }
            TxnOp::Delete { range, prev_kv } => {
                let gone = self.view(range);
                for kv in &gone {
                    self.overlay.insert(kv.key.clone(), None);
                    self.events
                        .push(Event::delete(kv.key.clone(), self.rev, Some(kv.clone())));
                }
                TxnOpResult::Delete(DeleteResult {
                    revision: self.rev,
                    deleted: gone.len() as u64,
                    prev_kvs: if *prev_kv { gone } else { Vec::new() },
                })
            }
            TxnOp::Txn(t) => TxnOpResult::Txn(self.txn(t)?),
        })
    }

    fn read(&self, r: &RangeRequest) -> Result<RangeResult, StoreError> {
        let current = self.base.revision;
        let kvs = if r.revision == 0 {
            self.view(&r.range)
        } else if r.revision == current {
            self.base.range(&r.range)
        } else if r.revision > current {
            return Err(StoreError::FutureRevision {
                requested: r.revision,
                current,
            });
        } else {
            self.history
                .get(&(r.range.clone(), r.revision))
                .cloned()
                .ok_or(StoreError::Compacted {
                    requested: r.revision,
                    compacted: 0,
                })?
        };
        Ok(finish_range(r, kvs, current))
    }
}

/// Sets the header revision of every nested result (etcd reports the txn's revision).
fn set_revision(result: &mut TxnResult, rev: Revision) {
    result.revision = rev;
    for r in &mut result.responses {
        match r {
            TxnOpResult::Range(x) => x.revision = rev,
            TxnOpResult::Put(x) => x.revision = rev,
            TxnOpResult::Delete(x) => x.revision = rev,
            TxnOpResult::Txn(t) => set_revision(t, rev),
        }
    }
}

/// etcd's `compareKV`.
fn compare_kv(c: &Compare, kv: &KeyValue) -> bool {
    let as_i64 = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    let ord = match &c.target {
        CompareTarget::Value(v) => kv.value.as_ref().cmp(v.as_ref()),
        CompareTarget::Version(v) => as_i64(kv.version).cmp(v),
        CompareTarget::CreateRevision(v) => as_i64(kv.create_revision).cmp(v),
        CompareTarget::ModRevision(v) => as_i64(kv.mod_revision).cmp(v),
        CompareTarget::Lease(v) => kv.lease.cmp(v),
    };
    match c.op {
        CompareOp::Equal => ord.is_eq(),
        CompareOp::NotEqual => ord.is_ne(),
        CompareOp::Greater => ord.is_gt(),
        CompareOp::Less => ord.is_lt(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::PutOptions;

    fn put(k: &[u8]) -> TxnOp {
        TxnOp::Put {
            key: Bytes::copy_from_slice(k),
            value: Bytes::new(),
            options: PutOptions::default(),
        }
    }

    fn del(k: &[u8], end: &[u8]) -> TxnOp {
        TxnOp::Delete {
            range: KeyRange {
                key: Bytes::copy_from_slice(k),
                range_end: Bytes::copy_from_slice(end),
            },
            prev_kv: false,
        }
    }

    /// The linear-scan check this module used to run (etcd's algorithm written out with a list
    /// of delete ranges): the oracle the interval version must agree with.
    fn naive(ops: &[TxnOp]) -> Option<(Vec<Bytes>, Vec<KeyRange>)> {
        let mut dels: Vec<KeyRange> = ops
            .iter()
            .filter_map(|op| match op {
                TxnOp::Delete { range, .. } => Some(range.clone()),
                _ => None,
            })
            .collect();
        let hits = |dels: &[KeyRange], k: &[u8]| dels.iter().any(|d| d.contains(k));
        let mut puts: Vec<Bytes> = Vec::new();
        for op in ops {
            let TxnOp::Txn(t) = op else { continue };
            let (then_p, then_d) = naive(&t.success)?;
            let (else_p, else_d) = naive(&t.failure)?;
            for k in &then_p {
                if puts.contains(k) || hits(&dels, k) {
                    return None;
                }
                puts.push(k.clone());
            }
            for k in &else_p {
                if (puts.contains(k) && !then_p.contains(k)) || hits(&dels, k) {
                    return None;
                }
                // A set, as the original: a key of both branches is kept once.
                if !puts.contains(k) {
                    puts.push(k.clone());
                }
            }
            dels.extend(then_d);
            dels.extend(else_d);
        }
        for op in ops {
            let TxnOp::Put { key, .. } = op else { continue };
            if puts.contains(key) || hits(&dels, key) {
                return None;
            }
            puts.push(key.clone());
        }
        Some((puts, dels))
    }

    /// xorshift64: deterministic cases without a dependency.
    struct Rng(u64);
    impl Rng {
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % n
        }
        fn key(&mut self) -> Vec<u8> {
            // A small alphabet with prefixes of each other, so ranges overlap, touch and nest.
            let len = 1 + self.below(3) as usize;
            (0..len).map(|_| b'a' + self.below(4) as u8).collect()
        }
        fn ops(&mut self, depth: u32) -> Vec<TxnOp> {
            let n = self.below(5) as usize;
            (0..n)
                .map(|_| match self.below(if depth == 0 { 3 } else { 4 }) {
                    0 => put(&self.key()),
                    1 => {
                        let k = self.key();
                        let end = match self.below(4) {
                            0 => Vec::new(),
                            1 => vec![0],
                            _ => self.key(),
                        };
                        del(&k, &end)
                    }
                    2 => TxnOp::Range(RangeRequest::new(KeyRange::key(self.key()))),
                    _ => TxnOp::Txn(TxnRequest {
                        compare: Vec::new(),
                        success: self.ops(depth - 1),
                        failure: self.ops(depth - 1),
                    }),
                })
                .collect()
        }
    }

    #[test]
    fn interval_check_agrees_with_the_linear_scan() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let (mut ok, mut dup) = (0, 0);
        for _ in 0..10_000 {
            let ops = rng.ops(3);
            let want = naive(&ops).is_some();
            let got = check_intervals(&ops);
            assert_eq!(got.is_ok(), want, "{ops:?}");
            if let Ok((puts, _)) = got {
                ok += 1;
                let mut want: Vec<Bytes> = naive(&ops).unwrap_or_default().0;
                want.sort();
                want.dedup();
                assert_eq!(puts.into_iter().collect::<Vec<_>>(), want, "{ops:?}");
            } else {
                dup += 1;
            }
        }
        // Both outcomes were exercised.
        assert!(ok > 500 && dup > 500, "ok {ok} dup {dup}");
    }

    #[test]
    fn delete_ranges_merge_and_answer_points() {
        let mut d = Dels::default();
        for (k, end) in [("b", "d"), ("f", ""), ("c", "e"), ("x", "\0"), ("e", "f")] {
            d.insert_range(&KeyRange {
                key: Bytes::copy_from_slice(k.as_bytes()),
                range_end: Bytes::copy_from_slice(end.as_bytes()),
            });
        }
        // [b,d) ∪ [c,e) ∪ [e,f) ∪ [f,f\0) touch into one; [x,∞) stays apart.
        assert_eq!(d.0.len(), 2, "{d:?}");
        for k in ["b", "c", "dz", "e", "f"] {
            assert!(d.contains(k.as_bytes()), "{k}");
        }
        for k in ["a", "f\0", "g", "w"] {
            assert!(!d.contains(k.as_bytes()), "{k}");
        }
        assert!(d.contains(b"x") && d.contains(b"zzz"));
        // An inverted range selects nothing.
        let mut e = Dels::default();
        e.insert_range(&KeyRange {
            key: Bytes::from_static(b"z"),
            range_end: Bytes::from_static(b"a"),
        });
        assert!(!e.contains(b"m"));
    }

    /// 50,000 puts and 50,000 deletes in one branch, 20 levels deep: the linear scan made this
    /// 5e10 range tests (hours); sorted intervals make it O(n log n), about a second in a debug
    /// build. Nested, every put is checked again at each enclosing level.
    #[test]
    fn a_large_txn_checks_in_n_log_n() {
        let n = 50_000u32;
        let mut ops = Vec::with_capacity(2 * n as usize);
        for i in 0..n {
            ops.push(put(format!("p{i:08}").as_bytes()));
            ops.push(del(format!("d{i:08}").as_bytes(), b""));
        }
        let mut req = TxnRequest {
            compare: Vec::new(),
            success: ops,
            failure: Vec::new(),
        };
        for _ in 0..20 {
            req = TxnRequest {
                compare: Vec::new(),
                success: vec![TxnOp::Txn(req), del(b"q", b"\0")],
                failure: Vec::new(),
            };
        }
        assert!(validate_txn(&req, 2 * n as usize + 100).is_ok());
        // One put more, inside a deleted range at the top: refused.
        let TxnOp::Txn(inner) = &mut req.success[0] else {
            unreachable!()
        };
        inner.success.push(del(b"p", b"q"));
        assert!(matches!(
            validate_txn(&req, 2 * n as usize + 100),
            Err(StoreError::DuplicateKey)
        ));
    }
}

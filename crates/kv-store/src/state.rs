//! The in-memory key-value state and the pure (lock-free, I/O-free) txn logic over it:
//! validation, compares, range options and the execution that yields one change set.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

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
/// when the op runs.
pub(crate) fn validate_txn(req: &TxnRequest, max_ops: usize) -> Result<(), StoreError> {
    validate_shape(req, max_ops)
}

/// The checks etcd makes in its gRPC layer, before authorization (the lease lookup comes
/// after it, when the op runs, in both).
pub(crate) fn validate_shape(req: &TxnRequest, max_ops: usize) -> Result<(), StoreError> {
    check_txn(req, max_ops)?;
    check_intervals(&req.success)?;
    check_intervals(&req.failure)?;
    Ok(())
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
fn check_intervals(ops: &[TxnOp]) -> Result<(HashSet<Bytes>, Vec<KeyRange>), StoreError> {
    let mut dels: Vec<KeyRange> = ops
        .iter()
        .filter_map(|op| match op {
            TxnOp::Delete { range, .. } => Some(range.clone()),
            _ => None,
        })
        .collect();
    let hits = |dels: &[KeyRange], k: &[u8]| dels.iter().any(|d| d.contains(k));
    let mut puts: HashSet<Bytes> = HashSet::new();
    for op in ops {
        let TxnOp::Txn(t) = op else { continue };
        let (puts_then, dels_then) = check_intervals(&t.success)?;
        let (puts_else, dels_else) = check_intervals(&t.failure)?;
        for k in &puts_then {
            if puts.contains(k) || hits(&dels, k) {
                return Err(StoreError::DuplicateKey);
            }
            puts.insert(k.clone());
        }
        for k in &puts_else {
            // A key in both branches of the same nested txn is fine: only one branch runs.
            if (puts.contains(k) && !puts_then.contains(k)) || hits(&dels, k) {
                return Err(StoreError::DuplicateKey);
            }
            puts.insert(k.clone());
        }
        dels.extend(dels_then);
        dels.extend(dels_else);
    }
    for op in ops {
        let TxnOp::Put { key, .. } = op else { continue };
        if puts.contains(key) || hits(&dels, key) {
            return Err(StoreError::DuplicateKey);
        }
        puts.insert(key.clone());
    }
    Ok((puts, dels))
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

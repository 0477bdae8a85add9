//! The reference model: a key-value map that replays writes in revision order and says which
//! events each revision must produce and what each response must have contained.

use std::collections::{BTreeMap, BTreeSet};

use crate::record::{AckDetail, Event, EventKind, Kv, Request, TxnOp, TxnOpResult};

/// The model state (the whole key space at one revision).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Model {
    /// Live keys.
    pub state: BTreeMap<Vec<u8>, Kv>,
    /// Leases whose revoke or expiry has been replayed: no key may attach to them later.
    pub dead: BTreeSet<i64>,
}

/// The effect of one write on the model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// The events of the revision, in etcd's order (op order; a range delete in key order),
    /// each with its true previous value.
    pub events: Vec<Event>,
    /// What the response must say.
    pub expected: AckDetail,
}

fn in_range(key: &[u8], start: &[u8], end: &[u8]) -> bool {
    if end.is_empty() {
        key == start
    } else if end == [0] {
        key >= start
    } else {
        key >= start && key < end
    }
}

impl Model {
    /// Applies `req` at `revision` and returns its events and expected response. The model is
    /// left unchanged if the write writes nothing (`events` empty).
    pub fn apply(&mut self, req: &Request, revision: i64) -> Applied {
        let mut events = Vec::new();
        let expected = match req {
            Request::Put { key, value } => {
                let prev = self.put(key, value, 0, revision, &mut events);
                AckDetail::Put { prev }
            }
            Request::LeasePut { key, value, lease } => {
                let prev = self.put(key, value, *lease, revision, &mut events);
                AckDetail::Put { prev }
            }
            // Resolved from the reference watcher (`Model::end_lease`), never applied here.
            Request::Revoke { .. } => AckDetail::Revoke,
            Request::DeleteRange { key, range_end } => {
                let prev = self.delete(key, range_end, revision, &mut events);
                AckDetail::DeleteRange { prev }
            }
            Request::Txn {
                compare,
                success,
                failure,
            } => {
                let succeeded = compare.iter().all(|c| {
                    let v = self.state.get(&c.key).map_or(0, |kv| kv.version);
                    v.cmp(&c.version) as i8 == c.ordering
                });
                let ops = if succeeded { success } else { failure };
                let mut results = Vec::new();
                for op in ops {
                    results.push(match op {
                        TxnOp::Put { key, value } => TxnOpResult::Put {
                            prev: self.put(key, value, 0, revision, &mut events),
                        },
                        TxnOp::Delete { key } => TxnOpResult::Delete {
                            prev: self.delete(key, &[], revision, &mut events),
                        },
                        TxnOp::Get { .. } => TxnOpResult::Get,
                    });
                }
                AckDetail::Txn { succeeded, results }
            }
        };
        Applied { events, expected }
    }

    /// If `seen` (one revision's events, from the reference watcher) is exactly the deletion
    /// of ALL keys attached to one lease, applies it at `rev` (the lease is then dead) and
    /// returns the events in the model's order; otherwise `None`. This is how a lease expiry
    /// or revoke shows up: no write of the runner claims the revision.
    pub fn end_lease(&mut self, rev: i64, seen: &[&Event]) -> Option<Vec<Event>> {
        let first = seen.first()?;
        if seen.iter().any(|e| e.kind != EventKind::Delete) {
            return None;
        }
        let lease = self.state.get(&first.kv.key)?.lease;
        if lease == 0 {
            return None;
        }
        let attached: BTreeSet<&Vec<u8>> = self
            .state
            .values()
            .filter(|kv| kv.lease == lease)
            .map(|kv| &kv.key)
            .collect();
        let deleted: BTreeSet<&Vec<u8>> = seen.iter().map(|e| &e.kv.key).collect();
        if attached != deleted || deleted.len() != seen.len() {
            return None;
        }
        let keys: Vec<Vec<u8>> = attached.into_iter().cloned().collect();
        let mut events = Vec::new();
        for k in keys {
            self.delete(&k, &[], rev, &mut events);
        }
        self.dead.insert(lease);
        Some(events)
    }

    fn put(
        &mut self,
        key: &[u8],
        value: &[u8],
        lease: i64,
        rev: i64,
        events: &mut Vec<Event>,
    ) -> Option<Kv> {
        let prev = self.state.get(key).cloned();
        let kv = Kv {
            key: key.to_vec(),
            value: value.to_vec(),
            create_revision: prev.as_ref().map_or(rev, |p| p.create_revision),
            mod_revision: rev,
            version: prev.as_ref().map_or(1, |p| p.version + 1),
            lease,
        };
        self.state.insert(key.to_vec(), kv.clone());
        events.push(Event {
            kind: EventKind::Put,
            kv,
            prev: prev.clone(),
        });
        prev
    }

    fn delete(&mut self, key: &[u8], end: &[u8], rev: i64, events: &mut Vec<Event>) -> Vec<Kv> {
        let doomed: Vec<Vec<u8>> = self
            .state
            .keys()
            .filter(|k| in_range(k, key, end))
            .cloned()
            .collect();
        let mut prev = Vec::new();
        for k in doomed {
            if let Some(old) = self.state.remove(&k) {
                events.push(Event {
                    kind: EventKind::Delete,
                    kv: Kv {
                        key: k,
                        value: Vec::new(),
                        create_revision: 0,
                        mod_revision: rev,
                        version: 0,
                        lease: 0,
                    },
                    prev: Some(old.clone()),
                });
                prev.push(old);
            }
        }
        prev
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::VersionCompare;

    fn put(k: &str, v: &str) -> Request {
        Request::Put {
            key: k.into(),
            value: v.into(),
        }
    }

    #[test]
    fn revisions_versions_and_txn_branches() {
        let mut m = Model::default();
        assert_eq!(m.apply(&put("a", "1"), 2).events[0].kv.version, 1);
        let a = m.apply(&put("a", "2"), 3);
        assert_eq!(a.events[0].kv.create_revision, 2);
        assert_eq!(
            a.events[0].prev.as_ref().map(|p| p.value.clone()),
            Some(b"1".to_vec())
        );
        let txn = Request::Txn {
            compare: vec![VersionCompare {
                key: b"a".to_vec(),
                ordering: 0,
                version: 2,
            }],
            success: vec![TxnOp::Delete { key: b"a".to_vec() }],
            failure: vec![TxnOp::Get { key: b"a".to_vec() }],
        };
        let t = m.apply(&txn, 4);
        assert!(matches!(
            t.expected,
            AckDetail::Txn {
                succeeded: true,
                ..
            }
        ));
        assert_eq!(t.events.len(), 1);
        assert!(m.apply(&txn, 5).events.is_empty());
        let d = m.apply(
            &Request::DeleteRange {
                key: b"a".to_vec(),
                range_end: vec![0],
            },
            5,
        );
        assert!(d.events.is_empty());
    }
}

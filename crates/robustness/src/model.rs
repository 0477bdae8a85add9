//! The reference model: a key-value map that replays writes in revision order and says which
//! events each revision must produce and what each response must have contained.

use std::collections::BTreeMap;

use crate::record::{AckDetail, Event, EventKind, Kv, Request, TxnOp, TxnOpResult};

/// The model state (the whole key space at one revision).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Model {
    /// Live keys.
    pub state: BTreeMap<Vec<u8>, Kv>,
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
                let prev = self.put(key, value, revision, &mut events);
                AckDetail::Put { prev }
            }
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
                            prev: self.put(key, value, revision, &mut events),
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

    fn put(&mut self, key: &[u8], value: &[u8], rev: i64, events: &mut Vec<Event>) -> Option<Kv> {
        let prev = self.state.get(key).cloned();
        let kv = Kv {
            key: key.to_vec(),
            value: value.to_vec(),
            create_revision: prev.as_ref().map_or(rev, |p| p.create_revision),
            mod_revision: rev,
            version: prev.as_ref().map_or(1, |p| p.version + 1),
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

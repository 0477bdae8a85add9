//! Model-based property test: random appends, compactions, queries and reopens against an
//! in-memory `BTreeMap` model of the log.

use std::collections::BTreeMap;

use crate::common::puts;
use event_log::{Durability, EventLog, LogConfig, LogError};
use proptest::prelude::*;
use watch_core::{ChangeSet, KeySelector, Revision};

const KEYS: [&str; 6] = ["a", "ab", "abc", "b", "b/1", "c"];

#[derive(Debug, Clone)]
enum Op {
    /// Append at `last + gap` (gap 0 is a non-increasing revision) touching these keys.
    Append {
        gap: u64,
        keys: Vec<usize>,
    },
    /// Compact at `fraction` (per mille) of `[0, last + 2]`.
    Compact {
        per_mille: u64,
    },
    Query {
        selector: KeySelector,
        after_per_mille: u64,
        limit: usize,
    },
    Reopen,
}

fn selector() -> impl Strategy<Value = KeySelector> {
    let k = || prop::sample::select(&["", "a", "ab", "abd", "b", "b/", "c", "d"][..]);
    prop_oneof![
        prop::sample::select(&KEYS[..]).prop_map(KeySelector::key),
        k().prop_map(KeySelector::prefix),
        (k(), k())
            .prop_filter("start < end", |(s, e)| s < e)
            .prop_map(|(s, e)| KeySelector::range(s, e)),
        k().prop_map(KeySelector::from_key),
        Just(KeySelector::All),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (prop_oneof![1 => Just(0u64), 8 => 1..4u64], prop::collection::btree_set(0..KEYS.len(), 0..4))
            .prop_map(|(gap, keys)| Op::Append { gap, keys: keys.into_iter().collect() }),
        1 => (0..1000u64).prop_map(|per_mille| Op::Compact { per_mille }),
        3 => (selector(), 0..1000u64, 1..6usize)
            .prop_map(|(selector, after_per_mille, limit)| Op::Query { selector, after_per_mille, limit }),
        1 => Just(Op::Reopen),
    ]
}

#[derive(Default)]
struct Model {
    changes: BTreeMap<Revision, ChangeSet>,
    last: Revision,
    compacted: Revision,
}

fn config() -> LogConfig {
    LogConfig {
        durability: Durability::NoSync,
        batch_size: 4,
        ..LogConfig::default()
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn log_matches_model(ops in prop::collection::vec(op(), 1..60)) {
        let dir = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let mut log = EventLog::open(dir.path(), config()).unwrap();
        let mut m = Model::default();
        for op in ops {
            match op {
                Op::Append { gap, keys } => {
                    let rev = m.last + gap;
                    let names: Vec<&str> = keys.iter().map(|&i| KEYS[i]).collect();
                    let cs = puts(rev, &names);
                    let got = rt.block_on(log.append(cs.clone()));
                    if gap == 0 {
                        let refused = matches!(got, Err(LogError::NotIncreasing { .. }));
                        prop_assert!(refused, "{got:?}");
                    } else {
                        prop_assert_eq!(got.unwrap(), rev);
                        m.changes.insert(rev, cs);
                        m.last = rev;
                    }
                }
                Op::Compact { per_mille } => {
                    let target = (m.last + 2) * per_mille / 1000;
                    let got = rt.block_on(log.compact(target));
                    if target <= m.compacted {
                        let refused = matches!(got, Err(LogError::AlreadyCompacted { .. }));
                        prop_assert!(refused, "{got:?}");
                    } else if target > m.last {
                        let refused = matches!(got, Err(LogError::FutureRevision { .. }));
                        prop_assert!(refused, "{got:?}");
                    } else {
                        got.unwrap();
                        m.changes = m.changes.split_off(&target);
                        m.compacted = target;
                    }
                }
                Op::Query { selector, after_per_mille, limit } => {
                    let after = (m.last + 1) * after_per_mille / 1000;
                    let got = log.read(&selector, after, Revision::MAX, limit);
                    if after + 1 < m.compacted {
                        let refused = matches!(got, Err(LogError::Compacted { compacted }) if compacted == m.compacted);
                        prop_assert!(refused, "{got:?}");
                    } else {
                        let want: Vec<ChangeSet> = m
                            .changes
                            .range(after + 1..)
                            .map(|(_, c)| c)
                            .filter(|c| {
                                // A revision range read returns every change set, even empty ones.
                                selector == KeySelector::All
                                    || c.events.iter().any(|e| selector.matches(e.key()))
                            })
                            .take(limit)
                            .cloned()
                            .collect();
                        prop_assert_eq!(got.unwrap(), want);
                    }
                }
                Op::Reopen => {
                    drop(log);
                    log = EventLog::open(dir.path(), config()).unwrap();
                }
            }
            prop_assert_eq!(log.last_revision(), m.last);
            prop_assert_eq!(log.compacted_revision(), m.compacted);
            prop_assert_eq!(log.first_available(), m.compacted.max(1));
        }
        let replayed: Vec<ChangeSet> = log.replay(m.compacted.saturating_sub(1)).collect::<Result<_, _>>().unwrap();
        prop_assert_eq!(replayed, m.changes.values().cloned().collect::<Vec<_>>());
    }
}

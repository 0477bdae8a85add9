//! Property test: random registrations, drops, publishes and slow or stalled consumers against
//! a reference model. For every watcher the delivered stream must be exactly the model's
//! expected stream (ordered, unique, atomic per revision, filters and prev_kv respected), or a
//! gap-free prefix of it ended by a `Compacted` cancel: never a silent gap.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use proptest::prelude::*;
use watch_core::{
    CancelReason, ChangeSet, EngineConfig, Event, EventKind, KeySelector, KeyValue, MemoryHistory,
    MemoryHistoryLimits, Revision, WatchEngine, WatchError, WatchHandle, WatchMessage,
    WatchOptions,
};

const KEYS: &[&str] = &["a", "ab", "abc", "b", "ba", "c"];

fn selectors() -> Vec<KeySelector> {
    vec![
        KeySelector::key("a"),
        KeySelector::key("ab"),
        KeySelector::prefix("a"),
        KeySelector::prefix("ab"),
        KeySelector::prefix("b"),
        KeySelector::range("ab", "b"),
        KeySelector::from_key("b"),
        KeySelector::All,
    ]
}

#[derive(Debug, Clone)]
enum Op {
    Register {
        sel: usize,
        prev_kv: bool,
        no_put: bool,
        no_delete: bool,
        buffer: u32,
        back: Option<u64>,
    },
    Drop(usize),
    Publish(Vec<(usize, bool)>),
    Drain(usize, usize),
    Yield,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => (0..8usize, any::<bool>(), any::<bool>(), any::<bool>(), 1..4u32,
              proptest::option::of(0..12u64))
            .prop_map(|(sel, prev_kv, no_put, no_delete, buffer, back)| Op::Register {
                sel, prev_kv, no_put, no_delete, buffer, back
            }),
        1 => (0..16usize).prop_map(Op::Drop),
        6 => proptest::collection::vec((0..KEYS.len(), prop::bool::weighted(0.25)), 1..4).prop_map(Op::Publish),
        3 => (0..16usize, 0..6usize).prop_map(|(w, n)| Op::Drain(w, n)),
        2 => Just(Op::Yield),
    ]
}

/// What a watcher saw, in order: (revision, [(key, kind, prev value)]).
type Seen = Vec<(Revision, Vec<(Bytes, EventKind, Option<Bytes>)>)>;

struct Tracked {
    handle: Option<WatchHandle>,
    sel: KeySelector,
    opts: WatchOptions,
    /// First revision it should receive.
    from: Revision,
    seen: Seen,
    canceled: Option<CancelReason>,
}

fn record(t: &mut Tracked, msg: WatchMessage) {
    assert!(
        t.canceled.is_none(),
        "message after the terminal cancel: {msg:?}"
    );
    match msg {
        WatchMessage::Events(b) => t.seen.push((
            b.revision(),
            b.events()
                .map(|e| (e.kv.key.clone(), e.kind, e.prev_kv.map(|p| p.value.clone())))
                .collect(),
        )),
        WatchMessage::Progress { .. } => {}
        WatchMessage::Canceled(r) => t.canceled = Some(r),
        other => panic!("unknown message {other:?}"),
    }
}

fn expected(log: &[ChangeSet], t: &Tracked, upto: Revision) -> Seen {
    log.iter()
        .filter(|cs| cs.revision >= t.from && cs.revision <= upto)
        .filter_map(|cs| {
            let evs: Vec<_> = cs
                .events
                .iter()
                .filter(|e| t.sel.matches(e.key()))
                .filter(|e| match e.kind {
                    EventKind::Put => !t.opts.no_put,
                    EventKind::Delete => !t.opts.no_delete,
                })
                .map(|e| {
                    let prev = if t.opts.prev_kv {
                        e.prev_kv.as_ref().map(|p| p.value.clone())
                    } else {
                        None
                    };
                    (e.kv.key.clone(), e.kind, prev)
                })
                .collect();
            (!evs.is_empty()).then_some((cs.revision, evs))
        })
        .collect()
}

async fn run(ops: Vec<Op>, window: usize, external: bool) {
    let limits = MemoryHistoryLimits {
        max_changes: window,
        max_bytes: 1 << 20,
    };
    let ext = Arc::new(MemoryHistory::new(
        0,
        MemoryHistoryLimits {
            max_changes: 10_000,
            max_bytes: 1 << 30,
        },
    ));
    let (engine, dispatcher) = if external {
        WatchEngine::with_history(
            EngineConfig::default().recent(limits).catch_up_batch(2),
            ext.clone(),
        )
    } else {
        WatchEngine::new(EngineConfig::default().recent(limits))
    };
    tokio::spawn(dispatcher.run());
    let sels = selectors();
    let mut state: BTreeMap<Bytes, KeyValue> = BTreeMap::new();
    let mut log: Vec<ChangeSet> = Vec::new();
    let mut rev: Revision = 0;
    let mut watchers: Vec<Tracked> = Vec::new();

    for op in ops {
        match op {
            Op::Register {
                sel,
                prev_kv,
                no_put,
                no_delete,
                buffer,
                back,
            } => {
                let start = back.map(|b| rev.saturating_sub(b).max(1)).unwrap_or(0);
                let opts = WatchOptions::default()
                    .prev_kv(prev_kv)
                    .no_put(no_put)
                    .no_delete(no_delete)
                    .buffer(buffer)
                    .start_revision(start);
                match engine.watch(sels[sel].clone(), opts) {
                    Ok(h) => {
                        let from = if start == 0 {
                            h.created_revision() + 1
                        } else {
                            start
                        };
                        watchers.push(Tracked {
                            handle: Some(h),
                            sel: sels[sel].clone(),
                            opts,
                            from,
                            seen: Vec::new(),
                            canceled: None,
                        });
                    }
                    Err(WatchError::Compacted {
                        requested,
                        compact_revision,
                    }) => {
                        assert!(compact_revision > requested);
                    }
                    Err(e) => panic!("unexpected {e:?}"),
                }
            }
            Op::Drop(i) => {
                if let Some(t) = watchers.get_mut(i) {
                    t.handle = None;
                }
            }
            Op::Publish(keys) => {
                rev += 1;
                let mut events = Vec::new();
                let mut used = Vec::new();
                for (k, delete) in keys {
                    if used.contains(&k) {
                        continue;
                    }
                    used.push(k);
                    let key = Bytes::from_static(KEYS[k].as_bytes());
                    let prev = state.get(&key).cloned();
                    if delete {
                        if prev.is_some() {
                            state.remove(&key);
                            events.push(Event::delete(key, rev, prev));
                        }
                    } else {
                        let kv = KeyValue {
                            key: key.clone(),
                            value: Bytes::from(format!("v{rev}")),
                            create_revision: prev.as_ref().map_or(rev, |p| p.create_revision),
                            mod_revision: rev,
                            version: prev.as_ref().map_or(1, |p| p.version + 1),
                            lease: 0,
                        };
                        state.insert(key, kv.clone());
                        events.push(Event::put(kv, prev));
                    }
                }
                let cs = ChangeSet::new(rev, events);
                ext.append(Arc::new(cs.clone())).unwrap();
                engine.publish(cs.clone()).unwrap();
                log.push(cs);
            }
            Op::Drain(i, n) => {
                if let Some(t) = watchers.get_mut(i) {
                    for _ in 0..n {
                        let Some(msg) = t.handle.as_mut().and_then(|h| h.try_recv()) else {
                            break;
                        };
                        record(t, msg);
                    }
                }
            }
            Op::Yield => tokio::task::yield_now().await,
        }
    }

    for t in watchers.iter_mut() {
        let Some(mut h) = t.handle.take() else {
            continue;
        };
        if t.canceled.is_none() {
            // Barrier: a progress at `rev` proves every event up to `rev` was delivered.
            h.request_progress();
            loop {
                match h.recv().await {
                    Some(WatchMessage::Progress { revision }) if revision >= rev => break,
                    Some(WatchMessage::Progress { .. }) => h.request_progress(),
                    Some(msg) => {
                        let end = matches!(msg, WatchMessage::Canceled(_));
                        record(t, msg);
                        if end {
                            break;
                        }
                    }
                    None => panic!("stream ended without a cancel"),
                }
            }
        }
        let want = expected(&log, t, rev);
        match &t.canceled {
            None => assert_eq!(t.seen, want, "watcher {:?} {:?}", t.sel, t.opts),
            Some(CancelReason::Compacted { compact_revision }) => {
                assert!(
                    !external,
                    "external history holds everything, so no compaction cancel"
                );
                assert_eq!(
                    t.seen[..],
                    want[..t.seen.len()],
                    "delivered part must be a gap-free prefix"
                );
                let last = t.seen.last().map_or(t.from.saturating_sub(1), |s| s.0);
                assert!(
                    *compact_revision > last + 1,
                    "cancel only when history is really gone"
                );
            }
            Some(other) => panic!("unexpected cancel {other:?}"),
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn delivery_contract_holds(
        ops in proptest::collection::vec(op(), 1..120),
        window in 2..20usize,
        external in any::<bool>(),
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(run(ops, window, external));
    }
}

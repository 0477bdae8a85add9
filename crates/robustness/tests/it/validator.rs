//! The validator must catch each property it claims to check: a valid hand-made run passes,
//! and each single corruption of it is reported with the property's name.

use std::time::Duration;

use keywatch_robustness::record::{
    AckDetail, Event, EventKind, Kv, Outcome, Request, Response, RunRecord, Session, SessionEnd,
    WatchSpec, WatcherRecord, WriteRecord,
};
use keywatch_robustness::validate::validate;

fn kv(key: &str, value: &str, create: i64, modr: i64, version: i64) -> Kv {
    Kv {
        key: key.into(),
        value: value.into(),
        create_revision: create,
        mod_revision: modr,
        version,
        lease: 0,
    }
}

fn put_ev(k: Kv, prev: Option<Kv>) -> Event {
    Event {
        kind: EventKind::Put,
        kv: k,
        prev,
    }
}

fn del_ev(key: &str, rev: i64, prev: Option<Kv>) -> Event {
    Event {
        kind: EventKind::Delete,
        kv: kv(key, "", 0, rev, 0),
        prev,
    }
}

fn write(request: Request, outcome: Outcome) -> WriteRecord {
    WriteRecord {
        writer: 0,
        sent: Duration::ZERO,
        request,
        outcome,
    }
}

fn events(evs: Vec<Event>) -> Response {
    Response::Events {
        header_revision: 0,
        events: evs,
        compacted_before: 0,
        at: Duration::ZERO,
    }
}

/// put a=1 @2, put a=2 @3, delete a @4, put b=x @5 (its ack lost at a kill: unknown outcome);
/// one all-keys prev_kv watcher from revision 1 that saw everything and drained to 5.
fn valid() -> RunRecord {
    let a1 = kv("a", "1", 2, 2, 1);
    let a2 = kv("a", "2", 2, 3, 2);
    let writes = vec![
        write(
            Request::Put {
                key: "a".into(),
                value: "1".into(),
            },
            Outcome::Ack {
                revision: 2,
                detail: AckDetail::Put { prev: None },
            },
        ),
        write(
            Request::Put {
                key: "a".into(),
                value: "2".into(),
            },
            Outcome::Ack {
                revision: 3,
                detail: AckDetail::Put {
                    prev: Some(a1.clone()),
                },
            },
        ),
        write(
            Request::DeleteRange {
                key: "a".into(),
                range_end: Vec::new(),
            },
            Outcome::Ack {
                revision: 4,
                detail: AckDetail::DeleteRange {
                    prev: vec![a2.clone()],
                },
            },
        ),
        write(
            Request::Put {
                key: "b".into(),
                value: "x".into(),
            },
            Outcome::Unknown("connection reset".into()),
        ),
    ];
    let spec = WatchSpec {
        key: vec![0],
        range_end: vec![0],
        prev_kv: true,
        no_put: false,
        no_delete: false,
        progress_notify: false,
        initial_state: false,
    };
    let b = kv("b", "x", 5, 5, 1);
    let watcher = WatcherRecord {
        id: 0,
        spec,
        behaviour: "test".into(),
        reference: true,
        sessions: vec![
            Session {
                start_revision: 1,
                created_revision: Some(1),
                responses: vec![
                    events(vec![put_ev(a1.clone(), None)]),
                    events(vec![put_ev(a2.clone(), Some(a1))]),
                ],
                end: SessionEnd::Broken("killed".into()),
            },
            Session {
                start_revision: 4,
                created_revision: Some(5),
                responses: vec![
                    events(vec![del_ev("a", 4, Some(a2))]),
                    events(vec![put_ev(b.clone(), None)]),
                    Response::Progress { revision: 5 },
                ],
                end: SessionEnd::Drained(5),
            },
        ],
    };
    RunRecord {
        seed: 7,
        writes,
        watchers: vec![watcher],
        compactions: Vec::new(),
        final_range: Some((5, vec![b])),
        kills: 1,
    }
}

fn responses(run: &mut RunRecord, session: usize) -> &mut Vec<Response> {
    &mut run.watchers[0].sessions[session].responses
}

fn assert_violation(run: &RunRecord, property: &str) {
    let report = validate(run);
    assert!(
        report.violations.iter().any(|v| v.what.contains(property)),
        "expected a {property} violation, got {:?}",
        report.violations
    );
}

#[test]
fn a_valid_run_passes_and_resolves_the_unknown_write() {
    let report = validate(&valid());
    assert!(report.violations.is_empty(), "{:?}", report.violations);
    assert_eq!(report.unknown_applied, 1);
    assert_eq!(report.events_checked, 4);
}

#[test]
fn a_skipped_revision_is_a_gap() {
    let mut run = valid();
    responses(&mut run, 0).remove(1);
    // The resume point follows what was delivered.
    run.watchers[0].sessions[1].start_revision = 3;
    assert_violation(&run, "reliable");
}

#[test]
fn a_duplicate_is_caught() {
    let mut run = valid();
    let again = responses(&mut run, 0)[1].clone();
    responses(&mut run, 0).push(again);
    assert_violation(&run, "ordered/unique");
}

#[test]
fn a_resume_at_the_wrong_revision_is_caught() {
    let mut run = valid();
    run.watchers[0].sessions[1].start_revision = 5;
    assert_violation(&run, "resumable");
}

#[test]
fn a_wrong_prev_kv_is_caught() {
    let mut run = valid();
    if let Response::Events { events, .. } = &mut responses(&mut run, 0)[1] {
        events[0].prev = Some(kv("a", "other", 2, 2, 1));
    }
    assert_violation(&run, "prev_kv");
    // Absent is accepted only at or below a compaction.
    let mut run = valid();
    if let Response::Events { events, .. } = &mut responses(&mut run, 0)[1] {
        events[0].prev = None;
    }
    assert_violation(&run, "prev_kv");
    if let Response::Events {
        compacted_before, ..
    } = &mut responses(&mut run, 0)[1]
    {
        *compacted_before = 3;
    }
    assert!(validate(&run).violations.is_empty());
}

#[test]
fn progress_before_its_events_is_caught() {
    let mut run = valid();
    responses(&mut run, 1).insert(0, Response::Progress { revision: 5 });
    assert_violation(&run, "bookmarkable");
}

#[test]
fn a_split_revision_is_not_atomic() {
    let mut run = valid();
    let txn_a = kv("a", "1", 2, 2, 1);
    // A txn at 2 that wrote a and c, delivered in two responses.
    run.writes[0] = write(
        Request::Txn {
            compare: Vec::new(),
            success: vec![
                keywatch_robustness::record::TxnOp::Put {
                    key: "a".into(),
                    value: "1".into(),
                },
                keywatch_robustness::record::TxnOp::Put {
                    key: "c".into(),
                    value: "9".into(),
                },
            ],
            failure: Vec::new(),
        },
        Outcome::Ack {
            revision: 2,
            detail: AckDetail::Txn {
                succeeded: true,
                results: vec![
                    keywatch_robustness::record::TxnOpResult::Put { prev: None },
                    keywatch_robustness::record::TxnOpResult::Put { prev: None },
                ],
            },
        },
    );
    run.final_range = Some((5, vec![kv("b", "x", 5, 5, 1), kv("c", "9", 2, 2, 1)]));
    responses(&mut run, 0)[0] = events(vec![put_ev(txn_a, None)]);
    responses(&mut run, 0).insert(1, events(vec![put_ev(kv("c", "9", 2, 2, 1), None)]));
    assert_violation(&run, "atomic");
}

#[test]
fn filters_and_is_create_are_checked() {
    let mut run = valid();
    run.watchers[0].spec.no_put = true;
    run.watchers[0].reference = false;
    // Keep a reference that saw everything, so the history still resolves.
    let mut reference = valid().watchers.remove(0);
    reference.id = 1;
    run.watchers.push(reference);
    assert_violation(&run, "filter");

    let mut run = valid();
    if let Response::Events { events, .. } = &mut responses(&mut run, 0)[1] {
        events[0].kv.version = 1;
    }
    assert_violation(&run, "is-create");
}

#[test]
fn a_lost_acknowledged_write_is_caught() {
    let mut run = valid();
    run.final_range = Some((5, vec![kv("a", "2", 2, 3, 2), kv("b", "x", 5, 5, 1)]));
    assert_violation(&run, "durability");
    // Or its revision reused by another acknowledged write.
    let mut run = valid();
    run.writes[3].outcome = Outcome::Ack {
        revision: 3,
        detail: AckDetail::Put { prev: None },
    };
    assert_violation(&run, "durability");
}

#[test]
fn a_watcher_that_never_catches_up_is_caught() {
    let mut run = valid();
    run.watchers[0].sessions[1].end = SessionEnd::Closed;
    responses(&mut run, 1).pop();
    assert_violation(&run, "never caught up");
}

fn leased(key: &str, value: &str, create: i64, modr: i64, version: i64, lease: i64) -> Kv {
    Kv {
        lease,
        ..kv(key, value, create, modr, version)
    }
}

/// Lease 9: c @2 and d @3 attached, then both deleted at 4 by its expiry (no write claims 4);
/// the reference watcher saw it all and drained to 4.
fn lease_run() -> RunRecord {
    let c = leased("c", "1", 2, 2, 1, 9);
    let d = leased("d", "1", 3, 3, 1, 9);
    let lease_put = |key: &str, rev: i64| {
        write(
            Request::LeasePut {
                key: key.into(),
                value: "1".into(),
                lease: 9,
            },
            Outcome::Ack {
                revision: rev,
                detail: AckDetail::Put { prev: None },
            },
        )
    };
    let watcher = WatcherRecord {
        id: 0,
        spec: WatchSpec {
            key: vec![0],
            range_end: vec![0],
            prev_kv: true,
            no_put: false,
            no_delete: false,
            progress_notify: false,
            initial_state: false,
        },
        behaviour: "test".into(),
        reference: true,
        sessions: vec![Session {
            start_revision: 1,
            created_revision: Some(1),
            responses: vec![
                events(vec![put_ev(c.clone(), None)]),
                events(vec![put_ev(d.clone(), None)]),
                events(vec![del_ev("c", 4, Some(c)), del_ev("d", 4, Some(d))]),
                Response::Progress { revision: 4 },
            ],
            end: SessionEnd::Drained(4),
        }],
    };
    RunRecord {
        seed: 9,
        writes: vec![lease_put("c", 2), lease_put("d", 3)],
        watchers: vec![watcher],
        compactions: Vec::new(),
        final_range: Some((4, Vec::new())),
        kills: 0,
    }
}

#[test]
fn a_lease_expiry_is_one_revision_of_all_its_keys() {
    let report = validate(&lease_run());
    assert!(report.violations.is_empty(), "{:?}", report.violations);
    assert_eq!(report.lease_ends, 1);

    // The lease's keys split over two revisions: neither is a whole lease, nor a write.
    let mut run = lease_run();
    let c = leased("c", "1", 2, 2, 1, 9);
    let d = leased("d", "1", 3, 3, 1, 9);
    responses(&mut run, 0)[2] = events(vec![del_ev("c", 4, Some(c))]);
    responses(&mut run, 0).insert(3, events(vec![del_ev("d", 5, Some(d))]));
    responses(&mut run, 0)[4] = Response::Progress { revision: 5 };
    run.watchers[0].sessions[0].end = SessionEnd::Drained(5);
    run.final_range = Some((5, Vec::new()));
    assert_violation(&run, "match no write");

    // A key attached to the lease after its expiry.
    let mut run = lease_run();
    run.writes.push(write(
        Request::LeasePut {
            key: "e".into(),
            value: "2".into(),
            lease: 9,
        },
        Outcome::Ack {
            revision: 5,
            detail: AckDetail::Put { prev: None },
        },
    ));
    let e = leased("e", "2", 5, 5, 1, 9);
    responses(&mut run, 0)[3] = events(vec![put_ev(e.clone(), None)]);
    responses(&mut run, 0).push(Response::Progress { revision: 5 });
    run.watchers[0].sessions[0].end = SessionEnd::Drained(5);
    run.final_range = Some((5, vec![e]));
    assert_violation(&run, "lease:");
}

/// `lease_run` where the deletion at 4 is an acknowledged revoke whose response carried
/// `ack_revision`.
fn revoked_run(ack_revision: i64) -> RunRecord {
    let mut run = lease_run();
    run.writes.push(write(
        Request::Revoke { lease: 9 },
        Outcome::Ack {
            revision: ack_revision,
            detail: AckDetail::Revoke,
        },
    ));
    run
}

#[test]
fn an_acknowledged_revoke_has_deleted_its_keys() {
    let report = validate(&revoked_run(4));
    assert!(report.violations.is_empty(), "{:?}", report.violations);
    assert_eq!(report.lease_ends, 1);

    // Acknowledged at 3, but its keys were only deleted at 4.
    assert_violation(&revoked_run(3), "deleted later, at revision 4");

    // A key still attached to the revoked lease in the final range (the server kept it).
    let mut run = revoked_run(4);
    run.final_range = Some((4, vec![leased("d", "1", 3, 3, 1, 9)]));
    assert_violation(&run, "still carries lease 9");
}

/// `valid()` plus a watcher with keywatch's `initial_state`: created at 3, it lists `a = 2`
/// (the state at 3), then gets the delete at 4 and the put at 5.
fn with_listing() -> RunRecord {
    let mut run = valid();
    let a2 = kv("a", "2", 2, 3, 2);
    run.watchers.push(WatcherRecord {
        id: 1,
        spec: WatchSpec {
            key: vec![0],
            range_end: vec![0],
            prev_kv: false,
            no_put: false,
            no_delete: false,
            progress_notify: false,
            initial_state: true,
        },
        behaviour: "test".into(),
        reference: false,
        sessions: vec![Session {
            start_revision: 0,
            created_revision: Some(3),
            responses: vec![
                Response::Initial {
                    revision: 3,
                    kvs: vec![a2],
                },
                events(vec![del_ev("a", 4, None)]),
                events(vec![put_ev(kv("b", "x", 5, 5, 1), None)]),
                Response::Progress { revision: 5 },
            ],
            end: SessionEnd::Drained(5),
        }],
    });
    run
}

#[test]
fn an_initial_state_listing_is_the_models_state_at_its_revision() {
    let report = validate(&with_listing());
    assert!(report.violations.is_empty(), "{:?}", report.violations);
    assert_eq!(report.initial_checked, 1);

    // The value of an older revision listed.
    let mut run = with_listing();
    run.watchers[1].sessions[0].responses[0] = Response::Initial {
        revision: 3,
        kvs: vec![kv("a", "1", 2, 2, 1)],
    };
    assert_violation(&run, "initial state");

    // A key missing from the listing.
    let mut run = with_listing();
    run.watchers[1].sessions[0].responses[0] = Response::Initial {
        revision: 3,
        kvs: Vec::new(),
    };
    assert_violation(&run, "initial state");

    // A listing at another revision than the created one.
    let mut run = with_listing();
    run.watchers[1].sessions[0].responses[0] = Response::Initial {
        revision: 2,
        kvs: vec![kv("a", "1", 2, 2, 1)],
    };
    assert_violation(&run, "initial state");
}

//! The offline validator: rebuilds the true history from the acknowledged writes (resolving
//! writes whose outcome is unknown from the reference watcher), then checks every watcher
//! against it with etcd's robustness properties (`tests/robustness/validate/watch.go`):
//! Ordered, Unique, Atomic, Reliable, Resumable, Bookmarkable (progress), prev_kv, IsCreate
//! and filters; plus durability: every acknowledged write keeps its revision across kills and
//! the final state equals the model; plus leases: a lease's end deletes all its keys in one
//! revision, no key attaches to an ended lease, an acknowledged revoke's delete revision is at
//! most its response's revision, and no final key carries an acknowledged-revoked lease.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;

use crate::model::Model;
use crate::record::{
    Event, EventKind, Kv, Outcome, Response, RunRecord, SessionEnd, WatchSpec, WatcherRecord,
};

/// One broken property.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// The watcher concerned, if any.
    pub watcher: Option<usize>,
    /// Which property and a minimal description.
    pub what: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.watcher {
            Some(w) => write!(f, "watcher {w}: {}", self.what),
            None => write!(f, "{}", self.what),
        }
    }
}

/// The validator's verdict and counts.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Every violation found (empty: the run is valid).
    pub violations: Vec<Violation>,
    /// Final revision.
    pub final_revision: i64,
    /// Acknowledged writes.
    pub acked: usize,
    /// Writes whose outcome was unknown.
    pub unknown: usize,
    /// Of those, how many turned out to have happened.
    pub unknown_applied: usize,
    /// Events checked against the model across all watchers.
    pub events_checked: usize,
    /// Progress notifications checked.
    pub progress_checked: usize,
    /// Key-values of `initial_state` listings checked against the model's state.
    pub initial_checked: usize,
    /// Sessions ended by a compaction cancel.
    pub compacted_cancels: usize,
    /// Revisions that were a lease's expiry or revoke (all its keys, one revision).
    pub lease_ends: usize,
}

/// Most violations reported per run (the first ones explain the rest).
const MAX_VIOLATIONS: usize = 20;

/// Validates one recorded run.
pub fn validate(run: &RunRecord) -> Report {
    let mut report = Report::default();
    let mut v = Vec::new();

    // 1. Which acknowledged write claims which revision.
    let mut claims: BTreeMap<i64, usize> = BTreeMap::new();
    let mut unknown: Vec<usize> = Vec::new();
    for (i, w) in run.writes.iter().enumerate() {
        match &w.outcome {
            Outcome::Ack { revision, detail } => {
                report.acked += 1;
                if detail.writes()
                    && let Some(other) = claims.insert(*revision, i)
                {
                    v.push(violation(
                        None,
                        format!(
                            "durability: writes #{other} and #{i} were both acknowledged at \
                                 revision {revision} (an acknowledged write was lost and its \
                                 revision reused)"
                        ),
                    ));
                }
            }
            Outcome::Unknown(_) => unknown.push(i),
            Outcome::Refused(_) => {}
        }
    }
    report.unknown = unknown.len();

    // 2. What the reference watcher saw, per revision.
    let mut reference: BTreeMap<i64, Vec<&Event>> = BTreeMap::new();
    for w in run.watchers.iter().filter(|w| w.reference) {
        for s in &w.sessions {
            for r in &s.responses {
                if let Response::Events { events, .. } = r {
                    for e in events {
                        let slot = reference.entry(e.kv.mod_revision).or_default();
                        if !slot.contains(&e) {
                            slot.push(e);
                        }
                    }
                }
            }
        }
    }

    let last_claim = claims.keys().next_back().copied().unwrap_or(1);
    let final_revision = run.final_range.as_ref().map_or(last_claim, |f| f.0);
    report.final_revision = final_revision;
    if last_claim > final_revision {
        v.push(violation(
            None,
            format!(
                "durability: a write was acknowledged at revision {last_claim} but the server \
                 came back at revision {final_revision}"
            ),
        ));
    }

    // The revisions whose state an `initial_state` session listed: the model's state is kept
    // at each (`states[R]`) during the replay.
    let listed: HashSet<i64> = run
        .watchers
        .iter()
        .flat_map(|w| &w.sessions)
        .flat_map(|s| &s.responses)
        .filter_map(|r| match r {
            Response::Initial { revision, .. } => Some(*revision),
            _ => None,
        })
        .collect();
    let mut states: HashMap<i64, Vec<Kv>> = HashMap::new();

    // 3. Replay in revision order.
    let mut model = Model::default();
    let mut history: BTreeMap<i64, Vec<Event>> = BTreeMap::new();
    let mut used: HashSet<usize> = HashSet::new();
    // Lease -> the revision that deleted its keys (its expiry or revoke).
    let mut lease_end: HashMap<i64, i64> = HashMap::new();
    let mut known_until = final_revision;
    for rev in 2..=final_revision + 1 {
        // The model holds the state at `rev - 1` here.
        if listed.contains(&(rev - 1)) {
            states.insert(rev - 1, model.state.values().cloned().collect());
        }
        if rev > final_revision {
            break;
        }
        if let Some(&i) = claims.get(&rev) {
            let w = &run.writes[i];
            if let crate::record::Request::LeasePut { lease, .. } = &w.request
                && model.dead.contains(lease)
            {
                v.push(violation(
                    None,
                    format!(
                        "lease: write #{i} attached a key to lease {lease} at revision {rev}, \
                         after that lease's keys were deleted by its expiry or revoke"
                    ),
                ));
            }
            let applied = model.apply(&w.request, rev);
            if let Outcome::Ack { detail, .. } = &w.outcome
                && *detail != applied.expected
            {
                v.push(violation(
                    None,
                    format!(
                        "linearizability: write #{i} {:?} acknowledged at revision {rev} \
                         answered {detail:?}, the model expects {:?}",
                        w.request, applied.expected
                    ),
                ));
            }
            history.insert(rev, applied.events);
            continue;
        }
        let Some(seen) = reference.get(&rev) else {
            v.push(violation(
                None,
                format!(
                    "revision {rev}: no acknowledged write claims it and the reference watcher \
                     saw no event at it (validation stops at revision {})",
                    rev - 1
                ),
            ));
            known_until = rev - 1;
            break;
        };
        let found = unknown.iter().copied().find(|i| {
            if used.contains(i) {
                return false;
            }
            let mut m = model.clone();
            let applied = m.apply(&run.writes[*i].request, rev);
            same_events(&applied.events, seen)
        });
        // Not a write of the runner: then it must be a lease's expiry or revoke.
        let ending = seen
            .first()
            .and_then(|e| model.state.get(&e.kv.key))
            .map(|kv| kv.lease);
        let ended = match found {
            Some(_) => None,
            None => model.end_lease(rev, seen),
        };
        if let Some(events) = ended {
            if let Some(lease) = ending {
                lease_end.insert(lease, rev);
            }
            report.lease_ends += 1;
            history.insert(rev, events);
            continue;
        }
        match found {
            Some(i) => {
                used.insert(i);
                let applied = model.apply(&run.writes[i].request, rev);
                history.insert(rev, applied.events);
            }
            None => {
                v.push(violation(
                    None,
                    format!(
                        "revision {rev}: the events {:?} match no write the runner issued \
                         nor a whole lease's keys (model: {:?}; server prev_kv: {:?}; \
                         validation stops at revision {})",
                        seen.iter().map(|e| short(e)).collect::<Vec<_>>(),
                        seen.iter()
                            .map(|e| model.state.get(&e.kv.key))
                            .collect::<Vec<_>>(),
                        seen.iter().map(|e| e.prev.as_ref()).collect::<Vec<_>>(),
                        rev - 1
                    ),
                ));
                known_until = rev - 1;
                break;
            }
        }
    }
    report.unknown_applied = used.len();

    // 4. The final state after the last restart.
    if let Some((frev, kvs)) = &run.final_range
        && known_until == *frev
    {
        let expected: Vec<_> = model.state.values().cloned().collect();
        if expected != *kvs {
            let diff = expected
                .iter()
                .zip(kvs.iter())
                .find(|(a, b)| a != b)
                .map(|(a, b)| format!("model {a:?}, server {b:?}"))
                .unwrap_or_else(|| {
                    format!("model has {} keys, server {}", expected.len(), kvs.len())
                });
            v.push(violation(
                None,
                format!("durability: final range at revision {frev} differs: {diff}"),
            ));
        }
    }

    // 4b. Every acknowledged revoke: its keys were deleted at or before the revision its
    // response carried, and none of them is left attached to it at the end.
    for (i, w) in run.writes.iter().enumerate() {
        let (crate::record::Request::Revoke { lease }, Outcome::Ack { revision, .. }) =
            (&w.request, &w.outcome)
        else {
            continue;
        };
        if let Some(&deleted) = lease_end.get(lease)
            && deleted > *revision
        {
            v.push(violation(
                None,
                format!(
                    "lease: revoke #{i} of lease {lease} was acknowledged at revision \
                     {revision} but its keys were deleted later, at revision {deleted}"
                ),
            ));
        }
        if let Some((frev, kvs)) = &run.final_range
            && let Some(kv) = kvs.iter().find(|kv| kv.lease == *lease)
        {
            v.push(violation(
                None,
                format!(
                    "lease: key {} still carries lease {lease} at the final revision {frev}, \
                     after revoke #{i} of that lease was acknowledged at revision {revision}",
                    String::from_utf8_lossy(&kv.key)
                ),
            ));
        }
    }

    // 5. Every watcher.
    for w in &run.watchers {
        check_watcher(
            w,
            &history,
            &states,
            known_until,
            final_revision,
            &mut report,
            &mut v,
        );
    }
    v.truncate(MAX_VIOLATIONS);
    report.violations = v;
    report
}

fn violation(watcher: Option<usize>, what: String) -> Violation {
    Violation { watcher, what }
}

fn short(e: &Event) -> String {
    format!(
        "{:?} {}@{} v{}",
        e.kind,
        String::from_utf8_lossy(&e.kv.key),
        e.kv.mod_revision,
        e.kv.version
    )
}

fn same_events(model: &[Event], seen: &[&Event]) -> bool {
    model.len() == seen.len()
        && model
            .iter()
            .zip(seen)
            .all(|(a, b)| a.kind == b.kind && a.kv == b.kv)
}

fn selected<'a>(spec: &WatchSpec, events: &'a [Event]) -> Vec<&'a Event> {
    events
        .iter()
        .filter(|e| {
            spec.matches_key(&e.kv.key)
                && !(spec.no_put && e.kind == EventKind::Put)
                && !(spec.no_delete && e.kind == EventKind::Delete)
        })
        .collect()
}

/// The first revision in `(after, upto]` with events the watcher should have received.
fn first_expected(
    spec: &WatchSpec,
    history: &BTreeMap<i64, Vec<Event>>,
    after: i64,
    upto: i64,
) -> Option<i64> {
    if upto <= after {
        return None;
    }
    history
        .range(after + 1..=upto)
        .find(|(_, evs)| !selected(spec, evs).is_empty())
        .map(|(r, _)| *r)
}

fn check_watcher(
    w: &WatcherRecord,
    history: &BTreeMap<i64, Vec<Event>>,
    states: &HashMap<i64, Vec<Kv>>,
    known_until: i64,
    final_revision: i64,
    report: &mut Report,
    v: &mut Vec<Violation>,
) {
    let spec = &w.spec;
    let me = Some(w.id);
    let mut resume_at: Option<i64> = None;
    let mut finished = false;
    for (si, s) in w.sessions.iter().enumerate() {
        if finished {
            v.push(violation(
                me,
                format!("session {si} after the watcher ended"),
            ));
            return;
        }
        // An `initial_state` session lists again instead of resuming (start revision 0).
        if let Some(expected) = resume_at.filter(|_| !spec.initial_state)
            && s.start_revision != expected
        {
            v.push(violation(
                me,
                format!(
                    "resumable: session {si} resumed at {} but everything up to {} was delivered",
                    s.start_revision,
                    expected - 1
                ),
            ));
            return;
        }
        let Some(created) = s.created_revision else {
            // Never created (the stream broke first): the next session starts at the same place.
            resume_at = Some(s.start_revision).filter(|r| *r > 0);
            if let SessionEnd::Refused(reason) = &s.end {
                v.push(violation(me, format!("create refused: {reason}")));
                return;
            }
            continue;
        };
        let start = if s.start_revision > 0 {
            s.start_revision
        } else {
            created + 1
        };
        // Every selected event at or below `covered` has been delivered.
        let mut covered = start - 1;
        let mut canceled = false;
        for resp in &s.responses {
            if canceled {
                v.push(violation(
                    me,
                    format!("session {si}: a response after its cancel"),
                ));
                return;
            }
            match resp {
                Response::Events {
                    events,
                    compacted_before,
                    ..
                } => {
                    // Group by revision, keeping order.
                    let mut groups: Vec<(i64, Vec<&Event>)> = Vec::new();
                    for e in events {
                        let r = e.kv.mod_revision;
                        match groups.last_mut() {
                            Some((last, g)) if *last == r => g.push(e),
                            _ => groups.push((r, vec![e])),
                        }
                    }
                    for (rev, got) in groups {
                        if rev <= covered {
                            v.push(violation(
                                me,
                                format!(
                                    "ordered/unique: session {si} got an event at revision \
                                     {rev} after everything up to {covered} (duplicate, out \
                                     of order, or split across responses)"
                                ),
                            ));
                            return;
                        }
                        if rev > known_until {
                            covered = rev;
                            continue;
                        }
                        if let Some(q) = first_expected(spec, history, covered, rev - 1) {
                            v.push(violation(
                                me,
                                format!(
                                    "reliable: session {si} skipped revision {q} (next \
                                     delivered {rev}, start {start})"
                                ),
                            ));
                            return;
                        }
                        let want = history
                            .get(&rev)
                            .map(|h| selected(spec, h))
                            .unwrap_or_default();
                        if let Err(what) = same_delivery(spec, &want, &got, rev, *compacted_before)
                        {
                            v.push(violation(
                                me,
                                format!("session {si}: revision {rev}: {what}"),
                            ));
                            return;
                        }
                        report.events_checked += got.len();
                        covered = rev;
                    }
                }
                Response::Initial { revision, kvs } => {
                    if !spec.initial_state || *revision != created || covered != created {
                        v.push(violation(
                            me,
                            format!(
                                "initial state: session {si} got a listing at {revision} \
                                 (created at {created}, covered {covered})"
                            ),
                        ));
                        return;
                    }
                    if *revision > known_until {
                        continue;
                    }
                    let want: Vec<&Kv> = states
                        .get(revision)
                        .map(|s| {
                            s.iter()
                                .filter(|kv| spec.matches_key(&kv.key) && !spec.no_put)
                                .collect()
                        })
                        .unwrap_or_default();
                    let got: Vec<&Kv> = kvs.iter().collect();
                    if want != got {
                        v.push(violation(
                            me,
                            format!(
                                "initial state: session {si} listed {} keys at {revision}, \
                                 the model has {} (first difference: {:?})",
                                got.len(),
                                want.len(),
                                want.iter().zip(&got).find(|(a, b)| a != b)
                            ),
                        ));
                        return;
                    }
                    report.initial_checked += kvs.len();
                }
                Response::Progress { revision } => {
                    report.progress_checked += 1;
                    if *revision > covered {
                        let upto = (*revision).min(known_until);
                        if let Some(q) = first_expected(spec, history, covered, upto) {
                            v.push(violation(
                                me,
                                format!(
                                    "bookmarkable: session {si} got progress at {revision} \
                                     before the events at revision {q}"
                                ),
                            ));
                            return;
                        }
                        covered = *revision;
                    }
                }
                Response::Canceled {
                    compact_revision,
                    reason,
                } => {
                    canceled = true;
                    if *compact_revision <= 0 {
                        v.push(violation(
                            me,
                            format!("session {si}: canceled without a compact revision ({reason})"),
                        ));
                        return;
                    }
                    report.compacted_cancels += 1;
                }
            }
        }
        match &s.end {
            SessionEnd::Drained(f) if covered < *f => v.push(violation(
                me,
                format!("session {si}: drained to {f} but only {covered} is covered"),
            )),
            SessionEnd::Drained(_) => finished = true,
            SessionEnd::Canceled => finished = true,
            _ => {}
        }
        if canceled {
            finished = true;
        }
        resume_at = Some(covered + 1);
    }
    if !finished {
        v.push(violation(
            me,
            format!(
                "reliable: never caught up to the final revision {final_revision} (no progress \
                 notification covered it before the run ended)"
            ),
        ));
    }
}

fn same_delivery(
    spec: &WatchSpec,
    want: &[&Event],
    got: &[&Event],
    rev: i64,
    compacted_before: i64,
) -> Result<(), String> {
    for e in got {
        if spec.no_put && e.kind == EventKind::Put {
            return Err(format!("filter: NOPUT watch got {}", short(e)));
        }
        if spec.no_delete && e.kind == EventKind::Delete {
            return Err(format!("filter: NODELETE watch got {}", short(e)));
        }
        if e.kind == EventKind::Put
            && (e.kv.version == 1) != (e.kv.create_revision == e.kv.mod_revision)
        {
            return Err(format!(
                "is-create: {} has version {} but create {} / mod {}",
                short(e),
                e.kv.version,
                e.kv.create_revision,
                e.kv.mod_revision
            ));
        }
    }
    if want.len() != got.len() {
        return Err(format!(
            "atomic: expected {:?} in one response, got {:?}",
            want.iter().map(|e| short(e)).collect::<Vec<_>>(),
            got.iter().map(|e| short(e)).collect::<Vec<_>>()
        ));
    }
    for (w, g) in want.iter().zip(got) {
        if w.kind != g.kind || w.kv != g.kv {
            return Err(format!(
                "event {} but the history has {}",
                short(g),
                short(w)
            ));
        }
        match (&w.prev, &g.prev, spec.prev_kv) {
            (_, Some(_), false) => {
                return Err(format!("prev_kv: {} carries prev_kv unasked", short(g)));
            }
            (_, None, false) => {}
            (Some(p), Some(q), true) if p == q => {}
            (None, None, true) => {}
            (Some(_), None, true) if rev <= compacted_before => {}
            (p, q, true) => {
                return Err(format!(
                    "prev_kv: {} has prev {q:?}, true previous {p:?}",
                    short(g)
                ));
            }
        }
    }
    Ok(())
}

//! The change set the crash child writes at each revision, so the parent can check every
//! acknowledged one byte for byte. Shared by the child binary and the tests via `#[path]`.
#![allow(unreachable_pub)]

use watch_core::{ChangeSet, Event, KeyValue, Revision};

/// A deterministic change set for `rev`: one or two events, ~200-byte values, a prev_kv on the
/// second event.
pub fn change_set(rev: Revision) -> ChangeSet {
    let kv = |key: String, value: String| KeyValue {
        key: key.into(),
        value: value.into(),
        create_revision: rev,
        mod_revision: rev,
        version: 1,
        lease: 0,
    };
    let mut events = vec![Event::put(
        kv(format!("/crash/{}", rev % 97), format!("{rev:0>200}")),
        None,
    )];
    if rev.is_multiple_of(3) {
        let prev = kv(format!("/other/{rev}"), "old".into());
        events.push(Event::delete(
            format!("/other/{rev}").into(),
            rev,
            Some(prev),
        ));
    }
    ChangeSet::new(rev, events)
}

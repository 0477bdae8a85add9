//! watch-core values to etcd wire messages. Infallible: every core value has a wire form.

use watch_core::{Event, EventBatch, EventKind, KeyValue, Revision, WatchEvent};

use crate::etcdserverpb::{ResponseHeader, WatchResponse};
use crate::mvccpb;
use crate::mvccpb::event::EventType;

/// A core revision as etcd's `int64`. Revisions above `i64::MAX` (never reached by a store
/// that counts up from 1) saturate to `i64::MAX` rather than wrapping to a negative number,
/// which a client would read as "no revision" or an error.
pub fn revision(rev: Revision) -> i64 {
    i64::try_from(rev).unwrap_or(i64::MAX)
}

/// A core key-value as `mvccpb.KeyValue`, every field copied (payloads are shared, not copied).
pub fn key_value(kv: &KeyValue) -> mvccpb::KeyValue {
    mvccpb::KeyValue {
        key: kv.key.clone(),
        create_revision: revision(kv.create_revision),
        mod_revision: revision(kv.mod_revision),
        // Versions count writes to one key, so they saturate like revisions.
        version: revision(kv.version),
        value: kv.value.clone(),
        lease: kv.lease,
    }
}

impl From<&KeyValue> for mvccpb::KeyValue {
    fn from(kv: &KeyValue) -> Self {
        key_value(kv)
    }
}

impl From<KeyValue> for mvccpb::KeyValue {
    fn from(kv: KeyValue) -> Self {
        key_value(&kv)
    }
}

/// The wire event type of a core event kind.
pub fn event_type(kind: EventKind) -> EventType {
    match kind {
        EventKind::Put => EventType::Put,
        EventKind::Delete => EventType::Delete,
    }
}

/// An event as the engine or an embedder holds it: borrowed parts, so both owned
/// [`Event`]s and the engine's borrowed [`WatchEvent`]s convert without a copy.
pub trait EventView {
    /// Put or delete.
    fn kind(&self) -> EventKind;
    /// The key after the change.
    fn kv(&self) -> &KeyValue;
    /// The key before the change, if known.
    fn prev_kv(&self) -> Option<&KeyValue>;
}

impl EventView for Event {
    fn kind(&self) -> EventKind {
        self.kind
    }
    fn kv(&self) -> &KeyValue {
        &self.kv
    }
    fn prev_kv(&self) -> Option<&KeyValue> {
        self.prev_kv.as_ref()
    }
}

impl EventView for WatchEvent<'_> {
    fn kind(&self) -> EventKind {
        self.kind
    }
    fn kv(&self) -> &KeyValue {
        self.kv
    }
    fn prev_kv(&self) -> Option<&KeyValue> {
        self.prev_kv
    }
}

impl<T: EventView + ?Sized> EventView for &T {
    fn kind(&self) -> EventKind {
        (**self).kind()
    }
    fn kv(&self) -> &KeyValue {
        (**self).kv()
    }
    fn prev_kv(&self) -> Option<&KeyValue> {
        (**self).prev_kv()
    }
}

/// One event as `mvccpb.Event`, with its `prev_kv` only when `with_prev_kv` is set.
///
/// A DELETE is sent in etcd's shape whatever the core kv holds: only `key` and `mod_revision`
/// (the revision of the delete) are set, every other field is zero or empty. Clients rely on
/// `version == 0` and an empty value to recognise a deletion's kv.
pub fn event<E: EventView + ?Sized>(ev: &E, with_prev_kv: bool) -> mvccpb::Event {
    let kv = ev.kv();
    let wire_kv = match ev.kind() {
        EventKind::Put => key_value(kv),
        EventKind::Delete => mvccpb::KeyValue {
            key: kv.key.clone(),
            mod_revision: revision(kv.mod_revision),
            ..mvccpb::KeyValue::default()
        },
    };
    mvccpb::Event {
        r#type: event_type(ev.kind()).into(),
        kv: Some(wire_kv),
        prev_kv: if with_prev_kv {
            ev.prev_kv().map(key_value)
        } else {
            None
        },
    }
}

impl From<&Event> for mvccpb::Event {
    /// Keeps `prev_kv` when the event has one; use [`event`] to drop it.
    fn from(ev: &Event) -> Self {
        event(ev, true)
    }
}

impl From<Event> for mvccpb::Event {
    /// Keeps `prev_kv` when the event has one; use [`event`] to drop it.
    fn from(ev: Event) -> Self {
        event(&ev, true)
    }
}

/// The `events` of a `WatchResponse`, in the given order, with `prev_kv` kept only when the
/// watcher asked for it (`WatchCreateRequest.prev_kv`).
pub fn watch_events<I>(events: I, prev_kv: bool) -> Vec<mvccpb::Event>
where
    I: IntoIterator,
    I::Item: EventView,
{
    events.into_iter().map(|e| event(&e, prev_kv)).collect()
}

/// The `events` of a `WatchResponse` for one engine batch (one revision of one watcher).
pub fn batch_events(batch: &EventBatch, prev_kv: bool) -> Vec<mvccpb::Event> {
    let mut out = Vec::with_capacity(batch.len());
    out.extend(batch.events().map(|e| event(&e, prev_kv)));
    out
}

/// The `WatchResponse` carrying one engine batch to watch `watch_id`.
///
/// `header` is always set, as the Go client dereferences it unconditionally; the caller
/// chooses its revision (etcd sends the batch's revision for a live watcher and the current
/// store revision during catch-up).
pub fn events_response(
    header: ResponseHeader,
    watch_id: i64,
    batch: &EventBatch,
    prev_kv: bool,
) -> WatchResponse {
    WatchResponse {
        header: Some(header),
        watch_id,
        events: batch_events(batch, prev_kv),
        ..WatchResponse::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::from_proto;

    fn kv(key: &'static str, value: &'static str, rev: Revision, version: u64) -> KeyValue {
        KeyValue {
            key: key.into(),
            value: value.into(),
            create_revision: 2,
            mod_revision: rev,
            version,
            lease: 7,
        }
    }

    #[test]
    fn key_value_round_trip() {
        let core = kv("a", "1", 5, 3);
        let wire = mvccpb::KeyValue::from(&core);
        assert_eq!(
            wire,
            mvccpb::KeyValue {
                key: "a".into(),
                create_revision: 2,
                mod_revision: 5,
                version: 3,
                value: "1".into(),
                lease: 7,
            }
        );
        assert_eq!(KeyValue::try_from(wire).unwrap(), core);
    }

    #[test]
    fn revisions_saturate() {
        assert_eq!(revision(0), 0);
        assert_eq!(revision(i64::MAX as u64), i64::MAX);
        assert_eq!(revision(u64::MAX), i64::MAX);
        let wire = key_value(&KeyValue {
            mod_revision: u64::MAX,
            version: u64::MAX,
            ..kv("a", "", 0, 0)
        });
        assert_eq!((wire.mod_revision, wire.version), (i64::MAX, i64::MAX));
    }

    #[test]
    fn put_round_trip_with_and_without_prev_kv() {
        let ev = Event::put(kv("a", "2", 6, 2), Some(kv("a", "1", 5, 1)));
        let wire = event(&ev, true);
        assert_eq!(wire.r#type, EventType::Put as i32);
        assert_eq!(from_proto::event(&wire).unwrap(), ev);
        assert_eq!(mvccpb::Event::from(&ev), wire);

        let bare = event(&ev, false);
        assert!(bare.prev_kv.is_none());
        assert_eq!(bare.kv, wire.kv);
    }

    #[test]
    fn delete_has_etcd_shape() {
        // Even a delete whose core kv carries more than the key and revision goes out bare.
        let ev = Event {
            kind: EventKind::Delete,
            kv: kv("gone", "stale", 9, 4),
            prev_kv: Some(kv("gone", "old", 8, 4)),
        };
        let wire = event(&ev, true);
        assert_eq!(wire.r#type, EventType::Delete as i32);
        assert_eq!(
            wire.kv,
            Some(mvccpb::KeyValue {
                key: "gone".into(),
                mod_revision: 9,
                ..Default::default()
            })
        );
        assert_eq!(wire.prev_kv, Some(key_value(&kv("gone", "old", 8, 4))));
        // Back in core form it is exactly what `Event::delete` builds.
        assert_eq!(
            from_proto::event(&wire).unwrap(),
            Event::delete("gone".into(), 9, Some(kv("gone", "old", 8, 4)))
        );
    }

    #[test]
    fn watch_events_from_borrowed_engine_events() {
        let prev = kv("b", "0", 3, 1);
        let cur = kv("b", "1", 4, 2);
        let views = [
            WatchEvent {
                kind: EventKind::Put,
                kv: &cur,
                prev_kv: Some(&prev),
            },
            WatchEvent {
                kind: EventKind::Delete,
                kv: &cur,
                prev_kv: None,
            },
        ];
        let with = watch_events(views.iter(), true);
        assert_eq!(with.len(), 2);
        assert_eq!(with[0].prev_kv, Some(key_value(&prev)));
        assert_eq!(with[1].kv.as_ref().map(|k| k.version), Some(0));
        let without = watch_events(views, false);
        assert!(without.iter().all(|e| e.prev_kv.is_none()));
    }
}

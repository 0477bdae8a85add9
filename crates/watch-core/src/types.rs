//! The data model: revisions, key-values, events and change sets (the etcd model).

use bytes::Bytes;

/// A store revision. Each committed write gets exactly one, and revisions strictly increase.
///
/// `0` is never the revision of a write; it means "none" or "from now" where an API says so.
pub type Revision = u64;

/// A key with its value and metadata, as etcd's `mvccpb.KeyValue`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct KeyValue {
    /// The key. Never empty for a stored key.
    pub key: Bytes,
    /// The value. Empty for the key-only view of a delete.
    pub value: Bytes,
    /// Revision of the latest creation of this key (0 in a delete event's kv).
    pub create_revision: Revision,
    /// Revision of the latest modification (for a delete event: the revision of the delete).
    pub mod_revision: Revision,
    /// 1 on creation, +1 on each modification, 0 in a delete event's kv.
    pub version: u64,
    /// Lease the key is attached to; 0 means none.
    pub lease: i64,
}

impl KeyValue {
    /// Bytes of payload this kv holds (key + value), used for memory and size accounting.
    pub fn payload_len(&self) -> usize {
        self.key.len() + self.value.len()
    }
}

/// Whether an event wrote or removed its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    /// The key was created or modified; `kv` carries the new value.
    Put,
    /// The key was deleted; `kv` carries the key and `mod_revision` of the delete.
    Delete,
}

/// One key's change within a revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Put or delete.
    pub kind: EventKind,
    /// The key after the change (see [`EventKind`] for what a delete carries).
    pub kv: KeyValue,
    /// The key before the change, when the publisher recorded it. `None` for a create.
    /// Watchers that did not ask for `prev_kv` never see it.
    pub prev_kv: Option<KeyValue>,
}

impl Event {
    /// A put of `kv`, with the previous value if known.
    pub fn put(kv: KeyValue, prev_kv: Option<KeyValue>) -> Self {
        Self {
            kind: EventKind::Put,
            kv,
            prev_kv,
        }
    }

    /// A delete of `key` at `revision`, with the previous value if known.
    pub fn delete(key: Bytes, revision: Revision, prev_kv: Option<KeyValue>) -> Self {
        let kv = KeyValue {
            key,
            mod_revision: revision,
            ..KeyValue::default()
        };
        Self {
            kind: EventKind::Delete,
            kv,
            prev_kv,
        }
    }

    /// The key this event changed.
    pub fn key(&self) -> &[u8] {
        &self.kv.key
    }

    /// True for a put that created the key (version 1), the etcd "IsCreate" rule.
    pub fn is_create(&self) -> bool {
        self.kind == EventKind::Put && self.kv.version == 1
    }

    /// Approximate payload bytes (keys and values of kv and prev_kv).
    pub fn payload_len(&self) -> usize {
        self.kv.payload_len() + self.prev_kv.as_ref().map_or(0, KeyValue::payload_len)
    }
}

/// All events of one revision. Delivered atomically: a watcher receives every event of a
/// revision that it matches in one message, never split across messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeSet {
    /// The revision every event in this set was committed at.
    pub revision: Revision,
    /// The events in the order the write applied them (a key appears at most once).
    pub events: Vec<Event>,
    /// A consumer's derived form of these events (wire bytes), built once and shared.
    attachment: Attachment,
}

impl ChangeSet {
    /// A change set at `revision`.
    pub fn new(revision: Revision, events: Vec<Event>) -> Self {
        Self {
            revision,
            events,
            attachment: Attachment::default(),
        }
    }

    /// Approximate payload bytes, used by byte-bounded buffers.
    pub fn payload_len(&self) -> usize {
        self.events.iter().map(Event::payload_len).sum()
    }

    /// Bytes of memory this change set holds: the struct, its event vector and every key and
    /// value it references (an upper bound where payloads share a buffer). What byte-bounded
    /// queues count, so tiny events are not counted as free.
    pub fn mem_size(&self) -> usize {
        std::mem::size_of::<Self>()
            + self.events.capacity() * std::mem::size_of::<Event>()
            + self.payload_len()
    }

    /// The value attached to this change set by the first caller for type `T`, built by `init`
    /// at most once however many threads ask, and shared by reference afterwards.
    ///
    /// A consumer that serves one change set to many watchers (a server encoding each
    /// revision's events to wire bytes once for all of them) keeps its derived form here, so it
    /// lives exactly as long as the change set and needs no cache keyed by revision. Exactly one
    /// type can be attached: `None` when another type already is (the caller then computes
    /// without caching). The engine itself never reads it.
    pub fn attachment<T: std::any::Any + Send + Sync>(
        &self,
        init: impl FnOnce(&Self) -> T,
    ) -> Option<&T> {
        self.attachment
            .0
            .get_or_init(|| Box::new(init(self)))
            .downcast_ref()
    }
}

/// A lazily set, type-erased slot on a [`ChangeSet`]. Not part of the change set's value: a
/// clone starts empty and equality ignores it.
#[derive(Default)]
struct Attachment(std::sync::OnceLock<Box<dyn std::any::Any + Send + Sync>>);

impl Clone for Attachment {
    fn clone(&self) -> Self {
        Self::default()
    }
}

impl PartialEq for Attachment {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for Attachment {}

impl std::fmt::Debug for Attachment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.get().is_some() {
            "set"
        } else {
            "empty"
        })
    }
}

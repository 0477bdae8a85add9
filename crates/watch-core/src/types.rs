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

    /// Heap bytes this kv's key and value can pin beyond the struct itself: their bytes plus
    /// [`BYTES_OVERHEAD`] for each non-empty one (an upper bound: a buffer shared with other
    /// values is counted whole in each).
    pub fn heap_size(&self) -> usize {
        let one = |b: &Bytes| {
            if b.is_empty() {
                0
            } else {
                b.len() + BYTES_OVERHEAD
            }
        };
        one(&self.key) + one(&self.value)
    }
}

/// Bytes counted per non-empty key or value beyond its length: the allocator's rounding and
/// per-allocation header (16 bytes on 64-bit glibc) and the shared-buffer header `Bytes`
/// allocates once a buffer is cloned (24 bytes on 64-bit).
pub const BYTES_OVERHEAD: usize = 40;

/// Most bytes of framing around one key-value in a consumer's wire encoding of an event,
/// beyond its key and value: etcd's `mvccpb.KeyValue` (a tag and a length for key and value,
/// four varint fields of at most 11 bytes) inside its field of `mvccpb.Event` (a tag and a
/// length): 6 + 6 + 4 × 11 + 6 = 62. Part of [`ChangeSet::attachment_reserve`].
pub const WIRE_KV_OVERHEAD: usize = 62;

/// Most bytes of framing per event and encoding beyond its key-values: the event's own tag and
/// length as a response field (6), its type field (2), and a 4-byte offset into the shared
/// buffer. Part of [`ChangeSet::attachment_reserve`].
pub const WIRE_EVENT_OVERHEAD: usize = 12;

/// Fixed bytes of an attachment: its boxed slot holding two encodings (each a shared buffer
/// and an offsets array), with [`BYTES_OVERHEAD`] for each of its five allocations. Part of
/// [`ChangeSet::attachment_reserve`].
pub const ATTACHMENT_FIXED: usize = 128 + 5 * BYTES_OVERHEAD;

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

    /// Heap bytes this event's keys and values can pin beyond the struct (see
    /// [`KeyValue::heap_size`]).
    pub fn heap_size(&self) -> usize {
        self.kv.heap_size() + self.prev_kv.as_ref().map_or(0, KeyValue::heap_size)
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

    /// Approximate payload bytes (keys and values only).
    pub fn payload_len(&self) -> usize {
        self.events.iter().map(Event::payload_len).sum()
    }

    /// Bytes of memory this change set holds once shared as an `Arc<ChangeSet>`: the `Arc`
    /// allocation (two counts and the struct), the event vector's capacity in whole
    /// [`Event`]s, every key and value it references with [`BYTES_OVERHEAD`] each (an upper
    /// bound where buffers are shared), and the [`attachment_reserve`](Self::attachment_reserve)
    /// for what a consumer attaches later (a server's wire bytes, which live as long as the
    /// change set). What byte-bounded windows and queues count, so a tiny event costs its real
    /// few hundred bytes, not its few payload bytes. The same whether or not the attachment is
    /// set yet: queues add and later subtract one value per item.
    pub fn mem_size(&self) -> usize {
        2 * std::mem::size_of::<usize>()
            + std::mem::size_of::<Self>()
            + self.events.capacity() * std::mem::size_of::<Event>()
            + self.events.iter().map(Event::heap_size).sum::<usize>()
            + self.attachment_reserve()
    }

    /// Bytes [`mem_size`](Self::mem_size) sets aside for the [`attachment`](Self::attachment):
    /// room for two wire encodings of the events, one without and one with `prev_kv` (the two
    /// variants a server keeps), each event's key-values with their framing
    /// ([`WIRE_KV_OVERHEAD`], [`WIRE_EVENT_OVERHEAD`]), plus [`ATTACHMENT_FIXED`]. A consumer
    /// whose attachment is larger than this is under-counted (watch-proto's tests check its
    /// encodings fit).
    pub fn attachment_reserve(&self) -> usize {
        let kv = |kv: &KeyValue| kv.payload_len() + WIRE_KV_OVERHEAD;
        let events: usize = self
            .events
            .iter()
            .map(|e| {
                // Without prev_kv: kv; with it: kv and prev_kv.
                2 * (WIRE_EVENT_OVERHEAD + kv(&e.kv)) + e.prev_kv.as_ref().map_or(0, kv)
            })
            .sum();
        ATTACHMENT_FIXED + events
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The figure ARCHITECTURE.md's worst-case memory formula quotes: a one-byte put (key "k",
    /// value "v") costs its structs, its key and value, and the reserve for its two wire
    /// encodings.
    #[test]
    fn mem_size_counts_the_reserve_for_the_wire_encodings() {
        let kv = KeyValue {
            key: Bytes::from_static(b"k"),
            value: Bytes::from_static(b"v"),
            create_revision: 1,
            mod_revision: 1,
            version: 1,
            lease: 0,
        };
        let cs = ChangeSet::new(1, vec![Event::put(kv.clone(), None)]);
        assert_eq!(
            cs.attachment_reserve(),
            ATTACHMENT_FIXED + 2 * (WIRE_EVENT_OVERHEAD + WIRE_KV_OVERHEAD + 2)
        );
        assert_eq!(cs.mem_size(), 834);
        // prev_kv adds its bytes once (only the prev_kv encoding holds it), besides its heap.
        let with_prev = ChangeSet::new(2, vec![Event::put(kv.clone(), Some(kv))]);
        assert_eq!(
            with_prev.attachment_reserve() - cs.attachment_reserve(),
            WIRE_KV_OVERHEAD + 2
        );
    }
}

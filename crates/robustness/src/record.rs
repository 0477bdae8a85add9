//! What a run records: every write with its outcome, every watch session with every response,
//! the compactions issued and the final state. The validator reads only this.

use std::time::Duration;

/// A key-value as the server reports it (etcd's `mvccpb.KeyValue`, lease left out).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kv {
    /// The key.
    pub key: Vec<u8>,
    /// The value.
    pub value: Vec<u8>,
    /// Revision of the key's last creation.
    pub create_revision: i64,
    /// Revision of the key's last modification.
    pub mod_revision: i64,
    /// 1 on create, +1 per modification.
    pub version: i64,
    /// The lease the key is attached to (0: none).
    pub lease: i64,
}

/// One operation inside a txn branch (single keys only, so a branch never writes a key twice).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TxnOp {
    /// Put with `prev_kv`.
    Put {
        /// The key.
        key: Vec<u8>,
        /// A value unique to this request.
        value: Vec<u8>,
    },
    /// Delete one key with `prev_kv`.
    Delete {
        /// The key.
        key: Vec<u8>,
    },
    /// Read one key (writes nothing).
    Get {
        /// The key.
        key: Vec<u8>,
    },
}

/// A txn compare: `version(key) <result> version`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionCompare {
    /// The key compared.
    pub key: Vec<u8>,
    /// -1: less, 0: equal, 1: greater.
    pub ordering: i8,
    /// The version compared with (0 for a missing key).
    pub version: i64,
}

/// A write request as sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Put with `prev_kv`.
    Put {
        /// The key.
        key: Vec<u8>,
        /// A value unique to this request.
        value: Vec<u8>,
    },
    /// DeleteRange with `prev_kv`; `range_end` in etcd's convention (empty: the single key).
    DeleteRange {
        /// Start key.
        key: Vec<u8>,
        /// End (exclusive), etcd convention.
        range_end: Vec<u8>,
    },
    /// Put with `prev_kv` attaching the key to `lease` (granted by the lease task, which
    /// records no grant: grants create no revision).
    LeasePut {
        /// The key.
        key: Vec<u8>,
        /// A value unique to this request.
        value: Vec<u8>,
        /// The lease.
        lease: i64,
    },
    /// LeaseRevoke. Its revision (if the lease still had keys) is not claimed from the
    /// response, which cannot tell: the validator resolves it from the reference watcher as
    /// it does an expiry (all of one lease's keys deleted in one revision).
    Revoke {
        /// The lease.
        lease: i64,
    },
    /// Txn: every compare holds ⇒ `success`, else `failure`.
    Txn {
        /// Compares (all must hold).
        compare: Vec<VersionCompare>,
        /// Ops when every compare holds.
        success: Vec<TxnOp>,
        /// Ops otherwise.
        failure: Vec<TxnOp>,
    },
}

/// The result of one op of an acknowledged txn.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TxnOpResult {
    /// A put and its previous value.
    Put {
        /// `prev_kv` from the response.
        prev: Option<Kv>,
    },
    /// A delete and what it deleted.
    Delete {
        /// `prev_kvs` from the response.
        prev: Vec<Kv>,
    },
    /// A read.
    Get,
}

/// What the server answered for an acknowledged write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AckDetail {
    /// Put response.
    Put {
        /// `prev_kv`.
        prev: Option<Kv>,
    },
    /// DeleteRange response.
    DeleteRange {
        /// `prev_kvs` (what was deleted).
        prev: Vec<Kv>,
    },
    /// LeaseRevoke response (the header revision only).
    Revoke,
    /// Txn response.
    Txn {
        /// Which branch ran.
        succeeded: bool,
        /// One result per op of that branch.
        results: Vec<TxnOpResult>,
    },
}

impl AckDetail {
    /// Whether the acknowledged write created a revision (wrote at least one key).
    pub fn writes(&self) -> bool {
        match self {
            AckDetail::Put { .. } => true,
            AckDetail::DeleteRange { prev } => !prev.is_empty(),
            // Unknown from the response; see `Request::Revoke`.
            AckDetail::Revoke => false,
            AckDetail::Txn { results, .. } => results.iter().any(|r| match r {
                TxnOpResult::Put { .. } => true,
                TxnOpResult::Delete { prev } => !prev.is_empty(),
                TxnOpResult::Get => false,
            }),
        }
    }
}

/// How a write ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Acknowledged at `revision` (the response header).
    Ack {
        /// Header revision of the response.
        revision: i64,
        /// The response's content.
        detail: AckDetail,
    },
    /// Refused by the server with a definite error (nothing happened).
    Refused(String),
    /// The connection died or timed out: it may or may not have happened.
    Unknown(String),
}

/// One write and its outcome.
#[derive(Debug, Clone)]
pub struct WriteRecord {
    /// Which writer task issued it.
    pub writer: usize,
    /// When it was sent, since the run started.
    pub sent: Duration,
    /// The request.
    pub request: Request,
    /// The outcome.
    pub outcome: Outcome,
}

/// What a watch asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchSpec {
    /// Start key.
    pub key: Vec<u8>,
    /// End (exclusive), etcd convention: empty = single key, `\0` = from key.
    pub range_end: Vec<u8>,
    /// Ask for `prev_kv`.
    pub prev_kv: bool,
    /// Filter out PUT events.
    pub no_put: bool,
    /// Filter out DELETE events.
    pub no_delete: bool,
    /// Ask for periodic progress notifications.
    pub progress_notify: bool,
    /// keywatch's `initial_state` extension: every session lists the selected keys at its
    /// created revision R, then watches from R + 1 (resumes list again, the recovery recipe).
    pub initial_state: bool,
}

impl WatchSpec {
    /// Whether `key` is in the watched range (etcd's `(key, range_end)` convention).
    pub fn matches_key(&self, key: &[u8]) -> bool {
        if self.range_end.is_empty() {
            key == self.key.as_slice()
        } else if self.range_end == [0] {
            key >= self.key.as_slice()
        } else {
            key >= self.key.as_slice() && key < self.range_end.as_slice()
        }
    }
}

/// Event type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// PUT.
    Put,
    /// DELETE.
    Delete,
}

/// One event as delivered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// PUT or DELETE.
    pub kind: EventKind,
    /// The kv (a DELETE carries key and mod_revision only).
    pub kv: Kv,
    /// `prev_kv`, when present.
    pub prev: Option<Kv>,
}

/// One watch response for one watch, as recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    /// Events (at least one).
    Events {
        /// Header revision.
        header_revision: i64,
        /// The events in delivery order.
        events: Vec<Event>,
        /// The highest compaction revision the runner had issued when it was received: prev_kv
        /// may be absent for events at or below it.
        compacted_before: i64,
        /// When it was received, since the run started.
        at: Duration,
    },
    /// The initial state of an `initial_state` session, recorded at its marker: every key
    /// the listing delivered, in delivery order.
    Initial {
        /// The marker's header revision R.
        revision: i64,
        /// The key-values listed at R.
        kvs: Vec<Kv>,
    },
    /// A progress notification (periodic, or the stream-wide answer to a progress request).
    Progress {
        /// Header revision: every event at or below it has been delivered.
        revision: i64,
    },
    /// The watch was canceled by the server.
    Canceled {
        /// Compaction revision (0 if none).
        compact_revision: i64,
        /// The reason given.
        reason: String,
    },
}

/// How a session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionEnd {
    /// The runner closed the stream (a deliberate disconnect or the end of the run).
    Closed,
    /// The stream broke (server killed) or could not be opened.
    Broken(String),
    /// Canceled by the server (see the last response).
    Canceled,
    /// The create was refused.
    Refused(String),
    /// Every event up to this revision is known delivered (a progress notification at or past
    /// the final revision arrived at the end of the run).
    Drained(i64),
}

/// One create of a logical watcher on one stream, until its stream ends or it is canceled.
#[derive(Debug, Clone)]
pub struct Session {
    /// The requested start revision (0: now).
    pub start_revision: i64,
    /// Header revision of the `created` response, if it came.
    pub created_revision: Option<i64>,
    /// Everything received for this watch after `created`.
    pub responses: Vec<Response>,
    /// How it ended.
    pub end: SessionEnd,
}

/// One logical watcher: a selector followed across disconnects, each resume starting at the
/// revision after the last one it knows complete.
#[derive(Debug, Clone)]
pub struct WatcherRecord {
    /// Index in the run.
    pub id: usize,
    /// What it watches.
    pub spec: WatchSpec,
    /// How it reads (for messages).
    pub behaviour: String,
    /// Its sessions, in order.
    pub sessions: Vec<Session>,
    /// The reference watcher: all keys from revision 1, healthy; compaction never passes it,
    /// so its events resolve writes whose outcome is unknown.
    pub reference: bool,
}

/// Everything a run recorded.
#[derive(Debug, Clone, Default)]
pub struct RunRecord {
    /// The workload seed.
    pub seed: u64,
    /// Every write.
    pub writes: Vec<WriteRecord>,
    /// Every logical watcher.
    pub watchers: Vec<WatcherRecord>,
    /// Compaction revisions issued (whatever their outcome).
    pub compactions: Vec<i64>,
    /// Final Range over all keys after the last restart: (header revision, kvs in key order).
    pub final_range: Option<(i64, Vec<Kv>)>,
    /// Server kills survived.
    pub kills: usize,
}

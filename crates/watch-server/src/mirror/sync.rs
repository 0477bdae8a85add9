//! The sync task: snapshot, then follow the upstream watch, moving to the next endpoint on
//! failure (see the module docs of [`super`]).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use watch_core::{ChangeSet, Revision};
use watch_proto::etcdserverpb as pb;
use watch_proto::etcdserverpb::kv_client::KvClient;
use watch_proto::etcdserverpb::maintenance_client::MaintenanceClient;
use watch_proto::etcdserverpb::watch_client::WatchClient;
use watch_proto::from_proto;
use watch_proto::mvccpb;

use super::{
    FIRST_SNAPSHOT_PAGE_KEYS, Inner, Meta, MirrorState, UpstreamChannel, progress_ordered,
};
use kv_store::{MirrorSnapshot, StoreError};

/// How a session with one endpoint ended.
enum End {
    /// Try again (the next endpoint): the message says why.
    Retry(String),
    /// Stop for good.
    Fatal(String),
    /// The store closed: the server is stopping.
    Closed,
}

impl From<StoreError> for End {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Closed => End::Closed,
            other => End::Fatal(format!("store: {other}")),
        }
    }
}

fn retry(what: &'static str) -> impl Fn(tonic::Status) -> End {
    move |s| End::Retry(format!("{what}: {} ({:?})", s.message(), s.code()))
}

/// Backoff between endpoint attempts: doubles from `MIN` to `MAX`, reset by a session that
/// advanced the mirrored revision (a watch that opens and then fails at once, e.g. on a
/// member that cannot serve it, must not make the mirror retry at full speed).
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// The delay before the next endpoint attempt.
#[derive(Debug)]
struct Backoff {
    next: Duration,
}

impl Backoff {
    fn new() -> Self {
        Self { next: BACKOFF_MIN }
    }

    /// The delay after a session that ended; `advanced`: it moved the mirrored revision.
    fn after_session(&mut self, advanced: bool) -> Duration {
        if advanced {
            self.next = BACKOFF_MIN;
        }
        let delay = self.next;
        self.next = (self.next * 2).min(BACKOFF_MAX);
        delay
    }
}

/// The watch ID the mirror asks for on its stream.
const WATCH_ID: i64 = 1;

pub(super) async fn run(inner: Arc<Inner>) {
    let mut backoff = Backoff::new();
    loop {
        let idx = inner.current.load(Ordering::Acquire) % inner.channels.len();
        let endpoint = inner.channels[idx].0.clone();
        inner
            .status
            .send_modify(|s| s.endpoint = Some(endpoint.clone()));
        let before = inner.store.current_revision();
        let end = session(&inner, idx).await;
        inner.status.send_modify(|s| {
            s.state = MirrorState::Disconnected;
            s.revision = inner.store.current_revision();
        });
        match end {
            End::Closed => return,
            End::Fatal(msg) => {
                tracing::error!(error = %msg, "mirror stopped");
                inner.status.send_modify(|s| s.error = Some(msg.clone()));
                inner.fatal.send_replace(Some(msg));
                return;
            }
            End::Retry(msg) => {
                tracing::warn!(%endpoint, error = %msg, "upstream session ended; trying the next endpoint");
                inner.status.send_modify(|s| s.error = Some(msg));
                inner
                    .current
                    .store((idx + 1) % inner.channels.len(), Ordering::Release);
                let advanced = inner.store.current_revision() > before;
                tokio::time::sleep(backoff.after_session(advanced)).await;
            }
        }
    }
}

/// One endpoint: check the cluster, snapshot if needed, then follow the watch.
async fn session(inner: &Inner, idx: usize) -> End {
    match session_inner(inner, idx).await {
        Ok(()) => End::Closed,
        Err(e) => e,
    }
}

async fn session_inner(inner: &Inner, idx: usize) -> Result<(), End> {
    inner
        .credentials
        .authenticate(inner.channels[idx].1.clone())
        .await
        .map_err(retry("Auth.Authenticate"))?;
    let channel = inner.upstream(idx);
    let store = &inner.store;
    let status = MaintenanceClient::new(channel.clone())
        .status(pb::StatusRequest {})
        .await
        .map_err(retry("Maintenance.Status"))?
        .into_inner();
    let cluster_id = status.header.map(|h| h.cluster_id).unwrap_or(0);
    check_cluster(inner, cluster_id)?;
    let trusted = progress_ordered(&status.version);
    inner.progress_trusted.store(trusted, Ordering::Release);
    tracing::info!(
        endpoint = %inner.channels[idx].0,
        version = %status.version,
        progress_requests = trusted,
        "upstream connected"
    );
    let mut kv =
        KvClient::new(channel.clone()).max_decoding_message_size(inner.config.max_response_bytes);
    // A store never reset has no floor: it needs its first snapshot.
    if store.compacted_revision() == 0 {
        resync(inner, &mut kv).await?;
    }
    loop {
        match follow(inner, channel.clone()).await? {
            Follow::Compacted(c) => {
                tracing::warn!(
                    compacted = c,
                    position = store.current_revision(),
                    "upstream compacted past the mirror; resyncing from a fresh snapshot"
                );
                resync(inner, &mut kv).await?;
            }
        }
    }
}

fn check_cluster(inner: &Inner, cluster_id: u64) -> Result<(), End> {
    let dir = inner.store.dir();
    let mut meta = Meta::load(dir)
        .map_err(|e| End::Fatal(format!("reading the mirror record: {e}")))?
        .unwrap_or_default();
    match meta.cluster_id {
        Some(id) if id != cluster_id => Err(End::Fatal(format!(
            "the data directory mirrors etcd cluster {id:x}, the upstream is cluster \
             {cluster_id:x}; use a fresh data directory"
        ))),
        Some(_) => Ok(()),
        None => {
            meta.cluster_id = Some(cluster_id);
            meta.store(dir)
                .map_err(|e| End::Fatal(format!("writing the mirror record: {e}")))
        }
    }
}

/// Loads a snapshot of every mirrored range at one upstream revision and installs it.
async fn resync(inner: &Inner, kv: &mut KvClient<UpstreamChannel>) -> Result<(), End> {
    inner.status.send_modify(|s| s.state = MirrorState::Syncing);
    let snap = loop {
        match snapshot(inner, kv).await? {
            Some(s) => break s,
            // Compacted while paging: start over at a newer revision.
            None => continue,
        }
    };
    let (revision, keys) = (snap.revision(), snap.keys());
    let canceled = snap.install().await?;
    tracing::info!(revision, keys, canceled, "mirror snapshot installed");
    inner
        .status
        .send_modify(|s| s.revision = inner.store.current_revision());
    Ok(())
}

/// Reads the mirrored ranges at one revision page by page, each page streamed into a
/// [`MirrorSnapshot`] (the state being built and the snapshot file) and then dropped, so
/// memory beyond the state is one page; `None` when the upstream compacted that revision
/// while the pages were read (the partial load is dropped).
async fn snapshot(
    inner: &Inner,
    kv: &mut KvClient<UpstreamChannel>,
) -> Result<Option<MirrorSnapshot>, End> {
    let max_keys = inner.config.snapshot_page.max(1);
    let page_bytes = inner.config.snapshot_page_bytes.max(1);
    // Keys asked for by the next page: adapted to the sizes seen (see `snapshot_page_bytes`).
    let mut limit = max_keys.min(FIRST_SNAPSHOT_PAGE_KEYS);
    let mut revision: i64 = 0;
    let mut snap: Option<MirrorSnapshot> = None;
    let mut pages = 0u64;
    for range in inner.scope.ranges() {
        let mut key = range.key.clone();
        loop {
            let resp = kv
                .range(pb::RangeRequest {
                    key: key.clone(),
                    range_end: range.range_end.clone(),
                    limit: i64::try_from(limit).unwrap_or(i64::MAX),
                    revision,
                    ..Default::default()
                })
                .await;
            let resp = match resp {
                Ok(r) => r.into_inner(),
                Err(s) if s.code() == tonic::Code::OutOfRange && revision != 0 => {
                    return Ok(None);
                }
                Err(s) => return Err(retry("snapshot Range")(s)),
            };
            let snap = match &mut snap {
                Some(s) => s,
                None => {
                    // Without it the later pages would be read at "now", not one cut.
                    revision = resp
                        .header
                        .as_ref()
                        .map(|h| h.revision)
                        .filter(|r| *r > 0)
                        .ok_or_else(|| {
                            End::Retry("snapshot Range: answer without a revision header".into())
                        })?;
                    let at = u64::try_from(revision).unwrap_or(0);
                    snap.insert(inner.store.mirror_snapshot(at).await?)
                }
            };
            let Some(last) = resp.kvs.last().map(|k| k.key.clone()) else {
                break;
            };
            let bytes: usize = resp.kvs.iter().map(|k| k.key.len() + k.value.len()).sum();
            let n = resp.kvs.len();
            let page = resp
                .kvs
                .iter()
                .map(from_proto::key_value)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| End::Retry(format!("snapshot: bad key-value: {e}")))?;
            drop(resp.kvs);
            snap.push(page).await?;
            pages += 1;
            if !resp.more {
                break;
            }
            limit = (page_bytes / bytes.div_ceil(n).max(1)).clamp(1, max_keys);
            let mut next = last.to_vec();
            next.push(0);
            key = Bytes::from(next);
        }
    }
    tracing::debug!(revision, pages, "mirror snapshot read");
    snap.map(Some)
        .ok_or_else(|| End::Retry("snapshot: no range was read".into()))
}

enum Follow {
    /// The upstream no longer has the revision after the mirror's position.
    Compacted(Revision),
}

/// Opens the upstream watch at the mirror's position + 1 and applies it until it fails.
async fn follow(inner: &Inner, channel: UpstreamChannel) -> Result<Follow, End> {
    let store = &inner.store;
    let from = store.current_revision() + 1;
    let covering = inner.scope.covering();
    let (tx, rx) = mpsc::channel(4);
    let create = pb::WatchRequest {
        request_union: Some(pb::watch_request::RequestUnion::CreateRequest(
            pb::WatchCreateRequest {
                key: covering.key.clone(),
                range_end: covering.range_end.clone(),
                start_revision: i64::try_from(from).unwrap_or(i64::MAX),
                progress_notify: true,
                prev_kv: true,
                watch_id: WATCH_ID,
                ..Default::default()
            },
        )),
    };
    tx.send(create)
        .await
        .map_err(|_| End::Retry("watch request channel closed".into()))?;
    let mut request = tonic::Request::new(ReceiverStream::new(rx));
    // etcd ends the stream of a member that lost its leader: we move on instead of staying
    // attached to a partitioned member that no longer sees new revisions.
    request.metadata_mut().insert(
        "hasleader",
        tonic::metadata::MetadataValue::from_static("true"),
    );
    let mut stream = WatchClient::new(channel)
        .max_decoding_message_size(inner.config.max_response_bytes)
        .watch(request)
        .await
        .map_err(retry("opening the upstream watch"))?
        .into_inner();
    let trusted = inner.progress_trusted.load(Ordering::Acquire);
    // The ID etcd gave the watch (the one asked for, unless the server ignores the field).
    let mut watch_id = WATCH_ID;
    loop {
        let msg = tokio::select! {
            m = stream.message() => m,
            _ = inner.progress_wanted.notified(), if trusted => {
                let req = pb::WatchRequest {
                    request_union: Some(pb::watch_request::RequestUnion::ProgressRequest(
                        pb::WatchProgressRequest {},
                    )),
                };
                tx.send(req)
                    .await
                    .map_err(|_| End::Retry("watch request channel closed".into()))?;
                continue;
            }
        };
        let resp = match msg {
            Ok(Some(r)) => r,
            Ok(None) => return Err(End::Retry("upstream closed the watch stream".into())),
            Err(s) => return Err(retry("upstream watch")(s)),
        };
        if resp.compact_revision > 0 {
            return Ok(Follow::Compacted(
                u64::try_from(resp.compact_revision).unwrap_or(0),
            ));
        }
        if resp.canceled {
            return Err(End::Retry(format!(
                "upstream canceled the watch: {}",
                resp.cancel_reason
            )));
        }
        if resp.created {
            watch_id = resp.watch_id;
            inner.status.send_modify(|s| {
                s.state = MirrorState::Connected;
                s.error = None;
            });
            tracing::info!(from, "upstream watch open");
            continue;
        }
        if resp.events.is_empty() {
            // A progress notification: every event up to its revision was sent. Periodic ones
            // (our watch ID) are ordered with events; requested ones (-1) only when trusted.
            if resp.watch_id == watch_id || trusted {
                let rev = resp.header.as_ref().map(|h| h.revision).unwrap_or(0);
                let rev = u64::try_from(rev).unwrap_or(0);
                if rev > store.current_revision() {
                    store.mirror_apply(ChangeSet::new(rev, Vec::new())).await?;
                }
            }
        } else {
            for cs in change_sets(&resp.events, inner)? {
                store.mirror_apply(cs).await?;
            }
        }
        retain(inner);
        let revision = store.current_revision();
        inner.status.send_if_modified(|s| {
            let changed = s.revision != revision;
            s.revision = revision;
            changed
        });
    }
}

/// The mirror's retention (`retain_revisions`): once the history is a tenth longer than the
/// window, compacts it to the window in a background task (a compaction writes a state
/// snapshot, O(keys), so it runs in steps, one at a time, off the apply path).
fn retain(inner: &Inner) {
    let Some(keep) = inner.config.retain_revisions else {
        return;
    };
    let store = &inner.store;
    let target = store.current_revision().saturating_sub(keep);
    let step = (keep / 10).max(1);
    if target < store.compacted_revision().max(1) + step
        || inner.compacting.swap(true, Ordering::AcqRel)
    {
        return;
    }
    let (store, flag) = (store.clone(), inner.compacting.clone());
    // Tracked for `Mirror::stop`; the previous task has ended (the flag was clear).
    *inner.retention.lock() = Some(tokio::spawn(async move {
        match store.mirror_compact(target).await {
            Ok(_) => tracing::debug!(revision = target, "mirror history compacted"),
            Err(e) => tracing::warn!(error = %e, revision = target, "mirror retention failed"),
        }
        flag.store(false, Ordering::Release);
    }));
}

/// Splits one response's events into one change set per revision, keeping only mirrored keys.
/// A revision left with no mirrored event is kept only when it is the response's last, to
/// advance the position (etcd never splits a revision across responses without `fragment`).
fn change_sets(events: &[mvccpb::Event], inner: &Inner) -> Result<Vec<ChangeSet>, End> {
    let mut out: Vec<ChangeSet> = Vec::new();
    let mut current: Option<ChangeSet> = None;
    for ev in events {
        let e = from_proto::event(ev)
            .map_err(|e| End::Retry(format!("upstream sent a bad event: {e}")))?;
        let rev = e.kv.mod_revision;
        match &mut current {
            Some(cs) if cs.revision == rev => {}
            Some(cs) if cs.revision > rev => {
                return Err(End::Retry(format!(
                    "upstream events out of order: {rev} after {}",
                    cs.revision
                )));
            }
            _ => {
                if let Some(done) = current.take()
                    && !done.events.is_empty()
                {
                    out.push(done);
                }
                current = Some(ChangeSet::new(rev, Vec::new()));
            }
        }
        if inner.scope.contains_key(e.key())
            && let Some(cs) = &mut current
        {
            cs.events.push(e);
        }
    }
    out.extend(current);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sessions that opened a watch but mirrored nothing keep doubling the delay; only one
    /// that advanced the mirrored revision resets it.
    #[test]
    fn backoff_resets_only_on_progress() {
        let mut b = Backoff::new();
        assert_eq!(b.after_session(false), BACKOFF_MIN);
        assert_eq!(b.after_session(false), BACKOFF_MIN * 2);
        assert_eq!(b.after_session(false), BACKOFF_MIN * 4);
        for _ in 0..10 {
            b.after_session(false);
        }
        assert_eq!(b.after_session(false), BACKOFF_MAX);
        assert_eq!(b.after_session(true), BACKOFF_MIN);
        assert_eq!(b.after_session(false), BACKOFF_MIN * 2);
    }
}

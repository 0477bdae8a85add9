//! Lease measurements (`keywatch-lease-bench`), over the etcd v3 Lease API so the same code
//! measures keywatch and etcd:
//!
//! - [`grants`]: leases granted per second by `concurrency` clients sharing one connection.
//! - [`keepalives`]: keep-alive round trips per second on ONE stream (requests pipelined).
//! - [`expire`]: `n` leases, each with one key, expiring together; a prefix watcher opened
//!   before them counts the DELETE events. Each grant asks for the TTL left until one common
//!   deadline (`ttl` seconds after the start, in whole seconds as the API allows), so the
//!   deadlines fall within about a second whatever the setup took. Reports the time from the
//!   last lease's deadline (its grant acknowledgement + its TTL, an upper bound of the server's
//!   deadline) to the last DELETE delivered, and the rate from the first deadline to the last
//!   DELETE. Each DELETE must arrive exactly once and be alone in its revision (one key per
//!   lease).

use std::collections::HashSet;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use watch_proto::etcdserverpb as pb;
use watch_proto::etcdserverpb::lease_client::LeaseClient;

use crate::Error;
use crate::client::connect;

/// Failure guard for one expected message; a healthy run never gets near it.
const GUARD: Duration = Duration::from_secs(120);

fn rpc(what: &str) -> impl Fn(tonic::Status) -> Error + '_ {
    move |s| Error::Rpc(format!("{what}: {s}"))
}

/// Grants `n` leases of `ttl` seconds from `concurrency` tasks over one connection; returns
/// grants per second.
pub async fn grants(endpoint: &str, n: usize, concurrency: usize, ttl: i64) -> Result<f64, Error> {
    let channel = connect(endpoint).await?;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..concurrency {
        let mut client = LeaseClient::new(channel.clone());
        let count = n / concurrency + usize::from(t < n % concurrency);
        tasks.push(tokio::spawn(async move {
            for _ in 0..count {
                client
                    .lease_grant(pb::LeaseGrantRequest { ttl, id: 0 })
                    .await
                    .map_err(rpc("grant"))?;
            }
            Ok::<_, Error>(())
        }));
    }
    for t in tasks {
        t.await
            .map_err(|e| Error::Rpc(format!("grant task: {e}")))??;
    }
    Ok(n as f64 / started.elapsed().as_secs_f64())
}

/// Sends `n` keep-alives for one lease on one stream (pipelined, up to 1024 in flight) and
/// waits for every response; returns responses per second.
pub async fn keepalives(endpoint: &str, n: usize) -> Result<f64, Error> {
    let channel = connect(endpoint).await?;
    let mut client = LeaseClient::new(channel);
    let id = client
        .lease_grant(pb::LeaseGrantRequest { ttl: 600, id: 0 })
        .await
        .map_err(rpc("grant"))?
        .into_inner()
        .id;
    let (tx, rx) = mpsc::channel(1024);
    let started = Instant::now();
    // The writer runs before the call is awaited: etcd answers the stream's headers only with
    // its first response.
    let writer = tokio::spawn(async move {
        for _ in 0..n {
            if tx.send(pb::LeaseKeepAliveRequest { id }).await.is_err() {
                return;
            }
        }
    });
    let mut responses = client
        .lease_keep_alive(ReceiverStream::new(rx))
        .await
        .map_err(rpc("keep-alive stream"))?
        .into_inner();
    for i in 0..n {
        let r = tokio::time::timeout(GUARD, responses.message())
            .await
            .map_err(|_| Error::Rpc(format!("keep-alive response {i} did not arrive")))?
            .map_err(rpc("keep-alive"))?
            .ok_or_else(|| Error::Rpc("keep-alive stream ended".into()))?;
        if r.ttl != 600 || r.id != id {
            return Err(Error::Rpc(format!("unexpected keep-alive response {r:?}")));
        }
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    writer
        .await
        .map_err(|e| Error::Rpc(format!("writer: {e}")))?;
    Ok(rate)
}

/// Outcome of [`expire`].
#[derive(Debug, Clone, Serialize)]
pub struct Expiry {
    /// Leases (one key each).
    pub leases: usize,
    /// TTL of the first grant, seconds (later grants ask for what is left of it).
    pub ttl: i64,
    /// Spread of the estimated deadlines (last - first).
    pub deadline_spread_secs: f64,
    /// Time to grant every lease and put its key.
    pub setup_secs: f64,
    /// From the last lease's deadline to the last DELETE delivered.
    pub last_deadline_to_last_delete_secs: f64,
    /// From the first deadline to the last DELETE delivered.
    pub first_deadline_to_last_delete_secs: f64,
    /// `leases / first_deadline_to_last_delete_secs`.
    pub expiries_per_sec: f64,
}

/// See the module docs. `ttl` must exceed the setup time (checked).
pub async fn expire(
    endpoint: &str,
    n: usize,
    ttl: i64,
    concurrency: usize,
) -> Result<Expiry, Error> {
    const PREFIX: &str = "/lease-expire/";
    let channel = connect(endpoint).await?;
    let (watch_tx, watch_rx) = mpsc::channel(4);
    watch_tx
        .send(pb::WatchRequest {
            request_union: Some(pb::watch_request::RequestUnion::CreateRequest(
                pb::WatchCreateRequest {
                    key: PREFIX.into(),
                    range_end: "/lease-expire0".into(),
                    ..Default::default()
                },
            )),
        })
        .await
        .map_err(|_| Error::Rpc("watch request".into()))?;
    let mut watch = pb::watch_client::WatchClient::new(channel.clone())
        .watch(ReceiverStream::new(watch_rx))
        .await
        .map_err(rpc("watch"))?
        .into_inner();
    let created = watch
        .message()
        .await
        .map_err(rpc("watch"))?
        .ok_or_else(|| Error::Rpc("watch ended".into()))?;
    if !created.created {
        return Err(Error::Rpc(format!("expected created, got {created:?}")));
    }
    let reader = tokio::spawn(async move {
        let _keep = watch_tx;
        let mut deleted = HashSet::with_capacity(n);
        let mut last = Instant::now();
        while deleted.len() < n {
            let r = tokio::time::timeout(GUARD, watch.message())
                .await
                .map_err(|_| Error::Rpc(format!("{} of {n} DELETEs, then none", deleted.len())))?
                .map_err(rpc("watch"))?
                .ok_or_else(|| Error::Rpc("watch ended".into()))?;
            let mut by_rev: std::collections::HashMap<i64, usize> = Default::default();
            for e in r.events.iter().filter(|e| e.r#type == 1) {
                let kv =
                    e.kv.as_ref()
                        .ok_or_else(|| Error::Rpc("event without kv".into()))?;
                *by_rev.entry(kv.mod_revision).or_default() += 1;
                if !deleted.insert(kv.key.clone()) {
                    return Err(Error::Rpc(format!("duplicate DELETE of {:?}", kv.key)));
                }
            }
            if by_rev.values().any(|&c| c != 1) {
                return Err(Error::Rpc("a revision with several one-key leases".into()));
            }
            last = Instant::now();
        }
        Ok::<_, Error>(last)
    });

    let started = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..concurrency {
        let mut lease = LeaseClient::new(channel.clone());
        let mut kv = pb::kv_client::KvClient::new(channel.clone());
        tasks.push(tokio::spawn(async move {
            let (mut first, mut last): (Option<Instant>, Option<Instant>) = (None, None);
            for i in (t..n).step_by(concurrency) {
                // What is left until the common deadline, rounded up to whole seconds.
                let left = ttl - started.elapsed().as_secs() as i64;
                if left < 3 {
                    return Err(Error::Rpc(format!(
                        "setup reached the common deadline ({ttl}s) after {i} leases: raise --ttl"
                    )));
                }
                let g = lease
                    .lease_grant(pb::LeaseGrantRequest { ttl: left, id: 0 })
                    .await
                    .map_err(rpc("grant"))?
                    .into_inner();
                let deadline = Instant::now() + Duration::from_secs(g.ttl as u64);
                first = Some(first.map_or(deadline, |f| f.min(deadline)));
                last = Some(last.map_or(deadline, |l| l.max(deadline)));
                kv.put(pb::PutRequest {
                    key: format!("{PREFIX}{i:08}").into(),
                    value: "x".into(),
                    lease: g.id,
                    ..Default::default()
                })
                .await
                .map_err(rpc("put"))?;
            }
            Ok::<_, Error>((first, last))
        }));
    }
    let (mut first, mut last) = (None::<Instant>, None::<Instant>);
    for t in tasks {
        let (f, l) = t
            .await
            .map_err(|e| Error::Rpc(format!("grant task: {e}")))??;
        first = match (first, f) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        last = match (last, l) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
    }
    let setup = started.elapsed();
    let (Some(first_deadline), Some(last_deadline)) = (first, last) else {
        return Err(Error::Rpc("no lease granted".into()));
    };
    if setup >= first_deadline.saturating_duration_since(started) {
        return Err(Error::Rpc(format!(
            "setup took {setup:.1?}, past the first deadline: raise --ttl"
        )));
    }
    let last_delete = reader
        .await
        .map_err(|e| Error::Rpc(format!("watch task: {e}")))??;
    let span = last_delete
        .saturating_duration_since(first_deadline)
        .as_secs_f64();
    Ok(Expiry {
        leases: n,
        ttl,
        setup_secs: setup.as_secs_f64(),
        deadline_spread_secs: last_deadline
            .saturating_duration_since(first_deadline)
            .as_secs_f64(),
        last_deadline_to_last_delete_secs: last_delete
            .saturating_duration_since(last_deadline)
            .as_secs_f64(),
        first_deadline_to_last_delete_secs: span,
        expiries_per_sec: n as f64 / span.max(f64::EPSILON),
    })
}

//! The large-dataset scenario (issue 14): N keys of V bytes loaded into one server, then what
//! a big keyspace costs: load time, server RSS, bytes on disk, a one-key Range at an old
//! revision, two compactions with the put latency during each (the first compacts the load
//! itself; the second, after 10 % of the keys changed, shows what a routine compaction costs),
//! and the restart time to serving (kill -9, restart on the same data directory, until the
//! first Range answers).
//!
//! Checked, not only timed: every put must be acknowledged, each historical Range must return
//! the key as it was at that revision (no newer `mod_revision`), and after the restart the
//! server must still count all N keys.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tonic::transport::Channel;
use watch_proto::etcdserverpb::kv_client::KvClient;
use watch_proto::etcdserverpb::{CompactionRequest, RangeRequest};

use super::{Collected, IDLE_GUARD, keys, writer_channels};
use crate::Error;
use crate::client::{self, Written};
use crate::server::Server;

/// Fraction of the keys rewritten between the two compactions (one in ten).
const CHURN_DIVISOR: usize = 10;
/// Puts measured before the second compaction as the steady-state put latency.
const STEADY_PUTS: usize = 2_000;
/// One-key Range requests at the old revision.
const HISTORY_READS: usize = 200;
/// Concurrent writers of the puts issued during a compaction (and the steady phase).
const BACKGROUND_WRITERS: usize = 8;

/// Puts to random keys from `writers` writers until `stop` is set.
async fn put_until(
    channels: Vec<Channel>,
    keys: Arc<Vec<Bytes>>,
    writers: usize,
    value_size: usize,
    stop: Arc<AtomicBool>,
) -> Written {
    let mut tasks = Vec::new();
    for w in 0..writers.max(1) {
        let mut kv = KvClient::new(channels[w % channels.len()].clone());
        let (keys, stop) = (keys.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut out = Written::new();
            while !stop.load(Ordering::Relaxed) {
                let i = fastrand::usize(..keys.len());
                client::put(&mut kv, &keys, i, value_size, &mut out).await;
            }
            out
        }));
    }
    let mut all = Written::new();
    for t in tasks {
        match t.await {
            Ok(w) => all.merge(w),
            Err(e) => all.errors.push(format!("writer task: {e}")),
        }
    }
    all
}

/// Compacts to `revision` (physically, so etcd answers once its compaction ran) while
/// background writers put; returns the compaction's wall time and the puts issued meanwhile.
async fn compact_under_load(
    c: &mut Collected,
    channels: &[Channel],
    keys: &Arc<Vec<Bytes>>,
    value_size: usize,
    revision: i64,
) -> Result<(f64, Written), Error> {
    let stop = Arc::new(AtomicBool::new(false));
    let writers = tokio::spawn(put_until(
        channels.to_vec(),
        keys.clone(),
        BACKGROUND_WRITERS,
        value_size,
        stop.clone(),
    ));
    let mut kv = KvClient::new(channels[0].clone());
    let t0 = Instant::now();
    let done = kv
        .compact(CompactionRequest {
            revision,
            physical: true,
        })
        .await;
    let compact_s = t0.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let written = writers
        .await
        .map_err(|e| Error::Rpc(format!("writers: {e}")))?;
    if let Err(e) = done {
        c.verdict.error(format!("compact to {revision}: {e}"));
    }
    Ok((compact_s, written))
}

fn p99(w: &Written) -> Option<f64> {
    (!w.latency.is_empty()).then(|| w.latency.value_at_quantile(0.99) as f64 / 1000.0)
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// Runs the scenario: `n` keys of `value_size` bytes loaded by `writers` writers.
pub(super) async fn large(
    server: &mut Server,
    n: usize,
    value_size: usize,
    writers: usize,
) -> Result<Collected, Error> {
    let mut c = Collected::new();
    let keys = keys("big/", n);
    let channels = writer_channels(&server.endpoint, 4).await?;

    // Load: every key once.
    let t0 = Instant::now();
    let loaded =
        client::put_unpaced(&channels, keys.clone(), n, writers, value_size, |i, _| i).await;
    let load_s = t0.elapsed().as_secs_f64();
    c.written(&loaded);
    c.metric("load_s", load_s);
    c.metric(
        "load_puts_per_s",
        loaded.puts.len() as f64 / load_s.max(1e-9),
    );
    let r_load = loaded.puts.iter().map(|&(_, r)| r).max().unwrap_or(1);

    // The first compaction: to the end of the load (keywatch persists the whole state once).
    let (first_s, during) =
        compact_under_load(&mut c, &channels, &keys, value_size, r_load).await?;
    c.written(&during);
    c.metric("compact_first_s", first_s);
    if let Some(p) = p99(&during) {
        c.metric("put_p99_first_compaction_ms", p);
    }

    // Churn: a tenth of the keys rewritten.
    let churn = client::put_unpaced(
        &channels,
        keys.clone(),
        (n / CHURN_DIVISOR).max(1),
        writers,
        value_size,
        |_, len| fastrand::usize(..len),
    )
    .await;
    c.written(&churn);
    let r_churn = churn.puts.iter().map(|&(_, r)| r).max().unwrap_or(r_load);

    // One-key Range at the old revision `r_load` (still retained: the compaction was to it).
    let mut kv = KvClient::new(channels[0].clone());
    let mut reads = client::histogram();
    for _ in 0..HISTORY_READS.min(n) {
        let i = fastrand::usize(..n);
        let t = Instant::now();
        let resp = kv
            .range(RangeRequest {
                key: keys[i].clone(),
                revision: r_load,
                ..Default::default()
            })
            .await;
        client::record(&mut reads, t.elapsed().as_micros() as u64);
        match resp {
            Ok(r) => {
                let r = r.into_inner();
                match r.kvs.first() {
                    Some(kv) if r.kvs.len() == 1 && kv.mod_revision <= r_load => {}
                    _ => c.verdict.error(format!(
                        "range of key {i} at {r_load}: {} kvs, mod revisions {:?}",
                        r.kvs.len(),
                        r.kvs.iter().map(|k| k.mod_revision).collect::<Vec<_>>()
                    )),
                }
            }
            Err(e) => c.verdict.error(format!("range at {r_load}: {e}")),
        }
    }
    c.metric(
        "history_range_p50_ms",
        reads.value_at_quantile(0.5) as f64 / 1000.0,
    );
    c.metric(
        "history_range_p99_ms",
        reads.value_at_quantile(0.99) as f64 / 1000.0,
    );

    // Steady put latency, then the second compaction under the same load.
    let steady = client::put_unpaced(
        &channels,
        keys.clone(),
        STEADY_PUTS.min(n.max(100)),
        BACKGROUND_WRITERS,
        value_size,
        |_, len| fastrand::usize(..len),
    )
    .await;
    c.written(&steady);
    if let Some(p) = p99(&steady) {
        c.metric("put_p99_steady_ms", p);
    }
    let (compact_s, during) =
        compact_under_load(&mut c, &channels, &keys, value_size, r_churn).await?;
    c.written(&during);
    c.metric("compact_s", compact_s);
    if let Some(p) = p99(&during) {
        c.metric("put_p99_compaction_ms", p);
    }

    if let Some(rss) = server.rss_bytes() {
        c.metric("rss_mib", mib(rss));
    }
    if let Some(disk) = server.data_dir_bytes() {
        c.metric("disk_mib", mib(disk));
    }

    // Restart: kill -9, start on the same data directory, until a Range answers.
    drop(channels);
    let t0 = Instant::now();
    tokio::task::block_in_place(|| server.restart())?;
    let mut kv = loop {
        if let Ok(ch) = client::connect(&server.endpoint).await {
            let mut kv = KvClient::new(ch);
            let ready = kv
                .range(RangeRequest {
                    key: Bytes::from_static(b"big/"),
                    range_end: Bytes::from_static(b"big0"),
                    count_only: true,
                    ..Default::default()
                })
                .await;
            if let Ok(r) = ready {
                let count = r.into_inner().count;
                if count != n as i64 {
                    c.verdict
                        .error(format!("after the restart: {count} keys, want {n}"));
                }
                break kv;
            }
        }
        if t0.elapsed() > IDLE_GUARD * 10 {
            return Err(Error::Rpc(
                "the server did not serve after a restart".into(),
            ));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    c.metric("restart_s", t0.elapsed().as_secs_f64());
    if let Some(rss) = server.rss_bytes() {
        c.metric("rss_after_restart_mib", mib(rss));
    }
    // The state after the restart answers a read (a key of the load).
    if let Err(e) = kv
        .range(RangeRequest {
            key: keys[0].clone(),
            ..Default::default()
        })
        .await
    {
        c.verdict.error(format!("range after the restart: {e}"));
    }
    Ok(c)
}

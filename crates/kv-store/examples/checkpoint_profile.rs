//! What a compaction's state checkpoint costs as the state grows and as the change since the
//! last one grows, next to what the whole-state snapshot it replaced cost. Loads `keys` keys
//! of `value` bytes, compacts (the first checkpoint writes every key), rewrites `changed`
//! keys, compacts again (an incremental checkpoint), then writes the whole state the old way
//! (one event-log record, fsynced: the former `state.snapshot`) and times reopening.
//!
//! ```text
//! cargo run -p kv-store --example checkpoint_profile -- 50000 1024 500
//! ```
//!
//! Bytes written are the process's `write_bytes` from `/proc/self/io` (what reached the
//! block layer), so they include the log's compaction steps and page-level rewrites.

use std::io::Write;
use std::time::Instant;

use kv_store::{Durability, KeyRange, PutOptions, RangeRequest, Store, StoreConfig, TxnOp};
use kv_store::{STATE_FILE, TxnRequest};
use watch_core::{ChangeSet, Event};

/// Bytes this process has caused to be written to storage so far.
fn written() -> u64 {
    std::fs::read_to_string("/proc/self/io")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| {
                    l.strip_prefix("write_bytes: ")
                        .map(|v| v.trim().parse().ok())
                })
                .flatten()
        })
        .unwrap_or(0)
}

fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

async fn put_all(store: &Store, keys: impl Iterator<Item = u64>, value: &[u8]) {
    let keys: Vec<u64> = keys.collect();
    for chunk in keys.chunks(100) {
        let success = chunk
            .iter()
            .map(|k| TxnOp::Put {
                key: format!("key/{k:08}").into(),
                value: bytes::Bytes::copy_from_slice(value),
                options: PutOptions::default(),
            })
            .collect();
        let req = TxnRequest {
            compare: Vec::new(),
            success,
            failure: Vec::new(),
        };
        store.txn(req).await.expect("load txn");
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let n: u64 = args.next().map_or(Ok(50_000), |a| a.parse())?;
    let size: usize = args.next().map_or(Ok(1024), |a| a.parse())?;
    let changed: u64 = args.next().map_or(Ok(500), |a| a.parse())?;
    let dir = tempfile::tempdir()?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let config = StoreConfig::default()
            .durability(Durability::NoSync)
            .max_txn_ops(1000);
        let store = Store::open(dir.path(), config.clone()).await?;
        let value = vec![b'v'; size];
        put_all(&store, 0..n, &value).await;
        println!("loaded {n} keys of {size} bytes");

        let (w0, t0) = (written(), Instant::now());
        store.compact(store.current_revision()).await?;
        let first = store.last_checkpoint().ok_or("no checkpoint")?;
        println!(
            "first compaction: {:.3} s (checkpoint {:.3} s, {} rows, {:.1} MiB of rows), \
             {:.1} MiB written",
            t0.elapsed().as_secs_f64(),
            first.elapsed.as_secs_f64(),
            first.rows,
            mib(first.bytes),
            mib(written() - w0)
        );

        // A scattered `changed` keys, rewritten.
        let step = (n / changed.max(1)).max(1);
        put_all(&store, (0..changed).map(|i| (i * step + 7) % n), &value).await;
        let (w0, t0) = (written(), Instant::now());
        store.compact(store.current_revision()).await?;
        let second = store.last_checkpoint().ok_or("no checkpoint")?;
        println!(
            "compaction after {changed} changed keys: {:.3} s (checkpoint {:.3} s, {} rows, \
             {:.2} MiB of rows), {:.2} MiB written",
            t0.elapsed().as_secs_f64(),
            second.elapsed.as_secs_f64(),
            second.rows,
            mib(second.bytes),
            mib(written() - w0)
        );

        // The former whole-state snapshot of the same state: encode, write, fsync.
        let kvs = store.range(RangeRequest::new(KeyRange::all())).await?.kvs;
        let (w0, t0) = (written(), Instant::now());
        let events = kvs.into_iter().map(|kv| Event::put(kv, None)).collect();
        let rev = store.current_revision();
        let encoded = event_log::codec::encode(&ChangeSet::new(rev, events), 0);
        let legacy = dir.path().join("legacy.snapshot");
        let mut f = std::fs::File::create(&legacy)?;
        f.write_all(&encoded.bytes)?;
        f.sync_all()?;
        drop(f);
        println!(
            "whole-state snapshot (the former state.snapshot): {:.3} s, {:.1} MiB written",
            t0.elapsed().as_secs_f64(),
            mib(written() - w0)
        );
        store.close().await?;
        drop(store);

        let t0 = Instant::now();
        let bytes = std::fs::read(&legacy)?;
        let cs = event_log::codec::decode_standalone(&bytes)?;
        println!(
            "reading it back whole: {:.3} s ({} keys, {:.1} MiB in one buffer)",
            t0.elapsed().as_secs_f64(),
            cs.events.len(),
            mib(bytes.len() as u64)
        );
        drop((bytes, cs));
        std::fs::remove_file(&legacy)?;
        let t0 = Instant::now();
        let store = Store::open(dir.path(), config).await?;
        println!(
            "reopening (streaming {STATE_FILE}, {:.1} MiB): {:.3} s, {} keys",
            mib(std::fs::metadata(dir.path().join(STATE_FILE))?.len()),
            t0.elapsed().as_secs_f64(),
            store.key_count()
        );
        let t0 = Instant::now();
        store.defragment().await?;
        println!(
            "after a defragmentation ({:.3} s): {STATE_FILE} {:.1} MiB",
            t0.elapsed().as_secs_f64(),
            mib(std::fs::metadata(dir.path().join(STATE_FILE))?.len()),
        );
        store.close().await?;
        Ok::<_, Box<dyn std::error::Error>>(())
    })
}

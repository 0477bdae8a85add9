//! Crash-test child: opens the store in `argv[1]` with `Durability::Fsync`, then writes from
//! several concurrent writers over a small keyspace while a compactor compacts to the current
//! revision again and again (each compaction checkpoints the persisted state, then compacts
//! the log). Prints, flushed, `ack <revision> <key> <value>` for every acknowledged put and
//! `compact <revision>` before each compaction, forever, until the parent kills it with
//! SIGKILL.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kv_store::{Durability, PutOptions, Store, StoreConfig};

const WRITERS: usize = 4;
/// Keys written; few enough that checkpoints update existing rows, many enough that each
/// checkpoint writes a few hundred.
const KEYS: u64 = 2048;
/// Revisions between compactions.
const COMPACT_EVERY: u64 = 64;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn main() -> Result<(), BoxError> {
    let dir = std::env::args()
        .nth(1)
        .ok_or("usage: kv-store-crash-child <dir>")?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let store = Store::open(&dir, StoreConfig::default().durability(Durability::Fsync)).await?;
        let out = Arc::new(Mutex::new(std::io::stdout()));
        let seed = std::process::id() as u64;
        let mut tasks = tokio::task::JoinSet::new();
        for w in 0..WRITERS {
            tasks.spawn(writer(store.clone(), out.clone(), seed, w));
        }
        tasks.spawn(compactor(store.clone(), out.clone()));
        // The tasks run forever: the first to end failed, and the process exits with it (the
        // parent then sees its output end).
        match tasks.join_next().await {
            Some(result) => result?,
            None => Ok(()),
        }
    })
}

fn say(out: &Mutex<std::io::Stdout>, line: &str) -> Result<(), BoxError> {
    let mut out = out.lock().map_err(|_| "stdout lock poisoned")?;
    writeln!(out, "{line}")?;
    out.flush()?;
    Ok(())
}

async fn writer(
    store: Store,
    out: Arc<Mutex<std::io::Stdout>>,
    seed: u64,
    w: usize,
) -> Result<(), BoxError> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (w as u64 + 1);
    for seq in 0u64.. {
        // xorshift64: a key spread over the keyspace.
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let key = format!("k{:05}", x % KEYS);
        // Unique per process, writer and sequence number, padded to 200 bytes.
        let value = format!("{seed}-{w}-{seq}-{}", "v".repeat(160));
        let r = store
            .put(key.clone(), value.clone(), PutOptions::default())
            .await?;
        say(&out, &format!("ack {} {key} {value}", r.revision))?;
    }
    Ok(())
}

async fn compactor(store: Store, out: Arc<Mutex<std::io::Stdout>>) -> Result<(), BoxError> {
    loop {
        let current = store.current_revision();
        if current >= store.compacted_revision() + COMPACT_EVERY {
            say(&out, &format!("compact {current}"))?;
            store.compact(current).await?;
        } else {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}

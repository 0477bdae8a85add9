//! Appends change sets one at a time (a batch of one each, the commit path of a lone put) so
//! a profiler can split one commit's cost between the record, the key index, the metadata and
//! redb's commit. Run under callgrind:
//!
//! ```text
//! cargo build --release -p event-log --example append_profile
//! valgrind --tool=callgrind --callgrind-out-file=/tmp/append.cg \
//!     target/release/examples/append_profile 2000 fsync
//! callgrind_annotate --inclusive=yes /tmp/append.cg | grep -E 'append_batch|insert|commit'
//! ```
//!
//! Arguments: change sets (default 2000), `fsync` or `no-sync` (default `no-sync`), a
//! batch size (default 1: each append waits for its own commit; larger: batches of that many
//! change sets go straight to `RedbStore::append_batch`, the writer's share of a busy log),
//! and `wal` or `no-wal` (default `wal`: the write-ahead file on, as `LogConfig` defaults).
//! Keys cycle over 100,000 names in a scattered order, as many clients' keys would.

use event_log::{Durability, EventLog, LogConfig, LogStore, RedbOptions, RedbStore};
use watch_core::{ChangeSet, Event, KeyValue};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let n: u64 = args.next().map_or(Ok(2000), |a| a.parse())?;
    let durability = match args.next().as_deref() {
        Some("fsync") => Durability::Fsync,
        _ => Durability::NoSync,
    };
    let batch: u64 = args.next().map_or(Ok(1), |a| a.parse())?.max(1);
    let wal = match args.next().as_deref() {
        Some("no-wal") => None,
        _ => Some(event_log::WalLimits::default()),
    };
    let dir = tempfile::tempdir()?;
    let change = |rev: u64| {
        // A multiplicative scatter over 100,000 key names.
        let kv = KeyValue {
            key: format!("/spread/{:07}", rev.wrapping_mul(7919) % 100_000).into(),
            value: vec![b'v'; 64].into(),
            create_revision: rev,
            mod_revision: rev,
            version: 1,
            lease: 0,
        };
        ChangeSet::new(rev, vec![Event::put(kv, None)])
    };
    let started = std::time::Instant::now();
    if batch > 1 {
        let store = RedbStore::open(
            dir.path().join(event_log::STORE_FILE),
            RedbOptions {
                durability,
                wal,
                ..RedbOptions::default()
            },
        )?;
        let revs: Vec<u64> = (1..=n).collect();
        for chunk in revs.chunks(usize::try_from(batch).unwrap_or(usize::MAX)) {
            let records: Vec<_> = chunk
                .iter()
                .map(|&rev| event_log::codec::encode(&change(rev), 0))
                .collect();
            store.append_batch(&records)?;
        }
    } else {
        let config = LogConfig {
            durability,
            wal,
            ..LogConfig::default()
        };
        let rt = tokio::runtime::Builder::new_current_thread().build()?;
        rt.block_on(async {
            let log = EventLog::open(dir.path(), config)?;
            for rev in 1..=n {
                log.append(change(rev)).await?;
            }
            log.close()
        })?;
    }
    let per = started.elapsed() / u32::try_from(n.max(1)).unwrap_or(u32::MAX);
    println!(
        "{n} appends in batches of {batch}, {per:?} each ({durability:?}, wal {})",
        wal.is_some()
    );
    Ok(())
}

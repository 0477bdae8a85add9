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
//! Arguments: change sets (default 2000), `fsync` or `no-sync` (default `no-sync`).

use event_log::{Durability, EventLog, LogConfig};
use watch_core::{ChangeSet, Event, KeyValue};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let n: u64 = args.next().map_or(Ok(2000), |a| a.parse())?;
    let durability = match args.next().as_deref() {
        Some("fsync") => Durability::Fsync,
        _ => Durability::NoSync,
    };
    let dir = tempfile::tempdir()?;
    let config = LogConfig {
        durability,
        ..LogConfig::default()
    };
    let rt = tokio::runtime::Builder::new_current_thread().build()?;
    rt.block_on(async {
        let log = EventLog::open(dir.path(), config)?;
        let started = std::time::Instant::now();
        for rev in 1..=n {
            let kv = KeyValue {
                key: format!("/spread/{:07}", rev % 1000).into(),
                value: vec![b'v'; 64].into(),
                create_revision: rev,
                mod_revision: rev,
                version: 1,
                lease: 0,
            };
            log.append(ChangeSet::new(rev, vec![Event::put(kv, None)]))
                .await?;
        }
        let per = started.elapsed() / u32::try_from(n.max(1)).unwrap_or(u32::MAX);
        println!("{n} appends, {per:?} each ({durability:?})");
        log.close()?;
        Ok::<_, event_log::LogError>(())
    })?;
    Ok(())
}

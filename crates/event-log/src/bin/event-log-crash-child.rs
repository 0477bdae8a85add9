//! Crash-test child: appends change sets to the event log in `argv[1]` from several concurrent
//! submitters with `Durability::Fsync`, printing `ack <revision>` (flushed) for every
//! acknowledged append, and compacts behind them in small steps, printing `compacted
//! <revision>` for every answered compaction, forever, until the parent kills it with SIGKILL.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use event_log::{Durability, EventLog, LogConfig, Revision};
use tokio::sync::Notify;

#[path = "../../tests/it/common/crash_payload.rs"]
mod crash_payload;

const SUBMITTERS: usize = 8;
/// Revisions deleted per compaction step: small, so that a compaction spans many steps
/// interleaved with append batches and a kill often lands between two of them.
const COMPACT_STEP: usize = 4;
/// Each compaction raises the compaction revision by this many revisions, once [`KEEP`] more
/// than that are acknowledged beyond it.
const COMPACT_EVERY: u64 = 40;
const KEEP: u64 = 20;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn main() -> Result<(), BoxError> {
    let dir = std::env::args()
        .nth(1)
        .ok_or("usage: event-log-crash-child <dir>")?;
    let config = LogConfig {
        durability: Durability::Fsync,
        batch_size: 64,
        compact_step_revisions: COMPACT_STEP,
        ..LogConfig::default()
    };
    let log = Arc::new(EventLog::open(&dir, config)?);
    // Revisions are allocated and queued under one lock so queue order is revision order.
    let next = Arc::new(tokio::sync::Mutex::new(log.last_revision() + 1));
    // The newest acknowledged revision (everything recovered at open is durable).
    let acked = Arc::new(AtomicU64::new(log.last_revision()));
    // Wakes the compactor after each acknowledgement (a permit is kept when it is busy).
    let acks = Arc::new(Notify::new());
    let stdout = Arc::new(Mutex::new(std::io::stdout()));
    let rt = tokio::runtime::Builder::new_current_thread().build()?;
    rt.block_on(async {
        let mut tasks: Vec<_> = (0..SUBMITTERS)
            .map(|_| {
                tokio::task::spawn(submitter(
                    log.clone(),
                    next.clone(),
                    acked.clone(),
                    acks.clone(),
                    stdout.clone(),
                ))
            })
            .collect();
        tasks.push(tokio::task::spawn(compactor(
            log.clone(),
            acked.clone(),
            acks.clone(),
            stdout.clone(),
        )));
        for t in tasks {
            t.await??;
        }
        Ok(())
    })
}

async fn submitter(
    log: Arc<EventLog>,
    next: Arc<tokio::sync::Mutex<Revision>>,
    acked: Arc<AtomicU64>,
    acks: Arc<Notify>,
    stdout: Arc<Mutex<std::io::Stdout>>,
) -> Result<(), BoxError> {
    loop {
        let ack = {
            let mut next = next.lock().await;
            let ack = log.submit(&crash_payload::change_set(*next)).await?;
            *next += 1;
            ack
        };
        let rev = ack.await?;
        acked.fetch_max(rev, Ordering::AcqRel);
        acks.notify_one();
        print_line(&stdout, &format!("ack {rev}"))?;
    }
}

/// Compacts [`COMPACT_EVERY`] revisions further whenever that leaves at least [`KEEP`]
/// acknowledged revisions above the compaction revision.
async fn compactor(
    log: Arc<EventLog>,
    acked: Arc<AtomicU64>,
    acks: Arc<Notify>,
    stdout: Arc<Mutex<std::io::Stdout>>,
) -> Result<(), BoxError> {
    loop {
        // A bounded compaction (a few steps), so that some end within a round.
        let target = log.compacted_revision() + COMPACT_EVERY;
        if target <= acked.load(Ordering::Acquire).saturating_sub(KEEP) {
            log.compact(target).await?;
            print_line(&stdout, &format!("compacted {target}"))?;
        } else {
            acks.notified().await;
        }
    }
}

fn print_line(stdout: &Mutex<std::io::Stdout>, line: &str) -> Result<(), BoxError> {
    let mut out = stdout.lock().map_err(|_| "stdout lock poisoned")?;
    writeln!(out, "{line}")?;
    out.flush()?;
    Ok(())
}

//! Crash-test child: appends change sets to the event log in `argv[1]` from several concurrent
//! submitters with `Durability::Fsync`, printing `ack <revision>` (flushed) for every
//! acknowledged append, forever, until the parent kills it with SIGKILL.

use std::io::Write;
use std::sync::{Arc, Mutex};

use event_log::{Durability, EventLog, LogConfig, Revision};

#[path = "../../tests/it/common/crash_payload.rs"]
mod crash_payload;

const SUBMITTERS: usize = 8;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn main() -> Result<(), BoxError> {
    let dir = std::env::args()
        .nth(1)
        .ok_or("usage: event-log-crash-child <dir>")?;
    let config = LogConfig {
        durability: Durability::Fsync,
        batch_size: 64,
        ..LogConfig::default()
    };
    let log = Arc::new(EventLog::open(&dir, config)?);
    // Revisions are allocated and queued under one lock so queue order is revision order.
    let next = Arc::new(tokio::sync::Mutex::new(log.last_revision() + 1));
    let stdout = Arc::new(Mutex::new(std::io::stdout()));
    let rt = tokio::runtime::Builder::new_current_thread().build()?;
    rt.block_on(async {
        let tasks: Vec<_> = (0..SUBMITTERS)
            .map(|_| tokio::task::spawn(submitter(log.clone(), next.clone(), stdout.clone())))
            .collect();
        for t in tasks {
            t.await??;
        }
        Ok(())
    })
}

async fn submitter(
    log: Arc<EventLog>,
    next: Arc<tokio::sync::Mutex<Revision>>,
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
        let mut out = stdout.lock().map_err(|_| "stdout lock poisoned")?;
        writeln!(out, "ack {rev}")?;
        out.flush()?;
    }
}

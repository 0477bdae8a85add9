//! The disk's own durable-write floor, measured in the same run as the servers: a put cannot be
//! acknowledged faster than one fsync, so the report compares put latency with this.

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::time::Instant;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::Error;

/// Bytes overwritten before each `fdatasync` (one page, as a small commit writes).
const BLOCK: usize = 4096;
/// Distinct blocks cycled through (the file is preallocated, so no sync changes its size).
const BLOCKS: usize = 16;

/// `fdatasync` latency of one page overwrite in a file on the servers' temp filesystem.
#[derive(Clone, Debug, Serialize)]
pub struct FsyncProbe {
    /// Samples taken.
    pub samples: usize,
    /// Median, ms.
    pub p50_ms: f64,
    /// 99th percentile, ms.
    pub p99_ms: f64,
}

/// Takes `samples` timings of "overwrite 4 KiB, `fdatasync`" in a fresh directory under the
/// default temp dir (where the servers' data directories are), then removes it.
pub fn probe(samples: usize) -> Result<FsyncProbe, Error> {
    let dir = std::env::temp_dir().join(format!("loadgen-fsync-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(io("create its directory"))?;
    let result = measure(&dir, samples);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// The error of a failed probe step.
fn io(what: &str) -> impl FnOnce(std::io::Error) -> Error {
    let what = format!("fsync probe: {what}");
    move |source| Error::from(testkit::Error::Io { what, source })
}

fn measure(dir: &std::path::Path, samples: usize) -> Result<FsyncProbe, Error> {
    let mut file = std::fs::File::create(dir.join("probe")).map_err(io("create"))?;
    file.write_all(&vec![0u8; BLOCK * BLOCKS])
        .map_err(io("preallocate"))?;
    file.sync_all().map_err(io("sync"))?;
    let page = vec![0xa5u8; BLOCK];
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("valid bounds");
    for i in 0..samples.max(1) {
        let started = Instant::now();
        file.write_all_at(&page, ((i % BLOCKS) * BLOCK) as u64)
            .map_err(io("write"))?;
        file.sync_data().map_err(io("fdatasync"))?;
        let us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        hist.saturating_record(us.max(1));
    }
    let ms = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
    Ok(FsyncProbe {
        samples: samples.max(1),
        p50_ms: ms(0.5),
        p99_ms: ms(0.99),
    })
}

//! Configuration of an [`crate::EventLog`].

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// Default bound of redb's page cache, in bytes (see [`crate::RedbOptions::cache_bytes`]).
pub const DEFAULT_CACHE_BYTES: usize = 64 << 20;

/// Default of [`LogConfig::compact_step_revisions`] (and of
/// [`crate::RedbOptions::compact_step_revisions`]): 256.
pub const DEFAULT_COMPACT_STEP: usize = 256;

/// How durable a commit is when `append` resolves. The one durability vocabulary of keywatch:
/// kv-store re-exports it, and the server's `--durability fsync|no-sync` parses it with
/// [`FromStr`] (spellings `fsync` and `no-sync`, also what [`fmt::Display`] writes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// Every batch is fsynced before any of its submitters is acknowledged (redb
    /// `Durability::Immediate`, one fsync per batch). The only setting for production.
    #[default]
    Fsync,
    /// No fsync (redb `Durability::None`): commits are atomic and visible but may vanish on a
    /// crash or power loss. **Tests and benchmarks only.**
    NoSync,
}

impl Durability {
    /// The user spelling of this setting (`fsync`, `no-sync`).
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Fsync => "fsync",
            Self::NoSync => "no-sync",
        }
    }
}

impl fmt::Display for Durability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A string that is neither `fsync` nor `no-sync`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown durability {0:?}: expected `fsync` or `no-sync`")]
pub struct ParseDurabilityError(pub String);

impl FromStr for Durability {
    type Err = ParseDurabilityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [Self::Fsync, Self::NoSync]
            .into_iter()
            .find(|d| d.as_str() == s)
            .ok_or_else(|| ParseDurabilityError(s.to_owned()))
    }
}

/// When the writer compacts old history by itself. Every bound that is set applies; the
/// newest change set is always kept. The default keeps everything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetentionPolicy {
    /// Keep at most this many change sets.
    pub keep_last: Option<u64>,
    /// Keep at most this many bytes of encoded change sets (index and page overhead not
    /// counted; the file does not shrink, freed pages are reused).
    pub max_bytes: Option<u64>,
    /// Drop change sets submitted longer ago than this.
    pub max_age: Option<Duration>,
    /// How often the writer evaluates the policy after a commit (`Duration::ZERO`: after every
    /// commit).
    pub check_interval: Duration,
}

impl RetentionPolicy {
    /// Keep everything (the default).
    pub const UNBOUNDED: Self = Self {
        keep_last: None,
        max_bytes: None,
        max_age: None,
        check_interval: Duration::from_secs(1),
    };

    /// True when no bound is set.
    pub fn is_unbounded(&self) -> bool {
        self.keep_last.is_none() && self.max_bytes.is_none() && self.max_age.is_none()
    }
}

impl Default for RetentionPolicy {
    fn default() -> Self {
        Self::UNBOUNDED
    }
}

/// Settings of an [`crate::EventLog`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogConfig {
    /// Commit durability.
    pub durability: Durability,
    /// Most change sets in one commit.
    pub batch_size: usize,
    /// Most encoded bytes in one commit (a single larger change set is committed alone).
    pub max_batch_bytes: usize,
    /// How long the writer waits for more change sets after the first of a batch before
    /// committing a batch that is not full. `ZERO` (default) commits whatever is queued as soon
    /// as the previous commit returns: under load, batches grow by themselves while an fsync
    /// runs, and an idle log adds no latency.
    pub flush_interval: Duration,
    /// Change sets that may wait in the submission queue. When it is full `append` waits and
    /// `try_append` fails with [`crate::LogError::QueueFull`].
    pub queue_capacity: usize,
    /// Automatic compaction.
    pub retention: RetentionPolicy,
    /// redb quick repair (see [`crate::RedbOptions::quick_repair`]): near-instant reopen after a
    /// crash at the cost of slower commits. Worth it when the file grows to GiBs.
    pub quick_repair: bool,
    /// Verify every page checksum at open (see [`crate::RedbOptions::verify_on_open`]). On by
    /// default: without it redb trusts the file, and a page damaged outside redb (disk error,
    /// stray write) can make a read silently skip records, which the torn-tail test observed.
    /// Costs a read of the whole file per open.
    pub verify_on_open: bool,
    /// Bound of the storage engine's in-memory page cache (see
    /// [`crate::RedbOptions::cache_bytes`]); 64 MiB by default.
    pub cache_bytes: usize,
    /// The write-ahead file's limits (see [`crate::RedbOptions::wal`]); `None` commits every
    /// batch to redb durably (1.35–2× slower commits, measured in docs/benchmarks.md).
    pub wal: Option<crate::WalLimits>,
    /// Most revisions one compaction step deletes (see
    /// [`crate::RedbOptions::compact_step_revisions`]); 256 by default.
    pub compact_step_revisions: usize,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            durability: Durability::Fsync,
            batch_size: 1024,
            max_batch_bytes: 8 << 20,
            flush_interval: Duration::ZERO,
            queue_capacity: 8192,
            retention: RetentionPolicy::UNBOUNDED,
            quick_repair: false,
            verify_on_open: true,
            cache_bytes: DEFAULT_CACHE_BYTES,
            wal: Some(crate::WalLimits::default()),
            compact_step_revisions: DEFAULT_COMPACT_STEP,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Durability;

    #[test]
    fn durability_spellings_round_trip() {
        for d in [Durability::Fsync, Durability::NoSync] {
            assert_eq!(d.to_string().parse::<Durability>(), Ok(d));
        }
        assert_eq!("no-sync".parse::<Durability>(), Ok(Durability::NoSync));
        let err = "Immediate".parse::<Durability>().unwrap_err();
        assert!(err.to_string().contains("`fsync` or `no-sync`"), "{err}");
    }
}

//! Server configuration: command-line flags, environment variables and an optional TOML file.
//!
//! Precedence, highest first: **flags > environment variables > config file > defaults**.
//! Every flag `--some-flag` has the environment variable `KEYWATCH_SOME_FLAG` and the file key
//! `some_flag` (see [`FileConfig`]). Users and roles exist only in the file, under `[auth]`
//! (see [`crate::auth`] and `docs/security.md`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use clap::Parser;
use serde::Deserialize;

pub use crate::config_error::ConfigError;
use kv_store::Durability;

/// etcd's default `--max-request-bytes` (1.5 MiB).
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 1536 * 1024;

/// Format of the log lines the binary writes to stderr.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LogFormat {
    /// Human-readable lines (default).
    #[default]
    Text,
    /// One JSON object per line, with span fields (peer, method, watch_id, ...).
    Json,
}

/// Command-line flags (each with an environment variable).
#[derive(Debug, Clone, Default, Parser)]
#[command(
    name = "watch-server",
    version,
    about = "keywatch: an etcd v3 compatible KV + watch server",
    after_help = "Precedence: flags > KEYWATCH_* environment variables > the --config file > \
                  defaults. File keys are the flag names with underscores (e.g. metrics_listen). \
                  See docs/operations.md."
)]
pub struct Cli {
    /// TOML config file (keys as the flags, with underscores; default: none).
    #[arg(long, env = "KEYWATCH_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address to serve gRPC on, host:port (default 127.0.0.1:2379; port 0 picks a free one).
    #[arg(long, env = "KEYWATCH_LISTEN")]
    pub listen: Option<String>,
    /// Data directory (default ./data).
    #[arg(long, env = "KEYWATCH_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Commit durability: fsync (default) or no-sync (tests and benchmarks only).
    #[arg(long, env = "KEYWATCH_DURABILITY", value_parser = Durability::from_str)]
    pub durability: Option<Durability>,
    /// Largest request in bytes (default 1572864, etcd's); the gRPC receive limit is this plus
    /// 512 KiB.
    #[arg(long, env = "KEYWATCH_MAX_REQUEST_BYTES")]
    pub max_request_bytes: Option<usize>,
    /// Most watchers in the whole server (default 1000000).
    #[arg(long, env = "KEYWATCH_MAX_WATCHERS")]
    pub max_watchers: Option<usize>,
    /// Most watchers on one watch stream (default 100000).
    #[arg(long, env = "KEYWATCH_MAX_WATCHERS_PER_STREAM")]
    pub max_watchers_per_stream: Option<usize>,
    /// Most watchers on one client connection, over all its streams (default 100000).
    #[arg(long, env = "KEYWATCH_MAX_WATCHERS_PER_CONNECTION")]
    pub max_watchers_per_connection: Option<usize>,
    /// Most watchers of one user, over all connections, with authentication on (default
    /// 500000).
    #[arg(long, env = "KEYWATCH_MAX_WATCHERS_PER_USER")]
    pub max_watchers_per_user: Option<usize>,
    /// Most open client connections (gRPC and HTTP); one beyond it is closed at once
    /// (default 10000).
    #[arg(long, env = "KEYWATCH_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Interval of progress notifications for watches that ask for them, e.g. 10m, 5s, 500ms
    /// (default 10m, etcd's; minimum 100ms).
    #[arg(long, env = "KEYWATCH_PROGRESS_INTERVAL")]
    pub progress_interval: Option<String>,
    /// Most compares or ops per txn list (default 128, etcd's).
    #[arg(long, env = "KEYWATCH_MAX_TXN_OPS")]
    pub max_txn_ops: Option<usize>,
    /// Revisions queued per watcher before it is caught up from the log (default 64).
    #[arg(long, env = "KEYWATCH_WATCH_BUFFER")]
    pub watch_buffer: Option<u32>,
    /// Bytes queued per watch stream (messages counted with the memory of the events they
    /// hold) before its watchers are caught up from the log (default 16777216).
    #[arg(long, env = "KEYWATCH_WATCH_STREAM_BYTES")]
    pub watch_stream_bytes: Option<usize>,
    /// Bytes of recent revisions kept in memory for watchers (events counted with their
    /// bookkeeping); older revisions are read from the log (default 67108864).
    #[arg(long, env = "KEYWATCH_WATCH_WINDOW_BYTES")]
    pub watch_window_bytes: Option<usize>,
    /// Most leases alive at once; a grant beyond it fails with RESOURCE_EXHAUSTED
    /// (default 1000000).
    #[arg(long, env = "KEYWATCH_MAX_LEASES")]
    pub max_leases: Option<usize>,
    /// Smallest lease TTL in seconds; shorter grants are raised to it (default 2, etcd 3.4's
    /// with its default election timeout).
    #[arg(long, env = "KEYWATCH_MIN_LEASE_TTL")]
    pub min_lease_ttl: Option<i64>,
    /// Space quota in bytes of the data files, as etcd's: past it, writes that add data fail
    /// with "mvcc: database space exceeded" and the NOSPACE alarm is raised (default and 0:
    /// 2147483648, etcd's 2 GiB; negative: no quota). See docs/operations.md.
    #[arg(long, env = "KEYWATCH_QUOTA_BACKEND_BYTES", allow_hyphen_values = true)]
    pub quota_backend_bytes: Option<i64>,
    /// Most bytes of keys and values a compaction's checkpoint folds in memory before writing
    /// them to state.redb; a larger window is written in several flushes (default 67108864,
    /// at least 1048576). See docs/operations.md.
    #[arg(long, env = "KEYWATCH_CHECKPOINT_FOLD_BYTES")]
    pub checkpoint_fold_bytes: Option<usize>,
    /// Most bytes of records the event log's write-ahead file takes between two durable
    /// commits of the log (default 16777216, at most 1073741824; 0: no write-ahead file, every
    /// commit a durable redb commit). See docs/operations.md.
    #[arg(long, env = "KEYWATCH_WAL_BYTES")]
    pub wal_bytes: Option<u64>,
    /// Most revisions one step of a compaction deletes in one commit of the event log; puts
    /// wait for at most one step (default 256, at least 1). See docs/operations.md.
    #[arg(long, env = "KEYWATCH_COMPACT_STEP_REVISIONS")]
    pub compact_step_revisions: Option<usize>,
    /// Log filter, tracing-subscriber EnvFilter syntax (default "info").
    #[arg(long, env = "KEYWATCH_LOG")]
    pub log_filter: Option<String>,
    /// Mirror mode: upstream etcd client URLs, comma-separated (e.g.
    /// http://10.0.0.1:2379,http://10.0.0.2:2379). See docs/cluster.md (default: unset, a
    /// standalone server).
    #[arg(long, env = "KEYWATCH_UPSTREAM")]
    pub upstream: Option<String>,
    /// Mirror mode: a key prefix to mirror, taken as is (commas included); repeat for several
    /// (default: none, the whole keyspace). No environment form of its own: the environment's
    /// is KEYWATCH_UPSTREAM_PREFIX, comma-separated (--upstream-prefixes), which this wins
    /// over.
    #[arg(long = "upstream-prefix")]
    pub upstream_prefix: Vec<String>,
    /// Mirror mode: comma-separated key prefixes to mirror (the list form of
    /// --upstream-prefix, for the environment; a prefix holding a comma needs --upstream-prefix
    /// or the file) (default: none, the whole keyspace).
    #[arg(
        long = "upstream-prefixes",
        env = "KEYWATCH_UPSTREAM_PREFIX",
        value_delimiter = ','
    )]
    pub upstream_prefixes: Vec<String>,
    /// Mirror mode: longest wait of a linearizable read or a write for the mirror to catch up
    /// with etcd before failing with Unavailable (default 5s).
    #[arg(long, env = "KEYWATCH_UPSTREAM_BARRIER_TIMEOUT")]
    pub upstream_barrier_timeout: Option<String>,
    /// Mirror mode: keys per page of the snapshot read from etcd (default 1000).
    #[arg(long, env = "KEYWATCH_UPSTREAM_SNAPSHOT_PAGE")]
    pub upstream_snapshot_page: Option<usize>,
    /// Mirror mode: about how many bytes (keys + values) a snapshot page holds: each page
    /// asks for as many keys as fit, judged by the previous page (default 4194304, at most
    /// --upstream-snapshot-page keys).
    #[arg(long, env = "KEYWATCH_UPSTREAM_SNAPSHOT_PAGE_BYTES")]
    pub upstream_snapshot_page_bytes: Option<usize>,
    /// Mirror mode: keep the local history of the last this many etcd revisions and compact
    /// the rest (default: keep everything).
    #[arg(long, env = "KEYWATCH_UPSTREAM_RETAIN_REVISIONS")]
    pub upstream_retain_revisions: Option<u64>,
    /// Mirror mode: largest response accepted from etcd, in bytes (snapshot pages, forwarded
    /// answers, watch responses) (default 2147483647, etcd clientv3's receive limit).
    #[arg(long, env = "KEYWATCH_UPSTREAM_MAX_RESPONSE_BYTES")]
    pub upstream_max_response_bytes: Option<usize>,
    /// Mirror mode: how often to ask etcd whether it was compacted (a compaction made on etcd
    /// directly, or through another replica, then applies here), e.g. 10s; "off": never
    /// (default 10s).
    #[arg(long, env = "KEYWATCH_UPSTREAM_COMPACTION_CHECK")]
    pub upstream_compaction_check: Option<String>,
    /// Mirror mode: CA bundle (PEM) verifying etcd's server certificates; needed by https://
    /// endpoints (grpc-proxy's --cacert) (default none).
    #[arg(long, env = "KEYWATCH_UPSTREAM_CACERT")]
    pub upstream_cacert: Option<PathBuf>,
    /// Mirror mode: client certificate (PEM) presented to etcd, for --client-cert-auth
    /// (grpc-proxy's --cert) (default none).
    #[arg(long, env = "KEYWATCH_UPSTREAM_CERT")]
    pub upstream_cert: Option<PathBuf>,
    /// Mirror mode: the client certificate's private key (PEM) (grpc-proxy's --key) (default
    /// none).
    #[arg(long, env = "KEYWATCH_UPSTREAM_KEY")]
    pub upstream_key: Option<PathBuf>,
    /// Mirror mode: etcd user, as `name` or `name:password` (etcdctl's --user); its token is
    /// fetched and renewed (default none).
    #[arg(long, env = "KEYWATCH_UPSTREAM_USER")]
    pub upstream_user: Option<String>,
    /// Mirror mode: the etcd user's password, when --upstream-user has none (etcdctl's
    /// --password) (default none).
    #[arg(long, env = "KEYWATCH_UPSTREAM_PASSWORD")]
    pub upstream_password: Option<String>,
    /// Mirror mode: an etcd auth token used as is, instead of --upstream-user (never renewed)
    /// (default none).
    #[arg(long, env = "KEYWATCH_UPSTREAM_TOKEN")]
    pub upstream_token: Option<String>,
    /// Log line format on stderr (default text).
    #[arg(long, env = "KEYWATCH_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    /// Address of the Prometheus metrics endpoint (GET /metrics), ip:port (default: disabled;
    /// "off" disables it; use a loopback address such as 127.0.0.1:9379 unless the scraper is
    /// remote).
    #[arg(long, env = "KEYWATCH_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,
    /// Longest wait, after SIGINT/SIGTERM, for in-flight requests and streams to finish before
    /// they are cut and the store is closed, e.g. 10s (default 10s).
    #[arg(long, env = "KEYWATCH_SHUTDOWN_TIMEOUT")]
    pub shutdown_timeout: Option<String>,
    /// TLS: the server certificate (PEM); with --key-file, clients must use https:// (default
    /// none: plain TCP).
    #[arg(long, env = "KEYWATCH_CERT_FILE")]
    pub cert_file: Option<PathBuf>,
    /// TLS: the server certificate's private key (PEM) (default none).
    #[arg(long, env = "KEYWATCH_KEY_FILE")]
    pub key_file: Option<PathBuf>,
    /// TLS: the CA (PEM) client certificates must chain to, for --client-cert-auth (default
    /// none).
    #[arg(long, env = "KEYWATCH_TRUSTED_CA_FILE")]
    pub trusted_ca_file: Option<PathBuf>,
    /// TLS: require every client to present a certificate signed by --trusted-ca-file
    /// (default false).
    #[arg(long, env = "KEYWATCH_CLIENT_CERT_AUTH", num_args = 0..=1, default_missing_value = "true")]
    pub client_cert_auth: Option<bool>,
    /// TLS: close a connection whose handshake has not finished by then, e.g. 10s, 500ms
    /// (default 10s).
    #[arg(long, env = "KEYWATCH_TLS_HANDSHAKE_TIMEOUT")]
    pub tls_handshake_timeout: Option<String>,
    /// Auth: how long a token stays valid after its last use, e.g. 300 or 5m (default 300 s,
    /// etcd's). Users and roles are managed with the Auth RPCs (etcdctl user/role); the config
    /// file's `[auth]` section seeds a new data directory.
    #[arg(long, env = "KEYWATCH_AUTH_TOKEN_TTL")]
    pub auth_token_ttl: Option<String>,
    /// Auth: password checks (bcrypt, CPU-bound) running at once (default: the CPUs).
    #[arg(long, env = "KEYWATCH_AUTH_MAX_CONCURRENT_HASHES")]
    pub auth_max_concurrent_hashes: Option<usize>,
    /// Auth: logins waiting for a password check beyond the running ones; more are refused
    /// with "etcdserver: too many requests" (default 64).
    #[arg(long, env = "KEYWATCH_AUTH_MAX_QUEUED_LOGINS")]
    pub auth_max_queued_logins: Option<usize>,
    /// A tool instead of the server (e.g. `hash-password`).
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Tools of the `watch-server` binary.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Command {
    /// Reads a password from the first line of stdin and prints its bcrypt hash, for a user's
    /// `password_hash` in the config file's `[auth]` section.
    HashPassword {
        /// bcrypt cost, 4 to 16 (default 10, etcd's): each step doubles the time to check.
        #[arg(long, default_value_t = 10)]
        cost: u32,
    },
    /// Installs a backup taken with Maintenance.Snapshot (`etcdctl snapshot save`) as a new
    /// data directory, then exits; start the server on that directory afterwards. See
    /// docs/operations.md.
    Restore {
        /// The backup file (as `etcdctl snapshot save` wrote it; its SHA-256 is checked).
        file: PathBuf,
        /// The data directory to create; it must not hold a store yet.
        #[arg(long)]
        data_dir: PathBuf,
    },
}

/// The config file's keys; every key is optional.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct FileConfig {
    pub listen: Option<String>,
    pub data_dir: Option<PathBuf>,
    #[serde(default, deserialize_with = "durability_from_str")]
    pub durability: Option<Durability>,
    pub max_request_bytes: Option<usize>,
    pub max_watchers: Option<usize>,
    pub max_watchers_per_stream: Option<usize>,
    pub max_watchers_per_connection: Option<usize>,
    pub max_watchers_per_user: Option<usize>,
    pub max_connections: Option<usize>,
    pub progress_interval: Option<String>,
    pub max_txn_ops: Option<usize>,
    pub watch_buffer: Option<u32>,
    pub watch_stream_bytes: Option<usize>,
    pub watch_window_bytes: Option<usize>,
    pub log_filter: Option<String>,
    pub upstream: Option<String>,
    pub upstream_prefix: Option<Vec<String>>,
    pub upstream_barrier_timeout: Option<String>,
    pub upstream_snapshot_page: Option<usize>,
    pub upstream_snapshot_page_bytes: Option<usize>,
    pub upstream_retain_revisions: Option<u64>,
    pub upstream_max_response_bytes: Option<usize>,
    pub upstream_compaction_check: Option<String>,
    pub upstream_cacert: Option<PathBuf>,
    pub upstream_cert: Option<PathBuf>,
    pub upstream_key: Option<PathBuf>,
    pub upstream_user: Option<String>,
    pub upstream_password: Option<String>,
    pub upstream_token: Option<String>,
    pub log_format: Option<LogFormat>,
    pub metrics_listen: Option<String>,
    pub shutdown_timeout: Option<String>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub trusted_ca_file: Option<PathBuf>,
    pub client_cert_auth: Option<bool>,
    pub tls_handshake_timeout: Option<String>,
    pub auth_token_ttl: Option<String>,
    pub auth_max_concurrent_hashes: Option<usize>,
    pub auth_max_queued_logins: Option<usize>,
    /// Users and roles that seed a new data directory (with authentication on).
    pub auth: Option<crate::auth::AuthFileConfig>,
    pub max_leases: Option<usize>,
    pub min_lease_ttl: Option<i64>,
    pub quota_backend_bytes: Option<i64>,
    pub checkpoint_fold_bytes: Option<usize>,
    pub wal_bytes: Option<u64>,
    pub compact_step_revisions: Option<usize>,
}

/// The resolved server configuration.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ServerConfig {
    /// Address to serve on.
    pub listen: String,
    /// Data directory.
    pub data_dir: PathBuf,
    /// Commit durability.
    pub durability: Durability,
    /// Largest request in bytes.
    pub max_request_bytes: usize,
    /// Most watchers in the server.
    pub max_watchers: usize,
    /// Most watchers on one stream.
    pub max_watchers_per_stream: usize,
    /// Most watchers on one client connection, over all its streams. The default (100,000)
    /// is the per-stream limit: etcd's Go client multiplexes every watch of a client onto one
    /// connection, so a client that fits on one stream fits on its connection, and taking the
    /// whole server's 1,000,000 takes ten connections.
    pub max_watchers_per_connection: usize,
    /// Most watchers of one user over all its connections, with authentication on. The
    /// default (500,000) is half the server's cap: many clients share one user (a fleet's
    /// credentials), and no one user can take the whole server's budget.
    pub max_watchers_per_user: usize,
    /// Most open client connections. The default (10,000) is far above what etcd clients open
    /// (one connection per client) and below common descriptor limits (65,536 for a
    /// service, leaving room for the data files), so the server refuses a connection flood
    /// before it runs out of descriptors.
    pub max_connections: usize,
    /// Progress notification interval.
    pub progress_interval: Duration,
    /// Most compares or ops per txn list.
    pub max_txn_ops: usize,
    /// Engine queue size per watcher, in revisions.
    pub watch_buffer: u32,
    /// Bytes queued per watch stream before its watchers are caught up from the log.
    pub watch_stream_bytes: usize,
    /// Bytes of recent revisions the watch engine keeps in memory.
    pub watch_window_bytes: usize,
    /// Log filter (used by the binary only).
    pub log_filter: String,
    /// Mirror mode's upstream etcd endpoints (empty: standalone).
    pub upstream: Vec<String>,
    /// Mirrored prefixes (empty: the whole keyspace).
    pub upstream_prefixes: Vec<String>,
    /// Mirror mode: barrier timeout of linearizable reads and writes.
    pub upstream_barrier_timeout: Duration,
    /// Mirror mode: keys per snapshot page (at most).
    pub upstream_snapshot_page: usize,
    /// Mirror mode: bytes (keys + values) a snapshot page aims at.
    pub upstream_snapshot_page_bytes: usize,
    /// Mirror mode: revisions of local history kept (`None`: all).
    pub upstream_retain_revisions: Option<u64>,
    /// Mirror mode: largest response accepted from etcd, in bytes.
    pub upstream_max_response_bytes: usize,
    /// Mirror mode: interval of the upstream compaction check (`None`: off).
    pub upstream_compaction_check: Option<Duration>,
    /// Mirror mode: TLS towards etcd (`None`: http endpoints only).
    pub upstream_tls: Option<crate::mirror::UpstreamTls>,
    /// Mirror mode: etcd credentials (`None`: none sent).
    pub upstream_auth: Option<crate::mirror::UpstreamAuth>,
    /// Log line format (used by the binary only).
    pub log_format: LogFormat,
    /// Address of the Prometheus endpoint; `None`: no endpoint.
    pub metrics_listen: Option<SocketAddr>,
    /// Longest graceful-shutdown wait for in-flight requests and streams.
    pub shutdown_timeout: Duration,
    /// TLS for the listener; `None`: plain TCP.
    pub tls: Option<crate::tls::TlsSettings>,
    /// Login limits, and the `[auth]` section's users and roles that seed a new data
    /// directory (see [`crate::auth::Auth::open`]).
    pub auth: crate::auth::AuthSettings,
    /// Most leases alive at once.
    pub max_leases: usize,
    /// Smallest lease TTL in seconds (at least 1).
    pub min_lease_ttl: i64,
    /// Space quota in bytes, compared with the store's bytes in use; 0: none (only from a
    /// negative setting).
    pub quota_backend_bytes: u64,
    /// Most bytes of keys and values a checkpoint folds in memory between flushes.
    pub checkpoint_fold_bytes: usize,
    /// Most record bytes of the event log's write-ahead file between durable commits; 0: off.
    pub wal_bytes: u64,
    /// Most revisions one compaction step deletes (at least 1).
    pub compact_step_revisions: usize,
}

/// etcd's default space quota (`DefaultQuotaBytes`, 2 GiB), also what 0 means.
pub const DEFAULT_QUOTA_BYTES: u64 = 2 * 1024 * 1024 * 1024;

/// The quota as etcd reads `--quota-backend-bytes`: 0 is the default, negative is none.
fn quota_of(setting: i64) -> u64 {
    match setting {
        0 => DEFAULT_QUOTA_BYTES,
        n if n < 0 => 0,
        n => n as u64,
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:2379".to_owned(),
            data_dir: PathBuf::from("./data"),
            durability: Durability::Fsync,
            max_request_bytes: DEFAULT_MAX_REQUEST_BYTES,
            max_watchers: 1_000_000,
            max_watchers_per_stream: 100_000,
            max_watchers_per_connection: 100_000,
            max_watchers_per_user: 500_000,
            max_connections: 10_000,
            progress_interval: Duration::from_secs(600),
            max_txn_ops: 128,
            watch_buffer: 64,
            watch_stream_bytes: 16 << 20,
            watch_window_bytes: 64 << 20,
            log_filter: "info".to_owned(),
            upstream: Vec::new(),
            upstream_prefixes: Vec::new(),
            upstream_barrier_timeout: Duration::from_secs(5),
            upstream_snapshot_page: 1000,
            upstream_snapshot_page_bytes: crate::mirror::DEFAULT_SNAPSHOT_PAGE_BYTES,
            upstream_retain_revisions: None,
            upstream_max_response_bytes: crate::mirror::DEFAULT_MAX_RESPONSE_BYTES,
            upstream_compaction_check: Some(Duration::from_secs(10)),
            upstream_tls: None,
            upstream_auth: None,
            log_format: LogFormat::Text,
            metrics_listen: None,
            shutdown_timeout: Duration::from_secs(10),
            tls: None,
            auth: crate::auth::AuthSettings::default(),
            max_leases: 1_000_000,
            min_lease_ttl: kv_store::DEFAULT_MIN_LEASE_TTL,
            quota_backend_bytes: DEFAULT_QUOTA_BYTES,
            checkpoint_fold_bytes: kv_store::DEFAULT_CHECKPOINT_FOLD_BYTES,
            wal_bytes: kv_store::DEFAULT_WAL_BYTES,
            compact_step_revisions: kv_store::DEFAULT_COMPACT_STEP,
        }
    }
}

/// The mirror's etcd credentials from `--upstream-user` (`name` or `name:password`),
/// `--upstream-password` and `--upstream-token`.
fn upstream_auth(
    user: Option<String>,
    password: Option<String>,
    token: Option<String>,
) -> Result<Option<crate::mirror::UpstreamAuth>, ConfigError> {
    use crate::mirror::UpstreamAuth;
    let invalid = |field, message: &str| ConfigError::Invalid {
        field,
        message: message.to_owned(),
    };
    match (user, password, token) {
        (None, None, None) => Ok(None),
        (None, None, Some(t)) if !t.is_empty() => Ok(Some(UpstreamAuth::Token(t))),
        (None, None, Some(_)) => Err(invalid("upstream_token", "the token is empty")),
        (Some(_), _, Some(_)) => Err(invalid(
            "upstream_token",
            "give --upstream-user or --upstream-token, not both",
        )),
        (None, Some(_), _) => Err(invalid(
            "upstream_password",
            "--upstream-password needs --upstream-user",
        )),
        (Some(user), password, None) => {
            let (user, password) = match (user.split_once(':'), password) {
                (Some(_), Some(_)) => {
                    return Err(invalid(
                        "upstream_password",
                        "the password is in --upstream-user (name:password) and in \
                         --upstream-password; give it once",
                    ));
                }
                (Some((u, p)), None) => (u.to_owned(), p.to_owned()),
                (None, Some(p)) => (user, p),
                (None, None) => {
                    return Err(invalid(
                        "upstream_password",
                        "--upstream-user needs a password (name:password or \
                         --upstream-password)",
                    ));
                }
            };
            if user.is_empty() {
                return Err(invalid("upstream_user", "the user name is empty"));
            }
            Ok(Some(UpstreamAuth::Password { user, password }))
        }
    }
}

/// Reads the file's `durability` with the spellings of the flag ([`Durability`]'s `FromStr`).
fn durability_from_str<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<Durability>, D::Error> {
    let s = String::deserialize(d)?;
    s.parse().map(Some).map_err(serde::de::Error::custom)
}

/// Parses `10m`, `5s`, `500ms`, `1h` or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 10m, 5s or 500ms"))?;
    let too_long = || format!("{s:?} is too long a duration");
    match unit.trim() {
        "ms" => Ok(Duration::from_millis(n)),
        "" | "s" => Ok(Duration::from_secs(n)),
        "m" => n
            .checked_mul(60)
            .map(Duration::from_secs)
            .ok_or_else(too_long),
        "h" => n
            .checked_mul(3600)
            .map(Duration::from_secs)
            .ok_or_else(too_long),
        other => Err(format!(
            "unknown duration unit {other:?} (use ms, s, m or h)"
        )),
    }
}

/// `off` or empty: disabled; otherwise an `ip:port` socket address (no host names: the
/// endpoint's exposure should be explicit).
fn parse_metrics_listen(s: &str) -> Result<Option<SocketAddr>, ConfigError> {
    let s = s.trim();
    if s.is_empty() || s.eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    s.parse().map(Some).map_err(|_| ConfigError::Invalid {
        field: "metrics_listen",
        message: format!("{s:?} is not ip:port (e.g. 127.0.0.1:9379) or \"off\""),
    })
}

/// The gRPC address must be `host:port` with a numeric port, checked before anything binds.
fn check_listen(listen: &str) -> Result<(), ConfigError> {
    let ok = listen
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
    if ok {
        Ok(())
    } else {
        Err(ConfigError::Invalid {
            field: "listen",
            message: format!("{listen:?} is not host:port (e.g. 127.0.0.1:2379)"),
        })
    }
}

impl ServerConfig {
    /// Resolves flags (already merged with environment variables by clap), then the config file
    /// named by `--config`, then defaults.
    pub fn from_cli(cli: Cli) -> Result<Self, ConfigError> {
        let file = match &cli.config {
            Some(path) => Self::read_file(path)?,
            None => FileConfig::default(),
        };
        Self::merge(cli, file)
    }

    fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })
    }

    /// Merges flags over a file over defaults.
    pub fn merge(cli: Cli, file: FileConfig) -> Result<Self, ConfigError> {
        let d = Self::default();
        let durability = cli.durability.or(file.durability).unwrap_or(d.durability);
        let progress_interval = match cli.progress_interval.or(file.progress_interval) {
            Some(s) => parse_duration(&s).map_err(|message| ConfigError::Invalid {
                field: "progress_interval",
                message,
            })?,
            None => d.progress_interval,
        };
        let mut c = Self {
            listen: cli.listen.or(file.listen).unwrap_or(d.listen),
            data_dir: cli.data_dir.or(file.data_dir).unwrap_or(d.data_dir),
            durability,
            max_request_bytes: cli
                .max_request_bytes
                .or(file.max_request_bytes)
                .unwrap_or(d.max_request_bytes),
            max_watchers: cli
                .max_watchers
                .or(file.max_watchers)
                .unwrap_or(d.max_watchers),
            max_watchers_per_stream: cli
                .max_watchers_per_stream
                .or(file.max_watchers_per_stream)
                .unwrap_or(d.max_watchers_per_stream),
            max_watchers_per_connection: cli
                .max_watchers_per_connection
                .or(file.max_watchers_per_connection)
                .unwrap_or(d.max_watchers_per_connection),
            max_watchers_per_user: cli
                .max_watchers_per_user
                .or(file.max_watchers_per_user)
                .unwrap_or(d.max_watchers_per_user),
            max_connections: cli
                .max_connections
                .or(file.max_connections)
                .unwrap_or(d.max_connections),
            // etcd's floor for the progress interval.
            progress_interval: progress_interval.max(Duration::from_millis(100)),
            max_txn_ops: cli
                .max_txn_ops
                .or(file.max_txn_ops)
                .unwrap_or(d.max_txn_ops),
            watch_buffer: cli
                .watch_buffer
                .or(file.watch_buffer)
                .unwrap_or(d.watch_buffer),
            watch_stream_bytes: cli
                .watch_stream_bytes
                .or(file.watch_stream_bytes)
                .unwrap_or(d.watch_stream_bytes),
            watch_window_bytes: cli
                .watch_window_bytes
                .or(file.watch_window_bytes)
                .unwrap_or(d.watch_window_bytes),
            log_filter: cli.log_filter.or(file.log_filter).unwrap_or(d.log_filter),
            upstream: cli
                .upstream
                .or(file.upstream)
                .map(|u| {
                    u.split(',')
                        .map(str::trim)
                        .filter(|e| !e.is_empty())
                        .map(str::to_owned)
                        .collect()
                })
                .unwrap_or_default(),
            upstream_prefixes: if !cli.upstream_prefix.is_empty() {
                cli.upstream_prefix
            } else if !cli.upstream_prefixes.is_empty() {
                cli.upstream_prefixes
            } else {
                file.upstream_prefix.unwrap_or_default()
            },
            upstream_barrier_timeout: match cli
                .upstream_barrier_timeout
                .or(file.upstream_barrier_timeout)
            {
                Some(s) => parse_duration(&s).map_err(|message| ConfigError::Invalid {
                    field: "upstream_barrier_timeout",
                    message,
                })?,
                None => d.upstream_barrier_timeout,
            },
            upstream_snapshot_page: cli
                .upstream_snapshot_page
                .or(file.upstream_snapshot_page)
                .unwrap_or(d.upstream_snapshot_page),
            upstream_snapshot_page_bytes: cli
                .upstream_snapshot_page_bytes
                .or(file.upstream_snapshot_page_bytes)
                .unwrap_or(d.upstream_snapshot_page_bytes),
            upstream_retain_revisions: cli
                .upstream_retain_revisions
                .or(file.upstream_retain_revisions),
            upstream_max_response_bytes: cli
                .upstream_max_response_bytes
                .or(file.upstream_max_response_bytes)
                .unwrap_or(d.upstream_max_response_bytes),
            log_format: cli.log_format.or(file.log_format).unwrap_or(d.log_format),
            metrics_listen: match cli.metrics_listen.or(file.metrics_listen) {
                Some(s) => parse_metrics_listen(&s)?,
                None => d.metrics_listen,
            },
            shutdown_timeout: d.shutdown_timeout,
            upstream_compaction_check: match cli
                .upstream_compaction_check
                .or(file.upstream_compaction_check)
            {
                Some(v) if v == "off" => None,
                Some(v) => match parse_duration(&v) {
                    Ok(d) if !d.is_zero() => Some(d),
                    Ok(_) => {
                        return Err(ConfigError::Invalid {
                            field: "upstream_compaction_check",
                            message: "must be above 0 (or \"off\")".to_owned(),
                        });
                    }
                    Err(message) => {
                        return Err(ConfigError::Invalid {
                            field: "upstream_compaction_check",
                            message,
                        });
                    }
                },
                None => d.upstream_compaction_check,
            },
            upstream_tls: crate::tls::load_upstream(
                cli.upstream_cacert
                    .as_ref()
                    .or(file.upstream_cacert.as_ref()),
                cli.upstream_cert.as_ref().or(file.upstream_cert.as_ref()),
                cli.upstream_key.as_ref().or(file.upstream_key.as_ref()),
            )?,
            upstream_auth: upstream_auth(
                cli.upstream_user.or(file.upstream_user),
                cli.upstream_password.or(file.upstream_password),
                cli.upstream_token.or(file.upstream_token),
            )?,
            tls: crate::tls::TlsSettings::load(
                cli.cert_file.as_ref().or(file.cert_file.as_ref()),
                cli.key_file.as_ref().or(file.key_file.as_ref()),
                cli.trusted_ca_file
                    .as_ref()
                    .or(file.trusted_ca_file.as_ref()),
                cli.client_cert_auth
                    .or(file.client_cert_auth)
                    .unwrap_or(false),
                match cli.tls_handshake_timeout.or(file.tls_handshake_timeout) {
                    Some(s) => parse_duration(&s).map_err(|message| ConfigError::Invalid {
                        field: "tls_handshake_timeout",
                        message,
                    })?,
                    None => crate::tls::DEFAULT_HANDSHAKE_TIMEOUT,
                },
            )?,
            auth: {
                let ttl = match cli.auth_token_ttl.or(file.auth_token_ttl) {
                    Some(s) => parse_duration(&s).map_err(|message| ConfigError::Invalid {
                        field: "auth_token_ttl",
                        message,
                    })?,
                    None => crate::auth::DEFAULT_TOKEN_TTL,
                };
                let mut settings = match &file.auth {
                    Some(auth) => crate::auth::AuthSettings::from_file(auth, ttl)?,
                    None => crate::auth::AuthSettings::default().with_token_ttl(ttl)?,
                };
                match cli
                    .auth_max_concurrent_hashes
                    .or(file.auth_max_concurrent_hashes)
                {
                    Some(0) => {
                        return Err(ConfigError::Invalid {
                            field: "auth_max_concurrent_hashes",
                            message: "must be at least 1".to_owned(),
                        });
                    }
                    Some(n) => settings.max_concurrent_hashes = n,
                    None => {}
                }
                if let Some(n) = cli.auth_max_queued_logins.or(file.auth_max_queued_logins) {
                    settings.max_queued_logins = n;
                }
                settings
            },
            max_leases: cli.max_leases.or(file.max_leases).unwrap_or(d.max_leases),
            min_lease_ttl: cli
                .min_lease_ttl
                .or(file.min_lease_ttl)
                .unwrap_or(d.min_lease_ttl),
            quota_backend_bytes: cli
                .quota_backend_bytes
                .or(file.quota_backend_bytes)
                .map_or(d.quota_backend_bytes, quota_of),
            checkpoint_fold_bytes: cli
                .checkpoint_fold_bytes
                .or(file.checkpoint_fold_bytes)
                .unwrap_or(d.checkpoint_fold_bytes),
            wal_bytes: cli.wal_bytes.or(file.wal_bytes).unwrap_or(d.wal_bytes),
            compact_step_revisions: cli
                .compact_step_revisions
                .or(file.compact_step_revisions)
                .unwrap_or(d.compact_step_revisions),
        };
        if let Some(s) = cli.shutdown_timeout.or(file.shutdown_timeout) {
            c.shutdown_timeout = parse_duration(&s).map_err(|message| ConfigError::Invalid {
                field: "shutdown_timeout",
                message,
            })?;
        }
        check_listen(&c.listen)?;
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&c.log_filter) {
            return Err(ConfigError::Invalid {
                field: "log_filter",
                message: format!("{:?}: {e}", c.log_filter),
            });
        }
        let positive = |field: &'static str, v: usize| {
            if v == 0 {
                Err(ConfigError::Invalid {
                    field,
                    message: "must be at least 1".to_owned(),
                })
            } else {
                Ok(())
            }
        };
        positive("max_request_bytes", c.max_request_bytes)?;
        positive("max_watchers", c.max_watchers)?;
        positive("max_watchers_per_stream", c.max_watchers_per_stream)?;
        positive("max_watchers_per_connection", c.max_watchers_per_connection)?;
        positive("max_watchers_per_user", c.max_watchers_per_user)?;
        positive("max_connections", c.max_connections)?;
        positive("max_txn_ops", c.max_txn_ops)?;
        positive("watch_buffer", c.watch_buffer as usize)?;
        positive("watch_stream_bytes", c.watch_stream_bytes)?;
        positive("watch_window_bytes", c.watch_window_bytes)?;
        positive("upstream_snapshot_page", c.upstream_snapshot_page)?;
        positive(
            "upstream_snapshot_page_bytes",
            c.upstream_snapshot_page_bytes,
        )?;
        positive("upstream_max_response_bytes", c.upstream_max_response_bytes)?;
        if c.upstream_barrier_timeout.is_zero() {
            // Every linearizable read and every write would fail at once.
            return Err(ConfigError::Invalid {
                field: "upstream_barrier_timeout",
                message: "must be above 0".to_owned(),
            });
        }
        if c.upstream_retain_revisions == Some(0) {
            return Err(ConfigError::Invalid {
                field: "upstream_retain_revisions",
                message: "must be at least 1".to_owned(),
            });
        }
        if !c.upstream_prefixes.is_empty() && c.upstream.is_empty() {
            return Err(ConfigError::Invalid {
                field: "upstream_prefix",
                message: "needs --upstream (mirror mode)".to_owned(),
            });
        }
        positive("max_leases", c.max_leases)?;
        positive("compact_step_revisions", c.compact_step_revisions)?;
        // The store refuses it at open too; here it is a configuration error, before any file
        // is touched.
        if c.checkpoint_fold_bytes < kv_store::MIN_CHECKPOINT_FOLD_BYTES {
            return Err(ConfigError::Invalid {
                field: "checkpoint_fold_bytes",
                message: format!(
                    "{} is below the minimum of {} bytes",
                    c.checkpoint_fold_bytes,
                    kv_store::MIN_CHECKPOINT_FOLD_BYTES
                ),
            });
        }
        if c.wal_bytes > kv_store::MAX_WAL_BYTES {
            return Err(ConfigError::Invalid {
                field: "wal_bytes",
                message: format!(
                    "{} is above the maximum of {} bytes",
                    c.wal_bytes,
                    kv_store::MAX_WAL_BYTES
                ),
            });
        }
        if !(1..=kv_store::MAX_LEASE_TTL).contains(&c.min_lease_ttl) {
            return Err(ConfigError::Invalid {
                field: "min_lease_ttl",
                message: format!(
                    "{} is not between 1 and {} seconds",
                    c.min_lease_ttl,
                    kv_store::MAX_LEASE_TTL
                ),
            });
        }
        Ok(c)
    }

    /// The mirror settings when `upstream` is set (mirror mode), else `None`.
    pub fn mirror_config(&self) -> Option<crate::mirror::MirrorConfig> {
        if self.upstream.is_empty() {
            return None;
        }
        let mut m = crate::mirror::MirrorConfig::new(
            self.upstream.clone(),
            self.upstream_prefixes
                .iter()
                .map(|p| bytes::Bytes::copy_from_slice(p.as_bytes()))
                .collect(),
        );
        m.barrier_timeout = self.upstream_barrier_timeout;
        m.snapshot_page = self.upstream_snapshot_page;
        m.snapshot_page_bytes = self.upstream_snapshot_page_bytes;
        m.retain_revisions = self.upstream_retain_revisions;
        m.max_response_bytes = self.upstream_max_response_bytes;
        m.compaction_check = self.upstream_compaction_check;
        m.tls = self.upstream_tls.clone();
        m.auth = self.upstream_auth.clone();
        Some(m)
    }

    /// The store settings of this configuration.
    pub fn store_config(&self) -> kv_store::StoreConfig {
        kv_store::StoreConfig::default()
            .durability(self.durability)
            .max_txn_ops(self.max_txn_ops)
            .max_watchers(self.max_watchers)
            .window_bytes(self.watch_window_bytes)
            .progress_interval(self.progress_interval)
            .max_leases(self.max_leases)
            .min_lease_ttl(self.min_lease_ttl)
            .quota_bytes(self.quota_backend_bytes)
            .checkpoint_fold_bytes(self.checkpoint_fold_bytes)
            .wal_bytes(self.wal_bytes)
            .compact_step_revisions(self.compact_step_revisions)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durability_flag_and_file_use_one_spelling() {
        let cli = Cli::try_parse_from(["watch-server", "--durability", "no-sync"]).unwrap();
        assert_eq!(cli.durability, Some(Durability::NoSync));
        let err = Cli::try_parse_from(["watch-server", "--durability", "NoSync"]).unwrap_err();
        assert!(err.to_string().contains("`fsync` or `no-sync`"), "{err}");
        let err = toml::from_str::<FileConfig>("durability = \"immediate\"").unwrap_err();
        assert!(err.to_string().contains("`fsync` or `no-sync`"), "{err}");
        let file: FileConfig = toml::from_str("durability = \"fsync\"").unwrap();
        assert_eq!(file.durability, Some(Durability::Fsync));
    }

    #[test]
    fn precedence_flags_over_file_over_defaults() {
        let file: FileConfig = toml::from_str(
            "listen = \"0.0.0.0:1\"\nmax_txn_ops = 7\nprogress_interval = \"5s\"\ndurability = \"no-sync\"",
        )
        .unwrap();
        let cli = Cli {
            listen: Some("127.0.0.1:0".into()),
            ..Cli::default()
        };
        let c = ServerConfig::merge(cli, file).unwrap();
        assert_eq!(c.listen, "127.0.0.1:0");
        assert_eq!(c.max_txn_ops, 7);
        assert_eq!(c.progress_interval, Duration::from_secs(5));
        assert_eq!(c.durability, Durability::NoSync);
        assert_eq!(c.max_request_bytes, DEFAULT_MAX_REQUEST_BYTES);
        assert_eq!(c.data_dir, PathBuf::from("./data"));
        assert_eq!(c.max_leases, 1_000_000);
        let file: FileConfig = toml::from_str("max_leases = 5").unwrap();
        let c = ServerConfig::merge(Cli::default(), file).unwrap();
        assert_eq!(c.store_config().max_leases, 5);
        let cli = Cli {
            max_leases: Some(0),
            ..Cli::default()
        };
        assert!(ServerConfig::merge(cli, FileConfig::default()).is_err());
        assert!(c.mirror_config().is_none());
    }

    #[test]
    fn quota_as_etcd_reads_it() {
        let c = ServerConfig::merge(Cli::default(), FileConfig::default()).unwrap();
        assert_eq!(c.quota_backend_bytes, DEFAULT_QUOTA_BYTES);
        let file: FileConfig = toml::from_str("quota_backend_bytes = 0").unwrap();
        let c = ServerConfig::merge(Cli::default(), file).unwrap();
        assert_eq!(c.store_config().quota_bytes, DEFAULT_QUOTA_BYTES);
        let file: FileConfig = toml::from_str("quota_backend_bytes = 4096").unwrap();
        let c = ServerConfig::merge(Cli::default(), file.clone()).unwrap();
        assert_eq!(c.quota_backend_bytes, 4096);
        let cli = Cli {
            quota_backend_bytes: Some(-1),
            ..Cli::default()
        };
        assert_eq!(
            ServerConfig::merge(cli, file).unwrap().quota_backend_bytes,
            0
        );
    }

    #[test]
    fn checkpoint_fold_bytes_flag_over_file_and_bounded() {
        let c = ServerConfig::merge(Cli::default(), FileConfig::default()).unwrap();
        assert_eq!(
            c.store_config().checkpoint_fold_bytes,
            kv_store::DEFAULT_CHECKPOINT_FOLD_BYTES
        );
        let file: FileConfig = toml::from_str("checkpoint_fold_bytes = 2097152").unwrap();
        let c = ServerConfig::merge(Cli::default(), file.clone()).unwrap();
        assert_eq!(c.store_config().checkpoint_fold_bytes, 2 << 20);
        let cli =
            Cli::try_parse_from(["watch-server", "--checkpoint-fold-bytes", "3145728"]).unwrap();
        assert_eq!(
            ServerConfig::merge(cli, file)
                .unwrap()
                .checkpoint_fold_bytes,
            3 << 20
        );
        for tiny in [0, (1 << 20) - 1] {
            let cli = Cli {
                checkpoint_fold_bytes: Some(tiny),
                ..Cli::default()
            };
            let err = ServerConfig::merge(cli, FileConfig::default()).unwrap_err();
            assert!(err.to_string().contains("checkpoint_fold_bytes"), "{err}");
        }
    }

    #[test]
    fn wal_bytes_flag_over_file_and_bounded() {
        let c = ServerConfig::merge(Cli::default(), FileConfig::default()).unwrap();
        assert_eq!(c.store_config().wal_bytes, kv_store::DEFAULT_WAL_BYTES);
        let file: FileConfig = toml::from_str("wal_bytes = 0").unwrap();
        let c = ServerConfig::merge(Cli::default(), file.clone()).unwrap();
        assert_eq!(c.store_config().wal_bytes, 0);
        let cli = Cli::try_parse_from(["watch-server", "--wal-bytes", "4194304"]).unwrap();
        assert_eq!(ServerConfig::merge(cli, file).unwrap().wal_bytes, 4 << 20);
        let cli = Cli {
            wal_bytes: Some(kv_store::MAX_WAL_BYTES + 1),
            ..Cli::default()
        };
        let err = ServerConfig::merge(cli, FileConfig::default()).unwrap_err();
        assert!(err.to_string().contains("wal_bytes"), "{err}");
    }

    #[test]
    fn compact_step_revisions_flag_over_file_and_positive() {
        let c = ServerConfig::merge(Cli::default(), FileConfig::default()).unwrap();
        assert_eq!(
            c.store_config().compact_step_revisions,
            kv_store::DEFAULT_COMPACT_STEP
        );
        let file: FileConfig = toml::from_str("compact_step_revisions = 1024").unwrap();
        let c = ServerConfig::merge(Cli::default(), file.clone()).unwrap();
        assert_eq!(c.store_config().compact_step_revisions, 1024);
        let cli = Cli::try_parse_from(["watch-server", "--compact-step-revisions", "64"]).unwrap();
        assert_eq!(
            ServerConfig::merge(cli, file)
                .unwrap()
                .compact_step_revisions,
            64
        );
        let cli = Cli {
            compact_step_revisions: Some(0),
            ..Cli::default()
        };
        let err = ServerConfig::merge(cli, FileConfig::default()).unwrap_err();
        assert!(err.to_string().contains("compact_step_revisions"), "{err}");
    }

    #[test]
    fn min_lease_ttl_flag_over_file() {
        let c = ServerConfig::merge(Cli::default(), FileConfig::default()).unwrap();
        assert_eq!(c.store_config().min_lease_ttl, 2);
        let file: FileConfig = toml::from_str("min_lease_ttl = 7").unwrap();
        let c = ServerConfig::merge(Cli::default(), file.clone()).unwrap();
        assert_eq!(c.store_config().min_lease_ttl, 7);
        let cli = Cli {
            min_lease_ttl: Some(3),
            ..Cli::default()
        };
        assert_eq!(ServerConfig::merge(cli, file).unwrap().min_lease_ttl, 3);
        let cli = Cli {
            min_lease_ttl: Some(0),
            ..Cli::default()
        };
        assert!(ServerConfig::merge(cli, FileConfig::default()).is_err());
    }

    #[test]
    fn mirror_settings_from_flags_and_file() {
        let file: FileConfig = toml::from_str(
            "upstream = \"http://a:2379, b:2379\"\nupstream_prefix = [\"/x/\", \"/y/\"]\nupstream_barrier_timeout = \"2s\"\nupstream_retain_revisions = 100",
        )
        .unwrap();
        let c = ServerConfig::merge(Cli::default(), file.clone()).unwrap();
        assert_eq!(c.upstream, vec!["http://a:2379", "b:2379"]);
        assert_eq!(c.upstream_prefixes, vec!["/x/", "/y/"]);
        let m = c.mirror_config().unwrap();
        assert_eq!(m.barrier_timeout, Duration::from_secs(2));
        assert_eq!(m.prefixes.len(), 2);
        assert_eq!(m.retain_revisions, Some(100));
        let cli = Cli {
            upstream_prefix: vec!["/z/".into()],
            ..Cli::default()
        };
        let c = ServerConfig::merge(cli, file.clone()).unwrap();
        assert_eq!(c.upstream_prefixes, vec!["/z/"]);
        // A prefix flag is taken as is: a comma is part of the key.
        let cli = Cli {
            upstream_prefix: vec!["/a,b/".into(), "/c/".into()],
            upstream_prefixes: vec!["/ignored/".into()],
            ..Cli::default()
        };
        let c = ServerConfig::merge(cli, file.clone()).unwrap();
        assert_eq!(c.upstream_prefixes, vec!["/a,b/", "/c/"]);
        // The list form (env or --upstream-prefixes), split by clap on commas.
        let cli = <Cli as clap::Parser>::try_parse_from([
            "watch-server",
            "--upstream",
            "http://a:2379",
            "--upstream-prefixes",
            "/p/,/q/",
            "--upstream-prefix",
            "/x,y/",
        ])
        .unwrap();
        assert_eq!(cli.upstream_prefix, vec!["/x,y/"]);
        assert_eq!(cli.upstream_prefixes, vec!["/p/", "/q/"]);
        // Limits: a zero barrier timeout or response limit is refused.
        for bad in [
            "upstream = \"a:1\"\nupstream_barrier_timeout = \"0s\"",
            "upstream = \"a:1\"\nupstream_max_response_bytes = 0",
        ] {
            let file: FileConfig = toml::from_str(bad).unwrap();
            assert!(ServerConfig::merge(Cli::default(), file).is_err(), "{bad}");
        }
        assert_eq!(
            c.mirror_config().unwrap().max_response_bytes,
            crate::mirror::DEFAULT_MAX_RESPONSE_BYTES
        );
    }

    #[test]
    fn security_settings_merge_and_validate() {
        // Client cert auth without a certificate is refused whichever source sets it.
        let file: FileConfig = toml::from_str("client_cert_auth = true").unwrap();
        let err = ServerConfig::merge(Cli::default(), file).unwrap_err();
        assert!(err.to_string().contains("need TLS"), "{err}");
        // The flag beats the file.
        let file: FileConfig = toml::from_str("client_cert_auth = true").unwrap();
        let cli = Cli {
            client_cert_auth: Some(false),
            ..Cli::default()
        };
        assert!(ServerConfig::merge(cli, file).unwrap().tls.is_none());

        let hash = crate::auth::hash_password("pw", 4).unwrap();
        let text = format!("auth_token_ttl = \"2m\"\n[auth.users.a]\npassword_hash = \"{hash}\"\n");
        let c = ServerConfig::merge(Cli::default(), toml::from_str(&text).unwrap()).unwrap();
        assert_eq!(c.auth.token_ttl, Duration::from_secs(120));
        let cli = Cli {
            auth_token_ttl: Some("7".into()),
            ..Cli::default()
        };
        let c = ServerConfig::merge(cli, toml::from_str(&text).unwrap()).unwrap();
        assert_eq!(c.auth.token_ttl, Duration::from_secs(7));
        // A TTL that would overflow, or above the cap: clear config errors, no panic.
        for ttl in ["18446744073709551615h", "400000000000000000m", "9999999h"] {
            let cli = Cli {
                auth_token_ttl: Some(ttl.into()),
                ..Cli::default()
            };
            let err = ServerConfig::merge(cli, toml::from_str(&text).unwrap()).unwrap_err();
            assert!(err.to_string().contains("auth_token_ttl"), "{ttl}: {err}");
        }
        assert!(parse_duration("18446744073709551615h").is_err());
        // Login limits: flag beats file; zero running checks is refused.
        let limits = format!("auth_max_queued_logins = 3\n{text}");
        let cli = Cli {
            auth_max_concurrent_hashes: Some(5),
            ..Cli::default()
        };
        let a = ServerConfig::merge(cli, toml::from_str(&limits).unwrap())
            .unwrap()
            .auth;
        assert_eq!((a.max_concurrent_hashes, a.max_queued_logins), (5, 3));
        let cli = Cli {
            auth_max_concurrent_hashes: Some(0),
            ..Cli::default()
        };
        assert!(ServerConfig::merge(cli, toml::from_str(&text).unwrap()).is_err());
        // No [auth]: nothing to seed (authentication starts off), the TTL still applies.
        let c = ServerConfig::merge(
            Cli::default(),
            toml::from_str("auth_token_ttl = \"9s\"").unwrap(),
        )
        .unwrap();
        assert!(!c.auth.has_seed());
        assert_eq!(c.auth.token_ttl, Duration::from_secs(9));
    }

    #[test]
    fn bad_values_are_refused() {
        assert!(toml::from_str::<FileConfig>("nonsense = 1").is_err());
        let cli = Cli {
            progress_interval: Some("10 parsecs".into()),
            ..Cli::default()
        };
        assert!(ServerConfig::merge(cli, FileConfig::default()).is_err());
        let cli = Cli {
            upstream_prefix: vec!["/a/".into()],
            ..Cli::default()
        };
        assert!(ServerConfig::merge(cli, FileConfig::default()).is_err());
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        for (cli, field) in [
            (
                Cli {
                    metrics_listen: Some("localhost".into()),
                    ..Cli::default()
                },
                "metrics_listen",
            ),
            (
                Cli {
                    listen: Some("127.0.0.1".into()),
                    ..Cli::default()
                },
                "listen",
            ),
            (
                Cli {
                    log_filter: Some("=[".into()),
                    ..Cli::default()
                },
                "log_filter",
            ),
        ] {
            match ServerConfig::merge(cli, FileConfig::default()) {
                Err(ConfigError::Invalid { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{field}: expected Invalid, got {other:?}"),
            }
        }
    }

    #[test]
    fn metrics_endpoint_is_off_unless_asked() {
        let c = ServerConfig::merge(Cli::default(), FileConfig::default()).unwrap();
        assert_eq!(c.metrics_listen, None);
        let file: FileConfig =
            toml::from_str("metrics_listen = \"127.0.0.1:9379\"\nlog_format = \"json\"").unwrap();
        let c = ServerConfig::merge(Cli::default(), file.clone()).unwrap();
        assert_eq!(c.metrics_listen, Some("127.0.0.1:9379".parse().unwrap()));
        assert_eq!(c.log_format, LogFormat::Json);
        let cli = Cli {
            metrics_listen: Some("off".into()),
            ..Cli::default()
        };
        assert_eq!(ServerConfig::merge(cli, file).unwrap().metrics_listen, None);
    }
}

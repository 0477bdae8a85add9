//! The `watch-server` binary: parses and checks the configuration (before binding anything),
//! installs the log subscriber, binds, serves until SIGINT/SIGTERM and exits non-zero if the
//! store failed. A second SIGINT/SIGTERM during shutdown exits at once with status 130.

use anyhow::Context;
use clap::Parser;
use watch_server::config::{Cli, Command, LogFormat, ServerConfig};
use watch_server::server::Server;

/// Exit status of an invalid configuration (as clap's usage errors).
const EXIT_CONFIG: i32 = 2;
/// Exit status when a second signal cuts the graceful shutdown short.
const EXIT_FORCED: i32 = 130;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match &cli.command {
        Some(Command::HashPassword { cost }) => return hash_password(*cost),
        Some(Command::Restore { file, data_dir }) => return restore(file, data_dir),
        None => {}
    }
    let config = match ServerConfig::from_cli(cli) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("watch-server: invalid configuration: {e}");
            std::process::exit(EXIT_CONFIG);
        }
    };
    // The filter was validated with the rest of the configuration.
    let filter = tracing_subscriber::EnvFilter::try_new(&config.log_filter)
        .with_context(|| format!("invalid log filter {:?}", config.log_filter))?;
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours only for a terminal, never into files or log collectors.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match config.log_format {
        LogFormat::Text => subscriber.init(),
        LogFormat::Json => subscriber.json().with_current_span(true).init(),
    }
    let shutdown = shutdown_signal()?;
    let server = Server::start(config.clone())
        .await
        .context("starting watch-server")?;
    let addr = server.local_addr();
    if config.auth.has_seed() && config.tls.is_none() && !addr.ip().is_loopback() {
        // Passwords (Authenticate) and tokens (every request) would cross the network in
        // clear text.
        tracing::warn!(
            %addr,
            "authentication is on without TLS on a non-loopback address: passwords and tokens \
             travel unencrypted (set --cert-file/--key-file)"
        );
    }
    // Health checks are answered (NOT_SERVING) from here on, while the store opens.
    println!("watch-server bound {addr}; opening the data directory");
    if let Some(metrics) = server.metrics_addr() {
        println!("watch-server metrics on http://{metrics}/metrics");
    }
    let health = server.health();
    tokio::spawn(async move {
        health.ready().await;
        // Tests and scripts read this exact line (on stdout) for the bound address: it means
        // the store is open and every service answers.
        println!("watch-server listening on {addr}");
    });
    server.run(shutdown).await?;
    tracing::info!("stopped");
    Ok(())
}

/// `watch-server hash-password`: the first line of stdin (without its line ending) to a bcrypt
/// hash on stdout. Reading stdin keeps the password out of the shell history and `ps`.
fn hash_password(cost: u32) -> anyhow::Result<()> {
    let mut line = String::new();
    std::io::stdin()
        .read_line(&mut line)
        .context("reading the password from stdin")?;
    let password = line.strip_suffix('\n').unwrap_or(&line);
    let password = password.strip_suffix('\r').unwrap_or(password);
    anyhow::ensure!(
        !password.is_empty(),
        "the password (first line of stdin) is empty"
    );
    let hash = watch_server::auth::hash_password(password, cost)
        .with_context(|| format!("hashing with bcrypt cost {cost}"))?;
    println!("{hash}");
    Ok(())
}

/// `watch-server restore <file> --data-dir <dir>`: checks the SHA-256 trailer of a backup as
/// `etcdctl snapshot save` wrote it and installs the backup as a new data directory.
fn restore(file: &std::path::Path, data_dir: &std::path::Path) -> anyhow::Result<()> {
    let info = watch_server::server::restore_snapshot(file, data_dir)
        .with_context(|| format!("restoring {} into {}", file.display(), data_dir.display()))?;
    let auth = if info.extras.is_empty() {
        ""
    } else {
        ", users and roles"
    };
    println!(
        "restored revision {} ({} keys, {} leases, {} change sets of history, compaction \
         revision {}{auth}) into {}",
        info.revision,
        info.keys,
        info.leases,
        info.history,
        info.compacted,
        data_dir.display()
    );
    Ok(())
}

/// Installs the SIGINT and SIGTERM handlers now (so a signal that arrives before the server
/// polls the returned future is not lost) and returns a future resolving on the first one.
/// After it resolved, a second signal exits the process at once with [`EXIT_FORCED`].
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()> + Send> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut int = signal(SignalKind::interrupt()).context("listening for SIGINT")?;
        let mut term = signal(SignalKind::terminate()).context("listening for SIGTERM")?;
        Ok(async move {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
            tokio::spawn(async move {
                tokio::select! {
                    _ = int.recv() => {}
                    _ = term.recv() => {}
                }
                eprintln!("watch-server: second signal; exiting without finishing the shutdown");
                std::process::exit(EXIT_FORCED);
            });
        })
    }
    #[cfg(not(unix))]
    {
        Ok(async {
            let _ = tokio::signal::ctrl_c().await;
        })
    }
}

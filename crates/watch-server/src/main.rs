//! The `watch-server` binary: parses the configuration, installs the log subscriber, serves
//! until SIGINT/SIGTERM and exits non-zero if the store failed.

use anyhow::Context;
use clap::Parser;
use watch_server::config::{Cli, Command, ServerConfig};
use watch_server::server::Server;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(Command::HashPassword { cost }) = cli.command {
        return hash_password(cost);
    }
    let config = ServerConfig::from_cli(cli)?;
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&config.log_filter)
                .with_context(|| format!("invalid log filter {:?}", config.log_filter))?,
        )
        .with_writer(std::io::stderr)
        .init();
    let shutdown = shutdown_signal()?;
    let server = Server::start(config.clone())
        .await
        .context("starting watch-server")?;
    // Tests and scripts read this exact line (on stdout) for the bound address.
    println!("watch-server listening on {}", server.local_addr());
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

/// Installs the SIGINT and SIGTERM handlers now (so a signal that arrives before the server
/// polls the returned future is not lost) and returns a future resolving on either.
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
        })
    }
    #[cfg(not(unix))]
    {
        Ok(async {
            let _ = tokio::signal::ctrl_c().await;
        })
    }
}

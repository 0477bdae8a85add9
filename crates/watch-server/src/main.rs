//! The `watch-server` binary: parses the configuration, installs the log subscriber, serves
//! until SIGINT/SIGTERM and exits non-zero if the store failed.

use anyhow::Context;
use clap::Parser;
use watch_server::config::{Cli, ServerConfig};
use watch_server::server::Server;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = ServerConfig::from_cli(Cli::parse())?;
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&config.log_filter)
                .with_context(|| format!("invalid log filter {:?}", config.log_filter))?,
        )
        .with_writer(std::io::stderr)
        .init();
    let server = Server::start(config.clone())
        .await
        .context("starting watch-server")?;
    // Tests and scripts read this exact line (on stdout) for the bound address.
    println!("watch-server listening on {}", server.local_addr());
    server.run(shutdown_signal()).await?;
    tracing::info!("stopped");
    Ok(())
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}

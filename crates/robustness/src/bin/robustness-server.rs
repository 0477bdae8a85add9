//! `watch-server`'s main (without the log subscriber and signal handling) over the same
//! library, so the tests of this package can spawn a real server process and kill it.

use clap::Parser;
use watch_server::config::{Cli, ServerConfig};
use watch_server::server::Server;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = ServerConfig::from_cli(Cli::parse())?;
    let server = Server::start(config).await?;
    let (addr, health) = (server.local_addr(), server.health());
    // As watch-server's main: the line means "ready" (the store is open), not just "bound".
    tokio::spawn(async move {
        health.ready().await;
        println!("watch-server listening on {addr}");
    });
    server.run(std::future::pending()).await?;
    Ok(())
}

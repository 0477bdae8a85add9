//! The `watch-server` binary.

fn main() -> anyhow::Result<()> {
    anyhow::bail!("watch-server: the server is being wired up; see crates/watch-server")
}

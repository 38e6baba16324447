//! `eastwall demo`: not built yet.

/// Arguments of `eastwall demo`.
#[derive(Debug, clap::Args)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`eastwall demo` is not built yet")
}

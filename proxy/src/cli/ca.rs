//! `eastwall ca`: not built yet.

/// Arguments of `eastwall ca`.
#[derive(Debug, clap::Args)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`eastwall ca` is not built yet")
}

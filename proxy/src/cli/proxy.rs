//! `eastwall proxy`: not built yet.

/// Arguments of `eastwall proxy`.
#[derive(Debug, clap::Args)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`eastwall proxy` is not built yet")
}

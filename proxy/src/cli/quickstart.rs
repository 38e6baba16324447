//! `eastwall quickstart`: not built yet.

/// Arguments of `eastwall quickstart`.
#[derive(Debug, clap::Args)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`eastwall quickstart` is not built yet")
}

//! `eastwall audit`: not built yet.

/// Arguments of `eastwall audit`.
#[derive(Debug, clap::Args)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`eastwall audit` is not built yet")
}

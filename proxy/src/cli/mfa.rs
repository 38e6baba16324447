//! `eastwall mfa`: not built yet.

/// Arguments of `eastwall mfa`.
#[derive(Debug, clap::Args)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`eastwall mfa` is not built yet")
}

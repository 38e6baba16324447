//! `eastwall policy`: not built yet.

/// Arguments of `eastwall policy`.
#[derive(Debug, clap::Args)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`eastwall policy` is not built yet")
}

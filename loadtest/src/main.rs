//! `eastwall-loadtest`: not built yet; it only parses its arguments.
#![forbid(unsafe_code)]

use clap::Parser;

/// Side-by-side load generator: the same workload direct and through Eastwall.
#[derive(Debug, Parser)]
#[command(name = "eastwall-loadtest", version)]
struct Args {}

fn main() -> anyhow::Result<()> {
    let _args = Args::parse();
    anyhow::bail!("eastwall-loadtest only parses its arguments for now; the load modes come with the load-test issue")
}

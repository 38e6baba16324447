//! `eastwall demo`: plays the seed's lateral-movement story against a private PostgreSQL.

use std::io::IsTerminal;
use std::path::PathBuf;

use crate::demo;

/// Arguments of `eastwall demo`.
///
/// Starts a private PostgreSQL cluster, lays out a sidecar with `quickstart`, runs it, and plays
/// the story: billing allowed, the phished laptop denied with an alert, a stolen certificate
/// from another CA refused, an operator challenged for MFA and admitted, and the decision log
/// verified. Exits non-zero if any step does not behave as told.
///
/// With --fleet: two sidecars joined by a private nats-server (JetStream, TLS from the demo's
/// CA); a stolen certificate has a live session on each, and one signed `lock add --fleet`
/// cuts both and refuses it everywhere until its signed removal.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Lay the sidecar out in DIR (kept afterwards) instead of a temporary folder.
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// Stay up after the story and print psql commands to try it by hand, until Ctrl-C.
    #[arg(long)]
    pub keep: bool,
    /// The fleet story: one lock, issued once, cuts the stolen identity on every sidecar
    /// (needs nats-server).
    #[arg(long, conflicts_with = "keep")]
    pub fleet: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let color = std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    demo::run(&demo::Options {
        dir: args.dir,
        keep: args.keep,
        color,
        fleet: args.fleet,
    })?;
    Ok(())
}

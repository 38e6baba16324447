//! `eastwall audit`: checks the decision log's hash chain.

use std::path::PathBuf;

use anyhow::Context;

use crate::audit::{self, VerifyError};

/// Arguments of `eastwall audit`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Check that no line of a decision log was edited, removed or reordered.
    ///
    /// Exits 0 when the chain is intact; otherwise prints FILE:LINE and what is wrong with
    /// the first bad line, and exits 1.
    Verify {
        /// The decision log (JSON lines) to check.
        file: PathBuf,
    },
}

pub fn run(args: Args) -> anyhow::Result<()> {
    match args.command {
        Command::Verify { file } => verify(file),
    }
}

fn verify(file: PathBuf) -> anyhow::Result<()> {
    match audit::verify(&file) {
        Ok(report) => {
            outln!(
                "ok: {} lines, chain intact (last hash {})",
                report.lines,
                report.last_hash
            );
            Ok(())
        }
        // `FILE:LINE: problem` on its own line, so editors and grep can jump to it.
        Err(err @ VerifyError::Line { .. }) => {
            eprintln!("{err}");
            std::process::exit(1)
        }
        Err(err) => Err(err).context("cannot verify the decision log"),
    }
}

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
    /// the first bad line, and exits 1. Rotated logs are given oldest first
    /// (`decisions.log.1 decisions.log`): each must continue the one before it.
    Verify {
        /// The decision log (JSON lines) to check; several for a rotated log, oldest first.
        #[arg(required = true, num_args = 1..)]
        files: Vec<PathBuf>,
    },
}

pub fn run(args: Args) -> anyhow::Result<()> {
    match args.command {
        Command::Verify { files } => verify(files),
    }
}

fn verify(files: Vec<PathBuf>) -> anyhow::Result<()> {
    let mut before: Option<(PathBuf, audit::VerifyReport)> = None;
    let mut lines = 0;
    for file in files {
        let report = match audit::verify(&file) {
            Ok(report) => report,
            // `FILE:LINE: problem` on its own line, so editors and grep can jump to it.
            Err(err @ VerifyError::Line { .. }) => {
                eprintln!("{err}");
                std::process::exit(1)
            }
            Err(err) => return Err(err).context("cannot verify the decision log"),
        };
        if let Some((old, old_report)) = &before {
            if report.lines > 0 && report.first_prev != old_report.last_hash {
                eprintln!(
                    "{}:1: does not continue {}: its first line's prev is {}, the last hash there is {}",
                    file.display(),
                    old.display(),
                    report.first_prev,
                    old_report.last_hash
                );
                std::process::exit(1)
            }
        }
        lines += report.lines;
        let continuing = before.is_some();
        before = Some((file, report));
        if !continuing {
            if let Some((file, report)) = &before {
                if report.first_prev != audit::GENESIS {
                    outln!(
                        "note: {} continues a rotated log whose last hash is {}; give the older file first to check the join",
                        file.display(),
                        report.first_prev
                    );
                }
            }
        }
    }
    let last = before.map(|(_, r)| r.last_hash).unwrap_or_default();
    outln!("ok: {lines} lines, chain intact (last hash {last})");
    Ok(())
}

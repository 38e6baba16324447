//! `eastwall audit`: checks the decision log's hash chain; runs the detectors over a recorded log.

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
    /// Run the seed's five detectors over a recorded decision log and print their signals.
    ///
    /// The chain is verified first (as `audit verify` does); a log that does not verify is
    /// not judged. The detectors are the sidecar's own, tuned by the config's [detect]
    /// table when --config is given, so a replay finds what the sidecar found inline. They
    /// start from nothing (learning), or from a saved state (--state, read only).
    Detect {
        /// The decision log; several for a rotated log, oldest first.
        #[arg(required = true, num_args = 1..)]
        files: Vec<PathBuf>,
        /// eastwall.toml whose [detect] settings to use (default: the detectors' defaults).
        #[arg(long)]
        config: Option<PathBuf>,
        /// A detector state file to start from (e.g. a copy of `<log>.detect.json`); never written.
        #[arg(long)]
        state: Option<PathBuf>,
        /// One JSON object per signal instead of text.
        #[arg(long)]
        json: bool,
    },
}

pub fn run(args: Args) -> anyhow::Result<()> {
    match args.command {
        Command::Verify { files } => verify(files),
        Command::Detect {
            files,
            config,
            state,
            json,
        } => detect(files, config, state, json),
    }
}

fn detect(
    files: Vec<PathBuf>,
    config: Option<PathBuf>,
    state: Option<PathBuf>,
    json: bool,
) -> anyhow::Result<()> {
    let tuning = match &config {
        Some(path) => eastwall_config::Settings::load(path)?.detect.tuning,
        None => eastwall_detect::Settings::default(),
    };
    let saved = match &state {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("cannot read the detector state {}", path.display()))?,
        ),
        None => None,
    };
    let counts = verified_lines(&files)?;
    let replay = crate::detect_replay::replay(&files, &counts, tuning, saved.as_deref())?;
    for signal in &replay.signals {
        if json {
            outln!("{}", signal.to_json());
        } else {
            outln!("{}", crate::detect_replay::describe(signal));
        }
    }
    if !json {
        outln!(
            "{} signal(s) over {} lines; the log itself records {} signal line(s)",
            replay.signals.len(),
            replay.lines,
            replay.recorded
        );
    }
    Ok(())
}

/// Verifies the chain of each file and that each continues the one before; returns the
/// number of verified lines per file. A bad line prints FILE:LINE and exits 1.
fn verified_lines(files: &[PathBuf]) -> anyhow::Result<Vec<usize>> {
    let mut before: Option<(&PathBuf, audit::VerifyReport)> = None;
    let mut counts = Vec::new();
    for file in files {
        let report = match audit::verify(file) {
            Ok(report) => report,
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
        counts.push(report.lines);
        before = Some((file, report));
    }
    Ok(counts)
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

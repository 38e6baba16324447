//! `eastwall check`: the preflight, one line per finding; exit 1 on an error, 2 on warnings only.

use std::path::PathBuf;

use anyhow::Context;

use crate::preflight::{self, Level};

/// Arguments of `eastwall check`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// eastwall.toml of the sidecar to check.
    #[arg(long)]
    pub config: PathBuf,
    /// Print only warnings and errors.
    #[arg(long, short)]
    pub quiet: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let config = crate::cli::policy::load(&args.config)?;
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    let report = runtime.block_on(preflight::check(
        &config.settings,
        &config.policy,
        std::time::SystemTime::now(),
    ));
    for finding in &report.findings {
        if finding.level == Level::Ok && args.quiet {
            continue;
        }
        outln!("{finding}");
    }
    let count = |level| report.findings.iter().filter(|f| f.level == level).count();
    let (errors, warnings) = (count(Level::Error), count(Level::Warning));
    match report.worst() {
        Level::Error => {
            eprintln!(
                "eastwall: {}: {errors} error(s), {warnings} warning(s): the sidecar would not start or would refuse clients",
                args.config.display()
            );
            std::process::exit(1)
        }
        Level::Warning => {
            eprintln!(
                "eastwall: {}: {warnings} warning(s), no error",
                args.config.display()
            );
            std::process::exit(2)
        }
        Level::Ok => {
            outln!("ok: {}: ready to run", args.config.display());
            Ok(())
        }
    }
}

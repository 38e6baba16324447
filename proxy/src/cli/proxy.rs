//! `eastwall proxy --config FILE`: runs the sidecar until SIGINT or SIGTERM; SIGHUP reopens the
//! decision log. On SIGINT/SIGTERM every live session is ended (FATAL 57P01 "the sidecar is
//! shutting down", reason `shutdown` in its session_end line) and the process waits, bounded,
//! for those lines; a second signal exits at once.

use std::path::PathBuf;

use anyhow::Context;

/// Arguments of `eastwall proxy`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The sidecar settings (eastwall.toml).
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    init_tracing();
    let config = eastwall_config::Config::load(&args.config)
        .map_err(|err| anyhow::anyhow!("{}", err.lines().join("\n")))?;
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(async {
        let running = crate::server::start(config).await?;
        say(&format!(
            "eastwall: listening on {} (decision log {})",
            running.local_addr,
            running.sidecar.settings.audit.path.display()
        ));
        if let Some(addr) = running.stepup_addr {
            say(&format!(
                "eastwall: step-up endpoint on https://{addr}/v1/stepup"
            ));
        }
        reopen_log_on_sighup(running.sidecar.clone())?;
        wait_for_signal().await?;
        say("eastwall: shutting down; ending live sessions");
        tokio::select! {
            () = running.shutdown() => {}
            r = wait_for_signal() => {
                r?;
                say("eastwall: second signal; exiting without waiting for sessions");
            }
        }
        Ok(())
    })
}

/// A status line on stderr; if stderr is gone the sidecar carries on (eprintln! would panic).
fn say(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("cannot watch SIGINT")?,
        _ = term.recv() => {}
    }
    Ok(())
}

/// SIGHUP (log rotation) reopens the decision log at its configured path; without a
/// handler SIGHUP would end the process.
fn reopen_log_on_sighup(sidecar: std::sync::Arc<crate::server::Sidecar>) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = signal(SignalKind::hangup()).context("cannot watch SIGHUP")?;
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            match sidecar.audit.reopen().await {
                Ok(()) => tracing::info!("SIGHUP: decision log reopened"),
                Err(err) => tracing::error!(%err, "SIGHUP: cannot reopen the decision log"),
            }
        }
    });
    Ok(())
}

/// Logs to stderr; `RUST_LOG` overrides the default `info`.
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    // A closed stderr (a log collector restarting) must not take sessions down: by default
    // the subscriber reports a failed write with eprintln!, which panics the writing task.
    let _ = tracing_subscriber::fmt()
        .log_internal_errors(false)
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .try_init();
}

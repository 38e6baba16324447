//! `eastwall proxy --config FILE`: runs the sidecar until SIGINT or SIGTERM; SIGHUP reopens the
//! decision log. On SIGINT/SIGTERM the sidecar drains: it is no longer ready and accepts
//! nothing new, live sessions may finish for `[limits] shutdown_grace`, then the rest are
//! ended (FATAL 57P01 "the sidecar is shutting down", reason `shutdown` in its session_end
//! line) and the process waits, bounded, for those lines and exits 0. A second signal cuts
//! the grace short.

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
        let mut signals = Signals::new()?;
        signals.next().await;
        let grace = running.sidecar.settings.limits.shutdown_grace;
        say(&format!(
            "eastwall: draining; live sessions may finish for {} (a second signal ends them now)",
            humantime::format_duration(grace)
        ));
        let second = async move {
            signals.next().await;
            say("eastwall: second signal; ending live sessions now");
        };
        running.drain(grace, second).await;
        say("eastwall: stopped");
        Ok(())
    })
}

/// A status line on stderr; if stderr is gone the sidecar carries on (eprintln! would panic).
fn say(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// SIGTERM and SIGINT, watched from the start so none is missed between two waits.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> anyhow::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Self {
            term: signal(SignalKind::terminate()).context("cannot watch SIGTERM")?,
            int: signal(SignalKind::interrupt()).context("cannot watch SIGINT")?,
        })
    }

    async fn next(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}

/// SIGHUP (log rotation) reopens the decision log at its configured path; without a
/// handler SIGHUP would end the process.
fn reopen_log_on_sighup(sidecar: std::sync::Arc<crate::server::Sidecar>) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = signal(SignalKind::hangup()).context("cannot watch SIGHUP")?;
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            // SIGHUP also reloads eastwall.toml and the policy (at the next upkeep tick).
            sidecar.config_watch.request();
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

//! `eastwall proxy --config FILE`: runs the sidecar until SIGINT or SIGTERM.

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
        eprintln!(
            "eastwall: listening on {} (decision log {})",
            running.local_addr,
            running.sidecar.settings.audit.path.display()
        );
        if let Some(addr) = running.stepup_addr {
            eprintln!("eastwall: step-up endpoint on https://{addr}/v1/stepup");
        }
        wait_for_signal().await?;
        eprintln!("eastwall: shutting down");
        running.shutdown().await;
        Ok(())
    })
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

/// Logs to stderr; `RUST_LOG` overrides the default `info`.
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .try_init();
}

//! Command line: the mode, the two targets, and the A/B loop that runs them alternately.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

use crate::modes::{self, proc_cpu_us, query::Protocol, RunLimits, RunOutput, Target};
use crate::report::{Report, RunRecord, Side};
use crate::tls::ConnSpec;

/// Side-by-side load generator: the same workload direct and through Eastwall.
#[derive(Debug, Parser)]
#[command(name = "eastwall-loadtest", version)]
struct Args {
    #[command(subcommand)]
    mode: Mode,
    #[command(flatten)]
    common: Common,
}

#[derive(Debug, clap::Args)]
struct Common {
    /// libpq-style connection string for PostgreSQL itself (sslcert/sslkey/sslrootcert/sslmode honoured).
    #[arg(long, global = true, value_name = "CONNSTR")]
    direct: Option<ConnSpec>,
    /// libpq-style connection string for the same database through the proxy.
    #[arg(long, global = true, value_name = "CONNSTR")]
    proxy: Option<ConnSpec>,
    /// A/B pairs to run (direct, proxy, direct, proxy, ...); at least 3.
    #[arg(long, global = true, default_value_t = 3, value_parser = clap::value_parser!(u32).range(3..))]
    pairs: u32,
    /// Concurrent clients.
    #[arg(long, short = 'c', global = true, default_value_t = 1)]
    clients: usize,
    /// Seconds per run.
    #[arg(long, short = 'T', global = true, default_value_t = 10.0)]
    duration: f64,
    /// The proxy's process id: adds its CPU per operation (and memory, in `idle`).
    #[arg(long, global = true, value_name = "PID")]
    proxy_pid: Option<u32>,
    /// Machine-readable output on stdout.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Debug, Subcommand)]
enum Mode {
    /// N clients send pgbench's select-only query for a duration: tps and latency.
    Query {
        #[arg(long, value_enum, default_value = "simple")]
        protocol: Protocol,
        /// Rows of pgbench_accounts (100000 x scale); 0 selects a constant instead.
        #[arg(long, default_value_t = 0)]
        accounts: u32,
        /// Seconds per side discarded before the first pair, to warm caches and the proxy.
        #[arg(long, default_value_t = 2.0)]
        warmup: f64,
    },
    /// Connection churn: mTLS handshake, startup, select 1, close; connections per second.
    Connect,
    /// Open N idle admitted sessions; with --proxy-pid, the proxy's memory per session.
    Idle {
        #[arg(long, default_value_t = 200)]
        sessions: usize,
        /// Seconds to wait after opening before reading memory.
        #[arg(long, default_value_t = 1.0)]
        settle: f64,
    },
    /// COPY a table out and the same bytes back in; MB/s each way.
    Copy {
        #[arg(long, default_value = "pgbench_accounts")]
        table: String,
        /// Largest COPY IN payload, in MB.
        #[arg(long, default_value_t = 64)]
        max_mb: usize,
    },
}

fn seconds(s: f64, what: &str) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(s)
        .with_context(|| format!("{what} must be a non-negative number of seconds"))
}

pub fn run() -> anyhow::Result<()> {
    let args = Args::parse();
    let common = &args.common;
    let direct = common
        .direct
        .as_ref()
        .context("--direct CONNSTR is required: the comparison needs PostgreSQL itself")?;
    let proxy = common
        .proxy
        .as_ref()
        .context("--proxy CONNSTR is required: the comparison needs the proxy")?;
    let direct = Target::new("direct", direct)?;
    let proxy = Target::new("proxy", proxy)?;
    let limits = RunLimits {
        clients: common.clients.max(1),
        duration: seconds(common.duration, "--duration")?,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let report = rt.block_on(ab(&args.mode, common, limits, &direct, &proxy))?;
    if common.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.render_text());
    }
    Ok(())
}

async fn ab(
    mode: &Mode,
    common: &Common,
    limits: RunLimits,
    direct: &Target,
    proxy: &Target,
) -> anyhow::Result<Report> {
    let mut settings = BTreeMap::new();
    settings.insert("pairs", common.pairs.to_string());
    settings.insert("clients", limits.clients.to_string());
    settings.insert("duration_s", common.duration.to_string());
    let (name, payload) = match mode {
        Mode::Query {
            protocol,
            accounts,
            warmup,
        } => {
            settings.insert("protocol", format!("{protocol:?}").to_lowercase());
            settings.insert("accounts", accounts.to_string());
            let warm = RunLimits {
                duration: seconds(*warmup, "--warmup")?,
                ..limits
            };
            if !warm.duration.is_zero() {
                for t in [direct, proxy] {
                    let shape = modes::query::QueryShape {
                        protocol: *protocol,
                        accounts: *accounts,
                    };
                    modes::query::run(t, shape, warm).await?;
                }
            }
            ("query", None)
        }
        Mode::Connect => ("connect", None),
        Mode::Idle { sessions, .. } => {
            settings.insert("sessions", sessions.to_string());
            ("idle", None)
        }
        Mode::Copy { table, max_mb } => {
            settings.insert("table", table.clone());
            let data =
                modes::copy::payload(direct, table, max_mb.saturating_mul(1_000_000)).await?;
            settings.insert("copy_in_bytes", data.len().to_string());
            ("copy", Some(data))
        }
    };

    let total = u64::from(common.pairs) * 2;
    let bar = if std::io::stderr().is_terminal() {
        let bar = ProgressBar::new(total);
        if let Ok(style) = ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg}") {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_prefix(name);
        bar
    } else {
        ProgressBar::hidden()
    };

    let mut runs = Vec::new();
    for pair in 0..common.pairs as usize {
        for (side, target) in [(Side::Direct, direct), (Side::Proxy, proxy)] {
            bar.set_message(format!("pair {} {}", pair + 1, target.name));
            let pid = if side == Side::Proxy {
                common.proxy_pid
            } else {
                None
            };
            let cpu0 = pid.map(proc_cpu_us).transpose()?;
            let out: RunOutput = match mode {
                Mode::Query {
                    protocol, accounts, ..
                } => {
                    let shape = modes::query::QueryShape {
                        protocol: *protocol,
                        accounts: *accounts,
                    };
                    modes::query::run(target, shape, limits).await?
                }
                Mode::Connect => modes::connect::run(target, limits).await?,
                Mode::Idle { sessions, settle } => {
                    modes::idle::run(target, *sessions, seconds(*settle, "--settle")?, pid).await?
                }
                Mode::Copy { table, .. } => {
                    modes::copy::run(target, table, payload.as_deref().unwrap_or_default()).await?
                }
            };
            let mut figures = out.figures;
            if let (Some(pid), Some(cpu0)) = (pid, cpu0) {
                let used = proc_cpu_us(pid)? - cpu0;
                let unit = match mode {
                    Mode::Query { .. } => "proxy_cpu_us_per_query",
                    Mode::Connect => "proxy_cpu_us_per_connection",
                    Mode::Idle { .. } => "proxy_cpu_us_per_session",
                    Mode::Copy { .. } => "proxy_cpu_us_per_mb",
                };
                figures.insert(unit, used / out.ops.max(1) as f64);
            }
            runs.push(RunRecord {
                pair,
                side,
                figures,
            });
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    Ok(Report::new(name, settings, runs))
}

//! `eastwall lock`: place, list and lift operators' locks in the lock file a running sidecar
//! watches (`[locks] file`, applied within 2 s).

use std::path::PathBuf;
use std::time::SystemTime;

use anyhow::Context;
use clap::Subcommand;
use eastwall_config::Settings;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::locks::{self, Lock, Target};

/// Arguments of `eastwall lock`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Refuse new connections (and step-up) matching one target; prints the new lock's id.
    Add {
        /// The sidecar's eastwall.toml (names the lock file and the trust domain).
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        #[command(flatten)]
        target: TargetArgs,
        /// Lift the lock by itself after this long ("30m", "8h"); absent: until removed.
        #[arg(long, value_name = "DURATION")]
        ttl: Option<String>,
        /// Shown to refused clients and written in the decision log.
        #[arg(long, value_name = "TEXT", default_value = "")]
        message: String,
        #[command(flatten)]
        fleet: FleetArgs,
    },
    /// List the locks in force.
    List {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Lift a lock by its id.
    Remove {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        #[arg(value_name = "LOCK_ID")]
        id: String,
        #[command(flatten)]
        fleet: FleetArgs,
    },
}

/// `--fleet`: the lock goes to every sidecar of the config's [fleet], signed by the
/// operator's SVID, instead of this host's lock file.
#[derive(Debug, clap::Args)]
struct FleetArgs {
    /// Publish to the fleet bucket instead of the local lock file.
    #[arg(long, requires_all = ["cert", "key"])]
    fleet: bool,
    /// With --fleet: the operator's certificate (an identity in [fleet] admins).
    #[arg(long, value_name = "FILE", requires = "fleet")]
    cert: Option<PathBuf>,
    /// With --fleet: its private key.
    #[arg(long, value_name = "FILE", requires = "fleet")]
    key: Option<PathBuf>,
}

impl FleetArgs {
    fn signer(&self) -> Option<crate::cli::fleet::Signer> {
        match (self.fleet, &self.cert, &self.key) {
            (true, Some(cert), Some(key)) => Some(crate::cli::fleet::Signer {
                cert: cert.clone(),
                key: key.clone(),
            }),
            _ => None,
        }
    }
}

/// Exactly one target.
#[derive(Debug, clap::Args)]
#[group(required = true, multiple = false)]
struct TargetArgs {
    /// A SPIFFE ID pattern in this sidecar's trust domain (`*` one segment, `**` one or more).
    #[arg(long, value_name = "PATTERN")]
    id: Option<String>,
    /// A certificate serial in hex, as `eastwall ca issue` prints it (colons allowed).
    #[arg(long, value_name = "HEX")]
    serial: Option<String>,
    /// A client address or range: 192.0.2.7, 10.0.0.0/8, 2001:db8::/32.
    #[arg(long, value_name = "IP[/LEN]")]
    source: Option<String>,
    /// A database role, exactly as clients name it.
    #[arg(long, value_name = "ROLE")]
    role: Option<String>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    match args.command {
        Command::Add {
            config,
            target,
            ttl,
            message,
            fleet,
        } => match fleet.signer() {
            Some(signer) => add_fleet(&config, &signer, &target, ttl.as_deref(), message),
            None => add(&config, &target, ttl.as_deref(), message),
        },
        Command::List { config } => list(&config),
        Command::Remove { config, id, fleet } => match fleet.signer() {
            Some(signer) => {
                crate::cli::fleet::remove_lock(&config, &signer, &id)?;
                outln!("removed fleet lock {id}; every sidecar lifts it within 2 s");
                Ok(())
            }
            None => remove(&config, &id),
        },
    }
}

fn settings(config: &std::path::Path) -> anyhow::Result<Settings> {
    Settings::load(config).map_err(|e| anyhow::anyhow!("{}", e.lines().join("; ")))
}

fn add(
    config: &std::path::Path,
    target: &TargetArgs,
    ttl: Option<&str>,
    message: String,
) -> anyhow::Result<()> {
    let settings = settings(config)?;
    let td = &settings.trust_domain;
    let target = parse_target(target, td)?;
    let ttl = parse_ttl(ttl)?;
    let now = SystemTime::now();
    let created_by = locks::os_user();
    let lock = locks::edit(&settings.locks_file, td, now, |set| {
        let lock = Lock::new(target, ttl, message, created_by, now, set)?;
        let mut all = set.locks().to_vec();
        all.push(lock.clone());
        Ok((all, lock))
    })?;
    outln!("{}", lock.id);
    eprintln!(
        "eastwall: locked {} ({}); a running sidecar applies it within 2 s",
        lock.target,
        expires(&lock)
    );
    Ok(())
}

fn add_fleet(
    config: &std::path::Path,
    signer: &crate::cli::fleet::Signer,
    target: &TargetArgs,
    ttl: Option<&str>,
    message: String,
) -> anyhow::Result<()> {
    let lock = crate::cli::fleet::add_lock(config, signer, |settings, signer_id| {
        let target = parse_target(target, &settings.trust_domain)?;
        let ttl = parse_ttl(ttl)?;
        Ok(Lock::new(
            target,
            ttl,
            message,
            signer_id,
            SystemTime::now(),
            &locks::LockSet::default(),
        )?)
    })?;
    outln!("{}", lock.id);
    eprintln!(
        "eastwall: locked {} ({}) on every sidecar of the fleet; each applies it within 2 s",
        lock.target,
        expires(&lock)
    );
    Ok(())
}

fn parse_ttl(ttl: Option<&str>) -> anyhow::Result<Option<std::time::Duration>> {
    ttl.map(|t| {
        humantime::parse_duration(t).with_context(|| {
            format!("--ttl {t:?}: expected a duration such as \"30m\", \"8h\" or \"2d\"")
        })
    })
    .transpose()
}

fn parse_target(
    target: &TargetArgs,
    td: &eastwall_ca::spiffe::TrustDomain,
) -> anyhow::Result<Target> {
    Ok(match target {
        TargetArgs { id: Some(p), .. } => Target::id(p, td),
        TargetArgs {
            serial: Some(s), ..
        } => Target::serial(s),
        TargetArgs {
            source: Some(c), ..
        } => Target::source(c),
        TargetArgs { role: Some(r), .. } => Target::role(r),
        _ => anyhow::bail!("expected one of --id, --serial, --source or --role"),
    }?)
}

fn expires(lock: &Lock) -> String {
    match lock.expires_at {
        Some(at) => format!("until {}", rfc3339(at)),
        None => "until removed".into(),
    }
}

fn rfc3339(t: SystemTime) -> String {
    OffsetDateTime::from(t)
        .format(&Rfc3339)
        .unwrap_or_else(|_| "?".into())
}

fn list(config: &std::path::Path) -> anyhow::Result<()> {
    let settings = settings(config)?;
    let (set, _) = locks::load(&settings.locks_file, &settings.trust_domain)?;
    let now = SystemTime::now();
    let rows: Vec<[String; 4]> = set
        .active(now)
        .map(|l| {
            [
                l.id.clone(),
                l.target.to_string(),
                l.expires_at.map_or_else(|| "never".into(), rfc3339),
                l.message.clone(),
            ]
        })
        .collect();
    if rows.is_empty() {
        outln!("no locks in force ({})", settings.locks_file.display());
        return Ok(());
    }
    let header = ["ID", "TARGET", "EXPIRES", "MESSAGE"].map(String::from);
    let mut widths = [0usize; 3];
    for row in std::iter::once(&header).chain(&rows) {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    for row in std::iter::once(&header).chain(&rows) {
        outln!(
            "{:<w0$}  {:<w1$}  {:<w2$}  {}",
            row[0],
            row[1],
            row[2],
            row[3],
            w0 = widths[0],
            w1 = widths[1],
            w2 = widths[2]
        );
    }
    Ok(())
}

fn remove(config: &std::path::Path, id: &str) -> anyhow::Result<()> {
    let settings = settings(config)?;
    let now = SystemTime::now();
    let removed = locks::edit(&settings.locks_file, &settings.trust_domain, now, |set| {
        let Some(lock) = set.get(id).cloned() else {
            return Err(locks::LockError::UnknownId(id.to_owned()));
        };
        let rest = set.locks().iter().filter(|l| l.id != id).cloned().collect();
        Ok((rest, lock))
    })?;
    outln!("removed lock {} on {}", removed.id, removed.target);
    Ok(())
}

//! `eastwall ca`: create the trust-domain root, issue X.509-SVIDs, print the trust bundle,
//! revoke certificates and re-sign the CRL.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use eastwall_ca::{Ca, IssueRequest, RevokeTarget, SpiffeId, TrustDomain};

/// Arguments of `eastwall ca`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Create a new CA (root certificate, key, empty CRL) for a trust domain.
    Init(InitArgs),
    /// Issue an X.509-SVID for a SPIFFE ID, with a new key or for a CSR.
    Issue(IssueArgs),
    /// Print the trust bundle (the root certificate, PEM) on stdout.
    Bundle(BundleArgs),
    /// Revoke a certificate by serial, or every unexpired certificate of a SPIFFE ID.
    Revoke(RevokeArgs),
    /// Re-sign the CRL with a fresh nextUpdate (7 days); run it at least weekly, e.g. from cron.
    Crl(CrlArgs),
    /// List the certificates this CA issued: serial, identity, expiry, state (newest last).
    List(ListArgs),
}

#[derive(Debug, clap::Args)]
struct ListArgs {
    /// The CA folder.
    #[arg(long, value_name = "DIR")]
    dir: PathBuf,
    /// Also list expired and revoked certificates.
    #[arg(long)]
    all: bool,
}

#[derive(Debug, clap::Args)]
struct InitArgs {
    /// The CA folder; created if missing.
    #[arg(long, value_name = "DIR")]
    dir: PathBuf,
    /// The trust domain, e.g. corp.example.
    #[arg(long, value_name = "DOMAIN")]
    trust_domain: String,
    /// How long the root is valid, e.g. 365d.
    #[arg(long, value_name = "DURATION", default_value = "365d")]
    ttl: String,
    /// Replace an existing CA; every certificate it issued stops being trusted.
    #[arg(long)]
    force: bool,
}

#[derive(Debug, clap::Args)]
struct IssueArgs {
    /// The CA folder.
    #[arg(long, value_name = "DIR")]
    dir: PathBuf,
    /// The workload's identity, e.g. spiffe://corp.example/app/billing.
    #[arg(value_name = "SPIFFE_ID")]
    id: String,
    /// How long the certificate is valid, e.g. 1h, 30m, 90d. Never beyond the CA's own expiry.
    /// Default: 1h for a workload's client certificate (short-lived, reissued often), 30d for a
    /// server certificate (one with --dns or --ip), which a sidecar serves until it is rotated.
    #[arg(long, value_name = "DURATION")]
    ttl: Option<String>,
    /// A DNS name to add (makes it a server certificate too). Repeatable.
    #[arg(long = "dns", value_name = "NAME")]
    dns: Vec<String>,
    /// An IP address to add (makes it a server certificate too). Repeatable.
    #[arg(long = "ip", value_name = "ADDR")]
    ip: Vec<String>,
    /// Sign this PKCS#10 CSR (PEM): only its public key is used, and no key file is written.
    #[arg(long, value_name = "FILE")]
    csr: Option<PathBuf>,
    /// Subject common name (PostgreSQL `cert` authentication maps CN to the role).
    #[arg(long, value_name = "NAME")]
    cn: Option<String>,
    /// Writes PREFIX.pem (leaf then chain) and PREFIX.key (mode 0600).
    #[arg(long, value_name = "PREFIX")]
    out: PathBuf,
    /// Replace an existing PREFIX.pem / PREFIX.key (a running service may still use them).
    #[arg(long)]
    force: bool,
}

/// Default lifetimes: a client SVID is reissued often; a server certificate is served by a
/// sidecar until somebody rotates it, and one that lapses refuses every client.
const CLIENT_TTL: &str = "1h";
const SERVER_TTL: &str = "30d";
/// A server certificate shorter than this gets a warning.
const SHORT_SERVER_TTL: std::time::Duration = std::time::Duration::from_secs(7 * 24 * 3600);

#[derive(Debug, clap::Args)]
struct BundleArgs {
    /// The CA folder.
    #[arg(long, value_name = "DIR")]
    dir: PathBuf,
}

#[derive(Debug, clap::Args)]
struct RevokeArgs {
    /// The CA folder.
    #[arg(long, value_name = "DIR")]
    dir: PathBuf,
    /// A serial in hex (as printed by `ca issue`; colons allowed) or a SPIFFE ID.
    #[arg(value_name = "SERIAL|SPIFFE_ID")]
    target: String,
}

#[derive(Debug, clap::Args)]
struct CrlArgs {
    /// The CA folder.
    #[arg(long, value_name = "DIR")]
    dir: PathBuf,
}

/// The largest CSR file we read; real ones are a few hundred bytes.
const MAX_CSR_LEN: u64 = 64 * 1024;

pub fn run(args: Args) -> anyhow::Result<()> {
    match args.command {
        Command::Init(a) => init(a),
        Command::Issue(a) => issue(a),
        Command::Bundle(a) => bundle(a),
        Command::Revoke(a) => revoke(a),
        Command::Crl(a) => crl(a),
        Command::List(a) => list(a),
    }
}

fn init(a: InitArgs) -> anyhow::Result<()> {
    // Inputs are parsed here rather than by clap so a mistake is one line, like every error.
    let td = TrustDomain::parse(&a.trust_domain)
        .with_context(|| format!("--trust-domain {:?}", a.trust_domain))?;
    let ttl = eastwall_ca::parse_duration(&a.ttl).context("--ttl")?;
    let ca = Ca::init(&a.dir, &td, ttl, a.force)?;
    outln!(
        "created CA for trust domain {td} in {}: ca.pem (trust bundle), ca.key (private, 0600), crl.pem; valid until {}",
        a.dir.display(),
        rfc3339(ca.not_after())
    );
    Ok(())
}

/// A second `ca issue` to the same prefix would silently replace a key a service may be using.
fn refuse_overwrite(prefix: &Path, writes_key: bool, force: bool) -> anyhow::Result<()> {
    if force {
        return Ok(());
    }
    let mut exts = vec![".pem"];
    if writes_key {
        exts.push(".key");
    }
    for ext in exts {
        let mut path = std::ffi::OsString::from(prefix.as_os_str());
        path.push(ext);
        let path = PathBuf::from(path);
        if path.symlink_metadata().is_ok() {
            anyhow::bail!(
                "{} already exists; pass --force to replace it (a service may still be using it)",
                path.display()
            );
        }
    }
    Ok(())
}

fn issue(a: IssueArgs) -> anyhow::Result<()> {
    let id = SpiffeId::parse(&a.id).with_context(|| format!("SPIFFE ID {:?}", a.id))?;
    let server = !a.dns.is_empty() || !a.ip.is_empty();
    let default_ttl = if server { SERVER_TTL } else { CLIENT_TTL };
    let ttl_text = a.ttl.as_deref().unwrap_or(default_ttl);
    let ttl = eastwall_ca::parse_duration(ttl_text).context("--ttl")?;
    refuse_overwrite(&a.out, a.csr.is_none(), a.force)?;
    let ips =
        a.ip.iter()
            .map(|s| {
                s.parse::<IpAddr>()
                    .with_context(|| format!("--ip {s:?} is not an IP address"))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
    let csr_pem = a.csr.as_deref().map(read_csr).transpose()?;
    let ca = Ca::open(&a.dir)?;
    let mut req = IssueRequest::new(id);
    req.ttl = ttl;
    req.dns = a.dns;
    req.ips = ips;
    req.common_name = a.cn;
    req.csr_pem = csr_pem;
    let issued = match &a.csr {
        Some(csr) => ca
            .issue(&req)
            .with_context(|| format!("--csr {}", csr.display()))?,
        None => ca.issue(&req)?,
    };
    let (cert, key) = issued.write(&a.out)?;
    if server && ttl < SHORT_SERVER_TTL {
        eprintln!(
            "warning: this server certificate is valid for only {ttl_text}; a sidecar serving it refuses every client once it lapses, so issue the next one before then (the sidecar reloads its certificate files without a restart)"
        );
    }
    let mut written = cert.display().to_string();
    if let Some(key) = key {
        written.push_str(&format!(", {} (0600)", key.display()));
    }
    outln!(
        "issued serial {} for {}, valid until {}: {written}",
        issued.serial_hex,
        req.id,
        rfc3339(issued.not_after)
    );
    Ok(())
}

fn read_csr(path: &Path) -> anyhow::Result<String> {
    use std::io::Read;
    let file = std::fs::File::open(path)
        .with_context(|| format!("--csr {}: could not open", path.display()))?;
    let mut text = String::new();
    file.take(MAX_CSR_LEN + 1)
        .read_to_string(&mut text)
        .with_context(|| format!("--csr {}: could not read it as PEM text", path.display()))?;
    if text.len() as u64 > MAX_CSR_LEN {
        anyhow::bail!(
            "--csr {}: larger than {MAX_CSR_LEN} bytes, not a CSR",
            path.display()
        );
    }
    Ok(text)
}

fn bundle(a: BundleArgs) -> anyhow::Result<()> {
    let ca = Ca::open(&a.dir)?;
    super::write_stdout_bytes(ca.bundle_pem().as_bytes());
    Ok(())
}

fn revoke(a: RevokeArgs) -> anyhow::Result<()> {
    let target: RevokeTarget = a.target.parse().with_context(|| {
        format!(
            "{:?} is neither a hex serial nor a valid SPIFFE ID",
            a.target
        )
    })?;
    let ca = Ca::open(&a.dir)?;
    let serials = ca.revoke(&target)?;
    for serial in &serials {
        outln!("revoked serial {serial}");
    }
    outln!(
        "{} re-signed: {} revoked by this command; re-sign it with `eastwall ca crl` within 7 days",
        ca.crl_path().display(),
        serials.len()
    );
    Ok(())
}

fn crl(a: CrlArgs) -> anyhow::Result<()> {
    let ca = Ca::open(&a.dir)?;
    let next_update = ca.refresh_crl()?;
    outln!(
        "{} re-signed; next update {}",
        ca.crl_path().display(),
        rfc3339(next_update)
    );
    Ok(())
}

fn list(a: ListArgs) -> anyhow::Result<()> {
    let ca = Ca::open(&a.dir)?;
    let now = time::OffsetDateTime::now_utc();
    let mut shown = 0usize;
    let records = ca.records()?;
    for rec in &records {
        let state = if rec.revoked {
            "revoked"
        } else if rec.not_after <= now {
            "expired"
        } else {
            "valid"
        };
        if !a.all && state != "valid" {
            continue;
        }
        let left = rec.not_after - now;
        let remaining = if state == "valid" {
            format!(" ({} left)", short_duration(left.whole_seconds()))
        } else {
            String::new()
        };
        let server = if rec.dns.is_empty() && rec.ips.is_empty() {
            "client"
        } else {
            "server"
        };
        outln!(
            "{}  {}  {server}  until {}{remaining}  {state}",
            rec.serial,
            rec.spiffe_id,
            rfc3339(rec.not_after)
        );
        shown += 1;
    }
    if shown == 0 {
        outln!(
            "no {}certificates ({} issued in all)",
            if a.all { "" } else { "valid " },
            records.len()
        );
    }
    Ok(())
}

/// `3d 4h`, `5h 2m`, `40s`: how long is left, to the unit that matters.
fn short_duration(secs: i64) -> String {
    let (d, h, m) = (secs / 86_400, secs % 86_400 / 3600, secs % 3600 / 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{secs}s"),
        (0, 0, m) => format!("{m}m"),
        (0, h, m) => format!("{h}h {m}m"),
        (d, h, _) => format!("{d}d {h}h"),
    }
}

fn rfc3339(t: time::OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.to_string())
}

//! `eastwall quickstart`: a complete, working sidecar layout in one folder.

use std::net::SocketAddr;
use std::path::PathBuf;

use eastwall_ca::TrustDomain;

use crate::quickstart::{self, Options, UpstreamAuth};

/// Arguments of `eastwall quickstart`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The folder to lay out (created; must not already hold an eastwall.toml).
    #[arg(long, value_name = "DIR")]
    pub dir: PathBuf,
    /// PostgreSQL: HOST:PORT, or /socket/dir:PORT for a Unix socket.
    #[arg(long, value_name = "HOST:PORT")]
    pub upstream: String,
    /// Where the sidecar listens for clients.
    #[arg(long, value_name = "ADDR:PORT", default_value = "127.0.0.1:5432")]
    pub listen: SocketAddr,
    /// How the proxy logs in to PostgreSQL.
    #[arg(long, value_enum, default_value = "trust")]
    pub upstream_auth: UpstreamAuth,
    /// The SPIFFE trust domain.
    #[arg(long, value_name = "DOMAIN", default_value = "corp.example")]
    pub trust_domain: TrustDomain,
    /// Where the HTTPS step-up endpoint listens.
    #[arg(long, value_name = "ADDR:PORT", default_value = "127.0.0.1:8443")]
    pub stepup_listen: SocketAddr,
    /// Where /healthz, /readyz and /metrics are served (plain HTTP), or "off".
    #[arg(long, value_name = "ADDR:PORT|off", default_value = "127.0.0.1:9187", value_parser = parse_admin_listen)]
    pub admin_listen: AdminListen,
}

/// `--admin-listen`: an address, or None for "off".
#[derive(Debug, Clone, Copy)]
pub struct AdminListen(pub Option<SocketAddr>);

fn parse_admin_listen(s: &str) -> Result<AdminListen, String> {
    match s.trim() {
        "off" | "" => Ok(AdminListen(None)),
        addr => addr.parse().map(|a| AdminListen(Some(a))).map_err(|_| {
            format!("expected ADDR:PORT such as 127.0.0.1:9187, or \"off\"; found {s:?}")
        }),
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let opts = Options {
        dir: args.dir,
        upstream: args.upstream,
        listen: args.listen,
        upstream_auth: args.upstream_auth,
        trust_domain: args.trust_domain,
        stepup_listen: Some(args.stepup_listen),
        admin_listen: args.admin_listen.0,
    };
    let layout = quickstart::quickstart(&opts)?;
    let dir = layout.dir.display();
    outln!("Eastwall sidecar laid out in {dir}");
    outln!("  config:  {}", layout.config.display());
    outln!("  policy:  {dir}/policy.ew (the seed's zero-trust policy)");
    outln!("  CA:      {dir}/ca (trust bundle ca.pem, CRL crl.pem)");
    for who in &layout.identities {
        outln!("  {:<15} {}  ({})", who.name, who.id, who.cert.display());
    }
    outln!("  alice's TOTP secret: {dir}/mfa/alice.totp");
    outln!();
    outln!("PostgreSQL needs the roles {}:", layout.roles.join(", "));
    for role in &layout.roles {
        match &layout.upstream_password {
            Some(pw) => outln!("  CREATE ROLE {role} LOGIN PASSWORD '{pw}';"),
            None => outln!("  CREATE ROLE {role} LOGIN;"),
        }
    }
    // Run as root, the advice is for the dedicated user the sidecar should run as instead.
    let me = quickstart::current_os_user();
    let os_user = if me == "root" {
        "eastwall".to_owned()
    } else {
        me
    };
    let hba = quickstart::pg_hba(&opts.upstream, opts.upstream_auth, &os_user, &layout.roles);
    outln!();
    outln!("PostgreSQL's pg_hba.conf, above any broader line (first match wins):");
    for line in &hba.hba {
        outln!("  {line}");
    }
    if !hba.ident.is_empty() {
        outln!("pg_ident.conf (for the sidecar run as the OS user {os_user}, docs/production.md; one line per role):");
        for line in &hba.ident {
            outln!("  {line}");
        }
    }
    if !hba.server_conf.is_empty() {
        outln!("postgresql.conf:");
        for line in &hba.server_conf {
            outln!("  {line}");
        }
    }
    if let Some(warning) = &hba.warning {
        outln!("warning: {warning}");
    }
    outln!();
    outln!("Start the sidecar:");
    outln!("  eastwall proxy --config {}", layout.config.display());
    outln!("Then try, through the proxy:");
    for (name, role, note) in [
        ("billing", "billing", "allowed: app segment, its own role"),
        (
            "finance-laptop",
            "finance-laptop",
            "denied with an alert: workstations never reach the database",
        ),
        (
            "alice",
            "alice",
            "challenged: type alice's current TOTP code at the password prompt",
        ),
    ] {
        if let Some(who) = layout.identity(name) {
            outln!("  # {note}");
            outln!(
                "  {}",
                quickstart::psql_command(&layout, who, opts.listen, role)
            );
        }
    }
    Ok(())
}

//! `eastwall policy`: check a configuration and its policy, or explain one decision.

use std::net::IpAddr;
use std::path::PathBuf;

use anyhow::Context as _;
use eastwall_ca::spiffe::SpiffeId;
use eastwall_config::{Config, Request};

/// Arguments of `eastwall policy`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Validate eastwall.toml and its policy file; print a one-line summary or every error.
    Check {
        /// The sidecar's eastwall.toml.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Show the decision for one identity and, rule by rule, why.
    Explain {
        /// The sidecar's eastwall.toml.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// The client's SPIFFE ID, e.g. spiffe://corp.example/app/billing.
        #[arg(long, value_name = "SPIFFE_ID")]
        id: String,
        /// Database role asked for [default: the last segment of the SPIFFE ID].
        #[arg(long, value_name = "ROLE")]
        user: Option<String>,
        /// Database asked for [default: the role].
        #[arg(long, value_name = "DB")]
        database: Option<String>,
        /// Client address, for the record.
        #[arg(long, value_name = "IP", default_value = "127.0.0.1")]
        source: IpAddr,
        /// Assume a fresh MFA assertion was presented.
        #[arg(long)]
        mfa: bool,
        /// Target segment [default: the segment this sidecar guards].
        #[arg(long, value_name = "NAME")]
        segment: Option<String>,
        /// Target port in policy terms [default: service_port].
        #[arg(long, value_name = "PORT")]
        port: Option<u16>,
        /// Exit with the decision, for scripts and CI: 0 allow, 3 deny, 4 challenge (MFA).
        #[arg(long)]
        exit_code: bool,
    },
}

pub fn run(args: Args) -> anyhow::Result<()> {
    match args.command {
        Command::Check { config } => check(&config),
        Command::Explain {
            config,
            id,
            user,
            database,
            source,
            mfa,
            segment,
            port,
            exit_code,
        } => {
            let config = load(&config)?;
            let id = SpiffeId::parse(&id).with_context(|| format!("--id {id:?}"))?;
            let user = user.unwrap_or_else(|| id.last_segment().to_owned());
            let database = database.unwrap_or_else(|| user.clone());
            let settings = &config.settings;
            let segment = segment.unwrap_or_else(|| settings.guards.clone());
            let req = Request {
                id: &id,
                source,
                segment: &segment,
                port: port.unwrap_or(settings.service_port),
                user: &user,
                database: &database,
                mfa_fresh: mfa,
                mfa_roles: Some(&crate::server::mfa_roles(&config.settings, &config.policy)),
            };
            let (decision, trace) = eastwall_config::explain(&config.policy, &req);
            outln!("decision: {}", decision.verdict.as_str());
            match &decision.rule {
                Some(rule) => outln!("rule: {rule}"),
                None => outln!("rule: none (default action DENY)"),
            }
            outln!("reason: {}", decision.reason);
            outln!("alert: {}", if decision.alert { "yes" } else { "no" });
            if let Some(group) = &decision.mfa_group {
                outln!("mfa group: {group}");
            }
            if decision.role_named_by_rule {
                outln!("role named by rule: yes (the rule names this role, so it is admitted even if it is superuser-equivalent)");
            }
            outln!("trace:");
            for line in trace {
                outln!("  {line}");
            }
            if exit_code {
                let code = match decision.verdict {
                    eastwall_config::Verdict::Allow => 0,
                    eastwall_config::Verdict::Deny => 3,
                    eastwall_config::Verdict::Challenge => 4,
                };
                let _ = std::io::Write::flush(&mut std::io::stdout());
                std::process::exit(code);
            }
            Ok(())
        }
    }
}

/// Loads the configuration, printing every problem on its own line to stderr.
pub(crate) fn load(path: &std::path::Path) -> anyhow::Result<Config> {
    match Config::load(path) {
        Ok(config) => Ok(config),
        Err(err) => {
            let lines = err.lines();
            for line in &lines {
                eprintln!("{line}");
            }
            let n = lines.len();
            anyhow::bail!(
                "{}: {n} problem{} found",
                path.display(),
                if n == 1 { "" } else { "s" }
            )
        }
    }
}

fn plural(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

fn check(path: &std::path::Path) -> anyhow::Result<()> {
    let config = load(path)?;
    let policy = &config.policy;
    let settings = &config.settings;
    let counts = policy.counts();
    let kinds: Vec<String> = [
        (counts.allow, "allow"),
        (counts.deny, "deny"),
        (counts.deny_and_alert, "deny+alert"),
    ]
    .into_iter()
    .filter(|(n, _)| *n > 0)
    .map(|(n, kind)| format!("{n} {kind}"))
    .collect();
    let kinds = if kinds.is_empty() {
        String::new()
    } else {
        format!(" ({})", kinds.join(", "))
    };
    outln!(
        "ok: {}: {}{kinds}, {}, {}; guards {}:{}",
        policy.file(),
        plural(policy.rule_count(), "rule", "rules"),
        plural(settings.segments.len(), "segment", "segments"),
        plural(settings.groups.len(), "group", "groups"),
        settings.guards,
        settings.service_port
    );
    // Not errors (the sidecar refuses these requests), but the author should know.
    let roles = crate::server::mfa_roles(settings, policy);
    for gap in policy.mfa_role_gaps(&settings.guards, settings.service_port, &roles) {
        eprintln!("warning: {gap}");
    }
    Ok(())
}

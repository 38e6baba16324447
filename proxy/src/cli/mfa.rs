//! `eastwall mfa`: enroll, list and remove human operators' TOTP secrets; fetch a step-up token.

use std::io::IsTerminal;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use clap::Subcommand;
use eastwall_ca::SpiffeId;
use eastwall_config::Config;
use qrcode::render::unicode::Dense1x2;
use qrcode::QrCode;
use time::format_description::well_known::Rfc3339;

use crate::mfa::SecretStore;
use crate::stepup;

/// How long `mfa login` waits for the step-up endpoint.
const LOGIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Arguments of `eastwall mfa`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create a TOTP secret for a human operator and show it as an otpauth:// URI and QR code.
    Enroll {
        /// The sidecar's eastwall.toml (names the secrets file and the policy).
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// The operator's SPIFFE ID; it must be in a group that an mfa(...) rule names.
        #[arg(value_name = "SPIFFE_ID")]
        id: String,
        /// Replace an existing secret (the operator's current authenticator entry stops working).
        #[arg(long)]
        force: bool,
    },
    /// List enrolled identities and when each was enrolled.
    List {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Remove an identity's TOTP secret.
    Remove {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        #[arg(value_name = "SPIFFE_ID")]
        id: String,
    },
    /// Clear an identity's MFA lockout (a running sidecar applies it within a few seconds).
    Unlock {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        #[arg(value_name = "SPIFFE_ID")]
        id: String,
    },
    /// Fetch a step-up token from a running sidecar and print only the token, for
    /// `export PGPASSWORD=$(eastwall mfa login ...)`.
    Login {
        /// The step-up endpoint, e.g. https://db.internal:8443/v1/stepup (a bare
        /// https://db.internal:8443 means the same).
        #[arg(long, value_name = "URL")]
        url: String,
        /// Your certificate (PEM, leaf first).
        #[arg(long, value_name = "PEM")]
        cert: PathBuf,
        /// Your private key (PEM).
        #[arg(long, value_name = "KEY")]
        key: PathBuf,
        /// The CA bundle the sidecar's certificate must chain to (PEM).
        #[arg(long, value_name = "PEM")]
        ca: PathBuf,
        /// The current TOTP code; asked for without echo when absent.
        #[arg(long, value_name = "CODE")]
        code: Option<String>,
    },
}

pub fn run(args: Args) -> anyhow::Result<()> {
    match args.command {
        Command::Enroll { config, id, force } => enroll(&config, &id, force),
        Command::List { config } => list(&config),
        Command::Remove { config, id } => remove(&config, &id),
        Command::Unlock { config, id } => unlock(&config, &id),
        Command::Login {
            url,
            cert,
            key,
            ca,
            code,
        } => login(&url, &cert, &key, &ca, code),
    }
}

fn load_config(path: &Path) -> anyhow::Result<Config> {
    Config::load(path).map_err(|e| anyhow!("{e}"))
}

/// Parses `id` and checks it belongs to this sidecar's trust domain.
fn parse_id(config: &Config, id: &str) -> anyhow::Result<SpiffeId> {
    let id = SpiffeId::parse(id).with_context(|| format!("{id:?} is not a SPIFFE ID"))?;
    id.require_trust_domain(&config.settings.trust_domain)?;
    Ok(id)
}

fn enroll(config_path: &Path, id: &str, force: bool) -> anyhow::Result<()> {
    let config = load_config(config_path)?;
    let id = parse_id(&config, id)?;
    if !config.policy.requires_mfa(&id) {
        bail!(
            "{id} is not in a group that an mfa(...) rule of {} names; only identities that must step up are enrolled",
            config.settings.policy_file.display()
        );
    }
    let secrets = &config.settings.mfa.secrets;
    create_private_parent(secrets)?;
    let enrollment = SecretStore::enroll(secrets, &id, force)?;
    let qr = QrCode::new(enrollment.otpauth_uri.as_bytes())
        .context("the otpauth URI is too long for a QR code")?
        .render::<Dense1x2>()
        // Inverted so the code scans on the usual light-on-dark terminal.
        .dark_color(Dense1x2::Light)
        .light_color(Dense1x2::Dark)
        .quiet_zone(true)
        .build();
    outln!("Enrolled {id} for TOTP (SHA-1, 6 digits, 30 s).");
    outln!("Scan this QR code with an authenticator app, or add the URI by hand:");
    outln!();
    outln!("{qr}");
    outln!();
    outln!("{}", enrollment.otpauth_uri);
    outln!("secret (base32): {}", enrollment.secret_b32);
    outln!(
        "This secret is shown once; it is stored in {}.",
        secrets.display()
    );
    Ok(())
}

/// Creates the secrets file's folder, readable by its owner only, when it does not exist yet.
fn create_private_parent(file: &Path) -> anyhow::Result<()> {
    let Some(dir) = file.parent().filter(|d| !d.as_os_str().is_empty()) else {
        return Ok(());
    };
    if dir.exists() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))
}

fn list(config_path: &Path) -> anyhow::Result<()> {
    let config = load_config(config_path)?;
    let store = SecretStore::load(&config.settings.mfa.secrets)?;
    let entries = store.list();
    if entries.is_empty() {
        eprintln!(
            "eastwall: nobody is enrolled ({})",
            config.settings.mfa.secrets.display()
        );
    }
    for (id, at) in entries {
        let at = at.format(&Rfc3339).unwrap_or_default();
        outln!("{id}\t{at}");
    }
    Ok(())
}

fn remove(config_path: &Path, id: &str) -> anyhow::Result<()> {
    let config = load_config(config_path)?;
    let id = parse_id(&config, id)?;
    SecretStore::remove(&config.settings.mfa.secrets, &id)?;
    outln!("Removed {id}'s TOTP secret.");
    Ok(())
}

fn unlock(config_path: &Path, id: &str) -> anyhow::Result<()> {
    let config = load_config(config_path)?;
    let id = parse_id(&config, id)?;
    SecretStore::unlock(&config.settings.mfa.secrets, &id)?;
    outln!(
        "Cleared {id}'s MFA lockout; a running sidecar applies it within a few seconds (its source address keeps its own budget)."
    );
    Ok(())
}

fn login(
    url: &str,
    cert: &Path,
    key: &Path,
    ca: &Path,
    code: Option<String>,
) -> anyhow::Result<()> {
    let tls = client_tls(cert, key, ca)?;
    let code = match code {
        Some(code) => code,
        None => {
            super::secret_prompt::prompt_secret("MFA code: ").map_err(|err| match err.kind() {
                std::io::ErrorKind::Interrupted => anyhow!("cancelled at the MFA code prompt"),
                std::io::ErrorKind::UnexpectedEof => {
                    anyhow!("no MFA code was typed (end of input); type it, or pass --code CODE")
                }
                std::io::ErrorKind::InvalidData => anyhow!("{err}; an MFA code is six digits"),
                _ => anyhow!("no terminal to prompt for the MFA code on; pass --code CODE"),
            })?
        }
    };
    let url = stepup_url(url);
    let code = code.trim().to_owned();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let answer = runtime.block_on(stepup::fetch_token(
        &url,
        Arc::new(tls),
        &code,
        LOGIN_TIMEOUT,
    ))?;
    outln!("{}", answer.token);
    if std::io::stderr().is_terminal() {
        eprintln!("eastwall: step-up token valid until {}", answer.expires_at);
    }
    Ok(())
}

/// The step-up endpoint for `url`: a bare base URL (`https://db.internal:8443`, with or
/// without a trailing slash) means its `/v1/stepup`; any other path is taken as given.
fn stepup_url(url: &str) -> String {
    let trimmed = url.trim();
    let after_scheme = trimmed.find("://").map_or(0, |i| i + 3);
    match trimmed[after_scheme..].find('/') {
        None => format!("{trimmed}/v1/stepup"),
        Some(i) if trimmed[after_scheme + i..] == *"/" => format!("{trimmed}v1/stepup"),
        Some(_) => trimmed.to_owned(),
    }
}

fn read_certs(path: &Path) -> anyhow::Result<Vec<rustls_pki_types::CertificateDer<'static>>> {
    let pem = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let certs = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{}: not a PEM certificate file", path.display()))?;
    if certs.is_empty() {
        bail!("{}: no certificate in it", path.display());
    }
    Ok(certs)
}

/// TLS for `mfa login`: verify the sidecar against `ca`, present `cert`/`key` as the client.
fn client_tls(cert: &Path, key: &Path, ca: &Path) -> anyhow::Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for root in read_certs(ca)? {
        roots.add(root).with_context(|| {
            format!(
                "{}: a certificate in it is not usable as a CA",
                ca.display()
            )
        })?;
    }
    let chain = read_certs(cert)?;
    let key_pem = std::fs::read(key).with_context(|| format!("reading {}", key.display()))?;
    let key_der = rustls_pemfile::private_key(&mut key_pem.as_slice())
        .with_context(|| format!("{}: not a PEM private key", key.display()))?
        .ok_or_else(|| anyhow!("{}: no private key in it", key.display()))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS setup")?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key_der)
        .with_context(|| {
            format!(
                "{} and {} do not make a usable client certificate",
                cert.display(),
                key.display()
            )
        })
}

#[cfg(test)]
mod tests {
    use super::stepup_url;

    #[test]
    fn a_base_url_means_its_stepup_endpoint() {
        for base in [
            "https://db.internal:8443",
            "https://db.internal:8443/",
            " https://db.internal:8443 ",
        ] {
            assert_eq!(
                stepup_url(base),
                "https://db.internal:8443/v1/stepup",
                "{base:?}"
            );
        }
        assert_eq!(
            stepup_url("https://db.internal:8443/v1/stepup"),
            "https://db.internal:8443/v1/stepup"
        );
        assert_eq!(
            stepup_url("https://gw/custom/path"),
            "https://gw/custom/path"
        );
    }
}

//! `eastwall check`: a sound sidecar passes, and each problem it knows is reported on one line naming the setting and the file, against a real PostgreSQL.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, SystemTime};

use eastwall::preflight::{self, Level, Report};
use eastwall::quickstart::UpstreamAuth;
use eastwall_e2e::eastwall_bin;
use eastwall_e2e::sidecar::{Deployment, SidecarOptions};

const DAY: Duration = Duration::from_secs(86_400);

async fn deployment() -> anyhow::Result<Deployment> {
    Deployment::start(SidecarOptions {
        upstream_auth: UpstreamAuth::Password,
        edit_config: Some(Box::new(|text: &mut String| {
            *text = text.replace("[upstream]\n", "[upstream]\ncheck_role = \"billing\"\n");
        })),
        ..SidecarOptions::default()
    })
    .await
}

async fn report(config: &Path, now: SystemTime) -> anyhow::Result<Report> {
    let c = eastwall_config::Config::load(config)
        .map_err(|e| anyhow::anyhow!("{}", e.lines().join("\n")))?;
    Ok(preflight::check(&c.settings, &c.policy, now).await)
}

/// The one finding at `level` about `what` that says `says`.
fn has(r: &Report, level: Level, what: &str, says: &str) {
    assert!(
        r.findings
            .iter()
            .any(|f| f.level == level && f.what.starts_with(what) && f.message.contains(says)),
        "no {level:?} about {what} saying {says:?}:\n{}",
        r.findings
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("\n")
    );
}

fn chmod(path: &Path, mode: u32) -> anyhow::Result<()> {
    Ok(std::fs::set_permissions(
        path,
        std::fs::Permissions::from_mode(mode),
    )?)
}

/// Runs `change`, checks, then puts the file back as it was.
async fn with_file_changed(
    d: &Deployment,
    path: &Path,
    change: impl FnOnce(&Path) -> anyhow::Result<()>,
) -> anyhow::Result<Report> {
    let saved = std::fs::read(path).ok();
    let mode = std::fs::metadata(path).ok().map(|m| m.permissions().mode());
    change(path)?;
    let r = report(&d.layout.config, SystemTime::now()).await;
    match saved {
        Some(bytes) => {
            let _ = std::fs::remove_file(path);
            let _ = std::fs::remove_dir(path);
            std::fs::write(path, bytes)?;
            if let Some(mode) = mode {
                chmod(path, mode)?;
            }
        }
        None => {
            let _ = std::fs::remove_file(path);
        }
    }
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sound_sidecar_passes_and_each_problem_is_one_line_naming_its_setting(
) -> anyhow::Result<()> {
    let d = deployment().await?;
    let dir = d.layout.dir.clone();
    let config = d.layout.config.clone();

    // Sound: every finding ok, the login itself checked; the CLI says so and exits 0.
    let r = report(&config, SystemTime::now()).await?;
    assert_eq!(r.worst(), Level::Ok, "{:#?}", r.findings);
    has(
        &r,
        Level::Ok,
        "upstream",
        "logged in as check_role \"billing\"",
    );
    has(
        &r,
        Level::Ok,
        "listen.key",
        "the private key of listen.cert",
    );
    let out = tokio::task::block_in_place(|| {
        std::process::Command::new(eastwall_bin()?)
            .args(["check", "--config"])
            .arg(&config)
            .output()
            .map_err(anyhow::Error::from)
    })?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout)?;
    assert!(text.contains("ok: listen.cert "), "{text}");
    assert!(text.trim_end().ends_with("ready to run"), "{text}");

    // Time passes: a week on, the CRL is past nextUpdate (error); five days on, close (warning);
    // 340 days on the CA is within its 30-day warning, 29 days on the proxy's certificate has
    // expired.
    let r = report(&config, SystemTime::now() + 8 * DAY).await?;
    has(&r, Level::Error, "listen.crl", "expired at");
    has(&r, Level::Error, "listen.crl", "eastwall ca crl");
    let r = report(&config, SystemTime::now() + 5 * DAY + DAY / 2).await?;
    has(&r, Level::Warning, "listen.crl", "expires at");
    let r = report(&config, SystemTime::now() + 25 * DAY).await?;
    has(&r, Level::Warning, "listen.cert", "eastwall ca issue");
    let r = report(&config, SystemTime::now() + 31 * DAY).await?;
    has(&r, Level::Error, "listen.cert", "expired at");
    let r = report(&config, SystemTime::now() + 340 * DAY).await?;
    has(&r, Level::Warning, "listen.client_ca", "roll the CA over");

    let cert = dir.join("certs/proxy.pem");
    let key = dir.join("certs/proxy.key");
    // The certificate file is missing.
    let r = with_file_changed(&d, &cert, |p| Ok(std::fs::remove_file(p)?)).await?;
    has(&r, Level::Error, "listen.cert", &cert.display().to_string());
    // The key is someone else's (billing's).
    let billing_key = std::fs::read(&d.layout.identity("billing").unwrap().key)?;
    let r = with_file_changed(&d, &key, |p| Ok(std::fs::write(p, &billing_key)?)).await?;
    has(&r, Level::Error, "listen.key", "is not the private key of");
    // The key is readable by others.
    let r = with_file_changed(&d, &key, |p| chmod(p, 0o644)).await?;
    has(
        &r,
        Level::Error,
        "listen.key",
        "group or others may read it",
    );
    // The CRL is damaged.
    let crl = dir.join("ca/crl.pem");
    let r = with_file_changed(&d, &crl, |p| Ok(std::fs::write(p, "garbage")?)).await?;
    has(&r, Level::Error, "listen.crl", "");
    // The trust bundle is missing.
    let ca = dir.join("ca/ca.pem");
    let r = with_file_changed(&d, &ca, |p| Ok(std::fs::remove_file(p)?)).await?;
    has(&r, Level::Error, "listen.client_ca", "");
    // The decision log is group-writable.
    let log = d.decision_log();
    let r = with_file_changed(&d, &log, |p| chmod(p, 0o666)).await?;
    has(
        &r,
        Level::Error,
        "audit.path",
        "group or others may write it",
    );
    // The lock file is garbage.
    let locks = dir.join("locks.json");
    let r = with_file_changed(&d, &locks, |p| Ok(std::fs::write(p, "{")?)).await?;
    has(&r, Level::Error, "locks.file", "");
    // The detector state is damaged.
    let state = dir.join("decisions.log.detect.json");
    let r = with_file_changed(&d, &state, |p| Ok(std::fs::write(p, "{not json")?)).await?;
    has(&r, Level::Error, "detect.state_file", "move it aside");
    // The MFA secrets are readable by others, or gone.
    let secrets = dir.join("mfa/secrets.json");
    let r = with_file_changed(&d, &secrets, |p| chmod(p, 0o644)).await?;
    has(
        &r,
        Level::Error,
        "mfa.secrets",
        "group or others may read it",
    );
    let r = with_file_changed(&d, &secrets, |p| Ok(std::fs::remove_file(p)?)).await?;
    has(&r, Level::Warning, "mfa.secrets", "no operator is enrolled");
    // The upstream password file is readable by others, or holds the wrong password.
    let pw = dir.join("upstream.secret");
    let r = with_file_changed(&d, &pw, |p| chmod(p, 0o644)).await?;
    has(&r, Level::Error, "upstream.password", "");
    let r = with_file_changed(&d, &pw, |p| Ok(std::fs::write(p, "not-the-password\n")?)).await?;
    has(
        &r,
        Level::Error,
        "upstream",
        "refused the login as check_role",
    );

    // Settings that point somewhere wrong: an unwritable log folder, no CRL, trust login,
    // a role PostgreSQL does not have, a PostgreSQL that is not there.
    let text = std::fs::read_to_string(&config)?;
    let variant = |from: &str, to: &str| -> anyhow::Result<std::path::PathBuf> {
        let edited = text.replace(from, to);
        assert_ne!(edited, text, "{from:?} not in the config");
        let path = dir.join("variant.toml");
        std::fs::write(&path, edited)?;
        Ok(path)
    };
    let r = report(
        &variant("path = \"decisions.log\"", "path = \"/sys/decisions.log\"")?,
        SystemTime::now(),
    )
    .await?;
    has(&r, Level::Error, "audit.path", "cannot write in /sys");
    let r = report(&variant("crl = \"ca/crl.pem\"\n", "")?, SystemTime::now()).await?;
    has(
        &r,
        Level::Warning,
        "listen.crl",
        "a revoked certificate would still be admitted",
    );
    let r = report(
        &variant("check_role = \"billing\"", "check_role = \"nobody_here\"")?,
        SystemTime::now(),
    )
    .await?;
    has(&r, Level::Error, "upstream", "nobody_here");
    let port = d.cluster.port();
    let r = report(
        &variant(&format!("127.0.0.1:{port}"), "127.0.0.1:1")?,
        SystemTime::now(),
    )
    .await?;
    has(&r, Level::Error, "upstream 127.0.0.1:1", "unreachable");
    let trust = dir.join("trust.toml");
    std::fs::write(
        &trust,
        text.replace("check_role = \"billing\"\n", "").replace(
            "login = \"password\"\npassword_file = \"upstream.secret\"\n",
            "login = \"trust\"\n",
        ),
    )?;
    let r = report(&trust, SystemTime::now()).await?;
    has(
        &r,
        Level::Warning,
        "upstream.login trust",
        "every local OS user",
    );
    // The CLI: warnings only exit 2, an error exits 1, each problem one line.
    let no_crl = variant("crl = \"ca/crl.pem\"\n", "")?;
    for (config, code) in [(&trust, 2), (&no_crl, 2)] {
        let out = std::process::Command::new(eastwall_bin()?)
            .args(["check", "--quiet", "--config"])
            .arg(config)
            .output()?;
        assert_eq!(
            out.status.code(),
            Some(code),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
        let text = String::from_utf8(out.stdout)?;
        assert!(
            text.lines()
                .all(|l| l.starts_with("warning: ") || l.starts_with("error: ")),
            "{text}"
        );
    }
    let broken = variant(&format!("127.0.0.1:{port}"), "127.0.0.1:1")?;
    let out = std::process::Command::new(eastwall_bin()?)
        .args(["check", "--quiet", "--config"])
        .arg(&broken)
        .output()?;
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8(out.stdout)?;
    assert_eq!(text.lines().count(), 1, "one line per problem: {text}");
    assert!(text.starts_with("error: upstream 127.0.0.1:1: "), "{text}");
    Ok(())
}

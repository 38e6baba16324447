//! The proxy's own password login to PostgreSQL (issue 10, item 9): a server that never proves
//! it knows the password is not PostgreSQL, a password file others can read is refused at
//! start, and a rotated password is used by the next login without a restart.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use eastwall::quickstart::UpstreamAuth;
use eastwall_e2e::sidecar::{Deployment, SidecarOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// How the attacker's fake PostgreSQL answers a startup.
#[derive(Clone, Copy)]
enum Fake {
    /// AuthenticationOk at once: no password asked, nothing proved.
    OkAtOnce,
    /// Offers SCRAM-SHA-256, takes the client's first message, then says AuthenticationOk
    /// without SASLContinue/SASLFinal (no server signature).
    OkAfterSaslStart,
}

/// A fake PostgreSQL on loopback, written here because a fake server is what the attack is.
/// It records the tag of every message a client sends after the startup.
struct FakePg {
    port: u16,
    tags: Arc<Mutex<Vec<u8>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakePg {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakePg {
    async fn start(mode: Fake) -> anyhow::Result<FakePg> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let tags = Arc::new(Mutex::new(Vec::new()));
        let seen = tags.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let seen = seen.clone();
                tokio::spawn(async move {
                    let _ = serve_fake(stream, mode, seen).await;
                });
            }
        });
        Ok(FakePg { port, tags, task })
    }

    fn tags(&self) -> Vec<u8> {
        self.tags.lock().unwrap().clone()
    }
}

async fn read_tagged(stream: &mut TcpStream) -> std::io::Result<(u8, Vec<u8>)> {
    let tag = stream.read_u8().await?;
    let len = stream.read_u32().await? as usize;
    let mut body = vec![0u8; len.saturating_sub(4)];
    stream.read_exact(&mut body).await?;
    Ok((tag, body))
}

fn auth(code: u32, extra: &[u8]) -> Vec<u8> {
    let mut out = vec![b'R'];
    out.extend_from_slice(&(8 + extra.len() as u32).to_be_bytes());
    out.extend_from_slice(&code.to_be_bytes());
    out.extend_from_slice(extra);
    out
}

async fn serve_fake(
    mut stream: TcpStream,
    mode: Fake,
    seen: Arc<Mutex<Vec<u8>>>,
) -> std::io::Result<()> {
    // The startup message: length, then the body (version and parameters).
    let len = stream.read_u32().await? as usize;
    let mut body = vec![0u8; len.saturating_sub(4)];
    stream.read_exact(&mut body).await?;
    if let Fake::OkAfterSaslStart = mode {
        stream.write_all(&auth(10, b"SCRAM-SHA-256\0\0")).await?;
        let (tag, _) = read_tagged(&mut stream).await?;
        seen.lock().unwrap().push(tag);
    }
    let mut out = auth(0, &[]);
    out.extend_from_slice(b"Z\0\0\0\x05I");
    stream.write_all(&out).await?;
    loop {
        let (tag, _) = read_tagged(&mut stream).await?;
        seen.lock().unwrap().push(tag);
    }
}

/// Points the layout's `[upstream] address` at `port`.
fn upstream_at(port: u16) -> eastwall_e2e::sidecar::ConfigEdit {
    Box::new(move |text: &mut String| {
        let at = text
            .find("[upstream]\naddress = \"")
            .expect("a TCP upstream")
            + 11;
        let end = at + text[at..].find('\n').expect("a line");
        text.replace_range(at..end, &format!("address = \"127.0.0.1:{port}\""));
    })
}

async fn fake_is_refused(mode: Fake) -> anyhow::Result<()> {
    let fake = FakePg::start(mode).await?;
    let d = Deployment::start(SidecarOptions {
        upstream_auth: UpstreamAuth::Password,
        edit_config: Some(upstream_at(fake.port)),
        ..SidecarOptions::default()
    })
    .await?;
    let attempt = async {
        let client = d.connect("billing", "billing").await?;
        client.simple_query("select 'secret data'").await
    };
    // The fake never answers a query, so an admitted session hangs: bounded wait.
    let outcome = tokio::time::timeout(Duration::from_secs(5), attempt).await;
    let tags = fake.tags();
    assert!(
        !tags.contains(&b'Q') && !tags.contains(&b'P'),
        "the fake received a client statement: {tags:?}"
    );
    let err = outcome
        .map_err(|_| anyhow::anyhow!("the client was neither refused nor served"))?
        .expect_err("a server that proved nothing must not get the session");
    let db = err.as_db_error().expect("a FATAL from the proxy");
    assert_eq!(db.code().code(), "08006", "{db:?}");
    assert!(
        db.message()
            .contains("without proving it knows the password"),
        "{}",
        db.message()
    );
    assert!(db.message().contains("connection "), "{}", db.message());
    let line = d
        .wait_for_decision(|l| l["event"] == "connect" && l["db_user"] == "billing")
        .await?;
    assert_eq!(line["decision"], "deny", "{line}");
    assert_eq!(line["reason"], "upstream_login_failed", "{line}");
    Ok(())
}

#[tokio::test]
async fn a_fake_upstream_that_says_ok_at_once_gets_no_query() -> anyhow::Result<()> {
    fake_is_refused(Fake::OkAtOnce).await
}

#[tokio::test]
async fn a_fake_upstream_that_skips_the_scram_proof_gets_no_query() -> anyhow::Result<()> {
    fake_is_refused(Fake::OkAfterSaslStart).await
}

#[cfg(unix)]
#[tokio::test]
async fn a_password_file_others_can_read_stops_the_start() -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("upstream.pw");
    std::fs::write(&file, "s3cret\n")?;
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644))?;
    let path = file.display().to_string();
    let err = Deployment::start(SidecarOptions {
        upstream_auth: UpstreamAuth::Password,
        edit_config: Some(Box::new(move |text: &mut String| {
            *text = text.replace(
                "password_file = \"upstream.secret\"",
                &format!("password_file = {path:?}"),
            );
        })),
        ..SidecarOptions::default()
    })
    .await
    .err()
    .expect("the sidecar must not start with a world-readable password file");
    let message = format!("{err:#}");
    assert!(message.contains("mode 0644"), "{message}");
    assert!(message.contains(&file.display().to_string()), "{message}");
    assert!(message.contains("chmod 600"), "{message}");
    Ok(())
}

#[tokio::test]
async fn a_rotated_password_is_used_without_a_restart() -> anyhow::Result<()> {
    let d = Deployment::start(SidecarOptions {
        upstream_auth: UpstreamAuth::Password,
        ..SidecarOptions::default()
    })
    .await?;
    let before = d.connect("billing", "billing").await?;
    before.simple_query("select 1").await?;

    // Rotate: PostgreSQL first, then the file, replaced by rename as a secret manager does.
    let new_password = "rotated-5d41402abc4b2a76";
    let sql = |role: &str| format!("ALTER ROLE \"{role}\" PASSWORD '{new_password}'");
    for role in eastwall_e2e::sidecar::SAMPLE_ROLES {
        d.cluster
            .run_sql(&sql(role))
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    }
    let file = d.layout.dir.join("upstream.secret");
    let next = d.layout.dir.join("upstream.secret.new");
    eastwall_ca::write_private(&next, format!("{new_password}\n").as_bytes())?;
    std::fs::rename(&next, &file)?;

    let after = d.connect("billing", "billing").await?;
    let row = after.query_one("select current_user::text", &[]).await?;
    assert_eq!(row.get::<_, String>(0), "billing");
    // The session opened before the rotation is not disturbed.
    before.simple_query("select 1").await?;

    // Edited in place too (same inode, new contents).
    let third = "rotated-again-7b8b965ad4bca0e4";
    d.cluster
        .run_sql(&format!("ALTER ROLE billing PASSWORD '{third}'"))
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    std::fs::write(&file, format!("{third}\n"))?;
    d.connect("billing", "billing").await?;
    Ok(())
}

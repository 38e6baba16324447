//! The live-session registry as an operator and an attacker meet it: `eastwall sessions`
//! lists who is connected, `eastwall sessions kill` ends one session (57P01 with the
//! administrator's message, `session_end` reason `killed`) and leaves the others alone, the
//! admin socket survives hostile input, and a certificate reaching its notAfter ends its
//! live session (`cert_expired`) within 2 s.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{anyhow, bail, Context};
use eastwall_ca::{Ca, IssueRequest, SpiffeId};
use eastwall_e2e::sidecar::{Deployment, SidecarOptions};
use eastwall_e2e::{client_config, connect_watching};
use serde_json::Value;
use tokio::time::timeout;

fn admin_socket(d: &Deployment) -> PathBuf {
    d.layout.dir.join("eastwall.sock")
}

/// Runs the real `eastwall` binary with `args`; its stdout, or its stderr as the error.
async fn eastwall(args: Vec<String>) -> anyhow::Result<String> {
    tokio::task::spawn_blocking(move || {
        let bin = eastwall_e2e::eastwall_bin()?;
        let out = std::process::Command::new(bin).args(&args).output()?;
        if !out.status.success() {
            bail!(
                "eastwall {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8(out.stdout)?)
    })
    .await?
}

async fn list(d: &Deployment) -> anyhow::Result<Vec<Value>> {
    let config = d.layout.config.display().to_string();
    let out = eastwall(vec![
        "sessions".into(),
        "--config".into(),
        config,
        "--json".into(),
    ])
    .await?;
    out.lines()
        .map(|l| serde_json::from_str(l).context("a JSON line"))
        .collect()
}

/// One raw request line on the admin socket; the answer (one JSON line).
async fn raw_admin(socket: &Path, request: Vec<u8>) -> anyhow::Result<Value> {
    let socket = socket.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let mut stream = UnixStream::connect(&socket)?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        // The sidecar may answer and close before all of a huge line is written.
        let _ = stream.write_all(&request);
        // An empty request is the silent client: it keeps its side open.
        if !request.is_empty() {
            let _ = stream.shutdown(std::net::Shutdown::Write);
        }
        let mut answer = String::new();
        stream.read_to_string(&mut answer)?;
        serde_json::from_str(answer.trim_end()).with_context(|| format!("answer {answer:?}"))
    })
    .await?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_lists_live_sessions_and_kill_ends_one_with_its_message() -> anyhow::Result<()> {
    let d = Deployment::start(SidecarOptions::default()).await?;
    let mode = std::fs::metadata(admin_socket(&d))?.permissions().mode() & 0o777;
    assert_eq!(
        mode, 0o600,
        "the admin socket is private to the sidecar's user"
    );
    assert!(list(&d).await?.is_empty());

    let (victim, victim_conn) = d.connect_watching("billing", "billing").await?;
    victim.simple_query("select 1").await?;
    let listed = list(&d).await?;
    assert_eq!(listed.len(), 1, "{listed:#?}");
    let session = &listed[0];
    assert_eq!(session["spiffe_id"], "spiffe://corp.example/app/billing");
    assert_eq!(session["role"], "billing");
    assert_eq!(session["database"], "postgres");
    assert!(session["source"]
        .as_str()
        .unwrap_or("")
        .starts_with("127.0.0.1:"));
    assert!(session["serial"].as_str().is_some_and(|s| !s.is_empty()));
    assert!(
        session["bytes_client_to_server"].as_u64() > Some(0),
        "{session}"
    );
    assert!(
        session["bytes_server_to_client"].as_u64() > Some(0),
        "{session}"
    );
    let victim_id = session["conn_id"].as_str().expect("a conn id").to_owned();

    let (bystander, _bystander_conn) = d.connect_watching("billing", "billing").await?;
    bystander.simple_query("select 1").await?;
    let listed = list(&d).await?;
    assert_eq!(listed.len(), 2, "{listed:#?}");

    // The table form shows the same session.
    let config = d.layout.config.display().to_string();
    let table = eastwall(vec!["sessions".into(), "--config".into(), config.clone()]).await?;
    assert!(table.contains(&victim_id), "{table}");
    assert!(
        table.contains("spiffe://corp.example/app/billing"),
        "{table}"
    );

    eastwall(vec![
        "sessions".into(),
        "kill".into(),
        "--config".into(),
        config.clone(),
        victim_id.clone(),
        "--message".into(),
        "stolen laptop: call security".into(),
    ])
    .await?;
    let ended = timeout(Duration::from_secs(5), victim_conn)
        .await
        .context("the killed session was not ended within 5 s")??;
    let err = ended.expect_err("the proxy ended the session");
    let db = err
        .as_db_error()
        .ok_or_else(|| anyhow!("a dropped connection, not an ErrorResponse: {err}"))?;
    assert_eq!(db.code().code(), "57P01", "{db:?}");
    assert!(
        db.message().contains("stolen laptop: call security"),
        "{}",
        db.message()
    );
    let end = d
        .wait_for_decision(|l| l["event"] == "session_end" && l["conn_id"] == victim_id.as_str())
        .await?;
    assert_eq!(end["reason"], "killed", "{end}");
    assert_eq!(end["message"], "stolen laptop: call security", "{end}");

    // The other session goes on; killing the dead one again says so.
    let row = bystander.query_one("select 40 + 2", &[]).await?;
    assert_eq!(row.get::<_, i32>(0), 42);
    let again = eastwall(vec![
        "sessions".into(),
        "kill".into(),
        "--config".into(),
        config,
        victim_id.clone(),
    ])
    .await;
    let err = again.expect_err("no such session any more");
    assert!(err.to_string().contains("no live session"), "{err}");
    assert_eq!(list(&d).await?.len(), 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_without_a_message_says_an_administrator_did_it() -> anyhow::Result<()> {
    let d = Deployment::start(SidecarOptions::default()).await?;
    let (client, conn) = d.connect_watching("billing", "billing").await?;
    client.simple_query("select 1").await?;
    let id = list(&d).await?[0]["conn_id"]
        .as_str()
        .unwrap_or("")
        .to_owned();
    let answer = raw_admin(
        &admin_socket(&d),
        format!("{{\"verb\":\"kill\",\"conn_id\":\"{id}\"}}\n").into_bytes(),
    )
    .await?;
    assert_eq!(answer["ok"], true, "{answer}");
    let ended = timeout(Duration::from_secs(5), conn).await??;
    let err = ended.expect_err("ended");
    let db = err
        .as_db_error()
        .ok_or_else(|| anyhow!("no ErrorResponse: {err}"))?;
    assert_eq!(db.code().code(), "57P01");
    assert!(
        db.message().contains("killed by an administrator"),
        "{}",
        db.message()
    );
    let end = d
        .wait_for_decision(|l| l["event"] == "session_end" && l["conn_id"] == id.as_str())
        .await?;
    assert_eq!(end["reason"], "killed");
    assert_eq!(end["message"], "killed by an administrator");
    Ok(())
}

/// What an attacker with access to the socket path (or a confused script) sends: garbage, a
/// line far past the limit, an unknown verb, extra fields, control characters in a message,
/// a kill for an id that does not exist. Each gets an error answer; nothing is ended, the
/// sidecar keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_socket_answers_hostile_input_with_errors_and_ends_nothing() -> anyhow::Result<()>
{
    let d = Deployment::start(SidecarOptions::default()).await?;
    let socket = admin_socket(&d);
    let (client, conn) = d.connect_watching("billing", "billing").await?;
    client.simple_query("select 1").await?;

    let huge = {
        let mut line = b"{\"verb\":\"list\",\"pad\":\"".to_vec();
        line.resize(line.len() + (1 << 20), b'a');
        line.extend_from_slice(b"\"}\n");
        line
    };
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "binary garbage",
            b"\x00\x01\xffGET / HTTP/1.1\r\n\r\n".to_vec(),
            "UTF-8",
        ),
        (
            "text garbage",
            b"GET / HTTP/1.1\r\n\r\n".to_vec(),
            "expected",
        ),
        ("huge line", huge, "longer than"),
        (
            "unknown verb",
            b"{\"verb\":\"reboot\"}\n".to_vec(),
            "expected",
        ),
        (
            "extra field",
            b"{\"verb\":\"list\",\"all\":true}\n".to_vec(),
            "expected",
        ),
        (
            "control characters",
            b"{\"verb\":\"kill\",\"conn_id\":\"x\",\"message\":\"a\\u001b[2Jb\"}\n".to_vec(),
            "control characters",
        ),
        (
            "unknown id",
            b"{\"verb\":\"kill\",\"conn_id\":\"not-a-session\"}\n".to_vec(),
            "no live session",
        ),
        ("no newline", b"{\"verb\":\"list\"}".to_vec(), "newline"),
        ("silent client", Vec::new(), "no request line"),
    ];
    for (what, request, expected) in cases {
        let answer = raw_admin(&socket, request)
            .await
            .with_context(|| what.to_owned())?;
        assert_eq!(answer["ok"], false, "{what}: {answer}");
        let error = answer["error"].as_str().unwrap_or("");
        assert!(error.contains(expected), "{what}: {error}");
    }
    // Nothing was ended: the session answers and is still listed.
    let row = client.query_one("select 40 + 2", &[]).await?;
    assert_eq!(row.get::<_, i32>(0), 42);
    assert!(!conn.is_finished());
    assert_eq!(list(&d).await?.len(), 1);
    assert!(
        !d.decisions()?.iter().any(|l| l["event"] == "session_end"),
        "no session ended"
    );
    Ok(())
}

/// A file where the admin socket should be is never replaced: the sidecar refuses to start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_at_the_admin_socket_path_stops_the_start() -> anyhow::Result<()> {
    let d = Deployment::start(SidecarOptions::default()).await?;
    let path = d.layout.dir.join("other.sock");
    std::fs::write(&path, "not a socket")?;
    let text = std::fs::read_to_string(&d.layout.config)?
        .replace("path = \"decisions.log\"", "path = \"decisions-2.log\"")
        .replacen("[admin]\n", "[admin]\nsocket = \"other.sock\"\n", 1);
    let config = d.layout.dir.join("second.toml");
    std::fs::write(&config, text)?;
    let config =
        eastwall_config::Config::load(&config).map_err(|e| anyhow!("{}", e.lines().join("\n")))?;
    let err = eastwall::server::start(config)
        .await
        .err()
        .ok_or_else(|| anyhow!("started over a regular file"))?;
    assert!(err.to_string().contains("not a socket"), "{err}");
    assert_eq!(std::fs::read_to_string(&path)?, "not a socket");
    Ok(())
}

/// The seed's short-lived SVIDs, taken at their word: a session does not outlive its
/// certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_reaching_not_after_ends_its_live_session() -> anyhow::Result<()> {
    let d = Deployment::start(SidecarOptions::default()).await?;
    let ca = Ca::open(&d.layout.dir.join("ca"))?;
    let mut request = IssueRequest::new(SpiffeId::parse("spiffe://corp.example/app/billing")?);
    request.ttl = Duration::from_secs(5);
    let short = ca.issue(&request)?;
    let tls = client_config(
        &d.ca_pem(),
        Some((
            &short.cert_pem,
            short.key_pem.as_deref().unwrap_or_default(),
        )),
    )?;
    let (client, conn) = connect_watching(&d.pg_config("billing", "postgres"), tls).await?;
    let (kept, _kept_conn) = d.connect_watching("billing", "billing").await?;
    client.simple_query("select 1").await?;
    // The socket directly: the 5 s are too short to wait for a build of the binary.
    let answer = raw_admin(&admin_socket(&d), b"{\"verb\":\"list\"}\n".to_vec()).await?;
    let listed = answer["sessions"].as_array().cloned().unwrap_or_default();
    let mine = listed
        .iter()
        .find(|s| s["serial"] == short.serial_hex.as_str())
        .ok_or_else(|| anyhow!("the short-lived session is not listed: {listed:#?}"))?;
    let not_after = SystemTime::UNIX_EPOCH
        + Duration::from_secs(mine["not_after"].as_u64().expect("not_after"));
    let until_due = not_after
        .duration_since(SystemTime::now())
        .unwrap_or_default();
    assert!(until_due <= Duration::from_secs(6), "{until_due:?}");

    // Ended within 2 s of notAfter (plus a little for the client to read it).
    let ended = timeout(until_due + Duration::from_secs(3), conn)
        .await
        .context("the session outlived its certificate by more than 2 s")??;
    let err = ended.expect_err("the proxy ended the session");
    let db = err
        .as_db_error()
        .ok_or_else(|| anyhow!("no ErrorResponse: {err}"))?;
    assert_eq!(db.code().code(), "57P01", "{db:?}");
    assert!(db.message().contains("expired"), "{}", db.message());
    let end = d
        .wait_for_decision(|l| {
            l["event"] == "session_end" && l["cert_serial"] == short.serial_hex.as_str()
        })
        .await?;
    assert_eq!(end["reason"], "cert_expired", "{end}");

    // The long-lived certificate's session is untouched.
    let row = kept.query_one("select 40 + 2", &[]).await?;
    assert_eq!(row.get::<_, i32>(0), 42);
    Ok(())
}

//! The README's "Running the sidecar" and MFA commands, run as a user runs them: the built
//! `eastwall` binary, `eastwall proxy` as a separate process, psql as the client.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use eastwall_e2e::{eastwall_bin, pg};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn eastwall(args: &[&str]) -> std::process::Output {
    Command::new(eastwall_bin().expect("eastwall builds"))
        .args(args)
        .output()
        .expect("eastwall runs")
}

fn ok(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Stops the proxy process even when the test fails.
struct Proxy(Child);

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn psql(conninfo: &str, sql: &str, password: Option<&str>) -> std::process::Output {
    let mut cmd = Command::new("psql");
    cmd.args([
        "-X",
        "-w",
        "-At",
        "-v",
        "ON_ERROR_STOP=1",
        conninfo,
        "-c",
        sql,
    ])
    .env_remove("PGPASSWORD");
    if let Some(pw) = password {
        cmd.env("PGPASSWORD", pw);
    }
    cmd.output().expect("psql runs")
}

/// The psql command quickstart printed under a `# …` note containing `note`, as its conninfo.
fn printed_conninfo(stdout: &str, note: &str) -> String {
    let mut lines = stdout.lines();
    while let Some(line) = lines.next() {
        if line.trim_start().starts_with('#') && line.contains(note) {
            let cmd = lines.next().expect("a psql line after the note").trim();
            let start = cmd.find('"').expect("a quoted conninfo") + 1;
            let end = cmd.rfind('"').expect("a quoted conninfo");
            // Pin localhost to IPv4: the proxy listens on 127.0.0.1 only.
            return format!("{} hostaddr=127.0.0.1", &cmd[start..end]);
        }
    }
    panic!("quickstart printed no psql command for {note:?}:\n{stdout}");
}

fn wait_listening(child: &mut Child) -> String {
    let stderr = child.stderr.take().expect("piped stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        // Stops reading, and closes the pipe, once the banner is seen: from then on the
        // proxy's stderr is gone, as when a log collector restarts, and it must keep serving.
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = String::new();
    while Instant::now() < deadline {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
            seen.push_str(&line);
            seen.push('\n');
            if line.contains("eastwall: listening on") {
                return seen;
            }
        }
    }
    panic!("eastwall proxy did not report listening within 20 s:\n{seen}");
}

#[test]
fn quickstart_proxy_psql_mfa_and_audit_as_the_readme_shows() {
    let cluster = pg().start().expect("a private PostgreSQL");
    for role in ["billing", "alice", "\"finance-laptop\""] {
        cluster
            .run_sql(&format!("CREATE ROLE {role} LOGIN"))
            .expect("role created");
    }
    let tmp = tempfile::tempdir().expect("a temp dir");
    let dir = tmp.path().join("eastwall");
    let dir_s = dir.display().to_string();
    let listen = format!("127.0.0.1:{}", free_port());
    let stepup = format!("127.0.0.1:{}", free_port());
    let upstream = format!("127.0.0.1:{}", cluster.port());

    let printed = ok(&eastwall(&[
        "quickstart",
        "--dir",
        &dir_s,
        "--upstream",
        &upstream,
        "--listen",
        &listen,
        "--stepup-listen",
        &stepup,
    ]));
    assert!(printed.contains("CREATE ROLE billing LOGIN;"), "{printed}");
    // The pg_hba.conf line for the mode it chose (trust over TCP), and what that costs.
    assert!(
        printed.contains("\n  host    all  all  127.0.0.1/32    trust\n"),
        "{printed}"
    );
    assert!(
        printed.contains("warning: `trust` over TCP lets every local OS user"),
        "{printed}"
    );
    let config = dir.join("eastwall.toml").display().to_string();
    let check = ok(&eastwall(&["policy", "check", "--config", &config]));
    assert!(check.starts_with("ok: policy.ew: 2 rules"), "{check}");

    let mut proxy = Proxy(
        Command::new(eastwall_bin().expect("eastwall builds"))
            .args(["proxy", "--config", &config])
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("eastwall proxy starts"),
    );
    let banner = wait_listening(&mut proxy.0);
    assert!(banner.contains(&listen), "{banner}");

    // The billing service, with exactly the command quickstart printed.
    let billing = printed_conninfo(&printed, "allowed");
    let out = psql(&billing, "select current_user", None);
    assert_eq!(ok(&out).trim(), "billing");

    // The laptop, refused with the identity and a connection id in the message.
    let laptop = printed_conninfo(&printed, "denied");
    let out = psql(&laptop, "select 1", None);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("FATAL:  access denied for spiffe://corp.example/workstations/finance-laptop (connection "),
        "{err}"
    );

    // alice: listed as enrolled; a step-up token from `mfa login` is her password.
    let list = ok(&eastwall(&["mfa", "list", "--config", &config]));
    assert!(
        list.contains("spiffe://corp.example/app/operators/alice"),
        "{list}"
    );
    let alice = printed_conninfo(&printed, "challenged");
    let out = psql(&alice, "select 1", None);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no password supplied"),
        "alice is challenged: {err}"
    );
    let secret = std::fs::read_to_string(dir.join("mfa/alice.totp")).expect("alice's secret");
    let code = eastwall::mfa::totp::code_from_base32(&secret, SystemTime::now()).expect("a code");
    let url = format!(
        "https://localhost:{}/v1/stepup",
        &stepup[stepup.rfind(':').unwrap() + 1..]
    );
    let token = ok(&eastwall(&[
        "mfa",
        "login",
        "--url",
        &url,
        "--cert",
        &path(&dir, "certs/alice.pem"),
        "--key",
        &path(&dir, "certs/alice.key"),
        "--ca",
        &path(&dir, "ca/ca.pem"),
        "--code",
        &code,
    ]));
    let token = token.trim();
    assert!(token.starts_with("ewst1."), "{token}");
    for _ in 0..2 {
        let out = psql(&alice, "select current_user", Some(token));
        assert_eq!(
            ok(&out).trim(),
            "alice",
            "a token admits more than one session"
        );
    }

    // SIGTERM: a clean stop.
    let sent = Command::new("kill")
        .args(["-TERM", &proxy.0.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(sent.success(), "signal the proxy");
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = proxy.0.try_wait().expect("wait") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the proxy did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");

    let verify = ok(&eastwall(&[
        "audit",
        "verify",
        &path(&dir, "decisions.log"),
    ]));
    assert!(verify.starts_with("ok: "), "{verify}");
    assert!(verify.contains("chain intact"), "{verify}");
}

fn path(dir: &Path, rel: &str) -> String {
    dir.join(rel).display().to_string()
}

//! `eastwall ca …` run as a user runs it: exit codes, one-line errors on stderr, file modes,
//! what each verb writes, and `--help` for every verb.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_eastwall");

fn eastwall(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().expect("run eastwall")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[track_caller]
fn ok(o: &Output) {
    assert!(
        o.status.success(),
        "stdout: {}\nstderr: {}",
        stdout(o),
        stderr(o)
    );
}

/// A failure: non-zero exit and exactly one line on stderr that contains `needle`.
#[track_caller]
fn fails_with(o: &Output, needle: &str) {
    assert!(!o.status.success(), "unexpected success: {}", stdout(o));
    let err = stderr(o);
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "one line on stderr: {err:?}"
    );
    assert!(err.contains(needle), "{needle:?} not in {err:?}");
}

fn mode(p: &Path) -> u32 {
    fs::metadata(p).unwrap().permissions().mode() & 0o777
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn init(dir: &Path) {
    ok(&eastwall(&[
        "ca",
        "init",
        "--dir",
        s(dir),
        "--trust-domain",
        "corp.example",
    ]));
}

#[test]
fn every_verb_has_help() {
    for verb in [
        vec!["ca"],
        vec!["ca", "init"],
        vec!["ca", "issue"],
        vec!["ca", "bundle"],
        vec!["ca", "revoke"],
        vec!["ca", "crl"],
    ] {
        let mut args = verb.clone();
        args.push("--help");
        let o = eastwall(&args);
        ok(&o);
        assert!(stdout(&o).contains("Usage:"), "{verb:?}: {}", stdout(&o));
    }
    let help = stdout(&eastwall(&["ca", "issue", "--help"]));
    for flag in [
        "--dir",
        "--ttl",
        "--dns",
        "--ip",
        "--csr",
        "--cn",
        "--out",
        "SPIFFE_ID",
    ] {
        assert!(help.contains(flag), "{flag} missing from issue --help");
    }
}

#[test]
fn init_writes_the_ca_with_a_private_key_and_refuses_to_overwrite() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ca");
    let o = eastwall(&[
        "ca",
        "init",
        "--dir",
        s(&dir),
        "--trust-domain",
        "corp.example",
        "--ttl",
        "30d",
    ]);
    ok(&o);
    assert_eq!(mode(&dir.join("ca.key")), 0o600);
    for f in ["ca.pem", "crl.pem", "index.json"] {
        assert!(dir.join(f).is_file(), "{f}");
    }
    let key = fs::read_to_string(dir.join("ca.key")).unwrap();
    assert!(!stdout(&o).contains("PRIVATE KEY") && !stderr(&o).contains("PRIVATE KEY"));
    assert!(!stdout(&o).contains(key.lines().nth(1).unwrap()));

    let before = fs::read(dir.join("ca.pem")).unwrap();
    let o = eastwall(&[
        "ca",
        "init",
        "--dir",
        s(&dir),
        "--trust-domain",
        "corp.example",
    ]);
    fails_with(&o, "--force");
    assert_eq!(fs::read(dir.join("ca.pem")).unwrap(), before);

    ok(&eastwall(&[
        "ca",
        "init",
        "--dir",
        s(&dir),
        "--trust-domain",
        "corp.example",
        "--force",
    ]));
    assert_ne!(fs::read(dir.join("ca.pem")).unwrap(), before);
    assert_eq!(mode(&dir.join("ca.key")), 0o600);
}

#[test]
fn init_refuses_bad_input_in_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ca");
    fails_with(
        &eastwall(&[
            "ca",
            "init",
            "--dir",
            s(&dir),
            "--trust-domain",
            "Corp.Example",
        ]),
        "trust domain",
    );
    fails_with(
        &eastwall(&[
            "ca",
            "init",
            "--dir",
            s(&dir),
            "--trust-domain",
            "corp.example",
            "--ttl",
            "soon",
        ]),
        "--ttl",
    );
    assert!(!dir.join("ca.key").exists());
}

#[test]
fn issue_writes_a_0600_key_and_the_chain_and_openssl_accepts_it() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ca");
    init(&dir);
    let out = tmp.path().join("billing");
    let o = eastwall(&[
        "ca",
        "issue",
        "--dir",
        s(&dir),
        "spiffe://corp.example/app/billing",
        "--out",
        s(&out),
    ]);
    ok(&o);
    assert!(stdout(&o).contains("issued serial"), "{}", stdout(&o));
    let key = tmp.path().join("billing.key");
    let pem = tmp.path().join("billing.pem");
    assert_eq!(mode(&key), 0o600);
    let text = fs::read_to_string(&pem).unwrap();
    assert_eq!(text.matches("BEGIN CERTIFICATE").count(), 2, "leaf then CA");
    assert!(!stdout(&o).contains("PRIVATE KEY"));

    let bundle = eastwall(&["ca", "bundle", "--dir", s(&dir)]);
    ok(&bundle);
    assert_eq!(
        stdout(&bundle),
        fs::read_to_string(dir.join("ca.pem")).unwrap()
    );
    assert!(!stdout(&bundle).contains("PRIVATE"));

    if Path::new("/usr/bin/openssl").exists() {
        let v = Command::new("/usr/bin/openssl")
            .args([
                "verify",
                "-CAfile",
                s(&dir.join("ca.pem")),
                "-purpose",
                "sslclient",
                s(&pem),
            ])
            .output()
            .unwrap();
        assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stdout));
    }
}

#[test]
fn issue_refuses_bad_input_in_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ca");
    init(&dir);
    let out = tmp.path().join("x");
    let issue = |id: &str, extra: &[&str]| {
        let mut args = vec!["ca", "issue", "--dir", s(&dir), id, "--out", s(&out)];
        args.extend_from_slice(extra);
        eastwall(&args)
    };
    fails_with(&issue("spiffe://evil.example/app/x", &[]), "evil.example");
    fails_with(&issue("https://corp.example/app/x", &[]), "scheme");
    fails_with(
        &issue("spiffe://corp.example/app/x", &["--ttl", "0s"]),
        "--ttl",
    );
    fails_with(
        &issue("spiffe://corp.example/app/x", &["--ip", "localhost"]),
        "--ip",
    );
    fails_with(
        &issue("spiffe://corp.example/app/x", &["--dns", "bad name"]),
        "DNS name",
    );
    let missing = tmp.path().join("missing.csr");
    fails_with(
        &issue("spiffe://corp.example/app/x", &["--csr", s(&missing)]),
        "--csr",
    );
    let junk = tmp.path().join("junk.csr");
    fs::write(&junk, "not a csr").unwrap();
    fails_with(
        &issue("spiffe://corp.example/app/x", &["--csr", s(&junk)]),
        "CERTIFICATE REQUEST",
    );
    assert!(!tmp.path().join("x.pem").exists() && !tmp.path().join("x.key").exists());

    let nowhere = tmp.path().join("no-ca");
    fails_with(
        &eastwall(&[
            "ca",
            "issue",
            "--dir",
            s(&nowhere),
            "spiffe://corp.example/app/x",
            "--out",
            s(&out),
        ]),
        "eastwall ca init",
    );
}

#[test]
fn issue_from_an_openssl_csr_writes_no_key_and_ignores_the_csr_names() {
    if !Path::new("/usr/bin/openssl").exists() {
        eprintln!("skipping: no /usr/bin/openssl");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ca");
    init(&dir);
    let key = tmp.path().join("w.key");
    let csr = tmp.path().join("w.csr");
    let gen = Command::new("/usr/bin/openssl")
        .args([
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            s(&key),
            "-out",
            s(&csr),
            "-subj",
            "/CN=postgres",
            "-addext",
            "subjectAltName=URI:spiffe://evil.example/admin",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
        ])
        .output()
        .unwrap();
    assert!(
        gen.status.success(),
        "{}",
        String::from_utf8_lossy(&gen.stderr)
    );
    let out = tmp.path().join("w");
    ok(&eastwall(&[
        "ca",
        "issue",
        "--dir",
        s(&dir),
        "spiffe://corp.example/app/w",
        "--csr",
        s(&csr),
        "--out",
        s(&out),
    ]));
    assert!(!tmp.path().join("w.key.tmp").exists());
    assert!(tmp.path().join("w.pem").exists());
    // The key we generated with openssl is untouched and is the only key for this cert.
    let text = Command::new("/usr/bin/openssl")
        .args([
            "x509",
            "-in",
            s(&tmp.path().join("w.pem")),
            "-noout",
            "-text",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("URI:spiffe://corp.example/app/w"), "{text}");
    assert!(!text.contains("evil.example"), "{text}");
    assert!(text.contains("CA:FALSE"), "{text}");
    assert!(!text.contains("CN=postgres"), "{text}");
}

#[test]
fn revoke_by_serial_and_by_id_and_unknown_targets() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ca");
    init(&dir);
    let out = tmp.path().join("a");
    let o = eastwall(&[
        "ca",
        "issue",
        "--dir",
        s(&dir),
        "spiffe://corp.example/app/a",
        "--out",
        s(&out),
    ]);
    ok(&o);
    let serial = stdout(&o)
        .split_whitespace()
        .skip_while(|w| *w != "serial")
        .nth(1)
        .unwrap()
        .to_string();
    let crl_before = fs::read(dir.join("crl.pem")).unwrap();

    let o = eastwall(&["ca", "revoke", "--dir", s(&dir), &serial]);
    ok(&o);
    assert!(stdout(&o).contains(&serial));
    assert_ne!(fs::read(dir.join("crl.pem")).unwrap(), crl_before);

    ok(&eastwall(&[
        "ca",
        "issue",
        "--dir",
        s(&dir),
        "spiffe://corp.example/app/b",
        "--out",
        s(&tmp.path().join("b")),
    ]));
    let o = eastwall(&[
        "ca",
        "revoke",
        "--dir",
        s(&dir),
        "spiffe://corp.example/app/b",
    ]);
    ok(&o);
    assert!(stdout(&o).contains("revoked serial"));

    fails_with(
        &eastwall(&["ca", "revoke", "--dir", s(&dir), "0abc"]),
        "no certificate with serial 0abc",
    );
    fails_with(
        &eastwall(&[
            "ca",
            "revoke",
            "--dir",
            s(&dir),
            "spiffe://corp.example/app/nobody",
        ]),
        "spiffe://corp.example/app/nobody",
    );
    fails_with(
        &eastwall(&["ca", "revoke", "--dir", s(&dir), "not-a-serial"]),
        "not-a-serial",
    );

    let o = eastwall(&["ca", "crl", "--dir", s(&dir)]);
    ok(&o);
    assert!(stdout(&o).contains("next update"));
}

#[test]
fn a_world_readable_ca_key_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ca");
    init(&dir);
    fs::set_permissions(dir.join("ca.key"), fs::Permissions::from_mode(0o644)).unwrap();
    fails_with(
        &eastwall(&[
            "ca",
            "issue",
            "--dir",
            s(&dir),
            "spiffe://corp.example/app/a",
            "--out",
            s(&tmp.path().join("a")),
        ]),
        "chmod 600",
    );
}

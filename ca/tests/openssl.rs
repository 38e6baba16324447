//! A second opinion from OpenSSL: the root, an issued SVID and the CRL as `openssl verify` and
//! `openssl x509 -text` see them. Skipped (with a note) where /usr/bin/openssl is missing.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use eastwall_ca::{IssueRequest, RevokeTarget};

const OPENSSL: &str = "/usr/bin/openssl";

fn openssl(args: &[&str]) -> Option<(bool, String)> {
    if !Path::new(OPENSSL).exists() {
        eprintln!("skipping: {OPENSSL} not found");
        return None;
    }
    let out = Command::new(OPENSSL).args(args).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Some((out.status.success(), text))
}

#[test]
fn openssl_verifies_the_leaf_for_client_auth_and_sees_the_svid_fields() {
    let dir = tempfile::tempdir().unwrap();
    let ca = new_ca(&dir.path().join("ca"));
    let issued = ca
        .issue(&IssueRequest::new(id("spiffe://corp.example/app/billing")))
        .unwrap();
    let prefix = dir.path().join("billing");
    let (leaf, _) = issued.write(&prefix).unwrap();
    let ca_pem = ca.cert_path();
    let (ca_s, leaf_s) = (ca_pem.to_str().unwrap(), leaf.to_str().unwrap());

    let Some((ok, out)) = openssl(&["verify", "-CAfile", ca_s, "-purpose", "sslclient", leaf_s])
    else {
        return;
    };
    assert!(ok, "{out}");
    // Without serverAuth, OpenSSL must refuse it as a server certificate.
    let (ok, out) = openssl(&["verify", "-CAfile", ca_s, "-purpose", "sslserver", leaf_s]).unwrap();
    assert!(!ok, "{out}");

    let (ok, text) = openssl(&["x509", "-in", leaf_s, "-noout", "-text"]).unwrap();
    assert!(ok, "{text}");
    assert!(
        text.contains("URI:spiffe://corp.example/app/billing"),
        "{text}"
    );
    assert!(text.contains("CA:FALSE"), "{text}");
    assert!(text.contains("X509v3 Key Usage: critical"), "{text}");
    assert!(text.contains("Digital Signature"), "{text}");
    assert!(!text.contains("Certificate Sign"), "{text}");
    assert!(text.contains("TLS Web Client Authentication"), "{text}");
    assert!(!text.contains("TLS Web Server Authentication"), "{text}");
    assert!(
        text.contains("X509v3 Subject Alternative Name: critical"),
        "{text}"
    );

    let (ok, text) = openssl(&["x509", "-in", ca_s, "-noout", "-text"]).unwrap();
    assert!(ok, "{text}");
    assert!(text.contains("CA:TRUE, pathlen:0"), "{text}");
    assert!(text.contains("Certificate Sign, CRL Sign"), "{text}");
}

#[test]
fn openssl_rejects_a_revoked_leaf_with_the_crl() {
    let dir = tempfile::tempdir().unwrap();
    let ca = new_ca(&dir.path().join("ca"));
    let mut req = IssueRequest::new(id("spiffe://corp.example/db/proxy"));
    req.dns = vec!["localhost".into()];
    let issued = ca.issue(&req).unwrap();
    let (leaf, _) = issued.write(&dir.path().join("proxy")).unwrap();
    let ca_pem = ca.cert_path();
    let crl = ca.crl_path();
    let args = |purpose: &'static str| {
        vec![
            "verify".to_string(),
            "-crl_check".into(),
            "-CAfile".into(),
            ca_pem.to_str().unwrap().into(),
            "-CRLfile".into(),
            crl.to_str().unwrap().into(),
            "-purpose".into(),
            purpose.into(),
            leaf.to_str().unwrap().into(),
        ]
    };
    let run = |purpose| {
        let a = args(purpose);
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        openssl(&a)
    };
    let Some((ok, out)) = run("sslserver") else {
        return;
    };
    assert!(ok, "server cert with --dns verifies as sslserver: {out}");
    let (ok, out) = run("sslclient").unwrap();
    assert!(ok, "{out}");

    ca.revoke(&RevokeTarget::Serial(issued.serial_hex.clone()))
        .unwrap();
    let (ok, out) = run("sslclient").unwrap();
    assert!(!ok, "{out}");
    assert!(out.contains("revoked"), "{out}");
}

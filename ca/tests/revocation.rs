//! Revocation as the proxy will see it: the CRL lists what was revoked, is signed by the root,
//! carries an increasing number and a nextUpdate, and makes webpki refuse the revoked leaf.

mod common;

use std::fs;

use common::*;
use eastwall_ca::{Ca, CaError, IssueRequest, RevokeTarget, CRL_VALIDITY};
use x509_parser::prelude::FromDer;
use x509_parser::revocation_list::CertificateRevocationList;

fn crl_der(ca: &Ca) -> Vec<u8> {
    pem_crl(&fs::read_to_string(ca.crl_path()).unwrap())
}

fn revoked_serials(der: &[u8]) -> Vec<String> {
    let (_, crl) = CertificateRevocationList::from_der(der).unwrap();
    crl.iter_revoked_certificates()
        .map(|r| hex::encode(r.raw_serial()))
        .collect()
}

fn crl_number(der: &[u8]) -> u64 {
    let (_, crl) = CertificateRevocationList::from_der(der).unwrap();
    crl.crl_number()
        .unwrap()
        .to_u64_digits()
        .first()
        .copied()
        .unwrap_or(0)
}

#[test]
fn revoked_serial_is_on_a_crl_signed_by_the_ca_and_webpki_refuses_the_leaf() {
    let dir = tempfile::tempdir().unwrap();
    let ca = new_ca(dir.path());
    let keep = ca
        .issue(&IssueRequest::new(id("spiffe://corp.example/app/keep")))
        .unwrap();
    let gone = ca
        .issue(&IssueRequest::new(id("spiffe://corp.example/app/gone")))
        .unwrap();
    let keep_der = pem_certs(&keep.cert_pem)[0].clone();
    let gone_der = pem_certs(&gone.cert_pem)[0].clone();
    let before = crl_der(&ca);
    webpki_verify_client(&ca, &gone_der, std::slice::from_ref(&before)).unwrap();

    // Typed the way openssl prints it: uppercase with colons.
    let typed = gone
        .serial_hex
        .as_bytes()
        .chunks(2)
        .map(|c| std::str::from_utf8(c).unwrap().to_uppercase())
        .collect::<Vec<_>>()
        .join(":");
    let out = ca.revoke(&typed.parse::<RevokeTarget>().unwrap()).unwrap();
    assert_eq!(out, std::slice::from_ref(&gone.serial_hex));

    let after = crl_der(&ca);
    assert_eq!(
        revoked_serials(&after),
        std::slice::from_ref(&gone.serial_hex)
    );
    assert!(crl_number(&after) > crl_number(&before));
    let (_, crl) = CertificateRevocationList::from_der(&after).unwrap();
    let root = parse(ca.cert_der());
    crl.verify_signature(root.public_key()).unwrap();
    let next = crl.next_update().unwrap().to_datetime();
    let ahead = next - time::OffsetDateTime::now_utc();
    let validity = time::Duration::try_from(CRL_VALIDITY).unwrap();
    assert!(
        ahead <= validity && ahead > validity - time::Duration::minutes(5),
        "{ahead}"
    );

    let err = webpki_verify_client(&ca, &gone_der, std::slice::from_ref(&after)).unwrap_err();
    assert_eq!(err, webpki::Error::CertRevoked);
    webpki_verify_client(&ca, &keep_der, &[after]).unwrap();

    let records = ca.records().unwrap();
    assert!(records
        .iter()
        .any(|r| r.serial == gone.serial_hex && r.revoked && r.revoked_at.is_some()));
    assert!(records
        .iter()
        .any(|r| r.serial == keep.serial_hex && !r.revoked));
}

#[test]
fn revoking_an_identity_revokes_all_its_unexpired_certs_only() {
    let dir = tempfile::tempdir().unwrap();
    let ca = new_ca(dir.path());
    let billing = id("spiffe://corp.example/app/billing");
    let a = ca.issue(&IssueRequest::new(billing.clone())).unwrap();
    let b = ca.issue(&IssueRequest::new(billing.clone())).unwrap();
    let mut old = IssueRequest::new(billing.clone());
    let now = time::OffsetDateTime::now_utc();
    old.validity = Some((now - time::Duration::days(3), now - time::Duration::days(2)));
    let expired = ca.issue(&old).unwrap();
    let other = ca
        .issue(&IssueRequest::new(id("spiffe://corp.example/app/other")))
        .unwrap();

    let mut out = ca.revoke(&RevokeTarget::Id(billing)).unwrap();
    out.sort();
    let mut want = vec![a.serial_hex.clone(), b.serial_hex.clone()];
    want.sort();
    assert_eq!(out, want);

    let mut on_crl = revoked_serials(&crl_der(&ca));
    on_crl.sort();
    assert_eq!(on_crl, want);
    assert!(!on_crl.contains(&expired.serial_hex));
    assert!(!on_crl.contains(&other.serial_hex));
}

#[test]
fn unknown_serial_and_identity_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let ca = new_ca(dir.path());
    ca.issue(&IssueRequest::new(id("spiffe://corp.example/app/x")))
        .unwrap();
    let before = fs::read(ca.crl_path()).unwrap();

    let err = ca.revoke(&RevokeTarget::Serial("0abc".into())).unwrap_err();
    assert!(matches!(err, CaError::UnknownSerial { .. }), "{err}");
    let err = ca
        .revoke(&RevokeTarget::Id(id("spiffe://corp.example/app/nobody")))
        .unwrap_err();
    assert!(
        err.to_string().contains("spiffe://corp.example/app/nobody"),
        "{err}"
    );
    assert!(matches!(err, CaError::NothingToRevoke { .. }));
    assert!("not hex".parse::<RevokeTarget>().is_err());
    assert!("spiffe://corp.example/".parse::<RevokeTarget>().is_err());

    assert_eq!(
        fs::read(ca.crl_path()).unwrap(),
        before,
        "a failed revoke leaves the CRL alone"
    );
}

#[test]
fn revoking_twice_is_harmless_and_refresh_re_signs_with_a_new_number() {
    let dir = tempfile::tempdir().unwrap();
    let ca = new_ca(dir.path());
    let c = ca
        .issue(&IssueRequest::new(id("spiffe://corp.example/app/x")))
        .unwrap();
    ca.revoke(&RevokeTarget::Serial(c.serial_hex.clone()))
        .unwrap();
    let n1 = crl_number(&crl_der(&ca));
    ca.revoke(&RevokeTarget::Serial(c.serial_hex.clone()))
        .unwrap();
    let n2 = crl_number(&crl_der(&ca));
    let next = ca.refresh_crl().unwrap();
    let der = crl_der(&ca);
    let n3 = crl_number(&der);
    assert!(n1 < n2 && n2 < n3, "{n1} {n2} {n3}");
    assert_eq!(revoked_serials(&der), [c.serial_hex]);
    assert!(next > time::OffsetDateTime::now_utc() + time::Duration::days(6));
}

#[test]
fn revocation_survives_reopening_the_ca() {
    let dir = tempfile::tempdir().unwrap();
    let c = {
        let ca = new_ca(dir.path());
        let c = ca
            .issue(&IssueRequest::new(id("spiffe://corp.example/app/x")))
            .unwrap();
        ca.revoke(&RevokeTarget::Serial(c.serial_hex.clone()))
            .unwrap();
        c
    };
    let ca = Ca::open(dir.path()).unwrap();
    ca.issue(&IssueRequest::new(id("spiffe://corp.example/app/y")))
        .unwrap();
    ca.refresh_crl().unwrap();
    assert_eq!(revoked_serials(&crl_der(&ca)), [c.serial_hex]);
}

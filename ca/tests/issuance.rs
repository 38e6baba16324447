//! The CA as its users see it: what `init` writes, what an issued SVID contains, CSR signing,
//! trust-domain enforcement, and webpki accepting the result for client authentication.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use common::*;
use eastwall_ca::{Ca, CaError, IssueRequest, BACKDATE};
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, SanType};
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::oid_registry::{OID_X509_EXT_KEY_USAGE, OID_X509_EXT_SUBJECT_ALT_NAME};

fn mode(path: &std::path::Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn init_writes_a_private_key_a_root_an_empty_crl_and_an_index() {
    let dir = tempfile::tempdir().unwrap();
    let ca = new_ca(dir.path());
    assert_eq!(mode(&dir.path().join("ca.key")), 0o600);
    for f in ["ca.pem", "crl.pem", "index.json"] {
        assert!(dir.path().join(f).is_file(), "{f}");
    }
    assert_eq!(ca.trust_domain().as_str(), "corp.example");

    let ders = pem_certs(ca.bundle_pem());
    assert_eq!(ders.len(), 1);
    let root = parse(&ders[0]);
    let bc = root.basic_constraints().unwrap().unwrap().value;
    assert!(bc.ca);
    assert_eq!(bc.path_len_constraint, Some(0));
    let ku = root.key_usage().unwrap().unwrap();
    assert!(ku.critical);
    assert!(ku.value.key_cert_sign() && ku.value.crl_sign());
    assert!(!ku.value.digital_signature());
    assert!(root
        .subject()
        .to_string()
        .contains("Eastwall CA corp.example"));
    // Backdated a little, and nowhere near rcgen's 1975 default.
    let nb = root.validity().not_before.to_datetime();
    let age = time::OffsetDateTime::now_utc() - nb;
    assert!(
        age >= time::Duration::minutes(4) && age <= time::Duration::minutes(10),
        "{age}"
    );
    let serial = root.raw_serial();
    assert_eq!(serial.len(), 16);
    assert!(serial[0] & 0x80 == 0);

    // The CRL is there, empty, and signed by the root.
    let crl_pem = fs::read_to_string(ca.crl_path()).unwrap();
    let crl_der = pem_crl(&crl_pem);
    let (_, crl) =
        x509_parser::revocation_list::CertificateRevocationList::from_der(&crl_der).unwrap();
    assert_eq!(crl.iter_revoked_certificates().count(), 0);
    crl.verify_signature(root.public_key()).unwrap();

    // Reopening yields the same CA.
    let again = Ca::open(dir.path()).unwrap();
    assert_eq!(again.bundle_pem(), ca.bundle_pem());
}

use x509_parser::prelude::FromDer;

#[test]
fn a_second_init_is_refused_without_force_and_replaces_the_root_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let first = new_ca(dir.path());
    let err = Ca::init(dir.path(), &td(), Duration::from_secs(3600), false).unwrap_err();
    assert!(matches!(err, CaError::AlreadyExists(_)), "{err}");
    assert!(err.to_string().contains("--force"), "{err}");
    assert_eq!(
        Ca::open(dir.path()).unwrap().bundle_pem(),
        first.bundle_pem()
    );

    let second = Ca::init(dir.path(), &td(), Duration::from_secs(3600), true).unwrap();
    assert_ne!(second.bundle_pem(), first.bundle_pem());
    assert_eq!(mode(&dir.path().join("ca.key")), 0o600);
}

#[test]
fn open_refuses_a_world_readable_ca_key() {
    let dir = tempfile::tempdir().unwrap();
    new_ca(dir.path());
    let key = dir.path().join("ca.key");
    fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
    let err = Ca::open(dir.path()).unwrap_err();
    assert!(matches!(err, CaError::KeyPermissions { .. }), "{err}");
}

#[test]
fn open_without_a_ca_says_to_run_init() {
    let dir = tempfile::tempdir().unwrap();
    let err = Ca::open(dir.path()).unwrap_err().to_string();
    assert!(err.contains("eastwall ca init"), "{err}");
}

#[test]
fn issued_leaf_is_a_client_svid_with_one_uri_san() {
    let dir = tempfile::tempdir().unwrap();
    let ca = new_ca(dir.path());
    let req = IssueRequest::new(id("spiffe://corp.example/app/billing"));
    let issued = ca.issue(&req).unwrap();
    assert!(issued
        .key_pem
        .as_deref()
        .unwrap()
        .contains("BEGIN PRIVATE KEY"));

    let ders = pem_certs(&issued.cert_pem);
    assert_eq!(ders.len(), 2, "leaf then the root");
    assert_eq!(ders[1], ca.cert_der().to_vec());
    let leaf = parse(&ders[0]);

    let san = leaf.subject_alternative_name().unwrap().unwrap();
    let uris: Vec<_> = san
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some(*u),
            _ => None,
        })
        .collect();
    assert_eq!(uris, ["spiffe://corp.example/app/billing"]);
    assert_eq!(san.value.general_names.len(), 1);
    // Empty subject, so the SAN must be critical (X509-SVID §3.1).
    assert!(leaf.subject().iter().next().is_none());
    assert!(
        leaf.get_extension_unique(&OID_X509_EXT_SUBJECT_ALT_NAME)
            .unwrap()
            .unwrap()
            .critical
    );

    let bc = leaf.basic_constraints().unwrap().unwrap().value;
    assert!(!bc.ca);
    let ku_ext = leaf
        .get_extension_unique(&OID_X509_EXT_KEY_USAGE)
        .unwrap()
        .unwrap();
    assert!(ku_ext.critical);
    let ParsedExtension::KeyUsage(ku) = ku_ext.parsed_extension() else {
        panic!("key usage")
    };
    assert!(ku.digital_signature());
    assert!(!ku.key_cert_sign() && !ku.crl_sign());
    let eku = leaf.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.client_auth);
    assert!(!eku.server_auth, "no serverAuth without --dns/--ip");

    let nb = leaf.validity().not_before.to_datetime();
    let na = leaf.validity().not_after.to_datetime();
    let lifetime = na - nb;
    let max = time::Duration::try_from(req.ttl + BACKDATE).unwrap();
    assert!(
        lifetime <= max && lifetime > time::Duration::minutes(55),
        "{lifetime}"
    );
    assert_eq!(na, issued.not_after);
    assert_eq!(
        eastwall_ca::normalize_serial(&leaf.raw_serial_as_string()).unwrap(),
        issued.serial_hex
    );

    webpki_verify_client(&ca, &ders[0], &[]).unwrap();

    let records = ca.records().unwrap();
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].serial, issued.serial_hex);
    assert_eq!(records[0].spiffe_id, "spiffe://corp.example/app/billing");
    assert!(!records[0].revoked);
}

#[test]
fn dns_and_ip_sans_add_server_auth_and_cn_is_set_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let ca = new_ca(dir.path());
    let mut req = IssueRequest::new(id("spiffe://corp.example/db/proxy"));
    req.dns = vec!["localhost".into()];
    req.ips = vec!["127.0.0.1".parse().unwrap()];
    req.common_name = Some("billing".into());
    let issued = ca.issue(&req).unwrap();
    let ders = pem_certs(&issued.cert_pem);
    let leaf = parse(&ders[0]);
    let eku = leaf.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.client_auth && eku.server_auth);
    let names = &leaf
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names;
    assert_eq!(names.len(), 3);
    assert!(names.contains(&GeneralName::DNSName("localhost")));
    assert_eq!(
        leaf.subject()
            .iter_common_name()
            .next()
            .unwrap()
            .as_str()
            .unwrap(),
        "billing"
    );
}

#[test]
fn leaf_never_outlives_the_ca() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::init(dir.path(), &td(), Duration::from_secs(2 * 3600), false).unwrap();
    let mut req = IssueRequest::new(id("spiffe://corp.example/app/x"));
    req.ttl = Duration::from_secs(90 * 86400);
    let issued = ca.issue(&req).unwrap();
    assert!(issued.not_after <= ca.not_after());
}

#[test]
fn foreign_trust_domain_is_refused_and_nothing_is_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let ca = new_ca(dir.path());
    let err = ca
        .issue(&IssueRequest::new(id("spiffe://evil.example/app/billing")))
        .unwrap_err();
    assert!(err.to_string().contains("evil.example"), "{err}");
    assert!(ca.records().unwrap().is_empty());
}

#[test]
fn bad_dns_names_and_cns_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ca = new_ca(dir.path());
    let mut req = IssueRequest::new(id("spiffe://corp.example/app/x"));
    req.dns = vec!["bad name".into()];
    assert!(matches!(ca.issue(&req), Err(CaError::InvalidDnsName(_))));
    let mut req = IssueRequest::new(id("spiffe://corp.example/app/x"));
    req.common_name = Some(String::new());
    assert!(matches!(ca.issue(&req), Err(CaError::InvalidCommonName(_))));
}

/// A CSR that asks for everything it should not get.
fn greedy_csr() -> (KeyPair, String) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec!["evil.example".to_string()]).unwrap();
    params.subject_alt_names.push(SanType::URI(
        "spiffe://evil.example/admin".try_into().unwrap(),
    ));
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
    let csr = params.serialize_request(&key).unwrap().pem().unwrap();
    (key, csr)
}

#[test]
fn csr_keeps_only_its_public_key() {
    let dir = tempfile::tempdir().unwrap();
    let ca = new_ca(dir.path());
    let (key, csr) = greedy_csr();
    let mut req = IssueRequest::new(id("spiffe://corp.example/app/billing"));
    req.csr_pem = Some(csr);
    let issued = ca.issue(&req).unwrap();
    assert!(issued.key_pem.is_none());
    let ders = pem_certs(&issued.cert_pem);
    let leaf = parse(&ders[0]);
    assert!(!leaf.basic_constraints().unwrap().unwrap().value.ca);
    let ku = leaf.key_usage().unwrap().unwrap().value;
    assert!(!ku.key_cert_sign());
    let names = &leaf.subject_alt_names_vec();
    assert_eq!(names, &["spiffe://corp.example/app/billing".to_string()]);
    use rcgen::PublicKeyData;
    assert_eq!(
        leaf.public_key().raw,
        key.subject_public_key_info().as_slice()
    );
    assert!(
        leaf.subject().to_string().is_empty(),
        "CSR subject is dropped"
    );
    webpki_verify_client(&ca, &ders[0], &[]).unwrap();
    assert!(ca.records().unwrap()[0].from_csr);
}

trait SanStrings {
    fn subject_alt_names_vec(&self) -> Vec<String>;
}
impl SanStrings for x509_parser::certificate::X509Certificate<'_> {
    fn subject_alt_names_vec(&self) -> Vec<String> {
        self.subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names
            .iter()
            .map(|n| match n {
                GeneralName::URI(u) => u.to_string(),
                other => format!("{other:?}"),
            })
            .collect()
    }
}

#[test]
fn the_same_csr_twice_gets_two_serials() {
    let dir = tempfile::tempdir().unwrap();
    let ca = new_ca(dir.path());
    let (_key, csr) = greedy_csr();
    let mut req = IssueRequest::new(id("spiffe://corp.example/app/billing"));
    req.csr_pem = Some(csr);
    let a = ca.issue(&req).unwrap();
    let b = ca.issue(&req).unwrap();
    assert_ne!(a.serial_hex, b.serial_hex);
    let sa = parse(&pem_certs(&a.cert_pem)[0]).raw_serial().to_vec();
    let sb = parse(&pem_certs(&b.cert_pem)[0]).raw_serial().to_vec();
    assert_ne!(sa, sb);
}

#[test]
fn a_csr_with_a_broken_signature_is_refused() {
    use base64::Engine;
    let dir = tempfile::tempdir().unwrap();
    let ca = new_ca(dir.path());
    let (_key, csr) = greedy_csr();
    let mut der = x509_parser::pem::Pem::iter_from_buffer(csr.as_bytes())
        .next()
        .unwrap()
        .unwrap()
        .contents;
    // The signature is the last field: flipping its last bit keeps the DER well-formed.
    let last = der.len() - 1;
    der[last] ^= 1;
    let b64 = base64::engine::general_purpose::STANDARD.encode(&der);
    let pem =
        format!("-----BEGIN CERTIFICATE REQUEST-----\n{b64}\n-----END CERTIFICATE REQUEST-----\n");
    let mut req = IssueRequest::new(id("spiffe://corp.example/app/billing"));
    req.csr_pem = Some(pem);
    let err = ca.issue(&req).unwrap_err();
    assert!(err.to_string().contains("signature"), "{err}");
    assert!(matches!(err, CaError::InvalidCsr { .. }), "{err}");
    assert!(ca.records().unwrap().is_empty());
}

#[test]
fn an_expired_leaf_can_be_minted_and_webpki_refuses_it() {
    let dir = tempfile::tempdir().unwrap();
    let ca = new_ca(dir.path());
    let now = time::OffsetDateTime::now_utc();
    let mut req = IssueRequest::new(id("spiffe://corp.example/app/old"));
    req.validity = Some((
        now - time::Duration::hours(2),
        now - time::Duration::hours(1),
    ));
    let issued = ca.issue(&req).unwrap();
    let leaf = &pem_certs(&issued.cert_pem)[0];
    let err = webpki_verify_client(&ca, leaf, &[]).unwrap_err();
    assert!(matches!(err, webpki::Error::CertExpired { .. }), "{err:?}");
}

#[test]
fn a_leaf_from_another_ca_is_not_trusted() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let ca_a = new_ca(a.path());
    let ca_b = new_ca(b.path());
    let issued = ca_b
        .issue(&IssueRequest::new(id("spiffe://corp.example/app/x")))
        .unwrap();
    let leaf = &pem_certs(&issued.cert_pem)[0];
    assert!(webpki_verify_client(&ca_a, leaf, &[]).is_err());
    assert!(webpki_verify_client(&ca_b, leaf, &[]).is_ok());
}

#[test]
fn written_key_is_0600_and_cert_holds_the_chain() {
    let dir = tempfile::tempdir().unwrap();
    let ca = new_ca(&dir.path().join("ca"));
    let issued = ca
        .issue(&IssueRequest::new(id("spiffe://corp.example/app/billing")))
        .unwrap();
    let prefix = dir.path().join("billing");
    let (cert, key) = issued.write(&prefix).unwrap();
    let key = key.unwrap();
    assert_eq!(cert, dir.path().join("billing.pem"));
    assert_eq!(key, dir.path().join("billing.key"));
    assert_eq!(mode(&key), 0o600);
    assert_eq!(pem_certs(&fs::read_to_string(&cert).unwrap()).len(), 2);
    assert!(
        !format!("{issued:?}").contains("PRIVATE KEY"),
        "Debug hides the key"
    );
}

#[test]
fn two_cas_of_one_trust_domain_have_different_subjects() {
    let subject = || {
        let dir = tempfile::tempdir().unwrap();
        let td = eastwall_ca::TrustDomain::parse("corp.example").unwrap();
        let ca = Ca::init(
            dir.path(),
            &td,
            std::time::Duration::from_secs(86_400),
            false,
        )
        .unwrap();
        let ders = pem_certs(ca.bundle_pem());
        parse(&ders[0]).subject().to_string()
    };
    let (a, b) = (subject(), subject());
    assert!(a.contains("Eastwall CA corp.example "), "{a}");
    assert_ne!(
        a, b,
        "a foreign CA's certificates must not look issued by ours"
    );
}

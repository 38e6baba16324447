//! Helpers shared by the CA's integration tests: a fresh CA per test and certificate parsing.

#![allow(dead_code)]

use std::path::Path;
use std::time::Duration;

use eastwall_ca::{Ca, SpiffeId, TrustDomain};
use rustls_pki_types::{CertificateDer, UnixTime};
use x509_parser::prelude::{FromDer, X509Certificate};

pub fn td() -> TrustDomain {
    TrustDomain::parse("corp.example").unwrap()
}

pub fn id(s: &str) -> SpiffeId {
    SpiffeId::parse(s).unwrap()
}

pub fn new_ca(dir: &Path) -> Ca {
    Ca::init(dir, &td(), Duration::from_secs(30 * 86400), false).unwrap()
}

/// All CERTIFICATE blocks of a PEM string, in order.
pub fn pem_certs(pem: &str) -> Vec<Vec<u8>> {
    x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes())
        .map(|p| p.unwrap())
        .filter(|p| p.label == "CERTIFICATE")
        .map(|p| p.contents)
        .collect()
}

pub fn parse(der: &[u8]) -> X509Certificate<'_> {
    let (rest, cert) = X509Certificate::from_der(der).unwrap();
    assert!(rest.is_empty());
    cert
}

/// Verifies a leaf for client authentication against the CA, optionally with CRLs, the way
/// the proxy's rustls verifier does.
pub fn webpki_verify_client(
    ca: &Ca,
    leaf_der: &[u8],
    crls_der: &[Vec<u8>],
) -> Result<(), webpki::Error> {
    let anchor = webpki::anchor_from_trusted_cert(ca.cert_der()).unwrap();
    let leaf = CertificateDer::from(leaf_der.to_vec());
    let ee = webpki::EndEntityCert::try_from(&leaf).unwrap();
    let crls: Vec<webpki::CertRevocationList<'_>> = crls_der
        .iter()
        .map(|d| {
            webpki::BorrowedCertRevocationList::from_der(d)
                .unwrap()
                .into()
        })
        .collect();
    let crl_refs: Vec<&webpki::CertRevocationList<'_>> = crls.iter().collect();
    let revocation = if crl_refs.is_empty() {
        None
    } else {
        Some(
            webpki::RevocationOptionsBuilder::new(&crl_refs)
                .unwrap()
                .with_expiration_policy(webpki::ExpirationPolicy::Enforce)
                .build(),
        )
    };
    ee.verify_for_usage(
        webpki::ALL_VERIFICATION_ALGS,
        &[anchor],
        &[],
        UnixTime::now(),
        webpki::KeyUsage::client_auth(),
        revocation,
        None,
    )
    .map(|_| ())
}

/// The DER of the first X509 CRL block in a PEM string.
pub fn pem_crl(pem: &str) -> Vec<u8> {
    x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes())
        .map(|p| p.unwrap())
        .find(|p| p.label == "X509 CRL")
        .expect("an X509 CRL block")
        .contents
}

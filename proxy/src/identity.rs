//! Who is on the other end: the X509-SVID rules checked on a certificate rustls already
//! verified, and a short reason code for every way a client can fail to prove an identity.

use std::time::{Duration, SystemTime};

use eastwall_ca::{SpiffeId, SpiffeIdError, TrustDomain};
use rustls::{CertificateError, Error as RustlsError};
use rustls_pki_types::CertificateDer;
use sha2::{Digest, Sha256};
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::tls::NotIssuedByAnchor;

/// A client that proved a workload identity.
#[derive(Debug, Clone)]
pub struct PeerIdentity {
    pub id: SpiffeId,
    /// The certificate's serial in lowercase hex, as the CA's index and the CRL name it.
    pub serial_hex: String,
    /// SHA-256 of the leaf's DER: what step-up tokens are bound to.
    pub cert_sha256: [u8; 32],
    pub not_after: SystemTime,
}

/// Why a verified certificate is still not a valid X509-SVID of our trust domain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("a client certificate is required")]
    NoClientCert,
    #[error("the client certificate cannot be parsed")]
    Unparseable,
    #[error("the client certificate has more than one subjectAltName extension")]
    DuplicateSan,
    #[error("the client certificate has {0} subjectAltName entries that cannot be decoded (such as a URI that is not UTF-8); an X509-SVID has none")]
    InvalidSan(usize),
    #[error("the client certificate has no URI SAN (SPIFFE ID)")]
    NoUriSan,
    #[error("the client certificate has {0} URI SANs; an X509-SVID has exactly one")]
    MultipleUriSans(usize),
    #[error("the client certificate's URI SAN is not a valid SPIFFE ID: {0}")]
    BadSpiffeId(SpiffeIdError),
    #[error("the client certificate is for another trust domain: {0}")]
    ForeignTrustDomain(SpiffeIdError),
    #[error("the client certificate is a CA certificate, not a workload certificate")]
    CaLeaf,
    #[error("the client certificate may sign certificates or CRLs, which an X509-SVID must not")]
    CaKeyUsage,
}

impl IdentityError {
    /// The short reason written to the decision log.
    pub fn reason(&self) -> &'static str {
        match self {
            IdentityError::NoClientCert => "no_client_cert",
            IdentityError::Unparseable => "svid_unparseable",
            IdentityError::DuplicateSan => "svid_duplicate_san",
            IdentityError::InvalidSan(_) => "svid_invalid_san",
            IdentityError::NoUriSan => "svid_no_uri",
            IdentityError::MultipleUriSans(_) => "svid_multi_uri",
            IdentityError::BadSpiffeId(_) => "svid_bad_id",
            IdentityError::ForeignTrustDomain(_) => "svid_foreign_domain",
            IdentityError::CaLeaf => "svid_ca_leaf",
            IdentityError::CaKeyUsage => "svid_ca_usage",
        }
    }
}

/// Checks the X509-SVID rules on the leaf of a chain rustls has verified.
/// What a certificate says about itself, read without trusting it: for the log line of a
/// refused handshake (`claimed_spiffe_id`, `claimed_cert_serial`, `"unverified": true`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claimed {
    /// Its first URI SAN, if any (capped by the log like every field).
    pub spiffe_id: Option<String>,
    /// Lowercase hex of its raw serial, as [`PeerIdentity::serial_hex`] writes it.
    pub serial_hex: String,
}

/// Parses a refused leaf; None when it is not X.509 at all.
pub fn claimed(der: &[u8]) -> Option<Claimed> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let spiffe_id = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .and_then(|san| {
            san.value.general_names.iter().find_map(|name| match name {
                GeneralName::URI(uri) => Some((*uri).to_owned()),
                _ => None,
            })
        });
    Some(Claimed {
        spiffe_id,
        serial_hex: hex::encode(cert.raw_serial()),
    })
}

pub fn identify(
    chain: Option<&[CertificateDer<'_>]>,
    trust_domain: &TrustDomain,
) -> Result<PeerIdentity, IdentityError> {
    let leaf = chain
        .and_then(|c| c.first())
        .ok_or(IdentityError::NoClientCert)?;
    let (_, cert) = X509Certificate::from_der(leaf).map_err(|_| IdentityError::Unparseable)?;

    // Count URI SANs from the raw extension, not webpki's iterator, which skips URIs that are
    // not UTF-8 and so could make two URIs look like one (protocol-security item 33).
    // x509-parser reports an entry it cannot decode as `Invalid`; it could be a second URI,
    // so any such entry is a refusal, never skipped.
    let san = cert
        .subject_alternative_name()
        .map_err(|_| IdentityError::DuplicateSan)?;
    let names = san.map_or(&[][..], |ext| ext.value.general_names.as_slice());
    let invalid = names
        .iter()
        .filter(|name| matches!(name, GeneralName::Invalid(..)))
        .count();
    if invalid > 0 {
        return Err(IdentityError::InvalidSan(invalid));
    }
    let uris: Vec<&str> = names
        .iter()
        .filter_map(|name| match name {
            GeneralName::URI(uri) => Some(*uri),
            _ => None,
        })
        .collect();
    let uri = match uris.as_slice() {
        [] => return Err(IdentityError::NoUriSan),
        [one] => *one,
        many => return Err(IdentityError::MultipleUriSans(many.len())),
    };

    for ext in cert.extensions() {
        match ext.parsed_extension() {
            ParsedExtension::BasicConstraints(bc) if bc.ca => return Err(IdentityError::CaLeaf),
            ParsedExtension::KeyUsage(ku) if ku.key_cert_sign() || ku.crl_sign() => {
                return Err(IdentityError::CaKeyUsage)
            }
            _ => {}
        }
    }

    let id = SpiffeId::parse(uri).map_err(IdentityError::BadSpiffeId)?;
    id.require_trust_domain(trust_domain)
        .map_err(IdentityError::ForeignTrustDomain)?;

    let not_after = cert.validity().not_after.timestamp();
    let not_after = SystemTime::UNIX_EPOCH + Duration::from_secs(not_after.max(0) as u64);
    Ok(PeerIdentity {
        id,
        serial_hex: hex::encode(cert.raw_serial()),
        cert_sha256: Sha256::digest(leaf.as_ref()).into(),
        not_after,
    })
}

/// The decision-log reason for a failed TLS handshake, from the error tokio-rustls returned.
pub fn handshake_failure_reason(err: &std::io::Error) -> &'static str {
    let Some(tls) = err
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<RustlsError>())
    else {
        return match err.kind() {
            std::io::ErrorKind::UnexpectedEof => "tls_eof",
            _ => "tls_io_error",
        };
    };
    match tls {
        RustlsError::NoCertificatesPresented => "no_client_cert",
        RustlsError::InvalidCertificate(cert) => match cert {
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => "expired",
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "not_yet_valid"
            }
            CertificateError::Revoked => "revoked",
            CertificateError::UnknownIssuer | CertificateError::BadSignature => "untrusted",
            CertificateError::UnknownRevocationStatus => "revocation_unknown",
            CertificateError::ExpiredRevocationList
            | CertificateError::ExpiredRevocationListContext { .. } => "crl_expired",
            CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
                "wrong_key_purpose"
            }
            // rustls has no variant for a CA certificate presented as a client leaf; webpki's
            // own error rides in `Other`. It is the same SVID rule `identify` enforces, so the
            // log gives it the same reason whichever layer caught it.
            CertificateError::Other(other) => {
                if other.0.downcast_ref::<NotIssuedByAnchor>().is_some() {
                    return "svid_not_direct";
                }
                match other.0.downcast_ref::<webpki::Error>() {
                    Some(webpki::Error::CaUsedAsEndEntity) => "svid_ca_leaf",
                    _ => "bad_certificate",
                }
            }
            _ => "bad_certificate",
        },
        RustlsError::NoApplicationProtocol => "alpn_mismatch",
        RustlsError::PeerIncompatible(_) => "tls_incompatible",
        RustlsError::AlertReceived(_) => "client_alert",
        RustlsError::InvalidMessage(_) | RustlsError::PeerMisbehaved(_) => "tls_protocol_error",
        _ => "tls_handshake_failed",
    }
}

/// The message a client whose handshake failed would need, for our own log line.
pub fn handshake_failure_detail(err: &std::io::Error) -> String {
    err.to_string()
}

/// A short connection id that appears in client errors and every log line of the session.
pub fn new_conn_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn handshake_error(err: RustlsError) -> std::io::Error {
        std::io::Error::new(std::io::ErrorKind::InvalidData, err)
    }

    #[test]
    fn ca_leaf_refused_by_webpki_is_logged_as_svid_ca_leaf() {
        let err = handshake_error(RustlsError::InvalidCertificate(CertificateError::Other(
            rustls::OtherError(Arc::new(webpki::Error::CaUsedAsEndEntity)),
        )));
        assert_eq!(handshake_failure_reason(&err), "svid_ca_leaf");
    }

    #[test]
    fn a_leaf_from_an_intermediate_is_logged_as_svid_not_direct() {
        let err = handshake_error(RustlsError::InvalidCertificate(CertificateError::Other(
            rustls::OtherError(Arc::new(NotIssuedByAnchor)),
        )));
        assert_eq!(handshake_failure_reason(&err), "svid_not_direct");
        assert!(err.to_string().contains("intermediate CA"), "{err}");
    }

    /// A self-signed leaf whose subjectAltName extension is `names` (DER contents of the
    /// GeneralNames SEQUENCE), written by hand.
    fn leaf_with_san(names: &[u8]) -> Vec<u8> {
        let mut params = rcgen::CertificateParams::new(Vec::new()).unwrap();
        let mut san = vec![0x30, names.len() as u8];
        san.extend_from_slice(names);
        let mut ext = rcgen::CustomExtension::from_oid_content(&[2, 5, 29, 17], san);
        ext.set_criticality(true);
        params.custom_extensions.push(ext);
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    fn uri(bytes: &[u8]) -> Vec<u8> {
        let mut out = vec![0x86, bytes.len() as u8];
        out.extend_from_slice(bytes);
        out
    }

    #[test]
    fn an_undecodable_san_entry_is_refused_not_skipped() {
        let td = TrustDomain::parse("corp.example").unwrap();
        let good = uri(b"spiffe://corp.example/app/billing");
        let der = leaf_with_san(&good);
        let ok = identify(Some(&[CertificateDer::from(der)]), &td).unwrap();
        assert_eq!(ok.id.as_str(), "spiffe://corp.example/app/billing");

        let mut names = good.clone();
        names.extend(uri(&[0xff, 0xfe, 0x80]));
        let der = leaf_with_san(&names);
        let err = identify(Some(&[CertificateDer::from(der)]), &td).unwrap_err();
        assert_eq!(err, IdentityError::InvalidSan(1));
        assert_eq!(err.reason(), "svid_invalid_san");

        // An undecodable DNS name hides nothing URI-shaped, but is refused just the same.
        let mut names = vec![0x82, 2, 0xc3, 0x28];
        names.extend(good);
        let der = leaf_with_san(&names);
        let err = identify(Some(&[CertificateDer::from(der)]), &td).unwrap_err();
        assert_eq!(err.reason(), "svid_invalid_san");
    }

    #[test]
    fn other_webpki_failures_stay_bad_certificate() {
        let err = handshake_error(RustlsError::InvalidCertificate(CertificateError::Other(
            rustls::OtherError(Arc::new(webpki::Error::PathLenConstraintViolated)),
        )));
        assert_eq!(handshake_failure_reason(&err), "bad_certificate");
    }

    #[test]
    fn expired_revoked_and_missing_certificates_have_their_own_reasons() {
        let cases = [
            (
                RustlsError::InvalidCertificate(CertificateError::Expired),
                "expired",
            ),
            (
                RustlsError::InvalidCertificate(CertificateError::Revoked),
                "revoked",
            ),
            (
                RustlsError::InvalidCertificate(CertificateError::UnknownIssuer),
                "untrusted",
            ),
            (RustlsError::NoCertificatesPresented, "no_client_cert"),
        ];
        for (err, reason) in cases {
            assert_eq!(handshake_failure_reason(&handshake_error(err)), reason);
        }
    }
}

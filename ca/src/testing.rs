//! Deliberately malformed SVIDs signed by a real CA, so the proxy's tests can check that each
//! one is refused. Compiled only with the `testing` feature; never use in production.

use rcgen::string::Ia5String;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, CustomExtension, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    RevokedCertParams, SanType, SerialNumber,
};
use time::OffsetDateTime;

use crate::authority::Ca;
use crate::error::CaError;
use crate::issue::{IssueRequest, IssuedCert};

/// What is wrong with the certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Flaw {
    /// Two URI SANs: the SPIFFE ID and `spiffe://DOMAIN/second/identity`.
    TwoUriSans,
    /// No URI SAN at all (a DNS SAN `localhost` only).
    NoUriSan,
    /// A URI SAN that is not a SPIFFE ID (`https://DOMAIN/PATH`).
    NonSpiffeUri,
    /// The SPIFFE ID of another trust domain (`spiffe://evil.example/PATH`), signed by us.
    ForeignTrustDomain,
    /// basicConstraints CA:TRUE on the leaf.
    CaTrue,
    /// keyUsage digitalSignature plus keyCertSign.
    KeyCertSign,
    /// extendedKeyUsage serverAuth only, so no clientAuth.
    ServerAuthOnly,
    /// The SPIFFE ID plus a second URI SAN whose bytes are not UTF-8 (`ff fe 80`), which
    /// x509-parser reports as `GeneralName::Invalid` rather than as a URI.
    InvalidUtf8Uri,
}

/// The subjectAltName extension's OID (2.5.29.17).
const SAN_OID: &[u64] = &[2, 5, 29, 17];

/// A DER TLV with a short or long definite length.
fn der_tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let len = content.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes: Vec<u8> = len
            .to_be_bytes()
            .into_iter()
            .skip_while(|b| *b == 0)
            .collect();
        out.push(0x80 | bytes.len() as u8);
        out.extend(bytes);
    }
    out.extend_from_slice(content);
    out
}

/// Issues a leaf for `req` with `flaw` written into it, signed by `ca` and recorded in its
/// index (so it can be revoked like any other).
pub fn issue_flawed(ca: &Ca, req: &IssueRequest, flaw: Flaw) -> Result<IssuedCert, CaError> {
    let mut plan = ca.plan_leaf(req)?;
    let ia5 =
        |s: String| Ia5String::try_from(s).map_err(|e| CaError::InvalidValidity(e.to_string()));
    let domain = req.id.trust_domain().to_owned();
    let path = req.id.path().to_owned();
    let p = &mut plan.params;
    match flaw {
        Flaw::TwoUriSans => p.subject_alt_names.push(SanType::URI(ia5(format!(
            "spiffe://{domain}/second/identity"
        ))?)),
        Flaw::NoUriSan => {
            p.subject_alt_names = vec![SanType::DnsName(ia5("localhost".into())?)];
        }
        Flaw::NonSpiffeUri => {
            p.subject_alt_names = vec![SanType::URI(ia5(format!("https://{domain}{path}"))?)];
        }
        Flaw::ForeignTrustDomain => {
            p.subject_alt_names = vec![SanType::URI(ia5(format!("spiffe://evil.example{path}"))?)];
        }
        Flaw::CaTrue => p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0)),
        Flaw::KeyCertSign => {
            p.key_usages = vec![
                KeyUsagePurpose::DigitalSignature,
                KeyUsagePurpose::KeyCertSign,
            ];
        }
        Flaw::ServerAuthOnly => {
            p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        }
        Flaw::InvalidUtf8Uri => {
            // rcgen only writes IA5 URIs, so the extension is written by hand: a SEQUENCE of
            // two [6] uniformResourceIdentifier entries. Critical, as rcgen marks a SAN when
            // the subject is empty.
            let mut names = der_tlv(0x86, req.id.as_str().as_bytes());
            names.extend(der_tlv(0x86, &[0xff, 0xfe, 0x80]));
            let mut ext = CustomExtension::from_oid_content(SAN_OID, der_tlv(0x30, &names));
            ext.set_criticality(true);
            p.subject_alt_names = Vec::new();
            p.custom_extensions.push(ext);
        }
    }
    let key = KeyPair::generate().map_err(CaError::signing("leaf key"))?;
    let key_pem = key.serialize_pem();
    ca.sign_leaf(plan, req, &key, Some(key_pem))
}

/// A leaf for `req` signed by a freshly made intermediate CA that `ca` signed (pathlen 0,
/// keyCertSign): the chain a CA that "signs leaves only" must never let through. Returns the
/// leaf (its `cert_pem` holds the leaf, then the intermediate) and the intermediate's PEM.
/// The leaf is not in `ca`'s index.
pub fn issue_via_intermediate(
    ca: &Ca,
    req: &IssueRequest,
) -> Result<(IssuedCert, String), CaError> {
    let now = crate::authority::now();
    let mut sub = CertificateParams::default();
    sub.distinguished_name
        .push(DnType::CommonName, "rogue intermediate");
    sub.not_before = crate::authority::sub(now, crate::authority::BACKDATE);
    sub.not_after = now + time::Duration::days(1);
    sub.serial_number = Some(crate::serial::random_serial().0);
    sub.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    sub.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    sub.use_authority_key_identifier_extension = true;
    sub.key_identifier_method = KeyIdMethod::Sha256;
    let sub_key = KeyPair::generate().map_err(CaError::signing("intermediate key"))?;
    let sub_cert = sub
        .signed_by(&sub_key, &ca.issuer()?)
        .map_err(CaError::signing("intermediate"))?;
    let sub_pem = sub_cert.pem();

    let plan = ca.plan_leaf(req)?;
    let leaf_key = KeyPair::generate().map_err(CaError::signing("leaf key"))?;
    let leaf = plan
        .params
        .signed_by(&leaf_key, &Issuer::new(sub, &sub_key))
        .map_err(CaError::signing("leaf"))?;
    let mut cert_pem = leaf.pem();
    if !cert_pem.ends_with('\n') {
        cert_pem.push('\n');
    }
    cert_pem.push_str(&sub_pem);
    Ok((
        IssuedCert {
            cert_pem,
            key_pem: Some(leaf_key.serialize_pem()),
            serial_hex: plan.serial_hex,
            not_before: plan.not_before,
            not_after: plan.not_after,
        },
        sub_pem,
    ))
}

/// What [`sign_crl`] writes into a CRL.
#[derive(Debug, Clone)]
pub struct CrlSpec {
    /// Serials (hex, as `IssuedCert::serial_hex`) listed as revoked.
    pub revoked: Vec<String>,
    pub crl_number: u64,
    pub this_update: OffsetDateTime,
    pub next_update: OffsetDateTime,
}

/// A CRL signed with `ca`'s key exactly as `spec` says, as PEM; `ca`'s own `crl.pem` and
/// index are left alone. For CRLs the CA would never write itself (already past nextUpdate).
pub fn sign_crl(ca: &Ca, spec: &CrlSpec) -> Result<String, CaError> {
    let mut revoked_certs = Vec::new();
    for serial in &spec.revoked {
        let raw = hex::decode(serial)
            .map_err(|_| CaError::InvalidValidity(format!("bad serial {serial:?}")))?;
        revoked_certs.push(RevokedCertParams {
            serial_number: SerialNumber::from_slice(&raw),
            revocation_time: spec.this_update,
            reason_code: None,
            invalidity_date: None,
        });
    }
    let params = CertificateRevocationListParams {
        this_update: spec.this_update,
        next_update: spec.next_update,
        crl_number: SerialNumber::from(spec.crl_number),
        issuing_distribution_point: None,
        revoked_certs,
        key_identifier_method: KeyIdMethod::PreSpecified(ca.key_id.clone()),
    };
    let crl = params
        .signed_by(&ca.issuer()?)
        .map_err(CaError::signing("CRL"))?;
    crl.pem().map_err(CaError::signing("CRL"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spiffe::{SpiffeId, TrustDomain};
    use x509_parser::prelude::{FromDer, X509Certificate};

    fn leaf_der(issued: &IssuedCert) -> Vec<u8> {
        x509_parser::pem::Pem::iter_from_buffer(issued.cert_pem.as_bytes())
            .next()
            .unwrap()
            .unwrap()
            .contents
    }

    #[test]
    fn each_flaw_is_really_in_the_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let td = TrustDomain::parse("corp.example").unwrap();
        let ca = Ca::init(
            dir.path(),
            &td,
            std::time::Duration::from_secs(86400),
            false,
        )
        .unwrap();
        let req = IssueRequest::new(SpiffeId::parse("spiffe://corp.example/app/x").unwrap());
        let uris = |der: &[u8]| -> Vec<String> {
            let (_, c) = X509Certificate::from_der(der).unwrap();
            c.subject_alternative_name()
                .unwrap()
                .unwrap()
                .value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    x509_parser::extensions::GeneralName::URI(u) => Some(u.to_string()),
                    _ => None,
                })
                .collect()
        };
        let der = leaf_der(&issue_flawed(&ca, &req, Flaw::TwoUriSans).unwrap());
        assert_eq!(uris(&der).len(), 2);
        let der = leaf_der(&issue_flawed(&ca, &req, Flaw::NoUriSan).unwrap());
        assert!(uris(&der).is_empty());
        let der = leaf_der(&issue_flawed(&ca, &req, Flaw::NonSpiffeUri).unwrap());
        assert_eq!(uris(&der), ["https://corp.example/app/x"]);
        let der = leaf_der(&issue_flawed(&ca, &req, Flaw::ForeignTrustDomain).unwrap());
        assert_eq!(uris(&der), ["spiffe://evil.example/app/x"]);

        let der = leaf_der(&issue_flawed(&ca, &req, Flaw::CaTrue).unwrap());
        let (_, c) = X509Certificate::from_der(&der).unwrap();
        assert!(c.is_ca());
        let der = leaf_der(&issue_flawed(&ca, &req, Flaw::KeyCertSign).unwrap());
        let (_, c) = X509Certificate::from_der(&der).unwrap();
        assert!(c.key_usage().unwrap().unwrap().value.key_cert_sign());
        let der = leaf_der(&issue_flawed(&ca, &req, Flaw::ServerAuthOnly).unwrap());
        let (_, c) = X509Certificate::from_der(&der).unwrap();
        let eku = c.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && !eku.client_auth);

        let der = leaf_der(&issue_flawed(&ca, &req, Flaw::InvalidUtf8Uri).unwrap());
        assert_eq!(uris(&der), ["spiffe://corp.example/app/x"]);
        let (_, c) = X509Certificate::from_der(&der).unwrap();
        let san = c.subject_alternative_name().unwrap().unwrap();
        assert!(san.critical);
        assert!(matches!(
            san.value.general_names.as_slice(),
            [
                _,
                x509_parser::extensions::GeneralName::Invalid(_, [0xff, 0xfe, 0x80])
            ]
        ));

        assert_eq!(ca.records().unwrap().len(), 8);
    }
}

#[cfg(test)]
mod forged_chain_tests {
    use super::*;
    use crate::spiffe::{SpiffeId, TrustDomain};
    use x509_parser::prelude::{FromDer, X509Certificate};
    use x509_parser::revocation_list::CertificateRevocationList;

    fn ders(pem: &str) -> Vec<Vec<u8>> {
        x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes())
            .map(|p| p.unwrap().contents)
            .collect()
    }

    #[test]
    fn intermediate_chain_and_hand_signed_crl_verify_with_the_ca() {
        let dir = tempfile::tempdir().unwrap();
        let td = TrustDomain::parse("corp.example").unwrap();
        let ca = Ca::init(
            dir.path(),
            &td,
            std::time::Duration::from_secs(86400),
            false,
        )
        .unwrap();
        let root_der = ders(&ca.cert_pem)[0].clone();
        let (_, root) = X509Certificate::from_der(&root_der).unwrap();

        let req = IssueRequest::new(SpiffeId::parse("spiffe://corp.example/app/x").unwrap());
        let (leaf, sub_pem) = issue_via_intermediate(&ca, &req).unwrap();
        let chain = ders(&leaf.cert_pem);
        assert_eq!(chain.len(), 2);
        let (_, sub) = X509Certificate::from_der(&chain[1]).unwrap();
        assert_eq!(chain[1], ders(&sub_pem)[0]);
        assert!(sub.is_ca());
        sub.verify_signature(Some(root.public_key())).unwrap();
        let (_, l) = X509Certificate::from_der(&chain[0]).unwrap();
        l.verify_signature(Some(sub.public_key())).unwrap();
        assert_eq!(l.issuer(), sub.subject());

        let now = crate::authority::now();
        let pem = sign_crl(
            &ca,
            &CrlSpec {
                revoked: vec![leaf.serial_hex.clone()],
                crl_number: 42,
                this_update: now - time::Duration::days(2),
                next_update: now - time::Duration::days(1),
            },
        )
        .unwrap();
        let der = ders(&pem)[0].clone();
        let (_, crl) = CertificateRevocationList::from_der(&der).unwrap();
        crl.verify_signature(root.public_key()).unwrap();
        assert_eq!(crl.crl_number().unwrap().to_string(), "42");
        assert!(crl.next_update().unwrap().timestamp() < now.unix_timestamp());
    }
}

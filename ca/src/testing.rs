//! Deliberately malformed SVIDs signed by a real CA, so the proxy's tests can check that each
//! one is refused. Compiled only with the `testing` feature; never use in production.

use rcgen::string::Ia5String;
use rcgen::{BasicConstraints, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType};

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
    }
    let key = KeyPair::generate().map_err(CaError::signing("leaf key"))?;
    let key_pem = key.serialize_pem();
    ca.sign_leaf(plan, req, &key, Some(key_pem))
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

        assert_eq!(ca.records().unwrap().len(), 7);
    }
}

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

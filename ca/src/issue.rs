//! Issuing X.509-SVIDs: one URI SAN (the SPIFFE ID), CA:FALSE, digitalSignature, clientAuth
//! (+ serverAuth when the certificate also names DNS names or IPs), a random serial and a short
//! life. From a CSR only the public key is kept; every other field is ours.

use std::ffi::OsString;
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::string::Ia5String;
use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyIdMethod,
    KeyPair, KeyUsagePurpose, PublicKeyData, SanType, SubjectPublicKeyInfo,
};
use time::OffsetDateTime;
use x509_parser::prelude::FromDer;
use x509_parser::public_key::PublicKey as ParsedKey;

use crate::authority::{add, now, sub, Ca, BACKDATE};
use crate::error::CaError;
use crate::files;
use crate::index::IndexRecord;
use crate::spiffe::SpiffeId;

/// The default SVID lifetime: short, so a stolen certificate is worth little for long.
pub const DEFAULT_LEAF_TTL: Duration = Duration::from_secs(3600);

/// The longest common name X.520 allows (ub-common-name).
const MAX_CN_LEN: usize = 64;
/// RSA keys from a CSR smaller than this are refused.
const MIN_RSA_BITS: usize = 2048;

/// What to issue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssueRequest {
    pub id: SpiffeId,
    pub ttl: Duration,
    pub dns: Vec<String>,
    pub ips: Vec<IpAddr>,
    /// When set, the certificate is for this CSR's public key and no key is generated.
    pub csr_pem: Option<String>,
    /// The subject CN; empty subject otherwise. PostgreSQL `cert` auth maps CN to the role.
    pub common_name: Option<String>,
    /// An explicit validity window used verbatim instead of `ttl` (only `not_before <
    /// not_after` is checked), so tests can mint expired or not-yet-valid certificates.
    pub validity: Option<(OffsetDateTime, OffsetDateTime)>,
}

impl IssueRequest {
    /// A request for a 1-hour client SVID with a fresh key.
    pub fn new(id: SpiffeId) -> Self {
        Self {
            id,
            ttl: DEFAULT_LEAF_TTL,
            dns: Vec::new(),
            ips: Vec::new(),
            csr_pem: None,
            common_name: None,
            validity: None,
        }
    }
}

/// An issued certificate, ready to write out.
#[derive(Clone)]
pub struct IssuedCert {
    /// The leaf, then the chain up to and including the root.
    pub cert_pem: String,
    /// The leaf's PKCS#8 private key, PEM; `None` when issued for a CSR.
    pub key_pem: Option<String>,
    pub serial_hex: String,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

impl fmt::Debug for IssuedCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuedCert")
            .field("serial_hex", &self.serial_hex)
            .field("not_after", &self.not_after)
            .field("key_pem", &self.key_pem.as_ref().map(|_| "[redacted]"))
            .finish_non_exhaustive()
    }
}

impl IssuedCert {
    /// Writes `PREFIX.pem` and, when there is a key, `PREFIX.key` (mode 0600).
    pub fn write(&self, prefix: &Path) -> Result<(PathBuf, Option<PathBuf>), CaError> {
        let with_ext = |ext: &str| {
            let mut p = OsString::from(prefix.as_os_str());
            p.push(ext);
            PathBuf::from(p)
        };
        let cert_path = with_ext(".pem");
        let key_path = match &self.key_pem {
            Some(key) => {
                let path = with_ext(".key");
                files::write_private(&path, key.as_bytes())?;
                Some(path)
            }
            None => None,
        };
        files::write_public(&cert_path, self.cert_pem.as_bytes())?;
        Ok((cert_path, key_path))
    }
}

/// A leaf's parameters before signing, shared with [`crate::testing`].
pub(crate) struct LeafPlan {
    pub(crate) params: CertificateParams,
    pub(crate) serial_hex: String,
    pub(crate) not_before: OffsetDateTime,
    pub(crate) not_after: OffsetDateTime,
}

impl Ca {
    /// Issues an X.509-SVID for `req.id` and records it in the index.
    pub fn issue(&self, req: &IssueRequest) -> Result<IssuedCert, CaError> {
        let plan = self.plan_leaf(req)?;
        match &req.csr_pem {
            Some(csr) => {
                let public_key = csr_public_key(csr, "(from --csr)")?;
                self.sign_leaf(plan, req, &public_key, None)
            }
            None => {
                let key = KeyPair::generate().map_err(CaError::signing("leaf key"))?;
                let key_pem = key.serialize_pem();
                self.sign_leaf(plan, req, &key, Some(key_pem))
            }
        }
    }

    /// Sets every certificate field ourselves: rcgen's defaults (validity 1975–4096, a
    /// key-derived serial, a "rcgen self signed cert" CN) must never reach a certificate.
    pub(crate) fn plan_leaf(&self, req: &IssueRequest) -> Result<LeafPlan, CaError> {
        req.id.require_trust_domain(&self.trust_domain)?;
        let now = now();
        if now >= self.not_after {
            return Err(CaError::CaExpired {
                path: self.cert_path(),
                at: self.not_after.to_string(),
            });
        }
        let (not_before, not_after) = match req.validity {
            Some((nb, na)) => (nb, na),
            None => {
                if req.ttl.is_zero() {
                    return Err(CaError::InvalidValidity(
                        "the certificate lifetime must be longer than zero".into(),
                    ));
                }
                let na = add(now, req.ttl, "the certificate lifetime")?;
                // A leaf never outlives its CA.
                (
                    sub(now, BACKDATE).max(self.not_before),
                    na.min(self.not_after),
                )
            }
        };
        if not_before >= not_after {
            return Err(CaError::InvalidValidity(format!(
                "not_before {not_before} is not before not_after {not_after}"
            )));
        }

        let mut sans = Vec::with_capacity(1 + req.dns.len() + req.ips.len());
        sans.push(SanType::URI(Ia5String::try_from(req.id.as_str()).map_err(
            |e| CaError::InvalidValidity(format!("SPIFFE ID is not IA5: {e}")),
        )?));
        for name in &req.dns {
            check_dns_name(name)?;
            let ia5 = Ia5String::try_from(name.as_str())
                .map_err(|_| CaError::InvalidDnsName(name.clone()))?;
            sans.push(SanType::DnsName(ia5));
        }
        sans.extend(req.ips.iter().map(|ip| SanType::IpAddress(*ip)));

        let mut dn = DistinguishedName::new();
        if let Some(cn) = &req.common_name {
            check_common_name(cn)?;
            dn.push(DnType::CommonName, cn.as_str());
        }

        let (serial, serial_hex) = crate::serial::random_serial();
        let mut params = CertificateParams::default();
        params.not_before = not_before;
        params.not_after = not_after;
        params.serial_number = Some(serial);
        params.subject_alt_names = sans;
        // Empty unless a CN was asked for; rcgen then marks the SAN critical (X509-SVID §3.1).
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let mut ekus = vec![ExtendedKeyUsagePurpose::ClientAuth];
        if !req.dns.is_empty() || !req.ips.is_empty() {
            ekus.push(ExtendedKeyUsagePurpose::ServerAuth);
        }
        params.extended_key_usages = ekus;
        params.name_constraints = None;
        params.crl_distribution_points = Vec::new();
        params.custom_extensions = Vec::new();
        params.use_authority_key_identifier_extension = true;
        params.key_identifier_method = KeyIdMethod::Sha256;
        Ok(LeafPlan {
            params,
            serial_hex,
            not_before,
            not_after,
        })
    }

    /// Signs the plan for `public_key`, records it, and returns the leaf with its chain.
    pub(crate) fn sign_leaf(
        &self,
        plan: LeafPlan,
        req: &IssueRequest,
        public_key: &impl PublicKeyData,
        key_pem: Option<String>,
    ) -> Result<IssuedCert, CaError> {
        let cert = plan
            .params
            .signed_by(public_key, &self.issuer()?)
            .map_err(CaError::signing("certificate"))?;
        let mut cert_pem = cert.pem();
        if !cert_pem.ends_with('\n') {
            cert_pem.push('\n');
        }
        cert_pem.push_str(&self.cert_pem);
        // Recorded before it is handed out: a certificate missing from the index could not
        // be revoked by identity.
        self.record(IndexRecord {
            serial: plan.serial_hex.clone(),
            spiffe_id: req.id.to_string(),
            not_before: plan.not_before,
            not_after: plan.not_after,
            dns: req.dns.clone(),
            ips: req.ips.clone(),
            common_name: req.common_name.clone(),
            from_csr: key_pem.is_none(),
            revoked: false,
            revoked_at: None,
        })?;
        Ok(IssuedCert {
            cert_pem,
            key_pem,
            serial_hex: plan.serial_hex,
            not_before: plan.not_before,
            not_after: plan.not_after,
        })
    }
}

/// Checks a CSR's signature and returns its public key; everything else in it is ignored.
///
/// We parse with x509-parser rather than `rcgen::CertificateSigningRequestParams`, which copies
/// the requested SANs, key usages and CA flag and fails on extensions it does not know: none of
/// that may reach the certificate, so none of it is read.
pub fn csr_public_key(pem: &str, source_name: &str) -> Result<SubjectPublicKeyInfo, CaError> {
    let invalid = |reason: String| CaError::InvalidCsr {
        source_name: source_name.to_owned(),
        reason,
    };
    let mut der = None;
    for item in x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes()) {
        let item = item.map_err(|e| invalid(format!("not valid PEM: {e}")))?;
        if item.label == "CERTIFICATE REQUEST" || item.label == "NEW CERTIFICATE REQUEST" {
            der = Some(item.contents);
            break;
        }
    }
    let der = der.ok_or_else(|| invalid("no CERTIFICATE REQUEST block found".into()))?;
    let (rest, csr) = x509_parser::certification_request::X509CertificationRequest::from_der(&der)
        .map_err(|e| invalid(format!("not a PKCS#10 request: {e}")))?;
    if !rest.is_empty() {
        return Err(invalid("trailing bytes after the request".into()));
    }
    csr.verify_signature()
        .map_err(|_| invalid("its signature does not verify with its own public key".into()))?;
    let spki = &csr.certification_request_info.subject_pki;
    if let Ok(ParsedKey::RSA(rsa)) = spki.parsed() {
        if rsa.key_size() < MIN_RSA_BITS {
            return Err(invalid(format!(
                "RSA key of {} bits is too small; use at least {MIN_RSA_BITS} bits or ECDSA P-256",
                rsa.key_size()
            )));
        }
    }
    SubjectPublicKeyInfo::from_der(spki.raw)
        .map_err(|e| invalid(format!("unsupported public key: {e}")))
}

/// A DNS SAN: dot-separated labels of letters, digits and '-', optionally a leading "*.".
fn check_dns_name(name: &str) -> Result<(), CaError> {
    let bad = || CaError::InvalidDnsName(name.to_owned());
    let host = name.strip_prefix("*.").unwrap_or(name);
    if host.is_empty() || name.len() > 253 {
        return Err(bad());
    }
    for label in host.split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
        if !ok {
            return Err(bad());
        }
    }
    Ok(())
}

fn check_common_name(cn: &str) -> Result<(), CaError> {
    if cn.is_empty() || cn.chars().count() > MAX_CN_LEN || cn.chars().any(char::is_control) {
        return Err(CaError::InvalidCommonName(cn.to_owned()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_names_are_checked() {
        for ok in ["localhost", "db.corp.example", "*.corp.example", "a-1.b"] {
            assert!(check_dns_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "", "*.", "a..b", "-a.b", "a b", "a_b", "*.*.x", "é.x", "a.", "x/y",
        ] {
            assert!(check_dns_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn common_names_are_checked() {
        assert!(check_common_name("billing").is_ok());
        assert!(check_common_name("").is_err());
        assert!(check_common_name("a\nb").is_err());
        assert!(check_common_name(&"x".repeat(65)).is_err());
    }
}

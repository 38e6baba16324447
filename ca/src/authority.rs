//! The CA itself: creating the trust-domain root, opening it from its folder, the trust bundle,
//! revocation and the signed CRL.
//!
//! A CA folder holds `ca.pem` (the root, which is also the trust bundle), `ca.key` (0600),
//! `crl.pem` (always present and signed, empty until something is revoked) and `index.json`
//! (every issued certificate). Writers take an flock on `DIR/.lock`.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName,
    DnType, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose, RevokedCertParams, SanType,
    SerialNumber,
};
use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::error::CaError;
use crate::files::{self, DirLock};
use crate::index::{Index, IndexRecord};
use crate::serial::{normalize_serial, random_serial};
use crate::spiffe::{SpiffeId, TrustDomain};

pub(crate) const CERT_FILE: &str = "ca.pem";
pub(crate) const KEY_FILE: &str = "ca.key";
pub(crate) const CRL_FILE: &str = "crl.pem";
pub(crate) const INDEX_FILE: &str = "index.json";

/// How far `not_before` (and a CRL's `thisUpdate`) is set in the past, so a peer whose clock
/// is a little behind ours does not see a certificate that is "not valid yet".
pub const BACKDATE: Duration = Duration::from_secs(5 * 60);

/// How long a CRL is valid (`nextUpdate - now`). The proxy enforces `nextUpdate`, so the CRL
/// must be re-signed within this window: every `eastwall ca revoke` does, and `eastwall ca crl`
/// does on its own (run it from cron, e.g. daily).
pub const CRL_VALIDITY: Duration = Duration::from_secs(7 * 24 * 3600);

/// The default lifetime of a new CA.
pub const DEFAULT_CA_TTL: Duration = Duration::from_secs(365 * 24 * 3600);

/// Revoked certificates stay listed on the CRL for this long after they expire, so a verifier
/// with a slow clock still sees them.
const CRL_KEEP_AFTER_EXPIRY: Duration = Duration::from_secs(24 * 3600);

/// A trust-domain CA opened from (or created in) its folder.
pub struct Ca {
    pub(crate) dir: PathBuf,
    pub(crate) trust_domain: TrustDomain,
    pub(crate) cert_pem: String,
    pub(crate) cert_der: CertificateDer<'static>,
    pub(crate) key: KeyPair,
    pub(crate) not_before: OffsetDateTime,
    pub(crate) not_after: OffsetDateTime,
    /// The root's subject key identifier, written as the authority key identifier of
    /// everything it signs.
    pub(crate) key_id: Vec<u8>,
}

impl fmt::Debug for Ca {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The key is never printed.
        f.debug_struct("Ca")
            .field("dir", &self.dir)
            .field("trust_domain", &self.trust_domain)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// What to revoke.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RevokeTarget {
    /// One certificate, by serial in hex (colons and a `0x` prefix are accepted).
    Serial(String),
    /// Every unexpired certificate issued to this identity.
    Id(SpiffeId),
}

impl FromStr for RevokeTarget {
    type Err = CaError;
    /// Anything starting with `spiffe:` is an identity; everything else must be a hex serial.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.starts_with("spiffe:") {
            Ok(Self::Id(SpiffeId::parse(s)?))
        } else {
            Ok(Self::Serial(normalize_serial(s)?))
        }
    }
}

pub(crate) fn now() -> OffsetDateTime {
    let now = OffsetDateTime::now_utc();
    // X.509 times have whole seconds; keep what we record equal to what we sign.
    now.replace_nanosecond(0).unwrap_or(now)
}

pub(crate) fn add(
    t: OffsetDateTime,
    d: Duration,
    what: &'static str,
) -> Result<OffsetDateTime, CaError> {
    time::Duration::try_from(d)
        .ok()
        .and_then(|d| t.checked_add(d))
        .filter(|t| t.year() <= 9999)
        .ok_or_else(|| CaError::InvalidValidity(format!("{what} is too long")))
}

pub(crate) fn sub(t: OffsetDateTime, d: Duration) -> OffsetDateTime {
    time::Duration::try_from(d)
        .ok()
        .and_then(|d| t.checked_sub(d))
        .unwrap_or(t)
}

impl Ca {
    /// Creates a new root for `trust_domain` in `dir`, valid for `ttl`.
    ///
    /// Refuses to replace an existing CA unless `force` is set.
    pub fn init(
        dir: &Path,
        trust_domain: &TrustDomain,
        ttl: Duration,
        force: bool,
    ) -> Result<Ca, CaError> {
        if ttl.is_zero() {
            return Err(CaError::InvalidValidity(
                "the CA lifetime must be longer than zero".into(),
            ));
        }
        std::fs::create_dir_all(dir).map_err(|e| CaError::io(dir, "create the CA folder", e))?;
        let _lock = DirLock::acquire(dir)?;
        let exists = |f: &str| dir.join(f).symlink_metadata().is_ok();
        if !force && (exists(CERT_FILE) || exists(KEY_FILE)) {
            return Err(CaError::AlreadyExists(dir.to_path_buf()));
        }

        let now = now();
        let key = KeyPair::generate().map_err(CaError::signing("CA key"))?;
        let mut params = CertificateParams::default();
        params.not_before = sub(now, BACKDATE);
        params.not_after = add(now, ttl, "the CA lifetime")?;
        let (serial, serial_hex) = random_serial();
        params.serial_number = Some(serial);
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Eastwall");
        // Unique per CA: with one subject for every CA of a trust domain, a certificate from a
        // foreign CA looked issued by ours and failed as a bad signature (`decrypt error`)
        // rather than `unknown ca`, and two roots in one bundle (a rollover) could not be told
        // apart by name.
        dn.push(
            DnType::CommonName,
            format!("Eastwall CA {trust_domain} {}", &serial_hex[..8]),
        );
        params.distinguished_name = dn;
        // X509-SVID §4.1: a signing certificate may carry the trust domain's own ID.
        let uri = rcgen::string::Ia5String::try_from(trust_domain.id_uri())
            .map_err(|e| CaError::InvalidValidity(e.to_string()))?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        // Path length 0: this root signs leaves only, never a sub-CA.
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.extended_key_usages = Vec::new();
        // No URI name constraints: webpki rejects every URI SAN under one (research item 52);
        // the trust domain is enforced in code instead.
        params.name_constraints = None;
        params.crl_distribution_points = Vec::new();
        params.custom_extensions = Vec::new();
        params.use_authority_key_identifier_extension = false;
        params.key_identifier_method = KeyIdMethod::Sha256;
        let cert = params
            .self_signed(&key)
            .map_err(CaError::signing("CA certificate"))?;

        files::write_private(&dir.join(KEY_FILE), key.serialize_pem().as_bytes())?;
        files::write_public(&dir.join(CERT_FILE), cert.pem().as_bytes())?;
        let ca = Self::from_parts(dir, cert.pem(), key)?;
        let mut index = Index::new(trust_domain.as_str());
        ca.write_crl(&mut index, now)?;
        Ok(ca)
    }

    /// Opens the CA in `dir`, checking that the key is private and belongs to the certificate.
    pub fn open(dir: &Path) -> Result<Ca, CaError> {
        for file in [CERT_FILE, KEY_FILE, INDEX_FILE] {
            if !dir.join(file).exists() {
                return Err(CaError::NotInitialised {
                    dir: dir.to_path_buf(),
                    file,
                });
            }
        }
        let key_path = dir.join(KEY_FILE);
        files::check_private_mode(&key_path)?;
        let key_pem = files::read_text(&key_path)?;
        let key = KeyPair::from_pem(&key_pem)
            .map_err(|e| CaError::corrupt(&key_path, format!("not a PKCS#8 private key: {e}")))?;
        let cert_pem = files::read_text(&dir.join(CERT_FILE))?;
        Self::from_parts(dir, cert_pem, key)
    }

    fn from_parts(dir: &Path, cert_pem: String, key: KeyPair) -> Result<Ca, CaError> {
        let cert_path = dir.join(CERT_FILE);
        let corrupt = |reason: String| CaError::corrupt(&cert_path, reason);
        let cert_der = first_certificate(&cert_pem).map_err(&corrupt)?;
        let (rest, x509) = X509Certificate::from_der(&cert_der)
            .map_err(|e| corrupt(format!("not an X.509 certificate: {e}")))?;
        if !rest.is_empty() {
            return Err(corrupt("trailing bytes after the certificate".into()));
        }
        use rcgen::PublicKeyData;
        if x509.public_key().raw != key.subject_public_key_info().as_slice() {
            return Err(CaError::KeyMismatch {
                key: dir.join(KEY_FILE),
                cert: cert_path,
            });
        }
        if !x509.is_ca() {
            return Err(corrupt(
                "the certificate is not a CA (basicConstraints CA:FALSE or missing)".into(),
            ));
        }
        let trust_domain = ca_trust_domain(&x509).map_err(&corrupt)?;
        let key_id = match x509
            .extensions()
            .iter()
            .find_map(|e| match e.parsed_extension() {
                x509_parser::extensions::ParsedExtension::SubjectKeyIdentifier(k) => {
                    Some(k.0.to_vec())
                }
                _ => None,
            }) {
            Some(k) => k,
            None => {
                return Err(corrupt(
                    "the CA certificate has no subject key identifier".into(),
                ))
            }
        };
        let validity = x509.validity();
        let not_before = validity.not_before.to_datetime();
        let not_after = validity.not_after.to_datetime();
        Ok(Ca {
            dir: dir.to_path_buf(),
            trust_domain,
            cert_pem,
            cert_der: CertificateDer::from(cert_der),
            key,
            not_before,
            not_after,
            key_id,
        })
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The trust bundle: the root certificate, PEM.
    pub fn bundle_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The root certificate, DER.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    pub fn not_after(&self) -> OffsetDateTime {
        self.not_after
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn cert_path(&self) -> PathBuf {
        self.dir.join(CERT_FILE)
    }

    pub fn crl_path(&self) -> PathBuf {
        self.dir.join(CRL_FILE)
    }

    pub fn index_path(&self) -> PathBuf {
        self.dir.join(INDEX_FILE)
    }

    /// Every certificate this CA issued, oldest first.
    pub fn records(&self) -> Result<Vec<IndexRecord>, CaError> {
        Ok(Index::load(&self.index_path())?.certs)
    }

    pub(crate) fn issuer(&self) -> Result<Issuer<'static, &KeyPair>, CaError> {
        Issuer::from_ca_cert_der(&self.cert_der, &self.key)
            .map_err(|e| CaError::corrupt(self.cert_path(), format!("unusable as an issuer: {e}")))
    }

    /// Revokes one certificate by serial, or every unexpired certificate of an identity, and
    /// re-signs `crl.pem`. Returns the serials (hex) now on the CRL because of this call;
    /// revoking an already revoked serial is not an error.
    pub fn revoke(&self, target: &RevokeTarget) -> Result<Vec<String>, CaError> {
        let _lock = DirLock::acquire(&self.dir)?;
        let index_path = self.index_path();
        let mut index = Index::load(&index_path)?;
        let now = now();
        let mut serials = Vec::new();
        let mut mark = |rec: &mut IndexRecord| {
            if !rec.revoked {
                rec.revoked = true;
                rec.revoked_at = Some(now);
            }
            serials.push(rec.serial.clone());
        };
        match target {
            RevokeTarget::Serial(s) => {
                let serial = normalize_serial(s)?;
                let rec = index
                    .certs
                    .iter_mut()
                    .find(|r| r.serial == serial)
                    .ok_or_else(|| CaError::UnknownSerial {
                        serial: serial.clone(),
                        index: index_path.clone(),
                    })?;
                mark(rec);
            }
            RevokeTarget::Id(id) => {
                index
                    .certs
                    .iter_mut()
                    .filter(|r| r.spiffe_id == id.as_str() && r.not_after > now)
                    .for_each(&mut mark);
                if serials.is_empty() {
                    return Err(CaError::NothingToRevoke {
                        id: id.to_string(),
                        index: index_path,
                    });
                }
            }
        }
        self.write_crl(&mut index, now)?;
        Ok(serials)
    }

    /// Re-signs `crl.pem` with a fresh `nextUpdate` (now + [`CRL_VALIDITY`]) and returns it.
    pub fn refresh_crl(&self) -> Result<OffsetDateTime, CaError> {
        let _lock = DirLock::acquire(&self.dir)?;
        let mut index = Index::load(&self.index_path())?;
        self.write_crl(&mut index, now())
    }

    /// Saves the index with the next CRL number, then writes the CRL built from it. The index
    /// goes first: if the CRL write fails, re-running revoke or `ca crl` completes it.
    fn write_crl(&self, index: &mut Index, now: OffsetDateTime) -> Result<OffsetDateTime, CaError> {
        index.crl_number = index.crl_number.saturating_add(1);
        let next_update = add(now, CRL_VALIDITY, "the CRL validity")?;
        let mut revoked_certs = Vec::new();
        for rec in index.certs.iter().filter(|r| r.revoked) {
            if add(rec.not_after, CRL_KEEP_AFTER_EXPIRY, "CRL retention")? < now {
                continue;
            }
            let serial = hex::decode(&rec.serial).map_err(|_| {
                CaError::corrupt(self.index_path(), format!("bad serial {:?}", rec.serial))
            })?;
            revoked_certs.push(RevokedCertParams {
                serial_number: SerialNumber::from_slice(&serial),
                revocation_time: rec.revoked_at.unwrap_or(now),
                reason_code: None,
                invalidity_date: None,
            });
        }
        let params = CertificateRevocationListParams {
            this_update: sub(now, BACKDATE),
            next_update,
            crl_number: SerialNumber::from(index.crl_number),
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: KeyIdMethod::PreSpecified(self.key_id.clone()),
        };
        let crl = params
            .signed_by(&self.issuer()?)
            .map_err(CaError::signing("CRL"))?;
        let pem = crl.pem().map_err(CaError::signing("CRL"))?;
        index.save(&self.index_path())?;
        files::write_public(&self.crl_path(), pem.as_bytes())?;
        Ok(next_update)
    }

    /// Appends a record to the index under the folder lock.
    pub(crate) fn record(&self, rec: IndexRecord) -> Result<(), CaError> {
        let _lock = DirLock::acquire(&self.dir)?;
        let path = self.index_path();
        let mut index = Index::load(&path)?;
        index.certs.push(rec);
        index.save(&path)
    }
}

/// The DER of the first CERTIFICATE block in a PEM string.
pub(crate) fn first_certificate(pem: &str) -> Result<Vec<u8>, String> {
    for item in x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes()) {
        let item = item.map_err(|e| format!("not valid PEM: {e}"))?;
        if item.label == "CERTIFICATE" {
            return Ok(item.contents);
        }
    }
    Err("no CERTIFICATE block found".into())
}

/// The trust domain a root is for, from its single `spiffe://DOMAIN` URI SAN.
fn ca_trust_domain(x509: &X509Certificate<'_>) -> Result<TrustDomain, String> {
    let san = x509
        .subject_alternative_name()
        .map_err(|e| format!("bad subjectAltName: {e}"))?
        .ok_or("the CA certificate has no spiffe://DOMAIN URI SAN")?;
    let uris: Vec<&str> = san
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some(*u),
            _ => None,
        })
        .collect();
    let [uri] = uris.as_slice() else {
        return Err(format!(
            "the CA certificate must have exactly one URI SAN, found {}",
            uris.len()
        ));
    };
    let name = uri
        .strip_prefix("spiffe://")
        .ok_or_else(|| format!("the CA's URI SAN {uri:?} is not spiffe://DOMAIN"))?;
    TrustDomain::parse(name).map_err(|e| format!("the CA's URI SAN {uri:?}: {e}"))
}

//! TLS for both legs: the client-facing server config (mandatory client certificates issued
//! directly by a CA in our trust bundle and not revoked) and the client config the proxy uses
//! toward PostgreSQL.
//!
//! Revocation is checked by our own [`SvidVerifier`], not by webpki's CRL support: every CRL
//! is parsed and signature-checked once, when the files are loaded, into a [`Revocation`]
//! (revoked serials per issuer and each CRL's nextUpdate). A handshake then costs one hash
//! lookup, where webpki re-verified every CRL signature on every handshake (19 % of one).
//! Loading refuses what would weaken revocation: a file with no CRL, a trust anchor without
//! one, a CRL not signed by its anchor, or one older (lower CRL number) than a CRL already
//! seen; the highest number per issuer is kept in a small state file so a restart does not
//! forget it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use rustls::client::danger::HandshakeSignatureValid;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{NoServerSessionStorage, WebPkiClientVerifier};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, Error as RustlsError,
    RootCertStore, ServerConfig, SignatureScheme,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, UnixTime};

use crate::verified_leaves::VerifiedLeaves;
use sha2::{Digest, Sha256};
use x509_parser::num_bigint::BigUint;

/// ALPN protocol name PostgreSQL 17+ clients send, required for direct TLS.
pub const ALPN_POSTGRESQL: &[u8] = b"postgresql";

/// The name of the CRL-number state file, kept beside the decision log.
pub const CRL_STATE_FILE: &str = "crl-state.json";

/// Why TLS material could not be loaded; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} from {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        source: rustls_pki_types::pem::Error,
    },
    #[error("{path} holds no {what}")]
    Empty { what: &'static str, path: PathBuf },
    #[error("invalid client trust bundle ({path}): {source}")]
    Verifier {
        path: PathBuf,
        source: rustls::server::VerifierBuilderError,
    },
    #[error("invalid certificate or key ({path}): {source}")]
    Config {
        path: PathBuf,
        source: rustls::Error,
    },
    #[error("CRL file {path}: {problem}")]
    Crl { path: PathBuf, problem: CrlProblem },
    #[error("CRL state file {path}: {problem}")]
    CrlState { path: PathBuf, problem: String },
}

impl TlsError {
    /// The short reason a failed reload is logged with.
    pub fn reason(&self) -> &'static str {
        match self {
            TlsError::Crl { problem, .. } => problem.reason(),
            TlsError::CrlState { .. } => "crl_state_error",
            _ => "tls_files_invalid",
        }
    }

    /// Whether the CRL (or its state file) is what failed, rather than a certificate or key.
    pub fn is_crl(&self) -> bool {
        matches!(self, TlsError::Crl { .. } | TlsError::CrlState { .. })
    }
}

/// What is wrong with a CRL file. Every one of these would otherwise weaken revocation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CrlProblem {
    #[error("cannot be read: {0}")]
    Unreadable(String),
    #[error("holds no CRL; an empty or certificate-only file would switch revocation off")]
    NoCrl,
    #[error(
        "holds no CRL from trust anchor {anchor}; every CA in the client trust bundle needs one"
    )]
    NoCrlFor { anchor: String },
    #[error("holds a CRL that cannot be parsed: {0}")]
    Unparseable(String),
    #[error("holds a CRL from {issuer}, which is not a CA in the client trust bundle")]
    UnknownIssuer { issuer: String },
    #[error("holds a CRL naming {issuer} whose signature does not verify with that CA's key")]
    BadSignature { issuer: String },
    #[error("holds more than one CRL from {issuer}")]
    Duplicate { issuer: String },
    #[error("the CRL from {issuer} has no CRL number, so replacing it with an older one could not be detected")]
    NoNumber { issuer: String },
    #[error("the CRL from {issuer} has no nextUpdate, so it would never go stale")]
    NoNextUpdate { issuer: String },
    #[error("the CRL from {issuer} has a critical extension {oid} that Eastwall does not support (delta or partitioned CRL)")]
    CriticalExtension { issuer: String, oid: String },
    #[error("the CRL from {issuer} has CRL number {number}, lower than {seen} already seen (recorded in {state}); an older CRL cannot replace a newer one")]
    Rollback {
        issuer: String,
        number: String,
        seen: String,
        state: String,
    },
    #[error("the CRL from {issuer} is past its nextUpdate ({next_update}); re-sign it (`eastwall ca crl`) before starting")]
    Expired { issuer: String, next_update: String },
}

impl CrlProblem {
    pub fn reason(&self) -> &'static str {
        match self {
            CrlProblem::Unreadable(_) => "crl_unreadable",
            CrlProblem::NoCrl | CrlProblem::NoCrlFor { .. } => "crl_missing",
            CrlProblem::UnknownIssuer { .. } | CrlProblem::BadSignature { .. } => "crl_untrusted",
            CrlProblem::Rollback { .. } => "crl_rollback",
            CrlProblem::Expired { .. } => "crl_expired",
            CrlProblem::Unparseable(_)
            | CrlProblem::Duplicate { .. }
            | CrlProblem::NoNumber { .. }
            | CrlProblem::NoNextUpdate { .. }
            | CrlProblem::CriticalExtension { .. } => "crl_invalid",
        }
    }
}

/// Every file that a server config is built from, so it can be rebuilt when one changes.
#[derive(Debug, Clone)]
pub struct ServerTlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: PathBuf,
    pub crl: Option<PathBuf>,
    /// Where the highest CRL number seen per issuer is kept (used only with `crl`).
    pub crl_state: PathBuf,
}

impl ServerTlsFiles {
    fn paths(&self) -> impl Iterator<Item = &Path> {
        [&self.cert, &self.key, &self.client_ca]
            .into_iter()
            .map(PathBuf::as_path)
            .chain(self.crl.as_deref())
    }

    /// The newest modification time among the files; a change means a rebuild.
    pub fn fingerprint(&self) -> Vec<Option<SystemTime>> {
        self.paths()
            .map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
            .collect()
    }
}

pub fn load_certs(
    path: &Path,
    what: &'static str,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|source| TlsError::Read {
            what,
            path: path.to_owned(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::Empty {
            what,
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|source| TlsError::Read {
        what: "a private key",
        path: path.to_owned(),
        source,
    })
}

fn roots_from(path: &Path, certs: &[CertificateDer<'static>]) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in certs {
        roots.add(cert.clone()).map_err(|source| TlsError::Config {
            path: path.to_owned(),
            source,
        })?;
    }
    Ok(roots)
}

fn load_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    roots_from(path, &load_certs(path, "CA certificates")?)
}

/// One trust anchor's revocation list, verified at load.
#[derive(Debug)]
struct IssuerCrl {
    /// The anchor's subject, for messages.
    subject: String,
    /// Identifies the anchor's key in the state file: SHA-256 of subject DER and SPKI DER.
    key: String,
    number: BigUint,
    next_update: u64,
    /// Revoked serials as unsigned magnitudes (leading zero bytes stripped).
    revoked: HashSet<Vec<u8>>,
}

/// The revocation state every handshake consults: for each trust anchor (by subject DER),
/// the serials its CRL revokes and when that CRL goes stale. Built only from CRLs whose
/// signature was verified with their anchor's key.
#[derive(Debug)]
pub struct Revocation {
    by_subject: HashMap<Vec<u8>, Vec<IssuerCrl>>,
    /// Lowercase hex of the raw serials, as the identity module writes them: what live
    /// sessions watch for.
    revoked_hex: HashSet<String>,
}

/// An unsigned integer's magnitude: DER adds a 0x00 before a high bit, writers may pad.
fn magnitude(raw: &[u8]) -> &[u8] {
    let start = raw.iter().position(|b| *b != 0).unwrap_or(raw.len());
    &raw[start..]
}

impl Revocation {
    /// Parses and verifies every CRL in `path` against the anchors; each anchor must have
    /// exactly one.
    pub fn load(path: &Path, anchors: &[CertificateDer<'_>]) -> Result<Self, CrlProblem> {
        use x509_parser::prelude::{FromDer, X509Certificate};
        use x509_parser::revocation_list::CertificateRevocationList;

        let ders = CertificateRevocationListDer::pem_file_iter(path)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(|e| CrlProblem::Unreadable(e.to_string()))?;
        if ders.is_empty() {
            return Err(CrlProblem::NoCrl);
        }
        let anchors = anchors
            .iter()
            .map(|der| {
                X509Certificate::from_der(der)
                    .map(|(_, cert)| cert)
                    .map_err(|e| CrlProblem::Unparseable(format!("a trust anchor: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut found: Vec<Option<IssuerCrl>> = anchors.iter().map(|_| None).collect();
        let mut revoked_hex = HashSet::new();
        for der in &ders {
            let (_, crl) = CertificateRevocationList::from_der(der)
                .map_err(|e| CrlProblem::Unparseable(e.to_string()))?;
            let issuer = crl.issuer().to_string();
            let same_name: Vec<usize> = anchors
                .iter()
                .enumerate()
                .filter(|(_, a)| a.subject().as_raw() == crl.issuer().as_raw())
                .map(|(i, _)| i)
                .collect();
            if same_name.is_empty() {
                return Err(CrlProblem::UnknownIssuer { issuer });
            }
            let Some(at) = same_name
                .into_iter()
                .find(|i| crl.verify_signature(anchors[*i].public_key()).is_ok())
            else {
                return Err(CrlProblem::BadSignature { issuer });
            };
            if found[at].is_some() {
                return Err(CrlProblem::Duplicate { issuer });
            }
            // A critical extension we do not understand (delta CRL indicator, issuing
            // distribution point) would mean this CRL does not cover every certificate.
            let critical = crl
                .extensions()
                .iter()
                .chain(
                    crl.iter_revoked_certificates()
                        .flat_map(|r| r.extensions().iter()),
                )
                .find(|ext| ext.critical && !known_crl_extension(&ext.oid.to_id_string()));
            if let Some(ext) = critical {
                return Err(CrlProblem::CriticalExtension {
                    issuer,
                    oid: ext.oid.to_id_string(),
                });
            }
            let number = crl
                .crl_number()
                .cloned()
                .ok_or_else(|| CrlProblem::NoNumber {
                    issuer: issuer.clone(),
                })?;
            let next_update = crl
                .next_update()
                .ok_or_else(|| CrlProblem::NoNextUpdate {
                    issuer: issuer.clone(),
                })?
                .timestamp()
                .max(0) as u64;
            let mut revoked = HashSet::new();
            for entry in crl.iter_revoked_certificates() {
                revoked.insert(magnitude(entry.raw_serial()).to_vec());
                revoked_hex.insert(hex::encode(entry.raw_serial()));
            }
            let anchor = &anchors[at];
            let key = hex::encode(
                Sha256::new()
                    .chain_update(anchor.subject().as_raw())
                    .chain_update(anchor.public_key().raw)
                    .finalize(),
            );
            found[at] = Some(IssuerCrl {
                subject: anchor.subject().to_string(),
                key,
                number,
                next_update,
                revoked,
            });
        }
        let mut by_subject: HashMap<Vec<u8>, Vec<IssuerCrl>> = HashMap::new();
        for (anchor, crl) in anchors.iter().zip(found) {
            let crl = crl.ok_or_else(|| CrlProblem::NoCrlFor {
                anchor: anchor.subject().to_string(),
            })?;
            by_subject
                .entry(anchor.subject().as_raw().to_vec())
                .or_default()
                .push(crl);
        }
        Ok(Self {
            by_subject,
            revoked_hex,
        })
    }

    /// Whether the leaf (already verified as issued directly by a trust anchor) may be
    /// admitted at `now`. Unknown revocation status is a refusal.
    pub fn check(&self, leaf: &[u8], now: UnixTime) -> Result<(), CertificateError> {
        let (issuer, serial) = issuer_and_serial(leaf).ok_or(CertificateError::BadEncoding)?;
        let crls = self
            .by_subject
            .get(issuer)
            .ok_or(CertificateError::UnknownRevocationStatus)?;
        let serial = magnitude(serial);
        // Two anchors may share a subject; the leaf is refused if any of their CRLs is stale
        // or lists it (fail closed).
        for crl in crls {
            if now.as_secs() >= crl.next_update {
                return Err(CertificateError::ExpiredRevocationListContext {
                    time: now,
                    next_update: UnixTime::since_unix_epoch(Duration::from_secs(crl.next_update)),
                });
            }
            if crl.revoked.contains(serial) {
                return Err(CertificateError::Revoked);
            }
        }
        Ok(())
    }

    /// The first CRL that is stale at `now`: its issuer and nextUpdate.
    pub fn stale_at(&self, now: SystemTime) -> Option<(String, SystemTime)> {
        let now = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.by_subject
            .values()
            .flatten()
            .find(|crl| now >= crl.next_update)
            .map(|crl| {
                (
                    crl.subject.clone(),
                    SystemTime::UNIX_EPOCH + Duration::from_secs(crl.next_update),
                )
            })
    }

    /// The earliest nextUpdate of the verified CRLs: when the first goes stale.
    pub fn earliest_next_update(&self) -> Option<SystemTime> {
        self.crls()
            .map(|crl| crl.next_update)
            .min()
            .map(|secs| SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
    }

    /// Serials (lowercase hex of the raw serial) the verified CRLs revoke.
    pub fn revoked_serials(&self) -> &HashSet<String> {
        &self.revoked_hex
    }

    fn crls(&self) -> impl Iterator<Item = &IssuerCrl> {
        self.by_subject.values().flatten()
    }
}

/// CRL extensions whose meaning is fully handled: CRL number (2.5.29.20), authority key
/// identifier (2.5.29.35), and the entry extensions reason code (2.5.29.21) and
/// invalidity date (2.5.29.24). They are rarely critical, but harmless if so.
fn known_crl_extension(oid: &str) -> bool {
    matches!(oid, "2.5.29.20" | "2.5.29.35" | "2.5.29.21" | "2.5.29.24")
}

/// One DER element: (full element, contents, rest). Only what a certificate webpki already
/// parsed needs: low tag numbers and definite lengths up to 4 bytes.
fn der_element(input: &[u8], tag: u8) -> Option<(&[u8], &[u8], &[u8])> {
    let (&t, rest) = input.split_first()?;
    if t != tag {
        return None;
    }
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = match first {
        0..=0x7f => (usize::from(first), rest),
        0x81..=0x84 => {
            let n = usize::from(first & 0x7f);
            if rest.len() < n {
                return None;
            }
            let len = rest[..n]
                .iter()
                .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
            (len, &rest[n..])
        }
        _ => return None,
    };
    if rest.len() < len {
        return None;
    }
    let header = input.len() - rest.len();
    Some((&input[..header + len], &rest[..len], &rest[len..]))
}

/// The issuer Name (whole DER element, as anchors' subjects are compared) and the raw serial
/// of a certificate, without parsing the rest of it: the handshake's only extra work.
pub fn issuer_and_serial(cert: &[u8]) -> Option<(&[u8], &[u8])> {
    let (_, certificate, _) = der_element(cert, 0x30)?;
    let (_, tbs, _) = der_element(certificate, 0x30)?;
    let tbs = match der_element(tbs, 0xa0) {
        Some((_, _, rest)) => rest,
        None => tbs,
    };
    let (_, serial, rest) = der_element(tbs, 0x02)?;
    let (_, _, rest) = der_element(rest, 0x30)?;
    let (issuer, _, _) = der_element(rest, 0x30)?;
    Some((issuer, serial))
}

/// Why a client certificate that chains only through an intermediate is refused; it rides
/// in `CertificateError::Other` and is logged as `svid_not_direct`.
#[derive(Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the client certificate is issued by an intermediate CA, not directly by a CA in the trust bundle; Eastwall's CA signs leaves only")]
pub struct NotIssuedByAnchor;

// rustls prints `CertificateError::Other` with Debug, and that text is the log line's detail.
impl std::fmt::Debug for NotIssuedByAnchor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

/// The client verifier: webpki's chain checks (built without CRLs) limited to leaf -> anchor
/// paths, then a lookup in the revocation state verified at load.
#[derive(Debug)]
pub struct SvidVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    revocation: Option<Arc<Revocation>>,
    /// Leaves that passed `inner` against these anchors (see verified_leaves).
    verified: VerifiedLeaves,
}

impl SvidVerifier {
    pub fn new(
        roots: Arc<RootCertStore>,
        revocation: Option<Arc<Revocation>>,
    ) -> Result<Self, rustls::server::VerifierBuilderError> {
        Ok(Self {
            inner: WebPkiClientVerifier::builder(roots).build()?,
            revocation,
            verified: VerifiedLeaves::default(),
        })
    }
}

tokio::task_local! {
    /// The leaf a client presented when the verifier refused it, for the refusal's log
    /// line; set only on that path, so an accepted handshake pays nothing.
    static REFUSED_LEAF: std::cell::RefCell<Option<Vec<u8>>>;
}

/// Runs a TLS accept and hands back, with its result, the leaf certificate the verifier
/// refused (if it refused one): what the client claimed, unverified.
pub async fn accept_noting_refused_leaf<F: std::future::Future>(
    accept: F,
) -> (F::Output, Option<Vec<u8>>) {
    REFUSED_LEAF
        .scope(std::cell::RefCell::new(None), async {
            let out = accept.await;
            let leaf = REFUSED_LEAF.with(|l| l.borrow_mut().take());
            (out, leaf)
        })
        .await
}

impl SvidVerifier {
    fn verify_inner(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, RustlsError> {
        // A leaf these anchors verified before, still inside its window, needs no second
        // signature check; revocation below runs every time.
        if !self.verified.holds(end_entity, now) {
            // No intermediates: webpki ignores a trust anchor's pathlen, so the only way to
            // hold "the CA signs leaves only" is to let no path be longer than leaf -> anchor.
            // Clients that send the root along with their leaf (ours do) are unaffected.
            match self.inner.verify_client_cert(end_entity, &[], now) {
                Ok(_) => self.verified.remember(end_entity),
                Err(RustlsError::InvalidCertificate(CertificateError::UnknownIssuer))
                    if !intermediates.is_empty()
                        && self
                            .inner
                            .verify_client_cert(end_entity, intermediates, now)
                            .is_ok() =>
                {
                    return Err(RustlsError::InvalidCertificate(CertificateError::Other(
                        rustls::OtherError(Arc::new(NotIssuedByAnchor)),
                    )));
                }
                Err(err) => return Err(err),
            }
        }
        if let Some(revocation) = &self.revocation {
            revocation
                .check(end_entity, now)
                .map_err(RustlsError::InvalidCertificate)?;
        }
        Ok(ClientCertVerified::assertion())
    }
}

impl ClientCertVerifier for SvidVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, RustlsError> {
        let verdict = self.verify_inner(end_entity, intermediates, now);
        if verdict.is_err() {
            // Bounded: a certificate is at most a TLS record's worth of bytes.
            let _ = REFUSED_LEAF.try_with(|l| *l.borrow_mut() = Some(end_entity.to_vec()));
        }
        verdict
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, RustlsError> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, RustlsError> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// A built server config and the revocation state its verifier consults.
struct Built {
    config: Arc<ServerConfig>,
    revocation: Option<Arc<Revocation>>,
    verifier: Arc<SvidVerifier>,
}

/// Builds the client-facing config: TLS 1.3 and 1.2, a client certificate is mandatory and
/// must be issued directly by a CA in the trust bundle and not be revoked.
fn build(files: &ServerTlsFiles) -> Result<Built, TlsError> {
    let anchors = load_certs(&files.client_ca, "CA certificates")?;
    let roots = Arc::new(roots_from(&files.client_ca, &anchors)?);
    let revocation = match &files.crl {
        Some(path) => Some(Arc::new(Revocation::load(path, &anchors).map_err(
            |problem| TlsError::Crl {
                path: path.clone(),
                problem,
            },
        )?)),
        None => None,
    };
    let verifier = Arc::new(
        SvidVerifier::new(roots, revocation.clone()).map_err(|source| TlsError::Verifier {
            path: files.client_ca.clone(),
            source,
        })?,
    );
    let certs = load_certs(&files.cert, "server certificates")?;
    let key = load_key(&files.key)?;
    let mut config = ServerConfig::builder()
        .with_client_cert_verifier(verifier.clone())
        .with_single_cert(certs, key)
        .map_err(|source| TlsError::Config {
            path: files.cert.clone(),
            source,
        })?;
    // Resumption would restore a client certificate without re-checking expiry or the CRL
    // (protocol-security item 39): every connection does a full handshake.
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    config.max_early_data_size = 0;
    config.alpn_protocols = vec![ALPN_POSTGRESQL.to_vec()];
    Ok(Built {
        config: Arc::new(config),
        revocation,
        verifier,
    })
}

/// The verifier client handshakes use, built from the trust bundle and CRL files alone:
/// what the CLI checks a signer's certificate with (`eastwall fleet push`, `audit --fleet`).
pub fn svid_verifier(
    client_ca: &Path,
    crl: Option<&Path>,
) -> Result<Arc<dyn ClientCertVerifier>, TlsError> {
    let anchors = load_certs(client_ca, "CA certificates")?;
    let roots = Arc::new(roots_from(client_ca, &anchors)?);
    let revocation = match crl {
        Some(path) => Some(Arc::new(Revocation::load(path, &anchors).map_err(
            |problem| TlsError::Crl {
                path: path.to_owned(),
                problem,
            },
        )?)),
        None => None,
    };
    let verifier = SvidVerifier::new(roots, revocation).map_err(|source| TlsError::Verifier {
        path: client_ca.to_owned(),
        source,
    })?;
    Ok(Arc::new(verifier))
}

/// The highest CRL number seen per trust-anchor key, persisted so that a restart cannot be
/// fed an older CRL. Written atomically (temporary file, fsync, rename, fsync the folder).
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct CrlNumbers {
    /// Anchor key (see `IssuerCrl::key`) -> what was seen.
    issuers: BTreeMap<String, SeenCrl>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct SeenCrl {
    /// The anchor's subject, for a human reading the file.
    subject: String,
    /// Decimal, as CRL numbers can be 20 bytes long.
    crl_number: String,
}

impl CrlNumbers {
    fn load(path: &Path) -> Result<Self, TlsError> {
        let problem = |problem: String| TlsError::CrlState {
            path: path.to_owned(),
            problem,
        };
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(err) => return Err(problem(format!("cannot be read: {err}"))),
        };
        let numbers: Self = serde_json::from_str(&text).map_err(|e| {
            problem(format!(
                "is not valid (delete it only if you trust the current CRL file): {e}"
            ))
        })?;
        for seen in numbers.issuers.values() {
            seen.number()
                .map_err(|e| problem(format!("bad crl_number {:?}: {e}", seen.crl_number)))?;
        }
        Ok(numbers)
    }

    /// The new marks if every CRL in `revocation` is at least as new as what was seen.
    fn advance(&self, revocation: &Revocation, state: &Path) -> Result<Self, CrlProblem> {
        let mut next = self.clone();
        for crl in revocation.crls() {
            if let Some(seen) = self.issuers.get(&crl.key) {
                let seen_number = seen.number().unwrap_or_default();
                if crl.number < seen_number {
                    return Err(CrlProblem::Rollback {
                        issuer: crl.subject.clone(),
                        number: crl.number.to_string(),
                        seen: seen_number.to_string(),
                        state: state.display().to_string(),
                    });
                }
            }
            next.issuers.insert(
                crl.key.clone(),
                SeenCrl {
                    subject: crl.subject.clone(),
                    crl_number: crl.number.to_string(),
                },
            );
        }
        Ok(next)
    }

    fn save(&self, path: &Path) -> Result<(), TlsError> {
        use std::io::Write;
        let problem = |what: &str, err: std::io::Error| TlsError::CrlState {
            path: path.to_owned(),
            problem: format!("cannot {what}: {err}"),
        };
        let dir = match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        };
        let mut text = serde_json::to_string_pretty(self).unwrap_or_default();
        text.push('\n');
        let mut tmp = tempfile::NamedTempFile::new_in(dir)
            .map_err(|e| problem("create a temporary file beside it", e))?;
        tmp.write_all(text.as_bytes())
            .and_then(|()| tmp.as_file().sync_all())
            .map_err(|e| problem("write it", e))?;
        tmp.persist(path)
            .map_err(|e| problem("rename it into place", e.error))?;
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| problem("sync its folder", e))
    }
}

impl SeenCrl {
    fn number(&self) -> Result<BigUint, String> {
        self.crl_number
            .parse::<BigUint>()
            .map_err(|e| e.to_string())
    }
}

/// What handshakes use now.
struct Current {
    fingerprint: Vec<Option<SystemTime>>,
    config: Arc<ServerConfig>,
    revocation: Option<Arc<Revocation>>,
    verifier: Arc<SvidVerifier>,
}

/// A server config that is rebuilt when its files change, so a new CRL takes effect on the
/// next handshake without a restart. A broken new file keeps the last good config in force;
/// the caller reports the error (and [`ReloadingServerConfig::reload_failures`] counts it).
pub struct ReloadingServerConfig {
    files: ServerTlsFiles,
    current: RwLock<Current>,
    /// Serialises reloads, so two never race on the CRL state file.
    reloading: Mutex<()>,
    failures: AtomicU64,
}

impl ReloadingServerConfig {
    /// Loads every file now; a bad CRL, one older than the state file remembers, or one
    /// already past its nextUpdate is a start error.
    pub fn new(files: ServerTlsFiles) -> Result<Self, TlsError> {
        Self::new_at(files, SystemTime::now())
    }

    fn new_at(files: ServerTlsFiles, now: SystemTime) -> Result<Self, TlsError> {
        let fingerprint = files.fingerprint();
        let built = build(&files)?;
        if let (Some(path), Some(revocation)) = (&files.crl, &built.revocation) {
            if let Some((issuer, at)) = revocation.stale_at(now) {
                return Err(TlsError::Crl {
                    path: path.clone(),
                    problem: CrlProblem::Expired {
                        issuer,
                        next_update: humantime::format_rfc3339_seconds(at).to_string(),
                    },
                });
            }
            Self::advance(&files, path, revocation)?;
        }
        Ok(Self {
            files,
            current: RwLock::new(Current {
                fingerprint,
                config: built.config,
                revocation: built.revocation,
                verifier: built.verifier,
            }),
            reloading: Mutex::new(()),
            failures: AtomicU64::new(0),
        })
    }

    /// Checks `revocation` against the state file and records its numbers there.
    fn advance(
        files: &ServerTlsFiles,
        crl: &Path,
        revocation: &Revocation,
    ) -> Result<(), TlsError> {
        // Read again on every load: the file is the authority, not our memory of it.
        let seen = CrlNumbers::load(&files.crl_state)?;
        let next = seen
            .advance(revocation, &files.crl_state)
            .map_err(|problem| TlsError::Crl {
                path: crl.to_owned(),
                problem,
            })?;
        if next != seen {
            next.save(&files.crl_state)?;
        }
        Ok(())
    }

    /// The files the config is built from.
    pub fn files(&self) -> &ServerTlsFiles {
        &self.files
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Current> {
        self.current.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The config for the next handshake.
    pub fn get(&self) -> Arc<ServerConfig> {
        self.read().config.clone()
    }

    /// The client-certificate verifier in force (chain and CRL): what fleet signatures
    /// are checked with, so a revoked admin's push is refused like their connection.
    pub fn client_verifier(&self) -> Arc<dyn ClientCertVerifier> {
        self.read().verifier.clone()
    }

    /// Serials (lowercase hex) the CRLs in force revoke; empty without a CRL.
    pub fn revoked_serials(&self) -> HashSet<String> {
        self.read()
            .revocation
            .as_ref()
            .map(|r| r.revoked_serials().clone())
            .unwrap_or_default()
    }

    /// The earliest nextUpdate of the CRLs in force; None without a CRL.
    pub fn crl_next_update(&self) -> Option<SystemTime> {
        self.read()
            .revocation
            .as_ref()
            .and_then(|r| r.earliest_next_update())
    }

    /// How many reloads have failed since start (each kept the previous files in force).
    pub fn reload_failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    /// Rebuilds the config if a file changed; returns the error of a failed rebuild, after
    /// which the last good config stays in force.
    pub fn refresh(&self) -> Result<bool, TlsError> {
        let _reloading = self.reloading.lock().unwrap_or_else(|p| p.into_inner());
        let fingerprint = self.files.fingerprint();
        if self.read().fingerprint == fingerprint {
            return Ok(false);
        }
        let result = build(&self.files).and_then(|built| {
            if let (Some(path), Some(revocation)) = (&self.files.crl, &built.revocation) {
                Self::advance(&self.files, path, revocation)?;
            }
            Ok(built)
        });
        let mut current = self.current.write().unwrap_or_else(|p| p.into_inner());
        // Remember the fingerprint even on failure, so a broken file is reported once.
        current.fingerprint = fingerprint;
        match result {
            Ok(built) => {
                current.config = built.config;
                current.revocation = built.revocation;
                current.verifier = built.verifier;
                Ok(true)
            }
            Err(err) => {
                self.failures.fetch_add(1, Ordering::Relaxed);
                Err(err)
            }
        }
    }
}

/// Builds the config the proxy uses to reach PostgreSQL: the server must chain to `ca`
/// (verify-full semantics), and `identity` is the client certificate for `cert` login.
pub fn upstream_client_config(
    ca: &Path,
    identity: Option<(&Path, &Path)>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let roots = load_roots(ca)?;
    let builder = ClientConfig::builder().with_root_certificates(roots);
    let config = match identity {
        Some((cert, key)) => builder
            .with_client_auth_cert(load_certs(cert, "client certificates")?, load_key(key)?)
            .map_err(|source| TlsError::Config {
                path: cert.to_owned(),
                source,
            })?,
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{
        BasicConstraints, CertificateParams, CertificateRevocationListParams, DnType, IsCa, Issuer,
        KeyIdMethod, KeyPair, KeyUsagePurpose, RevokedCertParams, SerialNumber,
    };
    use time::OffsetDateTime;

    /// A root CA made with rcgen: its certificate and what it needs to sign.
    struct Root {
        params: CertificateParams,
        key: KeyPair,
        der: CertificateDer<'static>,
        pem: String,
    }

    fn root(cn: &str) -> Root {
        let mut params = CertificateParams::new(Vec::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.key_identifier_method = KeyIdMethod::Sha256;
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        Root {
            der: cert.der().clone(),
            pem: cert.pem(),
            params,
            key,
        }
    }

    impl Root {
        fn issuer(&self) -> Issuer<'_, &KeyPair> {
            Issuer::from_params(&self.params, &self.key)
        }

        /// A client leaf with `serial`.
        fn leaf(&self, serial: &[u8]) -> CertificateDer<'static> {
            let mut params = CertificateParams::new(vec!["client.example".to_owned()]).unwrap();
            params.serial_number = Some(SerialNumber::from_slice(serial));
            params.is_ca = IsCa::ExplicitNoCa;
            params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
            let key = KeyPair::generate().unwrap();
            params
                .signed_by(&key, &self.issuer())
                .unwrap()
                .der()
                .clone()
        }

        fn crl(&self, number: u64, revoked: &[&[u8]], next_update: OffsetDateTime) -> String {
            let params = CertificateRevocationListParams {
                this_update: next_update - time::Duration::days(8),
                next_update,
                crl_number: SerialNumber::from(number),
                issuing_distribution_point: None,
                revoked_certs: revoked
                    .iter()
                    .map(|s| RevokedCertParams {
                        serial_number: SerialNumber::from_slice(s),
                        revocation_time: next_update - time::Duration::days(8),
                        reason_code: None,
                        invalidity_date: None,
                    })
                    .collect(),
                key_identifier_method: KeyIdMethod::Sha256,
            };
            params.signed_by(&self.issuer()).unwrap().pem().unwrap()
        }
    }

    fn week() -> OffsetDateTime {
        OffsetDateTime::now_utc() + time::Duration::days(7)
    }

    fn now() -> UnixTime {
        UnixTime::now()
    }

    fn load(
        dir: &Path,
        text: &str,
        anchors: &[CertificateDer<'_>],
    ) -> Result<Revocation, CrlProblem> {
        let path = dir.join("crl.pem");
        std::fs::write(&path, text).unwrap();
        Revocation::load(&path, anchors)
    }

    #[test]
    fn issuer_and_serial_read_what_x509_parser_reads() {
        use x509_parser::prelude::{FromDer, X509Certificate};
        let ca = root("Test CA");
        for serial in [&[0x01][..], &[0x00, 0x80, 0x11], &[0x7f; 20]] {
            let leaf = ca.leaf(serial);
            let (_, parsed) = X509Certificate::from_der(&leaf).unwrap();
            let (issuer, raw) = issuer_and_serial(&leaf).unwrap();
            assert_eq!(issuer, parsed.issuer().as_raw());
            assert_eq!(raw, parsed.raw_serial());
        }
        assert!(issuer_and_serial(b"").is_none());
        assert!(issuer_and_serial(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]).is_none());
        let leaf = ca.leaf(&[1]);
        for cut in 0..leaf.len() {
            // Never a panic on a truncated certificate.
            let _ = issuer_and_serial(&leaf[..cut]);
        }
    }

    #[test]
    fn a_file_without_a_crl_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let ca = root("Test CA");
        let anchors = [ca.der.clone()];
        assert_eq!(
            load(dir.path(), "", &anchors).unwrap_err(),
            CrlProblem::NoCrl
        );
        assert_eq!(
            load(dir.path(), &ca.pem, &anchors).unwrap_err(),
            CrlProblem::NoCrl
        );
        let err = Revocation::load(&dir.path().join("missing.pem"), &anchors).unwrap_err();
        assert!(matches!(err, CrlProblem::Unreadable(_)), "{err:?}");
    }

    #[test]
    fn every_anchor_needs_its_own_signed_crl_exactly_once() {
        let dir = tempfile::tempdir().unwrap();
        let a = root("CA A");
        let b = root("CA B");
        let both = [a.der.clone(), b.der.clone()];
        let err = load(dir.path(), &a.crl(1, &[], week()), &both).unwrap_err();
        assert_eq!(err.reason(), "crl_missing");
        assert!(err.to_string().contains("CA B"), "{err}");

        let err = load(
            dir.path(),
            &b.crl(1, &[], week()),
            std::slice::from_ref(&a.der),
        )
        .unwrap_err();
        assert_eq!(err.reason(), "crl_untrusted");
        assert!(matches!(err, CrlProblem::UnknownIssuer { .. }));

        // Same name as A, another key: a forged CRL.
        let forger = root("CA A");
        let err = load(
            dir.path(),
            &forger.crl(9, &[], week()),
            std::slice::from_ref(&a.der),
        )
        .unwrap_err();
        assert!(matches!(err, CrlProblem::BadSignature { .. }), "{err:?}");

        let twice = format!("{}{}", a.crl(1, &[], week()), a.crl(2, &[], week()));
        let err = load(dir.path(), &twice, std::slice::from_ref(&a.der)).unwrap_err();
        assert!(matches!(err, CrlProblem::Duplicate { .. }), "{err:?}");

        let text = format!("{}{}", a.crl(1, &[], week()), b.crl(1, &[], week()));
        assert!(load(dir.path(), &text, &both).is_ok());
    }

    #[test]
    fn the_handshake_check_refuses_revoked_stale_and_unknown() {
        let dir = tempfile::tempdir().unwrap();
        let ca = root("Test CA");
        let other = root("Other CA");
        let next = week();
        let rev = load(
            dir.path(),
            &ca.crl(3, &[&[0x42], &[0x00, 0x99]], next),
            std::slice::from_ref(&ca.der),
        )
        .unwrap();
        assert_eq!(rev.check(&ca.leaf(&[0x43]), now()), Ok(()));
        assert_eq!(
            rev.check(&ca.leaf(&[0x42]), now()),
            Err(CertificateError::Revoked)
        );
        assert_eq!(
            rev.check(&ca.leaf(&[0x00, 0x99]), now()),
            Err(CertificateError::Revoked)
        );
        assert_eq!(
            rev.check(&other.leaf(&[0x43]), now()),
            Err(CertificateError::UnknownRevocationStatus)
        );
        assert_eq!(
            rev.check(b"junk", now()),
            Err(CertificateError::BadEncoding)
        );
        let after = UnixTime::since_unix_epoch(Duration::from_secs(next.unix_timestamp() as u64));
        assert!(matches!(
            rev.check(&ca.leaf(&[0x43]), after),
            Err(CertificateError::ExpiredRevocationListContext { .. })
        ));
        assert!(rev.stale_at(SystemTime::now()).is_none());
        assert!(rev
            .stale_at(SystemTime::now() + Duration::from_secs(8 * 86400))
            .is_some());
        assert!(rev.revoked_serials().contains("42"));
    }

    #[test]
    fn crl_numbers_only_go_up_and_survive_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join(CRL_STATE_FILE);
        let ca = root("Test CA");
        let anchors = [ca.der.clone()];
        let five = load(dir.path(), &ca.crl(5, &[], week()), &anchors).unwrap();
        let seen = CrlNumbers::load(&state).unwrap();
        assert_eq!(seen, CrlNumbers::default());
        let next = seen.advance(&five, &state).unwrap();
        next.save(&state).unwrap();
        let reread = CrlNumbers::load(&state).unwrap();
        assert_eq!(reread, next);
        // The same CRL again (a restart) is fine; an older one is not.
        assert!(reread.advance(&five, &state).is_ok());
        let four = load(dir.path(), &ca.crl(4, &[], week()), &anchors).unwrap();
        let err = reread.advance(&four, &state).unwrap_err();
        assert_eq!(err.reason(), "crl_rollback");
        assert!(err.to_string().contains("lower than 5"), "{err}");

        std::fs::write(&state, "{ not json").unwrap();
        let err = CrlNumbers::load(&state).unwrap_err();
        assert!(err.to_string().contains(CRL_STATE_FILE), "{err}");
    }

    /// A layout for the reloading config: server cert, trust bundle, CRL, state file.
    fn layout(dir: &Path, ca: &Root, crl: &str) -> ServerTlsFiles {
        let mut params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        params.is_ca = IsCa::ExplicitNoCa;
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &ca.issuer()).unwrap();
        let files = ServerTlsFiles {
            cert: dir.join("server.pem"),
            key: dir.join("server.key"),
            client_ca: dir.join("ca.pem"),
            crl: Some(dir.join("crl.pem")),
            crl_state: dir.join(CRL_STATE_FILE),
        };
        std::fs::write(&files.cert, cert.pem()).unwrap();
        std::fs::write(&files.key, key.serialize_pem()).unwrap();
        std::fs::write(&files.client_ca, &ca.pem).unwrap();
        std::fs::write(files.crl.as_ref().unwrap(), crl).unwrap();
        files
    }

    /// Rewrites the CRL with a later mtime, so the reload notices it.
    fn replace_crl(files: &ServerTlsFiles, text: &str) {
        let path = files.crl.as_ref().unwrap();
        std::fs::write(path, text).unwrap();
        let later = SystemTime::now() + Duration::from_secs(60);
        std::fs::File::options()
            .write(true)
            .open(path)
            .unwrap()
            .set_modified(later)
            .unwrap();
    }

    #[test]
    fn a_bad_reload_keeps_the_last_good_state_and_is_counted() {
        let dir = tempfile::tempdir().unwrap();
        let ca = root("Test CA");
        let files = layout(dir.path(), &ca, &ca.crl(2, &[&[0x42]], week()));
        let tls = ReloadingServerConfig::new(files.clone()).unwrap();
        let first = tls.get();
        assert!(tls.revoked_serials().contains("42"));

        for bad in [String::new(), ca.pem.clone(), ca.crl(1, &[], week())] {
            replace_crl(&files, &bad);
            let err = tls.refresh().unwrap_err();
            assert!(err.is_crl(), "{err}");
            assert!(Arc::ptr_eq(&first, &tls.get()), "the old config stays");
            assert!(tls.revoked_serials().contains("42"));
        }
        assert_eq!(tls.reload_failures(), 3);

        replace_crl(&files, &ca.crl(3, &[&[0x42], &[0x43]], week()));
        assert!(tls.refresh().unwrap());
        assert!(!Arc::ptr_eq(&first, &tls.get()));
        assert!(tls.revoked_serials().contains("43"));
        assert!(!tls.refresh().unwrap(), "unchanged files are not rebuilt");

        // A restart remembers number 3.
        replace_crl(&files, &ca.crl(2, &[&[0x42]], week()));
        let err = ReloadingServerConfig::new(files.clone()).err().unwrap();
        assert_eq!(err.reason(), "crl_rollback");
    }

    #[test]
    fn a_stale_crl_is_a_start_error() {
        let dir = tempfile::tempdir().unwrap();
        let ca = root("Test CA");
        let past = OffsetDateTime::now_utc() - time::Duration::days(1);
        let files = layout(dir.path(), &ca, &ca.crl(2, &[], past));
        let err = ReloadingServerConfig::new(files).err().unwrap();
        assert_eq!(err.reason(), "crl_expired");
        assert!(err.to_string().contains("nextUpdate"), "{err}");
    }

    /// The attack on the verified-leaf cache: a leaf verified once is presented again after
    /// it was revoked, after it expired, and by a verifier built for other anchors.
    #[test]
    fn a_leaf_verified_before_is_still_checked_for_revocation_expiry_and_anchors() {
        let dir = tempfile::tempdir().unwrap();
        let ca = root("Test CA");
        let mut roots = RootCertStore::empty();
        roots.add(ca.der.clone()).unwrap();
        let revocation = Arc::new(
            load(
                dir.path(),
                &ca.crl(1, &[&[9]], week()),
                std::slice::from_ref(&ca.der),
            )
            .unwrap(),
        );
        let verifier = SvidVerifier::new(Arc::new(roots), Some(revocation)).unwrap();
        let good = ca.leaf(&[7]);
        let revoked = ca.leaf(&[9]);
        for _ in 0..2 {
            verifier.verify_client_cert(&good, &[], now()).unwrap();
            assert_eq!(
                verifier
                    .verify_client_cert(&revoked, &[], now())
                    .unwrap_err(),
                RustlsError::InvalidCertificate(CertificateError::Revoked)
            );
        }
        assert!(verifier.verified.holds(&good, now()));
        // rcgen's leaves are valid until 4096: well past it, the full check refuses it.
        let later = UnixTime::since_unix_epoch(Duration::from_secs(4_200_000_000 * 32));
        assert!(matches!(
            verifier.verify_client_cert(&good, &[], later).unwrap_err(),
            RustlsError::InvalidCertificate(
                CertificateError::Expired | CertificateError::ExpiredContext { .. }
            )
        ));
        // Another bundle, another verifier: nothing it did not verify itself passes.
        let other = root("Other CA");
        let mut roots = RootCertStore::empty();
        roots.add(other.der.clone()).unwrap();
        let stranger = SvidVerifier::new(Arc::new(roots), None).unwrap();
        assert_eq!(
            stranger.verify_client_cert(&good, &[], now()).unwrap_err(),
            RustlsError::InvalidCertificate(CertificateError::UnknownIssuer)
        );
    }

    #[test]
    fn only_leaves_issued_by_an_anchor_pass_the_verifier() {
        let ca = root("Test CA");
        let mut roots = RootCertStore::empty();
        roots.add(ca.der.clone()).unwrap();
        let verifier = SvidVerifier::new(Arc::new(roots), None).unwrap();
        assert!(verifier.client_auth_mandatory());
        assert_eq!(verifier.root_hint_subjects().len(), 1);

        let direct = ca.leaf(&[7]);
        // A client that also sends the root is fine.
        verifier
            .verify_client_cert(&direct, std::slice::from_ref(&ca.der), now())
            .unwrap();

        let mut sub = CertificateParams::new(Vec::new()).unwrap();
        sub.distinguished_name.push(DnType::CommonName, "Sub CA");
        sub.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        sub.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        let sub_key = KeyPair::generate().unwrap();
        let sub_cert = sub.signed_by(&sub_key, &ca.issuer()).unwrap();
        let sub_root = Root {
            der: sub_cert.der().clone(),
            pem: sub_cert.pem(),
            params: sub,
            key: sub_key,
        };
        let leaf = sub_root.leaf(&[8]);
        let err = verifier
            .verify_client_cert(&leaf, std::slice::from_ref(&sub_root.der), now())
            .unwrap_err();
        let RustlsError::InvalidCertificate(CertificateError::Other(other)) = err else {
            panic!("{err:?}");
        };
        assert!(other.0.downcast_ref::<NotIssuedByAnchor>().is_some());
        // Without the intermediate it is simply untrusted.
        assert_eq!(
            verifier.verify_client_cert(&leaf, &[], now()).unwrap_err(),
            RustlsError::InvalidCertificate(CertificateError::UnknownIssuer)
        );
    }
}

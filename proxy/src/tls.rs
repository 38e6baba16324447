//! TLS for both legs: the client-facing server config (mandatory client certificates checked
//! against our trust bundle and CRL) and the client config the proxy uses toward PostgreSQL.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use rustls::server::{NoServerSessionStorage, WebPkiClientVerifier};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};

/// ALPN protocol name PostgreSQL 17+ clients send, required for direct TLS.
pub const ALPN_POSTGRESQL: &[u8] = b"postgresql";

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
    #[error("invalid client trust bundle or CRL ({path}): {source}")]
    Verifier {
        path: PathBuf,
        source: rustls::server::VerifierBuilderError,
    },
    #[error("invalid certificate or key ({path}): {source}")]
    Config {
        path: PathBuf,
        source: rustls::Error,
    },
}

/// Every file that a server config is built from, so it can be rebuilt when one changes.
#[derive(Debug, Clone)]
pub struct ServerTlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: PathBuf,
    pub crl: Option<PathBuf>,
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

fn load_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(path, "CA certificates")? {
        roots.add(cert).map_err(|source| TlsError::Config {
            path: path.to_owned(),
            source,
        })?;
    }
    Ok(roots)
}

/// Builds the client-facing config: TLS 1.3 and 1.2, a client certificate is mandatory and
/// must chain to the trust bundle and not be revoked.
pub fn server_config(files: &ServerTlsFiles) -> Result<Arc<ServerConfig>, TlsError> {
    let roots = Arc::new(load_roots(&files.client_ca)?);
    let mut verifier = WebPkiClientVerifier::builder(roots);
    if let Some(crl_path) = &files.crl {
        let crls = CertificateRevocationListDer::pem_file_iter(crl_path)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(|source| TlsError::Read {
                what: "a CRL",
                path: crl_path.clone(),
                source,
            })?;
        // Our CA revokes leaves only; its own certificate is the trust anchor. A CRL past its
        // nextUpdate is refused so that a stale CRL cannot quietly readmit a revoked cert.
        verifier = verifier
            .with_crls(crls)
            .only_check_end_entity_revocation()
            .enforce_revocation_expiration();
    }
    let verifier = verifier.build().map_err(|source| TlsError::Verifier {
        path: files.crl.clone().unwrap_or_else(|| files.client_ca.clone()),
        source,
    })?;
    let certs = load_certs(&files.cert, "server certificates")?;
    let key = load_key(&files.key)?;
    let mut config = ServerConfig::builder()
        .with_client_cert_verifier(verifier)
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
    Ok(Arc::new(config))
}

/// A server config that is rebuilt when its files change, so a new CRL takes effect on the
/// next handshake without a restart. A broken new file keeps the old config in force.
pub struct ReloadingServerConfig {
    files: ServerTlsFiles,
    current: RwLock<(Vec<Option<SystemTime>>, Arc<ServerConfig>)>,
}

impl ReloadingServerConfig {
    pub fn new(files: ServerTlsFiles) -> Result<Self, TlsError> {
        let fingerprint = files.fingerprint();
        let config = server_config(&files)?;
        Ok(Self {
            files,
            current: RwLock::new((fingerprint, config)),
        })
    }

    /// The files the config is built from.
    pub fn files(&self) -> &ServerTlsFiles {
        &self.files
    }

    /// The config for the next handshake.
    pub fn get(&self) -> Arc<ServerConfig> {
        match self.current.read() {
            Ok(guard) => guard.1.clone(),
            Err(poisoned) => poisoned.into_inner().1.clone(),
        }
    }

    /// Rebuilds the config if a file changed; returns the error of a failed rebuild.
    pub fn refresh(&self) -> Result<bool, TlsError> {
        let fingerprint = self.files.fingerprint();
        let unchanged = match self.current.read() {
            Ok(guard) => guard.0 == fingerprint,
            Err(poisoned) => poisoned.into_inner().0 == fingerprint,
        };
        if unchanged {
            return Ok(false);
        }
        let config = server_config(&self.files);
        let mut guard = match self.current.write() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        // Remember the fingerprint even on failure, so a broken file is reported once.
        guard.0 = fingerprint;
        guard.1 = config?;
        Ok(true)
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

/// The serials (lowercase hex of the raw serial, as the identity module writes them) that the
/// configured CRLs revoke, counting only CRLs whose signature verifies with a CA in the
/// client trust bundle: a forged CRL file must not be able to end sessions.
pub fn revoked_serials(files: &ServerTlsFiles) -> Result<HashSet<String>, TlsError> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    use x509_parser::revocation_list::CertificateRevocationList;

    let mut serials = HashSet::new();
    let Some(crl_path) = &files.crl else {
        return Ok(serials);
    };
    let cas = load_certs(&files.client_ca, "CA certificates")?;
    let crls = CertificateRevocationListDer::pem_file_iter(crl_path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|source| TlsError::Read {
            what: "a CRL",
            path: crl_path.clone(),
            source,
        })?;
    for der in &crls {
        let Ok((_, crl)) = CertificateRevocationList::from_der(der) else {
            tracing::error!(path = %crl_path.display(), "a CRL cannot be parsed; ignored for live sessions");
            continue;
        };
        let verified = cas.iter().any(|ca| {
            X509Certificate::from_der(ca).is_ok_and(|(_, ca)| {
                ca.subject() == crl.issuer() && crl.verify_signature(ca.public_key()).is_ok()
            })
        });
        if !verified {
            tracing::error!(path = %crl_path.display(), "a CRL is not signed by a trusted CA; ignored for live sessions");
            continue;
        }
        serials.extend(
            crl.iter_revoked_certificates()
                .map(|revoked| hex::encode(revoked.raw_serial())),
        );
    }
    Ok(serials)
}

//! Connection strings and mTLS: libpq-style `key=value` strings whose `ssl*` file keys
//! (which tokio-postgres ignores) become a rustls client config with our client certificate.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio_postgres::config::SslMode;
use tokio_postgres_rustls::MakeRustlsConnect;

/// Why a connection string or its TLS files cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("connection string: {0}")]
    Syntax(String),
    #[error(
        "connection string: sslmode={0:?} is not one of disable, require, verify-ca, verify-full"
    )]
    SslMode(String),
    #[error(
        "connection string: sslmode={0} needs sslrootcert=FILE (the CA that signed the server)"
    )]
    NoRoot(&'static str),
    #[error("connection string: sslcert and sslkey go together; only {0} was given")]
    HalfIdentity(&'static str),
    /// tokio-postgres refused the rest; its own message hides the cause in `source()`.
    #[error("connection string: {0}")]
    Postgres(String),
    #[error("cannot read {what} from {path}: {source}")]
    Pem {
        what: &'static str,
        path: PathBuf,
        source: rustls::pki_types::pem::Error,
    },
    #[error("{path} holds no {what}")]
    Empty { what: &'static str, path: PathBuf },
    #[error("TLS setup: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("TLS setup: {0}")]
    Verifier(#[from] rustls::client::VerifierBuilderError),
}

/// How the server certificate is checked, named as libpq names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verify {
    Disable,
    /// Encrypted but the server is not authenticated (libpq's `require` without a root).
    Require,
    /// Chain to `sslrootcert`, any name.
    Ca,
    /// Chain to `sslrootcert` and the host name matches.
    Full,
}

/// A parsed connection string: the tokio-postgres part and our TLS part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnSpec {
    /// Everything tokio-postgres understands, re-serialized.
    pub pg: String,
    pub verify: Verify,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub root: Option<PathBuf>,
}

/// Splits a libpq keyword/value string: `key=value`, values optionally single-quoted with
/// `\'` and `\\` escapes, separated by whitespace; spaces around `=` are allowed.
pub fn split_pairs(s: &str) -> Result<Vec<(String, String)>, TargetError> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.peek().is_none() {
            return Ok(out);
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c.is_whitespace() {
                break;
            }
            key.push(c);
            chars.next();
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.next() != Some('=') {
            return Err(TargetError::Syntax(format!("{key:?} has no '=value'")));
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let mut value = String::new();
        if chars.peek() == Some(&'\'') {
            chars.next();
            loop {
                match chars.next() {
                    None => {
                        return Err(TargetError::Syntax(format!(
                            "the quoted value of {key:?} is not closed"
                        )))
                    }
                    Some('\'') => break,
                    Some('\\') => match chars.next() {
                        Some(c) => value.push(c),
                        None => {
                            return Err(TargetError::Syntax(format!(
                                "the value of {key:?} ends in a lone backslash"
                            )))
                        }
                    },
                    Some(c) => value.push(c),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                if c == '\\' {
                    chars.next();
                    if let Some(n) = chars.next() {
                        value.push(n);
                    }
                    continue;
                }
                value.push(c);
                chars.next();
            }
        }
        if key.is_empty() {
            return Err(TargetError::Syntax("a '=' with no key before it".into()));
        }
        out.push((key, value));
    }
}

fn quote(v: &str) -> String {
    let mut q = String::with_capacity(v.len() + 2);
    q.push('\'');
    for c in v.chars() {
        if c == '\'' || c == '\\' {
            q.push('\\');
        }
        q.push(c);
    }
    q.push('\'');
    q
}

impl FromStr for ConnSpec {
    type Err = TargetError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut pg = Vec::new();
        let (mut mode, mut cert, mut key, mut root) = (None, None, None, None);
        for (k, v) in split_pairs(s)? {
            match k.as_str() {
                "sslmode" => mode = Some(v),
                "sslcert" => cert = Some(PathBuf::from(v)),
                "sslkey" => key = Some(PathBuf::from(v)),
                "sslrootcert" => root = Some(PathBuf::from(v)),
                _ => pg.push(format!("{k}={}", quote(&v))),
            }
        }
        let verify = match mode.as_deref() {
            None | Some("prefer") | Some("allow") if root.is_none() && cert.is_none() => {
                Verify::Disable
            }
            Some("disable") => Verify::Disable,
            Some("require") if root.is_none() => Verify::Require,
            // libpq: `require` with a root certificate behaves like verify-ca.
            Some("require") | Some("verify-ca") => Verify::Ca,
            None | Some("prefer") | Some("allow") | Some("verify-full") => Verify::Full,
            Some(other) => return Err(TargetError::SslMode(other.to_owned())),
        };
        if matches!(verify, Verify::Ca | Verify::Full) && root.is_none() {
            return Err(TargetError::NoRoot(if verify == Verify::Ca {
                "verify-ca"
            } else {
                "verify-full"
            }));
        }
        match (&cert, &key) {
            (Some(_), None) => return Err(TargetError::HalfIdentity("sslcert")),
            (None, Some(_)) => return Err(TargetError::HalfIdentity("sslkey")),
            _ => {}
        }
        let spec = ConnSpec {
            pg: pg.join(" "),
            verify,
            cert,
            key,
            root,
        };
        // Fail now, not in the first worker, when tokio-postgres rejects the rest.
        spec.pg_config()?;
        Ok(spec)
    }
}

impl fmt::Display for ConnSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} verify={:?}", self.pg, self.verify)
    }
}

impl ConnSpec {
    pub fn pg_config(&self) -> Result<tokio_postgres::Config, TargetError> {
        let mut cfg = tokio_postgres::Config::from_str(&self.pg).map_err(|e| {
            let cause = std::error::Error::source(&e).map(|c| format!(": {c}"));
            TargetError::Postgres(format!("{e}{}", cause.unwrap_or_default()))
        })?;
        cfg.ssl_mode(if self.verify == Verify::Disable {
            SslMode::Disable
        } else {
            SslMode::Require
        });
        Ok(cfg)
    }

    /// Builds the TLS connector once; every connection of a run shares it (no resumption
    /// cache is kept, so each connection is a full handshake, as a fresh client's would be).
    pub fn connector(&self) -> Result<MakeRustlsConnect, TargetError> {
        // The groups libpq on OpenSSL 3.0 offers, in its order (a key share for X25519 only):
        // with rustls' default post-quantum group first, a rustls server would pick a costlier
        // key exchange than pgbench gets, and the comparison would measure group choice
        // rather than the proxy. PostgreSQL's default `ssl_ecdh_curve = prime256v1` answers
        // with a retry for P-256, exactly as it does for pgbench.
        let provider = Arc::new(rustls::crypto::CryptoProvider {
            kx_groups: vec![
                rustls::crypto::aws_lc_rs::kx_group::X25519,
                rustls::crypto::aws_lc_rs::kx_group::SECP256R1,
                rustls::crypto::aws_lc_rs::kx_group::SECP384R1,
            ],
            ..rustls::crypto::aws_lc_rs::default_provider()
        });
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?;
        let builder = match (self.verify, &self.root) {
            (Verify::Full, Some(root)) => builder.with_root_certificates(roots(root)?),
            (Verify::Ca, Some(root)) => {
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(AnyName(
                        WebPkiServerVerifier::builder_with_provider(
                            Arc::new(roots(root)?),
                            provider,
                        )
                        .build()?,
                    )))
            }
            _ => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(Unverified(provider))),
        };
        let mut config = match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                builder.with_client_auth_cert(certs(cert)?, private_key(key)?)?
            }
            _ => builder.with_no_client_auth(),
        };
        config.resumption = rustls::client::Resumption::disabled();
        Ok(MakeRustlsConnect::new(config))
    }
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TargetError> {
    let what = "certificates";
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|source| TargetError::Pem {
            what,
            path: path.to_owned(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TargetError::Empty {
            what,
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TargetError> {
    PrivateKeyDer::from_pem_file(path).map_err(|source| TargetError::Pem {
        what: "a private key",
        path: path.to_owned(),
        source,
    })
}

fn roots(path: &Path) -> Result<RootCertStore, TargetError> {
    let mut store = RootCertStore::empty();
    for cert in certs(path)? {
        store.add(cert)?;
    }
    Ok(store)
}

/// verify-ca: the chain must lead to the root; the name is not checked (libpq semantics).
#[derive(Debug)]
struct AnyName(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for AnyName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName))
            | Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// `sslmode=require` without a root: encrypted, server unauthenticated, as libpq does.
/// Signatures are still checked so the handshake costs what a verifying client's would.
#[derive(Debug)]
struct Unverified(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libpq_quoting_and_spaces_are_understood() {
        let pairs = split_pairs(r"host = localhost  password='it\'s a \\ pw' dbname=x\ y").unwrap();
        assert_eq!(
            pairs,
            vec![
                ("host".into(), "localhost".into()),
                ("password".into(), r"it's a \ pw".into()),
                ("dbname".into(), "x y".into()),
            ]
        );
    }

    #[test]
    fn malformed_strings_are_refused_with_the_key_named() {
        let err = split_pairs("host").unwrap_err().to_string();
        assert!(err.contains("\"host\""), "{err}");
        assert!(split_pairs("password='open").is_err());
        assert!(split_pairs("=x").is_err());
    }

    #[test]
    fn ssl_file_keys_are_taken_out_and_the_rest_reaches_tokio_postgres() {
        let spec: ConnSpec =
            "host=localhost port=6432 user=billing dbname=bench sslmode=verify-full \
             sslcert=/c.pem sslkey=/c.key sslrootcert=/ca.pem"
                .parse()
                .unwrap();
        assert_eq!(spec.verify, Verify::Full);
        assert_eq!(spec.cert.as_deref(), Some(Path::new("/c.pem")));
        assert_eq!(spec.key.as_deref(), Some(Path::new("/c.key")));
        assert_eq!(spec.root.as_deref(), Some(Path::new("/ca.pem")));
        let cfg = spec.pg_config().unwrap();
        assert_eq!(cfg.get_ports(), &[6432]);
        assert_eq!(cfg.get_user(), Some("billing"));
        assert_eq!(cfg.get_dbname(), Some("bench"));
        assert_eq!(cfg.get_ssl_mode(), SslMode::Require);
    }

    #[test]
    fn sslmode_follows_libpq() {
        let mode = |s: &str| s.parse::<ConnSpec>().map(|c| c.verify);
        assert_eq!(mode("host=/tmp").unwrap(), Verify::Disable);
        assert_eq!(mode("host=h sslmode=require").unwrap(), Verify::Require);
        assert_eq!(
            mode("host=h sslmode=require sslrootcert=/ca").unwrap(),
            Verify::Ca
        );
        assert_eq!(
            mode("host=h sslmode=verify-ca sslrootcert=/ca").unwrap(),
            Verify::Ca
        );
        assert!(matches!(
            mode("host=h sslmode=verify-full"),
            Err(TargetError::NoRoot("verify-full"))
        ));
        assert!(matches!(
            mode("host=h sslmode=bogus"),
            Err(TargetError::SslMode(_))
        ));
        assert!(matches!(
            mode("host=h sslmode=require sslcert=/c"),
            Err(TargetError::HalfIdentity("sslcert"))
        ));
    }

    #[test]
    fn options_tokio_postgres_does_not_know_are_reported() {
        let err = "host=h frobnicate=1".parse::<ConnSpec>().unwrap_err();
        assert!(err.to_string().contains("frobnicate"), "{err}");
    }
}

//! Signed values in the fleet bucket: an admin's SVID signs what it pushes, every sidecar checks the signature, the chain, the CRL and the admin list before it applies anything.
//!
//! Anyone who can write to the bucket (a compromised sidecar, a stolen NATS credential) could
//! otherwise lift every lock or widen the policy on every database at once. So NATS is only
//! the carrier: a value counts only when it is signed by a certificate our trust bundle
//! verifies (and the CRL does not revoke) whose SPIFFE ID is in `[fleet] admins`, and when
//! the signature covers the key it is stored under (a signed lock cannot be replayed as the
//! policy, or under another lock's key).

use std::sync::Arc;
use std::time::SystemTime;

use base64::Engine;
use eastwall_ca::spiffe::TrustDomain;
use eastwall_config::IdPattern;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::ClientCertVerifier;
use rustls::SignatureScheme;
use serde::{Deserialize, Serialize};

/// The largest value a sidecar reads from the bucket (a policy bundle with its chain).
pub const MAX_VALUE: usize = 1 << 20;

/// What the signature covers besides the body: a version tag and the key.
const DOMAIN: &[u8] = b"eastwall-fleet-v1\0";

/// Schemes a pusher may sign with, most preferred first (our CA issues P-256 keys).
const SCHEMES: [SignatureScheme; 5] = [
    SignatureScheme::ECDSA_NISTP256_SHA256,
    SignatureScheme::ECDSA_NISTP384_SHA384,
    SignatureScheme::ED25519,
    SignatureScheme::RSA_PSS_SHA256,
    SignatureScheme::RSA_PKCS1_SHA256,
];

/// Why a value in the bucket is not applied.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SignedError {
    #[error("the value is {0} bytes, more than the {MAX_VALUE} a fleet value may hold")]
    TooLarge(usize),
    #[error("not a signed Eastwall fleet value: {0}")]
    Malformed(String),
    #[error("signed for the key {signed:?} but stored under {stored:?} (moved or replayed)")]
    WrongKey { signed: String, stored: String },
    #[error("the signer's certificate is not one our trust bundle accepts: {0}")]
    Untrusted(String),
    #[error("signed by {0}, which is not in [fleet] admins")]
    NotAdmin(String),
    #[error("the signature does not verify ({0})")]
    BadSignature(String),
}

/// The value stored under a key.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Envelope {
    /// Format version: 1.
    pub v: u32,
    /// The key it was signed for.
    pub key: String,
    /// The signed JSON body, as text (so the signed bytes are exactly what is stored).
    pub body: String,
    /// rustls' name of the signature scheme, e.g. `ECDSA_NISTP256_SHA256`.
    pub scheme: String,
    /// The signer's leaf certificate, base64 DER.
    pub cert: String,
    /// base64 signature over DOMAIN ‖ key ‖ NUL ‖ body.
    pub sig: String,
}

/// A verified value: its body and who signed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub body: String,
    pub signer: String,
}

fn signed_bytes(key: &str, body: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(DOMAIN.len() + key.len() + 1 + body.len());
    out.extend_from_slice(DOMAIN);
    out.extend_from_slice(key.as_bytes());
    out.push(0);
    out.extend_from_slice(body.as_bytes());
    out
}

fn scheme_name(s: SignatureScheme) -> String {
    format!("{s:?}")
}

/// Signs `body` for `key` with the pusher's SVID.
pub fn sign(
    key: &str,
    body: &str,
    leaf: &CertificateDer<'_>,
    private_key: &PrivateKeyDer<'_>,
) -> Result<Envelope, String> {
    let signing = rustls::crypto::aws_lc_rs::sign::any_supported_type(private_key)
        .map_err(|e| format!("the key cannot sign: {e}"))?;
    let signer = signing
        .choose_scheme(&SCHEMES)
        .ok_or("the key's type cannot sign any scheme Eastwall accepts")?;
    let sig = signer
        .sign(&signed_bytes(key, body))
        .map_err(|e| format!("signing failed: {e}"))?;
    let b64 = base64::engine::general_purpose::STANDARD;
    Ok(Envelope {
        v: 1,
        key: key.to_owned(),
        body: body.to_owned(),
        scheme: scheme_name(signer.scheme()),
        cert: b64.encode(leaf.as_ref()),
        sig: b64.encode(sig),
    })
}

/// Who may sign, and against what.
pub struct Trust {
    pub verifier: Arc<dyn ClientCertVerifier>,
    pub trust_domain: TrustDomain,
    pub admins: Vec<IdPattern>,
}

impl Trust {
    /// Parses and checks the value stored under `stored_key`.
    pub fn verify(
        &self,
        stored_key: &str,
        raw: &[u8],
        now: SystemTime,
    ) -> Result<Verified, SignedError> {
        if raw.len() > MAX_VALUE {
            return Err(SignedError::TooLarge(raw.len()));
        }
        let env: Envelope =
            serde_json::from_slice(raw).map_err(|e| SignedError::Malformed(e.to_string()))?;
        if env.v != 1 {
            return Err(SignedError::Malformed(format!(
                "version {} (expected 1)",
                env.v
            )));
        }
        if env.key != stored_key {
            return Err(SignedError::WrongKey {
                signed: env.key,
                stored: stored_key.to_owned(),
            });
        }
        let b64 = base64::engine::general_purpose::STANDARD;
        let leaf = b64
            .decode(&env.cert)
            .map_err(|e| SignedError::Malformed(format!("cert: {e}")))?;
        let sig = b64
            .decode(&env.sig)
            .map_err(|e| SignedError::Malformed(format!("sig: {e}")))?;
        let leaf = CertificateDer::from(leaf);
        let unix = UnixTime::since_unix_epoch(
            now.duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default(),
        );
        self.verifier
            .verify_client_cert(&leaf, &[], unix)
            .map_err(|e| SignedError::Untrusted(e.to_string()))?;
        let peer = crate::identity::identify(Some(std::slice::from_ref(&leaf)), &self.trust_domain)
            .map_err(|e| SignedError::Untrusted(e.to_string()))?;
        let id = peer.id.to_string();
        if !self.admins.iter().any(|p| p.matches(&peer.id)) {
            return Err(SignedError::NotAdmin(id));
        }
        let alg: &dyn rustls::pki_types::SignatureVerificationAlgorithm = match env.scheme.as_str()
        {
            "ECDSA_NISTP256_SHA256" => webpki::aws_lc_rs::ECDSA_P256_SHA256,
            "ECDSA_NISTP384_SHA384" => webpki::aws_lc_rs::ECDSA_P384_SHA384,
            "ED25519" => webpki::aws_lc_rs::ED25519,
            "RSA_PSS_SHA256" => webpki::aws_lc_rs::RSA_PSS_2048_8192_SHA256_LEGACY_KEY,
            "RSA_PKCS1_SHA256" => webpki::aws_lc_rs::RSA_PKCS1_2048_8192_SHA256,
            other => return Err(SignedError::BadSignature(format!("scheme {other:?}"))),
        };
        let cert = webpki::EndEntityCert::try_from(&leaf)
            .map_err(|e| SignedError::Untrusted(e.to_string()))?;
        cert.verify_signature(alg, &signed_bytes(&env.key, &env.body), &sig)
            .map_err(|e| SignedError::BadSignature(e.to_string()))?;
        Ok(Verified {
            body: env.body,
            signer: id,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use eastwall_ca::{Ca, IssueRequest, RevokeTarget, SpiffeId};
    use rustls::pki_types::pem::PemObject;

    struct Pki {
        _dir: tempfile::TempDir,
        ca: Ca,
        td: TrustDomain,
    }

    fn pki() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let td = TrustDomain::parse("corp.example").unwrap();
        let ca = Ca::init(
            &dir.path().join("ca"),
            &td,
            std::time::Duration::from_secs(86400),
            false,
        )
        .unwrap();
        Pki { _dir: dir, ca, td }
    }

    impl Pki {
        fn svid(&self, path: &str) -> (CertificateDer<'static>, PrivateKeyDer<'static>, String) {
            let issued = self
                .ca
                .issue(&IssueRequest::new(
                    SpiffeId::parse(&format!("spiffe://corp.example/{path}")).unwrap(),
                ))
                .unwrap();
            let leaf = CertificateDer::pem_slice_iter(issued.cert_pem.as_bytes())
                .next()
                .unwrap()
                .unwrap();
            let key = PrivateKeyDer::from_pem_slice(issued.key_pem.unwrap().as_bytes()).unwrap();
            (leaf, key, issued.serial_hex)
        }

        fn trust(&self) -> Trust {
            Trust {
                verifier: crate::tls::svid_verifier(
                    &self.ca.cert_path(),
                    Some(&self.ca.crl_path()),
                )
                .unwrap(),
                trust_domain: self.td.clone(),
                admins: vec![
                    IdPattern::parse("spiffe://corp.example/ops/dbas/*", Some(&self.td)).unwrap(),
                ],
            }
        }
    }

    fn stored(env: &Envelope) -> Vec<u8> {
        serde_json::to_vec(env).unwrap()
    }

    #[test]
    fn an_admins_value_verifies_and_names_its_signer() {
        let p = pki();
        let (leaf, key, _) = p.svid("ops/dbas/dana");
        let env = sign("lock.0000abcd", "{\"x\":1}", &leaf, &key).unwrap();
        let v = p
            .trust()
            .verify("lock.0000abcd", &stored(&env), SystemTime::now())
            .unwrap();
        assert_eq!(v.signer, "spiffe://corp.example/ops/dbas/dana");
        assert_eq!(v.body, "{\"x\":1}");
    }

    #[test]
    fn what_an_attacker_with_bucket_write_access_can_do_is_refused() {
        let p = pki();
        let trust = p.trust();
        let now = SystemTime::now();
        let (leaf, key, _) = p.svid("ops/dbas/dana");
        let env = sign("policy", "{\"version\":2}", &leaf, &key).unwrap();
        // A body edited after signing.
        let mut edited = env.clone();
        edited.body = "{\"version\":3}".into();
        assert!(matches!(
            trust.verify("policy", &stored(&edited), now),
            Err(SignedError::BadSignature(_))
        ));
        // A signed value moved under another key (a lock replayed as the policy, or the
        // policy stored as a lock).
        assert!(matches!(
            trust.verify("lock.0000abcd", &stored(&env), now),
            Err(SignedError::WrongKey { .. })
        ));
        let mut relabelled = env.clone();
        relabelled.key = "lock.0000abcd".into();
        assert!(matches!(
            trust.verify("lock.0000abcd", &stored(&relabelled), now),
            Err(SignedError::BadSignature(_))
        ));
        // A sidecar's own SVID (it can write the bucket) is not an admin.
        let (sleaf, skey, _) = p.svid("db/eastwall-s1");
        let by_sidecar = sign("policy", "{}", &sleaf, &skey).unwrap();
        assert!(matches!(
            trust.verify("policy", &stored(&by_sidecar), now),
            Err(SignedError::NotAdmin(_))
        ));
        // An admin-looking SVID from another CA.
        let other = pki();
        let (oleaf, okey, _) = other.svid("ops/dbas/mallory");
        let foreign = sign("policy", "{}", &oleaf, &okey).unwrap();
        assert!(matches!(
            trust.verify("policy", &stored(&foreign), now),
            Err(SignedError::Untrusted(_))
        ));
        // Another admin's certificate with dana's signature.
        let (eleaf, _, _) = p.svid("ops/dbas/erin");
        let mut swapped = env.clone();
        swapped.cert = base64::engine::general_purpose::STANDARD.encode(eleaf.as_ref());
        assert!(matches!(
            trust.verify("policy", &stored(&swapped), now),
            Err(SignedError::BadSignature(_))
        ));
        // An unknown scheme, garbage, a huge value, an unknown field.
        let mut scheme = env.clone();
        scheme.scheme = "NONE".into();
        assert!(matches!(
            trust.verify("policy", &stored(&scheme), now),
            Err(SignedError::BadSignature(_))
        ));
        assert!(matches!(
            trust.verify("policy", b"\xff\x00not json", now),
            Err(SignedError::Malformed(_))
        ));
        assert!(matches!(
            trust.verify("policy", &vec![b' '; MAX_VALUE + 1], now),
            Err(SignedError::TooLarge(_))
        ));
        let mut extra: serde_json::Value = serde_json::to_value(&env).unwrap();
        extra["admin"] = serde_json::json!(true);
        assert!(matches!(
            trust.verify("policy", &serde_json::to_vec(&extra).unwrap(), now),
            Err(SignedError::Malformed(_))
        ));
    }

    #[test]
    fn a_revoked_admin_cannot_push() {
        let p = pki();
        let (leaf, key, serial) = p.svid("ops/dbas/dana");
        let env = sign("policy", "{}", &leaf, &key).unwrap();
        p.ca.revoke(&RevokeTarget::Serial(serial)).unwrap();
        let err = p
            .trust()
            .verify("policy", &stored(&env), SystemTime::now())
            .unwrap_err();
        assert!(matches!(err, SignedError::Untrusted(_)), "{err}");
    }
}

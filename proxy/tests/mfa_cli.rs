//! MFA as operators meet it: `eastwall mfa enroll/list/remove/login`, and the HTTPS step-up
//! endpoint over real mTLS on loopback.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use eastwall::mfa::{totp, Limits, MfaOutcome, SecretStore, TokenKey, Verifier};
use eastwall::stepup::{self, StepUpError, StepUpEvent};
use eastwall_ca::SpiffeId;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use sha2::{Digest, Sha256};

const ALICE: &str = "spiffe://corp.example/app/operators/alice";
const BOB: &str = "spiffe://corp.example/app/operators/bob";
const BILLING: &str = "spiffe://corp.example/app/billing";
const TIMEOUT: Duration = Duration::from_secs(20);

fn id(s: &str) -> SpiffeId {
    SpiffeId::parse(s).unwrap()
}

// ---------------------------------------------------------------------------------------------
// The CLI against a real config

/// A sidecar folder with the example eastwall.toml and the seed's policy.
fn config_dir() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("eastwall.toml"),
        include_str!("../../examples/eastwall.toml"),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("policy.ew"),
        include_str!("../../examples/policy.ew"),
    )
    .unwrap();
    let config = dir.path().join("eastwall.toml");
    (dir, config)
}

fn eastwall(args: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_eastwall"))
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn enroll_prints_uri_and_qr_and_stores_a_private_secret() {
    let (dir, config) = config_dir();
    let cfg = config.to_str().unwrap();
    let out = eastwall(&["mfa", "enroll", "--config", cfg, ALICE]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    assert!(
        stdout.contains(
            "otpauth://totp/Eastwall:spiffe%3A%2F%2Fcorp.example%2Fapp%2Foperators%2Falice?secret="
        ),
        "{stdout}"
    );
    assert!(stdout.contains("&issuer=Eastwall&algorithm=SHA1&digits=6&period=30"));
    assert!(
        stdout.contains('▀') && stdout.contains('▄'),
        "a QR code in half blocks"
    );

    let secrets = dir.path().join("mfa/secrets.json");
    let mode = std::fs::metadata(&secrets).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let store = SecretStore::load(&secrets).unwrap();
    assert_eq!(store.list().len(), 1);
    assert_eq!(store.list()[0].0, id(ALICE));

    // The secret printed is the one stored: a code from it is accepted.
    let b32 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("secret (base32): "))
        .unwrap();
    let bytes = totp_rs::Secret::Encoded(b32.to_owned()).to_bytes().unwrap();
    let verifier = Verifier::with_limits(store, TokenKey::generate(), limits(20));
    let now = SystemTime::now();
    let code = totp::current_code(&bytes, now).unwrap();
    let outcome = verifier.check(
        &id(ALICE),
        &[0; 32],
        "127.0.0.1".parse().unwrap(),
        &code,
        now,
    );
    assert!(outcome.is_accepted(), "{outcome:?}");
}

#[test]
fn enroll_refuses_identities_no_mfa_rule_names() {
    let (dir, config) = config_dir();
    let cfg = config.to_str().unwrap();
    for who in [BILLING, "spiffe://other.example/app/operators/alice"] {
        let out = eastwall(&["mfa", "enroll", "--config", cfg, who]);
        assert!(!out.status.success(), "{who} was enrolled");
        let stderr = text(&out.stderr);
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        if who == BILLING {
            assert!(stderr.contains("mfa(...)"), "{stderr}");
        } else {
            assert!(stderr.contains("corp.example"), "{stderr}");
        }
    }
    assert!(!dir.path().join("mfa/secrets.json").exists());
}

#[test]
fn reenroll_needs_force_list_and_remove_work() {
    let (_dir, config) = config_dir();
    let cfg = config.to_str().unwrap();
    assert!(eastwall(&["mfa", "enroll", "--config", cfg, ALICE])
        .status
        .success());
    let again = eastwall(&["mfa", "enroll", "--config", cfg, ALICE]);
    assert!(!again.status.success());
    assert!(
        text(&again.stderr).contains("--force"),
        "{}",
        text(&again.stderr)
    );
    assert!(
        eastwall(&["mfa", "enroll", "--config", cfg, ALICE, "--force"])
            .status
            .success()
    );
    assert!(eastwall(&["mfa", "enroll", "--config", cfg, BOB])
        .status
        .success());

    let list = eastwall(&["mfa", "list", "--config", cfg]);
    assert!(list.status.success());
    let ids: Vec<String> = text(&list.stdout)
        .lines()
        .map(|l| l.split('\t').next().unwrap().to_owned())
        .collect();
    assert_eq!(ids, [ALICE, BOB]);

    assert!(eastwall(&["mfa", "remove", "--config", cfg, ALICE])
        .status
        .success());
    let list = eastwall(&["mfa", "list", "--config", cfg]);
    assert_eq!(text(&list.stdout).trim_end().split('\t').next(), Some(BOB));
    let gone = eastwall(&["mfa", "remove", "--config", cfg, ALICE]);
    assert!(!gone.status.success());
    assert!(text(&gone.stderr).contains("not enrolled"));
}

#[test]
fn a_secrets_file_readable_by_others_is_refused() {
    let (dir, config) = config_dir();
    let cfg = config.to_str().unwrap();
    assert!(eastwall(&["mfa", "enroll", "--config", cfg, ALICE])
        .status
        .success());
    let secrets = dir.path().join("mfa/secrets.json");
    std::fs::set_permissions(&secrets, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = eastwall(&["mfa", "list", "--config", cfg]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("chmod 600"),
        "{}",
        text(&out.stderr)
    );
}

// ---------------------------------------------------------------------------------------------
// The step-up endpoint over real TLS

struct Pki {
    ca_pem: String,
    roots: rustls::RootCertStore,
    server_chain: Vec<CertificateDer<'static>>,
    server_key: KeyPair,
    issuer: CertifiedIssuer<'static, KeyPair>,
}

struct Client {
    cert: CertificateDer<'static>,
    cert_pem: String,
    key: KeyPair,
}

impl Client {
    fn sha256(&self) -> [u8; 32] {
        Sha256::digest(self.cert.as_ref()).into()
    }
}

fn pki() -> Pki {
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, "test CA");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let issuer = CertifiedIssuer::self_signed(ca, KeyPair::generate().unwrap()).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(issuer.der().clone()).unwrap();

    let mut server = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    server
        .subject_alt_names
        .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let server_key = KeyPair::generate().unwrap();
    let server_cert = server.signed_by(&server_key, &issuer).unwrap();
    Pki {
        ca_pem: issuer.pem(),
        roots,
        server_chain: vec![server_cert.der().clone()],
        server_key,
        issuer,
    }
}

fn client(pki: &Pki, spiffe: &str) -> Client {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.subject_alt_names = vec![SanType::URI(spiffe.try_into().unwrap())];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &pki.issuer).unwrap();
    Client {
        cert: cert.der().clone(),
        cert_pem: cert.pem(),
        key,
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn server_tls(pki: &Pki) -> Arc<rustls::ServerConfig> {
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(pki.roots.clone()),
        provider(),
    )
    .build()
    .unwrap();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pki.server_key.serialize_der()));
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(pki.server_chain.clone(), key)
        .unwrap();
    Arc::new(config)
}

fn client_tls(pki: &Pki, c: &Client) -> Arc<rustls::ClientConfig> {
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(c.key.serialize_der()));
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(pki.roots.clone())
        .with_client_auth_cert(vec![c.cert.clone()], key)
        .unwrap();
    Arc::new(config)
}

/// The test's stand-in for the proxy's SVID checks: the URI SAN and the leaf's SHA-256.
fn identify(conn: &rustls::ServerConnection) -> Result<stepup::StepUpIdentity, String> {
    let leaf = conn
        .peer_certificates()
        .and_then(|c| c.first())
        .ok_or("no client certificate")?;
    let (_, cert) =
        x509_parser::parse_x509_certificate(leaf.as_ref()).map_err(|e| e.to_string())?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| e.to_string())?
        .ok_or("no SAN")?;
    let uri = san
        .value
        .general_names
        .iter()
        .find_map(|n| match n {
            x509_parser::extensions::GeneralName::URI(u) => Some(*u),
            _ => None,
        })
        .ok_or("no URI SAN")?;
    let id = SpiffeId::parse(uri).map_err(|e| e.to_string())?;
    Ok(stepup::StepUpIdentity {
        id,
        cert_sha256: Sha256::digest(leaf.as_ref()).into(),
        serial_hex: hex::encode(cert.raw_serial()),
        not_eligible: None,
    })
}

fn limits(max_failures: u32) -> Limits {
    Limits {
        max_age: Duration::from_secs(300),
        max_failures,
        failure_window: Duration::from_secs(900),
    }
}

struct Endpoint {
    addr: SocketAddr,
    pki: Pki,
    verifier: Arc<Verifier>,
    secrets: tempfile::TempDir,
    events: Arc<Mutex<Vec<StepUpEvent>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Endpoint {
    fn url(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.addr.port())
    }

    /// The current code for an enrolled identity.
    fn code(&self, who: &str) -> String {
        let store = SecretStore::load(&self.secrets.path().join("mfa.json")).unwrap();
        assert!(store.is_enrolled(&id(who)));
        let text = std::fs::read_to_string(self.secrets.path().join("mfa.json")).unwrap();
        let json: serde_json::Value = serde_json::from_str(&text).unwrap();
        let b32 = json[who]["secret_b32"].as_str().unwrap().to_owned();
        let bytes = totp_rs::Secret::Encoded(b32).to_bytes().unwrap();
        totp::current_code(&bytes, SystemTime::now()).unwrap()
    }

    fn wrong_code(&self, who: &str) -> String {
        let right: u32 = self.code(who).parse().unwrap();
        format!("{:06}", (right + 500_000) % 1_000_000)
    }

    async fn fetch(
        &self,
        c: &Client,
        path: &str,
        code: &str,
    ) -> Result<stepup::StepUpResponse, StepUpError> {
        stepup::fetch_token(&self.url(path), client_tls(&self.pki, c), code, TIMEOUT).await
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn endpoint(max_failures: u32, audit_works: bool) -> Endpoint {
    let secrets = tempfile::tempdir().unwrap();
    let path = secrets.path().join("mfa.json");
    for who in [ALICE, BOB] {
        SecretStore::enroll(&path, &id(who), false).unwrap();
    }
    let verifier = Arc::new(Verifier::with_limits(
        SecretStore::load(&path).unwrap(),
        TokenKey::generate(),
        limits(max_failures),
    ));
    let pki = pki();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let events = Arc::new(Mutex::new(Vec::new()));
    let sink = events.clone();
    let tls = server_tls(&pki);
    let task = tokio::spawn(stepup::serve(
        listener,
        Arc::new(move || tls.clone()),
        verifier.clone(),
        Arc::new(identify),
        Arc::new(|_: &stepup::StepUpIdentity, _| None),
        Arc::new(move |e: StepUpEvent| {
            sink.lock().unwrap().push(e);
            Box::pin(std::future::ready(if audit_works {
                Ok(())
            } else {
                Err("disk full".to_owned())
            }))
        }),
    ));
    Endpoint {
        addr,
        pki,
        verifier,
        secrets,
        events,
        task,
    }
}

fn refused_status(r: Result<stepup::StepUpResponse, StepUpError>) -> (u16, String) {
    match r {
        Err(StepUpError::Refused { status, error, .. }) => (status, error),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn right_code_gets_a_token_bound_to_that_certificate() {
    let ep = endpoint(20, true).await;
    let alice = client(&ep.pki, ALICE);
    let resp = ep
        .fetch(&alice, stepup::STEPUP_PATH, &ep.code(ALICE))
        .await
        .unwrap();
    assert!(resp.token.starts_with("ewst1."));
    let expires = time::OffsetDateTime::parse(
        &resp.expires_at,
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    let in_secs = expires.unix_timestamp() - time::OffsetDateTime::now_utc().unix_timestamp();
    assert!((295..=301).contains(&in_secs), "expires in {in_secs}s");

    let src = "127.0.0.1".parse().unwrap();
    let now = SystemTime::now();
    let outcome = ep
        .verifier
        .check(&id(ALICE), &alice.sha256(), src, &resp.token, now);
    assert!(
        matches!(
            outcome,
            MfaOutcome::Accepted {
                method: "token",
                ..
            }
        ),
        "{outcome:?}"
    );
    // The same identity with another certificate cannot use it.
    let alice2 = client(&ep.pki, ALICE);
    assert_eq!(
        ep.verifier
            .check(&id(ALICE), &alice2.sha256(), src, &resp.token, now),
        MfaOutcome::Rejected {
            reason: "token_other_cert"
        }
    );

    let events = ep.events.lock().unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].id, id(ALICE));
    assert_eq!(events[0].cert_sha256, alice.sha256());
    assert!(events[0].outcome.is_accepted());
    assert!(events[0].token_expires_at.is_some());
}

#[tokio::test]
async fn wrong_or_replayed_code_is_401_and_logged() {
    let ep = endpoint(20, true).await;
    let alice = client(&ep.pki, ALICE);
    let wrong = ep.wrong_code(ALICE);
    assert_eq!(
        refused_status(ep.fetch(&alice, stepup::STEPUP_PATH, &wrong).await),
        (401, "wrong_code".to_owned())
    );
    let code = ep.code(ALICE);
    ep.fetch(&alice, stepup::STEPUP_PATH, &code).await.unwrap();
    assert_eq!(
        refused_status(ep.fetch(&alice, stepup::STEPUP_PATH, &code).await),
        (401, "replayed_code".to_owned())
    );
    let reasons: Vec<&str> = ep
        .events
        .lock()
        .unwrap()
        .iter()
        .map(|e| e.outcome.reason())
        .collect();
    assert_eq!(reasons, ["wrong_code", "accepted", "replayed_code"]);
}

#[tokio::test]
async fn locked_out_identity_gets_429_even_with_the_right_code() {
    let ep = endpoint(3, true).await;
    let alice = client(&ep.pki, ALICE);
    let wrong = ep.wrong_code(ALICE);
    for _ in 0..2 {
        assert_eq!(
            refused_status(ep.fetch(&alice, stepup::STEPUP_PATH, &wrong).await).0,
            401
        );
    }
    assert_eq!(
        refused_status(ep.fetch(&alice, stepup::STEPUP_PATH, &wrong).await).0,
        429
    );
    let right = ep.code(ALICE);
    assert_eq!(
        refused_status(ep.fetch(&alice, stepup::STEPUP_PATH, &right).await).0,
        429
    );
    // Bob, from the same address, is unaffected.
    let bob = client(&ep.pki, BOB);
    ep.fetch(&bob, stepup::STEPUP_PATH, &ep.code(BOB))
        .await
        .unwrap();
    let lockouts: Vec<MfaOutcome> = ep
        .events
        .lock()
        .unwrap()
        .iter()
        .filter(|e| matches!(e.outcome, MfaOutcome::LockedOut { .. }))
        .map(|e| e.outcome)
        .collect();
    assert_eq!(
        lockouts,
        [
            MfaOutcome::LockedOut { first: true },
            MfaOutcome::LockedOut { first: false }
        ]
    );
}

#[tokio::test]
async fn oversized_body_is_413_and_other_paths_404() {
    let ep = endpoint(20, true).await;
    let alice = client(&ep.pki, ALICE);
    let huge = "1".repeat(2000);
    assert_eq!(
        refused_status(ep.fetch(&alice, stepup::STEPUP_PATH, &huge).await).0,
        413
    );
    assert_eq!(
        refused_status(ep.fetch(&alice, "/v1/other", "123456").await).0,
        404
    );
    assert_eq!(refused_status(ep.fetch(&alice, "/", "123456").await).0, 404);
    // None of that reached the verifier.
    assert!(ep.events.lock().unwrap().is_empty());
}

#[tokio::test]
async fn identity_refused_by_the_proxy_is_403() {
    let ep = endpoint(20, true).await;
    // A certificate from the right CA, but its URI SAN is not a SPIFFE ID we accept.
    let odd = client(&ep.pki, "https://example.com/alice");
    let (status, error) = refused_status(ep.fetch(&odd, stepup::STEPUP_PATH, "123456").await);
    assert_eq!((status, error.as_str()), (403, "identity"));
}

#[tokio::test]
async fn no_token_when_the_decision_cannot_be_logged() {
    let ep = endpoint(20, false).await;
    let alice = client(&ep.pki, ALICE);
    let (status, _) = refused_status(ep.fetch(&alice, stepup::STEPUP_PATH, &ep.code(ALICE)).await);
    assert_eq!(status, 503);
}

#[tokio::test]
async fn a_client_from_another_ca_is_refused_during_the_handshake() {
    let ep = endpoint(20, true).await;
    let stranger_pki = pki();
    let stranger = client(&stranger_pki, ALICE);
    let tls = {
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(stranger.key.serialize_der()));
        Arc::new(
            rustls::ClientConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(ep.pki.roots.clone())
                .with_client_auth_cert(vec![stranger.cert.clone()], key)
                .unwrap(),
        )
    };
    let r = stepup::fetch_token(&ep.url(stepup::STEPUP_PATH), tls, &ep.code(ALICE), TIMEOUT).await;
    assert!(r.is_err(), "{r:?}");
    assert!(!matches!(r, Err(StepUpError::Refused { .. })), "{r:?}");
    assert!(ep.events.lock().unwrap().is_empty());
}

// ---------------------------------------------------------------------------------------------
// `eastwall mfa login` against the endpoint

fn write(dir: &Path, name: &str, content: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, content).unwrap();
    p.to_str().unwrap().to_owned()
}

async fn login(ep: &Endpoint, c: &Client, code: &str) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let cert = write(dir.path(), "alice.pem", &c.cert_pem);
    let key = write(dir.path(), "alice.key", &c.key.serialize_pem());
    let ca = write(dir.path(), "ca.pem", &ep.pki.ca_pem);
    let url = ep.url(stepup::STEPUP_PATH);
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_eastwall"))
        .args([
            "mfa", "login", "--url", &url, "--cert", &cert, "--key", &key, "--ca", &ca,
        ])
        .args(["--code", code])
        .stdin(std::process::Stdio::null())
        .output();
    tokio::time::timeout(TIMEOUT, child).await.unwrap().unwrap()
}

#[tokio::test]
async fn login_prints_only_the_token() {
    let ep = endpoint(20, true).await;
    let alice = client(&ep.pki, ALICE);
    let out = login(&ep, &alice, &ep.code(ALICE)).await;
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let token = stdout.strip_suffix('\n').unwrap();
    assert!(!token.contains(char::is_whitespace), "{stdout:?}");
    let outcome = ep.verifier.check(
        &id(ALICE),
        &alice.sha256(),
        "127.0.0.1".parse().unwrap(),
        token,
        SystemTime::now(),
    );
    assert!(outcome.is_accepted(), "{outcome:?}");
}

#[tokio::test]
async fn login_with_a_wrong_code_fails_with_one_line() {
    let ep = endpoint(20, true).await;
    let alice = client(&ep.pki, ALICE);
    let out = login(&ep, &alice, &ep.wrong_code(ALICE)).await;
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
    let stderr = text(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("401") && stderr.contains("wrong_code"),
        "{stderr}"
    );
}

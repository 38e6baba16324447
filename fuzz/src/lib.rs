//! The bodies of Eastwall's fuzz targets: one function per parser that reads untrusted input,
//! each taking arbitrary bytes. The AFL++ entry points in `fuzz_targets/` call these, and so
//! does `replay`, which runs a corpus or a crash through them without AFL.
//!
//! A target fails by panicking (a parser must never panic, whatever it is given) or by not
//! returning (AFL's hang timeout). Where a parser promises something checkable — the relay's
//! boundary tracker must not depend on how the stream was cut into reads, a SPIFFE ID that
//! parses must parse again to itself — the target asserts it.

use std::collections::BTreeMap;
use std::path::Path;

use bytes::BytesMut;
use eastwall::codec::{self, StartupPacket};
use eastwall_ca::{SpiffeId, TrustDomain};
use rustls_pki_types::CertificateDer;

/// Every target, by the name of its binary and its corpus directory.
pub const TARGETS: &[(&str, fn(&[u8]))] = &[
    ("startup_packet", startup_packet),
    ("messages", messages),
    ("relay_boundaries", relay_boundaries),
    ("params_screen", params_screen),
    ("policy", policy),
    ("settings_toml", settings_toml),
    ("spiffe_id", spiffe_id),
    ("svid_der", svid_der),
    ("csr", csr),
    ("stepup_body", stepup_body),
];

/// The front door before TLS and inside it: startup-phase packets as a client sends them
/// (SSLRequest, GSSENCRequest, CancelRequest, StartupMessage), decoded as long as the bytes
/// hold, and each StartupMessage's parameters screened as the session would.
pub fn startup_packet(data: &[u8]) {
    let mut buf = BytesMut::from(data);
    while let Ok(Some(packet)) = codec::decode_startup(&mut buf) {
        if let StartupPacket::Startup(msg) = packet {
            let _ = msg.param("user");
            let _ = msg.param("database");
            let _ = eastwall::params::screen(&msg.params);
        }
    }
}

/// Tagged-message framing and every body parser: first as the front door reads a client
/// (password and SASL messages, capped at `MAX_PASSWORD_LEN`), then as the upstream login
/// reads PostgreSQL (authentication requests, ParameterStatus, BackendKeyData,
/// ErrorResponse/NoticeResponse, DataRow from the privilege query).
pub fn messages(data: &[u8]) {
    let mut buf = BytesMut::from(data);
    while let Ok(Some(msg)) = codec::decode_message(&mut buf, codec::MAX_PASSWORD_LEN) {
        let _ = codec::parse_password(&msg.body);
    }
    let mut buf = BytesMut::from(data);
    while let Ok(Some(msg)) = codec::decode_message(&mut buf, codec::MAX_LOGIN_MESSAGE_LEN) {
        // Every parser on every body, whatever the tag: a parser must not trust the tag.
        let _ = codec::parse_auth_request(&msg.body);
        let _ = codec::parse_parameter_status(&msg.body);
        let _ = codec::parse_backend_key(&msg.body);
        let _ = codec::parse_error_fields(&msg.body);
        let _ = codec::parse_data_row(&msg.body);
    }
}

/// The relay's message-boundary tracker. The first two bytes choose how the rest is cut
/// into reads; the tracker must end in the same state however the stream was cut, and,
/// told to stop at the first boundary, must stop exactly there.
pub fn relay_boundaries(data: &[u8]) {
    use eastwall::relay::follow_boundaries;
    let (cut, stream) = match data {
        [a, b, rest @ ..] => (u16::from_le_bytes([*a, *b]), rest),
        _ => return,
    };
    let whole = follow_boundaries([stream], false);
    assert_eq!(whole.consumed, stream.len());

    // The same stream in reads of 1..=256 bytes, sizes drawn from `cut`.
    let mut chunks = Vec::new();
    let mut rest = stream;
    let mut seed = u32::from(cut) | 1;
    while !rest.is_empty() {
        seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        let n = ((seed >> 16) as usize % 256 + 1).min(rest.len());
        let (head, tail) = rest.split_at(n);
        chunks.push(head);
        rest = tail;
    }
    let chunked = follow_boundaries(chunks.iter().copied(), false);
    assert_eq!(
        whole, chunked,
        "boundary state depends on how reads were cut"
    );

    // Stopping at the first boundary: never past the stream, and a short stop is a boundary.
    let stopped = follow_boundaries([stream], true);
    assert!(stopped.consumed <= stream.len());
    if stopped.consumed < stream.len() {
        assert!(
            stopped.at_boundary,
            "stopped short of the end off a boundary"
        );
    }
    // ...and it is the first boundary: no shorter non-empty prefix ends at one.
    if stream.len() <= 512 {
        let first = (1..=stream.len())
            .find(|&n| follow_boundaries([&stream[..n]], false).at_boundary)
            .unwrap_or(stream.len());
        assert_eq!(
            stopped.consumed, first,
            "did not stop at the first boundary"
        );
    }
}

/// The startup-parameter screen on arbitrary names and values (NUL-separated pairs; bytes
/// that are not UTF-8 are replaced, as the codec would have refused them).
pub fn params_screen(data: &[u8]) {
    let fields: Vec<String> = data
        .split(|&b| b == 0)
        .map(|f| String::from_utf8_lossy(f).into_owned())
        .collect();
    let params: Vec<(String, String)> = fields
        .chunks(2)
        .map(|pair| (pair[0].clone(), pair.get(1).cloned().unwrap_or_default()))
        .collect();
    if let Ok(screened) = eastwall::params::screen(&params) {
        // Whatever passes the screen goes upstream; nothing handled by the proxy itself may.
        for (name, _) in &screened {
            assert!(
                !["user", "database", "replication", "options"].contains(&name.as_str()),
                "screen let {name:?} through"
            );
        }
    }
}

/// The policy language, with the seed's segment and group names so rules that name them
/// reach the evaluator's tables.
pub fn policy(data: &[u8]) {
    let segments = BTreeMap::from([
        (
            "app".to_owned(),
            vec!["spiffe://corp.example/app/**".to_owned()],
        ),
        (
            "db".to_owned(),
            vec!["spiffe://corp.example/db/**".to_owned()],
        ),
    ]);
    let groups = BTreeMap::from([(
        "human_operators".to_owned(),
        vec!["spiffe://corp.example/app/operators/*".to_owned()],
    )]);
    let text = String::from_utf8_lossy(data);
    if let Ok(policy) = eastwall_config::Policy::parse("fuzz.ew", &text, &segments, &groups) {
        let _ = policy.counts();
        let _ = policy.mfa_groups();
        if let Ok(id) = SpiffeId::parse("spiffe://corp.example/app/operators/alice") {
            let _ = policy.requires_mfa(&id);
            let _ = policy.segments_of(&id);
        }
    }
}

/// `eastwall.toml`, with everything it validates (paths are checked as text, not opened).
pub fn settings_toml(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let _ = eastwall_config::Settings::from_toml(Path::new("/fuzz/eastwall.toml"), &text);
}

/// SPIFFE IDs and trust-domain names. An ID that parses must parse again to itself.
pub fn spiffe_id(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    if let Ok(id) = SpiffeId::parse(&text) {
        assert_eq!(SpiffeId::parse(id.as_str()).as_ref(), Ok(&id));
        let _ = id.segments().count();
        let _ = id.last_segment();
        let td = TrustDomain::parse(id.trust_domain()).expect("an ID's trust domain parses");
        assert!(id.require_trust_domain(&td).is_ok());
    }
    let _ = TrustDomain::parse(&text);
}

/// The X509-SVID checks on arbitrary DER as the leaf of a chain.
pub fn svid_der(data: &[u8]) {
    let td = TrustDomain::parse("corp.example").expect("static trust domain");
    let chain = [CertificateDer::from(data.to_vec())];
    let _ = eastwall::identity::identify(Some(&chain), &td);
}

/// A CSR as `eastwall ca issue --csr FILE` reads it. With a first byte of `-` the input is
/// the file's text as given (PEM framing, labels, several blocks); otherwise it is the DER
/// of the request, wrapped in a CERTIFICATE REQUEST block.
pub fn csr(data: &[u8]) {
    let pem = if data.first() == Some(&b'-') {
        String::from_utf8_lossy(data).into_owned()
    } else {
        let mut pem = String::from("-----BEGIN CERTIFICATE REQUEST-----\n");
        let b64 = base64(data);
        for line in b64.as_bytes().chunks(64) {
            pem.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
            pem.push('\n');
        }
        pem.push_str("-----END CERTIFICATE REQUEST-----\n");
        pem
    };
    let _ = eastwall_ca::csr_public_key(&pem, "fuzz.csr");
}

/// The step-up endpoint's request body (JSON `{"code": "..."}`).
pub fn stepup_body(data: &[u8]) {
    let _ = eastwall::stepup::parse_request(data);
}

/// Standard base64 with padding (the PEM body alphabet).
fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for group in data.chunks(3) {
        let b = [
            group[0],
            *group.get(1).unwrap_or(&0),
            *group.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= group.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

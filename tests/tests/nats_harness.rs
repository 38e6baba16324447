//! The NATS harness itself, on a real nats-server: it starts with TLS from our CA, refuses
//! clients without a certificate from that CA, keeps JetStream data across a restart on the
//! same port, maps SPIFFE IDs to users with their permissions, and is gone when stopped.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::Duration;

use eastwall_e2e::nats::{
    kv_stream_config, log_stream_config, read_info, Nats, NatsOptions, NatsUser, Refusal,
    KV_STREAM, LOG_STREAM,
};
use eastwall_e2e::{port_refuses, Identity, TestPki};
use serde_json::json;

fn pem(id: &Identity) -> (&str, &str) {
    (id.cert_pem.as_str(), id.key_pem.as_str())
}

/// The text of a refusal, or a panic if the connection was not refused.
fn refused(result: anyhow::Result<impl Sized>, what: &str) -> String {
    match result {
        Ok(_) => panic!("{what}: expected the server to refuse, it accepted"),
        Err(e) => {
            assert!(
                e.downcast_ref::<Refusal>().is_some(),
                "{what}: expected a refusal, got another error: {e:#}"
            );
            format!("{e:#}")
        }
    }
}

#[test]
fn requires_tls_and_a_client_certificate_from_our_ca_and_keeps_jetstream_across_a_restart() {
    let pki = TestPki::new("corp.example").expect("pki");
    let mut nats = Nats::start(&pki).expect("start nats-server");
    let port = nats.port();
    assert_eq!(nats.url(), format!("tls://127.0.0.1:{port}"));
    let conf = std::fs::read_to_string(nats.conf_path()).expect("nats.conf");
    assert!(conf.contains("verify: true"), "{conf}");
    assert!(conf.contains("listen: \"127.0.0.1:"), "{conf}");

    // 2.9 speaks first, in plain text, and says TLS with client verification is required.
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let info = read_info(addr).expect("INFO");
    assert!(info.contains("\"tls_required\":true"), "{info}");
    assert!(info.contains("\"tls_verify\":true"), "{info}");
    assert!(info.contains("\"jetstream\":true"), "{info}");

    // A client that stays in plain text after INFO never gets a PONG: the server waits for a
    // TLS ClientHello, takes CONNECT for a bad one and hangs up.
    let mut plain = TcpStream::connect(addr).expect("tcp");
    plain
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut reader = BufReader::new(plain.try_clone().expect("clone"));
    let mut line = String::new();
    reader.read_line(&mut line).expect("INFO line");
    plain
        .write_all(b"CONNECT {\"verbose\":false}\r\nPING\r\n")
        .expect("write");
    let mut rest = Vec::new();
    let _ = reader.read_to_end(&mut rest);
    let rest = String::from_utf8_lossy(&rest);
    assert!(
        !rest.contains("PONG"),
        "a plain-text client was answered: {rest}"
    );

    // No certificate: refused in the TLS handshake.
    let no_cert = refused(nats.raw_client(None), "no client certificate");
    // A certificate for the same SPIFFE ID from another CA: refused too.
    let foreign = TestPki::new("corp.example").expect("foreign pki");
    let impostor = foreign
        .client("impostor", "app/operators/alice", None)
        .expect("foreign cert");
    let foreign_ca = refused(nats.raw_client(Some(pem(&impostor))), "foreign CA");
    let log = nats.log_tail(20);
    assert!(
        log.contains("client didn't provide a certificate"),
        "no_cert={no_cert}\n{log}"
    );
    assert!(
        log.contains("certificate signed by unknown authority"),
        "foreign={foreign_ca}\n{log}"
    );

    // Ours: accepted, and JetStream works: the harness makes the two streams, a client of
    // ours writes a policy and a decision line.
    nats.create_eastwall_streams(5).expect("create streams");
    let alice = pki
        .client("alice", "app/operators/alice", None)
        .expect("alice");
    let mut client = nats
        .raw_client(Some(pem(&alice)))
        .expect("our client connects");
    let ack = client
        .request("$KV.eastwall.policy", b"allow all")
        .expect("put the policy");
    let ack: serde_json::Value = serde_json::from_slice(&ack).expect("ack json");
    assert_eq!(ack["stream"], KV_STREAM, "{ack}");
    let ack = client
        .request("eastwall.log.a", b"{\"decision\":\"allow\"}")
        .expect("publish to the stream");
    let ack: serde_json::Value = serde_json::from_slice(&ack).expect("ack json");
    assert_eq!(ack["stream"], LOG_STREAM, "{ack}");
    assert_eq!(ack["seq"], 1, "{ack}");
    drop(client);

    nats.stop();
    assert!(!nats.is_running());
    assert!(port_refuses(port), "port {port} still open after stop");
    nats.stop(); // idempotent

    nats.restart().expect("restart");
    assert_eq!(nats.port(), port, "restart keeps the port");
    let mut client = nats
        .raw_client(Some(pem(&alice)))
        .expect("connects after restart");
    let stream = client
        .request_json(&format!("$JS.API.STREAM.INFO.{LOG_STREAM}"), &json!({}))
        .expect("stream info");
    assert_eq!(stream["state"]["messages"], 1, "{stream}");
    drop(client);
    let kv = nats.stream_info(KV_STREAM).expect("kv stream info");
    assert_eq!(kv["state"]["messages"], 1, "{kv}");
    assert_eq!(kv["config"]["max_msgs_per_subject"], 5, "{kv}");
    assert_eq!(kv["config"]["allow_direct"], true, "{kv}");

    // A restart while running works too, and Drop stops it.
    nats.restart().expect("restart while running");
    assert!(nats.is_running());
    drop(nats);
    assert!(port_refuses(port), "port {port} still open after drop");
}

#[test]
fn verify_and_map_names_clients_by_spiffe_id_and_applies_their_permissions() {
    let pki = TestPki::new("corp.example").expect("pki");
    let sidecar = pki
        .server("sidecar-a", "db/eastwall-a")
        .expect("sidecar cert");
    let operator = pki
        .client("alice", "app/operators/alice", None)
        .expect("operator cert");
    let stranger = pki
        .client("stranger", "app/stranger", None)
        .expect("stranger cert");
    let opts = NatsOptions {
        users: vec![
            NatsUser::sidecar(pki.spiffe_id("db/eastwall-a").unwrap().as_str(), "a"),
            NatsUser::operator(pki.spiffe_id("app/operators/alice").unwrap().as_str()),
        ],
        debug: true,
        trace: false,
    };
    let nats = Nats::start_with(pki.ca(), opts).expect("start nats-server");
    let conf = std::fs::read_to_string(nats.conf_path()).expect("nats.conf");
    assert!(conf.contains("verify_and_map: true"), "{conf}");

    // From our CA but not a user: refused after the handshake.
    let err = refused(nats.raw_client(Some(pem(&stranger))), "unlisted SPIFFE ID");
    assert!(err.contains("Authorization Violation"), "{err}");

    // The operator creates the log stream and writes policy and locks, not heads or logs.
    let mut op = nats.raw_client(Some(pem(&operator))).expect("operator");
    let created = op
        .request_json(
            &format!("$JS.API.STREAM.CREATE.{LOG_STREAM}"),
            &log_stream_config(1),
        )
        .expect("operator creates the log stream");
    assert!(created.get("error").is_none(), "{created}");
    op.publish("$KV.eastwall.policy", b"p").expect("policy");
    op.publish("$KV.eastwall.lock.42", b"l").expect("lock");
    let err = refused(op.publish("eastwall.log.a.head", b"h"), "operator head");
    assert!(err.contains("Permissions Violation"), "{err}");
    drop(op);
    let mut op = nats.raw_client(Some(pem(&operator))).expect("operator");
    let err = refused(op.publish("eastwall.log.a", b"x"), "operator log");
    assert!(err.contains("Permissions Violation"), "{err}");

    // The sidecar publishes on its own log and head subjects only.
    let mut sc = nats.raw_client(Some(pem(&sidecar))).expect("sidecar");
    let ack = sc.request("eastwall.log.a", b"line").expect("own log");
    assert!(String::from_utf8_lossy(&ack).contains("\"seq\":1"));
    let ack = sc.request("eastwall.log.a.head", b"h").expect("own head");
    assert!(String::from_utf8_lossy(&ack).contains("\"seq\":2"));
    for subject in [
        "eastwall.log.b",
        "eastwall.log.b.head",
        "$KV.eastwall.head.a",
        "$KV.eastwall.policy",
        "$KV.eastwall.lock.1",
    ] {
        let mut sc = nats.raw_client(Some(pem(&sidecar))).expect("sidecar");
        let err = refused(sc.publish(subject, b"x"), subject);
        assert!(err.contains("Permissions Violation"), "{subject}: {err}");
    }
    // Nor may it create or delete streams (the connection survives a refused publish).
    let mut sc = nats.raw_client(Some(pem(&sidecar))).expect("sidecar");
    for (subject, body) in [
        (
            format!("$JS.API.STREAM.CREATE.{KV_STREAM}"),
            kv_stream_config(5, 1).to_string(),
        ),
        (format!("$JS.API.STREAM.DELETE.{LOG_STREAM}"), String::new()),
    ] {
        let err = refused(sc.request(&subject, body.as_bytes()), &subject);
        assert!(err.contains("Permissions Violation"), "{subject}: {err}");
    }
    sc.publish("eastwall.log.a", b"still connected")
        .expect("the connection is still usable");

    // The server logged which name it mapped each certificate to.
    let log = nats.log_tail(200);
    assert!(
        log.contains("Using URI found in cert for auth [\"spiffe://corp.example/db/eastwall-a\"]"),
        "{log}"
    );
}

#[test]
fn serves_a_quickstart_layouts_ca_and_its_proxy_certificate() {
    let dir = tempfile::tempdir().expect("tmp");
    let opts = eastwall::quickstart::Options::new(dir.path().join("sidecar"), "127.0.0.1:1".into());
    let layout = eastwall::quickstart::quickstart(&opts).expect("quickstart");
    let ca = eastwall_ca::Ca::open(&layout.dir.join("ca")).expect("open CA");
    let nats = Nats::start_with_ca(&ca).expect("start nats-server");
    let cert = std::fs::read_to_string(layout.dir.join("certs/proxy.pem")).expect("proxy cert");
    let key = std::fs::read_to_string(layout.dir.join("certs/proxy.key")).expect("proxy key");
    nats.raw_client(Some((&cert, &key)))
        .expect("the proxy certificate connects");
    let (cert, key) = {
        let alice = layout.identity("alice").expect("alice");
        (
            std::fs::read_to_string(&alice.cert).expect("cert"),
            std::fs::read_to_string(&alice.key).expect("key"),
        )
    };
    nats.raw_client(Some((&cert, &key)))
        .expect("an operator certificate connects");
}

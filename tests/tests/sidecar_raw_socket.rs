//! The front door against hand-made bytes on a raw socket: protocol violations are closed
//! (and logged), the startup negotiations PostgreSQL allows still work, and the proxy keeps
//! serving billing after each.

mod sidecar_common;

use std::time::{Duration, Instant};

use bytes::{BufMut, BytesMut};
use eastwall_e2e::sidecar::{Deployment, SidecarOptions};
use sidecar_common::{
    assert_still_serves, gssenc_request, one_decision, read_to_close, ssl_request, startup,
    startup_with_version, tcp, tls_over, with_reason, MsgReader, READ_TIMEOUT,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::timeout;

const CLOSE_WITHIN: Duration = Duration::from_secs(5);

async fn read_byte(sock: &mut tokio::net::TcpStream) -> anyhow::Result<u8> {
    let mut b = [0u8; 1];
    timeout(READ_TIMEOUT, sock.read_exact(&mut b)).await??;
    Ok(b[0])
}

#[tokio::test]
async fn bytes_pipelined_after_ssl_request_close_the_connection() -> anyhow::Result<()> {
    let d = Deployment::start(SidecarOptions::default()).await?;
    let mut sock = tcp(&d).await?;
    // CVE-2021-23214: plaintext queued behind SSLRequest must never be read as if it had
    // arrived inside TLS. One write, so both are in the proxy's buffer together.
    let mut both = ssl_request();
    both.extend_from_slice(&startup("billing", "postgres"));
    sock.write_all(&both).await?;
    let reply = read_to_close(&mut sock, CLOSE_WITHIN).await?;
    assert!(reply.is_empty(), "no 'S', nothing at all: {reply:?}");
    let line = one_decision(&d, |l| l["reason"] == "data_after_ssl_request").await?;
    assert_eq!(line["decision"], "deny");
    assert_still_serves(&d).await
}

#[tokio::test]
async fn startup_lengths_out_of_bounds_close_the_connection() -> anyhow::Result<()> {
    let d = Deployment::start(SidecarOptions::default()).await?;
    for len in [10_001u32, 0xFFFF_FFFF, 7, 0] {
        let mut sock = tcp(&d).await?;
        let mut packet = BytesMut::new();
        packet.put_u32(len);
        packet.put_u32(eastwall::codec::PROTOCOL_3_0);
        packet.put_slice(&[b'x'; 64]);
        sock.write_all(&packet).await?;
        let reply = read_to_close(&mut sock, CLOSE_WITHIN).await?;
        assert!(reply.is_empty(), "length {len}: {reply:?}");
    }
    // Logged one line per connection, each naming the length.
    d.wait_for_decision(|_| true).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let lines = with_reason(&d, "bad_length")?;
    assert_eq!(lines.len(), 4, "{:#?}", d.decisions()?);
    assert!(lines[0]["detail"]
        .as_str()
        .is_some_and(|s| s.contains("10001")));
    assert_still_serves(&d).await
}

#[tokio::test]
async fn garbage_is_closed() -> anyhow::Result<()> {
    let d = Deployment::start(SidecarOptions::default()).await?;
    let garbage: [&[u8]; 4] = [
        b"GET / HTTP/1.1\r\nHost: db\r\n\r\n",
        // Looks like a TLS record, is not one.
        &[0x16, 0x03, 0x01, 0x00, 0x05, 0xde, 0xad, 0xbe, 0xef, 0x00],
        // A plausible length, then a startup with no terminators.
        &[
            0, 0, 0, 16, 0, 3, 0, 0, b'u', b's', b'e', b'r', b'x', b'y', b'z', b'w',
        ],
        &[0xa5; 300],
    ];
    for bytes in garbage {
        let mut sock = tcp(&d).await?;
        sock.write_all(bytes).await?;
        let reply = read_to_close(&mut sock, CLOSE_WITHIN).await?;
        assert!(
            reply.is_empty() || reply[0] == 0x15,
            "only a close or a TLS alert: {reply:?}"
        );
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let lines = d.decisions()?;
    assert_eq!(lines.len(), 4, "one refusal line each: {lines:#?}");
    assert!(lines.iter().all(|l| l["decision"] == "deny"));
    assert_still_serves(&d).await
}

#[tokio::test]
async fn a_silent_client_is_dropped_at_the_startup_timeout() -> anyhow::Result<()> {
    let d = Deployment::start(SidecarOptions {
        edit_config: Some(Box::new(|text: &mut String| {
            text.push_str("\n[limits]\nstartup_timeout = \"1s\"\n");
        })),
        ..SidecarOptions::default()
    })
    .await?;
    let started = Instant::now();
    let mut silent = tcp(&d).await?;
    // And one that stops halfway through its startup packet.
    let mut halfway = tcp(&d).await?;
    halfway
        .write_all(&startup("billing", "postgres")[..10])
        .await?;

    let reply = read_to_close(&mut silent, CLOSE_WITHIN).await?;
    assert!(reply.is_empty());
    let reply = read_to_close(&mut halfway, CLOSE_WITHIN).await?;
    assert!(reply.is_empty());
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(900),
        "dropped before the timeout: {waited:?}"
    );
    d.wait_for_decision(|l| l["reason"] == "startup_timeout")
        .await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(with_reason(&d, "startup_timeout")?.len(), 2);
    assert_still_serves(&d).await
}

#[tokio::test]
async fn gssenc_request_is_declined_then_tls_proceeds() -> anyhow::Result<()> {
    let d = Deployment::start(SidecarOptions::default()).await?;
    // libpq with gssencmode=prefer: GSSENCRequest, 'N', then SSLRequest on the same socket.
    let mut sock = tcp(&d).await?;
    sock.write_all(&gssenc_request()).await?;
    assert_eq!(read_byte(&mut sock).await?, b'N');
    sock.write_all(&ssl_request()).await?;
    assert_eq!(read_byte(&mut sock).await?, b'S');
    let tls = tls_over(sock, d.tls_for("billing")?).await?;
    let mut session = MsgReader::new(tls);
    session.send(&startup("billing", "postgres")).await?;
    let msgs = session.until_ready().await?;
    assert_eq!(msgs[0].tag, b'R');
    assert_eq!(msgs[0].body, [0, 0, 0, 0], "AuthenticationOk");

    // A second GSSENCRequest is a protocol violation.
    let mut sock = tcp(&d).await?;
    sock.write_all(&gssenc_request()).await?;
    assert_eq!(read_byte(&mut sock).await?, b'N');
    sock.write_all(&gssenc_request()).await?;
    let reply = read_to_close(&mut sock, CLOSE_WITHIN).await?;
    assert!(reply.is_empty(), "{reply:?}");
    let line = one_decision(&d, |l| l["reason"] == "protocol_violation").await?;
    assert!(line["detail"]
        .as_str()
        .is_some_and(|s| s.contains("GSSENCRequest")));
    assert_still_serves(&d).await
}

#[tokio::test]
async fn direct_tls_needs_alpn_postgresql() -> anyhow::Result<()> {
    let d = Deployment::start(SidecarOptions::default()).await?;

    // PG17 direct TLS without ALPN: the handshake may finish, the session does not start.
    let sock = tcp(&d).await?;
    let refused = match tls_over(sock, d.tls_for("billing")?).await {
        Err(_) => true,
        Ok(tls) => {
            let mut session = MsgReader::new(tls);
            let _ = session.send(&startup("billing", "postgres")).await;
            let reply = read_to_close(&mut session.stream, CLOSE_WITHIN).await?;
            reply.is_empty()
        }
    };
    assert!(refused, "direct TLS without ALPN must not start a session");
    one_decision(&d, |l| l["reason"] == "direct_tls_without_alpn").await?;

    // With ALPN "postgresql" it is a normal session.
    let mut config = d.tls_for("billing")?;
    config.alpn_protocols = vec![b"postgresql".to_vec()];
    let tls = tls_over(tcp(&d).await?, config).await?;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"postgresql"[..]));
    let mut session = MsgReader::new(tls);
    session.send(&startup("billing", "postgres")).await?;
    let msgs = session.until_ready().await?;
    assert_eq!(
        (msgs[0].tag, &msgs[0].body[..]),
        (b'R', &[0u8, 0, 0, 0][..])
    );
    session.send(&sidecar_common::query("select 6 * 7")).await?;
    let msgs = session.until_ready().await?;
    let row = msgs.iter().find(|m| m.tag == b'D').expect("a DataRow");
    assert!(row.body.ends_with(b"42"), "{row:?}");
    assert_still_serves(&d).await
}

#[tokio::test]
async fn newer_protocol_minor_gets_negotiate_protocol_version() -> anyhow::Result<()> {
    let d = Deployment::start(SidecarOptions::default()).await?;
    let mut sock = tcp(&d).await?;
    sock.write_all(&ssl_request()).await?;
    assert_eq!(read_byte(&mut sock).await?, b'S');
    let tls = tls_over(sock, d.tls_for("billing")?).await?;
    let mut session = MsgReader::new(tls);
    session
        .send(&startup_with_version(
            0x0003_0002,
            &[
                ("user", "billing"),
                ("database", "postgres"),
                ("_pq_.foo", "bar"),
            ],
        ))
        .await?;
    let msgs = session.until_ready().await?;
    assert_eq!(msgs[0].tag, b'v', "{msgs:?}");
    let v = &msgs[0].body;
    assert_eq!(&v[..4], &[0, 3, 0, 0], "we speak 3.0");
    assert_eq!(&v[4..8], &[0, 0, 0, 1], "one option not understood");
    assert_eq!(&v[8..], b"_pq_.foo\0");
    assert_eq!(
        (msgs[1].tag, &msgs[1].body[..]),
        (b'R', &[0u8, 0, 0, 0][..])
    );
    assert_still_serves(&d).await
}

#[tokio::test]
async fn tls_sessions_are_never_resumed() -> anyhow::Result<()> {
    let d = Deployment::start(SidecarOptions::default()).await?;
    // One client config, so a resumable session would be offered on the second handshake;
    // resumption would skip the CRL and expiry checks of the client certificate.
    let config = d.tls_for("billing")?;
    for round in 0..2 {
        let mut sock = tcp(&d).await?;
        sock.write_all(&ssl_request()).await?;
        assert_eq!(read_byte(&mut sock).await?, b'S');
        let tls = tls_over(sock, config.clone()).await?;
        assert_eq!(
            tls.get_ref().1.handshake_kind(),
            Some(rustls::HandshakeKind::Full),
            "round {round}"
        );
        let mut session = MsgReader::new(tls);
        session.send(&startup("billing", "postgres")).await?;
        session.until_ready().await?;
    }
    Ok(())
}

#[tokio::test]
async fn encryption_request_inside_tls_is_a_violation() -> anyhow::Result<()> {
    let d = Deployment::start(SidecarOptions::default()).await?;
    let mut sock = tcp(&d).await?;
    sock.write_all(&ssl_request()).await?;
    assert_eq!(read_byte(&mut sock).await?, b'S');
    let tls = tls_over(sock, d.tls_for("billing")?).await?;
    let mut session = MsgReader::new(tls);
    session.send(&ssl_request()).await?;
    let reply = read_to_close(&mut session.stream, CLOSE_WITHIN).await?;
    assert!(reply.is_empty(), "{reply:?}");
    let line = one_decision(&d, |l| l["reason"] == "protocol_violation").await?;
    assert!(line["detail"]
        .as_str()
        .is_some_and(|s| s.contains("inside TLS")));
    assert_still_serves(&d).await
}

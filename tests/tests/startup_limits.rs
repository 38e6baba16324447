//! `[limits] max_startups_per_source`: one host holding connections open before admission
//! cannot lock other hosts out; admitted sessions do not count against it.

use std::net::SocketAddr;
use std::time::Duration;

use eastwall_e2e::sidecar::{Deployment, SidecarOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

async fn connect_from(source: &str, to: SocketAddr) -> anyhow::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(format!("{source}:0").parse()?)?;
    Ok(socket.connect(to).await?)
}

/// Sends SSLRequest and returns the one-byte answer, or None when the proxy closed instead.
async fn ssl_answer(stream: &mut TcpStream) -> anyhow::Result<Option<u8>> {
    stream.write_all(&SSL_REQUEST).await?;
    let mut byte = [0u8; 1];
    match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut byte)).await? {
        Ok(0) | Err(_) => Ok(None),
        Ok(_) => Ok(Some(byte[0])),
    }
}

#[tokio::test]
async fn a_host_holding_startups_open_is_capped_and_others_are_served() -> anyhow::Result<()> {
    let d = Deployment::start(SidecarOptions {
        edit_config: Some(Box::new(|text: &mut String| {
            text.push_str("\n[limits]\nmax_startups_per_source = 2\nstartup_timeout = \"20s\"\n");
        })),
        ..SidecarOptions::default()
    })
    .await?;
    let addr = d.addr();

    // Admitted sessions do not hold startup slots: three from one host with a cap of two.
    let mut admitted = Vec::new();
    for _ in 0..3 {
        admitted.push(d.connect("billing", "billing").await?);
    }
    for client in &admitted {
        client.simple_query("select 1").await?;
    }

    // Two silent connections from 127.0.0.1 fill its startup budget...
    let silent_a = connect_from("127.0.0.1", addr).await?;
    let silent_b = connect_from("127.0.0.1", addr).await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    // ...so a third from the same host is closed without an answer,
    let mut third = connect_from("127.0.0.1", addr).await?;
    assert_eq!(
        ssl_answer(&mut third).await?,
        None,
        "the third startup is refused"
    );
    // while another host is served as usual.
    let mut other = connect_from("127.0.0.2", addr).await?;
    assert_eq!(
        ssl_answer(&mut other).await?,
        Some(b'S'),
        "another source is served"
    );

    // Once the silent ones go, the host gets its budget back.
    drop((silent_a, silent_b));
    let mut served = false;
    for _ in 0..50 {
        let mut again = connect_from("127.0.0.1", addr).await?;
        if ssl_answer(&mut again).await? == Some(b'S') {
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        served,
        "the budget came back after the silent connections closed"
    );
    let client = d.connect("billing", "billing").await?;
    client.simple_query("select 1").await?;
    Ok(())
}

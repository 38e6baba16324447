//! Who ended a session, through the real `eastwall proxy` binary: once the client has said
//! Terminate, the session is over by the client's word, whatever order the transport's
//! closes then arrive in. psql writes its Terminate and its TLS close_notify separately (the
//! server may close in between); other clients close the socket without a close_notify, or
//! reset it. Each is `client_closed`, never `server_closed` or `client_error`. Without a
//! Terminate, an abrupt close stays `client_error`.

mod sidecar_common;

use std::io::{BufRead, BufReader};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use eastwall_e2e::sidecar::{read_decisions, Deployment, SidecarOptions};
use serde_json::Value;
use sidecar_common::{query, ssl_request, startup, tls_over, MsgReader, READ_TIMEOUT};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{sleep, timeout};
use tokio_rustls::client::TlsStream;

const TERMINATE: [u8; 5] = [b'X', 0, 0, 0, 4];
/// Long enough for PostgreSQL to have acted on a Terminate and closed.
const PAUSE: Duration = Duration::from_millis(300);

/// `eastwall proxy` on its own port and decision log, from the deployment's layout.
struct Proxy {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn spawn_proxy(d: &Deployment) -> anyhow::Result<Proxy> {
    let bin = tokio::task::spawn_blocking(eastwall_e2e::eastwall_bin).await??;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let text = std::fs::read_to_string(&d.layout.config)?
        .replace(
            "address = \"127.0.0.1:0\"",
            &format!("address = \"127.0.0.1:{port}\""),
        )
        .replace("path = \"decisions.log\"", "path = \"decisions-bin.log\"");
    let config = d.layout.dir.join("bin.toml");
    std::fs::write(&config, text)?;
    let mut child = Command::new(bin)
        .args(["proxy", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let stderr = child.stderr.take().ok_or_else(|| anyhow!("no stderr"))?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let proxy = Proxy {
        child,
        port,
        log: d.layout.dir.join("decisions-bin.log"),
    };
    let listening = tokio::task::spawn_blocking(move || {
        while let Ok(line) = rx.recv_timeout(Duration::from_secs(20)) {
            if line.contains("eastwall: listening on") {
                return true;
            }
        }
        false
    })
    .await?;
    if !listening {
        bail!("eastwall proxy did not start listening");
    }
    Ok(proxy)
}

/// A raw TLS session as billing through the binary, after one query; and its source port,
/// which names it in the decision log.
async fn session(
    d: &Deployment,
    proxy: &Proxy,
) -> anyhow::Result<(MsgReader<TlsStream<TcpStream>>, u16)> {
    let mut tcp = TcpStream::connect(("127.0.0.1", proxy.port)).await?;
    let local = tcp.local_addr()?.port();
    tcp.write_all(&ssl_request()).await?;
    let mut answer = [0u8; 1];
    timeout(READ_TIMEOUT, tcp.read_exact(&mut answer)).await??;
    anyhow::ensure!(answer[0] == b'S', "proxy answered {:?}", answer[0] as char);
    let mut s = MsgReader::new(tls_over(tcp, d.tls_for("billing")?).await?);
    s.send(&startup("billing", "postgres")).await?;
    s.until_ready().await?;
    s.send(&query("select 1")).await?;
    s.until_ready().await?;
    Ok((s, local))
}

/// The session_end line of the session from source port `port`, waited for.
async fn end_of(proxy: &Proxy, port: u16) -> anyhow::Result<Value> {
    let peer = format!("127.0.0.1:{port}");
    let until = Instant::now() + READ_TIMEOUT;
    loop {
        if let Some(end) = read_decisions(&proxy.log)?
            .into_iter()
            .find(|l| l["event"] == "session_end" && l["peer"] == peer.as_str())
        {
            return Ok(end);
        }
        if Instant::now() > until {
            bail!("no session_end for {peer} in {}", proxy.log.display());
        }
        sleep(Duration::from_millis(50)).await;
    }
}

/// Writes `bytes` inside TLS as their own record, and pushes it out.
async fn write_now(s: &mut MsgReader<TlsStream<TcpStream>>, bytes: &[u8]) -> anyhow::Result<()> {
    s.stream.write_all(bytes).await?;
    s.stream.flush().await?;
    Ok(())
}

/// Closes the TCP socket under the TLS session, with no close_notify; with `reset`, as an RST
/// (SO_LINGER 0).
fn drop_socket(s: MsgReader<TlsStream<TcpStream>>, reset: bool) -> anyhow::Result<()> {
    let (tcp, _) = s.stream.into_inner();
    if reset {
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        // SAFETY: a valid, open socket fd and a correctly sized option value.
        let rc = unsafe {
            libc::setsockopt(
                tcp.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&linger as *const libc::linger).cast(),
                std::mem::size_of::<libc::linger>() as libc::socklen_t,
            )
        };
        anyhow::ensure!(rc == 0, "SO_LINGER: {}", std::io::Error::last_os_error());
    }
    drop(tcp);
    Ok(())
}

/// psql's two writes, with a pause between them: Terminate, then (after the server has
/// closed and the proxy has passed that on, unread) the TLS close_notify. And Terminate's
/// five bytes themselves split over two writes with a pause, then the close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminate_then_a_later_close_notify_is_client_closed() -> anyhow::Result<()> {
    let d = Deployment::start(SidecarOptions::default()).await?;
    let proxy = spawn_proxy(&d).await?;

    let (mut s, paused) = session(&d, &proxy).await?;
    write_now(&mut s, &TERMINATE).await?;
    sleep(PAUSE).await;
    s.stream.shutdown().await?;
    let rest = sidecar_common::read_to_close(&mut s.stream, READ_TIMEOUT).await?;
    assert!(rest.is_empty(), "{rest:?}");

    let (mut s, split) = session(&d, &proxy).await?;
    write_now(&mut s, &TERMINATE[..1]).await?;
    sleep(PAUSE).await;
    write_now(&mut s, &TERMINATE[1..]).await?;
    sleep(PAUSE).await;
    s.stream.shutdown().await?;
    let rest = sidecar_common::read_to_close(&mut s.stream, READ_TIMEOUT).await?;
    assert!(rest.is_empty(), "{rest:?}");

    for port in [paused, split] {
        let end = end_of(&proxy, port).await?;
        assert_eq!(end["reason"], "client_closed", "{end}");
    }
    Ok(())
}

/// Terminate, then the socket closed with no close_notify (a FIN the proxy reads as a TLS
/// error), or reset: still the client's end. Sent at once, so the client's close reaches the
/// proxy before PostgreSQL has closed; and after a pause, when it arrives after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminate_then_an_abrupt_close_is_client_closed() -> anyhow::Result<()> {
    let d = Deployment::start(SidecarOptions::default()).await?;
    let proxy = spawn_proxy(&d).await?;
    let mut ports = Vec::new();
    for reset in [false, true] {
        for pause in [Duration::ZERO, PAUSE] {
            let (mut s, port) = session(&d, &proxy).await?;
            write_now(&mut s, &TERMINATE).await?;
            sleep(pause).await;
            drop_socket(s, reset)?;
            ports.push((port, reset, pause));
        }
    }
    for (port, reset, pause) in ports {
        let end = end_of(&proxy, port).await?;
        assert_eq!(
            end["reason"], "client_closed",
            "reset {reset}, pause {pause:?}: {end}"
        );
    }
    Ok(())
}

/// Without a Terminate, a socket dropped mid-session is not a clean close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abrupt_close_without_terminate_is_client_error() -> anyhow::Result<()> {
    let d = Deployment::start(SidecarOptions::default()).await?;
    let proxy = spawn_proxy(&d).await?;
    let mut ports = Vec::new();
    for reset in [false, true] {
        let (s, port) = session(&d, &proxy).await?;
        drop_socket(s, reset)?;
        ports.push((port, reset));
    }
    for (port, reset) in ports {
        let end = end_of(&proxy, port).await?;
        assert_eq!(end["reason"], "client_error", "reset {reset}: {end}");
    }
    Ok(())
}

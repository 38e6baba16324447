//! The fleet end to end: a real `nats-server -js` with TLS from the test CA, three sidecars in
//! front of two PostgreSQL clusters, and the `eastwall` CLI as an operator runs it.
//!
//! - A policy pushed once is in force on all three (live sessions it no longer allows end);
//!   a broken policy, or a push signed by an identity outside `[fleet] admins`, is refused
//!   before anything is published.
//! - A lock pushed once ends the matching live sessions on all three within 2 s and refuses
//!   their next connection; its signed removal lifts it everywhere.
//! - With NATS stopped, every sidecar serves on its last good state and reports staleness;
//!   past `max_staleness` new connections are refused (57P03); NATS restarted, service
//!   returns without a sidecar restart.
//! - A decision line rewritten (chain recomputed) in one sidecar's local log passes a plain
//!   `audit verify` but fails `audit verify --fleet`; an attacker walking databases behind
//!   two sidecars fires `fan_out` in `audit detect --fleet`, though neither sidecar alone
//!   saw enough.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, ensure, Context};
use eastwall::quickstart::{self, Layout, UpstreamAuth};
use eastwall::server::Running;
use eastwall_e2e::nats::{Nats, NatsOptions, NatsUser};
use eastwall_e2e::{client_config, connect_watching, pg_config, Identity, TestPki};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_postgres::config::SslMode;

const TD: &str = "corp.example";
const BILLING: &str = "spiffe://corp.example/app/billing";
/// The containment bound a fleet lock or policy must meet on every sidecar.
const BOUND: Duration = Duration::from_secs(2);

/// One sidecar of the fleet: its layout (own server CA, shared client CA) and the running proxy.
struct Side {
    name: String,
    layout: Layout,
    proxy: Running,
    _dir: tempfile::TempDir,
}

struct Fleet {
    pki: TestPki,
    nats: Nats,
    sides: Vec<Side>,
    _clusters: Vec<eastwall::pgcluster::Cluster>,
    billing: Identity,
    laptop: Identity,
    dana: Identity,
}

fn quote(p: &Path) -> String {
    format!("{:?}", p.display().to_string())
}

/// A sidecar named `name` in front of PostgreSQL on `port`, trusting the shared CA for
/// clients and joining the fleet at `nats` with its own fleet SVID.
async fn side(name: &str, port: u16, pki: &TestPki, nats: &Nats) -> anyhow::Result<Side> {
    let dir = tempfile::Builder::new()
        .prefix("eastwall-fleet-")
        .tempdir()?;
    let mut qs = quickstart::Options::new(dir.path().join(name), format!("127.0.0.1:{port}"));
    qs.listen = "127.0.0.1:0".parse()?;
    qs.admin_listen = Some("127.0.0.1:0".parse()?);
    qs.stepup_listen = None;
    qs.upstream_auth = UpstreamAuth::Trust;
    let layout = quickstart::quickstart(&qs)?;
    let svid = pki.client(
        &format!("fleet-{name}"),
        &format!("db/eastwall-{name}"),
        None,
    )?;
    let ca = pki.ca();
    let text = std::fs::read_to_string(&layout.config)?.replace(
        "client_ca = \"ca/ca.pem\"\ncrl = \"ca/crl.pem\"",
        &format!(
            "client_ca = {}\ncrl = {}",
            quote(&ca.cert_path()),
            quote(&ca.crl_path())
        ),
    );
    ensure!(
        text.contains(&quote(&ca.cert_path())),
        "quickstart's [listen] changed; update this test"
    );
    let text = format!(
        "{text}\n[fleet]\nnats = \"{url}\"\nname = \"{name}\"\nadmins = [\"spiffe://{TD}/ops/dbas/*\"]\ncert = {cert}\nkey = {key}\nca = {ca}\nmax_staleness = \"3s\"\nhead_interval = \"1s\"\n",
        url = nats.url(),
        cert = quote(&svid.cert_path),
        key = quote(&svid.key_path),
        ca = quote(&ca.cert_path()),
    );
    std::fs::write(&layout.config, text)?;
    let config = eastwall_config::Config::load(&layout.config)
        .map_err(|e| anyhow!("{}", e.lines().join("\n")))?;
    let proxy = eastwall::server::start(config).await?;
    Ok(Side {
        name: name.to_owned(),
        layout,
        proxy,
        _dir: dir,
    })
}

impl Fleet {
    async fn start() -> anyhow::Result<Fleet> {
        let pki = TestPki::new(TD)?;
        // Every identity mapped to its NATS user, with the permissions docs/fleet-nats.md
        // gives: sidecars read the bucket and publish their own log, the operator writes.
        let users = vec![
            NatsUser::sidecar(format!("spiffe://{TD}/db/eastwall-s1"), "s1"),
            NatsUser::sidecar(format!("spiffe://{TD}/db/eastwall-s2"), "s2"),
            NatsUser::sidecar(format!("spiffe://{TD}/db/eastwall-s3"), "s3"),
            NatsUser::operator(format!("spiffe://{TD}/ops/dbas/dana")),
        ];
        let nats = Nats::start_with(
            pki.ca(),
            NatsOptions {
                users,
                trace: std::env::var_os("FLEET_TRACE").is_some(),
                ..Default::default()
            },
        )?;
        let mut clusters = Vec::new();
        for _ in 0..2 {
            let cluster = eastwall_e2e::pg().start()?;
            for role in ["billing", "finance-laptop"] {
                cluster.run_sql(&format!("CREATE ROLE \"{role}\" LOGIN"))?;
            }
            clusters.push(cluster);
        }
        let mut sides = Vec::new();
        // Two sidecars share the second cluster: three walls, two databases.
        for (name, cluster) in [
            ("s1", &clusters[0]),
            ("s2", &clusters[1]),
            ("s3", &clusters[1]),
        ] {
            sides.push(side(name, cluster.port(), &pki, &nats).await?);
        }
        let billing = pki.client("billing", "app/billing", None)?;
        let laptop = pki.client("laptop", "workstations/finance-laptop", None)?;
        let dana = pki.client("dana", "ops/dbas/dana", None)?;
        Ok(Fleet {
            pki,
            nats,
            sides,
            _clusters: clusters,
            billing,
            laptop,
            dana,
        })
    }

    /// Runs `eastwall ARGS` with the operator's config (s1's) and returns (ok, stdout, stderr).
    async fn eastwall(&self, args: &[&str]) -> anyhow::Result<(bool, String, String)> {
        let bin = tokio::task::spawn_blocking(eastwall_e2e::eastwall_bin).await??;
        let out = tokio::time::timeout(
            Duration::from_secs(60),
            tokio::process::Command::new(bin)
                .args(args)
                .kill_on_drop(true)
                .output(),
        )
        .await
        .context("eastwall did not finish within 60 s")??;
        Ok((
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    }

    fn operator_config(&self) -> &Path {
        &self.sides[0].layout.config
    }

    /// `eastwall fleet push` of `policy` (written beside s1's config) signed by `signer`.
    async fn push(
        &self,
        policy: &str,
        signer: &Identity,
    ) -> anyhow::Result<(bool, String, String)> {
        let dir = &self.sides[0].layout.dir;
        std::fs::write(dir.join("push.ew"), policy)?;
        let text = std::fs::read_to_string(self.operator_config())?
            .replace("file = \"policy.ew\"", "file = \"push.ew\"");
        let push_config = dir.join("push.toml");
        std::fs::write(&push_config, text)?;
        let cfg = push_config.display().to_string();
        let cert = signer.cert_path.display().to_string();
        let key = signer.key_path.display().to_string();
        self.eastwall(&[
            "fleet", "push", "--config", &cfg, "--cert", &cert, "--key", &key,
        ])
        .await
    }

    async fn connect(
        &self,
        side: &Side,
        who: &Identity,
        role: &str,
        db: &str,
    ) -> Result<
        (
            tokio_postgres::Client,
            tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>,
        ),
        tokio_postgres::Error,
    > {
        let server_ca = std::fs::read_to_string(&side.layout.ca_cert).unwrap_or_default();
        let tls = client_config(&server_ca, Some((&who.cert_pem, &who.key_pem))).expect("tls");
        let mut config = pg_config("localhost", side.proxy.local_addr.port(), role, db);
        config.ssl_mode(SslMode::Require);
        connect_watching(&config, tls).await
    }

    fn dana_args(&self) -> [String; 4] {
        [
            "--cert".into(),
            self.dana.cert_path.display().to_string(),
            "--key".into(),
            self.dana.key_path.display().to_string(),
        ]
    }
}

fn decisions(side: &Side) -> anyhow::Result<Vec<Value>> {
    eastwall_e2e::sidecar::read_decisions(&side.layout.dir.join("decisions.log"))
}

/// Waits (bounded) for a decision line on `side` matching `pred`.
async fn wait_line(
    side: &Side,
    what: &str,
    pred: impl Fn(&Value) -> bool,
) -> anyhow::Result<Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(line) = decisions(side)?.into_iter().find(|l| pred(l)) {
            return Ok(line);
        }
        ensure!(
            Instant::now() < deadline,
            "{}: no {what} line within 10 s",
            side.name
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn describe(err: &tokio_postgres::Error) -> String {
    match err.as_db_error() {
        Some(e) => format!("{} {}", e.code().code(), e.message()),
        None => err.to_string(),
    }
}

fn sqlstate(err: &tokio_postgres::Error) -> String {
    err.as_db_error()
        .map(|e| e.code().code().to_owned())
        .unwrap_or_else(|| format!("no SQLSTATE: {err}"))
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let mut tcp = tokio::net::TcpStream::connect(addr).await?;
    tcp.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut raw)).await??;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Ok((status, text))
}

/// Waits (bounded) until the sidecar's /metrics holds `sample`.
async fn wait_metric(side: &Side, sample: &str) -> anyhow::Result<()> {
    let admin = side
        .proxy
        .admin_addr
        .ok_or_else(|| anyhow!("no admin listener"))?;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (_, body) = http_get(admin, "/metrics").await?;
        if body.lines().any(|l| l == sample) {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "{}: no {sample:?} in /metrics:\n{body}",
            side.name
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A value signed with `who`'s SVID for `key`, as an attacker holding that key would make it.
fn forge(key: &str, body: &str, who: &Identity) -> anyhow::Result<Vec<u8>> {
    use rustls::pki_types::pem::PemObject;
    let leaf = rustls::pki_types::CertificateDer::pem_slice_iter(who.cert_pem.as_bytes())
        .next()
        .ok_or_else(|| anyhow!("no certificate"))??;
    let key_der = rustls::pki_types::PrivateKeyDer::from_pem_slice(who.key_pem.as_bytes())?;
    let env = eastwall::fleet::signed::sign(key, body, &leaf, &key_der).map_err(|e| anyhow!(e))?;
    Ok(serde_json::to_vec(&env)?)
}

/// Waits until every sidecar wrote a `fleet_refused` line for `key` whose detail has `needle`.
async fn all_refuse(f: &Fleet, key: &str, needle: &str) -> anyhow::Result<()> {
    for s in &f.sides {
        wait_line(s, &format!("fleet_refused {key} ({needle})"), |l| {
            l["event"] == "fleet_refused"
                && l["key"] == key
                && l["alert"] == true
                && l["detail"].as_str().is_some_and(|d| d.contains(needle))
        })
        .await?;
    }
    Ok(())
}

/// Every live session given must end within [`BOUND`] of `since`, with a FATAL.
async fn all_end_within_bound(
    since: Instant,
    sessions: Vec<(
        String,
        tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>,
    )>,
) -> anyhow::Result<Vec<String>> {
    let mut states = Vec::new();
    for (name, task) in sessions {
        let left = BOUND.saturating_sub(since.elapsed()) + Duration::from_millis(250);
        let ended = tokio::time::timeout(left, task)
            .await
            .map_err(|_| anyhow!("{name}: the live session outlived the {BOUND:?} bound"))??;
        let err = ended
            .err()
            .ok_or_else(|| anyhow!("{name}: the session ended without an error"))?;
        states.push(sqlstate(&err));
    }
    Ok(states)
}

const NO_APP_POLICY: &str = "\
default action = DENY
deny (and alert):
from: segment(\"workstations\")
to: segment(\"db\")
";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_push_reaches_three_sidecars_and_the_fleet_sees_what_one_host_hides(
) -> anyhow::Result<()> {
    let f = Fleet::start().await?;
    // Sidecars may not create the bucket or the stream; the operator does, once.
    let config = f.operator_config().display().to_string();
    let dana = f.dana_args();
    let mut args = vec!["fleet", "init", "--config", &config];
    args.extend(dana.iter().map(String::as_str));
    let (ok, out, err) = f.eastwall(&args).await?;
    ensure!(
        ok && out.contains("fleet ready"),
        "fleet init: {out}{err}\n{}",
        f.nats.log_tail(30)
    );
    for s in &f.sides {
        wait_metric(s, "eastwall_fleet_fresh 1").await?;
    }
    policy_push(&f).await?;
    lock_push(&f).await?;
    audit_against_the_fleet(&f).await?;
    fan_out_across_sidecars(&f).await?;
    staleness(f).await?;
    Ok(())
}

/// A policy that no longer allows app → db ends billing's sessions everywhere; a broken one
/// and one signed by billing itself are refused before publication; the seed policy back.
async fn policy_push(f: &Fleet) -> anyhow::Result<()> {
    let mut live = Vec::new();
    for s in &f.sides {
        let (client, task) = f
            .connect(s, &f.billing, "billing", "postgres")
            .await
            .map_err(|e| anyhow!("{}: billing at the start: {}", s.name, describe(&e)))?;
        client.simple_query("select 1").await?;
        live.push((s.name.clone(), task, client));
    }
    // Refused before publication: a syntax error, and a signer outside [fleet] admins.
    let (ok, _, err) = f.push("default action = MAYBE\n", &f.dana).await?;
    ensure!(
        !ok && err.contains("nothing was pushed"),
        "a broken policy must be refused: {err}"
    );
    let (ok, _, err) = f.push(quickstart::SEED_POLICY, &f.billing).await?;
    ensure!(
        !ok && err.contains("not in [fleet] admins"),
        "billing may not push: {err}"
    );

    let (ok, out, err) = f.push(NO_APP_POLICY, &f.dana).await?;
    let pushed = Instant::now();
    ensure!(ok, "fleet push: {err}\nnats log:\n{}", f.nats.log_tail(60));
    ensure!(
        out.contains("version 1"),
        "the first push is version 1: {out}"
    );
    // The clients stay alive while we wait: a dropped client would end its own session.
    let mut clients = Vec::new();
    let sessions = live
        .into_iter()
        .map(|(name, task, client)| {
            clients.push(client);
            (name, task)
        })
        .collect();
    let states = all_end_within_bound(pushed, sessions).await?;
    drop(clients);
    ensure!(states.iter().all(|s| s == "57P01"), "ended with {states:?}");
    for s in &f.sides {
        let line = wait_line(s, "fleet policy", |l| l["reason"] == "fleet_policy").await?;
        ensure!(
            line["version"] == 1 && line["pushed_by"] == "spiffe://corp.example/ops/dbas/dana",
            "{line}"
        );
        wait_line(s, "policy_changed", |l| {
            l["event"] == "session_end" && l["reason"] == "policy_changed"
        })
        .await?;
        let err = f
            .connect(s, &f.billing, "billing", "postgres")
            .await
            .err()
            .ok_or_else(|| anyhow!("{}: billing admitted under the pushed policy", s.name))?;
        ensure!(sqlstate(&err) == "28000", "{}: {}", s.name, describe(&err));
        ensure!(
            !decisions(s)?.iter().any(|l| l["event"] == "fleet_refused"),
            "{}: nothing was published by the refused pushes, so nothing was refused",
            s.name
        );
    }
    let (ok, out, err) = f.push(quickstart::SEED_POLICY, &f.dana).await?;
    ensure!(ok && out.contains("version 2"), "{out}{err}");
    for s in &f.sides {
        wait_line(s, "version 2", |l| {
            l["reason"] == "fleet_policy" && l["version"] == 2
        })
        .await?;
        f.connect(s, &f.billing, "billing", "postgres")
            .await
            .map_err(|e| anyhow!("{}: {}", s.name, describe(&e)))?;
    }

    // Straight into the bucket, past the CLI, as someone NATS lets write there: an older
    // bundle validly signed by dana (a replay that would bring back "no app" policy v1), and a
    // newer one signed by a sidecar's own key. Both refused everywhere; version 2 stays.
    let bundle = |version: u64, by: &str| {
        serde_json::json!({
            "version": version, "pushed_at": "2026-12-04T00:00:00Z", "pushed_by": by,
            "label": "push.ew", "text": NO_APP_POLICY,
            "segments": {"app": [format!("spiffe://{TD}/app/**")], "db": [format!("spiffe://{TD}/db/**")],
                         "workstations": [format!("spiffe://{TD}/workstations/**")]},
            "groups": {},
        })
        .to_string()
    };
    let mut writer = f.nats.admin()?;
    let replay = forge(
        "policy",
        &bundle(1, "spiffe://corp.example/ops/dbas/dana"),
        &f.dana,
    )?;
    writer.publish("$KV.eastwall.policy", &replay)?;
    all_refuse(f, "policy", "a replayed bundle").await?;
    let sidecar_svid = f.pki.client("forger", "db/eastwall-s1", None)?;
    let forged = forge(
        "policy",
        &bundle(9, "spiffe://corp.example/db/eastwall-s1"),
        &sidecar_svid,
    )?;
    writer.publish("$KV.eastwall.policy", &forged)?;
    all_refuse(f, "policy", "not in [fleet] admins").await?;
    // The sidecar's own NATS user may not even write there.
    let mut as_sidecar = f
        .nats
        .raw_client(Some((&sidecar_svid.cert_pem, &sidecar_svid.key_pem)))?;
    ensure!(
        as_sidecar.publish("$KV.eastwall.policy", &forged).is_err(),
        "NATS let a sidecar write the policy key"
    );
    for s in &f.sides {
        f.connect(s, &f.billing, "billing", "postgres")
            .await
            .map_err(|e| {
                anyhow!(
                    "{}: a refused value changed the policy: {}",
                    s.name,
                    describe(&e)
                )
            })?;
    }
    Ok(())
}

/// One `lock add --fleet` ends billing's live sessions on all three within 2 s and refuses
/// the next; `lock remove --fleet` lifts it everywhere.
async fn lock_push(f: &Fleet) -> anyhow::Result<()> {
    let mut live = Vec::new();
    let mut clients = Vec::new();
    for s in &f.sides {
        let (client, task) = f
            .connect(s, &f.billing, "billing", "postgres")
            .await
            .map_err(|e| anyhow!("{}: billing before the lock: {}", s.name, describe(&e)))?;
        client.simple_query("select 1").await?;
        live.push((s.name.clone(), task));
        clients.push(client);
    }
    let config = f.operator_config().display().to_string();
    let dana = f.dana_args();
    let mut args = vec![
        "lock",
        "add",
        "--fleet",
        "--config",
        &config,
        "--id",
        BILLING,
        "--message",
        "stolen billing cert",
    ];
    args.extend(dana.iter().map(String::as_str));
    let (ok, out, err) = f.eastwall(&args).await?;
    let locked = Instant::now();
    ensure!(ok, "lock add --fleet: {err}");
    let id = out.trim().to_owned();
    ensure!(id.len() == 8, "lock add prints the lock id: {out}");
    let states = all_end_within_bound(locked, live).await?;
    ensure!(states.iter().all(|s| s == "57P01"), "ended with {states:?}");
    drop(clients);
    for s in &f.sides {
        let line = wait_line(s, "lock added", |l| {
            l["event"] == "lock" && l["source"] == "fleet"
        })
        .await?;
        ensure!(
            line["created_by"] == "spiffe://corp.example/ops/dbas/dana",
            "{line}"
        );
        let err = f
            .connect(s, &f.billing, "billing", "postgres")
            .await
            .err()
            .ok_or_else(|| anyhow!("{}: a locked identity was admitted", s.name))?;
        ensure!(
            sqlstate(&err) == "28000" && describe(&err).contains("stolen billing cert"),
            "{}: {}",
            s.name,
            describe(&err)
        );
    }
    // A removal signed by a key that is not an admin's, written past the CLI: refused, the
    // lock holds.
    let forger = f.pki.client("forger-lock", "app/billing-ops", None)?;
    let removal = serde_json::json!({
        "kind": "removed", "id": id, "removed_at": "2026-12-04T00:00:00Z",
        "removed_by": "spiffe://corp.example/app/billing-ops",
    })
    .to_string();
    let key = format!("lock.{id}");
    f.nats.admin()?.publish(
        &format!("$KV.eastwall.{key}"),
        &forge(&key, &removal, &forger)?,
    )?;
    all_refuse(f, &key, "not in [fleet] admins").await?;
    for s in &f.sides {
        ensure!(
            f.connect(s, &f.billing, "billing", "postgres")
                .await
                .is_err(),
            "{}: a forged removal lifted the lock",
            s.name
        );
    }
    // The key deleted, then purged (a rollup erasing its history), by someone with write
    // access to the bucket: no signature, so no removal. Every sidecar keeps the lock and
    // says so once.
    let subject = format!("$KV.eastwall.{key}");
    let mut writer = f.nats.admin()?;
    writer.publish_with_headers(&subject, &[("KV-Operation", "DEL")], b"")?;
    for s in &f.sides {
        wait_line(s, "fleet_refused (unsigned removal)", |l| {
            l["event"] == "fleet_refused"
                && l["reason"] == "fleet_unsigned_removal"
                && l["key"] == key.as_str()
                && l["alert"] == true
        })
        .await?;
    }
    writer.publish_with_headers(
        &subject,
        &[("KV-Operation", "PURGE"), ("Nats-Rollup", "sub")],
        b"",
    )?;
    // The watch wakes a read within ~50 ms of the purge, the tick (0.75 s here) another.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    for s in &f.sides {
        ensure!(
            f.connect(s, &f.billing, "billing", "postgres")
                .await
                .is_err(),
            "{}: deleting the lock's key lifted the lock",
            s.name
        );
    }
    // The key is gone from the bucket, yet the signed removal is still what lifts the lock.
    let mut args = vec!["lock", "remove", "--fleet", "--config", &config, &id];
    args.extend(dana.iter().map(String::as_str));
    let (ok, _, err) = f.eastwall(&args).await?;
    ensure!(ok, "lock remove --fleet: {err}");
    ensure!(
        err.contains("deleted from the bucket without a signed removal"),
        "lock remove --fleet after a purge says nothing about it: {err}"
    );
    for s in &f.sides {
        let deadline = Instant::now() + BOUND + Duration::from_secs(1);
        loop {
            if f.connect(s, &f.billing, "billing", "postgres")
                .await
                .is_ok()
            {
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "{}: the lock was not lifted",
                s.name
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(())
}

/// Rewrites one `connect` line of `path` (the identity changed, every later hash recomputed
/// as the documented chain rule says), so the file still verifies on its own.
fn rewrite_history(path: &Path) -> anyhow::Result<()> {
    use sha2::{Digest, Sha256};
    let text = std::fs::read_to_string(path)?;
    let mut out = String::new();
    let mut prev = "0".repeat(64);
    let mut edited = false;
    for line in text.lines() {
        let mut v: serde_json::Map<String, Value> = serde_json::from_str(line)?;
        if !edited && v["event"] == "connect" && v["spiffe_id"] == BILLING {
            v.insert(
                "spiffe_id".into(),
                Value::String("spiffe://corp.example/app/billing-batch".into()),
            );
            edited = true;
        }
        v.insert("prev".into(), Value::String(prev.clone()));
        v.remove("hash");
        let body = serde_json::to_string(&v)?;
        let hash = hex::encode(Sha256::digest(format!("{prev}\n{body}").as_bytes()));
        v.insert("hash".into(), Value::String(hash.clone()));
        out.push_str(&serde_json::to_string(&v)?);
        out.push('\n');
        prev = hash;
    }
    ensure!(edited, "no billing connect line to rewrite");
    std::fs::write(path, out)?;
    Ok(())
}

async fn audit_against_the_fleet(f: &Fleet) -> anyhow::Result<()> {
    let s = &f.sides[2];
    let log = s.layout.dir.join("decisions.log");
    let config = s.layout.config.display().to_string();
    let logp = log.display().to_string();
    let dana = f.dana_args();
    let mut args = vec![
        "audit",
        "verify",
        &logp,
        "--fleet",
        "--fleet-config",
        &config,
    ];
    args.extend(dana.iter().map(String::as_str));
    // Published within a moment of being written: wait (bounded) for the copy to catch up.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (ok, out, err) = f.eastwall(&args).await?;
        if ok {
            ensure!(out.contains("match the local files"), "{out}");
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "audit verify --fleet never matched: {out}{err}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Work on a copy: the sidecar keeps writing its own file.
    let copy = s.layout.dir.join("decisions.copy.log");
    std::fs::copy(&log, &copy)?;
    rewrite_history(&copy)?;
    let copyp = copy.display().to_string();
    let (ok, out, err) = f.eastwall(&["audit", "verify", &copyp]).await?;
    ensure!(
        ok,
        "the rewritten chain must verify on its own (that is the attack): {out}{err}"
    );
    let mut args = vec![
        "audit",
        "verify",
        &copyp,
        "--fleet",
        "--fleet-config",
        &config,
    ];
    args.extend(dana.iter().map(String::as_str));
    let (ok, out, err) = f.eastwall(&args).await?;
    ensure!(
        !ok,
        "a rewritten log must fail against the fleet's copy: {out}"
    );
    ensure!(
        err.contains("does not match the fleet's copy") && err.contains("the local files do not"),
        "{err}"
    );
    Ok(())
}

/// The stolen laptop identity walks three databases behind s1 and three behind s2: each
/// sidecar sees three (under the threshold of five), the fleet sees six.
async fn fan_out_across_sidecars(f: &Fleet) -> anyhow::Result<()> {
    for s in &f.sides[..2] {
        for db in ["payroll", "ledger", "hr"] {
            let refused = f.connect(s, &f.laptop, "finance-laptop", db).await;
            ensure!(refused.is_err(), "{}: a workstation was admitted", s.name);
        }
        wait_line(s, "hr attempt", |l| {
            l["event"] == "connect" && l["database"] == "hr"
        })
        .await?;
        ensure!(
            !decisions(s)?
                .iter()
                .any(|l| l["event"] == "signal" && l["signal"] == "fan_out"),
            "{}: one sidecar alone must not see fan-out here",
            s.name
        );
    }
    let config = f.operator_config().display().to_string();
    let dana = f.dana_args();
    let mut args = vec!["audit", "detect", "--fleet", "--fleet-config", &config];
    args.extend(dana.iter().map(String::as_str));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (ok, out, err) = f.eastwall(&args).await?;
        ensure!(ok, "audit detect --fleet: {err}");
        if out.contains("fan_out/") && out.contains("workstations/finance-laptop") {
            ensure!(
                out.contains("s1/") && out.contains("s2/"),
                "the targets name their sidecars: {out}"
            );
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "no fan_out across the fleet: {out}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Ok(())
}

/// NATS stopped: last good state serves, staleness shows; past 3 s new connections are
/// refused with 57P03; NATS back: service returns by itself.
async fn staleness(mut f: Fleet) -> anyhow::Result<()> {
    f.nats.stop();
    let stopped = Instant::now();
    for s in &f.sides {
        f.connect(s, &f.billing, "billing", "postgres")
            .await
            .map_err(|e| anyhow!("{}: refused inside max_staleness: {}", s.name, describe(&e)))?;
    }
    tokio::time::sleep(Duration::from_secs(4).saturating_sub(stopped.elapsed())).await;
    for s in &f.sides {
        let deadline = Instant::now() + Duration::from_secs(10);
        let err = loop {
            match f.connect(s, &f.billing, "billing", "postgres").await {
                Err(e) => break e,
                Ok(_) => {
                    ensure!(
                        Instant::now() < deadline,
                        "{}: still admitting long past max_staleness",
                        s.name
                    );
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        };
        ensure!(
            sqlstate(&err) == "57P03" && describe(&err).contains("max_staleness"),
            "{}: {}",
            s.name,
            describe(&err)
        );
        let admin = s
            .proxy
            .admin_addr
            .ok_or_else(|| anyhow!("no admin listener"))?;
        let (status, body) = http_get(admin, "/readyz").await?;
        ensure!(
            status == 503 && body.contains("fleet"),
            "{}: /readyz {status} {body}",
            s.name
        );
        let (_, metrics) = http_get(admin, "/metrics").await?;
        ensure!(
            metrics.lines().any(|l| l == "eastwall_fleet_fresh 0"),
            "{}: {metrics}",
            s.name
        );
        wait_line(s, "stale refusal", |l| l["reason"] == "fleet_stale").await?;
    }
    // A sidecar restarted while NATS is still away starts from its cached fleet state (the
    // pushed policy, version 2), and stays stale: a restart does not make it fresh.
    let Side {
        name,
        layout,
        proxy,
        _dir,
    } = f.sides.pop().ok_or_else(|| anyhow!("no sidecar"))?;
    proxy.shutdown().await;
    let config = eastwall_config::Config::load(&layout.config)
        .map_err(|e| anyhow!("{}", e.lines().join("\n")))?;
    let proxy = eastwall::server::start(config).await?;
    let restarted = Side {
        name,
        layout,
        proxy,
        _dir,
    };
    let restored = decisions(&restarted)?
        .into_iter()
        .filter(|l| l["reason"] == "fleet_policy")
        .count();
    ensure!(
        restored >= 3,
        "versions 1 and 2 before the restart, 2 again from the cache: {restored}"
    );
    let err = f
        .connect(&restarted, &f.billing, "billing", "postgres")
        .await
        .err()
        .ok_or_else(|| anyhow!("a restarted sidecar must not be fresh without NATS"))?;
    ensure!(sqlstate(&err) == "57P03", "{}", describe(&err));
    f.sides.push(restarted);
    f.nats.restart()?;
    for s in &f.sides {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if f.connect(s, &f.billing, "billing", "postgres")
                .await
                .is_ok()
            {
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "{}: NATS is back but the sidecar still refuses",
                s.name
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let admin = s
            .proxy
            .admin_addr
            .ok_or_else(|| anyhow!("no admin listener"))?;
        let (_, metrics) = http_get(admin, "/metrics").await?;
        ensure!(
            metrics.lines().any(|l| l == "eastwall_fleet_fresh 1"),
            "{}: {metrics}",
            s.name
        );
    }
    drop(f.pki);
    Ok(())
}

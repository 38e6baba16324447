//! `eastwall demo`: the seed's lateral-movement story, played against a private PostgreSQL.
//!
//! One command, nothing to prepare: a private cluster, a `quickstart` layout pointed at it, the
//! sidecar in-process on a free loopback port, and real TLS clients (tokio-postgres over rustls)
//! playing each part of the story. Every step checks that the proxy did what the narration says
//! and what the decision log records, so the demo doubles as a self-check: any surprise ends it
//! with a non-zero exit and a line saying which step went wrong.
//!
//! `eastwall demo --fleet` tells a second story ([`fleet`]): one signed lock, issued once,
//! cuts a stolen identity on every sidecar of a fleet run over a private NATS ([`nats`]).

mod fleet;
mod nats;

use std::fmt::Display;
use std::io::{self, Write as _};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use eastwall_ca::{Ca, CaError, IssueRequest, TrustDomain};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::Value;
use tokio_postgres::config::SslMode;
use tokio_postgres::Client;
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::audit::VerifyError;
use crate::pgcluster::{Cluster, ClusterError, ClusterOptions};
use crate::quickstart::{self, Layout, QuickstartError};
use crate::server::{Running, StartError};

/// How long one client attempt may take before the step counts as broken, not slow.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long to wait for a decision line: refusals at the TLS layer are logged after the
/// client has already heard the alert.
const LOG_WAIT: Duration = Duration::from_secs(5);
/// The database every client asks for.
const DATABASE: &str = "postgres";

/// The crown jewels, and the roles the sample identities log in as. `finance-laptop` exists so
/// that its refusal is the policy's doing, not a missing role.
const SEED_SQL: &str = "\
CREATE ROLE billing LOGIN;
CREATE ROLE alice LOGIN;
CREATE ROLE \"finance-laptop\" LOGIN;
CREATE TABLE invoices (id int PRIMARY KEY, customer text NOT NULL, amount numeric(10,2) NOT NULL);
INSERT INTO invoices VALUES (1, 'Acme Corp', 1200.00), (2, 'Globex', 830.50), (3, 'Initech', 2169.50);
GRANT SELECT ON invoices TO billing, alice;
";

/// What `eastwall demo` was asked to do.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Lay the sidecar out here (kept afterwards) instead of in a temp dir.
    pub dir: Option<PathBuf>,
    /// Stay up after the story, printing psql commands, until Ctrl-C.
    pub keep: bool,
    /// Colour the verdicts (only when stdout is a terminal).
    pub color: bool,
    /// Tell the fleet story instead: several sidecars, one NATS, one lock for all.
    pub fleet: bool,
}

/// Why the demo stopped. Each message says what broke and, where it can, what to do.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error("cannot lay out the sidecar: {0}")]
    Quickstart(#[from] QuickstartError),
    #[error("the sidecar's configuration does not load: {0}")]
    Config(String),
    #[error("cannot start the sidecar: {0}")]
    Start(#[from] StartError),
    #[error("cannot mint the attacker's certificate: {0}")]
    Ca(#[from] CaError),
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
    #[error("cannot build a TLS client for {who}: {detail}")]
    ClientTls { who: String, detail: String },
    #[error("step {step} did not behave as narrated: expected {expected}, got {got}")]
    Step {
        step: &'static str,
        expected: &'static str,
        got: String,
    },
    #[error("cannot write the operator's lock: {0}")]
    Lock(#[from] crate::locks::LockError),
    #[error("the decision log does not verify: {0}")]
    Audit(#[from] VerifyError),
    #[error("{0}")]
    Nats(String),
    #[error("{what}: {detail}")]
    Fleet { what: String, detail: String },
}

impl DemoError {
    pub(super) fn io(what: impl Into<String>) -> impl FnOnce(io::Error) -> DemoError {
        let what = what.into();
        move |source| DemoError::Io { what, source }
    }
}

/// Runs the whole demo; blocks until the story is told (and, with `keep`, until Ctrl-C).
pub fn run(opts: &Options) -> Result<(), DemoError> {
    if opts.fleet {
        return fleet::run(opts);
    }
    let say = Narrator { color: opts.color };
    say.line("Eastwall demo: the lateral-movement story, played against a private PostgreSQL.");

    // Check for the binaries first so a machine without them hears one actionable line.
    crate::pgcluster::find_bindir()?;
    let workspace = Workspace::new(opts.dir.clone())?;
    let cluster = Cluster::start(ClusterOptions::default())?;
    cluster.run_sql(SEED_SQL)?;

    let mut qs = quickstart::Options::new(
        workspace.path().to_path_buf(),
        format!("127.0.0.1:{}", cluster.port()),
    );
    qs.listen = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0);
    qs.stepup_listen = Some(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0));
    qs.admin_listen = Some(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0));
    let layout = quickstart::quickstart(&qs)?;
    let config = eastwall_config::Config::load(&layout.config)
        .map_err(|err| DemoError::Config(err.lines().join("; ")))?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(DemoError::io("cannot start the async runtime"))?;
    let result = runtime.block_on(async {
        let running = crate::server::start(config).await?;
        let story = Story::new(&layout, &running, say)?;
        say.line(format_args!(
            "  workspace   {}{}",
            layout.dir.display(),
            if workspace.is_temporary() {
                " (deleted when the demo ends)"
            } else {
                ""
            }
        ));
        say.line(format_args!(
            "  PostgreSQL  127.0.0.1:{} (private cluster, table `invoices`: the crown jewels)",
            cluster.port()
        ));
        say.line(format_args!(
            "  sidecar     {} guarding segment \"db\" with the seed's policy (policy.ew)",
            running.local_addr
        ));
        let told = story.tell().await;
        if let (Ok(spent), true) = (&told, opts.keep) {
            story.keep_up(&running, spent).await;
        }
        running.shutdown().await;
        told.map(drop)
    });
    // Sessions and the sidecar stop with the runtime, before the cluster is stopped.
    drop(runtime);
    drop(cluster);
    result
}

/// The folder the layout lives in: the caller's, or a temp dir removed at the end.
pub(super) enum Workspace {
    Given(PathBuf),
    Temporary(tempfile::TempDir),
}

impl Workspace {
    pub(super) fn new(dir: Option<PathBuf>) -> Result<Workspace, DemoError> {
        match dir {
            Some(dir) => Ok(Workspace::Given(dir)),
            None => tempfile::Builder::new()
                .prefix("eastwall-demo-")
                .tempdir()
                .map(Workspace::Temporary)
                .map_err(DemoError::io("cannot create a temp dir for the demo")),
        }
    }

    pub(super) fn path(&self) -> &Path {
        match self {
            Workspace::Given(dir) => dir,
            Workspace::Temporary(dir) => dir.path(),
        }
    }

    pub(super) fn is_temporary(&self) -> bool {
        matches!(self, Workspace::Temporary(_))
    }
}

/// Writes the narration to stdout. Write errors (a closed pipe) are ignored: the demo's
/// verdict is its exit status, not whether someone is still reading.
#[derive(Debug, Clone, Copy)]
pub(super) struct Narrator {
    pub(super) color: bool,
}

/// How a verdict is shown.
#[derive(Debug, Clone, Copy)]
pub(super) enum Tone {
    Good,
    Bad,
    Ask,
}

impl Narrator {
    pub(super) fn line(&self, text: impl Display) {
        let _ = writeln!(io::stdout().lock(), "{text}");
    }

    pub(super) fn step(&self, n: &str, text: &str) {
        self.line("");
        if self.color {
            self.line(format_args!("\x1b[1m{n}. {text}\x1b[0m"));
        } else {
            self.line(format_args!("{n}. {text}"));
        }
    }

    /// `   spiffe://… as ROLE -> VERDICT  (detail)`: the line the story hangs on.
    pub(super) fn verdict(&self, id: &str, role: &str, verdict: &str, tone: Tone, detail: &str) {
        let shown = if self.color {
            let code = match tone {
                Tone::Good => "32",
                Tone::Bad => "31",
                Tone::Ask => "33",
            };
            format!("\x1b[1;{code}m{verdict}\x1b[0m")
        } else {
            verdict.to_owned()
        };
        let detail = if detail.is_empty() {
            String::new()
        } else {
            format!("  ({detail})")
        };
        self.line(format_args!("   {id} as {role} -> {shown}{detail}"));
    }

    pub(super) fn detail(&self, text: impl Display) {
        self.line(format_args!("      {text}"));
    }
}

/// The running deployment, from a client's point of view.
struct Story<'a> {
    layout: &'a Layout,
    addr: SocketAddr,
    ca_pem: String,
    log: PathBuf,
    say: Narrator,
}

impl<'a> Story<'a> {
    fn new(layout: &'a Layout, running: &Running, say: Narrator) -> Result<Self, DemoError> {
        let ca_pem = std::fs::read_to_string(&layout.ca_cert).map_err(DemoError::io(format!(
            "cannot read {}",
            layout.ca_cert.display()
        )))?;
        Ok(Story {
            layout,
            addr: running.local_addr,
            ca_pem,
            log: running.sidecar.audit.path().to_path_buf(),
            say,
        })
    }

    /// Plays steps 1 to 5; returns the TOTP code alice spent (it cannot be used again).
    async fn tell(&self) -> Result<String, DemoError> {
        let billing = self.billing().await?;
        self.laptop().await?;
        self.stolen_goods().await?;
        let (alice, spent) = self.alice().await?;
        self.lock_stolen().await?;
        // Sessions end (and log their end) once their clients are gone.
        drop(billing);
        drop(alice);
        self.incident().await?;
        Ok(spent)
    }

    /// Step 1: the one flow the business needs.
    async fn billing(&self) -> Result<Client, DemoError> {
        const STEP: &str = "1 (billing)";
        let say = self.say;
        say.step(
            "1",
            "The billing service (app segment) queries the database over mTLS.",
        );
        let id = self.id("billing");
        let since = self.log_len()?;
        let client = match self.connect("billing", "billing", None).await? {
            Ok(client) => client,
            Err(err) => return Err(step_err(STEP, "allow", describe(&err))),
        };
        let line = self
            .wait_for(since, |l| {
                l["event"] == "connect" && l["spiffe_id"] == id.as_str()
            })
            .await
            .ok_or_else(|| step_err(STEP, "an allow line in the decision log", "none".into()))?;
        if line["decision"] != "allow" {
            return Err(step_err(STEP, "allow", summary(&line)));
        }
        say.verdict(
            &id,
            "billing",
            "allow",
            Tone::Good,
            &format!("rule {}", text(&line["rule"])),
        );
        let row = client
            .query_one("select count(*)::int, sum(amount)::text from invoices", &[])
            .await
            .map_err(|e| step_err(STEP, "the invoices query to run", describe(&e)))?;
        let (count, total): (i32, String) = (row.get(0), row.get(1));
        say.detail(format_args!(
            "select count(*), sum(amount) from invoices  =>  {count} invoices, {total} total"
        ));
        Ok(client)
    }

    /// Step 2: the phished laptop tries the database directly.
    async fn laptop(&self) -> Result<(), DemoError> {
        const STEP: &str = "2 (finance laptop)";
        let say = self.say;
        say.step(
            "2",
            "The phished finance laptop (workstations segment) tries the same database.",
        );
        let id = self.id("finance-laptop");
        let since = self.log_len()?;
        let err = self
            .expect_refusal(STEP, "deny + alert", "finance-laptop", "finance-laptop")
            .await?;
        let line = self.denial_line(STEP, since, &id).await?;
        if line["alert"] != true {
            return Err(step_err(STEP, "deny + alert", summary(&line)));
        }
        say.verdict(
            &id,
            "finance-laptop",
            "deny + alert",
            Tone::Bad,
            &format!("rule {}", text(&line["rule"])),
        );
        say.detail(format_args!("the laptop sees:  {}", describe(&err)));
        say.detail(format_args!("decision log:     {}", summary(&line)));
        Ok(())
    }

    /// Step 3: what the attacker harvested, replayed.
    async fn stolen_goods(&self) -> Result<(), DemoError> {
        let say = self.say;
        say.step("3", "The attacker replays what they stole.");

        const STEP_A: &str = "3a (certificate from another CA)";
        let forged_id = self.id("billing");
        let since = self.log_len()?;
        let scratch = tempfile::Builder::new()
            .prefix("eastwall-demo-attacker-")
            .tempdir()
            .map_err(DemoError::io(
                "cannot create a temp dir for the attacker's CA",
            ))?;
        let stolen_id = self
            .layout
            .identity("billing")
            .map(|who| who.id.clone())
            .ok_or_else(|| step_err(STEP_A, "a billing identity to forge", "none".into()))?;
        let trust_domain = TrustDomain::parse(stolen_id.trust_domain()).map_err(CaError::from)?;
        let rogue = Ca::init(
            &scratch.path().join("ca"),
            &trust_domain,
            Duration::from_secs(3600),
            false,
        )?;
        let forged = rogue.issue(&IssueRequest::new(stolen_id))?;
        let tls = self.tls(
            "the attacker's forged billing certificate",
            &forged.cert_pem,
            forged.key_pem.as_deref().unwrap_or_default(),
        )?;
        let err = match self.connect_with(tls, "billing", None).await? {
            Ok(_) => return Err(step_err(STEP_A, "refused at TLS", "admitted".into())),
            Err(err) => err,
        };
        let line = self
            .wait_for(since, |l| {
                l["event"] == "connect" && l["decision"] == "deny"
            })
            .await
            .ok_or_else(|| step_err(STEP_A, "a refusal in the decision log", "none".into()))?;
        if line["reason"] != "untrusted" {
            return Err(step_err(STEP_A, "refused as untrusted", summary(&line)));
        }
        say.verdict(
            &format!("{forged_id} (certificate from another CA)"),
            "billing",
            "refused",
            Tone::Bad,
            "at TLS: not signed by this trust domain's CA",
        );
        say.detail(format_args!("the attacker sees:  {}", describe(&err)));
        say.detail(format_args!("decision log:       {}", summary(&line)));

        const STEP_B: &str = "3b (laptop asks for postgres)";
        let id = self.id("finance-laptop");
        let since = self.log_len()?;
        let err = self
            .expect_refusal(STEP_B, "refused", "finance-laptop", "postgres")
            .await?;
        let line = self.denial_line(STEP_B, since, &id).await?;
        if line["db_user"] != "postgres" {
            return Err(step_err(
                STEP_B,
                "a refusal of role postgres",
                summary(&line),
            ));
        }
        say.verdict(
            &id,
            "postgres",
            "refused",
            Tone::Bad,
            &format!(
                "{}rule {}",
                if line["alert"] == true { "alert, " } else { "" },
                text(&line["rule"])
            ),
        );
        say.detail(format_args!("the attacker sees:  {}", describe(&err)));
        Ok(())
    }

    /// Step 4: a human operator, challenged for her second factor.
    async fn alice(&self) -> Result<(Client, String), DemoError> {
        const STEP: &str = "4 (alice's admin shell)";
        let say = self.say;
        say.step(
            "4",
            "alice, an operator (app/operators), opens an admin shell.",
        );
        let id = self.id("alice");
        let since = self.log_len()?;
        let err = match self.connect("alice", "alice", None).await? {
            Ok(_) => return Err(step_err(STEP, "a challenge", "admitted without MFA".into())),
            Err(err) => err,
        };
        let line = self
            .wait_for(since, |l| l["spiffe_id"] == id.as_str())
            .await
            .ok_or_else(|| step_err(STEP, "a challenge line in the decision log", "none".into()))?;
        if line["decision"] != "challenge" {
            return Err(step_err(STEP, "challenge", summary(&line)));
        }
        say.verdict(
            &id,
            "alice",
            "challenge",
            Tone::Ask,
            "the proxy asks for her MFA code",
        );
        say.detail(format_args!("her client sees:  {}", describe(&err)));

        let code =
            crate::mfa::totp::code_from_base32(&self.layout.alice_totp_b32, SystemTime::now())
                .ok_or_else(|| step_err(STEP, "a TOTP code", "the clock is before 1970".into()))?;
        say.detail(format_args!(
            "her authenticator app shows {code}; she types it at the password prompt"
        ));
        let since = self.log_len()?;
        let client = match self.connect("alice", "alice", Some(&code)).await? {
            Ok(client) => client,
            Err(err) => return Err(step_err(STEP, "allow after step-up", describe(&err))),
        };
        let line = self
            .wait_for(since, |l| {
                l["event"] == "connect" && l["spiffe_id"] == id.as_str()
            })
            .await
            .ok_or_else(|| step_err(STEP, "an allow line in the decision log", "none".into()))?;
        if line["decision"] != "allow" || line["mfa"].is_null() {
            return Err(step_err(STEP, "allow after MFA", summary(&line)));
        }
        say.verdict(
            &id,
            "alice",
            "allow",
            Tone::Good,
            &format!("after MFA step-up, mfa={}", text(&line["mfa"])),
        );
        let row = client
            .query_one("select current_user::text", &[])
            .await
            .map_err(|e| step_err(STEP, "select current_user to run", describe(&e)))?;
        let user: String = row.get(0);
        if user != "alice" {
            return Err(step_err(STEP, "current_user alice", user));
        }
        say.detail(format_args!("select current_user  =>  {user}"));
        Ok((client, code))
    }

    /// Step 5: the contained incident, as the decision log tells it.
    async fn incident(&self) -> Result<(), DemoError> {
        let say = self.say;
        say.step("6", "The contained incident: every decision in the log.");
        // Four sessions were admitted (billing, alice, the stolen certificate, billing's new
        // one); wait for their ends so the table is whole.
        let deadline = Instant::now() + LOG_WAIT;
        let mut lines = self.decisions()?;
        while count(&lines, "session_end") < 4 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
            lines = self.decisions()?;
        }
        let rows: Vec<[String; 7]> = lines
            .iter()
            .map(|l| {
                [
                    text(&l["ts"]).get(11..19).unwrap_or("").to_owned(),
                    text(&l["event"]),
                    match &l["spiffe_id"] {
                        Value::String(s) => s.clone(),
                        _ => "(no verified identity)".into(),
                    },
                    text(&l["db_user"]),
                    text(&l["decision"]),
                    if l["event"] == "signal" {
                        // What the detectors saw, and about whom.
                        shorten(
                            &format!(
                                "{} {}: {}",
                                text(&l["signal"]),
                                text(&l["kind"]),
                                text(&l["subject"])
                            ),
                            48,
                        )
                    } else {
                        shorten(&text(&l["reason"]), 48)
                    },
                    if l["alert"] == true { "ALERT" } else { "" }.into(),
                ]
            })
            .collect();
        let header = [
            "time", "event", "identity", "user", "decision", "reason", "alert",
        ]
        .map(String::from);
        let mut widths = header.clone().map(|h| h.chars().count());
        for row in &rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let render = |cells: &[String; 7]| {
            let mut out = String::from("   ");
            for (cell, w) in cells.iter().zip(widths) {
                out.push_str(&format!("{cell:<w$}  "));
            }
            out.trim_end().to_owned()
        };
        say.line(render(&header));
        for row in &rows {
            say.line(render(row));
        }

        let signals: Vec<String> = lines
            .iter()
            .filter(|l| l["event"] == "signal")
            .map(|l| text(&l["signal"]))
            .collect();
        if !signals.is_empty() {
            say.line("");
            say.line(format_args!(
                "   The detectors raised {} signal line(s) ({}); replay them: eastwall audit detect {}",
                signals.len(),
                {
                    let mut names = signals.clone();
                    names.sort();
                    names.dedup();
                    names.join(", ")
                },
                self.log.display()
            ));
        }
        let report = crate::audit::verify(&self.log)?;
        say.line("");
        say.line(format_args!(
            "   eastwall audit verify {}  =>  ok: {} lines, chain intact (last hash {})",
            self.log.display(),
            report.lines,
            report.last_hash
        ));
        say.line("");
        say.line(
            "Contained: the laptop never reached PostgreSQL, a forged certificate was worthless, \
             the operator needed her second factor, the stolen one was locked out mid-session, \
             and every attempt is in a tamper-evident log.",
        );
        Ok(())
    }

    /// Step 5: billing's real certificate was copied off the laptop and is in use. The
    /// operator locks that certificate by serial; its live session is cut within a tick
    /// while billing, on a freshly issued certificate, goes on.
    async fn lock_stolen(&self) -> Result<(), DemoError> {
        const STEP: &str = "5 (lock the stolen certificate)";
        let say = self.say;
        say.step(
            "5",
            "The attacker found billing's own certificate on the laptop and is using it.",
        );
        let id = self.id("billing");
        let since = self.log_len()?;
        let who = self
            .layout
            .identity("billing")
            .ok_or_else(|| step_err(STEP, "a billing identity", "none".into()))?;
        let read = |p: &Path| {
            std::fs::read_to_string(p)
                .map_err(DemoError::io(format!("cannot read {}", p.display())))
        };
        let tls = self.tls("billing", &read(&who.cert)?, &read(&who.key)?)?;
        let (stolen, watched) = self.connect_watched(tls, "billing").await?;
        let admitted = self
            .wait_for(since, |l| {
                l["event"] == "connect" && l["decision"] == "allow"
            })
            .await
            .ok_or_else(|| step_err(STEP, "an allow line", "none".into()))?;
        let serial = text(&admitted["cert_serial"]);
        say.verdict(
            &id,
            "billing",
            "allow",
            Tone::Bad,
            "a valid certificate, in the wrong hands",
        );

        // Billing gets a new certificate; its service keeps running on it.
        let ca = Ca::open(&self.layout.dir.join("ca"))?;
        let fresh = ca.issue(&IssueRequest::new(who.id.clone()))?;
        let tls = self.tls(
            "billing's re-issued certificate",
            &fresh.cert_pem,
            fresh.key_pem.as_deref().unwrap_or_default(),
        )?;
        let own = match self.connect_with(tls, "billing", None).await? {
            Ok(client) => client,
            Err(err) => {
                return Err(step_err(
                    STEP,
                    "billing's new certificate admitted",
                    describe(&err),
                ))
            }
        };

        // The operator's lock, as `eastwall lock add` writes it.
        let settings = eastwall_config::Settings::load(&self.layout.config)
            .map_err(|e| DemoError::Config(e.lines().join("; ")))?;
        let now = SystemTime::now();
        let target = crate::locks::Target::serial(&serial)?;
        let lock = crate::locks::edit(&settings.locks_file, &settings.trust_domain, now, |set| {
            let lock = crate::locks::Lock::new(
                target,
                None,
                "stolen from the finance laptop".into(),
                "demo".into(),
                now,
                set,
            )?;
            let mut all = set.locks().to_vec();
            all.push(lock.clone());
            Ok((all, lock))
        })?;
        say.detail(format_args!(
            "eastwall lock add --config {} --serial {serial} --message \"stolen from the finance laptop\"  =>  {}",
            self.layout.config.display(),
            lock.id
        ));
        let locked = Instant::now();
        let mut cut = None;
        while locked.elapsed() < Duration::from_secs(10) {
            if let Err(err) = stolen.simple_query("select 1").await {
                cut = Some(err);
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let cut = cut.ok_or_else(|| {
            step_err(
                STEP,
                "the stolen session cut",
                "still running after 10 s".into(),
            )
        })?;
        let took = locked.elapsed();
        say.verdict(
            &id,
            "billing",
            "cut",
            Tone::Good,
            &format!(
                "lock {} (serial {serial}), {:.1} s after the lock",
                lock.id,
                took.as_secs_f64()
            ),
        );
        // The FATAL went to the connection task; show what the attacker's client was told.
        let told = match tokio::time::timeout(CLIENT_TIMEOUT, watched).await {
            Ok(Ok(Err(err))) => describe(&err),
            _ => describe(&cut),
        };
        say.detail(format_args!("the attacker sees:  {told}"));
        let row = own
            .query_one("select count(*)::int from invoices", &[])
            .await
            .map_err(|e| step_err(STEP, "billing's own session to go on", describe(&e)))?;
        say.detail(format_args!(
            "billing, on its re-issued certificate:  select count(*) from invoices  =>  {}",
            row.get::<_, i32>(0)
        ));
        // The remediation: billing's files now hold the new certificate (the stolen one stays
        // locked), so the layout's commands keep working for billing.
        write_private(&who.key, fresh.key_pem.as_deref().unwrap_or_default())?;
        std::fs::write(&who.cert, &fresh.cert_pem).map_err(DemoError::io(format!(
            "cannot write {}",
            who.cert.display()
        )))?;
        Ok(())
    }

    /// `--keep`: stay up with copy-paste commands until Ctrl-C or SIGTERM, showing alice's
    /// current code as her authenticator app would.
    async fn keep_up(&self, running: &Running, spent: &str) {
        let say = self.say;
        say.line("");
        say.line("The sidecar stays up. In another terminal, try it by hand:");
        for (name, role) in [
            ("billing", "billing"),
            ("finance-laptop", "finance-laptop"),
            ("alice", "alice"),
        ] {
            if let Some(who) = self.layout.identity(name) {
                say.line(format_args!("   # {}", who.id));
                say.line(format_args!(
                    "   {}",
                    quickstart::psql_command(self.layout, who, running.local_addr, role)
                ));
            }
        }
        if let Some(alice) = self.layout.identity("alice") {
            say.line(format_args!(
                "alice's authenticator app (scan or paste into one): {}",
                crate::mfa::otpauth_uri(&alice.id, &self.layout.alice_totp_b32)
            ));
        }
        say.line(format_args!(
            "Decision log: {}   Check it: eastwall audit verify {}",
            self.log.display(),
            self.log.display()
        ));
        say.line(
            "Press Ctrl-C to stop. alice's codes, as her app shows them (each works once; \
             the one the demo used is spent, so the first may take up to 30 s):",
        );

        let mut shown = spent.to_owned();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let term = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut term) => {
                    term.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        tokio::pin!(term);
        loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => break,
                _ = &mut term => break,
                _ = tick.tick() => {
                    let code = crate::mfa::totp::code_from_base32(
                        &self.layout.alice_totp_b32,
                        SystemTime::now(),
                    )
                    .unwrap_or_default();
                    if code != shown {
                        say.line(format_args!("   {code}"));
                        shown = code;
                    }
                }
            }
        }
        say.line("Stopping.");
    }

    /// The SPIFFE ID of a sample identity, as text.
    fn id(&self, name: &str) -> String {
        self.layout
            .identity(name)
            .map(|i| i.id.to_string())
            .unwrap_or_default()
    }

    fn tls(
        &self,
        who: &str,
        cert_pem: &str,
        key_pem: &str,
    ) -> Result<rustls::ClientConfig, DemoError> {
        client_config(&self.ca_pem, cert_pem, key_pem).map_err(|detail| DemoError::ClientTls {
            who: who.to_owned(),
            detail,
        })
    }

    /// Connects through the proxy presenting sample identity `name`, asking for `role`.
    async fn connect(
        &self,
        name: &str,
        role: &str,
        password: Option<&str>,
    ) -> Result<Result<Client, tokio_postgres::Error>, DemoError> {
        let who = self
            .layout
            .identity(name)
            .ok_or_else(|| DemoError::ClientTls {
                who: name.to_owned(),
                detail: "quickstart did not issue it".into(),
            })?;
        let read = |p: &Path| {
            std::fs::read_to_string(p)
                .map_err(DemoError::io(format!("cannot read {}", p.display())))
        };
        let tls = self.tls(name, &read(&who.cert)?, &read(&who.key)?)?;
        self.connect_with(tls, role, password).await
    }

    /// The outer error is the demo's own failure (no answer in time); the inner one is what
    /// the client was told, which the step judges.
    async fn connect_with(
        &self,
        tls: rustls::ClientConfig,
        role: &str,
        password: Option<&str>,
    ) -> Result<Result<Client, tokio_postgres::Error>, DemoError> {
        // Errors surface through the client's next call.
        Ok(connect_to(self.addr, tls, role, password)
            .await?
            .map(|(client, _)| client))
    }

    /// Connects and keeps the connection task, where a FATAL sent to an idle client lands.
    async fn connect_watched(
        &self,
        tls: rustls::ClientConfig,
        role: &str,
    ) -> Result<(Client, Connection), DemoError> {
        connect_to(self.addr, tls, role, None)
            .await?
            .map_err(|err| {
                step_err(
                    "5 (lock the stolen certificate)",
                    "the stolen certificate admitted",
                    describe(&err),
                )
            })
    }

    /// Connects and expects a FATAL 28000 refusal inside TLS.
    async fn expect_refusal(
        &self,
        step: &'static str,
        expected: &'static str,
        name: &str,
        role: &str,
    ) -> Result<tokio_postgres::Error, DemoError> {
        match self.connect(name, role, None).await? {
            Ok(_) => Err(step_err(step, expected, "admitted".into())),
            Err(err) => match err.as_db_error() {
                Some(db) if db.code().code() == "28000" => Ok(err),
                _ => Err(step_err(step, expected, describe(&err))),
            },
        }
    }

    /// The deny line for `id` logged since line `since`.
    async fn denial_line(
        &self,
        step: &'static str,
        since: usize,
        id: &str,
    ) -> Result<Value, DemoError> {
        let line = self
            .wait_for(since, |l| l["event"] == "connect" && l["spiffe_id"] == id)
            .await
            .ok_or_else(|| step_err(step, "a deny line in the decision log", "none".into()))?;
        if line["decision"] != "deny" {
            return Err(step_err(step, "deny", summary(&line)));
        }
        Ok(line)
    }

    fn decisions(&self) -> Result<Vec<Value>, DemoError> {
        read_decisions(&self.log)
    }

    fn log_len(&self) -> Result<usize, DemoError> {
        Ok(self.decisions()?.len())
    }

    /// The first line after the first `since` lines matching `pred`, waiting (bounded) for it.
    async fn wait_for(&self, since: usize, pred: impl Fn(&Value) -> bool) -> Option<Value> {
        wait_for_line(&self.log, since, pred).await
    }
}

/// A client's connection task: where a FATAL sent to an idle client lands.
pub(super) type Connection = tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>;

/// Connects to the sidecar at `addr` as `role`. The outer error is the demo's own failure (no
/// answer in time); the inner one is what the client was told, which the step judges.
pub(super) async fn connect_to(
    addr: SocketAddr,
    tls: rustls::ClientConfig,
    role: &str,
    password: Option<&str>,
) -> Result<Result<(Client, Connection), tokio_postgres::Error>, DemoError> {
    let mut config = tokio_postgres::Config::new();
    config
        .host("localhost")
        .hostaddr(addr.ip())
        .port(addr.port())
        .user(role)
        .dbname(DATABASE)
        .ssl_mode(SslMode::Require)
        .connect_timeout(CLIENT_TIMEOUT);
    if let Some(password) = password {
        config.password(password);
    }
    let attempt = tokio::time::timeout(CLIENT_TIMEOUT, config.connect(MakeRustlsConnect::new(tls)));
    match attempt.await {
        Err(_) => Err(DemoError::Io {
            what: format!("connecting to the sidecar at {addr}"),
            source: io::Error::new(io::ErrorKind::TimedOut, "no answer within 10 s"),
        }),
        Ok(Err(err)) => Ok(Err(err)),
        Ok(Ok((client, connection))) => Ok(Ok((client, tokio::spawn(connection)))),
    }
}

/// The decision log's whole lines, parsed.
pub(super) fn read_decisions(log: &Path) -> Result<Vec<Value>, DemoError> {
    let text = std::fs::read_to_string(log).map_err(DemoError::io(format!(
        "cannot read the decision log {}",
        log.display()
    )))?;
    // A line being appended right now may be incomplete; only whole lines count.
    Ok(text
        .split_inclusive('\n')
        .filter(|l| l.ends_with('\n'))
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect())
}

/// The first line of `log` after its first `since` lines matching `pred`, waiting (bounded)
/// for it.
pub(super) async fn wait_for_line(
    log: &Path,
    since: usize,
    pred: impl Fn(&Value) -> bool,
) -> Option<Value> {
    let deadline = Instant::now() + LOG_WAIT;
    loop {
        if let Ok(lines) = read_decisions(log) {
            if let Some(line) = lines.into_iter().skip(since).find(|l| pred(l)) {
                return Some(line);
            }
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A rustls client presenting `cert_pem`/`key_pem` and verifying the proxy against `ca_pem`
/// (what libpq calls `sslmode=verify-full`).
pub(super) fn client_config(
    ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        let cert = cert.map_err(|e| format!("the CA PEM: {e}"))?;
        roots
            .add(cert)
            .map_err(|e| format!("the CA certificate: {e}"))?;
    }
    let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("the certificate PEM: {e}"))?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| format!("the key PEM: {e}"))?;
    // An explicit provider: no dependence on which crypto features other crates turned on.
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(|e| e.to_string())
}

/// Replaces a private key file, mode 0600 from its first byte.
fn write_private(path: &Path, text: &str) -> Result<(), DemoError> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("key.tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(DemoError::io(format!("cannot write {}", tmp.display())))?;
    file.write_all(text.as_bytes())
        .map_err(DemoError::io(format!("cannot write {}", tmp.display())))?;
    std::fs::rename(&tmp, path).map_err(DemoError::io(format!("cannot replace {}", path.display())))
}

pub(super) fn step_err(step: &'static str, expected: &'static str, got: String) -> DemoError {
    DemoError::Step {
        step,
        expected,
        got,
    }
}

/// What a client was told, in one line: `FATAL 28000: message` for server errors, the error
/// and its causes otherwise.
pub(super) fn describe(err: &tokio_postgres::Error) -> String {
    if let Some(db) = err.as_db_error() {
        return format!("{} {}: {}", db.severity(), db.code().code(), db.message());
    }
    let mut out = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        let message = cause.to_string();
        if !out.contains(&message) {
            out.push_str(": ");
            out.push_str(&message);
        }
        source = cause.source();
    }
    out
}

/// A decision line's key fields, as `key=value` pairs.
pub(super) fn summary(line: &Value) -> String {
    ["event", "decision", "alert", "rule", "reason", "db_user"]
        .iter()
        .map(|k| format!("{k}={}", text(&line[*k])))
        .collect::<Vec<_>>()
        .join(" ")
}

/// A JSON value as plain text: strings unquoted, null as `-`.
pub(super) fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

fn shorten(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_owned()
    } else {
        let cut: String = s.chars().take(max.saturating_sub(3)).collect();
        format!("{cut}...")
    }
}

fn count(lines: &[Value], event: &str) -> usize {
    lines.iter().filter(|l| l["event"] == event).count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_shows_strings_bare_and_null_as_a_dash() {
        assert_eq!(text(&Value::String("allow".into())), "allow");
        assert_eq!(text(&Value::Null), "-");
        assert_eq!(text(&Value::Bool(true)), "true");
    }

    #[test]
    fn shorten_keeps_short_text_and_marks_cuts() {
        assert_eq!(shorten("app tier only", 48), "app tier only");
        assert_eq!(shorten("abcdefghij", 6), "abc...");
    }
}

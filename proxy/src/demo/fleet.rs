//! `eastwall demo --fleet`: one lock, issued once, cuts the stolen identity on every sidecar.
//!
//! The same private PostgreSQL and `quickstart` layout as the seed's story, plus a private
//! `nats-server -js` with TLS from the demo's CA ([`super::nats`]) and two sidecars in-process,
//! each with its own `[fleet] name`, decision log and lock file, sharing the policy. The
//! operator (an identity in `[fleet] admins`) runs `fleet init`, then one signed
//! `lock add --fleet`, then its signed removal, through the same functions the CLI uses.
//! Every step checks what the clients were told and what each sidecar's decision log says.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use super::nats::{self, Nats};
use super::{
    client_config, connect_to, describe, read_decisions, step_err, summary, text, wait_for_line,
    Connection, DemoError, Narrator, Options, Tone, Workspace,
};
use crate::cli::fleet::{Pusher, Signer};
use crate::pgcluster::{Cluster, ClusterOptions};
use crate::quickstart::{self, Layout};
use crate::server::Running;
use eastwall_ca::{Ca, IssueRequest, SpiffeId};

/// The sidecars of the fleet, by `[fleet] name`.
const SIDECARS: [&str; 2] = ["east", "west"];
/// The operator, under `[fleet] admins = ["spiffe://corp.example/ops/dbas/*"]`.
const OPERATOR: &str = "ops/dbas/dana";
/// How soon every sidecar must have applied a fleet lock or its removal (README: "within 2 s"),
/// plus what a client needs to hear about it.
const BOUND: Duration = Duration::from_millis(2250);
/// How long the sidecars may take to read the bucket for the first time.
const SYNC_WAIT: Duration = Duration::from_secs(10);
/// The lock's message, shown to the refused clients.
const MESSAGE: &str = "stolen billing certificate";

/// billing's role and the crown jewels.
const SEED_SQL: &str = "\
CREATE ROLE billing LOGIN;
CREATE TABLE invoices (id int PRIMARY KEY, customer text NOT NULL, amount numeric(10,2) NOT NULL);
INSERT INTO invoices VALUES (1, 'Acme Corp', 1200.00), (2, 'Globex', 830.50), (3, 'Initech', 2169.50);
GRANT SELECT ON invoices TO billing;
";

/// Runs the fleet story; every process it starts is stopped on every path (the runtime, and
/// with it the sidecars, first; then nats-server; then PostgreSQL).
pub fn run(opts: &Options) -> Result<(), DemoError> {
    let say = Narrator { color: opts.color };
    say.line(
        "Eastwall demo --fleet: one lock, issued once, cuts a stolen identity on every sidecar.",
    );
    // The binaries first, so a machine without them hears one actionable line.
    crate::pgcluster::find_bindir()?;
    let nats_bin = nats::find_bin()?;
    let workspace = Workspace::new(opts.dir.clone())?;
    let cluster = Cluster::start(ClusterOptions::default())?;
    cluster.run_sql(SEED_SQL)?;

    let loopback = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0);
    let mut qs = quickstart::Options::new(
        workspace.path().to_path_buf(),
        format!("127.0.0.1:{}", cluster.port()),
    );
    qs.listen = loopback;
    qs.stepup_listen = None;
    qs.admin_listen = None;
    let layout = quickstart::quickstart(&qs)?;
    let ca = Ca::open(&layout.dir.join("ca"))?;
    let nats = Nats::start(nats_bin, &ca, &layout.dir.join("nats"))?;
    let dana = issue(&ca, &layout, OPERATOR, "dana")?;
    let configs = SIDECARS
        .iter()
        .map(|name| sidecar_config(&layout, &ca, &nats, name))
        .collect::<Result<Vec<_>, _>>()?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(DemoError::io("cannot start the async runtime"))?;
    let result = runtime.block_on(async {
        say.line(format_args!(
            "  workspace   {}{}  (the commands below run from there)",
            layout.dir.display(),
            if workspace.is_temporary() {
                " (deleted when the demo ends)"
            } else {
                ""
            }
        ));
        say.line(format_args!(
            "  PostgreSQL  127.0.0.1:{} (private cluster, table `invoices`)",
            cluster.port()
        ));
        say.line(format_args!(
            "  NATS        {} (private nats-server -js, TLS from the demo CA, client certificates required)",
            nats.url()
        ));
        let story = Story {
            layout: &layout,
            ca_pem: read(&layout.ca_cert)?,
            operator_config: configs[0].clone(),
            dana: dana.clone(),
            say,
        };
        story.init().await?;
        let mut sides = Vec::new();
        for (name, path) in SIDECARS.iter().zip(&configs) {
            let config = eastwall_config::Config::load(path)
                .map_err(|err| DemoError::Config(err.lines().join("; ")))?;
            let running = crate::server::start(config).await?;
            let log = running.sidecar.audit.path().to_path_buf();
            sides.push(Side {
                name,
                config: path.clone(),
                running,
                log,
            });
        }
        let told = story.tell(&sides).await;
        for side in sides {
            side.running.shutdown().await;
        }
        told
    });
    drop(runtime);
    drop(nats);
    drop(cluster);
    result
}

/// One sidecar of the fleet.
struct Side {
    name: &'static str,
    config: PathBuf,
    running: Running,
    log: PathBuf,
}

/// What the operator and the attacker hold.
struct Story<'a> {
    layout: &'a Layout,
    ca_pem: String,
    /// `eastwall-east.toml`: any sidecar's config names the fleet and its admins.
    operator_config: PathBuf,
    dana: Signer,
    say: Narrator,
}

/// Issues `spiffe://<td>/<path>` from the demo's CA into `certs/<file>.pem` and `.key`.
fn issue(ca: &Ca, layout: &Layout, path: &str, file: &str) -> Result<Signer, DemoError> {
    let td = ca.trust_domain().as_str().to_owned();
    let id =
        SpiffeId::parse(&format!("spiffe://{td}/{path}")).map_err(eastwall_ca::CaError::from)?;
    let (cert, key) = ca
        .issue(&IssueRequest::new(id))?
        .write(&layout.dir.join("certs").join(file))?;
    Ok(Signer {
        cert,
        key: key.unwrap_or_default(),
    })
}

/// `eastwall-<name>.toml`: quickstart's config with the sidecar's own decision log and lock
/// file, and a `[fleet]` table naming it, with its own SVID for NATS.
fn sidecar_config(layout: &Layout, ca: &Ca, nats: &Nats, name: &str) -> Result<PathBuf, DemoError> {
    let svid = issue(
        ca,
        layout,
        &format!("db/eastwall-{name}"),
        &format!("fleet-{name}"),
    )?;
    let base = read(&layout.config)?;
    let audit = "path = \"decisions.log\"";
    if !base.contains(audit) {
        return Err(DemoError::Config(format!(
            "quickstart's [audit] changed (no {audit}); update demo/fleet.rs"
        )));
    }
    let rel = |p: &Path| {
        p.strip_prefix(&layout.dir)
            .unwrap_or(p)
            .display()
            .to_string()
    };
    let td = ca.trust_domain().as_str().to_owned();
    let text = format!(
        "{base}\n[locks]\nfile = \"locks-{name}.json\"\n\n\
         [fleet]\nnats = \"{url}\"\nname = \"{name}\"\nadmins = [\"spiffe://{td}/ops/dbas/*\"]\n\
         cert = \"{cert}\"\nkey = \"{key}\"\nca = \"ca/ca.pem\"\nhead_interval = \"1s\"\n",
        base = base.replace(audit, &format!("path = \"decisions-{name}.log\"")),
        url = nats.url(),
        cert = rel(&svid.cert),
        key = rel(&svid.key),
    );
    let path = layout.dir.join(format!("eastwall-{name}.toml"));
    std::fs::write(&path, text)
        .map_err(DemoError::io(format!("cannot write {}", path.display())))?;
    Ok(path)
}

fn read(path: &Path) -> Result<String, DemoError> {
    std::fs::read_to_string(path).map_err(DemoError::io(format!("cannot read {}", path.display())))
}

fn fleet_err(what: &str) -> impl FnOnce(anyhow::Error) -> DemoError + '_ {
    move |err| DemoError::Fleet {
        what: what.to_owned(),
        detail: format!("{err:#}"),
    }
}

impl Story<'_> {
    /// A path as the narration shows it: relative to the workspace.
    fn rel(&self, p: &Path) -> String {
        p.strip_prefix(&self.layout.dir)
            .unwrap_or(p)
            .display()
            .to_string()
    }

    /// `--cert certs/dana.pem --key certs/dana.key`.
    fn dana_args(&self) -> String {
        format!(
            "--cert {} --key {}",
            self.rel(&self.dana.cert),
            self.rel(&self.dana.key)
        )
    }

    fn billing_tls(&self) -> Result<rustls::ClientConfig, DemoError> {
        let who = self
            .layout
            .identity("billing")
            .ok_or_else(|| DemoError::ClientTls {
                who: "billing".into(),
                detail: "quickstart did not issue it".into(),
            })?;
        client_config(&self.ca_pem, &read(&who.cert)?, &read(&who.key)?).map_err(|detail| {
            DemoError::ClientTls {
                who: "billing's stolen certificate".into(),
                detail,
            }
        })
    }

    fn billing_id(&self) -> String {
        self.layout
            .identity("billing")
            .map(|i| i.id.to_string())
            .unwrap_or_default()
    }

    /// Step 1, first half: the operator creates the fleet's bucket and log stream, once.
    async fn init(&self) -> Result<(), DemoError> {
        let say = self.say;
        say.step(
            "1",
            "The fleet: two sidecars, one NATS, one operator (dana, in [fleet] admins).",
        );
        let (_, mut fleet) = crate::cli::fleet::fleet_settings(&self.operator_config)
            .map_err(fleet_err("the operator's config"))?;
        fleet.cert = self.dana.cert.clone();
        fleet.key = self.dana.key.clone();
        crate::cli::fleet::create(&fleet, 1)
            .await
            .map_err(fleet_err("eastwall fleet init"))?;
        say.detail(format_args!(
            "eastwall fleet init --config {} {}  =>  fleet ready: bucket {:?} and stream {:?}",
            self.rel(&self.operator_config),
            self.dana_args(),
            fleet.bucket,
            fleet.stream
        ));
        Ok(())
    }

    async fn tell(&self, sides: &[Side]) -> Result<(), DemoError> {
        self.joined(sides).await?;
        let live = self.stolen_sessions(sides).await?;
        let lock_id = self.lock(sides, live).await?;
        self.lift(sides, &lock_id).await?;
        for side in sides {
            let report = crate::audit::verify(&side.log)?;
            self.say.detail(format_args!(
                "eastwall audit verify {}  =>  ok: {} lines, chain intact",
                self.rel(&side.log),
                report.lines
            ));
        }
        self.say.line("");
        self.say.line(
            "Contained fleet-wide: one signed lock, issued once, cut the stolen identity on every \
             sidecar within 2 s and refused it everywhere until its signed removal.",
        );
        Ok(())
    }

    /// Step 1, second half: every sidecar has read the fleet bucket.
    async fn joined(&self, sides: &[Side]) -> Result<(), DemoError> {
        const STEP: &str = "1 (the fleet)";
        let deadline = Instant::now() + SYNC_WAIT;
        for side in sides {
            let fleet = side
                .running
                .sidecar
                .fleet
                .as_ref()
                .ok_or_else(|| step_err(STEP, "a [fleet] table", "none".into()))?;
            while !fleet.synced() {
                if Instant::now() >= deadline {
                    return Err(step_err(
                        STEP,
                        "every sidecar in contact with the fleet",
                        format!("{} has not read the bucket after {SYNC_WAIT:?}", side.name),
                    ));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            self.say.detail(format_args!(
                "sidecar {:<5} {}  ({}: [fleet] name {:?}, log {}), in contact with the fleet",
                side.name,
                side.running.local_addr,
                self.rel(&side.config),
                side.name,
                self.rel(&side.log)
            ));
        }
        Ok(())
    }

    /// Step 2: billing's certificate, copied off the laptop, opens a session on every sidecar.
    async fn stolen_sessions(
        &self,
        sides: &[Side],
    ) -> Result<Vec<(tokio_postgres::Client, Connection)>, DemoError> {
        const STEP: &str = "2 (the stolen certificate)";
        let say = self.say;
        say.step(
            "2",
            "The attacker found billing's certificate on the laptop and opens a session through every sidecar.",
        );
        let id = self.billing_id();
        let mut live = Vec::new();
        for side in sides {
            let since = read_decisions(&side.log)?.len();
            let (client, conn) = connect_to(
                side.running.local_addr,
                self.billing_tls()?,
                "billing",
                None,
            )
            .await?
            .map_err(|e| step_err(STEP, "the stolen certificate admitted", describe(&e)))?;
            let line = wait_for_line(&side.log, since, |l| {
                l["event"] == "connect" && l["spiffe_id"] == id.as_str()
            })
            .await
            .ok_or_else(|| step_err(STEP, "an allow line in the decision log", "none".into()))?;
            if line["decision"] != "allow" {
                return Err(step_err(STEP, "allow", summary(&line)));
            }
            let row = client
                .query_one("select count(*)::int, sum(amount)::text from invoices", &[])
                .await
                .map_err(|e| step_err(STEP, "the invoices query to run", describe(&e)))?;
            let (count, total): (i32, String) = (row.get(0), row.get(1));
            say.verdict(
                &format!("{id} on {}", side.name),
                "billing",
                "allow",
                Tone::Bad,
                "a valid certificate, in the wrong hands",
            );
            say.detail(format_args!(
                "select count(*), sum(amount) from invoices  =>  {count} invoices, {total} total"
            ));
            live.push((client, conn));
        }
        Ok(live)
    }

    /// Steps 3 and 4: one signed lock; every live session cut, every new one refused.
    async fn lock(
        &self,
        sides: &[Side],
        live: Vec<(tokio_postgres::Client, Connection)>,
    ) -> Result<String, DemoError> {
        const STEP: &str = "3 (one lock for the fleet)";
        let say = self.say;
        say.step(
            "3",
            "The operator issues ONE lock, signed with her SVID, for the whole fleet.",
        );
        let id = self.billing_id();
        let pusher = Pusher::open(&self.operator_config, &self.dana)
            .map_err(fleet_err("the operator's signing identity"))?;
        let target = crate::locks::Target::id(&id, &pusher.settings.trust_domain)?;
        let lock = crate::locks::Lock::new(
            target,
            None,
            MESSAGE.into(),
            pusher.id.clone(),
            SystemTime::now(),
            &crate::locks::LockSet::default(),
        )?;
        // Each live session is watched from now on, so its end is timed as it happens.
        let mut watchers = Vec::new();
        let mut clients = Vec::new();
        for (client, conn) in live {
            clients.push(client);
            watchers.push(tokio::spawn(async move {
                let ended = tokio::time::timeout(Duration::from_secs(10), conn).await;
                (ended, Instant::now())
            }));
        }
        let issued = Instant::now();
        let revision = crate::cli::fleet::publish_lock(&pusher, &lock)
            .await
            .map_err(fleet_err("eastwall lock add --fleet"))?;
        say.detail(format_args!(
            "eastwall lock add --fleet --config {} --id {id} --message \"{MESSAGE}\" {}  =>  {}",
            self.rel(&self.operator_config),
            self.dana_args(),
            lock.id
        ));
        say.detail(format_args!(
            "signed by {}, published once (bucket revision {revision}); each sidecar verifies the signature",
            pusher.id
        ));

        say.step(
            "4",
            "Every sidecar cuts the stolen session, and refuses it anew.",
        );
        let mut took = Vec::new();
        for (side, watcher) in sides.iter().zip(watchers) {
            let (ended, at) = watcher
                .await
                .map_err(|e| step_err(STEP, "the session watched", e.to_string()))?;
            let err = match ended {
                Err(_) => {
                    return Err(step_err(
                        STEP,
                        "the stolen session cut",
                        format!("{}: still running after 10 s", side.name),
                    ))
                }
                Ok(Err(e)) => return Err(step_err(STEP, "the session watched", e.to_string())),
                Ok(Ok(Ok(()))) => {
                    return Err(step_err(
                        STEP,
                        "FATAL 57P01",
                        format!("{}: the session ended without an error", side.name),
                    ))
                }
                Ok(Ok(Err(err))) => err,
            };
            if err.as_db_error().map(|db| db.code().code()) != Some("57P01") {
                return Err(step_err(STEP, "FATAL 57P01", describe(&err)));
            }
            let elapsed = at.saturating_duration_since(issued);
            if elapsed > BOUND {
                return Err(step_err(
                    STEP,
                    "every live session cut within 2 s",
                    format!("{} took {:.2} s", side.name, elapsed.as_secs_f64()),
                ));
            }
            let applied = wait_for_line(&side.log, 0, |l| {
                l["event"] == "lock" && l["lock_id"] == lock.id.as_str()
            })
            .await
            .ok_or_else(|| step_err(STEP, "a lock line in the decision log", "none".into()))?;
            say.verdict(
                &format!("{id} on {}", side.name),
                "billing",
                "cut",
                Tone::Good,
                &format!("{:.2} s after the lock", elapsed.as_secs_f64()),
            );
            say.detail(format_args!("the attacker sees:  {}", describe(&err)));
            say.detail(format_args!(
                "decision log:       event=lock action={} lock_id={} source={} created_by={}",
                text(&applied["action"]),
                text(&applied["lock_id"]),
                text(&applied["source"]),
                text(&applied["created_by"])
            ));
            took.push(format!("{} {:.2} s", side.name, elapsed.as_secs_f64()));
        }
        drop(clients);

        for side in sides {
            let since = read_decisions(&side.log)?.len();
            let err = match connect_to(
                side.running.local_addr,
                self.billing_tls()?,
                "billing",
                None,
            )
            .await?
            {
                Ok(_) => {
                    return Err(step_err(
                        STEP,
                        "a new connection refused",
                        "admitted".into(),
                    ))
                }
                Err(err) => err,
            };
            if err.as_db_error().map(|db| db.code().code()) != Some("28000") {
                return Err(step_err(STEP, "FATAL 28000 (locked)", describe(&err)));
            }
            let line = wait_for_line(&side.log, since, |l| {
                l["event"] == "connect" && l["spiffe_id"] == id.as_str()
            })
            .await
            .ok_or_else(|| step_err(STEP, "a deny line in the decision log", "none".into()))?;
            if line["decision"] != "deny"
                || line["reason"] != "locked"
                || line["lock_id"] != lock.id.as_str()
            {
                return Err(step_err(STEP, "deny, reason locked", summary(&line)));
            }
            say.verdict(
                &format!("{id} on {}", side.name),
                "billing",
                "refused",
                Tone::Good,
                &format!("a new connection: reason locked, lock {}", lock.id),
            );
            say.detail(format_args!("the attacker sees:  {}", describe(&err)));
        }
        say.line(format_args!(
            "   One lock, issued once, applied by every sidecar: cut in {}.",
            took.join(", ")
        ));
        Ok(lock.id)
    }

    /// Step 5: the signed removal lifts the lock everywhere.
    async fn lift(&self, sides: &[Side], lock_id: &str) -> Result<(), DemoError> {
        const STEP: &str = "5 (the signed removal)";
        let say = self.say;
        say.step(
            "5",
            "The stolen certificate dealt with, the operator lifts the lock with one signed removal.",
        );
        let id = self.billing_id();
        let pusher = Pusher::open(&self.operator_config, &self.dana)
            .map_err(fleet_err("the operator's signing identity"))?;
        let issued = Instant::now();
        crate::cli::fleet::publish_removal(&pusher, lock_id)
            .await
            .map_err(fleet_err("eastwall lock remove --fleet"))?;
        say.detail(format_args!(
            "eastwall lock remove --fleet --config {} {lock_id} {}  =>  removed fleet lock {lock_id}",
            self.rel(&self.operator_config),
            self.dana_args()
        ));
        let mut clients = Vec::new();
        for side in sides {
            let client = loop {
                match connect_to(
                    side.running.local_addr,
                    self.billing_tls()?,
                    "billing",
                    None,
                )
                .await?
                {
                    Ok((client, _)) => break client,
                    Err(err) if issued.elapsed() > BOUND => {
                        return Err(step_err(
                            STEP,
                            "billing admitted again within 2 s",
                            format!("{}: {}", side.name, describe(&err)),
                        ))
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            };
            let elapsed = issued.elapsed();
            let row = client
                .query_one("select count(*)::int from invoices", &[])
                .await
                .map_err(|e| step_err(STEP, "the invoices query to run", describe(&e)))?;
            say.verdict(
                &format!("{id} on {}", side.name),
                "billing",
                "allow",
                Tone::Good,
                &format!(
                    "admitted again {:.2} s after the removal; select count(*) from invoices  =>  {}",
                    elapsed.as_secs_f64(),
                    row.get::<_, i32>(0)
                ),
            );
            clients.push(client);
        }
        // The sessions end before the sidecars stop, so each log has their session_end.
        drop(clients);
        Ok(())
    }
}

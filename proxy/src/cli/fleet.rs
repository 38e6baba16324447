//! `eastwall fleet push`, and the fleet halves of `lock` and `audit`: what an operator signs and publishes, and what they read back.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::{anyhow, bail, Context};
use eastwall_config::{Config, FleetSettings, Settings};

use crate::fleet::bundle::{self, LockBody, PolicyBundle, POLICY_KEY};
use crate::fleet::signed::{self, Trust};
use crate::locks::Lock;

/// Arguments of `eastwall fleet`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

/// Who signs: the operator's own SVID (an identity in `[fleet] admins`).
#[derive(Debug, Clone, clap::Args)]
pub struct Signer {
    /// The operator's certificate (PEM); it also authenticates the NATS connection.
    #[arg(long, value_name = "FILE")]
    pub cert: PathBuf,
    /// Its private key (PEM).
    #[arg(long, value_name = "FILE")]
    pub key: PathBuf,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Create the fleet's bucket and log stream (once, as an operator: sidecars are not
    /// allowed to create them when NATS permissions are set as docs/fleet-nats.md shows).
    Init {
        /// An eastwall.toml with a [fleet] table (its bucket and stream names).
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        #[command(flatten)]
        signer: Signer,
        /// Copies of each on the NATS cluster (3 for a three-node cluster).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=5))]
        replicas: u8,
    },
    /// Validate the config's policy (with its segments and groups) and publish it to every
    /// sidecar of the fleet, signed; each applies it within 2 s and re-judges live sessions.
    Push {
        /// An eastwall.toml with a [fleet] table; its policy file is what is pushed.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        #[command(flatten)]
        signer: Signer,
    },
}

pub fn run(args: Args) -> anyhow::Result<()> {
    match args.command {
        Command::Init {
            config,
            signer,
            replicas,
        } => init(&config, &signer, usize::from(replicas)),
        Command::Push { config, signer } => push(&config, &signer),
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")
}

/// The settings with a [fleet] table, or a message saying what to add.
pub fn fleet_settings(config: &Path) -> anyhow::Result<(Settings, FleetSettings)> {
    let settings = Settings::load(config).map_err(|e| anyhow!("{}", e.lines().join("; ")))?;
    let fleet = settings.fleet.clone().ok_or_else(|| {
        anyhow!(
            "{} has no [fleet] table; add nats, name and admins (see README, \"Running a fleet\")",
            config.display()
        )
    })?;
    Ok((settings, fleet))
}

/// The operator's SVID, checked as a sidecar will check it before anything is published.
pub struct Pusher {
    pub settings: Settings,
    pub fleet: FleetSettings,
    leaf: rustls::pki_types::CertificateDer<'static>,
    key: rustls::pki_types::PrivateKeyDer<'static>,
    /// Their SPIFFE ID.
    pub id: String,
}

impl Pusher {
    pub fn open(config: &Path, signer: &Signer) -> anyhow::Result<Pusher> {
        let (settings, mut fleet) = fleet_settings(config)?;
        let leaf = crate::tls::load_certs(&signer.cert, "client certificates")?
            .into_iter()
            .next()
            .ok_or_else(|| anyhow!("{} holds no certificate", signer.cert.display()))?;
        let key = crate::tls::load_key(&signer.key)?;
        // The operator's SVID also authenticates the NATS connection.
        fleet.cert = signer.cert.clone();
        fleet.key = signer.key.clone();
        let mut pusher = Pusher {
            settings,
            fleet,
            leaf,
            key,
            id: String::new(),
        };
        // Sign a probe and verify it as a sidecar would: a pusher outside [fleet] admins,
        // revoked or from another CA hears it now, not from every sidecar's alert.
        let probe = pusher.sign("probe", "{}")?;
        let raw = serde_json::to_vec(&probe)?;
        let verified = pusher
            .trust()?
            .verify("probe", &raw, SystemTime::now())
            .map_err(|e| anyhow!("the sidecars would refuse this push: {e}"))?;
        pusher.id = verified.signer;
        Ok(pusher)
    }

    fn trust(&self) -> anyhow::Result<Trust> {
        Ok(Trust {
            verifier: crate::tls::svid_verifier(
                &self.settings.listen.client_ca,
                self.settings.listen.crl.as_deref(),
            )?,
            trust_domain: self.settings.trust_domain.clone(),
            admins: self.fleet.admins.clone(),
        })
    }

    fn sign(&self, key: &str, body: &str) -> anyhow::Result<signed::Envelope> {
        signed::sign(key, body, &self.leaf, &self.key).map_err(|e| anyhow!("{e}"))
    }

    async fn store(&self) -> anyhow::Result<async_nats::jetstream::kv::Store> {
        let client = crate::fleet::client::connect(&self.fleet, "eastwall cli", false).await?;
        let js = async_nats::jetstream::new(client);
        Ok(crate::fleet::client::bucket(&js, &self.fleet).await?)
    }

    /// Signs `body` for `key` and stores it; returns the bucket's revision.
    pub async fn put(
        &self,
        kv: &async_nats::jetstream::kv::Store,
        key: &str,
        body: &str,
    ) -> anyhow::Result<u64> {
        let envelope = serde_json::to_vec(&self.sign(key, body)?)?;
        if envelope.len() > signed::MAX_VALUE {
            bail!(
                "the signed value is {} bytes, more than the {} a sidecar reads",
                envelope.len(),
                signed::MAX_VALUE
            );
        }
        kv.put(key, envelope.into())
            .await
            .with_context(|| format!("cannot publish {key:?} to the fleet bucket"))
    }
}

fn init(config: &Path, signer: &Signer, replicas: usize) -> anyhow::Result<()> {
    let (_, mut fleet) = fleet_settings(config)?;
    fleet.cert = signer.cert.clone();
    fleet.key = signer.key.clone();
    runtime()?.block_on(async {
        create(&fleet, replicas).await?;
        outln!(
            "fleet ready: bucket {:?} and stream {:?} ({replicas} replica(s)) on {}",
            fleet.bucket,
            fleet.stream,
            fleet.servers.join(",")
        );
        anyhow::Ok(())
    })
}

/// `eastwall fleet init`'s work, for a caller already in a runtime (`eastwall demo --fleet`):
/// the bucket and the log stream, connecting with `fleet`'s cert and key (the operator's).
pub(crate) async fn create(fleet: &FleetSettings, replicas: usize) -> anyhow::Result<()> {
    let client = crate::fleet::client::connect(fleet, "eastwall cli", false).await?;
    let js = async_nats::jetstream::new(client);
    crate::fleet::client::bucket_with(&js, fleet, replicas).await?;
    crate::fleet::client::stream_with(&js, fleet, replicas).await?;
    Ok(())
}

fn push(config: &Path, signer: &Signer) -> anyhow::Result<()> {
    // Validated first: a broken policy never reaches the bucket.
    let loaded = Config::load(config).map_err(|e| {
        anyhow!(
            "the policy is refused, nothing was pushed: {}",
            e.lines().join("; ")
        )
    })?;
    let pusher = Pusher::open(config, signer)?;
    let text = std::fs::read_to_string(&loaded.settings.policy_file)
        .with_context(|| format!("cannot read {}", loaded.settings.policy_file.display()))?;
    let mut bundle = PolicyBundle {
        version: 0,
        pushed_at: bundle::rfc3339(SystemTime::now()),
        pushed_by: pusher.id.clone(),
        label: loaded.settings.policy_label.clone(),
        text,
        segments: loaded.settings.segments.clone(),
        groups: loaded.settings.groups.clone(),
    };
    // Compiled exactly as every sidecar will compile it.
    bundle
        .compile(&loaded.settings.trust_domain, &loaded.settings.guards)
        .map_err(|e| anyhow!("the policy bundle is refused, nothing was pushed: {e}"))?;
    let counts = loaded.policy.counts();
    runtime()?.block_on(async {
        let kv = pusher.store().await?;
        // The next version after the one in the bucket; a concurrent push loses the race
        // on the revision and is told to retry rather than overwriting silently.
        let current = kv.entry(POLICY_KEY).await.context("cannot read the fleet bucket")?;
        let (previous, revision) = match &current {
            Some(e) if e.operation == async_nats::jetstream::kv::Operation::Put => {
                let version = serde_json::from_slice::<signed::Envelope>(&e.value)
                    .ok()
                    .and_then(|env| serde_json::from_str::<PolicyBundle>(&env.body).ok())
                    .map_or(0, |b| b.version);
                (version, Some(e.revision))
            }
            Some(e) => (0, Some(e.revision)),
            None => (0, None),
        };
        bundle.version = previous + 1;
        let body = serde_json::to_string(&bundle)?;
        let envelope = serde_json::to_vec(&pusher.sign(POLICY_KEY, &body)?)?;
        let put = match revision {
            Some(rev) => kv.update(POLICY_KEY, envelope.into(), rev).await.map(|_| ()).map_err(|e| e.to_string()),
            None => kv.create(POLICY_KEY, envelope.into()).await.map(|_| ()).map_err(|e| e.to_string()),
        };
        put.map_err(|e| anyhow!("cannot publish the policy (another push may have landed first; run it again): {e}"))?;
        outln!(
            "pushed policy version {} ({} allow, {} deny, {} deny_and_alert rules) as {}; every sidecar applies it within 2 s",
            bundle.version, counts.allow, counts.deny, counts.deny_and_alert, pusher.id
        );
        Ok(())
    })
}

/// `eastwall lock add --fleet`: the lock, signed, under `lock.<id>`.
pub fn add_lock(
    config: &Path,
    signer: &Signer,
    make: impl FnOnce(&Settings, String) -> anyhow::Result<Lock>,
) -> anyhow::Result<Lock> {
    let pusher = Pusher::open(config, signer)?;
    let lock = make(&pusher.settings, pusher.id.clone())?;
    runtime()?.block_on(publish_lock(&pusher, &lock))?;
    Ok(lock)
}

/// Signs `lock` and stores it under `lock.<id>`, for a caller already in a runtime.
pub(crate) async fn publish_lock(pusher: &Pusher, lock: &Lock) -> anyhow::Result<u64> {
    let body = serde_json::to_string(&LockBody::Lock {
        lock: crate::locks::lock_to_json(lock),
    })?;
    let kv = pusher.store().await?;
    pusher.put(&kv, &bundle::lock_key(&lock.id), &body).await
}

/// `eastwall lock remove --fleet ID`: a signed removal under the lock's key.
pub fn remove_lock(config: &Path, signer: &Signer, id: &str) -> anyhow::Result<()> {
    let pusher = Pusher::open(config, signer)?;
    runtime()?.block_on(publish_removal(&pusher, id))
}

/// Signs the removal of lock `id` and stores it under its key, for a caller already in a
/// runtime; refused when the fleet holds no such lock.
pub(crate) async fn publish_removal(pusher: &Pusher, id: &str) -> anyhow::Result<()> {
    let key = bundle::lock_key(id);
    let kv = pusher.store().await?;
    // `entry`, not `get`: a key someone deleted or purged without a signed removal still
    // holds the lock on every sidecar that saw it, so its removal must still be possible.
    let latest = kv
        .entry(key.clone())
        .await
        .context("cannot read the fleet bucket")?;
    match latest.map(|e| e.operation) {
        None => bail!("the fleet holds no lock {id:?}"),
        Some(async_nats::jetstream::kv::Operation::Put) => {}
        Some(_) => eprintln!(
            "note: the key of lock {id} was deleted from the bucket without a signed removal; sidecars that saw the lock still hold it, and this signed removal lifts it"
        ),
    }
    let body = serde_json::to_string(&LockBody::Removed {
        id: id.to_owned(),
        removed_at: bundle::rfc3339(SystemTime::now()),
        removed_by: pusher.id.clone(),
    })?;
    pusher.put(&kv, &key, &body).await.map(|_| ())
}

/// `eastwall audit verify --fleet`: the local files against the sidecar's published copy.
pub fn verify(config: &Path, signer: &Signer, files: &[PathBuf]) -> anyhow::Result<bool> {
    let (_, mut fleet) = fleet_settings(config)?;
    fleet.cert = signer.cert.clone();
    fleet.key = signer.key.clone();
    let local = crate::fleet::remote::read_local(files).map_err(|e| anyhow!(e))?;
    let (lines, heads) = runtime()?.block_on(async {
        let client = crate::fleet::client::connect(&fleet, "eastwall cli", false).await?;
        crate::fleet::remote::sidecar_copy(&client, &fleet.stream, &fleet.name)
            .await
            .map_err(|e| anyhow!(e))
    })?;
    let c = crate::fleet::remote::compare(&local, &lines, &heads);
    for p in &c.problems {
        eprintln!("{p}");
    }
    if c.problems.is_empty() {
        outln!(
            "ok: {} of {} published lines and {} chain heads of sidecar {:?} match the local files",
            c.matched,
            lines.len(),
            c.heads_matched,
            fleet.name
        );
    } else {
        eprintln!(
            "eastwall: the local log does not match the fleet's copy for sidecar {:?} ({} difference(s))",
            fleet.name,
            c.problems.len()
        );
    }
    Ok(c.problems.is_empty())
}

/// `eastwall audit detect --fleet`: every sidecar's lines, merged, through the detectors.
pub fn detect(config: &Path, signer: &Signer, json: bool) -> anyhow::Result<()> {
    let (settings, mut fleet) = fleet_settings(config)?;
    fleet.cert = signer.cert.clone();
    fleet.key = signer.key.clone();
    let lines = runtime()?.block_on(async {
        let client = crate::fleet::client::connect(&fleet, "eastwall cli", false).await?;
        crate::fleet::remote::merged(&client, &fleet.stream)
            .await
            .map_err(|e| anyhow!(e))
    })?;
    let mut detectors = eastwall_detect::Detectors::new(settings.detect.tuning.clone())?;
    let mut signals = Vec::new();
    for line in &lines {
        signals.extend(detectors.observe_line(line));
    }
    for signal in &signals {
        if json {
            outln!("{}", signal.to_json());
        } else {
            outln!("{}", crate::detect_replay::describe(signal));
        }
    }
    if !json {
        let sidecars: std::collections::BTreeSet<&str> = lines
            .iter()
            .filter_map(|l| l.get("sidecar").and_then(|s| s.as_str()))
            .collect();
        outln!(
            "{} signal(s) over {} lines from {} sidecar(s) ({})",
            signals.len(),
            lines.len(),
            sidecars.len(),
            sidecars.into_iter().collect::<Vec<_>>().join(", ")
        );
    }
    Ok(())
}

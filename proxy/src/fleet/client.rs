//! The NATS connection: TLS (verify-full against `[fleet] ca`) with the SVID as client certificate, reconnecting for ever in the background.

use std::time::Duration;

use async_nats::jetstream;
use eastwall_config::FleetSettings;

/// How long one request to NATS may take before it counts as a failed read.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// Why the control plane cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("[fleet] TLS files: {0}")]
    Tls(#[from] crate::tls::TlsError),
    #[error("cannot reach NATS at {servers}: {source}")]
    Connect {
        servers: String,
        source: async_nats::ConnectError,
    },
    #[error("the fleet bucket {bucket:?}: {detail}")]
    Bucket { bucket: String, detail: String },
    #[error("the fleet stream {stream:?}: {detail}")]
    Stream { stream: String, detail: String },
}

/// Options shared by the sidecar and the CLI. `retry` keeps trying the first connection
/// in the background (the sidecar must start, and serve its last good state, without NATS).
pub async fn connect(
    settings: &FleetSettings,
    name: &str,
    retry: bool,
) -> Result<async_nats::Client, ClientError> {
    let tls =
        crate::tls::upstream_client_config(&settings.ca, Some((&settings.cert, &settings.key)))?;
    let mut options = async_nats::ConnectOptions::new()
        .name(name)
        .require_tls(true)
        // Only the servers [fleet] nats names: nats-server 2.9 sends its INFO (with the
        // cluster's connect_urls) in plain text before TLS, so a discovered URL is the
        // network's word, not the operator's.
        .ignore_discovered_servers()
        .tls_client_config((*tls).clone())
        .connection_timeout(REQUEST_TIMEOUT)
        .request_timeout(Some(REQUEST_TIMEOUT))
        .ping_interval(Duration::from_secs(5))
        .max_reconnects(None)
        // Back off to at most 2 s, so a restarted NATS is found again quickly.
        .reconnect_delay_callback(|attempts| {
            Duration::from_millis((100 * attempts as u64).min(2000))
        });
    if retry {
        options = options.retry_on_initial_connect();
    }
    let servers: Vec<async_nats::ServerAddr> = settings
        .servers
        .iter()
        .filter_map(|s| s.parse().ok())
        .collect();
    options
        .connect(servers)
        .await
        .map_err(|source| ClientError::Connect {
            servers: settings.servers.join(","),
            source,
        })
}

/// The bucket, created (history 16, so a removal's predecessors can be read) if missing.
pub async fn bucket(
    js: &jetstream::Context,
    settings: &FleetSettings,
) -> Result<jetstream::kv::Store, ClientError> {
    bucket_with(js, settings, 1).await
}

/// [`bucket`], creating it with `replicas` copies (a NATS cluster of at least that many).
pub async fn bucket_with(
    js: &jetstream::Context,
    settings: &FleetSettings,
    replicas: usize,
) -> Result<jetstream::kv::Store, ClientError> {
    let err = |detail: String| ClientError::Bucket {
        bucket: settings.bucket.clone(),
        detail,
    };
    if let Ok(store) = js.get_key_value(&settings.bucket).await {
        return Ok(store);
    }
    // The bucket's stream, made as a key-value bucket is made (ADR-8), by hand: async-nats'
    // `create_key_value` first asks for account info, whose reply from nats-server 2.9 it
    // cannot parse.
    let config = jetstream::stream::Config {
        name: format!("KV_{}", settings.bucket),
        subjects: vec![format!("$KV.{}.>", settings.bucket)],
        description: Some("Eastwall: signed policy bundle and locks".into()),
        max_messages_per_subject: 16,
        allow_rollup: true,
        // No message deletes (a purge of the whole stream needs rollups, which KV uses:
        // NATS permissions keep sidecars from the purge API, docs/fleet-nats.md).
        deny_delete: true,
        allow_direct: true,
        discard: jetstream::stream::DiscardPolicy::New,
        duplicate_window: Duration::from_secs(120),
        storage: jetstream::stream::StorageType::File,
        num_replicas: replicas,
        ..Default::default()
    };
    let created = js.create_stream(config).await.err();
    js.get_key_value(&settings.bucket)
        .await
        .map_err(|e| match &created {
            // Another client may have made it meanwhile; otherwise the creation error says why.
            Some(c) => err(format!("{e}; creating it: {c}")),
            None => err(e.to_string()),
        })
}

/// The log stream, created if missing: every sidecar's lines and heads, kept on disk.
pub async fn stream(
    js: &jetstream::Context,
    settings: &FleetSettings,
) -> Result<jetstream::stream::Stream, ClientError> {
    stream_with(js, settings, 1).await
}

/// [`stream`], creating it with `replicas` copies.
pub async fn stream_with(
    js: &jetstream::Context,
    settings: &FleetSettings,
    replicas: usize,
) -> Result<jetstream::stream::Stream, ClientError> {
    js.get_or_create_stream(jetstream::stream::Config {
        num_replicas: replicas,
        name: settings.stream.clone(),
        subjects: vec!["eastwall.log.>".into()],
        description: Some("Eastwall: every sidecar's decision lines and chain heads".into()),
        storage: jetstream::stream::StorageType::File,
        // The copy a rewritten local log is checked against: a host that is taken over
        // must not be able to delete or purge what it already published.
        deny_delete: true,
        deny_purge: true,
        ..Default::default()
    })
    .await
    .map_err(|e| ClientError::Stream {
        stream: settings.stream.clone(),
        detail: e.to_string(),
    })
}

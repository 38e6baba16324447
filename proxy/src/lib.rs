//! Eastwall: an mTLS, identity-aware sidecar that stands in front of PostgreSQL.
//!
//! # Layout
//! A connection flows top to bottom through these modules:
//! - [`server`]: the running sidecar — start, accept loop, upkeep, drain; [`sidecar`]: what
//!   connections share; [`registry`]: the live sessions and how to end them; [`admin_socket`]:
//!   the admin Unix socket (`eastwall sessions`).
//! - [`startup`]: the front door — SSLRequest, GSSENCRequest, direct TLS, StartupMessage.
//! - [`codec`]: the PostgreSQL wire codec, pure functions over bytes.
//! - [`tls`]: rustls configs for both legs; CRL reload; [`verified_leaves`]: leaves already
//!   verified, so a reconnect skips the CA signature check.
//! - [`identity`]: X509-SVID checks and handshake-failure reasons.
//! - [`params`]: which startup parameters may reach PostgreSQL (an allowlist).
//! - [`privilege`]: whether a login role is superuser-equivalent, from the catalog.
//! - [`session`]: one connection end to end — decision, MFA step-up, upstream login, relay.
//! - [`mfa`]: TOTP secrets, replay and lockout, step-up tokens; [`stepup`]: its HTTPS endpoint.
//! - [`upstream`]: the proxy's own login to PostgreSQL (trust, SCRAM, cert).
//! - [`relay`]: the byte pipe after admission ([`stop_gate`]: its stop signal, polled only
//!   when woken); [`statement_audit`]: what an audited session's
//!   statements were and how they ended, followed as its bytes pass (pure);
//!   [`statement_log`]: their decision-log lines, and the relay's wait for them;
//!   [`transcript`]: those lines as a readable session (`eastwall audit sessions`).
//! - [`cancel`]: the proxy's cancel keys and their upstream mapping.
//! - [`audit`]: the hash-chained, fsync'd decision log; [`ocsf`]: its lines as OCSF 1.3.0
//!   events; [`ocsf_sink`]: the live `[audit] ocsf` file of them; [`report`]: its HTML report page.
//! - [`metrics`]: Prometheus metrics; [`admin`]: the plain-HTTP `/healthz`, `/readyz`,
//!   `/metrics` listener.
//! - [`reload`]: eastwall.toml and the policy reloaded, live sessions re-judged.
//! - [`detection`]: the seed's five detectors inline on the decision log; signals, automatic locks;
//!   [`detect_replay`]: the same detectors over a recorded log (`eastwall audit detect`).
//! - [`locks`]: operators' locks on identities, serials, sources and roles; the lock file.
//! - [`fleet`]: many sidecars, one control plane on NATS JetStream: signed policy and locks
//!   in a bucket, decision lines and chain heads in a stream, a fail-closed staleness bound.
//! - [`quickstart`]: a complete sidecar layout in one folder; [`pgcluster`]: private
//!   PostgreSQL clusters for the demo and the tests.
//! - [`demo`]: the seed's lateral-movement story, played end to end in one command.
//! - [`cli`]: the `eastwall` verbs, one module each.
#![forbid(unsafe_code)]

pub mod admin;
pub mod admin_socket;
pub mod audit;
pub mod cancel;
pub mod cli;
pub mod codec;
pub mod demo;
pub mod detect_replay;
pub mod detection;
pub mod expiry;
pub mod fleet;
pub mod identity;
pub mod locks;
pub mod metrics;
pub mod mfa;
pub mod ocsf;
pub mod ocsf_sink;
pub mod params;
pub mod pgcluster;
pub mod preflight;
pub mod privilege;
pub mod privilege_pool;
pub mod quickstart;
pub mod refusals;
pub mod registry;
pub mod relay;
pub mod reload;
pub mod report;
pub mod server;
pub mod session;
pub mod sidecar;
pub mod source;
pub mod startup;
pub mod statement_audit;
pub mod statement_log;
pub mod stepup;
pub mod stop_gate;
pub mod tap_thread;
pub mod tls;
pub mod transcript;
pub mod upstream;
pub mod verified_leaves;

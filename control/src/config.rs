//! Configuration, from environment variables (or the flags of the same meaning). The
//! secrets ([`SECRETS`]) are no flags: each comes from its variable or from the file its
//! `_FILE` twin names (a Kubernetes secret mounted as a file); `ps` shows neither.
//!
//! | variable | meaning | default |
//! |---|---|---|
//! | `CONTROL_LISTEN` | gRPC listen address | `0.0.0.0:50051` |
//! | `REDIS_URL`, `REDIS_URL_FILE` | `redis://`, `rediss://` or `redis+unix://` URL (secret: may carry the password) | unset: in-memory store (one process, nothing survives a restart) |
//! | `REDIS_CLUSTER_NODES`, `REDIS_CLUSTER_NODES_FILE` | comma-separated Redis Cluster seed URLs (secret), instead of `REDIS_URL` (Redis ≥ 7: commands use sharded pub/sub) | unset |
//! | `CONTROL_APP_TOKENS`, `CONTROL_APP_TOKENS_FILE` | comma-separated bearer tokens (secret) for `Agents` and `Calls`, each ≥ 32 bytes unless `CONTROL_INSECURE_NO_AUTH=true` | unset |
//! | `CONTROL_RELAY_TOKENS`, `CONTROL_RELAY_TOKENS_FILE` | comma-separated bearer tokens (secret) for `Relay`, each ≥ 32 bytes unless `CONTROL_INSECURE_NO_AUTH=true` | unset |
//! | `CONTROL_INSECURE_NO_AUTH` | `true` allows starting with no tokens at all (no auth), and tokens shorter than 32 bytes | `false` |
//! | `RELAY_PUBLIC_URL` | public `https://` base URL of the relays, for webhook/stream URLs | unset: URLs left empty |
//! | `CONTROL_LOG` | log filter (`tracing` env-filter syntax) | `info` |
//! | `CONTROL_LOG_FORMAT` | `text` or `json` | `text` |
//! | `CONTROL_LEASE_SECS` | attach lease; a live call unleased this long ends `RELAY_LOST`. Also the campaign dialer lease (another replica takes a dead dialer's campaigns over within it) | `15` |
//! | `CONTROL_HEARTBEAT_TIMEOUT_SECS` | a call's lease is released when its relay's attach stream was silent this long (relays send a heartbeat every third of it); also how recently a relay must have reported to count as ready. Less than `CONTROL_LEASE_SECS` | `6` |
//! | `CONTROL_RETENTION_SECS` | how long finished calls are kept | `604800` (7 days) |
//! | `CONTROL_METRICS_LISTEN` | address of the HTTP listener for Prometheus `/metrics` and the `/healthz`, `/readyz` probes (plaintext unless `CONTROL_METRICS_TLS_*`); empty disables | `0.0.0.0:9090` |
//! | `CONTROL_ID` | this replica's id (routes commands to it) | hostname + random suffix |
//! | `CONTROL_SHUTDOWN_GRACE_SECS` | how long open streams may take to end on shutdown | `10` |
//! | `TWILIO_ACCOUNT_SID` | account whose calls control places (`AC…`); unset: control never dials | unset |
//! | `TWILIO_AUTH_TOKEN`, `TWILIO_AUTH_TOKEN_FILE` | the account's auth token (secret), unless an API key is set | unset |
//! | `TWILIO_API_KEY_SID`, `TWILIO_API_KEY_SECRET`, `TWILIO_API_KEY_SECRET_FILE` | an API key (`SK…`) instead of the auth token (secret) | unset |
//! | `TWILIO_API_BASE_URL` | Twilio REST base URL | `https://api.twilio.com` |
//! | `TWILIO_HTTP_TIMEOUT_MS` | timeout of one REST request | `10000` |
//! | `TWILIO_MAX_RETRIES` | retries of a request answered 429/5xx (backoff with jitter) | `4` |
//! | `CONTROL_TLS_CERT_FILE`, `CONTROL_TLS_KEY_FILE` | PEM certificate chain and key: gRPC over TLS (reloaded when the files change) | unset: plaintext h2c |
//! | `CONTROL_TLS_CLIENT_CA_FILE` | PEM CA that every gRPC client must present a certificate from (mTLS) | unset: no client certificate asked |
//! | `REDIS_CA_FILE` | PEM CA that the Redis server certificate must chain to (`rediss://` only) | unset: the system roots |
//! | `REDIS_CERT_FILE`, `REDIS_KEY_FILE` | PEM client certificate and key presented to Redis (`rediss://` only) | unset |
//! | `CONTROL_METRICS_HEADER_TIMEOUT_MS` | a metrics client must send a whole request head this soon after connecting or after its previous answer | `5000` |
//! | `CONTROL_METRICS_MAX_CONNECTIONS` | connections open at once on the metrics listener; above it accepting pauses | `64` |
//! | `CONTROL_METRICS_TLS_CERT_FILE`, `CONTROL_METRICS_TLS_KEY_FILE` | PEM certificate chain and key: `/metrics` over TLS (reloaded when the files change) | unset: plaintext |
//! | `CONTROL_GRPC_MAX_CONCURRENT_STREAMS` | gRPC streams per HTTP/2 connection (a relay's attach streams share one connection) | `8192` |
//! | `CONTROL_GRPC_UNARY_TIMEOUT_MS` | a unary call answers `DEADLINE_EXCEEDED` after this long; streams are never timed | `30000` |
//! | `CONTROL_GRPC_MAX_HEADER_LIST_BYTES` | largest gRPC metadata a client may send | `16384` |
//! | `CONTROL_WATCH_STREAMS_PER_TOKEN` | `WatchCall` + `WatchCalls` + `WatchCampaign` streams one app token may hold open per replica (`RESOURCE_EXHAUSTED` above) | `100` |
//! | `CONTROL_GRPC_REFLECTION` | serve gRPC reflection | on only with `CONTROL_INSECURE_NO_AUTH=true` |
//!
//! Invalid configuration makes the binary exit with code 64 before any socket opens.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use crate::tls::{KeyPairFiles, ServerTls};

/// Exit code for bad configuration (sysexits `EX_USAGE`).
pub const EXIT_CONFIG: i32 = 64;

/// The secret type shared with the relay (`Debug`/`Display` print `[redacted]`).
pub use callbridge_telemetry::Secret;
use callbridge_telemetry::SecretVar;

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Control's secrets (the Redis URLs may carry its password): each read from its variable
/// or from the file `NAME_FILE` names, never from a flag.
pub const SECRETS: [SecretVar; 6] = [
    callbridge_telemetry::secret_var!(
        "REDIS_URL",
        "redis://, rediss:// or redis+unix:// URL (unset: in-memory store, one process only)"
    ),
    callbridge_telemetry::secret_var!(
        "REDIS_CLUSTER_NODES",
        "comma-separated Redis Cluster seed node URLs (instead of REDIS_URL)"
    ),
    callbridge_telemetry::secret_var!(
        "CONTROL_APP_TOKENS",
        "comma-separated bearer tokens accepted on the public API (Agents, Calls)"
    ),
    callbridge_telemetry::secret_var!(
        "CONTROL_RELAY_TOKENS",
        "comma-separated bearer tokens accepted on the relay API (Relay)"
    ),
    callbridge_telemetry::secret_var!(
        "TWILIO_AUTH_TOKEN",
        "the Twilio account's auth token, unless an API key is set"
    ),
    callbridge_telemetry::secret_var!("TWILIO_API_KEY_SECRET", "the Twilio API key's secret"),
];

/// The secrets' values as read (`None`: unset), in [`SECRETS`] order.
struct SecretValues {
    redis_url: Option<String>,
    redis_cluster_nodes: Option<String>,
    app_tokens: Option<String>,
    relay_tokens: Option<String>,
    twilio_auth_token: Option<String>,
    twilio_api_key_secret: Option<String>,
}

impl SecretValues {
    fn read(env: &dyn Fn(&str) -> Option<std::ffi::OsString>) -> Result<Self, ConfigError> {
        let mut values = SECRETS.iter().map(|var| {
            callbridge_telemetry::read_secret(var, env)
                .map(|v| v.map(|s| s.expose().to_owned()))
                .map_err(|e| bad(e.var, e.message))
        });
        let mut next = || values.next().transpose().map(Option::flatten);
        Ok(SecretValues {
            redis_url: next()?,
            redis_cluster_nodes: next()?,
            app_tokens: next()?,
            relay_tokens: next()?,
            twilio_auth_token: next()?,
            twilio_api_key_secret: next()?,
        })
    }
}

/// The end of `--help`: the secrets (no flags, so clap does not list them) and the
/// OpenTelemetry variables.
fn help_footer() -> String {
    format!(
        "{}\n{}",
        callbridge_telemetry::secrets_help(&SECRETS),
        callbridge_telemetry::ENV_HELP
    )
}

/// Raw command line / environment, as clap sees it (the secrets apart: [`SECRETS`]).
#[derive(Debug, Parser)]
#[command(
    name = "callbridge-control",
    version,
    about = "callbridge control plane: agents, calls, events and command routing over gRPC",
    after_help = help_footer()
)]
struct Args {
    /// gRPC listen address.
    #[arg(long, env = "CONTROL_LISTEN", default_value = "0.0.0.0:50051")]
    listen: String,
    /// Allow starting with no tokens at all (every caller accepted). For local demos only.
    #[arg(long, env = "CONTROL_INSECURE_NO_AUTH", default_value = "false")]
    insecure_no_auth: String,
    /// Public base URL of the relays (https://…), used to build webhook and stream URLs.
    #[arg(long, env = "RELAY_PUBLIC_URL")]
    relay_public_url: Option<String>,
    /// Log filter (tracing env-filter syntax).
    #[arg(long, env = "CONTROL_LOG", default_value = "info")]
    log: String,
    /// Log format.
    #[arg(long, env = "CONTROL_LOG_FORMAT", value_enum, default_value = "text")]
    log_format: LogFormat,
    /// Attach lease in seconds; a live call with no lease this long ends with RELAY_LOST.
    #[arg(long, env = "CONTROL_LEASE_SECS", default_value = "15")]
    lease_secs: u64,
    /// Seconds of silence on an attach stream (no heartbeat, no event) after which the
    /// call's lease is released; relays send a heartbeat every third of it.
    #[arg(long, env = "CONTROL_HEARTBEAT_TIMEOUT_SECS", default_value = "6")]
    heartbeat_timeout_secs: u64,
    /// How long finished calls are kept, in seconds.
    #[arg(long, env = "CONTROL_RETENTION_SECS", default_value = "604800")]
    retention_secs: u64,
    /// Prometheus /metrics HTTP listen address; empty disables it.
    #[arg(long, env = "CONTROL_METRICS_LISTEN", default_value = "0.0.0.0:9090")]
    metrics_listen: String,
    /// This replica's id (commands for calls it holds are routed to it). Default: hostname + random.
    #[arg(long, env = "CONTROL_ID")]
    id: Option<String>,
    /// Seconds open streams get to end on shutdown.
    #[arg(long, env = "CONTROL_SHUTDOWN_GRACE_SECS", default_value = "10")]
    shutdown_grace_secs: u64,
    #[command(flatten)]
    twilio: crate::twilio_rest::config::TwilioArgs,
    #[command(flatten)]
    limits: crate::limits::LimitsArgs,
    /// PEM certificate chain of the gRPC server; with CONTROL_TLS_KEY_FILE, gRPC is served
    /// over TLS only (the files are re-read when they change). Unset: plaintext h2c.
    #[arg(long, env = "CONTROL_TLS_CERT_FILE")]
    tls_cert_file: Option<PathBuf>,
    /// PEM private key of the gRPC server certificate.
    #[arg(long, env = "CONTROL_TLS_KEY_FILE")]
    tls_key_file: Option<PathBuf>,
    /// PEM CA bundle; set: every gRPC client must present a certificate issued by it (mTLS).
    #[arg(long, env = "CONTROL_TLS_CLIENT_CA_FILE")]
    tls_client_ca_file: Option<PathBuf>,
    /// PEM CA bundle the Redis server certificate must chain to (rediss:// only). Unset:
    /// the system's roots.
    #[arg(long, env = "REDIS_CA_FILE")]
    redis_ca_file: Option<PathBuf>,
    /// PEM client certificate presented to Redis (rediss:// only; with REDIS_KEY_FILE).
    #[arg(long, env = "REDIS_CERT_FILE")]
    redis_cert_file: Option<PathBuf>,
    /// PEM private key of REDIS_CERT_FILE.
    #[arg(long, env = "REDIS_KEY_FILE")]
    redis_key_file: Option<PathBuf>,
}

/// Where state lives. The URLs are secrets: they may carry Redis's password.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreConfig {
    /// In-process memory (demo, unit tests).
    Memory,
    /// One Redis server.
    Redis(Secret),
    /// Redis Cluster seed nodes.
    Cluster(Vec<Secret>),
}

/// Validated configuration, immutable after start.
#[derive(Debug, Clone)]
pub struct Config {
    /// gRPC listen address.
    pub listen: SocketAddr,
    /// State store.
    pub store: StoreConfig,
    /// Tokens for the public API; empty with `insecure_no_auth` means open.
    pub app_tokens: Vec<Secret>,
    /// Tokens for the relay API.
    pub relay_tokens: Vec<Secret>,
    /// No auth at all (only allowed when explicitly asked for and no token is set).
    pub insecure_no_auth: bool,
    /// Public relay base URL without a trailing slash.
    pub relay_public_url: Option<String>,
    /// Log filter.
    pub log: String,
    /// Log format.
    pub log_format: LogFormat,
    /// Attach lease.
    pub lease: Duration,
    /// Silence on an attach stream after which its lease is released.
    pub heartbeat_timeout: Duration,
    /// Retention of finished calls.
    pub retention: Duration,
    /// Metrics listen address; `None` disables.
    pub metrics_listen: Option<SocketAddr>,
    /// Replica id.
    pub control_id: String,
    /// Shutdown grace for open streams.
    pub shutdown_grace: Duration,
    /// Twilio REST (placing and steering calls); `None`: control never dials.
    pub twilio: Option<crate::twilio_rest::TwilioConfig>,
    /// gRPC over TLS; `None`: plaintext h2c.
    pub grpc_tls: Option<ServerTls>,
    /// TLS files for `rediss://` connections; `None`: defaults (system roots, no client
    /// certificate) or plaintext.
    pub redis_tls: Option<RedisTlsFiles>,
    /// Listener and gRPC limits, and reflection.
    pub limits: crate::limits::Limits,
}

/// The files behind a `rediss://` connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisTlsFiles {
    /// CA the server must chain to; `None`: the system roots.
    pub ca: Option<PathBuf>,
    /// Client certificate and key (mTLS).
    pub client: Option<KeyPairFiles>,
}

impl RedisTlsFiles {
    /// The PEM contents, as the redis crate takes them.
    pub fn read(&self) -> std::io::Result<redis::TlsCertificates> {
        Ok(redis::TlsCertificates {
            root_cert: self.ca.as_deref().map(std::fs::read).transpose()?,
            client_tls: match &self.client {
                Some(pair) => Some(redis::ClientTlsConfig {
                    client_cert: std::fs::read(&pair.cert)?,
                    client_key: std::fs::read(&pair.key)?,
                }),
                None => None,
            },
        })
    }
}

/// Configuration that cannot be used; names the variable.
#[derive(Debug, thiserror::Error)]
#[error("{var}: {message}")]
pub struct ConfigError {
    /// The environment variable.
    pub var: &'static str,
    /// What is wrong.
    pub message: String,
}

fn bad(var: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError {
        var,
        message: message.into(),
    }
}

fn split_list(value: Option<&str>) -> Vec<String> {
    value
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Both halves of a certificate/key pair, or neither; the half that is missing is named.
pub(crate) fn key_pair(
    cert: Option<PathBuf>,
    cert_var: &'static str,
    key: Option<PathBuf>,
    key_var: &'static str,
) -> Result<Option<KeyPairFiles>, ConfigError> {
    let cert = cert.filter(|p| !p.as_os_str().is_empty());
    let key = key.filter(|p| !p.as_os_str().is_empty());
    match (cert, key) {
        (None, None) => Ok(None),
        (Some(_), None) => Err(bad(key_var, format!("required when {cert_var} is set"))),
        (None, Some(_)) => Err(bad(cert_var, format!("required when {key_var} is set"))),
        (Some(cert), Some(key)) => {
            let pair = KeyPairFiles { cert, key };
            pair.load().map_err(|e| bad(cert_var, e.to_string()))?;
            Ok(Some(pair))
        }
    }
}

/// The TLS files of the Redis connection, checked against the URLs they go with.
fn redis_tls(
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    store: &StoreConfig,
) -> Result<Option<RedisTlsFiles>, ConfigError> {
    let ca = ca.filter(|p| !p.as_os_str().is_empty());
    let client = key_pair(cert, "REDIS_CERT_FILE", key, "REDIS_KEY_FILE")?;
    if let Some(ca) = &ca {
        crate::tls::certificates(ca).map_err(|e| bad("REDIS_CA_FILE", e.to_string()))?;
    }
    let (var, urls): (&'static str, Vec<&str>) = match store {
        StoreConfig::Memory => ("REDIS_URL", vec![]),
        StoreConfig::Redis(url) => ("REDIS_URL", vec![url.expose()]),
        StoreConfig::Cluster(nodes) => (
            "REDIS_CLUSTER_NODES",
            nodes.iter().map(Secret::expose).collect(),
        ),
    };
    let tls_urls = urls.iter().filter(|u| u.starts_with("rediss://")).count();
    if tls_urls != 0 && tls_urls != urls.len() {
        return Err(bad(
            var,
            "mixes rediss:// and plaintext nodes; use rediss:// for all of them",
        ));
    }
    if ca.is_none() && client.is_none() {
        return Ok(None);
    }
    if tls_urls == 0 {
        let which = if ca.is_some() {
            "REDIS_CA_FILE"
        } else {
            "REDIS_CERT_FILE"
        };
        return Err(bad(
            which,
            format!("only used with rediss:// URLs, and {var} has none"),
        ));
    }
    Ok(Some(RedisTlsFiles { ca, client }))
}

fn check_redis_url(var: &'static str, url: &str) -> Result<(), ConfigError> {
    // The redis crate turns verification off for `#insecure`, and only when built with
    // its insecure feature, which this binary is not: say so instead of failing at connect.
    if url.starts_with("rediss://") && url.contains('#') {
        return Err(bad(
            var,
            "rediss://…#insecure (no certificate verification) is not supported; \
             set REDIS_CA_FILE to the CA that issued the server's certificate",
        ));
    }
    if !(url.starts_with("redis://")
        || url.starts_with("rediss://")
        || url.starts_with("redis+unix://")
        || url.starts_with("unix://"))
    {
        return Err(bad(
            var,
            "must start with redis://, rediss:// or redis+unix://",
        ));
    }
    redis::Client::open(url).map_err(|e| bad(var, format!("invalid Redis URL: {e}")))?;
    Ok(())
}

/// The command line as clap defines it (every setting but the [`SECRETS`]): `--help`, and
/// the check that the docs list every setting with its default.
pub fn command() -> clap::Command {
    <Args as clap::CommandFactory>::command()
}

impl Config {
    /// Parses the process arguments and environment. On `--help`/`--version` prints and
    /// exits 0; on bad input prints the problem and exits 64.
    pub fn from_env_or_exit() -> Self {
        match Args::try_parse() {
            Ok(args) => match SecretValues::read(&callbridge_telemetry::process_env)
                .and_then(|secrets| Self::from_args(args, secrets))
            {
                Ok(config) => config,
                Err(err) => {
                    eprintln!("callbridge-control: invalid configuration: {err}");
                    std::process::exit(EXIT_CONFIG);
                }
            },
            Err(err) => {
                let code = match err.kind() {
                    clap::error::ErrorKind::DisplayHelp
                    | clap::error::ErrorKind::DisplayVersion => 0,
                    _ => EXIT_CONFIG,
                };
                let _ = err.print();
                std::process::exit(code);
            }
        }
    }

    /// Parses configuration from an explicit argument list, the secrets from the process
    /// environment.
    pub fn from_args_iter<I, T>(args: I) -> Result<Self, ConfigError>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        Self::from_args_and_secrets(args, &callbridge_telemetry::process_env)
    }

    /// Parses configuration from an explicit argument list, the secrets looked up in `env`
    /// (tests, and the in-process demo).
    pub fn from_args_and_secrets<I, T>(
        args: I,
        env: &dyn Fn(&str) -> Option<std::ffi::OsString>,
    ) -> Result<Self, ConfigError>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let args = Args::try_parse_from(args).map_err(|e| bad("arguments", e.to_string()))?;
        Self::from_args(args, SecretValues::read(env)?)
    }

    fn from_args(mut args: Args, secrets: SecretValues) -> Result<Self, ConfigError> {
        let listen = args
            .listen
            .parse()
            .map_err(|e| bad("CONTROL_LISTEN", format!("not a socket address: {e}")))?;
        let cluster = split_list(secrets.redis_cluster_nodes.as_deref());
        let redis_url = secrets.redis_url.filter(|u| !u.trim().is_empty());
        let store = match (redis_url, cluster.is_empty()) {
            (Some(_), false) => {
                return Err(bad(
                    "REDIS_CLUSTER_NODES",
                    "set either REDIS_URL or REDIS_CLUSTER_NODES, not both",
                ));
            }
            (Some(url), true) => {
                check_redis_url("REDIS_URL", &url)?;
                StoreConfig::Redis(Secret::new(url))
            }
            (None, false) => {
                for node in &cluster {
                    check_redis_url("REDIS_CLUSTER_NODES", node)?;
                }
                StoreConfig::Cluster(cluster.into_iter().map(Secret::new).collect())
            }
            (None, true) => StoreConfig::Memory,
        };
        let redis_tls = redis_tls(
            args.redis_ca_file.take(),
            args.redis_cert_file.take(),
            args.redis_key_file.take(),
            &store,
        )?;
        let grpc_tls = match key_pair(
            args.tls_cert_file.take(),
            "CONTROL_TLS_CERT_FILE",
            args.tls_key_file.take(),
            "CONTROL_TLS_KEY_FILE",
        )? {
            Some(pair) => {
                let tls = ServerTls {
                    pair,
                    client_ca: args
                        .tls_client_ca_file
                        .take()
                        .filter(|p| !p.as_os_str().is_empty()),
                };
                tls.check()
                    .map_err(|e| bad("CONTROL_TLS_CLIENT_CA_FILE", e.to_string()))?;
                Some(tls)
            }
            None => {
                if args
                    .tls_client_ca_file
                    .as_ref()
                    .is_some_and(|p| !p.as_os_str().is_empty())
                {
                    return Err(bad(
                        "CONTROL_TLS_CLIENT_CA_FILE",
                        "client certificates need TLS: set CONTROL_TLS_CERT_FILE and CONTROL_TLS_KEY_FILE too",
                    ));
                }
                None
            }
        };

        let app_tokens: Vec<Secret> = split_list(secrets.app_tokens.as_deref())
            .into_iter()
            .map(Secret::new)
            .collect();
        let relay_tokens: Vec<Secret> = split_list(secrets.relay_tokens.as_deref())
            .into_iter()
            .map(Secret::new)
            .collect();
        let insecure_no_auth = match args.insecure_no_auth.trim().to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" => true,
            "false" | "0" | "no" | "" => false,
            other => {
                return Err(bad(
                    "CONTROL_INSECURE_NO_AUTH",
                    format!("expected true or false, got '{other}'"),
                ));
            }
        };
        check_token_lengths(&app_tokens, &relay_tokens, insecure_no_auth)?;
        if app_tokens.is_empty() && relay_tokens.is_empty() && !insecure_no_auth {
            return Err(bad(
                "CONTROL_APP_TOKENS",
                "no CONTROL_APP_TOKENS and no CONTROL_RELAY_TOKENS: refusing to start without auth \
                 (set CONTROL_INSECURE_NO_AUTH=true to allow it)",
            ));
        }
        let relay_public_url = match args.relay_public_url.filter(|u| !u.trim().is_empty()) {
            None => None,
            Some(url) => {
                let url = url.trim().trim_end_matches('/').to_owned();
                if !(url.starts_with("https://") || url.starts_with("http://")) {
                    return Err(bad(
                        "RELAY_PUBLIC_URL",
                        "must start with https:// or http://",
                    ));
                }
                Some(url)
            }
        };
        tracing_subscriber::EnvFilter::try_new(&args.log)
            .map_err(|e| bad("CONTROL_LOG", format!("invalid filter: {e}")))?;
        if args.lease_secs == 0 || args.lease_secs > 3600 {
            return Err(bad("CONTROL_LEASE_SECS", "must be 1..=3600"));
        }
        // At or above the lease, a lost relay's lease would run out (RELAY_LOST) before
        // the heartbeat timeout could release it for a resume.
        if args.heartbeat_timeout_secs == 0 || args.heartbeat_timeout_secs >= args.lease_secs {
            return Err(bad(
                "CONTROL_HEARTBEAT_TIMEOUT_SECS",
                format!(
                    "must be at least 1 and less than CONTROL_LEASE_SECS ({})",
                    args.lease_secs
                ),
            ));
        }
        if args.retention_secs < 60 {
            return Err(bad("CONTROL_RETENTION_SECS", "must be at least 60"));
        }
        let metrics_listen = if args.metrics_listen.trim().is_empty() {
            None
        } else {
            Some(args.metrics_listen.trim().parse().map_err(|e| {
                bad(
                    "CONTROL_METRICS_LISTEN",
                    format!("not a socket address: {e}"),
                )
            })?)
        };
        let control_id = match args.id.filter(|s| !s.trim().is_empty()) {
            Some(id) => {
                if id.len() > 128
                    || !id
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
                {
                    return Err(bad("CONTROL_ID", "use 1..=128 of [A-Za-z0-9._-]"));
                }
                id
            }
            None => default_control_id(),
        };
        let twilio = args
            .twilio
            .into_config(secrets.twilio_auth_token, secrets.twilio_api_key_secret)?;
        let limits = args
            .limits
            .into_limits(metrics_listen.is_some(), insecure_no_auth)?;
        Ok(Config {
            listen,
            store,
            app_tokens,
            relay_tokens,
            insecure_no_auth,
            relay_public_url,
            log: args.log,
            log_format: args.log_format,
            lease: Duration::from_secs(args.lease_secs),
            heartbeat_timeout: Duration::from_secs(args.heartbeat_timeout_secs),
            retention: Duration::from_secs(args.retention_secs),
            metrics_listen,
            control_id,
            shutdown_grace: Duration::from_secs(args.shutdown_grace_secs),
            twilio,
            grpc_tls,
            redis_tls,
            limits,
        })
    }
}

/// Every token must be header text, and outside the insecure mode long enough not to be
/// guessed (a short one is most likely a placeholder left in a manifest). The error names
/// the variable and the position, never the token.
fn check_token_lengths(
    app_tokens: &[Secret],
    relay_tokens: &[Secret],
    insecure_no_auth: bool,
) -> Result<(), ConfigError> {
    for (var, tokens) in [
        ("CONTROL_APP_TOKENS", app_tokens),
        ("CONTROL_RELAY_TOKENS", relay_tokens),
    ] {
        // A token no header can carry would never match: refused even in insecure mode.
        if let Some(i) = tokens
            .iter()
            .position(|t| !callbridge_telemetry::is_header_token(t.expose()))
        {
            return Err(bad(
                var,
                format!(
                    "token {} of {} is not valid HTTP header text (visible ASCII, no spaces)",
                    i + 1,
                    tokens.len()
                ),
            ));
        }
        if insecure_no_auth {
            continue;
        }
        if let Some(i) = tokens.iter().position(|t| !t.long_enough()) {
            return Err(bad(
                var,
                format!(
                    "token {} of {} is shorter than {} bytes (allowed only with \
                     CONTROL_INSECURE_NO_AUTH=true)",
                    i + 1,
                    tokens.len(),
                    callbridge_telemetry::MIN_SECRET_BYTES
                ),
            ));
        }
    }
    Ok(())
}

/// Hostname plus a random suffix, so two replicas on one host still differ.
fn default_control_id() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "control".to_owned());
    let host: String = host
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || "-_.".contains(*c))
        .take(64)
        .collect();
    format!("{host}-{:08x}", rand::random::<u32>())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A token long enough for the secure mode.
    const T: &str = "app-token-0123456789abcdef-012345";

    /// `T` as the app token setting.
    const APP: &str = "CONTROL_APP_TOKENS=app-token-0123456789abcdef-012345";

    /// `NAME=value` entries are the environment the secrets are read from (they are no
    /// flags); the rest is the command line.
    fn parse(args: &[&str]) -> Result<Config, ConfigError> {
        let is_env =
            |k: &str| !k.is_empty() && k.bytes().all(|b| b.is_ascii_uppercase() || b == b'_');
        let mut flags = vec!["callbridge-control"];
        let mut env = std::collections::HashMap::new();
        for a in args {
            match a.split_once('=').filter(|(k, _)| is_env(k)) {
                Some((k, v)) => {
                    env.insert(k.to_owned(), std::ffi::OsString::from(v));
                }
                None => flags.push(a),
            }
        }
        Config::from_args_and_secrets(flags, &|name| env.get(name).cloned())
    }

    #[test]
    fn refuses_to_start_without_tokens_unless_insecure() {
        let err = parse(&[]).expect_err("no tokens");
        assert_eq!(err.var, "CONTROL_APP_TOKENS");
        let config = parse(&["--insecure-no-auth", "true"]).expect("insecure allowed");
        assert!(config.insecure_no_auth);
        assert_eq!(config.store, StoreConfig::Memory);
    }

    #[test]
    fn tokens_are_split_and_redacted() {
        let config = parse(&[
            "CONTROL_APP_TOKENS=app-secret-one-0123456789abcdef01, app-secret-two-0123456789abcdef01,",
            "CONTROL_RELAY_TOKENS=relay-secret-0123456789abcdef0123",
        ])
        .expect("valid");
        assert_eq!(config.app_tokens.len(), 2);
        assert_eq!(
            config.app_tokens[1].expose(),
            "app-secret-two-0123456789abcdef01"
        );
        let shown = format!("{config:?}");
        assert!(
            !shown.contains("secret-") && !shown.contains("relay-secret"),
            "{shown}"
        );
    }

    #[test]
    fn bad_values_name_their_variable() {
        let cases: &[(&[&str], &str)] = &[
            (&[APP, "--listen", "nope"], "CONTROL_LISTEN"),
            (&[APP, "REDIS_URL=http://x"], "REDIS_URL"),
            (&[APP, "--lease-secs", "0"], "CONTROL_LEASE_SECS"),
            (&[APP, "--relay-public-url", "ftp://x"], "RELAY_PUBLIC_URL"),
            (&[APP, "--metrics-listen", "x"], "CONTROL_METRICS_LISTEN"),
            (
                &[APP, "--heartbeat-timeout-secs", "0"],
                "CONTROL_HEARTBEAT_TIMEOUT_SECS",
            ),
            (
                &[APP, "--lease-secs", "5", "--heartbeat-timeout-secs", "5"],
                "CONTROL_HEARTBEAT_TIMEOUT_SECS",
            ),
            (
                &[APP, "REDIS_URL=redis://a", "REDIS_CLUSTER_NODES=redis://b"],
                "REDIS_CLUSTER_NODES",
            ),
        ];
        for (args, var) in cases {
            let err = parse(args).expect_err("invalid");
            assert_eq!(err.var, *var, "{args:?}");
        }
    }

    #[test]
    fn twilio_settings_are_checked_and_redacted() {
        let sid = "AC0123456789abcdef0123456789abcdef";
        let config = parse(&[APP]).expect("valid");
        assert!(config.twilio.is_none(), "no account: control does not dial");
        let config = parse(&[
            APP,
            "--twilio-account-sid",
            sid,
            "TWILIO_AUTH_TOKEN=tok-secret-value",
        ])
        .expect("valid");
        let twilio = config.twilio.as_ref().expect("configured");
        assert_eq!(twilio.username, sid);
        assert!(!format!("{config:?}").contains("tok-secret-value"));
        let cases: &[(&[&str], &str)] = &[
            (&["--twilio-account-sid", "AC1"], "TWILIO_ACCOUNT_SID"),
            (&["--twilio-account-sid", sid], "TWILIO_AUTH_TOKEN"),
            (
                &[
                    "--twilio-account-sid",
                    sid,
                    "--twilio-api-key-sid",
                    "SK0123456789abcdef0123456789abcdef",
                ],
                "TWILIO_API_KEY_SECRET",
            ),
            (
                &[
                    "--twilio-account-sid",
                    sid,
                    "TWILIO_AUTH_TOKEN=x",
                    "--twilio-api-base-url",
                    "ftp://x",
                ],
                "TWILIO_API_BASE_URL",
            ),
            (
                &[
                    "--twilio-account-sid",
                    sid,
                    "TWILIO_AUTH_TOKEN=x",
                    "--twilio-http-timeout-ms",
                    "0",
                ],
                "TWILIO_HTTP_TIMEOUT_MS",
            ),
        ];
        for (args, var) in cases {
            let all: Vec<&str> = [APP].iter().chain(args.iter()).copied().collect();
            assert_eq!(parse(&all).expect_err("invalid").var, *var, "{args:?}");
        }
    }

    #[test]
    fn empty_metrics_listen_disables_metrics() {
        let config = parse(&[APP, "--metrics-listen", ""]).expect("valid");
        assert!(config.metrics_listen.is_none());
        assert!(config.control_id.len() > 9);
    }

    #[test]
    fn short_tokens_are_refused_outside_the_insecure_mode() {
        for var in ["CONTROL_APP_TOKENS", "CONTROL_RELAY_TOKENS"] {
            let list = format!("{var}={T},short-secret");
            let err = parse(&[&list]).expect_err("short token");
            assert_eq!(err.var, var);
            assert!(err.message.contains("token 2 of 2"), "{err}");
            assert!(
                !err.to_string().contains("short-secret"),
                "not echoed: {err}"
            );
            let config = parse(&[&list, "--insecure-no-auth", "true"]).expect("insecure");
            assert!(config.insecure_no_auth);
        }
        assert!(
            parse(&[
                APP,
                "CONTROL_RELAY_TOKENS=relay-token-0123456789abcdef-0123"
            ])
            .is_ok()
        );
        let err = parse(&[
            "CONTROL_RELAY_TOKENS=caf\u{e9}",
            "--insecure-no-auth",
            "true",
        ])
        .expect_err("not header text");
        assert_eq!(err.var, "CONTROL_RELAY_TOKENS");
        assert!(err.message.contains("header text"), "{err}");
    }

    #[test]
    fn redis_urls_are_redacted() {
        let config =
            parse(&[APP, "REDIS_URL=redis://:hunter2-password@127.0.0.1:6379/0"]).expect("valid");
        assert!(matches!(&config.store, StoreConfig::Redis(u) if u.expose().contains("hunter2")));
        let shown = format!("{config:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        let config = parse(&[
            APP,
            "REDIS_CLUSTER_NODES=redis://:pw-one@127.0.0.1:7000,redis://:pw-two@127.0.0.1:7001",
        ])
        .expect("valid");
        let shown = format!("{config:?}");
        assert!(
            !shown.contains("pw-one") && !shown.contains("pw-two"),
            "{shown}"
        );
    }

    #[test]
    fn secrets_are_no_flags_and_come_from_files_too() {
        for flag in [
            "--redis-url",
            "--redis-cluster-nodes",
            "--app-tokens",
            "--relay-tokens",
            "--twilio-auth-token",
            "--twilio-api-key-secret",
        ] {
            let err = parse(&[APP, flag, "redis://:pw@127.0.0.1:6379"]).expect_err("no flag");
            assert_eq!(err.var, "arguments", "{flag}: {err}");
        }
        let dir = std::env::temp_dir().join(format!("control-secrets-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let tokens = dir.join("tokens");
        std::fs::write(&tokens, format!("{T},relay-token-0123456789abcdef-0123\n")).expect("w");
        let url = dir.join("url");
        std::fs::write(&url, "redis://:hunter2-from-file@127.0.0.1:6379/0\n").expect("w");
        let tokens_var = format!("CONTROL_APP_TOKENS_FILE={}", tokens.display());
        let url_var = format!("REDIS_URL_FILE={}", url.display());
        let config = parse(&[&tokens_var, &url_var]).expect("valid");
        assert_eq!(config.app_tokens.len(), 2);
        assert_eq!(
            config.app_tokens[1].expose(),
            "relay-token-0123456789abcdef-0123"
        );
        assert!(matches!(&config.store, StoreConfig::Redis(u) if u.expose().ends_with("6379/0")));
        let err = parse(&[APP, &tokens_var]).expect_err("both");
        assert!(err.to_string().contains("CONTROL_APP_TOKENS_FILE"), "{err}");
        assert!(!err.to_string().contains("app-token-"), "{err}");
        let err = parse(&[APP, "REDIS_URL_FILE=/nonexistent/redis-url"]).expect_err("missing");
        assert_eq!(err.var, "REDIS_URL_FILE");
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}

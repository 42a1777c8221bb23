//! Relay configuration: every setting is an environment variable (and a flag of the same
//! meaning), read once before any socket opens. Invalid configuration exits with code 64.
//! Secrets ([`SECRETS`]) are no flags: they come from the variable or from the file its
//! `_FILE` twin names (a Kubernetes secret mounted as a file); `ps` shows neither.
//!
//! | variable | meaning | default |
//! |---|---|---|
//! | `RELAY_LISTEN` | HTTP/WS listen address | `0.0.0.0:8080` |
//! | `RELAY_PUBLIC_URL` | public base URL Twilio reaches; TwiML and signatures use it. `https://` on port 443 unless loopback (Twilio opens streams only as `wss://` on 443) | required |
//! | `CONTROL_URL` | control plane gRPC address: `https://host:port` (TLS) or `http://host:port` (plaintext h2c); unset: standalone mode | unset |
//! | `RELAY_CONTROL_TOKEN`, `RELAY_CONTROL_TOKEN_FILE` | bearer token presented to control (secret: the value, or a file holding it) | unset |
//! | `CONTROL_CA_FILE` | PEM CA bundle that control's certificate must chain to (`https://` only) | unset: the webpki roots |
//! | `CONTROL_CLIENT_CERT_FILE`, `CONTROL_CLIENT_KEY_FILE` | PEM client certificate and key presented to control (mTLS; `https://` only) | unset |
//! | `OPENAI_API_KEY`, `OPENAI_API_KEY_FILE` | model API key (secret: the value, or a file holding it) | required |
//! | `OPENAI_REALTIME_URL` | Realtime endpoint | `wss://api.openai.com/v1/realtime` |
//! | `TWILIO_AUTH_TOKEN`, `TWILIO_AUTH_TOKEN_FILE` | checks `X-Twilio-Signature` (secret: the value, or a file holding it) | required unless skipping |
//! | `RELAY_STREAM_SECRET`, `RELAY_STREAM_SECRET_FILE` | secret (the value, or a file holding it): key (≥ 32 bytes, the same on every relay) of the per-stream credentials TwiML carries (`docs/protocols.md`, "Stream credentials") | derived from `TWILIO_AUTH_TOKEN`; with neither (insecure mode only), a random key per process |
//! | `RELAY_STREAM_CREDENTIAL_TTL_SECS` | how long a stream credential is valid after its TwiML was answered (Twilio opens the stream within seconds) | `60` |
//! | `RELAY_INSECURE_SKIP_SIGNATURE` | accept unsigned requests (local testing only; logs a warning at start; short tokens allowed) | `false` |
//! | `RELAY_INSECURE_ALLOW_PUBLIC` | allow the insecure settings towards hosts that are not loopback: skipping signatures with a non-loopback `RELAY_PUBLIC_URL`, a `ws://` model URL to a non-loopback host, a non-loopback `RELAY_PUBLIC_URL` that is not `https://` on 443 | `false` |
//! | `RELAY_DRAIN_GRACE_SECS` | how long live calls may run on after SIGTERM | `30` |
//! | `RELAY_DRAIN_HANDOFF` | on SIGTERM, hand each live call off to another relay at a quiet moment (else let it run on) | `true` |
//! | `RELAY_DRAIN_ACTION_WAIT_SECS` | after the last call, how long a draining relay keeps listening for Twilio's action request of each call it ended (hand-offs, calls cut at the grace), counted from that call's end; it stops sooner once each was answered here (0..=60) | `5` |
//! | `RELAY_FALLBACK_DIAL` | E.164 number `POST /api/twilio/fallback` dials after its apology (the number's fallback URL; needs no control); standalone, the action request after a model failure dials it too | unset: apologise and hang up |
//! | `RELAY_MODEL_RECONNECT_SECS` | how long a call may try to get a lost model session back before it ends with `MODEL_UNAVAILABLE` (0: no reconnect) | `10` |
//! | `RELAY_MODEL_STALL_SECS` | a model session that owes an answer (a response running, or asked for) and sends nothing for this long counts as lost | `10` |
//! | `RELAY_MODEL_SESSION_SECS` | the model's session limit; a fresh session replaces the old one at a quiet moment before it (0: never) | `3600` |
//! | `RELAY_MODEL_BREAKER_FAILURES` | consecutive failed model dials (refused, timed out, handshake refused) after which the endpoint's circuit breaker opens: new calls get the agent's fallback at once instead of dialling, until a background probe dial connects (0: no breaker) | `5` |
//! | `RELAY_MODEL_BREAKER_PROBE_MS` | pause before the breaker's first probe dial; it doubles after each failed probe, up to 10 s | `2000` |
//! | `RELAY_ID` | identity of this relay process towards control | hostname + random suffix |
//! | `RELAY_START_TIMEOUT_MS` | Twilio `start` must arrive this soon after the upgrade | `5000` |
//! | `RELAY_MEDIA_TIMEOUT_SECS` | end a call after this long without caller media | `30` |
//! | `RELAY_UPSTREAM_CONNECT_TIMEOUT_MS` | connect timeout to the model and to control | `5000` |
//! | `RELAY_TOOL_TIMEOUT_SECS` | an application tool result must come back this soon | `10` |
//! | `RELAY_EVENT_BUFFER` | unacknowledged events kept per call | `4096` |
//! | `RELAY_LOG` | log filter (`tracing` env-filter syntax) | `info` |
//! | `RELAY_LOG_FORMAT` | `text` or `json` | `text` |
//! | `AGENT_INSTRUCTIONS` | standalone agent: system prompt | a generic phone assistant prompt |
//! | `AGENT_VOICE` | standalone agent: voice | `marin` |
//! | `AGENT_MODEL` | standalone agent: model | `gpt-realtime` |
//! | `AGENT_TEMPERATURE` | refused when set: the GA Realtime API has no temperature | unset |
//! | `AGENT_GREETING` | standalone agent: the exact words spoken first (at most 500 characters, no control characters) | unset |
//! | `AGENT_TRANSCRIPTION_MODEL` | standalone agent: input transcription model; `none` turns it off (no caller lines) | `gpt-4o-mini-transcribe` |
//! | `AGENT_TURN_DETECTION` | standalone agent: `server_vad`, `semantic_vad` or `none` (the relay commits the caller's turns) | `server_vad` |
//! | `AGENT_SILENCE_COMMIT_MS` | standalone agent, `none` only: commit the caller's turn after this much silence (200..=10000) | unset |
//! | `AGENT_DTMF_TO_MODEL` | standalone agent: keys pressed also reach the model (`DTMF: 5`) | `false` |
//! | `AGENT_END_CALL` | standalone agent: offer the model the built-in `end_call` tool (it hangs up after its goodbye has played; the action request then answers `<Hangup/>`) | `false` |
//! | `RELAY_METRICS_ADDR` | Prometheus `/metrics` listen address (the public port does not serve it); empty disables | `0.0.0.0:9091` |
//! | `RELAY_METRICS_TLS_CERT_FILE`, `RELAY_METRICS_TLS_KEY_FILE` | PEM certificate chain and key: `/metrics` over TLS (reloaded when the files change) | unset: plaintext |
//! | `RELAY_HEADER_TIMEOUT_MS` | a client must send a whole request head this soon after connecting or after its previous answer (slow or idle clients are closed), on both listeners | `5000` |
//! | `RELAY_MAX_CONNECTIONS` | connections open at once on the public listener, WebSockets included; above it the relay stops accepting (clients wait in the backlog) | `4096` |
//! | `RELAY_MAX_CALLS` | calls carried at once; above it new webhooks and stream upgrades answer 503 | sized from the memory limit (see `capacity`) |

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use tonic::metadata::{Ascii, MetadataValue};

/// Exit code for invalid configuration (`EX_USAGE`).
pub const EXIT_CONFIG: i32 = 64;

/// Most consecutive failed dials `RELAY_MODEL_BREAKER_FAILURES` may ask for (a breaker
/// that needs more would never open in an outage anyone notices).
const MAX_BREAKER_FAILURES: u32 = 1000;
/// Bounds of `RELAY_MODEL_BREAKER_PROBE_MS`: probes faster than this would hammer a
/// recovering endpoint; slower ones keep callers on the fallback long after it is back.
const BREAKER_PROBE_MS_MIN: u64 = 50;
const BREAKER_PROBE_MS_MAX: u64 = 60_000;

/// Longest `RELAY_DRAIN_ACTION_WAIT_SECS`: Twilio asks the action URL within a second or
/// two of the stream closing; longer only delays the pod's exit.
const MAX_DRAIN_ACTION_WAIT_SECS: u64 = 60;

/// `^\+[1-9]\d{1,14}$`, the form Twilio's `<Dial>` takes (as control checks its numbers).
fn is_e164(s: &str) -> bool {
    let bytes = s.as_bytes();
    (3..=16).contains(&bytes.len())
        && bytes[0] == b'+'
        && (b'1'..=b'9').contains(&bytes[1])
        && bytes[2..].iter().all(u8::is_ascii_digit)
}

/// Default Realtime endpoint.
pub const DEFAULT_REALTIME_URL: &str = "wss://api.openai.com/v1/realtime";
/// Default standalone model.
pub const DEFAULT_MODEL: &str = "gpt-realtime";
/// Default standalone voice.
pub const DEFAULT_VOICE: &str = "marin";
const DEFAULT_INSTRUCTIONS: &str = "You are a friendly, concise phone assistant. Keep answers short; \
     the caller hears you over a phone line.";

/// The secret type shared with control (`Debug`/`Display` print `[redacted]`).
pub use callbridge_telemetry::Secret;
/// A secret's variable and its `_FILE` twin ([`SECRETS`]).
pub use callbridge_telemetry::SecretVar;

/// The standalone agent's turn detection (`AgentSettings.turn_detection.type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
#[value(rename_all = "snake_case")]
pub enum TurnDetectionMode {
    /// The model's voice activity detection.
    ServerVad,
    /// The model's semantic turn detection.
    SemanticVad,
    /// None: the relay commits the caller's turns (`call::turn_commit`).
    None,
}

/// The relay's secrets: each read from its variable or from the file `NAME_FILE` names.
pub const SECRETS: [SecretVar; 4] = [
    callbridge_telemetry::secret_var!("OPENAI_API_KEY", "model API key (required)"),
    callbridge_telemetry::secret_var!(
        "TWILIO_AUTH_TOKEN",
        "checks X-Twilio-Signature (required unless RELAY_INSECURE_SKIP_SIGNATURE=true)"
    ),
    callbridge_telemetry::secret_var!(
        "RELAY_CONTROL_TOKEN",
        "bearer token presented to control (>= 32 bytes)"
    ),
    callbridge_telemetry::secret_var!(
        "RELAY_STREAM_SECRET",
        "key of the per-stream credentials (>= 32 bytes, the same on every relay)"
    ),
];

/// The end of `--help`: the secrets (no flags, so clap does not list them) and the
/// OpenTelemetry variables.
fn help_footer() -> String {
    format!(
        "{}\n{}",
        callbridge_telemetry::secrets_help(&SECRETS),
        callbridge_telemetry::ENV_HELP
    )
}

/// Log output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Everything the relay reads from its environment.
#[derive(Clone, Debug, Parser)]
#[command(
    name = "callbridge-relay",
    about = "Bridges Twilio Media Streams and the OpenAI Realtime API, one call per WebSocket.",
    long_about = None,
    after_help = help_footer()
)]
pub struct Config {
    /// HTTP/WS listen address.
    #[arg(long, env = "RELAY_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,
    /// Public base URL Twilio reaches (https://relay.example.com); used in TwiML and to check
    /// signatures. http:// is accepted for local tests (streams then use ws://).
    #[arg(long, env = "RELAY_PUBLIC_URL")]
    pub public_url: String,
    /// Control plane gRPC address: https://host:port (TLS) or http://host:port (plaintext
    /// h2c). Unset: standalone mode, nothing stored.
    #[arg(long, env = "CONTROL_URL")]
    pub control_url: Option<String>,
    /// PEM CA bundle control's certificate must chain to (https:// CONTROL_URL only).
    /// Unset: the webpki roots (Mozilla's list, compiled in).
    #[arg(long, env = "CONTROL_CA_FILE")]
    pub control_ca_file: Option<PathBuf>,
    /// PEM client certificate presented to control (mTLS; with CONTROL_CLIENT_KEY_FILE).
    #[arg(long, env = "CONTROL_CLIENT_CERT_FILE")]
    pub control_client_cert_file: Option<PathBuf>,
    /// PEM private key of CONTROL_CLIENT_CERT_FILE.
    #[arg(long, env = "CONTROL_CLIENT_KEY_FILE")]
    pub control_client_key_file: Option<PathBuf>,
    /// Bearer token presented to the control plane (`RELAY_CONTROL_TOKEN[_FILE]`).
    #[arg(skip)]
    pub control_token: Option<Secret>,
    /// OpenAI API key (`OPENAI_API_KEY[_FILE]`; empty until read).
    #[arg(skip = Secret::new(""))]
    pub openai_api_key: Secret,
    /// OpenAI Realtime WebSocket endpoint.
    #[arg(long, env = "OPENAI_REALTIME_URL", default_value = DEFAULT_REALTIME_URL)]
    pub openai_realtime_url: String,
    /// Twilio auth token, to check X-Twilio-Signature (`TWILIO_AUTH_TOKEN[_FILE]`).
    #[arg(skip)]
    pub twilio_auth_token: Option<Secret>,
    /// Key of the per-stream credentials (at least 32 bytes; the same on every relay;
    /// `RELAY_STREAM_SECRET[_FILE]`). Unset: derived from TWILIO_AUTH_TOKEN.
    #[arg(skip)]
    pub stream_secret: Option<Secret>,
    /// Seconds a stream credential is valid after its TwiML was answered.
    #[arg(long, env = "RELAY_STREAM_CREDENTIAL_TTL_SECS", default_value_t = 60)]
    pub stream_credential_ttl_secs: u64,
    /// Accept requests without a valid Twilio signature (local testing only).
    #[arg(long, env = "RELAY_INSECURE_SKIP_SIGNATURE", default_value_t = false, action = clap::ArgAction::Set)]
    pub insecure_skip_signature: bool,
    /// Allow the insecure settings towards hosts that are not loopback: skipping
    /// signatures with a non-loopback RELAY_PUBLIC_URL, a ws:// model URL off loopback,
    /// a non-loopback RELAY_PUBLIC_URL that is not https:// on 443.
    #[arg(long, env = "RELAY_INSECURE_ALLOW_PUBLIC", default_value_t = false, action = clap::ArgAction::Set)]
    pub insecure_allow_public: bool,
    /// Seconds live calls may run on after SIGTERM before they are cut.
    #[arg(long, env = "RELAY_DRAIN_GRACE_SECS", default_value_t = 30)]
    pub drain_grace_secs: u64,
    /// On SIGTERM, hand each live call off to another relay at a quiet moment.
    #[arg(long, env = "RELAY_DRAIN_HANDOFF", default_value_t = true, action = clap::ArgAction::Set)]
    pub drain_handoff: bool,
    /// Seconds a draining relay keeps listening, after a call it ended, for Twilio's
    /// action request of that call (it may go to another relay).
    #[arg(long, env = "RELAY_DRAIN_ACTION_WAIT_SECS", default_value_t = 5)]
    pub drain_action_wait_secs: u64,
    /// E.164 number `POST /api/twilio/fallback` (and, standalone, the action request after a
    /// model failure) dials after its apology (unset: it hangs up).
    #[arg(long, env = "RELAY_FALLBACK_DIAL")]
    pub fallback_dial: Option<String>,
    /// Seconds a call may try to get a lost model session back (0: no reconnect).
    #[arg(long, env = "RELAY_MODEL_RECONNECT_SECS", default_value_t = 10)]
    pub model_reconnect_secs: u64,
    /// Seconds a model session owing an answer may stay silent before it counts as lost.
    #[arg(long, env = "RELAY_MODEL_STALL_SECS", default_value_t = 10)]
    pub model_stall_secs: u64,
    /// The model's session limit in seconds (0: never roll over).
    #[arg(long, env = "RELAY_MODEL_SESSION_SECS", default_value_t = 3600)]
    pub model_session_secs: u64,
    /// Consecutive failed model dials that open the endpoint's circuit breaker (0: off).
    #[arg(long, env = "RELAY_MODEL_BREAKER_FAILURES", default_value_t = 5)]
    pub model_breaker_failures: u32,
    /// Milliseconds before the breaker's first probe dial (doubling after each failure).
    #[arg(long, env = "RELAY_MODEL_BREAKER_PROBE_MS", default_value_t = 2000)]
    pub model_breaker_probe_ms: u64,
    /// Identity of this relay towards control (default: hostname + random suffix).
    #[arg(long, env = "RELAY_ID")]
    pub relay_id: Option<String>,
    /// Milliseconds Twilio has to send `start` after the upgrade.
    #[arg(long, env = "RELAY_START_TIMEOUT_MS", default_value_t = 5000)]
    pub start_timeout_ms: u64,
    /// Seconds without caller media before the call is ended.
    #[arg(long, env = "RELAY_MEDIA_TIMEOUT_SECS", default_value_t = 30)]
    pub media_timeout_secs: u64,
    /// Connect timeout (ms) to the model and to control.
    #[arg(
        long,
        env = "RELAY_UPSTREAM_CONNECT_TIMEOUT_MS",
        default_value_t = 5000
    )]
    pub upstream_connect_timeout_ms: u64,
    /// Seconds an application tool has to answer before the model gets an error result.
    #[arg(long, env = "RELAY_TOOL_TIMEOUT_SECS", default_value_t = 10)]
    pub tool_timeout_secs: u64,
    /// Unacknowledged events kept per call while control is slow or away.
    #[arg(long, env = "RELAY_EVENT_BUFFER", default_value_t = 4096)]
    pub event_buffer: usize,
    /// Log filter (tracing env-filter syntax).
    #[arg(long, env = "RELAY_LOG", default_value = "info")]
    pub log: String,
    /// Log format.
    #[arg(long, env = "RELAY_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// Standalone agent: system prompt.
    #[arg(long, env = "AGENT_INSTRUCTIONS", default_value = DEFAULT_INSTRUCTIONS)]
    pub agent_instructions: String,
    /// Standalone agent: voice.
    #[arg(long, env = "AGENT_VOICE", default_value = DEFAULT_VOICE)]
    pub agent_voice: String,
    /// Standalone agent: model.
    #[arg(long, env = "AGENT_MODEL", default_value = DEFAULT_MODEL)]
    pub agent_model: String,
    /// Refused when set: the GA Realtime API has no temperature (not a session field, not
    /// a documented URL parameter), so the relay could not honour it.
    #[arg(long, env = "AGENT_TEMPERATURE")]
    pub agent_temperature: Option<f64>,
    /// Standalone agent: the exact words spoken first (at most 500 characters, no control
    /// characters).
    #[arg(long, env = "AGENT_GREETING")]
    pub agent_greeting: Option<String>,
    /// Standalone agent: input transcription model (unset: `gpt-4o-mini-transcribe`;
    /// `none`: off, and then no caller lines in transcripts or replays).
    #[arg(long, env = "AGENT_TRANSCRIPTION_MODEL")]
    pub agent_transcription_model: Option<String>,
    /// Standalone agent: who ends the caller's turns.
    #[arg(
        long,
        env = "AGENT_TURN_DETECTION",
        value_enum,
        default_value = "server_vad"
    )]
    pub agent_turn_detection: TurnDetectionMode,
    /// Standalone agent with `none`: commit the caller's turn after this much silence.
    #[arg(long, env = "AGENT_SILENCE_COMMIT_MS")]
    pub agent_silence_commit_ms: Option<u32>,
    /// Standalone agent: keys the caller presses also reach the model.
    #[arg(long, env = "AGENT_DTMF_TO_MODEL", default_value_t = false, action = clap::ArgAction::Set)]
    pub agent_dtmf_to_model: bool,
    /// Standalone agent: the model may end the call (built-in `end_call` tool).
    #[arg(long, env = "AGENT_END_CALL", default_value_t = false, action = clap::ArgAction::Set)]
    pub agent_end_call: bool,

    // Listeners and limits (issue 12 item 4): `listen` and `capacity` use them.
    /// Prometheus /metrics listen address, apart from the public port; empty disables it.
    #[arg(long, env = "RELAY_METRICS_ADDR", default_value = "0.0.0.0:9091")]
    pub metrics_addr: String,
    /// `RELAY_METRICS_ADDR` parsed (`None`: no metrics listener); set by `validate`.
    #[arg(skip)]
    pub metrics_listen: Option<SocketAddr>,
    /// PEM certificate chain of the metrics listener; with RELAY_METRICS_TLS_KEY_FILE,
    /// /metrics is served over TLS only (the files are re-read when they change).
    #[arg(long, env = "RELAY_METRICS_TLS_CERT_FILE")]
    pub metrics_tls_cert_file: Option<PathBuf>,
    /// PEM private key of RELAY_METRICS_TLS_CERT_FILE.
    #[arg(long, env = "RELAY_METRICS_TLS_KEY_FILE")]
    pub metrics_tls_key_file: Option<PathBuf>,
    /// Milliseconds a client has to send a request head, after connecting or after its
    /// previous answer; also bounds a TLS handshake on the metrics listener.
    #[arg(long, env = "RELAY_HEADER_TIMEOUT_MS", default_value_t = 5000)]
    pub header_timeout_ms: u64,
    /// Connections open at once on the public listener, WebSockets included.
    #[arg(long, env = "RELAY_MAX_CONNECTIONS", default_value_t = 4096)]
    pub max_connections: usize,
    /// Calls carried at once (default: sized from the memory limit, at most
    /// RELAY_MAX_CONNECTIONS); above it new webhooks and upgrades answer 503.
    #[arg(long, env = "RELAY_MAX_CALLS")]
    pub max_calls: Option<usize>,
}

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// clap could not parse the arguments or environment.
    #[error(transparent)]
    Parse(#[from] clap::Error),
    /// A secret or its file could not be read.
    #[error(transparent)]
    Secret(#[from] callbridge_telemetry::SecretError),
    /// A value parsed but makes no sense.
    #[error("{field}: {reason}")]
    Invalid {
        /// The environment variable at fault.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

fn invalid(field: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field,
        reason: reason.into(),
    }
}

impl Config {
    /// Parses flags and environment, reads the secrets, then validates.
    pub fn from_args_and_env<I, T>(args: I) -> Result<Self, ConfigError>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        Self::from_args_and_secrets(args, &callbridge_telemetry::process_env)
    }

    /// As [`Config::from_args_and_env`], with the secrets looked up in `env` (tests).
    pub fn from_args_and_secrets<I, T>(
        args: I,
        env: &dyn Fn(&str) -> Option<std::ffi::OsString>,
    ) -> Result<Self, ConfigError>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let mut config = Self::try_parse_from(args)?;
        let [openai, twilio, control, stream] = SECRETS;
        config.openai_api_key = callbridge_telemetry::read_secret(&openai, env)?
            .ok_or_else(|| invalid("OPENAI_API_KEY", "required (or OPENAI_API_KEY_FILE)"))?;
        config.twilio_auth_token = callbridge_telemetry::read_secret(&twilio, env)?;
        config.control_token = callbridge_telemetry::read_secret(&control, env)?;
        config.stream_secret = callbridge_telemetry::read_secret(&stream, env)?;
        config.validate()
    }

    /// A configuration for tests and embedding: the given public URL and model endpoint,
    /// no control (standalone), no signature check, defaults elsewhere.
    pub fn for_tests(public_url: &str, realtime_url: &str) -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            public_url: public_url.trim_end_matches('/').to_owned(),
            control_url: None,
            control_ca_file: None,
            control_client_cert_file: None,
            control_client_key_file: None,
            control_token: None,
            openai_api_key: Secret::new("sk-test"),
            openai_realtime_url: realtime_url.to_owned(),
            twilio_auth_token: None,
            stream_secret: None,
            stream_credential_ttl_secs: 60,
            insecure_skip_signature: true,
            insecure_allow_public: false,
            drain_grace_secs: 30,
            drain_handoff: true,
            drain_action_wait_secs: 5,
            fallback_dial: None,
            model_reconnect_secs: 10,
            model_stall_secs: 10,
            model_session_secs: 3600,
            model_breaker_failures: 5,
            model_breaker_probe_ms: 2000,
            relay_id: Some("relay-test".to_owned()),
            start_timeout_ms: 5000,
            media_timeout_secs: 30,
            upstream_connect_timeout_ms: 5000,
            tool_timeout_secs: 10,
            event_buffer: 4096,
            log: "info".to_owned(),
            log_format: LogFormat::Text,
            agent_instructions: DEFAULT_INSTRUCTIONS.to_owned(),
            agent_voice: DEFAULT_VOICE.to_owned(),
            agent_model: DEFAULT_MODEL.to_owned(),
            agent_temperature: None,
            agent_greeting: None,
            agent_transcription_model: None,
            agent_turn_detection: TurnDetectionMode::ServerVad,
            agent_silence_commit_ms: None,
            agent_dtmf_to_model: false,
            agent_end_call: false,
            metrics_addr: String::new(),
            metrics_listen: None,
            metrics_tls_cert_file: None,
            metrics_tls_key_file: None,
            header_timeout_ms: 5000,
            max_connections: 4096,
            max_calls: None,
        }
    }

    /// Checks cross-field rules and normalises URLs.
    pub fn validate(mut self) -> Result<Self, ConfigError> {
        self.public_url = self.public_url.trim_end_matches('/').to_owned();
        let rest = self
            .public_url
            .strip_prefix("https://")
            .or_else(|| self.public_url.strip_prefix("http://"))
            .ok_or_else(|| invalid("RELAY_PUBLIC_URL", "must start with https:// or http://"))?;
        if rest.is_empty() || rest.contains(['?', '#', ' ']) {
            return Err(invalid(
                "RELAY_PUBLIC_URL",
                "needs a host and no query or fragment",
            ));
        }
        if !(self.openai_realtime_url.starts_with("wss://")
            || self.openai_realtime_url.starts_with("ws://"))
        {
            return Err(invalid(
                "OPENAI_REALTIME_URL",
                "must start with wss:// or ws://",
            ));
        }
        if self.openai_realtime_url.contains('?') {
            return Err(invalid(
                "OPENAI_REALTIME_URL",
                "must not carry a query; the model is added per call",
            ));
        }
        if self.openai_api_key.expose().trim().is_empty() {
            return Err(invalid("OPENAI_API_KEY", "must not be empty"));
        }
        if let Some(url) = &self.control_url {
            if url.trim().is_empty() {
                self.control_url = None;
            } else if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(invalid(
                    "CONTROL_URL",
                    "must start with http:// or https://",
                ));
            }
        }
        match &self.twilio_auth_token {
            Some(t) if !t.expose().is_empty() => {}
            _ if self.insecure_skip_signature => {}
            _ => {
                return Err(invalid(
                    "TWILIO_AUTH_TOKEN",
                    "required unless RELAY_INSECURE_SKIP_SIGNATURE=true",
                ));
            }
        }
        if let Some(secret) = &self.stream_secret {
            if secret.expose().is_empty() {
                self.stream_secret = None;
            } else if secret.expose().len() < crate::stream_credential::MIN_SECRET_LEN {
                return Err(invalid(
                    "RELAY_STREAM_SECRET",
                    format!(
                        "must be at least {} bytes",
                        crate::stream_credential::MIN_SECRET_LEN
                    ),
                ));
            }
        }
        if !(1..=600).contains(&self.stream_credential_ttl_secs) {
            return Err(invalid(
                "RELAY_STREAM_CREDENTIAL_TTL_SECS",
                "must be within 1..=600",
            ));
        }
        if self.start_timeout_ms == 0 {
            return Err(invalid("RELAY_START_TIMEOUT_MS", "must be > 0"));
        }
        if self.media_timeout_secs == 0 {
            return Err(invalid("RELAY_MEDIA_TIMEOUT_SECS", "must be > 0"));
        }
        if self.upstream_connect_timeout_ms == 0 {
            return Err(invalid("RELAY_UPSTREAM_CONNECT_TIMEOUT_MS", "must be > 0"));
        }
        if self.model_breaker_failures > MAX_BREAKER_FAILURES {
            return Err(invalid(
                "RELAY_MODEL_BREAKER_FAILURES",
                format!("must be within 0..={MAX_BREAKER_FAILURES}"),
            ));
        }
        if !(BREAKER_PROBE_MS_MIN..=BREAKER_PROBE_MS_MAX).contains(&self.model_breaker_probe_ms) {
            return Err(invalid(
                "RELAY_MODEL_BREAKER_PROBE_MS",
                format!("must be within {BREAKER_PROBE_MS_MIN}..={BREAKER_PROBE_MS_MAX}"),
            ));
        }
        if self.drain_action_wait_secs > MAX_DRAIN_ACTION_WAIT_SECS {
            return Err(invalid(
                "RELAY_DRAIN_ACTION_WAIT_SECS",
                format!("must be within 0..={MAX_DRAIN_ACTION_WAIT_SECS}"),
            ));
        }
        match self.fallback_dial.as_deref().map(str::trim) {
            None | Some("") => self.fallback_dial = None,
            Some(n) if is_e164(n) => self.fallback_dial = Some(n.to_owned()),
            Some(n) => {
                return Err(invalid(
                    "RELAY_FALLBACK_DIAL",
                    format!("'{n}' is not an E.164 number (+ then 2..=15 digits)"),
                ));
            }
        }
        if self.tool_timeout_secs == 0 {
            return Err(invalid("RELAY_TOOL_TIMEOUT_SECS", "must be > 0"));
        }
        if !(16..=1_000_000).contains(&self.event_buffer) {
            return Err(invalid("RELAY_EVENT_BUFFER", "must be within 16..=1000000"));
        }
        if self.agent_temperature.is_some() {
            return Err(invalid(
                "AGENT_TEMPERATURE",
                "the GA Realtime API has no temperature (not a session field, not a \
                 documented URL parameter); unset it",
            ));
        }
        if let Some(problem) = self
            .agent_greeting
            .as_deref()
            .and_then(callbridge_proto::greeting_problem)
        {
            return Err(invalid("AGENT_GREETING", &problem));
        }
        if let Some(model) = &self.agent_transcription_model
            && (model.is_empty()
                || model.len() > 100
                || !model
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)))
        {
            return Err(invalid(
                "AGENT_TRANSCRIPTION_MODEL",
                "must be a model name (1..=100 of [a-zA-Z0-9._-]) or `none`",
            ));
        }
        if self.agent_instructions.trim().is_empty() {
            return Err(invalid("AGENT_INSTRUCTIONS", "must not be empty"));
        }
        if let Some(ms) = self.agent_silence_commit_ms {
            if self.agent_turn_detection != TurnDetectionMode::None {
                return Err(invalid(
                    "AGENT_SILENCE_COMMIT_MS",
                    "only with AGENT_TURN_DETECTION=none",
                ));
            }
            if !(200..=10_000).contains(&ms) {
                return Err(invalid(
                    "AGENT_SILENCE_COMMIT_MS",
                    "must be within 200..=10000",
                ));
            }
        }
        if self
            .relay_id
            .as_deref()
            .is_some_and(|id| id.trim().is_empty())
        {
            self.relay_id = None;
        }
        crate::control_tls::check(&self)?;
        self.check_control_token()?;
        self.check_insecure()?;
        self.validate_listeners()?;
        Ok(self)
    }

    /// The control token must make a valid `authorization` header (else calls would go
    /// out with no auth at all) and, outside the insecure mode, be long enough not to be
    /// guessed.
    fn check_control_token(&mut self) -> Result<(), ConfigError> {
        if self
            .control_token
            .as_ref()
            .is_some_and(|t| t.expose().is_empty())
        {
            self.control_token = None;
        }
        let Some(token) = &self.control_token else {
            return Ok(());
        };
        if bearer_header(token).is_none() {
            return Err(invalid(
                "RELAY_CONTROL_TOKEN",
                "is not valid HTTP header text (visible ASCII, no spaces)",
            ));
        }
        if !token.long_enough() && !self.insecure_skip_signature {
            return Err(invalid(
                "RELAY_CONTROL_TOKEN",
                format!(
                    "shorter than {} bytes (allowed only with RELAY_INSECURE_SKIP_SIGNATURE=true)",
                    callbridge_telemetry::MIN_SECRET_BYTES
                ),
            ));
        }
        Ok(())
    }

    /// The insecure settings stay on loopback unless RELAY_INSECURE_ALLOW_PUBLIC says
    /// otherwise: skipping signatures where Twilio (or anyone) can reach the relay, and
    /// sending the API key over `ws://` to another machine.
    fn check_insecure(&self) -> Result<(), ConfigError> {
        if self.insecure_allow_public {
            return Ok(());
        }
        if self.insecure_skip_signature && !url_host(&self.public_url).is_some_and(is_loopback) {
            return Err(invalid(
                "RELAY_INSECURE_SKIP_SIGNATURE",
                "true with a RELAY_PUBLIC_URL that is not loopback: anyone who reaches the \
                 relay could place calls on its model key; set RELAY_INSECURE_ALLOW_PUBLIC=true \
                 if that is really wanted",
            ));
        }
        if self.openai_realtime_url.starts_with("ws://")
            && !url_host(&self.openai_realtime_url).is_some_and(is_loopback)
        {
            return Err(invalid(
                "OPENAI_REALTIME_URL",
                "ws:// to a host that is not loopback would send OPENAI_API_KEY in clear; use \
                 wss:// (or set RELAY_INSECURE_ALLOW_PUBLIC=true)",
            ));
        }
        if !url_host(&self.public_url).is_some_and(is_loopback) {
            check_twilio_reachable(&self.public_url)?;
        }
        Ok(())
    }

    /// What a person starting this relay must be told loudly (logged at `warn` at start).
    pub fn warnings(&self) -> Vec<&'static str> {
        let mut warnings = Vec::new();
        if self.insecure_skip_signature {
            warnings.push(
                "RELAY_INSECURE_SKIP_SIGNATURE=true: requests are NOT checked for Twilio's \
                 signature; anyone who reaches this relay can start calls. Local testing only.",
            );
        }
        if self.insecure_allow_public {
            warnings.push(
                "RELAY_INSECURE_ALLOW_PUBLIC=true: the insecure settings apply beyond loopback.",
            );
        }
        warnings
    }

    /// `RELAY_METRICS_ADDR`, the listener limits and `RELAY_MAX_CALLS`.
    fn validate_listeners(&mut self) -> Result<(), ConfigError> {
        let addr = self.metrics_addr.trim();
        self.metrics_listen = if addr.is_empty() {
            None
        } else {
            let parsed: SocketAddr = addr
                .parse()
                .map_err(|_| invalid("RELAY_METRICS_ADDR", "must be host:port (or empty)"))?;
            if parsed.port() != 0 && parsed.port() == self.listen.port() {
                return Err(invalid(
                    "RELAY_METRICS_ADDR",
                    "must use another port than RELAY_LISTEN",
                ));
            }
            Some(parsed)
        };
        crate::listen::check_metrics_tls(self)?;
        if !(1..=600_000).contains(&self.header_timeout_ms) {
            return Err(invalid(
                "RELAY_HEADER_TIMEOUT_MS",
                "must be within 1..=600000",
            ));
        }
        if self.max_connections == 0 {
            return Err(invalid("RELAY_MAX_CONNECTIONS", "must be > 0"));
        }
        self.max_calls = Some(match self.max_calls {
            Some(0) => return Err(invalid("RELAY_MAX_CALLS", "must be > 0")),
            Some(n) if n > self.max_connections => {
                return Err(invalid(
                    "RELAY_MAX_CALLS",
                    "must not exceed RELAY_MAX_CONNECTIONS (every call holds a connection)",
                ));
            }
            Some(n) => n,
            None => crate::capacity::sized_from_memory().min(self.max_connections),
        });
        Ok(())
    }

    /// The header-read (and keep-alive idle) timeout of both listeners.
    pub fn header_timeout(&self) -> Duration {
        Duration::from_millis(self.header_timeout_ms)
    }

    /// `RELAY_MAX_CALLS` in force (sized from memory when unset).
    pub fn max_calls(&self) -> usize {
        self.max_calls
            .unwrap_or_else(|| crate::capacity::sized_from_memory().min(self.max_connections))
    }

    /// The relay id: configured, else hostname plus a random suffix.
    pub fn relay_id(&self) -> String {
        if let Some(id) = &self.relay_id {
            return id.clone();
        }
        let host = std::env::var("HOSTNAME")
            .ok()
            .filter(|h| !h.is_empty())
            .or_else(|| {
                std::fs::read_to_string("/etc/hostname")
                    .ok()
                    .map(|h| h.trim().to_owned())
            })
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "relay".to_owned());
        let suffix = uuid::Uuid::new_v4().simple().to_string();
        format!("{host}-{}", &suffix[..8])
    }

    /// Whether calls are backed by control (else standalone only).
    pub fn has_control(&self) -> bool {
        self.control_url.is_some()
    }

    /// The public base URL with `https`→`wss` and `http`→`ws`, for `<Stream url>`.
    pub fn public_ws_base(&self) -> String {
        callbridge_proto::paths::ws_base(&self.public_url)
    }

    /// How long a stream credential is valid.
    pub fn stream_credential_ttl(&self) -> Duration {
        Duration::from_secs(self.stream_credential_ttl_secs)
    }
    /// Start timeout as a duration.
    pub fn start_timeout(&self) -> Duration {
        Duration::from_millis(self.start_timeout_ms)
    }
    /// Media idle timeout as a duration.
    pub fn media_timeout(&self) -> Duration {
        Duration::from_secs(self.media_timeout_secs)
    }
    /// Upstream connect timeout as a duration.
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.upstream_connect_timeout_ms)
    }
    /// Tool timeout as a duration.
    pub fn tool_timeout(&self) -> Duration {
        Duration::from_secs(self.tool_timeout_secs)
    }
    /// Drain grace as a duration.
    pub fn drain_grace(&self) -> Duration {
        Duration::from_secs(self.drain_grace_secs)
    }
    /// How long a draining relay waits for the action request of a call it ended.
    pub fn drain_action_wait(&self) -> Duration {
        Duration::from_secs(self.drain_action_wait_secs)
    }

    /// How long a model session owing an answer may stay silent.
    pub fn model_stall(&self) -> Duration {
        Duration::from_secs(self.model_stall_secs.max(1))
    }

    /// Pause before the model breaker's first probe dial.
    pub fn model_breaker_probe(&self) -> Duration {
        Duration::from_millis(self.model_breaker_probe_ms)
    }

    /// How long a lost model session may be retried; `None`: no reconnect.
    pub fn model_reconnect(&self) -> Option<Duration> {
        (self.model_reconnect_secs > 0).then(|| Duration::from_secs(self.model_reconnect_secs))
    }

    /// When a model session is replaced: a tenth before its limit (at most 5 minutes
    /// before), so there is room to find a quiet moment. `None`: never.
    pub fn model_rollover_after(&self) -> Option<Duration> {
        if self.model_session_secs == 0 {
            return None;
        }
        let limit = Duration::from_secs(self.model_session_secs);
        Some(limit - (limit / 10).min(Duration::from_secs(300)))
    }
}

/// `Bearer <token>` as gRPC metadata; `None` unless the token is visible ASCII without
/// spaces (the header type would take other bytes, but control could never match them).
pub fn bearer_header(token: &Secret) -> Option<MetadataValue<Ascii>> {
    if !callbridge_telemetry::is_header_token(token.expose()) {
        return None;
    }
    MetadataValue::try_from(format!("Bearer {}", token.expose())).ok()
}

/// Twilio opens media streams only as `wss://` on port 443 (a `ws://` URL fails with
/// 31910/31920), and the stream URL is the public URL's `wss` twin: a public URL Twilio
/// reaches must be `https://` on 443, whatever the webhooks alone would tolerate.
fn check_twilio_reachable(public_url: &str) -> Result<(), ConfigError> {
    let url = url::Url::parse(public_url)
        .map_err(|e| invalid("RELAY_PUBLIC_URL", format!("is not a URL: {e}")))?;
    if url.scheme() != "https" || url.port_or_known_default() != Some(443) {
        return Err(invalid(
            "RELAY_PUBLIC_URL",
            "must be https:// on port 443 for a host that is not loopback: Twilio opens \
             media streams only as wss:// on 443 (put a TLS load balancer in front of \
             RELAY_LISTEN), or set RELAY_INSECURE_ALLOW_PUBLIC=true on a private test network",
        ));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(invalid(
            "RELAY_PUBLIC_URL",
            "must not carry credentials: it is written into every TwiML answer",
        ));
    }
    Ok(())
}

/// The host of `scheme://[user@]host[:port][/path]`, without IPv6 brackets.
fn url_host(url: &str) -> Option<&str> {
    let rest = url.split_once("://")?.1;
    let authority = rest.split(['/', '?', '#']).next()?;
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = if let Some(v6) = host_port.strip_prefix('[') {
        v6.split_once(']')?.0
    } else {
        host_port.split(':').next()?
    };
    (!host.is_empty()).then_some(host)
}

/// `localhost` or a loopback address (127.0.0.0/8, ::1): traffic that never leaves the
/// machine.
fn is_loopback(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `NAME=value` entries are the environment the secrets are read from (they are no
    /// flags); the rest is the command line.
    fn parse<S: AsRef<str>>(args: &[S]) -> Result<Config, ConfigError> {
        let is_env = |a: &str| {
            a.split_once('=').is_some_and(|(k, _)| {
                !k.is_empty() && k.bytes().all(|b| b.is_ascii_uppercase() || b == b'_')
            })
        };
        let mut all = vec!["callbridge-relay".to_owned()];
        let mut env = std::collections::HashMap::new();
        for a in args.iter().map(AsRef::as_ref) {
            match a.split_once('=').filter(|_| is_env(a)) {
                Some((k, v)) => {
                    env.insert(k.to_owned(), std::ffi::OsString::from(v));
                }
                None => all.push(a.to_owned()),
            }
        }
        Config::from_args_and_secrets(all, &|name| env.get(name).cloned())
    }

    const BASE: [&str; 4] = [
        "--public-url",
        "https://relay.example.com/",
        "OPENAI_API_KEY=sk-1",
        "TWILIO_AUTH_TOKEN=tok",
    ];

    #[test]
    fn minimal_config_parses_with_defaults() {
        let c = parse(&BASE).unwrap();
        assert_eq!(c.public_url, "https://relay.example.com");
        assert_eq!(c.public_ws_base(), "wss://relay.example.com");
        assert_eq!(c.listen.port(), 8080);
        assert_eq!(c.drain_grace_secs, 30);
        assert!(c.drain_handoff);
        assert_eq!(c.drain_action_wait(), Duration::from_secs(5));
        assert_eq!(c.fallback_dial, None);
        assert_eq!(c.model_reconnect(), Some(Duration::from_secs(10)));
        assert_eq!(c.model_rollover_after(), Some(Duration::from_secs(3300)));
        assert_eq!(c.start_timeout(), Duration::from_millis(5000));
        assert!(!c.has_control());
        assert_eq!(c.openai_realtime_url, DEFAULT_REALTIME_URL);
        assert_eq!(
            c.metrics_listen,
            Some(SocketAddr::from(([0, 0, 0, 0], 9091)))
        );
        assert_eq!(c.header_timeout(), Duration::from_millis(5000));
        assert_eq!(c.max_connections, 4096);
        assert_eq!(
            c.max_calls(),
            crate::capacity::sized_from_memory().min(4096)
        );
        let mut off = BASE.to_vec();
        off.extend(["--metrics-addr", "", "--max-calls", "7"]);
        let c = parse(&off).unwrap();
        assert_eq!(c.metrics_listen, None);
        assert_eq!(c.max_calls(), 7);
    }

    #[test]
    fn resilience_settings_scale_and_switch_off() {
        let mut args = BASE.to_vec();
        args.extend(["--model-session-secs", "3", "--model-reconnect-secs", "0"]);
        args.extend(["--drain-handoff", "false"]);
        let c = parse(&args).unwrap();
        assert_eq!(c.model_rollover_after(), Some(Duration::from_millis(2700)));
        assert_eq!(c.model_reconnect(), None);
        assert!(!c.drain_handoff);
        let mut never = BASE.to_vec();
        never.extend(["--model-session-secs", "0"]);
        assert_eq!(parse(&never).unwrap().model_rollover_after(), None);
    }

    #[test]
    fn model_breaker_settings_are_bounded_and_switch_off() {
        let c = parse(&BASE).unwrap();
        assert_eq!(c.model_breaker_failures, 5);
        assert_eq!(c.model_breaker_probe(), Duration::from_millis(2000));
        let with = |failures: &'static str, probe: &'static str| {
            let mut args = BASE.to_vec();
            args.extend(["--model-breaker-failures", failures]);
            args.extend(["--model-breaker-probe-ms", probe]);
            parse(&args)
        };
        let c = with("0", "50").unwrap();
        assert_eq!(c.model_breaker_failures, 0);
        assert_eq!(c.model_breaker_probe(), Duration::from_millis(50));
        let err = with("1001", "2000").unwrap_err();
        assert!(
            err.to_string().contains("RELAY_MODEL_BREAKER_FAILURES"),
            "{err}"
        );
        for probe in ["0", "49", "60001"] {
            let err = with("5", probe).unwrap_err();
            assert!(
                err.to_string().contains("RELAY_MODEL_BREAKER_PROBE_MS"),
                "{err}"
            );
        }
        assert!(matches!(with("-1", "2000"), Err(ConfigError::Parse(_))));
    }

    #[test]
    fn missing_auth_token_is_refused_unless_insecure() {
        let err = parse(&BASE[..3]).unwrap_err();
        assert!(err.to_string().contains("TWILIO_AUTH_TOKEN"), "{err}");
        let mut args = BASE[..3].to_vec();
        args.extend(["--insecure-skip-signature", "true"]);
        args.extend(["--insecure-allow-public", "true"]);
        assert!(parse(&args).unwrap().insecure_skip_signature);
    }

    const LONG_TOKEN: &str = "relay-token-0123456789abcdef-0123";

    #[test]
    fn control_token_must_be_header_text_and_long_outside_insecure_mode() {
        let with_token = |token: &str, extra: &[&'static str]| {
            let mut args: Vec<String> = BASE.iter().map(|a| (*a).to_owned()).collect();
            args.extend(["--control-url", "http://control:50051"].map(String::from));
            args.push(format!("RELAY_CONTROL_TOKEN={token}"));
            args.extend(extra.iter().map(|a| (*a).to_owned()));
            parse(&args)
        };
        let c = with_token(LONG_TOKEN, &[]).unwrap();
        assert!(bearer_header(c.control_token.as_ref().unwrap()).is_some());
        for bad in [
            "tok\nen-0123456789abcdef-0123456789",
            "t\u{e9}-0123456789abcdef-0123456789ab",
        ] {
            let err = with_token(bad, &["--insecure-skip-signature", "true"]).unwrap_err();
            assert!(err.to_string().contains("RELAY_CONTROL_TOKEN"), "{err}");
            assert!(err.to_string().contains("header"), "{err}");
            assert!(
                !err.to_string().contains(bad),
                "the token is not echoed: {err}"
            );
        }
        let err = with_token("short", &[]).unwrap_err();
        assert!(err.to_string().contains("RELAY_CONTROL_TOKEN"), "{err}");
        // The insecure mode (on loopback) accepts a short token.
        let mut args = vec!["--public-url", "http://127.0.0.1:8080", "OPENAI_API_KEY=sk"];
        args.extend([
            "--insecure-skip-signature",
            "true",
            "RELAY_CONTROL_TOKEN=short",
        ]);
        assert!(parse(&args).is_ok());
        // An empty token is no token.
        assert!(with_token("", &[]).unwrap().control_token.is_none());
    }

    #[test]
    fn a_public_url_twilio_reaches_is_https_on_443() {
        let with_public = |public: &'static str, allow: bool| {
            let mut args = BASE.to_vec();
            args[1] = public;
            if allow {
                args.extend(["--insecure-allow-public", "true"]);
            }
            parse(&args)
        };
        for good in [
            "https://relay.example.com",
            "https://relay.example.com:443/voice",
            "http://127.0.0.1:8080",
            "http://localhost:8080",
        ] {
            assert!(with_public(good, false).is_ok(), "{good}");
        }
        for bad in [
            "http://relay.example.com",
            "https://relay.example.com:8443",
            "http://relay:8080",
            "https://user:pw@relay.example.com",
        ] {
            let err = with_public(bad, false).unwrap_err().to_string();
            assert!(err.contains("RELAY_PUBLIC_URL"), "{bad}: {err}");
        }
        // A private test network (the compose stack) says so explicitly.
        assert!(with_public("http://relay:8080", true).is_ok());
    }

    #[test]
    fn insecure_settings_stay_on_loopback_unless_allowed() {
        let insecure = |public: &'static str, model: &'static str, allow: bool| {
            let mut args = vec!["--public-url", public, "OPENAI_API_KEY=sk-1"];
            args.extend(["--openai-realtime-url", model]);
            args.extend(["--insecure-skip-signature", "true"]);
            if allow {
                args.extend(["--insecure-allow-public", "true"]);
            }
            parse(&args)
        };
        for public in [
            "http://127.0.0.1:8080",
            "http://localhost:8080/",
            "http://[::1]:8080",
            "https://127.0.0.2",
        ] {
            let c = insecure(public, "ws://127.0.0.1:9000/v1/realtime", false).unwrap();
            assert_eq!(c.warnings().len(), 1, "a loud warning: {public}");
        }
        for public in [
            "https://relay.example.com",
            "http://relay:8080",
            "http://127.0.0.1.evil.example",
            "http://localhost@relay.example.com",
        ] {
            let err = insecure(public, "wss://api.openai.com/v1/realtime", false).unwrap_err();
            assert!(
                err.to_string().contains("RELAY_INSECURE_SKIP_SIGNATURE"),
                "{public}: {err}"
            );
            let c = insecure(public, "wss://api.openai.com/v1/realtime", true).unwrap();
            assert_eq!(c.warnings().len(), 2);
        }
        // A ws:// model off loopback is refused even with signatures checked.
        let mut args = BASE.to_vec();
        args.extend([
            "--openai-realtime-url",
            "ws://fake-realtime:9000/v1/realtime",
        ]);
        let err = parse(&args).unwrap_err();
        assert!(err.to_string().contains("OPENAI_REALTIME_URL"), "{err}");
        args.extend(["--insecure-allow-public", "true"]);
        assert!(parse(&args).is_ok());
        assert!(parse(&BASE).unwrap().warnings().is_empty());
    }

    #[test]
    fn url_hosts_are_found_behind_user_and_port() {
        assert_eq!(
            url_host("https://a.example.com:443/x"),
            Some("a.example.com")
        );
        assert_eq!(url_host("ws://u:p@[::1]:9/x"), Some("::1"));
        assert_eq!(url_host("http://127.0.0.1"), Some("127.0.0.1"));
        assert_eq!(url_host("http://"), None);
        assert!(is_loopback("LOCALHOST") && is_loopback("127.9.9.9") && !is_loopback("10.0.0.1"));
    }

    #[test]
    fn the_standalone_agent_takes_the_model_side_settings() {
        let mut args = BASE.to_vec();
        args.extend([
            "--agent-turn-detection",
            "none",
            "--agent-silence-commit-ms",
            "500",
            "--agent-dtmf-to-model",
            "true",
            "--agent-transcription-model",
            "gpt-4o-mini-transcribe",
        ]);
        let agent = crate::agent::AgentView::standalone(&parse(&args).unwrap());
        assert!(agent.turn_detection_off());
        assert_eq!(agent.silence_commit_ms(), Some(500));
        assert!(agent.dtmf_to_model);
        assert!(agent.transcribes());
        let defaults = crate::agent::AgentView::standalone(&parse(&BASE).unwrap());
        assert!(!defaults.turn_detection_off() && !defaults.dtmf_to_model);
        assert_eq!(defaults.transcription_model, "gpt-4o-mini-transcribe");
        let mut off = BASE.to_vec();
        off.extend(["--agent-transcription-model", "none"]);
        assert!(!crate::agent::AgentView::standalone(&parse(&off).unwrap()).transcribes());
        let mut short = BASE.to_vec();
        short.extend([
            "--agent-turn-detection",
            "none",
            "--agent-silence-commit-ms",
            "50",
        ]);
        let err = parse(&short).unwrap_err().to_string();
        assert!(err.contains("AGENT_SILENCE_COMMIT_MS"), "{err}");
    }

    #[test]
    fn bad_values_name_the_variable() {
        for (flag, value, field) in [
            ("--public-url", "ftp://x", "RELAY_PUBLIC_URL"),
            ("--openai-realtime-url", "https://x", "OPENAI_REALTIME_URL"),
            ("--control-url", "grpc://x", "CONTROL_URL"),
            ("--agent-temperature", "0.8", "AGENT_TEMPERATURE"),
            ("--agent-greeting", "Hello\nthere", "AGENT_GREETING"),
            (
                "--agent-transcription-model",
                "gpt 4o",
                "AGENT_TRANSCRIPTION_MODEL",
            ),
            (
                "--agent-silence-commit-ms",
                "500",
                "AGENT_SILENCE_COMMIT_MS",
            ),
            ("--start-timeout-ms", "0", "RELAY_START_TIMEOUT_MS"),
            ("--metrics-addr", "nowhere", "RELAY_METRICS_ADDR"),
            ("--metrics-addr", "127.0.0.1:8080", "RELAY_METRICS_ADDR"),
            ("--header-timeout-ms", "0", "RELAY_HEADER_TIMEOUT_MS"),
            ("--max-connections", "0", "RELAY_MAX_CONNECTIONS"),
            ("--max-calls", "0", "RELAY_MAX_CALLS"),
            ("--max-calls", "5000", "RELAY_MAX_CALLS"),
            (
                "--metrics-tls-cert-file",
                "/nonexistent.pem",
                "RELAY_METRICS_TLS_KEY_FILE",
            ),
            (
                "--metrics-tls-key-file",
                "/nonexistent.pem",
                "RELAY_METRICS_TLS_CERT_FILE",
            ),
            (
                "--stream-credential-ttl-secs",
                "0",
                "RELAY_STREAM_CREDENTIAL_TTL_SECS",
            ),
            (
                "--stream-credential-ttl-secs",
                "601",
                "RELAY_STREAM_CREDENTIAL_TTL_SECS",
            ),
            (
                "--drain-action-wait-secs",
                "61",
                "RELAY_DRAIN_ACTION_WAIT_SECS",
            ),
            ("--fallback-dial", "0800 123", "RELAY_FALLBACK_DIAL"),
            ("--fallback-dial", "+0123456", "RELAY_FALLBACK_DIAL"),
        ] {
            let mut args: Vec<&str> = BASE.to_vec();
            match args.iter().position(|a| *a == flag) {
                Some(i) => args[i + 1] = value,
                None => args.extend([flag, value]),
            }
            let err = parse(&args).unwrap_err();
            assert!(err.to_string().contains(field), "{flag}: {err}");
        }
        let mut args = BASE.to_vec();
        args.extend(["--listen", "not-an-addr"]);
        assert!(matches!(parse(&args), Err(ConfigError::Parse(_))));
    }

    #[test]
    fn the_fallback_dial_is_an_e164_number_or_nothing() {
        let mut args = BASE.to_vec();
        args.extend(["--fallback-dial", " +14155550111 "]);
        let c = parse(&args).unwrap();
        assert_eq!(c.fallback_dial.as_deref(), Some("+14155550111"));
        let mut args = BASE.to_vec();
        args.extend(["--fallback-dial", ""]);
        assert_eq!(parse(&args).unwrap().fallback_dial, None);
    }

    #[test]
    fn secrets_are_no_flags_and_come_from_files_too() {
        for flag in [
            "--openai-api-key",
            "--twilio-auth-token",
            "--control-token",
            "--stream-secret",
        ] {
            let mut args = BASE.to_vec();
            args.extend([flag, "a-secret-on-the-command-line-0123456789"]);
            assert!(
                matches!(parse(&args), Err(ConfigError::Parse(_))),
                "{flag} is refused"
            );
        }
        let dir = std::env::temp_dir().join(format!("relay-secrets-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = dir.join("key");
        std::fs::write(&key, "sk-from-a-file\n").unwrap();
        let stream = dir.join("stream");
        std::fs::write(&stream, "stream-secret-of-at-least-32-bytes!\n").unwrap();
        let args = [
            "--public-url".to_owned(),
            "https://relay.example.com".to_owned(),
            format!("OPENAI_API_KEY_FILE={}", key.display()),
            format!("RELAY_STREAM_SECRET_FILE={}", stream.display()),
            "TWILIO_AUTH_TOKEN=tok".to_owned(),
        ];
        let c = parse(&args).unwrap();
        assert_eq!(c.openai_api_key.expose(), "sk-from-a-file");
        assert_eq!(
            c.stream_secret.as_ref().unwrap().expose(),
            "stream-secret-of-at-least-32-bytes!"
        );
        // Both forms at once, a file that is not there, no key at all: named, not echoed.
        let mut both = args.to_vec();
        both.push("OPENAI_API_KEY=sk-inline".to_owned());
        let err = parse(&both).unwrap_err().to_string();
        assert!(
            err.contains("OPENAI_API_KEY_FILE") && !err.contains("sk-"),
            "{err}"
        );
        let missing = [
            "--public-url",
            "https://relay.example.com",
            "OPENAI_API_KEY=sk-1",
            "TWILIO_AUTH_TOKEN_FILE=/nonexistent/twilio",
        ];
        let err = parse(&missing).unwrap_err().to_string();
        assert!(err.contains("TWILIO_AUTH_TOKEN_FILE"), "{err}");
        let err = parse(&missing[..2]).unwrap_err().to_string();
        assert!(err.contains("OPENAI_API_KEY"), "{err}");
        let mut short = BASE.to_vec();
        short.push("RELAY_STREAM_SECRET=too-short");
        let err = parse(&short).unwrap_err().to_string();
        assert!(
            err.contains("RELAY_STREAM_SECRET") && !err.contains("too-short"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn secrets_are_redacted_in_debug() {
        let mut args = BASE.to_vec();
        args.push("RELAY_STREAM_SECRET=stream-secret-of-at-least-32-bytes!");
        let c = parse(&args).unwrap();
        let dbg = format!("{c:?}");
        assert!(!dbg.contains("stream-secret-of"), "{dbg}");
        assert!(!dbg.contains("sk-1"), "{dbg}");
        assert!(!dbg.contains("\"tok\""), "{dbg}");
        assert!(dbg.contains("redacted"));
    }

    #[test]
    fn relay_id_defaults_to_host_and_suffix() {
        let c = parse(&BASE).unwrap();
        let a = c.relay_id();
        let b = c.relay_id();
        assert_ne!(a, b, "random suffix differs");
        assert!(a.len() > 9);
    }
}

//! Limits of control's listeners (flattened into its command line / environment): the
//! metrics listener's header timeout, connection cap and optional certificate, and the gRPC
//! server's stream, header, unary-deadline and watch-stream limits and its reflection.

use std::path::PathBuf;
use std::time::Duration;

use callbridge_telemetry::listener;

use crate::config::ConfigError;
use crate::tls::KeyPairFiles;

/// Raw settings, as clap sees them.
#[derive(Debug, clap::Args)]
pub(crate) struct LimitsArgs {
    /// Milliseconds a metrics client has to send a request head (after connecting or after
    /// its previous answer; also its TLS handshake).
    #[arg(
        long,
        env = "CONTROL_METRICS_HEADER_TIMEOUT_MS",
        default_value = "5000"
    )]
    metrics_header_timeout_ms: u64,
    /// Connections open at once on the metrics listener; above it accepting pauses.
    #[arg(long, env = "CONTROL_METRICS_MAX_CONNECTIONS", default_value = "64")]
    metrics_max_connections: usize,
    /// PEM certificate chain of the metrics listener; with CONTROL_METRICS_TLS_KEY_FILE,
    /// /metrics is served over TLS only (the files are re-read when they change).
    #[arg(long, env = "CONTROL_METRICS_TLS_CERT_FILE")]
    metrics_tls_cert_file: Option<PathBuf>,
    /// PEM private key of CONTROL_METRICS_TLS_CERT_FILE.
    #[arg(long, env = "CONTROL_METRICS_TLS_KEY_FILE")]
    metrics_tls_key_file: Option<PathBuf>,
    /// Concurrent gRPC streams per HTTP/2 connection. A relay carries all its calls' attach
    /// streams over one connection: keep this above the most calls one relay carries.
    #[arg(
        long,
        env = "CONTROL_GRPC_MAX_CONCURRENT_STREAMS",
        default_value = "8192"
    )]
    grpc_max_concurrent_streams: u32,
    /// Milliseconds a unary gRPC call may take before it answers DEADLINE_EXCEEDED
    /// (streaming calls — Attach, WatchCall, WatchCalls, WatchCampaign, health Watch — are
    /// never timed).
    #[arg(long, env = "CONTROL_GRPC_UNARY_TIMEOUT_MS", default_value = "30000")]
    grpc_unary_timeout_ms: u64,
    /// Largest HTTP/2 header list (metadata) a gRPC client may send, in bytes.
    #[arg(
        long,
        env = "CONTROL_GRPC_MAX_HEADER_LIST_BYTES",
        default_value = "16384"
    )]
    grpc_max_header_list_bytes: u32,
    /// WatchCall + WatchCalls + WatchCampaign streams one application token may hold open
    /// at once on a replica; above it RESOURCE_EXHAUSTED.
    #[arg(long, env = "CONTROL_WATCH_STREAMS_PER_TOKEN", default_value = "100")]
    watch_streams_per_token: usize,
    /// Serve gRPC reflection (true/false). Unset: on only with CONTROL_INSECURE_NO_AUTH=true.
    #[arg(long, env = "CONTROL_GRPC_REFLECTION")]
    grpc_reflection: Option<String>,
}

/// Validated limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// The metrics listener's header timeout and connection cap.
    pub metrics: listener::Limits,
    /// The metrics listener's certificate; `None`: plaintext.
    pub metrics_tls: Option<KeyPairFiles>,
    /// Concurrent streams per HTTP/2 connection.
    pub grpc_max_concurrent_streams: u32,
    /// Deadline of a unary call.
    pub grpc_unary_timeout: Duration,
    /// Largest header list a client may send.
    pub grpc_max_header_list_bytes: u32,
    /// Open watch streams per application token.
    pub watch_streams_per_token: usize,
    /// Whether gRPC reflection is served.
    pub grpc_reflection: bool,
}

fn bad(var: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError {
        var,
        message: message.into(),
    }
}

impl LimitsArgs {
    /// Checks every value; `metrics_enabled` says whether `CONTROL_METRICS_LISTEN` is set,
    /// `insecure` whether `CONTROL_INSECURE_NO_AUTH` is (reflection's default).
    pub(crate) fn into_limits(
        self,
        metrics_enabled: bool,
        insecure: bool,
    ) -> Result<Limits, ConfigError> {
        if !(1..=600_000).contains(&self.metrics_header_timeout_ms) {
            return Err(bad(
                "CONTROL_METRICS_HEADER_TIMEOUT_MS",
                "must be within 1..=600000",
            ));
        }
        if self.metrics_max_connections == 0 {
            return Err(bad("CONTROL_METRICS_MAX_CONNECTIONS", "must be > 0"));
        }
        let metrics_tls = crate::config::key_pair(
            self.metrics_tls_cert_file,
            "CONTROL_METRICS_TLS_CERT_FILE",
            self.metrics_tls_key_file,
            "CONTROL_METRICS_TLS_KEY_FILE",
        )?;
        if metrics_tls.is_some() && !metrics_enabled {
            return Err(bad(
                "CONTROL_METRICS_TLS_CERT_FILE",
                "set, but CONTROL_METRICS_LISTEN is empty (no metrics listener)",
            ));
        }
        if self.grpc_max_concurrent_streams == 0 {
            return Err(bad("CONTROL_GRPC_MAX_CONCURRENT_STREAMS", "must be > 0"));
        }
        if !(1..=3_600_000).contains(&self.grpc_unary_timeout_ms) {
            return Err(bad(
                "CONTROL_GRPC_UNARY_TIMEOUT_MS",
                "must be within 1..=3600000",
            ));
        }
        // Below a few KiB legitimate metadata (authorization, grpc-timeout, traceparent)
        // would not fit.
        if !(4096..=1_048_576).contains(&self.grpc_max_header_list_bytes) {
            return Err(bad(
                "CONTROL_GRPC_MAX_HEADER_LIST_BYTES",
                "must be within 4096..=1048576",
            ));
        }
        if self.watch_streams_per_token == 0 {
            return Err(bad("CONTROL_WATCH_STREAMS_PER_TOKEN", "must be > 0"));
        }
        let grpc_reflection = match self
            .grpc_reflection
            .as_deref()
            .map(|v| v.trim().to_ascii_lowercase())
            .as_deref()
        {
            None | Some("") => insecure,
            Some("true" | "1" | "yes") => true,
            Some("false" | "0" | "no") => false,
            Some(other) => {
                return Err(bad(
                    "CONTROL_GRPC_REFLECTION",
                    format!("expected true or false, got '{other}'"),
                ));
            }
        };
        Ok(Limits {
            grpc_max_concurrent_streams: self.grpc_max_concurrent_streams,
            grpc_unary_timeout: Duration::from_millis(self.grpc_unary_timeout_ms),
            grpc_max_header_list_bytes: self.grpc_max_header_list_bytes,
            watch_streams_per_token: self.watch_streams_per_token,
            grpc_reflection,
            metrics: listener::Limits {
                header_timeout: Duration::from_millis(self.metrics_header_timeout_ms),
                max_connections: self.metrics_max_connections,
            },
            metrics_tls,
        })
    }
}

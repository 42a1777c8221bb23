//! Limits of control's listeners (flattened into its command line / environment): the
//! metrics listener's header timeout, connection cap and optional certificate.

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
}

/// Validated limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// The metrics listener's header timeout and connection cap.
    pub metrics: listener::Limits,
    /// The metrics listener's certificate; `None`: plaintext.
    pub metrics_tls: Option<KeyPairFiles>,
}

fn bad(var: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError {
        var,
        message: message.into(),
    }
}

impl LimitsArgs {
    /// Checks every value; `metrics_enabled` says whether `CONTROL_METRICS_LISTEN` is set.
    pub(crate) fn into_limits(self, metrics_enabled: bool) -> Result<Limits, ConfigError> {
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
        Ok(Limits {
            metrics: listener::Limits {
                header_timeout: Duration::from_millis(self.metrics_header_timeout_ms),
                max_connections: self.metrics_max_connections,
            },
            metrics_tls,
        })
    }
}

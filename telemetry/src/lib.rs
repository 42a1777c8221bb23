//! Logging shared by `callbridge-relay` and `callbridge-control`: `tracing-subscriber` with
//! the service's filter variable and text or JSON lines, plus optional OpenTelemetry trace
//! export (OTLP/gRPC) when the standard `OTEL_EXPORTER_OTLP_ENDPOINT` is set. With it unset
//! no exporter is built and nothing changes.
//!
//! It also holds [`Secret`], the one redacting string type both binaries' configs use,
//! [`read_secret`], which reads each secret from `NAME` or the file `NAME_FILE` names, and
//! [`listener`], the HTTP/1.1 accept loop (timeouts, connection cap, optional TLS) both
//! binaries serve their warp routes with, and [`tls`], server certificates reloaded on
//! change.

pub mod listener;
mod secret;
mod secret_env;
pub mod tls;

use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer as _};

pub use crate::secret::{MIN_SECRET_BYTES, Secret, is_header_token};
pub use crate::secret_env::{SecretError, SecretVar, process_env, read_secret, secrets_help};

/// The OpenTelemetry variables both binaries read straight from the environment (not
/// through clap), for the end of their `--help`.
pub const ENV_HELP: &str = "\
Trace export (OpenTelemetry, read from the environment):
  OTEL_EXPORTER_OTLP_ENDPOINT  OTLP/gRPC collector: https://collector:4317 (TLS) or
                               http://collector:4317 (plaintext); when set, tracing spans are
                               exported; any other scheme exits 64 [default: unset, no export]
  OTEL_EXPORTER_OTLP_CERTIFICATE
                               PEM CA bundle the collector's certificate must chain to
                               (https:// only) [default: the webpki roots]
  OTEL_SERVICE_NAME            service.name of the exported spans [default: the binary's name]
  OTEL_TRACES_SAMPLER, OTEL_BSP_*, OTEL_RESOURCE_ATTRIBUTES
                               the standard OpenTelemetry sampler, batch and resource settings";

/// What a binary asks of its logging.
#[derive(Debug, Clone, Copy)]
pub struct Options<'a> {
    /// `service.name` of exported spans unless `OTEL_SERVICE_NAME` overrides it; also the
    /// prefix of the few messages printed when logging itself fails.
    pub service_name: &'static str,
    /// The `tracing` filter (e.g. `info,callbridge_relay=debug`).
    pub filter: &'a str,
    /// The variable the filter came from, named in the warning when it is invalid.
    pub filter_var: &'static str,
    /// One JSON object per line instead of human-readable text.
    pub json: bool,
    /// Where log lines go.
    pub output: Output,
}

/// Where log lines go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    Stdout,
    Stderr,
}

/// How long shutdown waits for the last batch of spans to reach the collector.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// Keeps the trace pipeline alive; [`Telemetry::shutdown`] flushes it. Without an OTLP
/// endpoint it holds nothing and shutdown is free.
#[must_use = "dropping the handle skips the final span flush"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
    service_name: &'static str,
}

impl Telemetry {
    /// Exports the spans still queued, bounded by a timeout so a dead collector cannot
    /// hold up process exit.
    pub async fn shutdown(self) {
        let Some(provider) = self.provider else {
            return;
        };
        // The SDK's shutdown blocks on the batch thread, which needs this runtime to run
        // the gRPC export; keep it off the async workers.
        let result =
            tokio::task::spawn_blocking(move || provider.shutdown_with_timeout(FLUSH_TIMEOUT))
                .await;
        match result {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("{}: trace flush failed: {e}", self.service_name),
            Err(e) => eprintln!("{}: trace flush task failed: {e}", self.service_name),
        }
    }
}

/// Installs the global subscriber. An invalid filter falls back to `info` with a warning.
/// Must run inside a tokio runtime: the OTLP exporter spawns its connection tasks on it.
pub fn init(options: Options<'_>) -> Telemetry {
    let (filter, bad) = match EnvFilter::try_new(options.filter) {
        Ok(f) => (f, None),
        Err(e) => (EnvFilter::new("info"), Some(e.to_string())),
    };
    let fmt = match (options.output, options.json) {
        (Output::Stdout, true) => tracing_subscriber::fmt::layer().json().boxed(),
        (Output::Stdout, false) => tracing_subscriber::fmt::layer().boxed(),
        (Output::Stderr, true) => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .json()
            .boxed(),
        (Output::Stderr, false) => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .boxed(),
    };
    let service_name = service_name(options.service_name);
    let (provider, otel_error) = match otlp_endpoint() {
        None => (None, None),
        Some(endpoint) => match build_provider(&endpoint, &service_name) {
            Ok(p) => (Some(p), None),
            Err(e) => (None, Some((endpoint, e))),
        },
    };
    let otel = provider
        .as_ref()
        .map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer(options.service_name)));
    let installed = tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(otel)
        .try_init()
        .is_ok();
    if let Some(e) = bad {
        tracing::warn!(error = %e, variable = options.filter_var, "Invalid log filter; using info.");
    }
    if let Some((endpoint, e)) = otel_error {
        tracing::error!(endpoint = %endpoint, error = %e, "Cannot set up OTLP trace export; traces are off.");
    } else if let Some(endpoint) = provider.as_ref().and(otlp_endpoint()) {
        tracing::info!(endpoint = %endpoint, service_name = %service_name, "Exporting traces over OTLP/gRPC.");
    }
    Telemetry {
        // A second init in the same process keeps the first pipeline; this one has no
        // layer to feed, so there is nothing to flush.
        provider: provider.filter(|_| installed),
        service_name: options.service_name,
    }
}

/// The standard OTLP endpoint variable; empty counts as unset.
fn otlp_endpoint() -> Option<String> {
    std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
}

fn service_name(default: &str) -> String {
    std::env::var("OTEL_SERVICE_NAME")
        .ok()
        .filter(|s| !s.trim().is_empty())
        .unwrap_or_else(|| default.to_owned())
}

/// An OTLP setting the binary cannot honour; names the variable (the binaries exit 64).
#[derive(Debug, thiserror::Error)]
#[error("{var}: {reason}")]
pub struct OtlpConfigError {
    /// The environment variable.
    pub var: &'static str,
    /// What is wrong with it.
    pub reason: String,
}

/// The CA bundle for an `https://` collector, from the standard variable; empty counts as unset.
fn otlp_ca_file() -> Option<String> {
    std::env::var("OTEL_EXPORTER_OTLP_CERTIFICATE")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
}

/// Checks the OTLP variables before anything starts: an endpoint is `https://` (TLS) or
/// `http://` (plaintext), and a CA file goes with `https://` and can be read. A scheme
/// the exporter cannot honour would otherwise fail every export with only a log line.
pub fn check_env() -> Result<(), OtlpConfigError> {
    check(otlp_endpoint().as_deref(), otlp_ca_file().as_deref()).map(|_| ())
}

/// The TLS settings for `endpoint` (`None`: plaintext).
fn check(
    endpoint: Option<&str>,
    ca_file: Option<&str>,
) -> Result<Option<opentelemetry_otlp::tonic_types::transport::ClientTlsConfig>, OtlpConfigError> {
    use opentelemetry_otlp::tonic_types::transport::{Certificate, ClientTlsConfig};
    let bad = |var, reason: String| OtlpConfigError { var, reason };
    let https = match endpoint {
        None => false,
        Some(e) if e.starts_with("https://") => true,
        Some(e) if e.starts_with("http://") => false,
        Some(_) => {
            return Err(bad(
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                "must start with https:// (TLS) or http:// (plaintext)".to_owned(),
            ));
        }
    };
    match (https, ca_file) {
        (false, None) => Ok(None),
        (false, Some(_)) => Err(bad(
            "OTEL_EXPORTER_OTLP_CERTIFICATE",
            "only used with an https:// OTEL_EXPORTER_OTLP_ENDPOINT".to_owned(),
        )),
        (true, None) => Ok(Some(ClientTlsConfig::new().with_webpki_roots())),
        (true, Some(path)) => {
            let pem = std::fs::read(path).map_err(|e| {
                bad(
                    "OTEL_EXPORTER_OTLP_CERTIFICATE",
                    format!("cannot read {path}: {e}"),
                )
            })?;
            if !String::from_utf8_lossy(&pem).contains("-----BEGIN CERTIFICATE-----") {
                return Err(bad(
                    "OTEL_EXPORTER_OTLP_CERTIFICATE",
                    format!("{path} holds no PEM certificate"),
                ));
            }
            Ok(Some(
                ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem)),
            ))
        }
    }
}

fn build_provider(endpoint: &str, service_name: &str) -> Result<SdkTracerProvider, String> {
    use opentelemetry_otlp::WithTonicConfig as _;
    let tls = check(Some(endpoint), otlp_ca_file().as_deref()).map_err(|e| e.to_string())?;
    let mut builder = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint);
    if let Some(tls) = tls {
        builder = builder.with_tls_config(tls);
    }
    let exporter = builder.build().map_err(|e| e.to_string())?;
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(service_name.to_owned())
        .build();
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_schemes_are_https_or_http_and_anything_else_names_the_variable() {
        assert!(check(None, None).expect("unset").is_none());
        assert!(check(Some("http://c:4317"), None).expect("plain").is_none());
        assert!(check(Some("https://c:4317"), None).expect("tls").is_some());
        let err = check(Some("grpc://c:4317"), None).expect_err("scheme");
        assert_eq!(err.var, "OTEL_EXPORTER_OTLP_ENDPOINT");
        let err = check(Some("http://c:4317"), Some("/ca.pem")).expect_err("CA with http");
        assert_eq!(err.var, "OTEL_EXPORTER_OTLP_CERTIFICATE");
        let err = check(Some("https://c:4317"), Some("/nonexistent/ca.pem")).expect_err("no file");
        assert_eq!(err.var, "OTEL_EXPORTER_OTLP_CERTIFICATE");
    }
}

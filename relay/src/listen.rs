//! The relay's two listeners, both on the shared accept loop
//! ([`callbridge_telemetry::listener`]: header-read timeout, connection cap, graceful stop):
//!
//! - the public one (`RELAY_LISTEN`): Twilio's webhooks and media streams, `/healthz`,
//!   `/readyz` — limited by `RELAY_HEADER_TIMEOUT_MS` and `RELAY_MAX_CONNECTIONS`;
//! - the metrics one (`RELAY_METRICS_ADDR`): `GET /metrics` only, so the public port never
//!   shows the relay's internals; same header timeout, at most
//!   [`METRICS_MAX_CONNECTIONS`] scrapers at once, over TLS when a certificate is set.

use std::convert::Infallible;
use std::sync::Arc;

use callbridge_telemetry::listener::{self, Limits, Observer};
use callbridge_telemetry::tls::{KeyPairFiles, ServerTls, TlsFileError};
use hyper_util::service::TowerToHyperService;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use warp::Filter;

use crate::capacity::Refused;
use crate::config::{Config, ConfigError};
use crate::http::{self, Deps};
use crate::metrics::Metrics;

/// Scrapers served at once on the metrics listener.
pub const METRICS_MAX_CONNECTIONS: usize = 64;

/// The limits of the public listener.
pub fn public_limits(config: &Config) -> Limits {
    Limits {
        header_timeout: config.header_timeout(),
        max_connections: config.max_connections,
    }
}

/// The limits of the metrics listener.
pub fn metrics_limits(config: &Config) -> Limits {
    Limits {
        header_timeout: config.header_timeout(),
        max_connections: METRICS_MAX_CONNECTIONS,
    }
}

/// The metrics listener's certificate files, when both are set.
pub fn metrics_tls_files(config: &Config) -> Option<KeyPairFiles> {
    let cert = config.metrics_tls_cert_file.clone()?;
    let key = config.metrics_tls_key_file.clone()?;
    Some(KeyPairFiles { cert, key })
}

/// Both certificate files or neither, readable and matching, and a listener to use them.
pub(crate) fn check_metrics_tls(config: &mut Config) -> Result<(), ConfigError> {
    const CERT: &str = "RELAY_METRICS_TLS_CERT_FILE";
    const KEY: &str = "RELAY_METRICS_TLS_KEY_FILE";
    let set =
        |p: &Option<std::path::PathBuf>| p.as_ref().filter(|p| !p.as_os_str().is_empty()).cloned();
    config.metrics_tls_cert_file = set(&config.metrics_tls_cert_file);
    config.metrics_tls_key_file = set(&config.metrics_tls_key_file);
    let bad = |field, reason: String| ConfigError::Invalid { field, reason };
    match (&config.metrics_tls_cert_file, &config.metrics_tls_key_file) {
        (None, None) => return Ok(()),
        (Some(_), None) => return Err(bad(KEY, format!("required when {CERT} is set"))),
        (None, Some(_)) => return Err(bad(CERT, format!("required when {KEY} is set"))),
        (Some(_), Some(_)) => {}
    }
    if config.metrics_listen.is_none() {
        return Err(bad(
            CERT,
            "set, but RELAY_METRICS_ADDR is empty (no metrics listener)".to_owned(),
        ));
    }
    if let Some(files) = metrics_tls_files(config) {
        files.load().map_err(|e| bad(CERT, e.to_string()))?;
    }
    Ok(())
}

/// The metrics listener's TLS acceptor, and the resolver [`callbridge_telemetry::tls::watch`]
/// keeps current when the files rotate.
pub fn metrics_tls(
    files: &KeyPairFiles,
) -> Result<
    (
        listener::TlsAcceptor,
        Arc<callbridge_telemetry::tls::ReloadingCert>,
    ),
    TlsFileError,
> {
    let settings = ServerTls {
        pair: files.clone(),
        client_ca: None,
    };
    let (config, resolver) = callbridge_telemetry::tls::server_config(&settings, &[b"http/1.1"])?;
    Ok((listener::TlsAcceptor::from(config), resolver))
}

/// Serves the public routes on `listener` until `stop`, then finishes what is in flight.
pub async fn serve_public(listener: TcpListener, deps: Deps, stop: CancellationToken) {
    let limits = public_limits(&deps.call.config);
    let observer: Arc<dyn Observer> = Arc::new(deps.call.metrics.listeners().clone());
    let service = TowerToHyperService::new(warp::service(http::routes(deps)));
    listener::serve(listener, None, service, limits, observer, stop).await;
}

/// Serves `GET /metrics` on `listener` until `stop`.
pub async fn serve_metrics(
    listener: TcpListener,
    tls: Option<listener::TlsAcceptor>,
    metrics: Metrics,
    limits: Limits,
    stop: CancellationToken,
) {
    let route = warp::path!("metrics")
        .and(warp::get())
        .map(move || {
            warp::http::Response::builder()
                .header(
                    "content-type",
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                )
                .body(metrics.encode())
                .unwrap_or_default()
        })
        .recover(|_| async {
            Ok::<_, Infallible>(http::text(::http::StatusCode::NOT_FOUND, "not found\n"))
        });
    let service = TowerToHyperService::new(warp::service(route));
    listener::serve(
        listener,
        tls,
        service,
        limits,
        Arc::new(listener::NoObserver),
        stop,
    )
    .await;
}

/// Metrics of the public listener and of `RELAY_MAX_CALLS`; cheap to clone.
#[derive(Clone, Debug)]
pub struct ListenerMetrics {
    connections: Gauge,
    header_timeouts: Counter,
    accept_paused: Counter,
    over_capacity_webhook: Counter,
    over_capacity_stream: Counter,
    max_calls: Gauge,
}

impl ListenerMetrics {
    /// Registers this block's metrics (under the registry's `callbridge_relay` prefix).
    pub(crate) fn register(registry: &mut Registry) -> Self {
        let connections = Gauge::default();
        registry.register(
            "http_connections",
            "Connections open on the public listener, upgraded WebSockets included",
            connections.clone(),
        );
        let header_timeouts = Counter::default();
        registry.register(
            "http_header_timeouts",
            "Connections closed because the request head did not arrive within RELAY_HEADER_TIMEOUT_MS",
            header_timeouts.clone(),
        );
        let accept_paused = Counter::default();
        registry.register(
            "http_accept_paused",
            "Times the public listener stopped accepting because RELAY_MAX_CONNECTIONS were open",
            accept_paused.clone(),
        );
        let over_capacity = Family::<[(&'static str, &'static str); 1], Counter>::default();
        registry.register(
            "over_capacity",
            "Webhooks and stream upgrades answered 503 because RELAY_MAX_CALLS calls were carried, by kind",
            over_capacity.clone(),
        );
        let max_calls = Gauge::default();
        registry.register("max_calls", "RELAY_MAX_CALLS in force", max_calls.clone());
        // One statement each: the family's guard must be gone before the next lookup.
        let over_capacity_webhook = over_capacity.get_or_create(&[("kind", "webhook")]).clone();
        let over_capacity_stream = over_capacity.get_or_create(&[("kind", "stream")]).clone();
        Self {
            connections,
            header_timeouts,
            accept_paused,
            over_capacity_webhook,
            over_capacity_stream,
            max_calls,
        }
    }

    /// Counts a refusal above `RELAY_MAX_CALLS`.
    pub(crate) fn over_capacity(&self, what: Refused) {
        match what {
            Refused::Webhook => self.over_capacity_webhook.inc(),
            Refused::Stream => self.over_capacity_stream.inc(),
        };
    }

    /// Publishes the limit in force.
    pub fn set_max_calls(&self, max_calls: usize) {
        self.max_calls
            .set(i64::try_from(max_calls).unwrap_or(i64::MAX));
    }
}

impl Observer for ListenerMetrics {
    fn opened(&self) {
        self.connections.inc();
    }
    fn closed(&self) {
        self.connections.dec();
    }
    fn header_timeout(&self) {
        self.header_timeouts.inc();
    }
    fn at_capacity(&self) {
        self.accept_paused.inc();
    }
}

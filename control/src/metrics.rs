//! Prometheus metrics (prometheus-client) and the plain-HTTP listener beside gRPC:
//! `/metrics`, and the `/healthz` and `/readyz` probes.

use std::net::SocketAddr;
use std::sync::Arc;

use callbridge_telemetry::listener;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::convert::Infallible;

use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_server::Health;
use tonic_health::server::{HealthReporter, HealthService};
use warp::{Filter, Reply};

use crate::LIVENESS_SERVICE;

/// Labels of `callbridge_control_rpc_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RpcLabels {
    /// gRPC service (`Agents`, `Calls`, `Relay`).
    pub service: &'static str,
    /// Method name.
    pub method: &'static str,
    /// gRPC status code name (`Ok`, `InvalidArgument`, …).
    pub code: String,
}

/// Labels of `callbridge_control_auth_refused_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuthLabels {
    /// `public` or `relay`.
    pub api: &'static str,
}

/// Labels of `callbridge_control_redis_latency_seconds`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RedisLabels {
    /// The Redis command, lowercase (`ping` is the health probe, `evalsha` the atomic
    /// scripts, `pipeline` a pipeline; `other` a command not in the list the store uses).
    pub command: &'static str,
}

/// Round trips of Redis commands, by command.
pub type RedisLatency = Family<RedisLabels, Histogram, fn() -> Histogram>;

fn redis_histogram() -> Histogram {
    Histogram::new([
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    ])
}

/// Every metric of the control plane.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// RPCs by service, method and status code.
    pub rpc_total: Family<RpcLabels, Counter>,
    /// Events stored (first time).
    pub events_stored: Counter,
    /// Events received again and acknowledged without storing.
    pub events_duplicate: Counter,
    /// Attach streams open on this replica.
    pub attached_calls: Gauge,
    /// Commands handed to an attach stream on this replica.
    pub commands_routed: Counter,
    /// 1 while Redis answers the health probe.
    pub redis_up: Gauge,
    /// Round trips of every Redis command the store sends (the health probe's `ping`
    /// included), by command.
    pub redis_latency: RedisLatency,
    /// Calls ended with `RELAY_LOST` by this replica's sweeper.
    pub relay_lost: Counter,
    /// Orphaned calls (relay gone, no action request) this replica redirected by REST.
    pub orphans_redirected: Counter,
    /// Calls a credential-proven attach took over from a stream still holding the lease.
    pub lease_takeovers: Counter,
    /// Attach streams whose relay was silent for the heartbeat timeout (lease released).
    pub heartbeat_timeouts: Counter,
    /// Presence reports of draining relays answered "no other ready relay".
    pub no_ready_relay: Counter,
    /// Requests refused by the bearer-token check, by API.
    pub auth_refused: Family<AuthLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh registry with every metric registered.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let rpc_total = Family::<RpcLabels, Counter>::default();
        let events_stored = Counter::default();
        let events_duplicate = Counter::default();
        let attached_calls = Gauge::default();
        let commands_routed = Counter::default();
        let redis_up = Gauge::default();
        let redis_latency = RedisLatency::new_with_constructor(redis_histogram);
        let relay_lost = Counter::default();
        let orphans_redirected = Counter::default();
        let lease_takeovers = Counter::default();
        let heartbeat_timeouts = Counter::default();
        let no_ready_relay = Counter::default();
        let auth_refused = Family::<AuthLabels, Counter>::default();
        registry.register(
            "callbridge_control_rpc",
            "gRPC calls by service, method and status code",
            rpc_total.clone(),
        );
        registry.register(
            "callbridge_control_events_stored",
            "Call events stored",
            events_stored.clone(),
        );
        registry.register(
            "callbridge_control_events_duplicate",
            "Call events received again (acknowledged, not stored twice)",
            events_duplicate.clone(),
        );
        registry.register(
            "callbridge_control_attached_calls",
            "Attach streams open on this replica",
            attached_calls.clone(),
        );
        registry.register(
            "callbridge_control_commands_routed",
            "Commands handed to the attach stream holding the call",
            commands_routed.clone(),
        );
        registry.register(
            "callbridge_control_redis_up",
            "1 while Redis answers the health probe",
            redis_up.clone(),
        );
        registry.register(
            "callbridge_control_redis_latency_seconds",
            "Round trip of each Redis command control sends, by command",
            redis_latency.clone(),
        );
        registry.register(
            "callbridge_control_relay_lost",
            "Calls ended with RELAY_LOST after their lease ran out",
            relay_lost.clone(),
        );
        registry.register(
            "callbridge_control_orphans_redirected",
            "Calls whose relay vanished without an action request, redirected by Twilio REST to their action URL",
            orphans_redirected.clone(),
        );
        registry.register(
            "callbridge_control_lease_takeovers",
            "Calls taken over by a new stream (fresh stream credential) from a stream that still held the lease",
            lease_takeovers.clone(),
        );
        registry.register(
            "callbridge_control_heartbeat_timeouts",
            "Attach streams silent (no heartbeat, no event) for CONTROL_HEARTBEAT_TIMEOUT_SECS: the call's lease was released as if the stream had broken",
            heartbeat_timeouts.clone(),
        );
        registry.register(
            "callbridge_control_no_ready_relay",
            "Presence reports of a draining relay answered with no other ready relay (it keeps its calls)",
            no_ready_relay.clone(),
        );
        registry.register(
            "callbridge_control_auth_refused",
            "Requests refused by the bearer-token check (UNAUTHENTICATED), by API",
            auth_refused.clone(),
        );
        Metrics {
            registry,
            rpc_total,
            events_stored,
            events_duplicate,
            attached_calls,
            commands_routed,
            redis_up,
            redis_latency,
            relay_lost,
            orphans_redirected,
            lease_takeovers,
            heartbeat_timeouts,
            no_ready_relay,
            auth_refused,
        }
    }

    /// Counts one finished RPC.
    pub fn rpc(&self, service: &'static str, method: &'static str, code: tonic::Code) {
        self.rpc_total
            .get_or_create(&RpcLabels {
                service,
                method,
                code: format!("{code:?}"),
            })
            .inc();
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// What the kubelet can probe over HTTP: with `CONTROL_TLS_*` set, control's gRPC
/// port speaks only TLS, which the kubelet's `grpc` probe cannot, and the distroless image
/// has no probe binary. Both routes read the same statuses as `grpc.health.v1`.
#[derive(Clone)]
pub struct Probes(Arc<HealthService>);

impl Probes {
    /// Probes answering from `reporter`'s statuses.
    pub fn new(reporter: HealthReporter) -> Self {
        Self(Arc::new(HealthService::from_health_reporter(reporter)))
    }

    /// 200 `SERVING` when `service`'s status is serving, else 503 with the status.
    async fn answer(self, service: &'static str) -> Result<warp::reply::Response, Infallible> {
        let request = tonic::Request::new(HealthCheckRequest {
            service: service.to_owned(),
        });
        let status = match self.0.check(request).await {
            Ok(response) => ServingStatus::try_from(response.into_inner().status)
                .unwrap_or(ServingStatus::Unknown),
            Err(_) => ServingStatus::ServiceUnknown,
        };
        let code = if status == ServingStatus::Serving {
            warp::http::StatusCode::OK
        } else {
            warp::http::StatusCode::SERVICE_UNAVAILABLE
        };
        let body = format!("{}\n", status.as_str_name());
        Ok(warp::reply::with_status(body, code).into_response())
    }
}

/// `GET /metrics`, and with `probes`, `GET /healthz` (the `liveness` status: the process
/// runs) and `GET /readyz` (the overall status: NOT_SERVING while Redis is unreachable or
/// the replica is stopping).
pub fn routes(
    metrics: Arc<Metrics>,
    probes: Probes,
) -> warp::filters::BoxedFilter<(warp::reply::Response,)> {
    let scrape = warp::path("metrics")
        .and(warp::path::end())
        .and(warp::get())
        .map(move || {
            let mut response = warp::http::Response::new(metrics.encode());
            response.headers_mut().insert(
                warp::http::header::CONTENT_TYPE,
                warp::http::HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            response.into_response()
        });
    let probe = |path: &'static str, service: &'static str| {
        let probes = probes.clone();
        warp::path(path)
            .and(warp::path::end())
            .and(warp::get())
            .and_then(move || probes.clone().answer(service))
    };
    scrape
        .or(probe("healthz", LIVENESS_SERVICE))
        .unify()
        .or(probe("readyz", ""))
        .unify()
        // Boxing pins the filter's lifetimes down, so the server future is `Send` for
        // any spawner (rustc cannot prove it through the generic path filter).
        .boxed()
}

/// Serves [`routes`] on `listener` (over TLS when `tls` is set) until `shutdown`, on the
/// shared accept loop: a client that does not send its request head within the header
/// timeout is closed, and at most `limits.max_connections` are open at once.
pub async fn serve_metrics(
    routes: warp::filters::BoxedFilter<(warp::reply::Response,)>,
    listener: tokio::net::TcpListener,
    tls: Option<listener::TlsAcceptor>,
    limits: listener::Limits,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let service = hyper_util::service::TowerToHyperService::new(warp::service(routes));
    listener::serve(
        listener,
        tls,
        service,
        limits,
        Arc::new(listener::NoObserver),
        shutdown,
    )
    .await;
}

/// Binds the metrics address.
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}

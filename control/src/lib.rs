//! callbridge control plane: agents, calls, events, transcripts, usage and the routing
//! of live commands, over gRPC (tonic), with state in Redis.
//!
//! Layout:
//! - [`config`]: environment variables (one table), parsed and validated before any socket opens.
//! - [`serve`]: runs the gRPC server on a bound listener until a shutdown future fires.
//! - `service/`: the `Agents` (`agents`), `Calls` (`calls_api`) and `Relay` (`relay`)
//!   services; proto ⇄ domain only.
//! - [`domain`]: the ids of a call as types, parsed once at the gRPC edge
//!   ([`domain::ids`]), what a call is ([`domain::record`]), its lifecycle rules
//!   ([`domain::call`]: status order, event effects, transcripts, after-stream decision)
//!   and Twilio's statuses ([`domain::twilio`]); imports neither gRPC services nor stores.
//! - [`hub`]: replica-local fan-out of events to watchers and of commands to attach
//!   streams, and the [`hub::BusMessage`] the stores feed it.
//! - [`validate`]: input checks, each naming the offending field.
//! - [`store`]: the [`store::CallStore`] trait, its Redis and in-memory implementations, key names.
//! - [`auth`]: bearer tokens per API, compared in constant time.
//! - [`metrics`]: Prometheus metrics and `/metrics`; [`limits`]: the listeners' limits
//!   (settings); [`grpc_limits`]: the unary deadline that spares streams, and the cap on
//!   watch streams per token.
//! - [`heartbeat`]: the attach streams' heartbeat timeout and the ready-relay rule.
//! - [`error`]: `StoreError`, `Error` and their one mapping to `tonic::Status`.
//! - [`tls`]: the gRPC listener over TLS (certificates reloaded on change) and PEM files.
//!
//! Background work on every replica: a Redis health probe (1 s; drives `grpc.health.v1`),
//! the `RELAY_LOST` sweeper, the pub/sub listener of the bus, and the campaign dialer
//! (`dialer::campaign`: each campaign is dialled by the one replica holding its lease).

pub mod auth;
pub mod config;
mod dialer;
pub mod domain;
pub mod error;
pub mod grpc_limits;
pub mod heartbeat;
pub mod hub;
pub mod limits;
pub mod metrics;
mod service;
pub mod store;
pub mod tls;
pub mod twilio_rest;
pub mod validate;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use callbridge_proto::pb;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::service::interceptor::InterceptedService;
use tonic_health::ServingStatus;

use crate::auth::{Api, Auth};
use crate::config::{Config, StoreConfig};
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::service::Shared;
use crate::store::CallStore;
use crate::store::memory::MemoryStore;
use crate::store::redis::{RedisStore, RedisTarget};

/// Largest accepted gRPC message.
const MAX_MESSAGE: usize = 1024 * 1024;
/// How often Redis is probed for the health service.
const PROBE_EVERY: Duration = Duration::from_secs(1);
/// How long a probe may take before Redis counts as down.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// How long startup keeps trying to reach Redis.
const STARTUP_REDIS_WAIT: Duration = Duration::from_secs(30);
/// Health service name that answers SERVING while the process runs, whatever Redis does:
/// for liveness probes, so a Redis outage takes replicas out of rotation (readiness on
/// "") without restarting them.
pub const LIVENESS_SERVICE: &str = "liveness";
/// Full gRPC names of our services, as the health service knows them.
const SERVICE_NAMES: [&str; 4] = [
    "",
    "callbridge.v1.Agents",
    "callbridge.v1.Calls",
    "callbridge.v1.Relay",
];

/// Why the server could not run.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Redis could not be reached at start.
    #[error("cannot connect to Redis: {0}")]
    Redis(#[from] error::StoreError),
    /// The metrics listener could not be bound.
    #[error("cannot bind metrics listener {addr}: {source}")]
    Metrics {
        /// The address.
        addr: std::net::SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The TLS files could not be used (they were fine when the configuration was read).
    #[error("TLS set-up failed: {0}")]
    Tls(#[from] tls::TlsFileError),
    /// The gRPC server failed.
    #[error("gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Runs the control plane on `listener` until `shutdown` completes, then drains: health
/// goes NOT_SERVING, accepts stop, streams end, all within the configured grace.
pub async fn serve(
    config: Config,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let token = CancellationToken::new();
    let tracker = TaskTracker::new();
    let hub = Arc::new(Hub::new());
    let metrics = Arc::new(Metrics::new());
    let config = Arc::new(config);
    {
        let token = token.clone();
        // Detached on purpose: it only turns the caller's future into our token.
        tokio::spawn(async move {
            tokio::select! {
                () = shutdown => token.cancel(),
                () = token.cancelled() => {}
            }
        });
    }
    let metrics_listener = match config.metrics_listen {
        Some(addr) => Some(
            metrics::bind(addr)
                .await
                .map_err(|source| ServeError::Metrics { addr, source })?,
        ),
        None => None,
    };
    let target = match &config.store {
        StoreConfig::Memory => None,
        StoreConfig::Redis(url) => Some(RedisTarget::Single(url.expose().to_owned())),
        StoreConfig::Cluster(nodes) => Some(RedisTarget::Cluster(
            nodes.iter().map(|n| n.expose().to_owned()).collect(),
        )),
    };
    let result = match target {
        None => {
            tracing::warn!(
                "REDIS_URL is not set: using the IN-MEMORY store. Nothing survives a restart and \
                 only this one process sees the calls. Do not run this in production."
            );
            let store = MemoryStore::new(hub.clone(), config.control_id.clone());
            let shared = Shared::new(store, hub, metrics, config, token.clone(), tracker.clone());
            run(shared, listener, metrics_listener).await
        }
        Some(target) => {
            let store = connect_redis(&target, &config, &hub, &tracker, &token)
                .await?
                .with_latency(metrics.redis_latency.clone());
            let shared = Shared::new(store, hub, metrics, config, token.clone(), tracker.clone());
            run(shared, listener, metrics_listener).await
        }
    };
    token.cancel();
    result
}

async fn connect_redis(
    target: &RedisTarget,
    config: &Config,
    hub: &Arc<Hub>,
    tracker: &TaskTracker,
    token: &CancellationToken,
) -> Result<RedisStore, ServeError> {
    let deadline = tokio::time::Instant::now() + STARTUP_REDIS_WAIT;
    loop {
        match RedisStore::connect_tls(
            target,
            config.redis_tls.as_ref(),
            config.retention,
            hub.clone(),
            &config.control_id,
            tracker,
            token.clone(),
        )
        .await
        {
            Ok(store) => return Ok(store),
            Err(err) if tokio::time::Instant::now() < deadline && !token.is_cancelled() => {
                tracing::warn!(error = %err, "Redis not reachable yet; retrying.");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(err) => return Err(err.into()),
        }
    }
}

async fn run<S: CallStore>(
    shared: Shared<S>,
    listener: tokio::net::TcpListener,
    metrics_listener: Option<tokio::net::TcpListener>,
) -> Result<(), ServeError> {
    let shared = Arc::new(shared);
    let config = shared.config.clone();
    let token = shared.shutdown.clone();
    let tracker = shared.tracker.clone();

    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_service_status(LIVENESS_SERVICE, ServingStatus::Serving)
        .await;
    // Reflection lists every method to whoever asks: on by default only in the insecure
    // (no-auth, local) mode, else when CONTROL_GRPC_REFLECTION=true.
    let reflection = config
        .limits
        .grpc_reflection
        .then(|| {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(callbridge_proto::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
                .build_v1()
                .map_err(|e| {
                    // The descriptor set is generated at build time; failing here is a build bug.
                    tracing::error!(error = %e, "Reflection descriptor set is invalid.");
                    e
                })
                .ok()
        })
        .flatten();

    tracker.spawn(probe_redis(shared.clone(), health.clone()));
    tracker.spawn(sweep(shared.clone()));
    tracker.spawn(dialer::campaign::run(shared.clone()));
    tracker.spawn(dialer::orphans::run(shared.clone()));
    if let Some(listener) = metrics_listener {
        let tls = match &config.limits.metrics_tls {
            Some(pair) => {
                let settings = tls::ServerTls {
                    pair: pair.clone(),
                    client_ca: None,
                };
                let (tls_config, resolver) =
                    tls::server_config(&settings, &[b"http/1.1"]).map_err(ServeError::Tls)?;
                tracker.spawn(tls::watch(pair.clone(), resolver, token.clone()));
                Some(callbridge_telemetry::listener::TlsAcceptor::from(
                    tls_config,
                ))
            }
            None => None,
        };
        tracing::info!(addr = ?listener.local_addr().ok(), tls = tls.is_some(), "Metrics listening.");
        let routes = metrics::routes(shared.metrics.clone(), metrics::Probes::new(health.clone()));
        tracker.spawn(metrics::serve_metrics(
            routes,
            listener,
            tls,
            config.limits.metrics,
            token.clone(),
        ));
    }

    let open =
        config.insecure_no_auth && config.app_tokens.is_empty() && config.relay_tokens.is_empty();
    if open {
        tracing::warn!("CONTROL_INSECURE_NO_AUTH=true and no tokens: every caller is accepted.");
    }
    let app_auth = Auth::new(
        Api::Public,
        config.app_tokens.clone(),
        config.relay_tokens.clone(),
        open,
    )
    .with_metrics(shared.metrics.clone());
    let relay_auth = Auth::new(
        Api::Relay,
        config.relay_tokens.clone(),
        config.app_tokens.clone(),
        open,
    )
    .with_metrics(shared.metrics.clone());

    let agents = pb::agents_server::AgentsServer::new(service::agents::AgentsApi(shared.clone()))
        .max_decoding_message_size(MAX_MESSAGE);
    let calls = pb::calls_server::CallsServer::new(service::calls_api::CallsApi(shared.clone()))
        .max_decoding_message_size(MAX_MESSAGE);
    let relay = pb::relay_server::RelayServer::new(service::relay::RelayApi(shared.clone()))
        .max_decoding_message_size(MAX_MESSAGE);

    let addr = listener.local_addr().ok();
    tracing::info!(?addr, control_id = %config.control_id, lease_secs = config.lease.as_secs(), "Control plane listening.");
    let limits = &config.limits;
    let streaming = Arc::new(grpc_limits::streaming_methods(&[
        callbridge_proto::FILE_DESCRIPTOR_SET,
        tonic_health::pb::FILE_DESCRIPTOR_SET,
    ]));
    let mut router = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(20)))
        .max_concurrent_streams(limits.grpc_max_concurrent_streams)
        .http2_max_header_list_size(limits.grpc_max_header_list_bytes)
        .add_service(grpc_limits::UnaryTimeout::new(
            health_service,
            limits.grpc_unary_timeout,
            streaming.clone(),
        ))
        .add_service(grpc_limits::UnaryTimeout::new(
            InterceptedService::new(agents, app_auth.clone()),
            limits.grpc_unary_timeout,
            streaming.clone(),
        ))
        .add_service(grpc_limits::UnaryTimeout::new(
            InterceptedService::new(calls, app_auth),
            limits.grpc_unary_timeout,
            streaming.clone(),
        ))
        .add_service(grpc_limits::UnaryTimeout::new(
            InterceptedService::new(relay, relay_auth),
            limits.grpc_unary_timeout,
            streaming.clone(),
        ));
    if let Some(reflection) = reflection {
        router = router.add_service(reflection);
    }
    let server_token = token.clone();
    let stopped = async move {
        server_token.cancelled().await;
        for name in SERVICE_NAMES.into_iter().chain([LIVENESS_SERVICE]) {
            health
                .set_service_status(name, ServingStatus::NotServing)
                .await;
        }
    };
    let server: std::pin::Pin<
        Box<dyn Future<Output = Result<(), tonic::transport::Error>> + Send>,
    > = match &config.grpc_tls {
        None => {
            // Acks and watch frames are small: without NODELAY they wait for Nagle and the
            // peer's delayed ACK (40 ms stalls measured in docs/benchmarks/control.md).
            let incoming =
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
            Box::pin(router.serve_with_incoming_shutdown(incoming, stopped))
        }
        Some(settings) => {
            // gRPC is HTTP/2 only: a client that cannot agree on h2 is refused in the
            // handshake rather than after it.
            let (tls_config, resolver) =
                tls::server_config(settings, &[b"h2"]).map_err(ServeError::Tls)?;
            tracker.spawn(tls::watch(settings.pair.clone(), resolver, token.clone()));
            tracing::info!(
                client_certificates = settings.client_ca.is_some(),
                "gRPC over TLS."
            );
            let incoming = tls::incoming(listener, tls_config, token.clone());
            Box::pin(router.serve_with_incoming_shutdown(incoming, stopped))
        }
    };
    let mut server = server;
    let result = tokio::select! {
        result = &mut server => result,
        () = token.cancelled() => {
            // Streams select on the token and end; the server then finishes its connections.
            match tokio::time::timeout(config.shutdown_grace, &mut server).await {
                Ok(result) => result,
                Err(_) => {
                    tracing::warn!("Shutdown grace ran out with connections still open.");
                    Ok(())
                }
            }
        }
    };
    token.cancel();
    tracker.close();
    if tokio::time::timeout(config.shutdown_grace, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!("Background tasks still running after the shutdown grace.");
    }
    tracing::info!("Control plane stopped.");
    result.map_err(ServeError::from)
}

/// Probes the store every second; drives health and `redis_up`.
async fn probe_redis<S: CallStore>(
    shared: Arc<Shared<S>>,
    health: tonic_health::server::HealthReporter,
) {
    let mut tick = tokio::time::interval(PROBE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut serving: Option<bool> = None;
    loop {
        tokio::select! {
            () = shared.shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let up = match tokio::time::timeout(PROBE_TIMEOUT, shared.store.ping()).await {
            // The store's connection observes the PING's round trip (`command="ping"`).
            Ok(Ok(_)) => true,
            Ok(Err(err)) => {
                shared.note_store_failure();
                if serving != Some(false) {
                    if tls::is_tls_failure(&err) {
                        tracing::warn!(error = %err, "Redis TLS connection failed (certificate or handshake); health NOT_SERVING.");
                    } else {
                        tracing::warn!(error = %err, "Redis is unreachable; health NOT_SERVING.");
                    }
                }
                false
            }
            Err(_) => {
                shared.note_store_failure();
                if serving != Some(false) {
                    tracing::warn!("Redis probe timed out; health NOT_SERVING.");
                }
                false
            }
        };
        shared.metrics.redis_up.set(i64::from(up));
        if serving != Some(up) && !shared.shutdown.is_cancelled() {
            if up && serving.is_some() {
                tracing::info!("Redis is back; health SERVING.");
            }
            let status = if up {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            for name in SERVICE_NAMES {
                health.set_service_status(name, status).await;
            }
            serving = Some(up);
        }
    }
}

/// Ends `RELAY_LOST` calls and trims the call index, on every replica.
async fn sweep<S: CallStore>(shared: Arc<Shared<S>>) {
    let every = (shared.config.lease / 3).max(Duration::from_millis(200));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_trim = tokio::time::Instant::now();
    let retention_ms = i64::try_from(shared.config.retention.as_millis()).unwrap_or(i64::MAX);
    loop {
        tokio::select! {
            () = shared.shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Err(err) = shared.sweep_relay_lost().await {
            tracing::debug!(error = %err, "Sweep failed; retrying next tick.");
        }
        if last_trim.elapsed() > Duration::from_secs(60) {
            last_trim = tokio::time::Instant::now();
            // A call is kept `retention` after its last write, so only entries created
            // longer ago than that can point at a call that has gone.
            let cutoff = domain::call::now_ms().saturating_sub(retention_ms);
            match shared.store.trim_index(cutoff).await {
                Ok(removed) => tracing::debug!(removed, "Call index trimmed."),
                Err(err) => tracing::debug!(error = %err, "Index trim failed."),
            }
        }
    }
}

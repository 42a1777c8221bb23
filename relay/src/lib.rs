//! callbridge relay: bridges Twilio Media Streams and the OpenAI Realtime API, one call
//! per WebSocket, reporting to the control plane over a per-call gRPC stream.
//!
//! Layout:
//! - [`config`]: environment/flags, validation, the settings table.
//! - [`http`]: warp routes (webhooks, media streams, health) and security headers.
//! - [`listen`]: the public and metrics listeners (header timeout, connection cap, TLS for
//!   `/metrics`); [`capacity`]: `RELAY_MAX_CALLS`.
//! - [`signature`]: `X-Twilio-Signature` checking.
//! - [`twiml`]: TwiML answers; [`twilio_fallback`]: the number's fallback URL;
//!   [`standalone_after`]: a standalone stream's `<Connect action>`, answered from
//!   [`stream_ends`], the note of how each ended.
//! - [`call_id`]: callbridge's call id, checked where it enters.
//! - [`stream_credential`]: the per-stream credential TwiML carries and `start` returns;
//!   [`stream_admission`]: a stream's checks at `start`, before anything is attached or dialled.
//! - [`control`]: client of control's `Relay` service.
//! - [`call`]: one call: the call loop over its components (model session, playback in
//!   `call::phase`, deadlines, tools, counters), socket outboxes, control link.
//! - [`model_breaker`]: a circuit breaker per model endpoint, shared by the calls: during
//!   an outage new calls get the fallback at once ([`fallback_end`] tells control).
//! - [`agent`]: the agent a call runs with.
//! - [`error`]: errors naming the failing side; how a call ended.
//! - [`twilio`], [`realtime`]: wire formats, parsed borrowed and built without detours
//!   (and the Twilio socket type).
//! - [`metrics`] (logging and traces: the `callbridge-telemetry` crate).
//!
//! Entry point: [`run`] takes a bound listener (so a caller knows the relay is reachable
//! as soon as `bind` returned) and a shutdown future.

pub mod agent;
pub mod call;
pub mod call_id;
pub mod capacity;
pub mod config;
pub mod control;
pub mod control_tls;
pub mod drain;
pub mod error;
pub mod fallback_end;
pub mod http;
pub mod listen;
pub mod metrics;
pub mod model_breaker;
pub mod presence;
pub mod realtime;
pub mod signature;
pub mod standalone_after;
pub mod status_callback;
pub mod stream_admission;
pub mod stream_credential;
pub mod stream_ends;
pub mod twilio;
pub mod twilio_fallback;
pub mod twiml;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

pub use config::Config;
pub use metrics::Metrics;

/// Time calls get to report `DRAIN` and close after the grace period.
const HARD_STOP_WAIT: Duration = Duration::from_secs(5);

/// Why the relay could not run.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// `CONTROL_URL` is not a usable endpoint.
    #[error("CONTROL_URL: {0}")]
    ControlUrl(#[from] tonic::transport::Error),
    /// The TLS files towards control cannot be used (they could when the config was read).
    #[error(transparent)]
    ControlTls(#[from] control_tls::ControlTlsError),
    /// `RELAY_CONTROL_TOKEN` cannot be sent as an `authorization` header.
    #[error("RELAY_CONTROL_TOKEN: not valid HTTP header text")]
    ControlTokenNotHeaderText,
    /// `RELAY_METRICS_ADDR` cannot be bound.
    #[error("cannot bind RELAY_METRICS_ADDR {addr}: {source}")]
    MetricsBind {
        /// The address.
        addr: std::net::SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The metrics certificate cannot be used (it could when the config was read).
    #[error("RELAY_METRICS_TLS_CERT_FILE: {0}")]
    MetricsTls(#[from] callbridge_telemetry::tls::TlsFileError),
}

/// Runs the relay on `listener` until `shutdown` resolves, then drains: `/readyz` and new
/// stream upgrades answer 503 at once (webhooks and action requests are still answered),
/// live calls are handed off at a quiet moment or run on for up to
/// `RELAY_DRAIN_GRACE_SECS`, then the rest are cut (Twilio closed with 1001, `ended` with
/// reason `DRAIN`). The relay then keeps listening for Twilio's action requests of the
/// calls it ended ([`drain::ActionsLedger`], `RELAY_DRAIN_ACTION_WAIT_SECS`), and finally
/// stops accepting and answers what is in flight before it returns.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), RelayError> {
    run_with_metrics(config, listener, shutdown, Metrics::new()).await
}

/// [`run`] with a caller-provided metrics registry (tests read it directly).
pub async fn run_with_metrics(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
    metrics: Metrics,
) -> Result<(), RelayError> {
    let control = control::Control::from_config(&config)?;
    let relay_id: Arc<str> = config.relay_id().into();
    if control.is_none() {
        warn!(
            "No CONTROL_URL: standalone mode. Calls use the AGENT_* settings and NOTHING is stored."
        );
    }
    let hard_stop = CancellationToken::new();
    let drain_started = CancellationToken::new();
    // Opened by the presence task once draining and another relay is ready.
    let handoff = CancellationToken::new();
    let presence = control.clone().map(|control| {
        tokio::spawn(
            presence::Presence {
                control,
                relay_id: relay_id.clone(),
                drain_started: drain_started.clone(),
                handoff: handoff.clone(),
                handoff_enabled: config.drain_handoff,
                metrics: metrics.clone(),
            }
            .run(),
        )
    });
    let streams = Arc::new(stream_credential::StreamCredentials::from_config(&config));
    let breakers = model_breaker::ModelBreakers::from_config(&config, &metrics);
    let (actions_due, actions_ledger) =
        drain::actions_due(config.drain_action_wait(), drain_started.clone());
    let deps = http::Deps {
        call: call::CallDeps {
            breakers,
            config: Arc::new(config),
            metrics: metrics.clone(),
            control,
            relay_id: relay_id.clone(),
            hard_stop: hard_stop.clone(),
            drain: handoff.clone(),
            actions_due,
            stream_ends: stream_ends::StreamEnds::spawn(),
        },
        draining: Arc::new(AtomicBool::new(false)),
        tracker: TaskTracker::new(),
        streams,
    };
    let grace = deps.call.config.drain_grace();
    let max_calls = deps.call.config.max_calls();
    metrics.listeners().set_max_calls(max_calls);
    let addr = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    info!(%addr, %relay_id, max_calls, "Relay listening.");

    let stop_listening = CancellationToken::new();
    let metrics_server = serve_metrics(&deps.call.config, &metrics, &stop_listening).await?;
    let server = listen::serve_public(listener, deps.clone(), stop_listening.clone());
    let mut server = std::pin::pin!(server);

    tokio::select! {
        () = &mut server => {
            warn!("HTTP server stopped on its own.");
            return Ok(());
        }
        () = shutdown => {}
    }

    info!(grace_secs = grace.as_secs(), "Draining.");
    deps.draining.store(true, Ordering::Relaxed);
    metrics.draining().set(1);
    deps.tracker.close();
    // Live calls hand themselves off at their next quiet moment (RELAY_DRAIN_HANDOFF),
    // once control knows another ready relay (presence).
    drain_started.cancel();
    let drain = async {
        if tokio::time::timeout(grace, deps.tracker.wait())
            .await
            .is_err()
        {
            warn!(
                calls = deps.tracker.len(),
                "Drain grace over; cutting the remaining calls."
            );
            hard_stop.cancel();
            if tokio::time::timeout(HARD_STOP_WAIT, deps.tracker.wait())
                .await
                .is_err()
            {
                warn!(calls = deps.tracker.len(), "Calls did not close in time.");
            }
        }
    };
    // Then Twilio's action requests of the calls the drain ended (hand-offs, cut calls).
    let actions = async {
        drain.await;
        let settled = actions_ledger.settled().await;
        info!(
            answered = settled.answered,
            elsewhere = settled.elsewhere,
            "Action requests of the drained calls: answered here, or given up after RELAY_DRAIN_ACTION_WAIT_SECS."
        );
    };
    // Keep serving (probes, webhooks, action requests) meanwhile.
    tokio::select! {
        () = actions => {}
        () = &mut server => {}
    }
    // Stop accepting; the requests in flight and in the backlog are answered (bounded).
    stop_listening.cancel();
    if tokio::time::timeout(HARD_STOP_WAIT, server).await.is_err() {
        warn!("Requests still in flight after the stop; closing anyway.");
    }
    if let Some(metrics_server) = metrics_server {
        let _ = tokio::time::timeout(HARD_STOP_WAIT, metrics_server).await;
    }
    if let Some(presence) = presence {
        presence.abort();
    }
    info!("Relay stopped.");
    Ok(())
}

/// Binds `RELAY_METRICS_ADDR` and serves `/metrics` there (over TLS when a certificate is
/// set) until `stop`; it keeps answering through the drain.
async fn serve_metrics(
    config: &Config,
    metrics: &Metrics,
    stop: &CancellationToken,
) -> Result<Option<tokio::task::JoinHandle<()>>, RelayError> {
    let Some(addr) = config.metrics_listen else {
        return Ok(None);
    };
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| RelayError::MetricsBind { addr, source })?;
    let tls = match listen::metrics_tls_files(config) {
        Some(files) => {
            let (acceptor, resolver) = listen::metrics_tls(&files)?;
            tokio::spawn(callbridge_telemetry::tls::watch(
                files,
                resolver,
                stop.clone(),
            ));
            Some(acceptor)
        }
        None => None,
    };
    let bound = listener.local_addr().map_or(addr, |a| a);
    info!(addr = %bound, tls = tls.is_some(), "Metrics listening.");
    Ok(Some(tokio::spawn(listen::serve_metrics(
        listener,
        tls,
        metrics.clone(),
        listen::metrics_limits(config),
        stop.clone(),
    ))))
}

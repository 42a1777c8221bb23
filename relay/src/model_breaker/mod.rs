//! A circuit breaker per model endpoint, shared by all of the relay's calls: during a
//! model outage new calls get the fallback at once instead of each waiting out the dial
//! timeout in silence (`docs/resilience.md`, "Model outage").
//!
//! Every dial a call makes (first session, reconnect, rollover) reports whether it
//! connected ([`ModelBreakers::dial_finished`]). After `RELAY_MODEL_BREAKER_FAILURES`
//! consecutive failures the endpoint's breaker opens: the voice webhook answers the
//! agent's fallback instead of a stream, and a stream that arrives anyway ends at once
//! with `MODEL_UNAVAILABLE` instead of dialling ([`ModelBreakers::admits`]). Live calls
//! are never turned away (their reconnects keep their own limit) but their dials still
//! count. While open, one background probe at a time dials the endpoint (pauses from
//! `RELAY_MODEL_BREAKER_PROBE_MS`, doubling up to [`PROBE_MAX`]); the first dial that
//! connects, probe or call, closes the breaker. The decisions are [`state`]'s.

pub mod state;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::config::{Config, Secret};
use crate::error::RealtimeError;
use crate::metrics::Metrics;
use state::{Breaker, Limits, Probe, Transition};

/// The longest pause between probes (unless the first pause is set longer).
pub const PROBE_MAX: Duration = Duration::from_secs(10);

/// Where a new call was sent to the fallback (the `at` label of the metric).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShortCircuit {
    /// The voice webhook answered the fallback instead of a stream.
    Webhook,
    /// A stream ended at `start` with `MODEL_UNAVAILABLE` instead of dialling.
    Stream,
}

impl ShortCircuit {
    fn label(self) -> &'static str {
        match self {
            Self::Webhook => "webhook",
            Self::Stream => "stream",
        }
    }
}

/// How a call's dial ended, as the breaker counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DialOutcome {
    /// The WebSocket handshake completed.
    Connected,
    /// Refused, timed out, or the handshake failed.
    Failed,
    /// Says nothing about the endpoint (a setup write failing after the handshake, a
    /// call that went away meanwhile).
    Neither,
}

impl DialOutcome {
    /// How a dial's result counts.
    pub fn of<T>(result: &Result<T, RealtimeError>) -> Self {
        match result {
            Ok(_) => Self::Connected,
            Err(RealtimeError::Connect(_) | RealtimeError::ConnectTimeout) => Self::Failed,
            Err(_) => Self::Neither,
        }
    }
}

/// Dial reports waiting for the breakers' task (a burst of failures beyond this is
/// dropped: the breaker opens on the next ones anyway).
const REPORT_SLOTS: usize = 1024;

/// The breakers of every model endpoint the relay dials; shared by all calls (cheap to
/// clone). The breakers belong to one task (the relay takes no locks); calls report
/// their dials to it, and read whether an endpoint is open from a flag it keeps.
#[derive(Clone)]
pub struct ModelBreakers {
    endpoints: Arc<HashMap<String, Endpoint>>,
    reports: mpsc::Sender<Report>,
}

impl std::fmt::Debug for ModelBreakers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelBreakers").finish_non_exhaustive()
    }
}

/// What calls see of an endpoint's breaker.
struct Endpoint {
    /// Index in the task's state.
    index: usize,
    /// Set by the task while the breaker is open or half-open.
    open: Arc<AtomicBool>,
    short_circuit_webhook: Counter,
    short_circuit_stream: Counter,
}

/// A report to the breakers' task.
enum Report {
    /// A call's dial of `url` at endpoint `index` ended.
    Dialled {
        index: usize,
        url: String,
        outcome: DialOutcome,
    },
    /// The endpoint's probe ended.
    Probed { index: usize, connected: bool },
}

/// The task's state of one endpoint.
struct EndpointState {
    /// As logs and metrics name it (no credentials, no query).
    label: String,
    breaker: Breaker,
    open: Arc<AtomicBool>,
    open_gauge: Gauge,
    opened: Counter,
    /// What the probe dials: the URL of the last dial that failed (with its `?model=`).
    probe_url: Option<String>,
}

/// What a probe needs to dial.
#[derive(Clone)]
struct ProbeDial {
    api_key: Secret,
    connect_timeout: Duration,
}

/// `scheme://host[:port]/path` of `url`: no user info, query or fragment, so a label or
/// log line never carries a credential someone put in the URL.
pub fn endpoint_label(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let rest = rest.split(['?', '#']).next().unwrap_or_default();
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    if scheme.is_empty() {
        format!("{host}{path}")
    } else {
        format!("{scheme}://{host}{path}")
    }
}

impl ModelBreakers {
    /// Breakers for the endpoint the relay dials (`OPENAI_REALTIME_URL`), with the
    /// `RELAY_MODEL_BREAKER_*` settings; starts their task (needs a Tokio runtime), which
    /// ends with the last handle.
    pub fn from_config(config: &Config, metrics: &Metrics) -> Self {
        let limits = Limits {
            failures: config.model_breaker_failures,
            probe_first: config.model_breaker_probe(),
            probe_max: PROBE_MAX,
        };
        let dial = ProbeDial {
            api_key: config.openai_api_key.clone(),
            connect_timeout: config.connect_timeout(),
        };
        Self::start(&[&config.openai_realtime_url], limits, dial, metrics)
    }

    /// Breakers for `bases`, each keyed by its URL.
    fn start(bases: &[&str], limits: Limits, dial: ProbeDial, metrics: &Metrics) -> Self {
        let mut endpoints = HashMap::new();
        let mut states = Vec::new();
        for &base in bases {
            let label = endpoint_label(base);
            let open = Arc::new(AtomicBool::new(false));
            endpoints.insert(
                base.to_owned(),
                Endpoint {
                    index: states.len(),
                    open: open.clone(),
                    short_circuit_webhook: metrics
                        .model_breaker_short_circuits(&label, ShortCircuit::Webhook.label()),
                    short_circuit_stream: metrics
                        .model_breaker_short_circuits(&label, ShortCircuit::Stream.label()),
                },
            );
            // The gauge is there (at 0) from the start: a dashboard tells a closed
            // breaker from a relay that never reported one.
            states.push(EndpointState {
                open_gauge: metrics.model_breaker_open(&label),
                opened: metrics.model_breaker_opened(&label),
                label,
                breaker: Breaker::new(limits),
                open,
                probe_url: None,
            });
        }
        let (reports, rx) = mpsc::channel(REPORT_SLOTS);
        tokio::spawn(run(rx, reports.downgrade(), states, limits, dial));
        Self {
            endpoints: Arc::new(endpoints),
            reports,
        }
    }

    /// Whether a new call may dial `base` now; when not, the call is counted as sent to
    /// the fallback at `at`. An endpoint the relay does not know has no breaker.
    pub fn admits(&self, base: &str, at: ShortCircuit) -> bool {
        let Some(e) = self.endpoints.get(base) else {
            return true;
        };
        if !e.open.load(Ordering::Acquire) {
            return true;
        }
        match at {
            ShortCircuit::Webhook => e.short_circuit_webhook.inc(),
            ShortCircuit::Stream => e.short_circuit_stream.inc(),
        };
        false
    }

    /// A call's dial of `url` (at endpoint `base`) ended.
    pub fn dial_finished(&self, base: &str, url: &str, outcome: DialOutcome) {
        if outcome == DialOutcome::Neither {
            return;
        }
        let Some(e) = self.endpoints.get(base) else {
            return;
        };
        let _ = self.reports.try_send(Report::Dialled {
            index: e.index,
            url: url.to_owned(),
            outcome,
        });
    }
}

/// The breakers' task: applies the reports, and runs each open endpoint's probe when its
/// breaker says so (one at a time per endpoint, in a task of its own that reports back).
async fn run(
    mut rx: mpsc::Receiver<Report>,
    tx: mpsc::WeakSender<Report>,
    mut states: Vec<EndpointState>,
    limits: Limits,
    dial: ProbeDial,
) {
    loop {
        let now = Instant::now();
        let mut wake: Option<Instant> = None;
        for (index, s) in states.iter_mut().enumerate() {
            match s.breaker.next_probe(now) {
                Probe::Now => {
                    let (Some(tx), Some(url)) = (tx.upgrade(), s.probe_url.clone()) else {
                        // Nothing to dial (cannot happen: it opened on a failed dial), or
                        // the relay is stopping.
                        let _ = s.breaker.probe_done(false, now);
                        continue;
                    };
                    let dial = dial.clone();
                    tokio::spawn(async move {
                        let connected =
                            crate::call::probe_dial(&url, &dial.api_key, dial.connect_timeout)
                                .await;
                        let _ = tx.send(Report::Probed { index, connected }).await;
                    });
                }
                Probe::At(at) => wake = Some(wake.map_or(at, |w| w.min(at))),
                Probe::InFlight | Probe::Stop => {}
            }
        }
        let report = match wake {
            Some(at) => tokio::select! {
                r = rx.recv() => r,
                () = tokio::time::sleep_until(at) => continue,
            },
            None => rx.recv().await,
        };
        let Some(report) = report else { return };
        let now = Instant::now();
        let (index, transition, by) = match report {
            Report::Dialled {
                index,
                url,
                outcome,
            } => {
                let Some(s) = states.get_mut(index) else {
                    continue;
                };
                let t = match outcome {
                    DialOutcome::Connected => s.breaker.dial_succeeded(now),
                    DialOutcome::Failed => {
                        s.probe_url = Some(url);
                        s.breaker.dial_failed(now)
                    }
                    DialOutcome::Neither => None,
                };
                (index, t, "call")
            }
            Report::Probed { index, connected } => {
                let Some(s) = states.get_mut(index) else {
                    continue;
                };
                (index, s.breaker.probe_done(connected, now), "probe")
            }
        };
        if let (Some(t), Some(s)) = (transition, states.get(index)) {
            s.transitioned(t, by, &limits);
        }
    }
}

impl EndpointState {
    /// Publishes a transition: the flag calls read, the metrics, a log line.
    fn transitioned(&self, t: Transition, by: &'static str, limits: &Limits) {
        match t {
            Transition::Opened { failures } => {
                self.open.store(true, Ordering::Release);
                self.open_gauge.set(1);
                self.opened.inc();
                warn!(
                    endpoint = %self.label,
                    failures,
                    probe_ms = limits.probe_first.as_millis() as u64,
                    "Model endpoint unreachable: circuit open, new calls get the fallback at once."
                );
            }
            Transition::Closed { open_for } => {
                self.open.store(false, Ordering::Release);
                self.open_gauge.set(0);
                info!(
                    endpoint = %self.label,
                    open_ms = open_for.as_millis() as u64,
                    by,
                    "Model endpoint reachable again: circuit closed."
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_carry_no_credentials_or_query() {
        assert_eq!(
            endpoint_label("wss://api.openai.com/v1/realtime"),
            "wss://api.openai.com/v1/realtime"
        );
        assert_eq!(
            endpoint_label("wss://user:pw@host:8443/v1/realtime?model=x#f"),
            "wss://host:8443/v1/realtime"
        );
        assert_eq!(endpoint_label("ws://127.0.0.1:9"), "ws://127.0.0.1:9");
    }

    #[test]
    fn dial_outcomes_count_connect_failures_only() {
        assert_eq!(DialOutcome::of(&Ok::<(), _>(())), DialOutcome::Connected);
        assert_eq!(
            DialOutcome::of::<()>(&Err(RealtimeError::ConnectTimeout)),
            DialOutcome::Failed
        );
        assert_eq!(
            DialOutcome::of::<()>(&Err(RealtimeError::Gone)),
            DialOutcome::Neither
        );
        assert_eq!(
            DialOutcome::of::<()>(&Err(RealtimeError::DialTaskEnded)),
            DialOutcome::Neither
        );
    }
}

//! Prometheus metrics (prometheus-client). Every per-frame counter is resolved once into
//! a plain `Counter` handle (an `Arc<AtomicU64>`), so the audio path never takes the
//! family's lock.

use std::sync::Arc;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

type Labels = [(&'static str, &'static str); 1];
/// A model endpoint (its URL without credentials or query).
type EndpointLabels = [(&'static str, String); 1];
/// A model endpoint and where a call was sent to the fallback.
type ShortCircuitLabels = [(&'static str, String); 2];

/// A call socket's counters, handed to the code that reads or writes it.
#[derive(Clone, Debug, Default)]
pub struct SocketCounters {
    /// WebSocket messages read.
    pub messages_in: Counter,
    /// WebSocket messages written.
    pub messages_out: Counter,
    /// Flushes that wrote one or more messages (about one `write` system call each).
    pub writes: Counter,
}

/// All relay metrics; cheap to clone.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

struct Inner {
    registry: Registry,
    active_calls: Gauge,
    calls_total: Family<Labels, Counter>,
    frames_c2m: Counter,
    frames_m2c: Counter,
    twilio_socket: SocketCounters,
    model_socket: SocketCounters,
    dropped_c2m: Counter,
    dropped_m2c: Counter,
    barge_ins: Counter,
    model_errors: Counter,
    bad_twilio: Counter,
    bad_realtime: Counter,
    event_queue_depth: Gauge,
    events_overflow: Counter,
    time_to_first_audio: Histogram,
    control_reconnects: Counter,
    draining: Gauge,
    handoff_withheld: Gauge,
    model_reconnects: Counter,
    model_rollovers: Counter,
    handoffs: Counter,
    gap_dropped: Counter,
    listeners: crate::listen::ListenerMetrics,
    stream_refusals: Family<Labels, Counter>,
    signature_refusals: Family<[(&'static str, &'static str); 2], Counter>,
    rate_dropped: Counter,
    model_breaker_open: Family<EndpointLabels, Gauge>,
    model_breaker_opened: Family<EndpointLabels, Counter>,
    model_breaker_short_circuits: Family<ShortCircuitLabels, Counter>,
    rate_limit_requests: RateLimitGauges,
    rate_limit_tokens: RateLimitGauges,
    runtime_tasks: Gauge,
}

/// One model rate limit's latest (remaining, limit).
struct RateLimitGauges {
    remaining: Gauge,
    limit: Gauge,
}

fn resolve(family: &Family<Labels, Counter>, label: (&'static str, &'static str)) -> Counter {
    let guard = family.get_or_create(&[label]);
    guard.clone()
}

fn resolve2(
    family: &Family<[(&'static str, &'static str); 2], Counter>,
    labels: [(&'static str, &'static str); 2],
) -> Counter {
    let guard = family.get_or_create(&labels);
    guard.clone()
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// Registers every metric under the `callbridge_relay_` prefix.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("callbridge_relay");
        let active_calls = Gauge::default();
        registry.register(
            "active_calls",
            "Calls being carried now",
            active_calls.clone(),
        );
        let calls_total = Family::<Labels, Counter>::default();
        registry.register(
            "calls",
            "Calls ended, by how they ended (error::EndKind::label)",
            calls_total.clone(),
        );
        let frames = Family::<Labels, Counter>::default();
        registry.register(
            "frames",
            "Audio frames relayed, by direction",
            frames.clone(),
        );
        let ws_messages = Family::<[(&'static str, &'static str); 2], Counter>::default();
        registry.register(
            "ws_messages",
            "WebSocket messages of calls, by socket (twilio, model) and direction (in, out)",
            ws_messages.clone(),
        );
        let ws_writes = Family::<Labels, Counter>::default();
        registry.register(
            "ws_writes",
            "Flushes of a call socket that wrote one or more messages (about one write system call each), by socket",
            ws_writes.clone(),
        );
        // One statement per `get_or_create` (see below).
        let socket = |name: &'static str| {
            let messages_in = resolve2(&ws_messages, [("socket", name), ("direction", "in")]);
            let messages_out = resolve2(&ws_messages, [("socket", name), ("direction", "out")]);
            let writes = resolve(&ws_writes, ("socket", name));
            SocketCounters {
                messages_in,
                messages_out,
                writes,
            }
        };
        let twilio_socket = socket("twilio");
        let model_socket = socket("model");
        let dropped = Family::<Labels, Counter>::default();
        registry.register(
            "frames_dropped",
            "Audio frames dropped because the writer was behind, by direction",
            dropped.clone(),
        );
        let barge_ins = Counter::default();
        registry.register(
            "barge_ins",
            "Caller interruptions of the assistant",
            barge_ins.clone(),
        );
        let model_errors = Counter::default();
        registry.register(
            "model_errors",
            "Error events from the model",
            model_errors.clone(),
        );
        let bad = Family::<Labels, Counter>::default();
        registry.register(
            "bad_messages",
            "Malformed, unexpected or oversized messages, by side",
            bad.clone(),
        );
        let event_queue_depth = Gauge::default();
        registry.register(
            "event_queue_depth",
            "Events waiting for control's acknowledgement, summed over calls",
            event_queue_depth.clone(),
        );
        let events_overflow = Counter::default();
        registry.register(
            "events_overflow",
            "Events dropped because a call's unacknowledged buffer was full",
            events_overflow.clone(),
        );
        let time_to_first_audio = Histogram::new(exponential_buckets(0.05, 2.0, 10));
        registry.register(
            "time_to_first_audio_seconds",
            "From Twilio start to the first model audio sent to the caller",
            time_to_first_audio.clone(),
        );
        let control_reconnects = Counter::default();
        registry.register(
            "control_reconnects",
            "Attach stream reconnect attempts",
            control_reconnects.clone(),
        );
        let draining = Gauge::default();
        registry.register(
            "draining",
            "1 while the relay is draining",
            draining.clone(),
        );
        let handoff_withheld = Gauge::default();
        registry.register(
            "drain_handoff_withheld",
            "1 while the relay drains and control knows no other ready relay: live calls stay until they end or the grace ends",
            handoff_withheld.clone(),
        );
        let model_reconnects = Counter::default();
        registry.register(
            "model_reconnects",
            "Model sessions reopened after the socket closed, failed or stalled mid-call",
            model_reconnects.clone(),
        );
        let model_rollovers = Counter::default();
        registry.register(
            "model_rollovers",
            "Model sessions replaced before their time limit",
            model_rollovers.clone(),
        );
        let handoffs = Counter::default();
        registry.register(
            "handoffs",
            "Calls handed off to another relay while draining",
            handoffs.clone(),
        );
        let gap_dropped = Counter::default();
        registry.register(
            "model_gap_dropped_frames",
            "Caller frames dropped while the model was reconnecting (beyond the gap buffer)",
            gap_dropped.clone(),
        );
        let stream_refusals = Family::<Labels, Counter>::default();
        registry.register(
            "stream_refusals",
            "Media streams refused at start, by reason (stream_admission::Refusal::label)",
            stream_refusals.clone(),
        );
        let signature_refusals = Family::default();
        registry.register(
            "signature_refusals",
            "Twilio requests refused for their X-Twilio-Signature, by route and reason (missing, invalid)",
            signature_refusals.clone(),
        );
        let media_dropped = Family::<Labels, Counter>::default();
        registry.register(
            "media_frames_dropped",
            "Caller media frames dropped on arrival, by reason (rate: faster than real time)",
            media_dropped.clone(),
        );
        let model_breaker_open = Family::<EndpointLabels, Gauge>::default();
        registry.register(
            "model_breaker_open",
            "1 while the model endpoint's circuit breaker is open (new calls get the fallback at once)",
            model_breaker_open.clone(),
        );
        let model_breaker_opened = Family::<EndpointLabels, Counter>::default();
        registry.register(
            "model_breaker_opened",
            "Times the model endpoint's circuit breaker opened",
            model_breaker_opened.clone(),
        );
        let model_breaker_short_circuits = Family::<ShortCircuitLabels, Counter>::default();
        registry.register(
            "model_breaker_short_circuits",
            "New calls sent to the fallback without dialling because the breaker was open, by where (webhook, stream)",
            model_breaker_short_circuits.clone(),
        );

        let rate_limit_remaining = Family::<Labels, Gauge>::default();
        registry.register(
            "model_rate_limit_remaining",
            "What the model's latest rate_limits.updated left of each limit (requests, tokens)",
            rate_limit_remaining.clone(),
        );
        let rate_limit = Family::<Labels, Gauge>::default();
        registry.register(
            "model_rate_limit",
            "Each model rate limit (requests, tokens) as its latest rate_limits.updated stated it",
            rate_limit.clone(),
        );
        let gauges = |name: &'static str| RateLimitGauges {
            remaining: rate_limit_remaining
                .get_or_create(&[("limit", name)])
                .clone(),
            limit: rate_limit.get_or_create(&[("limit", name)]).clone(),
        };
        let rate_limit_requests = gauges("requests");
        let rate_limit_tokens = gauges("tokens");
        let runtime_tasks = Gauge::default();
        registry.register(
            "runtime_tasks",
            "Tasks alive in the relay's async runtime, read at each scrape (back to its idle level once calls are gone: a leak shows as growth)",
            runtime_tasks.clone(),
        );

        let listeners = crate::listen::ListenerMetrics::register(&mut registry);

        // One statement each: `get_or_create` returns a read guard, and a second call on the
        // same family while it is alive would wait for the write lock forever.
        let frames_c2m = resolve(&frames, ("direction", "caller_to_model"));
        let frames_m2c = resolve(&frames, ("direction", "model_to_caller"));
        let dropped_c2m = resolve(&dropped, ("direction", "caller_to_model"));
        let dropped_m2c = resolve(&dropped, ("direction", "model_to_caller"));
        let bad_twilio = resolve(&bad, ("side", "twilio"));
        let bad_realtime = resolve(&bad, ("side", "realtime"));
        let rate_dropped = resolve(&media_dropped, ("reason", "rate"));
        let inner = Inner {
            frames_c2m,
            frames_m2c,
            twilio_socket,
            model_socket,
            dropped_c2m,
            dropped_m2c,
            bad_twilio,
            bad_realtime,
            registry,
            active_calls,
            calls_total,
            barge_ins,
            model_errors,
            event_queue_depth,
            events_overflow,
            time_to_first_audio,
            control_reconnects,
            draining,
            handoff_withheld,
            model_reconnects,
            model_rollovers,
            handoffs,
            gap_dropped,
            listeners,
            stream_refusals,
            signature_refusals,
            rate_dropped,
            model_breaker_open,
            model_breaker_opened,
            model_breaker_short_circuits,
            rate_limit_requests,
            rate_limit_tokens,
            runtime_tasks,
        };
        Self {
            inner: Arc::new(inner),
        }
    }

    /// Prometheus text exposition.
    pub fn encode(&self) -> String {
        // Read here rather than kept up to date: a spawn or exit must not cost a write.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let alive = rt.metrics().num_alive_tasks();
            self.inner
                .runtime_tasks
                .set(i64::try_from(alive).unwrap_or(i64::MAX));
        }
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.inner.registry);
        out
    }

    /// Active calls gauge.
    pub fn active_calls(&self) -> &Gauge {
        &self.inner.active_calls
    }
    /// Counts an ended call by how it ended ([`crate::error::EndKind::label`]).
    pub fn call_ended(&self, reason: &'static str) {
        let counter = resolve(&self.inner.calls_total, ("reason", reason));
        counter.inc();
    }
    /// The Twilio socket's counters.
    pub fn twilio_socket(&self) -> &SocketCounters {
        &self.inner.twilio_socket
    }
    /// The model socket's counters.
    pub fn model_socket(&self) -> &SocketCounters {
        &self.inner.model_socket
    }
    /// Caller→model frames.
    pub fn frames_c2m(&self) -> &Counter {
        &self.inner.frames_c2m
    }
    /// Model→caller frames.
    pub fn frames_m2c(&self) -> &Counter {
        &self.inner.frames_m2c
    }
    /// Dropped caller→model frames.
    pub fn dropped_c2m(&self) -> &Counter {
        &self.inner.dropped_c2m
    }
    /// Dropped model→caller frames.
    pub fn dropped_m2c(&self) -> &Counter {
        &self.inner.dropped_m2c
    }
    /// Barge-ins.
    pub fn barge_ins(&self) -> &Counter {
        &self.inner.barge_ins
    }
    /// Model error events.
    pub fn model_errors(&self) -> &Counter {
        &self.inner.model_errors
    }
    /// The model's latest word on a rate limit (`requests` or `tokens`; others are not
    /// exported).
    pub fn model_rate_limit(&self, name: &str, remaining: u64, limit: u64) {
        let gauges = match name {
            "requests" => &self.inner.rate_limit_requests,
            "tokens" => &self.inner.rate_limit_tokens,
            _ => return,
        };
        gauges
            .remaining
            .set(i64::try_from(remaining).unwrap_or(i64::MAX));
        gauges.limit.set(i64::try_from(limit).unwrap_or(i64::MAX));
    }
    /// Bad messages from Twilio.
    pub fn bad_twilio(&self) -> &Counter {
        &self.inner.bad_twilio
    }
    /// Bad messages from the model.
    pub fn bad_realtime(&self) -> &Counter {
        &self.inner.bad_realtime
    }
    /// Unacked events over all calls.
    pub fn event_queue_depth(&self) -> &Gauge {
        &self.inner.event_queue_depth
    }
    /// Events dropped on a full buffer.
    pub fn events_overflow(&self) -> &Counter {
        &self.inner.events_overflow
    }
    /// Time to first audio histogram.
    pub fn time_to_first_audio(&self) -> &Histogram {
        &self.inner.time_to_first_audio
    }
    /// Attach reconnect attempts.
    pub fn control_reconnects(&self) -> &Counter {
        &self.inner.control_reconnects
    }

    /// Model reconnects.
    pub fn model_reconnects(&self) -> &Counter {
        &self.inner.model_reconnects
    }

    /// Model session rollovers.
    pub fn model_rollovers(&self) -> &Counter {
        &self.inner.model_rollovers
    }

    /// 1 while draining with no other ready relay (calls kept).
    pub fn drain_handoff_withheld(&self) -> &Gauge {
        &self.inner.handoff_withheld
    }

    /// Calls handed off while draining.
    pub fn handoffs(&self) -> &Counter {
        &self.inner.handoffs
    }

    /// Caller frames dropped during a model reconnect.
    pub fn gap_dropped(&self) -> &Counter {
        &self.inner.gap_dropped
    }

    /// Counts a media stream refused at `start`.
    pub fn stream_refused(&self, reason: &'static str) {
        let counter = resolve(&self.inner.stream_refusals, ("reason", reason));
        counter.inc();
    }

    /// Counts a Twilio request refused for its signature on `route` (`missing`, `invalid`).
    pub fn signature_refused(&self, route: &'static str, reason: &'static str) {
        self.inner
            .signature_refusals
            .get_or_create(&[("route", route), ("reason", reason)])
            .inc();
    }

    /// Caller frames dropped for arriving faster than real time.
    pub fn rate_dropped(&self) -> &Counter {
        &self.inner.rate_dropped
    }

    /// The breaker gauge of a model endpoint (created at 0).
    pub fn model_breaker_open(&self, endpoint: &str) -> Gauge {
        let gauge = self
            .inner
            .model_breaker_open
            .get_or_create(&[("endpoint", endpoint.to_owned())]);
        gauge.clone()
    }

    /// The count of a model endpoint's breaker openings (created at 0).
    pub fn model_breaker_opened(&self, endpoint: &str) -> Counter {
        let counter = self
            .inner
            .model_breaker_opened
            .get_or_create(&[("endpoint", endpoint.to_owned())]);
        counter.clone()
    }

    /// The count of new calls sent to the fallback at `at` because the endpoint's breaker
    /// was open (created at 0).
    pub fn model_breaker_short_circuits(&self, endpoint: &str, at: &'static str) -> Counter {
        let counter = self
            .inner
            .model_breaker_short_circuits
            .get_or_create(&[("endpoint", endpoint.to_owned()), ("at", at.to_owned())]);
        counter.clone()
    }

    /// Draining gauge.
    pub fn draining(&self) -> &Gauge {
        &self.inner.draining
    }

    /// The public listener's and `RELAY_MAX_CALLS`'s metrics.
    pub fn listeners(&self) -> &crate::listen::ListenerMetrics {
        &self.inner.listeners
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_names_every_metric() {
        let m = Metrics::new();
        m.frames_c2m().inc();
        m.twilio_socket().messages_in.inc();
        m.call_ended("caller_hangup");
        m.time_to_first_audio().observe(0.2);
        m.stream_refused("credential_used");
        m.model_breaker_open("ws://model/v1/realtime").set(1);
        m.model_breaker_opened("ws://model/v1/realtime").inc();
        m.model_breaker_short_circuits("ws://model/v1/realtime", "webhook")
            .inc();
        m.model_rate_limit("tokens", 39_000, 40_000);
        m.model_rate_limit("bogus", 1, 2);
        let text = m.encode();
        for name in [
            "callbridge_relay_active_calls",
            "callbridge_relay_calls_total{reason=\"caller_hangup\"} 1",
            "callbridge_relay_frames_total{direction=\"caller_to_model\"} 1",
            "callbridge_relay_frames_total{direction=\"model_to_caller\"} 0",
            "callbridge_relay_frames_dropped_total{direction=\"caller_to_model\"}",
            "callbridge_relay_barge_ins_total",
            "callbridge_relay_model_errors_total",
            "callbridge_relay_bad_messages_total{side=\"twilio\"}",
            "callbridge_relay_bad_messages_total{side=\"realtime\"}",
            "callbridge_relay_event_queue_depth",
            "callbridge_relay_runtime_tasks",
            "callbridge_relay_time_to_first_audio_seconds_count 1",
            "callbridge_relay_control_reconnects_total",
            "callbridge_relay_draining",
            "callbridge_relay_http_connections",
            "callbridge_relay_http_header_timeouts_total",
            "callbridge_relay_http_accept_paused_total",
            "callbridge_relay_over_capacity_total{kind=\"webhook\"}",
            "callbridge_relay_over_capacity_total{kind=\"stream\"}",
            "callbridge_relay_max_calls",
            "callbridge_relay_stream_refusals_total{reason=\"credential_used\"} 1",
            "callbridge_relay_media_frames_dropped_total{reason=\"rate\"} 0",
            "callbridge_relay_ws_messages_total{socket=\"twilio\",direction=\"in\"} 1",
            "callbridge_relay_ws_messages_total{socket=\"model\",direction=\"out\"} 0",
            "callbridge_relay_ws_writes_total{socket=\"model\"} 0",
            "callbridge_relay_model_breaker_open{endpoint=\"ws://model/v1/realtime\"} 1",
            "callbridge_relay_model_breaker_opened_total{endpoint=\"ws://model/v1/realtime\"} 1",
            "callbridge_relay_model_breaker_short_circuits_total{endpoint=\"ws://model/v1/realtime\",at=\"webhook\"} 1",
            "callbridge_relay_model_rate_limit_remaining{limit=\"tokens\"} 39000",
            "callbridge_relay_model_rate_limit{limit=\"tokens\"} 40000",
            "callbridge_relay_model_rate_limit_remaining{limit=\"requests\"} 0",
        ] {
            assert!(text.contains(name), "missing {name} in\n{text}");
        }
        assert!(!text.contains("bogus"), "label values stay bounded");
    }
}

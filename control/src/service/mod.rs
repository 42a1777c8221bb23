//! gRPC services: they translate proto ⇄ domain and nothing else. Shared state of a
//! replica lives in [`Shared`].

pub(crate) mod agents;
pub(crate) mod calls_api;
pub(crate) mod campaigns_api;
pub(crate) mod relay;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use callbridge_proto::pb;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::{Response, Status};
use tracing::Instrument;

use crate::config::Config;
use crate::domain::call::{event_effects, now_ms};
use crate::domain::ids::{AgentId, CallId, CampaignId, LeaseHolder};
use crate::domain::record::CallRecord;
use crate::error::Error;
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::store::{AppendOutcome, CallStore};

/// Everything one replica's RPCs share. Cheap handles only.
pub(crate) struct Shared<S> {
    pub(crate) store: S,
    pub(crate) hub: Arc<Hub>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) config: Arc<Config>,
    /// Cancelled when the replica shuts down; every stream task selects on it.
    pub(crate) shutdown: CancellationToken,
    /// Every stream task, so shutdown can wait for them (bounded).
    pub(crate) tracker: TaskTracker,
    /// When this replica last saw the store fail (ms; start time initially). Leases
    /// could not be renewed during an outage, so the sweeper waits one full lease after
    /// it before ending anything, giving live streams time to renew.
    store_failed_at_ms: AtomicI64,
    /// Twilio's REST API, when an account is configured (calls control dials).
    pub(crate) twilio: Option<crate::twilio_rest::TwilioRest>,
    /// Open watch streams per application token (`CONTROL_WATCH_STREAMS_PER_TOKEN`).
    pub(crate) watch_slots: Arc<crate::grpc_limits::WatchSlots>,
}

impl<S> Shared<S> {
    /// Bundles the replica's handles.
    pub(crate) fn new(
        store: S,
        hub: Arc<Hub>,
        metrics: Arc<Metrics>,
        config: Arc<Config>,
        shutdown: CancellationToken,
        tracker: TaskTracker,
    ) -> Self {
        let twilio = config.twilio.clone().and_then(|twilio| {
            crate::twilio_rest::TwilioRest::new(twilio)
                .map_err(|err| tracing::error!(error = %err, "Twilio REST client unusable; dialling is off."))
                .ok()
        });
        let watch_slots =
            crate::grpc_limits::WatchSlots::new(config.limits.watch_streams_per_token);
        Shared {
            watch_slots,
            twilio,
            store,
            hub,
            metrics,
            config,
            shutdown,
            tracker,
            store_failed_at_ms: AtomicI64::new(now_ms()),
        }
    }

    /// Records a store failure (health probe, sweeper).
    pub(crate) fn note_store_failure(&self) {
        self.store_failed_at_ms.store(now_ms(), Ordering::Relaxed);
    }
}

impl<S: CallStore> Shared<S> {
    /// Runs one unary RPC in a span, counting its outcome.
    pub(crate) async fn rpc<T>(
        &self,
        service: &'static str,
        method: &'static str,
        call_id: &str,
        body: impl Future<Output = Result<T, Error>>,
    ) -> Result<Response<T>, Status> {
        let span = tracing::info_span!("rpc", service, method, call_id = %call_id);
        let result = body.instrument(span.clone()).await.map_err(Status::from);
        let code = result
            .as_ref()
            .map_or_else(Status::code, |_| tonic::Code::Ok);
        self.metrics.rpc(service, method, code);
        match &result {
            Err(status) if matches!(status.code(), tonic::Code::Internal | tonic::Code::Unavailable) => {
                span.in_scope(|| tracing::warn!(code = ?status.code(), message = status.message(), "RPC failed."));
            }
            Err(status) => span.in_scope(|| tracing::debug!(code = ?status.code(), message = status.message(), "RPC refused.")),
            Ok(_) => {}
        }
        result.map(Response::new)
    }

    /// A call that must exist.
    pub(crate) async fn call(&self, call_id: &CallId) -> Result<CallRecord, Error> {
        self.store
            .get_call(call_id)
            .await?
            .ok_or_else(|| Error::CallNotFound(call_id.to_string()))
    }

    /// An agent that must exist.
    pub(crate) async fn agent(&self, agent_id: &AgentId) -> Result<pb::Agent, Error> {
        self.store
            .get_agent(agent_id)
            .await?
            .ok_or_else(|| Error::AgentNotFound(agent_id.to_string()))
    }

    /// Stores one event of `call` (once) and tells watchers.
    pub(crate) async fn record_event(
        &self,
        call: &CallRecord,
        event: &pb::CallEvent,
        require_lease_expired_before: Option<i64>,
    ) -> Result<AppendOutcome, Error> {
        let (outcomes, refused) = self
            .record_events(
                &call.call_id,
                call.campaign_id.as_ref(),
                std::slice::from_ref(event),
                require_lease_expired_before,
                None,
            )
            .await;
        match refused {
            Some(err) => Err(err),
            None => Ok(outcomes.first().copied().unwrap_or(AppendOutcome::NotFound)),
        }
    }

    /// Stores a run of one call's events in order, each once, in one store round trip,
    /// and tells watchers about the stored ones.
    ///
    /// Returns the outcome of every event handled, in order, and why handling stopped
    /// early, if it did: an invalid event (the events before it are still stored), a
    /// gap, an unknown call or a store failure. The events with a `Stored` or
    /// `Duplicate` outcome may be acknowledged.
    pub(crate) async fn record_events(
        &self,
        call_id: &CallId,
        campaign_id: Option<&CampaignId>,
        events: &[pb::CallEvent],
        require_lease_expired_before: Option<i64>,
        holder: Option<&LeaseHolder>,
    ) -> (Vec<AppendOutcome>, Option<Error>) {
        let mut effects = Vec::with_capacity(events.len());
        let mut invalid = None;
        for event in events {
            if event.seq == 0 {
                invalid = Some(Error::invalid("event.seq", "starts at 1"));
                break;
            }
            match event_effects(event) {
                Ok(mut e) => {
                    e.require_lease_expired_before = require_lease_expired_before;
                    e.require_holder = holder.cloned();
                    effects.push(e);
                }
                Err(err) => {
                    invalid = Some(err);
                    break;
                }
            }
        }
        let valid = &events[..effects.len()];
        if valid.is_empty() {
            return (Vec::new(), invalid);
        }
        let outcomes = match self
            .store
            .append_events(call_id, campaign_id, valid, &effects)
            .await
        {
            Ok(outcomes) => outcomes,
            Err(err) => return (Vec::new(), Some(err.into())),
        };
        let (mut stored, mut duplicate) = (0u64, 0u64);
        for outcome in &outcomes {
            match outcome {
                AppendOutcome::Stored => stored += 1,
                AppendOutcome::Duplicate => duplicate += 1,
                _ => {}
            }
        }
        self.metrics.events_stored.inc_by(stored);
        self.metrics.events_duplicate.inc_by(duplicate);
        let refused = match outcomes.last() {
            Some(AppendOutcome::Gap { last_seq }) => {
                let seq = valid[outcomes.len() - 1].seq;
                Some(Error::EventGap {
                    seq,
                    last_seq: *last_seq,
                })
            }
            Some(AppendOutcome::NotFound) => Some(Error::CallNotFound(call_id.to_string())),
            // Every valid event was handled: what stopped the run, if anything, is an
            // invalid event after them.
            _ if outcomes.len() == valid.len() => invalid,
            _ => None,
        };
        (outcomes, refused)
    }

    /// Ends calls whose attach stream vanished and whose lease ran out (`RELAY_LOST`).
    /// Atomic per call, so with many replicas sweeping each call ends once.
    pub(crate) async fn sweep_relay_lost(&self) -> Result<usize, Error> {
        let now = now_ms();
        let lease_ms = i64::try_from(self.config.lease.as_millis()).unwrap_or(i64::MAX);
        let expired = match self.store.expired_leases(now, 100).await {
            Ok(ids) => ids,
            Err(err) => {
                self.note_store_failure();
                return Err(err.into());
            }
        };
        if now.saturating_sub(self.store_failed_at_ms.load(Ordering::Relaxed)) < lease_ms {
            return Ok(0);
        }
        let mut ended = 0;
        for call_id in expired {
            let Some(call) = self.store.get_call(&call_id).await? else {
                self.store.forget_lease(&call_id).await?;
                continue;
            };
            if crate::domain::call::is_final(call.status) {
                self.store.forget_lease(&call_id).await?;
                continue;
            }
            if call.lease_until_ms >= now {
                continue; // renewed meanwhile; its index entry is refreshed too
            }
            let event = pb::CallEvent {
                call_id: call_id.to_string(),
                seq: call.last_seq + 1,
                at_ms: now,
                kind: Some(pb::call_event::Kind::Ended(pb::Ended {
                    reason: pb::EndReason::RelayLost as i32,
                    detail: format!("no attach stream for {} s", self.config.lease.as_secs()),
                    transfer_to: String::new(),
                })),
            };
            match self.record_event(&call, &event, Some(now)).await {
                Ok(AppendOutcome::Stored) => {
                    ended += 1;
                    self.metrics.relay_lost.inc();
                    tracing::info!(call_id = %call_id, "Call ended: relay lost.");
                }
                // Someone else (a relay event or another replica) got there first:
                // the call's lease was renewed or it ended (`ConditionFailed`), the
                // seq was taken (`Duplicate`), or events moved past it (a gap).
                Ok(_) | Err(Error::EventGap { .. }) => {}
                Err(err) => return Err(err),
            }
        }
        Ok(ended)
    }
}

/// Hex, so page tokens are opaque and printable.
pub(crate) fn encode_token(raw: &str) -> String {
    raw.bytes().map(|b| format!("{b:02x}")).collect()
}

/// The inverse of [`encode_token`]; `None` for anything malformed.
pub(crate) fn decode_token(token: &str) -> Option<String> {
    if !token.len().is_multiple_of(2) || token.len() > 512 {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..token.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(token.get(i..i + 2)?, 16).ok())
        .collect();
    String::from_utf8(bytes?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_tokens_round_trip_and_reject_garbage() {
        let t = encode_token("1700000000000:3");
        assert_eq!(decode_token(&t).as_deref(), Some("1700000000000:3"));
        assert_eq!(decode_token("zz"), None);
        assert_eq!(decode_token("abc"), None);
    }
}

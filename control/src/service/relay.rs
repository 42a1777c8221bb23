//! `callbridge.v1.Relay`: Admit, Attach and After for relay pods
//! (behaviour fixed in docs/contract-notes.md).

use std::sync::Arc;
use std::time::Duration;

use callbridge_proto::pb;
use futures_util::FutureExt;
use pb::relay_server::Relay;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use super::Shared;
use super::calls_api::read_all_events;
use crate::domain::call::{
    self as rules, AfterAsk, StreamOrigin, call_to_pb, is_final_event, now_ms,
};
use crate::domain::ids::{CallId, CallSid, LeaseHolder, RelayId, StreamCredentialId};
use crate::domain::record::CallRecord;
use crate::error::Error;
use crate::heartbeat::{self, Liveness};
use crate::store::{AdmitOutcome, AppendOutcome, AttachChecks, AttachOutcome, CallStore};

/// The `Relay` service.
pub(crate) struct RelayApi<S>(pub(crate) Arc<Shared<S>>);

const SERVICE: &str = "Relay";
/// How long a relay may take to send `open` after starting the stream.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);
/// Buffered responses (acks, commands) per attach stream.
const ATTACH_BUFFER: usize = 64;
/// Most events read from one stream per store round trip. Bounds the script's run
/// time in Redis and the memory one stream holds; 64 unacknowledged events (the bench's
/// relay window) fit in one run.
const MAX_BATCH: usize = 256;
/// Buffered commands per attached call on this replica.
const COMMAND_BUFFER: usize = 32;

type AttachTx = mpsc::Sender<Result<pb::AttachResponse, Status>>;

/// The checks a stream's first attach asks for (`AttachOpen` fields 4–6), validated: a
/// credential id is 32 lowercase hex digits with an expiry; a CallSid is compared as sent,
/// so only its size and alphabet are checked.
/// Which stream an action request speaks for (`AfterRequest.stream_id`/`after_stream_id`).
fn after_ask(req: &pb::AfterRequest) -> Result<AfterAsk, Error> {
    let after =
        StreamCredentialId::parse_optional("after_stream_id", req.after_stream_id.as_str())?;
    match StreamCredentialId::parse_optional("stream_id", req.stream_id.as_str())? {
        Some(stream) => Ok(AfterAsk::Stream { stream, after }),
        None if after.is_some() => Err(Error::invalid("after_stream_id", "only with stream_id")),
        None => Ok(AfterAsk::Unnamed),
    }
}

fn attach_checks(open: &pb::AttachOpen) -> Result<AttachChecks, Error> {
    let credential = match StreamCredentialId::parse_optional(
        "open.stream_credential_id",
        open.stream_credential_id.as_str(),
    )? {
        None => None,
        Some(id) => {
            if open.stream_credential_expires_at_ms <= 0 {
                return Err(Error::invalid(
                    "open.stream_credential_expires_at_ms",
                    "required with open.stream_credential_id",
                ));
            }
            Some((id, open.stream_credential_expires_at_ms))
        }
    };
    let takes_over = StreamCredentialId::parse_optional(
        "open.takes_over_stream_id",
        open.takes_over_stream_id.as_str(),
    )?;
    let origin = match pb::StreamOrigin::try_from(open.stream_origin) {
        Ok(pb::StreamOrigin::Unspecified) => StreamOrigin::Unspecified,
        Ok(pb::StreamOrigin::First) => StreamOrigin::First,
        Ok(pb::StreamOrigin::Resume) => StreamOrigin::Resume { takes_over },
        Err(_) => return Err(Error::invalid("open.stream_origin", "unknown value")),
    };
    if origin != StreamOrigin::Unspecified && (credential.is_none() || open.reconnect) {
        return Err(Error::invalid(
            "open.stream_origin",
            "only a stream's first attach, with its credential, has an origin",
        ));
    }
    if !open.takes_over_stream_id.is_empty() && !matches!(origin, StreamOrigin::Resume { .. }) {
        return Err(Error::invalid(
            "open.takes_over_stream_id",
            "only with stream_origin RESUME",
        ));
    }
    let sid = open.twilio_call_sid.as_str();
    if sid.len() > 64 || !sid.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err(Error::invalid(
            "open.twilio_call_sid",
            "at most 64 letters and digits",
        ));
    }
    let attempt = StreamCredentialId::parse_optional(
        "open.attach_attempt_id",
        open.attach_attempt_id.as_str(),
    )?;
    Ok(AttachChecks {
        credential,
        origin,
        attempt,
        twilio_call_sid: (!sid.is_empty()).then(|| sid.to_owned()),
    })
}

fn lease_ms<S>(shared: &Shared<S>) -> i64 {
    i64::try_from(shared.config.lease.as_millis()).unwrap_or(i64::MAX)
}

/// Everything one attach stream task owns.
struct AttachStream<S> {
    shared: Arc<Shared<S>>,
    call: CallRecord,
    holder: LeaseHolder,
    inbound: Streaming<pb::AttachRequest>,
    commands: mpsc::Receiver<pb::Command>,
    tx: AttachTx,
    /// Reused buffer of the events read in one wake-up.
    batch: Vec<pb::CallEvent>,
    /// Set when the relay sends heartbeats: when the stream last showed life.
    liveness: Option<Liveness>,
}

/// Why reading a run of inbound messages stopped before the bound.
enum Stop {
    /// The relay closed its half, or the stream broke.
    Closed,
    /// The message is refused with this status.
    Refused(Status),
}

/// Why an attach stream task stopped.
#[derive(Debug)]
enum StreamEnd {
    /// The call's final event was stored; the lease goes with the call.
    CallEnded,
    /// The relay closed or vanished, or the stream was refused mid-way: release the lease.
    Released,
}

impl<S: CallStore> AttachStream<S> {
    async fn run(mut self) {
        let call_id = self.call.call_id.clone();
        let end = self.pump().await;
        self.shared.hub.unregister(&call_id, &self.holder);
        self.shared.metrics.attached_calls.dec();
        if let StreamEnd::Released = end {
            let result = self
                .shared
                .store
                .release_lease(&call_id, &self.holder, now_ms(), lease_ms(&self.shared))
                .await;
            if let Err(err) = result {
                // The lease then simply runs out; same outcome, a little later.
                tracing::debug!(error = %err, "Lease not released.");
            }
        }
        tracing::info!(?end, "Attach stream closed.");
    }

    fn heard(&mut self) {
        if let Some(live) = &mut self.liveness {
            live.heard(tokio::time::Instant::now());
        }
    }

    /// How long the relay has been silent, when that is the whole heartbeat timeout.
    fn overdue(&self) -> Option<Duration> {
        let now = tokio::time::Instant::now();
        self.liveness
            .filter(|live| live.overdue(now))
            .map(|live| live.silent_for(now))
    }

    async fn send(&self, msg: pb::attach_response::Msg) -> bool {
        self.tx
            .send(Ok(pb::AttachResponse { msg: Some(msg) }))
            .await
            .is_ok()
    }

    async fn fail(&self, status: Status) {
        let _ = self.tx.send(Err(status)).await;
    }

    /// The event in one inbound message, stamped; or why the stream stops there.
    fn event_of(
        &self,
        message: Result<Option<pb::AttachRequest>, Status>,
    ) -> Result<Option<pb::CallEvent>, Stop> {
        let request = match message {
            Ok(Some(request)) => request,
            Ok(None) => return Err(Stop::Closed),
            Err(status) => {
                tracing::debug!(code = ?status.code(), "Relay stream broke.");
                return Err(Stop::Closed);
            }
        };
        match request.msg {
            Some(pb::attach_request::Msg::Event(mut event)) => {
                if event.call_id.is_empty() {
                    event.call_id = self.call.call_id.to_string();
                }
                // Stored events always carry a time (transcripts order by it).
                if event.at_ms <= 0 {
                    event.at_ms = now_ms();
                }
                if self.call.call_id != event.call_id.as_str() {
                    return Err(Stop::Refused(
                        Error::invalid(
                            "event.call_id",
                            format!(
                                "'{}' is not the attached call '{}'",
                                event.call_id, self.call.call_id
                            ),
                        )
                        .into(),
                    ));
                }
                Ok(Some(event))
            }
            // A sign of life only: the caller notes the time.
            Some(pb::attach_request::Msg::Heartbeat(_)) => Ok(None),
            Some(pb::attach_request::Msg::Open(_)) => Err(Stop::Refused(
                Error::invalid("open", "sent twice on one stream").into(),
            )),
            None => Err(Stop::Refused(
                Error::invalid("msg", "empty attach message").into(),
            )),
        }
    }

    /// Stores a run of events and acknowledges the highest one handled; `Err` ends the
    /// stream (refused event, store failure, or the relay no longer reading).
    async fn store_batch(
        &self,
        batch: &[pb::CallEvent],
        ended: &mut bool,
    ) -> Result<(), StreamEnd> {
        if batch.is_empty() {
            return Ok(());
        }
        let (outcomes, refused) = self
            .shared
            .record_events(
                &self.call.call_id,
                self.call.campaign_id.as_ref(),
                batch,
                None,
                Some(&self.holder),
            )
            .await;
        if outcomes.contains(&AppendOutcome::ConditionFailed) {
            // Another stream took the call over: this one is fenced off. Its events from
            // the taken-over point on are not stored (the new stream goes on from the
            // last stored seq) and not acknowledged.
            tracing::info!("Call taken over by another stream; events refused.");
            self.fail(Error::LeaseLost.into()).await;
            return Err(StreamEnd::Released);
        }
        let mut acked = None;
        for (event, outcome) in batch.iter().zip(&outcomes) {
            if matches!(outcome, AppendOutcome::Stored | AppendOutcome::Duplicate) {
                *ended |= is_final_event(event);
                // `acked_seq = N` covers every seq ≤ N, so one ack covers the run.
                acked = Some(acked.map_or(event.seq, |a: u64| a.max(event.seq)));
            }
        }
        let end = if *ended {
            StreamEnd::CallEnded
        } else {
            StreamEnd::Released
        };
        if let Some(seq) = acked
            && !self.send(pb::attach_response::Msg::AckedSeq(seq)).await
        {
            return Err(end);
        }
        if let Some(err) = refused {
            // The refused event: the last one handled (a gap), or the next (invalid).
            let at = match outcomes.last() {
                None | Some(AppendOutcome::Stored | AppendOutcome::Duplicate) => outcomes.len(),
                Some(_) => outcomes.len() - 1,
            };
            let seq = batch.get(at).map(|e| e.seq);
            // The message may quote what the relay sent (a number, free text): debug only.
            tracing::info!(?seq, "Event refused; stream ends.");
            tracing::debug!(error = %err, ?seq, "Refused event.");
            self.fail(err.into()).await;
            return Err(end);
        }
        if outcomes.len() < batch.len() {
            self.fail(Error::UnexpectedStoreOutcome(format!("{:?}", outcomes.last())).into())
                .await;
            return Err(StreamEnd::Released);
        }
        Ok(())
    }

    async fn pump(&mut self) -> StreamEnd {
        let lease = self.shared.config.lease;
        // Renewed every third of the lease, so two renewals may fail before it lapses.
        let mut renew = tokio::time::interval(lease / 3);
        renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        renew.tick().await;
        // Checked every heartbeat interval: a silent relay's lease is released between
        // one timeout and one timeout plus an interval after its last message.
        let mut watch =
            tokio::time::interval(heartbeat::interval(self.shared.config.heartbeat_timeout));
        watch.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        watch.tick().await;
        let mut ended = false;
        loop {
            tokio::select! {
                // Replica shutting down: the relay re-attaches (reconnect) elsewhere.
                () = self.shared.shutdown.cancelled() => {
                    self.fail(Error::ShuttingDown { then: "; reconnect" }.into()).await;
                    return if ended { StreamEnd::CallEnded } else { StreamEnd::Released };
                }
                // Up: events from the relay, with every event already waiting behind
                // this one (up to a bound), stored in one round trip and acknowledged once.
                message = self.inbound.message() => {
                    self.heard();
                    let mut batch = std::mem::take(&mut self.batch);
                    let mut stop = None;
                    let mut next = Some(message);
                    loop {
                        let message = match next.take() {
                            Some(message) => message,
                            None if batch.len() >= MAX_BATCH => break,
                            None => match self.inbound.message().now_or_never() {
                                Some(message) => message,
                                None => break,
                            },
                        };
                        match self.event_of(message) {
                            Ok(Some(event)) => batch.push(event),
                            Ok(None) => {}
                            Err(s) => {
                                stop = Some(s);
                                break;
                            }
                        }
                    }
                    let stored = self.store_batch(&batch, &mut ended).await;
                    // Control was not listening while it stored: not the relay's silence.
                    self.heard();
                    batch.clear();
                    self.batch = batch;
                    if let Err(end) = stored {
                        return end;
                    }
                    match stop {
                        None => {}
                        // The relay closed its half (after `ended`, or giving up), or vanished.
                        Some(Stop::Closed) => return if ended { StreamEnd::CallEnded } else { StreamEnd::Released },
                        Some(Stop::Refused(status)) => {
                            self.fail(status).await;
                            return StreamEnd::Released;
                        }
                    }
                }
                // Down: commands routed to this replica for the call.
                Some(command) = self.commands.recv() => {
                    self.shared.metrics.commands_routed.inc();
                    if !self.send(pb::attach_response::Msg::Command(command)).await {
                        return StreamEnd::Released;
                    }
                }
                // A relay that stopped talking (node lost, process frozen) without its
                // stream breaking: released as if the stream had broken.
                _ = watch.tick(), if self.liveness.is_some() && !ended => {
                    if let Some(silent) = self.overdue() {
                        self.shared.metrics.heartbeat_timeouts.inc();
                        tracing::warn!(silent_ms = u64::try_from(silent.as_millis()).unwrap_or(u64::MAX), "Relay silent for the heartbeat timeout; lease released.");
                        // try_send: a silent relay is not reading either, and its buffer
                        // may be full; the release must not wait on it.
                        let timeout = self.shared.config.heartbeat_timeout;
                        let _ = self.tx.try_send(Err(Error::HeartbeatTimeout(timeout).into()));
                        return StreamEnd::Released;
                    }
                }
                // Keep the lease while the stream lives.
                _ = renew.tick(), if !ended => {
                    match self.shared.store.renew_lease(&self.call.call_id, &self.holder, now_ms(), lease_ms(&self.shared)).await {
                        Ok(true) => {}
                        Ok(false) => {
                            self.fail(Error::LeaseLost.into()).await;
                            return StreamEnd::Released;
                        }
                        // Redis outage: keep the call going; the next tick retries.
                        Err(err) => tracing::warn!(error = %err, "Lease renewal failed."),
                    }
                }
            }
        }
    }
}

#[tonic::async_trait]
impl<S: CallStore> Relay for RelayApi<S> {
    type AttachStream = ReceiverStream<Result<pb::AttachResponse, Status>>;

    async fn admit(
        &self,
        request: Request<pb::AdmitRequest>,
    ) -> Result<Response<pb::AdmitResponse>, Status> {
        let req = request.into_inner();
        let shared = &self.0;
        shared
            .rpc(SERVICE, "Admit", &req.call_id, async {
                let call_id = if req.call_id.is_empty() {
                    let sid = CallSid::parse("twilio_call_sid", req.twilio_call_sid.as_str())?;
                    let agent_id = match shared.store.get_route(&req.to).await? {
                        Some(agent) => agent,
                        None => shared
                            .store
                            .get_default_agent()
                            .await?
                            .ok_or_else(|| Error::NoAgentForNumber(req.to.clone()))?,
                    };
                    let call = CallRecord {
                        from: req.from.clone(),
                        to: req.to.clone(),
                        twilio_call_sid: Some(sid),
                        ..CallRecord::new(
                            CallId::generate(),
                            agent_id,
                            pb::Direction::Inbound,
                            pb::CallStatus::Ringing,
                            now_ms(),
                        )
                    };
                    shared.store.admit_inbound(&call).await?
                } else {
                    let sid =
                        CallSid::parse_optional("twilio_call_sid", req.twilio_call_sid.as_str())?;
                    let call_id = CallId::parse("call_id", req.call_id.as_str())?;
                    match shared
                        .store
                        .admit_existing(&call_id, sid.as_ref(), &req.from, &req.to)
                        .await?
                    {
                        AdmitOutcome::Admitted => call_id,
                        AdmitOutcome::NotFound => {
                            return Err(Error::CallNotFound(call_id.to_string()));
                        }
                        AdmitOutcome::Ended => return Err(Error::CallEnded(call_id.to_string())),
                    }
                };
                let call = shared.call(&call_id).await?;
                let agent = shared
                    .store
                    .get_agent(&call.agent_id)
                    .await?
                    .ok_or_else(|| Error::AgentDeleted {
                        call_id: call_id.to_string(),
                        agent_id: call.agent_id.to_string(),
                    })?;
                tracing::info!(call_id = %call_id, agent_id = %call.agent_id, "Call admitted.");
                Ok(pb::AdmitResponse {
                    call: Some(call_to_pb(&call)),
                    agent: Some(agent),
                })
            })
            .await
    }

    async fn attach(
        &self,
        request: Request<Streaming<pb::AttachRequest>>,
    ) -> Result<Response<Self::AttachStream>, Status> {
        let mut inbound = request.into_inner();
        let shared = self.0.clone();
        let first = tokio::time::timeout(OPEN_TIMEOUT, inbound.message()).await;
        let open = match first {
            Ok(Ok(Some(pb::AttachRequest {
                msg: Some(pb::attach_request::Msg::Open(open)),
            }))) => Ok(open),
            Ok(Ok(Some(_))) => Err(Error::invalid("open", "the first message must be open")),
            Ok(Ok(None)) => Err(Error::invalid("open", "stream closed before open")),
            Ok(Err(status)) => return Err(status),
            Err(_) => Err(Error::invalid("open", "no open within 10 s")),
        };
        let call_id = open.as_ref().map(|o| o.call_id.clone()).unwrap_or_default();
        self.0
            .rpc(SERVICE, "Attach", &call_id, async move {
                let open = open?;
                let call_id = CallId::parse("open.call_id", open.call_id.as_str())?;
                let relay_id = RelayId::parse("open.relay_id", open.relay_id.as_str())?;
                let checks = attach_checks(&open)?;
                let holder = LeaseHolder::new_stream(&shared.config.control_id);
                let lease = lease_ms(&shared);
                // Registered before the lease names this replica: SendCommand accepts a
                // command as soon as it does, and the command must find this stream
                // (buffered until the context is sent and the stream runs).
                let (command_tx, mut command_rx) = mpsc::channel(COMMAND_BUFFER);
                let replaced = shared.hub.register(&call_id, &holder, command_tx);
                let attached = async {
                    match shared
                        .store
                        .attach(&call_id, &relay_id, open.reconnect, &holder, now_ms(), lease, &checks)
                        .await?
                    {
                        AttachOutcome::Attached => Ok(false),
                        AttachOutcome::TookOver => Ok(true),
                        AttachOutcome::NotFound => Err(Error::CallNotFound(call_id.to_string())),
                        AttachOutcome::Ended => Err(Error::CallEnded(call_id.to_string())),
                        AttachOutcome::Held => Err(Error::LeaseHeldElsewhere(call_id.to_string())),
                        AttachOutcome::CredentialUsed => Err(Error::StreamCredentialUsed(call_id.to_string())),
                        AttachOutcome::CallSidMismatch => Err(Error::CallSidMismatch(call_id.to_string())),
                        AttachOutcome::Superseded => Err(Error::StreamSuperseded(call_id.to_string())),
                    }
                }
                .await;
                let took_over = match attached {
                    Ok(took_over) => took_over,
                    Err(err) => {
                        shared.hub.unregister_restoring(&call_id, &holder, replaced, &mut command_rx);
                        return Err(err);
                    }
                };
                if took_over {
                    // The old holder's relay is gone or its stream is over (Twilio opened
                    // this one); its renewals and writes are refused from now on.
                    shared.metrics.lease_takeovers.inc();
                    tracing::info!(relay_id = %relay_id, "Call taken over from a stream that still held its lease.");
                }
                let context = async {
                    let call = shared.call(&call_id).await?;
                    let agent = shared.store.get_agent(&call.agent_id).await?.ok_or_else(|| Error::AgentDeleted {
                        call_id: call_id.to_string(),
                        agent_id: call.agent_id.to_string(),
                    })?;
                    let history = if call.last_seq > 0 {
                        rules::transcript(&read_all_events(&shared, &call_id).await?)
                    } else {
                        Vec::new()
                    };
                    Ok::<_, Error>((call, agent, history))
                }
                .await;
                let (call, agent, history) = match context {
                    Ok(c) => c,
                    Err(err) => {
                        let _ = shared.store.release_lease(&call_id, &holder, now_ms(), lease).await;
                        shared.hub.unregister(&call_id, &holder);
                        return Err(err);
                    }
                };
                let (tx, rx) = mpsc::channel(ATTACH_BUFFER);
                let context = pb::CallContext {
                    call: Some(call_to_pb(&call)),
                    agent: Some(agent),
                    last_seq: call.last_seq,
                    history,
                    heartbeat_interval_ms: heartbeat::interval_ms(shared.config.heartbeat_timeout),
                };
                if tx
                    .try_send(Ok(pb::AttachResponse { msg: Some(pb::attach_response::Msg::Context(context)) }))
                    .is_err()
                {
                    let _ = shared.store.release_lease(&call_id, &holder, now_ms(), lease).await;
                    shared.hub.unregister(&call_id, &holder);
                    return Err(Error::AttachStreamClosed);
                }
                shared.metrics.attached_calls.inc();
                tracing::info!(relay_id = %relay_id, reconnect = open.reconnect, heartbeats = open.heartbeats, last_seq = call.last_seq, "Call attached.");
                let span = tracing::info_span!("attach", call_id = %call_id, relay_id = %relay_id);
                let stream = AttachStream {
                    shared: shared.clone(),
                    call,
                    holder,
                    inbound,
                    commands: command_rx,
                    tx,
                    batch: Vec::new(),
                    liveness: open.heartbeats.then(|| {
                        Liveness::new(shared.config.heartbeat_timeout, tokio::time::Instant::now())
                    }),
                };
                shared.tracker.spawn(stream.run().instrument(span));
                Ok(ReceiverStream::new(rx))
            })
            .await
    }

    async fn after(
        &self,
        request: Request<pb::AfterRequest>,
    ) -> Result<Response<pb::AfterResponse>, Status> {
        let req = request.into_inner();
        self.0
            .rpc(SERVICE, "After", &req.call_id, async {
                let call_id = CallId::parse("call_id", req.call_id.as_str())?;
                let ask = after_ask(&req)?;
                let call = self.0.call(&call_id).await?;
                let agent = self.0.store.get_agent(&call.agent_id).await?;
                let next = rules::after(&call, agent.as_ref(), &ask);
                if !rules::is_final(call.status) && !ask.names_current_stream(&call) {
                    // A live call's action request that speaks for an earlier stream: a replay
                    // (Twilio asks each action URL once). The replayer gets the hang-up;
                    // Twilio's own stream is untouched.
                    tracing::warn!(call_id = %call_id, "Action request of an earlier stream of a live call answered hangup (a replay?).");
                }
                Ok(pb::AfterResponse { next: Some(next) })
            })
            .await
    }

    async fn report_presence(
        &self,
        request: Request<pb::RelayPresence>,
    ) -> Result<Response<pb::RelayPresenceAck>, Status> {
        let req = request.into_inner();
        let shared = &self.0;
        shared
            .rpc(SERVICE, "ReportPresence", "", async {
                let relay_id = RelayId::parse("relay_id", req.relay_id.as_str())?;
                let timeout = shared.config.heartbeat_timeout;
                let alive_ms = i64::try_from(timeout.as_millis()).unwrap_or(i64::MAX);
                let others = shared
                    .store
                    .report_presence(&relay_id, req.draining, now_ms(), alive_ms)
                    .await?;
                if req.draining && others == 0 {
                    shared.metrics.no_ready_relay.inc();
                }
                Ok(pb::RelayPresenceAck {
                    other_ready_relays: others,
                    interval_ms: heartbeat::interval_ms(timeout),
                })
            })
            .await
    }

    async fn report_twilio_status(
        &self,
        request: Request<pb::TwilioStatusReport>,
    ) -> Result<Response<pb::TwilioStatusAck>, Status> {
        let req = request.into_inner();
        self.0
            .rpc(SERVICE, "ReportTwilioStatus", &req.call_id, async {
                let report = crate::dialer::Report::parse(req.clone())?;
                let applied = crate::dialer::apply_report(&self.0, &report).await?;
                Ok(pb::TwilioStatusAck { applied })
            })
            .await
    }
}

//! `callbridge.v1.Calls`: call sessions, listings, transcripts, usage, watch streams,
//! live commands.

use std::sync::Arc;
use std::time::Duration;

use callbridge_proto::pb;
use pb::calls_server::Calls;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use super::{Shared, decode_token, encode_token};
use crate::config::Config;
use crate::domain::call::{self as rules, call_to_pb, is_final, is_final_event, now_ms};
use crate::domain::campaign::Action;
use crate::domain::ids::{AgentId, CallId, CampaignId};
use crate::domain::record::CallRecord;
use crate::error::Error;
use crate::grpc_limits::WatchSlot;
use crate::store::{CallStore, IndexCursor};
use crate::validate;

/// The `Calls` service.
pub(crate) struct CallsApi<S>(pub(crate) Arc<Shared<S>>);

const SERVICE: &str = "Calls";
/// Events per read from the store.
const EVENT_PAGE: usize = 500;
/// Buffered outgoing messages per watch stream (a slow watcher then waits, and lags
/// behind the live fan-out, which it recovers from by reading the store).
const WATCH_BUFFER: usize = 64;
/// How often a watcher re-reads the store in case a live notification was lost.
const WATCH_POLL: Duration = Duration::from_secs(1);
/// Index entries examined per ListCalls request at most (filters may skip many).
const LIST_SCAN_LIMIT: usize = 5000;

type EventStream = ReceiverStream<Result<pb::CallEvent, Status>>;

/// The token a request was authenticated with (put there by the auth interceptor; a
/// request that bypassed it counts as the open bucket).
fn watch_token<T>(request: &Request<T>) -> crate::grpc_limits::TokenId {
    request
        .extensions()
        .get::<crate::grpc_limits::TokenId>()
        .copied()
        .unwrap_or(crate::grpc_limits::TokenId(None))
}

/// URLs Twilio should use for a call, from `RELAY_PUBLIC_URL`.
fn urls(config: &Config, call_id: &CallId) -> (String, String) {
    let call_id = call_id.as_str();
    match &config.relay_public_url {
        None => (String::new(), String::new()),
        Some(base) => {
            use callbridge_proto::paths;
            (
                paths::voice_webhook(base, Some(call_id)),
                paths::media_stream(&paths::ws_base(base), call_id),
            )
        }
    }
}

impl<S: CallStore> CallsApi<S> {
    /// Validates one call request (fields prefixed by `prefix`) into a record.
    async fn prepare(
        &self,
        prefix: &str,
        req: pb::CreateCallRequest,
        campaign_id: Option<&CampaignId>,
        default_agent: &mut Option<Option<AgentId>>,
        now: i64,
    ) -> Result<CallRecord, Error> {
        let field = |name: &str| format!("{prefix}{name}");
        let direction = match pb::Direction::try_from(req.direction) {
            Ok(pb::Direction::Unspecified | pb::Direction::Outbound) => pb::Direction::Outbound,
            Ok(pb::Direction::Inbound) => pb::Direction::Inbound,
            Err(_) => return Err(Error::invalid(field("direction"), "unknown direction")),
        };
        if direction == pb::Direction::Outbound || !req.to.is_empty() {
            validate::e164(&field("to"), &req.to)?;
        }
        if !req.from.is_empty() {
            validate::e164(&field("from"), &req.from)?;
        }
        let own_campaign = CampaignId::parse_optional(&field("campaign_id"), req.campaign_id)?;
        if let (Some(own), Some(campaign_id)) = (&own_campaign, campaign_id)
            && own != campaign_id
        {
            return Err(Error::invalid(
                field("campaign_id"),
                format!("'{own}' differs from the request's campaign '{campaign_id}'"),
            ));
        }
        validate::metadata(&field("metadata"), &req.metadata)?;
        if let Some(dial) = &req.dial {
            if campaign_id.is_some() {
                return Err(Error::invalid(
                    field("dial"),
                    "CreateCalls only registers calls; dial them one CreateCall at a time",
                ));
            }
            crate::dialer::check_dial(prefix, direction, dial)?;
            crate::dialer::dialer(&self.0)?;
        }
        let agent_id = if req.agent_id.is_empty() {
            if default_agent.is_none() {
                *default_agent = Some(self.0.store.get_default_agent().await?);
            }
            default_agent
                .clone()
                .flatten()
                .ok_or_else(|| Error::NoDefaultAgent {
                    field: field("agent_id"),
                })?
        } else {
            AgentId::parse(&field("agent_id"), req.agent_id)?
        };
        self.0.agent(&agent_id).await?;
        Ok(CallRecord {
            from: req.from,
            to: req.to,
            campaign_id: own_campaign.or_else(|| campaign_id.cloned()),
            metadata: req.metadata.into_iter().collect(),
            dialed: req.dial.is_some(),
            ..CallRecord::new(
                CallId::generate(),
                agent_id,
                direction,
                pb::CallStatus::Created,
                now,
            )
        })
    }

    fn response(&self, call: &CallRecord) -> pb::CreateCallResponse {
        let (webhook_url, stream_url) = urls(&self.0.config, &call.call_id);
        pb::CreateCallResponse {
            call: Some(call_to_pb(call)),
            webhook_url,
            stream_url,
        }
    }
}

/// Reads stored events after `*last` into `tx`; returns whether the final event was sent
/// (or the call is final with nothing left), i.e. the watch is over.
async fn catch_up<S: CallStore>(
    shared: &Shared<S>,
    call_id: &CallId,
    last: &mut u64,
    tx: &mpsc::Sender<Result<pb::CallEvent, Status>>,
) -> Result<bool, Error> {
    loop {
        let events = shared.store.read_events(call_id, *last, EVENT_PAGE).await?;
        let got = events.len();
        for event in events {
            if event.seq != *last + 1 {
                // Never skip: a hole in the stream is a store bug worth surfacing.
                return Err(Error::EventsOutOfOrder {
                    call_id: call_id.to_string(),
                    from: *last,
                    to: event.seq,
                });
            }
            *last = event.seq;
            let done = is_final_event(&event);
            if tx.send(Ok(event)).await.is_err() || done {
                return Ok(true);
            }
        }
        if got < EVENT_PAGE {
            break;
        }
    }
    // A final call whose events are all delivered has nothing more to say (covers
    // calls ended before events existed).
    let call = shared.call(call_id).await?;
    Ok(is_final(call.status) && *last >= call.last_seq)
}

/// One `WatchCall` stream: stored events after `after_seq`, then live ones, no gap and
/// no duplicate; ends after the final `ended` event.
async fn watch_call<S: CallStore>(
    shared: Arc<Shared<S>>,
    call_id: CallId,
    mut last: u64,
    mut live: crate::hub::CallEvents,
    tx: mpsc::Sender<Result<pb::CallEvent, Status>>,
) {
    let mut poll = tokio::time::interval(WATCH_POLL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut need_catch_up = true;
    loop {
        if need_catch_up {
            need_catch_up = false;
            match catch_up(&shared, &call_id, &mut last, &tx).await {
                Ok(true) => return,
                Ok(false) => {}
                // A store outage: keep the stream, the next poll retries.
                Err(Error::Store(err)) => tracing::debug!(error = %err, "Watch catch-up failed."),
                Err(err) => {
                    let _ = tx.send(Err(err.into())).await;
                    return;
                }
            }
        }
        tokio::select! {
            // Replica shutting down: end the stream; the client re-watches from its last seq.
            () = shared.shutdown.cancelled() => {
                let _ = tx.send(Err(Error::ShuttingDown { then: "; watch again from your last seq" }.into())).await;
                return;
            }
            // The client went away.
            () = tx.closed() => return,
            message = live.recv() => match message {
                Ok(hub_event) if call_id == hub_event.event.call_id.as_str() => {
                    let event = &hub_event.event;
                    if event.seq == last + 1 {
                        last = event.seq;
                        let done = is_final_event(event);
                        if tx.send(Ok(event.clone())).await.is_err() || done {
                            return;
                        }
                    } else if event.seq > last + 1 {
                        need_catch_up = true;
                    }
                }
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(_)) => need_catch_up = true,
                Err(broadcast::error::RecvError::Closed) => return,
            },
            // Safety net for notifications lost while pub/sub reconnected.
            _ = poll.tick() => need_catch_up = true,
        }
    }
}

/// One `WatchCalls` stream: live events of a campaign (or all), best effort.
async fn watch_calls<S: CallStore>(
    shared: Arc<Shared<S>>,
    campaign_id: Option<CampaignId>,
    mut live: broadcast::Receiver<Arc<crate::hub::HubEvent>>,
    tx: mpsc::Sender<Result<pb::CallEvent, Status>>,
) {
    loop {
        tokio::select! {
            () = shared.shutdown.cancelled() => {
                let _ = tx.send(Err(Error::ShuttingDown { then: "" }.into())).await;
                return;
            }
            () = tx.closed() => return,
            message = live.recv() => match message {
                Ok(hub_event) => {
                    let wanted = campaign_id.is_none() || hub_event.campaign_id == campaign_id;
                    if wanted && tx.send(Ok(hub_event.event.clone())).await.is_err() {
                        return;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    tracing::debug!(missed, "WatchCalls watcher lagged; events skipped.");
                }
                Err(broadcast::error::RecvError::Closed) => return,
            },
        }
    }
}

#[tonic::async_trait]
impl<S: CallStore> Calls for CallsApi<S> {
    type WatchCallStream = EventStream;
    type WatchCallsStream = EventStream;
    type WatchCampaignStream = ReceiverStream<Result<pb::Campaign, Status>>;

    async fn create_call(
        &self,
        request: Request<pb::CreateCallRequest>,
    ) -> Result<Response<pb::CreateCallResponse>, Status> {
        let req = request.into_inner();
        self.0
            .rpc(SERVICE, "CreateCall", "", async {
                let dial = req.dial.clone();
                let mut call = self.prepare("", req, None, &mut None, now_ms()).await?;
                self.0
                    .store
                    .create_calls(std::slice::from_ref(&call))
                    .await?;
                tracing::info!(call_id = %call.call_id, dialed = call.dialed, "Call created.");
                if let Some(dial) = dial {
                    crate::dialer::place(&self.0, &call, &dial).await?;
                    call = self.0.call(&call.call_id).await?;
                }
                Ok(self.response(&call))
            })
            .await
    }

    async fn create_campaign(
        &self,
        request: Request<pb::CreateCampaignRequest>,
    ) -> Result<Response<pb::Campaign>, Status> {
        let req = request.into_inner();
        self.0
            .rpc(
                SERVICE,
                "CreateCampaign",
                "",
                super::campaigns_api::create(&self.0, req),
            )
            .await
    }

    async fn add_campaign_numbers(
        &self,
        request: Request<pb::AddCampaignNumbersRequest>,
    ) -> Result<Response<pb::AddCampaignNumbersResponse>, Status> {
        let req = request.into_inner();
        self.0
            .rpc(
                SERVICE,
                "AddCampaignNumbers",
                "",
                super::campaigns_api::add_numbers(&self.0, req),
            )
            .await
    }

    async fn get_campaign(
        &self,
        request: Request<pb::CampaignRequest>,
    ) -> Result<Response<pb::Campaign>, Status> {
        let req = request.into_inner();
        self.0
            .rpc(SERVICE, "GetCampaign", "", async {
                let id = CampaignId::parse("campaign_id", req.campaign_id)?;
                super::campaigns_api::get(&self.0, &id).await
            })
            .await
    }

    async fn watch_campaign(
        &self,
        request: Request<pb::CampaignRequest>,
    ) -> Result<Response<Self::WatchCampaignStream>, Status> {
        let token = watch_token(&request);
        let req = request.into_inner();
        let shared = self.0.clone();
        self.0
            .rpc(SERVICE, "WatchCampaign", "", async {
                let campaign_id = CampaignId::parse("campaign_id", req.campaign_id)?;
                let slot = shared.watch_slots.acquire(token)?;
                let first = super::campaigns_api::snapshot(&shared, &campaign_id).await?;
                // One message in flight: a slow reader gets the latest view, not a backlog.
                let (tx, rx) = mpsc::channel(1);
                let span = tracing::info_span!("watch_campaign", campaign_id = %campaign_id);
                let task = super::campaigns_api::watch(shared.clone(), campaign_id, first, tx);
                spawn_watch(&shared, slot, span, task);
                Ok(ReceiverStream::new(rx))
            })
            .await
    }

    async fn start_campaign(
        &self,
        request: Request<pb::CampaignRequest>,
    ) -> Result<Response<pb::Campaign>, Status> {
        let req = request.into_inner();
        self.0
            .rpc(
                SERVICE,
                "StartCampaign",
                "",
                super::campaigns_api::change(&self.0, req, Action::Start),
            )
            .await
    }

    async fn pause_campaign(
        &self,
        request: Request<pb::CampaignRequest>,
    ) -> Result<Response<pb::Campaign>, Status> {
        let req = request.into_inner();
        self.0
            .rpc(
                SERVICE,
                "PauseCampaign",
                "",
                super::campaigns_api::change(&self.0, req, Action::Pause),
            )
            .await
    }

    async fn resume_campaign(
        &self,
        request: Request<pb::CampaignRequest>,
    ) -> Result<Response<pb::Campaign>, Status> {
        let req = request.into_inner();
        self.0
            .rpc(
                SERVICE,
                "ResumeCampaign",
                "",
                super::campaigns_api::change(&self.0, req, Action::Resume),
            )
            .await
    }

    async fn cancel_campaign(
        &self,
        request: Request<pb::CampaignRequest>,
    ) -> Result<Response<pb::Campaign>, Status> {
        let req = request.into_inner();
        self.0
            .rpc(
                SERVICE,
                "CancelCampaign",
                "",
                super::campaigns_api::change(&self.0, req, Action::Cancel),
            )
            .await
    }

    async fn add_do_not_call(
        &self,
        request: Request<pb::DoNotCallRequest>,
    ) -> Result<Response<pb::DoNotCallResponse>, Status> {
        let req = request.into_inner();
        self.0
            .rpc(
                SERVICE,
                "AddDoNotCall",
                "",
                super::campaigns_api::do_not_call(&self.0, req, true),
            )
            .await
    }

    async fn remove_do_not_call(
        &self,
        request: Request<pb::DoNotCallRequest>,
    ) -> Result<Response<pb::DoNotCallResponse>, Status> {
        let req = request.into_inner();
        self.0
            .rpc(
                SERVICE,
                "RemoveDoNotCall",
                "",
                super::campaigns_api::do_not_call(&self.0, req, false),
            )
            .await
    }

    async fn create_calls(
        &self,
        request: Request<pb::CreateCallsRequest>,
    ) -> Result<Response<pb::CreateCallsResponse>, Status> {
        let req = request.into_inner();
        self.0
            .rpc(SERVICE, "CreateCalls", "", async {
                let campaign_id = CampaignId::parse("campaign_id", req.campaign_id)?;
                if req.calls.is_empty() || req.calls.len() > validate::MAX_BULK {
                    return Err(Error::invalid(
                        "calls",
                        format!(
                            "{} calls; 1..={} allowed",
                            req.calls.len(),
                            validate::MAX_BULK
                        ),
                    ));
                }
                let now = now_ms();
                let mut default_agent = None;
                let mut records = Vec::with_capacity(req.calls.len());
                // Everything is validated before anything is written.
                for (i, call) in req.calls.into_iter().enumerate() {
                    let prefix = format!("calls[{i}].");
                    records.push(
                        self.prepare(&prefix, call, Some(&campaign_id), &mut default_agent, now)
                            .await?,
                    );
                }
                self.0.store.create_calls(&records).await?;
                tracing::info!(campaign_id = %campaign_id, count = records.len(), "Calls created.");
                Ok(pb::CreateCallsResponse {
                    calls: records.iter().map(|c| self.response(c)).collect(),
                })
            })
            .await
    }

    async fn get_call(
        &self,
        request: Request<pb::GetCallRequest>,
    ) -> Result<Response<pb::Call>, Status> {
        let req = request.into_inner();
        self.0
            .rpc(SERVICE, "GetCall", &req.call_id, async {
                let call_id = CallId::parse("call_id", req.call_id.as_str())?;
                Ok(call_to_pb(&self.0.call(&call_id).await?))
            })
            .await
    }

    async fn list_calls(
        &self,
        request: Request<pb::ListCallsRequest>,
    ) -> Result<Response<pb::ListCallsResponse>, Status> {
        let req = request.into_inner();
        self.0
            .rpc(SERVICE, "ListCalls", "", async {
                let limit = validate::page_size("page_size", req.page_size)?;
                if req.status != 0 && pb::CallStatus::try_from(req.status).is_err() {
                    return Err(Error::invalid(
                        "status",
                        format!("unknown status {}", req.status),
                    ));
                }
                let agent = AgentId::parse_optional("agent_id", req.agent_id.as_str())?;
                let campaign = CampaignId::parse_optional("campaign_id", req.campaign_id.as_str())?;
                let campaign = campaign.as_ref();
                let min_score = if req.created_after_ms > 0 {
                    req.created_after_ms.saturating_add(1)
                } else {
                    i64::MIN
                };
                let max_score = if req.created_before_ms > 0 {
                    req.created_before_ms - 1
                } else {
                    i64::MAX
                };
                let mut cursor = if req.page_token.is_empty() {
                    IndexCursor {
                        score: max_score,
                        skip: 0,
                    }
                } else {
                    decode_token(&req.page_token)
                        .and_then(|t| {
                            let (score, skip) = t.split_once(':')?;
                            Some(IndexCursor {
                                score: score.parse().ok()?,
                                skip: skip.parse().ok()?,
                            })
                        })
                        .ok_or_else(|| Error::invalid("page_token", "not a token from this API"))?
                };
                let mut calls_out = Vec::new();
                let mut scanned = 0;
                let mut more = true;
                'scan: while scanned < LIST_SCAN_LIMIT {
                    let batch_size = 200;
                    let batch = self
                        .0
                        .store
                        .scan_index(campaign, cursor, min_score, batch_size)
                        .await?;
                    let exhausted = batch.len() < batch_size;
                    let ids: Vec<CallId> = batch.iter().map(|(id, _)| id.clone()).collect();
                    let records = self.0.store.get_calls(&ids).await?;
                    for ((_, score), record) in batch.into_iter().zip(records) {
                        scanned += 1;
                        cursor = if score == cursor.score {
                            IndexCursor {
                                score,
                                skip: cursor.skip + 1,
                            }
                        } else {
                            IndexCursor { score, skip: 1 }
                        };
                        // Expired calls leave index entries behind until trimmed.
                        let Some(call) = record else { continue };
                        if (req.status == 0 || call.status as i32 == req.status)
                            && agent.as_ref().is_none_or(|a| call.agent_id == *a)
                        {
                            calls_out.push(call_to_pb(&call));
                            if calls_out.len() == limit {
                                break 'scan;
                            }
                        }
                    }
                    if exhausted {
                        more = false;
                        break;
                    }
                }
                let next_page_token = if more {
                    encode_token(&format!("{}:{}", cursor.score, cursor.skip))
                } else {
                    String::new()
                };
                Ok(pb::ListCallsResponse {
                    calls: calls_out,
                    next_page_token,
                })
            })
            .await
    }

    async fn get_transcript(
        &self,
        request: Request<pb::GetTranscriptRequest>,
    ) -> Result<Response<pb::Transcript>, Status> {
        let req = request.into_inner();
        self.0
            .rpc(SERVICE, "GetTranscript", &req.call_id, async {
                let call_id = CallId::parse("call_id", req.call_id.as_str())?;
                self.0.call(&call_id).await?;
                let events = read_all_events(&self.0, &call_id).await?;
                Ok(pb::Transcript {
                    call_id: call_id.into_string(),
                    turns: rules::transcript(&events),
                })
            })
            .await
    }

    async fn get_usage(
        &self,
        request: Request<pb::GetUsageRequest>,
    ) -> Result<Response<pb::Usage>, Status> {
        let req = request.into_inner();
        self.0
            .rpc(SERVICE, "GetUsage", "", async {
                use pb::get_usage_request::Scope;
                match req.scope {
                    Some(Scope::CallId(call_id)) => {
                        let call_id = CallId::parse("call_id", call_id)?;
                        Ok(rules::usage_of(&self.0.call(&call_id).await?))
                    }
                    Some(Scope::CampaignId(campaign_id)) => {
                        let campaign_id = CampaignId::parse("campaign_id", campaign_id)?;
                        let mut total = pb::Usage::default();
                        let mut cursor = IndexCursor {
                            score: i64::MAX,
                            skip: 0,
                        };
                        loop {
                            let batch = self
                                .0
                                .store
                                .scan_index(Some(&campaign_id), cursor, i64::MIN, 500)
                                .await?;
                            let n = batch.len();
                            let ids: Vec<CallId> = batch.iter().map(|(id, _)| id.clone()).collect();
                            if let Some((_, score)) = batch.last() {
                                let same = batch.iter().filter(|(_, s)| s == score).count() as u64;
                                cursor = if *score == cursor.score {
                                    IndexCursor {
                                        score: *score,
                                        skip: cursor.skip + same,
                                    }
                                } else {
                                    IndexCursor {
                                        score: *score,
                                        skip: same,
                                    }
                                };
                            }
                            for call in self.0.store.get_calls(&ids).await?.into_iter().flatten() {
                                rules::add_usage(&mut total, &rules::usage_of(&call));
                            }
                            if n < 500 {
                                break;
                            }
                        }
                        Ok(total)
                    }
                    None => Err(Error::invalid("scope", "set call_id or campaign_id")),
                }
            })
            .await
    }

    async fn watch_call(
        &self,
        request: Request<pb::WatchCallRequest>,
    ) -> Result<Response<Self::WatchCallStream>, Status> {
        let token = watch_token(&request);
        let req = request.into_inner();
        let shared = self.0.clone();
        self.0
            .rpc(SERVICE, "WatchCall", &req.call_id, async {
                let call_id = CallId::parse("call_id", req.call_id.as_str())?;
                // Held by the stream's task: freed when the stream ends.
                let slot = shared.watch_slots.acquire(token)?;
                // Subscribe before reading the store, so nothing falls between the two.
                let live = shared.hub.subscribe_call(&call_id);
                shared.call(&call_id).await?;
                let (tx, rx) = mpsc::channel(WATCH_BUFFER);
                let span = tracing::info_span!("watch_call", call_id = %call_id);
                let task = watch_call(shared.clone(), call_id, req.after_seq, live, tx);
                spawn_watch(&shared, slot, span, task);
                Ok(ReceiverStream::new(rx))
            })
            .await
    }

    async fn watch_calls(
        &self,
        request: Request<pb::WatchCallsRequest>,
    ) -> Result<Response<Self::WatchCallsStream>, Status> {
        let token = watch_token(&request);
        let req = request.into_inner();
        let shared = self.0.clone();
        self.0
            .rpc(SERVICE, "WatchCalls", "", async {
                let slot = shared.watch_slots.acquire(token)?;
                let campaign_id =
                    CampaignId::parse_optional("campaign_id", req.campaign_id.as_str())?;
                let live = shared.hub.subscribe();
                let (tx, rx) = mpsc::channel(WATCH_BUFFER);
                let span = tracing::info_span!("watch_calls", campaign_id = %req.campaign_id);
                let task = watch_calls(shared.clone(), campaign_id, live, tx);
                spawn_watch(&shared, slot, span, task);
                Ok(ReceiverStream::new(rx))
            })
            .await
    }

    async fn send_command(
        &self,
        request: Request<pb::SendCommandRequest>,
    ) -> Result<Response<pb::SendCommandResponse>, Status> {
        let req = request.into_inner();
        self.0
            .rpc(SERVICE, "SendCommand", &req.call_id, async {
                let call_id = CallId::parse("call_id", req.call_id.as_str())?;
                validate::command(req.command.as_ref())?;
                let mut command = req.command.unwrap_or_default();
                if command.command_id.is_empty() {
                    command.command_id = uuid::Uuid::new_v4().simple().to_string();
                }
                let call = self.0.call(&call_id).await?;
                // A verdict is kept on the call whether or not a stream is attached now.
                if let Some(pb::command::Kind::AnsweringMachine(m)) = &command.kind {
                    crate::dialer::app_verdict(
                        &self.0,
                        &call,
                        &m.answered_by,
                        command.command_id.clone(),
                    )
                    .await?;
                    return Ok(pb::SendCommandResponse {
                        command_id: command.command_id,
                    });
                }
                let live = call.status == pb::CallStatus::InProgress && call.lease_held(now_ms());
                // A call with no stream to hang up may still be ringing or connected at
                // Twilio: end it there.
                if !live
                    && matches!(command.kind, Some(pb::command::Kind::Hangup(_)))
                    && crate::dialer::hang_up(&self.0, &call).await?
                {
                    return Ok(pb::SendCommandResponse {
                        command_id: command.command_id,
                    });
                }
                if !live {
                    return Err(Error::CallNotLive {
                        call_id: call_id.to_string(),
                        status: call.status.as_str_name(),
                        attached: call.lease_held(now_ms()),
                    });
                }
                let delivered = self
                    .0
                    .store
                    .publish_command(call.lease_replica(), &call_id, &command)
                    .await?;
                if !delivered {
                    return Err(Error::HolderGone(call_id.to_string()));
                }
                Ok(pb::SendCommandResponse {
                    command_id: command.command_id,
                })
            })
            .await
    }
}

/// Every stored event of a call, in order.
pub(crate) async fn read_all_events<S: CallStore>(
    shared: &Shared<S>,
    call_id: &CallId,
) -> Result<Vec<pb::CallEvent>, Error> {
    let mut events = Vec::new();
    loop {
        let after = events.last().map_or(0, |e: &pb::CallEvent| e.seq);
        let page = shared.store.read_events(call_id, after, EVENT_PAGE).await?;
        let n = page.len();
        events.extend(page);
        if n < EVENT_PAGE {
            return Ok(events);
        }
    }
}

/// Runs a watch stream's task in `span`, holding its slot until the stream ends.
fn spawn_watch<S>(
    shared: &Shared<S>,
    slot: WatchSlot,
    span: tracing::Span,
    task: impl std::future::Future<Output = ()> + Send + 'static,
) {
    shared.tracker.spawn(
        async move {
            let _slot = slot;
            task.await;
        }
        .instrument(span),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_follow_the_contract_notes() {
        let mut config = crate::config::Config::from_args_iter(["x", "--insecure-no-auth", "true"])
            .expect("valid");
        config.relay_public_url = Some("https://relay.example.com".into());
        let (hook, stream) = urls(&config, &CallId::parse("call_id", "abc").expect("valid"));
        assert_eq!(
            hook,
            "https://relay.example.com/api/twilio/voice?callId=abc"
        );
        assert_eq!(
            stream,
            "wss://relay.example.com/api/twilio/media-stream/abc"
        );
    }
}

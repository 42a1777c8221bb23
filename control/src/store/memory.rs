//! In-memory [`CallStore`]: one process, nothing survives a restart.
//!
//! Each method runs under one mutex, which gives the same atomicity the Lua scripts give
//! in Redis. Retention is not enforced (the process is short-lived by design).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use callbridge_proto::pb;

use super::{
    AddNumbers, AdmitOutcome, AgentCas, AppendOutcome, AttachChecks, AttachOutcome,
    CREDENTIAL_RECORD_GRACE_MS, CallStore, CampaignChange, IndexCursor, StoreResult, TwilioUpdate,
};
use crate::domain::call::{
    LeaseClaim, StreamOrigin, is_final, lease_claim, retries_committed_attach, status_rank,
};
use crate::domain::campaign::{CampaignRecord, NumberState};
use crate::domain::ids::{
    AgentId, CallId, CallSid, CampaignId, LeaseHolder, RelayId, StreamCredentialId,
};
use crate::domain::record::{CallRecord, EventEffects};
use crate::domain::twilio;
use crate::hub::{BusMessage, Hub};

#[derive(Debug, Default)]
struct State {
    agents: BTreeMap<String, pb::Agent>,
    routes: BTreeMap<String, AgentId>,
    default_agent: Option<AgentId>,
    calls: HashMap<CallId, CallRecord>,
    events: HashMap<CallId, Vec<pb::CallEvent>>,
    sids: HashMap<CallSid, CallId>,
    /// (created ms, call id) of every call.
    index: BTreeSet<(i64, CallId)>,
    campaigns: HashMap<CampaignId, BTreeSet<(i64, CallId)>>,
    leases: HashMap<CallId, i64>,
    /// Consumed stream credentials: (call, credential id) → until when the record is kept,
    /// and the attempt id that consumed it ("" none).
    credentials: HashMap<(CallId, String), (i64, String)>,
    /// The ready-relay registry: relay id → (last report ms, draining).
    relays: HashMap<RelayId, (i64, bool)>,
    /// Campaigns with their numbers and dialer lease.
    campaign_records: HashMap<CampaignId, StoredCampaign>,
    /// The do-not-call set.
    do_not_call: BTreeSet<String>,
    /// Calls redirected by REST after losing a stream: the stream each was redirected for.
    orphan_redirects: HashMap<CallId, StreamCredentialId>,
}

#[derive(Debug, Clone)]
struct StoredCampaign {
    record: CampaignRecord,
    numbers: Vec<NumberState>,
    /// Dialer lease: holder, until (ms), fencing token.
    holder: String,
    until_ms: i64,
    fence: u64,
}

/// The in-memory store.
#[derive(Debug, Clone)]
pub struct MemoryStore {
    state: Arc<Mutex<State>>,
    hub: Arc<Hub>,
    replica_id: String,
}

impl MemoryStore {
    /// A store delivering bus messages to `hub` (this replica is `replica_id`).
    pub fn new(hub: Arc<Hub>, replica_id: impl Into<String>) -> Self {
        MemoryStore {
            state: Arc::default(),
            hub,
            replica_id: replica_id.into(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Every section below validates before it mutates, so a poisoned lock holds
        // consistent data.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn index_page(
    index: Option<&BTreeSet<(i64, CallId)>>,
    cursor: IndexCursor,
    min_score: i64,
    limit: usize,
) -> Vec<(CallId, i64)> {
    let Some(index) = index else {
        return Vec::new();
    };
    // Same order as Redis ZREVRANGEBYSCORE: score descending, then member descending.
    let mut seen_at_score = 0u64;
    let mut out = Vec::new();
    for (score, id) in index.iter().rev() {
        if *score > cursor.score {
            continue;
        }
        if *score < min_score || out.len() >= limit {
            break;
        }
        if *score == cursor.score {
            seen_at_score += 1;
            if seen_at_score <= cursor.skip {
                continue;
            }
        }
        out.push((id.clone(), *score));
    }
    out
}

impl CallStore for MemoryStore {
    async fn create_agent(&self, agent: &pb::Agent) -> StoreResult<bool> {
        let mut s = self.lock();
        if s.agents.contains_key(&agent.agent_id) {
            return Ok(false);
        }
        s.agents.insert(agent.agent_id.clone(), agent.clone());
        Ok(true)
    }

    async fn get_agent(&self, agent_id: &AgentId) -> StoreResult<Option<pb::Agent>> {
        Ok(self.lock().agents.get(agent_id.as_str()).cloned())
    }

    async fn replace_agent(&self, agent: &pb::Agent, expected: u64) -> StoreResult<AgentCas> {
        let mut s = self.lock();
        let Some(current) = s.agents.get_mut(&agent.agent_id) else {
            return Ok(AgentCas::NotFound);
        };
        if current.version != expected {
            return Ok(AgentCas::Conflict {
                current: current.version,
            });
        }
        *current = agent.clone();
        Ok(AgentCas::Done)
    }

    async fn delete_agent(&self, agent_id: &AgentId, expected: u64) -> StoreResult<AgentCas> {
        let mut s = self.lock();
        let Some(current) = s.agents.get(agent_id.as_str()) else {
            return Ok(AgentCas::NotFound);
        };
        if expected != 0 && current.version != expected {
            return Ok(AgentCas::Conflict {
                current: current.version,
            });
        }
        s.agents.remove(agent_id.as_str());
        s.routes.retain(|_, a| a != agent_id);
        if s.default_agent.as_ref() == Some(agent_id) {
            s.default_agent = None;
        }
        Ok(AgentCas::Done)
    }

    async fn list_agents(
        &self,
        after: Option<&AgentId>,
        limit: usize,
    ) -> StoreResult<Vec<pb::Agent>> {
        let s = self.lock();
        let from = after.map_or(std::ops::Bound::Unbounded, |a| {
            std::ops::Bound::Excluded(a.as_str())
        });
        Ok(s.agents
            .range::<str, _>((from, std::ops::Bound::Unbounded))
            .take(limit)
            .map(|(_, a)| a.clone())
            .collect())
    }

    async fn set_route(&self, number: &str, agent_id: &AgentId) -> StoreResult<()> {
        self.lock()
            .routes
            .insert(number.to_owned(), agent_id.clone());
        Ok(())
    }

    async fn delete_route(&self, number: &str) -> StoreResult<bool> {
        Ok(self.lock().routes.remove(number).is_some())
    }

    async fn get_route(&self, number: &str) -> StoreResult<Option<AgentId>> {
        Ok(self.lock().routes.get(number).cloned())
    }

    async fn list_routes(&self) -> StoreResult<Vec<(String, AgentId)>> {
        Ok(self
            .lock()
            .routes
            .iter()
            .map(|(n, a)| (n.clone(), a.clone()))
            .collect())
    }

    async fn set_default_agent(&self, agent_id: Option<&AgentId>) -> StoreResult<()> {
        self.lock().default_agent = agent_id.cloned();
        Ok(())
    }

    async fn get_default_agent(&self) -> StoreResult<Option<AgentId>> {
        Ok(self.lock().default_agent.clone())
    }

    async fn create_calls(&self, calls: &[CallRecord]) -> StoreResult<()> {
        let mut s = self.lock();
        for call in calls {
            s.index.insert((call.created_at_ms, call.call_id.clone()));
            if let Some(campaign_id) = &call.campaign_id {
                s.campaigns
                    .entry(campaign_id.clone())
                    .or_default()
                    .insert((call.created_at_ms, call.call_id.clone()));
            }
            s.calls.insert(call.call_id.clone(), call.clone());
        }
        Ok(())
    }

    async fn get_call(&self, call_id: &CallId) -> StoreResult<Option<CallRecord>> {
        Ok(self.lock().calls.get(call_id).cloned())
    }

    async fn get_calls(&self, call_ids: &[CallId]) -> StoreResult<Vec<Option<CallRecord>>> {
        let s = self.lock();
        Ok(call_ids.iter().map(|id| s.calls.get(id).cloned()).collect())
    }

    async fn admit_existing(
        &self,
        call_id: &CallId,
        twilio_call_sid: Option<&CallSid>,
        from: &str,
        to: &str,
    ) -> StoreResult<AdmitOutcome> {
        let mut s = self.lock();
        let Some(call) = s.calls.get_mut(call_id) else {
            return Ok(AdmitOutcome::NotFound);
        };
        if is_final(call.status) {
            return Ok(AdmitOutcome::Ended);
        }
        if call.twilio_call_sid.is_none() {
            call.twilio_call_sid = twilio_call_sid.cloned();
        }
        for (field, value) in [(&mut call.from, from), (&mut call.to, to)] {
            if field.is_empty() {
                *field = value.to_owned();
            }
        }
        if status_rank(call.status) < status_rank(pb::CallStatus::Ringing) {
            call.status = pb::CallStatus::Ringing;
        }
        if let Some(sid) = twilio_call_sid {
            s.sids.entry(sid.clone()).or_insert_with(|| call_id.clone());
        }
        Ok(AdmitOutcome::Admitted)
    }

    async fn record_twilio(&self, call_id: &CallId, u: &TwilioUpdate) -> StoreResult<Option<bool>> {
        let mut s = self.lock();
        let Some(call) = s.calls.get_mut(call_id) else {
            return Ok(None);
        };
        let mut changed = false;
        if u.sid.is_some() && call.twilio_call_sid.is_none() {
            call.twilio_call_sid = u.sid.clone();
            changed = true;
        }
        if twilio::rank(u.status) > twilio::rank(call.twilio_status) {
            call.twilio_status = u.status;
            changed = true;
        }
        if let Some(seq) = u.seq {
            call.twilio_seq = call.twilio_seq.max(seq);
        }
        if let Some((code, message)) = &u.error {
            call.twilio_error_code = *code;
            call.twilio_error_message = message.clone();
            changed = true;
        }
        if u.answered_by.is_some() && call.answered_by.is_none() {
            call.answered_by = u.answered_by.clone();
            changed = true;
        }
        Ok(Some(changed))
    }

    async fn call_id_by_sid(&self, sid: &CallSid) -> StoreResult<Option<CallId>> {
        let s = self.lock();
        if let Some(id) = s.sids.get(sid) {
            return Ok(Some(id.clone()));
        }
        // Pre-created calls record their sid on the call only.
        Ok(s.calls
            .values()
            .find(|c| c.twilio_call_sid.as_ref() == Some(sid))
            .map(|c| c.call_id.clone()))
    }

    async fn admit_inbound(&self, call: &CallRecord) -> StoreResult<CallId> {
        let mut s = self.lock();
        if let Some(sid) = &call.twilio_call_sid {
            if let Some(existing) = s.sids.get(sid) {
                return Ok(existing.clone());
            }
            s.sids.insert(sid.clone(), call.call_id.clone());
        }
        s.index.insert((call.created_at_ms, call.call_id.clone()));
        s.calls.insert(call.call_id.clone(), call.clone());
        Ok(call.call_id.clone())
    }

    async fn attach(
        &self,
        call_id: &CallId,
        relay_id: &RelayId,
        reconnect: bool,
        holder: &LeaseHolder,
        now_ms: i64,
        lease_ms: i64,
        checks: &AttachChecks,
    ) -> StoreResult<AttachOutcome> {
        let mut s = self.lock();
        s.credentials.retain(|_, (until, _)| *until >= now_ms);
        let credential_key = checks
            .credential
            .as_ref()
            .map(|(id, expires)| ((call_id.clone(), id.as_str().to_owned()), *expires));
        let recorded_attempt = credential_key
            .as_ref()
            .and_then(|(key, _)| s.credentials.get(key))
            .map(|(_, attempt)| attempt.clone());
        let Some(call) = s.calls.get_mut(call_id) else {
            return Ok(AttachOutcome::NotFound);
        };
        let retry = match (&recorded_attempt, &checks.credential) {
            (None, _) | (_, None) => false,
            (Some(recorded), Some((id, _))) => {
                if !retries_committed_attach(call, id, recorded, checks.attempt.as_ref()) {
                    return Ok(AttachOutcome::CredentialUsed);
                }
                true
            }
        };
        if is_final(call.status) {
            return Ok(AttachOutcome::Ended);
        }
        if let (Some(recorded), Some(sid)) = (&call.twilio_call_sid, &checks.twilio_call_sid)
            && recorded.as_str() != sid
        {
            return Ok(AttachOutcome::CallSidMismatch);
        }
        let claim = if retry {
            // The same stream attaching again: a reconnect of its relay.
            lease_claim(
                call,
                relay_id,
                true,
                false,
                &StreamOrigin::Unspecified,
                now_ms,
            )
        } else {
            lease_claim(
                call,
                relay_id,
                reconnect,
                credential_key.is_some(),
                &checks.origin,
                now_ms,
            )
        };
        match claim {
            LeaseClaim::Held => return Ok(AttachOutcome::Held),
            LeaseClaim::Superseded => return Ok(AttachOutcome::Superseded),
            LeaseClaim::Free | LeaseClaim::Reconnect | LeaseClaim::TakeOver => {}
        }
        if let Some((id, _)) = &checks.credential {
            call.lease_stream = Some(id.clone());
        }
        call.lease_holder = Some(holder.clone());
        call.lease_relay = Some(relay_id.clone());
        call.relay_id = Some(relay_id.clone());
        call.lease_until_ms = now_ms + lease_ms;
        let until = call.lease_until_ms;
        s.leases.insert(call_id.clone(), until);
        if let Some((key, expires)) = credential_key.filter(|_| !retry) {
            let attempt = checks
                .attempt
                .as_ref()
                .map_or_else(String::new, |a| a.as_str().to_owned());
            s.credentials.insert(
                key,
                (expires.saturating_add(CREDENTIAL_RECORD_GRACE_MS), attempt),
            );
        }
        Ok(if claim == LeaseClaim::TakeOver {
            AttachOutcome::TookOver
        } else {
            AttachOutcome::Attached
        })
    }

    async fn renew_lease(
        &self,
        call_id: &CallId,
        holder: &LeaseHolder,
        now_ms: i64,
        lease_ms: i64,
    ) -> StoreResult<bool> {
        let mut s = self.lock();
        let Some(call) = s.calls.get_mut(call_id) else {
            return Ok(false);
        };
        if call.lease_holder.as_ref() != Some(holder) {
            return Ok(false);
        }
        call.lease_until_ms = now_ms + lease_ms;
        let until = call.lease_until_ms;
        if !is_final(call.status) {
            s.leases.insert(call_id.clone(), until);
        }
        Ok(true)
    }

    async fn claim_orphan_redirect(
        &self,
        call_id: &CallId,
        stream: &StreamCredentialId,
        _now_ms: i64,
    ) -> StoreResult<bool> {
        let mut s = self.lock();
        let Some(call) = s.calls.get(call_id) else {
            return Ok(false);
        };
        if call.lease_holder.is_some() || call.lease_stream.as_ref() != Some(stream) {
            return Ok(false);
        }
        if s.orphan_redirects.get(call_id) == Some(stream) {
            return Ok(false);
        }
        s.orphan_redirects.insert(call_id.clone(), stream.clone());
        Ok(true)
    }

    async fn release_lease(
        &self,
        call_id: &CallId,
        holder: &LeaseHolder,
        now_ms: i64,
        lease_ms: i64,
    ) -> StoreResult<()> {
        let mut s = self.lock();
        let Some(call) = s.calls.get_mut(call_id) else {
            return Ok(());
        };
        if call.lease_holder.as_ref() != Some(holder) {
            return Ok(());
        }
        call.lease_holder = None;
        call.lease_until_ms = now_ms + lease_ms;
        let (until, live) = (call.lease_until_ms, !is_final(call.status));
        if live {
            s.leases.insert(call_id.clone(), until);
        }
        Ok(())
    }

    async fn append_events(
        &self,
        call_id: &CallId,
        campaign_id: Option<&CampaignId>,
        events: &[pb::CallEvent],
        effects: &[EventEffects],
    ) -> StoreResult<Vec<AppendOutcome>> {
        let outcomes = {
            let mut s = self.lock();
            let mut outcomes = Vec::with_capacity(events.len());
            for (event, effects) in events.iter().zip(effects) {
                let outcome = append_one(&mut s, call_id, event, effects);
                outcomes.push(outcome);
                if !matches!(outcome, AppendOutcome::Stored | AppendOutcome::Duplicate) {
                    break;
                }
            }
            outcomes
        };
        for (event, outcome) in events.iter().zip(&outcomes) {
            if *outcome == AppendOutcome::Stored {
                self.hub.dispatch(BusMessage::Event {
                    campaign_id: campaign_id.cloned(),
                    event: event.clone(),
                });
            }
        }
        Ok(outcomes)
    }

    async fn read_events(
        &self,
        call_id: &CallId,
        after_seq: u64,
        limit: usize,
    ) -> StoreResult<Vec<pb::CallEvent>> {
        let s = self.lock();
        Ok(s.events
            .get(call_id)
            .map(|evs| {
                evs.iter()
                    .filter(|e| e.seq > after_seq)
                    .take(limit)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default())
    }

    async fn expired_leases(&self, now_ms: i64, limit: usize) -> StoreResult<Vec<CallId>> {
        let s = self.lock();
        Ok(s.leases
            .iter()
            .filter(|(_, until)| **until < now_ms)
            .take(limit)
            .map(|(id, _)| id.clone())
            .collect())
    }

    async fn forget_lease(&self, call_id: &CallId) -> StoreResult<()> {
        self.lock().leases.remove(call_id);
        Ok(())
    }

    async fn report_presence(
        &self,
        relay_id: &RelayId,
        draining: bool,
        now_ms: i64,
        alive_ms: i64,
    ) -> StoreResult<u32> {
        let mut s = self.lock();
        s.relays.insert(relay_id.clone(), (now_ms, draining));
        s.relays
            .retain(|_, (seen, _)| *seen > now_ms.saturating_sub(alive_ms.saturating_mul(10)));
        Ok(crate::heartbeat::ready_others(
            s.relays
                .iter()
                .map(|(id, (seen, draining))| (id.as_str(), *seen, *draining)),
            relay_id.as_str(),
            now_ms,
            alive_ms,
        ))
    }

    async fn scan_index(
        &self,
        campaign_id: Option<&CampaignId>,
        cursor: IndexCursor,
        min_score: i64,
        limit: usize,
    ) -> StoreResult<Vec<(CallId, i64)>> {
        let s = self.lock();
        let index = match campaign_id {
            Some(c) => s.campaigns.get(c),
            None => Some(&s.index),
        };
        Ok(index_page(index, cursor, min_score, limit))
    }

    async fn trim_index(&self, created_before_ms: i64) -> StoreResult<u64> {
        let mut s = self.lock();
        let State { index, calls, .. } = &mut *s;
        let before = index.len();
        index.retain(|(score, id)| *score >= created_before_ms || calls.contains_key(id));
        Ok((before - index.len()) as u64)
    }

    async fn publish_command(
        &self,
        replica_id: &str,
        call_id: &CallId,
        command: &pb::Command,
    ) -> StoreResult<bool> {
        // One process: only this replica exists.
        if replica_id != self.replica_id {
            return Ok(false);
        }
        self.hub.dispatch(BusMessage::Command {
            call_id: call_id.clone(),
            command: command.clone(),
        });
        Ok(true)
    }

    async fn create_campaign(&self, campaign: &CampaignRecord) -> StoreResult<bool> {
        let mut s = self.lock();
        if s.campaign_records.contains_key(&campaign.campaign_id) {
            return Ok(false);
        }
        s.campaign_records.insert(
            campaign.campaign_id.clone(),
            StoredCampaign {
                record: campaign.clone(),
                numbers: Vec::new(),
                holder: String::new(),
                until_ms: 0,
                fence: 0,
            },
        );
        Ok(true)
    }

    async fn get_campaign(&self, campaign_id: &CampaignId) -> StoreResult<Option<CampaignRecord>> {
        Ok(self
            .lock()
            .campaign_records
            .get(campaign_id)
            .map(|c| c.record.clone()))
    }

    async fn add_campaign_numbers(
        &self,
        campaign_id: &CampaignId,
        numbers: &[NumberState],
    ) -> StoreResult<AddNumbers> {
        let mut s = self.lock();
        let Some(c) = s.campaign_records.get_mut(campaign_id) else {
            return Ok(AddNumbers::NotFound);
        };
        if !crate::domain::campaign::is_open(c.record.state) {
            return Ok(AddNumbers::Closed(c.record.state));
        }
        c.numbers.extend_from_slice(numbers);
        c.record.numbers = u32::try_from(c.numbers.len()).unwrap_or(u32::MAX);
        c.record.revision += 1;
        Ok(AddNumbers::Added(c.record.numbers))
    }

    async fn change_campaign(
        &self,
        campaign_id: &CampaignId,
        from: &[pb::CampaignState],
        to: pb::CampaignState,
        now_ms: i64,
    ) -> StoreResult<CampaignChange> {
        let mut s = self.lock();
        let Some(c) = s.campaign_records.get_mut(campaign_id) else {
            return Ok(CampaignChange::NotFound);
        };
        if !from.contains(&c.record.state) {
            return Ok(CampaignChange::Refused(c.record.state));
        }
        c.record.state = to;
        c.record.updated_at_ms = now_ms;
        c.record.revision += 1;
        Ok(CampaignChange::Done)
    }

    async fn campaign_numbers(&self, campaign_id: &CampaignId) -> StoreResult<Vec<NumberState>> {
        Ok(self
            .lock()
            .campaign_records
            .get(campaign_id)
            .map(|c| c.numbers.clone())
            .unwrap_or_default())
    }

    async fn active_campaigns(&self) -> StoreResult<Vec<CampaignId>> {
        let s = self.lock();
        let mut ids: Vec<CampaignId> = s
            .campaign_records
            .values()
            .filter(|c| !c.record.settled)
            .map(|c| c.record.campaign_id.clone())
            .collect();
        ids.sort();
        Ok(ids)
    }

    async fn campaign_lease(
        &self,
        campaign_id: &CampaignId,
        holder: &str,
        now_ms: i64,
        lease_ms: i64,
    ) -> StoreResult<Option<u64>> {
        let mut s = self.lock();
        let Some(c) = s.campaign_records.get_mut(campaign_id) else {
            return Ok(None);
        };
        if c.holder != holder {
            if !c.holder.is_empty() && c.until_ms > now_ms {
                return Ok(None);
            }
            c.fence += 1;
            c.holder = holder.to_owned();
        }
        c.until_ms = now_ms + lease_ms;
        Ok(Some(c.fence))
    }

    async fn write_campaign_numbers(
        &self,
        campaign_id: &CampaignId,
        fence: u64,
        numbers: &[(u32, NumberState)],
    ) -> StoreResult<bool> {
        let mut s = self.lock();
        let Some(c) = s.campaign_records.get_mut(campaign_id) else {
            return Ok(false);
        };
        if c.fence != fence {
            return Ok(false);
        }
        for (i, n) in numbers {
            if let Some(slot) = c.numbers.get_mut(*i as usize) {
                *slot = n.clone();
            }
        }
        if !numbers.is_empty() {
            c.record.revision += 1;
        }
        Ok(true)
    }

    async fn settle_campaign(
        &self,
        campaign_id: &CampaignId,
        fence: u64,
        numbers: u32,
        now_ms: i64,
    ) -> StoreResult<bool> {
        let mut s = self.lock();
        let Some(c) = s.campaign_records.get_mut(campaign_id) else {
            return Ok(false);
        };
        if c.record.settled {
            return Ok(true);
        }
        if c.fence != fence || c.record.numbers != numbers {
            return Ok(false);
        }
        match c.record.state {
            pb::CampaignState::Running => {
                c.record.state = pb::CampaignState::Completed;
                c.record.updated_at_ms = now_ms;
            }
            pb::CampaignState::Canceled => {}
            _ => return Ok(false),
        }
        c.record.settled = true;
        c.record.revision += 1;
        Ok(true)
    }

    async fn set_do_not_call(&self, numbers: &[String], listed: bool) -> StoreResult<()> {
        let mut s = self.lock();
        for n in numbers {
            if listed {
                s.do_not_call.insert(n.clone());
            } else {
                s.do_not_call.remove(n);
            }
        }
        Ok(())
    }

    async fn do_not_call(&self, numbers: &[String]) -> StoreResult<Vec<bool>> {
        let s = self.lock();
        Ok(numbers.iter().map(|n| s.do_not_call.contains(n)).collect())
    }

    async fn ping(&self) -> StoreResult<Duration> {
        Ok(Duration::ZERO)
    }
}

/// One event under the store's lock: the in-memory twin of one turn of the Redis
/// append script.
fn append_one(
    s: &mut State,
    call_id: &CallId,
    event: &pb::CallEvent,
    effects: &EventEffects,
) -> AppendOutcome {
    let State {
        calls,
        events,
        leases,
        ..
    } = s;
    let Some(call) = calls.get_mut(call_id) else {
        return AppendOutcome::NotFound;
    };
    if event.seq <= call.last_seq {
        return AppendOutcome::Duplicate;
    }
    if event.seq > call.last_seq + 1 {
        return AppendOutcome::Gap {
            last_seq: call.last_seq,
        };
    }
    if let Some(before) = effects.require_lease_expired_before
        && (call.lease_until_ms == 0 || call.lease_until_ms >= before || is_final(call.status))
    {
        return AppendOutcome::ConditionFailed;
    }
    if let Some(holder) = &effects.require_holder
        && call.lease_holder.as_ref().is_some_and(|h| h != holder)
    {
        return AppendOutcome::ConditionFailed;
    }
    events
        .entry(call_id.clone())
        .or_default()
        .push(event.clone());
    call.last_seq = event.seq;
    apply_effects(call, effects);
    if is_final(call.status) {
        leases.remove(call_id);
    }
    AppendOutcome::Stored
}

/// The in-memory twin of the effects part of the Redis append script.
fn apply_effects(call: &mut CallRecord, effects: &EventEffects) {
    if let Some(usage) = &effects.usage {
        for (total, add) in call.usage.iter_mut().zip(usage) {
            *total += add;
        }
    }
    if let Some(started) = &effects.started {
        if call.started_at_ms == 0 {
            call.started_at_ms = effects.at_ms;
        }
        // Only what the event carries overwrites what the call has.
        if started.twilio_call_sid.is_some() {
            call.twilio_call_sid.clone_from(&started.twilio_call_sid);
        }
        if started.stream_sid.is_some() {
            call.stream_sid.clone_from(&started.stream_sid);
        }
        if started.relay_id.is_some() {
            call.relay_id.clone_from(&started.relay_id);
        }
        if !is_final(call.status) {
            call.end_reason = None;
            call.end_detail = None;
        }
    }
    if effects.handoff && !is_final(call.status) {
        call.end_reason = Some(pb::EndReason::Handoff);
    }
    if let Some(new) = effects.new_status
        && status_rank(new) > status_rank(call.status)
    {
        call.status = new;
        if is_final(new) {
            call.ended_at_ms = effects.at_ms;
            call.lease_holder = None;
            if let Some(ended) = &effects.ended {
                call.end_reason = Some(ended.reason).filter(|r| *r != pb::EndReason::Unspecified);
                call.end_detail = Some(ended.detail.clone()).filter(|d| !d.is_empty());
                call.transfer_to = Some(ended.transfer_to.clone()).filter(|t| !t.is_empty());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::call::event_effects;

    fn id(s: &str) -> CallId {
        CallId::parse("call_id", s).expect("valid")
    }

    fn holder(s: &str) -> LeaseHolder {
        let (replica, stream) = s.split_once('/').expect("replica/stream");
        LeaseHolder::new(replica, stream)
    }

    fn relay(s: &str) -> RelayId {
        RelayId::parse("relay_id", s).expect("valid")
    }

    fn store() -> MemoryStore {
        MemoryStore::new(Arc::new(Hub::new()), "replica-1")
    }

    fn call(call_id: &str) -> CallRecord {
        CallRecord::new(
            id(call_id),
            AgentId::parse("agent_id", "a").expect("valid"),
            pb::Direction::Outbound,
            pb::CallStatus::Created,
            1,
        )
    }

    fn ev(seq: u64, kind: pb::call_event::Kind) -> pb::CallEvent {
        pb::CallEvent {
            call_id: "c1".into(),
            seq,
            at_ms: 100,
            kind: Some(kind),
        }
    }

    async fn append_one_event(
        s: &MemoryStore,
        e: &pb::CallEvent,
        effects: &EventEffects,
    ) -> AppendOutcome {
        let outcomes = s
            .append_events(
                &id(&e.call_id),
                None,
                std::slice::from_ref(e),
                std::slice::from_ref(effects),
            )
            .await
            .expect("memory store");
        assert_eq!(outcomes.len(), 1, "one event, one outcome");
        outcomes[0]
    }

    async fn append(s: &MemoryStore, e: pb::CallEvent) -> AppendOutcome {
        let effects = event_effects(&e).expect("valid");
        append_one_event(s, &e, &effects).await
    }

    fn usage(total: u64) -> pb::call_event::Kind {
        pb::call_event::Kind::Usage(pb::Usage {
            total_tokens: total,
            ..Default::default()
        })
    }

    fn end(reason: pb::EndReason) -> pb::call_event::Kind {
        pb::call_event::Kind::Ended(pb::Ended {
            reason: reason as i32,
            ..Default::default()
        })
    }

    #[tokio::test]
    async fn events_are_stored_once_and_gaps_refused() {
        let s = store();
        s.create_calls(&[call("c1")]).await.expect("created");
        assert_eq!(append(&s, ev(1, usage(5))).await, AppendOutcome::Stored);
        assert_eq!(append(&s, ev(1, usage(5))).await, AppendOutcome::Duplicate);
        assert_eq!(
            append(&s, ev(3, usage(5))).await,
            AppendOutcome::Gap { last_seq: 1 }
        );
        assert_eq!(append(&s, ev(2, usage(7))).await, AppendOutcome::Stored);
        let c = s.get_call(&id("c1")).await.expect("ok").expect("exists");
        assert_eq!(c.last_seq, 2);
        assert_eq!(c.usage[2], 12, "the duplicate was not counted");
        assert_eq!(c.usage[8], 2);
        let stored = s.read_events(&id("c1"), 0, 10).await.expect("read");
        assert_eq!(stored.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![1, 2]);
    }

    #[tokio::test]
    async fn status_moves_one_way_only() {
        let s = store();
        s.create_calls(&[call("c1")]).await.expect("created");
        let started = pb::call_event::Kind::Started(pb::Started::default());
        append(&s, ev(1, started.clone())).await;
        append(&s, ev(2, end(pb::EndReason::CallerHangup))).await;
        append(&s, ev(3, started)).await;
        append(&s, ev(4, end(pb::EndReason::InternalError))).await;
        let c = s.get_call(&id("c1")).await.expect("ok").expect("exists");
        assert_eq!(c.status, pb::CallStatus::Completed);
        assert_eq!(
            c.end_reason,
            Some(pb::EndReason::CallerHangup),
            "the first end wins"
        );
        assert_eq!(
            s.admit_existing(&id("c1"), None, "", "").await.expect("ok"),
            AdmitOutcome::Ended
        );
    }

    #[tokio::test]
    async fn leases_have_one_holder_except_for_a_reconnecting_relay() {
        let s = store();
        s.create_calls(&[call("c1")]).await.expect("created");
        let attach = |by: &'static str, reconnect: bool, stream: &'static str| {
            let s = s.clone();
            async move {
                s.attach(
                    &id("c1"),
                    &relay(by),
                    reconnect,
                    &holder(stream),
                    1000,
                    500,
                    &AttachChecks::default(),
                )
                .await
                .expect("ok")
            }
        };
        assert_eq!(attach("r1", false, "x/1").await, AttachOutcome::Attached);
        assert_eq!(attach("r2", false, "x/2").await, AttachOutcome::Held);
        assert_eq!(attach("r2", true, "x/2").await, AttachOutcome::Held);
        assert_eq!(attach("r1", true, "y/3").await, AttachOutcome::Attached);
        // The replaced holder can no longer renew.
        assert!(
            !s.renew_lease(&id("c1"), &holder("x/1"), 1100, 500)
                .await
                .expect("ok")
        );
        assert!(
            s.renew_lease(&id("c1"), &holder("y/3"), 1100, 500)
                .await
                .expect("ok")
        );
        assert_eq!(
            s.attach(
                &id("nope"),
                &relay("r1"),
                false,
                &holder("x/1"),
                0,
                1,
                &AttachChecks::default()
            )
            .await
            .expect("ok"),
            AttachOutcome::NotFound
        );
        // After the lease runs out anyone may attach.
        assert_eq!(
            s.attach(
                &id("c1"),
                &relay("r9"),
                false,
                &holder("z/9"),
                5000,
                500,
                &AttachChecks::default()
            )
            .await
            .expect("ok"),
            AttachOutcome::Attached
        );
    }

    #[tokio::test]
    async fn relay_lost_is_recorded_once_and_only_after_the_lease() {
        let s = store();
        s.create_calls(&[call("c1")]).await.expect("created");
        s.attach(
            &id("c1"),
            &relay("r1"),
            false,
            &holder("x/1"),
            1000,
            500,
            &AttachChecks::default(),
        )
        .await
        .expect("ok");
        let lost = ev(1, end(pb::EndReason::RelayLost));
        let mut effects = event_effects(&lost).expect("valid");
        effects.require_lease_expired_before = Some(1200);
        assert_eq!(
            append_one_event(&s, &lost, &effects).await,
            AppendOutcome::ConditionFailed,
            "lease still running"
        );
        effects.require_lease_expired_before = Some(2000);
        assert_eq!(
            append_one_event(&s, &lost, &effects).await,
            AppendOutcome::Stored
        );
        assert_eq!(
            append_one_event(&s, &lost, &effects).await,
            AppendOutcome::Duplicate
        );
        let c = s.get_call(&id("c1")).await.expect("ok").expect("exists");
        assert_eq!(c.status, pb::CallStatus::Failed);
        assert_eq!(c.end_reason, Some(pb::EndReason::RelayLost));
        assert!(s.expired_leases(i64::MAX, 10).await.expect("ok").is_empty());
    }

    #[tokio::test]
    async fn index_pages_newest_first_with_ties() {
        let s = store();
        let calls: Vec<CallRecord> = (0..5)
            .map(|i| CallRecord {
                created_at_ms: if i < 3 { 10 } else { 20 },
                ..call(&format!("c{i}"))
            })
            .collect();
        s.create_calls(&calls).await.expect("created");
        let first = s
            .scan_index(
                None,
                IndexCursor {
                    score: i64::MAX,
                    skip: 0,
                },
                i64::MIN,
                3,
            )
            .await
            .expect("ok");
        assert_eq!(
            first.iter().map(|(c, _)| c.as_str()).collect::<Vec<_>>(),
            vec!["c4", "c3", "c2"]
        );
        let rest = s
            .scan_index(None, IndexCursor { score: 10, skip: 1 }, i64::MIN, 10)
            .await
            .expect("ok");
        assert_eq!(
            rest.iter().map(|(c, _)| c.as_str()).collect::<Vec<_>>(),
            vec!["c1", "c0"]
        );
    }

    #[tokio::test]
    async fn commands_reach_only_this_replica() {
        let hub = Arc::new(Hub::new());
        let s = MemoryStore::new(hub.clone(), "replica-1");
        let (tx, mut rx) = tokio::sync::mpsc::channel(4);
        hub.register(&id("c1"), &holder("replica-1/s"), tx);
        let cmd = pb::Command {
            command_id: "k".into(),
            kind: None,
        };
        assert!(
            !s.publish_command("replica-2", &id("c1"), &cmd)
                .await
                .expect("ok")
        );
        assert!(
            s.publish_command("replica-1", &id("c1"), &cmd)
                .await
                .expect("ok")
        );
        assert_eq!(rx.try_recv().expect("delivered").command_id, "k");
        hub.unregister(&id("c1"), &holder("someone-else/s"));
        assert_eq!(hub.attached_count(), 1, "only the holder unregisters");
    }
}

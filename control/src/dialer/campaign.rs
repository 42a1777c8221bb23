//! The campaign dialer: on every replica a loop looks at the active campaigns, and for
//! each one whose dialer lease it holds (one replica at a time, fenced: see
//! [`CallStore::campaign_lease`]) it paces new calls, follows the ones in flight to their
//! outcome, retries per the policy, and settles the campaign when every number has one.
//!
//! One attempt, idempotently: the number is written `Placed` with a fresh call id (the
//! attempt's request key) and the call record is stored, both *before* Twilio is asked.
//! A dialer that takes a campaign over finds an attempt that is placed but has no Twilio
//! sid on its call and asks Twilio (calls to the number) whether it has it: if so the
//! call is adopted, else, once the old holder's create can no longer be in flight, it is
//! created. So a number is dialled at most once per attempt.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use callbridge_proto::pb;

use crate::domain::call::{is_final, now_ms};
use crate::domain::calling_window::WindowClock;
use crate::domain::campaign::{self as rules, NumberState, Outcome, Pacer, Phase};
use crate::domain::ids::{AgentId, CallId, CallSid, CampaignId};
use crate::domain::record::CallRecord;
use crate::domain::twilio::TwilioCallStatus;
use crate::error::Error;
use crate::service::Shared;
use crate::store::CallStore;

/// How often the loop looks at its campaigns. Each look takes every start slot inside the
/// next tick, and each start waits for its slot: the pace is kept finer than the tick.
const TICK: Duration = Duration::from_millis(50);

/// How long an attempt may stay without word from Twilio before Twilio is asked about
/// it, and how often it is asked again.
const RECONCILE_AFTER_MS: i64 = 2000;

/// How long an ended call whose final Twilio status has not arrived still counts as live.
const TWILIO_END_GRACE_MS: i64 = 5000;

/// What this replica keeps about a campaign while it holds its lease.
struct Local {
    fence: u64,
    pacer: Pacer,
    /// The numbers as last written under `fence` (only the holder writes them).
    numbers: Vec<NumberState>,
    /// When each unrecorded attempt was last looked up at Twilio (ms).
    looked_up: HashMap<String, i64>,
    /// The campaign's calling window, per number's zone.
    clock: WindowClock,
}

/// Calls this replica is asking Twilio about right now (create or reconcile), shared with
/// the tasks doing it.
type Busy = Arc<Mutex<HashSet<String>>>;

fn busy_insert(busy: &Busy, call_id: &str) -> bool {
    busy.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .insert(call_id.to_owned())
}

fn busy_contains(busy: &Busy, call_id: &str) -> bool {
    busy.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .contains(call_id)
}

fn busy_remove(busy: &Busy, call_id: &str) {
    busy.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .remove(call_id);
}

/// The longest a create can stay in flight at the REST client (every try times out,
/// with the longest backoff between): after that an unrecorded attempt of a previous
/// holder cannot still reach Twilio.
fn create_deadline_ms<S>(shared: &Shared<S>) -> i64 {
    shared.config.twilio.as_ref().map_or(0, |t| {
        let tries = t.max_retries + 1;
        let worst = t.timeout * tries + t.backoff_max * t.max_retries;
        i64::try_from(worst.as_millis()).unwrap_or(i64::MAX) + 1000
    })
}

/// Runs until shutdown; does nothing on a replica that cannot dial.
pub(crate) async fn run<S: CallStore>(shared: Arc<Shared<S>>) {
    if super::dialer(&shared).is_err() {
        return;
    }
    // Unique per process: a restarted replica with the same id is another holder.
    let holder = format!(
        "{}/{}",
        shared.config.control_id,
        uuid::Uuid::new_v4().simple()
    );
    let lease_ms = i64::try_from(shared.config.lease.as_millis()).unwrap_or(i64::MAX);
    let mut held: HashMap<CampaignId, Local> = HashMap::new();
    let busy: Busy = Arc::default();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shared.shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let active = match shared.store.active_campaigns().await {
            Ok(ids) => ids,
            Err(err) => {
                tracing::debug!(error = %err, "Campaigns not readable; retrying next tick.");
                continue;
            }
        };
        held.retain(|id, _| active.contains(id));
        for campaign_id in active {
            match step(&shared, &holder, lease_ms, &campaign_id, &mut held, &busy).await {
                Ok(()) => {}
                Err(err) => {
                    // The next tick starts again from the store.
                    held.remove(&campaign_id);
                    tracing::warn!(%campaign_id, error = %err, "Campaign dialer step failed.");
                }
            }
        }
    }
}

/// One look at one campaign.
async fn step<S: CallStore>(
    shared: &Arc<Shared<S>>,
    holder: &str,
    lease_ms: i64,
    campaign_id: &CampaignId,
    held: &mut HashMap<CampaignId, Local>,
    busy: &Busy,
) -> Result<(), Error> {
    let now = now_ms();
    // The same moment on the monotonic clock: start slots are offsets from it.
    let now_instant = tokio::time::Instant::now();
    let tick_ms = i64::try_from(TICK.as_millis()).unwrap_or(50);
    let Some(fence) = shared
        .store
        .campaign_lease(campaign_id, holder, now, lease_ms)
        .await?
    else {
        held.remove(campaign_id);
        return Ok(());
    };
    let Some(record) = shared.store.get_campaign(campaign_id).await? else {
        held.remove(campaign_id);
        return Ok(());
    };
    if record.settled {
        // Settling again only takes it off the active list.
        shared
            .store
            .settle_campaign(campaign_id, fence, record.numbers, now)
            .await?;
        held.remove(campaign_id);
        return Ok(());
    }
    let stale = held
        .get(campaign_id)
        .is_none_or(|l| l.fence != fence || l.numbers.len() != record.numbers as usize);
    if stale {
        let numbers = shared.store.campaign_numbers(campaign_id).await?;
        let pacer = match held.remove(campaign_id) {
            // Same holder, more numbers: the pace goes on.
            Some(l) if l.fence == fence => l.pacer,
            _ => {
                tracing::info!(%campaign_id, fence, "Dialing campaign (lease taken).");
                Pacer::new(record.settings.calls_per_second, now)
            }
        };
        held.insert(
            campaign_id.clone(),
            Local {
                fence,
                pacer,
                numbers,
                looked_up: HashMap::new(),
                clock: WindowClock::new(&record.settings),
            },
        );
    }
    let Some(local) = held.get_mut(campaign_id) else {
        return Ok(());
    };
    local.pacer.set_rate(record.settings.calls_per_second);
    let settings = &record.settings;
    let canceled = record.state == pb::CampaignState::Canceled;
    let mut updates: Vec<(u32, NumberState)> = Vec::new();

    // Attempts in flight: their calls' outcomes.
    let placed: Vec<(usize, CallId, i64)> = local
        .numbers
        .iter()
        .enumerate()
        .filter_map(|(i, n)| match &n.phase {
            Phase::Placed {
                call_id,
                claimed_at_ms,
            } => Some((i, CallId::from_stored(call_id.clone()), *claimed_at_ms)),
            _ => None,
        })
        .collect();
    let ids: Vec<CallId> = placed.iter().map(|(_, id, _)| id.clone()).collect();
    let calls = shared.store.get_calls(&ids).await?;
    for ((i, call_id, claimed_at_ms), call) in placed.into_iter().zip(calls) {
        let number = &local.numbers[i];
        let mut next = number.clone();
        match call {
            // The claim was written, the call record was not: Twilio was never asked,
            // so the attempt did not happen.
            None => {
                next.attempts = next.attempts.saturating_sub(1);
                next.phase = Phase::Pending { not_before_ms: 0 };
            }
            // Ended here but not yet at Twilio (a stream's end comes before Twilio's
            // `completed` callback): the slot stays taken a little longer, so Twilio never
            // sees more live calls than the limit.
            Some(call)
                if is_final(call.status)
                    && !call.twilio_status.is_some_and(TwilioCallStatus::is_final)
                    && now.saturating_sub(call.ended_at_ms) < TWILIO_END_GRACE_MS =>
            {
                continue;
            }
            Some(call) if is_final(call.status) => {
                next.phase = match rules::after_attempt(settings, number, &call, now) {
                    Phase::Pending { .. } if canceled => Phase::Done {
                        outcome: rules::attempt_outcome(&call),
                    },
                    Phase::Pending { not_before_ms } => {
                        // Reconciliation of later attempts skips this call's sid.
                        next.previous.push(call_id.to_string());
                        Phase::Pending { not_before_ms }
                    }
                    done => done,
                };
            }
            Some(call) => {
                let unrecorded = call.twilio_call_sid.is_none() && call.twilio_status.is_none();
                // Twilio's first callback usually records the call: ask Twilio only about
                // an attempt that stayed unrecorded a while, and not on every tick.
                let last = local.looked_up.get(call_id.as_str()).copied();
                let due = now.saturating_sub(claimed_at_ms) >= RECONCILE_AFTER_MS
                    && last.is_none_or(|at| now.saturating_sub(at) >= RECONCILE_AFTER_MS);
                if unrecorded && due && !busy_contains(busy, call_id.as_str()) {
                    local.looked_up.insert(call_id.to_string(), now);
                    reconcile(shared, busy, &call, number, settings, claimed_at_ms, now);
                }
                continue;
            }
        }
        updates.push((index(i), next));
    }
    apply(&mut local.numbers, &updates);

    // Canceled: what is not dialled yet ends now.
    if canceled {
        for (i, n) in local.numbers.iter().enumerate() {
            if let Phase::Pending { .. } = n.phase {
                let mut next = n.clone();
                next.phase = Phase::Done {
                    outcome: Outcome::Canceled,
                };
                updates.push((index(i), next));
            }
        }
        apply(&mut local.numbers, &updates);
    }

    // New attempts, paced, up to the concurrency limit.
    // (number index, its new state, the attempt's call, its start slot in ms)
    let mut claims: Vec<(u32, NumberState, CallRecord, i64)> = Vec::new();
    if record.state == pb::CampaignState::Running {
        let mut in_flight = local
            .numbers
            .iter()
            .filter(|n| n.placed_call().is_some())
            .count();
        let max = settings.max_concurrent as usize;
        // A number outside its calling window stays pending; the ones behind it go on.
        let clock = &mut local.clock;
        let due: Vec<usize> = local
            .numbers
            .iter()
            .enumerate()
            .filter(|(_, n)| matches!(n.phase, Phase::Pending { not_before_ms } if not_before_ms <= now))
            .filter(|(_, n)| clock.is_open(&n.time_zone, now))
            .map(|(i, _)| i)
            .collect();
        let agent_id = AgentId::from_stored(settings.agent_id.clone());
        for i in due {
            if in_flight >= max || local.pacer.wait_ms(now) >= tick_ms {
                break;
            }
            let number = &local.numbers[i];
            if shared
                .store
                .do_not_call(std::slice::from_ref(&number.to))
                .await?
                .first()
                .copied()
                .unwrap_or(false)
            {
                let mut next = number.clone();
                next.phase = Phase::Done {
                    outcome: Outcome::DoNotCall,
                };
                updates.push((index(i), next));
                continue;
            }
            let Some(slot) = local.pacer.slot_before(now, now + tick_ms) else {
                break;
            };
            let call_id = rules::attempt_call_id();
            let mut next = number.clone();
            next.attempts += 1;
            next.phase = Phase::Placed {
                call_id: call_id.to_string(),
                claimed_at_ms: now,
            };
            let call = CallRecord {
                from: settings.from.clone(),
                to: number.to.clone(),
                campaign_id: Some(campaign_id.clone()),
                metadata: number.meta.clone(),
                dialed: true,
                ..CallRecord::new(
                    call_id,
                    agent_id.clone(),
                    pb::Direction::Outbound,
                    pb::CallStatus::Created,
                    now,
                )
            };
            claims.push((index(i), next, call, slot));
            in_flight += 1;
        }
    }
    updates.extend(claims.iter().map(|(i, n, _, _)| (*i, n.clone())));
    apply(&mut local.numbers, &updates);

    // The claims are stored before any create: they are the attempts' request keys.
    if !shared
        .store
        .write_campaign_numbers(campaign_id, fence, &updates)
        .await?
    {
        tracing::info!(%campaign_id, "Campaign lease lost; another replica dials it.");
        held.remove(campaign_id);
        return Ok(());
    }
    if !claims.is_empty() {
        let records: Vec<CallRecord> = claims.iter().map(|(_, _, c, _)| c.clone()).collect();
        shared.store.create_calls(&records).await?;
        let dial = settings.dial.clone().unwrap_or_default();
        for (call, (_, _, _, slot)) in records.into_iter().zip(&claims) {
            busy_insert(busy, call.call_id.as_str());
            let shared = shared.clone();
            let busy = busy.clone();
            let dial = dial.clone();
            let start_at =
                now_instant + Duration::from_millis(u64::try_from(slot - now).unwrap_or(0));
            shared.tracker.clone().spawn(async move {
                tokio::time::sleep_until(start_at).await;
                if let Err(err) = super::place(&shared, &call, &dial).await {
                    tracing::warn!(call_id = %call.call_id, error = %err, "Campaign call not placed.");
                }
                busy_remove(&busy, call.call_id.as_str());
            });
        }
    }

    let open = local
        .numbers
        .iter()
        .any(|n| !matches!(n.phase, Phase::Done { .. }));
    if !open
        && matches!(
            record.state,
            pb::CampaignState::Running | pb::CampaignState::Canceled
        )
        && shared
            .store
            .settle_campaign(campaign_id, fence, record.numbers, now)
            .await?
    {
        tracing::info!(%campaign_id, state = ?record.state, "Campaign settled: every number has its outcome.");
        held.remove(campaign_id);
    }
    Ok(())
}

fn index(i: usize) -> u32 {
    u32::try_from(i).unwrap_or(u32::MAX)
}

fn apply(numbers: &mut [NumberState], updates: &[(u32, NumberState)]) {
    for (i, n) in updates {
        if let Some(slot) = numbers.get_mut(*i as usize) {
            *slot = n.clone();
        }
    }
}

/// An attempt placed by an earlier holder (or by this replica before a failure) whose
/// call has no word from Twilio: adopt Twilio's call if it has one, else create it once
/// the earlier create cannot still be in flight.
fn reconcile<S: CallStore>(
    shared: &Arc<Shared<S>>,
    busy: &Busy,
    call: &CallRecord,
    number: &NumberState,
    settings: &pb::CampaignSettings,
    claimed_at_ms: i64,
    now: i64,
) {
    if !busy_insert(busy, call.call_id.as_str()) {
        return;
    }
    let shared = shared.clone();
    let busy = busy.clone();
    let call = call.clone();
    let previous: Vec<CallId> = number
        .previous
        .iter()
        .cloned()
        .map(CallId::from_stored)
        .collect();
    let dial = settings.dial.clone().unwrap_or_default();
    let may_create = now.saturating_sub(claimed_at_ms) > create_deadline_ms(&shared);
    shared.tracker.clone().spawn(async move {
        if let Err(err) = adopt_or_create(&shared, &call, &previous, &dial, may_create).await {
            tracing::warn!(call_id = %call.call_id, error = %err, "Campaign call not reconciled; trying again.");
        }
        busy_remove(&busy, call.call_id.as_str());
    });
}

async fn adopt_or_create<S: CallStore>(
    shared: &Shared<S>,
    call: &CallRecord,
    previous: &[CallId],
    dial: &pb::DialOptions,
    may_create: bool,
) -> Result<(), Error> {
    let (twilio, _) = super::dialer(shared)?;
    let mut known: HashSet<String> = HashSet::new();
    for earlier in shared
        .store
        .get_calls(previous)
        .await?
        .into_iter()
        .flatten()
    {
        if let Some(sid) = earlier.twilio_call_sid {
            known.insert(sid.as_str().to_owned());
        }
    }
    let listed =
        twilio
            .list_calls_to(&call.to)
            .await
            .map_err(|source| Error::TwilioUnavailable {
                call_id: call.call_id.to_string(),
                source,
            })?;
    // Our own call may have been recorded meanwhile (a status callback).
    let fresh = shared.call(&call.call_id).await?;
    if fresh.twilio_call_sid.is_some() || fresh.twilio_status.is_some() {
        return Ok(());
    }
    if let Some(found) = listed.into_iter().find(|c| !known.contains(&c.sid)) {
        tracing::info!(call_id = %call.call_id, sid = %found.sid, "Adopting the call Twilio placed for an unrecorded attempt.");
        let report = super::Report {
            call_id: Some(call.call_id.clone()),
            sid: CallSid::parse("sid", found.sid).ok(),
            status: TwilioCallStatus::from_name(&found.status),
            sequence_number: 0,
            call_duration_secs: 0,
            sip_response_code: 0,
            answered_by: found.answered_by,
            error: None,
        };
        super::apply_report(shared, &report).await?;
        return Ok(());
    }
    if may_create {
        tracing::info!(call_id = %call.call_id, "Twilio has no call for an unrecorded attempt; placing it.");
        super::place(shared, call, dial).await?;
    }
    Ok(())
}

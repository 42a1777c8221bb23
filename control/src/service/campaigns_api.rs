//! The campaign RPCs of `callbridge.v1.Calls`: proto ⇄ domain, and the store's answers
//! turned into errors. The dialing itself is `dialer::campaign`'s.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use callbridge_proto::pb;
use tokio::sync::mpsc;
use tonic::Status;

use super::Shared;
use crate::domain::call::now_ms;
use crate::domain::calling_window::WindowClock;
use crate::domain::campaign::{self as rules, Action, CampaignRecord, NumberState};
use crate::domain::ids::{AgentId, CampaignId};
use crate::error::Error;
use crate::store::{AddNumbers, CallStore, CampaignChange};

/// How often a `WatchCampaign` stream looks at the store. The dialer may run on another
/// replica and its writes are not on the bus, so the watcher polls: the campaign's small
/// record each time, its numbers only when the record's revision moved. Also the longest
/// a change waits before it is sent, and what coalesces a burst of changes into one.
const WATCH_POLL: Duration = Duration::from_millis(250);

/// A campaign that must exist, with its progress.
pub(crate) async fn get<S: CallStore>(
    shared: &Shared<S>,
    campaign_id: &CampaignId,
) -> Result<pb::Campaign, Error> {
    let record = shared
        .store
        .get_campaign(campaign_id)
        .await?
        .ok_or_else(|| Error::CampaignNotFound(campaign_id.to_string()))?;
    let numbers = shared.store.campaign_numbers(campaign_id).await?;
    Ok(with_progress(&record, &numbers, now_ms()))
}

/// The public view of a campaign with its numbers at `now`.
pub(crate) fn with_progress(
    record: &CampaignRecord,
    numbers: &[NumberState],
    now: i64,
) -> pb::Campaign {
    let mut progress = rules::progress(numbers);
    progress.waiting_for_window = WindowClock::new(&record.settings).waiting(numbers, now);
    record.to_pb(progress)
}

/// `CreateCampaign`.
pub(crate) async fn create<S: CallStore>(
    shared: &Shared<S>,
    req: pb::CreateCampaignRequest,
) -> Result<pb::Campaign, Error> {
    let campaign_id = if req.campaign_id.is_empty() {
        CampaignId::parse(
            "campaign_id",
            crate::domain::ids::CallId::generate().to_string(),
        )?
    } else {
        CampaignId::parse("campaign_id", req.campaign_id)?
    };
    let settings = req
        .settings
        .ok_or_else(|| Error::invalid("settings", "required"))?;
    rules::check_settings(&settings)?;
    let agent_id = AgentId::parse("settings.agent_id", settings.agent_id.clone())?;
    shared.agent(&agent_id).await?;
    // Refused now rather than at the first dial.
    crate::dialer::dialer(shared)?;
    let now = now_ms();
    let record = CampaignRecord {
        campaign_id: campaign_id.clone(),
        settings,
        state: pb::CampaignState::Draft,
        created_at_ms: now,
        updated_at_ms: now,
        numbers: 0,
        settled: false,
        revision: 0,
    };
    if !shared.store.create_campaign(&record).await? {
        return Err(Error::CampaignExists(campaign_id.to_string()));
    }
    tracing::info!(%campaign_id, "Campaign created.");
    Ok(record.to_pb(pb::CampaignProgress::default()))
}

/// `AddCampaignNumbers`.
pub(crate) async fn add_numbers<S: CallStore>(
    shared: &Shared<S>,
    req: pb::AddCampaignNumbersRequest,
) -> Result<pb::AddCampaignNumbersResponse, Error> {
    let campaign_id = CampaignId::parse("campaign_id", req.campaign_id)?;
    rules::check_numbers(&req.numbers)?;
    let numbers: Vec<NumberState> = req
        .numbers
        .into_iter()
        .map(|n| NumberState {
            time_zone: n.time_zone,
            ..NumberState::new(n.number, n.metadata.into_iter().collect::<BTreeMap<_, _>>())
        })
        .collect();
    let added = u32::try_from(numbers.len()).unwrap_or(u32::MAX);
    match shared
        .store
        .add_campaign_numbers(&campaign_id, &numbers)
        .await?
    {
        AddNumbers::Added(total) => Ok(pb::AddCampaignNumbersResponse {
            added,
            numbers: total,
        }),
        AddNumbers::NotFound => Err(Error::CampaignNotFound(campaign_id.to_string())),
        AddNumbers::Closed(state) => Err(Error::CampaignState {
            campaign_id: campaign_id.to_string(),
            current: rules::state_name(state),
            action: "add numbers to",
        }),
    }
}

/// `Start`/`Pause`/`Resume`/`CancelCampaign`.
pub(crate) async fn change<S: CallStore>(
    shared: &Shared<S>,
    req: pb::CampaignRequest,
    action: Action,
) -> Result<pb::Campaign, Error> {
    let campaign_id = CampaignId::parse("campaign_id", req.campaign_id)?;
    let (from, to) = action.edge();
    match shared
        .store
        .change_campaign(&campaign_id, from, to, now_ms())
        .await?
    {
        CampaignChange::Done => {
            tracing::info!(%campaign_id, action = action.name(), "Campaign state changed.");
            get(shared, &campaign_id).await
        }
        CampaignChange::NotFound => Err(Error::CampaignNotFound(campaign_id.to_string())),
        CampaignChange::Refused(current) => Err(rules::wrong_state(&campaign_id, current, action)),
    }
}

/// `AddDoNotCall` / `RemoveDoNotCall`.
pub(crate) async fn do_not_call<S: CallStore>(
    shared: &Shared<S>,
    req: pb::DoNotCallRequest,
    listed: bool,
) -> Result<pb::DoNotCallResponse, Error> {
    if req.numbers.is_empty() || req.numbers.len() > rules::MAX_NUMBERS_PER_REQUEST {
        return Err(Error::invalid(
            "numbers",
            format!(
                "{} numbers; 1..={} per request",
                req.numbers.len(),
                rules::MAX_NUMBERS_PER_REQUEST
            ),
        ));
    }
    for (i, n) in req.numbers.iter().enumerate() {
        crate::validate::e164(&format!("numbers[{i}]"), n)?;
    }
    shared.store.set_do_not_call(&req.numbers, listed).await?;
    Ok(pb::DoNotCallResponse {})
}

/// A campaign that must exist, and its numbers (what a watch starts from).
pub(crate) async fn snapshot<S: CallStore>(
    shared: &Shared<S>,
    campaign_id: &CampaignId,
) -> Result<(CampaignRecord, Vec<NumberState>), Error> {
    let record = shared
        .store
        .get_campaign(campaign_id)
        .await?
        .ok_or_else(|| Error::CampaignNotFound(campaign_id.to_string()))?;
    let numbers = shared.store.campaign_numbers(campaign_id).await?;
    Ok((record, numbers))
}

/// One `WatchCampaign` stream: the campaign now, then each time its view changes, until
/// it has settled. `tx` holds one message: while the reader has not taken it, newer views
/// replace the one not sent (the reader gets the latest, the store reads go on at their
/// pace, and the dialer never waits for anyone). The last view is always delivered.
pub(crate) async fn watch<S: CallStore>(
    shared: Arc<Shared<S>>,
    campaign_id: CampaignId,
    (mut record, mut numbers): (CampaignRecord, Vec<NumberState>),
    tx: mpsc::Sender<Result<pb::Campaign, Status>>,
) {
    let mut sent: Option<pb::Campaign> = None;
    let mut poll = tokio::time::interval(WATCH_POLL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let view = with_progress(&record, &numbers, now_ms());
        if record.settled {
            if sent.as_ref() != Some(&view) {
                let _ = tx.send(Ok(view)).await;
            }
            return;
        }
        if sent.as_ref() != Some(&view) {
            match tx.try_send(Ok(view.clone())) {
                Ok(()) => sent = Some(view),
                // The reader has not taken the last one: try the newest next time.
                Err(mpsc::error::TrySendError::Full(_)) => {}
                Err(mpsc::error::TrySendError::Closed(_)) => return,
            }
        }
        tokio::select! {
            () = shared.shutdown.cancelled() => {
                let _ = tx.send(Err(Error::ShuttingDown { then: "; watch again" }.into())).await;
                return;
            }
            () = tx.closed() => return,
            _ = poll.tick() => {}
        }
        match shared.store.get_campaign(&campaign_id).await {
            Ok(Some(fresh)) => {
                if fresh.revision != record.revision {
                    match shared.store.campaign_numbers(&campaign_id).await {
                        Ok(n) => numbers = n,
                        Err(err) => {
                            tracing::debug!(error = %err, "Campaign numbers not readable; next poll.");
                            continue;
                        }
                    }
                }
                record = fresh;
            }
            // Expired (settled long ago) or removed under us.
            Ok(None) => {
                let _ = tx
                    .send(Err(Error::CampaignNotFound(campaign_id.to_string()).into()))
                    .await;
                return;
            }
            // A store outage: keep the stream, the next poll retries.
            Err(err) => tracing::debug!(error = %err, "Campaign not readable; next poll."),
        }
    }
}

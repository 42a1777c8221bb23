//! The campaign RPCs of `callbridge.v1.Calls`: proto ⇄ domain, and the store's answers
//! turned into errors. The dialing itself is `dialer::campaign`'s.

use std::collections::BTreeMap;

use callbridge_proto::pb;

use super::Shared;
use crate::domain::call::now_ms;
use crate::domain::campaign::{self as rules, Action, CampaignRecord, NumberState};
use crate::domain::ids::{AgentId, CampaignId};
use crate::error::Error;
use crate::store::{AddNumbers, CallStore, CampaignChange};

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
    Ok(record.to_pb(rules::progress(&numbers)))
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
        .map(|n| NumberState::new(n.number, n.metadata.into_iter().collect::<BTreeMap<_, _>>()))
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

//! What a call is, as the domain and every store see it: the call record, the usage
//! counters, and what storing one event changes. Stores import these; nothing here
//! imports a store.

use std::collections::BTreeMap;

use callbridge_proto::pb;

use super::ids::{
    AgentId, CallId, CallSid, CampaignId, LeaseHolder, RelayId, StreamCredentialId, StreamSid,
};
use super::twilio::TwilioCallStatus;

/// Usage counters kept per call, in the order of `store::USAGE_FIELDS`.
pub type UsageCounters = [u64; 9];

/// One call as stored. An id that may be absent is an `Option` (the store writes none
/// as an empty field).
#[derive(Debug, Clone, PartialEq)]
pub struct CallRecord {
    /// Call id.
    pub call_id: CallId,
    /// Agent id.
    pub agent_id: AgentId,
    /// Inbound or outbound.
    pub direction: pb::Direction,
    /// Where the call is in its life.
    pub status: pb::CallStatus,
    /// Caller number.
    pub from: String,
    /// Called number.
    pub to: String,
    /// Campaign, if any.
    pub campaign_id: Option<CampaignId>,
    /// Twilio call sid, once known.
    pub twilio_call_sid: Option<CallSid>,
    /// Twilio stream sid, once a stream started.
    pub stream_sid: Option<StreamSid>,
    /// Relay that holds or last held the attach stream.
    pub relay_id: Option<RelayId>,
    /// Creation time (ms).
    pub created_at_ms: i64,
    /// First `started` event time (ms).
    pub started_at_ms: i64,
    /// End time (ms).
    pub ended_at_ms: i64,
    /// Why it ended (or was handed off); `None` while it never did.
    pub end_reason: Option<pb::EndReason>,
    /// End detail, if the end said one.
    pub end_detail: Option<String>,
    /// Transfer target when ended by a transfer.
    pub transfer_to: Option<String>,
    /// Application metadata.
    pub metadata: BTreeMap<String, String>,
    /// Newest stored event seq.
    pub last_seq: u64,
    /// Attach stream holding the lease; `None` when released.
    pub lease_holder: Option<LeaseHolder>,
    /// Relay id of the lease holder.
    pub lease_relay: Option<RelayId>,
    /// When the lease runs out (ms); 0 if never attached.
    pub lease_until_ms: i64,
    /// The stream (its credential id) that holds the lease, or held it last: kept when
    /// the lease is released or lapses, replaced when another stream attaches. What an
    /// action request and a resumed stream must name (docs/resilience.md, "The rule").
    pub lease_stream: Option<StreamCredentialId>,
    /// Usage totals.
    pub usage: UsageCounters,
    /// Control placed the call through Twilio's REST API.
    pub dialed: bool,
    /// Twilio's own status, newest by Twilio's order.
    pub twilio_status: Option<TwilioCallStatus>,
    /// Highest `SequenceNumber` of the status callbacks seen.
    pub twilio_seq: u32,
    /// Twilio's error code / message when it refused the call.
    pub twilio_error_code: u32,
    pub twilio_error_message: String,
    /// Answering-machine verdict.
    pub answered_by: Option<String>,
}

impl CallRecord {
    /// A call with nothing known yet but its ids, direction, status and creation time.
    pub fn new(
        call_id: CallId,
        agent_id: AgentId,
        direction: pb::Direction,
        status: pb::CallStatus,
        created_at_ms: i64,
    ) -> Self {
        CallRecord {
            call_id,
            agent_id,
            direction,
            status,
            from: String::new(),
            to: String::new(),
            campaign_id: None,
            twilio_call_sid: None,
            stream_sid: None,
            relay_id: None,
            created_at_ms,
            started_at_ms: 0,
            ended_at_ms: 0,
            end_reason: None,
            end_detail: None,
            transfer_to: None,
            metadata: BTreeMap::new(),
            last_seq: 0,
            lease_holder: None,
            lease_relay: None,
            lease_until_ms: 0,
            lease_stream: None,
            usage: [0; 9],
            dialed: false,
            twilio_status: None,
            twilio_seq: 0,
            twilio_error_code: 0,
            twilio_error_message: String::new(),
            answered_by: None,
        }
    }

    /// The control replica whose attach stream holds the lease ("" if none does).
    pub fn lease_replica(&self) -> &str {
        self.lease_holder.as_ref().map_or("", LeaseHolder::replica)
    }

    /// Whether a stream has ever been attached to the call.
    pub fn attached_once(&self) -> bool {
        self.lease_until_ms > 0
    }

    /// Whether an attach stream holds the lease at `now_ms`.
    pub fn lease_held(&self, now_ms: i64) -> bool {
        self.lease_holder.is_some() && self.lease_until_ms > now_ms
    }
}

/// What a `started` event records on its call (each only when the event carries it).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StartedEffect {
    /// Twilio's call sid.
    pub twilio_call_sid: Option<CallSid>,
    /// Twilio's stream sid.
    pub stream_sid: Option<StreamSid>,
    /// The relay carrying the stream.
    pub relay_id: Option<RelayId>,
}

/// What a final `ended` event records on its call.
#[derive(Debug, Clone, PartialEq)]
pub struct EndedEffect {
    /// Why it ended.
    pub reason: pb::EndReason,
    /// The relay's detail ("" when none).
    pub detail: String,
    /// Transfer target ("" when none).
    pub transfer_to: String,
}

/// What storing an event changes on the call, decided by the domain.
#[derive(Debug, Clone, Default)]
pub struct EventEffects {
    /// Status to move to (only applied if it moves forward).
    pub new_status: Option<pb::CallStatus>,
    /// A `started` event.
    pub started: Option<StartedEffect>,
    /// A final `ended` event.
    pub ended: Option<EndedEffect>,
    /// A `HANDOFF` end: records the reason but keeps the call live.
    pub handoff: bool,
    /// Usage to add.
    pub usage: Option<UsageCounters>,
    /// Only store if the call's lease ran out before this time (ms) and it is not ended.
    pub require_lease_expired_before: Option<i64>,
    /// Only store if no attach stream but this one holds the lease: an attach stream's
    /// writes stop the moment another stream takes the call over (a holder fenced off).
    pub require_holder: Option<LeaseHolder>,
    /// Event time (ms) used for timestamps.
    pub at_ms: i64,
}

/// A stored or sent end reason number as the record holds it: `None` for
/// `END_REASON_UNSPECIFIED` and for numbers this build does not know.
pub fn end_reason(number: i32) -> Option<pb::EndReason> {
    pb::EndReason::try_from(number)
        .ok()
        .filter(|r| *r != pb::EndReason::Unspecified)
}

/// A stored status number; numbers this build does not know read as unspecified.
pub fn call_status(number: i32) -> pb::CallStatus {
    pb::CallStatus::try_from(number).unwrap_or(pb::CallStatus::Unspecified)
}

/// A stored direction number; numbers this build does not know read as unspecified.
pub fn direction(number: i32) -> pb::Direction {
    pb::Direction::try_from(number).unwrap_or(pb::Direction::Unspecified)
}

//! What a call is, as the domain and every store see it: the call record, the usage
//! counters, and what storing one event changes. Stores import these; nothing here
//! imports a store.

use std::collections::BTreeMap;

use callbridge_proto::pb;

/// Usage counters kept per call, in the order of `store::USAGE_FIELDS`.
pub type UsageCounters = [u64; 9];

/// One call as stored.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CallRecord {
    /// Call id.
    pub call_id: String,
    /// Agent id.
    pub agent_id: String,
    /// Inbound or outbound.
    pub direction: pb::Direction,
    /// Where the call is in its life.
    pub status: pb::CallStatus,
    /// Caller number.
    pub from: String,
    /// Called number.
    pub to: String,
    /// Campaign, if any.
    pub campaign_id: String,
    /// Twilio call sid.
    pub twilio_call_sid: String,
    /// Twilio stream sid.
    pub stream_sid: String,
    /// Relay that holds or last held the attach stream.
    pub relay_id: String,
    /// Creation time (ms).
    pub created_at_ms: i64,
    /// First `started` event time (ms).
    pub started_at_ms: i64,
    /// End time (ms).
    pub ended_at_ms: i64,
    /// Why it ended (or was handed off); `None` while it never did.
    pub end_reason: Option<pb::EndReason>,
    /// End detail.
    pub end_detail: String,
    /// Transfer target when ended by a transfer.
    pub transfer_to: String,
    /// Application metadata.
    pub metadata: BTreeMap<String, String>,
    /// Newest stored event seq.
    pub last_seq: u64,
    /// Attach stream holding the lease (`replica/stream`), empty when released.
    pub lease_holder: String,
    /// Relay id of the lease holder.
    pub lease_relay: String,
    /// When the lease runs out (ms); 0 if never attached.
    pub lease_until_ms: i64,
    /// Usage totals.
    pub usage: UsageCounters,
    /// Control placed the call through Twilio's REST API.
    pub dialed: bool,
    /// Twilio's own status (`queued` … `canceled`), newest by Twilio's order.
    pub twilio_status: String,
    /// Highest `SequenceNumber` of the status callbacks seen.
    pub twilio_seq: u32,
    /// Twilio's error code / message when it refused the call.
    pub twilio_error_code: u32,
    pub twilio_error_message: String,
    /// Answering-machine verdict.
    pub answered_by: String,
}

impl CallRecord {
    /// The replica id part of the lease holder.
    pub fn lease_replica(&self) -> &str {
        self.lease_holder
            .split_once('/')
            .map_or("", |(replica, _)| replica)
    }

    /// Whether an attach stream holds the lease at `now_ms`.
    pub fn lease_held(&self, now_ms: i64) -> bool {
        !self.lease_holder.is_empty() && self.lease_until_ms > now_ms
    }
}

/// What storing an event changes on the call, decided by the domain.
#[derive(Debug, Clone, Default)]
pub struct EventEffects {
    /// Status to move to (only applied if it moves forward).
    pub new_status: Option<pb::CallStatus>,
    /// A `started` event: sid, stream sid, relay id, at.
    pub started: Option<(String, String, String)>,
    /// A final `ended` event: reason, detail, transfer target.
    pub ended: Option<(pb::EndReason, String, String)>,
    /// A `HANDOFF` end: records the reason but keeps the call live.
    pub handoff: bool,
    /// Usage to add.
    pub usage: Option<UsageCounters>,
    /// Only store if the call's lease ran out before this time (ms) and it is not ended.
    pub require_lease_expired_before: Option<i64>,
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

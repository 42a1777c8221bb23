//! The state store: the [`CallStore`] trait and its two implementations.
//!
//! - [`redis::RedisStore`]: production, shared by every control replica.
//! - [`memory::MemoryStore`]: one process, same behaviour (demo, unit tests).
//!
//! Every rule that must hold across replicas (status moves one way, an event is stored
//! once, a lease has one holder) is applied *inside* the store in one atomic step (a Lua
//! script in Redis, one mutex section in memory). The domain code in `domain/call.rs` decides
//! *what* should change; the store makes it happen atomically or reports why not.

pub(crate) mod keys;
pub mod memory;
pub mod redis;

use std::future::Future;
use std::time::Duration;

use callbridge_proto::pb;

use crate::domain::call::StreamOrigin;
use crate::domain::campaign::{CampaignRecord, NumberState};
use crate::domain::ids::{
    AgentId, CallId, CallSid, CampaignId, LeaseHolder, RelayId, StreamCredentialId,
};
use crate::domain::record::{CallRecord, EventEffects};
use crate::domain::twilio::TwilioCallStatus;
use crate::error::StoreError;

/// Result of a store operation.
pub type StoreResult<T> = Result<T, StoreError>;

/// Hash field names of the usage counters, in the order of
/// [`UsageCounters`](crate::domain::record::UsageCounters) (the last one counts responses).
pub const USAGE_FIELDS: [&str; 9] = [
    "u_in",
    "u_out",
    "u_total",
    "u_in_text",
    "u_in_audio",
    "u_cached",
    "u_out_text",
    "u_out_audio",
    "u_resp",
];

/// Outcome of storing one event ([`CallStore::append_events`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppendOutcome {
    /// Stored now.
    Stored,
    /// Already stored earlier (seq ≤ last); nothing changed.
    Duplicate,
    /// `seq > last + 1`.
    Gap {
        /// The newest stored seq.
        last_seq: u64,
    },
    /// No such call.
    NotFound,
    /// `require_lease_expired_before` or `require_holder` did not hold.
    ConditionFailed,
}

/// Outcome of an attach attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachOutcome {
    /// The lease is ours.
    Attached,
    /// The lease is ours, taken from a holder whose lease had not run out: the attach
    /// consumed a fresh stream credential, which proves Twilio's old stream is over
    /// ([`lease_claim`](crate::domain::call::lease_claim)). The old holder is fenced.
    TookOver,
    /// No such call.
    NotFound,
    /// The call has ended.
    Ended,
    /// Another live stream holds the lease.
    Held,
    /// The stream credential was consumed before (by any relay).
    CredentialUsed,
    /// The stream's CallSid is not the one recorded at admission.
    CallSidMismatch,
    /// The stream was minted for a call state that is gone: a replayed voice webhook or
    /// action request ([`LeaseClaim::Superseded`](crate::domain::call::LeaseClaim)).
    Superseded,
}

/// What a stream's first attach must also satisfy, checked in the same atomic step as the
/// lease and before anything is written (a refused attach changes nothing).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AttachChecks {
    /// The stream credential to consume: its id and expiry (ms since the Unix epoch).
    /// A second attach with the same id is [`AttachOutcome::CredentialUsed`] until then.
    /// On success the id becomes the call's lease stream.
    pub credential: Option<(StreamCredentialId, i64)>,
    /// Where the credential came from, checked against the call's lease stream.
    pub origin: StreamOrigin,
    /// The relay's attempt id for this stream (recorded with the consumed credential): a
    /// retry of an attach that committed, from the same relay with the same attempt, is
    /// let through as that stream's reconnect instead of [`AttachOutcome::CredentialUsed`].
    pub attempt: Option<StreamCredentialId>,
    /// `start.callSid`, compared with the CallSid recorded at admission (when one was).
    pub twilio_call_sid: Option<String>,
}

/// How long a consumed credential's record outlives its expiry, for clock skew between
/// the relay that minted it and the store's host.
pub const CREDENTIAL_RECORD_GRACE_MS: i64 = 60_000;

/// Outcome of admitting a pre-created call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdmitOutcome {
    /// Admitted (moved to ringing if it was created).
    Admitted,
    /// No such call.
    NotFound,
    /// The call has ended.
    Ended,
}

/// Outcome of a versioned agent write.
#[derive(Debug, Clone, PartialEq)]
pub enum AgentCas {
    /// Written.
    Done,
    /// No such agent.
    NotFound,
    /// The stored version differs.
    Conflict {
        /// The stored version.
        current: u64,
    },
}

/// Position in a creation-time index, newest first: entries at `score` already seen
/// `skip` times are skipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexCursor {
    /// Highest score still to visit (inclusive).
    pub score: i64,
    /// How many entries with exactly `score` were visited already.
    pub skip: u64,
}

/// What Twilio said about a call (a REST answer or a callback); `None` says nothing.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TwilioUpdate {
    /// Recorded where the call has none yet.
    pub sid: Option<CallSid>,
    /// Twilio's status; applied only if it is later in Twilio's order
    /// ([`TwilioCallStatus::rank`]) than the stored one.
    pub status: Option<TwilioCallStatus>,
    /// `SequenceNumber`, when a callback carried one.
    pub seq: Option<u32>,
    /// Error code and message (a refused create).
    pub error: Option<(u32, String)>,
    /// AMD verdict; the first one stays.
    pub answered_by: Option<String>,
}

/// Outcome of a campaign state change ([`CallStore::change_campaign`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CampaignChange {
    /// Changed.
    Done,
    /// No such campaign.
    NotFound,
    /// The campaign is in this state, not one the change leaves from.
    Refused(pb::CampaignState),
}

/// Outcome of adding numbers to a campaign.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddNumbers {
    /// Added; the campaign now has this many numbers.
    Added(u32),
    /// No such campaign.
    NotFound,
    /// The campaign completed or was canceled (its state).
    Closed(pb::CampaignState),
}

/// The state store, shared by every RPC of one replica.
///
/// Futures are `Send` so handlers can be spawned; each method is one atomic step.
pub trait CallStore: Send + Sync + 'static {
    // --- agents ---

    /// Stores a new agent; `false` if the id is taken.
    fn create_agent(&self, agent: &pb::Agent) -> impl Future<Output = StoreResult<bool>> + Send;
    /// One agent.
    fn get_agent(
        &self,
        agent_id: &AgentId,
    ) -> impl Future<Output = StoreResult<Option<pb::Agent>>> + Send;
    /// Replaces an agent if its stored version is `expected` (`agent.version` is the new one).
    fn replace_agent(
        &self,
        agent: &pb::Agent,
        expected: u64,
    ) -> impl Future<Output = StoreResult<AgentCas>> + Send;
    /// Deletes an agent if its version is `expected` (0: any).
    fn delete_agent(
        &self,
        agent_id: &AgentId,
        expected: u64,
    ) -> impl Future<Output = StoreResult<AgentCas>> + Send;
    /// Agents with id > `after` (all when `None`), in id order.
    fn list_agents(
        &self,
        after: Option<&AgentId>,
        limit: usize,
    ) -> impl Future<Output = StoreResult<Vec<pb::Agent>>> + Send;
    /// Sets (replaces) a number route.
    fn set_route(
        &self,
        number: &str,
        agent_id: &AgentId,
    ) -> impl Future<Output = StoreResult<()>> + Send;
    /// Deletes a number route; `false` if there was none.
    fn delete_route(&self, number: &str) -> impl Future<Output = StoreResult<bool>> + Send;
    /// The agent for a number.
    fn get_route(&self, number: &str) -> impl Future<Output = StoreResult<Option<AgentId>>> + Send;
    /// Every route, by number.
    fn list_routes(&self) -> impl Future<Output = StoreResult<Vec<(String, AgentId)>>> + Send;
    /// Sets or clears the default agent.
    fn set_default_agent(
        &self,
        agent_id: Option<&AgentId>,
    ) -> impl Future<Output = StoreResult<()>> + Send;
    /// The default agent.
    fn get_default_agent(&self) -> impl Future<Output = StoreResult<Option<AgentId>>> + Send;

    // --- calls ---

    /// Stores new calls and indexes them.
    fn create_calls(&self, calls: &[CallRecord]) -> impl Future<Output = StoreResult<()>> + Send;
    /// One call.
    fn get_call(
        &self,
        call_id: &CallId,
    ) -> impl Future<Output = StoreResult<Option<CallRecord>>> + Send;
    /// Many calls at once (few round trips), in the order asked; `None` for missing ones.
    fn get_calls(
        &self,
        call_ids: &[CallId],
    ) -> impl Future<Output = StoreResult<Vec<Option<CallRecord>>>> + Send;
    /// Admits a pre-created call: records sid/from/to where empty, `created → ringing`.
    fn admit_existing(
        &self,
        call_id: &CallId,
        twilio_call_sid: Option<&CallSid>,
        from: &str,
        to: &str,
    ) -> impl Future<Output = StoreResult<AdmitOutcome>> + Send;
    /// Creates an inbound call unless its Twilio sid (`call.twilio_call_sid`, which an
    /// inbound call has) was admitted already; returns the call id that owns the sid.
    fn admit_inbound(&self, call: &CallRecord) -> impl Future<Output = StoreResult<CallId>> + Send;
    /// Takes the call's lease for an attach stream, consuming the stream credential and
    /// checking the CallSid of `checks` in the same atomic step. The checks run in this
    /// order, all before any write: call exists, credential unused (a replay is reported as
    /// one even after the call ended), not ended, CallSid, lease free, a reconnect of the
    /// same relay, or a take-over by a first attach with a fresh credential minted to follow
    /// the call's lease stream ([`lease_claim`](crate::domain::call::lease_claim)).
    #[allow(clippy::too_many_arguments)]
    fn attach(
        &self,
        call_id: &CallId,
        relay_id: &RelayId,
        reconnect: bool,
        holder: &LeaseHolder,
        now_ms: i64,
        lease_ms: i64,
        checks: &AttachChecks,
    ) -> impl Future<Output = StoreResult<AttachOutcome>> + Send;
    /// Extends the lease; `false` if `holder` no longer holds it.
    fn renew_lease(
        &self,
        call_id: &CallId,
        holder: &LeaseHolder,
        now_ms: i64,
        lease_ms: i64,
    ) -> impl Future<Output = StoreResult<bool>> + Send;
    /// Releases the lease held by `holder`, leaving `lease_ms` for a reconnect.
    fn release_lease(
        &self,
        call_id: &CallId,
        holder: &LeaseHolder,
        now_ms: i64,
        lease_ms: i64,
    ) -> impl Future<Output = StoreResult<()>> + Send;
    /// Claims the REST redirect of a call orphaned by the loss of `stream`: `true` once per
    /// (call, stream), and only while no stream holds the call's lease and `stream` is
    /// still the call's last one.
    fn claim_orphan_redirect(
        &self,
        call_id: &CallId,
        stream: &StreamCredentialId,
        now_ms: i64,
    ) -> impl Future<Output = StoreResult<bool>> + Send;
    /// Stores a run of one call's events in order, each (call, seq) once, applying
    /// `effects[i]` with `events[i]`, and sends every stored event to the watchers on
    /// every replica (`campaign_id` for their filters; best effort, watchers catch up
    /// from the store).
    ///
    /// Returns one outcome per event handled, in order. Handling stops after the first
    /// outcome that is neither [`AppendOutcome::Stored`] nor
    /// [`AppendOutcome::Duplicate`]; events after it are untouched. Each event's
    /// check-and-store is atomic with its effects (usage, status), exactly as if the
    /// events were appended one by one; the run costs one round trip.
    fn append_events(
        &self,
        call_id: &CallId,
        campaign_id: Option<&CampaignId>,
        events: &[pb::CallEvent],
        effects: &[EventEffects],
    ) -> impl Future<Output = StoreResult<Vec<AppendOutcome>>> + Send;
    /// Stored events with seq > `after_seq`, in order, at most `limit`.
    fn read_events(
        &self,
        call_id: &CallId,
        after_seq: u64,
        limit: usize,
    ) -> impl Future<Output = StoreResult<Vec<pb::CallEvent>>> + Send;
    /// Calls whose lease ran out before `now_ms` (candidates for `RELAY_LOST`).
    fn expired_leases(
        &self,
        now_ms: i64,
        limit: usize,
    ) -> impl Future<Output = StoreResult<Vec<CallId>>> + Send;
    /// Forgets a call in the lease index.
    fn forget_lease(&self, call_id: &CallId) -> impl Future<Output = StoreResult<()>> + Send;
    /// The ready-relay registry: records that `relay_id` was alive at `now_ms` (and
    /// whether it drains), forgets relays silent for ten times `alive_ms`, and returns how
    /// many *other* relays reported within `alive_ms` and are not draining.
    fn report_presence(
        &self,
        relay_id: &RelayId,
        draining: bool,
        now_ms: i64,
        alive_ms: i64,
    ) -> impl Future<Output = StoreResult<u32>> + Send;
    /// Call ids from a creation-time index (all calls or one campaign), newest first,
    /// starting at `cursor`, not older than `min_score`.
    fn scan_index(
        &self,
        campaign_id: Option<&CampaignId>,
        cursor: IndexCursor,
        min_score: i64,
        limit: usize,
    ) -> impl Future<Output = StoreResult<Vec<(CallId, i64)>>> + Send;
    /// Drops from the all-calls index the entries created before `created_before_ms`
    /// whose call has expired, and returns how many; an older call that is still kept
    /// (it ended recently, or still runs) keeps its entry. Campaign indexes expire as
    /// whole keys.
    fn trim_index(&self, created_before_ms: i64) -> impl Future<Output = StoreResult<u64>> + Send;

    /// Applies what Twilio said about a call ([`TwilioUpdate`]) in one atomic step;
    /// `None` if there is no such call, else whether anything changed.
    fn record_twilio(
        &self,
        call_id: &CallId,
        update: &TwilioUpdate,
    ) -> impl Future<Output = StoreResult<Option<bool>>> + Send;
    /// The call id admitted for a Twilio call sid (inbound calls' status callbacks).
    fn call_id_by_sid(
        &self,
        sid: &CallSid,
    ) -> impl Future<Output = StoreResult<Option<CallId>>> + Send;

    // --- campaigns ---

    /// Stores a new campaign (with no numbers) and lists it among the active ones; `false`
    /// if the id is taken.
    fn create_campaign(
        &self,
        campaign: &CampaignRecord,
    ) -> impl Future<Output = StoreResult<bool>> + Send;
    /// One campaign. Its `revision` grows with every change made through this trait to
    /// it or its numbers (numbers added, a state change, a fenced number write, settling).
    fn get_campaign(
        &self,
        campaign_id: &CampaignId,
    ) -> impl Future<Output = StoreResult<Option<CampaignRecord>>> + Send;
    /// Appends numbers (indexes `numbers..numbers + len`) unless the campaign completed or
    /// was canceled, in one atomic step.
    fn add_campaign_numbers(
        &self,
        campaign_id: &CampaignId,
        numbers: &[NumberState],
    ) -> impl Future<Output = StoreResult<AddNumbers>> + Send;
    /// Moves the campaign to `to` if it is in one of `from` (atomic compare-and-set).
    fn change_campaign(
        &self,
        campaign_id: &CampaignId,
        from: &[pb::CampaignState],
        to: pb::CampaignState,
        now_ms: i64,
    ) -> impl Future<Output = StoreResult<CampaignChange>> + Send;
    /// Every number of a campaign, by index.
    fn campaign_numbers(
        &self,
        campaign_id: &CampaignId,
    ) -> impl Future<Output = StoreResult<Vec<NumberState>>> + Send;
    /// Campaigns that may still need a dialer (not settled).
    fn active_campaigns(&self) -> impl Future<Output = StoreResult<Vec<CampaignId>>> + Send;
    /// The campaign's dialer lease: taken by `holder` when free, run out or already its
    /// own, for `lease_ms` from `now_ms`. Returns the fencing token while `holder` holds
    /// it (it grows by one each time the lease changes hands), `None` when another holder
    /// has it or there is no such campaign.
    fn campaign_lease(
        &self,
        campaign_id: &CampaignId,
        holder: &str,
        now_ms: i64,
        lease_ms: i64,
    ) -> impl Future<Output = StoreResult<Option<u64>>> + Send;
    /// Writes numbers (index, state) if `fence` is still the campaign's fencing token; a
    /// dialer that lost its lease writes nothing (`false`).
    fn write_campaign_numbers(
        &self,
        campaign_id: &CampaignId,
        fence: u64,
        numbers: &[(u32, NumberState)],
    ) -> impl Future<Output = StoreResult<bool>> + Send;
    /// Marks a campaign settled (every one of its `numbers` numbers has its outcome): a
    /// running one completes, a canceled one stays canceled; a paused one, a campaign with
    /// more numbers than `numbers`, or a stale `fence` changes nothing (`false`); one settled
    /// before is `true` again. A settled campaign leaves the active list and expires after
    /// the retention.
    fn settle_campaign(
        &self,
        campaign_id: &CampaignId,
        fence: u64,
        numbers: u32,
        now_ms: i64,
    ) -> impl Future<Output = StoreResult<bool>> + Send;
    /// Adds numbers to (`listed`) or removes them from the do-not-call set.
    fn set_do_not_call(
        &self,
        numbers: &[String],
        listed: bool,
    ) -> impl Future<Output = StoreResult<()>> + Send;
    /// Whether each number is on the do-not-call set.
    fn do_not_call(
        &self,
        numbers: &[String],
    ) -> impl Future<Output = StoreResult<Vec<bool>>> + Send;

    // --- bus ---

    /// Sends a command to `replica_id`; `false` if no such replica listens.
    fn publish_command(
        &self,
        replica_id: &str,
        call_id: &CallId,
        command: &pb::Command,
    ) -> impl Future<Output = StoreResult<bool>> + Send;

    /// Round trip to the backing store.
    fn ping(&self) -> impl Future<Output = StoreResult<Duration>> + Send;
}

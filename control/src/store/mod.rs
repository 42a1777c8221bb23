//! The state store: the [`CallStore`] trait and its two implementations.
//!
//! - [`redis::RedisStore`]: production, shared by every control replica.
//! - [`memory::MemoryStore`]: one process, same behaviour (demo, unit tests).
//!
//! Every rule that must hold across replicas (status moves one way, an event is stored
//! once, a lease has one holder) is applied *inside* the store in one atomic step (a Lua
//! script in Redis, one mutex section in memory). The domain code in `calls.rs` decides
//! *what* should change; the store makes it happen atomically or reports why not.

pub(crate) mod keys;
pub mod memory;
pub mod redis;

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use callbridge_proto::pb;

use crate::error::StoreError;

/// Result of a store operation.
pub type StoreResult<T> = Result<T, StoreError>;

/// Usage counters kept per call, in the order of [`USAGE_FIELDS`].
pub type UsageCounters = [u64; 9];

/// Hash field names of the usage counters (the last one counts responses).
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

/// One call as stored.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CallRecord {
    /// Call id.
    pub call_id: String,
    /// Agent id.
    pub agent_id: String,
    /// `pb::Direction` number.
    pub direction: i32,
    /// `pb::CallStatus` number.
    pub status: i32,
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
    /// `pb::EndReason` number.
    pub end_reason: i32,
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
    pub new_status: Option<i32>,
    /// A `started` event: sid, stream sid, relay id, at.
    pub started: Option<(String, String, String)>,
    /// A final `ended` event: reason, detail, transfer target.
    pub ended: Option<(i32, String, String)>,
    /// A `HANDOFF` end: records the reason but keeps the call live.
    pub handoff: bool,
    /// Usage to add.
    pub usage: Option<UsageCounters>,
    /// Only store if the call's lease ran out before this time (ms) and it is not ended.
    pub require_lease_expired_before: Option<i64>,
    /// Event time (ms) used for timestamps.
    pub at_ms: i64,
}

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
    /// `require_lease_expired_before` did not hold.
    ConditionFailed,
}

/// Outcome of an attach attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachOutcome {
    /// The lease is ours.
    Attached,
    /// No such call.
    NotFound,
    /// The call has ended.
    Ended,
    /// Another live stream holds the lease.
    Held,
}

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

/// A message carried between replicas.
#[derive(Debug, Clone)]
pub enum BusMessage {
    /// A stored event (for watchers everywhere).
    Event {
        /// The call's campaign (for `WatchCalls` filters).
        campaign_id: String,
        /// The event.
        event: pb::CallEvent,
    },
    /// A command for a call attached to the receiving replica.
    Command {
        /// The call.
        call_id: String,
        /// The command.
        command: pb::Command,
    },
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
        agent_id: &str,
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
        agent_id: &str,
        expected: u64,
    ) -> impl Future<Output = StoreResult<AgentCas>> + Send;
    /// Agents with id > `after`, in id order.
    fn list_agents(
        &self,
        after: &str,
        limit: usize,
    ) -> impl Future<Output = StoreResult<Vec<pb::Agent>>> + Send;
    /// Sets (replaces) a number route.
    fn set_route(
        &self,
        number: &str,
        agent_id: &str,
    ) -> impl Future<Output = StoreResult<()>> + Send;
    /// Deletes a number route; `false` if there was none.
    fn delete_route(&self, number: &str) -> impl Future<Output = StoreResult<bool>> + Send;
    /// The agent for a number.
    fn get_route(&self, number: &str) -> impl Future<Output = StoreResult<Option<String>>> + Send;
    /// Every route, by number.
    fn list_routes(&self) -> impl Future<Output = StoreResult<Vec<(String, String)>>> + Send;
    /// Sets or clears the default agent.
    fn set_default_agent(
        &self,
        agent_id: Option<&str>,
    ) -> impl Future<Output = StoreResult<()>> + Send;
    /// The default agent.
    fn get_default_agent(&self) -> impl Future<Output = StoreResult<Option<String>>> + Send;

    // --- calls ---

    /// Stores new calls and indexes them.
    fn create_calls(&self, calls: &[CallRecord]) -> impl Future<Output = StoreResult<()>> + Send;
    /// One call.
    fn get_call(
        &self,
        call_id: &str,
    ) -> impl Future<Output = StoreResult<Option<CallRecord>>> + Send;
    /// Many calls at once (few round trips), in the order asked; `None` for missing ones.
    fn get_calls(
        &self,
        call_ids: &[String],
    ) -> impl Future<Output = StoreResult<Vec<Option<CallRecord>>>> + Send;
    /// Admits a pre-created call: records sid/from/to where empty, `created → ringing`.
    fn admit_existing(
        &self,
        call_id: &str,
        twilio_call_sid: &str,
        from: &str,
        to: &str,
    ) -> impl Future<Output = StoreResult<AdmitOutcome>> + Send;
    /// Creates an inbound call unless the Twilio sid was admitted already; returns the
    /// call id that owns the sid.
    fn admit_inbound(&self, call: &CallRecord) -> impl Future<Output = StoreResult<String>> + Send;
    /// Takes the call's lease for an attach stream.
    fn attach(
        &self,
        call_id: &str,
        relay_id: &str,
        reconnect: bool,
        holder: &str,
        now_ms: i64,
        lease_ms: i64,
    ) -> impl Future<Output = StoreResult<AttachOutcome>> + Send;
    /// Extends the lease; `false` if `holder` no longer holds it.
    fn renew_lease(
        &self,
        call_id: &str,
        holder: &str,
        now_ms: i64,
        lease_ms: i64,
    ) -> impl Future<Output = StoreResult<bool>> + Send;
    /// Releases the lease held by `holder`, leaving `lease_ms` for a reconnect.
    fn release_lease(
        &self,
        call_id: &str,
        holder: &str,
        now_ms: i64,
        lease_ms: i64,
    ) -> impl Future<Output = StoreResult<()>> + Send;
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
        call_id: &str,
        campaign_id: &str,
        events: &[pb::CallEvent],
        effects: &[EventEffects],
    ) -> impl Future<Output = StoreResult<Vec<AppendOutcome>>> + Send;
    /// Stored events with seq > `after_seq`, in order, at most `limit`.
    fn read_events(
        &self,
        call_id: &str,
        after_seq: u64,
        limit: usize,
    ) -> impl Future<Output = StoreResult<Vec<pb::CallEvent>>> + Send;
    /// Calls whose lease ran out before `now_ms` (candidates for `RELAY_LOST`).
    fn expired_leases(
        &self,
        now_ms: i64,
        limit: usize,
    ) -> impl Future<Output = StoreResult<Vec<String>>> + Send;
    /// Forgets a call in the lease index.
    fn forget_lease(&self, call_id: &str) -> impl Future<Output = StoreResult<()>> + Send;
    /// Call ids from a creation-time index (all calls or one campaign), newest first,
    /// starting at `cursor`, not older than `min_score`.
    fn scan_index(
        &self,
        campaign_id: Option<&str>,
        cursor: IndexCursor,
        min_score: i64,
        limit: usize,
    ) -> impl Future<Output = StoreResult<Vec<(String, i64)>>> + Send;
    /// Drops entries created before `cutoff_ms` from the all-calls index (their calls
    /// have expired; campaign indexes expire as whole keys).
    fn trim_index(&self, cutoff_ms: i64) -> impl Future<Output = StoreResult<()>> + Send;

    // --- bus ---

    /// Sends a command to `replica_id`; `false` if no such replica listens.
    fn publish_command(
        &self,
        replica_id: &str,
        call_id: &str,
        command: &pb::Command,
    ) -> impl Future<Output = StoreResult<bool>> + Send;

    /// Round trip to the backing store.
    fn ping(&self) -> impl Future<Output = StoreResult<Duration>> + Send;
}

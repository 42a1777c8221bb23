//! [`CallStore`] over Redis: one server (`ConnectionManager`, reconnects by itself) or
//! Redis Cluster (`ClusterConnection`).
//!
//! Every rule that must be atomic is one Lua script over the keys of **one** call (one
//! hash tag). Global indexes (`cb:calls`, `cb:campaign:{id}`, `cb:leases`, agents) are
//! updated with separate commands; an index entry may briefly point at a call that is
//! not written yet or has expired, and readers skip such entries.
//!
//! The bus is Redis pub/sub: `cb:bus:events` carries every stored event to every
//! replica; `cb:bus:cmd:{replica}` carries commands to the replica holding a call.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use callbridge_proto::pb;
use futures_util::StreamExt;
use prost::Message;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::{Cmd, Pipeline, RedisFuture, Value};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::RedisTlsFiles;
use crate::metrics::{RedisLabels, RedisLatency};

use super::TwilioUpdate;
use super::keys;
use super::{
    AddNumbers, AdmitOutcome, AgentCas, AppendOutcome, AttachChecks, AttachOutcome,
    CREDENTIAL_RECORD_GRACE_MS, CallStore, CampaignChange, IndexCursor, StoreResult, USAGE_FIELDS,
};
use crate::domain::call::{StreamOrigin, status_rank};
use crate::domain::campaign::{CampaignRecord, NumberState};
use crate::domain::ids::{
    AgentId, CallId, CallSid, CampaignId, LeaseHolder, RelayId, StreamCredentialId, StreamSid,
    or_empty,
};
use crate::domain::record::{self, CallRecord, EventEffects};
use crate::domain::twilio::TwilioCallStatus;
use crate::error::StoreError;
use crate::hub::{BusMessage, Hub};

/// How long one Redis command may take before it counts as an outage.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long connecting may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// One day in milliseconds.
const DAY_MS: i64 = 24 * 3600 * 1000;
/// Index entries checked per round trip when trimming the call index.
const TRIM_BATCH: usize = 500;
/// Round trips per trim: bounds one sweep's work; the rest waits for the next one.
const TRIM_BATCHES: usize = 20;
/// Pause between pub/sub reconnect attempts.
const PUBSUB_RETRY: Duration = Duration::from_millis(500);

/// Redis errors in the store's backend-neutral terms, classified by kind (not by message
/// text): anything about the link is a transient outage the client may retry.
impl From<redis::RedisError> for StoreError {
    fn from(err: redis::RedisError) -> Self {
        let outage = err.is_io_error()
            || err.is_connection_dropped()
            || err.is_connection_refusal()
            || err.is_timeout()
            || err.is_unrecoverable_error()
            || matches!(
                err.kind(),
                redis::ErrorKind::ClusterConnectionNotFound
                    | redis::ErrorKind::Server(redis::ServerErrorKind::TryAgain)
            );
        if outage {
            StoreError::Unavailable(Box::new(err))
        } else {
            StoreError::Failed(Box::new(err))
        }
    }
}

/// A Redis connection of either shape.
#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// [`Conn`] observing each command's round trip, failures included (a timeout is the
/// slowest answer of all), in `callbridge_control_redis_latency_seconds{command}`: every
/// store operation, not only the health probe, so the histogram shows what calls wait on.
#[derive(Clone)]
struct Timed {
    conn: Conn,
    latency: Option<RedisLatency>,
}

/// The commands the store sends, as their label (anything else is `other`, so the label's
/// values stay few).
const COMMANDS: &[&str] = &[
    "ping",
    "evalsha",
    "eval",
    "script",
    "get",
    "set",
    "del",
    "exists",
    "pexpire",
    "hget",
    "hgetall",
    "hset",
    "hsetnx",
    "hdel",
    "zadd",
    "zrem",
    "zrangebylex",
    "zrangebyscore",
    "zrevrangebyscore",
    "xrange",
    "publish",
    "spublish",
];

/// The label of `cmd`: its command name, lowercase, if it is one of [`COMMANDS`].
fn command_label(cmd: &Cmd) -> &'static str {
    let Some(redis::Arg::Simple(name)) = cmd.args_iter().next() else {
        return "other";
    };
    COMMANDS
        .iter()
        .find(|c| c.as_bytes().eq_ignore_ascii_case(name))
        .copied()
        .unwrap_or("other")
}

/// `request`, its round trip observed under `command` once it answers.
fn timed<'a, T: Send + 'a>(
    latency: Option<RedisLatency>,
    command: &'static str,
    request: RedisFuture<'a, T>,
) -> RedisFuture<'a, T> {
    let Some(latency) = latency else {
        return request;
    };
    let started = tokio::time::Instant::now();
    Box::pin(async move {
        let result = request.await;
        latency
            .get_or_create(&RedisLabels { command })
            .observe(started.elapsed().as_secs_f64());
        result
    })
}

impl ConnectionLike for Timed {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        let latency = self.latency.clone();
        timed(
            latency,
            command_label(cmd),
            self.conn.req_packed_command(cmd),
        )
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        let latency = self.latency.clone();
        let request = self.conn.req_packed_commands(pipeline, offset, count);
        timed(latency, "pipeline", request)
    }

    fn get_db(&self) -> i64 {
        self.conn.get_db()
    }
}

/// Atomic scripts, each over the keys of one call.
struct Scripts {
    append: redis::Script,
    attach: redis::Script,
    renew: redis::Script,
    release: redis::Script,
    orphan_claim: redis::Script,
    admit: redis::Script,
    agent_cas: redis::Script,
    twilio: redis::Script,
    presence: redis::Script,
    campaign_add: redis::Script,
    campaign_change: redis::Script,
    campaign_lease: redis::Script,
    campaign_write: redis::Script,
    campaign_settle: redis::Script,
}

impl Scripts {
    fn new() -> Self {
        let prelude = lua_prelude();
        let script = |body: &str| redis::Script::new(&format!("{prelude}{body}"));
        Scripts {
            append: script(APPEND_LUA),
            attach: script(ATTACH_LUA),
            renew: script(RENEW_LUA),
            release: script(RELEASE_LUA),
            orphan_claim: script(ORPHAN_CLAIM_LUA),
            admit: script(ADMIT_LUA),
            agent_cas: script(AGENT_CAS_LUA),
            twilio: script(TWILIO_LUA),
            presence: script(PRESENCE_LUA),
            campaign_add: script(CAMPAIGN_ADD_LUA),
            campaign_change: script(CAMPAIGN_CHANGE_LUA),
            campaign_lease: script(CAMPAIGN_LEASE_LUA),
            campaign_write: script(CAMPAIGN_WRITE_LUA),
            campaign_settle: script(CAMPAIGN_SETTLE_LUA),
        }
    }
}

/// The constants the scripts share, written from the Rust side so that the scripts and
/// the domain rules cannot drift apart: the proto numbers the scripts compare or store
/// (`STATUS_<name>` from `pb::CallStatus`, `REASON_<name>` from `pb::EndReason`, named
/// after the proto values), the ranks of [`status_rank`] as a table, and the bits of the
/// append mask. The script bodies hold no enum number of their own (a test checks).
fn lua_prelude() -> String {
    use std::fmt::Write as _;
    let mut lua = String::with_capacity(512);
    let status = pb::CallStatus::Ringing;
    // Writing to a String cannot fail.
    let _ = writeln!(
        lua,
        "local STATUS_{} = {}",
        status.as_str_name(),
        status as i32
    );
    for reason in [pb::EndReason::Unspecified, pb::EndReason::Handoff] {
        // Hash fields are strings, so the reasons are written as strings.
        let _ = writeln!(
            lua,
            "local REASON_{} = '{}'",
            reason.as_str_name(),
            reason as i32
        );
    }
    for origin in [pb::StreamOrigin::First, pb::StreamOrigin::Resume] {
        let _ = writeln!(lua, "local {} = {}", origin.as_str_name(), origin as i32);
    }
    let ranks: Vec<String> = all_statuses()
        .map(|s| format!("[{}] = {}", s as i32, status_rank(s)))
        .collect();
    let _ = writeln!(lua, "local RANK = {{{}}}", ranks.join(", "));
    let _ = writeln!(
        lua,
        "local FINAL = {}",
        status_rank(pb::CallStatus::Completed)
    );
    // Unknown numbers rank 0, as in `status_rank`.
    lua.push_str("local function rank(s) return RANK[s] or 0 end\n");
    for (name, bit) in [
        ("STARTED", mask::STARTED),
        ("ENDED", mask::ENDED),
        ("HANDOFF", mask::HANDOFF),
        ("USAGE", mask::USAGE),
        ("LEASE_EXPIRED_BEFORE", mask::LEASE_EXPIRED_BEFORE),
        ("HOLDER", mask::HOLDER),
    ] {
        let _ = writeln!(lua, "local MASK_{name} = {bit}");
    }
    lua
}

/// Every value of `pb::CallStatus` (prost enums have no iterator; the numbers are small).
fn all_statuses() -> impl Iterator<Item = pb::CallStatus> {
    (0..256).filter_map(|n| pb::CallStatus::try_from(n).ok())
}

/// Bits of the per-event mask of [`APPEND_LUA`], each followed by its extra arguments.
mod mask {
    /// `started`: sid, stream sid, relay id.
    pub(super) const STARTED: u8 = 1;
    /// A final `ended`: reason, detail, transfer to.
    pub(super) const ENDED: u8 = 2;
    /// A `HANDOFF` end (no extra argument).
    pub(super) const HANDOFF: u8 = 4;
    /// Usage: the nine deltas of `USAGE_FIELDS`.
    pub(super) const USAGE: u8 = 8;
    /// Store only if the lease ran out before: that time (ms).
    pub(super) const LEASE_EXPIRED_BEFORE: u8 = 16;
    /// Store only if no other attach stream holds the lease: the writer's holder.
    pub(super) const HOLDER: u8 = 32;
}

/// Stores a run of one call's events, each once, in one atomic step.
///
/// KEYS: call hash, events stream.
/// ARGV: 1 retention ms, 2 bus channel, 3 bus envelope prefix (the campaign field), then
/// per event: seq, event bytes, at ms, new status (0 none), mask (see [`mask`]), and the
/// extra arguments its mask bits name, in bit order.
///
/// Returns {code, last, handled}: `handled` has one letter per event handled, `S` stored
/// or `D` duplicate; code 1 means every event was handled, otherwise the next event
/// stopped the run: -1 no such call, -2 gap, -3 condition failed. `last` is the newest
/// stored seq.
///
/// The call's fields are read once and written once per run (the same final values as
/// one event at a time: later events overwrite earlier ones, usage deltas add up). The
/// stored events are published on the bus here, so storing and telling watchers cost the
/// relay one round trip. One bus message per run, a `BusEnvelope`: the prefix (field 1)
/// and the event as field 2 (tag byte 0x12, varint length, bytes) if the run stored one,
/// else each stored event as field 5 (tag byte 0x2a).
const APPEND_LUA: &str = r"
local function varint(n)
  local s = ''
  while n >= 128 do
    s = s .. string.char(n % 128 + 128)
    n = math.floor(n / 128)
  end
  return s .. string.char(n)
end
local function bit(m, b) return math.floor(m / b) % 2 == 1 end
local h = redis.call('HMGET', KEYS[1], 'last_seq', 'status', 'lease_until', 'started', 'lease_holder')
-- Every stored call has a status, so its absence means no such call.
if not h[2] then return {-1, 0, ''} end
local last_s = h[1] or '0'
local last = tonumber(last_s)
local cur = tonumber(h[2] or '0')
local lease_until = tonumber(h[3] or '0')
local started = tonumber(h[4] or '0')
local holder = h[5] or ''
local set = {}
local usage = {0, 0, 0, 0, 0, 0, 0, 0, 0}
local used = false
local stored = 0
local handled = {}
local published = {}
local code = 1
local i = 4
while i <= #ARGV do
  local seq_s = ARGV[i]
  local seq = tonumber(seq_s)
  local bytes = ARGV[i + 1]
  local at = ARGV[i + 2]
  local new_s = ARGV[i + 3]
  local new = tonumber(new_s)
  local m = tonumber(ARGV[i + 4])
  local x = i + 5
  local st, en, us, co, ho
  if bit(m, MASK_STARTED) then st = x; x = x + 3 end
  if bit(m, MASK_ENDED) then en = x; x = x + 3 end
  local handoff = bit(m, MASK_HANDOFF)
  if bit(m, MASK_USAGE) then us = x; x = x + 9 end
  if bit(m, MASK_LEASE_EXPIRED_BEFORE) then co = x; x = x + 1 end
  if bit(m, MASK_HOLDER) then ho = x; x = x + 1 end
  i = x
  if seq <= last then
    handled[#handled + 1] = 'D'
  elseif seq > last + 1 then
    code = -2
    break
  elseif co and (lease_until == 0 or lease_until >= tonumber(ARGV[co]) or rank(cur) >= FINAL) then
    code = -3
    break
  elseif ho and holder ~= '' and holder ~= ARGV[ho] then
    code = -3
    break
  else
    redis.call('XADD', KEYS[2], seq_s .. '-0', 'e', bytes)
    last = seq
    last_s = seq_s
    stored = stored + 1
    if us then
      for k = 1, 9 do usage[k] = usage[k] + tonumber(ARGV[us + k - 1]) end
      used = true
    end
    if st then
      if started == 0 then
        started = tonumber(at)
        set['started'] = at
      end
      if ARGV[st] ~= '' then set['sid'] = ARGV[st] end
      if ARGV[st + 1] ~= '' then set['stream_sid'] = ARGV[st + 1] end
      if ARGV[st + 2] ~= '' then set['relay'] = ARGV[st + 2] end
      if rank(cur) < FINAL then
        set['end_reason'] = REASON_END_REASON_UNSPECIFIED
        set['end_detail'] = ''
      end
    end
    if handoff and rank(cur) < FINAL then set['end_reason'] = REASON_HANDOFF end
    if new > 0 and rank(new) > rank(cur) then
      cur = new
      set['status'] = new_s
      if rank(new) >= FINAL then
        set['ended'] = at
        set['lease_holder'] = ''
        if en then
          set['end_reason'] = ARGV[en]
          set['end_detail'] = ARGV[en + 1]
          set['transfer_to'] = ARGV[en + 2]
        end
      end
    end
    published[#published + 1] = varint(#bytes) .. bytes
    handled[#handled + 1] = 'S'
  end
end
if stored > 0 then
  local args = {'last_seq', last_s}
  for f, v in pairs(set) do
    args[#args + 1] = f
    args[#args + 1] = v
  end
  redis.call('HSET', KEYS[1], unpack(args))
  if used then
    local fields = {'u_in','u_out','u_total','u_in_text','u_in_audio','u_cached','u_out_text','u_out_audio','u_resp'}
    for k, f in ipairs(fields) do
      if usage[k] ~= 0 then redis.call('HINCRBY', KEYS[1], f, usage[k]) end
    end
  end
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
  redis.call('PEXPIRE', KEYS[2], ARGV[1])
  local tag = '\42'
  if stored == 1 then tag = '\18' end
  redis.call('PUBLISH', ARGV[2], ARGV[3] .. tag .. table.concat(published, tag))
end
return {code, last, table.concat(handled)}
";

/// KEYS: call hash, credential record key (same hash tag; '' slot unused when ARGV[7] is '').
/// ARGV: relay id, reconnect (0/1), holder, now ms, lease ms, start CallSid ('' unchecked),
/// credential id ('' none), credential record ttl ms, stream origin (the
/// `pb::StreamOrigin` number), the stream a resumed one takes over ('' none), the attach
/// attempt id ('' none; the credential record's value).
/// Returns 1 attached, 2 attached by taking the lease over from a live holder, -1 not
/// found, -2 ended, -3 held by another stream, -4 CallSid differs from the admitted one,
/// -5 credential used, -6 superseded. Every check runs before any write.
const ATTACH_LUA: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
-- domain::call::retries_committed_attach: a used credential is refused unless this is
-- the same stream's retry (same attempt id, and the credential names the lease stream).
local retry = false
if ARGV[7] ~= '' then
  local rec = redis.call('GET', KEYS[2])
  if rec then
    if ARGV[11] ~= '' and rec == ARGV[11]
      and (redis.call('HGET', KEYS[1], 'lease_stream') or '') == ARGV[7] then
      retry = true
    else
      return -5
    end
  end
end
local cur = tonumber(redis.call('HGET', KEYS[1], 'status') or '0')
if rank(cur) >= FINAL then return -2 end
local recorded = redis.call('HGET', KEYS[1], 'sid') or ''
if ARGV[6] ~= '' and recorded ~= '' and recorded ~= ARGV[6] then return -4 end
local holder = redis.call('HGET', KEYS[1], 'lease_holder') or ''
local lease_until = tonumber(redis.call('HGET', KEYS[1], 'lease_until') or '0')
local now = tonumber(ARGV[4])
-- domain::call::lease_claim: a replayed first or resumed stream is superseded; else free,
-- a reconnect of the holder's relay (a retry counts as one), or a take-over by a first
-- attach that consumes a fresh credential minted to follow the lease stream.
local reconnect = ARGV[2] == '1' or retry
local fresh = ARGV[7] ~= '' and not retry
local origin = tonumber(ARGV[9])
if not reconnect then
  if origin == STREAM_ORIGIN_FIRST and lease_until > 0 then return -6 end
  if origin == STREAM_ORIGIN_RESUME and (redis.call('HGET', KEYS[1], 'lease_stream') or '') ~= ARGV[10] then
    return -6
  end
end
local claim = 1
if holder ~= '' and lease_until > now then
  local same_relay = (redis.call('HGET', KEYS[1], 'lease_relay') or '') == ARGV[1]
  if reconnect and same_relay then
    claim = 1
  elseif not reconnect and fresh and origin ~= STREAM_ORIGIN_FIRST then
    claim = 2
  else
    return -3
  end
end
if fresh then
  redis.call('SET', KEYS[2], ARGV[11], 'PX', math.max(tonumber(ARGV[8]), 1))
  redis.call('HSET', KEYS[1], 'lease_stream', ARGV[7])
end
redis.call('HSET', KEYS[1], 'lease_holder', ARGV[3], 'lease_relay', ARGV[1], 'relay', ARGV[1],
  'lease_until', now + tonumber(ARGV[5]))
return claim
";
/// The `pb::StreamOrigin` number the attach script compares.
fn origin_number(origin: &StreamOrigin) -> i32 {
    match origin {
        StreamOrigin::Unspecified => pb::StreamOrigin::Unspecified as i32,
        StreamOrigin::First => pb::StreamOrigin::First as i32,
        StreamOrigin::Resume { .. } => pb::StreamOrigin::Resume as i32,
    }
}

/// KEYS: call hash. ARGV: holder, now ms, lease ms. Returns 1 renewed, 0 not the holder.
const RENEW_LUA: &str = r"
if (redis.call('HGET', KEYS[1], 'lease_holder') or '') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'lease_until', tonumber(ARGV[2]) + tonumber(ARGV[3]))
return 1
";

/// KEYS: call hash. ARGV: holder, now ms, lease ms (grace for a reconnect).
/// KEYS: call hash. ARGV: the lost stream. Returns 1 when this caller may redirect the
/// call (no holder, `stream` still its last, not redirected for it before), else 0.
const ORPHAN_CLAIM_LUA: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if (redis.call('HGET', KEYS[1], 'lease_holder') or '') ~= '' then return 0 end
if (redis.call('HGET', KEYS[1], 'lease_stream') or '') ~= ARGV[1] then return 0 end
if (redis.call('HGET', KEYS[1], 'orphan_redirect') or '') == ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'orphan_redirect', ARGV[1])
return 1
";

const RELEASE_LUA: &str = r"
if (redis.call('HGET', KEYS[1], 'lease_holder') or '') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'lease_holder', '', 'lease_until', tonumber(ARGV[2]) + tonumber(ARGV[3]))
return 1
";

/// KEYS: call hash. ARGV: sid, from, to. Returns 1 admitted, -1 not found, -2 ended.
const ADMIT_LUA: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local cur = tonumber(redis.call('HGET', KEYS[1], 'status') or '0')
if rank(cur) >= FINAL then return -2 end
local fields = {'sid', 'from', 'to'}
for i, f in ipairs(fields) do
  if ARGV[i] ~= '' and (redis.call('HGET', KEYS[1], f) or '') == '' then
    redis.call('HSET', KEYS[1], f, ARGV[i])
  end
end
if rank(cur) < rank(STATUS_RINGING) then redis.call('HSET', KEYS[1], 'status', STATUS_RINGING) end
return 1
";

/// KEYS: agent hash. ARGV: expected version ('' any: deletes only), new version (0
/// delete), encoded agent. Returns {1, v} done, {-1, 0} not found, {-2, current} conflict.
const AGENT_CAS_LUA: &str = r"
local v = redis.call('HGET', KEYS[1], 'v')
if not v then return {-1, 0} end
v = tonumber(v)
if ARGV[1] ~= '' and tonumber(ARGV[1]) ~= v then return {-2, v} end
if ARGV[2] == '0' then
  redis.call('DEL', KEYS[1])
else
  redis.call('HSET', KEYS[1], 'v', ARGV[2], 'pb', ARGV[3])
end
return {1, v}
";

/// KEYS: call hash. ARGV: sid, status, seq (-1: none), error code ('' none), error
/// message, answered by. Returns -1 not found, else 1 changed / 0 nothing new. The status
/// order is `TwilioCallStatus::rank` (domain/twilio.rs).
/// The ready-relay registry (KEYS: seen, draining; ARGV: relay id, now ms, draining 0/1,
/// alive ms): records the report, forgets relays silent for ten times `alive`, and returns
/// how many other relays reported within `alive` and are not draining (the rule of
/// `heartbeat::ready_others`).
const PRESENCE_LUA: &str = r"
local id, now, alive = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[4])
redis.call('ZADD', KEYS[1], now, id)
if ARGV[3] == '1' then
  redis.call('ZADD', KEYS[2], now, id)
else
  redis.call('ZREM', KEYS[2], id)
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - 10 * alive)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - 10 * alive)
local n = 0
for _, other in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. (now - alive), '+inf')) do
  if other ~= id and not redis.call('ZSCORE', KEYS[2], other) then
    n = n + 1
  end
end
return n
";

const TWILIO_LUA: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local function trank(s)
  if s == '' then return 0 end
  if s == 'queued' or s == 'initiated' then return 1 end
  if s == 'ringing' then return 2 end
  if s == 'in-progress' or s == 'answered' then return 3 end
  return 4
end
local changed = 0
if ARGV[1] ~= '' and (redis.call('HGET', KEYS[1], 'sid') or '') == '' then
  redis.call('HSET', KEYS[1], 'sid', ARGV[1])
  changed = 1
end
if trank(ARGV[2]) > trank(redis.call('HGET', KEYS[1], 'tw_status') or '') then
  redis.call('HSET', KEYS[1], 'tw_status', ARGV[2])
  changed = 1
end
local seq = tonumber(ARGV[3])
if seq >= 0 and seq > tonumber(redis.call('HGET', KEYS[1], 'tw_seq') or '-1') then
  redis.call('HSET', KEYS[1], 'tw_seq', seq)
end
if ARGV[4] ~= '' then
  redis.call('HSET', KEYS[1], 'tw_err', ARGV[4], 'tw_msg', ARGV[5])
  changed = 1
end
if ARGV[6] ~= '' and (redis.call('HGET', KEYS[1], 'amd') or '') == '' then
  redis.call('HSET', KEYS[1], 'amd', ARGV[6])
  changed = 1
end
return changed
";

/// Appends campaign numbers. KEYS: campaign hash, numbers hash. ARGV: the two closed
/// states (completed, canceled), then each number's JSON. Returns {1, count} added,
/// {-1, 0} no such campaign, {-2, state} closed.
const CAMPAIGN_ADD_LUA: &str = r"
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return {-1, 0} end
if state == ARGV[1] or state == ARGV[2] then return {-2, tonumber(state)} end
local n = tonumber(redis.call('HGET', KEYS[1], 'numbers') or '0')
for i = 3, #ARGV do
  redis.call('HSET', KEYS[2], n, ARGV[i])
  n = n + 1
end
redis.call('HSET', KEYS[1], 'numbers', n)
redis.call('HINCRBY', KEYS[1], 'rev', 1)
return {1, n}
";

/// Campaign state compare-and-set. KEYS: campaign hash. ARGV: new state, now ms, then the
/// states it may leave from. Returns {1, new} done, {-1, 0} not found, {-2, current}.
const CAMPAIGN_CHANGE_LUA: &str = r"
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return {-1, 0} end
for i = 3, #ARGV do
  if state == ARGV[i] then
    redis.call('HSET', KEYS[1], 'state', ARGV[1], 'updated', ARGV[2])
    redis.call('HINCRBY', KEYS[1], 'rev', 1)
    return {1, tonumber(ARGV[1])}
  end
end
return {-2, tonumber(state)}
";

/// The dialer lease of a campaign, as the relay call leases: one holder until it runs
/// out, plus a fencing token that grows each time the lease changes hands. KEYS: campaign
/// hash. ARGV: holder, now ms, lease ms. Returns the token while `holder` holds the lease,
/// 0 otherwise (held elsewhere, or no such campaign).
const CAMPAIGN_LEASE_LUA: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local holder = redis.call('HGET', KEYS[1], 'd_holder') or ''
local lease_until = tonumber(redis.call('HGET', KEYS[1], 'd_until') or '0')
local now = tonumber(ARGV[2])
local fence = tonumber(redis.call('HGET', KEYS[1], 'd_fence') or '0')
if holder ~= ARGV[1] then
  if holder ~= '' and lease_until > now then return 0 end
  fence = redis.call('HINCRBY', KEYS[1], 'd_fence', 1)
  redis.call('HSET', KEYS[1], 'd_holder', ARGV[1])
end
redis.call('HSET', KEYS[1], 'd_until', now + tonumber(ARGV[3]))
return fence
";

/// Fenced number writes. KEYS: campaign hash, numbers hash. ARGV: fencing token, then
/// index and JSON pairs. Returns 1 written, 0 fenced out.
const CAMPAIGN_WRITE_LUA: &str = r"
if tonumber(redis.call('HGET', KEYS[1], 'd_fence') or '0') ~= tonumber(ARGV[1]) then return 0 end
for i = 2, #ARGV, 2 do
  redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
end
redis.call('HINCRBY', KEYS[1], 'rev', 1)
return 1
";

/// Settles a campaign. KEYS: campaign hash, numbers hash. ARGV: fencing token, number
/// count, running, completed, canceled (states), now ms, ttl ms. Returns 1 settled (now or
/// before), 0 not.
const CAMPAIGN_SETTLE_LUA: &str = r"
if redis.call('HGET', KEYS[1], 'settled') == '1' then return 1 end
if tonumber(redis.call('HGET', KEYS[1], 'd_fence') or '0') ~= tonumber(ARGV[1]) then return 0 end
if (redis.call('HGET', KEYS[1], 'numbers') or '0') ~= ARGV[2] then return 0 end
local state = redis.call('HGET', KEYS[1], 'state')
if state == ARGV[3] then
  redis.call('HSET', KEYS[1], 'state', ARGV[4], 'updated', ARGV[6])
elseif state ~= ARGV[5] then
  return 0
end
redis.call('HSET', KEYS[1], 'settled', '1')
redis.call('HINCRBY', KEYS[1], 'rev', 1)
redis.call('PEXPIRE', KEYS[1], ARGV[7])
redis.call('PEXPIRE', KEYS[2], ARGV[7])
return 1
";

fn campaign_state(n: i64) -> pb::CampaignState {
    i32::try_from(n)
        .ok()
        .and_then(|n| pb::CampaignState::try_from(n).ok())
        .unwrap_or_default()
}

fn campaign_from_fields(
    campaign_id: &CampaignId,
    mut h: HashMap<String, String>,
) -> StoreResult<Option<CampaignRecord>> {
    use base64::Engine as _;
    let Some(raw) = h.remove("pb") else {
        return Ok(None);
    };
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(raw)
        .map_err(|e| StoreError::Corrupt(format!("campaign settings: {e}")))?;
    let settings = pb::CampaignSettings::decode(bytes.as_slice())
        .map_err(|e| StoreError::Corrupt(format!("campaign settings: {e}")))?;
    let num = |h: &mut HashMap<String, String>, k: &str| -> i64 {
        h.remove(k).and_then(|v| v.parse().ok()).unwrap_or(0)
    };
    Ok(Some(CampaignRecord {
        campaign_id: campaign_id.clone(),
        settings,
        state: campaign_state(num(&mut h, "state")),
        created_at_ms: num(&mut h, "created"),
        updated_at_ms: num(&mut h, "updated"),
        numbers: u32::try_from(num(&mut h, "numbers")).unwrap_or(0),
        settled: num(&mut h, "settled") == 1,
        revision: u64::try_from(num(&mut h, "rev")).unwrap_or(0),
    }))
}

/// The Redis store.
#[derive(Clone)]
pub struct RedisStore {
    conn: Conn,
    scripts: Arc<Scripts>,
    retention_ms: i64,
    latency: Option<RedisLatency>,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("retention_ms", &self.retention_ms)
            .finish_non_exhaustive()
    }
}

/// Where to connect. `Debug` leaves the URLs out: they may carry Redis's password.
#[derive(Clone)]
pub enum RedisTarget {
    /// One server URL.
    Single(String),
    /// Cluster seed URLs.
    Cluster(Vec<String>),
}

impl std::fmt::Debug for RedisTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Single(_) => f.write_str("Single([redacted])"),
            Self::Cluster(nodes) => write!(f, "Cluster([{} redacted])", nodes.len()),
        }
    }
}

impl RedisStore {
    /// Connects, and starts the pub/sub listener feeding `hub` (until `shutdown`).
    ///
    /// Connecting fails if Redis cannot be reached now; afterwards outages are survived
    /// (commands fail with [`StoreError::Unavailable`] until it is back).
    pub async fn connect(
        target: &RedisTarget,
        retention: Duration,
        hub: Arc<Hub>,
        replica_id: &str,
        tracker: &TaskTracker,
        shutdown: CancellationToken,
    ) -> Result<Self, StoreError> {
        Self::connect_tls(target, None, retention, hub, replica_id, tracker, shutdown).await
    }

    /// [`RedisStore::connect`] with a CA and client certificate for `rediss://` URLs (read
    /// from their files now, so every later reconnection uses the same ones).
    pub async fn connect_tls(
        target: &RedisTarget,
        tls: Option<&RedisTlsFiles>,
        retention: Duration,
        hub: Arc<Hub>,
        replica_id: &str,
        tracker: &TaskTracker,
        shutdown: CancellationToken,
    ) -> Result<Self, StoreError> {
        let certs = match tls {
            Some(files) => Some(files.read().map_err(|e| {
                let e =
                    std::io::Error::new(e.kind(), format!("cannot read the Redis TLS files: {e}"));
                StoreError::from(redis::RedisError::from(e))
            })?),
            None => None,
        };
        let (conn, pubsub_urls) = match target {
            RedisTarget::Single(url) => {
                let client = client(url, certs.as_ref())?;
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(CONNECT_TIMEOUT))
                    .set_response_timeout(Some(RESPONSE_TIMEOUT))
                    .set_max_delay(Duration::from_secs(1))
                    .set_number_of_retries(2);
                let manager = ConnectionManager::new_with_config(client, config).await?;
                (Conn::Single(manager), vec![url.clone()])
            }
            RedisTarget::Cluster(nodes) => {
                let client = cluster_builder(nodes, certs.as_ref())
                    .connection_timeout(CONNECT_TIMEOUT)
                    .response_timeout(RESPONSE_TIMEOUT)
                    .build()?;
                let conn = client.get_async_connection().await?;
                (Conn::Cluster(conn), nodes.clone())
            }
        };
        let store = RedisStore {
            conn,
            scripts: Arc::new(Scripts::new()),
            retention_ms: i64::try_from(retention.as_millis()).unwrap_or(i64::MAX),
            latency: None,
        };
        let commands = keys::commands_channel(replica_id);
        match target {
            RedisTarget::Single(_) => {
                let channels = vec![keys::events_channel(), commands];
                tracker.spawn(run_subscriber(pubsub_urls, certs, channels, hub, shutdown));
            }
            RedisTarget::Cluster(nodes) => {
                // Events: PUBLISH is broadcast to the whole cluster, so a subscriber on
                // any one node hears every event. Commands: SPUBLISH goes to the node
                // owning the channel's slot only, and its receiver count (which tells
                // SendCommand whether the holding replica listens) counts that node's
                // subscribers, so the command channel is subscribed there (SSUBSCRIBE).
                let sub = subscribe_sharded(nodes, certs.as_ref(), &commands, hub.clone()).await?;
                tracker.spawn(keep_sharded_subscription(sub, commands, shutdown.clone()));
                let channels = vec![keys::events_channel()];
                tracker.spawn(run_subscriber(pubsub_urls, certs, channels, hub, shutdown));
            }
        }
        Ok(store)
    }

    /// Observes every command's round trip in `latency` from now on.
    pub fn with_latency(mut self, latency: RedisLatency) -> Self {
        self.latency = Some(latency);
        self
    }

    fn conn(&self) -> Timed {
        Timed {
            conn: self.conn.clone(),
            latency: self.latency.clone(),
        }
    }

    async fn query<T: redis::FromRedisValue>(&self, cmd: &Cmd) -> StoreResult<T> {
        let mut conn = self.conn();
        Ok(cmd.query_async(&mut conn).await?)
    }
}

/// Connection info for `url` with TCP_NODELAY: many small commands are in flight at
/// once, and Nagle would hold each write until the previous reply arrives.
fn nodelay(url: &str) -> Result<redis::ConnectionInfo, StoreError> {
    use redis::IntoConnectionInfo;
    let info = url.into_connection_info()?;
    let tcp = redis::io::tcp::TcpSettings::default().set_nodelay(true);
    Ok(info.set_tcp_settings(tcp))
}

/// A client for `url`, with `certs` when it is a `rediss://` URL.
fn client(url: &str, certs: Option<&redis::TlsCertificates>) -> Result<redis::Client, StoreError> {
    let info = nodelay(url)?;
    Ok(match certs {
        Some(certs) if url.starts_with("rediss://") => {
            redis::Client::build_with_tls(info, certs.clone())?
        }
        _ => redis::Client::open(info)?,
    })
}

/// A cluster client builder for `nodes` with TCP_NODELAY and `certs`, if any.
fn cluster_builder(
    nodes: &[String],
    certs: Option<&redis::TlsCertificates>,
) -> redis::cluster::ClusterClientBuilder {
    let builder = redis::cluster::ClusterClient::builder(nodes.to_vec())
        .tcp_settings(redis::io::tcp::TcpSettings::default().set_nodelay(true));
    match certs {
        Some(certs) => builder.certs(certs.clone()),
        None => builder,
    }
}

/// How often the sharded command subscription is renewed. The cluster connection
/// resubscribes by itself after a disconnection or a slot-map change it notices; renewing
/// makes it notice a move of the channel's slot (the renewal is redirected) even when
/// nothing else is sent on that connection.
const SHARDED_RENEW: Duration = Duration::from_secs(2);

/// A RESP3 cluster connection subscribed (SSUBSCRIBE) to `channel` on the node owning its
/// slot; its messages are decoded and dispatched to `hub` as commands.
async fn subscribe_sharded(
    nodes: &[String],
    certs: Option<&redis::TlsCertificates>,
    channel: &str,
    hub: Arc<Hub>,
) -> Result<redis::cluster_async::ClusterConnection, StoreError> {
    let deliver = move |info: redis::PushInfo| -> Result<(), std::convert::Infallible> {
        // Subscription confirmations and disconnection notices are pushes too.
        if let Some(msg) = redis::Msg::from_push_info(info)
            && !decode_bus(false, msg.get_payload_bytes(), |message| {
                hub.dispatch(message);
            })
        {
            tracing::warn!("Undecodable command bus message.");
        }
        Ok(())
    };
    let client = cluster_builder(nodes, certs)
        .connection_timeout(CONNECT_TIMEOUT)
        .response_timeout(RESPONSE_TIMEOUT)
        .use_protocol(redis::ProtocolVersion::RESP3)
        .push_sender(deliver)
        .build()?;
    let mut conn = client.get_async_connection().await?;
    conn.ssubscribe(channel).await?;
    tracing::debug!(channel, "Redis sharded pub/sub subscribed.");
    Ok(conn)
}

/// Holds the sharded subscription until `shutdown`, renewing it now and then.
async fn keep_sharded_subscription(
    mut conn: redis::cluster_async::ClusterConnection,
    channel: String,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(SHARDED_RENEW) => {}
        }
        let renew = tokio::select! {
            () = shutdown.cancelled() => return,
            r = conn.ssubscribe(&channel) => r,
        };
        if let Err(err) = renew {
            tracing::debug!(error = %err, "Renewing the sharded subscription failed; retrying.");
        }
    }
}

/// Keeps one pub/sub connection subscribed, reconnecting after outages (to the next of
/// `urls` each time: any node of a cluster will do); a message lost during an outage is
/// recovered by watchers' catch-up reads.
async fn run_subscriber(
    urls: Vec<String>,
    certs: Option<redis::TlsCertificates>,
    channels: Vec<String>,
    hub: Arc<Hub>,
    shutdown: CancellationToken,
) {
    let clients = match urls
        .iter()
        .map(|url| client(url, certs.as_ref()))
        .collect::<Result<Vec<_>, _>>()
    {
        Ok(c) if !c.is_empty() => c,
        Ok(_) => {
            tracing::error!("No Redis node to subscribe on.");
            return;
        }
        Err(err) => {
            tracing::error!(error = %err, "Cannot create the Redis pub/sub client.");
            return;
        }
    };
    let events_channel = keys::events_channel();
    for client in clients.iter().cycle() {
        let session = async {
            let mut pubsub = client.get_async_pubsub().await?;
            for channel in &channels {
                pubsub.subscribe(channel).await?;
            }
            tracing::debug!("Redis pub/sub subscribed.");
            let mut messages = pubsub.into_on_message();
            while let Some(msg) = messages.next().await {
                let channel = msg.get_channel_name();
                let is_event = channel == events_channel;
                // Nobody here watches: skip the decoding. A watcher that subscribes
                // later reads these events from the store (they were stored before
                // being published).
                if is_event && !hub.has_event_watchers() {
                    continue;
                }
                if !decode_bus(is_event, msg.get_payload_bytes(), |message| {
                    hub.dispatch(message);
                }) {
                    tracing::warn!(channel, "Undecodable bus message.");
                }
            }
            Ok::<(), redis::RedisError>(())
        };
        tokio::select! {
            // Shutdown ends the listener wherever it is.
            () = shutdown.cancelled() => return,
            result = session => {
                if let Err(err) = result {
                    tracing::debug!(error = %err, "Redis pub/sub connection lost; retrying.");
                }
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(PUBSUB_RETRY) => {}
        }
    }
}

/// The wire form of a bus message (a small protobuf message, not part of the public contract).
///
/// Events: `campaign_id` and either one `event` (what every version understands) or, for
/// a run of several events stored together, `events` (one message per run).
#[derive(Clone, PartialEq, prost::Message)]
struct BusEnvelope {
    #[prost(string, tag = "1")]
    campaign_id: String,
    #[prost(message, optional, tag = "2")]
    event: Option<pb::CallEvent>,
    #[prost(string, tag = "3")]
    call_id: String,
    #[prost(message, optional, tag = "4")]
    command: Option<pb::Command>,
    #[prost(message, repeated, tag = "5")]
    events: Vec<pb::CallEvent>,
}

/// Decodes one bus message and hands each message in it to `deliver`; `false` if it
/// cannot be decoded.
fn decode_bus(is_event: bool, payload: &[u8], mut deliver: impl FnMut(BusMessage)) -> bool {
    let Ok(envelope) = BusEnvelope::decode(payload) else {
        return false;
    };
    if is_event {
        let BusEnvelope {
            campaign_id,
            event,
            events,
            ..
        } = envelope;
        if event.is_none() && events.is_empty() {
            return false;
        }
        let campaign_id = (!campaign_id.is_empty()).then(|| CampaignId::from_stored(campaign_id));
        for event in event.into_iter().chain(events) {
            deliver(BusMessage::Event {
                campaign_id: campaign_id.clone(),
                event,
            });
        }
        true
    } else {
        match envelope.command {
            Some(command) => {
                deliver(BusMessage::Command {
                    call_id: CallId::from_stored(envelope.call_id),
                    command,
                });
                true
            }
            None => false,
        }
    }
}

// === record <-> hash ===

/// The hash fields of a record; an absent id or text is an empty field, as it always was.
fn call_to_fields(call: &CallRecord) -> Vec<(&'static str, String)> {
    let text = |value: &Option<String>| value.clone().unwrap_or_default();
    let mut fields = vec![
        ("id", call.call_id.to_string()),
        ("agent", call.agent_id.to_string()),
        ("dir", (call.direction as i32).to_string()),
        ("status", (call.status as i32).to_string()),
        ("from", call.from.clone()),
        ("to", call.to.clone()),
        ("campaign", or_empty(call.campaign_id.as_ref()).to_owned()),
        ("sid", or_empty(call.twilio_call_sid.as_ref()).to_owned()),
        ("stream_sid", or_empty(call.stream_sid.as_ref()).to_owned()),
        ("relay", or_empty(call.relay_id.as_ref()).to_owned()),
        ("created", call.created_at_ms.to_string()),
        ("started", call.started_at_ms.to_string()),
        ("ended", call.ended_at_ms.to_string()),
        (
            "end_reason",
            call.end_reason.map_or(0, |r| r as i32).to_string(),
        ),
        ("end_detail", text(&call.end_detail)),
        ("transfer_to", text(&call.transfer_to)),
        (
            "meta",
            serde_json::to_string(&call.metadata).unwrap_or_else(|_| "{}".to_owned()),
        ),
        ("last_seq", call.last_seq.to_string()),
        (
            "lease_holder",
            or_empty(call.lease_holder.as_ref()).to_owned(),
        ),
        (
            "lease_relay",
            or_empty(call.lease_relay.as_ref()).to_owned(),
        ),
        ("lease_until", call.lease_until_ms.to_string()),
        (
            "lease_stream",
            or_empty(call.lease_stream.as_ref()).to_owned(),
        ),
        ("dial", u8::from(call.dialed).to_string()),
        (
            "tw_status",
            call.twilio_status
                .map_or_else(String::new, |s| s.as_str().to_owned()),
        ),
        ("tw_seq", call.twilio_seq.to_string()),
        ("tw_err", call.twilio_error_code.to_string()),
        ("tw_msg", call.twilio_error_message.clone()),
        ("amd", text(&call.answered_by)),
    ];
    for (name, value) in USAGE_FIELDS.iter().zip(call.usage) {
        fields.push((name, value.to_string()));
    }
    fields
}

fn call_from_fields(mut h: HashMap<String, String>) -> Option<CallRecord> {
    if h.is_empty() {
        return None;
    }
    // A hash without its id is a partial write of a call that expired meanwhile.
    let call_id = h.remove("id").filter(|id| !id.is_empty())?;
    let mut take = |k: &str| h.remove(k).unwrap_or_default();
    fn num<T: std::str::FromStr + Default>(s: String) -> T {
        s.parse().unwrap_or_default()
    }
    // Stored values are read as written (checked when they entered); empty is none.
    fn some(s: String) -> Option<String> {
        (!s.is_empty()).then_some(s)
    }
    let mut call = CallRecord {
        call_id: CallId::from_stored(call_id),
        agent_id: AgentId::from_stored(take("agent")),
        direction: record::direction(num(take("dir"))),
        status: record::call_status(num(take("status"))),
        from: take("from"),
        to: take("to"),
        campaign_id: some(take("campaign")).map(CampaignId::from_stored),
        twilio_call_sid: some(take("sid")).map(CallSid::from_stored),
        stream_sid: some(take("stream_sid")).map(StreamSid::from_stored),
        relay_id: some(take("relay")).map(RelayId::from_stored),
        created_at_ms: num(take("created")),
        started_at_ms: num(take("started")),
        ended_at_ms: num(take("ended")),
        end_reason: record::end_reason(num(take("end_reason"))),
        end_detail: some(take("end_detail")),
        transfer_to: some(take("transfer_to")),
        metadata: serde_json::from_str(&take("meta")).unwrap_or_default(),
        last_seq: num(take("last_seq")),
        lease_holder: some(take("lease_holder")).map(LeaseHolder::from_stored),
        lease_relay: some(take("lease_relay")).map(RelayId::from_stored),
        lease_until_ms: num(take("lease_until")),
        lease_stream: some(take("lease_stream")).map(StreamCredentialId::from_stored),
        usage: [0; 9],
        dialed: take("dial") == "1",
        // A status this build does not know reads as none.
        twilio_status: TwilioCallStatus::from_name(&take("tw_status")),
        twilio_seq: num(take("tw_seq")),
        twilio_error_code: num(take("tw_err")),
        twilio_error_message: take("tw_msg"),
        answered_by: some(take("amd")),
    };
    for (slot, name) in call.usage.iter_mut().zip(USAGE_FIELDS) {
        *slot = num(take(name));
    }
    Some(call)
}

fn decode_agent(bytes: Option<Vec<u8>>) -> StoreResult<Option<pb::Agent>> {
    bytes
        .map(|b| pb::Agent::decode(b.as_slice()).map_err(StoreError::from))
        .transpose()
}

fn cas_outcome(reply: (i64, u64)) -> AgentCas {
    match reply.0 {
        1 => AgentCas::Done,
        -1 => AgentCas::NotFound,
        _ => AgentCas::Conflict { current: reply.1 },
    }
}

impl CallStore for RedisStore {
    async fn create_agent(&self, agent: &pb::Agent) -> StoreResult<bool> {
        let key = keys::agent(&agent.agent_id);
        // HSETNX on the version field decides who creates; the body follows. A reader
        // in between sees no body and treats the agent as absent.
        let mut conn = self.conn();
        let created: bool = redis::cmd("HSETNX")
            .arg(&key)
            .arg("v")
            .arg(agent.version)
            .query_async(&mut conn)
            .await?;
        if !created {
            return Ok(false);
        }
        let mut body = redis::cmd("HSET");
        body.arg(&key).arg("pb").arg(agent.encode_to_vec());
        let mut index = redis::cmd("ZADD");
        index.arg(keys::agents_index()).arg(0).arg(&agent.agent_id);
        self.run_all(vec![body, index]).await?;
        Ok(true)
    }

    async fn get_agent(&self, agent_id: &AgentId) -> StoreResult<Option<pb::Agent>> {
        let bytes: Option<Vec<u8>> = self
            .query(
                redis::cmd("HGET")
                    .arg(keys::agent(agent_id.as_str()))
                    .arg("pb"),
            )
            .await?;
        decode_agent(bytes)
    }

    async fn replace_agent(&self, agent: &pb::Agent, expected: u64) -> StoreResult<AgentCas> {
        let mut conn = self.conn();
        let reply: (i64, u64) = self
            .scripts
            .agent_cas
            .key(keys::agent(&agent.agent_id))
            .arg(expected)
            .arg(agent.version)
            .arg(agent.encode_to_vec())
            .invoke_async(&mut conn)
            .await?;
        Ok(cas_outcome(reply))
    }

    async fn delete_agent(&self, agent_id: &AgentId, expected: u64) -> StoreResult<AgentCas> {
        let mut conn = self.conn();
        let reply: (i64, u64) = self
            .scripts
            .agent_cas
            .key(keys::agent(agent_id.as_str()))
            // 0 deletes whatever the version; a replace always names one.
            .arg(if expected == 0 {
                String::new()
            } else {
                expected.to_string()
            })
            .arg(0)
            .arg("")
            .invoke_async(&mut conn)
            .await?;
        let outcome = cas_outcome(reply);
        if outcome == AgentCas::Done {
            let _: () = self
                .query(
                    redis::cmd("ZREM")
                        .arg(keys::agents_index())
                        .arg(agent_id.as_str()),
                )
                .await?;
            for (number, target) in self.list_routes().await? {
                if target == *agent_id {
                    let _: () = self
                        .query(redis::cmd("HDEL").arg(keys::routes()).arg(number))
                        .await?;
                }
            }
            if self.get_default_agent().await?.as_ref() == Some(agent_id) {
                self.set_default_agent(None).await?;
            }
        }
        Ok(outcome)
    }

    async fn list_agents(
        &self,
        after: Option<&AgentId>,
        limit: usize,
    ) -> StoreResult<Vec<pb::Agent>> {
        let min = after.map_or_else(|| "-".to_owned(), |after| format!("({after}"));
        let ids: Vec<String> = self
            .query(
                redis::cmd("ZRANGEBYLEX")
                    .arg(keys::agents_index())
                    .arg(min)
                    .arg("+")
                    .arg("LIMIT")
                    .arg(0)
                    .arg(limit),
            )
            .await?;
        let mut agents = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(agent) = self.get_agent(&AgentId::from_stored(id)).await? {
                agents.push(agent);
            }
        }
        Ok(agents)
    }

    async fn set_route(&self, number: &str, agent_id: &AgentId) -> StoreResult<()> {
        self.query(
            redis::cmd("HSET")
                .arg(keys::routes())
                .arg(number)
                .arg(agent_id.as_str()),
        )
        .await
    }

    async fn delete_route(&self, number: &str) -> StoreResult<bool> {
        let n: i64 = self
            .query(redis::cmd("HDEL").arg(keys::routes()).arg(number))
            .await?;
        Ok(n > 0)
    }

    async fn get_route(&self, number: &str) -> StoreResult<Option<AgentId>> {
        let agent: Option<String> = self
            .query(redis::cmd("HGET").arg(keys::routes()).arg(number))
            .await?;
        Ok(agent.map(AgentId::from_stored))
    }

    async fn list_routes(&self) -> StoreResult<Vec<(String, AgentId)>> {
        let map: HashMap<String, String> = self
            .query(redis::cmd("HGETALL").arg(keys::routes()))
            .await?;
        let mut routes: Vec<_> = map
            .into_iter()
            .map(|(number, agent)| (number, AgentId::from_stored(agent)))
            .collect();
        routes.sort();
        Ok(routes)
    }

    async fn set_default_agent(&self, agent_id: Option<&AgentId>) -> StoreResult<()> {
        match agent_id {
            Some(id) => {
                self.query(
                    redis::cmd("SET")
                        .arg(keys::default_agent())
                        .arg(id.as_str()),
                )
                .await
            }
            None => {
                self.query(redis::cmd("DEL").arg(keys::default_agent()))
                    .await
            }
        }
    }

    async fn get_default_agent(&self) -> StoreResult<Option<AgentId>> {
        let agent: Option<String> = self
            .query(redis::cmd("GET").arg(keys::default_agent()))
            .await?;
        Ok(agent.map(AgentId::from_stored))
    }

    async fn create_calls(&self, calls: &[CallRecord]) -> StoreResult<()> {
        let mut cmds = Vec::with_capacity(calls.len() * 5);
        for call in calls {
            cmds.extend(self.write_call_cmds(call));
            let mut index = redis::cmd("ZADD");
            index
                .arg(keys::calls_index())
                .arg(call.created_at_ms)
                .arg(call.call_id.as_str());
            cmds.push(index);
            if let Some(campaign_id) = &call.campaign_id {
                let campaign = keys::campaign_index(campaign_id.as_str());
                let mut add = redis::cmd("ZADD");
                add.arg(&campaign)
                    .arg(call.created_at_ms)
                    .arg(call.call_id.as_str());
                // The campaign view lives a day beyond its newest call's retention.
                let mut expire = redis::cmd("PEXPIRE");
                expire
                    .arg(&campaign)
                    .arg(self.retention_ms.saturating_add(DAY_MS));
                cmds.push(add);
                cmds.push(expire);
            }
        }
        self.run_all(cmds).await
    }

    async fn get_call(&self, call_id: &CallId) -> StoreResult<Option<CallRecord>> {
        let h: HashMap<String, String> = self
            .query(redis::cmd("HGETALL").arg(keys::call(call_id.as_str())))
            .await?;
        Ok(call_from_fields(h))
    }

    async fn get_calls(&self, call_ids: &[CallId]) -> StoreResult<Vec<Option<CallRecord>>> {
        if call_ids.is_empty() {
            // An empty pipeline is a client error in redis-rs.
            return Ok(Vec::new());
        }
        let mut conn = self.conn();
        let hashes: Vec<HashMap<String, String>> = match &self.conn {
            Conn::Single(_) => {
                let mut pipe = redis::pipe();
                for id in call_ids {
                    pipe.cmd("HGETALL").arg(keys::call(id.as_str()));
                }
                pipe.query_async(&mut conn).await?
            }
            // A cluster pipeline must stay in one slot; concurrent commands still share
            // the multiplexed connections.
            Conn::Cluster(_) => {
                futures_util::future::try_join_all(call_ids.iter().map(|id| {
                    let mut conn = self.conn();
                    async move {
                        redis::cmd("HGETALL")
                            .arg(keys::call(id.as_str()))
                            .query_async::<HashMap<String, String>>(&mut conn)
                            .await
                    }
                }))
                .await?
            }
        };
        Ok(hashes.into_iter().map(call_from_fields).collect())
    }

    async fn admit_existing(
        &self,
        call_id: &CallId,
        twilio_call_sid: Option<&CallSid>,
        from: &str,
        to: &str,
    ) -> StoreResult<AdmitOutcome> {
        let mut conn = self.conn();
        let code: i64 = self
            .scripts
            .admit
            .key(keys::call(call_id.as_str()))
            .arg(or_empty(twilio_call_sid))
            .arg(from)
            .arg(to)
            .invoke_async(&mut conn)
            .await?;
        let outcome = match code {
            1 => AdmitOutcome::Admitted,
            -2 => AdmitOutcome::Ended,
            _ => AdmitOutcome::NotFound,
        };
        if outcome == AdmitOutcome::Admitted
            && let Some(sid) = twilio_call_sid
        {
            let _: () = self
                .query(
                    redis::cmd("SET")
                        .arg(keys::twilio_sid(sid.as_str()))
                        .arg(call_id.as_str())
                        .arg("NX")
                        .arg("PX")
                        .arg(self.retention_ms),
                )
                .await?;
        }
        Ok(outcome)
    }

    async fn record_twilio(&self, call_id: &CallId, u: &TwilioUpdate) -> StoreResult<Option<bool>> {
        let (code, message) = match &u.error {
            Some((code, message)) => (code.to_string(), message.clone()),
            None => (String::new(), String::new()),
        };
        let mut invocation = self.scripts.twilio.key(keys::call(call_id.as_str()));
        invocation
            .arg(or_empty(u.sid.as_ref()))
            .arg(u.status.map_or("", TwilioCallStatus::as_str))
            .arg(u.seq.map_or(-1, i64::from))
            .arg(code)
            .arg(message)
            .arg(u.answered_by.as_deref().unwrap_or(""));
        let mut conn = self.conn();
        let result: i64 = invocation
            .invoke_async(&mut conn)
            .await
            .map_err(StoreError::from)?;
        Ok((result >= 0).then_some(result == 1))
    }

    async fn call_id_by_sid(&self, sid: &CallSid) -> StoreResult<Option<CallId>> {
        let id: Option<String> = self
            .query(redis::cmd("GET").arg(keys::twilio_sid(sid.as_str())))
            .await?;
        Ok(id.map(CallId::from_stored))
    }

    async fn admit_inbound(&self, call: &CallRecord) -> StoreResult<CallId> {
        // Write the call first, then claim the sid: whoever sees the sid taken can
        // read the winner's call at once. The loser deletes its unindexed hash.
        let key = keys::call(call.call_id.as_str());
        self.run_all(self.write_call_cmds(call)).await?;
        let claimed: Option<String> = self
            .query(
                redis::cmd("SET")
                    .arg(keys::twilio_sid(or_empty(call.twilio_call_sid.as_ref())))
                    .arg(call.call_id.as_str())
                    .arg("NX")
                    .arg("GET")
                    .arg("PX")
                    .arg(self.retention_ms),
            )
            .await?;
        if let Some(existing) = claimed {
            let _: () = self.query(redis::cmd("DEL").arg(&key)).await?;
            return Ok(CallId::from_stored(existing));
        }
        let _: () = self
            .query(
                redis::cmd("ZADD")
                    .arg(keys::calls_index())
                    .arg(call.created_at_ms)
                    .arg(call.call_id.as_str()),
            )
            .await?;
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
        let (credential_id, record_ms) = match &checks.credential {
            Some((id, expires)) => (
                id.as_str(),
                expires.saturating_sub(now_ms) + CREDENTIAL_RECORD_GRACE_MS,
            ),
            None => ("", 0),
        };
        // The second key is always passed (Redis Cluster routes by the keys given); with no
        // credential the script does not touch it.
        let code = self
            .lease_script(
                self.scripts
                    .attach
                    .key(keys::call(call_id.as_str()))
                    .key(keys::call_credential(call_id.as_str(), credential_id))
                    .arg(relay_id.as_str())
                    .arg(u8::from(reconnect))
                    .arg(holder.as_str())
                    .arg(now_ms)
                    .arg(lease_ms)
                    .arg(checks.twilio_call_sid.as_deref().unwrap_or(""))
                    .arg(credential_id)
                    .arg(record_ms)
                    .arg(origin_number(&checks.origin))
                    .arg(match &checks.origin {
                        StreamOrigin::Resume {
                            takes_over: Some(id),
                        } => id.as_str(),
                        _ => "",
                    })
                    .arg(
                        checks
                            .attempt
                            .as_ref()
                            .map_or("", StreamCredentialId::as_str),
                    ),
                call_id,
                now_ms + lease_ms,
            )
            .await?;
        Ok(match code {
            1 => AttachOutcome::Attached,
            2 => AttachOutcome::TookOver,
            -2 => AttachOutcome::Ended,
            -3 => AttachOutcome::Held,
            -4 => AttachOutcome::CallSidMismatch,
            -5 => AttachOutcome::CredentialUsed,
            -6 => AttachOutcome::Superseded,
            _ => AttachOutcome::NotFound,
        })
    }

    async fn renew_lease(
        &self,
        call_id: &CallId,
        holder: &LeaseHolder,
        now_ms: i64,
        lease_ms: i64,
    ) -> StoreResult<bool> {
        let code = self
            .holder_script(&self.scripts.renew, call_id, holder, now_ms, lease_ms)
            .await?;
        Ok(code == 1)
    }

    async fn claim_orphan_redirect(
        &self,
        call_id: &CallId,
        stream: &StreamCredentialId,
        _now_ms: i64,
    ) -> StoreResult<bool> {
        let mut conn = self.conn();
        let claimed: i64 = self
            .scripts
            .orphan_claim
            .key(keys::call(call_id.as_str()))
            .arg(stream.as_str())
            .invoke_async(&mut conn)
            .await?;
        Ok(claimed == 1)
    }

    async fn release_lease(
        &self,
        call_id: &CallId,
        holder: &LeaseHolder,
        now_ms: i64,
        lease_ms: i64,
    ) -> StoreResult<()> {
        self.holder_script(&self.scripts.release, call_id, holder, now_ms, lease_ms)
            .await?;
        Ok(())
    }

    async fn append_events(
        &self,
        call_id: &CallId,
        campaign_id: Option<&CampaignId>,
        events: &[pb::CallEvent],
        effects: &[EventEffects],
    ) -> StoreResult<Vec<AppendOutcome>> {
        debug_assert_eq!(events.len(), effects.len(), "one effects per event");
        if events.is_empty() {
            return Ok(Vec::new());
        }
        let prefix = BusEnvelope {
            campaign_id: or_empty(campaign_id).to_owned(),
            ..Default::default()
        }
        .encode_to_vec();
        // A plain EVALSHA command: its arguments go straight into one buffer (a
        // `ScriptInvocation` allocates a Vec per argument and copies them again).
        let mut cmd = Cmd::with_capacity(8 + events.len() * 8, 256 + events.len() * 160);
        cmd.arg("EVALSHA")
            .arg(self.scripts.append.get_hash())
            .arg(2)
            .arg(keys::call(call_id.as_str()))
            .arg(keys::call_events(call_id.as_str()))
            .arg(self.retention_ms)
            .arg(keys::events_channel())
            .arg(prefix);
        // One scratch buffer: `arg` copies the bytes into the command.
        let mut bytes = Vec::new();
        for (event, effects) in events.iter().zip(effects) {
            bytes.clear();
            event
                .encode(&mut bytes)
                .expect("a Vec grows to fit any message");
            let mut bits = 0u8;
            if effects.started.is_some() {
                bits |= mask::STARTED;
            }
            if effects.ended.is_some() {
                bits |= mask::ENDED;
            }
            if effects.handoff {
                bits |= mask::HANDOFF;
            }
            if effects.usage.is_some() {
                bits |= mask::USAGE;
            }
            if effects.require_lease_expired_before.is_some() {
                bits |= mask::LEASE_EXPIRED_BEFORE;
            }
            if effects.require_holder.is_some() {
                bits |= mask::HOLDER;
            }
            cmd.arg(event.seq)
                .arg(&bytes[..])
                .arg(effects.at_ms)
                .arg(effects.new_status.map_or(0, |s| s as i32))
                .arg(bits);
            if let Some(started) = &effects.started {
                cmd.arg(or_empty(started.twilio_call_sid.as_ref()))
                    .arg(or_empty(started.stream_sid.as_ref()))
                    .arg(or_empty(started.relay_id.as_ref()));
            }
            if let Some(ended) = &effects.ended {
                cmd.arg(ended.reason as i32)
                    .arg(&ended.detail)
                    .arg(&ended.transfer_to);
            }
            if let Some(usage) = &effects.usage {
                for value in usage {
                    cmd.arg(*value);
                }
            }
            if let Some(before) = effects.require_lease_expired_before {
                cmd.arg(before);
            }
            if let Some(holder) = &effects.require_holder {
                cmd.arg(holder.as_str());
            }
        }
        let mut conn = self.conn();
        let (code, last, handled): (i64, u64, String) = match cmd.query_async(&mut conn).await {
            // First use on this server (or after a restart / SCRIPT FLUSH).
            Err(err)
                if err.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) =>
            {
                self.scripts.append.load_async(&mut conn).await?;
                cmd.query_async(&mut conn).await?
            }
            result => result?,
        };
        let mut outcomes: Vec<AppendOutcome> = handled
            .bytes()
            .map(|b| match b {
                b'S' => AppendOutcome::Stored,
                _ => AppendOutcome::Duplicate,
            })
            .collect();
        match code {
            1 => {}
            -2 => outcomes.push(AppendOutcome::Gap { last_seq: last }),
            -3 => outcomes.push(AppendOutcome::ConditionFailed),
            _ => outcomes.push(AppendOutcome::NotFound),
        }
        let ended = outcomes
            .iter()
            .zip(effects)
            .any(|(o, e)| *o == AppendOutcome::Stored && e.ended.is_some());
        if ended {
            // A final call needs no sweeping; a failure here only costs the sweeper a look.
            let _ = self.forget_lease(call_id).await;
        }
        Ok(outcomes)
    }

    async fn read_events(
        &self,
        call_id: &CallId,
        after_seq: u64,
        limit: usize,
    ) -> StoreResult<Vec<pb::CallEvent>> {
        let entries: Vec<(String, Vec<Vec<u8>>)> = self
            .query(
                redis::cmd("XRANGE")
                    .arg(keys::call_events(call_id.as_str()))
                    .arg(format!("{}-0", after_seq.saturating_add(1)))
                    .arg("+")
                    .arg("COUNT")
                    .arg(limit),
            )
            .await?;
        entries
            .into_iter()
            .map(|(_, fields)| {
                let bytes = fields
                    .get(1)
                    .ok_or_else(|| StoreError::Corrupt("event entry without payload".into()))?;
                Ok(pb::CallEvent::decode(bytes.as_slice())?)
            })
            .collect()
    }

    async fn expired_leases(&self, now_ms: i64, limit: usize) -> StoreResult<Vec<CallId>> {
        let ids: Vec<String> = self
            .query(
                redis::cmd("ZRANGEBYSCORE")
                    .arg(keys::leases_index())
                    .arg("-inf")
                    .arg(format!("({now_ms}"))
                    .arg("LIMIT")
                    .arg(0)
                    .arg(limit),
            )
            .await?;
        Ok(ids.into_iter().map(CallId::from_stored).collect())
    }

    async fn report_presence(
        &self,
        relay_id: &RelayId,
        draining: bool,
        now_ms: i64,
        alive_ms: i64,
    ) -> StoreResult<u32> {
        let mut invocation = self.scripts.presence.key(keys::relays_seen());
        invocation
            .key(keys::relays_draining())
            .arg(relay_id.as_str())
            .arg(now_ms)
            .arg(i64::from(draining))
            .arg(alive_ms);
        let mut conn = self.conn();
        let others: i64 = invocation
            .invoke_async(&mut conn)
            .await
            .map_err(StoreError::from)?;
        Ok(u32::try_from(others).unwrap_or(0))
    }

    async fn forget_lease(&self, call_id: &CallId) -> StoreResult<()> {
        self.query(
            redis::cmd("ZREM")
                .arg(keys::leases_index())
                .arg(call_id.as_str()),
        )
        .await
    }

    async fn scan_index(
        &self,
        campaign_id: Option<&CampaignId>,
        cursor: IndexCursor,
        min_score: i64,
        limit: usize,
    ) -> StoreResult<Vec<(CallId, i64)>> {
        let key = campaign_id.map_or_else(keys::calls_index, |c| keys::campaign_index(c.as_str()));
        let page: Vec<(String, i64)> = self
            .query(
                redis::cmd("ZREVRANGEBYSCORE")
                    .arg(key)
                    .arg(cursor.score)
                    .arg(min_score)
                    .arg("WITHSCORES")
                    .arg("LIMIT")
                    .arg(cursor.skip)
                    .arg(limit),
            )
            .await?;
        Ok(page
            .into_iter()
            .map(|(id, score)| (CallId::from_stored(id), score))
            .collect())
    }

    async fn trim_index(&self, created_before_ms: i64) -> StoreResult<u64> {
        // Oldest first; entries whose call still exists stay and are stepped over.
        let mut kept = 0usize;
        let mut removed = 0u64;
        for _ in 0..TRIM_BATCHES {
            let ids: Vec<String> = self
                .query(
                    redis::cmd("ZRANGEBYSCORE")
                        .arg(keys::calls_index())
                        .arg("-inf")
                        .arg(format!("({created_before_ms}"))
                        .arg("LIMIT")
                        .arg(kept)
                        .arg(TRIM_BATCH),
                )
                .await?;
            let exists = self
                .query_all::<bool>(ids.iter().map(|id| {
                    let mut exists = redis::cmd("EXISTS");
                    exists.arg(keys::call(id));
                    exists
                }))
                .await?;
            let gone: Vec<&String> = ids
                .iter()
                .zip(&exists)
                .filter_map(|(id, exists)| (!exists).then_some(id))
                .collect();
            kept += ids.len() - gone.len();
            if !gone.is_empty() {
                let _: u64 = self
                    .query(redis::cmd("ZREM").arg(keys::calls_index()).arg(&gone))
                    .await?;
                removed += gone.len() as u64;
            }
            if ids.len() < TRIM_BATCH {
                break;
            }
        }
        Ok(removed)
    }

    async fn publish_command(
        &self,
        replica_id: &str,
        call_id: &CallId,
        command: &pb::Command,
    ) -> StoreResult<bool> {
        let envelope = BusEnvelope {
            call_id: call_id.to_string(),
            command: Some(command.clone()),
            ..Default::default()
        };
        // A cluster's command channels are sharded (see `connect`).
        let publish = match self.conn {
            Conn::Single(_) => "PUBLISH",
            Conn::Cluster(_) => "SPUBLISH",
        };
        let receivers: i64 = self
            .query(
                redis::cmd(publish)
                    .arg(keys::commands_channel(replica_id))
                    .arg(envelope.encode_to_vec()),
            )
            .await?;
        Ok(receivers > 0)
    }

    async fn create_campaign(&self, campaign: &CampaignRecord) -> StoreResult<bool> {
        use base64::Engine as _;
        let id = campaign.campaign_id.as_str();
        let settings =
            base64::engine::general_purpose::STANDARD.encode(campaign.settings.encode_to_vec());
        let created: bool = self
            .query(
                redis::cmd("HSETNX")
                    .arg(keys::campaign(id))
                    .arg("pb")
                    .arg(settings),
            )
            .await?;
        if !created {
            return Ok(false);
        }
        let mut hset = redis::cmd("HSET");
        hset.arg(keys::campaign(id))
            .arg("state")
            .arg(campaign.state as i32)
            .arg("created")
            .arg(campaign.created_at_ms)
            .arg("updated")
            .arg(campaign.updated_at_ms)
            .arg("numbers")
            .arg(0);
        let mut active = redis::cmd("SADD");
        active.arg(keys::active_campaigns()).arg(id);
        self.run_all(vec![hset, active]).await?;
        Ok(true)
    }

    async fn get_campaign(&self, campaign_id: &CampaignId) -> StoreResult<Option<CampaignRecord>> {
        let h: HashMap<String, String> = self
            .query(redis::cmd("HGETALL").arg(keys::campaign(campaign_id.as_str())))
            .await?;
        campaign_from_fields(campaign_id, h)
    }

    async fn add_campaign_numbers(
        &self,
        campaign_id: &CampaignId,
        numbers: &[NumberState],
    ) -> StoreResult<AddNumbers> {
        let id = campaign_id.as_str();
        let mut invocation = self.scripts.campaign_add.key(keys::campaign(id));
        invocation
            .key(keys::campaign_numbers(id))
            .arg(pb::CampaignState::Completed as i32)
            .arg(pb::CampaignState::Canceled as i32);
        for n in numbers {
            invocation.arg(n.encode());
        }
        let mut conn = self.conn();
        let (code, value): (i64, i64) = invocation.invoke_async(&mut conn).await?;
        Ok(match code {
            1 => AddNumbers::Added(u32::try_from(value).unwrap_or(u32::MAX)),
            -2 => AddNumbers::Closed(campaign_state(value)),
            _ => AddNumbers::NotFound,
        })
    }

    async fn change_campaign(
        &self,
        campaign_id: &CampaignId,
        from: &[pb::CampaignState],
        to: pb::CampaignState,
        now_ms: i64,
    ) -> StoreResult<CampaignChange> {
        let mut invocation = self
            .scripts
            .campaign_change
            .key(keys::campaign(campaign_id.as_str()));
        invocation.arg(to as i32).arg(now_ms);
        for state in from {
            invocation.arg(*state as i32);
        }
        let mut conn = self.conn();
        let (code, value): (i64, i64) = invocation.invoke_async(&mut conn).await?;
        Ok(match code {
            1 => CampaignChange::Done,
            -2 => CampaignChange::Refused(campaign_state(value)),
            _ => CampaignChange::NotFound,
        })
    }

    async fn campaign_numbers(&self, campaign_id: &CampaignId) -> StoreResult<Vec<NumberState>> {
        let h: HashMap<u32, String> = self
            .query(redis::cmd("HGETALL").arg(keys::campaign_numbers(campaign_id.as_str())))
            .await?;
        let mut numbers: Vec<(u32, NumberState)> = Vec::with_capacity(h.len());
        for (i, raw) in h {
            let n = NumberState::decode(&raw).ok_or_else(|| {
                StoreError::Corrupt(format!("campaign '{campaign_id}' number {i}"))
            })?;
            numbers.push((i, n));
        }
        numbers.sort_by_key(|(i, _)| *i);
        Ok(numbers.into_iter().map(|(_, n)| n).collect())
    }

    async fn active_campaigns(&self) -> StoreResult<Vec<CampaignId>> {
        let mut ids: Vec<String> = self
            .query(redis::cmd("SMEMBERS").arg(keys::active_campaigns()))
            .await?;
        ids.sort();
        Ok(ids.into_iter().map(CampaignId::from_stored).collect())
    }

    async fn campaign_lease(
        &self,
        campaign_id: &CampaignId,
        holder: &str,
        now_ms: i64,
        lease_ms: i64,
    ) -> StoreResult<Option<u64>> {
        let mut conn = self.conn();
        let fence: u64 = self
            .scripts
            .campaign_lease
            .key(keys::campaign(campaign_id.as_str()))
            .arg(holder)
            .arg(now_ms)
            .arg(lease_ms)
            .invoke_async(&mut conn)
            .await?;
        Ok((fence > 0).then_some(fence))
    }

    async fn write_campaign_numbers(
        &self,
        campaign_id: &CampaignId,
        fence: u64,
        numbers: &[(u32, NumberState)],
    ) -> StoreResult<bool> {
        if numbers.is_empty() {
            return Ok(true);
        }
        let id = campaign_id.as_str();
        let mut invocation = self.scripts.campaign_write.key(keys::campaign(id));
        invocation.key(keys::campaign_numbers(id)).arg(fence);
        for (i, n) in numbers {
            invocation.arg(*i).arg(n.encode());
        }
        let mut conn = self.conn();
        let written: i64 = invocation.invoke_async(&mut conn).await?;
        Ok(written == 1)
    }

    async fn settle_campaign(
        &self,
        campaign_id: &CampaignId,
        fence: u64,
        numbers: u32,
        now_ms: i64,
    ) -> StoreResult<bool> {
        let id = campaign_id.as_str();
        let mut conn = self.conn();
        let settled: i64 = self
            .scripts
            .campaign_settle
            .key(keys::campaign(id))
            .key(keys::campaign_numbers(id))
            .arg(fence)
            .arg(numbers)
            .arg(pb::CampaignState::Running as i32)
            .arg(pb::CampaignState::Completed as i32)
            .arg(pb::CampaignState::Canceled as i32)
            .arg(now_ms)
            .arg(self.retention_ms.saturating_add(DAY_MS))
            .invoke_async(&mut conn)
            .await?;
        if settled == 1 {
            let _: i64 = self
                .query(redis::cmd("SREM").arg(keys::active_campaigns()).arg(id))
                .await?;
        }
        Ok(settled == 1)
    }

    async fn set_do_not_call(&self, numbers: &[String], listed: bool) -> StoreResult<()> {
        if numbers.is_empty() {
            return Ok(());
        }
        let mut cmd = redis::cmd(if listed { "SADD" } else { "SREM" });
        cmd.arg(keys::do_not_call());
        for n in numbers {
            cmd.arg(n);
        }
        let _: i64 = self.query(&cmd).await?;
        Ok(())
    }

    async fn do_not_call(&self, numbers: &[String]) -> StoreResult<Vec<bool>> {
        if numbers.is_empty() {
            return Ok(Vec::new());
        }
        let mut cmd = redis::cmd("SMISMEMBER");
        cmd.arg(keys::do_not_call());
        for n in numbers {
            cmd.arg(n);
        }
        let flags: Vec<i64> = self.query(&cmd).await?;
        Ok(flags.into_iter().map(|f| f == 1).collect())
    }

    async fn ping(&self) -> StoreResult<Duration> {
        let start = tokio::time::Instant::now();
        let _: String = self.query(&redis::cmd("PING")).await?;
        Ok(start.elapsed())
    }
}

impl RedisStore {
    /// HSET of a whole call record plus its TTL (one key, one slot).
    fn write_call_cmds(&self, call: &CallRecord) -> Vec<Cmd> {
        let key = keys::call(call.call_id.as_str());
        let mut hset = redis::cmd("HSET");
        hset.arg(&key);
        for (field, value) in call_to_fields(call) {
            hset.arg(field).arg(value);
        }
        let mut expire = redis::cmd("PEXPIRE");
        expire.arg(&key).arg(self.retention_ms);
        vec![hset, expire]
    }

    /// Runs independent single-key commands in few round trips, like [`Self::run_all`],
    /// and returns their replies in order.
    async fn query_all<T: redis::FromRedisValue + Send>(
        &self,
        cmds: impl IntoIterator<Item = Cmd>,
    ) -> StoreResult<Vec<T>> {
        let cmds: Vec<Cmd> = cmds.into_iter().collect();
        let mut replies = Vec::with_capacity(cmds.len());
        match &self.conn {
            Conn::Single(_) => {
                let mut conn = self.conn();
                for chunk in cmds.chunks(1000) {
                    let mut pipe = redis::pipe();
                    for cmd in chunk {
                        pipe.add_command(cmd.clone());
                    }
                    replies.extend(pipe.query_async::<Vec<T>>(&mut conn).await?);
                }
            }
            Conn::Cluster(_) => {
                for chunk in cmds.chunks(256) {
                    replies.extend(
                        futures_util::future::try_join_all(chunk.iter().map(|cmd| {
                            let mut conn = self.conn();
                            async move { cmd.query_async::<T>(&mut conn).await }
                        }))
                        .await?,
                    );
                }
            }
        }
        Ok(replies)
    }

    /// Runs independent single-key commands in few round trips: one pipeline per chunk
    /// on a single server; concurrently on a cluster, where a pipeline must stay
    /// within one slot.
    async fn run_all(&self, cmds: Vec<Cmd>) -> StoreResult<()> {
        let mut conn = self.conn();
        match &self.conn {
            Conn::Single(_) => {
                for chunk in cmds.chunks(1000) {
                    let mut pipe = redis::pipe();
                    for cmd in chunk {
                        pipe.add_command(cmd.clone()).ignore();
                    }
                    pipe.query_async::<()>(&mut conn).await?;
                }
            }
            Conn::Cluster(_) => {
                for chunk in cmds.chunks(256) {
                    futures_util::future::try_join_all(chunk.iter().map(|cmd| {
                        let mut conn = self.conn();
                        async move { cmd.query_async::<()>(&mut conn).await }
                    }))
                    .await?;
                }
            }
        }
        Ok(())
    }

    /// Runs one of the lease scripts (attach, renew, release); when it reports success
    /// (1) the lease index learns the new expiry, so the sweeper sees the lease.
    async fn lease_script(
        &self,
        invocation: &redis::ScriptInvocation<'_>,
        call_id: &CallId,
        until_ms: i64,
    ) -> StoreResult<i64> {
        let mut conn = self.conn();
        let code: i64 = invocation.invoke_async(&mut conn).await?;
        if code == 1 {
            self.index_lease(call_id, until_ms).await?;
        }
        Ok(code)
    }

    /// Renew and release: the scripts that act only for the lease's current holder.
    async fn holder_script(
        &self,
        script: &redis::Script,
        call_id: &CallId,
        holder: &LeaseHolder,
        now_ms: i64,
        lease_ms: i64,
    ) -> StoreResult<i64> {
        self.lease_script(
            script
                .key(keys::call(call_id.as_str()))
                .arg(holder.as_str())
                .arg(now_ms)
                .arg(lease_ms),
            call_id,
            now_ms + lease_ms,
        )
        .await
    }

    async fn index_lease(&self, call_id: &CallId, until_ms: i64) -> StoreResult<()> {
        self.query(
            redis::cmd("ZADD")
                .arg(keys::leases_index())
                .arg(until_ms)
                .arg(call_id.as_str()),
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_are_labelled_by_name_and_unknown_ones_as_other() {
        assert_eq!(command_label(&redis::cmd("HGETALL")), "hgetall");
        assert_eq!(command_label(&redis::cmd("ping")), "ping");
        assert_eq!(command_label(&redis::cmd("FLUSHALL")), "other");
        // Scripts go out as EVALSHA (SCRIPT LOAD when Redis lacks them).
        assert_eq!(command_label(&redis::cmd("EVALSHA")), "evalsha");
    }

    #[test]
    fn redis_link_errors_are_outages_and_others_failures() {
        let io = redis::RedisError::from(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "refused",
        ));
        assert!(matches!(StoreError::from(io), StoreError::Unavailable(_)));
        let script = redis::RedisError::from((redis::ErrorKind::Client, "bad script"));
        assert!(matches!(StoreError::from(script), StoreError::Failed(_)));
    }

    /// Every script body, by name (without the prelude).
    const BODIES: [(&str, &str); 6] = [
        ("append", APPEND_LUA),
        ("attach", ATTACH_LUA),
        ("renew", RENEW_LUA),
        ("release", RELEASE_LUA),
        ("admit", ADMIT_LUA),
        ("agent_cas", AGENT_CAS_LUA),
    ];

    /// The prelude's `local NAME = value` lines.
    fn prelude_constants() -> Vec<(String, String)> {
        lua_prelude()
            .lines()
            .filter_map(|line| line.strip_prefix("local "))
            .filter_map(|rest| rest.split_once(" = "))
            .map(|(name, value)| (name.to_owned(), value.to_owned()))
            .collect()
    }

    /// The `STATUS_…`, `REASON_…` and `MASK_…` names a script body uses.
    fn constants_used(body: &str) -> Vec<&str> {
        let mut used = Vec::new();
        for prefix in ["STATUS_", "REASON_", "MASK_", "STREAM_ORIGIN_"] {
            for (at, _) in body.match_indices(prefix) {
                let inside_a_name =
                    body[..at].ends_with(|c: char| c.is_ascii_alphanumeric() || c == '_');
                if inside_a_name {
                    continue;
                }
                let end = body[at..]
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .map_or(body.len(), |n| at + n);
                used.push(&body[at..end]);
            }
        }
        used
    }

    #[test]
    fn lua_constants_are_the_proto_enums() {
        let constants = prelude_constants();
        let value = |name: &str| {
            constants
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.clone())
                .unwrap_or_else(|| panic!("{name} is not in the prelude"))
        };
        for (name, v) in &constants {
            if let Some(proto) = name.strip_prefix("STATUS_") {
                let status = pb::CallStatus::from_str_name(proto)
                    .unwrap_or_else(|| panic!("{name} names no CallStatus"));
                assert_eq!(*v, (status as i32).to_string(), "{name}");
            } else if name.starts_with("STREAM_ORIGIN_") {
                let origin = pb::StreamOrigin::from_str_name(name)
                    .unwrap_or_else(|| panic!("{name} names no StreamOrigin"));
                assert_eq!(*v, (origin as i32).to_string(), "{name}");
            } else if let Some(proto) = name.strip_prefix("REASON_") {
                let reason = pb::EndReason::from_str_name(proto)
                    .unwrap_or_else(|| panic!("{name} names no EndReason"));
                assert_eq!(*v, format!("'{}'", reason as i32), "{name}");
            }
        }
        assert_eq!(
            value("REASON_HANDOFF"),
            format!("'{}'", pb::EndReason::Handoff as i32)
        );
        // The rank table: every status, with the rank the domain gives it.
        let table = value("RANK");
        let entries: Vec<(i32, i32)> = table
            .trim_matches(|c| c == '{' || c == '}')
            .split(", ")
            .map(|e| {
                let (n, r) = e.split_once("] = ").expect("[n] = r");
                (
                    n.trim_start_matches('[').parse().expect("number"),
                    r.parse().expect("rank"),
                )
            })
            .collect();
        let statuses: Vec<i32> = all_statuses().map(|s| s as i32).collect();
        assert_eq!(
            entries.iter().map(|(n, _)| *n).collect::<Vec<_>>(),
            statuses,
            "every CallStatus, once"
        );
        let final_rank: i32 = value("FINAL").parse().expect("number");
        for (n, rank) in entries {
            let status = pb::CallStatus::try_from(n).expect("a CallStatus");
            assert_eq!(rank, status_rank(status), "rank of status {n}");
            assert_eq!(
                rank == final_rank,
                crate::domain::call::is_final(status),
                "status {n}"
            );
        }
        for (name, bit) in [
            ("MASK_STARTED", mask::STARTED),
            ("MASK_ENDED", mask::ENDED),
            ("MASK_HANDOFF", mask::HANDOFF),
            ("MASK_USAGE", mask::USAGE),
            ("MASK_LEASE_EXPIRED_BEFORE", mask::LEASE_EXPIRED_BEFORE),
            ("MASK_HOLDER", mask::HOLDER),
        ] {
            assert_eq!(value(name), bit.to_string(), "{name}");
        }
    }

    /// The bodies take every status, reason and rank from the prelude: no quoted number
    /// but the '0'/'1' flags, no number compared with a rank or written as a status or
    /// end reason, and no constant the prelude does not declare.
    #[test]
    fn lua_script_bodies_hold_no_enum_numbers() {
        let declared: Vec<String> = prelude_constants().into_iter().map(|(n, _)| n).collect();
        let starts_with_number = |s: &str| {
            let s = s.trim_start().trim_start_matches('\'');
            s.starts_with(|c: char| c.is_ascii_digit())
        };
        let mut used_anywhere = Vec::new();
        for (name, body) in BODIES {
            for (at, _) in body.match_indices('\'') {
                let rest = &body[at + 1..];
                let literal = &rest[..rest.find('\'').unwrap_or(0)];
                // '0' and '1' are flags and empty defaults; a status or reason in a
                // hash field is caught below by the field it is written to.
                let number = !literal.is_empty() && literal.bytes().all(|b| b.is_ascii_digit());
                assert!(
                    !number || literal == "0" || literal == "1",
                    "{name}: quoted number '{literal}'"
                );
            }
            for (at, _) in body.match_indices("rank(") {
                let close = body[at..].find(')').expect("rank( closes") + at + 1;
                let rest = body[close..].trim_start();
                for op in [">=", "<=", "~=", "==", ">", "<"] {
                    if let Some(operand) = rest.strip_prefix(op) {
                        assert!(
                            !starts_with_number(operand),
                            "{name}: {} compared with a number",
                            &body[at..close]
                        );
                        break;
                    }
                }
            }
            for field in [
                "'status',",
                "'end_reason',",
                "['status'] =",
                "['end_reason'] =",
            ] {
                for (at, _) in body.match_indices(field) {
                    assert!(
                        !starts_with_number(&body[at + field.len()..]),
                        "{name}: {field} written as a number"
                    );
                }
            }
            for constant in constants_used(body) {
                assert!(
                    declared.iter().any(|d| d == constant),
                    "{name}: {constant} is not declared in the prelude"
                );
                used_anywhere.push(constant);
            }
        }
        for constant in &declared {
            let shared = ["RANK", "FINAL"].contains(&constant.as_str());
            assert!(
                shared || used_anywhere.contains(&constant.as_str()),
                "{constant} is declared but no script uses it"
            );
        }
    }

    fn ev(seq: u64) -> pb::CallEvent {
        pb::CallEvent {
            call_id: "c1".into(),
            seq,
            ..Default::default()
        }
    }

    fn decoded(is_event: bool, payload: &[u8]) -> Option<Vec<(String, u64)>> {
        let mut got = Vec::new();
        let ok = decode_bus(is_event, payload, |m| match m {
            BusMessage::Event { campaign_id, event } => {
                got.push((
                    campaign_id.map(CampaignId::into_string).unwrap_or_default(),
                    event.seq,
                ));
            }
            BusMessage::Command { call_id, .. } => got.push((call_id.into_string(), 0)),
        });
        ok.then_some(got)
    }

    #[test]
    fn bus_envelopes_carry_one_event_a_run_or_a_command() {
        let one = BusEnvelope {
            campaign_id: "q".into(),
            event: Some(ev(7)),
            ..Default::default()
        };
        assert_eq!(
            decoded(true, &one.encode_to_vec()),
            Some(vec![("q".into(), 7)])
        );
        let run = BusEnvelope {
            campaign_id: "q".into(),
            events: vec![ev(1), ev(2), ev(3)],
            ..Default::default()
        };
        assert_eq!(
            decoded(true, &run.encode_to_vec()),
            Some(vec![("q".into(), 1), ("q".into(), 2), ("q".into(), 3)])
        );
        let command = BusEnvelope {
            call_id: "c1".into(),
            command: Some(pb::Command::default()),
            ..Default::default()
        };
        assert_eq!(
            decoded(false, &command.encode_to_vec()),
            Some(vec![("c1".into(), 0)])
        );
        assert_eq!(decoded(true, &command.encode_to_vec()), None, "no event");
        assert_eq!(decoded(false, &run.encode_to_vec()), None, "no command");
        assert_eq!(decoded(true, b"\xff\xff"), None, "garbage");
    }
}

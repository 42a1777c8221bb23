//! Every Redis key name, in one place.
//!
//! All keys of one call share the hash tag `{callId}`, so in Redis Cluster they live on
//! one slot and a Lua script may touch them together. Global indexes are separate keys;
//! no script ever spans two hash tags.

/// Prefix of every key, so a shared Redis stays readable.
const PREFIX: &str = "cb";

/// Hash: one call's record (status, lease, usage totals, …).
pub(crate) fn call(call_id: &str) -> String {
    format!("{PREFIX}:call:{{{call_id}}}")
}

/// Stream: one call's events, entry id `seq-0`.
pub(crate) fn call_events(call_id: &str) -> String {
    format!("{PREFIX}:call:{{{call_id}}}:events")
}

/// String: a consumed stream credential of one call (`id` is 32 hex digits), kept until
/// it expires; same hash tag as the call, so the attach script touches both.
pub(crate) fn call_credential(call_id: &str, id: &str) -> String {
    format!("{PREFIX}:call:{{{call_id}}}:cred:{id}")
}

/// String: the call id admitted for a Twilio call sid (webhook retries return it).
pub(crate) fn twilio_sid(sid: &str) -> String {
    format!("{PREFIX}:sid:{{{sid}}}")
}

/// Sorted set: every call id, scored by creation time (ms).
pub(crate) fn calls_index() -> String {
    format!("{PREFIX}:calls")
}

/// Sorted set: the calls of one campaign, scored by creation time (ms).
pub(crate) fn campaign_index(campaign_id: &str) -> String {
    format!("{PREFIX}:campaign:{{{campaign_id}}}")
}

/// Hash: one campaign (settings, state, number count, dialer lease and fencing token).
/// Shares the hash tag of [`campaign_index`], so one script may touch the campaign and its
/// numbers together.
pub(crate) fn campaign(campaign_id: &str) -> String {
    format!("{PREFIX}:campaign:{{{campaign_id}}}:def")
}

/// Hash: a campaign's numbers, index → JSON `NumberState`.
pub(crate) fn campaign_numbers(campaign_id: &str) -> String {
    format!("{PREFIX}:campaign:{{{campaign_id}}}:numbers")
}

/// Set: campaigns not settled yet (what the dialers look at).
pub(crate) fn active_campaigns() -> String {
    format!("{PREFIX}:campaigns:active")
}

/// Set: the do-not-call numbers.
pub(crate) fn do_not_call() -> String {
    format!("{PREFIX}:dnc")
}

/// Sorted set: attached calls scored by the time their lease runs out (ms).
pub(crate) fn leases_index() -> String {
    format!("{PREFIX}:leases")
}

/// Sorted set: the ready-relay registry, relay id scored by its last report (ms). Shares
/// the hash tag `{relays}` with [`relays_draining`], so one script updates both.
pub(crate) fn relays_seen() -> String {
    format!("{PREFIX}:{{relays}}:seen")
}

/// Sorted set: the relays that reported draining, scored by that report (ms).
pub(crate) fn relays_draining() -> String {
    format!("{PREFIX}:{{relays}}:draining")
}

/// String: one agent, protobuf-encoded, in a hash with its version.
pub(crate) fn agent(agent_id: &str) -> String {
    format!("{PREFIX}:agent:{{{agent_id}}}")
}

/// Sorted set (all scores 0): agent ids, for listing in id order.
pub(crate) fn agents_index() -> String {
    format!("{PREFIX}:agents")
}

/// Hash: E.164 number → agent id.
pub(crate) fn routes() -> String {
    format!("{PREFIX}:routes")
}

/// String: the default agent id for inbound calls.
pub(crate) fn default_agent() -> String {
    format!("{PREFIX}:default_agent")
}

/// Pub/sub channel carrying every stored event to every replica.
pub(crate) fn events_channel() -> String {
    format!("{PREFIX}:bus:events")
}

/// Pub/sub channel of one control replica: commands for the calls it holds.
pub(crate) fn commands_channel(replica_id: &str) -> String {
    format!("{PREFIX}:bus:cmd:{replica_id}")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The Redis Cluster hash slot input: the part between the first `{` and the next `}`.
    fn hash_tag(key: &str) -> &str {
        let open = key.find('{').expect("key has a hash tag");
        let close = key[open..].find('}').expect("tag closes") + open;
        &key[open + 1..close]
    }

    #[test]
    fn keys_of_one_call_share_a_hash_tag() {
        assert_eq!(call("c1"), "cb:call:{c1}");
        assert_eq!(call_events("c1"), "cb:call:{c1}:events");
        assert_eq!(hash_tag(&call("abc")), hash_tag(&call_events("abc")));
        assert_ne!(hash_tag(&call("abc")), hash_tag(&call("abd")));
    }

    #[test]
    fn global_indexes_are_not_tagged_with_a_call() {
        assert!(!calls_index().contains('{'));
        assert!(!leases_index().contains('{'));
        assert_eq!(campaign_index("q3"), "cb:campaign:{q3}");
    }
}

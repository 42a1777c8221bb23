//! The store conformance suite: one set of cases for the [`CallStore`] contract (calls,
//! admission, leases, events, hand-off, ends, agents, routes), each run against both
//! backends — the in-memory store and the Redis store on a throwaway `redis-server`.
//! A case that passes on one and fails on the other is a bug in that store.
//!
//! Times are explicit `now_ms` arguments, so lease expiry is tested without waiting.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use callbridge_control::domain::call::{StreamOrigin, event_effects};
use callbridge_control::domain::campaign::{CampaignRecord, NumberState, Outcome, Phase};
use callbridge_control::domain::ids::{
    AgentId, CallId, CallSid, CampaignId, LeaseHolder, RelayId, StreamCredentialId,
};
use callbridge_control::domain::record::CallRecord;
use callbridge_control::domain::twilio::TwilioCallStatus;
use callbridge_control::hub::Hub;
use callbridge_control::store::memory::MemoryStore;
use callbridge_control::store::redis::{RedisStore, RedisTarget};
use callbridge_control::store::{
    AddNumbers, AdmitOutcome, AgentCas, AppendOutcome, AttachChecks, AttachOutcome, CallStore,
    CampaignChange, IndexCursor, TwilioUpdate,
};
use callbridge_proto::pb;
use callbridge_testkit::redis_server::RedisServer;
use common::within;
use pb::call_event::Kind;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Each case, as a test per backend: `in_memory::<case>` and `on_redis::<case>`.
macro_rules! conformance {
    ($($case:ident),* $(,)?) => {
        mod in_memory {
            $(
                #[tokio::test]
                async fn $case() {
                    super::$case(&super::memory_store()).await;
                }
            )*
        }
        mod on_redis {
            $(
                #[tokio::test]
                async fn $case() {
                    let backend = super::RedisBackend::start().await;
                    super::$case(&backend.store).await;
                }
            )*
        }
    };
}

conformance!(
    create_get_list,
    admit_and_attach,
    stream_credentials_and_call_sids,
    leases,
    a_fresh_credential_takes_a_held_lease_over,
    an_orphaned_stream_is_claimed_for_a_redirect_once,
    replayed_webhooks_and_action_requests_are_superseded,
    a_committed_attach_retried_with_its_attempt_is_a_reconnect,
    event_append_with_sequence_gaps_and_duplicates,
    hand_off_and_resume,
    end_and_retention,
    agent_versions,
    number_routes,
    twilio_status_moves_one_way,
    ready_relay_registry,
    campaign_states_and_numbers,
    campaign_dialer_lease_is_fenced,
    do_not_call_set,
);

/// Redis only (the memory store keeps every call): trimming the call index drops the
/// entries of calls that have expired, created before the cutoff, across many batches,
/// and leaves every other entry.
#[tokio::test]
async fn trim_drops_only_expired_calls_on_redis() {
    // TCP: the test expires keys through the admin port.
    let backend = RedisBackend::on(RedisServer::tcp().expect("redis-server starts")).await;
    let s = &backend.store;
    let calls: Vec<CallRecord> = (0..1200_i64)
        .map(|n| record(&format!("c{n}"), 1000 + n, ""))
        .collect();
    create(s, &calls).await;
    // What PEXPIRE does at the end of retention, for every odd call.
    let gone: Vec<String> = (1..1200)
        .step_by(2)
        .map(|n| format!("cb:call:{{c{n}}}"))
        .collect();
    let mut del = vec!["DEL"];
    del.extend(gone.iter().map(String::as_str));
    backend.redis.admin(&del).expect("DEL");

    // Created before 1100: c1, c3, …, c99 have gone; c100 and later are not looked at.
    assert_eq!(
        within("trim_index", s.trim_index(1100)).await.expect("ok"),
        50
    );
    assert_eq!(
        within("trim_index", s.trim_index(i64::MAX))
            .await
            .expect("ok"),
        550
    );
    assert_eq!(
        within("trim_index", s.trim_index(i64::MAX))
            .await
            .expect("ok"),
        0
    );
    let left = scan(s, None, NEWEST, 2000).await;
    assert_eq!(left.len(), 600);
    assert!(
        left.iter()
            .all(|(id, _)| id.as_str()[1..].parse::<u32>().expect("cN") % 2 == 0),
        "only the expired calls left the index"
    );
}

const LEASE: i64 = 500;
const T0: i64 = 1_700_000_000_000;

fn memory_store() -> MemoryStore {
    MemoryStore::new(Arc::new(Hub::new()), "replica-1")
}

/// A Redis store on its own `redis-server`; both stop when this is dropped.
struct RedisBackend {
    store: RedisStore,
    shutdown: CancellationToken,
    // Dropped last: the store's pub/sub task must not outlive its server by much.
    redis: RedisServer,
}

impl RedisBackend {
    async fn start() -> Self {
        Self::on(RedisServer::unix().expect("redis-server starts")).await
    }

    async fn on(redis: RedisServer) -> Self {
        let shutdown = CancellationToken::new();
        let store = within(
            "connect to redis",
            RedisStore::connect(
                &RedisTarget::Single(redis.url()),
                Duration::from_secs(3600),
                Arc::new(Hub::new()),
                "replica-1",
                &TaskTracker::new(),
                shutdown.clone(),
            ),
        )
        .await
        .expect("connected");
        RedisBackend {
            store,
            shutdown,
            redis,
        }
    }
}

impl Drop for RedisBackend {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

// --- helpers ---

fn cid(call_id: &str) -> CallId {
    CallId::parse("call_id", call_id).expect("a valid call id")
}

fn aid(agent_id: &str) -> AgentId {
    AgentId::parse("agent_id", agent_id).expect("a valid agent id")
}

/// A Twilio-shaped sid from a short one: `CA1` is `CA` and 31 zeros and `1`.
fn sid(short: &str) -> CallSid {
    let digits = short.strip_prefix("CA").expect("CA…");
    CallSid::parse("sid", format!("CA{digits:0>32}")).expect("a valid sid")
}

/// `replica/stream`.
fn holder(replica_stream: &str) -> LeaseHolder {
    let (replica, stream) = replica_stream.split_once('/').expect("replica/stream");
    LeaseHolder::new(replica, stream)
}

/// An optional id or text as stored ("" for none).
fn text<T: AsRef<str>>(value: &Option<T>) -> &str {
    value.as_ref().map_or("", AsRef::as_ref)
}

fn record(call_id: &str, created_at_ms: i64, campaign_id: &str) -> CallRecord {
    CallRecord {
        to: "+14155550123".to_owned(),
        campaign_id: CampaignId::parse_optional("campaign_id", campaign_id).expect("valid"),
        ..CallRecord::new(
            cid(call_id),
            aid("agent-1"),
            pb::Direction::Outbound,
            pb::CallStatus::Created,
            created_at_ms,
        )
    }
}

async fn create<S: CallStore>(s: &S, calls: &[CallRecord]) {
    within("create_calls", s.create_calls(calls))
        .await
        .expect("created");
}

async fn get<S: CallStore>(s: &S, call_id: &str) -> CallRecord {
    within("get_call", s.get_call(&cid(call_id)))
        .await
        .expect("store reachable")
        .unwrap_or_else(|| panic!("call {call_id} exists"))
}

fn event(call_id: &str, seq: u64, kind: Kind) -> pb::CallEvent {
    pb::CallEvent {
        call_id: call_id.to_owned(),
        seq,
        at_ms: T0 + i64::try_from(seq).expect("small") * 1000,
        kind: Some(kind),
    }
}

fn started(relay: &str, stream_sid: &str) -> Kind {
    Kind::Started(pb::Started {
        twilio_call_sid: sid("CA100").into_string(),
        stream_sid: stream_sid.to_owned(),
        relay_id: relay.to_owned(),
        ..Default::default()
    })
}

fn ended(reason: pb::EndReason, detail: &str, transfer_to: &str) -> Kind {
    Kind::Ended(pb::Ended {
        reason: reason as i32,
        detail: detail.to_owned(),
        transfer_to: transfer_to.to_owned(),
    })
}

fn usage(total: u64) -> Kind {
    Kind::Usage(pb::Usage {
        input_tokens: total / 2,
        total_tokens: total,
        ..Default::default()
    })
}

/// Appends `events` as one run, with the domain's effects (and an optional lease
/// condition on every event).
async fn append_with<S: CallStore>(
    s: &S,
    call_id: &str,
    events: &[pb::CallEvent],
    lease_expired_before: Option<i64>,
) -> Vec<AppendOutcome> {
    let effects: Vec<_> = events
        .iter()
        .map(|e| {
            let mut effects = event_effects(e).expect("valid event");
            effects.require_lease_expired_before = lease_expired_before;
            effects
        })
        .collect();
    within(
        "append_events",
        s.append_events(&cid(call_id), None, events, &effects),
    )
    .await
    .expect("store reachable")
}

/// Appends `events` as one run written by the attach stream `holder` (fenced: refused
/// once another stream holds the lease).
async fn append_as<S: CallStore>(
    s: &S,
    call_id: &str,
    events: &[pb::CallEvent],
    holder: &str,
) -> Vec<AppendOutcome> {
    let effects: Vec<_> = events
        .iter()
        .map(|e| {
            let mut effects = event_effects(e).expect("valid event");
            effects.require_holder = Some(self::holder(holder));
            effects
        })
        .collect();
    within(
        "append_events",
        s.append_events(&cid(call_id), None, events, &effects),
    )
    .await
    .expect("store reachable")
}

async fn append<S: CallStore>(
    s: &S,
    call_id: &str,
    events: &[pb::CallEvent],
) -> Vec<AppendOutcome> {
    append_with(s, call_id, events, None).await
}

/// A stream credential id (32 hex digits) from a short tag.
fn stream(tag: &str) -> StreamCredentialId {
    StreamCredentialId::parse("stream", format!("{tag:0>32}")).expect("valid")
}

async fn attach<S: CallStore>(
    s: &S,
    call_id: &str,
    relay: &str,
    reconnect: bool,
    holder: &str,
    now_ms: i64,
) -> AttachOutcome {
    attach_checked(
        s,
        call_id,
        relay,
        reconnect,
        holder,
        now_ms,
        &AttachChecks::default(),
    )
    .await
}

async fn attach_checked<S: CallStore>(
    s: &S,
    call_id: &str,
    relay: &str,
    reconnect: bool,
    holder: &str,
    now_ms: i64,
    checks: &AttachChecks,
) -> AttachOutcome {
    within(
        "attach",
        s.attach(
            &cid(call_id),
            &RelayId::parse("relay_id", relay).expect("valid"),
            reconnect,
            &self::holder(holder),
            now_ms,
            LEASE,
            checks,
        ),
    )
    .await
    .expect("store reachable")
}

async fn expired<S: CallStore>(s: &S, now_ms: i64) -> Vec<String> {
    let mut ids: Vec<String> = within("expired_leases", s.expired_leases(now_ms, 100))
        .await
        .expect("store reachable")
        .into_iter()
        .map(CallId::into_string)
        .collect();
    ids.sort();
    ids
}

async fn scan<S: CallStore>(
    s: &S,
    campaign: Option<&str>,
    cursor: IndexCursor,
    limit: usize,
) -> Vec<(String, i64)> {
    let campaign = campaign.map(|c| CampaignId::parse("campaign_id", c).expect("valid"));
    within(
        "scan_index",
        s.scan_index(campaign.as_ref(), cursor, i64::MIN, limit),
    )
    .await
    .expect("store reachable")
    .into_iter()
    .map(|(id, score)| (id.into_string(), score))
    .collect()
}

const NEWEST: IndexCursor = IndexCursor {
    score: i64::MAX,
    skip: 0,
};

fn ids<T: AsRef<str>>(page: &[(T, i64)]) -> Vec<&str> {
    page.iter().map(|(id, _)| id.as_ref()).collect()
}

fn agent(agent_id: &str, version: u64, name: &str) -> pb::Agent {
    pb::Agent {
        agent_id: agent_id.to_owned(),
        version,
        settings: Some(pb::AgentSettings {
            name: name.to_owned(),
            ..Default::default()
        }),
        created_at_ms: T0,
        updated_at_ms: T0 + i64::try_from(version).expect("small"),
    }
}

// --- cases ---

/// A created call reads back field for field; many calls read in one go in the order
/// asked; the indexes page newest first, ties by id descending, resumable by cursor.
async fn create_get_list<S: CallStore>(s: &S) {
    let full = CallRecord {
        from: "+14155550100".to_owned(),
        metadata: BTreeMap::from([
            ("crm".to_owned(), "42".to_owned()),
            ("note".to_owned(), "a \"quoted\" value".to_owned()),
        ]),
        ..record("c0", 10, "spring")
    };
    let calls = vec![
        full.clone(),
        record("c1", 10, "spring"),
        record("c2", 10, ""),
        record("c3", 20, "summer"),
        record("c4", 20, "spring"),
    ];
    create(s, &calls).await;
    assert_eq!(get(s, "c0").await, full, "every field round-trips");
    assert_eq!(
        within("get_call", s.get_call(&cid("missing")))
            .await
            .expect("ok"),
        None
    );
    let many = within(
        "get_calls",
        s.get_calls(&[cid("c3"), cid("missing"), cid("c0")]),
    )
    .await
    .expect("ok");
    assert_eq!(many, vec![Some(calls[3].clone()), None, Some(full)]);
    assert_eq!(
        within("get_calls", s.get_calls(&[])).await.expect("ok"),
        Vec::<Option<CallRecord>>::new()
    );

    let first = scan(s, None, NEWEST, 3).await;
    assert_eq!(
        first,
        vec![("c4".into(), 20), ("c3".into(), 20), ("c2".into(), 10)]
    );
    let rest = scan(s, None, IndexCursor { score: 10, skip: 1 }, 10).await;
    assert_eq!(ids(&rest), vec!["c1", "c0"]);
    let spring = scan(s, Some("spring"), NEWEST, 10).await;
    assert_eq!(ids(&spring), vec!["c4", "c1", "c0"]);
    let newer = within("scan_index", s.scan_index(None, NEWEST, 15, 10))
        .await
        .expect("ok");
    assert_eq!(ids(&newer), vec!["c4", "c3"], "min_score bounds the page");
    assert!(scan(s, Some("autumn"), NEWEST, 10).await.is_empty());
}

/// Admission: a pre-created call moves to ringing and learns the sid and numbers it
/// lacks; an inbound call is created once per Twilio sid; attach takes the lease.
async fn admit_and_attach<S: CallStore>(s: &S) {
    create(s, &[record("out", 1, "")]).await;
    let admit = |id: &'static str, sid: &'static str, from: &'static str, to: &'static str| async move {
        within(
            "admit_existing",
            s.admit_existing(&cid(id), Some(&self::sid(sid)), from, to),
        )
        .await
        .expect("ok")
    };
    assert_eq!(
        admit("out", "CA1", "+14155550100", "+19995550000").await,
        AdmitOutcome::Admitted
    );
    let got = get(s, "out").await;
    assert_eq!(got.status, pb::CallStatus::Ringing);
    assert_eq!(got.twilio_call_sid, Some(sid("CA1")));
    assert_eq!(got.from, "+14155550100", "an empty field is filled");
    assert_eq!(got.to, "+14155550123", "a set field is kept");
    // A webhook retry: admitted again, nothing moves back.
    assert_eq!(admit("out", "CA1", "", "").await, AdmitOutcome::Admitted);
    assert_eq!(get(s, "out").await.status, pb::CallStatus::Ringing);
    assert_eq!(
        admit("missing", "CA9", "", "").await,
        AdmitOutcome::NotFound
    );

    let inbound = |id: &str| CallRecord {
        direction: pb::Direction::Inbound,
        status: pb::CallStatus::Ringing,
        twilio_call_sid: Some(sid("CA2")),
        ..record(id, 5, "")
    };
    let first = within("admit_inbound", s.admit_inbound(&inbound("in-1")))
        .await
        .expect("ok");
    assert_eq!(first, "in-1");
    let retry = within("admit_inbound", s.admit_inbound(&inbound("in-2")))
        .await
        .expect("ok");
    assert_eq!(retry, "in-1", "the sid's first call wins");
    assert_eq!(
        within("get_call", s.get_call(&cid("in-2")))
            .await
            .expect("ok"),
        None,
        "the loser is not stored"
    );
    assert_eq!(ids(&scan(s, None, NEWEST, 10).await), vec!["in-1", "out"]);

    assert_eq!(
        attach(s, "in-1", "relay-1", false, "replica-1/s1", T0).await,
        AttachOutcome::Attached
    );
    let got = get(s, "in-1").await;
    assert_eq!(text(&got.lease_holder), "replica-1/s1");
    assert_eq!(got.lease_replica(), "replica-1");
    assert_eq!(text(&got.lease_relay), "relay-1");
    assert_eq!(text(&got.relay_id), "relay-1");
    assert_eq!(got.lease_until_ms, T0 + LEASE);
    assert!(got.lease_held(T0));
    assert_eq!(
        attach(s, "missing", "relay-1", false, "replica-1/s2", T0).await,
        AttachOutcome::NotFound
    );
}

/// A stream's first attach consumes its credential once (a second attach with it is
/// refused, whoever asks, even after the first stream let go), and must come from the
/// CallSid admitted; every refusal leaves the record as it was.
async fn stream_credentials_and_call_sids<S: CallStore>(s: &S) {
    create(s, &[record("c1", 1, ""), record("c2", 2, "")]).await;
    within(
        "admit_existing",
        s.admit_existing(&cid("c1"), Some(&sid("CA1")), "", ""),
    )
    .await
    .expect("ok");
    let cred = |id: &str, sid: &str| AttachChecks {
        credential: Some((stream(id), T0 + 60_000)),
        origin: StreamOrigin::Unspecified,
        attempt: None,
        twilio_call_sid: (!sid.is_empty()).then(|| self::sid(sid).as_str().to_owned()),
    };
    let before = get(s, "c1").await;
    // Another CallSid than admitted: refused before anything is written, even the
    // credential (it stays usable by the genuine stream).
    assert_eq!(
        attach_checked(
            s,
            "c1",
            "relay-9",
            false,
            "replica-1/s0",
            T0,
            &cred("a1", "CA9")
        )
        .await,
        AttachOutcome::CallSidMismatch
    );
    assert_eq!(get(s, "c1").await, before, "a refusal changes nothing");
    // The genuine stream: attached, credential consumed.
    assert_eq!(
        attach_checked(
            s,
            "c1",
            "relay-1",
            false,
            "replica-1/s1",
            T0,
            &cred("a1", "CA1")
        )
        .await,
        AttachOutcome::Attached
    );
    let attached = get(s, "c1").await;
    // A replay of it, from another relay: the credential is used (not merely "held").
    assert_eq!(
        attach_checked(
            s,
            "c1",
            "relay-2",
            false,
            "replica-1/s2",
            T0 + 1,
            &cred("a1", "CA1")
        )
        .await,
        AttachOutcome::CredentialUsed
    );
    assert_eq!(get(s, "c1").await, attached, "a refusal changes nothing");
    // Still used after the first stream let go and its lease ran out.
    within(
        "release_lease",
        s.release_lease(&cid("c1"), &holder("replica-1/s1"), T0 + 2, 0),
    )
    .await
    .expect("ok");
    let released = get(s, "c1").await;
    assert_eq!(
        attach_checked(
            s,
            "c1",
            "relay-2",
            false,
            "replica-1/s3",
            T0 + 10,
            &cred("a1", "CA1")
        )
        .await,
        AttachOutcome::CredentialUsed
    );
    assert_eq!(get(s, "c1").await, released, "a refusal changes nothing");
    // A fresh credential (a hand-off's next segment) attaches.
    assert_eq!(
        attach_checked(
            s,
            "c1",
            "relay-2",
            false,
            "replica-1/s4",
            T0 + 10,
            &cred("b2", "CA1")
        )
        .await,
        AttachOutcome::Attached
    );
    // Credentials are per call: the same id on another call is another credential; a
    // call admitted without a CallSid checks none.
    assert_eq!(
        attach_checked(
            s,
            "c2",
            "relay-1",
            false,
            "replica-1/s5",
            T0,
            &cred("a1", "CA7")
        )
        .await,
        AttachOutcome::Attached
    );
    // A used credential reads as used even once the call has ended (a replay is a
    // replay); an unknown call is unknown whatever the credential.
    assert_eq!(
        attach_checked(
            s,
            "nope",
            "relay-1",
            false,
            "replica-1/s6",
            T0,
            &cred("c3", "")
        )
        .await,
        AttachOutcome::NotFound
    );
}

/// One holder at a time: renewals extend it, another stream is refused while it runs
/// (unless the same relay reconnects), a lapsed lease is free, release leaves a grace.
async fn leases<S: CallStore>(s: &S) {
    create(s, &[record("c1", 1, ""), record("c2", 2, "")]).await;
    assert_eq!(
        attach(s, "c1", "r1", false, "x/1", T0).await,
        AttachOutcome::Attached
    );
    // Steal refused, with or without the reconnect flag, from another relay.
    assert_eq!(
        attach(s, "c1", "r2", false, "x/2", T0 + 100).await,
        AttachOutcome::Held
    );
    assert_eq!(
        attach(s, "c1", "r2", true, "x/2", T0 + 100).await,
        AttachOutcome::Held
    );
    assert_eq!(
        text(&get(s, "c1").await.lease_holder),
        "x/1",
        "the holder is kept"
    );
    // Renew.
    let renew = |holder: &'static str, now: i64| async move {
        within(
            "renew_lease",
            s.renew_lease(&cid("c1"), &self::holder(holder), now, LEASE),
        )
        .await
        .expect("ok")
    };
    assert!(renew("x/1", T0 + 300).await);
    assert_eq!(get(s, "c1").await.lease_until_ms, T0 + 300 + LEASE);
    assert!(expired(s, T0 + 600).await.is_empty(), "renewed, not lapsed");
    // The same relay reconnecting takes over; the old stream can no longer renew.
    assert_eq!(
        attach(s, "c1", "r1", true, "y/3", T0 + 400).await,
        AttachOutcome::Attached
    );
    assert!(!renew("x/1", T0 + 450).await);
    assert!(renew("y/3", T0 + 450).await);
    assert!(
        !within(
            "renew_lease",
            s.renew_lease(&cid("missing"), &holder("y/3"), T0, LEASE)
        )
        .await
        .expect("ok")
    );
    // Lapse: nobody renews; the sweeper sees it and anyone may attach.
    let until = T0 + 450 + LEASE;
    assert!(
        expired(s, until).await.is_empty(),
        "runs out after, not at, until"
    );
    assert_eq!(expired(s, until + 1).await, vec!["c1".to_owned()]);
    assert_eq!(
        attach(s, "c1", "r9", false, "z/9", until + 1).await,
        AttachOutcome::Attached
    );
    assert!(expired(s, until + 1).await.is_empty());
    // Release: the holder lets go, leaving one lease of grace for a reconnect.
    within(
        "release_lease",
        s.release_lease(&cid("c1"), &holder("y/3"), until + 10, LEASE),
    )
    .await
    .expect("ok");
    assert_eq!(
        text(&get(s, "c1").await.lease_holder),
        "z/9",
        "only the holder releases"
    );
    within(
        "release_lease",
        s.release_lease(&cid("c1"), &holder("z/9"), until + 10, LEASE),
    )
    .await
    .expect("ok");
    let got = get(s, "c1").await;
    assert_eq!(text(&got.lease_holder), "");
    assert_eq!(got.lease_until_ms, until + 10 + LEASE);
    assert!(!got.lease_held(until + 10));
    assert_eq!(
        attach(s, "c1", "r2", false, "w/5", until + 11).await,
        AttachOutcome::Attached,
        "a released lease is free"
    );
    // Forgetting a lease takes it out of the sweeper's view only.
    assert_eq!(expired(s, i64::MAX).await, vec!["c1".to_owned()]);
    within("forget_lease", s.forget_lease(&cid("c1")))
        .await
        .expect("ok");
    assert!(expired(s, i64::MAX).await.is_empty());
    assert_eq!(text(&get(s, "c1").await.lease_holder), "w/5");
}

/// Twilio opened a new stream while the old relay's lease still runs (it died a moment
/// ago, or froze): the first attach consuming a fresh credential takes the call over and
/// fences the old holder; a reconnect, a replayed credential or an ended call are still
/// refused, and a refusal writes nothing (not even the credential).
/// A call whose stream's lease was released may be claimed for a REST redirect once per
/// lost stream, and not while a stream holds it.
async fn an_orphaned_stream_is_claimed_for_a_redirect_once<S: CallStore>(s: &S) {
    create(s, &[record("c1", 1, "")]).await;
    let cred = |id: &str| AttachChecks {
        credential: Some((stream(id), T0 + 60_000)),
        origin: StreamOrigin::Unspecified,
        attempt: None,
        twilio_call_sid: None,
    };
    let claim = |id: &'static str, now: i64| async move {
        within(
            "claim_orphan_redirect",
            s.claim_orphan_redirect(&cid("c1"), &stream(id), now),
        )
        .await
        .expect("ok")
    };
    assert_eq!(
        attach_checked(s, "c1", "r1", false, "x/1", T0, &cred("a1")).await,
        AttachOutcome::Attached
    );
    assert!(!claim("a1", T0 + 10).await, "held: not orphaned");
    within(
        "release_lease",
        s.release_lease(&cid("c1"), &holder("x/1"), T0 + 20, LEASE),
    )
    .await
    .expect("ok");
    assert!(!claim("b2", T0 + 30).await, "not the call's last stream");
    assert!(claim("a1", T0 + 30).await, "released: claimed");
    assert!(!claim("a1", T0 + 40).await, "once per lost stream");
    // The call comes back on a new stream, which is lost in turn: claimed again.
    assert_eq!(
        attach_checked(s, "c1", "r2", false, "y/2", T0 + 50, &cred("b2")).await,
        AttachOutcome::Attached
    );
    assert!(!claim("b2", T0 + 60).await, "held again");
    within(
        "release_lease",
        s.release_lease(&cid("c1"), &holder("y/2"), T0 + 70, LEASE),
    )
    .await
    .expect("ok");
    assert!(claim("b2", T0 + 80).await);
    assert!(
        !within(
            "claim_orphan_redirect",
            s.claim_orphan_redirect(&cid("missing"), &stream("b2"), T0)
        )
        .await
        .expect("ok")
    );
}

async fn a_fresh_credential_takes_a_held_lease_over<S: CallStore>(s: &S) {
    create(s, &[record("c1", 1, "")]).await;
    let cred = |id: &str| AttachChecks {
        credential: Some((stream(id), T0 + 60_000)),
        origin: StreamOrigin::Unspecified,
        attempt: None,
        twilio_call_sid: None,
    };
    let attach_with = |relay: &'static str,
                       reconnect: bool,
                       holder: &'static str,
                       now: i64,
                       checks: AttachChecks| async move {
        attach_checked(s, "c1", relay, reconnect, holder, now, &checks).await
    };
    assert_eq!(
        attach_with("r1", false, "x/1", T0, cred("a1")).await,
        AttachOutcome::Attached
    );
    assert_eq!(
        append_as(s, "c1", &[event("c1", 1, started("r1", "MZ1"))], "x/1").await,
        vec![AppendOutcome::Stored]
    );
    let held = get(s, "c1").await;
    // While x/1's lease runs: no credential, a reconnect (even with a credential) or a
    // replayed credential are refused, and change nothing.
    for (reconnect, checks, outcome) in [
        (false, AttachChecks::default(), AttachOutcome::Held),
        (true, AttachChecks::default(), AttachOutcome::Held),
        (true, cred("c3"), AttachOutcome::Held),
        (false, cred("a1"), AttachOutcome::CredentialUsed),
    ] {
        assert_eq!(
            attach_with("r2", reconnect, "y/2", T0 + 100, checks.clone()).await,
            outcome,
            "{reconnect} {checks:?}"
        );
        assert_eq!(get(s, "c1").await, held, "a refusal changes nothing");
    }
    // The new stream's first attach with a fresh credential takes the call over.
    assert_eq!(
        attach_with("r2", false, "y/2", T0 + 100, cred("b2")).await,
        AttachOutcome::TookOver
    );
    let got = get(s, "c1").await;
    assert_eq!(text(&got.lease_holder), "y/2");
    assert_eq!(got.lease_relay.as_ref().map(RelayId::as_str), Some("r2"));
    assert_eq!(got.lease_until_ms, T0 + 100 + LEASE);
    // The old holder is fenced: no renewal, no release, no event.
    assert!(
        !within(
            "renew_lease",
            s.renew_lease(&cid("c1"), &holder("x/1"), T0 + 150, LEASE)
        )
        .await
        .expect("ok")
    );
    within(
        "release_lease",
        s.release_lease(&cid("c1"), &holder("x/1"), T0 + 150, LEASE),
    )
    .await
    .expect("ok");
    assert_eq!(
        append_as(s, "c1", &[event("c1", 2, usage(5))], "x/1").await,
        vec![AppendOutcome::ConditionFailed]
    );
    let fenced = get(s, "c1").await;
    assert_eq!(fenced, got, "the fenced holder changed nothing");
    // The new holder goes on from the last stored seq.
    assert_eq!(
        append_as(s, "c1", &[event("c1", 2, started("r2", "MZ2"))], "y/2").await,
        vec![AppendOutcome::Stored]
    );
    // The old relay reconnecting is a reconnect like any other: refused.
    assert_eq!(
        attach_with("r1", true, "x/4", T0 + 200, AttachChecks::default()).await,
        AttachOutcome::Held
    );
    // The new holder's own reconnect is fine; the credential it came with stays used.
    assert_eq!(
        attach_with("r2", true, "y/5", T0 + 200, AttachChecks::default()).await,
        AttachOutcome::Attached
    );
    assert_eq!(
        attach_with("r3", false, "z/6", T0 + 200, cred("b2")).await,
        AttachOutcome::CredentialUsed
    );
    // An ended call is not taken over, whatever the credential.
    assert_eq!(
        append_as(
            s,
            "c1",
            &[event("c1", 3, ended(pb::EndReason::CallerHangup, "", ""))],
            "y/5"
        )
        .await,
        vec![AppendOutcome::Stored]
    );
    assert_eq!(
        attach_with("r3", false, "z/7", T0 + 300, cred("d4")).await,
        AttachOutcome::Ended
    );
}

/// Each seq is stored once, in order: duplicates are acknowledged without effect, a gap
/// stops the run and names the last stored seq, usage adds up per stored event only.
async fn event_append_with_sequence_gaps_and_duplicates<S: CallStore>(s: &S) {
    create(s, &[record("c1", 1, "")]).await;
    let (st, dup) = (AppendOutcome::Stored, AppendOutcome::Duplicate);
    assert_eq!(
        append(s, "c1", &[event("c1", 1, usage(10))]).await,
        vec![st]
    );
    assert_eq!(
        append(s, "c1", &[event("c1", 1, usage(10))]).await,
        vec![dup]
    );
    assert_eq!(
        append(s, "c1", &[event("c1", 3, usage(10))]).await,
        vec![AppendOutcome::Gap { last_seq: 1 }]
    );
    // A run: duplicates, new events, then a gap; the event after the gap is untouched.
    let run = [
        event("c1", 1, usage(10)),
        event("c1", 2, usage(4)),
        event("c1", 3, usage(6)),
        event("c1", 5, usage(100)),
        event("c1", 6, usage(100)),
    ];
    assert_eq!(
        append(s, "c1", &run).await,
        vec![dup, st, st, AppendOutcome::Gap { last_seq: 3 }]
    );
    let got = get(s, "c1").await;
    assert_eq!(got.last_seq, 3);
    assert_eq!(got.usage[2], 20, "total tokens of the stored events only");
    assert_eq!(got.usage[0], 10, "input tokens");
    assert_eq!(got.usage[8], 3, "one response per usage event");
    let read = |after: u64, limit: usize| async move {
        within("read_events", s.read_events(&cid("c1"), after, limit))
            .await
            .expect("ok")
            .iter()
            .map(|e| e.seq)
            .collect::<Vec<_>>()
    };
    assert_eq!(read(0, 100).await, vec![1, 2, 3]);
    assert_eq!(read(1, 100).await, vec![2, 3]);
    assert_eq!(read(0, 2).await, vec![1, 2]);
    assert!(read(3, 100).await.is_empty());
    let stored = within("read_events", s.read_events(&cid("c1"), 1, 1))
        .await
        .expect("ok");
    assert_eq!(stored, vec![run[1].clone()], "stored as sent");
    assert_eq!(
        append(s, "missing", &[event("missing", 1, usage(1))]).await,
        vec![AppendOutcome::NotFound]
    );
    assert!(
        within("read_events", s.read_events(&cid("missing"), 0, 10))
            .await
            .expect("ok")
            .is_empty()
    );
}

/// A hand-off end keeps the call live and says so; the next `started` (another relay
/// resuming) clears it, keeps the first start time and names the new relay.
async fn hand_off_and_resume<S: CallStore>(s: &S) {
    create(s, &[record("c1", 1, "")]).await;
    let st = AppendOutcome::Stored;
    assert_eq!(
        append(s, "c1", &[event("c1", 1, started("relay-1", "MZ1"))]).await,
        vec![st]
    );
    let got = get(s, "c1").await;
    assert_eq!(got.status, pb::CallStatus::InProgress);
    assert_eq!(got.started_at_ms, T0 + 1000);
    assert_eq!(
        (
            text(&got.twilio_call_sid),
            text(&got.stream_sid),
            text(&got.relay_id)
        ),
        (sid("CA100").as_str(), "MZ1", "relay-1")
    );
    assert_eq!(
        append(
            s,
            "c1",
            &[event("c1", 2, ended(pb::EndReason::Handoff, "drain", ""))]
        )
        .await,
        vec![st]
    );
    let got = get(s, "c1").await;
    assert_eq!(got.status, pb::CallStatus::InProgress, "still live");
    assert_eq!(got.end_reason, Some(pb::EndReason::Handoff));
    assert_eq!(got.ended_at_ms, 0);
    assert_eq!(
        attach(s, "c1", "relay-2", false, "x/2", T0).await,
        AttachOutcome::Attached,
        "a handed-off call can be attached again"
    );
    assert_eq!(
        append(s, "c1", &[event("c1", 3, started("relay-2", "MZ2"))]).await,
        vec![st]
    );
    let got = get(s, "c1").await;
    assert_eq!(got.end_reason, None, "resumed");
    assert_eq!(text(&got.end_detail), "");
    assert_eq!(got.started_at_ms, T0 + 1000, "the first start is kept");
    assert_eq!(
        (text(&got.stream_sid), text(&got.relay_id)),
        ("MZ2", "relay-2")
    );
    assert_eq!(got.status, pb::CallStatus::InProgress);
}

/// A final end: status and reason once (the first end wins), the lease let go, no
/// more admits or attaches; `RELAY_LOST` only after the lease ran out; the index trim
/// drops old entries while the calls stay readable until they expire.
async fn end_and_retention<S: CallStore>(s: &S) {
    create(
        s,
        &[
            record("c1", 10, ""),
            record("c2", 20, ""),
            record("c3", 30, ""),
        ],
    )
    .await;
    let st = AppendOutcome::Stored;
    append(s, "c1", &[event("c1", 1, started("relay-1", "MZ1"))]).await;
    attach(s, "c1", "relay-1", false, "x/1", T0).await;
    let transfer = event(
        "c1",
        2,
        ended(pb::EndReason::Transferred, "to sales", "+14155550199"),
    );
    assert_eq!(append(s, "c1", &[transfer]).await, vec![st]);
    let got = get(s, "c1").await;
    assert_eq!(got.status, pb::CallStatus::Completed);
    assert_eq!(got.end_reason, Some(pb::EndReason::Transferred));
    assert_eq!(text(&got.end_detail), "to sales");
    assert_eq!(text(&got.transfer_to), "+14155550199");
    assert_eq!(got.ended_at_ms, T0 + 2000);
    assert_eq!(text(&got.lease_holder), "", "an ended call holds no lease");
    assert!(
        expired(s, i64::MAX).await.is_empty(),
        "nothing left to sweep"
    );
    // History after the end is stored; the first end wins.
    let late = [
        event("c1", 3, usage(5)),
        event("c1", 4, ended(pb::EndReason::InternalError, "late", "")),
    ];
    assert_eq!(append(s, "c1", &late).await, vec![st, st]);
    let got = get(s, "c1").await;
    assert_eq!(
        (got.status, got.end_reason, got.last_seq),
        (
            pb::CallStatus::Completed,
            Some(pb::EndReason::Transferred),
            4
        )
    );
    assert_eq!(
        within(
            "admit_existing",
            s.admit_existing(&cid("c1"), Some(&sid("CA1")), "", "")
        )
        .await
        .expect("ok"),
        AdmitOutcome::Ended
    );
    assert_eq!(
        attach(s, "c1", "relay-1", true, "x/1", T0).await,
        AttachOutcome::Ended
    );

    // RELAY_LOST: refused while the lease runs, stored once after it.
    attach(s, "c2", "relay-1", false, "x/2", T0).await;
    let lost = [event(
        "c2",
        1,
        ended(pb::EndReason::RelayLost, "no stream", ""),
    )];
    assert_eq!(
        append_with(s, "c2", &lost, Some(T0 + LEASE)).await,
        vec![AppendOutcome::ConditionFailed],
        "the lease runs until T0 + LEASE"
    );
    assert_eq!(get(s, "c2").await.last_seq, 0, "nothing stored");
    assert_eq!(
        append_with(s, "c2", &lost, Some(T0 + LEASE + 1)).await,
        vec![st]
    );
    let got = get(s, "c2").await;
    assert_eq!(
        (got.status, got.end_reason),
        (pb::CallStatus::Failed, Some(pb::EndReason::RelayLost))
    );
    // Never attached: no lease to have run out.
    let never = [event("c3", 1, ended(pb::EndReason::RelayLost, "", ""))];
    assert_eq!(
        append_with(s, "c3", &never, Some(i64::MAX)).await,
        vec![AppendOutcome::ConditionFailed]
    );

    // Retention: trimming the all-calls index keeps every entry whose call is still
    // kept, however old (the Redis case `trim_drops_only_expired_calls` expires one).
    assert_eq!(
        within("trim_index", s.trim_index(i64::MAX))
            .await
            .expect("ok"),
        0
    );
    assert_eq!(
        ids(&scan(s, None, NEWEST, 10).await),
        vec!["c3", "c2", "c1"]
    );
    assert_eq!(get(s, "c1").await.call_id, "c1");
}

/// Agents: created once, replaced and deleted only at the version the writer read;
/// listed in id order; deleting one drops its routes and the default.
async fn agent_versions<S: CallStore>(s: &S) {
    let create_agent = |a: pb::Agent| async move {
        within("create_agent", s.create_agent(&a))
            .await
            .expect("ok")
    };
    assert!(create_agent(agent("b", 1, "B")).await);
    assert!(
        !create_agent(agent("b", 1, "B again")).await,
        "the id is taken"
    );
    assert!(create_agent(agent("a", 1, "A")).await);
    assert!(create_agent(agent("c", 1, "C")).await);
    let stored = within("get_agent", s.get_agent(&aid("b")))
        .await
        .expect("ok");
    assert_eq!(stored, Some(agent("b", 1, "B")));
    assert_eq!(
        within("get_agent", s.get_agent(&aid("z")))
            .await
            .expect("ok"),
        None
    );

    let replace = |a: pb::Agent, expected: u64| async move {
        within("replace_agent", s.replace_agent(&a, expected))
            .await
            .expect("ok")
    };
    assert_eq!(replace(agent("b", 2, "B2"), 1).await, AgentCas::Done);
    assert_eq!(
        replace(agent("b", 2, "stale writer"), 1).await,
        AgentCas::Conflict { current: 2 }
    );
    assert_eq!(
        replace(agent("b", 1, "no version"), 0).await,
        AgentCas::Conflict { current: 2 },
        "replacing needs the version read"
    );
    assert_eq!(replace(agent("z", 2, "Z"), 1).await, AgentCas::NotFound);
    let stored = within("get_agent", s.get_agent(&aid("b")))
        .await
        .expect("ok");
    assert_eq!(stored, Some(agent("b", 2, "B2")));

    let list = |after: &'static str, limit: usize| async move {
        let after = (!after.is_empty()).then(|| aid(after));
        within("list_agents", s.list_agents(after.as_ref(), limit))
            .await
            .expect("ok")
            .into_iter()
            .map(|a| a.agent_id)
            .collect::<Vec<_>>()
    };
    assert_eq!(list("", 10).await, vec!["a", "b", "c"]);
    assert_eq!(list("", 2).await, vec!["a", "b"]);
    assert_eq!(list("a", 10).await, vec!["b", "c"]);

    within("set_route", s.set_route("+14155550001", &aid("b")))
        .await
        .expect("ok");
    within("set_route", s.set_route("+14155550002", &aid("c")))
        .await
        .expect("ok");
    within("set_default_agent", s.set_default_agent(Some(&aid("b"))))
        .await
        .expect("ok");
    let delete = |id: &'static str, expected: u64| async move {
        within("delete_agent", s.delete_agent(&aid(id), expected))
            .await
            .expect("ok")
    };
    assert_eq!(delete("b", 1).await, AgentCas::Conflict { current: 2 });
    assert_eq!(delete("b", 2).await, AgentCas::Done);
    assert_eq!(delete("b", 0).await, AgentCas::NotFound);
    assert_eq!(
        delete("c", 0).await,
        AgentCas::Done,
        "0 deletes any version"
    );
    assert_eq!(
        within("get_agent", s.get_agent(&aid("b")))
            .await
            .expect("ok"),
        None
    );
    assert_eq!(list("", 10).await, vec!["a"]);
    assert!(
        within("list_routes", s.list_routes())
            .await
            .expect("ok")
            .is_empty(),
        "the deleted agents' routes went with them"
    );
    assert_eq!(
        within("get_default_agent", s.get_default_agent())
            .await
            .expect("ok"),
        None
    );
}

/// Number routes and the default agent.
async fn number_routes<S: CallStore>(s: &S) {
    let route =
        |n: &'static str| async move { within("get_route", s.get_route(n)).await.expect("ok") };
    assert_eq!(route("+14155550001").await, None);
    within("set_route", s.set_route("+14155550002", &aid("b")))
        .await
        .expect("ok");
    within("set_route", s.set_route("+14155550001", &aid("a")))
        .await
        .expect("ok");
    within("set_route", s.set_route("+14155550002", &aid("c")))
        .await
        .expect("ok");
    assert_eq!(
        route("+14155550002").await.as_ref().map(AgentId::as_str),
        Some("c"),
        "replaced"
    );
    assert_eq!(
        within("list_routes", s.list_routes()).await.expect("ok"),
        vec![
            ("+14155550001".to_owned(), aid("a")),
            ("+14155550002".to_owned(), aid("c")),
        ],
        "by number"
    );
    assert!(
        within("delete_route", s.delete_route("+14155550001"))
            .await
            .expect("ok")
    );
    assert!(
        !within("delete_route", s.delete_route("+14155550001"))
            .await
            .expect("ok")
    );
    assert_eq!(route("+14155550001").await, None);

    let default = || async move {
        within("get_default_agent", s.get_default_agent())
            .await
            .expect("ok")
    };
    assert_eq!(default().await, None);
    within("set_default_agent", s.set_default_agent(Some(&aid("a"))))
        .await
        .expect("ok");
    assert_eq!(default().await.as_ref().map(AgentId::as_str), Some("a"));
    within("set_default_agent", s.set_default_agent(Some(&aid("c"))))
        .await
        .expect("ok");
    assert_eq!(default().await.as_ref().map(AgentId::as_str), Some("c"));
    within("set_default_agent", s.set_default_agent(None))
        .await
        .expect("ok");
    assert_eq!(default().await, None);
}

/// What Twilio reports about a dialled call: the sid is set once, the status only moves
/// forward in Twilio's order (late or repeated callbacks change nothing), the highest
/// sequence number is kept, the first AMD verdict stays, and the sid finds the call.
async fn twilio_status_moves_one_way<S: CallStore>(s: &S) {
    let mut call = record("dialled", 1, "");
    call.dialed = true;
    create(s, &[call]).await;
    let dialled_sid = CallSid::parse("sid", "CA0123456789abcdef0123456789abcdef").expect("valid");
    let update = |status: &str, seq: Option<u32>| TwilioUpdate {
        sid: Some(dialled_sid.clone()),
        status: Some(TwilioCallStatus::from_name(status).expect("a Twilio status")),
        seq,
        ..TwilioUpdate::default()
    };
    let apply = |u: TwilioUpdate| async move {
        within("record_twilio", s.record_twilio(&cid("dialled"), &u))
            .await
            .expect("store reachable")
    };
    assert_eq!(apply(update("queued", None)).await, Some(true));
    assert_eq!(apply(update("ringing", Some(1))).await, Some(true));
    assert_eq!(apply(update("busy", Some(3))).await, Some(true));
    // Out of order: the older `in-progress` and `ringing` arrive after `busy`.
    assert_eq!(apply(update("in-progress", Some(2))).await, Some(false));
    assert_eq!(apply(update("ringing", Some(1))).await, Some(false));
    let got = get(s, "dialled").await;
    assert!(got.dialed);
    assert_eq!(got.twilio_status, Some(TwilioCallStatus::Busy));
    assert_eq!(got.twilio_seq, 3);
    assert_eq!(
        text(&got.twilio_call_sid),
        "CA0123456789abcdef0123456789abcdef"
    );
    let refused = TwilioUpdate {
        error: Some((21211, "Invalid 'To' Phone Number".to_owned())),
        answered_by: Some("machine_end_beep".to_owned()),
        ..TwilioUpdate::default()
    };
    assert_eq!(apply(refused).await, Some(true));
    let later = TwilioUpdate {
        answered_by: Some("human".to_owned()),
        ..TwilioUpdate::default()
    };
    assert_eq!(apply(later).await, Some(false), "the first verdict stays");
    let got = get(s, "dialled").await;
    assert_eq!(
        (got.twilio_error_code, got.twilio_error_message.as_str()),
        (21211, "Invalid 'To' Phone Number")
    );
    assert_eq!(text(&got.answered_by), "machine_end_beep");
    assert_eq!(
        within(
            "record_twilio",
            s.record_twilio(&cid("missing"), &update("ringing", None))
        )
        .await
        .expect("store reachable"),
        None
    );
    // The sid of an admitted call finds it (inbound status callbacks carry no call id).
    create(s, &[record("inbound-ish", 2, "")]).await;
    within(
        "admit_existing",
        s.admit_existing(&cid("inbound-ish"), Some(&sid("CAabc")), "", ""),
    )
    .await
    .expect("ok");
    assert_eq!(
        within("call_id_by_sid", s.call_id_by_sid(&sid("CAabc")))
            .await
            .expect("store reachable")
            .as_ref()
            .map(CallId::as_str),
        Some("inbound-ish")
    );
}

/// The stream that holds (or last held) a call's lease is recorded; a stream minted from
/// a replayed voice webhook (a first stream of a call that has had one) or a replayed
/// action request (a resumed stream following an earlier stream) is refused, whether the
/// lease is held or free, and writes nothing; the genuine next stream takes over.
async fn replayed_webhooks_and_action_requests_are_superseded<S: CallStore>(s: &S) {
    create(s, &[record("c1", 1, "")]).await;
    let checks = |id: &str, origin: StreamOrigin| AttachChecks {
        credential: Some((stream(id), T0 + 60_000)),
        origin,
        attempt: None,
        twilio_call_sid: None,
    };
    let first = |id: &str| checks(id, StreamOrigin::First);
    let resume = |id: &str, after: Option<&str>| {
        checks(
            id,
            StreamOrigin::Resume {
                takes_over: after.map(stream),
            },
        )
    };
    let at = |relay: &'static str, holder: &'static str, now: i64, c: AttachChecks| async move {
        attach_checked(s, "c1", relay, false, holder, now, &c).await
    };
    assert_eq!(
        at("r1", "x/1", T0, first("a1")).await,
        AttachOutcome::Attached
    );
    assert_eq!(get(s, "c1").await.lease_stream, Some(stream("a1")));
    let held = get(s, "c1").await;
    // While a1 holds the call: a replayed webhook's stream, and streams minted to follow
    // another stream than a1, are superseded (not merely held) and change nothing.
    for replay in [first("a2"), resume("b0", Some("a0")), resume("b0", None)] {
        assert_eq!(
            at("r2", "y/2", T0 + 100, replay.clone()).await,
            AttachOutcome::Superseded,
            "{replay:?}"
        );
        assert_eq!(get(s, "c1").await, held, "a refusal changes nothing");
    }
    // Twilio's next stream, minted to follow a1, takes the call over.
    assert_eq!(
        at("r2", "y/2", T0 + 100, resume("b1", Some("a1"))).await,
        AttachOutcome::TookOver
    );
    let taken = get(s, "c1").await;
    assert_eq!(taken.lease_stream, Some(stream("b1")));
    // A second stream minted to follow a1 (a replay of a1's action request) is too late.
    assert_eq!(
        at("r3", "z/3", T0 + 200, resume("b2", Some("a1"))).await,
        AttachOutcome::Superseded
    );
    assert_eq!(get(s, "c1").await, taken, "a refusal changes nothing");
    // The holder's reconnect names no origin and keeps the lease stream.
    assert_eq!(
        attach(s, "c1", "r2", true, "y/4", T0 + 300).await,
        AttachOutcome::Attached
    );
    assert_eq!(get(s, "c1").await.lease_stream, Some(stream("b1")));
    // Released (a hand-off): the lease stream is kept, and only a stream following it
    // attaches, the lease being free.
    within(
        "release_lease",
        s.release_lease(&cid("c1"), &holder("y/4"), T0 + 400, LEASE),
    )
    .await
    .expect("ok");
    assert_eq!(get(s, "c1").await.lease_stream, Some(stream("b1")));
    assert_eq!(
        at("r3", "z/5", T0 + 500, resume("c0", Some("a1"))).await,
        AttachOutcome::Superseded
    );
    assert_eq!(
        at("r3", "z/5", T0 + 500, first("c0")).await,
        AttachOutcome::Superseded
    );
    assert_eq!(
        at("r3", "z/5", T0 + 500, resume("c1", Some("b1"))).await,
        AttachOutcome::Attached
    );
    assert_eq!(get(s, "c1").await.lease_stream, Some(stream("c1")));
}

/// An attach that committed but whose answer was lost (the control replica died between
/// the store's write and its reply): the relay's retry with the same credential and the
/// same attempt id is let through as its stream's reconnect — while the lease the lost
/// attach took still runs, and after — and changes nothing but the holder. The same
/// credential with another attempt id (a replay, even on the same relay), or with none,
/// is still `CredentialUsed`, as is a retry once another stream has taken the call.
async fn a_committed_attach_retried_with_its_attempt_is_a_reconnect<S: CallStore>(s: &S) {
    create(s, &[record("c1", 1, "")]).await;
    let checks = |id: &str, origin: StreamOrigin, attempt: Option<&str>| AttachChecks {
        credential: Some((stream(id), T0 + 60_000)),
        origin,
        attempt: attempt.map(stream),
        twilio_call_sid: None,
    };
    let at = |relay: &'static str, holder: &'static str, now: i64, c: AttachChecks| async move {
        attach_checked(s, "c1", relay, false, holder, now, &c).await
    };
    // The lost attach: committed by a replica that died before answering.
    assert_eq!(
        at(
            "r1",
            "dead/1",
            T0,
            checks("a1", StreamOrigin::First, Some("e1"))
        )
        .await,
        AttachOutcome::Attached
    );
    let committed = get(s, "c1").await;
    // Replays of the credential: another attempt, no attempt, another relay.
    for (relay, attempt) in [("r1", Some("e2")), ("r1", None), ("r2", Some("e1"))] {
        let outcome = at(
            relay,
            "x/2",
            T0 + 10,
            checks("a1", StreamOrigin::First, attempt),
        )
        .await;
        let expected = if relay == "r1" {
            AttachOutcome::CredentialUsed
        } else {
            // Its own attempt id on another relay: the lease is the first relay's.
            AttachOutcome::Held
        };
        assert_eq!(outcome, expected, "{relay} {attempt:?}");
        assert_eq!(get(s, "c1").await, committed, "a refusal changes nothing");
    }
    // The relay's retry, through another replica, while the lost attach's lease runs.
    assert_eq!(
        at(
            "r1",
            "live/3",
            T0 + 20,
            checks("a1", StreamOrigin::First, Some("e1"))
        )
        .await,
        AttachOutcome::Attached
    );
    let retried = get(s, "c1").await;
    assert_eq!(text(&retried.lease_holder), "live/3");
    assert_eq!(retried.lease_stream, Some(stream("a1")));
    assert_eq!(retried.lease_until_ms, T0 + 20 + LEASE);
    // A later stream takes the call (a hand-off): the old stream's retry is refused.
    within(
        "release_lease",
        s.release_lease(&cid("c1"), &holder("live/3"), T0 + 30, LEASE),
    )
    .await
    .expect("ok");
    assert_eq!(
        at(
            "r2",
            "next/4",
            T0 + 40,
            checks(
                "b1",
                StreamOrigin::Resume {
                    takes_over: Some(stream("a1"))
                },
                Some("e3")
            )
        )
        .await,
        AttachOutcome::Attached
    );
    assert_eq!(
        at(
            "r1",
            "late/5",
            T0 + 50,
            checks("a1", StreamOrigin::First, Some("e1"))
        )
        .await,
        AttachOutcome::CredentialUsed
    );
}

/// The ready-relay registry: a relay counts the *other* relays that reported within
/// `alive_ms` and do not drain; a draining or silent relay does not count.
async fn ready_relay_registry<S: CallStore>(s: &S) {
    const ALIVE: i64 = 1000;
    let report = |relay: &'static str, draining: bool, at: i64| async move {
        let id = RelayId::parse("relay_id", relay).expect("valid");
        within(
            "report_presence",
            s.report_presence(&id, draining, at, ALIVE),
        )
        .await
        .expect("store reachable")
    };
    assert_eq!(report("relay-1", false, T0).await, 0, "alone");
    assert_eq!(
        report("relay-2", false, T0 + 100).await,
        1,
        "relay-1 is ready"
    );
    assert_eq!(
        report("relay-1", false, T0 + 200).await,
        1,
        "relay-2 is ready"
    );
    // relay-2 drains: it no longer counts for the others, and still sees relay-1.
    assert_eq!(report("relay-2", true, T0 + 300).await, 1);
    assert_eq!(
        report("relay-1", false, T0 + 400).await,
        0,
        "relay-2 drains"
    );
    assert_eq!(report("relay-3", false, T0 + 500).await, 1, "relay-1 only");
    // relay-3 last reported at T0 + 500: silent for more than ALIVE at T0 + 1600.
    assert_eq!(
        report("relay-1", false, T0 + 1600).await,
        0,
        "relay-3 went silent"
    );
    // A relay that reports again counts again.
    assert_eq!(report("relay-3", false, T0 + 1700).await, 1);
}

fn campaign(id: &str) -> CampaignRecord {
    CampaignRecord {
        campaign_id: CampaignId::parse("campaign_id", id).expect("valid"),
        settings: pb::CampaignSettings {
            agent_id: "a1".into(),
            from: "+14155550100".into(),
            calls_per_second: 2.5,
            max_concurrent: 3,
            retry: Some(pb::RetryPolicy {
                busy: true,
                max_attempts: 2,
                delay_ms: 100,
                ..Default::default()
            }),
            dial: None,
            calling_window: Some(pb::CallingWindow {
                start: "09:00".into(),
                end: "20:30".into(),
                days: vec![1, 2, 3, 4, 5],
                time_zone: "America/Chicago".into(),
            }),
        },
        state: pb::CampaignState::Draft,
        created_at_ms: 1000,
        updated_at_ms: 1000,
        numbers: 0,
        settled: false,
        revision: 0,
    }
}

fn number(to: &str) -> NumberState {
    NumberState::new(to.to_owned(), BTreeMap::from([("k".into(), to.to_owned())]))
}

/// Create, get, add numbers, the state machine as compare-and-set, closed campaigns.
async fn campaign_states_and_numbers<S: CallStore>(s: &S) {
    use pb::CampaignState as St;
    let c = campaign("q3");
    let id = c.campaign_id.clone();
    assert!(s.create_campaign(&c).await.expect("store"));
    assert!(!s.create_campaign(&c).await.expect("store"), "id taken");
    assert_eq!(s.get_campaign(&id).await.expect("store"), Some(c.clone()));
    let missing = CampaignId::parse("campaign_id", "nope").expect("valid");
    assert_eq!(s.get_campaign(&missing).await.expect("store"), None);
    assert_eq!(
        s.add_campaign_numbers(&missing, &[number("+14155550001")])
            .await
            .expect("store"),
        AddNumbers::NotFound
    );
    let mut first: Vec<NumberState> = (1..=3)
        .map(|i| number(&format!("+1415555000{i}")))
        .collect();
    first[1].time_zone = "Asia/Kolkata".into();
    let rev = |c: Option<CampaignRecord>| c.expect("exists").revision;
    let before = rev(s.get_campaign(&id).await.expect("store"));
    assert_eq!(
        s.add_campaign_numbers(&id, &first).await.expect("store"),
        AddNumbers::Added(3)
    );
    let added = rev(s.get_campaign(&id).await.expect("store"));
    assert!(added > before, "adding numbers moves the revision");
    assert_eq!(
        s.add_campaign_numbers(&id, &[number("+14155550004")])
            .await
            .expect("store"),
        AddNumbers::Added(4)
    );
    let stored = s.campaign_numbers(&id).await.expect("store");
    assert_eq!(stored.len(), 4);
    assert_eq!(stored[0], first[0]);
    assert_eq!(stored[1], first[1], "the number's time zone is kept");
    assert_eq!(stored[3].to, "+14155550004");
    let added = rev(s.get_campaign(&id).await.expect("store"));
    assert!(s.active_campaigns().await.expect("store").contains(&id));

    // Pause from draft is refused with the current state; start, pause, resume go.
    assert_eq!(
        s.change_campaign(&id, &[St::Running], St::Paused, 2000)
            .await
            .expect("store"),
        CampaignChange::Refused(St::Draft)
    );
    assert_eq!(
        rev(s.get_campaign(&id).await.expect("store")),
        added,
        "a refused change is no change"
    );
    for (from, to) in [
        (St::Draft, St::Running),
        (St::Running, St::Paused),
        (St::Paused, St::Running),
    ] {
        assert_eq!(
            s.change_campaign(&id, &[from], to, 2000)
                .await
                .expect("store"),
            CampaignChange::Done
        );
    }
    let running = s.get_campaign(&id).await.expect("store").expect("exists");
    assert_eq!(running.settings, c.settings, "the calling window is kept");
    assert!(
        running.revision >= added + 3,
        "each state change moves the revision"
    );
    assert_eq!(running.state, St::Running);
    assert_eq!(running.updated_at_ms, 2000);
    assert_eq!(running.numbers, 4);
    assert_eq!(
        s.change_campaign(&missing, &[St::Draft], St::Running, 0)
            .await
            .expect("store"),
        CampaignChange::NotFound
    );
    assert_eq!(
        s.change_campaign(
            &id,
            &[St::Draft, St::Running, St::Paused],
            St::Canceled,
            3000
        )
        .await
        .expect("store"),
        CampaignChange::Done
    );
    assert_eq!(
        s.add_campaign_numbers(&id, &[number("+14155550005")])
            .await
            .expect("store"),
        AddNumbers::Closed(St::Canceled)
    );
}

/// One dialer at a time: the lease has one holder until it runs out, the fencing token
/// grows when it changes hands, and a writer with an old token writes nothing.
async fn campaign_dialer_lease_is_fenced<S: CallStore>(s: &S) {
    let c = campaign("fenced");
    let id = c.campaign_id.clone();
    assert!(s.create_campaign(&c).await.expect("store"));
    let numbers = [number("+14155550001"), number("+14155550002")];
    assert_eq!(
        s.add_campaign_numbers(&id, &numbers).await.expect("store"),
        AddNumbers::Added(2)
    );
    let a = s
        .campaign_lease(&id, "a", 10_000, 3000)
        .await
        .expect("store");
    let a = a.expect("a takes the free lease");
    assert_eq!(
        s.campaign_lease(&id, "b", 12_000, 3000)
            .await
            .expect("store"),
        None
    );
    assert_eq!(
        s.campaign_lease(&id, "a", 12_000, 3000)
            .await
            .expect("store"),
        Some(a),
        "renewed, same token"
    );
    let placed = NumberState {
        attempts: 1,
        phase: Phase::Placed {
            call_id: "c1".into(),
            claimed_at_ms: 12_000,
        },
        ..numbers[0].clone()
    };
    assert!(
        s.write_campaign_numbers(&id, a, &[(0, placed.clone())])
            .await
            .expect("store")
    );
    // a's lease ran out at 15 000: b takes over with a larger token, a is fenced out.
    let b = s
        .campaign_lease(&id, "b", 15_001, 3000)
        .await
        .expect("store")
        .expect("b takes the lapsed lease");
    assert!(b > a);
    assert_eq!(
        s.campaign_lease(&id, "a", 15_002, 3000)
            .await
            .expect("store"),
        None
    );
    let done = NumberState {
        phase: Phase::Done {
            outcome: Outcome::Busy,
        },
        ..placed.clone()
    };
    let rev = |c: Option<CampaignRecord>| c.expect("exists").revision;
    let written = rev(s.get_campaign(&id).await.expect("store"));
    assert!(
        !s.write_campaign_numbers(&id, a, &[(0, done.clone())])
            .await
            .expect("store"),
        "the old holder writes nothing"
    );
    assert_eq!(rev(s.get_campaign(&id).await.expect("store")), written);
    assert!(!s.settle_campaign(&id, a, 2, 15_003).await.expect("store"));
    assert_eq!(s.campaign_numbers(&id).await.expect("store")[0], placed);
    assert!(
        s.write_campaign_numbers(&id, b, &[(0, done.clone()), (1, done.clone())])
            .await
            .expect("store")
    );
    let written = rev(s.get_campaign(&id).await.expect("store"));
    // Settling needs a running (or canceled) campaign with exactly the numbers seen.
    assert!(
        !s.settle_campaign(&id, b, 2, 15_004).await.expect("store"),
        "draft"
    );
    s.change_campaign(
        &id,
        &[pb::CampaignState::Draft],
        pb::CampaignState::Running,
        15_004,
    )
    .await
    .expect("store");
    assert!(
        !s.settle_campaign(&id, b, 1, 15_005).await.expect("store"),
        "count differs"
    );
    assert!(s.settle_campaign(&id, b, 2, 15_006).await.expect("store"));
    assert!(
        s.settle_campaign(&id, b, 2, 15_007).await.expect("store"),
        "again: still settled"
    );
    let settled = s.get_campaign(&id).await.expect("store").expect("kept");
    assert!(settled.revision > written, "settling moves the revision");
    assert_eq!(settled.state, pb::CampaignState::Completed);
    assert!(settled.settled);
    assert!(!s.active_campaigns().await.expect("store").contains(&id));
}

async fn do_not_call_set<S: CallStore>(s: &S) {
    let numbers = vec!["+14155550001".to_owned(), "+14155550002".to_owned()];
    assert_eq!(
        s.do_not_call(&numbers).await.expect("store"),
        [false, false]
    );
    s.set_do_not_call(&numbers, true).await.expect("store");
    s.set_do_not_call(&numbers[..1], false)
        .await
        .expect("store");
    assert_eq!(s.do_not_call(&numbers).await.expect("store"), [false, true]);
}

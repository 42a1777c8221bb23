//! Runs of events stored in one step: a burst on an attach stream (duplicates in the
//! middle, a gap at the end) against a real control process, and the store's
//! `append_events` itself on Redis and in memory, with the same expectations.

mod common;

use std::sync::Arc;
use std::time::Duration;

use callbridge_control::domain::call::event_effects;
use callbridge_control::domain::ids::{AgentId, CallId, CampaignId};
use callbridge_control::domain::record::CallRecord;
use callbridge_control::hub::Hub;
use callbridge_control::store::memory::MemoryStore;
use callbridge_control::store::redis::{RedisStore, RedisTarget};
use callbridge_control::store::{AppendOutcome, CallStore};
use callbridge_proto::pb;
use callbridge_testkit::redis_server::RedisServer;
use common::*;
use pb::call_event::Kind;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::Code;

fn usage(total: u64) -> Kind {
    Kind::Usage(pb::Usage {
        input_tokens: total,
        total_tokens: total,
        ..Default::default()
    })
}

/// Seqs 1–6 once each, then 2–3 again in the middle, then 8 (a gap after 6) and 9.
/// Usage: 10 (seq 3, sent twice) + 5 (seq 5) = 15 tokens over 2 responses.
fn burst(call_id: &str) -> Vec<pb::CallEvent> {
    vec![
        event(call_id, 1, started("relay-1")),
        event(call_id, 2, caller("one")),
        event(call_id, 3, usage(10)),
        event(call_id, 4, caller("two")),
        event(call_id, 3, usage(10)),
        event(call_id, 2, caller("one")),
        event(call_id, 5, usage(5)),
        event(call_id, 6, caller("three")),
        event(call_id, 8, caller("after a gap")),
        event(call_id, 9, caller("never looked at")),
    ]
}

/// The first sending of seqs 1–6: what must be stored, in order.
fn stored_part(call_id: &str) -> Vec<pb::CallEvent> {
    let mut want = burst(call_id);
    want.truncate(8);
    want.remove(5);
    want.remove(4);
    want
}

#[tokio::test]
async fn a_burst_is_stored_once_and_acked_up_to_the_gap() {
    let AttachedCall {
        redis: _redis,
        control,
        relay: _relay,
        mut calls,
        id,
        mut stream,
    } = attached_call("burst").await;

    // Everything is queued before any ack is read, so control finds the events waiting
    // and stores them in runs (how many per run depends on timing; the outcome must not).
    let (acks, refusal) = stream.burst_until_refused(burst(&id)).await;
    assert_eq!(refusal.code(), Code::FailedPrecondition, "{refusal:?}");
    assert!(
        refusal.message().contains("seq 8") && refusal.message().contains("resend from 7"),
        "{}",
        refusal.message()
    );
    // Fewer acks than events handled means runs of several events were stored at once.
    eprintln!("acks for 8 events handled: {acks:?}");
    assert_eq!(acks.last(), Some(&6), "acks {acks:?}");
    assert!(acks.iter().all(|&n| (1..=6).contains(&n)), "acks {acks:?}");

    let got = get_call(&mut calls, &id).await;
    assert_eq!(got.last_seq, 6);
    assert_eq!(got.status, pb::CallStatus::InProgress as i32);
    let usage = answer(
        "usage",
        calls.get_usage(pb::GetUsageRequest {
            scope: Some(pb::get_usage_request::Scope::CallId(id.clone())),
        }),
    )
    .await;
    assert_eq!(
        (usage.total_tokens, usage.input_tokens, usage.responses),
        (15, 15, 2),
        "each usage event counted once"
    );
    let mut watch = watch_call(&mut calls, &id, 0).await;
    let mut seen = Vec::new();
    for _ in 0..6 {
        let e = within("watch event", watch.message())
            .await
            .expect("watch ok")
            .expect("an event");
        seen.push(e);
    }
    assert_eq!(seen, stored_part(&id));
    control.assert_metrics(&[
        "callbridge_control_events_stored_total 6",
        "callbridge_control_events_duplicate_total 2",
    ]);
}

#[tokio::test]
async fn events_before_an_invalid_one_in_a_burst_are_stored_and_acked() {
    let AttachedCall {
        redis: _redis,
        control: _control,
        relay: _relay,
        mut calls,
        id,
        mut stream,
    } = attached_call("invalid").await;
    let burst = [
        event(&id, 1, started("relay-1")),
        event(&id, 2, caller("fine")),
        pb::CallEvent {
            kind: None,
            ..event(&id, 3, caller("no kind"))
        },
        event(&id, 3, caller("never looked at")),
    ];
    let (acks, refusal) = stream.burst_until_refused(burst).await;
    assert_eq!(refusal.code(), Code::InvalidArgument, "{refusal:?}");
    assert!(
        refusal.message().contains("event.kind"),
        "{}",
        refusal.message()
    );
    assert_eq!(acks.last(), Some(&2), "acks {acks:?}");
    let got = get_call(&mut calls, &id).await;
    assert_eq!(
        got.last_seq, 2,
        "the events before the invalid one are stored"
    );
}

fn cid(call_id: &str) -> CallId {
    CallId::parse("call_id", call_id).expect("a valid call id")
}

fn spring() -> CampaignId {
    CampaignId::parse("campaign_id", "spring").expect("valid")
}

fn call(call_id: &str) -> CallRecord {
    CallRecord {
        campaign_id: Some(spring()),
        ..CallRecord::new(
            cid(call_id),
            AgentId::parse("agent_id", "a").expect("valid"),
            pb::Direction::Outbound,
            pb::CallStatus::Ringing,
            1,
        )
    }
}

/// Appends `events` as one run.
async fn run<S: CallStore>(
    store: &S,
    call_id: &str,
    events: &[pb::CallEvent],
) -> Vec<AppendOutcome> {
    let effects: Vec<_> = events
        .iter()
        .map(|e| event_effects(e).expect("valid event"))
        .collect();
    within(
        "append_events",
        store.append_events(&cid(call_id), Some(&spring()), events, &effects),
    )
    .await
    .expect("store reachable")
}

async fn stored_call<S: CallStore>(store: &S, call_id: &str) -> CallRecord {
    within("get", store.get_call(&cid(call_id)))
        .await
        .expect("get")
        .expect("exists")
}

/// The same runs on either store: outcomes, stored events, usage, status, and what
/// watchers on the hub are told (each stored event once, in order, with its campaign).
async fn check_store<S: CallStore>(store: &S, hub: &Hub) {
    let mut bus = hub.subscribe();
    let id = "c1";
    within("create", store.create_calls(&[call(id)]))
        .await
        .expect("created");
    let (s, d) = (AppendOutcome::Stored, AppendOutcome::Duplicate);
    assert_eq!(
        run(store, id, &burst(id)).await,
        vec![s, s, s, s, d, d, s, s, AppendOutcome::Gap { last_seq: 6 }],
        "handling stops at the gap; seq 9 is untouched"
    );
    let stored = within("read", store.read_events(&cid(id), 0, 100))
        .await
        .expect("read");
    assert_eq!(stored, stored_part(id));
    let got = stored_call(store, id).await;
    assert_eq!(got.last_seq, 6);
    assert_eq!(got.status, pb::CallStatus::InProgress);
    assert_eq!(got.started_at_ms, 1_700_000_000_001);
    assert_eq!(got.relay_id.as_ref().map(|r| r.as_str()), Some("relay-1"));
    assert_eq!(
        (got.usage[2], got.usage[8]),
        (15, 2),
        "total tokens, responses"
    );

    // Only duplicates: nothing changes.
    assert_eq!(run(store, id, &burst(id)[1..4]).await, vec![d, d, d]);
    // The end, then history after it; the status stays final.
    let tail = vec![
        event(id, 7, ended(pb::EndReason::CallerHangup)),
        event(id, 8, started("relay-late")),
        event(id, 9, usage(1)),
    ];
    assert_eq!(run(store, id, &tail).await, vec![s, s, s]);
    let got = stored_call(store, id).await;
    assert_eq!(got.last_seq, 9);
    assert_eq!(got.status, pb::CallStatus::Completed);
    assert_eq!(got.end_reason, Some(pb::EndReason::CallerHangup));
    assert_eq!(got.started_at_ms, 1_700_000_000_001, "first start kept");
    assert_eq!((got.usage[2], got.usage[8]), (16, 3));
    // Unknown call: the first event says so.
    assert_eq!(
        run(store, "nope", &tail).await,
        vec![AppendOutcome::NotFound]
    );

    let mut want = stored_part(id);
    want.extend(tail);
    let mut seen = Vec::new();
    while seen.len() < want.len() {
        let e = within("bus", bus.recv()).await.expect("bus open");
        if e.event.call_id != id {
            continue; // a late probe
        }
        assert_eq!(e.campaign_id, Some(spring()));
        seen.push(e.event.clone());
    }
    assert_eq!(seen, want, "each stored event published once, in order");
}

#[tokio::test]
async fn append_events_in_memory() {
    let hub = Arc::new(Hub::new());
    let store = MemoryStore::new(hub.clone(), "r1");
    check_store(&store, &hub).await;
}

#[tokio::test]
async fn append_events_on_redis() {
    let redis = RedisServer::unix().expect("redis");
    let hub = Arc::new(Hub::new());
    let tracker = TaskTracker::new();
    let shutdown = CancellationToken::new();
    let store = within(
        "connect",
        RedisStore::connect(
            &RedisTarget::Single(redis.url()),
            Duration::from_secs(3600),
            hub.clone(),
            "r1",
            &tracker,
            shutdown.clone(),
        ),
    )
    .await
    .expect("connected");
    // The bus subscription is asynchronous: wait until a published event arrives.
    within("create probe", store.create_calls(&[call("probe")]))
        .await
        .expect("created");
    let mut seq = 0;
    let probe = eventually("bus subscribed", || {
        seq += 1;
        let store = store.clone();
        let mut bus = hub.subscribe();
        async move {
            let e = event("probe", seq, caller("x"));
            let effects = [event_effects(&e).expect("valid")];
            let _ = store
                .append_events(&cid("probe"), None, &[e], &effects)
                .await;
            tokio::time::timeout(Duration::from_millis(200), bus.recv())
                .await
                .ok()
                .and_then(Result::ok)
        }
    })
    .await;
    assert_eq!(probe.event.call_id, "probe");
    check_store(&store, &hub).await;
    shutdown.cancel();
    tracker.close();
    within("subscriber stops", tracker.wait()).await;
}

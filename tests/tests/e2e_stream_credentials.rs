//! End-to-end: a media stream proves itself at `start` with the credential its TwiML
//! carried (`docs/protocols.md`, "Stream credentials"). Real relay and control binaries,
//! real Redis; the fake model counts every session, so "no model socket" is checked.
//!
//! A replayed stream — the upgrade (URL, signature) and `start` (the `<Parameter>`s and
//! CallSid Twilio sent) captured from a live call — is refused on the relay that carries
//! the call and on another one, before and after a drain hand-off, and changes nothing
//! stored; the genuine call goes on to the end.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use callbridge_proto::pb;
use callbridge_relay::call_id::CallId;
use callbridge_relay::stream_credential::{Segment, StreamKey, now_ms};
use callbridge_testkit::conversation::Conversation;
use callbridge_testkit::eventually;
use callbridge_testkit::fake_realtime::FakeRealtime;
use callbridge_testkit::sim_caller::{
    CallerConfig, ClosedBy, LoadBalancer, ProbeOutcome, SimCaller,
};
use callbridge_testkit::twiml::Twiml;
use callbridge_tests::stored_turns::numbered_script;
use callbridge_tests::{PUBLIC_URL, TWILIO_TOKEN, World, agent_settings, with_timeout};

const CALL: Duration = Duration::from_secs(90);
const STEP: Duration = Duration::from_secs(20);

/// A caller that reaches only the relay at `addr`.
fn pinned(world: &World, addr: SocketAddr) -> CallerConfig {
    let mut cfg = world.caller(Conversation::default());
    cfg.relays = LoadBalancer::new(vec![addr]);
    cfg
}

/// Opens `stream_url` on the relay at `addr` with `call_sid` and `params` in `start`.
async fn probe(
    world: &World,
    addr: SocketAddr,
    stream_url: &str,
    call_sid: &str,
    params: &[(String, String)],
) -> ProbeOutcome {
    with_timeout(
        STEP,
        "probe a stream",
        SimCaller::new(pinned(world, addr)).probe_stream(stream_url, call_sid, params),
    )
    .await
    .expect("the relay answers")
}

fn closed(code: u16, reason: &str) -> ProbeOutcome {
    ProbeOutcome::Closed {
        code: Some(code),
        reason: reason.to_owned(),
    }
}

/// `params` with `name` set to `value`.
fn with_param(params: &[(String, String)], name: &str, value: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> =
        params.iter().filter(|(k, _)| k != name).cloned().collect();
    out.push((name.to_owned(), value.to_owned()));
    out
}

fn param<'a>(twiml: &'a Twiml, name: &str) -> &'a str {
    twiml
        .parameter(name)
        .unwrap_or_else(|| panic!("<Parameter name={name}> in {twiml:?}"))
}

/// The key every relay of the test world derives from its Twilio token: stands in for a
/// relay minting a credential (an expired one, one for a call control does not know).
fn world_key() -> StreamKey {
    StreamKey::from_auth_token(TWILIO_TOKEN.as_bytes())
}

fn mint(call_id: &str, minted_at_ms: i64) -> String {
    let id = CallId::parse(call_id).expect("valid");
    world_key().mint(
        Some(&id),
        Segment::First,
        minted_at_ms,
        Duration::from_secs(60),
    )
}

/// What an attach would change in the stored call.
fn attach_fields(c: &pb::Call) -> (i32, String, String, String, i64, i64) {
    (
        c.status,
        c.twilio_call_sid.clone(),
        c.stream_sid.clone(),
        c.relay_id.clone(),
        c.started_at_ms,
        c.ended_at_ms,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_stream_refusal_has_its_own_close_code_and_touches_nothing() {
    let world = World::builder(FakeRealtime::builder()).start().await;
    world
        .default_agent(agent_settings("credentials", Some("Hello")))
        .await;
    let relay = world.relays[0].addr;
    let caller = pinned(&world, relay);
    let admitted = with_timeout(STEP, "webhook", SimCaller::new(caller.clone()).webhook())
        .await
        .expect("answers");
    let twiml = admitted.twiml.expect("TwiML");
    let stream_url = twiml.stream_url.clone().expect("a stream url");
    let call_id = param(&twiml, "callId").to_owned();
    let credential = param(&twiml, "credential").to_owned();
    let params = twiml.parameters.clone();
    let before = world.get_call(&call_id).await;

    // Another call's id in `start`, a tampered or missing credential, a credential past
    // its expiry, another CallSid than Twilio's: each refused with its own code.
    let other_id = with_param(&params, "callId", "call_someone_else");
    let mut tampered = credential.clone().into_bytes();
    tampered[20] = if tampered[20] == b'A' { b'B' } else { b'A' };
    let tampered = with_param(
        &params,
        "credential",
        &String::from_utf8(tampered).expect("ascii"),
    );
    let missing: Vec<(String, String)> = params
        .iter()
        .filter(|(k, _)| k != "credential")
        .cloned()
        .collect();
    let expired = with_param(&params, "credential", &mint(&call_id, now_ms() - 120_000));
    let other_sid = format!("CA{}", "f".repeat(32));
    let cases = [
        (
            &other_id,
            caller.call_sid.as_str(),
            closed(4402, "callId parameter does not match the stream path"),
        ),
        (
            &tampered,
            caller.call_sid.as_str(),
            closed(4401, "stream credential invalid"),
        ),
        (
            &missing,
            caller.call_sid.as_str(),
            closed(4401, "stream credential missing"),
        ),
        (
            &expired,
            caller.call_sid.as_str(),
            closed(4410, "stream credential expired"),
        ),
        (
            &params,
            other_sid.as_str(),
            closed(4403, "callSid is not the admitted call's"),
        ),
    ];
    for (params, sid, expect) in &cases {
        assert_eq!(
            probe(&world, relay, &stream_url, sid, params).await,
            *expect,
            "{params:?} {sid}"
        );
    }
    // A valid credential for a call control does not know.
    let ghost = "call_does_not_exist";
    let ghost_url = stream_url.replace(&call_id, ghost);
    let ghost_params = vec![
        ("callId".to_owned(), ghost.to_owned()),
        ("credential".to_owned(), mint(ghost, now_ms())),
    ];
    assert_eq!(
        probe(&world, relay, &ghost_url, &caller.call_sid, &ghost_params).await,
        closed(4404, "unknown call")
    );
    // With a control plane the standalone route is not served.
    let simple = format!(
        "{}/api/twilio/media-stream-simple",
        PUBLIC_URL.replace("https://", "wss://")
    );
    assert_eq!(
        probe(&world, relay, &simple, &caller.call_sid, &params).await,
        ProbeOutcome::Refused(404)
    );
    assert_eq!(world.fake.connections_accepted(), 0, "no model socket");
    assert_eq!(
        world.get_call(&call_id).await,
        before,
        "the refusals changed nothing stored"
    );

    // The genuine stream (the credential was not used up by the refusals): it runs.
    assert_eq!(
        probe(&world, relay, &stream_url, &caller.call_sid, &params).await,
        ProbeOutcome::Media
    );
    assert_eq!(world.fake.connections_accepted(), 1);
    // The same stream again: its credential is used.
    assert_eq!(
        probe(&world, relay, &stream_url, &caller.call_sid, &params).await,
        closed(4409, "stream credential already used")
    );
    assert_eq!(
        world.fake.connections_accepted(),
        1,
        "no model socket for the replay"
    );
}

/// A call that started on relay 0 and was handed off (relay 0 drained) to relay 1, where
/// it goes on; relay 0 is back in the world but out of rotation.
struct HandedOff {
    world: World,
    handle: callbridge_testkit::sim_caller::CallerHandle,
    addrs: Vec<SocketAddr>,
    call_id: String,
    call_sid: String,
    stream_url: String,
    /// The webhook's TwiML (stream 1) and the action answer's (stream 2).
    first: Twiml,
    second: Twiml,
    /// What an attach would change, before and after the hand-off.
    before: (i32, String, String, String, i64, i64),
    resumed: (i32, String, String, String, i64, i64),
    /// What the captured stream 1 replayed on both relays before the hand-off got.
    replays_before: Vec<ProbeOutcome>,
    sessions_before: u64,
    sessions_after_replays: u64,
}

/// Starts a call of `turns` turns on relay 0, replays its captured stream on both relays,
/// then drains relay 0 so the call is handed off to relay 1.
async fn hand_off_a_call(agent: &str, turns: usize) -> HandedOff {
    let script = numbered_script(turns);
    let mut world = World::builder(FakeRealtime::builder().script(script.clone()).speed(2.0))
        .relays(2)
        .relay_env("RELAY_DRAIN_GRACE_SECS", "20")
        .start()
        .await;
    world
        .default_agent(agent_settings(agent, Some("Hello there")))
        .await;
    let addrs = world.relay_addrs();
    // The call starts on relay 0 (relay 1 out of rotation for now).
    let lb = LoadBalancer::new(addrs.clone());
    lb.set_in_rotation(addrs[1], false);
    let mut cfg = world.caller(script.clone());
    cfg.relays = lb.clone();
    cfg.follow_streams = 2;
    cfg.answer_wait = Duration::from_secs(5);
    let call_sid = cfg.call_sid.clone();
    let handle = SimCaller::new(cfg).start();
    let live = handle.live.clone();
    assert!(
        eventually(CALL, || live.turns_spoken.load(Ordering::SeqCst) >= 1).await,
        "the call is going"
    );
    let first = live.stream_twiml(0).expect("the webhook's TwiML");
    let stream_url = first.stream_url.clone().expect("a stream url");
    let call_id = param(&first, "callId").to_owned();

    // Before the hand-off: the captured stream, replayed on relay 0 (which carries the
    // call) and relay 1.
    let before = attach_fields(&world.get_call(&call_id).await);
    let sessions_before = world.fake.connections_accepted();
    let mut replays_before = Vec::new();
    for &addr in &addrs {
        replays_before.push(probe(&world, addr, &stream_url, &call_sid, &first.parameters).await);
    }
    let sessions_after_replays = world.fake.connections_accepted();

    // Drain relay 0: the call is handed off to relay 1 with a new credential.
    lb.set_in_rotation(addrs[1], true);
    lb.set_in_rotation(addrs[0], false);
    world.relays[0].terminate().expect("SIGTERM");
    let status = with_timeout(
        Duration::from_secs(30),
        "relay exit",
        world.relays[0].wait_exit(Duration::from_secs(25)),
    )
    .await
    .expect("relay 0 exits once its call is handed off");
    assert!(status.success(), "relay 0: {status}");
    world.relays[0].restart().expect("relay 0 starts again");
    world.relays[0]
        .wait_http_ok("/readyz", callbridge_tests::READY)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let second = {
        let watched = live.clone();
        assert!(
            eventually(CALL, move || watched.stream_twiml(1).is_some()).await,
            "the call was resumed"
        );
        live.stream_twiml(1).expect("the resume TwiML")
    };
    let resumed = {
        let mut fields = attach_fields(&world.get_call(&call_id).await);
        for _ in 0..100 {
            if fields.3 == "relay-e2e-1" {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            fields = attach_fields(&world.get_call(&call_id).await);
        }
        fields
    };
    HandedOff {
        world,
        handle,
        addrs,
        call_id,
        call_sid,
        stream_url,
        first,
        second,
        before,
        resumed,
        replays_before,
        sessions_before,
        sessions_after_replays,
    }
}

/// The genuine call of [`hand_off_a_call`] goes on to its end on its two streams, every
/// turn spoken once, and is stored as ended by the caller.
async fn the_genuine_call_ends_whole(h: HandedOff, turns: usize) {
    let report = with_timeout(CALL, "the call", h.handle.join())
        .await
        .expect("runs");
    assert_eq!(report.legs.len(), 2, "{report:?}");
    assert_eq!(
        report.legs[0].closed_by,
        ClosedBy::Relay {
            code: Some(1000),
            reason: "call handed off".to_owned()
        }
    );
    assert_eq!(report.legs[1].closed_by, ClosedBy::Caller);
    let spoken: Vec<usize> = report
        .legs
        .iter()
        .flat_map(|l| l.turns_spoken.iter().copied())
        .collect();
    assert_eq!(spoken, (0..turns).collect::<Vec<_>>());
    let call = h
        .world
        .wait_ended(&h.call_id, Duration::from_secs(10))
        .await;
    assert_eq!(call.end_reason, pb::EndReason::CallerHangup as i32);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_stream_is_refused_on_every_relay_before_and_after_a_hand_off() {
    const TURNS: usize = 12;
    let h = hand_off_a_call("replay", TURNS).await;
    assert_eq!(h.before.3, "relay-e2e-0");
    for (outcome, addr) in h.replays_before.iter().zip(&h.addrs) {
        assert_eq!(
            *outcome,
            closed(4409, "stream credential already used"),
            "replay on {addr}"
        );
    }
    assert_eq!(
        h.sessions_after_replays, h.sessions_before,
        "no model socket"
    );
    assert_ne!(
        param(&h.second, "credential"),
        param(&h.first, "credential"),
        "a new segment, a new credential"
    );
    assert_eq!(h.resumed.3, "relay-e2e-1", "the genuine stream attached");

    // After the hand-off: both captured streams, on both relays.
    let sessions = h.world.fake.connections_accepted();
    for twiml in [&h.first, &h.second] {
        for &addr in &h.addrs {
            assert_eq!(
                probe(
                    &h.world,
                    addr,
                    &h.stream_url,
                    &h.call_sid,
                    &twiml.parameters
                )
                .await,
                closed(4409, "stream credential already used"),
                "replay on {addr}"
            );
        }
    }
    assert_eq!(
        h.world.fake.connections_accepted(),
        sessions,
        "no model socket"
    );
    assert_eq!(
        attach_fields(&h.world.get_call(&h.call_id).await),
        h.resumed
    );
    the_genuine_call_ends_whole(h, TURNS).await;
}

/// An attacker holding a captured voice webhook or action request (body and signature;
/// Twilio's signatures carry no timestamp) replays it while the call is live on its
/// second stream. The action request of the first stream is answered `<Hangup/>` (it
/// speaks for a stream that no longer holds the call); the replayed webhook is answered
/// with a stream, but that stream is refused 4411 at `start` (a first stream of a call
/// that has had one), on either relay, with no model socket and nothing stored changed.
/// The genuine call is not taken over and goes on to its end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_webhook_or_action_request_gets_no_way_into_a_live_call() {
    const TURNS: usize = 12;
    let h = hand_off_a_call("replay-requests", TURNS).await;
    assert_eq!(h.resumed.3, "relay-e2e-1", "the genuine stream attached");
    let first_action = h.first.connect_action.clone().expect("an action URL");
    let second_action = h.second.connect_action.clone().expect("an action URL");
    assert!(
        first_action.contains("?stream=") && !first_action.contains("after="),
        "{first_action}"
    );
    assert!(second_action.contains("&after="), "{second_action}");
    assert_eq!(
        h.second.parameter("takesOver"),
        first_action.split("stream=").nth(1),
        "stream 2 follows stream 1"
    );
    let sessions = h.world.fake.connections_accepted();
    for &addr in &h.addrs {
        // The genuine call's requests: its CallSid, as Twilio signed them.
        let mut cfg = pinned(&h.world, addr);
        cfg.call_sid = h.call_sid.clone();
        let params = cfg.call_params("in-progress");
        let attacker = SimCaller::new(cfg);
        let replayed = with_timeout(
            STEP,
            "replayed action",
            attacker.post_signed(&first_action, &params),
        )
        .await
        .expect("answered");
        let twiml = replayed.twiml.expect("TwiML");
        assert!(twiml.stream_url.is_none() && twiml.hangup, "{twiml:?}");

        let replayed = with_timeout(STEP, "replayed webhook", attacker.webhook())
            .await
            .expect("answered");
        let twiml = replayed.twiml.expect("TwiML");
        let url = twiml
            .stream_url
            .clone()
            .expect("the webhook answers a stream");
        assert_eq!(
            probe(&h.world, addr, &url, &h.call_sid, &twiml.parameters).await,
            closed(4411, "stream superseded"),
            "replayed webhook's stream on {addr}"
        );
    }
    assert_eq!(
        h.world.fake.connections_accepted(),
        sessions,
        "no model socket"
    );
    assert_eq!(
        attach_fields(&h.world.get_call(&h.call_id).await),
        h.resumed
    );
    the_genuine_call_ends_whole(h, TURNS).await;
}

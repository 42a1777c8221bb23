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
use callbridge_testkit::conversation::{AgentReply, Conversation, Turn};
use callbridge_testkit::eventually;
use callbridge_testkit::fake_realtime::FakeRealtime;
use callbridge_testkit::sim_caller::{
    CallerConfig, ClosedBy, LoadBalancer, ProbeOutcome, SimCaller,
};
use callbridge_testkit::twiml::Twiml;
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

fn script(turns: usize) -> Conversation {
    Conversation {
        greeting: Some(AgentReply::says("Hello there", 300)),
        turns: (0..turns)
            .map(|n| {
                Turn::new(
                    format!("Caller line {n}"),
                    300,
                    AgentReply::says(format!("Agent line {n}"), 300),
                )
            })
            .collect(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_stream_is_refused_on_every_relay_before_and_after_a_hand_off() {
    const TURNS: usize = 12;
    let script = script(TURNS);
    let mut world = World::builder(FakeRealtime::builder().script(script.clone()).speed(2.0))
        .relays(2)
        .relay_env("RELAY_DRAIN_GRACE_SECS", "20")
        .start()
        .await;
    world
        .default_agent(agent_settings("replay", Some("Hello there")))
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
    assert_eq!(before.3, "relay-e2e-0");
    let sessions = world.fake.connections_accepted();
    for &addr in &addrs {
        assert_eq!(
            probe(&world, addr, &stream_url, &call_sid, &first.parameters).await,
            closed(4409, "stream credential already used"),
            "replay on {addr}"
        );
    }
    assert_eq!(
        world.fake.connections_accepted(),
        sessions,
        "no model socket"
    );
    assert_eq!(attach_fields(&world.get_call(&call_id).await), before);

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
    assert_ne!(
        param(&second, "credential"),
        param(&first, "credential"),
        "a new segment, a new credential"
    );
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
    assert_eq!(resumed.3, "relay-e2e-1", "the genuine stream attached");

    // After the hand-off: both captured streams, on both relays.
    let sessions = world.fake.connections_accepted();
    for twiml in [&first, &second] {
        for &addr in &addrs {
            assert_eq!(
                probe(&world, addr, &stream_url, &call_sid, &twiml.parameters).await,
                closed(4409, "stream credential already used"),
                "replay on {addr}"
            );
        }
    }
    assert_eq!(
        world.fake.connections_accepted(),
        sessions,
        "no model socket"
    );
    assert_eq!(attach_fields(&world.get_call(&call_id).await), resumed);

    // The genuine call goes on to its end.
    let report = with_timeout(CALL, "the call", handle.join())
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
    assert_eq!(spoken, (0..TURNS).collect::<Vec<_>>());
    let call = world.wait_ended(&call_id, Duration::from_secs(10)).await;
    assert_eq!(call.end_reason, pb::EndReason::CallerHangup as i32);
}

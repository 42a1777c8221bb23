//! End-to-end: who may open a call, and what the caller gets when the model is out of
//! reach. The fake model counts every connection, so "refused before any OpenAI socket
//! was opened" is checked, not assumed.

use std::time::Duration;

use callbridge_proto::pb;
use callbridge_testkit::conversation::Conversation;
use callbridge_testkit::fake_realtime::FakeRealtime;
use callbridge_testkit::sim_caller::{ClosedBy, ProbeOutcome, SimCaller};
use callbridge_tests::{PUBLIC_URL, World, agent_settings, with_timeout};

const CALL: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_signatures_and_unknown_calls_are_refused_without_a_model_socket() {
    let world = World::builder(FakeRealtime::builder()).start().await;
    world.default_agent(agent_settings("refusals", None)).await;

    // Webhook signed with the wrong token, and with no signature at all: 403.
    let mut wrong = world.caller(Conversation::default());
    wrong.wrong_signature = true;
    let exchange = with_timeout(CALL, "webhook", SimCaller::new(wrong.clone()).webhook())
        .await
        .expect("answers");
    assert_eq!(exchange.response.status, 403, "{}", exchange.response.body);
    let mut unsigned = world.caller(Conversation::default());
    unsigned.auth_token = None;
    let exchange = with_timeout(CALL, "webhook", SimCaller::new(unsigned.clone()).webhook())
        .await
        .expect("answers");
    assert_eq!(exchange.response.status, 403, "{}", exchange.response.body);

    // A properly signed stream for a call id nobody admitted: the signature proves only
    // the path, so the upgrade succeeds; without the credential a TwiML answer would have
    // given it, `start` is refused (e2e_stream_credentials.rs has every refusal).
    let good = world.caller(Conversation::default());
    let forged = format!(
        "{}/api/twilio/media-stream/call_does_not_exist",
        PUBLIC_URL.replace("https://", "wss://")
    );
    let refused = with_timeout(
        CALL,
        "stream",
        SimCaller::new(good.clone()).probe_stream(
            &forged,
            &good.call_sid,
            &[("callId".to_owned(), "call_does_not_exist".to_owned())],
        ),
    )
    .await
    .expect("the relay answers");
    assert_eq!(
        refused,
        ProbeOutcome::Closed {
            code: Some(4401),
            reason: "stream credential missing".to_owned()
        }
    );

    // A real, admitted call: its stream with a bad signature or no signature is refused.
    let admitted = with_timeout(CALL, "webhook", SimCaller::new(good.clone()).webhook())
        .await
        .expect("answers");
    assert_eq!(admitted.response.status, 200, "{}", admitted.response.body);
    let stream_url = admitted
        .twiml
        .as_ref()
        .and_then(|t| t.stream_url.clone())
        .expect("a stream url");
    for caller in [&wrong, &unsigned] {
        let mut c = caller.clone();
        c.call_sid = good.call_sid.clone();
        let refused = with_timeout(
            CALL,
            "upgrade",
            SimCaller::new(c).connect_stream(&stream_url),
        )
        .await
        .expect("handshake answered");
        assert_eq!(refused.err(), Some(403));
    }
    // Other paths do not upgrade.
    let other = stream_url.replace("/media-stream/", "/media-streams/");
    let refused = with_timeout(
        CALL,
        "upgrade",
        SimCaller::new(good.clone()).connect_stream(&other),
    )
    .await
    .expect("handshake answered");
    assert_eq!(refused.err(), Some(404));

    assert_eq!(
        world.fake.connections_accepted(),
        0,
        "no model socket for refused streams"
    );
    assert_eq!(world.fake.handshakes_rejected(), 0);

    // A signed call through the front door does reach the model (so the zero above is
    // meaningful).
    let report = {
        let mut again = world.caller(Conversation::default());
        again.tail_ms = 300;
        with_timeout(CALL, "a real call", SimCaller::new(again).run())
            .await
            .expect("runs")
    };
    assert!(report.leg().is_some_and(|l| l.refused_status.is_none()));
    assert!(
        callbridge_testkit::eventually(Duration::from_secs(5), || world
            .fake
            .connections_accepted()
            >= 1)
        .await,
        "a signed stream of an admitted call opens a model session"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_unreachable_sends_the_caller_to_the_fallback() {
    // The model refuses the key: the relay cannot open a session.
    let world = World::builder(FakeRealtime::builder().reject_auth())
        .start()
        .await;
    let mut settings = agent_settings("fallback", Some("Hello"));
    settings.fallback = Some(pb::Fallback {
        action: Some(pb::fallback::Action::Say(pb::Say {
            text: "Sorry, our assistant is unavailable. Please call back later.".to_owned(),
            voice: String::new(),
            language: String::new(),
        })),
        preamble: String::new(),
    });
    world.default_agent(settings).await;

    let mut caller = world.caller(Conversation::default());
    caller.hang_up_at_end = false;
    let report = with_timeout(CALL, "the call", SimCaller::new(caller).run())
        .await
        .expect("runs");
    let leg = report.leg().expect("the stream was accepted");
    assert!(
        matches!(leg.closed_by, ClosedBy::Relay { .. }),
        "the relay ends the stream: {:?}",
        leg.closed_by
    );
    assert!(
        world.fake.handshakes_rejected() >= 1,
        "the relay tried the model"
    );
    let after = report
        .last_after()
        .expect("Twilio fetched the <Connect action>");
    assert!(
        after
            .says
            .iter()
            .any(|s| s.contains("assistant is unavailable")),
        "fallback said: {after:?}"
    );
    let call_id = report
        .webhook
        .twiml
        .as_ref()
        .and_then(|t| t.parameters.iter().find(|(k, _)| k == "callId"))
        .map(|(_, v)| v.clone())
        .expect("callId");
    let call = world.wait_ended(&call_id, Duration::from_secs(10)).await;
    assert_eq!(
        call.end_reason,
        pb::EndReason::ModelUnavailable as i32,
        "{call:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_that_dies_mid_call_sends_the_caller_to_the_fallback() {
    use callbridge_testkit::conversation::{AgentReply, Turn};
    let script = Conversation {
        greeting: Some(AgentReply::says("Hello", 400)),
        turns: (0..5)
            .map(|n| {
                Turn::new(
                    format!("Line {n}"),
                    400,
                    AgentReply::says(format!("Reply {n}"), 400),
                )
            })
            .collect(),
    };
    // The model session closes (code 1011) a little into the call; with reconnects off
    // (RELAY_MODEL_RECONNECT_SECS=0) that ends the call. Reconnects: e2e_resilience.rs.
    let fake = FakeRealtime::builder()
        .script(script.clone())
        .speed(2.0)
        .close_after(Duration::from_millis(1500));
    let world = World::builder(fake)
        .relay_env("RELAY_MODEL_RECONNECT_SECS", "0")
        .start()
        .await;
    let mut settings = agent_settings("dies", Some("Hello"));
    settings.fallback = Some(pb::Fallback {
        action: Some(pb::fallback::Action::DialNumber("+14155550111".to_owned())),
        preamble: "Connecting you to a person.".to_owned(),
    });
    world.default_agent(settings).await;

    let mut caller = world.caller(script);
    caller.hang_up_at_end = false;
    let report = with_timeout(CALL, "the call", SimCaller::new(caller).run())
        .await
        .expect("runs");
    let leg = report.leg().expect("a stream");
    assert!(
        matches!(leg.closed_by, ClosedBy::Relay { .. }),
        "the relay ends the stream: {:?}",
        leg.closed_by
    );
    assert!(
        leg.turns_spoken.len() < 5,
        "cut short: {:?}",
        leg.turns_spoken
    );
    let after = report
        .last_after()
        .expect("Twilio fetched the <Connect action>");
    assert_eq!(
        after.dial_number.as_deref(),
        Some("+14155550111"),
        "{after:?}"
    );
    let call_id = report
        .webhook
        .twiml
        .as_ref()
        .and_then(|t| t.parameters.iter().find(|(k, _)| k == "callId"))
        .map(|(_, v)| v.clone())
        .expect("callId");
    let call = world.wait_ended(&call_id, Duration::from_secs(10)).await;
    assert_eq!(
        call.end_reason,
        pb::EndReason::ModelUnavailable as i32,
        "{call:?}"
    );
    assert_eq!(world.fake.connections_accepted(), 1, "no reconnect storm");
}

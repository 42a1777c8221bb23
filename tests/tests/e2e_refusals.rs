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

/// `series`'s value in a Prometheus exposition (`series` with its labels, as printed).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

async fn scrape(addr: std::net::SocketAddr) -> String {
    callbridge_testkit::http::request(
        addr,
        "GET",
        &addr.to_string(),
        "/metrics",
        &[],
        None,
        Duration::from_secs(10),
    )
    .await
    .unwrap_or_else(|e| panic!("GET /metrics on {addr}: {e}"))
    .body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn during_a_model_outage_new_calls_get_the_fallback_at_once_until_a_probe_gets_through() {
    use callbridge_testkit::conversation::{AgentReply, Turn};
    let script = Conversation {
        greeting: Some(AgentReply::says("Hello", 300)),
        turns: vec![Turn::new(
            "Are you back",
            300,
            AgentReply::says("I am", 300),
        )],
    };
    // The model endpoint is down from the start: every connection is closed unanswered.
    let fake = FakeRealtime::builder()
        .script(script.clone())
        .speed(2.0)
        .refusing();
    let world = World::builder(fake)
        .relay_env("RELAY_MODEL_RECONNECT_SECS", "0")
        .relay_env("RELAY_MODEL_BREAKER_FAILURES", "2")
        .relay_env("RELAY_MODEL_BREAKER_PROBE_MS", "200")
        .start()
        .await;
    let mut settings = agent_settings("outage", Some("Hello"));
    settings.fallback = Some(pb::Fallback {
        action: Some(pb::fallback::Action::DialNumber("+14155550111".to_owned())),
        preamble: "Connecting you to a person.".to_owned(),
    });
    world.default_agent(settings).await;
    let metrics = world.relay_metrics[0];
    let endpoint = format!("{{endpoint=\"{}\"}}", world.fake.url());
    let open_gauge = format!("callbridge_relay_model_breaker_open{endpoint}");

    // The first two calls dial and fail: each stream ends MODEL_UNAVAILABLE and the
    // caller gets the fallback through the <Connect action>.
    for n in 0..2 {
        let mut caller = world.caller(Conversation::default());
        caller.hang_up_at_end = false;
        let report = with_timeout(CALL, "a call in the outage", SimCaller::new(caller).run())
            .await
            .expect("runs");
        let leg = report.leg().expect("a stream");
        assert!(
            matches!(leg.closed_by, ClosedBy::Relay { .. }),
            "call {n}: {:?}",
            leg.closed_by
        );
        let after = report.last_after().expect("the <Connect action>");
        assert_eq!(
            after.dial_number.as_deref(),
            Some("+14155550111"),
            "{after:?}"
        );
    }
    assert!(world.fake.connections_refused() >= 2, "both calls dialled");
    assert_eq!(world.fake.connections_accepted(), 0);
    let text = scrape(metrics).await;
    assert_eq!(sample(&text, &open_gauge), Some(1.0), "{text}");
    assert_eq!(
        sample(
            &text,
            &format!("callbridge_relay_model_breaker_opened_total{endpoint}")
        ),
        Some(1.0),
        "{text}"
    );

    // The breaker is open: the next call's webhook answers the fallback itself, with no
    // stream and so no dial (and no dial timeout to wait out).
    let mut caller = world.caller(Conversation::default());
    caller.hang_up_at_end = false;
    let call_sid = caller.call_sid.clone();
    let report = with_timeout(
        CALL,
        "a call with the breaker open",
        SimCaller::new(caller).run(),
    )
    .await
    .expect("runs");
    let twiml = report.webhook.twiml.as_ref().expect("TwiML");
    assert_eq!(twiml.stream_url, None, "no stream: {twiml:?}");
    assert_eq!(
        twiml.dial_number.as_deref(),
        Some("+14155550111"),
        "{twiml:?}"
    );
    assert!(report.legs.is_empty());
    // Control knows how it ended, as if its stream had ended it.
    let call = world.call_by_sid(&call_sid).await.expect("admitted");
    let call = world
        .wait_ended(&call.call_id, Duration::from_secs(10))
        .await;
    assert_eq!(
        call.end_reason,
        pb::EndReason::ModelUnavailable as i32,
        "{call:?}"
    );
    let text = scrape(metrics).await;
    let webhook_series = format!(
        "callbridge_relay_model_breaker_short_circuits_total{{endpoint=\"{}\",at=\"webhook\"}}",
        world.fake.url()
    );
    assert_eq!(sample(&text, &webhook_series), Some(1.0), "{text}");

    // The model is back: a probe dial gets through and closes the breaker.
    world.fake.set_refusing(false);
    with_timeout(CALL, "a probe closes the breaker", async {
        while sample(&scrape(metrics).await, &open_gauge) != Some(0.0)
            || world.fake.connections_accepted() == 0
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    // Only the probe got through: no call dialled while the breaker was open.
    let probes = world.fake.connections_accepted();
    assert_eq!(probes, 1, "one probe at a time, and it closed the breaker");

    // The next call is streamed and dialled as usual, and the conversation plays.
    let report = with_timeout(
        CALL,
        "a call after the outage",
        SimCaller::new(world.caller(script.clone())).run(),
    )
    .await
    .expect("runs");
    let leg = report.leg().expect("a stream");
    assert_eq!(leg.closed_by, ClosedBy::Caller, "{:?}", leg.closed_by);
    assert_eq!(leg.turns_spoken.len(), script.turns.len(), "{leg:?}");
    assert_eq!(world.fake.connections_accepted(), probes + 1);
}

//! The relay's HTTP handlers through `warp::test` (no relay socket), against a fake
//! control plane on loopback: what each control answer becomes for Twilio. The handler
//! checks that need no control plane are unit tests in `relay/src/http.rs`.

// Test code: a failed unwrap is a failed test, with its location.
#![allow(clippy::unwrap_used)]

mod support;

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use callbridge_proto::pb;
use callbridge_proto::pb::after_response::Next;
use callbridge_relay::config::{Config, Secret};
use callbridge_relay::http::{Deps, routes};
use callbridge_relay::model_breaker::ModelBreakers;
use callbridge_relay::stream_credential::{Segment, StreamCredentials};
use callbridge_relay::{Metrics, call, control, signature};
use support::*;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::Code;

const PUBLIC: &str = "https://relay.example.com";

struct Handlers {
    control: FakeControl,
    deps: Deps,
}

async fn handlers() -> Handlers {
    let control = FakeControl::default();
    control.state.lock().unwrap().agent = agent(pb::AgentSettings::default());
    let addr = start_control(control.clone()).await;
    let mut config = Config::for_tests(PUBLIC, "ws://127.0.0.1:9");
    config.insecure_skip_signature = false;
    config.twilio_auth_token = Some(Secret::new(TWILIO_TOKEN));
    config.control_url = Some(format!("http://{addr}"));
    config.control_token = Some(Secret::new("relay-token-0123456789abcdef-0123456"));
    let config_for_streams = config.clone();
    let deps = Deps {
        call: call::CallDeps {
            breakers: ModelBreakers::from_config(&config, &Metrics::new()),
            control: control::Control::from_config(&config).unwrap(),
            config: Arc::new(config),
            metrics: Metrics::new(),
            relay_id: "relay-test".into(),
            hard_stop: CancellationToken::new(),
            drain: CancellationToken::new(),
            actions_due: callbridge_relay::drain::actions_due(
                std::time::Duration::ZERO,
                CancellationToken::new(),
            )
            .0,
            stream_ends: callbridge_relay::stream_ends::StreamEnds::spawn(),
        },
        draining: Arc::new(AtomicBool::new(false)),
        tracker: TaskTracker::new(),
        streams: Arc::new(StreamCredentials::from_config(&config_for_streams)),
    };
    Handlers { control, deps }
}

/// A signed webhook POST through the routes: status and body.
async fn post(h: &Handlers, path_and_query: &str, form: &[(&str, &str)]) -> (u16, String) {
    let params: Vec<(String, String)> = form
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    let sig = signature::compute(
        &Secret::new(TWILIO_TOKEN),
        &format!("{PUBLIC}{path_and_query}"),
        &params,
    );
    let body = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(&params)
        .finish();
    let r = within(
        path_and_query,
        warp::test::request()
            .method("POST")
            .path(path_and_query)
            .header("content-type", "application/x-www-form-urlencoded")
            .header("x-twilio-signature", sig)
            .body(body)
            .reply(&routes(h.deps.clone())),
    )
    .await;
    (
        r.status().as_u16(),
        String::from_utf8(r.body().to_vec()).unwrap(),
    )
}

/// A signed upgrade request like Twilio's: status and body of the answer.
async fn upgrade(h: &Handlers, path: &str) -> (u16, String) {
    let url = format!("wss://relay.example.com{path}");
    let sig = signature::compute(&Secret::new(TWILIO_TOKEN), &url, &[]);
    let mut pending = http::Request::new(());
    let r = within(
        path,
        warp::test::request()
            .method("GET")
            .path(path)
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-version", "13")
            .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
            .header("x-twilio-signature", sig)
            .extension(warp::hyper::upgrade::on(&mut pending))
            .reply(&routes(h.deps.clone())),
    )
    .await;
    (
        r.status().as_u16(),
        String::from_utf8(r.body().to_vec()).unwrap(),
    )
}

#[tokio::test]
async fn voice_webhook_admits_with_the_form_and_query() {
    let h = handlers().await;
    let form = [
        ("CallSid", "CA9"),
        ("From", "+1 555"),
        ("To", "+1666"),
        ("Direction", "outbound-api"),
        ("AccountSid", "AC1"),
    ];
    let (status, body) = post(&h, "/api/twilio/voice?callId=call_42&x=1", &form).await;
    assert_eq!(status, 200, "{body}");
    // The call's first stream: its action URL names it, and no predecessor.
    let cred = verified_in(&body, Some("call_42"));
    assert_eq!((cred.segment, cred.takes_over), (Segment::First, None));
    assert!(
        body.contains(&format!(
            r#"<Connect action="https://relay.example.com/api/twilio/after/call_42?stream={}" method="POST"><Stream url="wss://relay.example.com/api/twilio/media-stream/call_42"><Parameter name="callId" value="call_42"/><Parameter name="credential" value=""#,
            cred.id
        )),
        "{body}"
    );
    let admit = h.control.state.lock().unwrap().admits[0].clone();
    assert_eq!(admit.call_id, "call_42");
    assert_eq!(admit.twilio_call_sid, "CA9");
    assert_eq!(admit.from, "+1 555");
    assert_eq!(admit.to, "+1666");
    assert_eq!(admit.twilio_direction, "outbound-api");
    assert_eq!(admit.account_sid, "AC1");
}

#[tokio::test]
async fn voice_webhook_maps_every_admit_refusal() {
    let h = handlers().await;
    for (code, status, expect) in [
        (
            Code::NotFound,
            200,
            "not in service. Goodbye.</Say><Hangup/>",
        ),
        (
            Code::FailedPrecondition,
            200,
            "<Response><Hangup/></Response>",
        ),
        (Code::Unavailable, 503, "control plane unavailable\n"),
        (Code::Internal, 503, "control plane unavailable\n"),
        (Code::PermissionDenied, 502, "control plane unavailable\n"),
    ] {
        h.control.state.lock().unwrap().admit_error = Some(code);
        let (got, body) = post(&h, "/api/twilio/voice", &[("CallSid", "CA1")]).await;
        assert_eq!(got, status, "{code:?}: {body}");
        assert!(body.contains(expect), "{code:?}: {body}");
    }
}

/// A stream id control names in a Resume answer.
const PREVIOUS: &str = "0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b";

#[tokio::test]
async fn after_answers_every_next_step() {
    let h = handlers().await;
    let cases = [
        (
            Some(Next::Resume(pb::ResumeNext {
                takes_over_stream_id: PREVIOUS.into(),
            })),
            r#"<Connect action="https://relay.example.com/api/twilio/after/call_1?stream="#,
        ),
        (
            Some(Next::DialNumber("+15550001".into())),
            "<Response><Dial>+15550001</Dial></Response>",
        ),
        (
            Some(Next::Fallback(pb::Fallback {
                action: Some(pb::fallback::Action::ConferenceRoom("room & 1".into())),
                preamble: "One moment".into(),
            })),
            "<Say>One moment</Say><Dial><Conference>room &amp; 1</Conference></Dial>",
        ),
        (
            Some(Next::Hangup(pb::HangupNext {})),
            "<Response><Hangup/></Response>",
        ),
        (None, "<Response><Hangup/></Response>"),
    ];
    for (next, expect) in cases {
        h.control.state.lock().unwrap().after = Some(pb::AfterResponse { next: next.clone() });
        let (status, body) = post(&h, "/api/twilio/after/call_1", &[("CallSid", "CA1")]).await;
        assert_eq!(status, 200, "{next:?}: {body}");
        assert!(body.contains(expect), "{next:?}: {body}");
        if matches!(next, Some(Next::Resume(_))) {
            // The hand-off's stream is a new segment with a credential of its own, bound
            // to the stream control named; its action URL names both.
            let cred = verified_in(&body, Some("call_1"));
            assert_eq!(cred.segment, Segment::Resume);
            assert_eq!(cred.takes_over.as_deref(), Some(PREVIOUS));
            let action = format!(
                "after/call_1?stream={}&amp;after={PREVIOUS}\" method=\"POST\"><Stream url=\"wss://relay.example.com/api/twilio/media-stream/call_1\">",
                cred.id
            );
            assert!(body.contains(&action), "{body}");
        }
    }
    // The relay passes on which stream each action request speaks for: none in a URL of
    // an older relay, the URL's `stream` and `after` otherwise; a malformed id is 400.
    let asked = std::mem::take(&mut h.control.state.lock().unwrap().after_asked);
    assert!(
        asked.iter().all(|a| a.call_id == "call_1"
            && a.stream_id.is_empty()
            && a.after_stream_id.is_empty()),
        "{asked:?}"
    );
    let named = format!(
        "/api/twilio/after/call_1?stream={}&after={PREVIOUS}",
        "0a".repeat(16)
    );
    let (status, _) = post(&h, &named, &[("CallSid", "CA1")]).await;
    assert_eq!(status, 200);
    let asked = std::mem::take(&mut h.control.state.lock().unwrap().after_asked);
    assert_eq!(
        (
            asked[0].stream_id.as_str(),
            asked[0].after_stream_id.as_str()
        ),
        ("0a".repeat(16).as_str(), PREVIOUS)
    );
    for bad in [
        "/api/twilio/after/call_1?stream=xyz",
        "/api/twilio/after/call_1?stream=0A0A0A0A0A0A0A0A0A0A0A0A0A0A0A0A",
        "/api/twilio/after/call_1?after=0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b",
    ] {
        let (status, body) = post(&h, bad, &[("CallSid", "CA1")]).await;
        assert_eq!(status, 400, "{bad}: {body}");
    }
    assert!(
        h.control.state.lock().unwrap().after_asked.is_empty(),
        "a 400 asks nothing"
    );
    // An unknown call hangs up; a failing control plane still gives the caller words.
    h.control.state.lock().unwrap().after_error = Some(Code::NotFound);
    let (_, body) = post(&h, "/api/twilio/after/call_1", &[]).await;
    assert!(body.ends_with("<Response><Hangup/></Response>"), "{body}");
    h.control.state.lock().unwrap().after_error = Some(Code::Internal);
    let (status, body) = post(&h, "/api/twilio/after/call_1", &[]).await;
    assert_eq!(status, 200);
    assert!(body.contains("<Say>Sorry, our assistant"), "{body}");
}

#[tokio::test]
async fn stream_upgrades_attach_nothing_before_start() {
    // The upgrade proves only its path (the signature is the same for every stream to
    // it): control is asked nothing until `start` brings a credential. The refusals at
    // `start` are in call_flow.rs (they need a socket).
    let h = handlers().await;
    h.control.state.lock().unwrap().attach_error = Some(Code::NotFound);
    let (status, _) = upgrade(&h, "/api/twilio/media-stream/call_1").await;
    assert_eq!(status, 101);
    assert!(h.control.state.lock().unwrap().opens.is_empty());
    // With a control plane the standalone stream does not exist.
    assert_eq!(
        upgrade(&h, "/api/twilio/media-stream-simple").await,
        (404, "not found\n".to_owned())
    );
}

//! End-to-end: a draining relay finishes what it started (issue 14 item 2, issue 17 item 3).
//!
//! After SIGTERM the relay keeps answering webhooks and action requests (TwiML only),
//! refuses new streams and turns `/readyz` off; once its calls are over it waits for
//! Twilio's action requests of the calls it ended (answered here, or a bound), then stops
//! accepting, answers the requests in flight and exits. The fallback route answers from
//! relay config with control down.
//!
//! Real relay and control binaries, real redis-server; Twilio is the simulated caller and
//! hand-written HTTP requests signed like Twilio's, over loopback sockets.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use callbridge_testkit::eventually;
use callbridge_testkit::fake_realtime::FakeRealtime;
use callbridge_testkit::http::{self, HttpResponse, form_body};
use callbridge_testkit::signature::twilio_signature;
use callbridge_testkit::sim_caller::{CallerConfig, ClosedBy, LoadBalancer, SimCaller};
use callbridge_testkit::twiml::Twiml;
use callbridge_tests::stored_turns::numbered_script;
use callbridge_tests::{PUBLIC_URL, TWILIO_TOKEN, World, agent_settings, with_timeout};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const CALL: Duration = Duration::from_secs(90);
const IO: Duration = Duration::from_secs(10);
const HOST: &str = "relay.callbridge.test";

fn params(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// A form POST to `relay` as Twilio sends it: signed over the public URL of `path` when
/// `signed`, one request per connection.
async fn post(
    relay: SocketAddr,
    path: &str,
    form: &[(String, String)],
    signed: bool,
) -> HttpResponse {
    let mut headers = Vec::new();
    if signed {
        let sig = twilio_signature(TWILIO_TOKEN, &format!("{PUBLIC_URL}{path}"), form);
        headers.push(("X-Twilio-Signature".to_owned(), sig));
    }
    http::request(
        relay,
        "POST",
        HOST,
        path,
        &headers,
        Some(("application/x-www-form-urlencoded", form_body(form))),
        IO,
    )
    .await
    .unwrap_or_else(|e| panic!("POST {path}: {e}"))
}

async fn get(relay: SocketAddr, path: &str) -> u16 {
    http::request(relay, "GET", HOST, path, &[], None, IO)
        .await
        .unwrap_or_else(|e| panic!("GET {path}: {e}"))
        .status
}

/// A 200 with TwiML that parses.
fn twiml(r: &HttpResponse, what: &str) -> Twiml {
    assert_eq!(r.status, 200, "{what}: {}", r.body);
    assert_eq!(
        r.header("content-type"),
        Some("application/xml"),
        "{what}: TwiML"
    );
    Twiml::parse(&r.body).unwrap_or_else(|e| panic!("{what}: TwiML parses ({e}): {}", r.body))
}

/// A signed POST whose head and first half of the body are sent now; [`Self::finish`]
/// sends the rest and reads the whole answer (Twilio on a slow link).
struct HeldRequest {
    socket: TcpStream,
    rest: Vec<u8>,
}

impl HeldRequest {
    async fn start(relay: SocketAddr, path: &str, form: &[(String, String)]) -> Self {
        let sig = twilio_signature(TWILIO_TOKEN, &format!("{PUBLIC_URL}{path}"), form);
        let body = form_body(form).into_bytes();
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: {HOST}\r\nX-Twilio-Signature: {sig}\r\n\
             Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        let mut socket = with_timeout(IO, "connect", TcpStream::connect(relay))
            .await
            .expect("the relay accepts");
        let (first, rest) = body.split_at(body.len() / 2);
        socket
            .write_all(head.as_bytes())
            .await
            .expect("head written");
        socket
            .write_all(first)
            .await
            .expect("half the body written");
        Self {
            socket,
            rest: rest.to_vec(),
        }
    }

    async fn finish(mut self) -> HttpResponse {
        self.socket
            .write_all(&self.rest)
            .await
            .expect("the rest of the body written");
        let mut raw = Vec::new();
        with_timeout(IO, "the held answer", self.socket.read_to_end(&mut raw))
            .await
            .expect("read to the close");
        let text = String::from_utf8_lossy(&raw).into_owned();
        let (head, body) = text
            .split_once("\r\n\r\n")
            .unwrap_or_else(|| panic!("a whole answer, got {text:?}"));
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("status line in {head:?}"));
        let headers = head
            .lines()
            .skip(1)
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        HttpResponse {
            status,
            headers,
            body: body.to_owned(),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_relay_answers_every_request_it_took_then_exits() {
    let mut world = World::builder(
        FakeRealtime::builder()
            .script(numbered_script(30))
            .speed(2.0),
    )
    // A second relay, ready: a draining relay hands calls off only when control knows
    // one (a lone relay keeps them: e2e_heartbeat.rs). Every request here goes to
    // relay 0.
    .relays(2)
    // Long enough that only an answered action request, never the bound, ends the
    // drain in this test.
    .relay_env("RELAY_DRAIN_ACTION_WAIT_SECS", "60")
    .relay_env("RELAY_DRAIN_GRACE_SECS", "30")
    .start()
    .await;
    let agent = world
        .default_agent(agent_settings("drain", Some("Hello there")))
        .await;
    let relay = world.relays[0].addr;
    // A live call. This Twilio is slow to ask the action URL: the test asks it instead,
    // once it has looked at the drain.
    let mut cfg: CallerConfig = world.caller(numbered_script(30));
    cfg.relays = LoadBalancer::new(vec![relay]);
    cfg.after_delay = Duration::from_secs(600);
    cfg.answer_wait = Duration::from_secs(5);
    let twilio = cfg.clone();
    let caller = SimCaller::new(cfg).start();
    assert!(
        eventually(CALL, || caller.live.turns_spoken.load(Ordering::SeqCst)
            >= 1)
        .await,
        "the call is going"
    );
    // Its action URL as its TwiML wrote it (it names the stream), as a path.
    let call_action = caller
        .live
        .stream_twiml(0)
        .and_then(|t| t.connect_action)
        .expect("the call's <Connect action>");
    let call_action = call_action
        .strip_prefix(PUBLIC_URL)
        .expect("the action URL is on the public URL")
        .to_owned();
    // Another call of control's, never streamed: the probe requests' subject.
    let probe = world.create_call(&agent, "+14155550123").await;
    let probe_after = format!("/api/twilio/after/{probe}");
    let twilio_form = params(&[
        ("AccountSid", "AC00000000000000000000000000000001"),
        ("CallSid", "CA0000000000000000000000000000dr01"),
        ("CallStatus", "in-progress"),
    ]);

    // An action request in flight (head and half its body) when SIGTERM comes ...
    let held = HeldRequest::start(relay, &probe_after, &twilio_form).await;
    world.relays[0].terminate().expect("SIGTERM");
    // ... and one sent at that moment.
    let r = post(relay, &probe_after, &twilio_form, true).await;
    assert!(twiml(&r, "action request at SIGTERM").hangup, "{}", r.body);

    // Draining: readiness off, a new stream refused, webhooks and actions answered.
    assert_eq!(get(relay, "/readyz").await, 503, "/readyz while draining");
    assert_eq!(get(relay, "/healthz").await, 200, "/healthz while draining");
    let mut new_caller = world.caller(numbered_script(1));
    new_caller.relays = LoadBalancer::new(vec![relay]);
    let r = post(
        relay,
        "/api/twilio/voice",
        &new_caller.call_params("ringing"),
        true,
    )
    .await;
    assert_eq!(
        r.header("connection"),
        Some("close"),
        "answers close their connection while draining"
    );
    let voice = twiml(&r, "voice webhook while draining");
    let stream_url = voice.stream_url.clone().expect("a stream to open");
    assert!(
        voice.parameter("callId").is_some() && voice.connect_action.is_some(),
        "{voice:?}"
    );
    let r = post(relay, &probe_after, &twilio_form, true).await;
    assert!(twiml(&r, "action while draining").hangup);
    let refused = SimCaller::new(new_caller)
        .connect_stream(&stream_url)
        .await
        .expect("the relay answers the upgrade");
    assert_eq!(
        refused.err(),
        Some(503),
        "a new stream is refused while draining"
    );

    // The live call is handed off at a quiet moment; the relay waits for its action request.
    assert!(
        eventually(CALL, || caller.live.streaming.load(Ordering::SeqCst) == 0).await,
        "the call's stream is handed off"
    );
    assert_eq!(get(relay, "/healthz").await, 200, "still listening");
    let action = post(
        relay,
        &call_action,
        &twilio.call_params("in-progress"),
        true,
    )
    .await;
    let action = twiml(&action, "the handed-off call's action request");
    assert!(
        action.stream_url.is_some(),
        "the handed-off call resumes on a new stream: {action:?}"
    );

    // That was the last thing owed: the listener closes, the request in flight is still
    // answered whole, and the relay exits by itself.
    assert!(
        eventually(Duration::from_secs(20), || std::net::TcpStream::connect(
            relay
        )
        .is_err())
        .await,
        "the relay stops accepting once the action request was answered"
    );
    let r = held.finish().await;
    assert!(
        twiml(&r, "the action request in flight").hangup,
        "{}",
        r.body
    );
    let status = with_timeout(
        Duration::from_secs(30),
        "relay exit",
        world.relays[0].wait_exit(Duration::from_secs(25)),
    )
    .await
    .expect("the relay exits after the drain");
    assert!(status.success(), "{status}");
    // The caller still sleeps before its own action request; the test ends it.
    drop(caller);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_handed_to_another_relay_ends_the_wait_after_the_bound() {
    let mut world = World::builder(
        FakeRealtime::builder()
            .script(numbered_script(8))
            .speed(2.0),
    )
    .relays(2)
    .relay_env("RELAY_DRAIN_ACTION_WAIT_SECS", "2")
    .relay_env("RELAY_LOG_FORMAT", "json")
    .start()
    .await;
    world
        .default_agent(agent_settings("drain-elsewhere", Some("Hello there")))
        .await;
    // The call starts on relay 0.
    let lb = LoadBalancer::new(world.relay_addrs());
    lb.set_in_rotation(world.relays[1].addr, false);
    let mut cfg = world.caller(numbered_script(8));
    cfg.relays = lb.clone();
    cfg.follow_streams = 2;
    cfg.answer_wait = Duration::from_secs(5);
    let caller = SimCaller::new(cfg).start();
    assert!(
        eventually(CALL, || caller.live.turns_spoken.load(Ordering::SeqCst)
            >= 1)
        .await,
        "the call is going"
    );
    // A rollout: SIGTERM, and the balancer sends everything to relay 1 from now on.
    world.relays[0].terminate().expect("SIGTERM");
    lb.set_in_rotation(world.relays[1].addr, true);
    lb.set_in_rotation(world.relays[0].addr, false);
    let report = with_timeout(CALL, "the call", caller.join())
        .await
        .expect("the call runs");
    assert_eq!(report.legs.len(), 2, "handed off once: {:?}", report.legs);
    assert_eq!(
        report.legs[0].closed_by,
        ClosedBy::Relay {
            code: Some(1000),
            reason: "call handed off".to_owned()
        }
    );
    assert_eq!(report.legs[1].closed_by, ClosedBy::Caller);
    assert_eq!(report.after.len(), 1);
    assert!(
        twiml(&report.after[0].response, "action on relay 1")
            .stream_url
            .is_some()
    );
    // Relay 0 never saw that action request: it gives up on it and exits by itself.
    let status = with_timeout(
        Duration::from_secs(30),
        "relay exit",
        world.relays[0].wait_exit(Duration::from_secs(25)),
    )
    .await
    .expect("the relay exits once the bound passed");
    assert!(status.success(), "{status}");
    let log = world.relays[0].log_text();
    assert!(
        log.contains("\"elsewhere\":1"),
        "the relay says the action request went elsewhere: {log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fallback_route_answers_with_control_down() {
    let mut world = World::builder(FakeRealtime::builder())
        .relay_env("RELAY_FALLBACK_DIAL", "+14155550111")
        .start()
        .await;
    world.control.kill();
    let relay = world.relays[0].addr;
    let form = params(&[
        ("AccountSid", "AC00000000000000000000000000000001"),
        ("CallSid", "CA0000000000000000000000000000fb01"),
        ("From", "+14155550100"),
        ("To", "+14155550199"),
        ("ErrorCode", "11200"),
        ("ErrorUrl", &format!("{PUBLIC_URL}/api/twilio/voice")),
    ]);
    // Control is down: the voice webhook fails, which is when Twilio asks the fallback URL.
    let voice = post(relay, "/api/twilio/voice", &form, true).await;
    assert_eq!(voice.status, 503, "{}", voice.body);
    let r = post(relay, "/api/twilio/fallback", &form, true).await;
    let t = twiml(&r, "fallback");
    assert_eq!(t.dial_number.as_deref(), Some("+14155550111"), "{}", r.body);
    assert_eq!(t.says.len(), 1, "an apology first: {}", r.body);
    let r = post(relay, "/api/twilio/fallback", &form, false).await;
    assert_eq!(
        (r.status, r.body.as_str()),
        (403, "invalid X-Twilio-Signature\n")
    );
}

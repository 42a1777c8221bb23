//! End-to-end: the standalone relay (no `CONTROL_URL`, the agent from `AGENT_*`) answers
//! its streams' `<Connect action>` like control answers a stored call's: a model that
//! stays away → the apology and the `RELAY_FALLBACK_DIAL` dial; the agent hanging up →
//! `<Hangup/>`, no second stream; the relay carrying the stream killed → a fresh stream
//! from the other relay; a forged `leg` → 403.
//!
//! Real relay binaries, no control and no Redis (standalone needs neither); the model is
//! the fake and Twilio the simulated caller.

use std::net::SocketAddr;
use std::time::Duration;

use callbridge_relay::twilio_fallback::CONNECTING;
use callbridge_testkit::conversation::{AgentReply, Conversation, Turn};
use callbridge_testkit::fake_realtime::{FakeRealtime, FakeRealtimeBuilder};
use callbridge_testkit::procs::{Proc, free_addr};
use callbridge_testkit::signature::twilio_signature;
use callbridge_testkit::sim_caller::{CallerConfig, ClosedBy, LoadBalancer, SimCaller};
use callbridge_testkit::{eventually, http};
use callbridge_tests::{
    OPENAI_KEY, PUBLIC_URL, READY, RPC, TWILIO_TOKEN, metrics_text, sample, with_timeout,
};

const CALL: Duration = Duration::from_secs(60);
const FALLBACK_NUMBER: &str = "+14155550111";

/// Standalone relays behind one public URL, and the fake model they dial.
struct Standalone {
    relays: Vec<Proc>,
    metrics: Vec<SocketAddr>,
    fake: FakeRealtime,
}

impl Standalone {
    async fn start(fake: FakeRealtimeBuilder, relays: usize, env: &[(&str, &str)]) -> Self {
        let fake = fake.start().await.expect("fake realtime starts");
        let mut procs = Vec::new();
        let mut metrics = Vec::new();
        for n in 0..relays {
            let addr = free_addr().expect("a free port");
            let metrics_addr = free_addr().expect("a free port");
            let mut vars: Vec<(String, String)> = [
                ("RELAY_LISTEN", addr.to_string()),
                ("RELAY_METRICS_ADDR", metrics_addr.to_string()),
                ("RELAY_PUBLIC_URL", PUBLIC_URL.to_owned()),
                ("OPENAI_API_KEY", OPENAI_KEY.to_owned()),
                ("OPENAI_REALTIME_URL", fake.url()),
                ("TWILIO_AUTH_TOKEN", TWILIO_TOKEN.to_owned()),
                ("RELAY_ID", format!("relay-standalone-{n}")),
                ("RELAY_LOG", "info".to_owned()),
                ("AGENT_GREETING", "Hello there".to_owned()),
                ("RELAY_FALLBACK_DIAL", FALLBACK_NUMBER.to_owned()),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect();
            vars.extend(env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
            let mut relay = Proc::spawn("callbridge-relay", vars, addr).expect("relay spawns");
            relay
                .wait_http_ok("/healthz", READY)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            procs.push(relay);
            metrics.push(metrics_addr);
        }
        Self {
            relays: procs,
            metrics,
            fake,
        }
    }

    fn caller(&self, script: Conversation) -> CallerConfig {
        let mut cfg = CallerConfig::new(PUBLIC_URL, self.relays[0].addr, Some(TWILIO_TOKEN));
        cfg.relays = LoadBalancer::new(self.relays.iter().map(|r| r.addr).collect());
        cfg.script = script;
        cfg
    }

    /// The fake refused no client event of the relay's.
    fn assert_no_model_errors(&self) {
        for (n, c) in self.fake.connections().iter().enumerate() {
            assert!(c.refusals.is_empty(), "connection {n}: {:?}", c.refusals);
        }
    }
}

fn script(turns: usize) -> Conversation {
    Conversation {
        greeting: Some(AgentReply::says("Hello there", 400)),
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

/// Waits (bounded) until relay metrics at `addr` show `series` at `value` (a call's end is
/// counted once the relay finished it, a moment after the caller saw the close).
async fn wait_sample(addr: SocketAddr, series: &str, value: f64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = metrics_text(addr).await;
        if sample(&text, series) == Some(value) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{series} is not {value} in {text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `leg=` of a standalone action URL.
fn leg_of(action: &str) -> Option<&str> {
    action
        .split_once('?')?
        .1
        .split('&')
        .find_map(|p| p.strip_prefix("leg="))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_that_stays_away_gets_the_apology_and_the_fallback_dial() {
    let script = script(4);
    // Every session dies shortly after it opens: the model never works again.
    let fake = FakeRealtime::builder()
        .script(script.clone())
        .speed(2.0)
        .close_after(Duration::from_millis(1500));
    let world = Standalone::start(fake, 1, &[("RELAY_MODEL_RECONNECT_SECS", "2")]).await;
    let mut cfg = world.caller(script);
    cfg.hang_up_at_end = false;
    cfg.answer_wait = Duration::from_secs(2);
    cfg.follow_streams = 2;
    let report = with_timeout(CALL, "the call", SimCaller::new(cfg).run())
        .await
        .expect("runs");
    let action = report
        .webhook
        .twiml
        .as_ref()
        .and_then(|t| t.connect_action.clone())
        .expect("the webhook's <Connect> has an action");
    assert!(
        action.starts_with(&format!("{PUBLIC_URL}/api/twilio/after-simple?stream=")),
        "{action}"
    );
    assert_eq!(leg_of(&action), Some("1"), "{action}");
    assert_eq!(report.legs.len(), 1, "no second stream");
    assert_eq!(
        report.legs[0].closed_by,
        ClosedBy::Relay {
            code: Some(1000),
            reason: "call ended".to_owned()
        }
    );
    assert_eq!(report.after.len(), 1);
    let after = report.last_after().expect("the action answered TwiML");
    assert_eq!(after.says, [CONNECTING], "{after:?}");
    assert_eq!(after.dial_number.as_deref(), Some(FALLBACK_NUMBER));
    assert!(after.stream_url.is_none(), "{after:?}");
    wait_sample(
        world.metrics[0],
        "callbridge_relay_calls_total{reason=\"model_unavailable\"}",
        1.0,
    )
    .await;
    world.assert_no_model_errors();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_hangs_up_gets_a_hang_up_and_no_second_stream() {
    let mut script = script(2);
    script.turns[1].agent = AgentReply::says("Goodbye", 300).then_calls("end_call", "{}");
    let fake = FakeRealtime::builder().script(script.clone()).speed(2.0);
    let world = Standalone::start(fake, 1, &[("AGENT_END_CALL", "true")]).await;
    let mut cfg = world.caller(script);
    cfg.hang_up_at_end = false;
    // Were another stream offered, the caller would follow it.
    cfg.follow_streams = 2;
    cfg.max_call = Duration::from_secs(15);
    let report = with_timeout(CALL, "the call", SimCaller::new(cfg).run())
        .await
        .expect("runs");
    assert_eq!(report.legs.len(), 1, "no second stream");
    let leg = &report.legs[0];
    assert_eq!(leg.turns_spoken, [0, 1]);
    assert!(
        matches!(
            leg.closed_by,
            ClosedBy::Relay {
                code: Some(1000),
                ..
            }
        ),
        "{:?}",
        leg.closed_by
    );
    assert_eq!(report.after.len(), 1);
    let after = report.last_after().expect("the action answered TwiML");
    assert!(after.hangup, "{after:?}");
    assert_eq!(after.elements, ["Response", "Hangup"], "{after:?}");
    wait_sample(
        world.metrics[0],
        "callbridge_relay_calls_total{reason=\"agent_hangup\"}",
        1.0,
    )
    .await;
    world.assert_no_model_errors();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_relay_s_call_gets_a_fresh_stream_from_the_other() {
    const TURNS: usize = 8;
    let script = script(TURNS);
    let fake = FakeRealtime::builder().script(script.clone()).speed(2.0);
    let mut world = Standalone::start(fake, 2, &[]).await;
    let mut cfg = world.caller(script);
    // The socket drops without a close frame; Twilio then asks the action URL.
    cfg.assume_action_after_abnormal_close();
    cfg.after_delay = Duration::from_millis(300);
    cfg.follow_streams = 2;
    let lb = cfg.relays.clone();
    let handle = SimCaller::new(cfg).start();
    let live = handle.live.clone();
    assert!(
        eventually(Duration::from_secs(30), || {
            live.turns_spoken.load(std::sync::atomic::Ordering::SeqCst) >= 2
        })
        .await,
        "two turns spoken"
    );
    // Kill the relay that carries the stream (after the balancer took it out).
    let mut carrier = None;
    for (i, addr) in world.metrics.iter().enumerate() {
        let text = metrics_text(*addr).await;
        if sample(&text, "callbridge_relay_active_calls") == Some(1.0) {
            carrier = Some(i);
        }
    }
    let carrier = carrier.expect("a relay carries the call");
    lb.set_in_rotation(world.relays[carrier].addr, false);
    world.relays[carrier].kill();

    let report = with_timeout(CALL, "the call", handle.join())
        .await
        .expect("runs");
    assert_eq!(report.legs.len(), 2, "{:?}", report.after);
    assert!(
        report.legs[0].closed_by.is_abnormal(),
        "{:?}",
        report.legs[0].closed_by
    );
    assert_eq!(report.legs[1].closed_by, ClosedBy::Caller);
    let fresh = report.after[0].twiml.as_ref().expect("TwiML");
    let action = fresh.connect_action.as_deref().expect("an action again");
    assert_eq!(leg_of(action), Some("2"), "{action}");
    // The script goes on to its end on the fresh stream.
    let spoken: Vec<usize> = report
        .legs
        .iter()
        .flat_map(|l| l.turns_spoken.iter().copied())
        .collect();
    assert_eq!(spoken.last(), Some(&(TURNS - 1)), "{spoken:?}");
    let survivor = 1 - carrier;
    wait_sample(
        world.metrics[survivor],
        "callbridge_relay_calls_total{reason=\"caller_hangup\"}",
        1.0,
    )
    .await;
    world.assert_no_model_errors();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_or_unsigned_leg_is_refused() {
    let world = Standalone::start(FakeRealtime::builder(), 1, &[]).await;
    let caller = SimCaller::new(world.caller(Conversation::default()));
    let webhook = with_timeout(RPC, "webhook", caller.webhook())
        .await
        .expect("answers");
    let action = webhook
        .twiml
        .as_ref()
        .and_then(|t| t.connect_action.clone())
        .expect("an action URL");
    let path = action.strip_prefix(PUBLIC_URL).expect("on the public URL");
    let params = caller.cfg.call_params("in-progress");
    let host = PUBLIC_URL.trim_start_matches("https://");
    let post = |path: String, sig: Option<String>| {
        let headers: Vec<(String, String)> = sig
            .map(|s| vec![("X-Twilio-Signature".to_owned(), s)])
            .unwrap_or_default();
        let body = http::form_body(&params);
        let addr = world.relays[0].addr;
        async move {
            http::request(
                addr,
                "POST",
                host,
                &path,
                &headers,
                Some(("application/x-www-form-urlencoded", body)),
                RPC,
            )
            .await
            .expect("answers")
        }
    };
    // The signature of the URL Twilio was given, on a URL asking for the last leg.
    let signed = twilio_signature(TWILIO_TOKEN, &action, &params);
    let forged = path.replace("leg=1", "leg=3");
    assert_ne!(forged, path);
    let r = post(forged.clone(), Some(signed.clone())).await;
    assert_eq!(
        (r.status, r.body.as_str()),
        (403, "invalid X-Twilio-Signature\n")
    );
    let r = post(forged, None).await;
    assert_eq!(r.status, 403);
    // The URL as given, signed: answered (no stream ended: a fresh one, leg 2).
    let r = post(path.to_owned(), Some(signed)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.body.contains("leg=2"), "{}", r.body);
    let text = metrics_text(world.metrics[0]).await;
    for reason in ["invalid", "missing"] {
        let series = format!(
            "callbridge_relay_signature_refusals_total{{route=\"action_simple\",reason=\"{reason}\"}}"
        );
        assert_eq!(sample(&text, &series), Some(1.0), "{series} in {text}");
    }
}

//! End-to-end: control dials through the fake Twilio REST API (every request validated
//! against Twilio's spec), the fake posts signed status callbacks to the real relay, which
//! forwards them to control; answered calls reach the relay's webhook and stream with the
//! simulated caller. Real control, relay and redis-server; fake Realtime.

use std::time::Duration;

use callbridge_proto::pb;
use callbridge_testkit::conversation::Conversation;
use callbridge_testkit::fake_realtime::FakeRealtime;
use callbridge_testkit::fake_twilio_rest::{FakeTwilio, FakeTwilioConfig, Lifecycle, RelayTarget};
use callbridge_testkit::sim_caller::LoadBalancer;
use callbridge_tests::{
    PUBLIC_URL, TWILIO_TOKEN, World, agent_settings, expected_transcript, flatten, with_timeout,
};

const ACCOUNT: &str = "AC00000000000000000000000000000e2e";
const LIMIT: Duration = Duration::from_secs(60);

struct Dialing {
    world: World,
    twilio: FakeTwilio,
    agent: String,
}

async fn dialing(script: &Conversation) -> Dialing {
    let twilio = FakeTwilio::start(FakeTwilioConfig::new(ACCOUNT, TWILIO_TOKEN))
        .await
        .expect("fake twilio starts");
    let world = World::builder(FakeRealtime::builder().script(script.clone()).speed(4.0))
        .control_env("TWILIO_ACCOUNT_SID", ACCOUNT)
        .control_env("TWILIO_AUTH_TOKEN", TWILIO_TOKEN)
        .control_env("TWILIO_API_BASE_URL", &twilio.base_url())
        .start()
        .await;
    twilio.set_relay(RelayTarget {
        public_base: PUBLIC_URL.to_owned(),
        relays: LoadBalancer::new(world.relay_addrs()),
        after_on_abnormal_close: false,
    });
    let greeting = script.greeting.as_ref().map(|g| g.text.as_str());
    let agent = world
        .create_agent("dialer", agent_settings("dialer", greeting))
        .await;
    Dialing {
        world,
        twilio,
        agent,
    }
}

impl Dialing {
    async fn dial(&self, to: &str, dial: pb::DialOptions) -> pb::Call {
        with_timeout(
            LIMIT,
            "CreateCall with dial",
            self.world.calls().create_call(pb::CreateCallRequest {
                agent_id: self.agent.clone(),
                from: "+14155550100".to_owned(),
                to: to.to_owned(),
                dial: Some(dial),
                ..Default::default()
            }),
        )
        .await
        .expect("CreateCall succeeds")
        .into_inner()
        .call
        .expect("a call")
    }
}

fn status(call: &pb::Call) -> pb::CallStatus {
    pb::CallStatus::try_from(call.status).unwrap_or_default()
}

fn reason(call: &pb::Call) -> pb::EndReason {
    pb::EndReason::try_from(call.end_reason).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dialled_calls_follow_twilio_to_their_outcome() {
    let script = Conversation::sample();
    let d = dialing(&script).await;
    d.twilio.script(
        "+14155550001",
        Lifecycle::Answer {
            ring_ms: 100,
            script: script.clone(),
        },
    );
    d.twilio
        .script("+14155550002", Lifecycle::Busy { ring_ms: 50 });
    d.twilio.script("+14155550003", Lifecycle::NoAnswer);
    d.twilio
        .script("+14155550004", Lifecycle::Busy { ring_ms: 50 });
    d.twilio.scramble_callbacks("+14155550004");
    d.twilio.script(
        "+15005550001",
        Lifecycle::Reject {
            status: 400,
            code: 21211,
            message: "The 'To' number +15005550001 is not a valid phone number.".into(),
        },
    );
    let options = pb::DialOptions {
        timeout_secs: 20,
        time_limit_secs: 600,
        ..Default::default()
    };

    // Twilio refuses: the call is a final FAILED with Twilio's code and message.
    let refused = d.dial("+15005550001", options.clone()).await;
    assert_eq!(status(&refused), pb::CallStatus::Failed);
    assert_eq!(reason(&refused), pb::EndReason::DialFailed);
    assert_eq!(refused.twilio_error_code, 21211);
    assert!(
        refused
            .twilio_error_message
            .contains("not a valid phone number")
    );
    assert!(refused.twilio_call_sid.is_empty());

    // Two 429s first: control backs off and the create goes through.
    d.twilio.fail_next(2, 429, 20429);
    let answered = d.dial("+14155550001", options.clone()).await;
    assert!(answered.dialed);
    assert!(answered.twilio_call_sid.starts_with("CA"), "{answered:?}");
    let busy = d.dial("+14155550002", options.clone()).await;
    let unanswered = d.dial("+14155550003", options.clone()).await;
    let scrambled = d.dial("+14155550004", options.clone()).await;

    let answered = d.world.wait_ended(&answered.call_id, LIMIT).await;
    assert_eq!(status(&answered), pb::CallStatus::Completed, "{answered:?}");
    assert_eq!(reason(&answered), pb::EndReason::CallerHangup);
    let transcript = d.world.transcript(&answered.call_id).await;
    assert_eq!(flatten(&transcript), expected_transcript(&script));
    // Twilio's `completed` callback may trail the stream's end.
    let answered = {
        let deadline = tokio::time::Instant::now() + LIMIT;
        loop {
            let call = d.world.get_call(&answered.call_id).await;
            if call.twilio_status == "completed" || tokio::time::Instant::now() > deadline {
                break call;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    assert_eq!(answered.twilio_status, "completed");

    let busy = d.world.wait_ended(&busy.call_id, LIMIT).await;
    assert_eq!(status(&busy), pb::CallStatus::Busy, "{busy:?}");
    assert_eq!(reason(&busy), pb::EndReason::DialBusy);
    assert_eq!(busy.twilio_status, "busy");
    assert!(busy.end_detail.contains("SIP 486"), "{}", busy.end_detail);

    let unanswered = d.world.wait_ended(&unanswered.call_id, LIMIT).await;
    assert_eq!(
        status(&unanswered),
        pb::CallStatus::NoAnswer,
        "{unanswered:?}"
    );
    assert_eq!(reason(&unanswered), pb::EndReason::DialNoAnswer);

    // Callbacks newest first: `busy`, then the stale `ringing` and `initiated`, which
    // must not move the status back.
    let scrambled = d.world.wait_ended(&scrambled.call_id, LIMIT).await;
    assert_eq!(status(&scrambled), pb::CallStatus::Busy);
    let sid = scrambled.twilio_call_sid.clone();
    assert!(
        d.twilio
            .wait_calls(LIMIT, |_| {
                d.twilio
                    .callbacks()
                    .iter()
                    .filter(|c| c.param("CallSid") == Some(sid.as_str()))
                    .count()
                    == 3
            })
            .await,
        "three callbacks posted"
    );
    let order: Vec<String> = d
        .twilio
        .callbacks()
        .iter()
        .filter(|c| c.param("CallSid") == Some(sid.as_str()))
        .map(|c| c.param("CallStatus").unwrap_or_default().to_owned())
        .collect();
    assert_eq!(order, ["busy", "ringing", "initiated"]);
    // Give the stale callbacks time to be applied (they are acknowledged 204 at once).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let scrambled = d.world.get_call(&scrambled.call_id).await;
    assert_eq!(status(&scrambled), pb::CallStatus::Busy);
    assert_eq!(scrambled.twilio_status, "busy");

    // Every request control sent was valid for Twilio's spec; every callback was
    // accepted by the relay (signature checked).
    for r in d.twilio.requests() {
        assert!(
            matches!(r.status, 200 | 201 | 429) || r.param("To") == Some("+15005550001"),
            "{r:?}"
        );
    }
    let creates = d.twilio.requests().iter().filter(|r| r.is_create()).count();
    assert_eq!(creates, 1 + 2 + 4, "refused one, two 429s, four accepted");
    for cb in d.twilio.callbacks() {
        assert_eq!(cb.status, Some(204), "{cb:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_hang_up_cancels_a_ringing_call_at_twilio() {
    let d = dialing(&Conversation::default()).await;
    d.twilio.script("+14155550005", Lifecycle::RingForever);
    let call = d
        .dial(
            "+14155550005",
            pb::DialOptions {
                timeout_secs: 600,
                ..Default::default()
            },
        )
        .await;
    assert!(
        d.twilio
            .wait_calls(LIMIT, |calls| calls.iter().any(|c| c.status == "ringing"))
            .await,
        "the call rings"
    );
    // The ringing callback reached control.
    let deadline = tokio::time::Instant::now() + LIMIT;
    while d.world.get_call(&call.call_id).await.twilio_status != "ringing" {
        assert!(
            tokio::time::Instant::now() < deadline,
            "ringing never reported"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    with_timeout(
        LIMIT,
        "SendCommand hangup",
        d.world.calls().send_command(pb::SendCommandRequest {
            call_id: call.call_id.clone(),
            command: Some(pb::Command {
                command_id: String::new(),
                kind: Some(pb::command::Kind::Hangup(pb::HangupCommand {
                    reason: "changed my mind".into(),
                })),
            }),
        }),
    )
    .await
    .expect("the hang-up is accepted for a ringing call");
    let fake_call = d
        .twilio
        .call(&call.twilio_call_sid)
        .expect("the fake knows the call");
    assert_eq!(
        fake_call.updates,
        vec![vec![("Status".to_owned(), "canceled".to_owned())]],
        "Twilio was asked to cancel"
    );
    let ended = d.world.wait_ended(&call.call_id, LIMIT).await;
    assert_eq!(status(&ended), pb::CallStatus::Canceled, "{ended:?}");
    assert_eq!(reason(&ended), pb::EndReason::DialCanceled);
    assert_eq!(ended.twilio_status, "canceled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dialling_needs_an_outbound_call_and_sane_options() {
    let d = dialing(&Conversation::default()).await;
    let err = d
        .world
        .calls()
        .create_call(pb::CreateCallRequest {
            agent_id: d.agent.clone(),
            to: "+14155550006".into(),
            dial: Some(pb::DialOptions {
                timeout_secs: 1,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .expect_err("a 1 s ring is refused");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().contains("dial.timeout_secs"),
        "{}",
        err.message()
    );
    assert!(d.twilio.requests().is_empty(), "nothing reached Twilio");
}

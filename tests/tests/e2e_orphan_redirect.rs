//! End-to-end: the second path back for a call whose relay died (issue 15 item 6). The
//! relay carrying a call control dialled is SIGKILLed and Twilio — here the fake, with
//! `after_on_abnormal_close` off — does not ask the `<Connect action>` URL. Control sees
//! the call orphaned (its lease released, not taken again for a third of the lease plus a
//! second) and redirects it by Twilio REST to its action URL; the fake follows the
//! redirect like Twilio (a signed POST through the balancer, then the `<Stream>` of the
//! answer), and the call resumes on the other relay and ends normally, not `RELAY_LOST`.

use std::time::Duration;

use callbridge_proto::pb;
use callbridge_testkit::conversation::{AgentReply, Conversation, Turn};
use callbridge_testkit::fake_realtime::FakeRealtime;
use callbridge_testkit::fake_twilio_rest::{FakeTwilio, FakeTwilioConfig, Lifecycle};
use callbridge_tests::{PUBLIC_URL, TWILIO_TOKEN, World, agent_settings, with_timeout};

const ACCOUNT: &str = "AC00000000000000000000000000000a0f";
const LIMIT: Duration = Duration::from_secs(60);

fn script() -> Conversation {
    Conversation {
        greeting: Some(AgentReply::says("Hello there", 400)),
        turns: (0..6)
            .map(|n| {
                Turn::new(
                    format!("Caller line {n}"),
                    1200,
                    AgentReply::says(format!("Agent line {n}"), 1200),
                )
            })
            .collect(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_whose_relay_died_without_an_action_request_is_redirected_by_rest() {
    let script = script();
    let twilio = FakeTwilio::start(FakeTwilioConfig::new(ACCOUNT, TWILIO_TOKEN))
        .await
        .expect("fake twilio starts");
    let mut world = World::builder(FakeRealtime::builder().script(script.clone()).speed(2.0))
        .relays(2)
        .dials_through(&twilio)
        // Redirect after 9/3 + 1 = 4 s of orphanhood, well before the lease runs out.
        .control_env("CONTROL_LEASE_SECS", "9")
        .control_env("CONTROL_HEARTBEAT_TIMEOUT_SECS", "3")
        .start()
        .await;
    // Twilio does not ask the action URL after the lost stream.
    world.answer_from(&twilio);
    twilio.await_redirects(Duration::from_secs(30));
    let to = "+14155557001";
    twilio.script(
        to,
        Lifecycle::Answer {
            ring_ms: 50,
            script: script.clone(),
        },
    );
    let agent = world
        .create_agent("orphan", agent_settings("orphan", Some("Hello there")))
        .await;
    let created = world
        .calls()
        .create_call(pb::CreateCallRequest {
            agent_id: agent,
            to: to.to_owned(),
            from: "+14155550100".to_owned(),
            dial: Some(pb::DialOptions::default()),
            ..Default::default()
        })
        .await
        .expect("CreateCall")
        .into_inner();
    let call_id = created.call.expect("the call").call_id;

    // Live on a relay: kill that one.
    let live = with_timeout(LIMIT, "the call streams", async {
        loop {
            let call = world
                .calls()
                .get_call(pb::GetCallRequest {
                    call_id: call_id.clone(),
                })
                .await
                .expect("GetCall")
                .into_inner();
            if call.status == pb::CallStatus::InProgress as i32 && !call.relay_id.is_empty() {
                return call;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let holder: usize = live
        .relay_id
        .strip_prefix("relay-e2e-")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("the call names its relay: {live:?}"));
    world.relays[holder].kill();

    let ended = world.wait_ended(&call_id, LIMIT).await;
    assert_eq!(ended.status, pb::CallStatus::Completed as i32, "{ended:?}");
    assert_ne!(
        ended.end_reason,
        pb::EndReason::RelayLost as i32,
        "{ended:?}"
    );

    // Control asked Twilio to redirect the call to its action URL, once.
    let fake_call = twilio
        .calls()
        .into_iter()
        .find(|c| c.to == to)
        .expect("Twilio has the call");
    let redirects: Vec<&Vec<(String, String)>> = fake_call
        .updates
        .iter()
        .filter(|u| u.iter().any(|(k, _)| k == "Url"))
        .collect();
    assert_eq!(redirects.len(), 1, "{:?}", fake_call.updates);
    let url = &redirects[0]
        .iter()
        .find(|(k, _)| k == "Url")
        .expect("Url")
        .1;
    assert!(
        url.starts_with(&format!("{PUBLIC_URL}/api/twilio/after/{call_id}?stream=")),
        "{url}"
    );
    assert!(
        redirects[0]
            .iter()
            .any(|(k, v)| k == "Method" && v == "POST")
    );
    assert!(
        world
            .control
            .log_text()
            .contains("Orphaned call redirected by REST to its action URL."),
        "control says so"
    );

    // The call went on: a second stream, resumed, on the other relay.
    let events = world.stored_events(&call_id).await;
    let starts: Vec<&pb::Started> = events
        .iter()
        .filter_map(|e| match &e.kind {
            Some(pb::call_event::Kind::Started(s)) => Some(s),
            _ => None,
        })
        .collect();
    assert_eq!(starts.len(), 2, "{starts:?}");
    assert!(!starts[0].resumed && starts[1].resumed, "{starts:?}");
    assert_ne!(starts[0].relay_id, starts[1].relay_id);
}

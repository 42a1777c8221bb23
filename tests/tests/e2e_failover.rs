//! End-to-end: the relay carrying a call dies (SIGKILL). Twilio's `<Connect action>` goes
//! to another relay (through the balancer), control says the call is live with nobody
//! holding it, so the answer is a new `<Stream>`; the call resumes there with its history
//! and finishes. Nothing said before or after is lost.

use std::sync::atomic::Ordering;
use std::time::Duration;

use callbridge_proto::pb;
use callbridge_testkit::conversation::{AgentReply, Conversation, Turn};
use callbridge_testkit::eventually;
use callbridge_testkit::fake_realtime::FakeRealtime;
use callbridge_testkit::sim_caller::{ClosedBy, SimCaller};
use callbridge_tests::{World, agent_settings, expected_transcript, flatten, with_timeout};

const CALL: Duration = Duration::from_secs(60);

fn script() -> Conversation {
    Conversation {
        greeting: Some(AgentReply::says("Hello there", 300)),
        turns: (0..4)
            .map(|n| {
                Turn::new(
                    format!("Caller line {n}"),
                    400,
                    AgentReply::says(format!("Agent line {n}"), 400),
                )
            })
            .collect(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_survives_the_death_of_its_relay() {
    let script = script();
    let mut world = World::builder(FakeRealtime::builder().script(script.clone()).speed(2.0))
        .relays(2)
        .start()
        .await;
    world
        .default_agent(agent_settings("relay-death", Some("Hello there")))
        .await;
    let mut cfg = world.caller(script.clone());
    // A long pause after each answer: the relay is killed inside one, so no line is cut.
    cfg.gap_ms = 1500;
    cfg.follow_streams = 1;
    // Twilio takes a moment before it asks what to do next.
    cfg.after_delay = Duration::from_millis(300);
    // The socket drops without a close frame; model Twilio asking the action URL then.
    cfg.after_on_abnormal_close = true;
    let handle = SimCaller::new(cfg.clone()).start();
    let live = handle.live.clone();
    // Greeting and two answers heard in full.
    let heard_two = (300 + 400 + 400) * 8;
    assert!(
        eventually(CALL, || live.turns_spoken.load(Ordering::SeqCst) >= 2
            && live.media_bytes_played.load(Ordering::SeqCst) >= heard_two)
        .await,
        "two exchanges done"
    );
    let call = world
        .call_by_sid(&cfg.call_sid)
        .await
        .expect("the call is listed");
    let holder: usize = call
        .relay_id
        .strip_prefix("relay-e2e-")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("the call names its relay: {call:?}"));
    // The relay dies without a word to anyone.
    world.relays[holder].kill();

    let report = with_timeout(CALL, "the call", handle.join())
        .await
        .expect("runs");
    assert_eq!(
        report.legs.len(),
        2,
        "the call moved to a second stream: {:?} {:?}",
        report.after,
        report.legs.first().map(|l| &l.closed_by)
    );
    let (first, second) = (&report.legs[0], &report.legs[1]);
    assert!(
        !matches!(first.closed_by, ClosedBy::Caller),
        "{:?}",
        first.closed_by
    );
    assert_eq!(first.turns_spoken, vec![0, 1]);
    let resume = report.after.first().and_then(|a| a.twiml.as_ref());
    assert!(
        resume.is_some_and(|t| t.stream_url.is_some()),
        "the action URL answered a new <Stream>: {:?}",
        report.after.first().map(|a| &a.response)
    );
    assert_eq!(second.closed_by, ClosedBy::Caller);
    assert_eq!(second.turns_spoken, vec![2, 3]);
    assert!(
        second.answer_timeouts.is_empty(),
        "{:?}",
        second.answer_timeouts
    );
    assert!(
        second.protocol_errors.is_empty(),
        "{:?}",
        second.protocol_errors
    );

    // The second model session got the history and went on from line 2.
    let sessions = world.fake.connections();
    assert_eq!(sessions.len(), 2);
    assert_eq!(sessions[1].resumed_at_turn, Some(2));
    assert_eq!(
        sessions[1].caller_transcripts,
        vec!["Caller line 2", "Caller line 3"]
    );

    let ended = world
        .wait_ended(&call.call_id, Duration::from_secs(20))
        .await;
    assert_eq!(ended.status, pb::CallStatus::Completed as i32, "{ended:?}");
    assert_eq!(ended.end_reason, pb::EndReason::CallerHangup as i32);
    let events = world.stored_events(&call.call_id).await;
    let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
    let starts: Vec<&pb::Started> = events
        .iter()
        .filter_map(|e| match &e.kind {
            Some(pb::call_event::Kind::Started(s)) => Some(s),
            _ => None,
        })
        .collect();
    assert_eq!(starts.len(), 2, "{starts:?}");
    assert!(!starts[0].resumed && starts[1].resumed);
    assert_ne!(starts[0].relay_id, starts[1].relay_id);
    assert_eq!(
        flatten(&world.transcript(&call.call_id).await),
        expected_transcript(&script)
    );
}

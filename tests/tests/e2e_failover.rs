//! End-to-end: the relay carrying a call dies (SIGKILL). Twilio's `<Connect action>` goes
//! to another relay (through the balancer), control says the call is live with nobody
//! holding it, so the answer is a new `<Stream>`; the call resumes there with its history
//! and finishes. Nothing said before or after is lost.
//!
//! The race version: twenty relay deaths (SIGKILL, or a frozen node whose streams Twilio
//! loses), each with several calls on the dying relay whose action requests arrive 0–50 ms
//! after the stream is lost — before and after control has noticed the death — and every
//! call must be resumed, never hung up (docs/resilience.md, "The rule").

use std::sync::atomic::Ordering;
use std::time::Duration;

use callbridge_proto::pb;
use callbridge_testkit::conversation::{AgentReply, Conversation, Turn};
use callbridge_testkit::eventually;
use callbridge_testkit::fake_realtime::FakeRealtime;
use callbridge_testkit::sim_caller::{CallerCommand, ClosedBy, LoadBalancer, SimCaller};
use callbridge_tests::{READY, World, agent_settings, expected_transcript, flatten, with_timeout};

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
    cfg.assume_action_after_abnormal_close();
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

/// Kills in the race test, and calls on the dying relay at each kill.
const KILLS: usize = 20;
const CALLS_PER_KILL: usize = 3;
/// Latest action request after the stream is lost; the delays are spread evenly over
/// 0..=this.
const MAX_AFTER_DELAY_MS: usize = 50;

/// How the relay dies in one round of the race test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Death {
    /// SIGKILL: the kernel closes its sockets, so the caller's stream and the attach
    /// streams to control break at once; the action request races control's release of
    /// the leases.
    Crash,
    /// The node freezes (SIGSTOP) and Twilio loses the stream; control sees nothing close,
    /// so the lease is still held when the action request and the new stream's attach
    /// arrive. The relay is SIGKILLed once the calls moved, so its old attach streams
    /// break (and try to let go of leases they no longer hold) while the calls go on.
    NodeLost,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_call_of_a_dead_relay_is_hung_up_however_soon_twilio_asks() {
    let script = Conversation {
        greeting: Some(AgentReply::says("Hello there", 200)),
        turns: vec![Turn::new(
            "Caller line 0",
            200,
            AgentReply::says("Agent line 0", 200),
        )],
    };
    let mut world = World::builder(FakeRealtime::builder().script(script.clone()).speed(2.0))
        .relays(3)
        .start()
        .await;
    world
        .default_agent(agent_settings("failover-race", Some("Hello there")))
        .await;
    let total = KILLS * CALLS_PER_KILL;
    let mut failures = Vec::new();
    for kill in 0..KILLS {
        let death = if kill % 2 == 0 {
            Death::Crash
        } else {
            Death::NodeLost
        };
        let target = kill % world.relays.len();
        let target_id = format!("relay-e2e-{target}");
        let others: Vec<_> = (0..world.relays.len())
            .filter(|&n| n != target)
            .map(|n| world.relays[n].addr)
            .collect();
        let mut calls = Vec::new();
        for n in 0..CALLS_PER_KILL {
            let mut cfg = world.caller(script.clone());
            // Round robin from the start of this list: the webhook goes to the first
            // address, the stream to the second (the relay that dies), the action request
            // and the resumed stream to the survivors.
            cfg.relays = LoadBalancer::new(vec![others[0], world.relays[target].addr, others[1]]);
            // The relay dies in this pause after the greeting: no line is cut.
            cfg.gap_ms = 500;
            cfg.tail_ms = 100;
            cfg.follow_streams = 1;
            cfg.assume_action_after_abnormal_close();
            let spread = kill * CALLS_PER_KILL + n;
            cfg.after_delay =
                Duration::from_millis((spread * MAX_AFTER_DELAY_MS / (total - 1)) as u64);
            let handle = SimCaller::new(cfg.clone()).start();
            calls.push((cfg, handle));
        }
        // The relay dies once control holds each call's greeting: it holds live leases.
        let mut call_ids = Vec::new();
        for (cfg, _) in &calls {
            let deadline = tokio::time::Instant::now() + CALL;
            let call = loop {
                if let Some(c) = world.call_by_sid(&cfg.call_sid).await
                    && !world.transcript(&c.call_id).await.turns.is_empty()
                {
                    break c;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "kill {kill}: a call was never greeted"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            };
            assert_eq!(call.relay_id, target_id, "{call:?}");
            call_ids.push(call.call_id);
        }
        match death {
            Death::Crash => world.relays[target].kill(),
            Death::NodeLost => {
                world.relays[target].freeze().expect("SIGSTOP");
                for (_, handle) in &calls {
                    handle
                        .commands
                        .send(CallerCommand::Lose)
                        .await
                        .expect("the caller runs");
                }
                // Kill it once every call has moved on (or given up).
                let deadline = tokio::time::Instant::now() + CALL;
                for ((_, handle), call_id) in calls.iter().zip(&call_ids) {
                    while world.get_call(call_id).await.relay_id == target_id
                        && !handle.is_finished()
                        && tokio::time::Instant::now() < deadline
                    {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
                world.relays[target].kill();
            }
        }
        world.relays[target].restart().expect("relay restarts");

        for ((cfg, handle), call_id) in calls.into_iter().zip(call_ids) {
            let what = format!(
                "kill {kill} ({death:?}), action after {:?}, call {call_id}",
                cfg.after_delay
            );
            let report = with_timeout(CALL, "a call", handle.join())
                .await
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            assert!(report.legs[0].closed_by.is_abnormal(), "{what}");
            let resumed = report
                .after
                .first()
                .and_then(|a| a.twiml.as_ref())
                .is_some_and(|t| t.stream_url.is_some());
            if !resumed {
                let call = world.get_call(&call_id).await;
                failures.push(format!(
                    "{what}: hung up (control has status {}, end {} '{}'): {:?}",
                    call.status,
                    call.end_reason,
                    call.end_detail,
                    report
                        .after
                        .iter()
                        .map(|a| &a.response.body)
                        .collect::<Vec<_>>()
                ));
                continue;
            }
            let second = report.legs.get(1).expect("a resumed stream was followed");
            if second.closed_by != ClosedBy::Caller || second.turns_spoken != vec![0] {
                failures.push(format!(
                    "{what}: the resumed stream did not finish the script: {:?} {:?}",
                    second.closed_by, second.turns_spoken
                ));
                continue;
            }
            let ended = world.wait_ended(&call_id, Duration::from_secs(20)).await;
            assert_eq!(
                ended.end_reason,
                pb::EndReason::CallerHangup as i32,
                "{what}: {ended:?}"
            );
            let events = world.stored_events(&call_id).await;
            let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
            assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>(), "{what}");
            let starts: Vec<&pb::Started> = events
                .iter()
                .filter_map(|e| match &e.kind {
                    Some(pb::call_event::Kind::Started(s)) => Some(s),
                    _ => None,
                })
                .collect();
            assert_eq!(starts.len(), 2, "{what}: {starts:?}");
            assert!(!starts[0].resumed && starts[1].resumed, "{what}");
            assert_ne!(starts[1].relay_id, target_id, "{what}");
            assert_eq!(
                flatten(&world.transcript(&call_id).await),
                expected_transcript(&script),
                "{what}"
            );
        }
        world.relays[target]
            .wait_http_ok("/healthz", READY)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    assert!(
        failures.is_empty(),
        "{} of {total} calls were not resumed and finished:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

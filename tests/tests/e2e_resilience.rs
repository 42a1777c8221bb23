//! End-to-end: calls that survive what happens under them — the model socket dropping,
//! the model session reaching its limit, relays restarted one by one (SIGTERM hand-off),
//! a relay killed (SIGKILL), and a drain that runs out of time.
//!
//! Real relays, real control, real redis-server; the model is the fake and Twilio the
//! simulated caller (which, like Twilio, asks the `<Connect action>` URL when a stream
//! ends and follows the `<Stream>` it gets, through a round-robin balancer).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use callbridge_proto::pb;
use callbridge_testkit::conversation::{AgentReply, Conversation, Turn};
use callbridge_testkit::eventually;
use callbridge_testkit::fake_realtime::FakeRealtime;
use callbridge_testkit::sim_caller::{
    CallReport, CallerConfig, CallerHandle, ClosedBy, LoadBalancer, SimCaller,
};
use callbridge_tests::{
    READY, World, agent_settings, expected_transcript, flatten, stored_turns, with_timeout,
};
use serde_json::Value;

const CALL: Duration = Duration::from_secs(90);

fn call_id_of(report: &CallReport) -> String {
    report
        .webhook
        .twiml
        .as_ref()
        .and_then(|t| t.parameters.iter().find(|(k, _)| k == "callId"))
        .map(|(_, v)| v.clone())
        .expect("callId parameter in the webhook TwiML")
}

fn script(turns: usize, speech_ms: u32, answer_ms: u32) -> Conversation {
    Conversation {
        greeting: Some(AgentReply::says("Hello there", answer_ms)),
        turns: (0..turns)
            .map(|n| {
                Turn::new(
                    format!("Caller line {n}"),
                    speech_ms,
                    AgentReply::says(format!("Agent line {n}"), answer_ms),
                )
            })
            .collect(),
    }
}

/// Checks what control stored for a call carried over `legs` streams: seqs 1..=last with
/// no gap or repeat, one `started` per stream (all but the first resumed), a `HANDOFF`
/// end between streams that were handed off, and the final end last.
fn check_events(events: &[pb::CallEvent], legs: usize, handoffs: usize, what: &str) {
    let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
    assert_eq!(
        seqs,
        (1..=seqs.len() as u64).collect::<Vec<_>>(),
        "{what}: seqs"
    );
    let starts: Vec<&pb::Started> = events
        .iter()
        .filter_map(|e| match &e.kind {
            Some(pb::call_event::Kind::Started(s)) => Some(s),
            _ => None,
        })
        .collect();
    assert_eq!(starts.len(), legs, "{what}: one start per stream");
    assert!(!starts[0].resumed, "{what}");
    assert!(starts[1..].iter().all(|s| s.resumed), "{what}: {starts:?}");
    let ends: Vec<i32> = events
        .iter()
        .filter_map(|e| match &e.kind {
            Some(pb::call_event::Kind::Ended(e)) => Some(e.reason),
            _ => None,
        })
        .collect();
    let handoff = pb::EndReason::Handoff as i32;
    assert_eq!(
        ends.iter().filter(|r| **r == handoff).count(),
        handoffs,
        "{what}: {ends:?}"
    );
    assert!(
        matches!(events.last().and_then(|e| e.kind.as_ref()), Some(pb::call_event::Kind::Ended(e)) if e.reason != handoff),
        "{what}: the final end comes last"
    );
}

/// The turns spoken over every leg, in order.
fn turns_spoken(report: &CallReport) -> Vec<usize> {
    report
        .legs
        .iter()
        .flat_map(|l| l.turns_spoken.iter().copied())
        .collect()
}

fn item_texts(items: &[Value], role: &str) -> Vec<String> {
    items
        .iter()
        .filter(|i| i["type"] == "message" && i["role"] == role)
        .filter_map(|i| i["content"][0]["text"].as_str().map(str::to_owned))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_socket_dropped_mid_call_reconnects_and_goes_on_with_the_context() {
    let script = script(5, 400, 500);
    // The first model session dies a little into the second exchange; the next ones live.
    let fake = FakeRealtime::builder()
        .script(script.clone())
        .speed(2.0)
        .close_after(Duration::from_millis(2600))
        .faults_only_on_first(1);
    let world = World::builder(fake).start().await;
    let mut settings = agent_settings("reconnect", Some("Hello there"));
    settings.fallback = Some(pb::Fallback {
        action: Some(pb::fallback::Action::DialNumber("+14155550111".to_owned())),
        preamble: String::new(),
    });
    world.default_agent(settings).await;
    let mut cfg = world.caller(script.clone());
    // An answer cut by the drop is not said again; do not wait long for it.
    cfg.answer_wait = Duration::from_secs(3);
    let report = with_timeout(CALL, "the call", SimCaller::new(cfg).run())
        .await
        .expect("runs");

    assert_eq!(report.legs.len(), 1, "the Twilio stream was never dropped");
    let leg = &report.legs[0];
    assert_eq!(
        leg.closed_by,
        ClosedBy::Caller,
        "the caller finished the call"
    );
    assert_eq!(leg.turns_spoken, (0..5).collect::<Vec<_>>());
    assert!(leg.protocol_errors.is_empty(), "{:?}", leg.protocol_errors);

    let sessions = world.fake.connections();
    assert_eq!(sessions.len(), 2, "one reconnect");
    let (first, second) = (&sessions[0], &sessions[1]);
    assert!(first.closed);
    // The new session got the setup again (instructions, formats, tools) ...
    let setup = second.session_updates.first().expect("a session.update");
    assert!(
        setup["instructions"]
            .as_str()
            .is_some_and(|i| i.contains("Marker: reconnect")),
        "{setup}"
    );
    assert_eq!(setup["audio"]["input"]["format"]["type"], "audio/pcmu");
    // ... then the conversation so far as items: the caller's lines as user messages,
    // what the caller heard of the agent as assistant messages.
    let replayed_user = item_texts(&second.items_created, "user");
    assert_eq!(
        replayed_user, first.caller_transcripts,
        "every caller line the first session transcribed was replayed"
    );
    let replayed_assistant = item_texts(&second.items_created, "assistant");
    assert_eq!(
        replayed_assistant.first().map(String::as_str),
        Some("Hello there"),
        "the greeting is part of the history: {replayed_assistant:?}"
    );
    // No greeting again, and the script went on where it was.
    assert!(
        second.responses.iter().all(|r| r.text != "Hello there"),
        "{:?}",
        second.responses
    );
    let mut heard_by_model = first.caller_transcripts.clone();
    heard_by_model.extend(second.caller_transcripts.iter().cloned());
    assert_eq!(
        heard_by_model,
        (0..5)
            .map(|n| format!("Caller line {n}"))
            .collect::<Vec<_>>(),
        "every line reached a model once, in order"
    );
    assert!(second.appended_audio_bytes > 0, "the caller is heard again");

    let call_id = call_id_of(&report);
    let call = world.wait_ended(&call_id, Duration::from_secs(10)).await;
    assert_eq!(
        call.end_reason,
        pb::EndReason::CallerHangup as i32,
        "{call:?}"
    );
    let events = world.stored_events(&call_id).await;
    check_events(&events, 1, 0, "reconnect");
    let caller_lines: Vec<String> = flatten(&world.transcript(&call_id).await)
        .into_iter()
        .filter(|(who, _)| who == "caller")
        .map(|(_, t)| t)
        .collect();
    assert_eq!(caller_lines, heard_by_model, "the transcript is continuous");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_model_session_is_replaced() {
    let script = script(3, 400, 400);
    // The first session goes silent right after it starts the greeting (socket open).
    let fake = FakeRealtime::builder()
        .script(script.clone())
        .speed(2.0)
        .stall_after_events(7)
        .faults_only_on_first(1);
    let world = World::builder(fake)
        .relay_env("RELAY_MODEL_STALL_SECS", "2")
        .start()
        .await;
    world
        .default_agent(agent_settings("stall", Some("Hello there")))
        .await;
    let mut cfg = world.caller(script.clone());
    cfg.answer_wait = Duration::from_secs(4);
    let report = with_timeout(CALL, "the call", SimCaller::new(cfg).run())
        .await
        .expect("runs");
    assert_eq!(report.legs.len(), 1, "the Twilio stream was never dropped");
    let leg = &report.legs[0];
    assert_eq!(leg.closed_by, ClosedBy::Caller);
    assert_eq!(leg.turns_spoken, (0..3).collect::<Vec<_>>());
    let sessions = world.fake.connections();
    assert_eq!(sessions.len(), 2, "the stalled session was replaced once");
    assert!(sessions[0].closed, "the relay closed the stalled session");
    assert!(!sessions[1].session_updates.is_empty());
    let mut heard: Vec<String> = sessions[0].caller_transcripts.clone();
    heard.extend(sessions[1].caller_transcripts.iter().cloned());
    assert_eq!(
        heard,
        (0..3)
            .map(|n| format!("Caller line {n}"))
            .collect::<Vec<_>>()
    );
    let replies: Vec<&str> = sessions[1]
        .responses
        .iter()
        .map(|r| r.text.as_str())
        .collect();
    assert_eq!(replies, ["Agent line 0", "Agent line 1", "Agent line 2"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_that_stays_away_ends_the_call_with_the_fallback() {
    let script = script(4, 400, 400);
    // Every session dies shortly after it opens: the model never works again.
    let fake = FakeRealtime::builder()
        .script(script.clone())
        .speed(2.0)
        .close_after(Duration::from_millis(1500));
    let world = World::builder(fake)
        .relay_env("RELAY_MODEL_RECONNECT_SECS", "2")
        .start()
        .await;
    let mut settings = agent_settings("stays-away", Some("Hello there"));
    settings.fallback = Some(pb::Fallback {
        action: Some(pb::fallback::Action::DialNumber("+14155550111".to_owned())),
        preamble: String::new(),
    });
    world.default_agent(settings).await;
    let mut cfg = world.caller(script.clone());
    cfg.hang_up_at_end = false;
    cfg.answer_wait = Duration::from_secs(2);
    let report = with_timeout(CALL, "the call", SimCaller::new(cfg).run())
        .await
        .expect("runs");
    let leg = report.leg().expect("a stream");
    assert!(
        matches!(leg.closed_by, ClosedBy::Relay { .. }),
        "{:?}",
        leg.closed_by
    );
    assert_eq!(
        report.last_after().and_then(|t| t.dial_number.clone()),
        Some("+14155550111".to_owned()),
        "the caller gets the agent's fallback"
    );
    let call = world
        .wait_ended(&call_id_of(&report), Duration::from_secs(10))
        .await;
    assert_eq!(call.end_reason, pb::EndReason::ModelUnavailable as i32);
    let opened = world.fake.connections_accepted();
    assert!(
        (2..=20).contains(&opened),
        "it retried, within bounds: {opened}"
    );
}

/// Starts `n` callers of `script` through one shared balancer.
fn start_callers(
    world: &World,
    lb: &Arc<LoadBalancer>,
    script: &Conversation,
    n: usize,
    tweak: impl Fn(&mut CallerConfig),
) -> Vec<(CallerConfig, CallerHandle)> {
    (0..n)
        .map(|_| {
            let mut cfg = world.caller(script.clone());
            cfg.relays = lb.clone();
            cfg.follow_streams = 4;
            cfg.answer_wait = Duration::from_secs(5);
            tweak(&mut cfg);
            let handle = SimCaller::new(cfg.clone()).start();
            (cfg, handle)
        })
        .collect()
}

/// Waits until every caller spoke at least `turns` lines.
async fn wait_turns(handles: &[(CallerConfig, CallerHandle)], turns: u64, what: &str) {
    let lives: Vec<_> = handles.iter().map(|(_, h)| h.live.clone()).collect();
    assert!(
        eventually(CALL, || lives
            .iter()
            .all(|l| l.turns_spoken.load(Ordering::SeqCst) >= turns))
        .await,
        "{what}"
    );
}

/// SIGTERM relay `i`, take it out of the balancer, wait for it to exit, start a
/// replacement at the same address and put it back.
async fn roll(world: &mut World, lb: &LoadBalancer, i: usize) {
    let addr = world.relays[i].addr;
    world.relays[i].terminate().expect("SIGTERM");
    lb.set_in_rotation(addr, false);
    let status = with_timeout(
        Duration::from_secs(30),
        "relay exit",
        world.relays[i].wait_exit(Duration::from_secs(25)),
    )
    .await
    .unwrap_or_else(|| panic!("relay {i} exits once its calls are handed off"));
    assert!(status.success(), "relay {i}: {status}");
    world.relays[i].restart().expect("replacement starts");
    world.relays[i]
        .wait_http_ok("/readyz", READY)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    lb.set_in_rotation(addr, true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_hands_every_live_call_off() {
    const CALLS: usize = 30;
    const TURNS: usize = 14;
    let script = script(TURNS, 300, 300);
    let mut world = World::builder(FakeRealtime::builder().script(script.clone()).speed(2.0))
        .relays(3)
        .relay_env("RELAY_DRAIN_GRACE_SECS", "20")
        .start()
        .await;
    world
        .default_agent(agent_settings("rolling", Some("Hello there")))
        .await;
    let lb = LoadBalancer::new(world.relay_addrs());
    let callers = start_callers(&world, &lb, &script, CALLS, |_| {});
    wait_turns(&callers, 1, "every call is going").await;

    roll(&mut world, &lb, 0).await;
    roll(&mut world, &lb, 1).await;

    let mut moved = 0;
    for (n, (cfg, handle)) in callers.into_iter().enumerate() {
        let report = with_timeout(CALL, "a call", handle.join())
            .await
            .unwrap_or_else(|e| panic!("call {n}: {e}"));
        let last = report.legs.last().expect("a stream");
        assert_eq!(
            last.closed_by,
            ClosedBy::Caller,
            "call {n}: finished by the caller"
        );
        for leg in &report.legs[..report.legs.len() - 1] {
            assert_eq!(
                leg.closed_by,
                ClosedBy::Relay {
                    code: Some(1000),
                    reason: "call handed off".to_owned()
                },
                "call {n}: a clean hand-off"
            );
        }
        assert!(
            report.legs.iter().all(|l| l.refused_status.is_none()),
            "call {n}: no stream refused"
        );
        assert_eq!(
            turns_spoken(&report),
            (0..TURNS).collect::<Vec<_>>(),
            "call {n}"
        );
        if report.legs.len() > 1 {
            moved += 1;
        }
        let call_id = call_id_of(&report);
        let call = world.wait_ended(&call_id, Duration::from_secs(10)).await;
        assert_eq!(
            call.end_reason,
            pb::EndReason::CallerHangup as i32,
            "call {n} ({}): {call:?}",
            cfg.call_sid
        );
        let events = world.stored_events(&call_id).await;
        check_events(
            &events,
            report.legs.len(),
            report.legs.len() - 1,
            &format!("call {n}"),
        );
        assert_eq!(
            flatten(&world.transcript(&call_id).await),
            expected_transcript(&script),
            "call {n}: transcript continuous"
        );
    }
    assert!(
        moved >= CALLS / 3,
        "the calls of the restarted relays moved: {moved}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_relay_s_calls_continue_on_the_others() {
    const CALLS: usize = 9;
    const TURNS: usize = 8;
    let script = script(TURNS, 300, 300);
    let mut world = World::builder(FakeRealtime::builder().script(script.clone()).speed(2.0))
        .relays(3)
        .start()
        .await;
    world
        .default_agent(agent_settings("sigkill", Some("Hello there")))
        .await;
    let lb = LoadBalancer::new(world.relay_addrs());
    let callers = start_callers(&world, &lb, &script, CALLS, |cfg| {
        // The socket drops without a close frame; model Twilio asking the action URL then,
        // after its own reaction time (control must have seen the attach stream break,
        // or the lease still looks held and the answer is a hang-up).
        cfg.assume_action_after_abnormal_close();
        cfg.after_delay = Duration::from_millis(300);
    });
    wait_turns(&callers, 2, "every call is going").await;
    // The balancer stops sending new requests there (its health check would, a moment
    // later; the caller skips a refused connection either way), then the relay dies.
    lb.set_in_rotation(world.relays[0].addr, false);
    world.relays[0].kill();

    let mut moved = 0;
    for (n, (_, handle)) in callers.into_iter().enumerate() {
        let report = with_timeout(CALL, "a call", handle.join())
            .await
            .unwrap_or_else(|e| panic!("call {n}: {e}"));
        let last = report.legs.last().expect("a stream");
        assert_eq!(
            last.closed_by,
            ClosedBy::Caller,
            "call {n}: finished; action answers: {:?}",
            report
                .after
                .iter()
                .map(|a| &a.response.body)
                .collect::<Vec<_>>()
        );
        if report.legs.len() > 1 {
            moved += 1;
            assert!(report.legs[0].closed_by.is_abnormal(), "call {n}");
        }
        // A line said while the relay died may be lost with it; the script goes on.
        let spoken = turns_spoken(&report);
        assert_eq!(spoken.last(), Some(&(TURNS - 1)), "call {n}: {spoken:?}");
        let call_id = call_id_of(&report);
        let call = world.wait_ended(&call_id, Duration::from_secs(20)).await;
        assert_eq!(
            call.end_reason,
            pb::EndReason::CallerHangup as i32,
            "call {n}: {call:?}"
        );
        let events = world.stored_events(&call_id).await;
        check_events(&events, report.legs.len(), 0, &format!("call {n}"));
        // Every turn spoken after the failover is stored (caller line and answer); of the
        // killed stream at most its last turn, the one in flight, is lost.
        let legs: Vec<Vec<usize>> = report.legs.iter().map(|l| l.turns_spoken.clone()).collect();
        let missing = stored_turns::missing_lines(&events, &legs, &script)
            .unwrap_or_else(|e| panic!("call {n}: {e}"));
        let in_flight = (report.legs.len() > 1)
            .then(|| report.legs[0].turns_spoken.last().copied())
            .flatten();
        assert!(
            missing
                .iter()
                .all(|m| m.leg == 0 && m.turn.is_some() && m.turn == in_flight),
            "call {n}: legs {legs:?}, missing {missing:?}"
        );
        // What control acknowledged before the kill is all there, once, in order.
        let caller_lines: Vec<String> = flatten(&world.transcript(&call_id).await)
            .into_iter()
            .filter(|(who, _)| who == "caller")
            .map(|(_, t)| t)
            .collect();
        let mut sorted = caller_lines.clone();
        sorted.sort_by_key(|l| {
            l.rsplit(' ')
                .next()
                .and_then(|n| n.parse::<usize>().ok())
                .unwrap_or(usize::MAX)
        });
        sorted.dedup();
        assert_eq!(caller_lines, sorted, "call {n}: in order, none twice");
        assert!(
            caller_lines.len() >= TURNS - 1,
            "call {n}: {caller_lines:?}"
        );
    }
    assert!(moved >= 1, "the killed relay carried calls");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_deadline_sends_the_remaining_calls_to_the_fallback() {
    // The agent talks without a pause, so there is never a quiet moment to hand off.
    let script = Conversation {
        greeting: Some(AgentReply::says("Hello there", 300)),
        turns: vec![Turn::new(
            "Tell me everything",
            400,
            AgentReply::says("A very long story", 20_000),
        )],
    };
    let mut world = World::builder(FakeRealtime::builder().script(script.clone()).speed(1.0))
        .relays(2)
        .relay_env("RELAY_DRAIN_GRACE_SECS", "1")
        .start()
        .await;
    let mut settings = agent_settings("deadline", Some("Hello there"));
    settings.fallback = Some(pb::Fallback {
        action: Some(pb::fallback::Action::DialNumber("+14155550111".to_owned())),
        preamble: String::new(),
    });
    world.default_agent(settings).await;
    // Both calls on the relay that will drain.
    let lb = LoadBalancer::new(world.relay_addrs());
    lb.set_in_rotation(world.relays[1].addr, false);
    let callers = start_callers(&world, &lb, &script, 2, |cfg| cfg.hang_up_at_end = false);
    let lives: Vec<_> = callers.iter().map(|(_, h)| h.live.clone()).collect();
    // Both are listening to the long answer.
    assert!(
        eventually(CALL, || lives
            .iter()
            .all(|l| l.media_bytes_received.load(Ordering::SeqCst) > 8 * 2000))
        .await,
        "the long answers play"
    );
    world.relays[0].terminate().expect("SIGTERM");
    lb.set_in_rotation(world.relays[1].addr, true);
    lb.set_in_rotation(world.relays[0].addr, false);
    for (n, (_, handle)) in callers.into_iter().enumerate() {
        let report = with_timeout(CALL, "a call", handle.join())
            .await
            .unwrap_or_else(|e| panic!("call {n}: {e}"));
        assert_eq!(report.legs.len(), 1, "call {n}: not handed off");
        assert_eq!(
            report.legs[0].closed_by,
            ClosedBy::Relay {
                code: Some(1001),
                reason: "call ended".to_owned()
            },
            "call {n}"
        );
        assert_eq!(
            report.last_after().and_then(|t| t.dial_number.clone()),
            Some("+14155550111".to_owned()),
            "call {n}: the fallback"
        );
        let call_id = call_id_of(&report);
        let call = world.wait_ended(&call_id, Duration::from_secs(10)).await;
        assert_eq!(call.end_reason, pb::EndReason::Drain as i32, "call {n}");
        let events = world.stored_events(&call_id).await;
        check_events(&events, 1, 0, &format!("call {n}"));
        // What was said before the cut is stored.
        let turns = flatten(&world.transcript(&call_id).await);
        assert!(
            turns.contains(&("caller".to_owned(), "Tell me everything".to_owned())),
            "call {n}: {turns:?}"
        );
    }
    let status = with_timeout(
        Duration::from_secs(20),
        "relay exit",
        world.relays[0].wait_exit(Duration::from_secs(15)),
    )
    .await
    .expect("the relay exits after the deadline");
    assert!(status.success(), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_rollover_at_a_short_limit_is_seamless() {
    const TURNS: usize = 8;
    let script = script(TURNS, 300, 400);
    let world = World::builder(FakeRealtime::builder().script(script.clone()).speed(2.0))
        .relay_env("RELAY_MODEL_SESSION_SECS", "3")
        .start()
        .await;
    world
        .default_agent(agent_settings("rollover", Some("Hello there")))
        .await;
    let mut cfg = world.caller(script.clone());
    cfg.answer_wait = Duration::from_secs(5);
    let report = with_timeout(CALL, "the call", SimCaller::new(cfg).run())
        .await
        .expect("runs");
    assert_eq!(report.legs.len(), 1);
    let leg = &report.legs[0];
    assert_eq!(leg.closed_by, ClosedBy::Caller);
    assert_eq!(leg.turns_spoken, (0..TURNS).collect::<Vec<_>>());
    assert!(leg.answer_timeouts.is_empty(), "{:?}", leg.answer_timeouts);
    // Every answer reached the caller whole: nothing was cut by a switch.
    let expected_audio: u64 = script
        .greeting
        .iter()
        .chain(script.turns.iter().map(|t| &t.agent))
        .map(|a| u64::from(a.audio_ms) * 8)
        .sum();
    assert_eq!(leg.media_bytes_received, expected_audio);
    assert!(leg.clears.is_empty(), "{:?}", leg.clears);

    let sessions = world.fake.connections();
    assert!(sessions.len() >= 2, "rolled over: {}", sessions.len());
    for (i, s) in sessions.iter().enumerate().skip(1) {
        assert!(!s.session_updates.is_empty(), "session {i} set up");
        assert!(
            s.responses.iter().all(|r| r.text != "Hello there"),
            "session {i} did not greet again"
        );
        let before: Vec<String> = sessions[..i]
            .iter()
            .flat_map(|p| p.caller_transcripts.iter().cloned())
            .collect();
        assert_eq!(
            item_texts(&s.items_created, "user"),
            before,
            "session {i} got every line said before it"
        );
    }
    let call_id = call_id_of(&report);
    world.wait_ended(&call_id, Duration::from_secs(10)).await;
    let events = world.stored_events(&call_id).await;
    check_events(&events, 1, 0, "rollover");
    assert_eq!(
        flatten(&world.transcript(&call_id).await),
        expected_transcript(&script)
    );
}

//! End-to-end: the model side, complete (issue 14 item 4). What the relay does with
//! `input_audio_buffer.committed`, a failed transcription, a `response.done` that did not
//! complete, `rate_limits.updated` and `error` (tied to the client event that caused it; a
//! fatal class replaces the session or ends the call); turn detection off (the relay
//! commits the caller's turns, on silence or on a command); keys pressed reaching the
//! model when the agent asks for it.
//!
//! Real relay, real control, real redis-server; the model is the fake (told per test which
//! events to send) and Twilio the simulated caller.

use std::sync::atomic::Ordering;
use std::time::Duration;

use callbridge_proto::pb;
use callbridge_testkit::conversation::{AgentReply, Conversation, Turn};
use callbridge_testkit::eventually;
use callbridge_testkit::fake_realtime::{FakeRealtime, FakeRealtimeBuilder, ResponseOutcome};
use callbridge_testkit::sim_caller::{CallReport, CallerCommand, ClosedBy, SimCaller};
use callbridge_tests::{World, agent_settings, flatten, with_timeout};

const CALL: Duration = Duration::from_secs(60);

fn script(turns: usize) -> Conversation {
    Conversation {
        greeting: None,
        turns: (0..turns)
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

/// A world whose default agent is `settings`, the caller playing `script` to the end.
async fn call(
    fake: FakeRealtimeBuilder,
    settings: pb::AgentSettings,
    script: &Conversation,
) -> (World, CallReport, Vec<pb::CallEvent>) {
    let world = World::builder(fake.script(script.clone()).speed(2.0))
        .start()
        .await;
    world.default_agent(settings).await;
    let mut cfg = world.caller(script.clone());
    cfg.answer_wait = Duration::from_secs(3);
    let report = with_timeout(CALL, "the call", SimCaller::new(cfg.clone()).run())
        .await
        .expect("the call runs");
    let call = world
        .call_by_sid(&cfg.call_sid)
        .await
        .expect("the call is stored");
    world
        .wait_ended(&call.call_id, Duration::from_secs(10))
        .await;
    let events = world.stored_events(&call.call_id).await;
    (world, report, events)
}

fn events_of<T: Clone>(
    events: &[pb::CallEvent],
    pick: impl Fn(&pb::call_event::Kind) -> Option<&T>,
) -> Vec<T> {
    events
        .iter()
        .filter_map(|e| e.kind.as_ref().and_then(&pick).cloned())
        .collect()
}

fn model_errors(events: &[pb::CallEvent]) -> Vec<pb::ModelError> {
    events_of(events, |k| match k {
        pb::call_event::Kind::ModelError(m) => Some(m),
        _ => None,
    })
}

fn ended(events: &[pb::CallEvent]) -> pb::Ended {
    events_of(events, |k| match k {
        pb::call_event::Kind::Ended(e) => Some(e),
        _ => None,
    })
    .pop()
    .expect("an ended event")
}

/// Transcription turned off, explicitly (empty means the default model).
fn no_transcription(marker: &str) -> pb::AgentSettings {
    pb::AgentSettings {
        input_transcription_model: callbridge_proto::INPUT_TRANSCRIPTION_OFF.to_owned(),
        ..agent_settings(marker, None)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_transcription_a_committed_turn_is_not_resent_to_a_new_session() {
    // The first session dies as its first answer begins (event 10: session.created,
    // session.updated, speech_started, speech_stopped, committed, item added, item done,
    // response.created, rate_limits.updated, output item added): the caller's turn was
    // committed and is over, and nothing will ever transcribe it.
    let fake = FakeRealtime::builder()
        .close_after_events(10)
        .faults_only_on_first(1);
    let (world, report, events) = call(fake, no_transcription("committed"), &script(3)).await;

    let leg = report.leg().expect("a leg");
    assert_eq!(leg.closed_by, ClosedBy::Caller, "the caller finished");
    assert_eq!(leg.turns_spoken, [0, 1, 2]);
    let sessions = world.fake.connections();
    assert_eq!(sessions.len(), 2, "one reconnect");
    assert_eq!(sessions[0].speech_segments, 1);
    // The new session heard the two turns spoken after the drop, and nothing of the first
    // one again: a resend of the committed turn would be a third segment, answered as if
    // the caller had spoken.
    assert_eq!(sessions[1].speech_segments, 2, "{:?}", sessions[1]);
    assert!(sessions.iter().all(|s| s.caller_transcripts.is_empty()));
    assert!(
        !events
            .iter()
            .any(|e| matches!(e.kind, Some(pb::call_event::Kind::Caller(_)))),
        "no transcription, no caller words"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transcription_off_stores_no_caller_lines_and_a_reconnect_replays_only_the_agent() {
    // The agent turns transcription off; the fake, like the real API, then sends no caller
    // text. The model session drops while the caller says their second (long) line.
    let script = Conversation {
        greeting: None,
        turns: vec![
            Turn::new("Caller line 0", 400, AgentReply::says("Agent line 0", 400)),
            Turn::new("Caller line 1", 1500, AgentReply::says("Agent line 1", 400)),
        ],
    };
    let world = World::builder(FakeRealtime::builder().script(script.clone()).speed(2.0))
        .start()
        .await;
    world.default_agent(no_transcription("off-replay")).await;
    let mut cfg = world.caller(script.clone());
    cfg.answer_wait = Duration::from_secs(3);
    let drop_mid_line = async {
        let speaking_again = eventually(CALL, || {
            world
                .fake
                .connection(0)
                .is_some_and(|c| c.speech_segments == 2)
        })
        .await;
        assert!(speaking_again, "the caller's second line reaches the model");
        world.fake.close_all();
    };
    let (report, ()) = tokio::join!(
        with_timeout(CALL, "the call", SimCaller::new(cfg.clone()).run()),
        drop_mid_line
    );
    let report = report.expect("the call runs");
    assert_eq!(report.leg().expect("a leg").turns_spoken, [0, 1]);
    let call = world.call_by_sid(&cfg.call_sid).await.expect("stored");
    world
        .wait_ended(&call.call_id, Duration::from_secs(10))
        .await;

    let sessions = world.fake.connections();
    assert_eq!(sessions.len(), 2, "one reconnect");
    assert!(sessions[0].session_updates[0]["audio"]["input"]["transcription"].is_null());
    assert!(sessions.iter().all(|s| s.caller_transcripts.is_empty()));
    // The new session is told what the agent said (its transcript), never what the
    // caller said: there are no caller words to tell.
    let replayed = &sessions[1].items_created;
    assert!(
        replayed
            .iter()
            .any(|i| i["role"] == "assistant" && i["content"][0]["text"] == "Agent line 0"),
        "{replayed:?}"
    );
    assert!(replayed.iter().all(|i| i["role"] != "user"), "{replayed:?}");
    // The caller's unfinished line is not lost: its audio (kept from just before
    // speech_started) is sent again to the new session, which hears it as speech.
    assert!(sessions[1].speech_segments >= 1, "{:?}", sessions[1]);
    let transcript = flatten(&world.transcript(&call.call_id).await);
    assert!(
        transcript.iter().all(|(who, _)| who != "caller"),
        "{transcript:?}"
    );
    assert!(
        transcript.contains(&("assistant".to_owned(), "Agent line 0".to_owned())),
        "{transcript:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_transcription_is_reported_with_its_item_and_reason() {
    let fake = FakeRealtime::builder().transcription_fails(
        "audio_unintelligible",
        "The audio could not be transcribed.",
    );
    let (world, report, events) = call(fake, agent_settings("tr-fail", None), &script(2)).await;

    assert_eq!(report.leg().expect("a leg").turns_spoken, [0, 1]);
    let failed: Vec<pb::TranscriptionFailed> = events_of(&events, |k| match k {
        pb::call_event::Kind::TranscriptionFailed(t) => Some(t),
        _ => None,
    });
    assert_eq!(failed.len(), 2, "{events:?}");
    for f in &failed {
        assert!(f.item_id.starts_with("item_"), "{f:?}");
        assert_eq!(f.error_type, "transcription_error");
        assert_eq!(f.error_code, "audio_unintelligible");
        assert_eq!(f.message, "The audio could not be transcribed.");
    }
    assert_ne!(failed[0].item_id, failed[1].item_id);
    let transcript = flatten(&world.transcript(&events[0].call_id).await);
    assert!(
        transcript.iter().all(|(who, _)| who != "caller"),
        "{transcript:?}"
    );
    assert_eq!(world.fake.connections().len(), 1, "the session goes on");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_that_do_not_complete_are_reported_and_rate_limits_exported() {
    let outcome =
        |status: &str, reason: Option<&str>, error: Option<(&str, &str)>| ResponseOutcome {
            status: status.to_owned(),
            reason: reason.map(str::to_owned),
            error: error.map(|(t, c)| (t.to_owned(), c.to_owned())),
        };
    let fake = FakeRealtime::builder()
        .response_outcome(0, outcome("incomplete", Some("max_output_tokens"), None))
        .response_outcome(
            1,
            outcome("failed", None, Some(("server_error", "internal"))),
        )
        .response_outcome(2, outcome("cancelled", Some("client_cancelled"), None));
    let (world, report, events) = call(fake, agent_settings("statuses", None), &script(3)).await;

    assert_eq!(report.leg().expect("a leg").closed_by, ClosedBy::Caller);
    let ended_responses: Vec<pb::ResponseEnded> = events_of(&events, |k| match k {
        pb::call_event::Kind::ResponseEnded(r) => Some(r),
        _ => None,
    });
    let model = world.fake.connection(0).expect("a session");
    let ids: Vec<&str> = model
        .responses
        .iter()
        .map(|r| r.response_id.as_str())
        .collect();
    assert_eq!(ids.len(), 3);
    let got: Vec<(&str, &str, &str, &str, &str)> = ended_responses
        .iter()
        .map(|r| {
            (
                r.response_id.as_str(),
                r.status.as_str(),
                r.reason.as_str(),
                r.error_type.as_str(),
                r.error_code.as_str(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            (ids[0], "incomplete", "max_output_tokens", "", ""),
            (ids[1], "failed", "", "server_error", "internal"),
            (ids[2], "cancelled", "client_cancelled", "", ""),
        ]
    );
    // A failed response is not a session error: no reconnect, no model_error event.
    assert_eq!(world.fake.connections().len(), 1);
    assert!(model_errors(&events).is_empty(), "{events:?}");

    // Each response began with `rate_limits.updated` (the fake's: requests 4999 of 5000,
    // tokens 39000 of 40000): the pod exports the latest.
    let metrics = callbridge_testkit::http::request(
        world.relay_metrics[0],
        "GET",
        &world.relay_metrics[0].to_string(),
        "/metrics",
        &[],
        None,
        Duration::from_secs(10),
    )
    .await
    .expect("metrics")
    .body;
    for line in [
        "callbridge_relay_model_rate_limit_remaining{limit=\"requests\"} 4999",
        "callbridge_relay_model_rate_limit{limit=\"requests\"} 5000",
        "callbridge_relay_model_rate_limit_remaining{limit=\"tokens\"} 39000",
        "callbridge_relay_model_rate_limit{limit=\"tokens\"} 40000",
    ] {
        assert!(metrics.contains(line), "{line} in\n{metrics}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_names_the_client_event_that_caused_it() {
    // The greeting's `response.create` is refused; the call goes on.
    let fake = FakeRealtime::builder().error_on_client_event(
        "response.create",
        "test_refused",
        "Refused by the test.",
    );
    let settings = agent_settings("correlate", Some("Hello from the agent"));
    let (world, report, events) = call(fake, settings, &script(1)).await;

    assert_eq!(report.leg().expect("a leg").turns_spoken, [0]);
    let model = world.fake.connection(0).expect("a session");
    let at = model
        .client_events
        .iter()
        .position(|t| t == "response.create")
        .expect("a response.create");
    let sent_id = model.client_event_ids[at]
        .clone()
        .expect("the relay sent an event_id");
    // Every client event but the appends carries one, each its own.
    assert!(model.client_event_ids.iter().all(Option::is_some));
    let mut unique = model.client_event_ids.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), model.client_event_ids.len());

    let errors = model_errors(&events);
    assert_eq!(errors.len(), 1, "{errors:?}");
    let e = &errors[0];
    assert_eq!(e.code, "test_refused");
    assert_eq!(e.message, "Refused by the test.");
    assert!(!e.fatal);
    assert_eq!(e.client_event_id, sent_id);
    assert_eq!(e.client_event_type, "response.create");
    assert_eq!(world.fake.connections().len(), 1, "a recoverable error");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_expired_error_replaces_the_session() {
    // After its 4th event (the first turn's `speech_stopped`) the first session says it
    // expired.
    let fake = FakeRealtime::builder()
        .error_after_events(
            4,
            "session_expired",
            "Your session hit the maximum duration.",
        )
        .faults_only_on_first(1);
    let (world, report, events) = call(fake, agent_settings("expired", None), &script(2)).await;

    let leg = report.leg().expect("a leg");
    assert_eq!(leg.closed_by, ClosedBy::Caller);
    assert_eq!(world.fake.connections().len(), 2, "a new session");
    assert!(world.fake.connection(0).expect("first").closed);
    let errors = model_errors(&events);
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0].code, "session_expired");
    assert!(errors[0].fatal);
    assert_eq!(ended(&events).reason, pb::EndReason::CallerHangup as i32);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_no_session_can_get_past_ends_the_call_with_the_fallback() {
    let fake = FakeRealtime::builder().error_after_events(
        3,
        "insufficient_quota",
        "You exceeded your current quota.",
    );
    let mut settings = agent_settings("quota", None);
    settings.fallback = Some(pb::Fallback {
        action: Some(pb::fallback::Action::DialNumber("+14155550111".to_owned())),
        preamble: String::new(),
    });
    let (world, report, events) = call(fake, settings, &script(2)).await;

    let leg = report.leg().expect("a leg");
    assert!(
        matches!(leg.closed_by, ClosedBy::Relay { .. }),
        "{:?}",
        leg.closed_by
    );
    assert_eq!(world.fake.connections().len(), 1, "no second session");
    let end = ended(&events);
    assert_eq!(end.reason, pb::EndReason::ModelUnavailable as i32);
    assert!(end.detail.contains("insufficient_quota"), "{end:?}");
    let errors = model_errors(&events);
    assert!(
        errors
            .iter()
            .any(|e| e.code == "insufficient_quota" && e.fatal),
        "{errors:?}"
    );
    assert_eq!(
        report.last_after().and_then(|t| t.dial_number.clone()),
        Some("+14155550111".to_owned()),
        "the caller gets the agent's fallback"
    );
}

fn turn_detection_off(marker: &str, silence_commit_ms: Option<u32>) -> pb::AgentSettings {
    pb::AgentSettings {
        turn_detection: Some(pb::TurnDetection {
            r#type: pb::turn_detection::Type::None as i32,
            silence_commit_ms,
            ..Default::default()
        }),
        ..agent_settings(marker, None)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn turn_detection_off_the_relay_commits_each_turn_after_the_silence() {
    let script = script(2);
    let (world, report, events) = call(
        FakeRealtime::builder(),
        turn_detection_off("vad-off", Some(400)),
        &script,
    )
    .await;

    let leg = report.leg().expect("a leg");
    assert_eq!(leg.turns_spoken, [0, 1]);
    assert!(leg.answer_timeouts.is_empty(), "every turn was answered");
    let model = world.fake.connection(0).expect("a session");
    assert!(
        model.session_updates[0]["audio"]["input"]["turn_detection"].is_null(),
        "{:?}",
        model.session_updates[0]
    );
    assert_eq!(model.speech_segments, 0, "no server VAD");
    assert_eq!(model.commits, 2, "{:?}", model.client_events);
    assert_eq!(model.caller_transcripts, ["Caller line 0", "Caller line 1"]);
    let texts: Vec<&str> = model.responses.iter().map(|r| r.text.as_str()).collect();
    assert_eq!(texts, ["Agent line 0", "Agent line 1"]);
    // Each commit is followed by the relay's request for the answer.
    let order: Vec<&str> = model
        .client_events
        .iter()
        .map(String::as_str)
        .filter(|t| *t != "session.update")
        .collect();
    assert_eq!(
        order,
        [
            "input_audio_buffer.commit",
            "response.create",
            "input_audio_buffer.commit",
            "response.create"
        ]
    );
    let transcript = flatten(&world.transcript(&events[0].call_id).await);
    assert_eq!(
        transcript.iter().filter(|(who, _)| who == "caller").count(),
        2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn turn_detection_off_a_commit_command_ends_the_caller_s_turn() {
    let script = Conversation {
        greeting: None,
        turns: vec![Turn::new(
            "Caller line 0",
            400,
            AgentReply::says("Agent line 0", 400),
        )],
    };
    let world = World::builder(FakeRealtime::builder().script(script.clone()).speed(2.0))
        .start()
        .await;
    world
        .default_agent(turn_detection_off("commit-cmd", None))
        .await;
    let mut cfg = world.caller(script);
    cfg.hang_up_at_end = false;
    cfg.answer_wait = Duration::from_secs(30);
    let handle = SimCaller::new(cfg.clone()).start();
    let live = handle.live.clone();
    // The caller spoke (200 ms of silence, 400 ms of tone) and waits in silence: nothing
    // commits by itself.
    assert!(
        eventually(CALL, || world
            .fake
            .connection(0)
            .is_some_and(|c| c.appended_audio_bytes >= 1200 * 8))
        .await,
        "the caller is heard"
    );
    let model = world.fake.connection(0).expect("a session");
    assert_eq!(model.commits, 0);
    assert!(model.responses.is_empty());

    let call = world
        .call_by_sid(&cfg.call_sid)
        .await
        .expect("the call is listed");
    let sent = with_timeout(
        Duration::from_secs(10),
        "SendCommand",
        world.calls().send_command(pb::SendCommandRequest {
            call_id: call.call_id.clone(),
            command: Some(pb::Command {
                command_id: "commit-1".to_owned(),
                kind: Some(pb::command::Kind::CommitInput(pb::CommitInputCommand {})),
            }),
        }),
    )
    .await
    .expect("command accepted")
    .into_inner();
    assert!(
        eventually(CALL, || live.media_bytes_played.load(Ordering::SeqCst)
            >= 400 * 8)
        .await,
        "the answer is heard"
    );
    handle.command(CallerCommand::Stop).await;
    with_timeout(CALL, "the call ends", handle.join())
        .await
        .expect("runs");
    world
        .wait_ended(&call.call_id, Duration::from_secs(10))
        .await;

    let model = world.fake.connection(0).expect("a session");
    assert_eq!(model.commits, 1);
    assert_eq!(model.caller_transcripts, ["Caller line 0"]);
    assert_eq!(model.responses[0].text, "Agent line 0");
    let events = world.stored_events(&call.call_id).await;
    let applied: Vec<pb::CommandApplied> = events_of(&events, |k| match k {
        pb::call_event::Kind::CommandApplied(c) => Some(c),
        _ => None,
    });
    assert_eq!(applied.len(), 1);
    assert_eq!(applied[0].command_id, sent.command_id);
}

fn dtmf_items(world: &World, conn: usize) -> Vec<String> {
    world
        .fake
        .connection(conn)
        .expect("a session")
        .items_created
        .iter()
        .filter(|i| i["type"] == "message" && i["role"] == "user")
        .filter_map(|i| i["content"][0]["text"].as_str().map(str::to_owned))
        .filter(|t| t.starts_with("DTMF"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_reaches_the_model_only_when_the_agent_asks_for_it() {
    let mut first = Turn::new(
        "I pressed five",
        400,
        AgentReply::says("You pressed five", 400),
    );
    first.dtmf_before = Some("5".to_owned());
    let script = Conversation {
        greeting: None,
        turns: vec![first],
    };
    let world = World::builder(FakeRealtime::builder().script(script.clone()).speed(2.0))
        .start()
        .await;
    for (n, dtmf_to_model) in [(0, true), (1, false)] {
        let settings = pb::AgentSettings {
            dtmf_to_model,
            ..agent_settings(&format!("dtmf-{dtmf_to_model}"), None)
        };
        world.default_agent(settings).await;
        let mut cfg = world.caller(script.clone());
        cfg.answer_wait = Duration::from_secs(3);
        let report = with_timeout(CALL, "the call", SimCaller::new(cfg.clone()).run())
            .await
            .expect("the call runs");
        assert!(report.leg().is_some_and(|l| l.protocol_errors.is_empty()));
        let call = world
            .call_by_sid(&cfg.call_sid)
            .await
            .expect("the call is stored");
        world
            .wait_ended(&call.call_id, Duration::from_secs(10))
            .await;
        let events = world.stored_events(&call.call_id).await;
        let digits: Vec<pb::Dtmf> = events_of(&events, |k| match k {
            pb::call_event::Kind::Dtmf(d) => Some(d),
            _ => None,
        });
        assert_eq!(digits.len(), 1, "stored either way");
        let model = world.fake.connection(n).expect("a session per call");
        if dtmf_to_model {
            assert_eq!(dtmf_items(&world, n), ["DTMF: 5"]);
            assert!(model.response_creates >= 1, "the key is answered");
        } else {
            assert!(
                dtmf_items(&world, n).is_empty(),
                "{:?}",
                model.items_created
            );
            assert_eq!(model.response_creates, 0);
        }
    }
}

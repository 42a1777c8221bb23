//! End-to-end: real relay + real control + real redis-server, the fake model and a
//! simulated Twilio caller, all on loopback. A whole call, and a barge-in.

use std::time::Duration;

use callbridge_proto::pb;
use callbridge_testkit::conversation::{AgentReply, Conversation, Turn};
use callbridge_testkit::fake_realtime::FakeRealtime;
use callbridge_testkit::sim_caller::{ClosedBy, SimCaller};
use callbridge_tests::scenario::Scenario;
use callbridge_tests::{PUBLIC_URL, World, agent_settings, flatten, with_timeout};

const CALL: Duration = Duration::from_secs(60);

/// The sample call (`Conversation::sample`), written out: a greeting and two exchanges.
fn opening_hours_call() -> Scenario {
    Scenario::inbound()
        .agent_greets("Hello, thanks for calling. How can I help?", 800)
        .caller_says("What are your opening hours?", 600)
        .agent_replies("We are open nine to five, Monday to Friday.", 1000)
        .caller_says("Thank you, goodbye.", 500)
        .agent_replies("Goodbye, have a nice day.", 600)
        .caller_hangs_up()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_call_is_stored_as_said_in_order() {
    let call = opening_hours_call();
    assert_eq!(call.script(), Conversation::sample());
    // The model sends audio faster than real time, as OpenAI does; Twilio buffers it.
    let world = World::builder(FakeRealtime::builder().script(call.script()).speed(2.0))
        .start()
        .await;
    world
        .default_agent(agent_settings(
            "full-call",
            Some("Hello, thanks for calling. How can I help?"),
        ))
        .await;

    let placed = call.place(&world).await;

    // Webhook → TwiML pointing at the public URLs, signed stream accepted.
    let call_id = &placed.call_id;
    let twiml = placed.report.webhook.twiml.as_ref().expect("twiml");
    assert_eq!(
        twiml.stream_url.as_deref(),
        Some(format!("wss://relay.callbridge.test/api/twilio/media-stream/{call_id}").as_str())
    );
    // The action URL names the stream by its credential's id (docs/resilience.md).
    let action = twiml.connect_action.as_deref().expect("an action URL");
    let stream_id = action
        .strip_prefix(&format!("{PUBLIC_URL}/api/twilio/after/{call_id}?stream="))
        .unwrap_or_else(|| panic!("{action}"));
    assert!(
        stream_id.len() == 32 && stream_id.bytes().all(|b| b.is_ascii_hexdigit()),
        "{action}"
    );
    placed.heard_every_reply();
    let leg = placed.leg();
    assert_eq!(leg.turns_spoken, vec![0, 1]);
    assert_eq!(leg.closed_by, ClosedBy::Caller);
    assert!(leg.clears.is_empty(), "nobody barged in: {:?}", leg.clears);

    // The relay passed every byte the model produced to the caller, and marked it.
    let model = world.fake.connection(0).expect("one model session");
    assert_eq!(world.fake.connections_accepted(), 1);
    let produced_ms: u64 = model.responses.iter().map(|r| r.audio_sent_ms).sum();
    assert_eq!(produced_ms, 800 + 1000 + 600);
    assert_eq!(produced_ms, call.agent_audio_ms());
    assert_eq!(leg.media_bytes_received, produced_ms * 8);
    assert!(!leg.marks_echoed.is_empty());

    // The model session was set up as the GA interface wants it.
    assert!(
        !model.beta_header,
        "no OpenAI-Beta header on the GA interface"
    );
    assert!(model.uri.contains("model="), "{}", model.uri);
    let session = model.session_updates.first().expect("a session.update");
    assert_eq!(session["type"], "realtime");
    assert_eq!(session["audio"]["input"]["format"]["type"], "audio/pcmu");
    assert_eq!(session["audio"]["output"]["format"]["type"], "audio/pcmu");
    assert_eq!(session["audio"]["output"]["voice"], "marin");
    assert!(session.get("temperature").is_none());
    assert!(
        session["instructions"]
            .as_str()
            .is_some_and(|i| i.contains("full-call")),
        "{session}"
    );
    assert!(model.truncates.is_empty(), "{:?}", model.truncates);
    assert!(model.errors_sent.is_empty(), "{:?}", model.errors_sent);
    assert_eq!(
        model.caller_transcripts,
        vec!["What are your opening hours?", "Thank you, goodbye."]
    );
    assert_eq!(model.caller_transcripts, call.caller_lines());

    // Control stored the call and its transcript, in order, as said.
    let (stored, transcript) = placed.stored(&world).await;
    assert_eq!(
        stored.status,
        pb::CallStatus::Completed as i32,
        "{stored:?}"
    );
    assert_eq!(
        stored.end_reason,
        pb::EndReason::CallerHangup as i32,
        "{stored:?}"
    );
    assert_eq!(stored.twilio_call_sid, placed.call_sid);
    assert_eq!(stored.stream_sid, leg.stream_sid);
    let usage = stored.usage.expect("usage totals");
    assert_eq!(usage.responses, 3);
    assert!(usage.output_audio_tokens > 0);
    assert_eq!(flatten(&transcript), call.expected_transcript());
    let seqs: Vec<u64> = transcript.turns.iter().map(|t| t.seq).collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "turns in event order: {seqs:?}"
    );
    for turn in &transcript.turns {
        if let Some(pb::turn::Kind::Assistant(a)) = &turn.kind {
            assert!(!a.interrupted);
            assert_eq!(a.heard_ms, a.audio_ms, "heard all of {a:?}");
        }
    }
}

/// The caller asks a question, talks over the long answer after 800 ms, and asks again.
fn barge_in_call() -> Scenario {
    Scenario::inbound()
        .caller_says("Tell me everything about your plans", 500)
        .agent_replies(
            "We have three plans: basic, plus and premium, and each of them comes \
             with a different set of features that I will now describe in detail",
            3000,
        )
        .caller_interrupts_after(800)
        .caller_says("Just the basic plan please", 500)
        .agent_replies("The basic plan is ten dollars a month", 600)
        .caller_hangs_up()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn barge_in_clears_the_caller_and_truncates_at_what_was_heard() {
    barge_in_truncates_at_what_was_heard(Some(20)).await;
}

/// The same with the model's deltas of varying sizes (20 to 100 ms, odd ones too), as the
/// real API sends them: the truncate point still follows what the caller heard, to within
/// the delta that was playing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn barge_in_truncates_at_what_was_heard_whatever_the_delta_sizes() {
    barge_in_truncates_at_what_was_heard(None).await;
}

async fn barge_in_truncates_at_what_was_heard(delta_ms: Option<u32>) {
    let call = barge_in_call();
    let late = 3;
    // Deltas sent faster than real time: Twilio holds unplayed audio when the caller
    // barges in, so "sent" and "heard" differ. A few deltas still arrive after
    // speech_started; the relay must drop them.
    let mut fake = FakeRealtime::builder()
        .script(call.script())
        .speed(1.5)
        .late_deltas(late);
    if let Some(ms) = delta_ms {
        fake = fake.chunk_ms(ms);
    }
    let world = World::builder(fake).start().await;
    world.default_agent(agent_settings("barge-in", None)).await;

    let placed = call.place(&world).await;
    let leg = placed.leg();
    assert!(leg.protocol_errors.is_empty(), "{:?}", leg.protocol_errors);
    assert_eq!(leg.turns_spoken, vec![0, 1]);

    // The caller got exactly one clear, after hearing at least the 800 ms it waited for.
    assert_eq!(leg.clears.len(), 1, "{:?}", leg.clears);
    let clear = &leg.clears[0];
    assert!(clear.heard_answer_ms >= 800.0, "{clear:?}");
    assert!(
        clear.dropped_ms > 0.0,
        "audio was still queued at Twilio: {clear:?}"
    );

    // The model got exactly one truncate, for the interrupted item, accepted, at what the
    // caller had heard (within one 20 ms frame), never past what was produced.
    let model = world.fake.connection(0).expect("one model session");
    assert_eq!(model.truncates.len(), 1, "{:?}", model.truncates);
    let truncate = &model.truncates[0];
    let cut = &model.responses[0];
    assert_eq!(cut.status, "cancelled");
    assert_eq!(Some(&truncate.item_id), cut.item_id.as_ref());
    assert_eq!(truncate.error, None, "{truncate:?}");
    assert!(truncate.audio_end_ms <= cut.audio_sent_ms);
    // What the caller had heard when it started talking over the agent; the relay learns
    // it from echoed marks (about one per 100 ms of audio) and follows playback by the
    // clock in between, so the truncate point is within one 20 ms frame of it whatever
    // the delta sizes, and never beyond what the caller heard before the clear.
    let within = 20.0;
    assert_eq!(leg.barge_ins.len(), 1);
    let barge = leg.barge_ins[0].heard_answer_ms;
    let end = truncate.audio_end_ms as f64;
    assert!(
        end >= barge - within && end <= clear.heard_answer_ms + 1.0,
        "truncated at {end} ms; caller heard {barge} ms when it started speaking and {} ms \
         when the audio was cleared (acked by marks: {} ms)",
        clear.heard_answer_ms,
        clear.acked_answer_ms
    );

    // The late deltas of the cancelled response never reached the caller.
    match delta_ms {
        Some(ms) => assert_eq!(cut.late_audio_ms, u64::from(late * ms)),
        None => assert!(cut.late_audio_ms > 0, "{cut:?}"),
    }
    let produced_ms: u64 = model.responses.iter().map(|r| r.audio_sent_ms).sum();
    assert_eq!(
        leg.media_bytes_received,
        (produced_ms - cut.late_audio_ms) * 8
    );

    // Control stored the interruption with the same heard time.
    let (_, transcript) = placed.stored(&world).await;
    let flat = flatten(&transcript);
    assert_eq!(flat, call.expected_transcript());
    let interrupted: Vec<&pb::AssistantSpeech> = transcript
        .turns
        .iter()
        .filter_map(|t| match &t.kind {
            Some(pb::turn::Kind::Assistant(a)) if a.interrupted => Some(a),
            _ => None,
        })
        .collect();
    assert_eq!(interrupted.len(), 1, "{transcript:?}");
    let stored = f64::from(interrupted[0].heard_ms);
    assert!(
        (stored - truncate.audio_end_ms as f64).abs() <= 20.0,
        "stored heard {stored} ms, truncated at {} ms",
        truncate.audio_end_ms
    );
    let events = world.stored_events(&placed.call_id).await;
    assert_eq!(
        events
            .iter()
            .filter(|e| matches!(e.kind, Some(pb::call_event::Kind::Interruption(_))))
            .count(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dtmf_is_stored_and_a_say_command_is_spoken() {
    use std::sync::atomic::Ordering;

    use callbridge_testkit::eventually;
    use callbridge_testkit::sim_caller::CallerCommand;

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
    world.default_agent(agent_settings("dtmf-say", None)).await;
    let mut cfg = world.caller(script);
    cfg.hang_up_at_end = false;
    let handle = SimCaller::new(cfg.clone()).start();
    let live = handle.live.clone();
    // The scripted turn is answered in full (400 ms of audio).
    assert!(
        eventually(CALL, || live.media_bytes_played.load(Ordering::SeqCst)
            >= 400 * 8)
        .await,
        "the answer is heard"
    );
    let call = world
        .call_by_sid(&cfg.call_sid)
        .await
        .expect("the call is listed");

    // The application makes the agent say something.
    with_timeout(
        Duration::from_secs(10),
        "SendCommand",
        world.calls().send_command(pb::SendCommandRequest {
            call_id: call.call_id.clone(),
            command: Some(pb::Command {
                command_id: String::new(),
                kind: Some(pb::command::Kind::Say(pb::SayCommand {
                    text: "Please hold while I check".to_owned(),
                })),
            }),
        }),
    )
    .await
    .expect("command accepted");
    // The fake speaks the instruction for 500 ms; the caller hears it.
    assert!(
        eventually(CALL, || live.media_bytes_played.load(Ordering::SeqCst)
            >= 900 * 8)
        .await,
        "the said text is heard"
    );
    handle.command(CallerCommand::Stop).await;
    let report = with_timeout(CALL, "the call ends", handle.join())
        .await
        .expect("runs");
    assert!(report.leg().is_some_and(|l| l.protocol_errors.is_empty()));

    let model = world.fake.connection(0).expect("model session");
    assert!(
        model
            .items_created
            .iter()
            .any(|i| i.to_string().contains("Please hold while I check")),
        "{:?}",
        model.items_created
    );
    let _ = world
        .wait_ended(&call.call_id, Duration::from_secs(10))
        .await;
    let flat = flatten(&world.transcript(&call.call_id).await);
    let dtmf = flat
        .iter()
        .position(|t| *t == ("dtmf".to_owned(), "5".to_owned()))
        .unwrap_or_else(|| panic!("dtmf stored: {flat:?}"));
    let line = flat
        .iter()
        .position(|t| *t == ("caller".to_owned(), "I pressed five".to_owned()))
        .unwrap_or_else(|| panic!("caller line stored: {flat:?}"));
    assert!(dtmf < line, "the key was pressed before speaking: {flat:?}");
    assert!(
        flat.iter()
            .any(|(who, text)| who == "assistant" && text.contains("Please hold while I check")),
        "{flat:?}"
    );
}

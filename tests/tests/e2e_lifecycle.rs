//! End-to-end: how calls end (the `end_call` tool, an application hang-up), and a control
//! plane that dies mid-call.

use std::sync::atomic::Ordering;
use std::time::Duration;

use callbridge_proto::pb;
use callbridge_testkit::conversation::{AgentReply, Conversation, Turn};
use callbridge_testkit::eventually;
use callbridge_testkit::fake_realtime::FakeRealtime;
use callbridge_testkit::sim_caller::{CallReport, ClosedBy, SimCaller};
use callbridge_tests::{World, agent_settings, expected_transcript, flatten, with_timeout};

const CALL: Duration = Duration::from_secs(60);

fn call_id_of(report: &CallReport) -> String {
    report
        .webhook
        .twiml
        .as_ref()
        .and_then(|t| t.parameters.iter().find(|(k, _)| k == "callId"))
        .map(|(_, v)| v.clone())
        .expect("callId parameter in the webhook TwiML")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_end_call_tool_hangs_up_after_the_goodbye() {
    let script = Conversation {
        greeting: None,
        turns: vec![Turn::new(
            "That is all, thank you",
            500,
            AgentReply::says("You are welcome, goodbye", 700).then_calls("end_call", "{}"),
        )],
    };
    let world = World::builder(FakeRealtime::builder().script(script.clone()).speed(2.0))
        .start()
        .await;
    let mut settings = agent_settings("end-call", None);
    settings.builtin_tools = Some(pb::BuiltinTools {
        end_call: true,
        ..Default::default()
    });
    world.default_agent(settings).await;

    let mut caller = world.caller(script.clone());
    // The caller would stay on the line: only the agent can end this call.
    caller.hang_up_at_end = false;
    caller.max_call = Duration::from_secs(20);
    let report = with_timeout(CALL, "the call", SimCaller::new(caller).run())
        .await
        .expect("runs");
    let leg = report.leg().expect("a stream");
    assert!(
        matches!(leg.closed_by, ClosedBy::Relay { .. }),
        "{:?}",
        leg.closed_by
    );
    assert!(leg.protocol_errors.is_empty(), "{:?}", leg.protocol_errors);
    // The goodbye was heard in full before the line was closed.
    assert_eq!(leg.media_bytes_played, 700 * 8);
    let after = report
        .last_after()
        .expect("Twilio fetched the <Connect action>");
    assert!(after.hangup, "{after:?}");

    // The tool call reached the model's session as a finished call.
    let model = world.fake.connection(0).expect("model session");
    assert_eq!(
        model.responses[0]
            .function_call
            .as_ref()
            .map(|(_, n)| n.as_str()),
        Some("end_call")
    );
    let call_id = call_id_of(&report);
    let call = world.wait_ended(&call_id, Duration::from_secs(10)).await;
    assert_eq!(
        call.end_reason,
        pb::EndReason::AgentHangup as i32,
        "{call:?}"
    );
    assert_eq!(call.status, pb::CallStatus::Completed as i32);
    // The caller's line first; the goodbye (stored once its playback finished, so possibly
    // after the tool call) and the built-in tool call both stored.
    let transcript = world.transcript(&call_id).await;
    let flat = flatten(&transcript);
    assert_eq!(flat[0], expected_transcript(&script)[0], "{flat:?}");
    assert!(flat.contains(&expected_transcript(&script)[1]), "{flat:?}");
    let tool = transcript
        .turns
        .iter()
        .find_map(|t| match &t.kind {
            Some(pb::turn::Kind::ToolCall(c)) => Some(c),
            _ => None,
        })
        .expect("the tool call is in the transcript");
    assert_eq!(tool.name, "end_call");
    assert!(tool.builtin);
}

fn long_script() -> Conversation {
    let turns = (0..6)
        .map(|n| {
            Turn::new(
                format!("Question number {n}"),
                400,
                AgentReply::says(format!("Answer number {n}"), 500),
            )
        })
        .collect();
    Conversation {
        greeting: Some(AgentReply::says("Welcome", 400)),
        turns,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hangup_command_from_the_app_ends_the_call() {
    let script = long_script();
    let world = World::builder(FakeRealtime::builder().script(script.clone()).speed(2.0))
        .start()
        .await;
    world
        .default_agent(agent_settings("hangup-cmd", Some("Welcome")))
        .await;
    let mut cfg = world.caller(script);
    cfg.hang_up_at_end = false;
    let handle = SimCaller::new(cfg.clone()).start();
    let live = handle.live.clone();
    assert!(
        eventually(CALL, || live.turns_spoken.load(Ordering::SeqCst) >= 1).await,
        "the call gets going"
    );
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
                command_id: String::new(),
                kind: Some(pb::command::Kind::Hangup(pb::HangupCommand {
                    reason: "test hangs up".to_owned(),
                })),
            }),
        }),
    )
    .await
    .expect("command accepted")
    .into_inner();
    assert!(!sent.command_id.is_empty());

    let report = with_timeout(CALL, "the call ends", handle.join())
        .await
        .expect("runs");
    let leg = report.leg().expect("a stream");
    assert!(
        matches!(leg.closed_by, ClosedBy::Relay { .. }),
        "{:?}",
        leg.closed_by
    );
    assert!(
        leg.turns_spoken.len() < 6,
        "ended early: {:?}",
        leg.turns_spoken
    );
    assert!(report.last_after().expect("after").hangup);
    let ended = world
        .wait_ended(&call.call_id, Duration::from_secs(10))
        .await;
    assert_eq!(
        ended.end_reason,
        pb::EndReason::AppHangup as i32,
        "{ended:?}"
    );
    // The app learns the command was applied, and a second one is refused: not live.
    let events = world.stored_events(&call.call_id).await;
    assert!(events.iter().any(|e| matches!(
        &e.kind,
        Some(pb::call_event::Kind::CommandApplied(c)) if c.command_id == sent.command_id
    )));
    let again = with_timeout(
        Duration::from_secs(10),
        "SendCommand",
        world.calls().send_command(pb::SendCommandRequest {
            call_id: call.call_id.clone(),
            command: Some(pb::Command {
                command_id: String::new(),
                kind: Some(pb::command::Kind::Hangup(pb::HangupCommand::default())),
            }),
        }),
    )
    .await
    .expect_err("the call is over");
    assert_eq!(again.code(), tonic::Code::FailedPrecondition);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_killed_mid_call_loses_nothing() {
    let script = long_script();
    let mut world = World::builder(FakeRealtime::builder().script(script.clone()).speed(2.0))
        .start()
        .await;
    world
        .default_agent(agent_settings("failover", Some("Welcome")))
        .await;
    let cfg = world.caller(script.clone());
    let handle = SimCaller::new(cfg.clone()).start();
    let live = handle.live.clone();
    assert!(
        eventually(CALL, || live.turns_spoken.load(Ordering::SeqCst) >= 1).await,
        "the call gets going"
    );
    let call_id = world
        .call_by_sid(&cfg.call_sid)
        .await
        .expect("the call is listed")
        .call_id;

    // Control dies (SIGKILL: no goodbye to the relay's stream).
    world.control.kill();
    let heard_before = live.media_bytes_received.load(Ordering::SeqCst);
    let turns_before = live.turns_spoken.load(Ordering::SeqCst);
    // Audio does not wait on control: the conversation goes on while it is down.
    assert!(
        eventually(CALL, || live.turns_spoken.load(Ordering::SeqCst)
            >= turns_before + 2)
        .await,
        "turns go on without control"
    );
    let heard_during = live.media_bytes_received.load(Ordering::SeqCst) - heard_before;
    assert!(
        heard_during > 0,
        "the agent kept talking while control was down"
    );

    // Control comes back on the same Redis; the relay re-attaches and resends.
    world.restart_control().await;
    let report = with_timeout(CALL, "the call", handle.join())
        .await
        .expect("runs");
    let leg = report.leg().expect("a stream");
    assert_eq!(leg.closed_by, ClosedBy::Caller);
    assert_eq!(leg.turns_spoken, (0..6).collect::<Vec<_>>());
    assert!(leg.answer_timeouts.is_empty(), "{:?}", leg.answer_timeouts);

    let call = world.wait_ended(&call_id, Duration::from_secs(20)).await;
    assert_eq!(call.status, pb::CallStatus::Completed as i32, "{call:?}");
    // Every event stored once, numbered 1..=n with no gap and no duplicate.
    let events = world.stored_events(&call_id).await;
    let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
    let want: Vec<u64> = (1..=seqs.len() as u64).collect();
    assert_eq!(seqs, want);
    assert_eq!(call.last_seq, seqs.len() as u64);
    assert!(matches!(
        events.last().and_then(|e| e.kind.as_ref()),
        Some(pb::call_event::Kind::Ended(_))
    ));
    assert_eq!(
        flatten(&world.transcript(&call_id).await),
        expected_transcript(&script)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_relay_finishes_its_calls_and_refuses_new_ones() {
    let script = long_script();
    // Without hand-off (RELAY_DRAIN_HANDOFF=false) a draining relay keeps its calls to the
    // end; hand-offs to other relays: e2e_resilience.rs.
    let mut world = World::builder(FakeRealtime::builder().script(script.clone()).speed(2.0))
        .relay_env("RELAY_DRAIN_GRACE_SECS", "60")
        .relay_env("RELAY_DRAIN_HANDOFF", "false")
        .start()
        .await;
    world
        .default_agent(agent_settings("drain", Some("Welcome")))
        .await;
    let cfg = world.caller(script.clone());
    let handle = SimCaller::new(cfg.clone()).start();
    let live = handle.live.clone();
    assert!(
        eventually(CALL, || live.turns_spoken.load(Ordering::SeqCst) >= 1).await,
        "the call gets going"
    );

    // SIGTERM: the relay stops taking calls but lets the live one run on.
    world.relays[0].terminate().expect("SIGTERM");
    let addr = world.relays[0].addr;
    let mut ready_status = 0;
    for _ in 0..100 {
        let r = with_timeout(
            Duration::from_secs(5),
            "readyz",
            callbridge_testkit::http::request(
                addr,
                "GET",
                &addr.to_string(),
                "/readyz",
                &[],
                None,
                Duration::from_secs(2),
            ),
        )
        .await
        .expect("the draining relay still answers probes");
        ready_status = r.status;
        if ready_status == 503 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(ready_status, 503, "not ready while draining");
    let newcomer = with_timeout(
        Duration::from_secs(10),
        "webhook",
        SimCaller::new(world.caller(Conversation::default())).webhook(),
    )
    .await
    .expect("answers");
    // The webhook is still answered (Twilio does not retry a 503; the TwiML only names
    // the public URL), but the stream it opens is refused here: the balancer sends it to
    // a ready relay.
    assert_eq!(newcomer.response.status, 200, "{}", newcomer.response.body);
    let stream_url = newcomer
        .twiml
        .as_ref()
        .and_then(|t| t.stream_url.clone())
        .expect("TwiML that opens a stream");
    let refused = with_timeout(
        Duration::from_secs(10),
        "stream upgrade",
        SimCaller::new(world.caller(Conversation::default())).connect_stream(&stream_url),
    )
    .await
    .expect("the relay answers the upgrade");
    assert_eq!(
        refused.err(),
        Some(503),
        "a new stream is refused while draining"
    );

    let report = with_timeout(CALL, "the call", handle.join())
        .await
        .expect("runs");
    let leg = report.leg().expect("a stream");
    assert_eq!(leg.closed_by, ClosedBy::Caller, "the call was not cut");
    assert_eq!(leg.turns_spoken, (0..6).collect::<Vec<_>>());
    assert!(leg.answer_timeouts.is_empty(), "{:?}", leg.answer_timeouts);
    // With its last call gone the relay exits on its own, well before the grace period.
    let status = with_timeout(
        Duration::from_secs(30),
        "relay exit",
        world.relays[0].wait_exit(Duration::from_secs(20)),
    )
    .await
    .expect("the relay exits once drained");
    assert!(status.success(), "{status}");
    let call = world
        .call_by_sid(&cfg.call_sid)
        .await
        .expect("the call is listed");
    let call = world
        .wait_ended(&call.call_id, Duration::from_secs(10))
        .await;
    assert_eq!(
        call.end_reason,
        pb::EndReason::CallerHangup as i32,
        "{call:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_application_tool_call_round_trips_through_the_app() {
    let script = Conversation {
        greeting: None,
        turns: vec![
            Turn::new(
                "Where is my order",
                400,
                AgentReply::says("Let me check", 300)
                    .then_calls("lookup_order", r#"{"order":"42"}"#)
                    .after_output(AgentReply::says("It ships tomorrow", 500)),
            ),
            Turn::new("Thanks, bye", 300, AgentReply::says("Bye", 300)),
        ],
    };
    let world = World::builder(FakeRealtime::builder().script(script.clone()).speed(2.0))
        .start()
        .await;
    let mut settings = agent_settings("app-tool", None);
    settings.tools = vec![pb::Tool {
        name: "lookup_order".to_owned(),
        description: "Finds an order".to_owned(),
        parameters_json: r#"{"type":"object","properties":{"order":{"type":"string"}}}"#.to_owned(),
    }];
    world.default_agent(settings).await;
    let cfg = world.caller(script.clone());
    let handle = SimCaller::new(cfg.clone()).start();
    let live = handle.live.clone();
    assert!(
        eventually(CALL, || live.turns_spoken.load(Ordering::SeqCst) >= 1).await,
        "the caller asks"
    );
    let call_id = world
        .call_by_sid(&cfg.call_sid)
        .await
        .expect("the call is listed")
        .call_id;

    // The application watches the call, sees the tool call and answers it.
    let mut watch = with_timeout(
        Duration::from_secs(10),
        "WatchCall",
        world.calls().watch_call(pb::WatchCallRequest {
            call_id: call_id.clone(),
            after_seq: 0,
        }),
    )
    .await
    .expect("watch")
    .into_inner();
    let tool_call = loop {
        let event = with_timeout(CALL, "tool call event", watch.message())
            .await
            .expect("stream")
            .expect("an event before the end");
        if let Some(pb::call_event::Kind::ToolCall(c)) = event.kind {
            break c;
        }
    };
    assert_eq!(tool_call.name, "lookup_order");
    assert_eq!(tool_call.arguments_json, r#"{"order":"42"}"#);
    assert!(!tool_call.builtin);
    with_timeout(
        Duration::from_secs(10),
        "SendCommand",
        world.calls().send_command(pb::SendCommandRequest {
            call_id: call_id.clone(),
            command: Some(pb::Command {
                command_id: String::new(),
                kind: Some(pb::command::Kind::ToolResult(pb::ToolResult {
                    tool_call_id: tool_call.tool_call_id.clone(),
                    output: r#"{"eta":"tomorrow"}"#.to_owned(),
                    is_error: false,
                })),
            }),
        }),
    )
    .await
    .expect("tool result accepted");

    let report = with_timeout(CALL, "the call", handle.join())
        .await
        .expect("runs");
    let leg = report.leg().expect("a stream");
    assert_eq!(leg.turns_spoken, vec![0, 1]);
    assert!(leg.answer_timeouts.is_empty(), "{:?}", leg.answer_timeouts);
    // The model got the output for its call id, then was asked to respond.
    let model = world.fake.connection(0).expect("model session");
    let output = model
        .items_created
        .iter()
        .find(|i| i["type"] == "function_call_output")
        .expect("function_call_output sent");
    assert_eq!(output["call_id"], tool_call.tool_call_id.as_str());
    assert_eq!(output["output"], r#"{"eta":"tomorrow"}"#);
    assert!(model.errors_sent.is_empty(), "{:?}", model.errors_sent);

    let _ = world.wait_ended(&call_id, Duration::from_secs(10)).await;
    let flat = flatten(&world.transcript(&call_id).await);
    let pos = |who: &str, text: &str| {
        flat.iter()
            .position(|(w, t)| w == who && t == text)
            .unwrap_or_else(|| panic!("{who} {text:?} in {flat:?}"))
    };
    let call = pos("tool_call", "lookup_order");
    let result = pos("tool_result", r#"{"eta":"tomorrow"}"#);
    let answer = pos("assistant", "It ships tomorrow");
    assert!(pos("caller", "Where is my order") < call);
    assert!(call < result && result < answer, "{flat:?}");
    assert!(answer < pos("caller", "Thanks, bye"), "{flat:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transfer_command_dials_the_number_after_the_stream() {
    let script = long_script();
    let world = World::builder(FakeRealtime::builder().script(script.clone()).speed(2.0))
        .start()
        .await;
    let mut settings = agent_settings("transfer", Some("Welcome"));
    settings.builtin_tools = Some(pb::BuiltinTools {
        end_call: false,
        transfer_call: true,
        transfer_numbers: vec!["+14155550177".to_owned()],
    });
    world.default_agent(settings).await;
    let mut cfg = world.caller(script);
    cfg.hang_up_at_end = false;
    let handle = SimCaller::new(cfg.clone()).start();
    let live = handle.live.clone();
    assert!(
        eventually(CALL, || live.turns_spoken.load(Ordering::SeqCst) >= 1).await,
        "the call gets going"
    );
    let call_id = world
        .call_by_sid(&cfg.call_sid)
        .await
        .expect("the call is listed")
        .call_id;
    with_timeout(
        Duration::from_secs(10),
        "SendCommand",
        world.calls().send_command(pb::SendCommandRequest {
            call_id: call_id.clone(),
            command: Some(pb::Command {
                command_id: String::new(),
                kind: Some(pb::command::Kind::Transfer(pb::TransferCommand {
                    number: "+14155550177".to_owned(),
                })),
            }),
        }),
    )
    .await
    .expect("command accepted");
    let report = with_timeout(CALL, "the call", handle.join())
        .await
        .expect("runs");
    let leg = report.leg().expect("a stream");
    assert!(
        matches!(leg.closed_by, ClosedBy::Relay { .. }),
        "{:?}",
        leg.closed_by
    );
    let after = report
        .last_after()
        .expect("Twilio fetched the <Connect action>");
    assert_eq!(
        after.dial_number.as_deref(),
        Some("+14155550177"),
        "{after:?}"
    );
    let call = world.wait_ended(&call_id, Duration::from_secs(10)).await;
    assert_eq!(
        call.end_reason,
        pb::EndReason::Transferred as i32,
        "{call:?}"
    );
    assert_eq!(call.transfer_to, "+14155550177");
}

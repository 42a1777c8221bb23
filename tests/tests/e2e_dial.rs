//! End-to-end: control dials through the fake Twilio REST API (every request validated
//! against Twilio's spec), the fake posts signed status callbacks to the real relay, which
//! forwards them to control; answered calls reach the relay's webhook and stream with the
//! simulated caller. Real control, relay and redis-server; fake Realtime.

use std::time::Duration;

use callbridge_proto::pb;
use callbridge_testkit::conversation::Conversation;
use callbridge_testkit::fake_realtime::FakeRealtime;
use callbridge_testkit::fake_twilio_rest::{FakeTwilio, FakeTwilioConfig, Lifecycle};
use callbridge_tests::{
    TWILIO_TOKEN, World, agent_settings, expected_transcript, flatten, with_timeout,
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
        .dials_through(&twilio)
        .start()
        .await;
    world.answer_from(&twilio);
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
        self.dial_as(&self.agent, to, dial).await
    }

    async fn dial_as(&self, agent: &str, to: &str, dial: pb::DialOptions) -> pb::Call {
        with_timeout(
            LIMIT,
            "CreateCall with dial",
            self.world.calls().create_call(pb::CreateCallRequest {
                agent_id: agent.to_owned(),
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

/// The `answering_machine` events of a call, as (answered_by, action).
fn verdicts(events: &[pb::CallEvent]) -> Vec<(String, pb::answering_machine::Action)> {
    events
        .iter()
        .filter_map(|e| match &e.kind {
            Some(pb::call_event::Kind::AnsweringMachine(m)) => Some((
                m.answered_by.clone(),
                pb::answering_machine::Action::try_from(m.action).unwrap_or_default(),
            )),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn machines_get_the_agents_voicemail_or_a_hang_up_and_people_a_call() {
    use pb::answering_machine::Action;
    use pb::voicemail::Message;
    let script = Conversation::sample();
    let d = dialing(&script).await;
    let greeting = script.greeting.as_ref().map(|g| g.text.as_str());
    const WORDS: &str = "Hi, this is Acme calling about your order. Please call us back.";
    const PLAY: &str = "https://media.example.test/voicemail.mp3";
    let with_voicemail = |name: &str, message: Message| {
        let mut s = agent_settings(name, greeting);
        s.voicemail = Some(pb::Voicemail {
            message: Some(message),
        });
        s
    };
    let spoken = d
        .world
        .create_agent(
            "spoken",
            with_voicemail("spoken", Message::SpokenText(WORDS.into())),
        )
        .await;
    let played = d
        .world
        .create_agent(
            "played",
            with_voicemail("played", Message::PlayUrl(PLAY.into())),
        )
        .await;
    // A machine plays its greeting (here: silence after the agent's) and records until the
    // call is ended for it.
    let machine_greeting = Conversation {
        greeting: script.greeting.clone(),
        turns: Vec::new(),
    };
    let machine = |detect_ms: u64, answered_by: &str| Lifecycle::Machine {
        ring_ms: 50,
        detect_ms,
        answered_by: answered_by.to_owned(),
        script: machine_greeting.clone(),
    };
    let message_end = pb::DialOptions {
        machine_detection: pb::MachineDetection::DetectMessageEnd as i32,
        ..Default::default()
    };
    let enable = pb::DialOptions {
        machine_detection: pb::MachineDetection::Enable as i32,
        ..Default::default()
    };
    let no_detection = pb::DialOptions::default();
    // (number, agent, options, lifecycle, expected verdict, action, end reason)
    let cases = [
        // The verdict mid-call: the model speaks the message, then the call ends.
        (
            "+14155550021",
            &spoken,
            &message_end,
            machine(1500, "machine_end_beep"),
            "machine_end_beep",
            Action::LeaveMessage,
            pb::EndReason::VoicemailLeft,
        ),
        // The verdict at once, likely before the stream attached (the call's context).
        (
            "+14155550022",
            &spoken,
            &message_end,
            machine(0, "machine_end_silence"),
            "machine_end_silence",
            Action::LeaveMessage,
            pb::EndReason::VoicemailLeft,
        ),
        // Twilio plays the message after the stream.
        (
            "+14155550023",
            &played,
            &message_end,
            machine(1000, "machine_end_other"),
            "machine_end_other",
            Action::LeaveMessage,
            pb::EndReason::VoicemailLeft,
        ),
        // No message: hang up.
        (
            "+14155550024",
            &d.agent,
            &message_end,
            machine(1000, "machine_end_beep"),
            "machine_end_beep",
            Action::HangUp,
            pb::EndReason::AnsweringMachine,
        ),
        // `Enable` cannot wait for the beep (the fake answers machine_start): hang up.
        (
            "+14155550025",
            &spoken,
            &enable,
            machine(1000, "machine_end_beep"),
            "machine_start",
            Action::HangUp,
            pb::EndReason::AnsweringMachine,
        ),
        // A person: the conversation goes on (the verdict at once: the scripted call is
        // short).
        (
            "+14155550026",
            &spoken,
            &message_end,
            Lifecycle::Machine {
                ring_ms: 50,
                detect_ms: 0,
                answered_by: "human".into(),
                script: script.clone(),
            },
            "human",
            Action::Proceed,
            pb::EndReason::CallerHangup,
        ),
        // No detection asked of Twilio: the application sends its own verdict.
        (
            "+14155550027",
            &spoken,
            &no_detection,
            machine(0, "machine_end_beep"),
            "machine_end_beep",
            Action::LeaveMessage,
            pb::EndReason::VoicemailLeft,
        ),
    ];
    let mut placed = Vec::new();
    for (to, agent, options, lifecycle, ..) in &cases {
        d.twilio.script(to, lifecycle.clone());
        placed.push(d.dial_as(agent, to, (*options).clone()).await);
    }
    let by_app = &placed[6];
    let deadline = tokio::time::Instant::now() + LIMIT;
    while status(&d.world.get_call(&by_app.call_id).await) != pb::CallStatus::InProgress {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the call never started"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let verdict = |answered_by: &str| pb::SendCommandRequest {
        call_id: by_app.call_id.clone(),
        command: Some(pb::Command {
            command_id: String::new(),
            kind: Some(pb::command::Kind::AnsweringMachine(
                pb::AnsweringMachineCommand {
                    answered_by: answered_by.into(),
                },
            )),
        }),
    };
    let err = d
        .world
        .calls()
        .send_command(verdict("robot"))
        .await
        .expect_err("not a Twilio verdict");
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    with_timeout(
        LIMIT,
        "SendCommand verdict",
        d.world.calls().send_command(verdict("machine_end_beep")),
    )
    .await
    .expect("the application's verdict is taken");
    for ((to, agent, _, _, answered_by, action, end), call) in cases.iter().zip(&placed) {
        let ended = d.world.wait_ended(&call.call_id, LIMIT).await;
        assert_eq!(reason(&ended), *end, "{to}: {ended:?}");
        assert_eq!(status(&ended), pb::CallStatus::Completed, "{to}");
        assert_eq!(
            ended.answered_by, *answered_by,
            "{to}: the verdict is stored"
        );
        let events = d.world.stored_events(&call.call_id).await;
        assert_eq!(
            verdicts(&events),
            vec![((*answered_by).to_owned(), *action)],
            "{to}: reported once"
        );
        // What Twilio ran after the stream: the action request's TwiML.
        assert!(
            d.twilio
                .wait_calls(LIMIT, |calls| calls
                    .iter()
                    .any(|c| c.sid == ended.twilio_call_sid && c.report.is_some()))
                .await,
            "{to}: the fake call finished"
        );
        let report = d
            .twilio
            .call(&ended.twilio_call_sid)
            .and_then(|c| c.report)
            .expect("a report")
            .expect("the media ran");
        let after: Vec<_> = report
            .after
            .iter()
            .filter_map(|a| a.twiml.clone())
            .collect();
        match end {
            pb::EndReason::CallerHangup => {
                let transcript = d.world.transcript(&call.call_id).await;
                assert_eq!(flatten(&transcript), expected_transcript(&script), "{to}");
            }
            _ => {
                assert_eq!(after.len(), 1, "{to}: one action request: {report:?}");
                assert!(after[0].hangup, "{to}: hung up after the stream");
                let plays = if **agent == played {
                    vec![PLAY.to_owned()]
                } else {
                    vec![]
                };
                assert_eq!(after[0].plays, plays, "{to}");
                assert!(after[0].says.is_empty(), "{to}");
            }
        }
        if **agent == spoken && *action == Action::LeaveMessage {
            let transcript = flatten(&d.world.transcript(&call.call_id).await);
            assert!(
                transcript
                    .last()
                    .is_some_and(|(who, line)| who == "assistant" && line == WORDS),
                "{to}: the message was the last thing said: {transcript:?}"
            );
        }
    }
    // The model was asked for the message once per spoken voicemail, and never on a call
    // that hung up or went on.
    let sessions_with_message = d
        .world
        .fake
        .connections()
        .iter()
        .map(|c| {
            c.items_created
                .iter()
                .filter(|i| i.to_string().contains(WORDS))
                .count()
        })
        .sum::<usize>();
    assert_eq!(sessions_with_message, 3, "the three spoken voicemails");
}

//! The relay API of one real `callbridge-control` process on a real redis-server:
//! admission, attach rules, exactly-once events, gaps, one-way status, transcripts,
//! usage, and the after-stream decision.

mod common;

use callbridge_proto::pb;
use callbridge_testkit::redis_server::RedisServer;
use common::*;
use pb::attach_response::Msg;
use pb::call_event::Kind;
use tonic::Code;

fn usage(input: u64, output: u64) -> Kind {
    Kind::Usage(pb::Usage {
        input_tokens: input,
        output_tokens: output,
        total_tokens: input + output,
        ..Default::default()
    })
}

#[tokio::test]
async fn a_call_from_admission_to_after_stores_each_event_once() {
    let redis = RedisServer::unix().expect("redis");
    let control = Control::start(ControlOpts::new(&redis.url(), "flow")).await;
    let mut agents = control.agents().await;
    let mut calls = control.calls().await;
    let mut relay = control.relay().await;
    create_agent(&mut agents, "sales").await;
    let call = create_call(&mut calls, "sales", "q1").await;
    assert_eq!(call.status, pb::CallStatus::Created as i32);

    // Admission moves created → ringing and records the Twilio sid; a retry is the same call.
    let admit = || pb::AdmitRequest {
        call_id: call.call_id.clone(),
        twilio_call_sid: common::CALL_SID.into(),
        from: "+14155550100".into(),
        to: "+14155550123".into(),
        twilio_direction: "outbound-api".into(),
        account_sid: "AC1".into(),
    };
    let admitted = answer("admit", relay.admit(admit())).await;
    let admitted_call = admitted.call.expect("call");
    assert_eq!(admitted_call.status, pb::CallStatus::Ringing as i32);
    assert_eq!(admitted_call.twilio_call_sid, common::CALL_SID);
    assert_eq!(admitted.agent.expect("agent").agent_id, "sales");
    within("admit again", relay.admit(admit()))
        .await
        .expect("retry admitted");

    let mut stream = attach(&mut relay, &call.call_id, "relay-1", false)
        .await
        .expect("attached");
    assert_eq!(stream.context.last_seq, 0);
    assert_eq!(
        stream.context.agent.as_ref().expect("agent").agent_id,
        "sales"
    );
    let id = call.call_id.clone();
    stream.ack(event(&id, 1, started("relay-1"))).await;
    let live = get_call(&mut calls, &id).await;
    assert_eq!(live.status, pb::CallStatus::InProgress as i32);
    assert_eq!(live.relay_id, "relay-1");

    stream.ack(event(&id, 2, caller("hello"))).await;
    stream.ack(event(&id, 3, usage(10, 20))).await;
    // The same seq again (a resend after a blip): acknowledged, not stored or counted twice.
    stream.ack(event(&id, 3, usage(10, 20))).await;
    stream.ack(event(&id, 2, caller("hello"))).await;
    stream
        .ack(event(
            &id,
            4,
            Kind::Assistant(pb::AssistantSpeech {
                item_id: "a1".into(),
                text: "Hi, how can I help?".into(),
                interrupted: false,
                heard_ms: 900,
                audio_ms: 900,
            }),
        ))
        .await;
    stream
        .ack(event(&id, 5, Kind::Dtmf(pb::Dtmf { digit: "7".into() })))
        .await;
    stream.ack(event(&id, 6, usage(1, 2))).await;

    let got = get_call(&mut calls, &id).await;
    assert_eq!(got.last_seq, 6);
    let u = got.usage.expect("usage");
    assert_eq!(
        (u.input_tokens, u.output_tokens, u.total_tokens, u.responses),
        (11, 22, 33, 2)
    );

    let transcript = transcript(&mut calls, &id).await;
    let seqs: Vec<u64> = transcript.turns.iter().map(|t| t.seq).collect();
    assert_eq!(seqs, vec![2, 4, 5], "caller, assistant, dtmf once each");

    // A command to this live call reaches the relay (same replica here).
    let sent = answer("command", calls.send_command(say(&id, "One moment"))).await;
    match stream.next().await.expect("command") {
        Msg::Command(c) => assert_eq!(c.command_id, sent.command_id),
        other => panic!("expected command, got {other:?}"),
    }

    stream
        .ack(event(
            &id,
            7,
            Kind::Ended(pb::Ended {
                reason: pb::EndReason::Transferred as i32,
                detail: String::new(),
                transfer_to: "+14155559999".into(),
            }),
        ))
        .await;
    let done = get_call(&mut calls, &id).await;
    assert_eq!(done.status, pb::CallStatus::Completed as i32);
    assert_eq!(done.end_reason, pb::EndReason::Transferred as i32);
    assert!(done.ended_at_ms > 0);
    assert_eq!(
        after_next(&mut relay, &id).await,
        Some(pb::after_response::Next::DialNumber("+14155559999".into()))
    );

    // Ended: admission, attach and commands are refused.
    refused(
        "admit ended",
        Code::FailedPrecondition,
        relay.admit(admit()),
    )
    .await;
    refused(
        "ended call refused",
        Code::FailedPrecondition,
        attach(&mut relay, &id, "relay-2", false),
    )
    .await;
    refused(
        "command to ended",
        Code::FailedPrecondition,
        calls.send_command(pb::SendCommandRequest {
            call_id: id.clone(),
            command: Some(pb::Command {
                command_id: String::new(),
                kind: Some(pb::command::Kind::Hangup(pb::HangupCommand {
                    reason: String::new(),
                })),
            }),
        }),
    )
    .await;

    let usage = answer(
        "usage",
        calls.get_usage(pb::GetUsageRequest {
            scope: Some(pb::get_usage_request::Scope::CampaignId("q1".into())),
        }),
    )
    .await;
    assert_eq!((usage.total_tokens, usage.calls), (33, 1));
    control.assert_metrics(&[
        "callbridge_control_events_duplicate_total 2",
        "callbridge_control_events_stored_total 7",
        "callbridge_control_commands_routed_total 1",
    ]);
}

#[tokio::test]
async fn gaps_fail_the_stream_and_status_never_moves_back() {
    let AttachedCall {
        redis: _redis,
        control: _control,
        mut calls,
        mut relay,
        id,
        mut stream,
    } = attached_call("gaps").await;
    stream.ack(event(&id, 1, started("relay-1"))).await;
    let err = stream
        .send(event(&id, 3, caller("skipped 2")))
        .await
        .expect_err("gap");
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("gap"), "{}", err.message());
    let got = get_call(&mut calls, &id).await;
    assert_eq!(got.last_seq, 1, "nothing after the gap was stored");

    // The relay reconnects (same relay id) and continues from the stored seq.
    let mut stream = attach(&mut relay, &id, "relay-1", true)
        .await
        .expect("reconnect allowed");
    assert_eq!(stream.context.last_seq, 1);
    // Another relay cannot take a held call, not even claiming to reconnect.
    for reconnect in [false, true] {
        refused(
            "held, other relay id",
            Code::AlreadyExists,
            attach(&mut relay, &id, "relay-other", reconnect),
        )
        .await;
    }

    // HANDOFF keeps the call live; After says resume.
    stream
        .ack(event(&id, 2, caller("before the hand-off")))
        .await;
    stream
        .ack(event(&id, 3, ended(pb::EndReason::Handoff)))
        .await;
    let got = get_call(&mut calls, &id).await;
    assert_eq!(got.status, pb::CallStatus::InProgress as i32);
    assert_eq!(
        after_next(&mut relay, &id).await,
        Some(pb::after_response::Next::Resume(pb::ResumeNext {
            // Attached without a credential: no stream to name.
            takes_over_stream_id: String::new(),
        }))
    );
    drop(stream);

    // The next relay resumes with the conversation so far, and ends the call.
    let mut stream = eventually("lease released after the stream closed", || {
        let mut relay = relay.clone();
        let id = id.clone();
        async move { attach(&mut relay, &id, "relay-2", false).await.ok() }
    })
    .await;
    assert_eq!(stream.context.last_seq, 3);
    let history: Vec<u64> = stream.context.history.iter().map(|t| t.seq).collect();
    assert_eq!(history, vec![2]);
    stream.ack(event(&id, 4, started("relay-2"))).await;
    stream
        .ack(event(&id, 5, ended(pb::EndReason::CallerHangup)))
        .await;
    // A replay of an old status-changing event is a no-op.
    stream.ack(event(&id, 4, started("relay-2"))).await;
    let got = get_call(&mut calls, &id).await;
    assert_eq!(got.status, pb::CallStatus::Completed as i32);
    assert_eq!(got.end_reason, pb::EndReason::CallerHangup as i32);
    // A late `started` after the end is stored as history but cannot reopen the call.
    stream.ack(event(&id, 6, started("relay-late"))).await;
    let got = get_call(&mut calls, &id).await;
    assert_eq!(got.status, pb::CallStatus::Completed as i32);
    assert_eq!(got.last_seq, 6);
    assert_eq!(
        after_next(&mut relay, &id).await,
        Some(pb::after_response::Next::Hangup(pb::HangupNext {}))
    );
}

#[tokio::test]
async fn inbound_admission_uses_routes_then_default_and_is_idempotent() {
    let redis = RedisServer::unix().expect("redis");
    let control = Control::start(ControlOpts::new(&redis.url(), "inbound")).await;
    let mut agents = control.agents().await;
    let mut relay = control.relay().await;
    // `CA2` stands for Twilio's `CA` and 32 hex digits, ending in 2.
    let inbound = |sid: &str, to: &str| pb::AdmitRequest {
        call_id: String::new(),
        twilio_call_sid: format!("CA{:0>32}", &sid[2..]),
        from: "+14155550100".into(),
        to: to.into(),
        twilio_direction: "inbound".into(),
        account_sid: "AC1".into(),
    };
    let err = refused(
        "no route",
        Code::NotFound,
        relay.admit(inbound("CA1", "+14155550123")),
    )
    .await;
    assert!(
        err.message().contains("no default agent"),
        "{}",
        err.message()
    );

    create_agent(&mut agents, "routed").await;
    create_agent(&mut agents, "fallback").await;
    within(
        "route",
        agents.set_number_route(pb::NumberRoute {
            number: "+14155550123".into(),
            agent_id: "routed".into(),
        }),
    )
    .await
    .expect("route");
    within(
        "default",
        agents.set_default_agent(pb::DefaultAgent {
            agent_id: "fallback".into(),
        }),
    )
    .await
    .expect("default");

    let a = answer("admit", relay.admit(inbound("CA2", "+14155550123"))).await;
    let call = a.call.expect("call");
    assert_eq!(
        (call.agent_id.as_str(), call.direction, call.status),
        (
            "routed",
            pb::Direction::Inbound as i32,
            pb::CallStatus::Ringing as i32
        )
    );
    let again = answer("admit again", relay.admit(inbound("CA2", "+14155550123"))).await;
    assert_eq!(
        again.call.expect("call").call_id,
        call.call_id,
        "webhook retry returns the same call"
    );
    let other = answer("admit default", relay.admit(inbound("CA3", "+14155550999"))).await;
    assert_eq!(other.agent.expect("agent").agent_id, "fallback");

    refused(
        "unknown id",
        Code::NotFound,
        relay.admit(pb::AdmitRequest {
            call_id: "doesnotexist".into(),
            ..inbound("CA4", "+1415")
        }),
    )
    .await;
    for (case, call_id) in [("inbound", ""), ("pre-created", "doesnotexist")] {
        let err = refused(
            case,
            Code::InvalidArgument,
            relay.admit(pb::AdmitRequest {
                call_id: call_id.into(),
                twilio_call_sid: "CA5".into(),
                ..inbound("CA5", "+14155550123")
            }),
        )
        .await;
        assert_eq!(
            err.message(),
            "twilio_call_sid: not a Twilio call sid (CA + 32 hex digits)",
            "{case}"
        );
    }
    refused(
        "unknown call",
        Code::NotFound,
        attach(&mut relay, "doesnotexist", "relay-1", false),
    )
    .await;
}

/// The first attach of Twilio's next stream (a fresh stream credential) while the dead
/// relay's stream still holds the lease: it takes the call over, and the old stream is
/// fenced — its next event is refused with `ABORTED` and not stored. A reconnect without
/// a credential, or a replayed credential, is still refused.
#[tokio::test]
async fn a_fresh_credential_takes_a_held_call_over_and_fences_the_old_stream() {
    let AttachedCall {
        redis: _redis,
        control: _control,
        mut calls,
        mut relay,
        id,
        mut stream,
    } = attached_call("takeover").await;
    stream.ack(event(&id, 1, started("relay-1"))).await;
    refused(
        "a reconnect from another relay",
        Code::AlreadyExists,
        attach(&mut relay, &id, "relay-2", true),
    )
    .await;
    let expires = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_millis() as i64
        + 60_000;
    let open = |credential: &str| pb::AttachOpen {
        call_id: id.clone(),
        relay_id: "relay-2".to_owned(),
        reconnect: false,
        stream_credential_id: credential.repeat(32),
        stream_credential_expires_at_ms: expires,
        ..Default::default()
    };
    let mut new_stream = attach_open(&mut relay, open("b"))
        .await
        .expect("a fresh credential takes the call over");
    assert_eq!(new_stream.context.last_seq, 1);
    assert_eq!(get_call(&mut calls, &id).await.relay_id, "relay-2");

    // The old stream's late event: refused, not stored, not acknowledged.
    let err = stream
        .send(event(&id, 2, caller("late, from the dead relay")))
        .await
        .expect_err("fenced");
    assert_eq!(err.code(), Code::Aborted, "{err:?}");
    assert_eq!(get_call(&mut calls, &id).await.last_seq, 1);
    new_stream.ack(event(&id, 2, started("relay-2"))).await;

    refused(
        "a replayed credential",
        Code::PermissionDenied,
        attach_open(&mut relay, open("b")),
    )
    .await;
    new_stream
        .ack(event(&id, 3, ended(pb::EndReason::CallerHangup)))
        .await;
    let got = get_call(&mut calls, &id).await;
    assert_eq!(got.last_seq, 3);
    assert_eq!(got.end_reason, pb::EndReason::CallerHangup as i32);
}

/// A live call's streams are named by their credentials. An action request speaks for the
/// call's current stream (resume, bound to it) or for an earlier one (a replay: hangup);
/// a stream minted to follow an earlier stream, or a first stream once the call has had
/// one (a replayed voice webhook), is refused `stream_superseded` while the genuine next
/// stream takes over.
#[tokio::test]
async fn replayed_action_requests_and_webhooks_get_no_way_into_a_live_call() {
    use pb::after_response::Next;
    let redis = RedisServer::unix().expect("redis");
    let control = Control::start(ControlOpts::new(&redis.url(), "replays")).await;
    let mut agents = control.agents().await;
    let mut calls = control.calls().await;
    let mut relay = control.relay().await;
    create_agent(&mut agents, "a").await;
    let id = create_call(&mut calls, "a", "").await.call_id;
    let expires = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_millis() as i64
        + 60_000;
    let stream_id = |tag: &str| tag.repeat(32);
    let open = |relay_id: &str, cred: &str, origin: pb::StreamOrigin, after: &str| pb::AttachOpen {
        call_id: id.clone(),
        relay_id: relay_id.to_owned(),
        stream_credential_id: stream_id(cred),
        stream_credential_expires_at_ms: expires,
        stream_origin: origin as i32,
        takes_over_stream_id: after.to_owned(),
        ..Default::default()
    };
    let ask = |stream: &str, after: &str| pb::AfterRequest {
        call_id: id.clone(),
        stream_id: stream.to_owned(),
        after_stream_id: after.to_owned(),
    };
    let after = |relay: &mut RelayRpc, req: pb::AfterRequest| {
        let mut relay = relay.clone();
        async move { answer("after", relay.after(req)).await.next }
    };
    let superseded = |status: tonic::Status| {
        assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
        assert_eq!(
            status
                .metadata()
                .get("callbridge-refusal")
                .map(|v| v.to_str().expect("ascii")),
            Some("stream_superseded"),
            "{status:?}"
        );
    };

    let mut first = attach_open(
        &mut relay,
        open("relay-1", "a", pb::StreamOrigin::First, ""),
    )
    .await
    .expect("the call's first stream");
    first.ack(event(&id, 1, started("relay-1"))).await;
    // A replayed voice webhook's stream, while stream a holds the call.
    superseded(
        attach_open(
            &mut relay,
            open("relay-2", "e", pb::StreamOrigin::First, ""),
        )
        .await
        .err()
        .expect("refused"),
    );
    // Stream a's relay dies (its stream stays open here: control has not noticed).
    // Twilio asks a's action URL: resume, taking over from a.
    let resume_after = |s: &str| {
        Some(Next::Resume(pb::ResumeNext {
            takes_over_stream_id: stream_id(s),
        }))
    };
    assert_eq!(
        after(&mut relay, ask(&stream_id("a"), "")).await,
        resume_after("a")
    );
    // Its stream b, bound to a, takes the call over.
    let mut second = attach_open(
        &mut relay,
        open("relay-2", "b", pb::StreamOrigin::Resume, &stream_id("a")),
    )
    .await
    .expect("Twilio's next stream takes over");
    second.ack(event(&id, 2, started("relay-2"))).await;
    // a's action request replayed now: hangup (to the replayer), and a stream minted
    // to follow a is refused, not a take-over.
    assert_eq!(
        after(&mut relay, ask(&stream_id("a"), "")).await,
        Some(Next::Hangup(pb::HangupNext {}))
    );
    superseded(
        attach_open(
            &mut relay,
            open("relay-3", "c", pb::StreamOrigin::Resume, &stream_id("a")),
        )
        .await
        .err()
        .expect("refused"),
    );
    // b ends (a hand-off); its action request resumes after b; a stream d minted then
    // never attaches; d's own action request still resumes after b.
    second
        .ack(event(&id, 3, ended(pb::EndReason::Handoff)))
        .await;
    assert_eq!(
        after(&mut relay, ask(&stream_id("b"), &stream_id("a"))).await,
        resume_after("b")
    );
    assert_eq!(
        after(&mut relay, ask(&stream_id("d"), &stream_id("b"))).await,
        resume_after("b")
    );
    // The stored call goes on with the genuine streams' events only.
    let got = get_call(&mut calls, &id).await;
    assert_eq!(got.last_seq, 3);
    assert_eq!(got.relay_id, "relay-2");
    assert_eq!(got.status, pb::CallStatus::InProgress as i32);
    drop(first);
}

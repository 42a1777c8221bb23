//! Component tests of the real relay over loopback sockets: a Twilio-like client, a fake
//! Realtime server and a fake control plane (see `support`).

// Test code: a failed unwrap is a failed test, with its location.
#![allow(clippy::unwrap_used)]

mod support;

use callbridge_proto::pb;
use callbridge_proto::pb::EndReason;
use serde_json::{Value, json};
use support::*;

/// 160 bytes of μ-law silence (20 ms) as base64.
fn frame() -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode([0xFFu8; 160])
}

/// 100 ms of μ-law silence: a delta the relay follows with a mark.
fn delta_100ms() -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode([0xFFu8; 800])
}

fn settings() -> pb::AgentSettings {
    pb::AgentSettings {
        name: "a".into(),
        instructions: "Be brief".into(),
        voice: "cedar".into(),
        builtin_tools: Some(pb::BuiltinTools {
            end_call: true,
            transfer_call: true,
            transfer_numbers: vec!["+15550001".into()],
        }),
        tools: vec![pb::Tool {
            name: "lookup".into(),
            description: "Look up an order".into(),
            parameters_json: String::new(),
        }],
        ..Default::default()
    }
}

async fn wait_ended(control: &FakeControl) -> pb::Ended {
    within("control receives ended", async {
        loop {
            if let Some(pb::call_event::Kind::Ended(e)) =
                control.events().last().and_then(|e| e.kind.clone())
            {
                return e;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    })
    .await
}

struct World {
    control: FakeControl,
    model: FakeModel,
    relay: RelayHandle,
}

async fn world(tweak: impl FnOnce(&mut callbridge_relay::Config)) -> World {
    let control = FakeControl::default();
    control.state.lock().unwrap().agent = agent(settings());
    control.state.lock().unwrap().last_seq = 7;
    let caddr = start_control(control.clone()).await;
    let model = start_model().await;
    let relay = start_relay(&model.url, Some(caddr), tweak).await;
    World {
        control,
        model,
        relay,
    }
}

#[tokio::test]
async fn voice_webhook_checks_signature_and_answers_connect_twiml() {
    let w = world(|_| {}).await;
    let form = [
        ("CallSid", "CA9"),
        ("From", "+1555"),
        ("To", "+1666"),
        ("Direction", "inbound"),
    ];
    let (status, headers, body) =
        post_form(&w.relay, "/api/twilio/voice?callId=call_42", &form, true).await;
    assert_eq!(status, 200, "{body}");
    let public = &w.relay.public;
    let ws_public = public.replace("http://", "ws://");
    let stream = verified_in(&body, Some("call_42")).id;
    assert!(
        body.contains(&format!(
            r#"<Connect action="{public}/api/twilio/after/call_42?stream={stream}" method="POST"><Stream url="{ws_public}/api/twilio/media-stream/call_42"><Parameter name="callId" value="call_42"/><Parameter name="credential" value=""#
        )),
        "{body}"
    );
    let h = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
    assert_eq!(h("content-type").as_deref(), Some("application/xml"));
    assert_eq!(h("x-content-type-options").as_deref(), Some("nosniff"));
    assert_eq!(h("x-frame-options").as_deref(), Some("DENY"));
    assert!(h("strict-transport-security").is_some());
    let admits = w.control.state.lock().unwrap().admits.clone();
    assert_eq!(admits[0].call_id, "call_42");
    assert_eq!(admits[0].twilio_call_sid, "CA9");
    assert_eq!(admits[0].to, "+1666");

    let (status, _, _) = post_form(&w.relay, "/api/twilio/voice", &form, false).await;
    assert_eq!(status, 403);
    assert_eq!(
        w.control.state.lock().unwrap().admits.len(),
        1,
        "no admit when unsigned"
    );
}

#[tokio::test]
async fn voice_webhook_maps_control_answers() {
    let w = world(|_| {}).await;
    let form = [("CallSid", "CA9")];
    w.control.state.lock().unwrap().admit_error = Some(tonic::Code::NotFound);
    let (status, _, body) = post_form(&w.relay, "/api/twilio/voice", &form, true).await;
    assert_eq!(status, 200);
    assert!(
        body.contains("<Say>") && body.contains("<Hangup/>"),
        "{body}"
    );
    w.control.state.lock().unwrap().admit_error = Some(tonic::Code::Unavailable);
    let (status, _, _) = post_form(&w.relay, "/api/twilio/voice", &form, true).await;
    assert_eq!(status, 503);
    // An agent with the realtime model switched off gets its fallback directly.
    {
        let mut st = w.control.state.lock().unwrap();
        st.admit_error = None;
        let mut s = settings();
        s.realtime_enabled = Some(false);
        s.fallback = Some(pb::Fallback {
            action: Some(pb::fallback::Action::ConferenceRoom("room-9".into())),
            preamble: String::new(),
        });
        st.agent = agent(s);
    }
    let (status, _, body) = post_form(&w.relay, "/api/twilio/voice", &form, true).await;
    assert_eq!(status, 200);
    assert!(
        body.contains("<Dial><Conference>room-9</Conference></Dial>"),
        "{body}"
    );
    assert!(!body.contains("<Stream"));
}

#[tokio::test]
async fn after_url_answers_from_control() {
    let w = world(|_| {}).await;
    w.control.state.lock().unwrap().after = Some(pb::AfterResponse {
        next: Some(pb::after_response::Next::DialNumber("+15550001".into())),
    });
    let (status, _, body) = post_form(
        &w.relay,
        "/api/twilio/after/call_1",
        &[("CallSid", "CA1")],
        true,
    )
    .await;
    assert_eq!(status, 200);
    assert!(body.contains("<Dial>+15550001</Dial>"), "{body}");
    w.control.state.lock().unwrap().after = Some(pb::AfterResponse {
        next: Some(pb::after_response::Next::Resume(pb::ResumeNext::default())),
    });
    let (_, _, body) = post_form(
        &w.relay,
        "/api/twilio/after/call_1",
        &[("CallSid", "CA1")],
        true,
    )
    .await;
    assert!(body.contains("/api/twilio/media-stream/call_1"), "{body}");
    let (status, _, _) = post_form(
        &w.relay,
        "/api/twilio/after/call_1",
        &[("CallSid", "CA1")],
        false,
    )
    .await;
    assert_eq!(status, 403);
}

/// Opens `/media-stream/call_1`, sends `start`, and returns the close the relay answers
/// with (code, reason).
async fn refused_at_start(relay: &RelayHandle, start: Value) -> (Option<u16>, String) {
    let mut tw = twilio_ws(relay, "/api/twilio/media-stream/call_1")
        .await
        .unwrap();
    send_json(&mut tw, start).await;
    next_close(&mut tw).await
}

#[tokio::test]
async fn refused_streams_never_open_a_model_socket() {
    let mut w = world(|_| {}).await;
    // Control refuses the attach at `start`: each refusal has its own close code.
    for (code, close, reason) in [
        (tonic::Code::NotFound, 4404u16, "unknown call"),
        (tonic::Code::FailedPrecondition, 4412, "call has ended"),
        (tonic::Code::AlreadyExists, 4423, "call is already attached"),
        // Control answering is final; only an unreachable control is retried (below).
        (
            tonic::Code::PermissionDenied,
            4503,
            "control plane unavailable",
        ),
    ] {
        w.control.state.lock().unwrap().attach_error = Some(code);
        let got = refused_at_start(&w.relay, start_msg()).await;
        assert_eq!(got, (Some(close), reason.to_owned()), "{code:?}");
    }
    w.control.state.lock().unwrap().attach_error = None;
    let attaches = w.control.state.lock().unwrap().opens.len();
    // Refused by the relay itself, before control is asked.
    let other_call = start_with(json!({"callId":"call_2","credential":credential(Some("call_2"))}));
    let no_call_id = start_with(json!({"credential":credential(Some("call_1"))}));
    let for_call_2 = start_with(json!({"callId":"call_1","credential":credential(Some("call_2"))}));
    let missing = start_with(json!({"callId":"call_1"}));
    let garbage = start_with(json!({"callId":"call_1","credential":"not-a-credential"}));
    let standalone = start_with(json!({"callId":"call_1","credential":credential(None)}));
    let expired = {
        let id = callbridge_relay::call_id::CallId::parse("call_1").unwrap();
        let minted_long_ago = callbridge_relay::stream_credential::now_ms() - 120_000;
        let cred = stream_key().mint(
            Some(&id),
            callbridge_relay::stream_credential::Segment::First,
            minted_long_ago,
            std::time::Duration::from_secs(60),
        );
        start_with(json!({"callId":"call_1","credential":cred}))
    };
    for (start, close, reason) in [
        (
            other_call,
            4402u16,
            "callId parameter does not match the stream path",
        ),
        (
            no_call_id,
            4402,
            "callId parameter does not match the stream path",
        ),
        (for_call_2, 4401, "stream credential invalid"),
        (missing, 4401, "stream credential missing"),
        (garbage, 4401, "stream credential invalid"),
        (standalone, 4401, "stream credential invalid"),
        (expired, 4410, "stream credential expired"),
    ] {
        let got = refused_at_start(&w.relay, start).await;
        assert_eq!(got, (Some(close), reason.to_owned()));
    }
    assert_eq!(
        w.control.state.lock().unwrap().opens.len(),
        attaches,
        "control was not asked"
    );
    // No `start` in time: closed, nothing attached.
    // A bad signature is refused before the upgrade.
    let url = format!("ws://{}/api/twilio/media-stream/call_1", w.relay.addr);
    let mut req =
        tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(url)
            .unwrap();
    req.headers_mut().insert(
        "x-twilio-signature",
        "AAAAAAAAAAAAAAAAAAAAAAAAAAA=".parse().unwrap(),
    );
    let err = within("connect", tokio_tungstenite::connect_async(req))
        .await
        .unwrap_err();
    assert!(matches!(err, tokio_tungstenite::tungstenite::Error::Http(r) if r.status() == 403));
    // Unknown paths: 404, no upgrade.
    let err = twilio_ws(&w.relay, "/api/twilio/other").await.unwrap_err();
    assert!(matches!(err, tokio_tungstenite::tungstenite::Error::Http(r) if r.status() == 404));
    assert!(
        w.model.conns.try_recv().is_err(),
        "no model socket was opened"
    );
    let m = w.relay.metrics.encode();
    for (reason, n) in [
        ("unknown_call", 1),
        ("call_ended", 1),
        ("already_attached", 1),
        ("control_unavailable", 1),
        ("call_id_mismatch", 2),
        ("credential_invalid", 3),
        ("credential_missing", 1),
        ("credential_expired", 1),
    ] {
        let line = format!("callbridge_relay_stream_refusals_total{{reason=\"{reason}\"}} {n}");
        assert!(m.contains(&line), "{line} in\n{m}");
    }
    // The genuine stream still gets through (so the refusals above prove something).
    let mut tw = twilio_ws(&w.relay, "/api/twilio/media-stream/call_1")
        .await
        .unwrap();
    send_json(&mut tw, start_msg()).await;
    let _model = within("model dialled", w.model.conns.recv()).await.unwrap();
    w.control.wait_kind("started").await;
    let opens = w.control.state.lock().unwrap().opens.clone();
    let open = opens.last().unwrap();
    assert_eq!(open.twilio_call_sid, "CA1");
    assert_eq!(open.stream_credential_id.len(), 32);
    assert!(open.stream_credential_expires_at_ms > 0);
    assert!(!open.reconnect);
}

#[tokio::test]
async fn standalone_credentials_are_single_use_on_the_relay() {
    let mut model = start_model().await;
    let relay = start_relay(&model.url, None, |_| {}).await;
    let start = start_msg_simple();
    let mut tw = twilio_ws(&relay, "/api/twilio/media-stream-simple")
        .await
        .unwrap();
    send_json(&mut tw, start.clone()).await;
    let _m = within("model dialled", model.conns.recv()).await.unwrap();
    // The same `start` again (a replayed stream): refused, no second model socket.
    let mut again = twilio_ws(&relay, "/api/twilio/media-stream-simple")
        .await
        .unwrap();
    send_json(&mut again, start).await;
    assert_eq!(
        next_close(&mut again).await,
        (Some(4409), "stream credential already used".to_owned())
    );
    // A call's credential does not open a standalone stream.
    let mut other = twilio_ws(&relay, "/api/twilio/media-stream-simple")
        .await
        .unwrap();
    send_json(
        &mut other,
        start_with(json!({"credential":credential(Some("call_1"))})),
    )
    .await;
    assert_eq!(
        next_close(&mut other).await,
        (Some(4401), "stream credential invalid".to_owned())
    );
    assert!(model.conns.try_recv().is_err(), "one model socket only");
    drop(tw);
}

#[tokio::test]
async fn caller_media_faster_than_real_time_is_dropped_and_counted() {
    let mut w = world(|_| {}).await;
    let mut tw = twilio_ws(&w.relay, "/api/twilio/media-stream/call_1")
        .await
        .unwrap();
    send_json(&mut tw, start_msg()).await;
    let mut model = within("model dialled", w.model.conns.recv()).await.unwrap();
    // 300 frames (6 s of audio) at once: the 2 s burst passes, the rest is dropped.
    let p = frame();
    for _ in 0..300 {
        send_json(&mut tw, media_msg(&p)).await;
    }
    send_json(&mut tw, json!({"event":"stop","streamSid":"MZ1"})).await;
    wait_ended(&w.control).await;
    let appended: u64 = within("the model socket closes", async {
        let mut n = 0;
        loop {
            let v = model.rx.recv().await.unwrap();
            if v["type"] == "__closed" {
                break n;
            }
            if v["type"] == "input_audio_buffer.append" {
                n += 1;
            }
        }
    })
    .await;
    let m = w.relay.metrics.encode();
    let dropped: u64 = m
        .lines()
        .find_map(|l| {
            l.strip_prefix("callbridge_relay_media_frames_dropped_total{reason=\"rate\"} ")
        })
        .and_then(|v| v.trim().parse().ok())
        .unwrap();
    assert_eq!(
        appended + dropped,
        300,
        "every frame forwarded or counted: {m}"
    );
    // The 2 s burst always passes; 300 frames do not take the 4 s that would pass them all.
    assert!(appended >= 100, "the burst passes: {appended}");
    assert!(dropped > 0, "the flood beyond it is dropped");
}

#[tokio::test]
async fn call_relays_audio_marks_barge_in_and_reports_events() {
    let mut w = world(|_| {}).await;
    let mut tw = twilio_ws(&w.relay, "/api/twilio/media-stream/call_1")
        .await
        .unwrap();
    send_json(&mut tw, start_msg()).await;
    let mut model = within("model dialled", w.model.conns.recv()).await.unwrap();
    assert_eq!(model.authorization, "Bearer sk-test");
    assert!(model.uri.contains("model=gpt-realtime"), "{}", model.uri);

    // The first thing the model hears is the GA session.update with μ-law both ways.
    let su = model.next_of("session.update").await;
    assert_eq!(su["session"]["type"], "realtime");
    assert_eq!(
        su["session"]["audio"]["input"]["format"]["type"],
        "audio/pcmu"
    );
    assert_eq!(
        su["session"]["audio"]["output"]["format"]["type"],
        "audio/pcmu"
    );
    assert_eq!(su["session"]["audio"]["output"]["voice"], "cedar");

    send_json(
        &mut tw,
        json!({"event":"connected","protocol":"Call","version":"1.0.0"}),
    )
    .await;
    let payload = frame();
    send_json(&mut tw, media_msg(&payload)).await;
    let append = model.next_of("input_audio_buffer.append").await;
    assert_eq!(
        append["audio"],
        payload.as_str(),
        "payload passed through unchanged"
    );

    // The model answers with three 100 ms deltas; a mark follows every 100 ms of the item.
    let delta = delta_100ms();
    model
        .send(json!({"type":"response.created","response":{"id":"resp_1","status":"in_progress"}}))
        .await;
    for _ in 0..3 {
        model
            .send(json!({"type":"response.output_audio.delta","response_id":"resp_1","item_id":"item_a","output_index":0,"content_index":0,"delta": delta}))
            .await;
    }
    let mut marks = Vec::new();
    for n in 1..=3 {
        let media = next_twilio(&mut tw).await.unwrap();
        assert_eq!(media["event"], "media");
        assert_eq!(media["streamSid"], "MZ1");
        assert_eq!(media["media"]["payload"], delta.as_str());
        let mark = next_twilio(&mut tw).await.unwrap();
        assert_eq!(mark["event"], "mark");
        assert_eq!(mark["mark"]["name"], format!("g0:{}:item_a", n * 100));
        marks.push(mark["mark"]["name"].as_str().unwrap().to_owned());
    }
    // Twilio played the first 100 ms, then the caller talks over the rest.
    send_json(
        &mut tw,
        json!({"event":"mark","streamSid":"MZ1","mark":{"name": marks[0]}}),
    )
    .await;
    // A DTMF key too, to prove it is reported.
    send_json(
        &mut tw,
        json!({"event":"dtmf","streamSid":"MZ1","dtmf":{"track":"inbound_track","digit":"5"}}),
    )
    .await;
    // Make sure the echo reached the relay before the barge-in: it is ordered on the
    // Twilio socket, and the model socket is separate, so wait for a later caller frame
    // to come out at the model.
    send_json(&mut tw, media_msg(&payload)).await;
    model.next_of("input_audio_buffer.append").await;
    model
        .send(json!({"type":"input_audio_buffer.speech_started","audio_start_ms":100,"item_id":"item_u"}))
        .await;
    let clear = next_twilio(&mut tw).await.unwrap();
    assert_eq!(clear, json!({"event":"clear","streamSid":"MZ1"}));
    let truncate = model.next_of("conversation.item.truncate").await;
    assert_eq!(truncate["item_id"], "item_a");
    // What the caller heard: the echoed 100 ms, plus what the playback clock says played
    // since, never up to the next mark (200 ms), whose echo has not come.
    let end = truncate["audio_end_ms"].as_u64().unwrap();
    assert!(
        (100..200).contains(&end),
        "what the caller heard, from the echoed mark and the clock: {end}"
    );
    // Marks flushed by clear and late deltas of the interrupted response are ignored.
    for m in &marks[1..] {
        send_json(
            &mut tw,
            json!({"event":"mark","streamSid":"MZ1","mark":{"name": m}}),
        )
        .await;
    }
    model
        .send(json!({"type":"response.output_audio.delta","response_id":"resp_1","item_id":"item_a","delta": payload}))
        .await;
    model
        .send(json!({"type":"response.output_audio_transcript.done","response_id":"resp_1","item_id":"item_a","transcript":"Hello, how can I"}))
        .await;
    model
        .send(json!({"type":"response.done","response":{"id":"resp_1","status":"cancelled","usage":{"total_tokens":10,"input_tokens":4,"output_tokens":6}}}))
        .await;
    model
        .send(json!({"type":"conversation.item.input_audio_transcription.completed","item_id":"item_u","content_index":0,"transcript":"Wait"}))
        .await;
    // Garbage from both sides is counted, not fatal.
    within(
        "bad frame",
        futures_util::SinkExt::send(
            &mut tw,
            tokio_tungstenite::tungstenite::Message::text("{nope"),
        ),
    )
    .await
    .unwrap();
    send_json(&mut tw, media_msg("not base64!")).await;
    model
        .tx
        .send(tokio_tungstenite::tungstenite::Message::text("[]"))
        .await
        .unwrap();
    // The call is still healthy: audio still flows.
    send_json(&mut tw, media_msg(&payload)).await;
    model.next_of("input_audio_buffer.append").await;

    send_json(
        &mut tw,
        json!({"event":"stop","streamSid":"MZ1","stop":{"accountSid":"AC1","callSid":"CA1"}}),
    )
    .await;
    let ended = wait_ended(&w.control).await;
    assert_eq!(ended.reason, EndReason::CallerHangup as i32);
    // Twilio sees a normal close, the model socket is closed too, with a close frame.
    loop {
        match next_twilio(&mut tw).await {
            Ok(v) => assert_ne!(v["event"], "media", "no audio after the barge-in: {v}"),
            Err(code) => {
                assert_eq!(code, Some(1000));
                break;
            }
        }
    }
    let closed = model.next_of("__closed").await;
    assert_eq!(
        closed["code"], 1000,
        "the model session gets a normal close: {closed}"
    );

    let events = w.control.events();
    let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
    assert_eq!(
        seqs,
        (8..8 + events.len() as u64).collect::<Vec<_>>(),
        "numbered from last_seq+1"
    );
    let kinds = w.control.kinds();
    assert_eq!(kinds[0], "started");
    for k in ["dtmf", "interruption", "assistant", "usage", "caller"] {
        assert!(kinds.iter().any(|x| x == k), "{k} missing in {kinds:?}");
    }
    for e in &events {
        match &e.kind {
            Some(pb::call_event::Kind::Interruption(i)) => {
                assert_eq!(
                    (i.item_id.as_str(), u64::from(i.heard_ms), i.audio_ms),
                    ("item_a", end, 300),
                    "the truncate point"
                );
            }
            Some(pb::call_event::Kind::Assistant(a)) => {
                assert!(a.interrupted);
                assert_eq!((u64::from(a.heard_ms), a.audio_ms), (end, 300));
                assert_eq!(a.text, "Hello, how can I");
            }
            Some(pb::call_event::Kind::Caller(c)) => assert_eq!(c.text, "Wait"),
            Some(pb::call_event::Kind::Dtmf(d)) => assert_eq!(d.digit, "5"),
            Some(pb::call_event::Kind::Started(s)) => {
                assert_eq!(
                    (s.twilio_call_sid.as_str(), s.stream_sid.as_str()),
                    ("CA1", "MZ1")
                );
                assert_eq!(s.relay_id, "relay-test");
            }
            _ => {}
        }
    }
    let m = w.relay.metrics.encode();
    assert!(m.contains("callbridge_relay_barge_ins_total 1"), "{m}");
    assert!(
        m.contains("callbridge_relay_bad_messages_total{side=\"twilio\"} 2"),
        "{m}"
    );
    assert!(
        m.contains("callbridge_relay_bad_messages_total{side=\"realtime\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("callbridge_relay_frames_total{direction=\"model_to_caller\"} 3"),
        "{m}"
    );
    assert!(
        m.contains("callbridge_relay_calls_total{reason=\"caller_hangup\"} 1"),
        "{m}"
    );
}

/// Sends `start` and five media frames on a new stream, then checks that the model, once
/// dialled, gets the session setup and then every frame, in order; returns the stream.
async fn early_frames_reach_the_model(w: &mut World, first_byte: u8) -> Ws {
    let mut tw = twilio_ws(&w.relay, "/api/twilio/media-stream/call_1")
        .await
        .unwrap();
    send_json(&mut tw, start_msg()).await;
    let payloads: Vec<String> = (first_byte..first_byte + 5)
        .map(|i| {
            use base64::Engine;
            base64::engine::general_purpose::STANDARD.encode([i; 160])
        })
        .collect();
    for p in &payloads {
        send_json(&mut tw, media_msg(p)).await;
    }
    let mut model = within("model dialled", w.model.conns.recv()).await.unwrap();
    let first = within("first", model.rx.recv()).await.unwrap();
    assert_eq!(first["type"], "session.update");
    for p in &payloads {
        assert_eq!(
            model.next_of("input_audio_buffer.append").await["audio"],
            p.as_str()
        );
    }
    tw
}

#[tokio::test]
async fn an_attach_that_cannot_reach_control_is_retried_keeping_the_callers_audio() {
    let mut w = world(|_| {}).await;
    w.control.state.lock().unwrap().attach_unavailable = 2;
    // The third attempt is admitted; the frames sent meanwhile reach the model in order.
    let tw = early_frames_reach_the_model(&mut w, 10).await;
    {
        let st = w.control.state.lock().unwrap();
        assert_eq!(st.opens.len(), 3, "{:?}", st.opens);
        // Each attempt carried the same proof: control consumes it once, on the success;
        // and the same attempt id, so a retry of an attach that committed unanswered is
        // recognised as this stream's (`docs/contract-notes.md`).
        assert!(st.opens.iter().all(|o| o.stream_credential_id
            == st.opens[0].stream_credential_id
            && !o.stream_credential_id.is_empty()));
        assert!(
            st.opens
                .iter()
                .all(|o| o.attach_attempt_id == st.opens[0].attach_attempt_id
                    && o.attach_attempt_id.len() == 32)
        );
        assert_eq!(st.attaches, 1);
    }
    drop(tw);
    assert_eq!(
        wait_ended(&w.control).await.reason,
        EndReason::CallerHangup as i32
    );
}

#[tokio::test]
async fn caller_frames_before_the_model_is_ready_are_kept() {
    let mut w = world(|_| {}).await;
    // Only after sending does the test look at the model.
    let tw = early_frames_reach_the_model(&mut w, 0).await;
    drop(tw);
    assert_eq!(
        wait_ended(&w.control).await.reason,
        EndReason::CallerHangup as i32
    );
}

#[tokio::test]
async fn events_are_resent_after_the_attach_stream_breaks() {
    let mut w = world(|_| {}).await;
    w.control.state.lock().unwrap().drop_first_after = Some(2);
    let mut tw = twilio_ws(&w.relay, "/api/twilio/media-stream/call_1")
        .await
        .unwrap();
    send_json(&mut tw, start_msg()).await;
    let mut model = within("model dialled", w.model.conns.recv()).await.unwrap();
    for d in ["1", "2", "3"] {
        send_json(
            &mut tw,
            json!({"event":"dtmf","streamSid":"MZ1","dtmf":{"digit": d}}),
        )
        .await;
    }
    model.next_of("session.update").await;
    send_json(&mut tw, json!({"event":"stop","streamSid":"MZ1"})).await;
    wait_ended(&w.control).await;
    let st = w.control.state.lock().unwrap();
    assert!(st.attaches >= 2, "the relay re-attached");
    assert!(st.opens[1].reconnect, "second open says reconnect");
    assert_eq!(st.opens[1].relay_id, st.opens[0].relay_id);
    // Every seq 8..=12 arrived at least once, in order per stream, and nothing is missing.
    let mut seqs: Vec<u64> = st.events.iter().map(|e| e.seq).collect();
    seqs.sort_unstable();
    seqs.dedup();
    assert_eq!(seqs, vec![8, 9, 10, 11, 12]);
    let digits: Vec<String> = {
        let mut by_seq: Vec<&pb::CallEvent> = st.events.iter().collect();
        by_seq.sort_by_key(|e| e.seq);
        by_seq.dedup_by_key(|e| e.seq);
        by_seq
            .iter()
            .filter_map(|e| match &e.kind {
                Some(pb::call_event::Kind::Dtmf(d)) => Some(d.digit.clone()),
                _ => None,
            })
            .collect()
    };
    assert_eq!(digits, ["1", "2", "3"]);
    let m = w.relay.metrics.encode();
    assert!(
        !m.contains("callbridge_relay_control_reconnects_total 0"),
        "{m}"
    );
}

#[tokio::test]
async fn end_call_tool_waits_for_the_goodbye_to_play() {
    let mut w = world(|_| {}).await;
    let mut tw = twilio_ws(&w.relay, "/api/twilio/media-stream/call_1")
        .await
        .unwrap();
    send_json(&mut tw, start_msg()).await;
    let model = within("model dialled", w.model.conns.recv()).await.unwrap();
    let payload = frame();
    model
        .send(json!({"type":"response.created","response":{"id":"r1"}}))
        .await;
    model
        .send(json!({"type":"response.output_audio.delta","response_id":"r1","item_id":"i1","delta": payload}))
        .await;
    model
        .send(json!({"type":"response.function_call_arguments.done","response_id":"r1","item_id":"i2","call_id":"call_x","name":"end_call","arguments":"{\"reason\":\"done\"}"}))
        .await;
    model
        .send(json!({"type":"response.done","response":{"id":"r1","status":"completed"}}))
        .await;
    assert_eq!(next_twilio(&mut tw).await.unwrap()["event"], "media");
    let mark = next_twilio(&mut tw).await.unwrap();
    // The goodbye is still playing: the call must not have ended yet. Prove it by a DTMF
    // round trip, which is only reported while the call runs.
    send_json(
        &mut tw,
        json!({"event":"dtmf","streamSid":"MZ1","dtmf":{"digit":"9"}}),
    )
    .await;
    w.control.wait_kind("dtmf").await;
    assert!(!w.control.kinds().contains(&"ended".to_owned()));
    // Twilio finished playing: now the call ends, as an agent hang-up.
    send_json(
        &mut tw,
        json!({"event":"mark","streamSid":"MZ1","mark":{"name": mark["mark"]["name"]}}),
    )
    .await;
    let ended = wait_ended(&w.control).await;
    assert_eq!(ended.reason, EndReason::AgentHangup as i32);
    assert_eq!(ended.detail, "done");
    assert_eq!(next_twilio(&mut tw).await.unwrap_err(), Some(1000));
    let kinds = w.control.kinds();
    assert!(kinds.contains(&"tool_call".to_owned()), "{kinds:?}");
}

#[tokio::test]
async fn transfer_tool_checks_the_allow_list() {
    let mut w = world(|_| {}).await;
    let mut tw = twilio_ws(&w.relay, "/api/twilio/media-stream/call_1")
        .await
        .unwrap();
    send_json(&mut tw, start_msg()).await;
    let mut model = within("model dialled", w.model.conns.recv()).await.unwrap();
    model
        .send(json!({"type":"response.function_call_arguments.done","call_id":"c1","name":"transfer_call","arguments":"{\"number\":\"+19999\"}"}))
        .await;
    let out = model.next_of("conversation.item.create").await;
    assert_eq!(out["item"]["type"], "function_call_output");
    assert_eq!(out["item"]["call_id"], "c1");
    assert!(
        out["item"]["output"]
            .as_str()
            .unwrap()
            .contains("not an allowed")
    );
    model.next_of("response.create").await;
    model
        .send(json!({"type":"response.function_call_arguments.done","call_id":"c2","name":"transfer_call","arguments":"{\"number\":\"+15550001\"}"}))
        .await;
    let ended = wait_ended(&w.control).await;
    assert_eq!(ended.reason, EndReason::Transferred as i32);
    assert_eq!(ended.transfer_to, "+15550001");
}

/// A call whose attach stream passes down what is sent on the returned sender, started
/// and with its model session set up.
async fn call_taking_commands(
    w: &mut World,
) -> (tokio::sync::mpsc::Sender<pb::Command>, Ws, ModelConn) {
    let (cmd_tx, cmd_rx) = tokio::sync::mpsc::channel(8);
    w.control.state.lock().unwrap().commands = Some(cmd_rx);
    let mut tw = twilio_ws(&w.relay, "/api/twilio/media-stream/call_1")
        .await
        .unwrap();
    send_json(&mut tw, start_msg()).await;
    let mut model = within("model dialled", w.model.conns.recv()).await.unwrap();
    model.next_of("session.update").await;
    (cmd_tx, tw, model)
}

#[tokio::test]
async fn app_tools_and_commands_round_trip() {
    let mut w = world(|c| c.tool_timeout_secs = 1).await;
    let (cmd_tx, _tw, mut model) = call_taking_commands(&mut w).await;

    // An application tool goes up as an event; the result comes down as a command.
    model
        .send(json!({"type":"response.function_call_arguments.done","call_id":"c1","name":"lookup","arguments":"{\"id\":7}"}))
        .await;
    w.control.wait_kind("tool_call").await;
    let cmd = |id: &str, kind| pb::Command {
        command_id: id.to_owned(),
        kind: Some(kind),
    };
    cmd_tx
        .send(cmd(
            "k1",
            pb::command::Kind::ToolResult(pb::ToolResult {
                tool_call_id: "c1".into(),
                output: "{\"status\":\"shipped\"}".into(),
                is_error: false,
            }),
        ))
        .await
        .unwrap();
    let out = model.next_of("conversation.item.create").await;
    assert_eq!(out["item"]["output"], "{\"status\":\"shipped\"}");
    model.next_of("response.create").await;

    // A tool nobody answers times out with an error result for the model.
    model
        .send(json!({"type":"response.function_call_arguments.done","call_id":"c2","name":"lookup","arguments":"{}"}))
        .await;
    let out = model.next_of("conversation.item.create").await;
    assert_eq!(out["item"]["call_id"], "c2");
    assert!(
        out["item"]["output"]
            .as_str()
            .unwrap()
            .contains("did not answer")
    );

    // Say and update-instructions commands reach the model; update keeps μ-law.
    cmd_tx
        .send(cmd(
            "k2",
            pb::command::Kind::Say(pb::SayCommand {
                text: "Your order shipped".into(),
            }),
        ))
        .await
        .unwrap();
    let say = model.next_of("conversation.item.create").await;
    assert!(
        say["item"]["content"][0]["text"]
            .as_str()
            .unwrap()
            .contains("Your order shipped")
    );
    cmd_tx
        .send(cmd(
            "k3",
            pb::command::Kind::UpdateInstructions(pb::UpdateInstructionsCommand {
                instructions: "Be formal".into(),
            }),
        ))
        .await
        .unwrap();
    let su = model.next_of("session.update").await;
    assert_eq!(su["session"]["instructions"], "Be formal");
    assert_eq!(
        su["session"]["audio"]["output"]["format"]["type"],
        "audio/pcmu"
    );

    cmd_tx
        .send(cmd(
            "k4",
            pb::command::Kind::Hangup(pb::HangupCommand {
                reason: "done".into(),
            }),
        ))
        .await
        .unwrap();
    let ended = wait_ended(&w.control).await;
    assert_eq!(ended.reason, EndReason::AppHangup as i32);
    let applied: Vec<String> = w
        .control
        .events()
        .iter()
        .filter_map(|e| match &e.kind {
            Some(pb::call_event::Kind::CommandApplied(c)) => Some(c.command_id.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(applied, ["k1", "k2", "k3", "k4"]);
}

#[tokio::test]
async fn model_unreachable_ends_with_model_unavailable() {
    // A port nobody listens on.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let control = FakeControl::default();
    control.state.lock().unwrap().agent = agent(settings());
    let caddr = start_control(control.clone()).await;
    let relay = start_relay(&format!("ws://{dead}/v1/realtime"), Some(caddr), |_| {}).await;
    let mut tw = twilio_ws(&relay, "/api/twilio/media-stream/call_1")
        .await
        .unwrap();
    send_json(&mut tw, start_msg()).await;
    let ended = wait_ended(&control).await;
    assert_eq!(ended.reason, EndReason::ModelUnavailable as i32);
    assert_eq!(next_twilio(&mut tw).await.unwrap_err(), Some(1000));
}

#[tokio::test]
async fn no_start_in_time_closes_the_stream_before_anything_is_opened() {
    let mut w = world(|c| c.start_timeout_ms = 200).await;
    let mut tw = twilio_ws(&w.relay, "/api/twilio/media-stream/call_1")
        .await
        .unwrap();
    assert_eq!(
        next_close(&mut tw).await,
        (Some(4408), "no start in time".to_owned())
    );
    assert!(w.model.conns.try_recv().is_err(), "no model socket");
    assert!(
        w.control.state.lock().unwrap().opens.is_empty(),
        "nothing attached"
    );
    assert!(w.control.events().is_empty(), "nothing stored");
    assert!(
        w.relay
            .metrics
            .encode()
            .contains("callbridge_relay_stream_refusals_total{reason=\"start_timeout\"} 1")
    );
}

#[tokio::test]
async fn drain_refuses_new_calls_and_cuts_live_ones_with_1001() {
    // Without hand-off the live call runs on through the grace.
    let mut w = world(|c| {
        c.drain_grace_secs = 1;
        c.drain_handoff = false;
        // Nobody asks the cut call's action URL here: the relay gives up on it after this.
        c.drain_action_wait_secs = 1;
    })
    .await;
    let mut tw = twilio_ws(&w.relay, "/api/twilio/media-stream/call_1")
        .await
        .unwrap();
    send_json(&mut tw, start_msg()).await;
    let _model = within("model dialled", w.model.conns.recv()).await.unwrap();
    w.control.wait_kind("started").await;
    w.relay.stop.take().unwrap().send(()).unwrap();
    within("readyz flips", async {
        loop {
            if get(&w.relay, "/readyz").await.0 == 503 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    })
    .await;
    // The webhook is still answered (TwiML naming the public URL: the balancer sends the
    // stream to a ready relay); a new stream here is refused.
    let (status, _, _) =
        post_form(&w.relay, "/api/twilio/voice", &[("CallSid", "CA2")], true).await;
    assert_eq!(status, 200, "webhooks are answered while draining");
    let refused = twilio_ws(&w.relay, "/api/twilio/media-stream/call_2")
        .await
        .map(drop)
        .unwrap_err();
    assert!(
        matches!(&refused, tokio_tungstenite::tungstenite::Error::Http(r) if r.status() == 503),
        "no new stream while draining: {refused}"
    );
    // The live call keeps running through the grace, then is cut with 1001 and DRAIN.
    assert_eq!(next_twilio(&mut tw).await.unwrap_err(), Some(1001));
    let ended = wait_ended(&w.control).await;
    assert_eq!(ended.reason, EndReason::Drain as i32);
    within("relay stops", &mut w.relay.done).await.unwrap();
}

#[tokio::test]
async fn drain_hands_a_quiet_call_off_with_handoff() {
    let mut w = world(|c| {
        c.drain_grace_secs = 30;
        // Nobody asks the handed-off call's action URL here: the relay gives up on it
        // after this (tests/tests/e2e_drain.rs covers the wait).
        c.drain_action_wait_secs = 1;
    })
    .await;
    let mut tw = twilio_ws(&w.relay, "/api/twilio/media-stream/call_1")
        .await
        .unwrap();
    send_json(&mut tw, start_msg()).await;
    let _model = within("model dialled", w.model.conns.recv()).await.unwrap();
    w.control.wait_kind("started").await;
    w.relay.stop.take().unwrap().send(()).unwrap();
    // Nothing is playing and nobody speaks: the call is handed off at once, cleanly,
    // long before the grace is over.
    assert_eq!(next_twilio(&mut tw).await.unwrap_err(), Some(1000));
    let ended = wait_ended(&w.control).await;
    assert_eq!(ended.reason, EndReason::Handoff as i32);
    within("relay stops", &mut w.relay.done).await.unwrap();
}

#[tokio::test]
async fn standalone_mode_serves_the_simple_stream() {
    let mut model = start_model().await;
    let relay = start_relay(&model.url, None, |c| {
        c.agent_greeting = Some("Welcome to the shop".into());
        // The model hanging up ends the call here (reconnects: tests/tests/e2e_resilience.rs).
        c.model_reconnect_secs = 0;
    })
    .await;
    let (status, _, body) =
        post_form(&relay, "/api/twilio/voice", &[("CallSid", "CA1")], true).await;
    assert_eq!(status, 200);
    assert!(body.contains("/api/twilio/media-stream-simple"), "{body}");
    // The control-backed path does not exist without control.
    let err = twilio_ws(&relay, "/api/twilio/media-stream/call_1")
        .await
        .unwrap_err();
    assert!(matches!(err, tokio_tungstenite::tungstenite::Error::Http(r) if r.status() == 404));

    let mut tw = twilio_ws(&relay, "/api/twilio/media-stream-simple")
        .await
        .unwrap();
    send_json(&mut tw, start_msg_simple()).await;
    let mut m = within("model dialled", model.conns.recv()).await.unwrap();
    // Only the parameter the GA WebSocket documents.
    assert_eq!(m.uri, "/v1/realtime?model=gpt-realtime", "{}", m.uri);
    let greet = m.next_of("conversation.item.create").await;
    assert!(
        greet["item"]["content"][0]["text"]
            .as_str()
            .unwrap()
            .contains("Welcome to the shop")
    );
    m.next_of("response.create").await;
    let p = frame();
    send_json(&mut tw, media_msg(&p)).await;
    assert_eq!(
        m.next_of("input_audio_buffer.append").await["audio"],
        p.as_str()
    );
    m.send(
        json!({"type":"response.output_audio.delta","response_id":"r","item_id":"i","delta": p}),
    )
    .await;
    assert_eq!(
        next_twilio(&mut tw).await.unwrap()["media"]["payload"],
        p.as_str()
    );
    // Model hangs up on us: the caller is closed normally.
    drop(m.tx);
    loop {
        if let Err(code) = next_twilio(&mut tw).await {
            assert_eq!(code, Some(1000));
            break;
        }
    }
    // /metrics is not on the public port (it has a listener of its own).
    let (status, _, _) = get(&relay, "/metrics").await;
    assert_eq!(status, 404);
    let body = relay.metrics.encode();
    assert!(
        body.contains("callbridge_relay_calls_total{reason=\"model_unavailable\"} 1"),
        "{body}"
    );
}

#[tokio::test]
async fn health_and_unknown_routes() {
    let w = world(|_| {}).await;
    let (s, h, b) = get(&w.relay, "/healthz").await;
    assert_eq!(s, 200);
    assert!(b.contains("ok"));
    assert!(
        h.iter()
            .any(|(k, v)| k == "content-security-policy" && v.contains("default-src 'none'"))
    );
    assert_eq!(get(&w.relay, "/readyz").await.0, 200);
    assert_eq!(get(&w.relay, "/nope").await.0, 404);
    assert_eq!(
        get(&w.relay, "/api/twilio/voice").await.0,
        404,
        "GET is not the webhook"
    );
}

#[tokio::test]
async fn silence_from_twilio_ends_with_media_timeout() {
    let mut w = world(|c| c.media_timeout_secs = 1).await;
    let mut tw = twilio_ws(&w.relay, "/api/twilio/media-stream/call_1")
        .await
        .unwrap();
    send_json(&mut tw, start_msg()).await;
    let _model = within("model dialled", w.model.conns.recv()).await.unwrap();
    send_json(&mut tw, media_msg(&frame())).await;
    let ended = wait_ended(&w.control).await;
    assert_eq!(ended.reason, EndReason::MediaTimeout as i32);
    assert_eq!(next_twilio(&mut tw).await.unwrap_err(), Some(1000));
}

#[tokio::test]
async fn agent_max_duration_ends_the_call() {
    let control = FakeControl::default();
    let mut s = settings();
    s.max_call_duration_secs = 1;
    control.state.lock().unwrap().agent = agent(s);
    let caddr = start_control(control.clone()).await;
    let mut model = start_model().await;
    let relay = start_relay(&model.url, Some(caddr), |_| {}).await;
    let mut tw = twilio_ws(&relay, "/api/twilio/media-stream/call_1")
        .await
        .unwrap();
    send_json(&mut tw, start_msg()).await;
    let mut m = within("model dialled", model.conns.recv()).await.unwrap();
    // Keep the caller talking so only the duration limit can end the call.
    let feeder = async {
        loop {
            let msg =
                tokio_tungstenite::tungstenite::Message::text(media_msg(&frame()).to_string());
            // Errors are fine here: the relay closes the socket when the limit hits.
            let _ = within("feed", futures_util::SinkExt::send(&mut tw, msg)).await;
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    };
    let ended = tokio::select! {
        e = wait_ended(&control) => e,
        () = feeder => unreachable!(),
    };
    assert_eq!(ended.reason, EndReason::MaxDuration as i32);
    m.next_of("__closed").await;
}

#[tokio::test]
async fn caller_gone_before_the_model_answers_leaks_no_model_socket() {
    // A model endpoint that accepts TCP but never completes the WebSocket handshake.
    let blackhole = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/v1/realtime", blackhole.local_addr().unwrap());
    let control = FakeControl::default();
    control.state.lock().unwrap().agent = agent(settings());
    let caddr = start_control(control.clone()).await;
    let relay = start_relay(&url, Some(caddr), |_| {}).await;
    let mut tw = twilio_ws(&relay, "/api/twilio/media-stream/call_1")
        .await
        .unwrap();
    send_json(&mut tw, start_msg()).await;
    let (mut half_open, _) = within("relay dials", blackhole.accept()).await.unwrap();
    send_json(&mut tw, json!({"event":"stop","streamSid":"MZ1"})).await;
    let ended = wait_ended(&control).await;
    assert_eq!(ended.reason, EndReason::CallerHangup as i32);
    // The relay dropped its half-open model connection: the server side reads EOF.
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0u8; 4096];
    within("model socket closed", async {
        loop {
            match half_open.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => continue, // the handshake request
            }
        }
    })
    .await;
}

#[tokio::test]
async fn oversized_and_early_messages_are_not_fatal() {
    let mut w = world(|_| {}).await;
    let mut tw = twilio_ws(&w.relay, "/api/twilio/media-stream/call_1")
        .await
        .unwrap();
    let p = frame();
    send_json(&mut tw, media_msg(&p)).await; // before start
    send_json(&mut tw, start_msg()).await;
    let mut model = within("model dialled", w.model.conns.recv()).await.unwrap();
    send_json(&mut tw, start_msg()).await; // a second start
    // A well-formed mark for audio never sent is harmless (no count, no underflow).
    send_json(
        &mut tw,
        json!({"event":"mark","streamSid":"MZ1","mark":{"name":"g0:20:nobody"}}),
    )
    .await;
    send_json(&mut tw, json!({"event":"weird"})).await;
    send_json(&mut tw, media_msg(&p)).await;
    assert_eq!(
        model.next_of("input_audio_buffer.append").await["audio"],
        p.as_str()
    );
    // Messages over the handled size are counted and skipped; the call goes on.
    let big = "A".repeat(32 * 1024);
    send_json(&mut tw, media_msg(&big)).await;
    let huge = "A".repeat(2 << 20);
    model
        .send(json!({"type":"response.output_audio.delta","response_id":"r","item_id":"i","delta": huge}))
        .await;
    model
        .send(json!({"type":"response.output_audio.delta","response_id":"r","item_id":"i","delta": p}))
        .await;
    let media = next_twilio(&mut tw).await.unwrap();
    assert_eq!(
        media["media"]["payload"],
        p.as_str(),
        "only the normal delta is played"
    );
    send_json(&mut tw, media_msg(&p)).await;
    assert_eq!(
        model.next_of("input_audio_buffer.append").await["audio"],
        p.as_str()
    );
    let m = w.relay.metrics.encode();
    assert!(
        m.contains("callbridge_relay_bad_messages_total{side=\"twilio\"} 4"),
        "{m}"
    );
    assert!(
        m.contains("callbridge_relay_bad_messages_total{side=\"realtime\"} 1"),
        "{m}"
    );
    assert!(!w.control.kinds().contains(&"ended".to_owned()));
}

#[tokio::test]
async fn a_dropped_model_session_hears_the_untranscribed_words_again() {
    use base64::Engine;
    let mut model = start_model().await;
    let relay = start_relay(&model.url, None, |_| {}).await;
    let mut tw = twilio_ws(&relay, "/api/twilio/media-stream-simple")
        .await
        .unwrap();
    send_json(&mut tw, start_msg_simple()).await;
    let mut m = within("model dialled", model.conns.recv()).await.unwrap();
    m.next_of("session.update").await;
    // The caller starts an utterance the model has not transcribed yet.
    m.send(json!({"type":"input_audio_buffer.speech_started","item_id":"u1","audio_start_ms":0}))
        .await;
    let words: Vec<String> = (1..=5u8)
        .map(|i| base64::engine::general_purpose::STANDARD.encode([i; 160]))
        .collect();
    for p in &words {
        send_json(&mut tw, media_msg(p)).await;
    }
    for p in &words {
        assert_eq!(
            m.next_of("input_audio_buffer.append").await["audio"],
            p.as_str()
        );
    }
    // The session drops: the next one is set up and hears the same audio, in order,
    // re-encoded from what the relay kept.
    drop(m.tx);
    let mut again = within("model redialled", model.conns.recv()).await.unwrap();
    again.next_of("session.update").await;
    for p in &words {
        assert_eq!(
            again.next_of("input_audio_buffer.append").await["audio"],
            p.as_str()
        );
    }
}

#[tokio::test]
async fn with_the_model_breaker_open_new_calls_get_the_fallback_without_dialling() {
    use callbridge_testkit::fake_realtime::FakeRealtime;
    // The model endpoint is down: every connection is closed unanswered.
    let (model, _conns) = FakeRealtime::builder()
        .refusing()
        .start_manual()
        .await
        .unwrap();
    let control = FakeControl::default();
    let mut s = settings();
    s.fallback = Some(pb::Fallback {
        action: Some(pb::fallback::Action::DialNumber("+15550111".into())),
        preamble: String::new(),
    });
    control.state.lock().unwrap().agent = agent(s);
    let caddr = start_control(control.clone()).await;
    // One failed dial opens the breaker; its first probe is far off, so every
    // connection the model sees below is a call's.
    let relay = start_relay(&model.url(), Some(caddr), |c| {
        c.model_reconnect_secs = 0;
        c.model_breaker_failures = 1;
        c.model_breaker_probe_ms = 60_000;
    })
    .await;
    let endpoint = format!("{{endpoint=\"{}\"}}", model.url());

    // Before the breaker opens, a webhook answers a stream, and the stream dials.
    let (status, _, body) = post_form(&relay, "/api/twilio/voice?callId=call_1", &[], true).await;
    assert_eq!(status, 200);
    assert!(body.contains("<Stream "), "{body}");
    let text = relay.metrics.encode();
    assert!(
        text.contains(&format!("callbridge_relay_model_breaker_open{endpoint} 0")),
        "{text}"
    );
    let mut tw = twilio_ws(&relay, "/api/twilio/media-stream/call_1")
        .await
        .unwrap();
    send_json(&mut tw, start_msg()).await;
    assert_eq!(
        wait_ended(&control).await.reason,
        EndReason::ModelUnavailable as i32
    );
    assert_eq!(next_close(&mut tw).await.0, Some(1000));
    assert_eq!(model.connections_refused(), 1, "the call dialled");
    let text = relay.metrics.encode();
    assert!(
        text.contains(&format!("callbridge_relay_model_breaker_open{endpoint} 1")),
        "{text}"
    );

    // Open: the webhook answers the agent's fallback instead of a stream.
    control.state.lock().unwrap().events.clear();
    let (status, _, body) = post_form(&relay, "/api/twilio/voice?callId=call_2", &[], true).await;
    assert_eq!(status, 200);
    assert!(!body.contains("<Stream"), "{body}");
    assert!(body.contains("+15550111"), "{body}");
    // The call never gets a stream: the relay attaches it itself to report its end.
    let ended = wait_ended(&control).await;
    assert_eq!(ended.reason, EndReason::ModelUnavailable as i32);
    assert!(ended.detail.contains("circuit breaker open"), "{ended:?}");
    let open = control.state.lock().unwrap().opens.last().cloned().unwrap();
    assert_eq!(open.call_id, "call_2");
    assert_eq!(open.stream_credential_id.len(), 32, "{open:?}");

    // A stream that arrives anyway ends at once with MODEL_UNAVAILABLE, without a dial.
    control.state.lock().unwrap().events.clear();
    let mut tw = twilio_ws(&relay, "/api/twilio/media-stream/call_3")
        .await
        .unwrap();
    send_json(
        &mut tw,
        start_with(json!({"callId":"call_3","credential":credential(Some("call_3"))})),
    )
    .await;
    let ended = wait_ended(&control).await;
    assert_eq!(ended.reason, EndReason::ModelUnavailable as i32);
    assert!(ended.detail.contains("circuit breaker open"), "{ended:?}");
    assert_eq!(next_close(&mut tw).await.0, Some(1000));
    let kinds = control.kinds();
    assert!(kinds.iter().any(|k| k == "started"), "{kinds:?}");
    assert!(
        control.events().iter().any(|e| matches!(
            &e.kind,
            Some(pb::call_event::Kind::ModelError(m)) if m.fatal && m.code == "model_unavailable"
        )),
        "{kinds:?}"
    );
    assert_eq!(model.connections_refused(), 1, "no dial while open");
    let text = relay.metrics.encode();
    for at in ["webhook", "stream"] {
        let series = format!(
            "callbridge_relay_model_breaker_short_circuits_total{{endpoint=\"{}\",at=\"{at}\"}} 1",
            model.url()
        );
        assert!(text.contains(&series), "{series} in\n{text}");
    }
}

#[tokio::test]
async fn a_voicemail_cuts_the_agent_waits_for_the_cancel_and_ends_once_played() {
    let mut w = world(|_| {}).await;
    let mut with_voicemail = settings();
    with_voicemail.voicemail = Some(pb::Voicemail {
        message: Some(pb::voicemail::Message::SpokenText(
            "Please call us back.".into(),
        )),
    });
    w.control.state.lock().unwrap().agent = agent(with_voicemail);
    let (cmd_tx, mut tw, mut model) = call_taking_commands(&mut w).await;
    // The agent is talking to the machine's greeting when the verdict comes.
    let delta = delta_100ms();
    model
        .send(json!({"type":"response.created","response":{"id":"r1","status":"in_progress"}}))
        .await;
    model
        .send(json!({"type":"response.output_audio.delta","response_id":"r1","item_id":"i1","delta": delta}))
        .await;
    assert_eq!(next_twilio(&mut tw).await.unwrap()["event"], "media");
    assert_eq!(next_twilio(&mut tw).await.unwrap()["event"], "mark");
    let verdict = |id: &str, answered_by: &str| pb::Command {
        command_id: id.to_owned(),
        kind: Some(pb::command::Kind::AnsweringMachine(
            pb::AnsweringMachineCommand {
                answered_by: answered_by.into(),
            },
        )),
    };
    cmd_tx
        .send(verdict("v1", "machine_end_beep"))
        .await
        .unwrap();
    // Cut as a barge-in cuts: Twilio's queue cleared, the response cancelled, the item
    // truncated; the words go in, and the response for them waits for the cancelled one.
    assert_eq!(
        next_twilio(&mut tw).await.unwrap(),
        json!({"event":"clear","streamSid":"MZ1"})
    );
    model.next_of("response.cancel").await;
    let words = model.next_of("conversation.item.create").await;
    assert!(
        words["item"]["content"][0]["text"]
            .as_str()
            .unwrap()
            .contains("\"Please call us back.\""),
        "{words}"
    );
    // A second verdict changes nothing.
    cmd_tx.send(verdict("v2", "human")).await.unwrap();
    model
        .send(json!({"type":"response.done","response":{"id":"r1","status":"cancelled","status_details":{"type":"cancelled","reason":"client_cancelled"}}}))
        .await;
    model.next_of("response.create").await;
    assert!(
        !w.control.kinds().contains(&"ended".to_owned()),
        "not before the message"
    );
    // The message plays; once Twilio says it was heard, the call ends.
    model
        .send(json!({"type":"response.created","response":{"id":"r2","status":"in_progress"}}))
        .await;
    model
        .send(json!({"type":"response.output_audio.delta","response_id":"r2","item_id":"i2","delta": delta}))
        .await;
    model
        .send(json!({"type":"response.done","response":{"id":"r2","status":"completed"}}))
        .await;
    assert_eq!(next_twilio(&mut tw).await.unwrap()["event"], "media");
    let mut mark = next_twilio(&mut tw).await.unwrap();
    // The item's final mark (after the cadence one).
    while let Ok(Ok(next)) =
        tokio::time::timeout(std::time::Duration::from_millis(200), next_twilio(&mut tw)).await
    {
        mark = next;
    }
    assert_eq!(mark["event"], "mark");
    assert!(!w.control.kinds().contains(&"ended".to_owned()));
    send_json(
        &mut tw,
        json!({"event":"mark","streamSid":"MZ1","mark":{"name": mark["mark"]["name"]}}),
    )
    .await;
    let ended = wait_ended(&w.control).await;
    assert_eq!(ended.reason, EndReason::VoicemailLeft as i32);
    let events = w.control.events();
    let verdicts: Vec<_> = events
        .iter()
        .filter_map(|e| match &e.kind {
            Some(pb::call_event::Kind::AnsweringMachine(m)) => {
                Some((m.answered_by.clone(), m.action))
            }
            _ => None,
        })
        .collect();
    assert_eq!(
        verdicts,
        vec![(
            "machine_end_beep".to_owned(),
            pb::answering_machine::Action::LeaveMessage as i32
        )]
    );
}

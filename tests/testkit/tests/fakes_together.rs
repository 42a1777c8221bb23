//! The two fakes talking to each other through a tiny relay stand-in written here.
//!
//! The stand-in does what `docs/protocols.md`, "Barge-in" recommends (marks after every media
//! message, heard ms from echoed marks, `clear` then truncate on barge-in, late deltas dropped), so
//! these tests check the fakes' side of each protocol: signing, TwiML, the play queue and mark
//! semantics of the caller; VAD, transcripts, cancel and truncate of the model.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use callbridge_testkit::audio;
use callbridge_testkit::conversation::{AgentReply, Conversation, Turn};
use callbridge_testkit::fake_realtime::FakeRealtime;
use callbridge_testkit::signature::twilio_signature;
use callbridge_testkit::sim_caller::{CallerCommand, CallerConfig, ClosedBy, SimCaller};
use callbridge_testkit::with_timeout;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::StatusCode;

const PUBLIC: &str = "https://relay.test";
const TOKEN: &str = "twilio-secret";
const LIMIT: Duration = Duration::from_secs(30);

struct StandIn {
    model_url: String,
}

/// Starts the stand-in relay; returns its address.
async fn stand_in(model_url: String) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let cfg = Arc::new(StandIn { model_url });
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(serve(stream, cfg.clone()));
        }
    });
    addr
}

async fn serve(stream: TcpStream, cfg: Arc<StandIn>) {
    let mut buf = [0u8; 2048];
    let n = stream.peek(&mut buf).await.unwrap_or(0);
    let head = String::from_utf8_lossy(&buf[..n]).to_ascii_lowercase();
    if head.contains("upgrade: websocket") {
        media_stream(stream, cfg).await;
    } else {
        webhook(stream).await;
    }
}

fn parse_form(body: &str) -> Vec<(String, String)> {
    fn dec(s: &str) -> String {
        let s = s.replace('+', " ");
        let b = s.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < b.len() {
            if b[i] == b'%' && i + 2 < b.len() {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).expect("hex");
                out.push(u8::from_str_radix(hex, 16).expect("hex"));
                i += 3;
            } else {
                out.push(b[i]);
                i += 1;
            }
        }
        String::from_utf8(out).expect("utf8")
    }
    body.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (dec(k), dec(v))
        })
        .collect()
}

async fn webhook(mut stream: TcpStream) {
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    let (head, body) = loop {
        let n = stream.read(&mut buf).await.unwrap_or(0);
        if n == 0 {
            return;
        }
        raw.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&raw).to_string();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                })
                .unwrap_or(0);
            if body.len() >= len {
                break (head.to_owned(), body.to_owned());
            }
        }
    };
    let path = head.split_whitespace().nth(1).unwrap_or("/").to_owned();
    let sig = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("x-twilio-signature")
                .then(|| v.trim().to_owned())
        })
        .unwrap_or_default();
    let params = parse_form(&body);
    let expected = twilio_signature(TOKEN, &format!("{PUBLIC}{path}"), &params);
    let (status, text) = if sig != expected {
        ("403 Forbidden", "bad signature".to_owned())
    } else if path.starts_with("/api/twilio/voice") {
        (
            "200 OK",
            format!(
                r#"<?xml version="1.0" encoding="UTF-8"?><Response><Connect action="{PUBLIC}/api/twilio/after/c1"><Stream url="wss://relay.test/api/twilio/media-stream/c1"><Parameter name="callId" value="c1"/></Stream></Connect></Response>"#
            ),
        )
    } else {
        ("200 OK", "<Response><Hangup/></Response>".to_owned())
    };
    let resp = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
        text.len()
    );
    let _ = stream.write_all(resp.as_bytes()).await;
}

/// Per-item playback bookkeeping from marks (`docs/protocols.md`, "Barge-in").
#[derive(Default)]
struct Item {
    sent_ms: u64,
    heard_ms: u64,
}

async fn media_stream(stream: TcpStream, cfg: Arc<StandIn>) {
    #[allow(
        clippy::result_large_err,
        reason = "the Err type is tungstenite's ErrorResponse"
    )]
    let check = |req: &Request, resp: Response| -> Result<Response, ErrorResponse> {
        let url = format!("wss://relay.test{}", req.uri().path());
        let sig = req
            .headers()
            .get("x-twilio-signature")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if sig == twilio_signature(TOKEN, &url, &[]) {
            Ok(resp)
        } else {
            let mut e = ErrorResponse::new(Some("bad signature".into()));
            *e.status_mut() = StatusCode::FORBIDDEN;
            Err(e)
        }
    };
    let Ok(twilio) = tokio_tungstenite::accept_hdr_async(stream, check).await else {
        return;
    };
    let (mut tw_tx, mut tw_rx) = twilio.split();
    // Wait for `start`.
    let mut stream_sid = String::new();
    while let Some(Ok(Message::Text(t))) = tw_rx.next().await {
        let v: Value = serde_json::from_str(&t).expect("json");
        if v["event"] == "start" {
            stream_sid = v["start"]["streamSid"].as_str().expect("sid").to_owned();
            break;
        }
    }
    let mut req = format!("{}?model=gpt-realtime", cfg.model_url)
        .into_client_request()
        .expect("url");
    req.headers_mut()
        .insert("authorization", "Bearer sk-test".parse().expect("header"));
    let (model, _) = tokio_tungstenite::connect_async(req).await.expect("model");
    let (mut m_tx, mut m_rx) = model.split();
    let send_m = |v: Value| Message::text(v.to_string());
    m_tx.send(send_m(
        json!({"type": "session.update", "session": {"type": "realtime",
        "instructions": "stand-in", "audio": {"input": {"format": {"type": "audio/pcmu"},
        "transcription": {"model": "gpt-4o-mini-transcribe"}},
        "output": {"format": {"type": "audio/pcmu"}, "voice": "marin"}}}}),
    ))
    .await
    .expect("send");
    m_tx.send(send_m(json!({"type": "response.create"})))
        .await
        .expect("send");
    let mut generation = 0u64;
    let mut items: HashMap<String, Item> = HashMap::new();
    let mut current: Option<String> = None;
    let mut dropped: HashSet<String> = HashSet::new();
    let mut ending = false;
    let mut awaiting_final = false;
    let mut pending_call: Option<String> = None;
    loop {
        tokio::select! {
            msg = tw_rx.next() => {
                let Some(Ok(Message::Text(t))) = msg else { break };
                let v: Value = serde_json::from_str(&t).expect("json");
                match v["event"].as_str() {
                    Some("media") => {
                        m_tx.send(send_m(json!({"type": "input_audio_buffer.append",
                            "audio": v["media"]["payload"]}))).await.expect("send");
                    }
                    Some("mark") => {
                        let name = v["mark"]["name"].as_str().expect("name");
                        let mut parts = name.split(':');
                        let g: u64 = parts.next().and_then(|s| s.parse().ok()).expect("generation");
                        let item = parts.next().expect("item").to_owned();
                        let ms: u64 = parts.next().and_then(|s| s.parse().ok()).expect("ms");
                        if g == generation && let Some(it) = items.get_mut(&item) {
                            it.heard_ms = it.heard_ms.max(ms);
                        }
                        let all_heard = items.values().all(|i| i.heard_ms >= i.sent_ms);
                        if ending && all_heard {
                            break;
                        }
                    }
                    Some("stop") => return,
                    _ => {}
                }
            }
            msg = m_rx.next() => {
                let Some(Ok(Message::Text(t))) = msg else { break };
                let v: Value = serde_json::from_str(&t).expect("json");
                match v["type"].as_str().unwrap_or("") {
                    "response.output_audio.delta" => {
                        if dropped.contains(v["response_id"].as_str().unwrap_or("")) {
                            continue;
                        }
                        let item = v["item_id"].as_str().expect("item").to_owned();
                        let n = audio::b64_len(v["delta"].as_str().expect("delta")) as u64;
                        let it = items.entry(item.clone()).or_default();
                        it.sent_ms += n / 8;
                        let name = format!("{generation}:{item}:{}", it.sent_ms);
                        current = Some(item);
                        tw_tx.send(Message::text(json!({"event": "media", "streamSid": stream_sid,
                            "media": {"payload": v["delta"]}}).to_string())).await.expect("send");
                        tw_tx.send(Message::text(json!({"event": "mark", "streamSid": stream_sid,
                            "mark": {"name": name}}).to_string())).await.expect("send");
                    }
                    "input_audio_buffer.speech_started" => {
                        if let Some(item) = current.take()
                            && let Some(it) = items.get(&item)
                            && it.sent_ms > it.heard_ms
                        {
                            tw_tx.send(Message::text(json!({"event": "clear",
                                "streamSid": stream_sid}).to_string())).await.expect("send");
                            generation += 1;
                            let end = it.heard_ms.min(it.sent_ms);
                            m_tx.send(send_m(json!({"type": "conversation.item.truncate",
                                "item_id": item, "content_index": 0, "audio_end_ms": end})))
                                .await.expect("send");
                            items.remove(&item);
                        }
                    }
                    "response.created" => {}
                    "response.done" => {
                        let status = v["response"]["status"].as_str().unwrap_or("");
                        if status == "cancelled" {
                            dropped.insert(v["response"]["id"].as_str().unwrap_or("").to_owned());
                        }
                        if awaiting_final {
                            // The goodbye after end_call is out: end once it was heard.
                            ending = true;
                            if items.values().all(|i| i.heard_ms >= i.sent_ms) {
                                break;
                            }
                        }
                        if let Some(call_id) = pending_call.take() {
                            m_tx.send(send_m(json!({"type": "conversation.item.create", "item": {
                                "type": "function_call_output", "call_id": call_id,
                                "output": "{\"ok\":true}"}}))).await.expect("send");
                            m_tx.send(send_m(json!({"type": "response.create"}))).await.expect("send");
                            awaiting_final = true;
                        }
                    }
                    "response.function_call_arguments.done" if v["name"] == "end_call" => {
                        pending_call = Some(v["call_id"].as_str().expect("call").to_owned());
                    }
                    _ => {}
                }
            }
        }
    }
    // The relay ends the stream: Twilio will fetch the <Connect action>.
    let _ = tw_tx.close().await;
}

fn script() -> Conversation {
    Conversation {
        greeting: Some(AgentReply::says("Hello, how can I help?", 400)),
        turns: vec![
            Turn::new(
                "Tell me about your prices",
                400,
                AgentReply::says("Our prices start at ten dollars and go up from there", 2000),
            )
            .barge_in_after(600),
            Turn::new(
                "Just the cheapest please",
                400,
                AgentReply::says("The cheapest is ten dollars", 500),
            ),
            Turn::new(
                "Great, bye",
                300,
                AgentReply::says("Goodbye", 300)
                    .then_calls("end_call", "{}")
                    .after_output(AgentReply::says("Take care", 200)),
            ),
        ],
    }
}

#[tokio::test]
async fn a_scripted_call_with_barge_in_and_end_call_through_a_stand_in_relay() {
    let fake = FakeRealtime::builder()
        .script(script())
        .chunk_ms(20)
        .late_deltas(2)
        .start()
        .await
        .expect("fake");
    let relay = stand_in(fake.url()).await;
    let mut cfg = CallerConfig::new(PUBLIC, relay, Some(TOKEN));
    cfg.script = script();
    cfg.gap_ms = 200;
    let report = with_timeout(LIMIT, "the call", SimCaller::new(cfg).run())
        .await
        .expect("call runs");

    assert_eq!(report.webhook.response.status, 200);
    let twiml = report.webhook.twiml.as_ref().expect("twiml");
    assert_eq!(
        twiml.parameters,
        vec![("callId".to_owned(), "c1".to_owned())]
    );
    let leg = report.leg().expect("a stream");
    assert!(leg.protocol_errors.is_empty(), "{:?}", leg.protocol_errors);
    assert_eq!(leg.turns_spoken, vec![0, 1, 2]);
    assert!(leg.answer_timeouts.is_empty(), "{:?}", leg.answer_timeouts);
    assert!(
        matches!(leg.closed_by, ClosedBy::Relay { .. }),
        "{:?}",
        leg.closed_by
    );
    // The relay ended the stream, so the caller fetched the action URL and got a hang-up.
    assert_eq!(report.after.len(), 1);
    assert!(report.last_after().expect("after twiml").hangup);

    let rec = fake.connection(0).expect("one model session");
    assert_eq!(
        rec.caller_transcripts,
        vec![
            "Tell me about your prices",
            "Just the cheapest please",
            "Great, bye"
        ]
    );
    // One barge-in: one clear at the caller, one accepted truncate at the model, equal to
    // what the caller heard within one 20 ms frame.
    assert_eq!(leg.clears.len(), 1, "{:?}", leg.clears);
    assert_eq!(rec.truncates.len(), 1, "{:?}", rec.truncates);
    let truncate = &rec.truncates[0];
    assert_eq!(truncate.error, None);
    let heard = leg.clears[0].heard_answer_ms;
    assert!(
        heard >= 600.0,
        "caller barged in after hearing 600 ms, heard {heard}"
    );
    let barge = leg
        .barge_ins
        .first()
        .expect("a scripted barge-in")
        .heard_answer_ms;
    let end = truncate.audio_end_ms as f64;
    assert!(
        end >= barge - 20.0 && end <= heard + 1.0,
        "truncated at {end} ms, caller heard {barge} ms when it spoke, {heard} ms at the clear"
    );
    // The cut response was cancelled; the late deltas were dropped by the stand-in, so
    // the caller never received more of it than the model sent before speech_started.
    let cut = &rec.responses[1];
    assert_eq!(cut.status, "cancelled");
    assert!(cut.audio_sent_ms < 2000);
    // Everything else was heard in full: greeting, answers 2 and 3, and the goodbye.
    let full_ms = 400 + 500 + 300 + 200;
    let played_ms = leg.media_bytes_played / 8;
    assert!(
        played_ms >= full_ms + 600 && played_ms <= full_ms + 2000,
        "played {played_ms} ms"
    );
    // Every mark the stand-in sent came back.
    let marks_sent = leg
        .received
        .iter()
        .filter(|r| r.event["event"] == "mark")
        .count();
    assert_eq!(leg.marks_echoed.len(), marks_sent);
}

#[tokio::test]
async fn wrong_signatures_are_refused_before_any_model_session() {
    let fake = FakeRealtime::builder().start().await.expect("fake");
    let relay = stand_in(fake.url()).await;
    let mut cfg = CallerConfig::new(PUBLIC, relay, Some(TOKEN));
    cfg.wrong_signature = true;
    let report = with_timeout(LIMIT, "the call", SimCaller::new(cfg.clone()).run())
        .await
        .expect("runs");
    assert_eq!(report.webhook.response.status, 403);
    assert!(report.legs.is_empty());
    // A forged stream upgrade is refused too.
    let caller = SimCaller::new(cfg);
    let refused = with_timeout(
        LIMIT,
        "handshake",
        caller.connect_stream("wss://relay.test/api/twilio/media-stream/c1"),
    )
    .await
    .expect("connects");
    assert_eq!(refused.err(), Some(403));
    assert_eq!(fake.connections_accepted(), 0);
}

#[tokio::test]
async fn commands_send_dtmf_and_stop() {
    let fake = FakeRealtime::builder().start().await.expect("fake");
    let relay = stand_in(fake.url()).await;
    let mut cfg = CallerConfig::new(PUBLIC, relay, Some(TOKEN));
    // Nothing scripted: the caller would stream silence until stopped.
    cfg.hang_up_at_end = false;
    let handle = SimCaller::new(cfg).start();
    let live = handle.live.clone();
    assert!(
        callbridge_testkit::eventually(LIMIT, || live
            .frames_sent
            .load(std::sync::atomic::Ordering::Relaxed)
            > 5)
        .await,
        "frames flow"
    );
    handle.command(CallerCommand::Dtmf("7".into())).await;
    handle.command(CallerCommand::Stop).await;
    let report = with_timeout(LIMIT, "call end", handle.join())
        .await
        .expect("runs");
    let leg = report.leg().expect("leg");
    assert_eq!(leg.closed_by, ClosedBy::Caller);
    // The caller hung up: Twilio does not fetch the action URL then.
    assert!(report.after.is_empty());
    assert!(leg.frames_sent > 5);
}

#[tokio::test]
async fn a_webhook_answered_5xx_is_not_retried() {
    // A "relay" that answers every request 503 and counts them.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let requests = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let counted = requests.clone();
    let server = tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let _ = sock.read(&mut buf).await;
                let _ = sock
                    .write_all(
                        b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                    )
                    .await;
            });
        }
    });
    let mut cfg = CallerConfig::new(PUBLIC, addr, Some(TOKEN));
    cfg.script = script();
    let report = with_timeout(LIMIT, "the call", SimCaller::new(cfg).run())
        .await
        .expect("the call runs");
    server.abort();
    assert_eq!(report.webhook.response.status, 503);
    assert!(report.webhook.twiml.is_none());
    assert!(report.legs.is_empty(), "no stream without TwiML");
    assert_eq!(
        requests.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "Twilio does not retry a 5xx voice webhook"
    );
}

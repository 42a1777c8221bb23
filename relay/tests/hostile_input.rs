//! Property tests: every relay parser and decision that sees outside input, fed generated
//! hostile input. Each module is one target of `scripts/fuzz.sh`, which runs them with far
//! more cases; the suite runs `PROPTEST_CASES` cases (default 64) of each.
//!
//! What must hold for any input: no panic; outputs the relay builds from that input stay
//! well-formed (JSON frames, TwiML); a request is accepted exactly when its signature is
//! right; the call's playback state never truncates past what was sent, ignores marks
//! after a clear, stays bounded, and reports exactly one end; a stream credential opens
//! only the stream it was minted for, until it expires.

// Test code: a failed unwrap is a failed test, with its location.
#![allow(clippy::unwrap_used)]

mod support;

use proptest::prelude::*;

/// Cases per property: `PROPTEST_CASES`, else a small default so the suite stays fast.
fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64);
    ProptestConfig::with_cases(cases)
}

/// Any text, weighted towards the characters parsers and escapers trip on.
fn hostile_text() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        proptest::collection::vec(
            prop_oneof![
                Just('"'),
                Just('\\'),
                Just('<'),
                Just('>'),
                Just('&'),
                Just('\''),
                Just('%'),
                Just('+'),
                Just('='),
                Just('?'),
                Just('#'),
                Just('/'),
                Just(':'),
                Just('\0'),
                Just('\u{7f}'),
                Just('\u{fffe}'),
                Just('\u{ffff}'),
                Just('\u{1f600}'),
                Just(']'),
                any::<char>(),
                proptest::char::range('a', 'z'),
            ],
            0..40
        )
        .prop_map(|c| c.into_iter().collect()),
    ]
}

/// Any JSON value, a few levels deep.
fn json_value() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::Value;
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        hostile_text().prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::Array),
            proptest::collection::vec((hostile_text(), inner), 0..6)
                .prop_map(|kv| serde_json::Value::Object(kv.into_iter().collect())),
        ]
    })
}

/// A JSON object with `event`/`type` (`key`) from `names` or anything, and the `fields` a
/// parser reads, each a string, a wrong type, or missing.
fn frame(
    key: &'static str,
    names: &'static [&'static str],
    fields: &'static [&'static str],
) -> impl Strategy<Value = String> {
    let name = prop_oneof![
        proptest::sample::select(names).prop_map(serde_json::Value::from),
        json_value(),
    ];
    let field_values = proptest::collection::vec(
        prop_oneof![
            hostile_text().prop_map(serde_json::Value::from),
            json_value(),
            Just(serde_json::Value::Null),
        ],
        fields.len(),
    );
    (
        name,
        field_values,
        proptest::collection::vec(any::<bool>(), fields.len()),
    )
        .prop_map(move |(name, values, present)| {
            let mut obj = serde_json::Map::new();
            obj.insert(key.to_owned(), name);
            for ((field, value), present) in fields.iter().zip(values).zip(present) {
                if present {
                    insert_path(&mut obj, field, value);
                }
            }
            serde_json::Value::Object(obj).to_string()
        })
}

/// Sets `a.b.c` in `obj`, creating objects on the way.
fn insert_path(
    obj: &mut serde_json::Map<String, serde_json::Value>,
    path: &str,
    value: serde_json::Value,
) {
    match path.split_once('.') {
        None => {
            obj.insert(path.to_owned(), value);
        }
        Some((head, rest)) => {
            let child = obj
                .entry(head.to_owned())
                .or_insert_with(|| serde_json::json!({}));
            if let serde_json::Value::Object(child) = child {
                insert_path(child, rest, value);
            }
        }
    }
}

/// What arrives on a WebSocket: raw text, a truncated or spliced frame, or a structured one.
fn ws_text(structured: BoxedStrategy<String>) -> impl Strategy<Value = String> {
    prop_oneof![
        hostile_text(),
        structured.clone(),
        (structured.clone(), any::<prop::sample::Index>())
            .prop_map(|(s, i)| s.chars().take(i.index(s.chars().count() + 1)).collect()),
        (structured.clone(), structured).prop_map(|(a, b)| format!("{a}{b}")),
    ]
}

mod twilio_events {
    use super::*;
    use callbridge_relay::twilio::{self, TwilioEventKind};

    const NAMES: &[&str] = &["connected", "start", "media", "mark", "dtmf", "stop"];
    const FIELDS: &[&str] = &[
        "streamSid",
        "start.streamSid",
        "start.callSid",
        "start.customParameters",
        "start.customParameters.callId",
        "media.payload",
        "mark.name",
        "dtmf.digit",
    ];

    fn frames() -> BoxedStrategy<String> {
        frame("event", NAMES, FIELDS).boxed()
    }

    proptest! {
        #![proptest_config(config())]

        /// Any frame parses or is refused; what parses carries exactly the fields sent.
        #[test]
        fn any_frame_parses_or_is_refused_without_panic(text in ws_text(frames())) {
            let Ok(msg) = twilio::parse(&text) else { return Ok(()) };
            let v: serde_json::Value = serde_json::from_str(&text).unwrap();
            let name = v["event"].as_str().unwrap();
            prop_assert_eq!(msg.event, TwilioEventKind::from_name(name));
            if let Some(m) = &msg.media {
                prop_assert_eq!(&*m.payload, v["media"]["payload"].as_str().unwrap());
            }
            if let Some(m) = &msg.mark {
                prop_assert_eq!(&*m.name, v["mark"]["name"].as_str().unwrap());
            }
            if let Some(s) = &msg.start {
                prop_assert_eq!(&*s.stream_sid, v["start"]["streamSid"].as_str().unwrap());
                let sid = twilio::StreamSid::new(s.stream_sid.to_string());
                prop_assert_eq!(sid.is_some(), twilio::is_safe_id(&s.stream_sid));
            }
        }

        /// The base64 check never lets through what a decoder refuses, and every encoding
        /// passes it with the length it announces.
        #[test]
        fn base64_check_agrees_with_a_decoder(
            text in prop_oneof![hostile_text(), "[A-Za-z0-9+/=]{0,24}"],
            bytes in proptest::collection::vec(any::<u8>(), 1..400),
        ) {
            use base64::Engine;
            use base64::engine::general_purpose::STANDARD;
            if twilio::is_base64(&text) {
                let decoded = STANDARD.decode(&text);
                // The check looks at length, alphabet and padding only; non-canonical
                // trailing bits are the decoder's call, and only they may differ.
                if let Ok(d) = decoded {
                    prop_assert_eq!(d.len(), twilio::decoded_len(&text));
                }
            }
            let encoded = STANDARD.encode(&bytes);
            prop_assert!(twilio::is_base64(&encoded));
            prop_assert_eq!(twilio::decoded_len(&encoded), bytes.len());
        }

        /// Frames the relay sends Twilio stay valid JSON for any mark name it echoes.
        #[test]
        fn outgoing_frames_are_json_for_any_mark_name(
            sid in "[A-Za-z0-9_-]{1,34}",
            name in hostile_text(),
        ) {
            let v: serde_json::Value = serde_json::from_str(&twilio::mark_frame(&sid, &name)).unwrap();
            prop_assert_eq!(v["mark"]["name"].as_str(), Some(name.as_str()));
            prop_assert_eq!(v["streamSid"].as_str(), Some(sid.as_str()));
            let v: serde_json::Value = serde_json::from_str(&twilio::clear_frame(&sid)).unwrap();
            prop_assert_eq!(v["event"].as_str(), Some("clear"));
        }
    }
}

mod realtime_events {
    use super::*;
    use callbridge_relay::realtime::{self, RealtimeEventKind};

    const NAMES: &[&str] = &[
        "session.created",
        "session.updated",
        "response.created",
        "response.done",
        "response.output_audio.delta",
        "response.output_audio.done",
        "response.output_audio_transcript.done",
        "response.function_call_arguments.done",
        "conversation.item.input_audio_transcription.completed",
        "input_audio_buffer.speech_started",
        "error",
        "rate_limits.updated",
    ];
    const FIELDS: &[&str] = &[
        "delta",
        "item_id",
        "response_id",
        "transcript",
        "call_id",
        "name",
        "arguments",
        "response.id",
        "response.status",
        "response.usage.total_tokens",
        "response.usage.input_token_details.audio_tokens",
        "error.type",
        "error.code",
        "error.message",
        "session.audio.output.format.type",
    ];

    fn frames() -> BoxedStrategy<String> {
        frame("type", NAMES, FIELDS).boxed()
    }

    proptest! {
        #![proptest_config(config())]

        /// Any server event parses or is refused; what parses carries the fields sent, and
        /// its usage converts whatever the numbers.
        #[test]
        fn any_event_parses_or_is_refused_without_panic(text in ws_text(frames())) {
            let Ok(ev) = realtime::parse(&text) else { return Ok(()) };
            let v: serde_json::Value = serde_json::from_str(&text).unwrap();
            prop_assert_eq!(ev.kind, RealtimeEventKind::from_name(v["type"].as_str().unwrap()));
            if let Some(d) = &ev.delta {
                prop_assert_eq!(&**d, v["delta"].as_str().unwrap());
            }
            if let Some(i) = &ev.item_id {
                prop_assert_eq!(&**i, v["item_id"].as_str().unwrap());
            }
            if let Some(usage) = ev.response.as_ref().and_then(|r| r.usage.as_ref()) {
                prop_assert_eq!(usage.to_pb().responses, 1);
            }
            if let Some(s) = &ev.session {
                let _ = s.is_pcmu();
            }
        }

        /// What the relay sends the model stays valid JSON and carries the text unchanged,
        /// whatever the caller, the application or the model put in it.
        #[test]
        fn outgoing_events_are_json_for_any_text(
            item in hostile_text(),
            text in hostile_text(),
            call_id in hostile_text(),
            ms in any::<u32>(),
        ) {
            let v: serde_json::Value = serde_json::from_str(&realtime::truncate(&item, ms)).unwrap();
            prop_assert_eq!(v["item_id"].as_str(), Some(item.as_str()));
            prop_assert_eq!(v["audio_end_ms"].as_u64(), Some(u64::from(ms)));
            let v: serde_json::Value = serde_json::from_str(&realtime::system_text(&text)).unwrap();
            prop_assert_eq!(v["item"]["content"][0]["text"].as_str(), Some(text.as_str()));
            let v: serde_json::Value =
                serde_json::from_str(&realtime::function_output(&call_id, &text)).unwrap();
            prop_assert_eq!(v["item"]["call_id"].as_str(), Some(call_id.as_str()));
            prop_assert_eq!(v["item"]["output"].as_str(), Some(text.as_str()));
            let v: serde_json::Value =
                serde_json::from_str(&realtime::update_instructions(&text)).unwrap();
            prop_assert_eq!(v["session"]["instructions"].as_str(), Some(text.as_str()));
        }
    }
}

mod signatures {
    use super::*;
    use callbridge_relay::config::Secret;
    use callbridge_relay::signature;

    fn url() -> impl Strategy<Value = String> {
        (
            prop_oneof![Just("https"), Just("http"), Just("wss")],
            "[a-z0-9.-]{1,20}",
            proptest::option::of(0u16..),
            "(/[A-Za-z0-9._~%-]{0,12}){0,4}",
            proptest::option::of("[A-Za-z0-9=&%+._-]{0,30}"),
        )
            .prop_map(|(scheme, host, port, path, query)| {
                let port = port.map(|p| format!(":{p}")).unwrap_or_default();
                let query = query.map(|q| format!("?{q}")).unwrap_or_default();
                format!("{scheme}://{host}{port}{path}{query}")
            })
    }

    fn params() -> impl Strategy<Value = Vec<(String, String)>> {
        proptest::collection::vec((hostile_text(), hostile_text()), 0..8)
    }

    /// Every string Twilio could have signed for `url` and `params`.
    fn signed_forms(url: &str, params: &[(String, String)]) -> Vec<String> {
        signature::url_variants(url)
            .iter()
            .map(|u| signature::signed_string(u, params))
            .collect()
    }

    proptest! {
        #![proptest_config(config())]

        /// The right signature is accepted, with or without the port Twilio may drop.
        #[test]
        fn a_correct_signature_is_accepted(
            token in "[ -~]{1,64}", url in url(), params in params(),
        ) {
            let token = Secret::new(token);
            for variant in signature::url_variants(&url) {
                let sig = signature::compute(&token, &variant, &params);
                prop_assert!(signature::validate(&token, &url, &params, &sig), "{variant}");
            }
        }

        /// A changed URL, parameter or token is refused unless the signed material is the
        /// same (the oracle: Twilio's concatenation, which only the signed string defines).
        #[test]
        fn a_tampered_request_is_refused(
            token in "[ -~]{1,64}",
            url in url(),
            params in params(),
            url_suffix in "[A-Za-z0-9/]{1,4}",
            pick in any::<prop::sample::Index>(),
            extra in hostile_text(),
        ) {
            let secret = Secret::new(token.clone());
            let sig = signature::compute(&secret, &url, &params);
            // Accepted exactly when a variant of what is presented is what was signed.
            let original = signature::signed_string(&url, &params);
            let same = |u: &str, p: &[(String, String)]| signed_forms(u, p).contains(&original);

            let tampered_url = format!("{url}{url_suffix}");
            prop_assert_eq!(
                signature::validate(&secret, &tampered_url, &params, &sig),
                same(&tampered_url, &params)
            );

            let mut tampered = params.clone();
            if tampered.is_empty() {
                tampered.push(("CallSid".into(), extra.clone()));
            } else {
                let i = pick.index(tampered.len());
                tampered[i].1.push('x');
            }
            prop_assert_eq!(
                signature::validate(&secret, &url, &tampered, &sig),
                same(&url, &tampered)
            );

            let other = Secret::new(format!("{token}x"));
            prop_assert!(!signature::validate(&other, &url, &params, &sig));
        }

        /// Any header value: refused unless it is the signature.
        #[test]
        fn a_forged_signature_header_is_refused(
            header in prop_oneof![hostile_text(), "[A-Za-z0-9+/]{27}="],
            url in url(),
            params in params(),
            flip in any::<prop::sample::Index>(),
        ) {
            let token = Secret::new("twilio-token");
            let sig = signature::compute(&token, &url, &params);
            if header.trim() != sig {
                prop_assert!(!signature::validate(&token, &url, &params, &header));
            }
            // One character of the real signature changed.
            let mut chars: Vec<char> = sig.chars().collect();
            let i = flip.index(chars.len() - 1);
            chars[i] = if chars[i] == 'A' { 'B' } else { 'A' };
            let forged: String = chars.into_iter().collect();
            prop_assert!(!signature::validate(&token, &url, &params, &forged));
        }
    }
}

mod webhooks {
    use super::*;
    use support::*;

    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;

    use callbridge_proto::pb;
    use callbridge_relay::config::{Config, Secret};
    use callbridge_relay::http::{Deps, routes};
    use callbridge_relay::model_breaker::ModelBreakers;
    use callbridge_relay::{Metrics, call, control, signature};
    use tokio_util::sync::CancellationToken;
    use tokio_util::task::TaskTracker;

    const PUBLIC: &str = "https://relay.example.com";

    /// The relay's routes against a fake control plane on loopback, and a runtime to drive
    /// them from the synchronous property.
    struct Rig {
        rt: tokio::runtime::Runtime,
        control: FakeControl,
        deps: Deps,
    }

    fn rig() -> Rig {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let control = FakeControl::default();
        control.state.lock().unwrap().agent = agent(pb::AgentSettings::default());
        let addr = rt.block_on(start_control(control.clone()));
        let mut config = Config::for_tests(PUBLIC, "ws://127.0.0.1:9");
        config.insecure_skip_signature = false;
        config.twilio_auth_token = Some(Secret::new(TWILIO_TOKEN));
        config.control_url = Some(format!("http://{addr}"));
        config.control_token = Some(Secret::new("relay-token-0123456789abcdef-01234"));
        let streams = rt.block_on(async {
            Arc::new(callbridge_relay::stream_credential::StreamCredentials::from_config(&config))
        });
        let deps = rt.block_on(async {
            Deps {
                call: call::CallDeps {
                    breakers: ModelBreakers::from_config(&config, &Metrics::new()),
                    control: control::Control::from_config(&config).unwrap(),
                    config: Arc::new(config),
                    metrics: Metrics::new(),
                    relay_id: "relay-test".into(),
                    hard_stop: CancellationToken::new(),
                    drain: CancellationToken::new(),
                    actions_due: callbridge_relay::drain::actions_due(
                        std::time::Duration::ZERO,
                        CancellationToken::new(),
                    )
                    .0,
                    stream_ends: callbridge_relay::stream_ends::StreamEnds::spawn(),
                },
                draining: Arc::new(AtomicBool::new(false)),
                tracker: TaskTracker::new(),
                streams,
            }
        });
        Rig { rt, control, deps }
    }

    /// POSTs `form` to `path_and_query` with `signature`: status and body.
    fn post(
        rig: &Rig,
        path_and_query: &str,
        form: &[(String, String)],
        sig: &str,
    ) -> (u16, String) {
        let body = form_urlencoded::Serializer::new(String::new())
            .extend_pairs(form)
            .finish();
        let r = rig.rt.block_on(within(
            "webhook",
            warp::test::request()
                .method("POST")
                .path(path_and_query)
                .header("content-type", "application/x-www-form-urlencoded")
                .header("x-twilio-signature", sig)
                .body(body)
                .reply(&routes(rig.deps.clone())),
        ));
        (
            r.status().as_u16(),
            String::from_utf8_lossy(r.body()).into_owned(),
        )
    }

    fn first<'a>(form: &'a [(String, String)], key: &str) -> &'a str {
        form.iter().find(|(k, _)| k == key).map_or("", |(_, v)| v)
    }

    fn field() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("CallSid".to_owned()),
            Just("From".to_owned()),
            Just("To".to_owned()),
            Just("Direction".to_owned()),
            Just("AccountSid".to_owned()),
            hostile_text(),
        ]
    }

    fn form() -> impl Strategy<Value = Vec<(String, String)>> {
        proptest::collection::vec((field(), hostile_text()), 0..10)
    }

    fn query() -> impl Strategy<Value = Vec<(String, String)>> {
        let call_id = prop_oneof!["[A-Za-z0-9_.-]{1,20}", hostile_text(), "[a-z]{129,140}",];
        proptest::collection::vec(
            prop_oneof![
                call_id.prop_map(|v| ("callId".to_owned(), v)),
                (hostile_text(), hostile_text()),
            ],
            0..4,
        )
    }

    fn valid_call_id(id: &str) -> bool {
        callbridge_relay::call_id::CallId::parse(id).is_ok()
    }

    proptest! {
        #![proptest_config(config())]

        /// A signed voice webhook with any form and query: the form and the `callId`
        /// reach control exactly as Twilio sent them, or the request is refused 400 before
        /// control hears of it; an unsigned or wrongly signed one is refused 403 and
        /// control hears nothing.
        #[test]
        fn voice_webhook_forms_reach_control_exactly_or_are_refused(
            form in form(),
            query in query(),
            tamper in any::<bool>(),
        ) {
            let rig = rig();
            let raw_query = form_urlencoded::Serializer::new(String::new())
                .extend_pairs(&query)
                .finish();
            let path = if raw_query.is_empty() {
                "/api/twilio/voice".to_owned()
            } else {
                format!("/api/twilio/voice?{raw_query}")
            };
            let token = Secret::new(TWILIO_TOKEN);
            let sig = signature::compute(&token, &format!("{PUBLIC}{path}"), &form);
            if tamper {
                let mut forged = form.clone();
                forged.push(("Forged".into(), "1".into()));
                let (status, _) = post(&rig, &path, &forged, &sig);
                prop_assert_eq!(status, 403);
                let (status, _) = post(&rig, &path, &form, "not-a-signature");
                prop_assert_eq!(status, 403);
                prop_assert!(rig.control.state.lock().unwrap().admits.is_empty());
                return Ok(());
            }
            let (status, body) = post(&rig, &path, &form, &sig);
            let call_id = query.iter().find(|(k, _)| k == "callId").map_or("", |(_, v)| v.as_str());
            let admits = rig.control.state.lock().unwrap().admits.clone();
            if !call_id.is_empty() && !valid_call_id(call_id) {
                prop_assert_eq!(status, 400, "{}", body);
                prop_assert!(admits.is_empty());
                return Ok(());
            }
            prop_assert_eq!(status, 200, "{}", body);
            prop_assert_eq!(admits.len(), 1);
            let a = &admits[0];
            prop_assert_eq!(&a.call_id, call_id);
            prop_assert_eq!(&a.twilio_call_sid, first(&form, "CallSid"));
            prop_assert_eq!(&a.from, first(&form, "From"));
            prop_assert_eq!(&a.to, first(&form, "To"));
            prop_assert_eq!(&a.twilio_direction, first(&form, "Direction"));
        }

        /// Any path under the Twilio prefix, any method and body: an answer, never a
        /// panic, and no 5xx for input alone.
        #[test]
        fn any_request_gets_an_answer(
            segment in prop_oneof![
                Just("voice".to_owned()),
                Just("after".to_owned()),
                Just("status".to_owned()),
                Just("media-stream".to_owned()),
                "([A-Za-z0-9._~-]|%[0-9A-Fa-f]{2}){0,16}",
            ],
            tail in "(/([A-Za-z0-9._~-]|%[0-9A-Fa-f]{2}){0,16}){0,3}",
            raw_query in "([A-Za-z0-9=&+._~-]|%[0-9A-Fa-f]{2}){0,40}",
            method in prop_oneof![Just("GET"), Just("POST"), Just("PUT")],
            content_type in prop_oneof![
                Just("application/x-www-form-urlencoded"),
                Just("application/json"),
                Just("text/plain"),
            ],
            body in proptest::collection::vec(any::<u8>(), 0..300),
            sig in "[ -~]{0,40}",
        ) {
            let rig = rig();
            let path = format!("/api/twilio/{segment}{tail}?{raw_query}");
            let r = rig.rt.block_on(within(
                "any request",
                warp::test::request()
                    .method(method)
                    .path(&path)
                    .header("content-type", content_type)
                    .header("x-twilio-signature", sig)
                    .body(body)
                    .reply(&routes(rig.deps.clone())),
            ));
            prop_assert!(r.status().as_u16() < 500, "{} {}: {}", method, path, r.status());
            prop_assert!(rig.control.state.lock().unwrap().admits.is_empty());
        }
    }
}

mod twiml_docs {
    use super::*;
    use callbridge_proto::pb;
    use callbridge_relay::twiml;
    use quick_xml::events::Event;
    use quick_xml::reader::Reader;

    /// One element: name, attributes, text.
    type Node = (String, Vec<(String, String)>, String);

    /// Reads `xml` strictly (end names checked, only XML 1.0 characters); the text and
    /// attribute values of every element in document order. Fails on anything malformed.
    fn read(xml: &str) -> Result<Vec<Node>, String> {
        let legal = |c: char| {
            matches!(c, '\t' | '\n' | '\r' | '\u{20}'..='\u{d7ff}' | '\u{e000}'..='\u{fffd}')
                || c >= '\u{10000}'
        };
        if let Some(c) = xml.chars().find(|&c| !legal(c)) {
            return Err(format!("character XML cannot carry: {c:?}"));
        }
        let mut reader = Reader::from_str(xml);
        let mut nodes = Vec::new();
        let mut open: Vec<usize> = Vec::new();
        let attrs =
            |e: &quick_xml::events::BytesStart<'_>| -> Result<Vec<(String, String)>, String> {
                e.attributes()
                    .map(|a| {
                        let a = a.map_err(|e| e.to_string())?;
                        let v = a
                            .normalized_value(quick_xml::XmlVersion::Explicit1_0)
                            .map_err(|e| e.to_string())?;
                        Ok((a.key.as_ref().to_owned(), v.into_owned()))
                    })
                    .collect()
            };
        loop {
            match reader.read_event().map_err(|e| e.to_string())? {
                Event::Eof => break,
                Event::Decl(_) => {}
                Event::Start(e) => {
                    let name = e.name().as_ref().to_owned();
                    nodes.push((name, attrs(&e)?, String::new()));
                    open.push(nodes.len() - 1);
                }
                Event::Empty(e) => {
                    let name = e.name().as_ref().to_owned();
                    nodes.push((name, attrs(&e)?, String::new()));
                }
                Event::End(_) => {
                    open.pop().ok_or("unbalanced end")?;
                }
                Event::Text(t) => {
                    let i = *open.last().ok_or("text outside an element")?;
                    nodes[i].2.push_str(&t.xml10_content());
                }
                Event::GeneralRef(r) => {
                    let i = *open.last().ok_or("reference outside an element")?;
                    let c = match r.resolve_char_ref().map_err(|e| e.to_string())? {
                        Some(c) => c.to_string(),
                        None => {
                            let name: &str = &r;
                            quick_xml::escape::resolve_predefined_entity(name)
                                .ok_or(format!("unknown entity &{name};"))?
                                .to_owned()
                        }
                    };
                    nodes[i].2.push_str(&c);
                }
                other => return Err(format!("unexpected {other:?}")),
            }
        }
        if !open.is_empty() {
            return Err("unclosed element".into());
        }
        if nodes.first().map(|n| n.0.as_str()) != Some("Response") {
            return Err("the root is not <Response>".into());
        }
        Ok(nodes)
    }

    /// What XML can carry of `s` (control characters but whitespace dropped).
    fn carried(s: &str) -> String {
        s.chars()
            .filter(|&c| {
                (!c.is_control() || matches!(c, '\n' | '\r' | '\t'))
                    && !matches!(c, '\u{fffe}' | '\u{ffff}')
            })
            .collect()
    }

    fn text_of(nodes: &[Node], name: &str) -> Option<String> {
        nodes
            .iter()
            .rev()
            .find(|n| n.0 == name)
            .map(|n| n.2.clone())
    }

    fn fallback() -> impl Strategy<Value = Option<pb::Fallback>> {
        use pb::fallback::Action;
        let action = prop_oneof![
            Just(None),
            (hostile_text(), hostile_text(), hostile_text()).prop_map(|(text, voice, language)| {
                Some(Action::Say(pb::Say {
                    text,
                    voice,
                    language,
                }))
            }),
            hostile_text().prop_map(|n| Some(Action::DialNumber(n))),
            hostile_text().prop_map(|r| Some(Action::ConferenceRoom(r))),
        ];
        proptest::option::of(
            (action, hostile_text())
                .prop_map(|(action, preamble)| pb::Fallback { action, preamble }),
        )
    }

    proptest! {
        #![proptest_config(config())]

        /// Every builder, any input: a well-formed document rooted at `<Response>` that
        /// gives back the text it was given (less what XML cannot carry).
        #[test]
        fn every_builder_writes_well_formed_twiml(
            a in hostile_text(),
            b in hostile_text(),
            id in "[A-Za-z0-9_.-]{1,128}",
            f in fallback(),
        ) {
            let id = callbridge_relay::call_id::CallId::parse(id).unwrap();
            let nodes = read(&twiml::say_and_hangup(&a)).map_err(TestCaseError::fail)?;
            prop_assert_eq!(text_of(&nodes, "Say"), Some(carried(&a)));
            let nodes = read(&twiml::dial(&b)).map_err(TestCaseError::fail)?;
            prop_assert_eq!(text_of(&nodes, "Dial"), Some(carried(&b)));
            read(&twiml::hangup()).map_err(TestCaseError::fail)?;
            let minted = callbridge_relay::stream_credential::Minted { text: a.clone(), id: "0d".repeat(16) };
            read(&twiml::connect_simple(&a, &b, &minted, 2)).map_err(TestCaseError::fail)?;
            let nodes = read(&twiml::connect_stream(&a, &b, &id, &minted, Some(&"0e".repeat(16))))
                .map_err(TestCaseError::fail)?;
            let param = nodes.iter().find(|n| n.0 == "Parameter").unwrap();
            prop_assert!(param.1.iter().any(|(k, v)| k == "value" && v == id.as_str()));
            // The credential parameter carries its value through any escaping.
            let cred = nodes
                .iter()
                .filter(|n| n.0 == "Parameter")
                .find(|n| n.1.iter().any(|(k, v)| k == "name" && v == "credential"))
                .unwrap();
            prop_assert!(cred.1.iter().any(|(k, v)| k == "value" && *v == carried(&a)));
            let nodes = read(&twiml::fallback(f.as_ref())).map_err(TestCaseError::fail)?;
            if let Some(pb::Fallback { action: Some(pb::fallback::Action::ConferenceRoom(room)), .. }) = &f {
                prop_assert_eq!(text_of(&nodes, "Conference"), Some(carried(room)));
            }
        }
    }
}

mod call_phase {
    use super::*;
    use std::collections::{HashMap, VecDeque};
    use std::time::Duration;

    use callbridge_proto::pb::EndReason;
    use callbridge_relay::call::phase::{Delta, Ending, Lifecycle, Out, Playback, parse_mark};
    use tokio::time::Instant;

    /// One fact the call loop feeds the playback state.
    #[derive(Debug, Clone)]
    enum Op {
        /// A model audio delta of `bytes` for item `item` of the current response.
        Delta { new_item: bool, bytes: usize },
        /// Twilio echoes the oldest pending mark.
        Echo,
        /// Twilio echoes a mark nobody sent, or a forged one.
        ForeignMark(String),
        /// The caller starts speaking (barge-in).
        Speech,
        /// The model finishes the response and starts another.
        NextResponse,
        /// The model's transcript of an item.
        Transcript(u8),
        /// The audio of the current item is complete.
        AudioDone,
        /// The model session is lost.
        ModelLost,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (any::<bool>(), 1usize..2000).prop_map(|(new_item, bytes)| Op::Delta { new_item, bytes }),
            3 => Just(Op::Echo),
            1 => prop_oneof![
                hostile_text(),
                (0u32..4, any::<u32>(), "i[0-9]").prop_map(|(g, ms, i)| format!("g{g}:{ms}:{i}")),
            ].prop_map(Op::ForeignMark),
            1 => Just(Op::Speech),
            1 => Just(Op::NextResponse),
            1 => any::<u8>().prop_map(Op::Transcript),
            1 => Just(Op::AudioDone),
            1 => prop_oneof![19 => Just(false), 1 => Just(true)].prop_map(|lost| if lost { Op::ModelLost } else { Op::Echo }),
        ]
    }

    proptest! {
        #![proptest_config(config())]

        /// Random event orders: a truncate never goes past what was sent of its item, marks
        /// from before a clear never move anything, reported speech never claims more heard
        /// than sent, and the pending marks never outgrow what Twilio holds.
        #[test]
        fn playback_never_truncates_past_what_was_sent(
            barge_in in any::<bool>(),
            ops in proptest::collection::vec(op(), 0..200),
        ) {
            let mut p = Playback::new(barge_in);
            let mut sent: HashMap<String, u64> = HashMap::new();
            let mut queue: VecDeque<String> = VecDeque::new();
            let (mut resp, mut item) = (0u32, 0u32);
            // The playback clock moves 7 ms per event: echoes, barge-ins and the end fall
            // anywhere between marks.
            let mut now = Instant::now();
            let closing_marks = |outs: &[Out], queue: &mut VecDeque<String>| {
                for out in outs {
                    if let Out::MarkTwilio { name } = out {
                        queue.push_back(name.clone());
                    }
                }
            };
            p.response_created("r0");
            for op in ops {
                now += Duration::from_millis(7);
                match op {
                    Op::Delta { new_item, bytes } => {
                        item += u32::from(new_item);
                        let (r, i) = (format!("r{resp}"), format!("i{item}"));
                        if let Delta::Forward { mark } = p.audio_delta(&r, &i, bytes, now) {
                            if let Some(at) = mark {
                                let mut name = String::new();
                                at.write_name(&i, &mut name);
                                prop_assert!(parse_mark(&name).is_some(), "{}", name);
                                queue.push_back(name);
                            }
                            *sent.entry(i).or_default() += bytes as u64;
                        }
                    }
                    Op::Echo => {
                        if let Some(m) = queue.pop_front() {
                            check_speech(&p.mark_echoed(&m, now).unwrap(), &sent)?;
                        }
                    }
                    Op::ForeignMark(name) => {
                        let before = p.outstanding_marks();
                        if let Some(outs) = p.mark_echoed(&name, now) {
                            check_speech(&outs, &sent)?;
                        }
                        prop_assert!(p.outstanding_marks() <= before);
                    }
                    Op::Speech => {
                        let generation = p.generation();
                        let outs = p.speech_started(now);
                        for out in &outs {
                            if let Out::Truncate { item_id, audio_end_ms } = out {
                                let s = sent.get(item_id).copied().unwrap_or(0);
                                prop_assert!(s > 0, "truncate of {} which had no audio", item_id);
                                prop_assert!(u64::from(*audio_end_ms) <= s / 8, "truncate past sent");
                            }
                        }
                        check_speech(&outs, &sent)?;
                        if p.generation() != generation {
                            // Twilio flushes every queued mark back at once: all ignored.
                            for m in queue.drain(..) {
                                prop_assert_eq!(p.mark_echoed(&m, now), Some(vec![]));
                            }
                            prop_assert_eq!(p.outstanding_marks(), 0);
                        }
                    }
                    Op::NextResponse => {
                        let outs = p.response_done(&format!("r{resp}"));
                        closing_marks(&outs, &mut queue);
                        check_speech(&outs, &sent)?;
                        resp += 1;
                        p.response_created(&format!("r{resp}"));
                    }
                    Op::Transcript(n) => {
                        let i = format!("i{}", u32::from(n) % (item + 1));
                        check_speech(&p.transcript_done(&i, "text"), &sent)?;
                    }
                    Op::AudioDone => {
                        let outs = p.audio_done(&format!("i{item}"));
                        closing_marks(&outs, &mut queue);
                        check_speech(&outs, &sent)?;
                    }
                    Op::ModelLost => {
                        check_speech(&p.model_lost(now), &sent)?;
                        // The old session's marks prove nothing now.
                        for m in queue.drain(..) {
                            prop_assert_eq!(p.mark_echoed(&m, now), Some(vec![]));
                        }
                        resp += 1;
                        p.response_created(&format!("r{resp}"));
                    }
                }
                prop_assert!(p.outstanding_marks() as usize <= queue.len());
            }
            check_speech(&p.flush(now), &sent)?;
            prop_assert!(p.flush(now).is_empty(), "a second flush reports nothing");
        }

        /// Any order of start, ends and playback going idle: one end is decided, it never
        /// changes afterwards, and only one caller is ever told "you ended it".
        #[test]
        fn exactly_one_end_is_reported(
            steps in proptest::collection::vec((0u8..4, 0usize..6), 1..40),
        ) {
            const REASONS: [EndReason; 6] = [
                EndReason::CallerHangup,
                EndReason::AgentHangup,
                EndReason::Transferred,
                EndReason::ModelUnavailable,
                EndReason::MediaTimeout,
                EndReason::Drain,
            ];
            let mut l = Lifecycle::default();
            let mut decided: Option<EndReason> = None;
            let mut winners = 0;
            for (step, r) in steps {
                let reason = REASONS[r];
                let won = match step {
                    0 => { l.start(); false }
                    1 => l.end(Ending::new(reason, "")),
                    2 => { l.end_after_playback(Ending::new(reason, "")); false }
                    _ => l.playback_idle(),
                };
                winners += usize::from(won);
                match (decided, l.ending()) {
                    (None, Some(e)) => decided = Some(e.reason),
                    (Some(d), Some(e)) => prop_assert_eq!(d, e.reason, "the end changed"),
                    (Some(_), None) => prop_assert!(false, "the end was forgotten"),
                    (None, None) => {}
                }
            }
            prop_assert!(winners <= 1, "{} callers were told they ended the call", winners);
            prop_assert_eq!(winners == 1, decided.is_some());
        }
    }

    /// Reported speech never claims more heard than sent, nor more sent than was sent.
    fn check_speech(outs: &[Out], sent: &HashMap<String, u64>) -> Result<(), TestCaseError> {
        for out in outs {
            if let Out::AssistantSpeech {
                item_id,
                heard_ms,
                audio_ms,
                ..
            }
            | Out::Interrupted {
                item_id,
                heard_ms,
                audio_ms,
            } = out
            {
                prop_assert!(
                    heard_ms <= audio_ms,
                    "{}: heard {} > sent {}",
                    item_id,
                    heard_ms,
                    audio_ms
                );
                let s = sent.get(item_id).copied().unwrap_or(0);
                prop_assert!(
                    u64::from(*audio_ms) <= s / 8 + 1,
                    "{}: {} ms > sent",
                    item_id,
                    audio_ms
                );
            }
        }
        Ok(())
    }
}

mod ids {
    use super::*;
    use callbridge_relay::call_id::CallId;

    proptest! {
        #![proptest_config(config())]

        /// A call id is accepted exactly when it is 1..=128 of `[A-Za-z0-9_.-]`: safe in a
        /// URL path segment, a TwiML attribute and a log line.
        #[test]
        fn call_ids_are_accepted_exactly_when_safe(
            id in prop_oneof![hostile_text(), "[A-Za-z0-9_.-]{0,140}"],
        ) {
            let safe = !id.is_empty()
                && id.len() <= 128
                && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
            prop_assert_eq!(CallId::parse(id.clone()).is_ok(), safe, "{:?}", id);
        }
    }
}

mod stream_credentials {
    use super::*;
    use std::time::Duration;

    use callbridge_relay::call_id::CallId;
    use callbridge_relay::stream_credential::{CredentialError, Segment, StreamKey};

    fn segment() -> impl Strategy<Value = Segment> {
        prop_oneof![
            Just(Segment::First),
            Just(Segment::Resume),
            Just(Segment::Standalone)
        ]
    }

    fn call_id() -> impl Strategy<Value = CallId> {
        "[A-Za-z0-9_.-]{1,128}".prop_map(|s| CallId::parse(s).unwrap())
    }

    proptest! {
        #![proptest_config(config())]

        /// A credential opens exactly the stream it was minted for, until it expires:
        /// another call, the other kind of route, another key or a later time is refused.
        #[test]
        fn a_credential_opens_only_its_own_stream_in_time(
            secret in proptest::collection::vec(any::<u8>(), 32..64),
            other_secret in proptest::collection::vec(any::<u8>(), 32..64),
            call in call_id(),
            other in call_id(),
            segment in segment(),
            now in 0i64..=4_000_000_000_000,
            ttl_ms in 1i64..600_000,
            later in 0i64..1_200_000,
        ) {
            let key = StreamKey::from_secret(&secret);
            let route = (segment != Segment::Standalone).then_some(&call);
            let cred = key.mint(route, segment, now, Duration::from_millis(ttl_ms as u64));
            let (at, expires) = (now + later, now + ttl_ms);
            match key.verify(Some(&cred), route, at) {
                Ok(v) => {
                    prop_assert!(at <= expires);
                    prop_assert_eq!(v.segment, segment);
                    prop_assert_eq!(v.expires_at_ms, expires);
                    prop_assert_eq!(v.id.len(), 32);
                }
                Err(e) => {
                    prop_assert_eq!(e, CredentialError::Expired);
                    prop_assert!(at > expires);
                }
            }
            if route.is_some() && other != call {
                prop_assert_eq!(key.verify(Some(&cred), Some(&other), now), Err(CredentialError::Invalid));
            }
            let wrong_route = if route.is_some() { None } else { Some(&call) };
            prop_assert_eq!(key.verify(Some(&cred), wrong_route, now), Err(CredentialError::Invalid));
            if other_secret != secret {
                let other_key = StreamKey::from_secret(&other_secret);
                prop_assert_eq!(other_key.verify(Some(&cred), route, now), Err(CredentialError::Invalid));
            }
            // The same bytes as a Twilio auth token give another key (domain separation).
            let derived = StreamKey::from_auth_token(&secret);
            prop_assert_eq!(derived.verify(Some(&cred), route, now), Err(CredentialError::Invalid));
        }

        /// Any text where the credential goes never verifies and never panics; none at
        /// all is refused as missing.
        #[test]
        fn arbitrary_credentials_are_refused(
            text in prop_oneof![hostile_text(), "[A-Za-z0-9_-]{70,90}"],
            call in proptest::option::of(call_id()),
            now in any::<i64>(),
        ) {
            let key = StreamKey::from_secret(b"a-stream-secret-of-32-bytes-or-more");
            let r = key.verify(Some(&text), call.as_ref(), now);
            if text.is_empty() {
                prop_assert_eq!(r, Err(CredentialError::Missing));
            } else {
                prop_assert!(r.is_err());
            }
            prop_assert_eq!(key.verify(None, call.as_ref(), now), Err(CredentialError::Missing));
        }
    }
}

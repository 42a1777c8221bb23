//! Property tests: control's checks of what applications and relays send, fed generated
//! hostile input. Each module is one target of `scripts/fuzz.sh`, which runs them with far
//! more cases; the suite runs `PROPTEST_CASES` cases (default 64) of each.
//!
//! For any input: no panic; a refusal is INVALID_ARGUMENT naming a field under the one
//! checked; what is accepted has the shape the rest of control (Redis keys, TwiML, Twilio's
//! API) relies on.

use std::collections::HashMap;

use callbridge_control::domain::call::event_effects;
use callbridge_control::domain::ids::{AgentId, CallId, CallSid, RelayId, StreamSid};
use callbridge_control::error::Error;
use callbridge_control::validate;
use callbridge_proto::pb;
use proptest::prelude::*;
use tonic::Code;

/// Cases per property: `PROPTEST_CASES`, else a small default so the suite stays fast.
fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64);
    ProptestConfig::with_cases(cases)
}

/// Any text, weighted towards what escapes, separators and lengths trip on.
fn hostile_text() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[+0-9 ()-]{0,20}",
        "\\+[0-9]{0,17}",
        "[A-Za-z0-9_-]{0,70}",
        "(CA|ca|AC)[0-9a-fA-FgG]{30,34}",
        proptest::collection::vec(
            prop_oneof![
                Just('"'),
                Just('<'),
                Just('&'),
                Just('{'),
                Just(':'),
                Just('\0'),
                Just('\u{202e}'),
                any::<char>(),
            ],
            0..20
        )
        .prop_map(|c| c.into_iter().collect()),
    ]
}

/// Text of a length around `limit` (the edges are where the checks are).
fn sized_text(limit: usize) -> impl Strategy<Value = String> {
    prop_oneof![
        hostile_text(),
        (limit.saturating_sub(2)..limit + 3, any::<char>()).prop_map(|(n, c)| {
            // Close to `n` bytes whatever the character's width.
            std::iter::repeat_n(c, n / c.len_utf8()).collect::<String>()
        }),
    ]
}

/// An INVALID_ARGUMENT error whose field is `prefix` or under it.
fn names_field_under(err: &Error, prefix: &str) -> bool {
    match err {
        Error::InvalidArgument { field, .. } => {
            field.starts_with(prefix) && err.code() == Code::InvalidArgument
        }
        _ => false,
    }
}

mod numbers {
    use super::*;

    /// `^\+[1-9]\d{1,14}$`, written out independently of the code under test.
    fn e164_oracle(s: &str) -> bool {
        let Some(digits) = s.strip_prefix('+') else {
            return false;
        };
        (2..=15).contains(&digits.len())
            && digits.chars().all(|c| c.is_ascii_digit())
            && !digits.starts_with('0')
    }

    proptest! {
        #![proptest_config(config())]

        /// A number is accepted exactly when it is E.164; the refusal names the field and
        /// quotes at most 40 characters of the input.
        #[test]
        fn e164_accepts_exactly_e164(s in hostile_text()) {
            prop_assert_eq!(validate::is_e164(&s), e164_oracle(&s), "{:?}", s);
            match validate::e164("to", &s) {
                Ok(()) => prop_assert!(e164_oracle(&s)),
                Err(err) => {
                    prop_assert!(names_field_under(&err, "to"));
                    prop_assert!(err.to_string().chars().count() < 140, "{}", err);
                }
            }
        }
    }
}

mod ids {
    use super::*;

    fn ident_oracle(s: &str, max: usize) -> bool {
        !s.is_empty()
            && s.len() <= max
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    }

    proptest! {
        #![proptest_config(config())]

        /// Every id type accepts exactly its alphabet and length, and a refusal names the
        /// field it was given.
        #[test]
        fn ids_accept_exactly_their_shape(s in prop_oneof![hostile_text(), sized_text(64), sized_text(128)]) {
            prop_assert_eq!(CallId::parse("call_id", s.as_str()).is_ok(), ident_oracle(&s, 64));
            prop_assert_eq!(AgentId::parse("agent_id", s.as_str()).is_ok(), ident_oracle(&s, 64));
            prop_assert_eq!(RelayId::parse("relay_id", s.as_str()).is_ok(), ident_oracle(&s, 128));
            prop_assert_eq!(StreamSid::parse("stream_sid", s.as_str()).is_ok(), ident_oracle(&s, 128));
            if let Err(err) = CallId::parse("open.call_id", s.as_str()) {
                prop_assert!(names_field_under(&err, "open.call_id"), "{}", err);
            }
        }

        /// A Twilio call sid is `CA` and 32 hex digits, nothing else; empty is "none" only
        /// where the field is optional.
        #[test]
        fn call_sids_accept_exactly_twilios_shape(s in hostile_text()) {
            let oracle = s.len() == 34
                && s.starts_with("CA")
                && s[2..].bytes().all(|b| b.is_ascii_hexdigit());
            prop_assert_eq!(CallSid::parse("twilio_call_sid", s.as_str()).is_ok(), oracle, "{:?}", s);
            match CallSid::parse_optional("twilio_call_sid", s.as_str()) {
                Ok(None) => prop_assert!(s.is_empty()),
                Ok(Some(sid)) => prop_assert_eq!(sid.as_str(), s.as_str()),
                Err(err) => prop_assert!(names_field_under(&err, "twilio_call_sid")),
            }
        }
    }
}

mod agent_settings {
    use super::*;

    fn json_text() -> impl Strategy<Value = String> {
        prop_oneof![
            hostile_text(),
            Just("{}".to_owned()),
            Just("[]".to_owned()),
            Just(r#"{"type":"object","properties":{"x":{"type":"string"}}}"#.to_owned()),
            sized_text(validate::MAX_TOOL_PARAMETERS).prop_map(|s| format!("{{\"d\":{:?}}}", s)),
        ]
    }

    fn settings() -> impl Strategy<Value = pb::AgentSettings> {
        let tool = (hostile_text(), sized_text(4096), json_text()).prop_map(
            |(name, description, parameters_json)| pb::Tool {
                name,
                description,
                parameters_json,
            },
        );
        let turn = (
            any::<i32>(),
            proptest::option::of(any::<f64>()),
            proptest::option::of(any::<u32>()),
            hostile_text(),
        )
            .prop_map(|(t, threshold, silence, eagerness)| pb::TurnDetection {
                r#type: t,
                threshold,
                silence_duration_ms: silence,
                eagerness,
                // Any value on any type: only NONE with 200..=10000 passes.
                silence_commit_ms: silence,
                ..Default::default()
            });
        let fallback =
            (proptest::option::of(0u8..3), hostile_text(), hostile_text()).prop_map(|(k, a, b)| {
                use pb::fallback::Action;
                pb::Fallback {
                    action: k.map(|k| match k {
                        0 => Action::Say(pb::Say {
                            text: a.clone(),
                            voice: b.clone(),
                            language: String::new(),
                        }),
                        1 => Action::DialNumber(a.clone()),
                        _ => Action::ConferenceRoom(a.clone()),
                    }),
                    preamble: b,
                }
            });
        let voicemail =
            (proptest::option::of(0u8..3), hostile_text(), hostile_text()).prop_map(|(k, a, b)| {
                use pb::voicemail::Message;
                pb::Voicemail {
                    message: k.map(|k| match k {
                        0 => Message::SpokenText(a.clone()),
                        1 => Message::Say(pb::Say {
                            text: a.clone(),
                            voice: b.clone(),
                            language: b.clone(),
                        }),
                        _ => Message::PlayUrl(a.clone()),
                    }),
                }
            });
        (
            (
                sized_text(200),
                hostile_text(),
                hostile_text(),
                sized_text(validate::MAX_INSTRUCTIONS),
            ),
            (
                proptest::option::of(any::<f64>()),
                sized_text(4096),
                proptest::option::of(turn),
                hostile_text(),
            ),
            (
                proptest::collection::vec(tool, 0..4),
                proptest::option::of((
                    any::<bool>(),
                    any::<bool>(),
                    proptest::collection::vec(hostile_text(), 0..3),
                )),
                (any::<u32>(), any::<bool>(), proptest::option::of(voicemail)),
                proptest::option::of(fallback),
            ),
        )
            .prop_map(
                |(
                    (name, model, voice, instructions),
                    (temperature, greeting, turn_detection, itm),
                    (tools, builtin, (max, dtmf_to_model, voicemail), fallback),
                )| {
                    pb::AgentSettings {
                        name,
                        model,
                        voice,
                        instructions,
                        temperature,
                        greeting,
                        turn_detection,
                        input_transcription_model: itm,
                        tools,
                        builtin_tools: builtin.map(
                            |(end_call, transfer_call, transfer_numbers)| pb::BuiltinTools {
                                end_call,
                                transfer_call,
                                transfer_numbers,
                            },
                        ),
                        max_call_duration_secs: max,
                        fallback,
                        realtime_enabled: None,
                        dtmf_to_model,
                        voicemail,
                    }
                },
            )
    }

    /// Settings an application could well send: each field within its rules.
    fn good_settings() -> impl Strategy<Value = pb::AgentSettings> {
        use pb::fallback::Action;
        let number = "\\+1[2-9][0-9]{9}";
        let fallback = prop_oneof![
            number.prop_map(Action::DialNumber),
            "[A-Za-z][ -~]{0,80}".prop_map(|text| Action::Say(pb::Say {
                text,
                ..Default::default()
            })),
            "[A-Za-z0-9_-]{1,40}".prop_map(Action::ConferenceRoom),
        ];
        let tools = proptest::collection::vec(
            (
                "[a-z]{1,10}",
                "[ -~]{0,80}",
                prop_oneof![Just(""), Just("{}")],
            ),
            0..4,
        )
        .prop_map(|tools| {
            tools
                .into_iter()
                .enumerate()
                .map(|(i, (name, description, params))| pb::Tool {
                    name: format!("t{i}_{name}"),
                    description,
                    parameters_json: params.to_owned(),
                })
                .collect::<Vec<_>>()
        });
        (
            (
                "[A-Za-z][A-Za-z0-9 ]{0,40}",
                prop_oneof![Just(String::new()), "[a-z0-9.:_-]{1,30}".boxed()],
                prop_oneof![Just(""), proptest::sample::select(&validate::VOICES[..])],
                "[A-Za-z][ -~]{0,300}",
            ),
            (
                proptest::option::of(0.6f64..=1.2),
                "[ -~]{0,200}",
                proptest::option::of((
                    0i32..=3,
                    proptest::option::of(0.0f64..=1.0),
                    proptest::sample::select(&["", "low", "medium", "high", "auto"][..]),
                )),
            ),
            (
                tools,
                proptest::option::of((any::<bool>(), proptest::collection::vec(number, 1..3))),
                0u32..=14400,
                proptest::option::of((proptest::option::of(fallback), "[ -~]{0,80}")),
            ),
        )
            .prop_map(
                |(
                    (name, model, voice, instructions),
                    (temperature, greeting, td),
                    (tools, builtin, max, fallback),
                )| {
                    pb::AgentSettings {
                        name,
                        model,
                        voice: voice.to_owned(),
                        instructions,
                        temperature,
                        greeting,
                        turn_detection: td.map(|(t, threshold, eagerness)| pb::TurnDetection {
                            r#type: t,
                            threshold,
                            eagerness: eagerness.to_owned(),
                            ..Default::default()
                        }),
                        tools,
                        builtin_tools: builtin.map(|(transfer_call, transfer_numbers)| {
                            pb::BuiltinTools {
                                end_call: true,
                                transfer_call,
                                transfer_numbers,
                            }
                        }),
                        max_call_duration_secs: max,
                        fallback: fallback
                            .map(|(action, preamble)| pb::Fallback { action, preamble }),
                        ..Default::default()
                    }
                },
            )
    }

    /// Good settings with at most one field replaced by hostile input (`None`: untouched).
    fn mutated() -> impl Strategy<Value = (pb::AgentSettings, Option<u8>)> {
        (
            good_settings(),
            proptest::option::of(0u8..8),
            hostile_text(),
            any::<f64>(),
        )
            .prop_map(|(mut s, field, text, number)| {
                match field {
                    Some(0) => s.name = text,
                    Some(1) => s.model = text,
                    Some(2) => s.voice = text,
                    Some(3) => s.instructions = text,
                    Some(4) => s.temperature = Some(number),
                    Some(5) => s.tools.push(pb::Tool {
                        name: text.clone(),
                        description: String::new(),
                        parameters_json: text,
                    }),
                    Some(6) => {
                        s.builtin_tools = Some(pb::BuiltinTools {
                            end_call: false,
                            transfer_call: true,
                            transfer_numbers: vec![text],
                        })
                    }
                    Some(_) => {
                        s.fallback = Some(pb::Fallback {
                            action: Some(pb::fallback::Action::DialNumber(text)),
                            preamble: String::new(),
                        })
                    }
                    None => {}
                }
                (s, field)
            })
    }

    proptest! {
        #![proptest_config(config())]

        /// Settings within the rules are accepted as sent (defaults filled in); one field
        /// replaced by junk is accepted only if the junk happens to be valid, else refused
        /// naming a field.
        #[test]
        fn good_settings_are_accepted_and_one_bad_field_is_named((s, field) in mutated()) {
            let sent = s.clone();
            match validate::agent_settings(Some(s)) {
                Ok(ok) => {
                    prop_assert_eq!(&ok.name, &sent.name);
                    prop_assert_eq!(&ok.instructions, &sent.instructions);
                    prop_assert_eq!(&ok.tools, &sent.tools);
                }
                Err(err) => {
                    prop_assert!(field.is_some(), "valid settings refused: {} ({:?})", err, sent);
                    prop_assert!(names_field_under(&err, "settings."), "{}", err);
                }
            }
        }

        /// Any agent settings: accepted with what the relay and Twilio rely on, or refused
        /// naming a field under `settings`.
        #[test]
        fn agent_settings_are_accepted_only_in_shape(s in prop_oneof![settings(), mutated().prop_map(|(s, _)| s)]) {
            match validate::agent_settings(Some(s)) {
                Err(err) => prop_assert!(names_field_under(&err, "settings"), "{}", err),
                Ok(ok) => {
                    prop_assert!(!ok.model.is_empty() && !ok.voice.is_empty());
                    prop_assert!(ok.instructions.len() <= validate::MAX_INSTRUCTIONS);
                    for tool in &ok.tools {
                        let v: serde_json::Value = serde_json::from_str(&tool.parameters_json)
                            .unwrap_or(serde_json::Value::Object(Default::default()));
                        prop_assert!(v.is_object() || tool.parameters_json.is_empty());
                    }
                    if let Some(b) = &ok.builtin_tools {
                        for n in &b.transfer_numbers {
                            prop_assert!(validate::is_e164(n), "{}", n);
                        }
                    }
                    if let Some(pb::fallback::Action::DialNumber(n)) =
                        ok.fallback.as_ref().and_then(|f| f.action.as_ref())
                    {
                        prop_assert!(validate::is_e164(n), "{}", n);
                    }
                    // What the model is asked to say, and what goes into TwiML.
                    match ok.voicemail.as_ref().map(|v| v.message.as_ref()) {
                        None => {}
                        Some(None) => prop_assert!(false, "a voicemail with no message"),
                        Some(Some(pb::voicemail::Message::SpokenText(t))) => {
                            prop_assert!(callbridge_proto::greeting_problem(t).is_none(), "{:?}", t);
                        }
                        Some(Some(pb::voicemail::Message::Say(say))) => {
                            prop_assert!(!say.text.trim().is_empty());
                        }
                        Some(Some(pb::voicemail::Message::PlayUrl(u))) => {
                            prop_assert!(u.starts_with("https://") && !u.chars().any(char::is_control), "{:?}", u);
                        }
                    }
                }
            }
        }

        /// Commands and metadata from applications: accepted in shape or refused naming
        /// the field.
        #[test]
        fn commands_and_metadata_are_checked(
            kind in 0u8..4,
            text in sized_text(4096),
            id in hostile_text(),
            meta in proptest::collection::hash_map(hostile_text(), sized_text(512), 0..70),
        ) {
            use pb::command::Kind;
            let command = pb::Command {
                command_id: id,
                kind: match kind {
                    0 => Some(Kind::Say(pb::SayCommand { text: text.clone() })),
                    1 => Some(Kind::Hangup(pb::HangupCommand { reason: text.clone() })),
                    2 => Some(Kind::Transfer(pb::TransferCommand { number: text.clone() })),
                    _ => None,
                },
            };
            match validate::command(Some(&command)) {
                Ok(()) => {
                    if let Some(Kind::Transfer(t)) = &command.kind {
                        prop_assert!(validate::is_e164(&t.number));
                    }
                }
                Err(err) => prop_assert!(names_field_under(&err, "command"), "{}", err),
            }
            let meta: HashMap<String, String> = meta;
            if let Err(err) = validate::metadata("metadata", &meta) {
                prop_assert!(names_field_under(&err, "metadata"), "{}", err);
            }
        }
    }
}

mod relay_events {
    use super::*;
    use pb::call_event::Kind;

    fn kind() -> impl Strategy<Value = Option<Kind>> {
        prop_oneof![
            Just(None),
            (
                hostile_text(),
                hostile_text(),
                hostile_text(),
                any::<bool>()
            )
                .prop_map(|(sid, stream, relay, resumed)| {
                    Some(Kind::Started(pb::Started {
                        twilio_call_sid: sid,
                        stream_sid: stream,
                        relay_id: relay,
                        resumed,
                    }))
                }),
            (any::<i32>(), hostile_text(), hostile_text()).prop_map(|(reason, detail, to)| {
                Some(Kind::Ended(pb::Ended {
                    reason,
                    detail,
                    transfer_to: to,
                }))
            }),
            (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(i, o, t)| {
                Some(Kind::Usage(pb::Usage {
                    input_tokens: i,
                    output_tokens: o,
                    total_tokens: t,
                    ..Default::default()
                }))
            }),
            hostile_text().prop_map(|text| Some(Kind::Caller(pb::CallerSpeech {
                item_id: String::new(),
                text
            }))),
        ]
    }

    proptest! {
        #![proptest_config(config())]

        /// Any event a relay sends: what storing it would change is worked out, or it is
        /// refused naming the field; a transfer target or a sid that gets through has the
        /// shape TwiML and Twilio's API need.
        #[test]
        fn relay_events_are_stored_only_in_shape(
            kind in kind(),
            seq in any::<u64>(),
            at_ms in any::<i64>(),
        ) {
            let event = pb::CallEvent { call_id: "call_1".into(), seq, at_ms, kind };
            match event_effects(&event) {
                Err(err) => prop_assert!(names_field_under(&err, "event."), "{}", err),
                Ok(effects) => {
                    prop_assert!(effects.at_ms > 0, "stored events carry a time");
                    if let Some(ended) = &effects.ended {
                        prop_assert!(
                            ended.transfer_to.is_empty() || validate::is_e164(&ended.transfer_to),
                            "{:?}", ended.transfer_to
                        );
                    }
                    if let Some(started) = &effects.started
                        && let Some(sid) = &started.twilio_call_sid
                    {
                        prop_assert!(CallSid::parse("x", sid.as_str()).is_ok());
                    }
                }
            }
        }
    }
}

mod calling_windows {
    use super::*;
    use callbridge_control::domain::calling_window::{Window, WindowClock, check_number_zones};

    /// `HH:MM` or `HH:MM:SS` on a 24-hour clock (and `24:00[:00]` as an end), written out
    /// independently of the code under test.
    fn time_oracle(s: &str, end: bool) -> bool {
        if end && (s == "24:00" || s == "24:00:00") {
            return true;
        }
        let parts: Vec<&str> = s.split(':').collect();
        let two_digits = |p: &&str| p.len() == 2 && p.bytes().all(|b| b.is_ascii_digit());
        if !(2..=3).contains(&parts.len()) || !parts.iter().all(two_digits) {
            return false;
        }
        let n = |i: usize| parts.get(i).map_or(0, |p| p.parse::<u32>().unwrap_or(99));
        n(0) <= 23 && n(1) <= 59 && n(2) <= 59
    }

    fn time_text() -> impl Strategy<Value = String> {
        prop_oneof![
            hostile_text(),
            "[0-9]{1,3}:[0-9]{1,3}(:[0-9]{1,3})?",
            "(2[0-4]|[01][0-9]):[0-5][0-9]",
            Just("24:00".to_owned()),
        ]
    }

    fn zone_text() -> impl Strategy<Value = String> {
        prop_oneof![
            hostile_text(),
            Just("America/New_York".to_owned()),
            Just("Asia/Kolkata".to_owned()),
            Just("UTC".to_owned()),
            "(Europe|America|Asia)/[A-Za-z_]{0,12}",
        ]
    }

    proptest! {
        #![proptest_config(config())]

        /// Any window: accepted only in shape, else refused naming a field under
        /// `settings.calling_window`; an accepted one answers any instant without panic.
        #[test]
        fn windows_are_accepted_only_in_shape(
            start in time_text(),
            end in time_text(),
            days in proptest::collection::vec(0u32..10, 0..9),
            zone in zone_text(),
            now_ms in prop_oneof![any::<i64>(), 0i64..4_102_444_800_000],
            number_zone in zone_text(),
        ) {
            let settings = pb::CampaignSettings {
                calling_window: Some(pb::CallingWindow {
                    start: start.clone(),
                    end: end.clone(),
                    days: days.clone(),
                    time_zone: zone.clone(),
                }),
                ..Default::default()
            };
            match Window::from_settings(&settings) {
                Err(err) => prop_assert!(
                    names_field_under(&err, "settings.calling_window."),
                    "{}", err
                ),
                Ok(window) => {
                    prop_assert!(window.is_some());
                    prop_assert!(time_oracle(&start, false), "{:?}", start);
                    prop_assert!(time_oracle(&end, true), "{:?}", end);
                    prop_assert!(start != end);
                    prop_assert!(days.iter().all(|d| (1..=7).contains(d)), "{:?}", days);
                    let mut clock = WindowClock::new(&settings);
                    let _ = clock.is_open("", now_ms);
                    let _ = clock.is_open(&number_zone, now_ms);
                }
            }
            let numbers = vec![pb::CampaignNumber {
                number: "+14155550123".into(),
                metadata: HashMap::new(),
                time_zone: number_zone.clone(),
            }];
            if let Err(err) = check_number_zones(&numbers) {
                prop_assert!(names_field_under(&err, "numbers[0].time_zone"), "{}", err);
                prop_assert!(!number_zone.is_empty());
            }
        }
    }
}

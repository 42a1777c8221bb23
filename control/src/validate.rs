//! Input checks. Each failure names the request field (`Error::InvalidArgument`).

use std::collections::HashMap;

use callbridge_proto::pb;

use crate::error::Error;

/// Realtime voices accepted by the GA API.
pub const VOICES: [&str; 10] = [
    "alloy", "ash", "ballad", "coral", "echo", "sage", "shimmer", "verse", "marin", "cedar",
];
/// Voice used when an agent names none.
pub const DEFAULT_VOICE: &str = "marin";
/// Model used when an agent names none.
pub const DEFAULT_MODEL: &str = "gpt-realtime";
/// Built-in tool names an application tool may not take.
const BUILTIN_TOOL_NAMES: [&str; 2] = ["end_call", "transfer_call"];

/// Largest `instructions` (bytes).
pub const MAX_INSTRUCTIONS: usize = 32 * 1024;
/// Largest tool `parameters_json` (bytes).
pub const MAX_TOOL_PARAMETERS: usize = 16 * 1024;
/// Most tools per agent.
const MAX_TOOLS: usize = 64;
/// Most metadata entries per call, and key/value sizes (characters).
const MAX_METADATA_ENTRIES: usize = 32;
const MAX_METADATA_KEY: usize = 64;
const MAX_METADATA_VALUE: usize = 1024;
/// Most page entries.
pub const MAX_PAGE_SIZE: u32 = 500;
/// Page size when none is asked for.
pub const DEFAULT_PAGE_SIZE: u32 = 50;
/// Most calls in one bulk create.
pub const MAX_BULK: usize = 1000;
/// Largest free text (greeting, say text, descriptions, command text), bytes.
const MAX_TEXT: usize = 4 * 1024;

type Result<T = ()> = std::result::Result<T, Error>;

/// `^\+[1-9]\d{1,14}$`.
pub fn is_e164(s: &str) -> bool {
    let bytes = s.as_bytes();
    bytes.len() >= 3
        && bytes.len() <= 16
        && bytes[0] == b'+'
        && (b'1'..=b'9').contains(&bytes[1])
        && bytes[2..].iter().all(u8::is_ascii_digit)
}

/// An E.164 number in `field`.
pub fn e164(field: &str, value: &str) -> Result {
    if is_e164(value) {
        Ok(())
    } else {
        Err(Error::invalid(
            field,
            format!(
                "'{}' is not an E.164 number (+ then 2..=15 digits)",
                truncate(value)
            ),
        ))
    }
}

/// An identifier `[a-zA-Z0-9_-]{1,max}` (the ids of `domain::ids` are checked with it).
pub fn ident(field: &str, value: &str, max: usize) -> Result {
    if value.is_empty() {
        return Err(Error::invalid(field, "is required"));
    }
    if value.len() > max
        || !value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return Err(Error::invalid(
            field,
            format!("'{}' must be 1..={max} of [a-zA-Z0-9_-]", truncate(value)),
        ));
    }
    Ok(())
}

fn text(field: &str, value: &str, max: usize) -> Result {
    if value.len() > max {
        return Err(Error::invalid(
            field,
            format!("is {} bytes, at most {max} allowed", value.len()),
        ));
    }
    Ok(())
}

fn truncate(s: &str) -> String {
    s.chars().take(40).collect()
}

/// Page size: 0 → default, 1..=500, else refused.
pub fn page_size(field: &str, value: u32) -> Result<usize> {
    match value {
        0 => Ok(DEFAULT_PAGE_SIZE as usize),
        1..=MAX_PAGE_SIZE => Ok(value as usize),
        _ => Err(Error::invalid(
            field,
            format!("{value} is above the maximum {MAX_PAGE_SIZE}"),
        )),
    }
}

/// Call metadata limits.
pub fn metadata(field: &str, meta: &HashMap<String, String>) -> Result {
    if meta.len() > MAX_METADATA_ENTRIES {
        return Err(Error::invalid(
            field,
            format!(
                "{} entries, at most {MAX_METADATA_ENTRIES} allowed",
                meta.len()
            ),
        ));
    }
    for (k, v) in meta {
        if k.is_empty() || k.chars().count() > MAX_METADATA_KEY {
            return Err(Error::invalid(
                format!("{field}[{}]", truncate(k)),
                format!("keys must be 1..={MAX_METADATA_KEY} characters"),
            ));
        }
        if v.chars().count() > MAX_METADATA_VALUE {
            return Err(Error::invalid(
                format!("{field}[{}]", truncate(k)),
                format!("values must be at most {MAX_METADATA_VALUE} characters"),
            ));
        }
    }
    Ok(())
}

/// Silence after speech before the relay commits the caller's turn (turn detection NONE):
/// shorter cuts callers off mid-sentence, longer is dead air.
const SILENCE_COMMIT_MS: std::ops::RangeInclusive<u32> = 200..=10_000;

/// Checks agent settings and fills in defaults (model, voice).
pub fn agent_settings(settings: Option<pb::AgentSettings>) -> Result<pb::AgentSettings> {
    let mut s = settings.ok_or_else(|| Error::invalid("settings", "is required"))?;
    if s.name.trim().is_empty() {
        return Err(Error::invalid("settings.name", "is required"));
    }
    if s.name.chars().count() > 200 {
        return Err(Error::invalid("settings.name", "at most 200 characters"));
    }
    if s.model.is_empty() {
        s.model = DEFAULT_MODEL.to_owned();
    }
    if s.model.len() > 100
        || !s
            .model
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
    {
        return Err(Error::invalid("settings.model", "not a model name"));
    }
    if s.voice.is_empty() {
        s.voice = DEFAULT_VOICE.to_owned();
    }
    if !VOICES.contains(&s.voice.as_str()) {
        return Err(Error::invalid(
            "settings.voice",
            format!(
                "unknown voice '{}'; one of {}",
                truncate(&s.voice),
                VOICES.join(", ")
            ),
        ));
    }
    if s.instructions.trim().is_empty() {
        return Err(Error::invalid(
            "settings.instructions",
            "is required (non-empty)",
        ));
    }
    text("settings.instructions", &s.instructions, MAX_INSTRUCTIONS)?;
    if let Some(t) = s.temperature
        && !(0.6..=1.2).contains(&t)
    {
        return Err(Error::invalid(
            "settings.temperature",
            format!("{t} is outside 0.6..=1.2"),
        ));
    }
    // The greeting is spoken as written (the relay asks the model to say exactly it).
    if let Some(problem) = callbridge_proto::greeting_problem(&s.greeting) {
        return Err(Error::invalid("settings.greeting", problem));
    }
    if let Some(td) = &s.turn_detection {
        if let Some(th) = td.threshold
            && !(0.0..=1.0).contains(&th)
        {
            return Err(Error::invalid(
                "settings.turn_detection.threshold",
                format!("{th} is outside 0.0..=1.0"),
            ));
        }
        if !["", "low", "medium", "high", "auto"].contains(&td.eagerness.as_str()) {
            return Err(Error::invalid(
                "settings.turn_detection.eagerness",
                "one of low, medium, high, auto",
            ));
        }
        let Ok(kind) = pb::turn_detection::Type::try_from(td.r#type) else {
            return Err(Error::invalid(
                "settings.turn_detection.type",
                "unknown type",
            ));
        };
        if let Some(ms) = td.silence_commit_ms {
            if kind != pb::turn_detection::Type::None {
                return Err(Error::invalid(
                    "settings.turn_detection.silence_commit_ms",
                    "only with type NONE (the model's own turn detection commits otherwise)",
                ));
            }
            if !SILENCE_COMMIT_MS.contains(&ms) {
                return Err(Error::invalid(
                    "settings.turn_detection.silence_commit_ms",
                    format!(
                        "{ms} is outside {}..={}",
                        SILENCE_COMMIT_MS.start(),
                        SILENCE_COMMIT_MS.end()
                    ),
                ));
            }
        }
    }
    // Empty: the default model; `none`: off. Anything else names a model.
    if !s.input_transcription_model.is_empty()
        && s.input_transcription_model != callbridge_proto::INPUT_TRANSCRIPTION_OFF
        && (s.input_transcription_model.len() > 100
            || !s
                .input_transcription_model
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)))
    {
        return Err(Error::invalid(
            "settings.input_transcription_model",
            format!(
                "'{}' must be a model name (1..=100 of [a-zA-Z0-9._-]), `none` (off) or empty \
                 (the default, {})",
                truncate(&s.input_transcription_model),
                callbridge_proto::DEFAULT_INPUT_TRANSCRIPTION_MODEL
            ),
        ));
    }
    if s.tools.len() > MAX_TOOLS {
        return Err(Error::invalid(
            "settings.tools",
            format!("at most {MAX_TOOLS} tools"),
        ));
    }
    let mut names = std::collections::HashSet::new();
    for (i, tool) in s.tools.iter().enumerate() {
        let field = format!("settings.tools[{i}]");
        ident(&format!("{field}.name"), &tool.name, 64)?;
        if BUILTIN_TOOL_NAMES.contains(&tool.name.as_str()) {
            return Err(Error::invalid(
                format!("{field}.name"),
                format!("'{}' is a built-in tool name", tool.name),
            ));
        }
        if !names.insert(tool.name.as_str()) {
            return Err(Error::invalid(
                format!("{field}.name"),
                format!("duplicate tool '{}'", tool.name),
            ));
        }
        text(&format!("{field}.description"), &tool.description, MAX_TEXT)?;
        let params_field = format!("{field}.parameters_json");
        text(&params_field, &tool.parameters_json, MAX_TOOL_PARAMETERS)?;
        if !tool.parameters_json.trim().is_empty() {
            match serde_json::from_str::<serde_json::Value>(&tool.parameters_json) {
                Ok(serde_json::Value::Object(_)) => {}
                Ok(_) => return Err(Error::invalid(params_field, "must be a JSON object")),
                Err(e) => return Err(Error::invalid(params_field, format!("not JSON: {e}"))),
            }
        }
    }
    if let Some(b) = &s.builtin_tools {
        for (i, n) in b.transfer_numbers.iter().enumerate() {
            e164(&format!("settings.builtin_tools.transfer_numbers[{i}]"), n)?;
        }
        if b.transfer_call && b.transfer_numbers.is_empty() {
            return Err(Error::invalid(
                "settings.builtin_tools.transfer_numbers",
                "transfer_call needs at least one number",
            ));
        }
    }
    if s.max_call_duration_secs > 4 * 3600 {
        return Err(Error::invalid(
            "settings.max_call_duration_secs",
            "at most 14400",
        ));
    }
    if let Some(f) = &s.fallback {
        use pb::fallback::Action;
        text("settings.fallback.preamble", &f.preamble, MAX_TEXT)?;
        match &f.action {
            Some(Action::Say(say)) => {
                if say.text.trim().is_empty() {
                    return Err(Error::invalid("settings.fallback.say.text", "is required"));
                }
                text("settings.fallback.say.text", &say.text, MAX_TEXT)?;
            }
            Some(Action::DialNumber(n)) => e164("settings.fallback.dial_number", n)?,
            Some(Action::ConferenceRoom(room)) => {
                ident("settings.fallback.conference_room", room, 128)?
            }
            None => {}
        }
    }
    if let Some(v) = &s.voicemail {
        voicemail(v)?;
    }
    Ok(s)
}

/// Longest `<Play>` URL, bytes.
const MAX_PLAY_URL: usize = 2048;

/// The agent's voicemail: one message, each form checked like its kin elsewhere.
fn voicemail(v: &pb::Voicemail) -> Result {
    use pb::voicemail::Message;
    match &v.message {
        None => Err(Error::invalid(
            "settings.voicemail.message",
            "set spoken_text, say or play_url (leave voicemail unset to hang up on machines)",
        )),
        Some(Message::SpokenText(t)) => {
            if t.trim().is_empty() {
                return Err(Error::invalid(
                    "settings.voicemail.spoken_text",
                    "is required",
                ));
            }
            // Spoken as written, like the greeting.
            match callbridge_proto::greeting_problem(t) {
                Some(problem) => Err(Error::invalid("settings.voicemail.spoken_text", problem)),
                None => Ok(()),
            }
        }
        Some(Message::Say(say)) => {
            if say.text.trim().is_empty() {
                return Err(Error::invalid("settings.voicemail.say.text", "is required"));
            }
            text("settings.voicemail.say.text", &say.text, MAX_TEXT)?;
            text("settings.voicemail.say.voice", &say.voice, 64)?;
            text("settings.voicemail.say.language", &say.language, 16)
        }
        Some(Message::PlayUrl(url)) => play_url("settings.voicemail.play_url", url),
    }
}

/// An absolute https URL Twilio can fetch audio from.
fn play_url(field: &str, url: &str) -> Result {
    text(field, url, MAX_PLAY_URL)?;
    if url.chars().any(char::is_control) {
        return Err(Error::invalid(field, "contains a control character"));
    }
    let uri: http::Uri = url
        .parse()
        .map_err(|e| Error::invalid(field, format!("is not a URL: {e}")))?;
    if uri.scheme_str() != Some("https") || uri.host().is_none_or(str::is_empty) {
        return Err(Error::invalid(field, "must be an absolute https URL"));
    }
    Ok(())
}

/// Twilio's `AnsweredBy` values (its docs list no others).
pub const ANSWERED_BY: [&str; 7] = [
    "human",
    "machine_start",
    "machine_end_beep",
    "machine_end_silence",
    "machine_end_other",
    "fax",
    "unknown",
];

/// One of [`ANSWERED_BY`].
pub fn answered_by(field: &str, value: &str) -> Result {
    if ANSWERED_BY.contains(&value) {
        Ok(())
    } else {
        Err(Error::invalid(
            field,
            format!(
                "'{}' is not one of {}",
                truncate(value),
                ANSWERED_BY.join(", ")
            ),
        ))
    }
}

/// A live command.
pub fn command(command: Option<&pb::Command>) -> Result {
    use pb::command::Kind;
    let c = command.ok_or_else(|| Error::invalid("command", "is required"))?;
    if !c.command_id.is_empty() {
        ident("command.command_id", &c.command_id, 64)?;
    }
    match &c.kind {
        None => Err(Error::invalid("command.kind", "is required")),
        Some(Kind::Say(s)) => {
            if s.text.trim().is_empty() {
                return Err(Error::invalid("command.say.text", "is required"));
            }
            text("command.say.text", &s.text, MAX_TEXT)
        }
        Some(Kind::Hangup(h)) => text("command.hangup.reason", &h.reason, MAX_TEXT),
        Some(Kind::Transfer(t)) => e164("command.transfer.number", &t.number),
        Some(Kind::ToolResult(r)) => {
            if r.tool_call_id.is_empty() {
                return Err(Error::invalid(
                    "command.tool_result.tool_call_id",
                    "is required",
                ));
            }
            text(
                "command.tool_result.output",
                &r.output,
                MAX_TOOL_PARAMETERS * 4,
            )
        }
        // Nothing to check; whether there is audio to commit is the relay's to say.
        Some(Kind::CommitInput(_)) => Ok(()),
        Some(Kind::AnsweringMachine(m)) => {
            answered_by("command.answering_machine.answered_by", &m.answered_by)
        }
        Some(Kind::UpdateInstructions(u)) => {
            if u.instructions.trim().is_empty() {
                return Err(Error::invalid(
                    "command.update_instructions.instructions",
                    "is required",
                ));
            }
            text(
                "command.update_instructions.instructions",
                &u.instructions,
                MAX_INSTRUCTIONS,
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good() -> pb::AgentSettings {
        pb::AgentSettings {
            name: "Front desk".into(),
            instructions: "Be brief.".into(),
            ..Default::default()
        }
    }

    fn field_of(err: Error) -> String {
        match err {
            Error::InvalidArgument { field, .. } => field,
            other => panic!("expected InvalidArgument, got {other:?}"),
        }
    }

    #[test]
    fn e164_follows_the_pattern() {
        for ok in ["+14155550123", "+12", "+123456789012345"] {
            assert!(is_e164(ok), "{ok}");
        }
        for bad in [
            "14155550123",
            "+0123",
            "+1",
            "+1234567890123456",
            "+1-415",
            "",
        ] {
            assert!(!is_e164(bad), "{bad}");
        }
    }

    #[test]
    fn transcription_off_is_explicit_and_named_models_pass() {
        for itm in ["", "none", "whisper-1", "gpt-4o-mini-transcribe"] {
            let s = pb::AgentSettings {
                input_transcription_model: itm.into(),
                ..good()
            };
            agent_settings(Some(s)).unwrap_or_else(|e| panic!("{itm}: {e}"));
        }
    }

    #[test]
    fn defaults_are_filled() {
        let s = agent_settings(Some(good())).expect("valid");
        assert_eq!(s.voice, DEFAULT_VOICE);
        assert_eq!(s.model, DEFAULT_MODEL);
    }

    #[test]
    fn each_bad_setting_names_its_field() {
        let cases: Vec<(pb::AgentSettings, &str)> = vec![
            (
                pb::AgentSettings {
                    temperature: Some(1.3),
                    ..good()
                },
                "settings.temperature",
            ),
            (
                pb::AgentSettings {
                    temperature: Some(0.5),
                    ..good()
                },
                "settings.temperature",
            ),
            (
                pb::AgentSettings {
                    voice: "robot".into(),
                    ..good()
                },
                "settings.voice",
            ),
            (
                pb::AgentSettings {
                    greeting: "Hello.\nHow can I help?".into(),
                    ..good()
                },
                "settings.greeting",
            ),
            (
                pb::AgentSettings {
                    greeting: "a".repeat(callbridge_proto::MAX_GREETING_CHARS + 1),
                    ..good()
                },
                "settings.greeting",
            ),
            (
                pb::AgentSettings {
                    input_transcription_model: "gpt 4o".into(),
                    ..good()
                },
                "settings.input_transcription_model",
            ),
            (
                pb::AgentSettings {
                    instructions: " ".into(),
                    ..good()
                },
                "settings.instructions",
            ),
            (
                pb::AgentSettings {
                    instructions: "x".repeat(MAX_INSTRUCTIONS + 1),
                    ..good()
                },
                "settings.instructions",
            ),
            (
                pb::AgentSettings {
                    name: String::new(),
                    ..good()
                },
                "settings.name",
            ),
            (
                pb::AgentSettings {
                    tools: vec![pb::Tool {
                        name: "t".into(),
                        parameters_json: "[1]".into(),
                        ..Default::default()
                    }],
                    ..good()
                },
                "settings.tools[0].parameters_json",
            ),
            (
                pb::AgentSettings {
                    tools: vec![pb::Tool {
                        name: "t".into(),
                        parameters_json: format!(
                            "{{\"a\":\"{}\"}}",
                            "x".repeat(MAX_TOOL_PARAMETERS)
                        ),
                        ..Default::default()
                    }],
                    ..good()
                },
                "settings.tools[0].parameters_json",
            ),
            (
                pb::AgentSettings {
                    tools: vec![pb::Tool {
                        name: "end_call".into(),
                        ..Default::default()
                    }],
                    ..good()
                },
                "settings.tools[0].name",
            ),
            (
                pb::AgentSettings {
                    turn_detection: Some(pb::TurnDetection {
                        r#type: pb::turn_detection::Type::ServerVad as i32,
                        silence_commit_ms: Some(500),
                        ..Default::default()
                    }),
                    ..good()
                },
                "settings.turn_detection.silence_commit_ms",
            ),
            (
                pb::AgentSettings {
                    turn_detection: Some(pb::TurnDetection {
                        r#type: pb::turn_detection::Type::None as i32,
                        silence_commit_ms: Some(100),
                        ..Default::default()
                    }),
                    ..good()
                },
                "settings.turn_detection.silence_commit_ms",
            ),
        ];
        for (settings, field) in cases {
            assert_eq!(
                field_of(agent_settings(Some(settings)).expect_err("invalid")),
                field
            );
        }
        assert_eq!(
            field_of(agent_settings(None).expect_err("missing")),
            "settings"
        );
    }

    #[test]
    fn a_voicemail_is_one_message_each_checked_like_its_kin() {
        use pb::voicemail::Message;
        let with = |message: Option<Message>| pb::AgentSettings {
            voicemail: Some(pb::Voicemail { message }),
            ..good()
        };
        let say = |text: &str| {
            Message::Say(pb::Say {
                text: text.into(),
                voice: "Polly.Joanna".into(),
                language: "en-US".into(),
            })
        };
        for ok in [
            Message::SpokenText("Hi, this is Acme. Please call us back.".into()),
            say("Please call us back."),
            Message::PlayUrl("https://media.example.com/vm.mp3?v=2".into()),
        ] {
            agent_settings(Some(with(Some(ok.clone())))).unwrap_or_else(|e| panic!("{ok:?}: {e}"));
        }
        for (bad, field) in [
            (None, "settings.voicemail.message"),
            (
                Some(Message::SpokenText(" ".into())),
                "settings.voicemail.spoken_text",
            ),
            (
                Some(Message::SpokenText("Hi\nthere".into())),
                "settings.voicemail.spoken_text",
            ),
            (
                Some(Message::SpokenText(
                    "a".repeat(callbridge_proto::MAX_GREETING_CHARS + 1),
                )),
                "settings.voicemail.spoken_text",
            ),
            (Some(say("")), "settings.voicemail.say.text"),
            (
                Some(Message::PlayUrl("http://media.example.com/vm.mp3".into())),
                "settings.voicemail.play_url",
            ),
            (
                Some(Message::PlayUrl("/vm.mp3".into())),
                "settings.voicemail.play_url",
            ),
            (
                Some(Message::PlayUrl("https://".into())),
                "settings.voicemail.play_url",
            ),
            (
                Some(Message::PlayUrl(format!(
                    "https://a.test/{}",
                    "v".repeat(2048)
                ))),
                "settings.voicemail.play_url",
            ),
        ] {
            assert_eq!(
                field_of(agent_settings(Some(with(bad.clone()))).expect_err("invalid")),
                field,
                "{bad:?}"
            );
        }
    }

    #[test]
    fn a_verdict_command_names_a_twilio_verdict() {
        let verdict = |v: &str| pb::Command {
            command_id: String::new(),
            kind: Some(pb::command::Kind::AnsweringMachine(
                pb::AnsweringMachineCommand {
                    answered_by: v.into(),
                },
            )),
        };
        for ok in ANSWERED_BY {
            command(Some(&verdict(ok))).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for bad in ["", "Human", "machine", "robot"] {
            assert_eq!(
                field_of(command(Some(&verdict(bad))).expect_err("invalid")),
                "command.answering_machine.answered_by"
            );
        }
    }

    #[test]
    fn metadata_and_pages_are_bounded() {
        let big: HashMap<String, String> = (0..33).map(|i| (format!("k{i}"), "v".into())).collect();
        assert_eq!(
            field_of(metadata("metadata", &big).expect_err("too many")),
            "metadata"
        );
        let long_key: HashMap<String, String> = [("k".repeat(65), "v".to_owned())].into();
        assert!(
            field_of(metadata("metadata", &long_key).expect_err("key")).starts_with("metadata[")
        );
        let long_value: HashMap<String, String> = [("k".to_owned(), "v".repeat(1025))].into();
        assert_eq!(
            field_of(metadata("metadata", &long_value).expect_err("value")),
            "metadata[k]"
        );
        assert_eq!(page_size("page_size", 0).expect("default"), 50);
        assert_eq!(
            field_of(page_size("page_size", 501).expect_err("too big")),
            "page_size"
        );
    }
}

//! OpenAI Realtime (GA) wire format (`docs/protocols.md`, "OpenAI Realtime"): the client events the
//! relay sends (the session setup built from an [`AgentView`]), and a single-pass borrowed parse of
//! server events with their type as a [`RealtimeEventKind`].

use callbridge_proto::pb;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::agent::AgentView;
use crate::twilio::{Str, push_json_str};

/// Name of the built-in hang-up tool.
pub const TOOL_END_CALL: &str = "end_call";
/// Name of the built-in transfer tool.
pub const TOOL_TRANSFER_CALL: &str = "transfer_call";
fn turn_detection_json(agent: &AgentView) -> Value {
    use pb::turn_detection::Type;
    let Some(td) = &agent.turn_detection else {
        return json!({ "type": "server_vad" });
    };
    let mut obj = serde_json::Map::new();
    match Type::try_from(td.r#type).unwrap_or(Type::ServerVad) {
        Type::None => return Value::Null,
        Type::SemanticVad => {
            obj.insert("type".into(), "semantic_vad".into());
            if !td.eagerness.is_empty() {
                obj.insert("eagerness".into(), td.eagerness.clone().into());
            }
        }
        Type::Unspecified | Type::ServerVad => {
            obj.insert("type".into(), "server_vad".into());
            if let Some(v) = td.threshold {
                obj.insert("threshold".into(), v.into());
            }
            if let Some(v) = td.prefix_padding_ms {
                obj.insert("prefix_padding_ms".into(), v.into());
            }
            if let Some(v) = td.silence_duration_ms {
                obj.insert("silence_duration_ms".into(), v.into());
            }
        }
    }
    if let Some(v) = td.create_response {
        obj.insert("create_response".into(), v.into());
    }
    if let Some(v) = td.interrupt_response {
        obj.insert("interrupt_response".into(), v.into());
    }
    Value::Object(obj)
}

fn tools_json(agent: &AgentView) -> Vec<Value> {
    let mut tools = Vec::with_capacity(agent.tools.len() + 2);
    for t in &agent.tools {
        let params = if t.parameters_json.trim().is_empty() {
            json!({ "type": "object", "properties": {} })
        } else {
            serde_json::from_str(&t.parameters_json)
                .unwrap_or_else(|_| json!({ "type": "object", "properties": {} }))
        };
        tools.push(json!({
            "type": "function",
            "name": t.name,
            "description": t.description,
            "parameters": params,
        }));
    }
    if agent.end_call {
        tools.push(json!({
            "type": "function",
            "name": TOOL_END_CALL,
            "description": "Hang up the call. Say a short goodbye first; the call ends when it has been heard.",
            "parameters": { "type": "object", "properties": {
                "reason": { "type": "string", "description": "Why the call ends." } } },
        }));
    }
    if agent.transfer_call && !agent.transfer_numbers.is_empty() {
        tools.push(json!({
            "type": "function",
            "name": TOOL_TRANSFER_CALL,
            "description": "Transfer the caller to a person at one of the allowed numbers. Tell the caller first.",
            "parameters": { "type": "object", "properties": {
                "number": { "type": "string", "enum": agent.transfer_numbers } },
                "required": ["number"] },
        }));
    }
    tools
}

/// The first `session.update`: `audio/pcmu` both ways, voice, instructions, turn
/// detection, transcription, tools.
pub fn session_update(agent: &AgentView) -> String {
    let mut input = serde_json::Map::new();
    input.insert("format".into(), json!({ "type": "audio/pcmu" }));
    input.insert("turn_detection".into(), turn_detection_json(agent));
    if !agent.transcription_model.is_empty() {
        input.insert(
            "transcription".into(),
            json!({ "model": agent.transcription_model }),
        );
    }
    json!({
        "type": "session.update",
        "session": {
            "type": "realtime",
            "output_modalities": ["audio"],
            "instructions": agent.instructions,
            "audio": {
                "input": input,
                "output": { "format": { "type": "audio/pcmu" }, "voice": agent.voice },
            },
            "tools": tools_json(agent),
            "tool_choice": "auto",
        }
    })
    .to_string()
}

/// `session.update` changing only the instructions; the audio formats are repeated so no
/// update can ever leave the session on PCM16 (`docs/protocols.md`, "Pitfalls" 10).
pub fn update_instructions(instructions: &str) -> String {
    json!({
        "type": "session.update",
        "session": {
            "type": "realtime",
            "instructions": instructions,
            "audio": {
                "input": { "format": { "type": "audio/pcmu" } },
                "output": { "format": { "type": "audio/pcmu" } },
            },
        }
    })
    .to_string()
}

/// `{"type":"input_audio_buffer.append","audio":…}` in parts, to be joined where the frame
/// is built; `payload` is checked base64.
pub fn append_parts(payload: &str) -> [&str; 3] {
    [
        r#"{"type":"input_audio_buffer.append","audio":""#,
        payload,
        "\"}",
    ]
}

/// [`append_parts`] joined.
pub fn append(payload: &str) -> String {
    append_parts(payload).concat()
}

/// `conversation.item.truncate` at `audio_end_ms` of content 0.
pub fn truncate(item_id: &str, audio_end_ms: u32) -> String {
    let mut s = String::from(r#"{"type":"conversation.item.truncate","item_id":"#);
    push_json_str(&mut s, item_id);
    s.push_str(&format!(
        r#","content_index":0,"audio_end_ms":{audio_end_ms}}}"#
    ));
    s
}

/// A system instruction item (`conversation.item.create`, `input_text`).
pub fn system_text(text: &str) -> String {
    json!({
        "type": "conversation.item.create",
        "item": { "type": "message", "role": "system",
                  "content": [ { "type": "input_text", "text": text } ] }
    })
    .to_string()
}

/// `{"type":"response.create"}`.
pub fn response_create() -> String {
    r#"{"type":"response.create"}"#.to_owned()
}

/// `{"type":"response.cancel"}`: the running response stops (a voicemail replaces it).
pub fn response_cancel() -> String {
    r#"{"type":"response.cancel"}"#.to_owned()
}

/// `{"type":"input_audio_buffer.commit"}`: the caller's audio so far becomes a user item
/// (turn detection off: the relay ends the caller's turns).
pub fn commit() -> String {
    r#"{"type":"input_audio_buffer.commit"}"#.to_owned()
}

/// A user text item (`conversation.item.create`, `input_text`), e.g. a key the caller
/// pressed.
pub fn user_text(text: &str) -> String {
    json!({
        "type": "conversation.item.create",
        "item": { "type": "message", "role": "user",
                  "content": [ { "type": "input_text", "text": text } ] }
    })
    .to_string()
}

/// `event` (a client event as built here: a JSON object) with `"event_id"` first, so an
/// `error` the model answers it with can be tied back to it. `event_id` is the relay's own
/// ASCII id (`call::client_events`), written unescaped.
pub fn with_event_id(event_id: &str, event: &str) -> String {
    let rest = event.strip_prefix('{').unwrap_or(event);
    let mut s = String::with_capacity(event.len() + event_id.len() + 16);
    s.push_str(r#"{"event_id":""#);
    s.push_str(event_id);
    s.push_str("\",");
    s.push_str(rest);
    s
}

/// `conversation.item.create` with a `function_call_output`.
pub fn function_output(call_id: &str, output: &str) -> String {
    json!({
        "type": "conversation.item.create",
        "item": { "type": "function_call_output", "call_id": call_id, "output": output }
    })
    .to_string()
}

/// The server event types the relay acts on; every other type is [`Self::Other`]. A call
/// handles them in one exhaustive `match` (`call::model_side`), so a type added here is
/// a compile error until it is handled there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RealtimeEventKind {
    /// `response.output_audio.delta`: assistant audio (the hot path).
    OutputAudioDelta,
    /// `response.output_audio.done`.
    OutputAudioDone,
    /// `response.output_audio_transcript.delta`.
    OutputAudioTranscriptDelta,
    /// `response.output_audio_transcript.done`.
    OutputAudioTranscriptDone,
    /// `response.created`.
    ResponseCreated,
    /// `response.done`.
    ResponseDone,
    /// `input_audio_buffer.speech_started`.
    SpeechStarted,
    /// `input_audio_buffer.speech_stopped`.
    SpeechStopped,
    /// `input_audio_buffer.committed`: the caller's audio so far is a user item now.
    InputCommitted,
    /// `conversation.item.input_audio_transcription.failed`.
    InputTranscriptionFailed,
    /// `rate_limits.updated`.
    RateLimitsUpdated,
    /// `conversation.item.input_audio_transcription.completed`.
    InputTranscriptionCompleted,
    /// `response.function_call_arguments.done`.
    FunctionCallArgumentsDone,
    /// `error`.
    Error,
    /// `session.updated`.
    SessionUpdated,
    /// Any other type (the relay does not use it).
    Other,
}

impl RealtimeEventKind {
    /// From the `type` field; no allocation.
    pub fn from_name(name: &str) -> Self {
        // The audio delta is most of the traffic: compared first.
        match name {
            "response.output_audio.delta" => Self::OutputAudioDelta,
            "response.output_audio.done" => Self::OutputAudioDone,
            "response.output_audio_transcript.delta" => Self::OutputAudioTranscriptDelta,
            "response.output_audio_transcript.done" => Self::OutputAudioTranscriptDone,
            "response.created" => Self::ResponseCreated,
            "response.done" => Self::ResponseDone,
            "input_audio_buffer.speech_started" => Self::SpeechStarted,
            "input_audio_buffer.speech_stopped" => Self::SpeechStopped,
            "input_audio_buffer.committed" => Self::InputCommitted,
            "conversation.item.input_audio_transcription.failed" => Self::InputTranscriptionFailed,
            "rate_limits.updated" => Self::RateLimitsUpdated,
            "conversation.item.input_audio_transcription.completed" => {
                Self::InputTranscriptionCompleted
            }
            "response.function_call_arguments.done" => Self::FunctionCallArgumentsDone,
            "error" => Self::Error,
            "session.updated" => Self::SessionUpdated,
            _ => Self::Other,
        }
    }
}

impl<'de> Deserialize<'de> for RealtimeEventKind {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(crate::twilio::NameVisitor(Self::from_name))
    }
}

/// One server event; only what routing needs, strings borrowed from the frame.
#[derive(Debug, Deserialize)]
pub struct ServerEvent<'a> {
    /// Event type.
    #[serde(rename = "type")]
    pub kind: RealtimeEventKind,
    /// Audio (base64) or transcript delta.
    #[serde(borrow, default)]
    pub delta: Option<Str<'a>>,
    /// Item the event is about.
    #[serde(borrow, default)]
    pub item_id: Option<Str<'a>>,
    /// Response the event belongs to.
    #[serde(borrow, default)]
    pub response_id: Option<Str<'a>>,
    /// Final transcript (caller or assistant).
    #[serde(borrow, default)]
    pub transcript: Option<Str<'a>>,
    /// Function call id.
    #[serde(borrow, default)]
    pub call_id: Option<Str<'a>>,
    /// Function name.
    #[serde(borrow, default)]
    pub name: Option<Str<'a>>,
    /// Function arguments (JSON text).
    #[serde(borrow, default)]
    pub arguments: Option<Str<'a>>,
    /// `response.created` / `response.done` body.
    #[serde(borrow, default)]
    pub response: Option<ResponseBody<'a>>,
    /// `error` body.
    #[serde(default)]
    pub error: Option<ErrorBody>,
    /// `session.created` / `session.updated` body.
    #[serde(default)]
    pub session: Option<SessionBody>,
    /// `rate_limits.updated` body.
    #[serde(default)]
    pub rate_limits: Option<Vec<RateLimit>>,
}

/// One entry of `rate_limits.updated`.
#[derive(Debug, Default, Deserialize)]
pub struct RateLimit {
    /// `requests` or `tokens`.
    #[serde(default)]
    pub name: Option<String>,
    /// The maximum allowed value.
    #[serde(default)]
    pub limit: Option<u64>,
    /// What is left before the limit is reached.
    #[serde(default)]
    pub remaining: Option<u64>,
}

/// The `response` object.
#[derive(Debug, Deserialize)]
pub struct ResponseBody<'a> {
    /// Response id.
    #[serde(borrow, default)]
    pub id: Option<Str<'a>>,
    /// `completed`, `cancelled`, `failed`, `incomplete`.
    #[serde(borrow, default)]
    pub status: Option<Str<'a>>,
    /// Token usage.
    #[serde(default)]
    pub usage: Option<UsageBody>,
    /// Why a response did not complete.
    #[serde(default)]
    pub status_details: Option<StatusDetails>,
}

/// `response.status_details`.
#[derive(Debug, Default, Deserialize)]
pub struct StatusDetails {
    /// `turn_detected`, `client_cancelled`, `max_output_tokens`, `content_filter`.
    #[serde(default)]
    pub reason: Option<String>,
    /// A failed response's error.
    #[serde(default)]
    pub error: Option<StatusError>,
}

/// `response.status_details.error`.
#[derive(Debug, Default, Deserialize)]
pub struct StatusError {
    /// Error type.
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    /// Error code.
    #[serde(default)]
    pub code: Option<String>,
}

/// `response.usage`.
#[derive(Debug, Default, Deserialize)]
pub struct UsageBody {
    #[serde(default)]
    total_tokens: u64,
    #[serde(default)]
    input_tokens: u64,
    #[serde(default)]
    output_tokens: u64,
    #[serde(default)]
    input_token_details: Option<TokenDetails>,
    #[serde(default)]
    output_token_details: Option<TokenDetails>,
}

#[derive(Debug, Default, Deserialize)]
struct TokenDetails {
    #[serde(default)]
    text_tokens: u64,
    #[serde(default)]
    audio_tokens: u64,
    #[serde(default)]
    cached_tokens: u64,
}

impl UsageBody {
    /// As the contract's `Usage` (one response).
    pub fn to_pb(&self) -> pb::Usage {
        let i = self.input_token_details.as_ref();
        let o = self.output_token_details.as_ref();
        pb::Usage {
            input_tokens: self.input_tokens,
            output_tokens: self.output_tokens,
            total_tokens: self.total_tokens,
            input_text_tokens: i.map_or(0, |d| d.text_tokens),
            input_audio_tokens: i.map_or(0, |d| d.audio_tokens),
            cached_tokens: i.map_or(0, |d| d.cached_tokens),
            output_text_tokens: o.map_or(0, |d| d.text_tokens),
            output_audio_tokens: o.map_or(0, |d| d.audio_tokens),
            responses: 1,
            calls: 0,
        }
    }
}

/// The `error` object.
#[derive(Debug, Default, Deserialize)]
pub struct ErrorBody {
    /// Error type.
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    /// Error code.
    #[serde(default)]
    pub code: Option<String>,
    /// Message.
    #[serde(default)]
    pub message: Option<String>,
    /// The client event that caused it (the `event_id` the relay sent), if any.
    #[serde(default)]
    pub event_id: Option<String>,
}

/// What an `error` means for the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// The session stays usable (most errors: a bad request, a failed response).
    Recoverable,
    /// The session is over, a new one can work: it is replaced (the conversation replayed).
    SessionOver,
    /// No session can work (account or key): the call ends `MODEL_UNAVAILABLE`.
    Unusable,
}

/// Codes that end a session a new one can replace: the 60-minute limit.
const SESSION_OVER_CODES: &[&str] = &["session_expired"];
/// Types that end a session a new one can replace.
const SESSION_OVER_TYPES: &[&str] = &["server_error"];
/// Codes no new session can get past: the key or the account.
const UNUSABLE_CODES: &[&str] = &[
    "insufficient_quota",
    "invalid_api_key",
    "account_deactivated",
    "model_not_found",
];

impl ErrorBody {
    /// What the error means for the session, from its code and type.
    pub fn class(&self) -> ErrorClass {
        let code = self.code.as_deref().unwrap_or("");
        let kind = self.kind.as_deref().unwrap_or("");
        if UNUSABLE_CODES.contains(&code) {
            ErrorClass::Unusable
        } else if SESSION_OVER_CODES.contains(&code) || SESSION_OVER_TYPES.contains(&kind) {
            ErrorClass::SessionOver
        } else {
            ErrorClass::Recoverable
        }
    }
}

/// The `session` object, only to check the audio formats.
#[derive(Debug, Default, Deserialize)]
pub struct SessionBody {
    #[serde(default)]
    audio: Option<SessionAudio>,
}

#[derive(Debug, Default, Deserialize)]
struct SessionAudio {
    #[serde(default)]
    input: Option<SessionDir>,
    #[serde(default)]
    output: Option<SessionDir>,
}

#[derive(Debug, Default, Deserialize)]
struct SessionDir {
    #[serde(default)]
    format: Option<SessionFormat>,
}

#[derive(Debug, Default, Deserialize)]
struct SessionFormat {
    #[serde(default, rename = "type")]
    kind: Option<String>,
}

impl SessionBody {
    /// Whether both directions are `audio/pcmu` (unknown counts as fine).
    pub fn is_pcmu(&self) -> bool {
        let ok = |d: &Option<SessionDir>| {
            d.as_ref()
                .and_then(|d| d.format.as_ref())
                .and_then(|f| f.kind.as_deref())
                .is_none_or(|k| k == "audio/pcmu")
        };
        self.audio
            .as_ref()
            .is_none_or(|a| ok(&a.input) && ok(&a.output))
    }
}

/// Parses one server frame.
pub fn parse(text: &str) -> Result<ServerEvent<'_>, serde_json::Error> {
    serde_json::from_str(text)
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;

    use super::*;
    use crate::agent::DEFAULT_MAX_DURATION;

    fn agent() -> AgentView {
        AgentView {
            model: "gpt-realtime".into(),
            voice: "marin".into(),
            instructions: "Be nice".into(),
            transcription_model: "gpt-4o-mini-transcribe".into(),
            tools: vec![pb::Tool {
                name: "lookup".into(),
                description: "Look up".into(),
                parameters_json: r#"{"type":"object","properties":{"q":{"type":"string"}}}"#.into(),
            }],
            end_call: true,
            transfer_call: true,
            transfer_numbers: vec!["+15550001".into()],
            max_duration: DEFAULT_MAX_DURATION,
            ..AgentView::default()
        }
    }

    #[test]
    fn session_update_is_ga_shaped_with_pcmu() {
        let v: Value = serde_json::from_str(&session_update(&agent())).unwrap();
        assert_eq!(v["type"], "session.update");
        let s = &v["session"];
        assert_eq!(s["type"], "realtime");
        assert_eq!(s["output_modalities"], json!(["audio"]));
        assert_eq!(s["audio"]["input"]["format"]["type"], "audio/pcmu");
        assert_eq!(s["audio"]["output"]["format"]["type"], "audio/pcmu");
        assert_eq!(s["audio"]["output"]["voice"], "marin");
        assert_eq!(s["audio"]["input"]["turn_detection"]["type"], "server_vad");
        assert_eq!(
            s["audio"]["input"]["transcription"]["model"],
            "gpt-4o-mini-transcribe"
        );
        assert!(s.get("temperature").is_none());
        let names: Vec<&str> = s["tools"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| {
                assert_eq!(t["type"], "function");
                assert!(t["parameters"].is_object());
                t["name"].as_str().unwrap()
            })
            .collect();
        assert_eq!(names, ["lookup", "end_call", "transfer_call"]);
        assert_eq!(
            s["tools"][2]["parameters"]["properties"]["number"]["enum"],
            json!(["+15550001"])
        );
    }

    #[test]
    fn turn_detection_variants() {
        use pb::turn_detection::Type;
        let mut a = agent();
        a.turn_detection = Some(pb::TurnDetection {
            r#type: Type::None as i32,
            ..Default::default()
        });
        let v: Value = serde_json::from_str(&session_update(&a)).unwrap();
        assert!(v["session"]["audio"]["input"]["turn_detection"].is_null());
        a.turn_detection = Some(pb::TurnDetection {
            r#type: Type::SemanticVad as i32,
            eagerness: "low".into(),
            interrupt_response: Some(false),
            ..Default::default()
        });
        let v: Value = serde_json::from_str(&session_update(&a)).unwrap();
        let td = &v["session"]["audio"]["input"]["turn_detection"];
        assert_eq!(td["type"], "semantic_vad");
        assert_eq!(td["eagerness"], "low");
        assert_eq!(td["interrupt_response"], false);
        assert!(!a.barge_in_enabled());
    }

    #[test]
    fn url_carries_only_the_documented_model_parameter() {
        assert_eq!(
            agent().url("ws://127.0.0.1:9/v1/realtime"),
            "ws://127.0.0.1:9/v1/realtime?model=gpt-realtime"
        );
        let from_control = AgentView::from_agent(&pb::Agent {
            settings: Some(pb::AgentSettings {
                temperature: Some(0.8),
                ..pb::AgentSettings::default()
            }),
            ..pb::Agent::default()
        });
        assert!(
            !from_control
                .url("ws://h/v1/realtime")
                .contains("temperature")
        );
    }

    #[test]
    fn transcription_is_on_by_default_and_off_only_when_asked() {
        let with = |itm: &str| {
            AgentView::from_agent(&pb::Agent {
                settings: Some(pb::AgentSettings {
                    input_transcription_model: itm.into(),
                    ..pb::AgentSettings::default()
                }),
                ..pb::Agent::default()
            })
        };
        assert_eq!(with("").transcription_model, "gpt-4o-mini-transcribe");
        assert_eq!(with("whisper-1").transcription_model, "whisper-1");
        let off = with("none");
        assert!(!off.transcribes());
        let v: serde_json::Value = serde_json::from_str(&session_update(&off)).unwrap();
        assert!(
            v["session"]["audio"]["input"]
                .get("transcription")
                .is_none()
        );
        callbridge_testkit::realtime_schema::check_client_event(&v).unwrap();
    }

    #[test]
    fn client_events_are_valid_json() {
        for (text, ty) in [
            (append("QUJD"), "input_audio_buffer.append"),
            (truncate("item_\"1", 1480), "conversation.item.truncate"),
            (system_text("say hi"), "conversation.item.create"),
            (response_create(), "response.create"),
            (
                function_output("call_1", "{\"ok\":true}"),
                "conversation.item.create",
            ),
            (update_instructions("new"), "session.update"),
        ] {
            let v: Value = serde_json::from_str(&text).unwrap();
            assert_eq!(v["type"], ty);
        }
        let v: Value = serde_json::from_str(&truncate("item_1", 1480)).unwrap();
        assert_eq!(v["audio_end_ms"], 1480);
        assert_eq!(v["content_index"], 0);
        let v: Value = serde_json::from_str(&update_instructions("new")).unwrap();
        assert_eq!(
            v["session"]["audio"]["output"]["format"]["type"],
            "audio/pcmu"
        );
    }

    #[test]
    fn event_types_map_to_kinds_and_unknown_ones_to_other() {
        use RealtimeEventKind as K;
        for (name, kind) in [
            ("response.output_audio.delta", K::OutputAudioDelta),
            ("response.output_audio.done", K::OutputAudioDone),
            (
                "response.output_audio_transcript.delta",
                K::OutputAudioTranscriptDelta,
            ),
            (
                "response.output_audio_transcript.done",
                K::OutputAudioTranscriptDone,
            ),
            ("response.created", K::ResponseCreated),
            ("response.done", K::ResponseDone),
            ("input_audio_buffer.speech_started", K::SpeechStarted),
            ("input_audio_buffer.speech_stopped", K::SpeechStopped),
            (
                "conversation.item.input_audio_transcription.completed",
                K::InputTranscriptionCompleted,
            ),
            (
                "response.function_call_arguments.done",
                K::FunctionCallArgumentsDone,
            ),
            ("error", K::Error),
            ("session.updated", K::SessionUpdated),
            ("input_audio_buffer.committed", K::InputCommitted),
            (
                "conversation.item.input_audio_transcription.failed",
                K::InputTranscriptionFailed,
            ),
            ("rate_limits.updated", K::RateLimitsUpdated),
            ("session.created", K::Other),
            ("conversation.item.added", K::Other),
        ] {
            let frame = format!(r#"{{"type":"{name}"}}"#);
            assert_eq!(parse(&frame).unwrap().kind, kind, "{name}");
        }
        // An escaped name still parses (serde hands the visitor an unescaped copy).
        assert_eq!(parse(r#"{"type":"err\u006fr"}"#).unwrap().kind, K::Error);
        assert!(parse(r#"{"type":1}"#).is_err());
        assert!(parse(r#"{"delta":"x"}"#).is_err(), "the type is required");
    }

    #[test]
    fn parses_server_events() {
        let d = r#"{"type":"response.output_audio.delta","event_id":"e1","response_id":"resp_1","item_id":"item_1","output_index":0,"content_index":0,"delta":"QUJD","obfuscation":"x"}"#;
        let e = parse(d).unwrap();
        assert_eq!(e.kind, RealtimeEventKind::OutputAudioDelta);
        assert!(matches!(e.delta, Some(Str(Cow::Borrowed("QUJD")))));
        assert_eq!(e.item_id.as_deref(), Some("item_1"));
        let done = r#"{"type":"response.done","response":{"id":"resp_1","status":"completed","output":[{"type":"function_call","name":"x","call_id":"c"}],"usage":{"total_tokens":253,"input_tokens":132,"output_tokens":121,"input_token_details":{"text_tokens":119,"audio_tokens":13,"image_tokens":0,"cached_tokens":64},"output_token_details":{"text_tokens":30,"audio_tokens":91}}}}"#;
        let e = parse(done).unwrap();
        let r = e.response.unwrap();
        assert_eq!(r.status.as_deref(), Some("completed"));
        let u = r.usage.unwrap().to_pb();
        assert_eq!(
            (
                u.total_tokens,
                u.input_audio_tokens,
                u.cached_tokens,
                u.output_audio_tokens
            ),
            (253, 13, 64, 91)
        );
        assert!(e.name.is_none(), "nested fields are not top-level");
        let err = r#"{"type":"error","error":{"type":"invalid_request_error","code":null,"message":"m","param":null}}"#;
        let e = parse(err).unwrap();
        assert_eq!(e.error.unwrap().message.as_deref(), Some("m"));
        let s = r#"{"type":"session.updated","session":{"audio":{"input":{"format":{"type":"audio/pcm","rate":24000}},"output":{"format":{"type":"audio/pcmu"}}}}}"#;
        assert!(!parse(s).unwrap().session.unwrap().is_pcmu());
        let t = r#"{"type":"response.output_audio_transcript.done","item_id":"i","transcript":"He said \"hi\""}"#;
        assert_eq!(
            parse(t).unwrap().transcript.as_deref(),
            Some("He said \"hi\"")
        );
    }

    #[test]
    fn parses_the_model_side_events_of_a_turn() {
        // The GA schemas' own examples.
        let e = parse(r#"{"event_id":"event_5758","type":"rate_limits.updated","rate_limits":[{"name":"requests","limit":1000,"remaining":999,"reset_seconds":60},{"name":"tokens","limit":50000,"remaining":49950,"reset_seconds":60}]}"#).unwrap();
        let limits = e.rate_limits.unwrap();
        assert_eq!(limits[1].name.as_deref(), Some("tokens"));
        assert_eq!(
            (limits[1].limit, limits[1].remaining),
            (Some(50000), Some(49950))
        );
        let e = parse(r#"{"event_id":"event_2324","type":"conversation.item.input_audio_transcription.failed","item_id":"msg_003","content_index":0,"error":{"type":"transcription_error","code":"audio_unintelligible","message":"The audio could not be transcribed.","param":null}}"#).unwrap();
        assert_eq!(e.kind, RealtimeEventKind::InputTranscriptionFailed);
        assert_eq!(e.item_id.as_deref(), Some("msg_003"));
        assert_eq!(
            e.error.unwrap().code.as_deref(),
            Some("audio_unintelligible")
        );
        let e = parse(r#"{"event_id":"event_890","type":"error","error":{"type":"invalid_request_error","code":"invalid_event","message":"The 'type' field is missing.","param":null,"event_id":"event_567"}}"#).unwrap();
        let err = e.error.unwrap();
        assert_eq!(err.event_id.as_deref(), Some("event_567"));
        assert_eq!(err.class(), ErrorClass::Recoverable);
        let e = parse(r#"{"type":"response.done","response":{"id":"resp_2","status":"failed","status_details":{"type":"failed","error":{"type":"server_error","code":"internal"}}}}"#).unwrap();
        let details = e.response.unwrap().status_details.unwrap();
        let failed = details.error.unwrap();
        assert_eq!(
            (failed.kind.as_deref(), failed.code.as_deref()),
            (Some("server_error"), Some("internal"))
        );
        let e = parse(r#"{"type":"response.done","response":{"id":"resp_3","status":"incomplete","status_details":{"type":"incomplete","reason":"max_output_tokens"}}}"#).unwrap();
        assert_eq!(
            e.response
                .unwrap()
                .status_details
                .unwrap()
                .reason
                .as_deref(),
            Some("max_output_tokens")
        );
    }

    #[test]
    fn error_classes() {
        let class = |kind: &str, code: Option<&str>| {
            ErrorBody {
                kind: Some(kind.to_owned()),
                code: code.map(str::to_owned),
                ..ErrorBody::default()
            }
            .class()
        };
        assert_eq!(
            class("invalid_request_error", Some("session_expired")),
            ErrorClass::SessionOver
        );
        assert_eq!(class("server_error", None), ErrorClass::SessionOver);
        assert_eq!(
            class("insufficient_quota", Some("insufficient_quota")),
            ErrorClass::Unusable
        );
        assert_eq!(
            class("invalid_request_error", Some("invalid_api_key")),
            ErrorClass::Unusable
        );
        assert_eq!(
            class(
                "invalid_request_error",
                Some("conversation_already_has_active_response")
            ),
            ErrorClass::Recoverable
        );
        assert_eq!(ErrorBody::default().class(), ErrorClass::Recoverable);
    }

    #[test]
    fn client_events_carry_an_event_id_and_fit_the_ga_schema() {
        let events = [
            session_update(&agent()),
            update_instructions("new"),
            truncate("item_1", 1480),
            system_text("say hi"),
            user_text("DTMF: 5"),
            response_create(),
            response_cancel(),
            commit(),
            function_output("call_1", "{\"ok\":true}"),
        ];
        for (n, event) in events.iter().enumerate() {
            let id = format!("rl_{n}");
            let stamped = with_event_id(&id, event);
            let v: Value = serde_json::from_str(&stamped).unwrap();
            assert_eq!(v["event_id"], id.as_str());
            if let Err(why) = callbridge_testkit::realtime_schema::check_client_event(&v) {
                panic!("{stamped}: {why}");
            }
        }
        // Appends go unstamped (the hot path); they fit the schema as they are.
        let v: Value = serde_json::from_str(&append("QUJD")).unwrap();
        callbridge_testkit::realtime_schema::check_client_event(&v).unwrap();
        // Turn detection off is `null`, which the schema allows.
        let mut a = agent();
        a.turn_detection = Some(pb::TurnDetection {
            r#type: pb::turn_detection::Type::None as i32,
            silence_commit_ms: Some(500),
            ..Default::default()
        });
        let v: Value = serde_json::from_str(&session_update(&a)).unwrap();
        assert!(v["session"]["audio"]["input"]["turn_detection"].is_null());
        callbridge_testkit::realtime_schema::check_client_event(&v).unwrap();
    }
}

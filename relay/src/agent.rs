//! The agent a call runs with: control's `Agent` or the relay's own settings, in the
//! shape the call needs. Its wire form (`session.update`) is built by [`crate::realtime`].

use std::time::Duration;

use callbridge_proto::pb;

use crate::config::{Config, DEFAULT_MODEL, DEFAULT_VOICE, TurnDetectionMode};

/// Default hard limit of a call.
pub const DEFAULT_MAX_DURATION: Duration = Duration::from_secs(3600);

/// The agent a call runs with, from control's `Agent` or the relay's own settings.
#[derive(Clone, Debug, Default)]
pub struct AgentView {
    /// Agent id (empty for the standalone agent).
    pub agent_id: String,
    /// Realtime model.
    pub model: String,
    /// Output voice.
    pub voice: String,
    /// System prompt.
    pub instructions: String,
    /// Spoken first, if not empty.
    pub greeting: String,
    /// Turn detection; `None` means server VAD defaults.
    pub turn_detection: Option<pb::TurnDetection>,
    /// Input transcription model; empty turns it off.
    pub transcription_model: String,
    /// Application tools.
    pub tools: Vec<pb::Tool>,
    /// Built-in `end_call`.
    pub end_call: bool,
    /// Built-in `transfer_call`.
    pub transfer_call: bool,
    /// Numbers `transfer_call` may dial.
    pub transfer_numbers: Vec<String>,
    /// Hard limit of the call.
    pub max_duration: Duration,
    /// A key the caller presses also goes to the model (as a user message).
    pub dtmf_to_model: bool,
    /// The message for an answering machine; `None`: hang up on machines.
    pub voicemail: Option<pb::voicemail::Message>,
}

impl AgentView {
    /// From control's agent.
    pub fn from_agent(agent: &pb::Agent) -> Self {
        let s = agent.settings.clone().unwrap_or_default();
        let builtin = s.builtin_tools.clone().unwrap_or_default();
        Self {
            agent_id: agent.agent_id.clone(),
            model: non_empty(s.model, DEFAULT_MODEL),
            voice: non_empty(s.voice, DEFAULT_VOICE),
            instructions: s.instructions,
            greeting: s.greeting,
            turn_detection: s.turn_detection,
            transcription_model: callbridge_proto::input_transcription_model(
                &s.input_transcription_model,
            )
            .unwrap_or_default()
            .to_owned(),
            tools: s.tools,
            end_call: builtin.end_call,
            transfer_call: builtin.transfer_call,
            transfer_numbers: builtin.transfer_numbers,
            max_duration: match s.max_call_duration_secs {
                0 => DEFAULT_MAX_DURATION,
                n => Duration::from_secs(u64::from(n)),
            },
            dtmf_to_model: s.dtmf_to_model,
            voicemail: s.voicemail.and_then(|v| v.message),
        }
    }

    /// The standalone agent from the relay's configuration.
    pub fn standalone(config: &Config) -> Self {
        Self {
            agent_id: String::new(),
            model: config.agent_model.clone(),
            voice: config.agent_voice.clone(),
            instructions: config.agent_instructions.clone(),
            greeting: config.agent_greeting.clone().unwrap_or_default(),
            transcription_model: callbridge_proto::input_transcription_model(
                config
                    .agent_transcription_model
                    .as_deref()
                    .unwrap_or_default(),
            )
            .unwrap_or_default()
            .to_owned(),
            turn_detection: standalone_turn_detection(config),
            dtmf_to_model: config.agent_dtmf_to_model,
            end_call: config.agent_end_call,
            max_duration: DEFAULT_MAX_DURATION,
            ..Self::default()
        }
    }

    /// Whether the caller's speech should cut the assistant off (agent's
    /// `interrupt_response`, default true).
    pub fn barge_in_enabled(&self) -> bool {
        self.turn_detection
            .as_ref()
            .and_then(|t| t.interrupt_response)
            .unwrap_or(true)
    }

    /// Turn detection is off: the relay ends the caller's turns (`call::turn_commit`).
    pub fn turn_detection_off(&self) -> bool {
        self.turn_detection
            .as_ref()
            .is_some_and(|t| t.r#type == pb::turn_detection::Type::None as i32)
    }

    /// With turn detection off: the silence after speech that ends a caller's turn.
    pub fn silence_commit_ms(&self) -> Option<u32> {
        self.turn_detection
            .as_ref()
            .filter(|_| self.turn_detection_off())
            .and_then(|t| t.silence_commit_ms)
    }

    /// Whether the caller's words are transcribed (`conversation.item.input_audio_transcription.*`
    /// events come).
    pub fn transcribes(&self) -> bool {
        !self.transcription_model.is_empty()
    }

    /// The Realtime URL for this agent: `?model=`, the one query parameter the GA
    /// WebSocket documents for a new session (nothing else: an undocumented parameter is
    /// at best ignored).
    pub fn url(&self, base: &str) -> String {
        format!("{base}?model={}", url_component(&self.model))
    }
}

/// `None` (server VAD defaults) unless the relay's configuration asks for another mode.
fn standalone_turn_detection(config: &Config) -> Option<pb::TurnDetection> {
    use pb::turn_detection::Type;
    let r#type = match config.agent_turn_detection {
        TurnDetectionMode::ServerVad => return None,
        TurnDetectionMode::SemanticVad => Type::SemanticVad,
        TurnDetectionMode::None => Type::None,
    };
    Some(pb::TurnDetection {
        r#type: r#type as i32,
        silence_commit_ms: config.agent_silence_commit_ms,
        ..pb::TurnDetection::default()
    })
}

fn non_empty(s: String, default: &str) -> String {
    if s.is_empty() { default.to_owned() } else { s }
}

fn url_component(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

//! The scripted conversation shared by the fake model and the simulated caller.
//!
//! Both sides read the same script: the caller knows what to "say" (a tone of the given
//! length) and how much agent audio to wait for; the fake model knows what the caller said
//! (it "transcribes" the n-th speech segment as the n-th turn's text) and what to answer.
//! Loadable from JSON so the binaries can take a script file.

use serde::{Deserialize, Serialize};

/// A whole call: an optional greeting, then turns.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Conversation {
    /// What the agent says first when the relay asks for a response with no caller turn.
    #[serde(default)]
    pub greeting: Option<AgentReply>,
    /// The caller/agent exchanges, in order.
    #[serde(default)]
    pub turns: Vec<Turn>,
}

/// One caller line and the agent's answer to it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Turn {
    /// What the caller says.
    pub caller: CallerLine,
    /// What the agent answers.
    pub agent: AgentReply,
    /// Barge-in: the caller starts the NEXT turn's line after hearing this many ms of
    /// this turn's answer, instead of waiting for the answer to finish.
    #[serde(default)]
    pub barge_in_after_ms: Option<u32>,
    /// A DTMF digit the caller presses before speaking this turn.
    #[serde(default)]
    pub dtmf_before: Option<String>,
}

/// What the caller says: the text the fake "transcribes" and how long the speech lasts.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CallerLine {
    pub text: String,
    #[serde(default = "default_speech_ms")]
    pub speech_ms: u32,
}

/// What the agent answers: spoken audio with its transcript, then optionally a function
/// call in the same response.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AgentReply {
    #[serde(default)]
    pub text: String,
    /// Milliseconds of audio for `text`; 0 means no spoken part.
    #[serde(default)]
    pub audio_ms: u32,
    /// A function call emitted after the spoken part.
    #[serde(default)]
    pub function_call: Option<FunctionCall>,
    /// What the agent says once the function's output came back and the client asked for
    /// a response.
    #[serde(default)]
    pub after_output: Option<Box<AgentReply>>,
}

/// A function call the model makes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FunctionCall {
    pub name: String,
    /// JSON text of the arguments.
    #[serde(default = "empty_object")]
    pub arguments: String,
}

fn default_speech_ms() -> u32 {
    600
}

fn empty_object() -> String {
    "{}".to_owned()
}

impl AgentReply {
    /// A spoken answer.
    pub fn says(text: impl Into<String>, audio_ms: u32) -> Self {
        Self {
            text: text.into(),
            audio_ms,
            ..Self::default()
        }
    }

    /// Adds a function call after the spoken part.
    pub fn then_calls(mut self, name: impl Into<String>, arguments: impl Into<String>) -> Self {
        self.function_call = Some(FunctionCall {
            name: name.into(),
            arguments: arguments.into(),
        });
        self
    }

    /// What is said after the function output came back.
    pub fn after_output(mut self, reply: AgentReply) -> Self {
        self.after_output = Some(Box::new(reply));
        self
    }

    /// Milliseconds of agent audio this reply produces in total, including what follows a
    /// function call (what a caller who hears everything hears).
    pub fn total_audio_ms(&self) -> u32 {
        self.audio_ms + self.after_output.as_ref().map_or(0, |r| r.total_audio_ms())
    }
}

impl Turn {
    /// The caller says `text` for `speech_ms`, the agent answers `reply`.
    pub fn new(text: impl Into<String>, speech_ms: u32, reply: AgentReply) -> Self {
        Self {
            caller: CallerLine {
                text: text.into(),
                speech_ms,
            },
            agent: reply,
            barge_in_after_ms: None,
            dtmf_before: None,
        }
    }

    /// The caller interrupts this turn's answer after hearing `ms` of it.
    pub fn barge_in_after(mut self, ms: u32) -> Self {
        self.barge_in_after_ms = Some(ms);
        self
    }
}

impl Conversation {
    /// Parses a script from JSON.
    pub fn from_json(text: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(text)
    }

    /// A short call: a greeting and two exchanges.
    pub fn sample() -> Self {
        Self {
            greeting: Some(AgentReply::says(
                "Hello, thanks for calling. How can I help?",
                800,
            )),
            turns: vec![
                Turn::new(
                    "What are your opening hours?",
                    600,
                    AgentReply::says("We are open nine to five, Monday to Friday.", 1000),
                ),
                Turn::new(
                    "Thank you, goodbye.",
                    500,
                    AgentReply::says("Goodbye, have a nice day.", 600),
                ),
            ],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_from_json_with_defaults() {
        let conv = Conversation::from_json(
            r#"{"greeting":{"text":"Hi","audio_ms":300},
                "turns":[{"caller":{"text":"Hello"},"agent":{"text":"Yes?","audio_ms":200},
                          "barge_in_after_ms":100},
                         {"caller":{"text":"Bye","speech_ms":300},
                          "agent":{"function_call":{"name":"end_call"}}}]}"#,
        )
        .expect("valid script");
        assert_eq!(conv.turns.len(), 2);
        assert_eq!(conv.turns[0].caller.speech_ms, 600);
        assert_eq!(conv.turns[0].barge_in_after_ms, Some(100));
        let call = conv.turns[1].agent.function_call.as_ref().expect("call");
        assert_eq!(call.arguments, "{}");
        assert_eq!(conv.greeting.map(|g| g.audio_ms), Some(300));
    }

    #[test]
    fn json_round_trip() {
        let conv = Conversation::sample();
        let text = serde_json::to_string(&conv).expect("serialises");
        assert_eq!(Conversation::from_json(&text).expect("parses"), conv);
    }

    #[test]
    fn total_audio_includes_the_answer_after_a_tool() {
        let r = AgentReply::says("One moment", 300)
            .then_calls("lookup", "{}")
            .after_output(AgentReply::says("Found it", 500));
        assert_eq!(r.total_audio_ms(), 800);
    }
}

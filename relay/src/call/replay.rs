//! The conversation so far, kept so a new model session can be told what was said
//! (model reconnect, session rollover, a call resumed on another relay).
//!
//! Replayed as `conversation.item.create` items (`docs/protocols.md`, "OpenAI Realtime"): caller
//! turns as user `input_text` messages, assistant turns as assistant `output_text` messages cut to
//! what the caller heard, tool calls and results as `function_call` + `function_call_output`.
//! Bounded: the oldest turns go first once [`MAX_ITEMS`] or [`MAX_BYTES`] is reached.

use std::collections::VecDeque;

use callbridge_proto::pb;
use serde_json::json;

/// Turns kept for a replay.
pub const MAX_ITEMS: usize = 256;
/// Text kept for a replay (bytes).
pub const MAX_BYTES: usize = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Entry {
    User(String),
    Assistant(String),
    Call {
        tool_call_id: String,
        name: String,
        arguments: String,
    },
    Output {
        tool_call_id: String,
        output: String,
    },
}

impl Entry {
    fn size(&self) -> usize {
        match self {
            Entry::User(t) | Entry::Assistant(t) => t.len(),
            Entry::Call {
                tool_call_id,
                name,
                arguments,
            } => tool_call_id.len() + name.len() + arguments.len(),
            Entry::Output {
                tool_call_id,
                output,
            } => tool_call_id.len() + output.len(),
        }
    }
}

/// What a new model session must be told.
#[derive(Debug, Default)]
pub struct Replay {
    entries: VecDeque<Entry>,
    bytes: usize,
}

impl Replay {
    /// From the turns control stored (a call resumed on this relay).
    pub fn from_history(turns: Vec<pb::Turn>) -> Self {
        let mut r = Self::default();
        for t in turns {
            match t.kind {
                Some(pb::turn::Kind::Caller(c)) => r.push(Entry::User(c.text)),
                Some(pb::turn::Kind::Assistant(a)) => r.push_assistant(&a),
                Some(pb::turn::Kind::ToolCall(c)) => r.push_call(c),
                Some(pb::turn::Kind::ToolResult(o)) => r.push_output(o),
                Some(pb::turn::Kind::Dtmf(_)) | None => {}
            }
        }
        r
    }

    /// Notes an event of this call, if it is part of the conversation.
    pub fn record(&mut self, kind: &pb::call_event::Kind) {
        use pb::call_event::Kind;
        match kind {
            Kind::Caller(c) => self.push(Entry::User(c.text.clone())),
            Kind::Assistant(a) => self.push_assistant(a),
            Kind::ToolCall(c) => self.push_call(c.clone()),
            Kind::ToolResult(o) => self.push_output(o.clone()),
            _ => {}
        }
    }

    /// Nothing to replay.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Turns kept.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    fn push_assistant(&mut self, a: &pb::AssistantSpeech) {
        let text = if a.interrupted {
            heard_text(&a.text, a.heard_ms, a.audio_ms)
        } else {
            a.text.clone()
        };
        if !text.is_empty() {
            self.push(Entry::Assistant(text));
        }
    }

    fn push_call(&mut self, c: pb::ToolCall) {
        self.push(Entry::Call {
            tool_call_id: c.tool_call_id,
            name: c.name,
            arguments: c.arguments_json,
        });
    }

    fn push_output(&mut self, o: pb::ToolResult) {
        self.push(Entry::Output {
            tool_call_id: o.tool_call_id,
            output: o.output,
        });
    }

    fn push(&mut self, e: Entry) {
        if matches!(&e, Entry::User(t) | Entry::Assistant(t) if t.trim().is_empty()) {
            return;
        }
        self.bytes += e.size();
        self.entries.push_back(e);
        while self.entries.len() > MAX_ITEMS || self.bytes > MAX_BYTES {
            match self.entries.pop_front() {
                Some(old) => self.bytes -= old.size(),
                None => break,
            }
        }
    }

    /// The `conversation.item.create` events, oldest first. A result whose call is no
    /// longer kept is left out (the model refuses an output for an unknown call).
    pub fn items(&self) -> Vec<String> {
        let mut calls: Vec<&str> = Vec::new();
        let mut out = Vec::with_capacity(self.entries.len());
        for e in &self.entries {
            let item = match e {
                Entry::User(text) => json!({"type": "message", "role": "user",
                    "content": [{"type": "input_text", "text": text}]}),
                Entry::Assistant(text) => json!({"type": "message", "role": "assistant",
                    "content": [{"type": "output_text", "text": text}]}),
                Entry::Call {
                    tool_call_id,
                    name,
                    arguments,
                } => {
                    calls.push(tool_call_id);
                    json!({"type": "function_call", "call_id": tool_call_id, "name": name,
                        "arguments": arguments})
                }
                Entry::Output {
                    tool_call_id,
                    output,
                } => {
                    if !calls.contains(&tool_call_id.as_str()) {
                        continue;
                    }
                    json!({"type": "function_call_output", "call_id": tool_call_id,
                        "output": output})
                }
            };
            out.push(json!({"type": "conversation.item.create", "item": item}).to_string());
        }
        out
    }
}

/// The part of `text` the caller heard: the share `heard_ms / audio_ms` of it, cut back
/// to a word boundary. Speech is close enough to evenly paced for a replay.
pub fn heard_text(text: &str, heard_ms: u32, audio_ms: u32) -> String {
    if audio_ms == 0 || heard_ms >= audio_ms {
        return text.to_owned();
    }
    let chars = text.chars().count();
    let keep = (chars as u64 * u64::from(heard_ms) / u64::from(audio_ms)) as usize;
    let cut: String = text.chars().take(keep).collect();
    if keep >= chars {
        return cut;
    }
    // Mid-word: drop the partial word.
    match cut.rfind(char::is_whitespace) {
        Some(i) => cut[..i].trim_end().to_owned(),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn parsed(r: &Replay) -> Vec<Value> {
        r.items()
            .iter()
            .map(|s| serde_json::from_str::<Value>(s).expect("json"))
            .map(|v| {
                assert_eq!(v["type"], "conversation.item.create");
                v["item"].clone()
            })
            .collect()
    }

    #[test]
    fn history_becomes_typed_items_in_order() {
        let turns = vec![
            pb::Turn {
                kind: Some(pb::turn::Kind::Assistant(pb::AssistantSpeech {
                    text: "Hello there".into(),
                    ..Default::default()
                })),
                ..Default::default()
            },
            pb::Turn {
                kind: Some(pb::turn::Kind::Caller(pb::CallerSpeech {
                    item_id: "i1".into(),
                    text: "Book a table".into(),
                })),
                ..Default::default()
            },
            pb::Turn {
                kind: Some(pb::turn::Kind::ToolCall(pb::ToolCall {
                    tool_call_id: "c1".into(),
                    name: "book".into(),
                    arguments_json: "{}".into(),
                    builtin: false,
                })),
                ..Default::default()
            },
            pb::Turn {
                kind: Some(pb::turn::Kind::ToolResult(pb::ToolResult {
                    tool_call_id: "c1".into(),
                    output: "ok".into(),
                    is_error: false,
                })),
                ..Default::default()
            },
            pb::Turn {
                kind: Some(pb::turn::Kind::Dtmf(pb::Dtmf { digit: "1".into() })),
                ..Default::default()
            },
        ];
        let items = parsed(&Replay::from_history(turns));
        assert_eq!(items.len(), 4);
        assert_eq!(items[0]["role"], "assistant");
        assert_eq!(items[0]["content"][0]["type"], "output_text");
        assert_eq!(items[0]["content"][0]["text"], "Hello there");
        assert_eq!(items[1]["role"], "user");
        assert_eq!(items[1]["content"][0]["type"], "input_text");
        assert_eq!(items[1]["content"][0]["text"], "Book a table");
        assert_eq!(items[2]["type"], "function_call");
        assert_eq!(items[2]["call_id"], "c1");
        assert_eq!(items[3]["type"], "function_call_output");
        assert_eq!(items[3]["output"], "ok");
    }

    #[test]
    fn interrupted_speech_is_cut_to_what_was_heard() {
        assert_eq!(heard_text("one two three four", 500, 1000), "one two");
        assert_eq!(heard_text("one two three four", 0, 1000), "");
        assert_eq!(heard_text("one two", 1000, 1000), "one two");
        assert_eq!(heard_text("one two", 10, 0), "one two");
        let mut r = Replay::default();
        r.record(&pb::call_event::Kind::Assistant(pb::AssistantSpeech {
            text: "one two three four".into(),
            interrupted: true,
            heard_ms: 500,
            audio_ms: 1000,
            ..Default::default()
        }));
        assert_eq!(parsed(&r)[0]["content"][0]["text"], "one two");
    }

    #[test]
    fn bounded_and_never_an_orphan_result() {
        let mut r = Replay::default();
        r.record(&pb::call_event::Kind::ToolCall(pb::ToolCall {
            tool_call_id: "c0".into(),
            name: "t".into(),
            ..Default::default()
        }));
        r.record(&pb::call_event::Kind::ToolResult(pb::ToolResult {
            tool_call_id: "c0".into(),
            output: "x".into(),
            is_error: false,
        }));
        for n in 0..MAX_ITEMS {
            r.record(&pb::call_event::Kind::Caller(pb::CallerSpeech {
                item_id: String::new(),
                text: format!("line {n}"),
            }));
        }
        assert_eq!(r.len(), MAX_ITEMS);
        let items = parsed(&r);
        assert!(
            items.iter().all(|i| i["type"] == "message"),
            "call and result aged out"
        );
        assert_eq!(items[0]["content"][0]["text"], "line 0");
        let mut big = Replay::default();
        for _ in 0..10 {
            big.record(&pb::call_event::Kind::Caller(pb::CallerSpeech {
                item_id: String::new(),
                text: "x".repeat(MAX_BYTES / 4),
            }));
        }
        assert!(big.len() <= 4, "{}", big.len());
    }
}

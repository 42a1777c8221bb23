//! Tool calls: what the model asked for (built-in `end_call` / `transfer_call`, an
//! application tool, or an unknown one), and the application tool calls awaiting a result,
//! each with its deadline. Pure: every method takes `now` or returns what to answer.

use tokio::time::Instant;

use crate::agent::AgentView;
use crate::realtime;

/// Application tool calls awaiting a result at once.
pub const MAX_PENDING_TOOLS: usize = 16;

/// What a function call from the model is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolCall {
    /// The built-in hang-up, with its reason.
    EndCall {
        /// Why (the model's words, or a default).
        reason: String,
    },
    /// The built-in transfer to an allowed number.
    Transfer {
        /// The number.
        number: String,
    },
    /// The built-in transfer to a number not on the allow-list.
    TransferRefused,
    /// One of the agent's application tools.
    App,
    /// A name the agent does not have.
    Unknown,
}

impl ToolCall {
    /// Classifies a call of `name` with `args` (JSON text) for `agent`.
    pub fn classify(agent: &AgentView, name: &str, args: &str) -> Self {
        if name == realtime::TOOL_END_CALL && agent.end_call {
            let reason =
                json_str(args, "reason").unwrap_or_else(|| "agent ended the call".to_owned());
            return Self::EndCall { reason };
        }
        if name == realtime::TOOL_TRANSFER_CALL && agent.transfer_call {
            let number = json_str(args, "number").unwrap_or_default();
            if agent.transfer_numbers.contains(&number) {
                return Self::Transfer { number };
            }
            return Self::TransferRefused;
        }
        if agent.tools.iter().any(|t| t.name == name) {
            Self::App
        } else {
            Self::Unknown
        }
    }

    /// Whether it is a built-in tool (reported as such to the application).
    pub fn builtin(&self) -> bool {
        matches!(
            self,
            Self::EndCall { .. } | Self::Transfer { .. } | Self::TransferRefused
        )
    }
}

fn json_str(args: &str, key: &str) -> Option<String> {
    serde_json::from_str::<serde_json::Value>(args)
        .ok()?
        .get(key)?
        .as_str()
        .map(str::to_owned)
}

/// The application tool is not available now.
#[derive(Debug, PartialEq, Eq)]
pub struct Unavailable;

/// Application tool calls awaiting their result.
#[derive(Debug, Default)]
pub struct PendingTools {
    calls: Vec<(String, Instant)>,
}

impl PendingTools {
    /// Waits for `call_id`'s result until `deadline`; refused when too many wait.
    pub fn add(&mut self, call_id: String, deadline: Instant) -> Result<(), Unavailable> {
        if self.calls.len() >= MAX_PENDING_TOOLS {
            return Err(Unavailable);
        }
        self.calls.push((call_id, deadline));
        Ok(())
    }

    /// A result came: whether `call_id` was waiting for it.
    pub fn resolve(&mut self, call_id: &str) -> bool {
        let before = self.calls.len();
        self.calls.retain(|(id, _)| id != call_id);
        self.calls.len() != before
    }

    /// The calls whose deadline passed at `now` (no longer waiting).
    pub fn expired(&mut self, now: Instant) -> Vec<String> {
        if !self.calls.iter().any(|(_, d)| now >= *d) {
            return Vec::new();
        }
        let (gone, kept) = std::mem::take(&mut self.calls)
            .into_iter()
            .partition(|(_, d)| now >= *d);
        self.calls = kept;
        gone.into_iter().map(|(id, _)| id).collect()
    }

    /// The earliest deadline.
    pub fn next(&self) -> Option<Instant> {
        self.calls.iter().map(|(_, d)| *d).min()
    }

    /// Every waiting call (the call is over).
    pub fn take_all(&mut self) -> Vec<String> {
        std::mem::take(&mut self.calls)
            .into_iter()
            .map(|(id, _)| id)
            .collect()
    }

    /// No call waits.
    pub fn is_empty(&self) -> bool {
        self.calls.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use callbridge_proto::pb;

    use super::*;

    fn agent() -> AgentView {
        AgentView {
            end_call: true,
            transfer_call: true,
            transfer_numbers: vec!["+15550001".into()],
            tools: vec![pb::Tool {
                name: "lookup".into(),
                ..Default::default()
            }],
            ..AgentView::default()
        }
    }

    #[test]
    fn classifies_builtins_app_tools_and_unknown_names() {
        let a = agent();
        assert_eq!(
            ToolCall::classify(&a, "end_call", r#"{"reason":"done"}"#),
            ToolCall::EndCall {
                reason: "done".into()
            }
        );
        assert_eq!(
            ToolCall::classify(&a, "end_call", "not json"),
            ToolCall::EndCall {
                reason: "agent ended the call".into()
            }
        );
        assert_eq!(
            ToolCall::classify(&a, "transfer_call", r#"{"number":"+15550001"}"#),
            ToolCall::Transfer {
                number: "+15550001".into()
            }
        );
        let refused = ToolCall::classify(&a, "transfer_call", r#"{"number":"+1999"}"#);
        assert_eq!(refused, ToolCall::TransferRefused);
        assert!(refused.builtin());
        assert_eq!(ToolCall::classify(&a, "lookup", "{}"), ToolCall::App);
        assert!(!ToolCall::App.builtin());
        assert_eq!(ToolCall::classify(&a, "nope", "{}"), ToolCall::Unknown);
        // A built-in the agent does not have is just a name.
        let plain = AgentView::default();
        assert_eq!(
            ToolCall::classify(&plain, "end_call", "{}"),
            ToolCall::Unknown
        );
    }

    #[test]
    fn pending_tools_resolve_expire_and_are_bounded() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut p = PendingTools::default();
        assert_eq!(p.next(), None);
        p.add("a".into(), t0 + 10 * s).unwrap();
        p.add("b".into(), t0 + 5 * s).unwrap();
        assert_eq!(p.next(), Some(t0 + 5 * s));
        assert!(p.expired(t0 + 4 * s).is_empty());
        assert_eq!(p.expired(t0 + 5 * s), ["b"]);
        assert!(!p.resolve("b"), "expired: no longer waiting");
        assert!(p.resolve("a"));
        assert!(p.is_empty());
        for i in 0..MAX_PENDING_TOOLS {
            p.add(i.to_string(), t0 + s).unwrap();
        }
        assert_eq!(p.add("x".into(), t0 + s), Err(Unavailable));
        assert_eq!(p.take_all().len(), MAX_PENDING_TOOLS);
        assert!(p.is_empty());
    }
}

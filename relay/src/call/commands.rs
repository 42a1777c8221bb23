//! Tool calls from the model and commands from the application (through control): what
//! the call loop does with them. What a tool call is, and which wait, is [`super::tools`].

use callbridge_proto::pb;
use tokio::time::Instant;
use tracing::debug;

use super::Call;
use super::phase::Ending;
use super::tools::ToolCall;
use super::turn_commit::TurnCommit;
use crate::error::EndKind;
use crate::realtime;

impl Call {
    /// A tool result goes to the model, which is then asked to speak about it.
    pub(super) fn tool_output(
        &mut self,
        call_id: &str,
        output: &str,
        is_error: bool,
        now: Instant,
    ) {
        self.send_model(
            "conversation.item.create",
            &realtime::function_output(call_id, output),
        );
        // The model does not speak about a tool result until asked (pitfall 19).
        self.request_answer(now);
        self.event(pb::call_event::Kind::ToolResult(pb::ToolResult {
            tool_call_id: call_id.to_owned(),
            output: output.to_owned(),
            is_error,
        }));
    }

    /// A built-in tool's result, reported to the application only (the model is not
    /// asked to speak: the call is ending).
    fn builtin_result(&mut self, call_id: String, output: &str) {
        self.event(pb::call_event::Kind::ToolResult(pb::ToolResult {
            tool_call_id: call_id,
            output: output.to_owned(),
            is_error: false,
        }));
    }

    pub(super) fn on_tool_call(
        &mut self,
        call_id: String,
        name: String,
        args: String,
        now: Instant,
    ) {
        let call = ToolCall::classify(&self.agent, &name, &args);
        self.event(pb::call_event::Kind::ToolCall(pb::ToolCall {
            tool_call_id: call_id.clone(),
            name,
            arguments_json: args,
            builtin: call.builtin(),
        }));
        match call {
            ToolCall::EndCall { reason } => {
                let ending = Ending::new(EndKind::AgentHangup.reason(), reason);
                self.end_after_playback(EndKind::AgentHangup, ending, now);
                self.builtin_result(call_id, "the call ends after the goodbye");
            }
            ToolCall::Transfer { number } => {
                let ending = Ending {
                    reason: EndKind::AgentTransfer.reason(),
                    detail: "agent transferred the call".to_owned(),
                    transfer_to: number,
                };
                self.end_after_playback(EndKind::AgentTransfer, ending, now);
                self.builtin_result(call_id, "transferring");
            }
            ToolCall::TransferRefused => self.tool_output(
                &call_id,
                r#"{"error":"that number is not an allowed transfer target"}"#,
                true,
                now,
            ),
            ToolCall::Unknown => {
                self.tool_output(&call_id, r#"{"error":"unknown tool"}"#, true, now);
            }
            ToolCall::App => {
                let deadline = now + self.deps.config.tool_timeout();
                if self.link_tx.is_none() || self.tools.add(call_id.clone(), deadline).is_err() {
                    self.tool_output(
                        &call_id,
                        r#"{"error":"the tool is not available now"}"#,
                        true,
                        now,
                    );
                }
            }
        }
    }

    pub(super) fn on_command(&mut self, cmd: pb::Command, now: Instant) {
        use pb::command::Kind;
        let Some(kind) = cmd.kind else {
            debug!("Empty command ignored.");
            return;
        };
        let applied = match kind {
            Kind::Say(s) => self.say(&s.text, now),
            Kind::Hangup(h) => {
                let detail = if h.reason.is_empty() {
                    "application hung up".to_owned()
                } else {
                    h.reason
                };
                self.end(EndKind::AppHangup, detail);
                true
            }
            Kind::Transfer(t) => self.app_transfer(t.number),
            Kind::ToolResult(r) => self.app_tool_result(r, now),
            Kind::CommitInput(_) => self.commit_input(now),
            Kind::AnsweringMachine(m) => self.on_answered_by(m.answered_by, now),
            Kind::UpdateInstructions(u) => {
                self.agent.instructions = u.instructions;
                let update = realtime::update_instructions(&self.agent.instructions);
                self.send_model("session.update", &update);
                true
            }
        };
        if applied {
            self.event(pb::call_event::Kind::CommandApplied(pb::CommandApplied {
                command_id: cmd.command_id,
            }));
        }
    }

    fn say(&mut self, text: &str, now: Instant) -> bool {
        if text.trim().is_empty() {
            return false;
        }
        let text = format!("Say this to the caller now: \"{text}\"");
        self.send_model("conversation.item.create", &realtime::system_text(&text));
        self.request_answer(now);
        true
    }

    /// The application ends the caller's turn (turn detection off).
    fn commit_input(&mut self, now: Instant) -> bool {
        if !self
            .turn_commit
            .as_ref()
            .is_some_and(TurnCommit::can_commit)
        {
            debug!("Commit command with turn detection on, or nothing to commit: not applied.");
            return false;
        }
        self.commit_turn(now);
        true
    }

    /// Commits the caller's audio as a turn and asks for the answer.
    pub(super) fn commit_turn(&mut self, now: Instant) {
        if let Some(t) = &mut self.turn_commit {
            t.committed();
        }
        self.send_model("input_audio_buffer.commit", &realtime::commit());
        self.answer_caller(now);
    }

    fn app_transfer(&mut self, number: String) -> bool {
        if number.trim().is_empty() {
            return false;
        }
        let ending = Ending {
            reason: EndKind::AppTransfer.reason(),
            detail: "application transferred the call".to_owned(),
            transfer_to: number,
        };
        self.end_with(EndKind::AppTransfer, ending);
        true
    }

    fn app_tool_result(&mut self, r: pb::ToolResult, now: Instant) -> bool {
        if !self.tools.resolve(&r.tool_call_id) {
            debug!(tool_call_id = %r.tool_call_id, "Tool result for no pending call ignored.");
            return false;
        }
        self.tool_output(&r.tool_call_id, &r.output, r.is_error, now);
        true
    }
}

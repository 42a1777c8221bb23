//! Twilio's answering-machine verdict on a call: what the agent does with it (its
//! `voicemail` setting), and the call loop's side of doing it.
//!
//! The verdict comes from control, as a command (Twilio's async AMD callback reached a
//! relay while the stream was live) or in the call's context (it arrived before the stream
//! attached). Either way it is acted on once per stream, and only after Twilio's `start`:
//! before that there is no model turn to speak with and no stream to end.

use callbridge_proto::pb;
use pb::answering_machine::Action;
use pb::voicemail::Message;
use tokio::time::Instant;
use tracing::info;

use super::Call;
use super::phase::Ending;
use crate::error::EndKind;
use crate::realtime;

/// What an agent does on `answered_by`, given its voicemail (`None`: no message).
///
/// A message needs the machine's greeting to be over: only the `machine_end_*` verdicts
/// (Twilio's `DetectMessageEnd`) leave it. `machine_start` comes while the greeting still
/// plays (Twilio's `Enable`), and a fax hears no words: both hang up. A person, or a
/// verdict Twilio could not reach (`unknown`) or does not document, goes on as a call.
pub fn decide(answered_by: &str, voicemail: Option<&Message>) -> Action {
    match answered_by {
        "machine_end_beep" | "machine_end_silence" | "machine_end_other" => match voicemail {
            Some(_) => Action::LeaveMessage,
            None => Action::HangUp,
        },
        "machine_start" | "fax" => Action::HangUp,
        _ => Action::Proceed,
    }
}

/// Where a call is with its verdict.
#[derive(Debug, Default)]
pub(super) enum Verdict {
    /// None yet.
    #[default]
    Unknown,
    /// Known before Twilio's `start`: acted on then. `reported`: a verdict that an earlier
    /// stream of the call already reported, and that changes nothing, is not reported again.
    Waiting { answered_by: String, reported: bool },
    /// Acted on; later ones are ignored.
    Applied,
    /// Acted on, and the model is leaving the message: the call ends once it was played
    /// (not while it is still only asked for).
    Leaving,
}

impl Verdict {
    /// A verdict from the call's context (`Call.answered_by`) on a stream that is
    /// `resumed` or not.
    pub(super) fn from_context(answered_by: &str, resumed: bool) -> Self {
        if answered_by.is_empty() {
            Self::Unknown
        } else {
            Self::Waiting {
                answered_by: answered_by.to_owned(),
                reported: resumed,
            }
        }
    }
}

impl Call {
    /// A verdict arrived as a command. Whether it was applied (or kept for `start`).
    pub(super) fn on_answered_by(&mut self, answered_by: String, now: Instant) -> bool {
        if matches!(self.verdict, Verdict::Applied | Verdict::Leaving)
            || self.life.ending().is_some()
            || self.life.has_pending()
        {
            return false;
        }
        self.verdict = Verdict::Waiting {
            answered_by,
            reported: false,
        };
        if self.stream_sid.is_some() {
            self.apply_verdict(now);
        }
        true
    }

    /// Acts on a waiting verdict. Whether the opening turn is taken care of (the greeting
    /// is not said: the call ends, or the message is left instead).
    pub(super) fn apply_verdict(&mut self, now: Instant) -> bool {
        let (answered_by, reported) = match std::mem::replace(&mut self.verdict, Verdict::Applied) {
            Verdict::Waiting {
                answered_by,
                reported,
            } => (answered_by, reported),
            other => {
                self.verdict = other;
                return false;
            }
        };
        let action = decide(&answered_by, self.agent.voicemail.as_ref());
        info!(%answered_by, ?action, "Answering-machine verdict.");
        if !(reported && action == Action::Proceed) {
            self.event(pb::call_event::Kind::AnsweringMachine(
                pb::AnsweringMachine {
                    answered_by: answered_by.clone(),
                    action: action as i32,
                },
            ));
        }
        match action {
            Action::Proceed | Action::Unspecified => false,
            Action::HangUp => {
                self.end(
                    EndKind::AnsweringMachine,
                    format!("answered by a machine ({answered_by})"),
                );
                true
            }
            Action::LeaveMessage => {
                self.leave_message(&answered_by, now);
                true
            }
        }
    }

    /// The agent's voicemail: spoken by the model, then the call ends once it was played;
    /// or said or played by Twilio after the stream (control answers the action request
    /// with it), so the stream ends now.
    fn leave_message(&mut self, answered_by: &str, now: Instant) {
        let detail = format!("voicemail left ({answered_by})");
        let Some(Message::SpokenText(text)) = self.agent.voicemail.clone() else {
            self.end(EndKind::VoicemailLeft, detail);
            return;
        };
        // The machine records from its beep: whatever the agent was saying stops, and the
        // message starts clean (a response still running is cancelled first).
        let responding = self.playback.responding();
        let outs = self.playback.speech_started(now);
        let cancelled = responding && !self.playback.responding();
        if cancelled {
            self.send_model("response.cancel", &realtime::response_cancel());
        }
        self.apply(outs);
        let text = format!("Leave this voicemail message now, saying exactly: \"{text}\"");
        self.send_model("conversation.item.create", &realtime::system_text(&text));
        if cancelled {
            // The model takes no new response while the cancelled one is still winding
            // down: the message is asked for at its `response.done`.
            self.answer_after_response = true;
        } else {
            self.answer_caller(now);
        }
        self.verdict = Verdict::Leaving;
        let ending = Ending::new(EndKind::VoicemailLeft.reason(), detail);
        self.end_after_playback(EndKind::VoicemailLeft, ending, now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_waits_for_the_greeting_end_and_people_go_on() {
        let spoken = Message::SpokenText("Please call us back.".into());
        for v in [
            "machine_end_beep",
            "machine_end_silence",
            "machine_end_other",
        ] {
            assert_eq!(decide(v, Some(&spoken)), Action::LeaveMessage, "{v}");
            assert_eq!(decide(v, None), Action::HangUp, "{v}");
        }
        for v in ["machine_start", "fax"] {
            assert_eq!(decide(v, Some(&spoken)), Action::HangUp, "{v}");
            assert_eq!(decide(v, None), Action::HangUp, "{v}");
        }
        for v in ["human", "unknown", "something_new"] {
            assert_eq!(decide(v, Some(&spoken)), Action::Proceed, "{v}");
        }
    }

    #[test]
    fn a_context_verdict_on_a_resumed_stream_was_reported_already() {
        assert!(matches!(Verdict::from_context("", false), Verdict::Unknown));
        assert!(matches!(
            Verdict::from_context("human", true),
            Verdict::Waiting { reported: true, .. }
        ));
        assert!(matches!(
            Verdict::from_context("machine_end_beep", false),
            Verdict::Waiting {
                reported: false,
                ..
            }
        ));
    }
}

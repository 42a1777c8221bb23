//! Errors on a call's path, each naming the side that failed, and how a call ended.
//!
//! [`TwilioError`] and [`RealtimeError`] are what the call loop learns from its two peers;
//! [`crate::control::ControlError`] is what it learns from control. [`EndKind`] is the end
//! of a call as metrics and logs see it: finer than the contract's [`EndReason`] (a caller
//! who hung up and a socket write that failed are both `CALLER_HANGUP` to control), with
//! the side that caused it and whether that was a normal way for a call to end.

use callbridge_proto::pb::EndReason;
use tokio_tungstenite::tungstenite;

pub use crate::control::ControlError;

/// The Twilio Media Stream failed.
#[derive(Debug, thiserror::Error)]
pub enum TwilioError {
    /// Reads kept failing (oversized or malformed frames, a broken connection).
    #[error("caller socket failed: {0}")]
    Read(#[source] tungstenite::Error),
    /// A write failed: nothing more reaches the caller.
    #[error("caller socket write failed: {0}")]
    Write(#[source] tungstenite::Error),
}

/// A Realtime (model) session failed or could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum RealtimeError {
    /// The configured URL is not a WebSocket request.
    #[error("bad model URL: {0}")]
    Url(#[source] tungstenite::Error),
    /// The API key cannot be sent as a header (the key itself is never in the message).
    #[error("API key is not a valid header value")]
    ApiKey,
    /// The WebSocket handshake failed.
    #[error("model connect failed: {0}")]
    Connect(#[source] tungstenite::Error),
    /// The handshake took longer than `RELAY_CONNECT_TIMEOUT_SECS`.
    #[error("model connect timed out")]
    ConnectTimeout,
    /// Sending the session setup failed.
    #[error("session setup failed: {0}")]
    Setup(#[source] tungstenite::Error),
    /// The dial task went away without an answer.
    #[error("model dial task ended")]
    DialTaskEnded,
    /// The socket ended without a close frame.
    #[error("model socket closed")]
    Gone,
    /// The model closed the socket without a close frame.
    #[error("model closed the socket")]
    ClosedWithoutFrame,
    /// The model closed the socket.
    #[error("model closed the socket ({code}: {reason})")]
    Closed {
        /// Close code.
        code: u16,
        /// Close reason.
        reason: String,
    },
    /// Reading failed.
    #[error("model socket failed: {0}")]
    Read(#[source] tungstenite::Error),
    /// Writing failed.
    #[error("model write failed: {0}")]
    Write(#[source] tungstenite::Error),
    /// The model said the session is over (an `error` of a fatal class).
    #[error("model ended the session: {code}: {message}")]
    Fatal {
        /// The error's code (or type).
        code: String,
        /// Its message.
        message: String,
    },
    /// An answer was due and nothing came.
    #[error("model stalled: nothing for {secs} s while an answer was due")]
    Stalled {
        /// `RELAY_MODEL_STALL_SECS`.
        secs: u64,
    },
}

/// Which side ended a call (or made it end).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// Twilio / the caller.
    Twilio,
    /// The Realtime model (the agent's tools included).
    Realtime,
    /// Control or the application behind it.
    Control,
    /// The relay itself: its limits, its drain, its own faults.
    Internal,
}

impl Side {
    /// Lowercase name for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Twilio => "twilio",
            Self::Realtime => "realtime",
            Self::Control => "control",
            Self::Internal => "internal",
        }
    }
}

/// How a call ended, as metrics and logs tell it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndKind {
    /// Twilio's `stop`, or the caller's socket closed.
    CallerHangup,
    /// A write to Twilio failed.
    TwilioWriteFailed,
    /// Reads from Twilio kept failing.
    TwilioReadFailed,
    /// No `start` from Twilio in time.
    StartTimeout,
    /// No media from Twilio in time.
    MediaTimeout,
    /// The agent's `end_call` tool.
    AgentHangup,
    /// The agent's `transfer_call` tool.
    AgentTransfer,
    /// The application's `Hangup` command.
    AppHangup,
    /// The application's `Transfer` command.
    AppTransfer,
    /// The agent's maximum duration.
    MaxDuration,
    /// No working model session.
    ModelUnavailable,
    /// The drain grace ran out.
    Drain,
    /// Handed off to another relay while draining.
    Handoff,
    /// A fault of the relay's own.
    InternalError,
    /// Answered by a machine, and the agent has no message for it.
    AnsweringMachine,
    /// Answered by a machine; the agent's voicemail was left.
    VoicemailLeft,
}

impl EndKind {
    /// The contract's reason, as control receives it.
    pub fn reason(self) -> EndReason {
        match self {
            Self::CallerHangup | Self::TwilioWriteFailed | Self::TwilioReadFailed => {
                EndReason::CallerHangup
            }
            Self::StartTimeout => EndReason::StartTimeout,
            Self::MediaTimeout => EndReason::MediaTimeout,
            Self::AgentHangup => EndReason::AgentHangup,
            Self::AgentTransfer | Self::AppTransfer => EndReason::Transferred,
            Self::AppHangup => EndReason::AppHangup,
            Self::MaxDuration => EndReason::MaxDuration,
            Self::ModelUnavailable => EndReason::ModelUnavailable,
            Self::Drain => EndReason::Drain,
            Self::Handoff => EndReason::Handoff,
            Self::InternalError => EndReason::InternalError,
            Self::AnsweringMachine => EndReason::AnsweringMachine,
            Self::VoicemailLeft => EndReason::VoicemailLeft,
        }
    }

    /// The side that ended the call.
    pub fn side(self) -> Side {
        match self {
            Self::CallerHangup
            | Self::TwilioWriteFailed
            | Self::TwilioReadFailed
            | Self::StartTimeout
            | Self::MediaTimeout => Side::Twilio,
            Self::AgentHangup | Self::AgentTransfer | Self::ModelUnavailable => Side::Realtime,
            // Twilio's detection says who answered; control hands its verdict on.
            Self::AppHangup | Self::AppTransfer | Self::AnsweringMachine | Self::VoicemailLeft => {
                Side::Control
            }
            Self::MaxDuration | Self::Drain | Self::Handoff | Self::InternalError => Side::Internal,
        }
    }

    /// Whether this is a way a healthy call ends (logged at info; the others at warn).
    pub fn is_normal(self) -> bool {
        !matches!(
            self,
            Self::TwilioWriteFailed
                | Self::TwilioReadFailed
                | Self::StartTimeout
                | Self::MediaTimeout
                | Self::ModelUnavailable
                | Self::Drain
                | Self::InternalError
        )
    }

    /// The `reason` label of `callbridge_relay_calls_total`. The contract's reasons keep
    /// their names; the Twilio failures that control sees as `CALLER_HANGUP` get their own.
    pub fn label(self) -> &'static str {
        match self {
            Self::TwilioWriteFailed => "twilio_write_failed",
            Self::TwilioReadFailed => "twilio_read_failed",
            other => reason_label(other.reason()),
        }
    }

    /// The kind a contract reason stands for when nothing finer is known.
    pub fn from_reason(reason: EndReason) -> Self {
        match reason {
            EndReason::CallerHangup => Self::CallerHangup,
            EndReason::AgentHangup => Self::AgentHangup,
            EndReason::AppHangup => Self::AppHangup,
            EndReason::Transferred => Self::AgentTransfer,
            EndReason::MaxDuration => Self::MaxDuration,
            EndReason::ModelUnavailable => Self::ModelUnavailable,
            EndReason::StartTimeout => Self::StartTimeout,
            EndReason::MediaTimeout => Self::MediaTimeout,
            EndReason::Drain => Self::Drain,
            EndReason::Handoff => Self::Handoff,
            EndReason::AnsweringMachine => Self::AnsweringMachine,
            EndReason::VoicemailLeft => Self::VoicemailLeft,
            // The DIAL_* reasons are control's, for calls that never reached a relay.
            EndReason::RelayLost
            | EndReason::InternalError
            | EndReason::Unspecified
            | EndReason::DialBusy
            | EndReason::DialNoAnswer
            | EndReason::DialFailed
            | EndReason::DialCanceled
            | EndReason::DialCompleted => Self::InternalError,
        }
    }
}

/// Lowercase name of a contract reason.
pub fn reason_label(r: EndReason) -> &'static str {
    match r {
        EndReason::Unspecified => "unspecified",
        EndReason::CallerHangup => "caller_hangup",
        EndReason::AgentHangup => "agent_hangup",
        EndReason::AppHangup => "app_hangup",
        EndReason::Transferred => "transferred",
        EndReason::MaxDuration => "max_duration",
        EndReason::ModelUnavailable => "model_unavailable",
        EndReason::StartTimeout => "start_timeout",
        EndReason::MediaTimeout => "media_timeout",
        EndReason::RelayLost => "relay_lost",
        EndReason::Drain => "drain",
        EndReason::Handoff => "handoff",
        EndReason::InternalError => "internal_error",
        EndReason::AnsweringMachine => "answering_machine",
        EndReason::VoicemailLeft => "voicemail_left",
        // Control's reasons for dialled calls that never had a stream; a relay never
        // ends a call with them.
        EndReason::DialBusy
        | EndReason::DialNoAnswer
        | EndReason::DialFailed
        | EndReason::DialCanceled
        | EndReason::DialCompleted => "dial",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [EndKind; 16] = [
        EndKind::CallerHangup,
        EndKind::TwilioWriteFailed,
        EndKind::TwilioReadFailed,
        EndKind::StartTimeout,
        EndKind::MediaTimeout,
        EndKind::AgentHangup,
        EndKind::AgentTransfer,
        EndKind::AppHangup,
        EndKind::AppTransfer,
        EndKind::MaxDuration,
        EndKind::ModelUnavailable,
        EndKind::Drain,
        EndKind::Handoff,
        EndKind::InternalError,
        EndKind::AnsweringMachine,
        EndKind::VoicemailLeft,
    ];

    #[test]
    fn hangup_and_failed_write_share_the_contract_reason_not_the_label() {
        assert_eq!(
            EndKind::CallerHangup.reason(),
            EndKind::TwilioWriteFailed.reason()
        );
        assert_ne!(
            EndKind::CallerHangup.label(),
            EndKind::TwilioWriteFailed.label()
        );
        assert!(EndKind::CallerHangup.is_normal());
        assert!(!EndKind::TwilioWriteFailed.is_normal());
        assert_eq!(EndKind::TwilioWriteFailed.side(), Side::Twilio);
    }

    #[test]
    fn every_kind_round_trips_through_its_reason_or_is_a_twilio_failure() {
        for k in ALL {
            let back = EndKind::from_reason(k.reason());
            assert_eq!(back.reason(), k.reason(), "{k:?}");
            if back != k {
                assert!(
                    matches!(
                        k,
                        EndKind::TwilioWriteFailed
                            | EndKind::TwilioReadFailed
                            | EndKind::AppTransfer
                    ),
                    "{k:?} is lost in its reason"
                );
            }
        }
        let labels: std::collections::HashSet<_> = ALL.iter().map(|k| k.label()).collect();
        // Agent and app transfers share `transferred`.
        assert_eq!(labels.len(), ALL.len() - 1);
    }

    #[test]
    fn sides_name_who_ended_the_call() {
        assert_eq!(EndKind::ModelUnavailable.side(), Side::Realtime);
        assert_eq!(EndKind::AppHangup.side(), Side::Control);
        assert_eq!(EndKind::MaxDuration.side(), Side::Internal);
        assert_eq!(EndKind::MediaTimeout.side().as_str(), "twilio");
    }
}

//! Errors of the control plane: what went wrong in the domain's words ([`Error`]), what
//! went wrong in the state store whatever its backend ([`StoreError`]), and the one
//! mapping of both to gRPC statuses (`impl From<Error> for Status`).

use tonic::{Code, Status};

/// A backend's own error, kept as the source of a [`StoreError`].
pub type BackendError = Box<dyn std::error::Error + Send + Sync>;

/// A failure of the state store, in terms every backend can report.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store cannot be reached (connection refused, dropped, timed out); retrying
    /// later may succeed.
    #[error("store unavailable: {0}")]
    Unavailable(#[source] BackendError),
    /// The store answered with an error (a script error, a wrong type, …).
    #[error("store failed: {0}")]
    Failed(#[source] BackendError),
    /// Stored data could not be decoded.
    #[error("corrupt stored data: {0}")]
    Corrupt(String),
}

impl From<prost::DecodeError> for StoreError {
    fn from(err: prost::DecodeError) -> Self {
        StoreError::Corrupt(err.to_string())
    }
}

/// A refused or failed request, in the domain's words. Each variant carries what its
/// message needs; its gRPC code is decided in `From<Error> for Status` only.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad input; `field` names the offending request field.
    #[error("{field}: {message}")]
    InvalidArgument {
        /// The request field, e.g. `settings.temperature`.
        field: String,
        /// What is wrong with it.
        message: String,
    },
    /// No call with this id.
    #[error("call '{0}' not found")]
    CallNotFound(String),
    /// No agent with this id.
    #[error("agent '{0}' not found")]
    AgentNotFound(String),
    /// No number route for this number (`DeleteNumberRoute`).
    #[error("no route for {0}")]
    RouteNotFound(String),
    /// An inbound call to a number with no route, and no default agent.
    #[error("no route for '{0}' and no default agent")]
    NoAgentForNumber(String),
    /// A call created without an agent, and no default agent is set.
    #[error("{field}: empty and there is no default agent")]
    NoDefaultAgent {
        /// The request field that was empty.
        field: String,
    },
    /// An agent with this id exists already.
    #[error("agent '{0}' already exists")]
    AgentExists(String),
    /// Optimistic concurrency: the agent is at another version than the request expected.
    #[error("agent '{agent_id}' is at version {current}, not expected_version {expected}")]
    VersionConflict {
        /// The agent.
        agent_id: String,
        /// Its stored version.
        current: u64,
        /// The version the request expected.
        expected: u64,
    },
    /// The call has a final status: it cannot be admitted or attached again.
    #[error("call '{0}' has ended")]
    CallEnded(String),
    /// A command for a call that is not in progress with an attach stream.
    #[error("call '{call_id}' is not live (status {status}, attach stream {})", if *.attached { "open" } else { "absent" })]
    CallNotLive {
        /// The call.
        call_id: String,
        /// Its status, by proto name.
        status: &'static str,
        /// Whether an attach stream holds its lease.
        attached: bool,
    },
    /// The call's lease names a control replica that no longer listens.
    #[error("call '{0}' is not live: the control replica holding it is gone")]
    HolderGone(String),
    /// The agent of a call was deleted while the call lives.
    #[error("agent '{agent_id}' of call '{call_id}' was deleted")]
    AgentDeleted {
        /// The call.
        call_id: String,
        /// Its deleted agent.
        agent_id: String,
    },
    /// Another live attach stream holds the call's lease.
    #[error("call '{0}' is attached by another stream")]
    LeaseHeldElsewhere(String),
    /// The stream credential of an attach was consumed before (a replayed stream).
    #[error("the stream credential of call '{0}' was already used")]
    StreamCredentialUsed(String),
    /// A stream minted for a call state that is gone: a first stream of a call that has
    /// had one, or a resumed stream that follows another than the call's current stream
    /// (a replayed voice webhook or action request).
    #[error(
        "open.stream_origin: the stream of call '{0}' was minted for an earlier stream of the call (a replayed webhook or action request)"
    )]
    StreamSuperseded(String),
    /// A stream's `start.callSid` is not the CallSid the call was admitted with.
    #[error("open.twilio_call_sid: not the CallSid call '{0}' was admitted with")]
    CallSidMismatch(String),
    /// An event's seq is past the next one expected.
    #[error("event seq {seq} leaves a gap after stored seq {last_seq}; resend from {}", .last_seq + 1)]
    EventGap {
        /// The refused event's seq.
        seq: u64,
        /// The newest stored seq.
        last_seq: u64,
    },
    /// Stored events read back out of order (a store bug worth surfacing, never skipped).
    #[error("stored events of call '{call_id}' jump from {from} to {to}")]
    EventsOutOfOrder {
        /// The call.
        call_id: String,
        /// The last seq sent.
        from: u64,
        /// The seq read next.
        to: u64,
    },
    /// `CreateCall.dial` on a replica that cannot dial.
    #[error("dial: {0}")]
    DialingUnavailable(&'static str),
    /// A Twilio status report names a call that belongs to another Twilio call.
    #[error("call '{0}' belongs to another Twilio call")]
    WrongTwilioCall(String),
    /// Twilio refused a change to a call (e.g. 21220, not in progress).
    #[error("Twilio refused to end call '{call_id}': {source}")]
    TwilioRefused {
        /// The call.
        call_id: String,
        /// Twilio's answer.
        source: crate::twilio_rest::TwilioError,
    },
    /// Twilio could not be reached (or kept answering 429/5xx).
    #[error("Twilio could not be asked to end call '{call_id}': {source}")]
    TwilioUnavailable {
        /// The call.
        call_id: String,
        /// What went wrong.
        source: crate::twilio_rest::TwilioError,
    },
    /// The attach stream's receiver went away before the call context was sent.
    #[error("attach stream closed")]
    AttachStreamClosed,
    /// Another attach stream took the call's lease from this one.
    #[error("the call was attached by another stream")]
    LeaseLost,
    /// Nothing (no heartbeat, no event) arrived on an attach stream for the heartbeat
    /// timeout: its lease was released as if the stream had broken.
    #[error("no heartbeat from the relay for {0:?}; the call's lease was released")]
    HeartbeatTimeout(std::time::Duration),
    /// The store answered in a way its contract rules out.
    #[error("unexpected store outcome {0}")]
    UnexpectedStoreOutcome(String),
    /// This replica is shutting down; `then` tells the client what to do (`; reconnect`).
    #[error("control plane shutting down{then}")]
    ShuttingDown {
        /// What the client should do next, with its leading `; `, or empty.
        then: &'static str,
    },
    /// The application token already holds `CONTROL_WATCH_STREAMS_PER_TOKEN` watch streams.
    #[error(
        "this token already has {cap} watch streams open on this replica \
         (CONTROL_WATCH_STREAMS_PER_TOKEN); close one first"
    )]
    TooManyWatchStreams {
        /// The limit.
        cap: usize,
    },
    /// A unary call ran past `CONTROL_GRPC_UNARY_TIMEOUT_MS`.
    #[error("the call took longer than CONTROL_GRPC_UNARY_TIMEOUT_MS ({ms} ms)")]
    UnaryTimeout {
        /// The limit in milliseconds.
        ms: u128,
    },
    /// The state store failed.
    /// No such campaign.
    #[error("campaign '{0}' not found")]
    CampaignNotFound(String),
    /// A campaign id that is taken.
    #[error("campaign '{0}' already exists")]
    CampaignExists(String),
    /// A campaign state change that its current state does not allow.
    #[error("campaign '{campaign_id}' is {current}; cannot {action} it")]
    CampaignState {
        /// The campaign.
        campaign_id: String,
        /// Its state now (`draft`, `running`, …).
        current: &'static str,
        /// What was asked (`start`, `pause`, …).
        action: &'static str,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Error {
    /// Bad input in `field`.
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Error::InvalidArgument {
            field: field.into(),
            message: message.into(),
        }
    }

    /// The gRPC code the API answers this error with.
    pub fn code(&self) -> Code {
        match self {
            Error::InvalidArgument { .. } => Code::InvalidArgument,
            Error::CallNotFound(_)
            | Error::AgentNotFound(_)
            | Error::RouteNotFound(_)
            | Error::NoAgentForNumber(_)
            | Error::CampaignNotFound(_) => Code::NotFound,
            Error::AgentExists(_) | Error::LeaseHeldElsewhere(_) | Error::CampaignExists(_) => {
                Code::AlreadyExists
            }
            Error::NoDefaultAgent { .. }
            | Error::CallEnded(_)
            | Error::CallNotLive { .. }
            | Error::HolderGone(_)
            | Error::AgentDeleted { .. }
            | Error::EventGap { .. }
            | Error::EventsOutOfOrder { .. }
            | Error::AttachStreamClosed
            | Error::DialingUnavailable(_)
            | Error::WrongTwilioCall(_)
            | Error::TwilioRefused { .. }
            | Error::CampaignState { .. } => Code::FailedPrecondition,
            Error::TwilioUnavailable { .. }
            | Error::ShuttingDown { .. }
            | Error::HeartbeatTimeout(_) => Code::Unavailable,
            Error::VersionConflict { .. } | Error::LeaseLost => Code::Aborted,
            Error::StreamCredentialUsed(_)
            | Error::StreamSuperseded(_)
            | Error::CallSidMismatch(_) => Code::PermissionDenied,
            Error::UnexpectedStoreOutcome(_) => Code::Internal,
            Error::TooManyWatchStreams { .. } => Code::ResourceExhausted,
            Error::UnaryTimeout { .. } => Code::DeadlineExceeded,
            Error::Store(StoreError::Unavailable(_)) => Code::Unavailable,
            Error::Store(StoreError::Failed(_) | StoreError::Corrupt(_)) => Code::Internal,
        }
    }
}

/// gRPC metadata key naming why an attach was refused where the code alone cannot tell
/// (`docs/contract-notes.md`); the relay turns it into a stream close code.
pub const REFUSAL_METADATA: &str = "callbridge-refusal";

impl Error {
    /// The machine-readable refusal reason sent as [`REFUSAL_METADATA`], if any.
    pub fn refusal_reason(&self) -> Option<&'static str> {
        match self {
            Error::StreamCredentialUsed(_) => Some("credential_used"),
            Error::CallSidMismatch(_) => Some("call_sid_mismatch"),
            Error::StreamSuperseded(_) => Some("stream_superseded"),
            _ => None,
        }
    }
}

impl From<Error> for Status {
    fn from(err: Error) -> Self {
        let mut status = Status::new(err.code(), err.to_string());
        if let Some(reason) = err.refusal_reason() {
            status.metadata_mut().insert(
                REFUSAL_METADATA,
                tonic::metadata::MetadataValue::from_static(reason),
            );
        }
        status
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(err: Error) -> Status {
        err.into()
    }

    #[test]
    fn stream_refusals_carry_their_reason_in_metadata() {
        let s = status(Error::StreamCredentialUsed("c1".into()));
        assert_eq!(s.code(), Code::PermissionDenied);
        assert_eq!(
            s.metadata().get(REFUSAL_METADATA).map(|v| v.as_bytes()),
            Some(b"credential_used".as_slice())
        );
        let s = status(Error::CallSidMismatch("c1".into()));
        assert_eq!(s.code(), Code::PermissionDenied);
        assert!(s.message().contains("twilio_call_sid"), "{}", s.message());
        assert_eq!(
            s.metadata().get(REFUSAL_METADATA).map(|v| v.as_bytes()),
            Some(b"call_sid_mismatch".as_slice())
        );
        let s = status(Error::LeaseHeldElsewhere("c1".into()));
        assert!(s.metadata().get(REFUSAL_METADATA).is_none());
    }

    #[test]
    fn status_mapping_names_the_field_and_code() {
        let s = status(Error::invalid("settings.voice", "unknown voice 'x'"));
        assert_eq!(s.code(), Code::InvalidArgument);
        assert!(s.message().contains("settings.voice"));
        let s = status(Error::VersionConflict {
            agent_id: "a".into(),
            current: 3,
            expected: 2,
        });
        assert_eq!(s.code(), Code::Aborted);
        assert_eq!(
            s.message(),
            "agent 'a' is at version 3, not expected_version 2"
        );
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let s = status(StoreError::Unavailable(Box::new(io)).into());
        assert_eq!(s.code(), Code::Unavailable);
        let s = status(StoreError::Corrupt("event entry without payload".into()).into());
        assert_eq!(s.code(), Code::Internal);
    }

    #[test]
    fn domain_errors_keep_their_codes_and_say_what_happened() {
        let cases = [
            (
                Error::CallNotFound("c1".into()),
                Code::NotFound,
                "call 'c1' not found",
            ),
            (
                Error::AgentNotFound("a".into()),
                Code::NotFound,
                "agent 'a' not found",
            ),
            (
                Error::RouteNotFound("+1555".into()),
                Code::NotFound,
                "no route for +1555",
            ),
            (
                Error::NoAgentForNumber("+1555".into()),
                Code::NotFound,
                "no route for '+1555' and no default agent",
            ),
            (
                Error::NoDefaultAgent {
                    field: "calls[2].agent_id".into(),
                },
                Code::FailedPrecondition,
                "calls[2].agent_id: empty and there is no default agent",
            ),
            (
                Error::AgentExists("a".into()),
                Code::AlreadyExists,
                "agent 'a' already exists",
            ),
            (
                Error::CallEnded("c1".into()),
                Code::FailedPrecondition,
                "call 'c1' has ended",
            ),
            (
                Error::CallNotLive {
                    call_id: "c1".into(),
                    status: "RINGING",
                    attached: false,
                },
                Code::FailedPrecondition,
                "call 'c1' is not live (status RINGING, attach stream absent)",
            ),
            (
                Error::HolderGone("c1".into()),
                Code::FailedPrecondition,
                "call 'c1' is not live: the control replica holding it is gone",
            ),
            (
                Error::AgentDeleted {
                    call_id: "c1".into(),
                    agent_id: "a".into(),
                },
                Code::FailedPrecondition,
                "agent 'a' of call 'c1' was deleted",
            ),
            (
                Error::LeaseHeldElsewhere("c1".into()),
                Code::AlreadyExists,
                "call 'c1' is attached by another stream",
            ),
            (
                Error::EventGap {
                    seq: 8,
                    last_seq: 6,
                },
                Code::FailedPrecondition,
                "event seq 8 leaves a gap after stored seq 6; resend from 7",
            ),
            (
                Error::EventsOutOfOrder {
                    call_id: "c1".into(),
                    from: 3,
                    to: 5,
                },
                Code::FailedPrecondition,
                "stored events of call 'c1' jump from 3 to 5",
            ),
            (
                Error::AttachStreamClosed,
                Code::FailedPrecondition,
                "attach stream closed",
            ),
            (
                Error::LeaseLost,
                Code::Aborted,
                "the call was attached by another stream",
            ),
            (
                Error::UnexpectedStoreOutcome("Some(NotFound)".into()),
                Code::Internal,
                "unexpected store outcome Some(NotFound)",
            ),
            (
                Error::ShuttingDown {
                    then: "; reconnect",
                },
                Code::Unavailable,
                "control plane shutting down; reconnect",
            ),
        ];
        for (err, code, message) in cases {
            let s = status(err);
            assert_eq!((s.code(), s.message()), (code, message));
        }
    }
}

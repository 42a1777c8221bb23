//! Twilio's own view of a call: its status (`CallStatus` of the REST API and the status
//! callbacks) and the order in which those statuses may follow each other.

use std::fmt;

use callbridge_proto::pb;

use crate::error::Error;

/// Twilio's status of a call. The stored and wire form is Twilio's spelling
/// ([`Self::as_str`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TwilioCallStatus {
    /// Accepted by Twilio, not dialled yet.
    Queued,
    /// The `initiated` callback event (Twilio started dialling).
    Initiated,
    /// The callee's phone rings.
    Ringing,
    /// Answered and connected.
    InProgress,
    /// The `answered` callback event.
    Answered,
    /// Ended after being answered.
    Completed,
    /// The callee was busy.
    Busy,
    /// Twilio could not place the call.
    Failed,
    /// Nobody answered.
    NoAnswer,
    /// Cancelled before it was answered.
    Canceled,
}

impl TwilioCallStatus {
    /// Every status, in Twilio's order.
    pub const ALL: [TwilioCallStatus; 10] = [
        Self::Queued,
        Self::Initiated,
        Self::Ringing,
        Self::InProgress,
        Self::Answered,
        Self::Completed,
        Self::Busy,
        Self::Failed,
        Self::NoAnswer,
        Self::Canceled,
    ];

    /// Twilio's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Initiated => "initiated",
            Self::Ringing => "ringing",
            Self::InProgress => "in-progress",
            Self::Answered => "answered",
            Self::Completed => "completed",
            Self::Busy => "busy",
            Self::Failed => "failed",
            Self::NoAnswer => "no-answer",
            Self::Canceled => "canceled",
        }
    }

    /// The status Twilio spells `name`; `None` for a name it does not use.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == name)
    }

    /// Checks `value` from request field `field`; empty means none.
    pub fn parse_optional(field: &str, value: &str) -> Result<Option<Self>, Error> {
        if value.is_empty() {
            return Ok(None);
        }
        Self::from_name(value).map(Some).ok_or_else(|| {
            Error::invalid(
                field,
                format!(
                    "unknown Twilio call status '{}'",
                    value.chars().take(40).collect::<String>()
                ),
            )
        })
    }

    /// Position in Twilio's one-way order; all final statuses share the top (4). The
    /// Redis script `TWILIO_LUA` (store/redis.rs) ranks the stored spelling the same way.
    pub fn rank(self) -> u8 {
        match self {
            Self::Queued | Self::Initiated => 1,
            Self::Ringing => 2,
            Self::InProgress | Self::Answered => 3,
            Self::Completed | Self::Busy | Self::Failed | Self::NoAnswer | Self::Canceled => 4,
        }
    }

    /// Whether Twilio is done with the call.
    pub fn is_final(self) -> bool {
        self.rank() == 4
    }

    /// How a call ends when Twilio reports this final status and no stream ends it.
    pub fn end_reason(self) -> Option<pb::EndReason> {
        Some(match self {
            Self::Busy => pb::EndReason::DialBusy,
            Self::NoAnswer => pb::EndReason::DialNoAnswer,
            Self::Failed => pb::EndReason::DialFailed,
            Self::Canceled => pb::EndReason::DialCanceled,
            Self::Completed => pb::EndReason::DialCompleted,
            _ => return None,
        })
    }
}

/// The rank of a status that may be unknown yet (0).
pub fn rank(status: Option<TwilioCallStatus>) -> u8 {
    status.map_or(0, TwilioCallStatus::rank)
}

impl fmt::Display for TwilioCallStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_round_trip_and_move_one_way() {
        for status in TwilioCallStatus::ALL {
            assert_eq!(TwilioCallStatus::from_name(status.as_str()), Some(status));
        }
        use TwilioCallStatus::*;
        assert_eq!(Initiated.rank(), Queued.rank());
        assert!(rank(None) < Queued.rank());
        assert!(Ringing.rank() < InProgress.rank());
        assert!(InProgress.rank() < Completed.rank());
        assert!(Busy.is_final() && !Answered.is_final());
        assert_eq!(Busy.end_reason(), Some(pb::EndReason::DialBusy));
        assert_eq!(NoAnswer.end_reason(), Some(pb::EndReason::DialNoAnswer));
        assert_eq!(Ringing.end_reason(), None);
        let err = TwilioCallStatus::parse_optional("call_status", "x").expect_err("unknown");
        assert_eq!(
            err.to_string(),
            "call_status: unknown Twilio call status 'x'"
        );
        assert_eq!(
            TwilioCallStatus::parse_optional("call_status", "").expect("none"),
            None
        );
    }
}

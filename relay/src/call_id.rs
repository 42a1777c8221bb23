//! callbridge's call id, as a type: checked once where it enters the relay (a URL path,
//! the `callId` query parameter, control's answers) and trusted afterwards, so it can go
//! into a URL, TwiML or a log line as it is. Twilio's ids are [`crate::twilio::CallSid`]
//! and [`crate::twilio::StreamSid`]; the Realtime API's function-call ids are plain
//! strings named `tool_call_id`.

use std::fmt;

/// Longest call id accepted.
pub const MAX_LEN: usize = 128;

/// A call id: 1 to [`MAX_LEN`] bytes of `[A-Za-z0-9_.-]` (safe in a URL path segment, a
/// query value, XML and JSON without escaping).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CallId(String);

/// Why a string is not a call id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("not a call id (1 to {MAX_LEN} bytes of letters, digits, '_', '-', '.')")]
pub struct InvalidCallId;

impl CallId {
    /// Checks `value`.
    pub fn parse(value: impl Into<String>) -> Result<Self, InvalidCallId> {
        let value = value.into();
        if valid(&value) {
            Ok(Self(value))
        } else {
            Err(InvalidCallId)
        }
    }

    /// Like [`Self::parse`], with an empty value meaning none (proto fields and optional
    /// query parameters).
    pub fn parse_optional(value: impl Into<String>) -> Result<Option<Self>, InvalidCallId> {
        let value = value.into();
        if value.is_empty() {
            return Ok(None);
        }
        Self::parse(value).map(Some)
    }

    /// The id.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The id, for a proto field.
    pub fn into_string(self) -> String {
        self.0
    }
}

fn valid(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_LEN
        && id
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'-' | b'.'))
}

impl fmt::Display for CallId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for CallId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl PartialEq<str> for CallId {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

/// The id for a proto field that may be empty.
pub fn to_proto(id: Option<&CallId>) -> String {
    id.map_or_else(String::new, |id| id.0.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn call_ids() {
        assert_eq!(
            CallId::parse("call_123-abc.1").map(|c| c.into_string()),
            Ok("call_123-abc.1".to_owned())
        );
        assert_eq!(CallId::parse(""), Err(InvalidCallId));
        assert_eq!(CallId::parse("a/b"), Err(InvalidCallId));
        assert_eq!(CallId::parse("a b"), Err(InvalidCallId));
        assert_eq!(CallId::parse("é"), Err(InvalidCallId));
        assert!(CallId::parse("a".repeat(MAX_LEN)).is_ok());
        assert_eq!(CallId::parse("a".repeat(MAX_LEN + 1)), Err(InvalidCallId));
        assert_eq!(CallId::parse_optional(""), Ok(None));
        assert_eq!(CallId::parse_optional("a/b"), Err(InvalidCallId));
        assert_eq!(
            CallId::parse_optional("c1").map(|c| c.map(CallId::into_string)),
            Ok(Some("c1".to_owned()))
        );
        let id = CallId::parse("c1").expect("valid");
        assert_eq!(to_proto(Some(&id)), "c1");
        assert_eq!(to_proto(None), "");
        assert!(id == *"c1");
    }
}

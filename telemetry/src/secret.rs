//! [`Secret`]: a configuration value that must never reach a log.

use std::fmt;
use std::str::FromStr;

/// A secret string (API key, auth token, bearer token). `Debug` and `Display` print
/// `[redacted]`, so a config struct can derive `Debug` and be logged whole; the value
/// itself comes out only through [`Secret::expose`], at the few places that send or
/// check it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret itself; only for sending or checking it, never for logs.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

const REDACTED: &str = "[redacted]";

/// Shortest bearer token or shared secret the binaries accept outside their insecure
/// (local testing) modes: 32 bytes is 256 bits of a random token, out of reach of
/// guessing; anything shorter is likely a placeholder left in a manifest.
pub const MIN_SECRET_BYTES: usize = 32;

/// Whether `token` can travel as a bearer token in an `authorization` header and be
/// compared byte for byte on the other side: visible ASCII, no spaces, not empty.
pub fn is_header_token(token: &str) -> bool {
    !token.is_empty() && token.bytes().all(|b| b.is_ascii_graphic())
}

impl Secret {
    /// Whether the value is at least [`MIN_SECRET_BYTES`] long.
    pub fn long_enough(&self) -> bool {
        self.0.len() >= MIN_SECRET_BYTES
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

/// So clap can parse a secret straight from its variable.
impl FromStr for Secret {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Secret(s.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_hide_the_value_expose_gives_it() {
        let secret: Secret = "sk-live-123".parse().expect("infallible");
        for shown in [
            format!("{secret:?}"),
            format!("{secret}"),
            format!("{:?}", Some(vec![secret.clone()])),
        ] {
            assert!(!shown.contains("sk-live-123"), "{shown}");
            assert!(shown.contains("[redacted]"), "{shown}");
        }
        assert_eq!(secret.expose(), "sk-live-123");
        assert_eq!(secret, Secret::new("sk-live-123"));
    }
}

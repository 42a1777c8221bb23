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

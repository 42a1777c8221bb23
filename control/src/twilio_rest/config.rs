//! The Twilio REST settings of control (flattened into its command line / environment).

use std::time::Duration;

use super::TwilioConfig;
use crate::config::{ConfigError, Secret};

/// Raw `TWILIO_*` settings, as clap sees them.
#[derive(Debug, clap::Args)]
pub(crate) struct TwilioArgs {
    /// Twilio account SID (AC…) whose calls control places; unset: control never dials.
    #[arg(long, env = "TWILIO_ACCOUNT_SID")]
    twilio_account_sid: Option<String>,
    /// An API key SID (SK…) to authenticate with instead of the auth token.
    #[arg(long, env = "TWILIO_API_KEY_SID")]
    twilio_api_key_sid: Option<String>,
    /// Base URL of Twilio's REST API (tests point it at a fake).
    #[arg(
        long,
        env = "TWILIO_API_BASE_URL",
        default_value = "https://api.twilio.com"
    )]
    twilio_api_base_url: String,
    /// Timeout of one Twilio REST request, in milliseconds.
    #[arg(long, env = "TWILIO_HTTP_TIMEOUT_MS", default_value = "10000")]
    twilio_http_timeout_ms: u64,
    /// Retries of a request Twilio answered 429 or 5xx.
    #[arg(long, env = "TWILIO_MAX_RETRIES", default_value = "4")]
    twilio_max_retries: u32,
}

fn bad(var: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError {
        var,
        message: message.into(),
    }
}

fn non_empty(v: Option<String>) -> Option<String> {
    v.map(|s| s.trim().to_owned()).filter(|s| !s.is_empty())
}

/// `prefix` + 32 hex digits, like every Twilio SID.
fn is_sid(value: &str, prefix: &str) -> bool {
    value.len() == 34
        && value.starts_with(prefix)
        && value[2..].chars().all(|c| c.is_ascii_hexdigit())
}

impl TwilioArgs {
    /// The validated settings, with the two secrets (`TWILIO_AUTH_TOKEN`,
    /// `TWILIO_API_KEY_SECRET`: no flags, read apart); `None` when no account is configured.
    pub(crate) fn into_config(
        self,
        auth_token: Option<String>,
        api_key_secret: Option<String>,
    ) -> Result<Option<TwilioConfig>, ConfigError> {
        let token = non_empty(auth_token);
        let key_sid = non_empty(self.twilio_api_key_sid);
        let key_secret = non_empty(api_key_secret);
        let Some(account_sid) = non_empty(self.twilio_account_sid) else {
            if key_sid.is_some() || key_secret.is_some() {
                return Err(bad(
                    "TWILIO_ACCOUNT_SID",
                    "required when TWILIO_API_KEY_SID/SECRET are set",
                ));
            }
            // TWILIO_AUTH_TOKEN alone is the relay's signing key in shared env files;
            // without an account it configures nothing here.
            return Ok(None);
        };
        if !is_sid(&account_sid, "AC") {
            return Err(bad(
                "TWILIO_ACCOUNT_SID",
                "must be AC followed by 32 hex digits",
            ));
        }
        let (username, password) = match (key_sid, key_secret, token) {
            (Some(sid), Some(secret), _) => {
                if !is_sid(&sid, "SK") {
                    return Err(bad(
                        "TWILIO_API_KEY_SID",
                        "must be SK followed by 32 hex digits",
                    ));
                }
                (sid, Secret::new(secret))
            }
            (Some(_), None, _) => {
                return Err(bad(
                    "TWILIO_API_KEY_SECRET",
                    "required with TWILIO_API_KEY_SID",
                ));
            }
            (None, Some(_), _) => {
                return Err(bad(
                    "TWILIO_API_KEY_SID",
                    "required with TWILIO_API_KEY_SECRET",
                ));
            }
            (None, None, Some(token)) => (account_sid.clone(), Secret::new(token)),
            (None, None, None) => {
                return Err(bad(
                    "TWILIO_AUTH_TOKEN",
                    "TWILIO_ACCOUNT_SID needs TWILIO_AUTH_TOKEN or TWILIO_API_KEY_SID + TWILIO_API_KEY_SECRET",
                ));
            }
        };
        let base_url = self
            .twilio_api_base_url
            .trim()
            .trim_end_matches('/')
            .to_owned();
        if !(base_url.starts_with("https://") || base_url.starts_with("http://"))
            || base_url.parse::<http::Uri>().is_err()
        {
            return Err(bad(
                "TWILIO_API_BASE_URL",
                "must be an http:// or https:// URL",
            ));
        }
        if self.twilio_http_timeout_ms == 0 || self.twilio_http_timeout_ms > 120_000 {
            return Err(bad("TWILIO_HTTP_TIMEOUT_MS", "must be 1..=120000"));
        }
        if self.twilio_max_retries > 10 {
            return Err(bad("TWILIO_MAX_RETRIES", "must be 0..=10"));
        }
        Ok(Some(TwilioConfig {
            base_url,
            account_sid,
            username,
            password,
            timeout: Duration::from_millis(self.twilio_http_timeout_ms),
            max_retries: self.twilio_max_retries,
            backoff_base: Duration::from_millis(200),
            backoff_max: Duration::from_secs(5),
        }))
    }
}

//! Twilio's REST API for the Call resource: create, fetch, update (cancel, hang up,
//! redirect).
//!
//! hyper-util's pooled client over rustls (ring provider, webpki roots): everything but
//! `hyper-rustls` was already in the build through tonic and tokio-tungstenite, which makes
//! it leaner than reqwest. Bodies are form-encoded by `serde_urlencoded`; answers are JSON.
//! Requests answered `429` or `5xx` are retried with exponential backoff and full jitter;
//! any other error (a `4xx`, a timeout, a refused connection) is returned at once, because
//! a create that may have reached Twilio must not be sent twice blindly.

use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rand::Rng;
use serde::Deserialize;

use crate::config::Secret;

pub(crate) mod config;

/// Largest answer body read.
const MAX_BODY: usize = 1024 * 1024;

/// Who the client authenticates as, and where it sends requests.
#[derive(Debug, Clone)]
pub struct TwilioConfig {
    /// `https://api.twilio.com` (or a fake's URL in tests), no trailing slash.
    pub base_url: String,
    /// The account (`AC…`) whose calls are placed.
    pub account_sid: String,
    /// Basic-auth user: the account SID, or an API key SID (`SK…`).
    pub username: String,
    /// Basic-auth password: the auth token or the API key secret.
    pub password: Secret,
    /// Bound on one HTTP exchange (connect + answer).
    pub timeout: Duration,
    /// Retries after a `429`/`5xx` answer.
    pub max_retries: u32,
    /// First backoff; doubles each retry, capped at `backoff_max`.
    pub backoff_base: Duration,
    pub backoff_max: Duration,
}

/// A Call resource as Twilio answers it (only the fields control reads).
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
pub struct CallResource {
    pub sid: String,
    #[serde(default)]
    pub status: String,
    #[serde(default)]
    pub to: String,
    #[serde(default)]
    pub from: String,
    #[serde(default)]
    pub answered_by: Option<String>,
}

/// One page of `GET Calls.json`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct CallPage {
    #[serde(default)]
    pub calls: Vec<CallResource>,
}

/// Twilio's error body.
#[derive(Debug, Clone, Default, Deserialize)]
struct ErrorBody {
    #[serde(default)]
    code: Option<u32>,
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    more_info: Option<String>,
}

/// A request that did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum TwilioError {
    /// Twilio answered with an error: its HTTP status, code and message are kept.
    #[error("twilio {status}: {code} {message}")]
    Api {
        status: u16,
        /// Twilio's error code (e.g. 21211), 0 when the body had none.
        code: u32,
        message: String,
        more_info: String,
    },
    /// No answer within the timeout.
    #[error("twilio request timed out after {0:?}")]
    Timeout(Duration),
    /// Connection or protocol failure.
    #[error("twilio request failed: {0}")]
    Transport(String),
    /// A 2xx answer that is not the expected JSON.
    #[error("twilio answer not understood: {0}")]
    Decode(String),
}

impl TwilioError {
    /// Twilio's error code, when Twilio gave one.
    pub fn code(&self) -> u32 {
        match self {
            TwilioError::Api { code, .. } => *code,
            _ => 0,
        }
    }

    /// Whether the request certainly did not create anything (a `4xx` answer).
    pub fn is_refusal(&self) -> bool {
        matches!(self, TwilioError::Api { status, .. } if (400..500).contains(status) && *status != 429)
    }
}

/// How Twilio should place an outbound call.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CreateCall {
    pub to: String,
    pub from: String,
    /// The voice webhook (TwiML) URL.
    pub url: String,
    pub status_callback: Option<String>,
    /// `initiated`, `ringing`, `answered`, `completed`.
    pub status_callback_events: Vec<&'static str>,
    /// Ring seconds before `no-answer`.
    pub timeout_secs: Option<u32>,
    /// Longest call, seconds.
    pub time_limit_secs: Option<u32>,
    /// `CallerId` (SIP/client calls); the `From` number otherwise.
    pub caller_id: Option<String>,
    /// `Enable` or `DetectMessageEnd`, with the async verdict posted to this URL.
    pub machine_detection: Option<(&'static str, String)>,
}

impl CreateCall {
    /// The form fields, in Twilio's names (repeated `StatusCallbackEvent`).
    pub fn form(&self) -> Vec<(&'static str, String)> {
        let mut f = vec![
            ("To", self.to.clone()),
            ("From", self.from.clone()),
            ("Url", self.url.clone()),
        ];
        if let Some(cb) = &self.status_callback {
            f.push(("StatusCallback", cb.clone()));
            f.push(("StatusCallbackMethod", "POST".to_owned()));
            for event in &self.status_callback_events {
                f.push(("StatusCallbackEvent", (*event).to_owned()));
            }
        }
        if let Some(t) = self.timeout_secs {
            f.push(("Timeout", t.to_string()));
        }
        if let Some(t) = self.time_limit_secs {
            f.push(("TimeLimit", t.to_string()));
        }
        if let Some(c) = &self.caller_id {
            f.push(("CallerId", c.clone()));
        }
        if let Some((mode, callback)) = &self.machine_detection {
            f.push(("MachineDetection", (*mode).to_owned()));
            f.push(("AsyncAmd", "true".to_owned()));
            f.push(("AsyncAmdStatusCallback", callback.clone()));
            f.push(("AsyncAmdStatusCallbackMethod", "POST".to_owned()));
        }
        f
    }
}

/// A change to a live or ringing call.
#[derive(Debug, Clone, PartialEq)]
pub enum UpdateCall {
    /// `Status=canceled`: ends a `queued` or `ringing` call.
    Cancel,
    /// `Status=completed`: hangs up a call in progress.
    Complete,
    /// `Url=…`: the call fetches new TwiML from there at once.
    Redirect(String),
}

impl UpdateCall {
    fn form(&self) -> Vec<(&'static str, String)> {
        match self {
            UpdateCall::Cancel => vec![("Status", "canceled".to_owned())],
            UpdateCall::Complete => vec![("Status", "completed".to_owned())],
            UpdateCall::Redirect(url) => {
                vec![("Url", url.clone()), ("Method", "POST".to_owned())]
            }
        }
    }
}

/// The client; cheap to clone (one connection pool).
#[derive(Clone)]
pub struct TwilioRest {
    client: Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>,
    config: TwilioConfig,
    authorization: Secret,
}

impl std::fmt::Debug for TwilioRest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TwilioRest")
            .field("base_url", &self.config.base_url)
            .field("account_sid", &self.config.account_sid)
            .finish_non_exhaustive()
    }
}

impl TwilioRest {
    /// A client for `config`.
    pub fn new(config: TwilioConfig) -> Result<Self, TwilioError> {
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_webpki_roots(std::sync::Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .map_err(|e| TwilioError::Transport(format!("TLS set-up: {e}")))?
            .https_or_http()
            .enable_http1()
            .build();
        let client = Client::builder(TokioExecutor::new()).build(https);
        let authorization = Secret::new(format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!(
                "{}:{}",
                config.username,
                config.password.expose()
            ))
        ));
        Ok(TwilioRest {
            client,
            config,
            authorization,
        })
    }

    /// The account the calls belong to.
    pub fn account_sid(&self) -> &str {
        &self.config.account_sid
    }

    fn url(&self, tail: &str) -> String {
        format!(
            "{}/2010-04-01/Accounts/{}/{tail}",
            self.config.base_url, self.config.account_sid
        )
    }

    /// `POST Calls.json`.
    pub async fn create_call(&self, call: &CreateCall) -> Result<CallResource, TwilioError> {
        let body = encode(&call.form())?;
        self.send(Method::POST, &self.url("Calls.json"), Some(body))
            .await
    }

    /// `POST Calls/{sid}.json`.
    pub async fn update_call(
        &self,
        sid: &str,
        update: &UpdateCall,
    ) -> Result<CallResource, TwilioError> {
        let body = encode(&update.form())?;
        self.send(
            Method::POST,
            &self.url(&format!("Calls/{sid}.json")),
            Some(body),
        )
        .await
    }

    /// `GET Calls/{sid}.json`.
    pub async fn fetch_call(&self, sid: &str) -> Result<CallResource, TwilioError> {
        self.send(Method::GET, &self.url(&format!("Calls/{sid}.json")), None)
            .await
    }

    /// `GET Calls.json?To=…`: the newest calls to a number (reconciliation).
    pub async fn list_calls_to(&self, to: &str) -> Result<Vec<CallResource>, TwilioError> {
        let query = encode(&[("To", to.to_owned()), ("PageSize", "50".to_owned())])?;
        let page: CallPage = self
            .send(
                Method::GET,
                &format!("{}?{query}", self.url("Calls.json")),
                None,
            )
            .await?;
        Ok(page.calls)
    }

    async fn send<T: serde::de::DeserializeOwned>(
        &self,
        method: Method,
        url: &str,
        body: Option<String>,
    ) -> Result<T, TwilioError> {
        let mut attempt = 0;
        loop {
            match self.once(method.clone(), url, body.clone()).await {
                Err(TwilioError::Api { status, .. })
                    if (status == 429 || status >= 500) && attempt < self.config.max_retries =>
                {
                    let delay = backoff(
                        attempt,
                        self.config.backoff_base,
                        self.config.backoff_max,
                        &mut rand::rng(),
                    );
                    attempt += 1;
                    tracing::debug!(status, attempt, ?delay, "Twilio asked us to back off.");
                    tokio::time::sleep(delay).await;
                }
                Err(err) => return Err(err),
                Ok(bytes) => {
                    return serde_json::from_slice(&bytes)
                        .map_err(|e| TwilioError::Decode(e.to_string()));
                }
            }
        }
    }

    async fn once(
        &self,
        method: Method,
        url: &str,
        body: Option<String>,
    ) -> Result<Bytes, TwilioError> {
        let mut request = Request::builder()
            .method(method)
            .uri(url)
            .header(header::AUTHORIZATION, self.authorization.expose())
            .header(header::ACCEPT, "application/json")
            .header(header::USER_AGENT, "callbridge-control");
        if body.is_some() {
            request = request.header(header::CONTENT_TYPE, "application/x-www-form-urlencoded");
        }
        let request = request
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| TwilioError::Transport(e.to_string()))?;
        let exchange = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|e| TwilioError::Transport(e.to_string()))?;
            let status = response.status();
            let body = http_body_util::Limited::new(response.into_body(), MAX_BODY)
                .collect()
                .await
                .map_err(|e| TwilioError::Transport(e.to_string()))?
                .to_bytes();
            Ok::<_, TwilioError>((status, body))
        };
        let (status, body) = tokio::time::timeout(self.config.timeout, exchange)
            .await
            .map_err(|_| TwilioError::Timeout(self.config.timeout))??;
        if status.is_success() {
            return Ok(body);
        }
        Err(api_error(status, &body))
    }
}

fn encode(form: &[(&'static str, String)]) -> Result<String, TwilioError> {
    serde_urlencoded::to_string(form).map_err(|e| TwilioError::Transport(e.to_string()))
}

fn api_error(status: StatusCode, body: &[u8]) -> TwilioError {
    let parsed: ErrorBody = serde_json::from_slice(body).unwrap_or_default();
    TwilioError::Api {
        status: status.as_u16(),
        code: parsed.code.unwrap_or(0),
        message: parsed.message.unwrap_or_else(|| {
            status
                .canonical_reason()
                .unwrap_or("error without a body")
                .to_owned()
        }),
        more_info: parsed.more_info.unwrap_or_default(),
    }
}

/// Full jitter: a random delay in `[0, min(max, base·2^attempt)]`, so replicas that were
/// refused together do not come back together.
pub fn backoff(attempt: u32, base: Duration, max: Duration, rng: &mut impl Rng) -> Duration {
    let ceiling = base
        .saturating_mul(1u32.checked_shl(attempt.min(16)).unwrap_or(u32::MAX))
        .min(max);
    let ms = u64::try_from(ceiling.as_millis()).unwrap_or(u64::MAX);
    Duration::from_millis(rng.random_range(0..=ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_form_repeats_events_and_sets_async_amd() {
        let form = CreateCall {
            to: "+14155550123".into(),
            from: "+14155550100".into(),
            url: "https://r.test/api/twilio/voice?callId=c1".into(),
            status_callback: Some("https://r.test/api/twilio/status?callId=c1".into()),
            status_callback_events: vec!["initiated", "ringing", "answered", "completed"],
            timeout_secs: Some(20),
            machine_detection: Some(("DetectMessageEnd", "https://r.test/amd".into())),
            ..CreateCall::default()
        }
        .form();
        let encoded = encode(&form).expect("encodes");
        assert!(encoded.starts_with("To=%2B14155550123&From=%2B14155550100&Url=https%3A%2F%2F"));
        assert_eq!(encoded.matches("StatusCallbackEvent=").count(), 4);
        assert!(encoded.contains("AsyncAmd=true"));
        assert!(encoded.contains("Timeout=20"));
    }

    #[test]
    fn backoff_is_capped_and_jittered() {
        let mut rng = rand::rng();
        let base = Duration::from_millis(100);
        let max = Duration::from_secs(2);
        for attempt in 0..40 {
            let d = backoff(attempt, base, max, &mut rng);
            assert!(d <= max, "{d:?} at attempt {attempt}");
            assert!(d <= base * 2u32.saturating_pow(attempt.min(16)), "{d:?}");
        }
        let spread: std::collections::HashSet<_> =
            (0..50).map(|_| backoff(5, base, max, &mut rng)).collect();
        assert!(spread.len() > 10, "jitter spreads the delays: {spread:?}");
    }

    #[test]
    fn error_body_keeps_code_and_message() {
        let err = api_error(
            StatusCode::BAD_REQUEST,
            br#"{"code": 21211, "message": "Invalid 'To' Phone Number", "more_info": "https://www.twilio.com/docs/errors/21211", "status": 400}"#,
        );
        assert_eq!(err.code(), 21211);
        assert!(err.is_refusal());
        assert!(err.to_string().contains("Invalid 'To' Phone Number"));
        let err = api_error(StatusCode::BAD_GATEWAY, b"<html>");
        assert_eq!(err.code(), 0);
        assert!(!err.is_refusal());
    }

    #[test]
    fn debug_hides_the_credentials() {
        let client = TwilioRest::new(TwilioConfig {
            base_url: "https://api.twilio.com".into(),
            account_sid: "AC00000000000000000000000000000001".into(),
            username: "AC00000000000000000000000000000001".into(),
            password: Secret::new("the-auth-token"),
            timeout: Duration::from_secs(1),
            max_retries: 0,
            backoff_base: Duration::from_millis(1),
            backoff_max: Duration::from_millis(1),
        })
        .expect("client builds");
        let shown = format!("{client:?}");
        assert!(!shown.contains("the-auth-token"), "{shown}");
        assert!(!shown.contains("Basic"), "{shown}");
    }
}

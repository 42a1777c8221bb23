//! The relay's client of control's internal `Relay` service (Admit, Attach, After).

use std::sync::Arc;
use std::time::Duration;

use callbridge_proto::pb;
use callbridge_proto::pb::relay_client::RelayClient;
use futures_channel::mpsc;
use futures_util::{SinkExt, StreamExt};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status, Streaming};

use crate::call_id::CallId;
use crate::config::Config;
use crate::stream_credential::{Segment, Verified};
use rand::RngCore;

/// Slots of the outbound half of an attach stream.
const ATTACH_OUT_SLOTS: usize = 64;

/// Adds `authorization: Bearer <token>` to every call.
#[derive(Clone)]
pub struct Auth(Option<MetadataValue<Ascii>>);

impl Interceptor for Auth {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// Errors talking to control, classified by what the caller should do.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// A gRPC status: control's answer, or tonic's when control was not reached (then the
    /// cause, e.g. a TLS alert, is in the status's source chain, shown too).
    #[error("control: {code:?}: {message}{causes}", code = .0.code(), message = .0.message(), causes = causes(.0))]
    Status(#[from] Status),
    /// No answer in time.
    #[error("control did not answer within {0:?}")]
    Timeout(Duration),
    /// The attach stream closed before sending the call context.
    #[error("attach stream closed before the call context")]
    NoContext,
}

/// The source chain of a status (`: cause: its cause…`), empty for control's own answers.
fn causes(status: &Status) -> String {
    let mut out = String::new();
    let mut next = std::error::Error::source(status);
    while let Some(e) = next {
        out.push_str(": ");
        out.push_str(&e.to_string());
        next = e.source();
    }
    out
}

impl ControlError {
    /// Whether control was not reached (or did not answer in time), as opposed to
    /// answering: worth retrying, and worth an operator's attention.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Status(s) if s.metadata().get(REFUSAL_METADATA).is_some() => false,
            _ => matches!(
                self.code(),
                Code::Unavailable | Code::Unknown | Code::DeadlineExceeded | Code::Cancelled
            ),
        }
    }

    /// The gRPC code, with timeouts as `DEADLINE_EXCEEDED`.
    pub fn code(&self) -> Code {
        match self {
            Self::Status(s) => s.code(),
            Self::Timeout(_) => Code::DeadlineExceeded,
            Self::NoContext => Code::Unavailable,
        }
    }
}

/// gRPC metadata key on a refused attach naming why, when the code alone cannot
/// (`credential_used`, `call_sid_mismatch`); see `docs/contract-notes.md`.
pub const REFUSAL_METADATA: &str = "callbridge-refusal";

/// What a stream's first attach proves (`AttachOpen` fields 4–6).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachProof {
    /// The stream credential's id, for control to consume once.
    pub credential_id: String,
    /// Which TwiML answer minted it, and for a resumed stream the stream it follows.
    pub origin: pb::StreamOrigin,
    /// The stream a resumed one follows ("" otherwise).
    pub takes_over: String,
    /// Drawn once per stream and sent with every retry of its attach, so control can tell
    /// this stream's retry of an attach that committed from a replay of its credential.
    pub attempt: String,
    /// Its expiry (ms since the Unix epoch).
    pub credential_expires_at_ms: i64,
    /// `start.callSid`, when Twilio sent one.
    pub twilio_call_sid: Option<String>,
}

/// Which stream an action request speaks for: its URL's `stream` and `after` parameters
/// (both `None` in a URL written by a relay older than them).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ActionStream {
    /// The stream whose `<Connect action>` this is.
    pub stream: Option<String>,
    /// The stream that one followed.
    pub after: Option<String>,
}

impl AttachProof {
    /// The proof a checked credential gives, for the stream whose `start` carried
    /// `twilio_call_sid`.
    pub fn of(cred: Verified, twilio_call_sid: Option<String>) -> Self {
        let origin = match cred.segment {
            Segment::First => pb::StreamOrigin::First,
            Segment::Resume => pb::StreamOrigin::Resume,
            // Standalone streams attach nowhere; named for completeness.
            Segment::Standalone => pb::StreamOrigin::Unspecified,
        };
        let mut attempt = [0u8; 16];
        rand::rng().fill_bytes(&mut attempt);
        Self {
            credential_id: cred.id,
            origin,
            takes_over: cred.takes_over.unwrap_or_default(),
            attempt: attempt.iter().map(|b| format!("{b:02x}")).collect(),
            credential_expires_at_ms: cred.expires_at_ms,
            twilio_call_sid,
        }
    }
}

/// Control's `Relay` API; clone-cheap (the tonic `Channel` multiplexes). The client sits
/// behind an `Arc`: every call's control link keeps a handle for reconnects, and the
/// client itself (channel, interceptor, origin URI) is ~300 bytes.
#[derive(Clone)]
pub struct Control {
    client: Arc<RelayClient<InterceptedService<Channel, Auth>>>,
    timeout: Duration,
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Control").finish_non_exhaustive()
    }
}

/// An open attach stream: the sender of requests and the stream of responses.
pub struct AttachStream {
    /// Requests up (events), boxed for the same reason as [`crate::call::control_link::LinkIn`].
    pub tx: mpsc::Sender<Box<pb::AttachRequest>>,
    /// Responses down (acks, commands).
    pub rx: Streaming<pb::AttachResponse>,
}

impl Control {
    /// A lazily connecting client for `config.control_url` (None in standalone mode).
    pub fn from_config(config: &Config) -> Result<Option<Self>, crate::RelayError> {
        let Some(url) = &config.control_url else {
            return Ok(None);
        };
        let mut endpoint = Endpoint::from_shared(url.clone())?;
        // Config validation allows only http:// and https://; https is never dialled plain.
        if url.starts_with("https://") {
            endpoint = endpoint.tls_config(crate::control_tls::client_config(config)?)?;
        }
        let endpoint = endpoint
            .connect_timeout(config.connect_timeout())
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5))
            .keep_alive_while_idle(true);
        // A token that is not header text must stop the relay, not turn into "no auth"
        // (config validation refuses it first; this covers configs built in code).
        let token = match &config.control_token {
            Some(t) => Some(
                crate::config::bearer_header(t)
                    .ok_or(crate::RelayError::ControlTokenNotHeaderText)?,
            ),
            None => None,
        };
        let client = RelayClient::with_interceptor(endpoint.connect_lazy(), Auth(token));
        Ok(Some(Self {
            client: Arc::new(client),
            timeout: config.connect_timeout(),
        }))
    }

    /// `Relay.Admit`.
    pub async fn admit(&self, req: pb::AdmitRequest) -> Result<pb::AdmitResponse, ControlError> {
        let mut client = RelayClient::clone(&self.client);
        match tokio::time::timeout(self.timeout, client.admit(req)).await {
            Ok(r) => Ok(r?.into_inner()),
            Err(_) => Err(ControlError::Timeout(self.timeout)),
        }
    }

    /// `Relay.After`.
    pub async fn after(
        &self,
        call_id: &CallId,
        stream: &ActionStream,
    ) -> Result<pb::AfterResponse, ControlError> {
        let mut client = RelayClient::clone(&self.client);
        let req = pb::AfterRequest {
            call_id: call_id.as_str().to_owned(),
            stream_id: stream.stream.clone().unwrap_or_default(),
            after_stream_id: stream.after.clone().unwrap_or_default(),
        };
        match tokio::time::timeout(self.timeout, client.after(req)).await {
            Ok(r) => Ok(r?.into_inner()),
            Err(_) => Err(ControlError::Timeout(self.timeout)),
        }
    }

    /// `Relay.ReportTwilioStatus`.
    pub async fn report_twilio_status(
        &self,
        req: pb::TwilioStatusReport,
    ) -> Result<pb::TwilioStatusAck, ControlError> {
        let mut client = RelayClient::clone(&self.client);
        match tokio::time::timeout(self.timeout, client.report_twilio_status(req)).await {
            Ok(r) => Ok(r?.into_inner()),
            Err(_) => Err(ControlError::Timeout(self.timeout)),
        }
    }

    /// `Relay.ReportPresence`: this relay is alive (and whether it drains); the answer
    /// counts the other ready relays and names when to report next.
    pub async fn report_presence(
        &self,
        relay_id: &str,
        draining: bool,
    ) -> Result<pb::RelayPresenceAck, ControlError> {
        let mut client = RelayClient::clone(&self.client);
        let req = pb::RelayPresence {
            relay_id: relay_id.to_owned(),
            draining,
        };
        match tokio::time::timeout(self.timeout, client.report_presence(req)).await {
            Ok(r) => Ok(r?.into_inner()),
            Err(_) => Err(ControlError::Timeout(self.timeout)),
        }
    }

    /// Opens `Relay.Attach` and waits for the call context (the first reply). A stream's
    /// first attach carries its `proof`; a reconnect of the relay's own stream none.
    pub async fn attach(
        &self,
        call_id: &CallId,
        relay_id: &str,
        reconnect: bool,
        proof: Option<AttachProof>,
    ) -> Result<(pb::CallContext, AttachStream), ControlError> {
        let fut = async {
            let (mut tx, rx) = mpsc::channel(ATTACH_OUT_SLOTS);
            let proof = proof.unwrap_or(AttachProof {
                credential_id: String::new(),
                origin: pb::StreamOrigin::Unspecified,
                takes_over: String::new(),
                attempt: String::new(),
                credential_expires_at_ms: 0,
                twilio_call_sid: None,
            });
            let open = pb::AttachRequest {
                msg: Some(pb::attach_request::Msg::Open(pb::AttachOpen {
                    call_id: call_id.as_str().to_owned(),
                    relay_id: relay_id.to_owned(),
                    reconnect,
                    stream_credential_id: proof.credential_id,
                    stream_credential_expires_at_ms: proof.credential_expires_at_ms,
                    twilio_call_sid: proof.twilio_call_sid.unwrap_or_default(),
                    stream_origin: proof.origin as i32,
                    takes_over_stream_id: proof.takes_over,
                    attach_attempt_id: proof.attempt,
                    // Sent when the context names an interval (control_link).
                    heartbeats: true,
                })),
            };
            tx.send(Box::new(open))
                .await
                .map_err(|_| ControlError::NoContext)?;
            let mut client = RelayClient::clone(&self.client);
            let up = rx.map(|r| *r);
            let mut stream = client.attach(up).await?.into_inner();
            loop {
                match stream.message().await? {
                    Some(pb::AttachResponse {
                        msg: Some(pb::attach_response::Msg::Context(ctx)),
                    }) => return Ok((ctx, AttachStream { tx, rx: stream })),
                    // Nothing else may come before the context; tolerate and keep waiting.
                    Some(_) => continue,
                    None => return Err(ControlError::NoContext),
                }
            }
        };
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err(ControlError::Timeout(self.timeout)),
        }
    }
}

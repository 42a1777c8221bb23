//! A media stream between the upgrade and the call: nothing costly happens until Twilio's
//! `start` proves the stream is the one the relay's TwiML opened.
//!
//! The upgrade itself is only checked for its signature (the same value for every stream
//! to a path, so proof of nothing but the path). Then, within `RELAY_START_TIMEOUT_MS`, the
//! `start` message must carry, in `customParameters`, the `callId` of the path and a valid,
//! unexpired stream credential (`crate::stream_credential`). Only then is the call attached
//! at control — which consumes the credential (a second use from any relay is refused) and
//! checks `start.callSid` against the CallSid it admitted — or, standalone, the credential
//! consumed on this relay; and only after that does the call dial the model. An attach
//! that cannot reach control (a replica restarting) is retried for a while; the caller's
//! audio meanwhile is kept, the latest of it, for the call.
//!
//! A refused stream is closed with a close code and reason of its own ([`Refusal`],
//! `docs/protocols.md`, "Stream refusals"), counted in
//! `callbridge_relay_stream_refusals_total{reason}`, and has touched no stored state.

use std::collections::VecDeque;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::time::{Instant, sleep_until, timeout, timeout_at};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message};
use tonic::Code;
use tracing::{debug, info, warn};

use crate::agent::AgentView;
use crate::call::{CallDeps, CallSetup, TWILIO_MAX_ACCEPTED};
use crate::call_id::CallId;
use crate::control::{AttachProof, ControlError, REFUSAL_METADATA};
use crate::stream_credential::{CredentialError, StreamCredentials, now_ms};
use crate::twilio::{self, CallSid, TwilioEventKind, TwilioWs};

/// Frames kept from before `start` (Twilio sends only `connected` first); more are
/// dropped and counted as bad messages.
const EARLY_FRAMES: usize = 16;
/// Longest wait for a refused stream's close frame to go out.
const CLOSE_WAIT: Duration = Duration::from_secs(2);
/// How long a stream's attach is retried while control cannot be reached: a control
/// replica's restart, well within the credential's life.
const ATTACH_RETRY: Duration = Duration::from_secs(10);
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(1);
/// Caller frames kept while the attach waits: what the call's media rate lets through at
/// once ([`crate::call::media_rate::BURST`]).
const WAIT_FRAMES: usize = (crate::call::media_rate::BURST.as_millis()
    / crate::call::media_rate::FRAME.as_millis()) as usize;

/// Which stream route the upgrade came in on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `/api/twilio/media-stream/{callId}`: a call stored by control.
    Call(CallId),
    /// `/api/twilio/media-stream-simple`: the standalone agent (no control configured).
    Standalone,
}

impl Route {
    fn call_id(&self) -> Option<&CallId> {
        match self {
            Route::Call(id) => Some(id),
            Route::Standalone => None,
        }
    }
}

/// Why a stream was refused at `start`. Each has its own close code and reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The socket closed before `start` (nothing to send a close to).
    ClosedBeforeStart,
    /// No `start` within `RELAY_START_TIMEOUT_MS`.
    NoStart,
    /// `start` without a usable body or stream id.
    BadStart,
    /// No credential in `customParameters`.
    CredentialMissing,
    /// A credential that is not ours, or not for this call or route.
    CredentialInvalid,
    /// A credential past its expiry.
    CredentialExpired,
    /// A credential used before (control, or this relay for a standalone stream).
    CredentialUsed,
    /// `customParameters.callId` is missing or names another call than the path.
    CallIdMismatch,
    /// `start.callSid` is not the CallSid control admitted the call with.
    CallSidMismatch,
    /// The stream was minted for a call state that is gone: a replayed voice webhook or
    /// action request of a call that has moved on (control's `stream_superseded`).
    Superseded,
    /// Control knows no such call.
    UnknownCall,
    /// The call has ended.
    CallEnded,
    /// Another live stream holds the call.
    AlreadyAttached,
    /// Control could not be asked, or answered something unusable.
    ControlUnavailable,
}

impl Refusal {
    /// All of them, for documentation tests and metrics.
    pub const ALL: [Refusal; 14] = [
        Refusal::ClosedBeforeStart,
        Refusal::NoStart,
        Refusal::BadStart,
        Refusal::CredentialMissing,
        Refusal::CredentialInvalid,
        Refusal::CredentialExpired,
        Refusal::CredentialUsed,
        Refusal::CallIdMismatch,
        Refusal::CallSidMismatch,
        Refusal::Superseded,
        Refusal::UnknownCall,
        Refusal::CallEnded,
        Refusal::AlreadyAttached,
        Refusal::ControlUnavailable,
    ];

    /// The WebSocket close code (4000–4999: private use).
    pub fn close_code(self) -> u16 {
        match self {
            Refusal::ClosedBeforeStart => 1000,
            Refusal::BadStart => 4400,
            Refusal::CredentialMissing | Refusal::CredentialInvalid => 4401,
            Refusal::CallIdMismatch => 4402,
            Refusal::CallSidMismatch => 4403,
            Refusal::UnknownCall => 4404,
            Refusal::NoStart => 4408,
            Refusal::CredentialUsed => 4409,
            Refusal::CredentialExpired => 4410,
            Refusal::Superseded => 4411,
            Refusal::CallEnded => 4412,
            Refusal::AlreadyAttached => 4423,
            Refusal::ControlUnavailable => 4503,
        }
    }

    /// The close frame's reason text.
    pub fn reason(self) -> &'static str {
        match self {
            Refusal::ClosedBeforeStart => "closed before start",
            Refusal::NoStart => "no start in time",
            Refusal::BadStart => "malformed start",
            Refusal::CredentialMissing => "stream credential missing",
            Refusal::CredentialInvalid => "stream credential invalid",
            Refusal::CredentialExpired => "stream credential expired",
            Refusal::CredentialUsed => "stream credential already used",
            Refusal::CallIdMismatch => "callId parameter does not match the stream path",
            Refusal::CallSidMismatch => "callSid is not the admitted call's",
            Refusal::Superseded => "stream superseded",
            Refusal::UnknownCall => "unknown call",
            Refusal::CallEnded => "call has ended",
            Refusal::AlreadyAttached => "call is already attached",
            Refusal::ControlUnavailable => "control plane unavailable",
        }
    }

    /// The `reason` label of `callbridge_relay_stream_refusals_total`.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::ClosedBeforeStart => "closed_before_start",
            Refusal::NoStart => "start_timeout",
            Refusal::BadStart => "bad_start",
            Refusal::CredentialMissing => "credential_missing",
            Refusal::CredentialInvalid => "credential_invalid",
            Refusal::CredentialExpired => "credential_expired",
            Refusal::CredentialUsed => "credential_used",
            Refusal::CallIdMismatch => "call_id_mismatch",
            Refusal::CallSidMismatch => "call_sid_mismatch",
            Refusal::Superseded => "stream_superseded",
            Refusal::UnknownCall => "unknown_call",
            Refusal::CallEnded => "call_ended",
            Refusal::AlreadyAttached => "already_attached",
            Refusal::ControlUnavailable => "control_unavailable",
        }
    }

    fn from_credential(e: CredentialError) -> Self {
        match e {
            CredentialError::Missing => Refusal::CredentialMissing,
            CredentialError::Invalid => Refusal::CredentialInvalid,
            CredentialError::Expired => Refusal::CredentialExpired,
        }
    }

    /// How control's refusal of the attach reads at `start`.
    fn from_control(e: &ControlError) -> Self {
        if let ControlError::Status(s) = e
            && let Some(reason) = s.metadata().get(REFUSAL_METADATA)
        {
            match reason.as_bytes() {
                b"credential_used" => return Refusal::CredentialUsed,
                b"call_sid_mismatch" => return Refusal::CallSidMismatch,
                b"stream_superseded" => return Refusal::Superseded,
                _ => {}
            }
        }
        match e.code() {
            Code::NotFound => Refusal::UnknownCall,
            Code::FailedPrecondition => Refusal::CallEnded,
            Code::AlreadyExists => Refusal::AlreadyAttached,
            _ => Refusal::ControlUnavailable,
        }
    }
}

/// A stream that passed its checks: what the call starts with.
pub struct Admitted {
    /// The call's setup (attached, for a stored call).
    pub setup: CallSetup,
    /// The frames read so far, `start` last, for the call to handle first.
    pub early: Vec<Message>,
}

/// Reads the stream up to `start` and runs its checks (module docs).
pub async fn admit(
    ws: &mut TwilioWs,
    route: &Route,
    deps: &CallDeps,
    creds: &StreamCredentials,
    upgraded_at: Instant,
) -> Result<Admitted, Refusal> {
    let deadline = upgraded_at + deps.config.start_timeout();
    let mut early = Vec::new();
    loop {
        let msg = match timeout_at(deadline, ws.next()).await {
            Err(_) => return Err(Refusal::NoStart),
            Ok(None | Some(Err(_)) | Some(Ok(Message::Close(_)))) => {
                return Err(Refusal::ClosedBeforeStart);
            }
            Ok(Some(Ok(m))) => m,
        };
        let is_start = match &msg {
            Message::Text(t) => {
                t.len() <= TWILIO_MAX_ACCEPTED
                    && twilio::parse(t.as_str()).is_ok_and(|p| p.event == TwilioEventKind::Start)
            }
            _ => false,
        };
        if is_start {
            let checked = check_start(&msg, route, deps, creds).await?;
            early.push(msg);
            let setup = match checked {
                Checked::Standalone(stream) => CallSetup {
                    call_id: None,
                    standalone_stream: Some(stream),
                    agent: AgentView::standalone(&deps.config),
                    attach: None,
                    upgraded_at,
                },
                Checked::Attach { call_id, proof } => {
                    let mut waiting = WaitingFrames::default();
                    let setup = attach(ws, &mut waiting, call_id, proof, deps, upgraded_at).await;
                    early.extend(waiting.frames);
                    setup?
                }
            };
            return Ok(Admitted { setup, early });
        }
        if early.len() < EARLY_FRAMES {
            early.push(msg);
        } else {
            deps.metrics.bad_twilio().inc();
        }
    }
}

/// A `start` that passed the relay's own checks.
enum Checked {
    /// A standalone stream, its credential (named by this id) consumed here.
    Standalone(String),
    /// A stored call, to attach at control with this proof.
    Attach { call_id: CallId, proof: AttachProof },
}

/// The checks of a `start` message that need no control plane, cheapest first.
async fn check_start(
    msg: &Message,
    route: &Route,
    deps: &CallDeps,
    creds: &StreamCredentials,
) -> Result<Checked, Refusal> {
    let Message::Text(text) = msg else {
        return Err(Refusal::BadStart);
    };
    let parsed = twilio::parse(text.as_str()).map_err(|_| Refusal::BadStart)?;
    let start = parsed.start.ok_or(Refusal::BadStart)?;
    if twilio::StreamSid::new(start.stream_sid.as_ref()).is_none() {
        return Err(Refusal::BadStart);
    }
    let params = start.custom_parameters.as_ref();
    let param = |name: &str| params.and_then(|p| p.get(name)).map(String::as_str);
    if let Route::Call(call_id) = route
        && param(callbridge_proto::paths::CALL_ID_PARAM) != Some(call_id.as_str())
    {
        return Err(Refusal::CallIdMismatch);
    }
    let now = now_ms();
    let cred = creds
        .key
        .verify_after(
            param(crate::stream_credential::PARAMETER),
            route.call_id(),
            param(crate::stream_credential::TAKES_OVER_PARAMETER),
            now,
        )
        .map_err(Refusal::from_credential)?;
    let call_sid = CallSid::new(start.call_sid.as_ref());
    match route {
        Route::Standalone => {
            if creds.used.consume(&cred, now).await {
                Ok(Checked::Standalone(cred.id))
            } else {
                Err(Refusal::CredentialUsed)
            }
        }
        Route::Call(call_id) if deps.control.is_some() => Ok(Checked::Attach {
            call_id: call_id.clone(),
            proof: AttachProof::of(cred, call_sid.map(|s| s.as_str().to_owned())),
        }),
        Route::Call(_) => Err(Refusal::ControlUnavailable),
    }
}

/// The caller's frames read while the attach waits for control: the latest
/// [`WAIT_FRAMES`] are kept (older audio is stale by the time the call starts).
#[derive(Default)]
struct WaitingFrames {
    frames: VecDeque<Message>,
    /// The caller's socket ended (a hang-up: `stop`, then close) while the attach was in
    /// flight. The attach still runs to its answer, retries included: control may already
    /// have consumed the credential and taken the lease (an answer lost on the way is such
    /// a case), and only an attached call can report the hang-up.
    caller_gone: bool,
}

impl WaitingFrames {
    /// Keeps the next frame from the socket, or notes that the caller has gone.
    fn keep(&mut self, next: Option<Result<Message, tungstenite::Error>>, deps: &CallDeps) {
        match next {
            None | Some(Err(_)) | Some(Ok(Message::Close(_))) => self.caller_gone = true,
            Some(Ok(m)) => {
                if self.frames.len() == WAIT_FRAMES {
                    self.frames.pop_front();
                    deps.metrics.rate_dropped().inc();
                }
                self.frames.push_back(m);
            }
        }
    }
}

/// Attaches the call at control, which consumes the credential. While control cannot be
/// reached (a replica restarting, a connection cut) the attach is retried for up to
/// [`ATTACH_RETRY`], reading the caller's frames meanwhile; any answer of control's is
/// final.
async fn attach(
    ws: &mut TwilioWs,
    waiting: &mut WaitingFrames,
    call_id: CallId,
    proof: AttachProof,
    deps: &CallDeps,
    upgraded_at: Instant,
) -> Result<CallSetup, Refusal> {
    let Some(control) = &deps.control else {
        return Err(Refusal::ControlUnavailable);
    };
    let give_up = Instant::now() + ATTACH_RETRY;
    let mut backoff = RETRY_MIN;
    let (ctx, stream) = loop {
        let attempt = control.attach(&call_id, &deps.relay_id, false, Some(proof.clone()));
        let mut attempt = std::pin::pin!(attempt);
        let result = loop {
            tokio::select! {
                r = &mut attempt => break r,
                next = ws.next(), if !waiting.caller_gone => waiting.keep(next, deps),
            }
        };
        let e = match result {
            // A caller who hung up meanwhile is reported by the call (its `stop` is among
            // the frames kept, its socket reads as closed): one end, the caller's.
            Ok(attached) => break attached,
            Err(e) => e,
        };
        let refusal = Refusal::from_control(&e);
        let retry_at = Instant::now() + backoff;
        if !e.is_transient() || retry_at > give_up {
            debug!(error = %e, "Attach refused at start.");
            return Err(refusal);
        }
        warn!(error = %e, "Control unreachable at start; retrying the attach.");
        let mut wait = std::pin::pin!(sleep_until(retry_at));
        loop {
            tokio::select! {
                () = &mut wait => break,
                next = ws.next(), if !waiting.caller_gone => waiting.keep(next, deps),
            }
        }
        backoff = (backoff * 2).min(RETRY_MAX);
    };
    let Some(agent) = ctx.agent.as_ref().map(AgentView::from_agent) else {
        warn!("Call context without agent.");
        return Err(Refusal::ControlUnavailable);
    };
    Ok(CallSetup {
        call_id: Some(call_id),
        standalone_stream: None,
        agent,
        attach: Some((ctx, stream)),
        upgraded_at,
    })
}

/// Closes a refused stream with its code and reason, and counts it.
pub async fn refuse(mut ws: TwilioWs, refusal: Refusal, deps: &CallDeps) {
    deps.metrics.stream_refused(refusal.label());
    info!(
        reason = refusal.label(),
        code = refusal.close_code(),
        "Media stream refused."
    );
    if refusal == Refusal::ClosedBeforeStart {
        return;
    }
    let frame = CloseFrame {
        code: CloseCode::from(refusal.close_code()),
        reason: refusal.reason().into(),
    };
    // Send the close, then wait (bounded) for Twilio's, so the frame is not lost to a reset.
    let _ = timeout(CLOSE_WAIT, async {
        if ws.send(Message::Close(Some(frame))).await.is_ok() {
            while let Some(Ok(_)) = ws.next().await {}
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_have_distinct_labels_and_private_close_codes() {
        let mut labels: Vec<_> = Refusal::ALL.iter().map(|r| r.label()).collect();
        labels.sort_unstable();
        labels.dedup();
        assert_eq!(labels.len(), Refusal::ALL.len());
        for r in Refusal::ALL {
            if r != Refusal::ClosedBeforeStart {
                assert!((4000..5000).contains(&r.close_code()), "{r:?}");
            }
            // A close frame's reason must fit in a control frame (123 bytes).
            assert!(r.reason().len() <= 123, "{r:?}");
        }
        // The ones a replay or a forgery meets are told apart by code, not only by text.
        let codes: Vec<u16> = [
            Refusal::CredentialInvalid,
            Refusal::CallIdMismatch,
            Refusal::CallSidMismatch,
            Refusal::CredentialUsed,
            Refusal::CredentialExpired,
            Refusal::AlreadyAttached,
            Refusal::UnknownCall,
            Refusal::CallEnded,
        ]
        .iter()
        .map(|r| r.close_code())
        .collect();
        let mut unique = codes.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), codes.len(), "{codes:?}");
    }

    #[test]
    fn control_refusals_map_by_reason_then_code() {
        let with_reason = |code: Code, reason: &'static str| {
            let mut s = tonic::Status::new(code, "refused");
            s.metadata_mut().insert(
                REFUSAL_METADATA,
                tonic::metadata::MetadataValue::from_static(reason),
            );
            ControlError::Status(s)
        };
        assert_eq!(
            Refusal::from_control(&with_reason(Code::PermissionDenied, "credential_used")),
            Refusal::CredentialUsed
        );
        assert_eq!(
            Refusal::from_control(&with_reason(Code::PermissionDenied, "call_sid_mismatch")),
            Refusal::CallSidMismatch
        );
        let plain = |code| ControlError::Status(tonic::Status::new(code, "x"));
        assert_eq!(
            Refusal::from_control(&plain(Code::NotFound)),
            Refusal::UnknownCall
        );
        assert_eq!(
            Refusal::from_control(&plain(Code::FailedPrecondition)),
            Refusal::CallEnded
        );
        assert_eq!(
            Refusal::from_control(&plain(Code::AlreadyExists)),
            Refusal::AlreadyAttached
        );
        // A permission refusal without a reason is control refusing the relay itself.
        assert_eq!(
            Refusal::from_control(&plain(Code::PermissionDenied)),
            Refusal::ControlUnavailable
        );
        assert_eq!(
            Refusal::from_control(&ControlError::Timeout(Duration::from_secs(1))),
            Refusal::ControlUnavailable
        );
    }
}

//! The relay's HTTP and WebSocket surface (warp).
//!
//! | method, path | what |
//! |---|---|
//! | `POST /api/twilio/voice` | voice webhook → TwiML (`?callId=` for pre-created calls) |
//! | `POST /api/twilio/after/{callId}` | `<Connect action>` → TwiML for what comes next |
//! | `POST /api/twilio/after-simple` | a standalone stream's `<Connect action>` ([`crate::standalone_after`]; 404 when `CONTROL_URL` is set) |
//! | `WS /api/twilio/media-stream/{callId}` | control-backed media stream |
//! | `WS /api/twilio/media-stream-simple` | standalone media stream (404 when `CONTROL_URL` is set) |
//! | `POST /api/twilio/status` | status callbacks ([`crate::status_callback`]) |
//! | `POST /api/twilio/fallback` | the number's fallback URL ([`crate::twilio_fallback`]) |
//! | `GET /healthz`, `GET /readyz` | liveness, readiness (503 while draining) |
//!
//! While draining only `/readyz` and new stream upgrades answer 503; webhooks and action
//! requests are answered as usual (with `Connection: close`), see [`crate::drain`].
//! Anything else is 404 without an upgrade; `/metrics` is served on its own listener
//! ([`crate::listen`]). Above `RELAY_MAX_CALLS` the webhook and both stream routes answer
//! 503 with `Retry-After` ([`crate::capacity`]). Twilio requests must carry a valid
//! `X-Twilio-Signature` (403 otherwise). Every TwiML answer that opens a stream carries a
//! fresh stream credential; a stream is upgraded on its signature alone and proves itself
//! at `start` ([`stream_admission`]), before it is attached or the model is dialled.
//! Control errors at webhook time: no agent for the
//! number (`NOT_FOUND`) → 200 TwiML that apologises and hangs up (Twilio needs TwiML, and
//! retrying would not help); ended call → 200 `<Hangup/>`; control unreachable or failing
//! → 503, so Twilio's configured fallback URL takes over. While the model endpoint's
//! circuit breaker is open ([`crate::model_breaker`]) the webhook answers the agent's
//! fallback instead of a stream (standalone: the apology of [`crate::twilio_fallback`],
//! with `RELAY_FALLBACK_DIAL`).

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use callbridge_proto::{paths, pb};
use http::{HeaderValue, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_util::task::TaskTracker;
use tonic::Code;
use tracing::{Instrument, debug, info_span, warn};
use warp::hyper::upgrade::OnUpgrade;
use warp::reply::Response;
use warp::{Filter, Rejection, Reply};

use crate::call::{self, CallDeps, TWILIO_MAX_MESSAGE};
use crate::call_id::{self as ids, CallId};
use crate::capacity::{AtCapacity, Refused, below_max_calls};
use crate::control::{ActionStream, ControlError};
use crate::model_breaker::ShortCircuit;
use crate::stream_admission::{self, Route};
use crate::stream_credential::{self, Segment, StreamCredentials};
use crate::{signature, twiml};

/// Largest webhook body accepted.
const MAX_FORM_BYTES: u64 = 64 * 1024;
/// Twilio socket read buffer (see [`twilio_ws_config`]).
const TWILIO_READ_BUFFER: usize = 4 * 1024;
/// Frames written before a flush forces them out; the writer flushes every batch anyway.
const TWILIO_WRITE_BUFFER: usize = 8 * 1024;

/// Shared by every request; clone-cheap.
#[derive(Clone)]
pub struct Deps {
    /// What calls need.
    pub call: CallDeps,
    /// True once shutdown began.
    pub draining: Arc<AtomicBool>,
    /// Tracks every live call for the drain.
    pub tracker: TaskTracker,
    /// Mints the credential of every stream the relay's TwiML opens, and checks them.
    pub streams: Arc<StreamCredentials>,
}

impl Deps {
    fn draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }
}

fn with_deps(deps: Deps) -> impl Filter<Extract = (Deps,), Error = Infallible> + Clone {
    warp::any().map(move || deps.clone())
}

fn optional_raw_query() -> impl Filter<Extract = (String,), Error = Infallible> + Clone {
    warp::query::raw().or(warp::any().map(String::new)).unify()
}

fn signature_header() -> impl Filter<Extract = (Option<String>,), Error = Rejection> + Clone {
    warp::header::optional::<String>("x-twilio-signature")
}

pub(crate) fn text(status: StatusCode, body: &'static str) -> Response {
    warp::reply::with_status(body, status).into_response()
}

fn xml(body: String) -> Response {
    warp::reply::with_header(body, "content-type", twiml::CONTENT_TYPE).into_response()
}

/// Checks the Twilio signature of a request to `url` with `params`.
pub(crate) fn signed(
    deps: &Deps,
    route: &'static str,
    url: &str,
    params: &[(String, String)],
    sig: Option<&str>,
) -> bool {
    let cfg = &deps.call.config;
    if cfg.insecure_skip_signature {
        return true;
    }
    let refused = match (&cfg.twilio_auth_token, sig) {
        (Some(token), Some(sig)) if signature::validate(token, url, params, sig) => return true,
        (Some(_), Some(_)) => "invalid",
        _ => "missing",
    };
    // Counted, not logged per request: a probe must not flood the log. A steady rate
    // on Twilio's own routes means RELAY_PUBLIC_URL or TWILIO_AUTH_TOKEN is wrong.
    deps.call.metrics.signature_refused(route, refused);
    false
}

/// `url` with the query string as Twilio sent it (Twilio signs it as requested).
pub(crate) fn with_query(url: String, raw_query: &str) -> String {
    if raw_query.is_empty() {
        url
    } else {
        format!("{url}?{raw_query}")
    }
}

pub(crate) fn param<'a>(form: &'a [(String, String)], name: &str) -> &'a str {
    form.iter()
        .find(|(k, _)| k == name)
        .map_or("", |(_, v)| v.as_str())
}

fn control_status(e: &ControlError) -> StatusCode {
    match e.code() {
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::FailedPrecondition => StatusCode::GONE,
        Code::AlreadyExists => StatusCode::CONFLICT,
        Code::InvalidArgument => StatusCode::BAD_REQUEST,
        Code::Unauthenticated | Code::PermissionDenied => StatusCode::BAD_GATEWAY,
        _ => StatusCode::SERVICE_UNAVAILABLE,
    }
}

/// `POST /api/twilio/voice` — the voice webhook.
async fn voice(
    raw_query: String,
    sig: Option<String>,
    form: Vec<(String, String)>,
    deps: Deps,
) -> Result<Response, Infallible> {
    let cfg = deps.call.config.clone();
    let url = with_query(paths::voice_webhook(&cfg.public_url, None), &raw_query);
    if !signed(&deps, "voice", &url, &form, sig.as_deref()) {
        return Ok(text(StatusCode::FORBIDDEN, "invalid X-Twilio-Signature\n"));
    }
    // Answered while draining too: the TwiML only names the public URL, and the stream
    // it opens goes wherever the load balancer sends it (a 503 here is a call Twilio sends
    // to the fallback URL, not one it retries).
    let Some(control) = &deps.call.control else {
        // The standalone agent's fallback is the relay's own: the apology, then
        // RELAY_FALLBACK_DIAL when set.
        if !model_admits(&deps) {
            return Ok(xml(crate::twilio_fallback::answer(
                cfg.fallback_dial.as_deref(),
            )));
        }
        let credential = deps.streams.mint_standalone();
        return Ok(xml(twiml::connect_simple(
            &cfg.public_url,
            &cfg.public_ws_base(),
            &credential,
            1,
        )));
    };
    let Ok(call_id) =
        CallId::parse_optional(query_param(&raw_query, paths::CALL_ID_PARAM).unwrap_or_default())
    else {
        return Ok(text(StatusCode::BAD_REQUEST, "callId: invalid\n"));
    };
    let req = pb::AdmitRequest {
        call_id: ids::to_proto(call_id.as_ref()),
        twilio_call_sid: param(&form, "CallSid").to_owned(),
        from: param(&form, "From").to_owned(),
        to: param(&form, "To").to_owned(),
        twilio_direction: param(&form, "Direction").to_owned(),
        account_sid: param(&form, "AccountSid").to_owned(),
    };
    match control.admit(req).await {
        Ok(resp) => {
            let Some(call) = resp.call else {
                warn!("Admit answered without a call.");
                return Ok(text(
                    StatusCode::BAD_GATEWAY,
                    "control answered without a call\n",
                ));
            };
            let Ok(call_id) = CallId::parse(call.call_id) else {
                warn!("Admit answered with an invalid call id.");
                return Ok(text(
                    StatusCode::BAD_GATEWAY,
                    "control answered with an invalid call id\n",
                ));
            };
            let settings = resp.agent.as_ref().and_then(|a| a.settings.as_ref());
            if settings.and_then(|s| s.realtime_enabled) == Some(false) {
                let fb = settings.and_then(|s| s.fallback.as_ref());
                return Ok(xml(twiml::fallback(fb)));
            }
            if !model_admits(&deps) {
                // Control stores the call's end as it would have from the stream.
                crate::fallback_end::spawn(
                    &deps.call,
                    &deps.streams,
                    &deps.tracker,
                    call_id,
                    param(&form, "CallSid"),
                );
                let fb = settings.and_then(|s| s.fallback.as_ref());
                return Ok(xml(twiml::fallback(fb)));
            }
            let credential = deps.streams.mint_after(&call_id, Segment::First, None);
            Ok(xml(twiml::connect_stream(
                &cfg.public_url,
                &cfg.public_ws_base(),
                &call_id,
                &credential,
                None,
            )))
        }
        Err(e) if e.is_transient() => {
            warn!(error = %e, "Admit failed: control unreachable.");
            Ok(text(control_status(&e), "control plane unavailable\n"))
        }
        Err(e) => {
            debug!(error = %e, "Admit refused.");
            Ok(match e.code() {
                Code::NotFound => xml(twiml::say_and_hangup(
                    "Sorry, this number is not in service. Goodbye.",
                )),
                Code::FailedPrecondition => xml(twiml::hangup()),
                _ => text(control_status(&e), "control plane unavailable\n"),
            })
        }
    }
}

/// Whether a new call may be streamed to the model: not while the endpoint's circuit
/// breaker is open (the caller would wait out the dial timeout in silence for nothing).
pub(crate) fn model_admits(deps: &Deps) -> bool {
    deps.call
        .breakers
        .admits(&deps.call.config.openai_realtime_url, ShortCircuit::Webhook)
}

/// The first value of `name` in a raw query string, decoded as a form (`+` is a space,
/// a malformed `%` escape is kept as written).
pub(crate) fn query_param(raw_query: &str, name: &str) -> Option<String> {
    form_urlencoded::parse(raw_query.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

/// `POST /api/twilio/after/{callId}` — what the caller gets after the stream.
async fn after(
    call_id: String,
    raw_query: String,
    sig: Option<String>,
    form: Vec<(String, String)>,
    deps: Deps,
) -> Result<Response, Infallible> {
    let cfg = deps.call.config.clone();
    let url = with_query(paths::after(&cfg.public_url, &call_id), &raw_query);
    if !signed(&deps, "action", &url, &form, sig.as_deref()) {
        return Ok(text(StatusCode::FORBIDDEN, "invalid X-Twilio-Signature\n"));
    }
    let Ok(call_id) = CallId::parse(call_id) else {
        return Ok(text(StatusCode::BAD_REQUEST, "callId: invalid\n"));
    };
    // Which stream the action request speaks for (absent in URLs of older relays).
    let stream_param = |name: &str, bad: &'static str| match query_param(&raw_query, name) {
        None => Ok(None),
        Some(id) if stream_credential::is_id(&id) => Ok(Some(id)),
        Some(_) => Err(bad),
    };
    let asked = match (
        stream_param(
            paths::AFTER_STREAM_PARAM,
            "stream: not a stream id (32 lowercase hex digits)\n",
        ),
        stream_param(
            paths::AFTER_PREVIOUS_PARAM,
            "after: not a stream id (32 lowercase hex digits)\n",
        ),
    ) {
        (Ok(None), Ok(Some(_))) => {
            return Ok(text(StatusCode::BAD_REQUEST, "after: only with stream\n"));
        }
        (Ok(stream), Ok(after)) => ActionStream { stream, after },
        (Err(bad), _) | (_, Err(bad)) => return Ok(text(StatusCode::BAD_REQUEST, bad)),
    };
    let Some(control) = &deps.call.control else {
        return Ok(xml(twiml::hangup()));
    };
    use pb::after_response::Next;
    match control.after(&call_id, &asked).await {
        Ok(resp) => Ok(xml(match resp.next {
            Some(Next::Hangup(_)) | None => twiml::hangup(),
            Some(Next::DialNumber(n)) => twiml::dial(&n),
            Some(Next::Fallback(f)) => twiml::fallback(Some(&f)),
            Some(Next::Voicemail(v)) => twiml::voicemail(&v),
            Some(Next::Resume(resume)) => {
                // A new segment of the call (a hand-off or failover): a new credential,
                // bound to the stream control says it takes the call over from.
                let takes_over = Some(resume.takes_over_stream_id).filter(|id| !id.is_empty());
                if takes_over
                    .as_deref()
                    .is_some_and(|id| !stream_credential::is_id(id))
                {
                    warn!(
                        "Control answered Resume with an invalid stream id; the caller gets the fallback."
                    );
                    return Ok(xml(twiml::fallback(None)));
                }
                let credential =
                    deps.streams
                        .mint_after(&call_id, Segment::Resume, takes_over.as_deref());
                twiml::connect_stream(
                    &cfg.public_url,
                    &cfg.public_ws_base(),
                    &call_id,
                    &credential,
                    takes_over.as_deref(),
                )
            }
        })),
        Err(e) => {
            if e.is_transient() {
                warn!(error = %e, "After failed: control unreachable.");
            } else {
                debug!(error = %e, "After failed.");
            }
            Ok(match e.code() {
                // The call is unknown: nothing sensible to continue with.
                Code::NotFound => xml(twiml::hangup()),
                // Control is down: give the caller the default apology rather than silence.
                _ => xml(twiml::fallback(None)),
            })
        }
    }
}

/// [`after`], and the drain told when a call it waits for was answered here.
async fn after_for_drain(
    call_id: String,
    raw_query: String,
    sig: Option<String>,
    form: Vec<(String, String)>,
    deps: Deps,
) -> Result<Response, Infallible> {
    let id = CallId::parse(call_id.as_str()).ok();
    let resp = after(call_id, raw_query, sig, form, deps.clone()).await?;
    if let Some(id) = id
        && resp.status() == StatusCode::OK
    {
        deps.call.actions_due.answered(&id);
    }
    Ok(resp)
}

/// `WS /api/twilio/media-stream/{callId}` — checks the signature and upgrades; the
/// stream's real checks, and the attach, wait for `start` ([`stream_admission`]).
async fn media_stream(
    call_id: String,
    sig: Option<String>,
    ws: WsUpgrade,
    deps: Deps,
) -> Result<Response, Infallible> {
    let cfg = deps.call.config.clone();
    let url = paths::media_stream(&cfg.public_ws_base(), &call_id);
    if !signed(&deps, "media_stream", &url, &[], sig.as_deref()) {
        return Ok(text(StatusCode::FORBIDDEN, "invalid X-Twilio-Signature\n"));
    }
    let Ok(call_id) = CallId::parse(call_id) else {
        return Ok(text(StatusCode::NOT_FOUND, "unknown call\n"));
    };
    if deps.draining() {
        return Ok(text(StatusCode::SERVICE_UNAVAILABLE, "relay is draining\n"));
    }
    if deps.call.control.is_none() {
        return Ok(text(
            StatusCode::NOT_FOUND,
            "control-backed streams need CONTROL_URL\n",
        ));
    }
    let span_id = call_id.to_string();
    Ok(upgrade(ws, Route::Call(call_id), deps, span_id))
}

/// `WS /api/twilio/media-stream-simple` — the standalone agent, nothing stored. Not served
/// when a control plane is configured: every call then is stored and checked by control.
async fn media_stream_simple(
    sig: Option<String>,
    ws: WsUpgrade,
    deps: Deps,
) -> Result<Response, Infallible> {
    let cfg = deps.call.config.clone();
    if deps.call.control.is_some() {
        return Ok(text(StatusCode::NOT_FOUND, "not found\n"));
    }
    let url = paths::media_stream_simple(&cfg.public_ws_base());
    if !signed(&deps, "media_stream_simple", &url, &[], sig.as_deref()) {
        return Ok(text(StatusCode::FORBIDDEN, "invalid X-Twilio-Signature\n"));
    }
    if deps.draining() {
        return Ok(text(StatusCode::SERVICE_UNAVAILABLE, "relay is draining\n"));
    }
    Ok(upgrade(
        ws,
        Route::Standalone,
        deps,
        "standalone".to_owned(),
    ))
}

/// Buffers of the Twilio socket, sized for its ~300-byte frames. tungstenite's default
/// 128 KiB read buffer is zero-filled up to its capacity before every `read` (28% of the
/// relay's CPU in the phase A profile, docs/performance.md) and stays resident per call;
/// 4 KiB holds a dozen frames, and a larger message still grows it as needed.
fn twilio_ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(TWILIO_READ_BUFFER)
        .write_buffer_size(TWILIO_WRITE_BUFFER)
        .max_message_size(Some(TWILIO_MAX_MESSAGE))
        .max_frame_size(Some(TWILIO_MAX_MESSAGE))
}

/// A WebSocket upgrade request, checked like `warp::ws()` does; finished by [`upgrade`]
/// (by hand rather than with `warp::ws`, which cannot set the socket's buffer sizes).
pub struct WsUpgrade {
    key: HeaderValue,
    on_upgrade: OnUpgrade,
}

fn ws_upgrade() -> impl Filter<Extract = (WsUpgrade,), Error = Rejection> + Clone {
    warp::get()
        .and(warp::header::headers_cloned())
        .and(warp::ext::optional::<OnUpgrade>())
        .and_then(
            |headers: http::HeaderMap, on_upgrade: Option<OnUpgrade>| async move {
                let has_token = |name: http::header::HeaderName, token: &str| {
                    headers.get_all(name).iter().any(|v| {
                        v.to_str().is_ok_and(|s| {
                            s.split(',').any(|p| p.trim().eq_ignore_ascii_case(token))
                        })
                    })
                };
                let version_13 = headers
                    .get(http::header::SEC_WEBSOCKET_VERSION)
                    .is_some_and(|v| v.as_bytes() == b"13");
                if !has_token(http::header::CONNECTION, "upgrade")
                    || !has_token(http::header::UPGRADE, "websocket")
                    || !version_13
                {
                    return Err(warp::reject());
                }
                match (headers.get(http::header::SEC_WEBSOCKET_KEY), on_upgrade) {
                    (Some(key), Some(on_upgrade)) => Ok(WsUpgrade {
                        key: key.clone(),
                        on_upgrade,
                    }),
                    _ => Err(warp::reject()),
                }
            },
        )
}

fn upgrade(ws: WsUpgrade, route: Route, deps: Deps, call_id: String) -> Response {
    // Held until the call is over, so the drain waits for it.
    let token = deps.tracker.token();
    let call_deps = deps.call.clone();
    let streams = deps.streams.clone();
    let upgraded_at = Instant::now();
    let span = info_span!("call", call_id = %call_id, call_sid = tracing::field::Empty);
    let accept = derive_accept_key(ws.key.as_bytes());
    let on_upgrade = ws.on_upgrade;
    // The span closes (and reaches the trace exporter) before the drain token is
    // released: once the last token goes the relay stops and flushes the exporter.
    let stream = async move {
        match on_upgrade.await {
            Ok(upgraded) => {
                let mut socket = WebSocketStream::from_raw_socket(
                    TokioIo::new(upgraded),
                    Role::Server,
                    Some(twilio_ws_config()),
                )
                .await;
                // Boxed: inline, the admission's state (a control attach in flight) would
                // be part of every call's future for its whole life.
                let admitted = Box::pin(stream_admission::admit(
                    &mut socket,
                    &route,
                    &call_deps,
                    &streams,
                    upgraded_at,
                ))
                .await;
                match admitted {
                    Ok(admitted) => {
                        call::run(socket, admitted.setup, admitted.early, call_deps).await;
                    }
                    Err(refusal) => {
                        Box::pin(stream_admission::refuse(socket, refusal, &call_deps)).await;
                    }
                }
            }
            Err(e) => debug!(error = %e, "WebSocket upgrade failed."),
        }
    }
    .instrument(span);
    // Boxed: a future moved into an async block and awaited there is stored twice in the
    // block's state (rustc does not overlap them), which was 9 KiB more per call.
    let stream = Box::pin(stream);
    tokio::spawn(async move {
        stream.await;
        drop(token);
    });
    let mut resp = StatusCode::SWITCHING_PROTOCOLS.into_response();
    let h = resp.headers_mut();
    h.insert(
        http::header::CONNECTION,
        HeaderValue::from_static("upgrade"),
    );
    h.insert(http::header::UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(v) = HeaderValue::from_str(&accept) {
        h.insert(http::header::SEC_WEBSOCKET_ACCEPT, v);
    }
    resp
}

fn add_security_headers(reply: impl Reply) -> Response {
    let mut resp = reply.into_response();
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        return resp;
    }
    let h = resp.headers_mut();
    for (name, value) in [
        ("x-content-type-options", "nosniff"),
        ("x-frame-options", "DENY"),
        ("referrer-policy", "no-referrer"),
        (
            "content-security-policy",
            "default-src 'none'; frame-ancestors 'none'",
        ),
        (
            "strict-transport-security",
            "max-age=15552000; includeSubDomains",
        ),
        ("cross-origin-resource-policy", "same-origin"),
        ("cross-origin-opener-policy", "same-origin"),
        ("x-dns-prefetch-control", "off"),
        ("x-permitted-cross-domain-policies", "none"),
    ] {
        h.insert(name, HeaderValue::from_static(value));
    }
    resp
}

async fn handle_rejection(err: Rejection) -> Result<Response, Infallible> {
    if err.find::<AtCapacity>().is_some() {
        return Ok(crate::capacity::refusal());
    }
    let status = if err.find::<warp::reject::PayloadTooLarge>().is_some() {
        StatusCode::PAYLOAD_TOO_LARGE
    } else if err.find::<warp::reject::LengthRequired>().is_some() {
        StatusCode::LENGTH_REQUIRED
    } else if err.find::<warp::reject::UnsupportedMediaType>().is_some() {
        StatusCode::UNSUPPORTED_MEDIA_TYPE
    } else if err.find::<warp::body::BodyDeserializeError>().is_some() {
        StatusCode::BAD_REQUEST
    } else {
        StatusCode::NOT_FOUND
    };
    let body = match status {
        StatusCode::NOT_FOUND => "not found\n",
        StatusCode::PAYLOAD_TOO_LARGE => "body too large\n",
        StatusCode::LENGTH_REQUIRED => "content-length required\n",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "expected application/x-www-form-urlencoded\n",
        _ => "malformed form body\n",
    };
    Ok(text(status, body))
}

/// `/api/twilio/{segment}` (more segments may follow), from the shared path constants.
pub(crate) fn twilio_path(
    segment: &'static str,
) -> impl Filter<Extract = (), Error = Rejection> + Clone {
    let [api, twilio] = paths::PREFIX;
    warp::path(api)
        .and(warp::path(twilio))
        .and(warp::path(segment))
}

/// Every route, with rejections mapped and security headers on HTTP answers.
pub fn routes(deps: Deps) -> impl Filter<Extract = (Response,), Error = Infallible> + Clone {
    let healthz = warp::path!("healthz")
        .and(warp::get())
        .map(|| text(StatusCode::OK, "ok\n"));
    let readyz = warp::path!("readyz")
        .and(warp::get())
        .and(with_deps(deps.clone()))
        .map(|deps: Deps| {
            if deps.draining() {
                text(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
            } else {
                text(StatusCode::OK, "ready\n")
            }
        });
    let form = warp::body::content_length_limit(MAX_FORM_BYTES)
        .and(warp::body::form::<Vec<(String, String)>>());
    let voice = twilio_path(paths::VOICE)
        .and(warp::path::end())
        .and(warp::post())
        .and(below_max_calls(deps.clone(), Refused::Webhook))
        .and(optional_raw_query())
        .and(signature_header())
        .and(form)
        .and(with_deps(deps.clone()))
        .and_then(voice);
    let after = twilio_path(paths::AFTER)
        .and(warp::path::param::<String>())
        .and(warp::path::end())
        .and(warp::post())
        .and(optional_raw_query())
        .and(signature_header())
        .and(form)
        .and(with_deps(deps.clone()))
        .and_then(after_for_drain);
    let stream = twilio_path(paths::MEDIA_STREAM)
        .and(warp::path::param::<String>())
        .and(warp::path::end())
        .and(signature_header())
        .and(ws_upgrade())
        .and(below_max_calls(deps.clone(), Refused::Stream))
        .and(with_deps(deps.clone()))
        .and_then(media_stream);
    let status = crate::status_callback::route(deps.clone());
    let fallback = crate::twilio_fallback::route(deps.clone());
    let after_simple = crate::standalone_after::route(deps.clone());
    let closing = deps.draining.clone();
    let simple = twilio_path(paths::MEDIA_STREAM_SIMPLE)
        .and(warp::path::end())
        .and(signature_header())
        .and(ws_upgrade())
        .and(below_max_calls(deps.clone(), Refused::Stream))
        .and(with_deps(deps))
        .and_then(media_stream_simple);
    healthz
        .or(readyz)
        .unify()
        .or(voice)
        .unify()
        .or(after)
        .unify()
        .or(status)
        .unify()
        .or(fallback)
        .unify()
        .or(after_simple)
        .unify()
        .or(simple)
        .unify()
        .or(stream)
        .unify()
        .recover(handle_rejection)
        .unify()
        .map(add_security_headers)
        .map(move |resp| close_while_draining(resp, &closing))
}

/// While draining, every HTTP answer closes its connection: no kept-alive connection is
/// left idle for the listener's stop to close under a request the client is just sending.
fn close_while_draining(mut resp: Response, draining: &AtomicBool) -> Response {
    if draining.load(Ordering::Relaxed) && resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        resp.headers_mut()
            .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

#[cfg(test)]
mod tests {
    //! The handlers through `warp::test`, without sockets: signatures, refusals, the
    //! draining answers and the upgrade checks. Control-backed answers (Admit, After,
    //! Attach) are in `relay/tests/http_handlers.rs`, against a fake control plane.

    use super::*;
    use crate::config::{Config, Secret};
    use crate::metrics::Metrics;
    use crate::model_breaker::ModelBreakers;
    use crate::stream_ends::Ended;
    use tokio_util::sync::CancellationToken;

    const TOKEN: &str = "twilio-secret";
    const PUBLIC: &str = "https://relay.example.com";

    fn deps(tweak: impl FnOnce(&mut Config)) -> Deps {
        let mut config = Config::for_tests(PUBLIC, "ws://127.0.0.1:9");
        config.insecure_skip_signature = false;
        config.twilio_auth_token = Some(Secret::new(TOKEN));
        tweak(&mut config);
        let control = crate::control::Control::from_config(&config).expect("control URL parses");
        let config_for_streams = config.clone();
        let metrics = Metrics::new();
        let breakers = ModelBreakers::from_config(&config, &metrics);
        Deps {
            call: CallDeps {
                breakers,
                config: Arc::new(config),
                metrics,
                control,
                relay_id: "relay-test".into(),
                hard_stop: CancellationToken::new(),
                drain: CancellationToken::new(),
                actions_due: crate::drain::actions_due(
                    std::time::Duration::ZERO,
                    CancellationToken::new(),
                )
                .0,
                stream_ends: crate::stream_ends::StreamEnds::spawn(),
            },
            draining: Arc::new(AtomicBool::new(false)),
            tracker: TaskTracker::new(),
            streams: Arc::new(StreamCredentials::from_config(&config_for_streams)),
        }
    }

    /// Deps with a control URL where nothing listens (nothing here gets as far as asking).
    fn deps_with_control() -> Deps {
        deps(|c| {
            c.control_url = Some("http://127.0.0.1:9".into());
            c.upstream_connect_timeout_ms = 1000;
        })
    }

    fn form(params: &[(&str, &str)]) -> (Vec<(String, String)>, String) {
        let owned: Vec<(String, String)> = params
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let body = form_urlencoded::Serializer::new(String::new())
            .extend_pairs(&owned)
            .finish();
        (owned, body)
    }

    /// A webhook POST to `path_and_query`, signed over the public URL when `signed`.
    fn post(
        path_and_query: &str,
        params: &[(&str, &str)],
        signed: bool,
    ) -> warp::test::RequestBuilder {
        let (owned, body) = form(params);
        let token = Secret::new(if signed { TOKEN } else { "wrong" });
        let sig = signature::compute(&token, &format!("{PUBLIC}{path_and_query}"), &owned);
        warp::test::request()
            .method("POST")
            .path(path_and_query)
            .header("content-type", "application/x-www-form-urlencoded")
            .header("x-twilio-signature", sig)
            .body(body)
    }

    /// A WebSocket upgrade request like Twilio's, signed over the `wss://` URL when `signed`.
    /// warp::test has no connection to upgrade, so the upgrade itself fails after the 101
    /// (logged at debug); what is tested is the answer.
    fn upgrade_request(path: &str, signed: bool) -> warp::test::RequestBuilder {
        let token = Secret::new(if signed { TOKEN } else { "wrong" });
        let url = format!("{}{path}", paths::ws_base(PUBLIC));
        let sig = signature::compute(&token, &url, &[]);
        let mut pending = http::Request::new(());
        warp::test::request()
            .method("GET")
            .path(path)
            .header("connection", "Upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-version", "13")
            .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
            .header("x-twilio-signature", sig)
            .extension(warp::hyper::upgrade::on(&mut pending))
    }

    fn body(r: &Response<bytes::Bytes>) -> &str {
        std::str::from_utf8(r.body()).expect("UTF-8 body")
    }

    use http::Response;

    #[tokio::test]
    async fn signed_voice_webhook_answers_twiml_with_security_headers() {
        let routes = routes(deps(|_| {}));
        let r = post(
            "/api/twilio/voice",
            &[("CallSid", "CA1"), ("From", "+1 555")],
            true,
        )
        .reply(&routes)
        .await;
        assert_eq!(r.status(), StatusCode::OK, "{}", body(&r));
        assert_eq!(r.headers()["content-type"], twiml::CONTENT_TYPE);
        assert_eq!(r.headers()["x-content-type-options"], "nosniff");
        assert_eq!(r.headers()["x-frame-options"], "DENY");
        assert!(
            body(&r).contains(
                "<Connect action=\"https://relay.example.com/api/twilio/after-simple?stream="
            ) && body(&r).contains(
                "&amp;leg=1\" method=\"POST\"><Stream url=\"wss://relay.example.com/api/twilio/media-stream-simple\"><Parameter name=\"credential\" value=\""
            ),
            "{}",
            body(&r)
        );
    }

    #[tokio::test]
    async fn unsigned_webhooks_are_403() {
        let deps = deps(|_| {});
        let metrics = deps.call.metrics.clone();
        let routes = routes(deps);
        for path in [
            "/api/twilio/voice",
            "/api/twilio/voice?callId=c1",
            "/api/twilio/after/c1",
            "/api/twilio/fallback",
            "/api/twilio/after-simple?stream=0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a&leg=1",
        ] {
            let r = post(path, &[("CallSid", "CA1")], false)
                .reply(&routes)
                .await;
            assert_eq!(r.status(), StatusCode::FORBIDDEN, "{path}");
            assert_eq!(body(&r), "invalid X-Twilio-Signature\n");
            let (_, form_body) = form(&[("CallSid", "CA1")]);
            let r = warp::test::request()
                .method("POST")
                .path(path)
                .header("content-type", "application/x-www-form-urlencoded")
                .body(form_body)
                .reply(&routes)
                .await;
            assert_eq!(r.status(), StatusCode::FORBIDDEN, "{path} without a header");
        }
        // Signed over other parameters than those sent: the signature covers the form.
        let (owned, _) = form(&[("CallSid", "CA1")]);
        let sig = signature::compute(
            &Secret::new(TOKEN),
            &format!("{PUBLIC}/api/twilio/voice"),
            &owned,
        );
        let (_, tampered) = form(&[("CallSid", "CA2")]);
        let r = warp::test::request()
            .method("POST")
            .path("/api/twilio/voice")
            .header("content-type", "application/x-www-form-urlencoded")
            .header("x-twilio-signature", sig)
            .body(tampered)
            .reply(&routes)
            .await;
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
        // Counted by route and reason, where an operator looks.
        let exported = metrics.encode();
        for line in [
            "callbridge_relay_signature_refusals_total{route=\"voice\",reason=\"missing\"} 2",
            "callbridge_relay_signature_refusals_total{route=\"voice\",reason=\"invalid\"} 3",
            "callbridge_relay_signature_refusals_total{route=\"action\",reason=\"missing\"} 1",
            "callbridge_relay_signature_refusals_total{route=\"action\",reason=\"invalid\"} 1",
            "callbridge_relay_signature_refusals_total{route=\"fallback\",reason=\"missing\"} 1",
            "callbridge_relay_signature_refusals_total{route=\"fallback\",reason=\"invalid\"} 1",
            "callbridge_relay_signature_refusals_total{route=\"action_simple\",reason=\"missing\"} 1",
            "callbridge_relay_signature_refusals_total{route=\"action_simple\",reason=\"invalid\"} 1",
        ] {
            assert!(exported.contains(line), "{line} in {exported}");
        }
    }

    #[tokio::test]
    async fn bad_forms_get_a_specific_status() {
        let routes = routes(deps(|_| {}));
        // Not a form at all.
        let r = warp::test::request()
            .method("POST")
            .path("/api/twilio/voice")
            .header("content-type", "application/json")
            .body("{}")
            .reply(&routes)
            .await;
        assert_eq!(r.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
        assert_eq!(body(&r), "expected application/x-www-form-urlencoded\n");
        // Bytes that are not UTF-8 decode lossily (any form decodes into name/value
        // pairs), so such a body can only fail its signature.
        let r = warp::test::request()
            .method("POST")
            .path("/api/twilio/voice")
            .header("content-type", "application/x-www-form-urlencoded")
            .header("x-twilio-signature", "AAAAAAAAAAAAAAAAAAAAAAAAAAA=")
            .body(b"a=\xff\xfe")
            .reply(&routes)
            .await;
        assert_eq!(r.status(), StatusCode::FORBIDDEN, "{}", body(&r));
        // Over the size limit.
        let big = format!("Body={}", "x".repeat(MAX_FORM_BYTES as usize));
        let r = warp::test::request()
            .method("POST")
            .path("/api/twilio/voice")
            .header("content-type", "application/x-www-form-urlencoded")
            .body(big)
            .reply(&routes)
            .await;
        assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
        // A call id that cannot be one, signed: 400 naming the parameter.
        let r = post("/api/twilio/after/a%2Fb", &[], true)
            .reply(&routes)
            .await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{}", body(&r));
        assert_eq!(body(&r), "callId: invalid\n");
    }

    /// The `stream` id and `leg` of the action URL in a standalone `<Connect>` answer.
    fn simple_action(twiml: &str) -> (String, String) {
        let action = twiml
            .split("<Connect action=\"")
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .unwrap_or_else(|| panic!("a <Connect action> in {twiml}"))
            .replace("&amp;", "&");
        let query = action
            .strip_prefix(&format!("{PUBLIC}/api/twilio/after-simple?"))
            .unwrap_or_else(|| panic!("the standalone action URL: {action}"));
        (
            query_param(query, "stream").expect("stream"),
            query_param(query, "leg").expect("leg"),
        )
    }

    #[tokio::test]
    async fn a_standalone_stream_s_action_follows_how_it_ended() {
        let deps = deps(|c| c.fallback_dial = Some("+14155550111".into()));
        let ends = deps.call.stream_ends.clone();
        let metrics = deps.call.metrics.clone();
        let routes = routes(deps);
        let r = post("/api/twilio/voice", &[("CallSid", "CA1")], true)
            .reply(&routes)
            .await;
        let (stream, leg) = simple_action(body(&r));
        assert_eq!(leg, "1");
        assert!(stream_credential::is_id(&stream), "{stream}");
        let action =
            |stream: &str, leg: &str| format!("/api/twilio/after-simple?stream={stream}&leg={leg}");

        // No note (its relay is gone): a fresh stream, the next leg, up to the bound.
        let r = post(&action(&stream, "1"), &[("CallSid", "CA1")], true)
            .reply(&routes)
            .await;
        assert_eq!(r.status(), StatusCode::OK, "{}", body(&r));
        assert_eq!(r.headers()["content-type"], twiml::CONTENT_TYPE);
        let (fresh, leg) = simple_action(body(&r));
        assert_eq!(leg, "2");
        assert_ne!(fresh, stream, "a new credential");
        let last = crate::standalone_after::MAX_LEGS.to_string();
        let r = post(&action(&fresh, &last), &[("CallSid", "CA1")], true)
            .reply(&routes)
            .await;
        assert_eq!(
            body(&r),
            crate::twilio_fallback::answer(Some("+14155550111"))
        );

        // Noted ends.
        ends.note(&stream, Ended::Failed).await;
        let r = post(&action(&stream, "1"), &[("CallSid", "CA1")], true)
            .reply(&routes)
            .await;
        assert_eq!(
            body(&r),
            crate::twilio_fallback::answer(Some("+14155550111"))
        );
        ends.note(&fresh, Ended::Finished).await;
        let r = post(&action(&fresh, "2"), &[("CallSid", "CA1")], true)
            .reply(&routes)
            .await;
        assert!(
            body(&r).ends_with("<Response><Hangup/></Response>"),
            "{}",
            body(&r)
        );

        // A leg changed after signing fails the signature.
        let (owned, form_body) = form(&[("CallSid", "CA1")]);
        let sig = signature::compute(
            &Secret::new(TOKEN),
            &format!("{PUBLIC}{}", action(&fresh, "1")),
            &owned,
        );
        let r = warp::test::request()
            .method("POST")
            .path(&action(&fresh, "3"))
            .header("content-type", "application/x-www-form-urlencoded")
            .header("x-twilio-signature", sig)
            .body(form_body)
            .reply(&routes)
            .await;
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
        assert!(
            metrics.encode().contains(
                "callbridge_relay_signature_refusals_total{route=\"action_simple\",reason=\"invalid\"} 1"
            )
        );

        // Bad parameters, signed: 400 naming the parameter.
        for (path, answer) in [
            (
                "/api/twilio/after-simple?leg=1".to_owned(),
                "stream: missing\n",
            ),
            (
                "/api/twilio/after-simple?stream=XYZ&leg=1".to_owned(),
                "stream: not a stream id (32 lowercase hex digits)\n",
            ),
            (
                format!("/api/twilio/after-simple?stream={stream}"),
                "leg: missing\n",
            ),
            (
                action(&stream, "0"),
                "leg: not a whole number from 1 to 3\n",
            ),
            (
                action(&stream, "4"),
                "leg: not a whole number from 1 to 3\n",
            ),
            (
                action(&stream, "two"),
                "leg: not a whole number from 1 to 3\n",
            ),
        ] {
            let r = post(&path, &[("CallSid", "CA1")], true)
                .reply(&routes)
                .await;
            assert_eq!(
                (r.status(), body(&r)),
                (StatusCode::BAD_REQUEST, answer),
                "{path}"
            );
        }

        // With a control plane the route does not exist.
        let with_control = super::routes(deps_with_control());
        let r = post(&action(&stream, "1"), &[("CallSid", "CA1")], true)
            .reply(&with_control)
            .await;
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
    }

    #[tokio::test]
    async fn after_without_control_hangs_up() {
        let routes = routes(deps(|_| {}));
        let r = post("/api/twilio/after/call_1", &[("CallSid", "CA1")], true)
            .reply(&routes)
            .await;
        assert_eq!(r.status(), StatusCode::OK);
        assert!(
            body(&r).ends_with("<Response><Hangup/></Response>"),
            "{}",
            body(&r)
        );
    }

    #[tokio::test]
    async fn control_unreachable_is_503_for_the_webhook_and_an_apology_after() {
        // Nothing listens on port 9: every call to control fails fast.
        let routes = routes(deps(|c| {
            c.control_url = Some("http://127.0.0.1:9".into());
            c.upstream_connect_timeout_ms = 1000;
        }));
        let r = post("/api/twilio/voice", &[("CallSid", "CA1")], true)
            .reply(&routes)
            .await;
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body(&r), "control plane unavailable\n");
        let r = post("/api/twilio/after/call_1", &[("CallSid", "CA1")], true)
            .reply(&routes)
            .await;
        assert_eq!(r.status(), StatusCode::OK);
        assert!(body(&r).contains(&format!("<Say>{}</Say><Hangup/>", twiml::DEFAULT_APOLOGY)));
    }

    #[tokio::test]
    async fn draining_turns_readyz_and_new_streams_away_and_answers_webhooks() {
        let deps = deps(|_| {});
        let routes = routes(deps.clone());
        let get = |path: &str| warp::test::request().method("GET").path(path);
        let r = get("/readyz").reply(&routes).await;
        assert_eq!((r.status(), body(&r)), (StatusCode::OK, "ready\n"));
        assert!(r.headers().get("connection").is_none(), "kept alive");

        deps.draining.store(true, Ordering::Relaxed);
        let r = get("/readyz").reply(&routes).await;
        assert_eq!(
            (r.status(), body(&r)),
            (StatusCode::SERVICE_UNAVAILABLE, "draining\n")
        );
        assert_eq!(r.headers()["connection"], "close");
        assert_eq!(
            get("/healthz").reply(&routes).await.status(),
            StatusCode::OK
        );
        // The webhook and the action request are answered: TwiML, then the connection
        // closes so the next request goes through the balancer again.
        let r = post("/api/twilio/voice", &[("CallSid", "CA1")], true)
            .reply(&routes)
            .await;
        assert_eq!(r.status(), StatusCode::OK, "{}", body(&r));
        assert!(
            body(&r).contains(
                "method=\"POST\"><Stream url=\"wss://relay.example.com/api/twilio/media-stream-simple\">"
            ),
            "{}",
            body(&r)
        );
        assert_eq!(r.headers()["connection"], "close");
        let r = post("/api/twilio/after/call_1", &[("CallSid", "CA1")], true)
            .reply(&routes)
            .await;
        assert_eq!(r.status(), StatusCode::OK, "{}", body(&r));
        assert!(body(&r).ends_with("<Response><Hangup/></Response>"));
        assert_eq!(r.headers()["connection"], "close");
        let r = post("/api/twilio/fallback", &[("CallSid", "CA1")], true)
            .reply(&routes)
            .await;
        assert_eq!(r.status(), StatusCode::OK, "{}", body(&r));
        // Only a new stream is refused.
        let r = upgrade_request("/api/twilio/media-stream-simple", true)
            .reply(&routes)
            .await;
        assert_eq!(
            (r.status(), body(&r)),
            (StatusCode::SERVICE_UNAVAILABLE, "relay is draining\n")
        );
        // An unsigned webhook is still refused as unsigned first.
        let r = post("/api/twilio/voice", &[], false).reply(&routes).await;
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
    }

    #[tokio::test]
    async fn the_fallback_route_is_signed_and_needs_no_control() {
        // Control configured but unreachable: the fallback answers from config alone.
        let routes = routes(deps(|c| {
            c.control_url = Some("http://127.0.0.1:9".into());
            c.upstream_connect_timeout_ms = 1000;
            c.fallback_dial = Some("+14155550111".into());
        }));
        let params = [("CallSid", "CA1"), ("ErrorCode", "11200")];
        let r = post("/api/twilio/fallback", &params, true)
            .reply(&routes)
            .await;
        assert_eq!(r.status(), StatusCode::OK, "{}", body(&r));
        assert_eq!(r.headers()["content-type"], twiml::CONTENT_TYPE);
        assert_eq!(
            body(&r),
            crate::twilio_fallback::answer(Some("+14155550111"))
        );
        let r = post("/api/twilio/fallback", &params, false)
            .reply(&routes)
            .await;
        assert_eq!(
            (r.status(), body(&r)),
            (StatusCode::FORBIDDEN, "invalid X-Twilio-Signature\n")
        );
        // Signed over the URL Twilio asked, query included.
        let r = post("/api/twilio/fallback?from=console", &params, true)
            .reply(&routes)
            .await;
        assert_eq!(r.status(), StatusCode::OK, "{}", body(&r));
    }

    #[tokio::test]
    async fn upgrades_are_checked_before_anything_else() {
        let deps = deps(|_| {});
        let routes = routes(deps.clone());
        // A signed, well-formed upgrade to the standalone stream is accepted.
        let r = upgrade_request("/api/twilio/media-stream-simple", true)
            .reply(&routes)
            .await;
        assert_eq!(r.status(), StatusCode::SWITCHING_PROTOCOLS);
        assert_eq!(
            r.headers()["sec-websocket-accept"],
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=",
            "RFC 6455's sample key"
        );
        assert!(
            r.headers().get("x-frame-options").is_none(),
            "no HTTP headers on a 101"
        );
        // Unsigned: 403, nothing started.
        let r = upgrade_request("/api/twilio/media-stream-simple", false)
            .reply(&routes)
            .await;
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
        // No upgrade header: not a route (404), whatever the signature.
        let r = warp::test::request()
            .method("GET")
            .path("/api/twilio/media-stream-simple")
            .reply(&routes)
            .await;
        assert_eq!(
            (r.status(), body(&r)),
            (StatusCode::NOT_FOUND, "not found\n")
        );
        let r = upgrade_request("/api/twilio/media-stream-simple", true)
            .header("sec-websocket-version", "8")
            .reply(&routes)
            .await;
        assert_eq!(r.status(), StatusCode::NOT_FOUND, "only version 13");
        // Unknown paths, with a valid upgrade: 404.
        for path in [
            "/api/twilio/other",
            "/api/twilio/media-stream",
            "/api/twilio/media-stream/a/b",
        ] {
            let r = upgrade_request(path, true).reply(&routes).await;
            assert_eq!(r.status(), StatusCode::NOT_FOUND, "{path}");
        }
        // The control-backed stream does not exist without control.
        let r = upgrade_request("/api/twilio/media-stream/call_1", true)
            .reply(&routes)
            .await;
        assert_eq!(
            (r.status(), body(&r)),
            (
                StatusCode::NOT_FOUND,
                "control-backed streams need CONTROL_URL\n"
            )
        );
        // With a control plane, the standalone route does not exist.
        let with_control = super::routes(deps_with_control());
        let r = upgrade_request("/api/twilio/media-stream-simple", true)
            .reply(&with_control)
            .await;
        assert_eq!(
            (r.status(), body(&r)),
            (StatusCode::NOT_FOUND, "not found\n")
        );
        // The control-backed route upgrades on the signature alone: its checks and the
        // attach wait for `start` (stream_admission).
        let r = upgrade_request("/api/twilio/media-stream/call_1", true)
            .reply(&with_control)
            .await;
        assert_eq!(r.status(), StatusCode::SWITCHING_PROTOCOLS);
        let r = upgrade_request("/api/twilio/media-stream/call_1", false)
            .reply(&with_control)
            .await;
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
        // An impossible call id is unknown, before control is asked.
        let r = upgrade_request("/api/twilio/media-stream/a%2Fb", true)
            .reply(&routes)
            .await;
        assert_eq!(
            (r.status(), body(&r)),
            (StatusCode::NOT_FOUND, "unknown call\n")
        );
    }

    #[test]
    fn query_parsing() {
        let q = "callId=call_1&x=a%20b+c&flag&bad=%zz&tail=%4&callId=second";
        assert_eq!(query_param(q, "callId").as_deref(), Some("call_1"));
        assert_eq!(query_param(q, "x").as_deref(), Some("a b c"));
        assert_eq!(query_param(q, "flag").as_deref(), Some(""));
        assert_eq!(query_param(q, "bad").as_deref(), Some("%zz"));
        assert_eq!(query_param(q, "tail").as_deref(), Some("%4"));
        assert_eq!(query_param(q, "missing"), None);
        assert_eq!(query_param("", "callId"), None);
    }
}

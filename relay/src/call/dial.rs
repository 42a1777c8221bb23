//! Opening model sessions: dialling one and setting it up in a task of the call's, and
//! letting a replaced one go. What to open when is [`super::model_session`]'s decision.

use std::time::Duration;

use futures_util::SinkExt;
use tokio::sync::oneshot;
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tracing::debug;

use super::client_events::SentEvents;
use super::outbox::Outbox;
use super::replay::Replay;
use super::{CLOSE_WAIT, CallDeps, Dialled, MODEL_MAX_MESSAGE, ModelSink, ModelWs};
use crate::agent::AgentView;
use crate::config::Secret;
use crate::error::RealtimeError;
use crate::model_breaker::DialOutcome;
use crate::realtime;

/// Waits `delay` (reconnect backoff), dials the model and sends the session setup (the
/// `session.update`, then any replayed conversation): the session is configured and
/// knows the conversation before the first caller frame reaches it.
async fn dial_model(
    url: &str,
    api_key: &Secret,
    connect_timeout: Duration,
    setup: Vec<String>,
    delay: Duration,
) -> Result<ModelWs, RealtimeError> {
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let mut ws = open_socket(url, api_key, connect_timeout).await?;
    for text in setup {
        ws.feed(Message::text(text))
            .await
            .map_err(RealtimeError::Setup)?;
    }
    ws.flush().await.map_err(RealtimeError::Setup)?;
    Ok(ws)
}

/// The WebSocket handshake with the model, within `connect_timeout`.
async fn open_socket(
    url: &str,
    api_key: &Secret,
    connect_timeout: Duration,
) -> Result<ModelWs, RealtimeError> {
    let mut req = url.into_client_request().map_err(RealtimeError::Url)?;
    let auth = format!("Bearer {}", api_key.expose())
        .parse()
        .map_err(|_| RealtimeError::ApiKey)?;
    req.headers_mut().insert(http::header::AUTHORIZATION, auth);
    // The default 128 KiB read buffer per socket dominates a call's memory, and tungstenite
    // zero-fills the buffer's spare capacity before every read; pcmu deltas are a few KiB
    // and the buffer grows when one is larger (docs/performance.md). Writes are flushed
    // once 8 KiB are buffered (frames are ~300 bytes; the default lets 128 KiB pile up).
    let ws_config = WebSocketConfig::default()
        .read_buffer_size(8 * 1024)
        .write_buffer_size(8 * 1024)
        .max_message_size(Some(MODEL_MAX_MESSAGE))
        .max_frame_size(Some(MODEL_MAX_MESSAGE));
    let dial = tokio_tungstenite::connect_async_with_config(req, Some(ws_config), true);
    match tokio::time::timeout(connect_timeout, dial).await {
        Ok(Ok((ws, _))) => Ok(ws),
        Ok(Err(e)) => Err(RealtimeError::Connect(e)),
        Err(_) => Err(RealtimeError::ConnectTimeout),
    }
}

/// The circuit breaker's probe ([`crate::model_breaker`]): whether a handshake with `url`
/// completes. The session it opens is closed at once, before it is configured.
pub(crate) async fn probe_dial(url: &str, api_key: &Secret, connect_timeout: Duration) -> bool {
    match open_socket(url, api_key, connect_timeout).await {
        Ok(mut ws) => {
            let _ = tokio::time::timeout(CLOSE_WAIT, ws.close(None)).await;
            true
        }
        Err(e) => {
            debug!(error = %e, "Model breaker probe failed.");
            false
        }
    }
}

/// The close frame a model session gets when the relay is done with it.
pub(super) fn model_close() -> Message {
    Message::Close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "call ended".into(),
    }))
}

/// Closes a model session the call no longer uses (after writing what it still had
/// queued), in the background: the call goes on meanwhile. Tasks in `tasks` are aborted
/// when the call is over.
pub(super) fn close_model_later(tasks: &mut JoinSet<()>, old: Outbox<ModelSink>) {
    tasks.spawn(async move {
        let _ = tokio::time::timeout(CLOSE_WAIT, old.close(model_close())).await;
    });
}

/// Dials a model session in the background (after `delay`); returns where it arrives.
pub(super) fn spawn_model(
    tasks: &mut JoinSet<()>,
    deps: &CallDeps,
    agent: &AgentView,
    replay: &Replay,
    delay: Duration,
    resumed_items: bool,
    sent: &mut SentEvents,
) -> Dialled {
    let (tx, rx) = oneshot::channel();
    let mut setup = vec![sent.stamp("session.update", &realtime::session_update(agent))];
    if resumed_items {
        setup.extend(
            replay
                .items()
                .iter()
                .map(|item| sent.stamp("conversation.item.create", item)),
        );
    }
    let base = deps.config.openai_realtime_url.clone();
    let url = agent.url(&base);
    let api_key = deps.config.openai_api_key.clone();
    let connect_timeout = deps.config.connect_timeout();
    let breakers = deps.breakers.clone();
    tasks.spawn(async move {
        let result = dial_model(&url, &api_key, connect_timeout, setup, delay).await;
        // Every dial of a live call counts for the endpoint's breaker, reconnects too.
        breakers.dial_finished(&base, &url, DialOutcome::of(&result));
        if let Err(Ok(mut ws)) = tx.send(result) {
            // The call is gone (or switched elsewhere) while this one dialled.
            let _ = tokio::time::timeout(CLOSE_WAIT, ws.close(None)).await;
        }
    });
    rx
}

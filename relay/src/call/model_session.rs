//! A call's model sessions: dialling one and setting it up, replacing a lost one
//! (reconnect with backoff, the conversation replayed) or an old one at a quiet moment
//! (rollover), and letting a replaced one go. The call loop ([`super::run`]) switches
//! between them; the state lives in [`Call`].

use std::time::Duration;

use futures_util::SinkExt;
use tokio::sync::oneshot;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tracing::{debug, warn};

use super::outbox::Outbox;
use super::phase::Ending;
use super::replay::Replay;
use super::{
    ANSWER_WAIT, CLOSE_WAIT, Call, CallDeps, Dialled, MAX_MODEL_SESSIONS, MODEL_MAX_MESSAGE,
    MODEL_SLOTS, ModelSink, ModelWs, PREROLL_FRAMES, RECONNECT_BACKOFF_MAX, RECONNECT_BACKOFF_MIN,
    UTTERANCE_FRAMES,
};
use crate::realtime::AgentView;
use callbridge_proto::pb::EndReason;

/// Waits `delay` (reconnect backoff), dials the model and sends the session setup (the
/// `session.update`, then any replayed conversation): the session is configured and
/// knows the conversation before the first caller frame reaches it.
pub(super) async fn dial_model(
    url: String,
    api_key: crate::config::Secret,
    connect_timeout: Duration,
    setup: Vec<String>,
    delay: Duration,
) -> Result<ModelWs, String> {
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let mut req = url
        .as_str()
        .into_client_request()
        .map_err(|e| format!("bad model URL: {e}"))?;
    let auth = format!("Bearer {}", api_key.expose())
        .parse()
        .map_err(|_| "API key is not a valid header value".to_owned())?;
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
    let mut ws = match tokio::time::timeout(connect_timeout, dial).await {
        Ok(Ok((ws, _))) => ws,
        Ok(Err(e)) => return Err(format!("model connect failed: {e}")),
        Err(_) => return Err("model connect timed out".to_owned()),
    };
    for text in setup {
        ws.feed(Message::text(text))
            .await
            .map_err(|e| format!("session setup failed: {e}"))?;
    }
    ws.flush()
        .await
        .map_err(|e| format!("session setup failed: {e}"))?;
    Ok(ws)
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
) -> Dialled {
    let (tx, rx) = oneshot::channel();
    let mut setup = vec![agent.session_update()];
    if resumed_items {
        setup.extend(replay.items());
    }
    let dial = dial_model(
        agent.url(&deps.config.openai_realtime_url),
        deps.config.openai_api_key.clone(),
        deps.config.connect_timeout(),
        setup,
        delay,
    );
    tasks.spawn(async move {
        let result = dial.await;
        if let Err(Ok(mut ws)) = tx.send(result) {
            // The call is gone (or switched elsewhere) while this one dialled.
            let _ = tokio::time::timeout(CLOSE_WAIT, ws.close(None)).await;
        }
    });
    rx
}

/// Waits for a dial to finish, if one is under way.
pub(super) async fn dialled(rx: &mut Option<Dialled>) -> Result<ModelWs, String> {
    match rx.as_mut() {
        Some(r) => r
            .await
            .unwrap_or_else(|_| Err("model dial task ended".to_owned())),
        None => std::future::pending().await,
    }
}

impl Call {
    /// Keeps a caller frame (its base64 payload) for a resend (see [`Call::utterance`]).
    pub(super) fn remember(&mut self, payload: &str) {
        let cap = if self.utterance_open {
            UTTERANCE_FRAMES
        } else {
            PREROLL_FRAMES
        };
        self.utterance.push_base64(payload, cap);
    }

    pub(super) fn lose_model(&mut self, why: String) {
        if self.model_lost.is_none() {
            self.model_lost = Some(why);
        }
    }

    /// The current model session is gone: open a new one (after a backoff) that is told
    /// the conversation so far, unless the model has been away too long. Returns where
    /// the new session's read half will arrive.
    pub(super) fn reconnect(&mut self, why: String, tasks: &mut JoinSet<()>) -> Option<Dialled> {
        let now = Instant::now();
        let Some(limit) = self.deps.config.model_reconnect() else {
            self.end(Ending::new(EndReason::ModelUnavailable, why));
            return None;
        };
        if !self.model_ever_up {
            // Never reached: the fallback now serves the caller better than silence.
            self.end(Ending::new(EndReason::ModelUnavailable, why));
            return None;
        }
        // A session that stayed up for the whole limit ends the previous outage; one that
        // died sooner (a flapping model) does not, so flapping ends the call in time too.
        let lived = if self.model_up {
            now.duration_since(self.session_started)
        } else {
            Duration::ZERO
        };
        if self.outage_since.is_none() || lived >= limit {
            self.outage_since = Some(now);
            self.reconnect_attempt = 0;
        }
        let since = self.outage_since.unwrap_or(now);
        if now.duration_since(since) >= limit || self.sessions >= MAX_MODEL_SESSIONS {
            self.end(Ending::new(
                EndReason::ModelUnavailable,
                format!(
                    "{why}; no working model session for {} s",
                    now.duration_since(since).as_secs()
                ),
            ));
            return None;
        }
        let delay = match self.reconnect_attempt {
            0 => Duration::ZERO,
            n => (RECONNECT_BACKOFF_MIN * 2u32.saturating_pow(n - 1)).min(RECONNECT_BACKOFF_MAX),
        };
        self.reconnect_attempt += 1;
        warn!(%why, attempt = self.reconnect_attempt, delay_ms = delay.as_millis() as u64, "Model session lost; reconnecting.");
        if let Some((item, text)) = self.partial_transcript.take()
            && self.playback.has_item(&item)
        {
            let outs = self.playback.transcript_done(&item, &text);
            self.apply(outs);
        }
        let outs = self.playback.model_lost();
        self.apply(outs);
        self.caller_speaking = false;
        self.awaiting_answer = None;
        // A replacement being opened is moot: the new session replaces both.
        self.rollover = None;
        self.sessions += 1;
        let rx = spawn_model(tasks, &self.deps, &self.agent, &self.replay, delay, true);
        // The caller's words the old session had not transcribed go first.
        let mut queue = Outbox::pending(MODEL_SLOTS);
        self.resent_frames = 0;
        if self.utterance_open {
            for append in self.utterance.appends() {
                if queue.push(Message::text(append)).is_ok() {
                    self.resent_frames += 1;
                }
            }
        }
        // The caller's audio now waits for the new session; the old one is let go.
        let old = std::mem::replace(&mut self.model, queue);
        close_model_later(tasks, old);
        self.model_up = false;
        self.deps.metrics.model_reconnects().inc();
        Some(rx)
    }

    /// The model owes events: a response is running, or one was asked for (the caller
    /// stopped speaking, or the relay sent `response.create`). Silence then is a stall.
    pub(super) fn owes_answer(&self) -> bool {
        self.model_up && (self.playback.responding() || self.awaiting_answer.is_some())
    }

    /// Nothing is in flight: no assistant audio queued or coming, the caller not
    /// speaking, no answer or tool pending. A session switch or a hand-off here loses
    /// nothing and is not heard.
    pub(super) fn quiet(&self) -> bool {
        self.started_at.is_some()
            && self.playback.idle()
            && !self.caller_speaking
            && self
                .awaiting_answer
                .is_none_or(|t| t.elapsed() >= ANSWER_WAIT)
            && self.tools.is_empty()
            && !self.life.has_pending()
            && self.model_lost.is_none()
    }

    /// When the current session should be replaced, if that is configured and not done.
    pub(super) fn rollover_at(&self) -> Option<Instant> {
        let after = self.deps.config.model_rollover_after()?;
        if !self.model_up || self.rollover.is_some() || self.handoff_wanted {
            return None;
        }
        let at = self.session_started + after;
        Some(self.rollover_not_before.map_or(at, |t| t.max(at)))
    }

    pub(super) fn rollover_due(&self) -> bool {
        self.life.ending().is_none()
            && self.rollover_at().is_some_and(|at| Instant::now() >= at)
            && self.quiet()
    }

    /// Opens the replacement session (set up and told the conversation before the
    /// switch); returns where its read half will arrive.
    pub(super) fn start_rollover(&mut self, tasks: &mut JoinSet<()>) -> Dialled {
        let gen_no = self.sessions;
        self.sessions += 1;
        let rx = spawn_model(
            tasks,
            &self.deps,
            &self.agent,
            &self.replay,
            Duration::ZERO,
            true,
        );
        self.rollover = Some(gen_no);
        debug!(session = gen_no, "Opening a replacement model session.");
        rx
    }
}

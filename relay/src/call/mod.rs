//! One call: a Twilio WebSocket, a Realtime WebSocket and (with control) an attach stream.
//!
//! Structure (style.md §6, adapted for the hot path):
//! - the **call loop** ([`run`]) owns both socket *read* halves, the pure state in
//!   [`phase`], the timers and the tool bookkeeping. Every frame is parsed once, in place,
//!   and answered without another task hop;
//! - the call loop also owns both *write* halves, each behind an [`outbox::Outbox`]: a
//!   bounded queue it writes out itself after every frame it handled (a full queue drops
//!   and counts the audio frame; a late frame is worse than a lost one). A **dial** task
//!   opens each model session and sets it up; the caller's first frames wait in the model
//!   outbox until the socket arrives. Reconnects and rollovers: `model_session`;
//! - a **control link** task ([`control_link`]) owns the attach stream.
//!
//! Putting `phase` and both sockets in one loop (rather than a supervisor fed by reader
//! tasks, with writer tasks behind channels) keeps every audio frame at one task wake-up
//! and needs no locks.

pub mod control_link;
mod model_session;
pub mod outbox;
pub mod phase;
pub mod replay;
pub mod utterance;

use std::future::poll_fn;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use callbridge_proto::pb;
use callbridge_proto::pb::EndReason;
use futures_util::StreamExt;
use futures_util::stream::{SplitSink, SplitStream};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio::time::{Instant, Sleep, sleep_until};
use tokio_tungstenite::tungstenite::Utf8Bytes;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, tungstenite};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, trace, warn};
// The Twilio socket is upgraded by hand (crate::http) with buffers sized for its frames.
use crate::http::TwilioWs as WebSocket;
use tokio_tungstenite::tungstenite::Message;

use crate::config::Config;
use crate::control::{AttachStream, Control};
use crate::metrics::Metrics;
use crate::realtime::{self, AgentView};
use crate::twilio;
use control_link::{LinkIn, LinkSetup};
use model_session::{close_model_later, dialled, model_close, spawn_model};
use outbox::Outbox;
use phase::{Delta, Ending, Lifecycle, Out, Playback};
use replay::Replay;
use utterance::Utterance;

type ModelWs = WebSocketStream<MaybeTlsStream<TcpStream>>;
type ModelRead = SplitStream<ModelWs>;
type ModelSink = SplitSink<ModelWs, Message>;
type TwilioSink = SplitSink<WebSocket, Message>;
/// Where a dial task delivers its model session (set up), or why it could not.
type Dialled = oneshot::Receiver<Result<ModelWs, String>>;

/// Messages queued to Twilio (~5 s of 20 ms audio, each with its mark).
const TWILIO_SLOTS: usize = 512;
/// Frames queued to the model; also holds the caller's audio while the model dials.
const MODEL_SLOTS: usize = 512;
/// Slots kept free in both queues for control frames (clear, truncate, close).
const HEADROOM: usize = 8;
/// Events waiting for the link task.
const LINK_SLOTS: usize = 1024;
/// Commands waiting for the call loop.
const COMMAND_SLOTS: usize = 32;
/// Largest model message handled (audio deltas can be large); bigger ones are counted and
/// skipped.
pub const MODEL_MAX_ACCEPTED: usize = 1 << 20;
/// WebSocket limit on the model socket. A message over it cannot be skipped (the protocol
/// layer closes the socket with 1009), so it sits well above what is handled.
pub const MODEL_MAX_MESSAGE: usize = 4 << 20;
/// Largest Twilio message handled (frames are a few hundred bytes); bigger ones are
/// counted and skipped.
pub const TWILIO_MAX_ACCEPTED: usize = 16 * 1024;
/// WebSocket limit on the Twilio socket (same reasoning as [`MODEL_MAX_MESSAGE`]).
pub const TWILIO_MAX_MESSAGE: usize = 256 * 1024;
/// Longest wait for the `ended` event's ack before Twilio is let go.
const ENDED_ACK_WAIT: Duration = Duration::from_secs(3);
/// Longest the control link keeps trying to deliver a call's unacknowledged events
/// (`ended` included) after the call's sockets closed, e.g. through a control restart.
const EVENT_FLUSH_MAX: Duration = Duration::from_secs(60);
/// Longest wait for a writer to flush its close frame.
const CLOSE_WAIT: Duration = Duration::from_secs(2);
/// Longest an `end_call`/transfer waits for the goodbye audio to play.
const PLAYBACK_DRAIN_MAX: Duration = Duration::from_secs(20);
/// Application tool calls awaiting a result at once.
const MAX_PENDING_TOOLS: usize = 16;
/// Consecutive read errors from Twilio before the stream counts as gone.
const MAX_READ_ERRORS: u32 = 3;
/// Caller frames kept for the model while it reconnects (2 s); later ones are dropped
/// and counted: old speech replayed late is worse than a short loss.
const GAP_FRAMES: usize = 100;
/// Caller frames of the utterance in progress kept to resend to a new model session
/// (3 s), and kept before any utterance (300 ms: speech starts before the model's VAD
/// says so).
const UTTERANCE_FRAMES: usize = 150;
const PREROLL_FRAMES: usize = 15;
/// Longest partial assistant transcript kept (bytes).
const PARTIAL_TRANSCRIPT_MAX: usize = 8 * 1024;
/// Model sessions opened per call at most (a guard against a flapping model).
const MAX_MODEL_SESSIONS: u32 = 64;
/// First and largest pause before redialling a lost model.
const RECONNECT_BACKOFF_MIN: Duration = Duration::from_millis(100);
const RECONNECT_BACKOFF_MAX: Duration = Duration::from_secs(2);
/// After the caller stopped speaking, how long the relay waits for the model's answer
/// to start before the moment counts as quiet anyway.
const ANSWER_WAIT: Duration = Duration::from_secs(3);
/// Pause before trying again when a rollover session could not be opened.
const ROLLOVER_RETRY: Duration = Duration::from_secs(5);

/// What a call needs from the process; clone-cheap.
#[derive(Clone)]
pub struct CallDeps {
    /// Configuration.
    pub config: Arc<Config>,
    /// Metrics.
    pub metrics: Metrics,
    /// Control client (None in standalone mode).
    pub control: Option<Control>,
    /// This relay's id.
    pub relay_id: Arc<str>,
    /// Cancelled when the drain grace is over: calls end with `DRAIN`.
    pub hard_stop: CancellationToken,
    /// Cancelled when the drain starts: calls are handed off at a quiet moment (when
    /// `RELAY_DRAIN_HANDOFF` is on and the call is stored by control).
    pub drain: CancellationToken,
}

/// What the HTTP layer learned before the upgrade.
pub struct CallSetup {
    /// Call id (empty for standalone).
    pub call_id: String,
    /// The agent.
    pub agent: AgentView,
    /// The open attach stream and its context (None for standalone).
    pub attach: Option<(pb::CallContext, AttachStream)>,
    /// When the upgrade was accepted.
    pub upgraded_at: Instant,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn reason_label(r: EndReason) -> &'static str {
    match r {
        EndReason::Unspecified => "unspecified",
        EndReason::CallerHangup => "caller_hangup",
        EndReason::AgentHangup => "agent_hangup",
        EndReason::AppHangup => "app_hangup",
        EndReason::Transferred => "transferred",
        EndReason::MaxDuration => "max_duration",
        EndReason::ModelUnavailable => "model_unavailable",
        EndReason::StartTimeout => "start_timeout",
        EndReason::MediaTimeout => "media_timeout",
        EndReason::RelayLost => "relay_lost",
        EndReason::Drain => "drain",
        EndReason::Handoff => "handoff",
        EndReason::InternalError => "internal_error",
    }
}

struct PendingTool {
    call_id: String,
    deadline: Instant,
}

/// The call loop's state.
struct Call {
    deps: CallDeps,
    /// The call id from the path (empty for standalone), checked against `start`.
    call_id: String,
    agent: AgentView,
    resumed: bool,
    stream_sid: Option<String>,
    call_sid: String,
    life: Lifecycle,
    playback: Playback,
    /// Twilio's write half and what waits for it.
    tw: Outbox<TwilioSink>,
    /// The current model session's write half (once dialled) and what waits for it.
    model: Outbox<ModelSink>,
    link_tx: Option<mpsc::Sender<LinkIn>>,
    tools: Vec<PendingTool>,
    upgraded_at: Instant,
    started_at: Option<Instant>,
    last_media: Instant,
    media_check: Instant,
    pending_end_deadline: Option<Instant>,
    first_audio: bool,
    read_errors: u32,
    frames_in: u64,
    frames_out: u64,
    dropped_in: u64,
    dropped_out: u64,
    barge_ins: u64,
    /// The conversation so far, for a new model session.
    replay: Replay,
    /// The current session's socket is up (its read half arrived).
    model_up: bool,
    /// A model session was up at least once (a first dial that fails is not retried).
    model_ever_up: bool,
    /// The current model session went away; the call loop opens a new one.
    model_lost: Option<String>,
    /// Since when the model is away (cleared once a new session did real work).
    outage_since: Option<Instant>,
    /// Consecutive reconnect attempts in this outage (for the backoff).
    reconnect_attempt: u32,
    /// When the current session opened (for the rollover).
    session_started: Instant,
    /// Model sessions opened so far (numbers the next one).
    sessions: u32,
    /// A replacement session being opened at a quiet moment: its number.
    rollover: Option<u32>,
    /// No rollover attempt before this (after a failed one).
    rollover_not_before: Option<Instant>,
    /// The model heard the caller start speaking and not yet stop.
    caller_speaking: bool,
    /// The caller stopped speaking; the model's answer has not started yet.
    awaiting_answer: Option<Instant>,
    /// The relay is draining: hand the call off at the next quiet moment.
    handoff_wanted: bool,
    /// The caller's latest audio: the utterance the model has not transcribed yet, resent
    /// to a new session after a drop (and a short pre-roll before any utterance).
    utterance: Utterance,
    /// An utterance started and is not transcribed yet.
    utterance_open: bool,
    /// Frames resent to the current session when it was opened (outside the gap budget).
    resent_frames: usize,
    /// When the current model session last sent anything (stall detection).
    last_model_event: Instant,
    /// The transcript so far of the assistant item being spoken (its `.done` has not
    /// come): if the session is lost, what the caller heard of it is still reported and
    /// replayed.
    partial_transcript: Option<(String, String)>,
}

/// Runs one call on an upgraded Twilio socket until it ends.
pub async fn run(ws: WebSocket, setup: CallSetup, deps: CallDeps) {
    deps.metrics.active_calls().inc();
    let metrics = deps.metrics.clone();
    let _active = scopeguard(move || {
        metrics.active_calls().dec();
    });

    let (tw_sink, mut tw_read) = ws.split();
    // Dials and closes of model sessions (aborted when the call is over).
    let mut tasks: JoinSet<()> = JoinSet::new();

    let (cmd_tx, mut cmd_rx) = mpsc::channel(COMMAND_SLOTS);
    let mut link_tx = None;
    // The control link has a set of its own: it outlives the call's other tasks, until
    // its events are acknowledged (see `flush_link`). Its end is reported on a channel,
    // so the call loop does not poll the JoinSet's lock for every frame.
    let mut link_task: JoinSet<()> = JoinSet::new();
    let (link_gone_tx, mut link_gone) = mpsc::channel::<()>(1);
    let mut resumed = false;
    let mut history = Vec::new();
    if let (Some((ctx, stream)), Some(control)) = (setup.attach, deps.control.clone()) {
        let (tx, rx) = mpsc::channel(LINK_SLOTS);
        link_tx = Some(tx);
        resumed = ctx.call.as_ref().is_some_and(|c| c.started_at_ms > 0) || !ctx.history.is_empty();
        history = ctx.history;
        let link = LinkSetup {
            call_id: setup.call_id.clone(),
            relay_id: deps.relay_id.to_string(),
            control,
            metrics: deps.metrics.clone(),
            capacity: deps.config.event_buffer,
            last_seq: ctx.last_seq,
        };
        link_task.spawn(async move {
            control_link::run(link, stream, rx, cmd_tx).await;
            let _ = link_gone_tx.send(()).await;
        });
    } else {
        drop(cmd_tx);
    }

    // A resumed call's first session is told the conversation so far as items.
    let replay = Replay::from_history(history);
    let dial_rx = spawn_model(
        &mut tasks,
        &deps,
        &setup.agent,
        &replay,
        Duration::ZERO,
        resumed,
    );

    let now = Instant::now();
    let barge_in = setup.agent.barge_in_enabled();
    let mut call = Call {
        call_id: setup.call_id,
        agent: setup.agent,
        resumed,
        stream_sid: None,
        call_sid: String::new(),
        life: Lifecycle::default(),
        playback: Playback::new(barge_in),
        tw: Outbox::new(tw_sink, TWILIO_SLOTS),
        model: Outbox::pending(MODEL_SLOTS),
        link_tx,
        tools: Vec::new(),
        upgraded_at: setup.upgraded_at,
        started_at: None,
        last_media: now,
        media_check: now + deps.config.media_timeout(),
        pending_end_deadline: None,
        first_audio: false,
        read_errors: 0,
        frames_in: 0,
        frames_out: 0,
        dropped_in: 0,
        dropped_out: 0,
        barge_ins: 0,
        replay,
        model_up: false,
        model_ever_up: false,
        model_lost: None,
        outage_since: None,
        reconnect_attempt: 0,
        session_started: now,
        sessions: 1,
        rollover: None,
        rollover_not_before: None,
        caller_speaking: false,
        awaiting_answer: None,
        handoff_wanted: false,
        utterance: Utterance::default(),
        utterance_open: false,
        resent_frames: 0,
        last_model_event: now,
        partial_transcript: None,
        deps,
    };

    let mut model_read: Option<ModelRead> = None;
    let mut dial_rx = Some(dial_rx);
    let mut roll_rx: Option<Dialled> = None;
    // Split at once: the halves are small handles, an unsplit socket is 1.4 KiB inline in
    // this future for the whole call.
    let mut roll_ready: Option<(ModelSink, ModelRead)> = None;
    let mut commands_open = call.link_tx.is_some();
    let mut link_open = call.link_tx.is_some();
    // Only calls stored by control can be resumed elsewhere.
    let handoff_possible = call.deps.config.drain_handoff && call.link_tx.is_some();
    // Registered once: a fresh `cancelled()` per frame would lock the shared token.
    let mut hard_stop = std::pin::pin!(call.deps.hard_stop.clone().cancelled_owned());
    let mut drain = std::pin::pin!(call.deps.drain.clone().cancelled_owned());
    let mut timer: Pin<Box<Sleep>> = Box::pin(sleep_until(call.next_deadline()));

    while call.life.ending().is_none() {
        tokio::select! {
            biased;
            // Drain deadline passed: cut the call.
            () = &mut hard_stop => {
                call.end(Ending::new(EndReason::Drain, "relay shutting down"));
            }
            // The relay started draining: hand the call off at the next quiet moment.
            () = &mut drain, if handoff_possible && !call.handoff_wanted => {
                call.handoff_wanted = true;
            }
            // Caller frames.
            msg = tw_read.next() => call.on_twilio(msg),
            // A socket that was full can take more.
            r = call.tw.drive(), if call.tw.wants_drive() => call.on_twilio_written(r),
            r = call.model.drive(), if call.model.wants_drive() => call.on_model_written(r),
            // The model socket is up (and set up): start reading it, write what waited.
            dial = dialled(&mut dial_rx), if dial_rx.is_some() => {
                dial_rx = None;
                match dial {
                    Ok(ws) => {
                        let (sink, read) = ws.split();
                        call.model.open(sink);
                        model_read = Some(read);
                        call.model_up = true;
                        call.model_ever_up = true;
                        call.session_started = Instant::now();
                        call.last_model_event = call.session_started;
                    }
                    Err(why) => call.lose_model(why),
                }
            }
            // A replacement session is up and set up: switch to it between two frames.
            dial = dialled(&mut roll_rx), if roll_rx.is_some() => {
                roll_rx = None;
                match dial {
                    Ok(ws) => roll_ready = Some(ws.split()),
                    Err(why) => {
                        debug!(%why, "Replacement model session failed; the current one goes on.");
                        call.rollover = None;
                        call.rollover_not_before = Some(Instant::now() + ROLLOVER_RETRY);
                    }
                }
            }
            // Model events.
            msg = next_model(&mut model_read), if model_read.is_some() => call.on_model(msg),
            // Commands from the application, through control.
            cmd = cmd_rx.recv(), if commands_open => match cmd {
                Some(c) => call.on_command(*c),
                None => commands_open = false,
            },
            // The control link ended (control refused the call for good): the call goes on.
            _ = link_gone.recv(), if link_open => {
                link_open = false;
                call.link_tx = None;
                debug!("Control link ended.");
            }
            // Timeouts: start, media, max duration, tools, goodbye playback.
            () = &mut timer => call.on_timer(),
        }
        if call.life.has_pending() && call.playback.idle() {
            call.life.playback_idle();
        }
        if let Some(why) = call.model_lost.take()
            && call.life.ending().is_none()
        {
            model_read = None;
            dial_rx = call.reconnect(why, &mut tasks);
        }
        if call.rollover.is_none() {
            roll_rx = None;
            if let Some((sink, _)) = roll_ready.take() {
                close_model_later(&mut tasks, Outbox::new(sink, 0));
            }
        }
        if call.handoff_wanted && call.life.ending().is_none() && call.quiet() {
            call.end(Ending::new(
                EndReason::Handoff,
                "relay draining; call handed off",
            ));
        }
        // The replacement session is set up: switch between two caller frames, while
        // nobody speaks.
        if roll_ready.is_some()
            && call.life.ending().is_none()
            && call.quiet()
            && let (Some((sink, read)), Some(gen_no)) = (roll_ready.take(), call.rollover.take())
        {
            let old = std::mem::replace(&mut call.model, Outbox::new(sink, MODEL_SLOTS));
            close_model_later(&mut tasks, old);
            // The old read half goes: nothing of the old session matters any more.
            model_read = Some(read);
            call.session_started = Instant::now();
            call.last_model_event = call.session_started;
            call.deps.metrics.model_rollovers().inc();
            info!(session = gen_no, "Model session rolled over.");
        }
        if roll_rx.is_none() && roll_ready.is_none() && call.rollover_due() {
            roll_rx = Some(call.start_rollover(&mut tasks));
        }
        // Write what this turn queued now, without another turn of the loop; a socket
        // that is full is driven by its select branch once it can take more.
        call.write_ready().await;
        let next = call.next_deadline();
        if timer.deadline() != next {
            timer.as_mut().reset(next);
        }
    }
    let hard_stop = call.deps.hard_stop.clone();
    if let Some((sink, _)) = roll_ready.take() {
        close_model_later(&mut tasks, Outbox::new(sink, 0));
    }
    // Boxed, like the link flush: they run once, at the end; inline, their state would be
    // part of every call's future from its start.
    Box::pin(call.finish(tasks, link_gone, model_read)).await;
    // The call is over for Twilio and the model; only its events may be left to deliver.
    // Commands arriving meanwhile have no call to go to (and must not fill up and block
    // the link).
    drop(cmd_rx);
    drop(_active);
    Box::pin(flush_link(link_task, hard_stop)).await;
}

/// Lets the control link deliver what control has not acknowledged yet (it ends once
/// `ended` is acknowledged, or control refuses the call for good), for at most
/// [`EVENT_FLUSH_MAX`] or until the hard stop. The call's tracker token is held
/// meanwhile, so a drain waits for this too.
async fn flush_link(mut link_task: JoinSet<()>, hard_stop: CancellationToken) {
    if link_task.is_empty() {
        return;
    }
    tokio::select! {
        _ = link_task.join_next() => {}
        () = hard_stop.cancelled() => {
            warn!("Hard stop: the call's unacknowledged events are dropped.");
        }
        () = tokio::time::sleep(EVENT_FLUSH_MAX) => {
            warn!("Control did not acknowledge the call's events in time; they are dropped.");
        }
    }
}

async fn next_model(
    read: &mut Option<ModelRead>,
) -> Option<Result<tungstenite::Message, tungstenite::Error>> {
    match read.as_mut() {
        Some(r) => r.next().await,
        None => std::future::pending().await,
    }
}

struct Guard<F: FnOnce()>(Option<F>);
impl<F: FnOnce()> Drop for Guard<F> {
    fn drop(&mut self) {
        if let Some(f) = self.0.take() {
            f();
        }
    }
}
fn scopeguard<F: FnOnce()>(f: F) -> Guard<F> {
    Guard(Some(f))
}

impl Call {
    // ---- Writing -----------------------------------------------------------------------

    /// A write to Twilio failed: the caller is gone.
    fn on_twilio_written(&mut self, r: Result<(), tungstenite::Error>) {
        if let Err(e) = r {
            self.end(Ending::new(
                EndReason::CallerHangup,
                format!("caller socket write failed: {e}"),
            ));
        }
    }

    /// A write to the model failed: the session is lost.
    fn on_model_written(&mut self, r: Result<(), tungstenite::Error>) {
        if let Err(e) = r {
            self.lose_model(format!("model write failed: {e}"));
        }
    }

    /// Writes what is queued on both sockets as far as they take it now, without waiting.
    async fn write_ready(&mut self) {
        if !self.tw.wants_drive() && !self.model.wants_drive() {
            return;
        }
        let (tw, model) = poll_fn(|cx| {
            let tw = self.tw.poll_drive(cx);
            let model = self.model.poll_drive(cx);
            Poll::Ready((tw, model))
        })
        .await;
        if let Poll::Ready(r) = tw {
            self.on_twilio_written(r);
        }
        if let Poll::Ready(r) = model {
            self.on_model_written(r);
        }
    }

    fn end(&mut self, ending: Ending) {
        if self.life.end(ending.clone()) {
            debug!(reason = ?ending.reason, detail = %ending.detail, "Call ending.");
        }
    }

    fn event(&mut self, kind: pb::call_event::Kind) {
        self.replay.record(&kind);
        let Some(tx) = &self.link_tx else {
            trace!(?kind, "Event (standalone, not stored).");
            return;
        };
        if tx
            .try_send(LinkIn::Event(now_ms(), Box::new(kind)))
            .is_err()
        {
            self.deps.metrics.events_overflow().inc();
        }
    }

    fn send_twilio(&mut self, text: String) {
        // Control frames use the headroom audio leaves free.
        if self.tw.push(Message::text(text)).is_err() {
            self.deps.metrics.dropped_m2c().inc();
        }
    }

    /// `response.create`: the model owes an answer from now on (stall detection).
    fn request_answer(&mut self) {
        self.send_model(realtime::response_create());
        self.awaiting_answer.get_or_insert_with(Instant::now);
    }

    fn send_model(&mut self, text: String) {
        if self.model.push(Message::text(text)).is_err() {
            self.deps.metrics.dropped_c2m().inc();
            warn!("Model queue full; a control message was dropped.");
        }
    }

    fn next_deadline(&self) -> Instant {
        let cfg = &self.deps.config;
        let mut next = match self.started_at {
            None => self.upgraded_at + cfg.start_timeout(),
            Some(s) => (s + self.agent.max_duration).min(self.media_check),
        };
        if let Some(d) = self.pending_end_deadline {
            next = next.min(d);
        }
        for t in &self.tools {
            next = next.min(t.deadline);
        }
        if let (Some(since), Some(limit), false) = (
            self.outage_since,
            self.deps.config.model_reconnect(),
            self.model_up,
        ) {
            next = next.min(since + limit);
        }
        if self.owes_answer() {
            next = next.min(self.last_model_event + self.deps.config.model_stall());
        }
        // Moments that may make the call quiet or a rollover due; only future ones (a past
        // one would spin the loop until something else happens).
        let now = Instant::now();
        let wakeups = [
            self.rollover_at(),
            self.awaiting_answer.map(|t| t + ANSWER_WAIT),
        ];
        for at in wakeups.into_iter().flatten() {
            if at > now {
                next = next.min(at);
            }
        }
        next
    }

    fn on_timer(&mut self) {
        let now = Instant::now();
        let cfg = self.deps.config.clone();
        if let (Some(since), Some(limit), false) =
            (self.outage_since, cfg.model_reconnect(), self.model_up)
            && now >= since + limit
        {
            self.end(Ending::new(
                EndReason::ModelUnavailable,
                format!("no working model session for {} s", limit.as_secs()),
            ));
            return;
        }
        if self.owes_answer() && now >= self.last_model_event + cfg.model_stall() {
            self.lose_model(format!(
                "model stalled: nothing for {} s while an answer was due",
                cfg.model_stall().as_secs()
            ));
        }
        let Some(started) = self.started_at else {
            if now >= self.upgraded_at + cfg.start_timeout() {
                self.end(Ending::new(EndReason::StartTimeout, "no start from Twilio"));
            }
            return;
        };
        if now >= started + self.agent.max_duration {
            self.end(Ending::new(
                EndReason::MaxDuration,
                "maximum call duration reached",
            ));
            return;
        }
        if now >= self.media_check {
            if now.duration_since(self.last_media) >= cfg.media_timeout() {
                self.end(Ending::new(EndReason::MediaTimeout, "no media from Twilio"));
                return;
            }
            self.media_check = self.last_media + cfg.media_timeout();
        }
        if self.pending_end_deadline.is_some_and(|d| now >= d) {
            // The goodbye's marks never came back; end anyway.
            self.pending_end_deadline = None;
            self.life.playback_idle();
        }
        let expired: Vec<String> = self
            .tools
            .iter()
            .filter(|t| now >= t.deadline)
            .map(|t| t.call_id.clone())
            .collect();
        for id in expired {
            self.tools.retain(|t| t.call_id != id);
            self.tool_output(&id, r#"{"error":"the tool did not answer in time"}"#, true);
        }
    }

    // ---- Twilio side -------------------------------------------------------------------

    fn bad_twilio(&mut self, what: &str) {
        self.deps.metrics.bad_twilio().inc();
        debug!(what, "Bad message from Twilio.");
    }

    fn on_twilio(&mut self, msg: Option<Result<Message, tungstenite::Error>>) {
        let msg = match msg {
            None => {
                self.end(Ending::new(EndReason::CallerHangup, "caller socket closed"));
                return;
            }
            Some(Err(e)) => {
                // Oversized or malformed frames surface here; a few in a row mean the
                // socket is gone.
                self.read_errors += 1;
                self.bad_twilio("read error");
                if self.read_errors >= MAX_READ_ERRORS {
                    self.end(Ending::new(
                        EndReason::CallerHangup,
                        format!("caller socket failed: {e}"),
                    ));
                }
                return;
            }
            Some(Ok(m)) => m,
        };
        self.read_errors = 0;
        if msg.is_close() {
            self.end(Ending::new(EndReason::CallerHangup, "caller socket closed"));
            return;
        }
        if msg.is_ping() || msg.is_pong() {
            return;
        }
        let Message::Text(text) = &msg else {
            self.bad_twilio("binary frame");
            return;
        };
        let text = text.as_str();
        if text.len() > TWILIO_MAX_ACCEPTED {
            self.bad_twilio("oversized message");
            return;
        }
        let parsed = match twilio::parse(text) {
            Ok(p) => p,
            Err(_) => {
                self.bad_twilio("malformed JSON");
                return;
            }
        };
        match &*parsed.event {
            "media" => {
                let Some(sid) = self.stream_sid.as_deref() else {
                    self.bad_twilio("media before start");
                    return;
                };
                let Some(media) = parsed.media else {
                    self.bad_twilio("media without body");
                    return;
                };
                if parsed.stream_sid.as_deref().is_some_and(|s| s != sid) {
                    self.bad_twilio("media for another stream");
                    return;
                }
                if !twilio::is_base64(&media.payload) {
                    self.bad_twilio("media payload is not base64");
                    return;
                }
                self.last_media = Instant::now();
                // While a lost model is redialled, keep only the first GAP_FRAMES.
                if self.model_ever_up
                    && !self.model_up
                    && self.model.queued() >= GAP_FRAMES + self.resent_frames
                {
                    self.dropped_in += 1;
                    self.deps.metrics.gap_dropped().inc();
                    return;
                }
                // Keep headroom so truncate/close never find the queue full.
                if self.model.free() <= HEADROOM {
                    self.dropped_in += 1;
                    self.deps.metrics.dropped_c2m().inc();
                    return;
                }
                if self.deps.config.model_reconnect_secs > 0 {
                    self.remember(&media.payload);
                }
                // Exact capacity: the String becomes shared bytes without a copy.
                let frame = Utf8Bytes::from(realtime::append(&media.payload));
                if self.model.push(Message::Text(frame)).is_ok() {
                    self.frames_in += 1;
                    self.deps.metrics.frames_c2m().inc();
                } else {
                    self.dropped_in += 1;
                    self.deps.metrics.dropped_c2m().inc();
                }
            }
            "mark" => {
                let Some(mark) = parsed.mark else {
                    self.bad_twilio("mark without body");
                    return;
                };
                match self.playback.mark_echoed(&mark.name) {
                    Some(outs) => self.apply(outs),
                    None => self.bad_twilio("unknown mark"),
                }
            }
            "dtmf" => {
                if self.stream_sid.is_none() {
                    self.bad_twilio("dtmf before start");
                    return;
                }
                match parsed.dtmf {
                    Some(d) if !d.digit.is_empty() && d.digit.len() <= 8 => {
                        let digit = d.digit.into_owned();
                        self.event(pb::call_event::Kind::Dtmf(pb::Dtmf { digit }));
                    }
                    _ => self.bad_twilio("dtmf without digit"),
                }
            }
            "start" => {
                let Some(start) = parsed.start else {
                    self.bad_twilio("start without body");
                    return;
                };
                if !twilio::is_safe_id(&start.stream_sid) {
                    self.bad_twilio("start with an unusable streamSid");
                    return;
                }
                if !self.life.start() {
                    self.bad_twilio("second start");
                    return;
                }
                // The <Parameter name="callId"> we wrote must match the signed path.
                let param = start
                    .custom_parameters
                    .as_ref()
                    .and_then(|p| p.get("callId"));
                if let Some(param) = param
                    && !self.call_id.is_empty()
                    && *param != self.call_id
                {
                    self.bad_twilio("start for another call id");
                    warn!(param = %param, "Twilio start names another call id.");
                }
                let now = Instant::now();
                self.started_at = Some(now);
                self.last_media = now;
                self.media_check = now + self.deps.config.media_timeout();
                self.stream_sid = Some(start.stream_sid.into_owned());
                self.call_sid = start.call_sid.into_owned();
                tracing::Span::current().record("call_sid", self.call_sid.as_str());
                info!(call_sid = %self.call_sid, resumed = self.resumed, "Stream started.");
                self.event(pb::call_event::Kind::Started(pb::Started {
                    twilio_call_sid: self.call_sid.clone(),
                    stream_sid: self.stream_sid.clone().unwrap_or_default(),
                    relay_id: self.deps.relay_id.to_string(),
                    resumed: self.resumed,
                }));
                self.opening_turn();
            }
            "stop" => self.end(Ending::new(EndReason::CallerHangup, "Twilio stop")),
            "connected" => {}
            _ => self.bad_twilio("unknown event"),
        }
    }

    /// After `start`: the greeting (not on a resumed call).
    fn opening_turn(&mut self) {
        if self.resumed {
            // The model session was told the conversation so far (as items) when it was
            // set up; the greeting was said on the first line.
            return;
        }
        if !self.agent.greeting.is_empty() {
            let text = format!(
                "Greet the caller now by saying: \"{}\"",
                self.agent.greeting
            );
            self.send_model(realtime::system_text(&text));
            self.request_answer();
        }
    }

    // ---- Model side --------------------------------------------------------------------

    fn bad_model(&mut self, what: &str) {
        self.deps.metrics.bad_realtime().inc();
        debug!(what, "Bad message from the model.");
    }

    fn on_model(&mut self, msg: Option<Result<tungstenite::Message, tungstenite::Error>>) {
        let msg = match msg {
            None => {
                self.lose_model("model socket closed".to_owned());
                return;
            }
            Some(Err(tungstenite::Error::Capacity(e))) => {
                self.bad_model(&format!("oversized: {e}"));
                return;
            }
            Some(Err(e)) => {
                self.lose_model(format!("model socket failed: {e}"));
                return;
            }
            Some(Ok(m)) => {
                self.last_model_event = Instant::now();
                m
            }
        };
        let text = match &msg {
            tungstenite::Message::Text(t) => t.as_str(),
            tungstenite::Message::Close(frame) => {
                let why = frame
                    .as_ref()
                    .map(|f| {
                        format!(
                            "model closed the socket ({}: {})",
                            u16::from(f.code),
                            f.reason
                        )
                    })
                    .unwrap_or_else(|| "model closed the socket".to_owned());
                self.lose_model(why);
                return;
            }
            tungstenite::Message::Binary(_) => {
                self.bad_model("binary frame");
                return;
            }
            _ => return,
        };
        if text.len() > MODEL_MAX_ACCEPTED {
            self.bad_model("oversized message");
            return;
        }
        let ev = match realtime::parse(text) {
            Ok(ev) => ev,
            Err(_) => {
                self.bad_model("malformed JSON");
                return;
            }
        };
        match &*ev.kind {
            "response.output_audio.delta" => {
                let (Some(delta), Some(item_id)) = (ev.delta.as_deref(), ev.item_id.as_deref())
                else {
                    self.bad_model("audio delta without delta or item_id");
                    return;
                };
                let response_id = ev.response_id.as_deref().unwrap_or("");
                if self.playback.drops(response_id) {
                    return; // late audio of an interrupted response
                }
                if !twilio::is_base64(delta) {
                    self.bad_model("audio delta is not base64");
                    return;
                }
                let Some(sid) = self.stream_sid.as_deref() else {
                    self.dropped_out += 1;
                    self.deps.metrics.dropped_m2c().inc();
                    return;
                };
                // Two messages (media, mark) and the headroom.
                if self.tw.free() <= HEADROOM + 1 {
                    self.dropped_out += 1;
                    self.deps.metrics.dropped_m2c().inc();
                    return;
                }
                let media = twilio::media_frame(sid, delta);
                let Delta::Forward { mark } =
                    self.playback
                        .audio_delta(response_id, item_id, twilio::decoded_len(delta))
                else {
                    return;
                };
                let mark = twilio::mark_frame(sid, &mark);
                // Cannot fail with the room checked above (this loop is the only writer).
                if self.tw.push(Message::text(media)).is_err()
                    || self.tw.push(Message::text(mark)).is_err()
                {
                    self.deps.metrics.dropped_m2c().inc();
                    return;
                }
                self.frames_out += 1;
                self.deps.metrics.frames_m2c().inc();
                if !self.first_audio {
                    self.first_audio = true;
                    if let Some(s) = self.started_at {
                        self.deps
                            .metrics
                            .time_to_first_audio()
                            .observe(s.elapsed().as_secs_f64());
                    }
                }
            }
            "response.output_audio.done" => {
                if let Some(item) = ev.item_id.as_deref() {
                    let outs = self.playback.audio_done(item);
                    self.apply(outs);
                }
            }
            "response.output_audio_transcript.delta" => {
                if let (Some(item), Some(delta)) = (ev.item_id.as_deref(), ev.delta.as_deref()) {
                    match &mut self.partial_transcript {
                        Some((id, text)) if id == item => {
                            if text.len() + delta.len() <= PARTIAL_TRANSCRIPT_MAX {
                                text.push_str(delta);
                            }
                        }
                        slot => *slot = Some((item.to_owned(), delta.to_owned())),
                    }
                }
            }
            "response.output_audio_transcript.done" => {
                self.partial_transcript = None;
                if let Some(item) = ev.item_id.as_deref() {
                    let text = ev.transcript.as_deref().unwrap_or("");
                    let outs = self.playback.transcript_done(item, text);
                    self.apply(outs);
                }
            }
            "response.created" => {
                self.awaiting_answer = None;
                if let Some(id) = ev.response.as_ref().and_then(|r| r.id.as_deref()) {
                    self.playback.response_created(id);
                }
            }
            "response.done" => {
                self.awaiting_answer = None;
                let Some(r) = ev.response else { return };
                if let Some(id) = r.id.as_deref() {
                    let outs = self.playback.response_done(id);
                    self.apply(outs);
                }
                if let Some(u) = &r.usage {
                    self.event(pb::call_event::Kind::Usage(u.to_pb()));
                }
                if r.status.as_deref() == Some("failed") {
                    self.deps.metrics.model_errors().inc();
                    self.event(pb::call_event::Kind::ModelError(pb::ModelError {
                        code: "response_failed".to_owned(),
                        message: "the model's response failed".to_owned(),
                        fatal: false,
                    }));
                }
            }
            "input_audio_buffer.speech_stopped" => {
                self.caller_speaking = false;
                // An agent with `create_response: false` answers only when asked.
                let answers = self
                    .agent
                    .turn_detection
                    .as_ref()
                    .and_then(|t| t.create_response)
                    != Some(false);
                if answers {
                    self.awaiting_answer = Some(Instant::now());
                }
            }
            "input_audio_buffer.speech_started" => {
                self.caller_speaking = true;
                self.utterance_open = true;
                let outs = self.playback.speech_started();
                if outs
                    .iter()
                    .any(|o| matches!(o, Out::ClearTwilio | Out::Truncate { .. }))
                {
                    self.barge_ins += 1;
                    self.deps.metrics.barge_ins().inc();
                }
                self.apply(outs);
            }
            "conversation.item.input_audio_transcription.completed" => {
                // The model has the words now: a new session gets them as an item.
                self.utterance_open = false;
                self.utterance
                    .clear(PREROLL_FRAMES * utterance::FRAME_BYTES);
                let item_id = ev.item_id.as_deref().unwrap_or("").to_owned();
                let text = ev.transcript.as_deref().unwrap_or("").to_owned();
                self.event(pb::call_event::Kind::Caller(pb::CallerSpeech {
                    item_id,
                    text,
                }));
            }
            "response.function_call_arguments.done" => {
                let call_id = ev.call_id.as_deref().unwrap_or("").to_owned();
                let name = ev.name.as_deref().unwrap_or("").to_owned();
                let args = ev.arguments.as_deref().unwrap_or("{}").to_owned();
                if call_id.is_empty() || name.is_empty() {
                    self.bad_model("function call without call_id or name");
                    return;
                }
                self.on_tool_call(call_id, name, args);
            }
            "error" => {
                let e = ev.error.unwrap_or_default();
                self.deps.metrics.model_errors().inc();
                let message = e.message.unwrap_or_default();
                debug!(code = ?e.code, %message, "Model error event.");
                self.event(pb::call_event::Kind::ModelError(pb::ModelError {
                    code: e.code.or(e.kind).unwrap_or_default(),
                    message,
                    fatal: false,
                }));
            }
            "session.updated" if ev.session.as_ref().is_some_and(|s| !s.is_pcmu()) => {
                warn!("Model session is not audio/pcmu; the caller would hear noise.");
                self.deps.metrics.model_errors().inc();
            }
            _ => {}
        }
    }

    fn apply(&mut self, outs: Vec<Out>) {
        for out in outs {
            match out {
                Out::ClearTwilio => {
                    if let Some(sid) = self.stream_sid.as_deref() {
                        let f = twilio::clear_frame(sid);
                        self.send_twilio(f);
                    }
                }
                Out::Truncate {
                    item_id,
                    audio_end_ms,
                } => self.send_model(realtime::truncate(&item_id, audio_end_ms)),
                Out::Interrupted {
                    item_id,
                    heard_ms,
                    audio_ms,
                } => self.event(pb::call_event::Kind::Interruption(pb::Interruption {
                    item_id,
                    heard_ms,
                    audio_ms,
                })),
                Out::AssistantSpeech {
                    item_id,
                    text,
                    interrupted,
                    heard_ms,
                    audio_ms,
                } => self.event(pb::call_event::Kind::Assistant(pb::AssistantSpeech {
                    item_id,
                    text,
                    interrupted,
                    heard_ms,
                    audio_ms,
                })),
            }
        }
    }

    // ---- Tools and commands ------------------------------------------------------------

    fn tool_output(&mut self, call_id: &str, output: &str, is_error: bool) {
        self.send_model(realtime::function_output(call_id, output));
        // The model does not speak about a tool result until asked (pitfall 19).
        self.request_answer();
        self.event(pb::call_event::Kind::ToolResult(pb::ToolResult {
            tool_call_id: call_id.to_owned(),
            output: output.to_owned(),
            is_error,
        }));
    }

    fn on_tool_call(&mut self, call_id: String, name: String, args: String) {
        let builtin = (name == realtime::TOOL_END_CALL && self.agent.end_call)
            || (name == realtime::TOOL_TRANSFER_CALL && self.agent.transfer_call);
        self.event(pb::call_event::Kind::ToolCall(pb::ToolCall {
            tool_call_id: call_id.clone(),
            name: name.clone(),
            arguments_json: args.clone(),
            builtin,
        }));
        if builtin && name == realtime::TOOL_END_CALL {
            let reason = serde_json::from_str::<serde_json::Value>(&args)
                .ok()
                .and_then(|v| v.get("reason").and_then(|r| r.as_str()).map(str::to_owned))
                .unwrap_or_else(|| "agent ended the call".to_owned());
            if self
                .life
                .end_after_playback(Ending::new(EndReason::AgentHangup, reason))
            {
                self.pending_end_deadline = Some(Instant::now() + PLAYBACK_DRAIN_MAX);
            }
            self.event(pb::call_event::Kind::ToolResult(pb::ToolResult {
                tool_call_id: call_id,
                output: "the call ends after the goodbye".to_owned(),
                is_error: false,
            }));
            return;
        }
        if builtin && name == realtime::TOOL_TRANSFER_CALL {
            let number = serde_json::from_str::<serde_json::Value>(&args)
                .ok()
                .and_then(|v| v.get("number").and_then(|n| n.as_str()).map(str::to_owned))
                .unwrap_or_default();
            if !self.agent.transfer_numbers.contains(&number) {
                self.tool_output(
                    &call_id,
                    r#"{"error":"that number is not an allowed transfer target"}"#,
                    true,
                );
                return;
            }
            let ending = Ending {
                reason: EndReason::Transferred,
                detail: "agent transferred the call".to_owned(),
                transfer_to: number,
            };
            if self.life.end_after_playback(ending) {
                self.pending_end_deadline = Some(Instant::now() + PLAYBACK_DRAIN_MAX);
            }
            self.event(pb::call_event::Kind::ToolResult(pb::ToolResult {
                tool_call_id: call_id,
                output: "transferring".to_owned(),
                is_error: false,
            }));
            return;
        }
        let known = self.agent.tools.iter().any(|t| t.name == name);
        if !known {
            self.tool_output(&call_id, r#"{"error":"unknown tool"}"#, true);
            return;
        }
        if self.link_tx.is_none() || self.tools.len() >= MAX_PENDING_TOOLS {
            self.tool_output(
                &call_id,
                r#"{"error":"the tool is not available now"}"#,
                true,
            );
            return;
        }
        self.tools.push(PendingTool {
            call_id,
            deadline: Instant::now() + self.deps.config.tool_timeout(),
        });
    }

    fn on_command(&mut self, cmd: pb::Command) {
        use pb::command::Kind;
        let Some(kind) = cmd.kind else {
            debug!("Empty command ignored.");
            return;
        };
        let applied = match kind {
            Kind::Say(s) => {
                if s.text.trim().is_empty() {
                    false
                } else {
                    let text = format!("Say this to the caller now: \"{}\"", s.text);
                    self.send_model(realtime::system_text(&text));
                    self.request_answer();
                    true
                }
            }
            Kind::Hangup(h) => {
                let detail = if h.reason.is_empty() {
                    "application hung up".to_owned()
                } else {
                    h.reason
                };
                self.end(Ending::new(EndReason::AppHangup, detail));
                true
            }
            Kind::Transfer(t) => {
                if t.number.trim().is_empty() {
                    false
                } else {
                    self.end(Ending {
                        reason: EndReason::Transferred,
                        detail: "application transferred the call".to_owned(),
                        transfer_to: t.number,
                    });
                    true
                }
            }
            Kind::ToolResult(r) => {
                let before = self.tools.len();
                self.tools.retain(|t| t.call_id != r.tool_call_id);
                if self.tools.len() == before {
                    debug!(tool_call_id = %r.tool_call_id, "Tool result for no pending call ignored.");
                    false
                } else {
                    self.tool_output(&r.tool_call_id, &r.output, r.is_error);
                    true
                }
            }
            Kind::UpdateInstructions(u) => {
                self.agent.instructions = u.instructions;
                self.send_model(realtime::update_instructions(&self.agent.instructions));
                true
            }
        };
        if applied {
            self.event(pb::call_event::Kind::CommandApplied(pb::CommandApplied {
                command_id: cmd.command_id,
            }));
        }
    }

    // ---- Ending ------------------------------------------------------------------------

    async fn finish(
        mut self,
        mut tasks: JoinSet<()>,
        mut link_gone: mpsc::Receiver<()>,
        model_read: Option<ModelRead>,
    ) {
        let ending = self
            .life
            .ending()
            .cloned()
            .unwrap_or_else(|| Ending::new(EndReason::InternalError, "no end reason"));
        let outs = self.playback.flush();
        self.apply(outs);
        if ending.reason == EndReason::ModelUnavailable {
            self.deps.metrics.model_errors().inc();
            self.event(pb::call_event::Kind::ModelError(pb::ModelError {
                code: "model_unavailable".to_owned(),
                message: ending.detail.clone(),
                fatal: true,
            }));
        }
        for t in std::mem::take(&mut self.tools) {
            self.event(pb::call_event::Kind::ToolResult(pb::ToolResult {
                tool_call_id: t.call_id,
                output: r#"{"error":"the call ended"}"#.to_owned(),
                is_error: true,
            }));
        }

        // Close the model first, while control acknowledges the end; its close is awaited
        // (bounded) before the call's tasks are aborted, so the session gets its close
        // frame. A session still being dialled is closed by its dial task, or dropped when
        // the tasks are aborted below.
        let model = std::mem::replace(&mut self.model, Outbox::pending(0));
        let model_closed = tokio::spawn(async move {
            let _ = tokio::time::timeout(CLOSE_WAIT, model.close(model_close())).await;
        });
        drop(model_read);

        // Report the end and wait briefly for its ack, before Twilio is let go: Twilio
        // fetches the <Connect action> as soon as the socket closes, and control must
        // already know how the call ended to answer it.
        if let Some(tx) = self.link_tx.take() {
            let ended = pb::call_event::Kind::Ended(pb::Ended {
                reason: ending.reason as i32,
                detail: ending.detail.clone(),
                transfer_to: ending.transfer_to.clone(),
            });
            let sent = tokio::time::timeout(
                ENDED_ACK_WAIT,
                tx.send(LinkIn::Event(now_ms(), Box::new(ended))),
            )
            .await;
            drop(tx);
            if matches!(sent, Ok(Ok(())))
                && tokio::time::timeout(ENDED_ACK_WAIT, link_gone.recv())
                    .await
                    .is_err()
            {
                warn!("Control did not acknowledge the end in time; still trying after the close.");
            }
        }

        let (code, why) = match ending.reason {
            EndReason::Drain => (CloseCode::Away, "call ended"),
            EndReason::Handoff => {
                self.deps.metrics.handoffs().inc();
                (CloseCode::Normal, "call handed off")
            }
            _ => (CloseCode::Normal, "call ended"),
        };
        let tw = std::mem::replace(&mut self.tw, Outbox::pending(0));
        let close = Message::Close(Some(CloseFrame {
            code,
            reason: why.into(),
        }));
        let _ = tokio::time::timeout(CLOSE_WAIT, tw.close(close)).await;
        let _ = model_closed.await;
        tasks.abort_all();

        let label = reason_label(ending.reason);
        self.deps.metrics.call_ended(label);
        info!(
            reason = label,
            detail = %ending.detail,
            transfer_to = %ending.transfer_to,
            duration_ms = self.upgraded_at.elapsed().as_millis() as u64,
            frames_in = self.frames_in,
            frames_out = self.frames_out,
            dropped_in = self.dropped_in,
            dropped_out = self.dropped_out,
            barge_ins = self.barge_ins,
            "Call ended."
        );
    }
}

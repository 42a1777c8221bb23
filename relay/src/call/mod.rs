//! One call: a Twilio WebSocket, a Realtime WebSocket and (with control) an attach stream.
//!
//! Structure (style.md §6, adapted for the hot path):
//! - the **call loop** ([`run`]) owns both socket *read* halves and both *write* halves,
//!   each write half behind an [`outbox::Outbox`]: a bounded queue it writes out itself
//!   after every turn (a full queue drops and counts the audio frame; a late frame is worse
//!   than a lost one). Every frame is parsed once, in place, and answered without another
//!   task hop. The loop is a small executor: it waits for the next thing to happen, takes
//!   `now` once, hands the frame to the handler of its event type ([`twilio_side`],
//!   [`model_side`]) and, after every turn, asks the model session what to do next;
//! - the call's state is in components, each a plain struct with its own state, tested
//!   without sockets: the [`model_session::ModelSession`] state machine (dialling, ready,
//!   rolling over, reconnecting, lost), playback and barge-in ([`phase`]), the caller's
//!   audio for a resend ([`utterance`]), the call's timers ([`deadlines`]), pending tool
//!   calls ([`tools`]) and [`counters`];
//! - a **dial** task ([`dial`]) opens each model session and sets it up; the caller's
//!   first frames wait in the model outbox until the socket arrives;
//! - a **control link** task ([`control_link`]) owns the attach stream.
//!
//! Putting `phase` and both sockets in one loop (rather than a supervisor fed by reader
//! tasks, with writer tasks behind channels) keeps every audio frame at one task wake-up
//! and needs no locks.

pub mod answering_machine;
pub mod client_events;
mod commands;
pub mod control_link;
pub mod counters;
pub mod deadlines;
mod dial;
mod finish;
pub mod frame_arena;
pub mod media_rate;
pub mod model_session;
mod model_side;
pub mod outbox;
pub mod phase;
pub mod playhead;
pub mod replay;
pub mod tools;
pub mod turn_commit;
mod twilio_side;
pub mod utterance;

use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use callbridge_proto::pb;
use futures_channel::mpsc;
use futures_util::StreamExt;
use futures_util::stream::{SplitSink, SplitStream};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinSet;
use tokio::time::{Instant, Sleep, sleep_until};
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;
use tracing::{debug, info, trace, warn};

use crate::agent::AgentView;
use crate::call_id::CallId;
use crate::config::Config;
use crate::control::{AttachStream, Control};
use crate::error::{EndKind, RealtimeError, TwilioError};
use crate::metrics::Metrics;
use crate::model_breaker::{ModelBreakers, ShortCircuit};
use crate::realtime;
use crate::twilio::{self, CallSid, StreamSid, TwilioWs};
use client_events::SentEvents;
use control_link::{LinkIn, LinkSetup};
use counters::Counters;
use deadlines::Deadlines;
pub(crate) use dial::probe_dial;
use dial::{close_model_later, spawn_model};
use frame_arena::FrameArena;
use media_rate::MediaRate;
use model_session::{Action, Limits, ModelSession, Turn};
use outbox::Outbox;
use phase::{Ending, Lifecycle, Out, Playback};
use replay::Replay;
use tools::PendingTools;
use turn_commit::TurnCommit;
use utterance::CallerAudio;

type ModelWs = WebSocketStream<MaybeTlsStream<TcpStream>>;
type ModelRead = SplitStream<ModelWs>;
type ModelSink = SplitSink<ModelWs, Message>;
type TwilioSink = SplitSink<TwilioWs, Message>;
type TwilioRead = SplitStream<TwilioWs>;
/// Where a dial task delivers its model session (set up), or why it could not.
type Dialled = oneshot::Receiver<Result<ModelWs, RealtimeError>>;
/// A read from a socket.
type Read = Option<Result<Message, tungstenite::Error>>;

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
/// Caller frames kept for the model while it reconnects (2 s); later ones are dropped
/// and counted: old speech replayed late is worse than a short loss.
const GAP_FRAMES: usize = 100;
/// Longest partial assistant transcript kept (bytes).
const PARTIAL_TRANSCRIPT_MAX: usize = 8 * 1024;
/// After the caller stopped speaking, how long the relay waits for the model's answer
/// to start before the moment counts as quiet anyway.
const ANSWER_WAIT: Duration = Duration::from_secs(3);

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
    /// Cancelled once the relay drains *and* control knows another ready relay
    /// ([`crate::presence`]): calls are then handed off at a quiet moment (when
    /// `RELAY_DRAIN_HANDOFF` is on and the call is stored by control).
    pub drain: CancellationToken,
    /// Where a call the relay ends while draining is noted: the drain keeps listening for
    /// its action request ([`crate::drain`]).
    pub actions_due: crate::drain::ActionsDue,
    /// The model endpoints' circuit breakers, shared by every call.
    pub breakers: ModelBreakers,
    /// How standalone streams ended, for their action requests.
    pub stream_ends: crate::stream_ends::StreamEnds,
}

/// What the HTTP layer learned before the upgrade.
pub struct CallSetup {
    /// Call id (None for standalone).
    pub call_id: Option<CallId>,
    /// A standalone stream's credential id, which its action URL names (None for a stored
    /// call).
    pub standalone_stream: Option<String>,
    /// The agent.
    pub agent: AgentView,
    /// The open attach stream and its context (None for standalone).
    pub attach: Option<(pb::CallContext, AttachStream)>,
    /// When the upgrade was accepted.
    pub upgraded_at: Instant,
}

/// The model's socket handles, as the model session's state wants them: the dial in
/// flight, the current session's read half, and a replacement (dialling or on standby).
#[derive(Default)]
struct ModelLinks {
    dial: Option<Dialled>,
    read: Option<ModelRead>,
    replacement: Option<Dialled>,
    standby: Option<ModelHalves>,
}

/// A model session, split (the halves are small handles; an unsplit socket is 1.4 KiB,
/// which would sit in every call's future).
type ModelHalves = (ModelSink, ModelRead);

/// Something from the model's side.
enum ModelLinkEvent {
    /// The dial of the call's session finished.
    Dialled(Result<ModelHalves, RealtimeError>),
    /// The dial of a replacement finished.
    Replacement(Result<ModelHalves, RealtimeError>),
    /// A read from the current session.
    Read(Read),
}

impl ModelLinks {
    /// The next thing from the model's side: a finished dial first, then a read.
    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<ModelLinkEvent> {
        if let Some(rx) = &mut self.dial
            && let Poll::Ready(r) = Pin::new(rx).poll(cx)
        {
            self.dial = None;
            let r = r.unwrap_or(Err(RealtimeError::DialTaskEnded));
            return Poll::Ready(ModelLinkEvent::Dialled(r.map(StreamExt::split)));
        }
        if let Some(rx) = &mut self.replacement
            && let Poll::Ready(r) = Pin::new(rx).poll(cx)
        {
            self.replacement = None;
            let r = r.unwrap_or(Err(RealtimeError::DialTaskEnded));
            return Poll::Ready(ModelLinkEvent::Replacement(r.map(StreamExt::split)));
        }
        match &mut self.read {
            Some(read) => read.poll_next_unpin(cx).map(ModelLinkEvent::Read),
            None => Poll::Pending,
        }
    }

    async fn next(&mut self) -> ModelLinkEvent {
        poll_fn(|cx| self.poll_next(cx)).await
    }
}

/// What woke the call loop.
enum Wake {
    HardStop,
    Drain,
    Twilio(Read),
    TwilioWritten(Result<(), tungstenite::Error>),
    ModelWritten(Result<(), tungstenite::Error>),
    Model(ModelLinkEvent),
    Command(Option<Box<pb::Command>>),
    LinkGone,
    Timer,
}

/// The call loop's state: the sockets' write halves and the components.
struct Call {
    deps: CallDeps,
    /// The call id from the path (None for standalone), checked against `start`.
    call_id: Option<CallId>,
    /// A standalone stream's credential id: its end is noted under it
    /// ([`crate::stream_ends`]).
    standalone_stream: Option<Box<str>>,
    agent: AgentView,
    resumed: bool,
    stream_sid: Option<StreamSid>,
    call_sid: Option<CallSid>,
    life: Lifecycle,
    playback: Playback,
    /// Twilio's write half and what waits for it.
    tw: Outbox<TwilioSink>,
    /// The current model session's write half (once dialled) and what waits for it.
    model: Outbox<ModelSink>,
    /// Where audio frames to either socket are built.
    frames: FrameArena,
    /// A mark's name, built here for each mark.
    mark_name: String,
    links: ModelLinks,
    session: ModelSession,
    /// Dials and closes of model sessions (aborted when the call is over).
    tasks: JoinSet<()>,
    link_tx: Option<mpsc::Sender<LinkIn>>,
    tools: PendingTools,
    deadlines: Deadlines,
    counters: Counters,
    /// The conversation so far, for a new model session.
    replay: Replay,
    /// The caller's latest audio, resent to a new session after a drop.
    caller: CallerAudio,
    /// Caller media faster than real time is dropped.
    media_rate: MediaRate,
    /// The model heard the caller start speaking and not yet stop.
    caller_speaking: bool,
    /// The caller stopped speaking (or the relay asked for a response); the model's answer
    /// has not started yet.
    awaiting_answer: Option<Instant>,
    /// The caller's turn ended while a response was running: a response is asked for once
    /// it is done (the model refuses a second one meanwhile).
    answer_after_response: bool,
    /// Turn detection off: the relay ends the caller's turns (None with the model's VAD).
    turn_commit: Option<TurnCommit>,
    /// The ids of the relay's client events, for `error` correlation.
    sent: SentEvents,
    /// The model's latest `rate_limits.updated`.
    rate_limits: RateLimits,
    /// The relay is draining: hand the call off at the next quiet moment.
    handoff_wanted: bool,
    /// The transcript so far of the assistant item being spoken (its `.done` has not
    /// come): if the session is lost, what the caller heard of it is still reported and
    /// replayed.
    partial_transcript: Option<(String, String)>,
    upgraded_at: Instant,
    /// How the call ended, when it ended at once; an end after playback is `pending_kind`.
    end_kind: Option<EndKind>,
    pending_kind: Option<EndKind>,
    /// Twilio's answering-machine verdict, until acted on.
    verdict: answering_machine::Verdict,
}

/// The control link's task, apart from the call's other tasks: it outlives them until
/// its events are acknowledged (see `flush_link`). Aborted when dropped. The call loop
/// polls its handle directly: no lock (a `JoinSet` takes one) and no end-of-link channel.
struct LinkTask(Option<AbortOnDropHandle<()>>);

impl LinkTask {
    /// Resolves once the task has ended: at once if it already has, or never ran.
    async fn ended(&mut self) {
        if let Some(handle) = self.0.as_mut() {
            // A panic in the link is the link's end too; the call goes on without it.
            let _ = handle.await;
            self.0 = None;
        }
    }
}

/// The control link of a call, when control stores it.
struct LinkParts {
    tx: Option<mpsc::Sender<LinkIn>>,
    commands: Option<mpsc::Receiver<Box<pb::Command>>>,
    task: LinkTask,
    resumed: bool,
    history: Vec<pb::Turn>,
    /// `Call.answered_by` in the context (empty: no verdict yet).
    answered_by: String,
}

fn start_link(
    call_id: Option<&CallId>,
    attach: Option<(pb::CallContext, AttachStream)>,
    deps: &CallDeps,
) -> LinkParts {
    let mut parts = LinkParts {
        tx: None,
        commands: None,
        task: LinkTask(None),
        resumed: false,
        history: Vec::new(),
        answered_by: String::new(),
    };
    let (Some((ctx, stream)), Some(control), Some(call_id)) =
        (attach, deps.control.clone(), call_id)
    else {
        return parts;
    };
    let (tx, rx) = mpsc::channel(LINK_SLOTS);
    let (cmd_tx, cmd_rx) = mpsc::channel(COMMAND_SLOTS);
    parts.tx = Some(tx);
    parts.commands = Some(cmd_rx);
    parts.resumed =
        ctx.call.as_ref().is_some_and(|c| c.started_at_ms > 0) || !ctx.history.is_empty();
    parts.history = ctx.history;
    parts.answered_by = ctx.call.map(|c| c.answered_by).unwrap_or_default();
    let link = LinkSetup {
        call_id: call_id.clone(),
        relay_id: deps.relay_id.to_string(),
        control,
        metrics: deps.metrics.clone(),
        capacity: deps.config.event_buffer,
        last_seq: ctx.last_seq,
        heartbeat_interval_ms: ctx.heartbeat_interval_ms,
    };
    parts.task = LinkTask(Some(AbortOnDropHandle::new(tokio::spawn(
        control_link::run(link, stream, rx, cmd_tx),
    ))));
    parts
}

/// Runs one call on an upgraded Twilio socket until it ends; `early` are the frames read
/// while the stream was checked (`start` last), handled first.
pub async fn run(ws: TwilioWs, setup: CallSetup, early: Vec<Message>, deps: CallDeps) {
    deps.metrics.active_calls().inc();
    let metrics = deps.metrics.clone();
    let active = scopeguard(move || {
        metrics.active_calls().dec();
    });
    let (tw_sink, tw_read) = ws.split();
    let mut link = start_link(setup.call_id.as_ref(), setup.attach, &deps);
    let hard_stop = deps.hard_stop.clone();
    // A new call does not dial an endpoint known to be down: it ends at once, and the
    // caller gets the fallback. A resumed call (a hand-off) is a live call: it dials.
    let short_circuit = !link.resumed
        && !deps
            .breakers
            .admits(&deps.config.openai_realtime_url, ShortCircuit::Stream);
    let mut call = Call::new(
        setup.call_id,
        setup.agent,
        setup.upgraded_at,
        deps,
        tw_sink,
        &mut link,
        !short_circuit,
    );
    call.standalone_stream = setup.standalone_stream.map(String::into_boxed_str);
    let now = Instant::now();
    for msg in early {
        call.on_twilio(Some(Ok(msg)), now);
        call.after_turn(now);
    }
    if short_circuit {
        call.end(EndKind::ModelUnavailable, crate::fallback_end::DETAIL);
    }
    let mut tw_read = tw_read;
    call_loop(&mut call, &mut tw_read, &mut link).await;
    // Boxed, like the link flush: they run once, at the end; inline, their state would be
    // part of every call's future from its start.
    Box::pin(call.finish(&mut link.task, tw_read)).await;
    // The call is over for Twilio and the model; only its events may be left to deliver.
    // Commands arriving meanwhile have no call to go to (and must not fill up and block
    // the link).
    drop(link.commands);
    drop(active);
    Box::pin(flush_link(link.task, hard_stop)).await;
}

/// The loop: wait for the next thing, handle it with one `now`, reconcile, write.
async fn call_loop(call: &mut Call, tw_read: &mut TwilioRead, link: &mut LinkParts) {
    let mut link_open = call.link_tx.is_some();
    // Only calls stored by control can be resumed elsewhere.
    let handoff_possible = call.deps.config.drain_handoff && call.link_tx.is_some();
    // Registered once: a fresh `cancelled()` per frame would lock the shared token.
    let mut hard_stop = std::pin::pin!(call.deps.hard_stop.clone().cancelled_owned());
    let mut drain = std::pin::pin!(call.deps.drain.clone().cancelled_owned());
    let mut timer: Pin<Box<Sleep>> = Box::pin(sleep_until(call.next_deadline(Instant::now())));
    while call.life.ending().is_none() {
        let wake = tokio::select! {
            biased;
            () = &mut hard_stop => Wake::HardStop,
            () = &mut drain, if handoff_possible && !call.handoff_wanted => Wake::Drain,
            msg = tw_read.next() => Wake::Twilio(msg),
            // A socket that was full can take more.
            r = call.tw.drive(), if call.tw.wants_drive() => Wake::TwilioWritten(r),
            r = call.model.drive(), if call.model.wants_drive() => Wake::ModelWritten(r),
            ev = call.links.next() => Wake::Model(ev),
            cmd = recv(&mut link.commands) => Wake::Command(cmd),
            () = link.task.ended(), if link_open => Wake::LinkGone,
            () = &mut timer => Wake::Timer,
        };
        let now = Instant::now();
        match wake {
            Wake::HardStop => call.end(EndKind::Drain, "relay shutting down"),
            Wake::Drain => call.handoff_wanted = true,
            Wake::Twilio(msg) => call.on_twilio(msg, now),
            Wake::TwilioWritten(r) => call.on_twilio_written(r),
            Wake::ModelWritten(r) => call.on_model_written(r, now),
            Wake::Model(ev) => call.on_model_link(ev, now),
            Wake::Command(Some(c)) => call.on_command(*c, now),
            // Commands from control ended; the call goes on.
            Wake::Command(None) => link.commands = None,
            // The control link ended (control refused the call for good): the call goes on.
            Wake::LinkGone => {
                link_open = false;
                call.link_tx = None;
                debug!("Control link ended.");
            }
            Wake::Timer => call.on_timer(now),
        }
        call.after_turn(now);
        // Write what this turn queued now, without another turn of the loop; a socket
        // that is full is driven by its select branch once it can take more.
        call.write_ready(now).await;
        let next = call.next_deadline(now);
        if timer.deadline() != next {
            timer.as_mut().reset(next);
        }
    }
}

async fn recv(rx: &mut Option<mpsc::Receiver<Box<pb::Command>>>) -> Option<Box<pb::Command>> {
    match rx.as_mut() {
        Some(rx) => rx.next().await,
        None => std::future::pending().await,
    }
}

/// Lets the control link deliver what control has not acknowledged yet (it ends once
/// `ended` is acknowledged, or control refuses the call for good), for at most
/// [`EVENT_FLUSH_MAX`] or until the hard stop. The call's tracker token is held
/// meanwhile, so a drain waits for this too.
async fn flush_link(mut link_task: LinkTask, hard_stop: CancellationToken) {
    if link_task.0.is_none() {
        return;
    }
    tokio::select! {
        () = link_task.ended() => {}
        () = hard_stop.cancelled() => {
            warn!("Hard stop: the call's unacknowledged events are dropped.");
        }
        () = tokio::time::sleep(EVENT_FLUSH_MAX) => {
            warn!("Control did not acknowledge the call's events in time; they are dropped.");
        }
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
    fn new(
        call_id: Option<CallId>,
        agent: AgentView,
        upgraded_at: Instant,
        deps: CallDeps,
        tw_sink: TwilioSink,
        link: &mut LinkParts,
        dial_now: bool,
    ) -> Self {
        let now = Instant::now();
        let cfg = &deps.config;
        // A resumed call's first session is told the conversation so far as items.
        let replay = Replay::from_history(std::mem::take(&mut link.history));
        let mut tasks = JoinSet::new();
        let resumed = link.resumed;
        let mut sent = SentEvents::default();
        let dial = dial_now.then(|| {
            spawn_model(
                &mut tasks,
                &deps,
                &agent,
                &replay,
                Duration::ZERO,
                resumed,
                &mut sent,
            )
        });
        let turn_commit = agent
            .turn_detection_off()
            .then(|| TurnCommit::new(agent.silence_commit_ms()));
        let limits = Limits {
            reconnect: cfg.model_reconnect(),
            rollover_after: cfg.model_rollover_after(),
            stall: cfg.model_stall(),
        };
        let deadlines = Deadlines::new(
            upgraded_at,
            cfg.start_timeout(),
            cfg.media_timeout(),
            agent.max_duration,
        );
        Self {
            call_id,
            standalone_stream: None,
            resumed,
            stream_sid: None,
            call_sid: None,
            life: Lifecycle::default(),
            playback: Playback::new(agent.barge_in_enabled()),
            agent,
            tw: Outbox::new(tw_sink, TWILIO_SLOTS).counted(deps.metrics.twilio_socket()),
            model: Outbox::pending(MODEL_SLOTS).counted(deps.metrics.model_socket()),
            links: ModelLinks {
                dial,
                ..ModelLinks::default()
            },
            session: ModelSession::new(limits, now),
            tasks,
            link_tx: link.tx.take(),
            tools: PendingTools::default(),
            deadlines,
            counters: Counters::default(),
            replay,
            caller: CallerAudio::default(),
            media_rate: MediaRate::default(),
            caller_speaking: false,
            awaiting_answer: None,
            answer_after_response: false,
            turn_commit,
            sent,
            rate_limits: RateLimits::default(),
            handoff_wanted: false,
            partial_transcript: None,
            frames: FrameArena::default(),
            mark_name: String::new(),
            upgraded_at,
            end_kind: None,
            pending_kind: None,
            verdict: answering_machine::Verdict::from_context(&link.answered_by, resumed),
            deps,
        }
    }

    // ---- After every turn --------------------------------------------------------------

    /// The rules after every turn: a goodbye that has played ends the call; then the model
    /// session decides (redial a lost session, hand off, switch or start a rollover).
    fn after_turn(&mut self, now: Instant) {
        // A voicemail ends the call once played: not before its response has begun.
        let message_due = matches!(self.verdict, answering_machine::Verdict::Leaving)
            && (self.awaiting_answer.is_some() || self.answer_after_response);
        if self.life.has_pending() && self.playback.idle() && !message_due {
            self.life.playback_idle();
        }
        let turn = Turn {
            ending: self.life.ending().is_some(),
            quiet: self.quiet(now),
            handoff_wanted: self.handoff_wanted,
        };
        for action in self.session.after_turn(now, turn) {
            self.on_session_action(action);
        }
    }

    /// Nothing is in flight on the call's side: no assistant audio queued or coming, the
    /// caller not speaking, no answer or tool pending. A session switch or a hand-off here
    /// loses nothing and is not heard (the session adds: not lost).
    fn quiet(&self, now: Instant) -> bool {
        self.deadlines.started_at().is_some()
            && self.playback.idle()
            && !self.caller_speaking
            && !self.turn_commit.as_ref().is_some_and(TurnCommit::speaking)
            && self
                .awaiting_answer
                .is_none_or(|t| now.duration_since(t) >= ANSWER_WAIT)
            && self.tools.is_empty()
            && !self.life.has_pending()
    }

    /// The model owes events: a response is running, or one was asked for (the caller
    /// stopped speaking, or the relay sent `response.create`). Silence then is a stall.
    fn answer_due(&self) -> bool {
        self.playback.responding() || self.awaiting_answer.is_some()
    }

    fn on_session_action(&mut self, action: Action) {
        match action {
            Action::Reconnect {
                why,
                delay,
                attempt,
            } => self.reconnect(&why, delay, attempt),
            Action::GiveUp(detail) => self.end(EndKind::ModelUnavailable, detail),
            Action::Handoff => self.end(EndKind::Handoff, "relay draining; call handed off"),
            Action::DialReplacement { number } => {
                let rx = spawn_model(
                    &mut self.tasks,
                    &self.deps,
                    &self.agent,
                    &self.replay,
                    Duration::ZERO,
                    true,
                    &mut self.sent,
                );
                self.links.replacement = Some(rx);
                debug!(session = number, "Opening a replacement model session.");
            }
            Action::SwitchToReplacement { number } => {
                let Some((sink, read)) = self.links.standby.take() else {
                    return;
                };
                let new = Outbox::new(sink, MODEL_SLOTS).counted(self.deps.metrics.model_socket());
                let old = std::mem::replace(&mut self.model, new);
                close_model_later(&mut self.tasks, old);
                // The old read half goes: nothing of the old session matters any more.
                self.links.read = Some(read);
                self.deps.metrics.model_rollovers().inc();
                info!(session = number, "Model session rolled over.");
            }
        }
    }

    /// The current model session is gone: a new one is dialled (after `delay`), told the
    /// conversation so far, with the caller's untranscribed words first.
    fn reconnect(&mut self, why: &RealtimeError, delay: Duration, attempt: u32) {
        warn!(%why, attempt, delay_ms = delay.as_millis() as u64, "Model session lost; reconnecting.");
        if let Some((item, text)) = self.partial_transcript.take()
            && self.playback.has_item(&item)
        {
            let outs = self.playback.transcript_done(&item, &text);
            self.apply(outs);
        }
        let outs = self.playback.model_lost(Instant::now());
        self.apply(outs);
        self.caller_speaking = false;
        self.awaiting_answer = None;
        self.answer_after_response = false;
        // A replacement being opened is moot: the new session replaces both.
        self.links.read = None;
        self.links.replacement = None;
        if let Some((sink, _)) = self.links.standby.take() {
            close_model_later(&mut self.tasks, Outbox::new(sink, 0));
        }
        let rx = spawn_model(
            &mut self.tasks,
            &self.deps,
            &self.agent,
            &self.replay,
            delay,
            true,
            &mut self.sent,
        );
        self.links.dial = Some(rx);
        let mut queue = Outbox::pending(MODEL_SLOTS).counted(self.deps.metrics.model_socket());
        let mut resent = 0;
        for append in self.caller.resend() {
            if queue.push(Message::text(append)).is_ok() {
                resent += 1;
            }
        }
        self.session.set_resent(resent);
        // The caller's audio now waits for the new session; the old one is let go.
        let old = std::mem::replace(&mut self.model, queue);
        close_model_later(&mut self.tasks, old);
        self.deps.metrics.model_reconnects().inc();
    }

    // ---- Timers ------------------------------------------------------------------------

    fn next_deadline(&self, now: Instant) -> Instant {
        let session = self
            .session
            .next_deadline(now, self.answer_due(), self.handoff_wanted);
        // The moment an unanswered turn counts as quiet anyway (only a future one: a past
        // one would spin the loop until something else happens).
        let answer_wait = self
            .awaiting_answer
            .map(|t| t + ANSWER_WAIT)
            .filter(|&at| at > now);
        [self.tools.next(), session, answer_wait]
            .into_iter()
            .flatten()
            .fold(self.deadlines.next(), Instant::min)
    }

    fn on_timer(&mut self, now: Instant) {
        if let Some(detail) = self.session.on_timer(now, self.answer_due()) {
            self.end(EndKind::ModelUnavailable, detail);
            return;
        }
        match self.deadlines.check(now) {
            Some(deadlines::Expired::Start) => {
                return self.end(EndKind::StartTimeout, "no start from Twilio");
            }
            Some(deadlines::Expired::MaxDuration) => {
                return self.end(EndKind::MaxDuration, "maximum call duration reached");
            }
            Some(deadlines::Expired::Media) => {
                return self.end(EndKind::MediaTimeout, "no media from Twilio");
            }
            // The goodbye's marks never came back; end anyway.
            Some(deadlines::Expired::Goodbye) => {
                self.life.playback_idle();
            }
            None => {}
        }
        if self.deadlines.started_at().is_none() {
            return;
        }
        for id in self.tools.expired(now) {
            self.tool_output(
                &id,
                r#"{"error":"the tool did not answer in time"}"#,
                true,
                now,
            );
        }
    }

    // ---- Writing -----------------------------------------------------------------------

    /// A write to Twilio failed: nothing more reaches the caller.
    fn on_twilio_written(&mut self, r: Result<(), tungstenite::Error>) {
        if let Err(e) = r {
            let e = TwilioError::Write(e);
            self.end(EndKind::TwilioWriteFailed, e.to_string());
        }
    }

    /// A write to the model failed: the session is lost.
    fn on_model_written(&mut self, r: Result<(), tungstenite::Error>, now: Instant) {
        if let Err(e) = r {
            self.session.lose(RealtimeError::Write(e), now);
        }
    }

    /// Writes what is queued on both sockets as far as they take it now, without waiting.
    async fn write_ready(&mut self, now: Instant) {
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
            self.on_model_written(r, now);
        }
    }

    // ---- Helpers -----------------------------------------------------------------------

    /// Ends the call now (the first end wins).
    fn end(&mut self, kind: EndKind, detail: impl Into<String>) {
        self.end_with(kind, Ending::new(kind.reason(), detail));
    }

    fn end_with(&mut self, kind: EndKind, ending: Ending) {
        if self.life.end(ending.clone()) {
            self.end_kind = Some(kind);
            debug!(reason = kind.label(), side = kind.side().as_str(), detail = %ending.detail, "Call ending.");
        }
    }

    /// Ends the call once the goodbye has played (or at the playback limit).
    fn end_after_playback(&mut self, kind: EndKind, ending: Ending, now: Instant) {
        if self.life.end_after_playback(ending) {
            self.pending_kind = Some(kind);
            self.deadlines.goodbye(now);
        }
    }

    fn event(&mut self, kind: pb::call_event::Kind) {
        self.replay.record(&kind);
        let Some(tx) = &mut self.link_tx else {
            trace!(?kind, "Event (standalone, not stored).");
            return;
        };
        if tx.try_send(LinkIn::now(kind)).is_err() {
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
    fn request_answer(&mut self, now: Instant) {
        self.send_model("response.create", &realtime::response_create());
        self.awaiting_answer.get_or_insert(now);
    }

    /// The caller's turn is over (a commit, a key press): a response now, or once the
    /// running one is done.
    fn answer_caller(&mut self, now: Instant) {
        if self.playback.responding() {
            self.answer_after_response = true;
        } else {
            self.request_answer(now);
        }
    }

    /// A client event other than an append, with an `event_id` (`client_events`).
    fn send_model(&mut self, kind: &'static str, event: &str) {
        let text = self.sent.stamp(kind, event);
        if self.model.push(Message::text(text)).is_err() {
            self.deps.metrics.dropped_c2m().inc();
            warn!("Model queue full; a control message was dropped.");
        }
    }

    /// Carries out what playback decided.
    fn apply(&mut self, outs: Vec<Out>) {
        for out in outs {
            match out {
                Out::MarkTwilio { name } => {
                    if let Some(sid) = &self.stream_sid {
                        let f = twilio::mark_frame(sid.as_str(), &name);
                        self.send_twilio(f);
                    }
                }
                Out::ClearTwilio => {
                    if let Some(sid) = &self.stream_sid {
                        let f = twilio::clear_frame(sid.as_str());
                        self.send_twilio(f);
                    }
                }
                Out::Truncate {
                    item_id,
                    audio_end_ms,
                } => self.send_model(
                    "conversation.item.truncate",
                    &realtime::truncate(&item_id, audio_end_ms),
                ),
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
}

/// The model's latest `rate_limits.updated` on a call (`None` until one names the limit):
/// (remaining, limit).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct RateLimits {
    requests: Option<(u64, u64)>,
    tokens: Option<(u64, u64)>,
}

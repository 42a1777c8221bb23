//! A fake OpenAI Realtime server speaking the GA protocol over a real WebSocket.
//!
//! ```no_run
//! # async fn f() -> std::io::Result<()> {
//! use callbridge_testkit::{conversation::Conversation, fake_realtime::FakeRealtime};
//! let fake = FakeRealtime::builder().script(Conversation::sample()).speed(4.0).start().await?;
//! let url = fake.url(); // give it to the relay as OPENAI_REALTIME_URL
//! # Ok(()) }
//! ```
//!
//! Behaviour (`docs/protocols.md`, "OpenAI Realtime"): checks `Authorization: Bearer …` on the
//! handshake, checks every client event against OpenAI's GA schemas
//! ([`crate::realtime_schema`]; appends only cheaply: fields and base64) and answers one it
//! refuses with an `error` as the real API does (`invalid_request_error`, a code such as
//! `unknown_parameter`, a message and `param` naming the path, the client's `event_id`;
//! recorded in [`ConnRecord::errors_sent`]), sends `session.created`, answers `session.update`
//! with `session.updated`, "hears" the
//! caller by looking at the appended μ-law (a chunk with any non-silent byte is speech; a run of
//! silence ends the segment), transcribes the n-th segment as the script's n-th caller line (only
//! when the session set `audio.input.transcription`, as the real server) and
//! answers with the scripted reply as paced `response.output_audio.delta`s. Speech during an answer
//! cancels it (`turn_detected`), optionally after a few late deltas. `conversation.item.truncate`
//! is checked against the audio produced for the item. Everything the client sent is recorded per
//! connection for assertions.
//!
//! For component tests that play the model themselves, [`FakeRealtimeBuilder::start_manual`]
//! does the same handshake and bookkeeping but hands each connection to the test as a
//! [`ManualConn`]: client events arrive parsed, server events are whatever the test sends;
//! client events the schema refuses are recorded in [`ConnRecord::refusals`], not answered.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Message, http};

use crate::audio;
use crate::conversation::{AgentReply, Conversation};
use crate::realtime_schema::{self, Refusal};

/// Milliseconds of audio in successive `response.output_audio.delta`s by default, cycled:
/// the real API sends deltas of varying sizes, most of them longer than Twilio's 20 ms
/// frames, so nothing may assume one size or a multiple of 20 ms (odd sizes included).
pub const DELTA_MS_CYCLE: [u32; 8] = [20, 40, 100, 60, 37, 100, 80, 23];

/// Largest client message accepted (appends are small; a session.update with tools is a
/// few kB).
const MAX_MESSAGE: usize = 1024 * 1024;

/// How the fake behaves. Built with [`FakeRealtime::builder`].
#[derive(Debug, Clone)]
pub struct FakeRealtimeBuilder {
    script: Conversation,
    scripts_by_marker: Vec<(String, Conversation)>,
    speed: f64,
    chunk_ms: Option<u32>,
    late_deltas: u32,
    silence_ms: u32,
    echo: bool,
    echo_speaking: bool,
    reject_auth: bool,
    require_key: Option<String>,
    close_after: Option<Duration>,
    close_after_events: Option<u64>,
    stall_after_events: Option<u64>,
    error_after_events: Vec<(u64, String, String)>,
    fallback_reply: AgentReply,
    say_audio_ms: u32,
    faulty_connections: Option<u64>,
    refusing: bool,
    hanging: bool,
    transcription_failure: Option<(String, String)>,
    response_outcomes: Vec<(usize, ResponseOutcome)>,
    errors_on_client_events: Vec<(String, String, String)>,
}

/// How a scripted response ends instead of `completed` ([`FakeRealtimeBuilder::response_outcome`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseOutcome {
    /// `incomplete`, `cancelled` or `failed`.
    pub status: String,
    /// `status_details.reason`.
    pub reason: Option<String>,
    /// `status_details.error` (type, code) of a failed response.
    pub error: Option<(String, String)>,
}

impl Default for FakeRealtimeBuilder {
    fn default() -> Self {
        Self {
            script: Conversation::default(),
            scripts_by_marker: Vec::new(),
            speed: 1.0,
            chunk_ms: None,
            late_deltas: 0,
            silence_ms: 200,
            echo: false,
            echo_speaking: false,
            reject_auth: false,
            require_key: None,
            close_after: None,
            close_after_events: None,
            faulty_connections: None,
            stall_after_events: None,
            error_after_events: Vec::new(),
            fallback_reply: AgentReply::says("Sorry, could you repeat that?", 400),
            say_audio_ms: 500,
            refusing: false,
            hanging: false,
            transcription_failure: None,
            response_outcomes: Vec::new(),
            errors_on_client_events: Vec::new(),
        }
    }
}

impl FakeRealtimeBuilder {
    /// The script every session plays (unless a marker script matches).
    pub fn script(mut self, script: Conversation) -> Self {
        self.script = script;
        self
    }

    /// A session whose `session.update` instructions contain `marker` plays `script`
    /// instead of the default one (tells concurrent calls apart).
    pub fn script_for(mut self, marker: impl Into<String>, script: Conversation) -> Self {
        self.scripts_by_marker.push((marker.into(), script));
        self
    }

    /// Audio pacing: 1.0 sends deltas at real time, 4.0 four times faster.
    pub fn speed(mut self, speed: f64) -> Self {
        self.speed = speed.max(0.01);
        self
    }

    /// Milliseconds of audio in every `response.output_audio.delta`, for tests that need
    /// one fixed size. By default the sizes vary as the real API's do
    /// ([`DELTA_MS_CYCLE`]). In echo mode, appends are held until this much audio came in
    /// and then echoed as one delta (by default each append is echoed as it came).
    pub fn chunk_ms(mut self, ms: u32) -> Self {
        self.chunk_ms = Some(ms.max(1));
        self
    }

    /// Deltas still sent after `speech_started` when a response is cut by the caller
    /// (in-flight audio the relay must drop). Default 0.
    pub fn late_deltas(mut self, n: u32) -> Self {
        self.late_deltas = n;
        self
    }

    /// Silence that ends a caller speech segment (default 200 ms).
    pub fn silence_ms(mut self, ms: u32) -> Self {
        self.silence_ms = ms;
        self
    }

    /// Echo mode: every append is answered at once with a delta carrying the same audio;
    /// no voice detection, no script.
    pub fn echo(mut self) -> Self {
        self.echo = true;
        self
    }

    /// Echo mode in which the caller is speaking for the whole connection: the first
    /// append is preceded by `input_audio_buffer.speech_started`, and no `speech_stopped`
    /// or transcript follows. A relay then keeps its whole resend window, as during a
    /// real utterance (for memory benchmarks).
    pub fn echo_speaking(mut self) -> Self {
        self.echo = true;
        self.echo_speaking = true;
        self
    }

    /// Refuse every handshake with HTTP 401.
    pub fn reject_auth(mut self) -> Self {
        self.reject_auth = true;
        self
    }

    /// Accept only `Authorization: Bearer <key>` (by default any bearer token is accepted).
    pub fn require_key(mut self, key: impl Into<String>) -> Self {
        self.require_key = Some(key.into());
        self
    }

    /// Close each connection (code 1011) this long after it opened.
    pub fn close_after(mut self, after: Duration) -> Self {
        self.close_after = Some(after);
        self
    }

    /// Close each connection (code 1011) after sending this many events.
    pub fn close_after_events(mut self, n: u64) -> Self {
        self.close_after_events = Some(n);
        self
    }

    /// Apply the close/stall/error faults only to the first `n` accepted connections
    /// (a model that fails once and then is reachable again).
    pub fn faults_only_on_first(mut self, n: u64) -> Self {
        self.faulty_connections = Some(n);
        self
    }

    /// Stop answering after sending this many events (the socket stays open).
    pub fn stall_after_events(mut self, n: u64) -> Self {
        self.stall_after_events = Some(n);
        self
    }

    /// Send an `error` event with `code` and `message` once `n` events were sent.
    pub fn error_after_events(
        mut self,
        n: u64,
        code: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        self.error_after_events
            .push((n, code.into(), message.into()));
        self
    }

    /// The answer to a speech segment beyond the script's turns.
    pub fn fallback_reply(mut self, reply: AgentReply) -> Self {
        self.fallback_reply = reply;
        self
    }

    /// Every caller transcription fails: `conversation.item.input_audio_transcription.failed`
    /// with `code` and `message` instead of `.completed`.
    pub fn transcription_fails(
        mut self,
        code: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        self.transcription_failure = Some((code.into(), message.into()));
        self
    }

    /// The `n`-th response of each connection (0-based) ends with `outcome` instead of
    /// `completed` (after its audio, as a response cut short would).
    pub fn response_outcome(mut self, n: usize, outcome: ResponseOutcome) -> Self {
        self.response_outcomes.push((n, outcome));
        self
    }

    /// The first client event of type `event_type` on each connection is refused: an
    /// `error` with `code` and `message` naming the event's `event_id`, and the event has no
    /// other effect.
    pub fn error_on_client_event(
        mut self,
        event_type: impl Into<String>,
        code: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        self.errors_on_client_events
            .push((event_type.into(), code.into(), message.into()));
        self
    }

    /// Binds `127.0.0.1:0` and starts serving.
    pub async fn start(self) -> std::io::Result<FakeRealtime> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        Ok(self.start_on(listener))
    }

    /// Start refusing connections (a model outage): see [`FakeRealtime::set_refusing`].
    pub fn refusing(mut self) -> Self {
        self.refusing = true;
        self
    }

    /// Hang every connection (another kind of outage): each TCP connection is accepted
    /// and held open, and the WebSocket handshake is never answered, so a client waits
    /// out its connect timeout. Counted in [`FakeRealtime::connections_refused`].
    pub fn hanging(mut self) -> Self {
        self.hanging = true;
        self
    }

    /// Serves on an already bound listener.
    pub fn start_on(self, listener: TcpListener) -> FakeRealtime {
        self.serve(listener, None)
    }

    /// Binds `127.0.0.1:0` and serves connections the test plays itself: each accepted
    /// (authorised) connection arrives on the receiver as a [`ManualConn`], and nothing is
    /// scripted (no `session.created` either). Handshake checks, counters and
    /// [`FakeRealtime::connections`] (uri, closed) work as in scripted mode.
    pub async fn start_manual(self) -> std::io::Result<(FakeRealtime, mpsc::Receiver<ManualConn>)> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let (tx, rx) = mpsc::channel(16);
        Ok((self.serve(listener, Some(tx)), rx))
    }

    fn serve(
        self,
        listener: TcpListener,
        manual: Option<mpsc::Sender<ManualConn>>,
    ) -> FakeRealtime {
        let addr = listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)));
        let shared = Arc::new(Shared {
            manual,
            refusing: AtomicBool::new(self.refusing),
            ..Shared::default()
        });
        let (kill_tx, _) = tokio::sync::watch::channel(0u64);
        let accept = tokio::spawn(accept_loop(
            listener,
            Arc::new(self),
            shared.clone(),
            kill_tx.clone(),
        ));
        FakeRealtime {
            addr,
            shared,
            kill_tx,
            accept,
        }
    }
}

/// Counters and per-connection records shared by the server tasks and the test.
#[derive(Debug, Default)]
struct Shared {
    accepted: AtomicU64,
    open: AtomicU64,
    rejected: AtomicU64,
    stalled: AtomicBool,
    /// Connections are dropped as they arrive, before any handshake (an outage).
    refusing: AtomicBool,
    refused: AtomicU64,
    conns: Mutex<Vec<Arc<Mutex<ConnRecord>>>>,
    /// Manual mode: where accepted connections go.
    manual: Option<mpsc::Sender<ManualConn>>,
}

/// How long [`ManualConn::next_of`] waits for an event.
const MANUAL_STEP: Duration = Duration::from_secs(5);

/// A model connection the test plays by hand ([`FakeRealtimeBuilder::start_manual`]).
#[derive(Debug)]
pub struct ManualConn {
    /// Client events, parsed, in order. The last one is `{"type": "__closed", "code": …}`:
    /// the close code the client sent, `null` for a close frame without one, `"none"`
    /// when the socket ended without a close frame.
    pub rx: mpsc::Receiver<Value>,
    /// Server messages to send. Dropping it closes the socket with a close frame.
    pub tx: mpsc::Sender<Message>,
    /// The handshake's `Authorization` header, as sent.
    pub authorization: String,
    /// Request target of the handshake (path and query).
    pub uri: String,
}

impl ManualConn {
    /// The next client event of type `ty`, skipping others; panics after 5 s or when the
    /// connection is gone.
    #[track_caller]
    pub fn next_of<'a>(&'a mut self, ty: &'a str) -> impl std::future::Future<Output = Value> + 'a {
        crate::with_timeout(MANUAL_STEP, format!("model receives {ty}"), async move {
            loop {
                let v = self.rx.recv().await.expect("model connection open");
                if v["type"] == ty {
                    return v;
                }
            }
        })
    }

    /// Sends a server event; panics when the connection is gone.
    pub async fn send(&self, v: Value) {
        self.tx
            .send(Message::text(v.to_string()))
            .await
            .expect("model connection open");
    }
}

/// Manual mode: relays between the socket and the test's [`ManualConn`] until either side
/// ends (or the test calls [`FakeRealtime::close_all`]).
async fn play_manual(
    ws: tokio_tungstenite::WebSocketStream<TcpStream>,
    info: HandshakeInfo,
    to_test: &mpsc::Sender<ManualConn>,
    record: &Mutex<ConnRecord>,
    kill: &mut tokio::sync::watch::Receiver<u64>,
) {
    let (mut sink, mut stream) = ws.split();
    let (in_tx, rx) = mpsc::channel(1024);
    let (tx, mut out_rx) = mpsc::channel::<Message>(1024);
    let conn = ManualConn {
        rx,
        tx,
        authorization: info.authorization,
        uri: info.uri,
    };
    if to_test.send(conn).await.is_err() {
        return;
    }
    let closed = |code: Value| json!({"type": "__closed", "code": code});
    loop {
        tokio::select! {
            m = stream.next() => match m {
                Some(Ok(Message::Text(t))) => {
                    let v = serde_json::from_str(&t).unwrap_or_else(|_| json!({"type": "__malformed", "text": t.as_str()}));
                    // The test plays the model, so nothing is answered; what the real
                    // API would refuse is recorded (`ConnRecord::refusals`).
                    if v["type"] != "input_audio_buffer.append"
                        && let Err(r) = realtime_schema::refusal(&v)
                    {
                        record_error(record, r.code, &r.message, false);
                    }
                    let _ = in_tx.send(v).await;
                }
                Some(Ok(Message::Close(frame))) => {
                    let code = frame.map_or(Value::Null, |f| json!(u16::from(f.code)));
                    let _ = in_tx.send(closed(code)).await;
                    return;
                }
                None | Some(Err(_)) => {
                    let _ = in_tx.send(closed(json!("none"))).await;
                    return;
                }
                Some(Ok(_)) => {}
            },
            m = out_rx.recv() => match m {
                Some(m) => {
                    if sink.send(m).await.is_err() {
                        return;
                    }
                }
                None => {
                    let _ = sink.close().await;
                    return;
                }
            },
            changed = kill.changed() => {
                if changed.is_ok() {
                    let _ = sink.send(close_msg("fake: closed by test")).await;
                }
                return;
            }
        }
    }
}

/// A running fake; stops serving when dropped.
#[derive(Debug)]
pub struct FakeRealtime {
    addr: SocketAddr,
    shared: Arc<Shared>,
    kill_tx: tokio::sync::watch::Sender<u64>,
    accept: JoinHandle<()>,
}

impl Drop for FakeRealtime {
    fn drop(&mut self) {
        // The accept task owns the connection tasks (a JoinSet), so aborting it ends all.
        self.accept.abort();
    }
}

/// Everything one model connection saw and did.
#[derive(Debug, Clone, Default)]
pub struct ConnRecord {
    /// Request target of the handshake (path and query, e.g. `/v1/realtime?model=…`).
    pub uri: String,
    /// Whether an `OpenAI-Beta` header was sent (the GA interface must not send it).
    pub beta_header: bool,
    /// The `session` objects of every `session.update`.
    pub session_updates: Vec<Value>,
    /// Bytes of audio appended.
    pub appended_audio_bytes: u64,
    /// Number of `input_audio_buffer.append` events.
    pub appends: u64,
    /// Every `conversation.item.truncate` and what the fake answered.
    pub truncates: Vec<TruncateRecord>,
    /// The `item` of every `conversation.item.create`.
    pub items_created: Vec<Value>,
    /// Number of `response.create` events.
    pub response_creates: u32,
    /// Number of `response.cancel` events.
    pub response_cancels: u32,
    /// Types of client events other than appends, in order.
    pub client_events: Vec<String>,
    /// The `event_id` of each of those (None when the client sent none).
    pub client_event_ids: Vec<Option<String>>,
    /// `input_audio_buffer.commit`s that committed audio (not refused as empty).
    pub commits: u32,
    /// Client messages that were not JSON objects with a `type`.
    pub malformed: u32,
    /// Codes of `error` events the fake sent (refused client events and configured faults).
    pub errors_sent: Vec<String>,
    /// The errors that answered a client mistake (not the configured faults), as
    /// `"<code>: <message>"` (the message names the refused path). Empty unless the client
    /// sent something the real API refuses too; the e2e `World` checks it when dropped.
    pub refusals: Vec<String>,
    /// Responses the fake produced, in order.
    pub responses: Vec<ResponseRecord>,
    /// Caller speech segments detected (speech_started count).
    pub speech_segments: u32,
    /// Transcripts the fake gave for the caller, in order.
    pub caller_transcripts: Vec<String>,
    /// Whether the connection has ended.
    pub closed: bool,
    /// When the handshake completed, the first caller audio arrived, the connection
    /// ended (for benchmarks: reconnect and rollover gaps).
    pub opened_at: Option<Instant>,
    pub first_append_at: Option<Instant>,
    pub closed_at: Option<Instant>,
    /// Set when the client replayed a history naming script lines: the turn the script
    /// continues at (a resumed call).
    pub resumed_at_turn: Option<usize>,
}

/// One `conversation.item.truncate`.
#[derive(Debug, Clone, PartialEq)]
pub struct TruncateRecord {
    pub item_id: String,
    pub content_index: u64,
    pub audio_end_ms: u64,
    /// Audio the fake had produced for the item, in ms (None: unknown item).
    pub produced_ms: Option<u64>,
    /// `None` when accepted, else the error code sent back.
    pub error: Option<String>,
}

/// One response the fake produced.
#[derive(Debug, Clone, PartialEq)]
pub struct ResponseRecord {
    pub response_id: String,
    /// The assistant message item, if the response spoke.
    pub item_id: Option<String>,
    pub text: String,
    /// Audio sent for the item, in ms (including late deltas after a cancel).
    pub audio_sent_ms: u64,
    /// Of that, audio sent after `speech_started` cut the response (ms).
    pub late_audio_ms: u64,
    /// `completed` or `cancelled`.
    pub status: String,
    /// The function call made, if any: (call_id, name).
    pub function_call: Option<(String, String)>,
}

impl FakeRealtime {
    /// A builder with the defaults: empty script, real-time pacing, any bearer token.
    pub fn builder() -> FakeRealtimeBuilder {
        FakeRealtimeBuilder::default()
    }

    /// `ws://127.0.0.1:port/v1/realtime` (the relay appends `?model=…`).
    pub fn url(&self) -> String {
        format!("ws://{}/v1/realtime", self.addr)
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Handshakes completed (WebSocket sessions opened).
    pub fn connections_accepted(&self) -> u64 {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    /// Sessions currently open.
    pub fn connections_open(&self) -> u64 {
        self.shared.open.load(Ordering::SeqCst)
    }

    /// Handshakes refused (bad or missing authorization, or `reject_auth`).
    pub fn handshakes_rejected(&self) -> u64 {
        self.shared.rejected.load(Ordering::SeqCst)
    }

    /// Snapshots of every connection's record, in accept order.
    pub fn connections(&self) -> Vec<ConnRecord> {
        let conns = lock(&self.shared.conns).clone();
        conns.iter().map(|c| lock(c).clone()).collect()
    }

    /// Snapshot of the n-th connection's record.
    pub fn connection(&self, n: usize) -> Option<ConnRecord> {
        let conn = lock(&self.shared.conns).get(n).cloned();
        conn.map(|c| lock(&c).clone())
    }

    /// Refuse (or accept again) new connections: while refusing, each TCP connection is
    /// closed as it arrives, before the WebSocket handshake, as an endpoint in an outage.
    pub fn set_refusing(&self, refusing: bool) {
        self.shared.refusing.store(refusing, Ordering::SeqCst);
    }

    /// Connections closed unanswered while refusing, or held unanswered while hanging.
    pub fn connections_refused(&self) -> u64 {
        self.shared.refused.load(Ordering::SeqCst)
    }

    /// Stop (or resume) answering on every connection; sockets stay open.
    pub fn set_stalled(&self, stalled: bool) {
        self.shared.stalled.store(stalled, Ordering::SeqCst);
    }

    /// Close every open connection now (code 1011), as a model failure.
    pub fn close_all(&self) {
        self.kill_tx.send_modify(|n| *n += 1);
    }
}

/// Records an `error` sent; `injected` when a configured fault, not the client, caused it.
fn record_error(record: &Mutex<ConnRecord>, code: &str, message: &str, injected: bool) {
    let mut rec = lock(record);
    rec.errors_sent.push(code.to_owned());
    if !injected {
        rec.refusals.push(format!("{code}: {message}"));
    }
}

/// Client event fields an `input_audio_buffer.append` may carry (GA schema).
const APPEND_FIELDS: [&str; 3] = ["type", "event_id", "audio"];

/// A poisoned lock only means a test thread panicked; the data is still usable.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

async fn accept_loop(
    listener: TcpListener,
    cfg: Arc<FakeRealtimeBuilder>,
    shared: Arc<Shared>,
    kill_tx: tokio::sync::watch::Sender<u64>,
) {
    let mut conns = tokio::task::JoinSet::new();
    let mut next_id = 0u64;
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                if shared.refusing.load(Ordering::SeqCst) {
                    shared.refused.fetch_add(1, Ordering::SeqCst);
                    drop(stream);
                    continue;
                }
                if cfg.hanging {
                    shared.refused.fetch_add(1, Ordering::SeqCst);
                    // Held (unread) until the fake is dropped.
                    conns.spawn(async move {
                        let _held = stream;
                        std::future::pending::<()>().await;
                    });
                    continue;
                }
                next_id += 1;
                let (cfg, shared, kill) = (cfg.clone(), shared.clone(), kill_tx.subscribe());
                conns.spawn(serve_conn(stream, next_id, cfg, shared, kill));
            }
            // Reap finished connection tasks so the set does not grow without bound.
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

struct HandshakeInfo {
    uri: String,
    authorization: String,
    beta: bool,
    authorized: bool,
}

async fn serve_conn(
    stream: TcpStream,
    conn_id: u64,
    cfg: Arc<FakeRealtimeBuilder>,
    shared: Arc<Shared>,
    mut kill: tokio::sync::watch::Receiver<u64>,
) {
    // Small JSON frames both ways: Nagle + delayed ACK would add ~40 ms per exchange.
    let _ = stream.set_nodelay(true);
    let mut info = HandshakeInfo {
        uri: String::new(),
        authorization: String::new(),
        beta: false,
        authorized: false,
    };
    // The callback's error type is fixed by tungstenite's `Callback` trait.
    #[allow(
        clippy::result_large_err,
        reason = "the Err type is tungstenite's ErrorResponse"
    )]
    let check = |req: &Request, resp: Response| -> Result<Response, ErrorResponse> {
        info.uri = req.uri().to_string();
        info.beta = req.headers().contains_key("openai-beta");
        let authorization = req
            .headers()
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        info.authorization = authorization.unwrap_or_default().to_owned();
        let bearer = authorization
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        info.authorized = !cfg.reject_auth
            && match (&cfg.require_key, bearer) {
                (_, None) => false,
                (Some(want), Some(got)) => want == got,
                (None, Some(got)) => !got.is_empty(),
            };
        if info.authorized {
            Ok(resp)
        } else {
            let mut err = ErrorResponse::new(Some(
                r#"{"error":{"type":"invalid_request_error","code":"invalid_api_key","message":"Incorrect API key provided."}}"#
                    .to_owned(),
            ));
            *err.status_mut() = http::StatusCode::UNAUTHORIZED;
            Err(err)
        }
    };
    let ws_cfg = WebSocketConfig::default()
        .max_message_size(Some(MAX_MESSAGE))
        .max_frame_size(Some(MAX_MESSAGE));
    let ws =
        match tokio_tungstenite::accept_hdr_async_with_config(stream, check, Some(ws_cfg)).await {
            Ok(ws) => ws,
            Err(_) => {
                // A refused or broken handshake; only refusals are counted.
                if !info.authorized {
                    shared.rejected.fetch_add(1, Ordering::SeqCst);
                }
                return;
            }
        };
    let record = Arc::new(Mutex::new(ConnRecord {
        uri: info.uri.clone(),
        opened_at: Some(Instant::now()),
        beta_header: info.beta,
        ..ConnRecord::default()
    }));
    lock(&shared.conns).push(record.clone());
    let nth = shared.accepted.fetch_add(1, Ordering::SeqCst) + 1;
    shared.open.fetch_add(1, Ordering::SeqCst);
    let faulty = cfg.faulty_connections.is_none_or(|k| nth <= k);
    let close_after_events = cfg.close_after_events.filter(|_| faulty);
    let stall_after_events = cfg.stall_after_events.filter(|_| faulty);
    let no_errors = Vec::new();
    let error_after_events = if faulty {
        &cfg.error_after_events
    } else {
        &no_errors
    };
    kill.mark_unchanged();
    if let Some(to_test) = &shared.manual {
        play_manual(ws, info, to_test, &record, &mut kill).await;
        let mut rec = lock(&record);
        rec.closed = true;
        rec.closed_at = Some(Instant::now());
        drop(rec);
        shared.open.fetch_sub(1, Ordering::SeqCst);
        return;
    }
    let (mut sink, mut source) = ws.split();
    let mut session = Session::new(conn_id, cfg.clone(), record.clone());
    let close_at = cfg
        .close_after
        .filter(|_| faulty)
        .map(|d| Instant::now() + d);
    let mut sent_events = 0u64;
    session.emit(json!({"type": "session.created", "session": session.session_object(&json!({}))}));
    'conn: loop {
        // Flush what the last step produced, applying the configured faults.
        while let Some(event) = session.out.pop_front() {
            let stalled = shared.stalled.load(Ordering::SeqCst)
                || stall_after_events.is_some_and(|n| sent_events >= n);
            if stalled {
                continue;
            }
            if sink.send(Message::text(event.to_string())).await.is_err() {
                break 'conn;
            }
            sent_events += 1;
            for (n, code, message) in error_after_events {
                if *n == sent_events {
                    let err = session.error_event(code, message, None, None);
                    record_error(&record, code, message, true);
                    if sink.send(Message::text(err.to_string())).await.is_err() {
                        break 'conn;
                    }
                }
            }
            if close_after_events.is_some_and(|n| sent_events >= n) {
                let _ = sink
                    .send(close_msg("fake: closing after configured events"))
                    .await;
                break 'conn;
            }
        }
        let tick_at = session.next_tick();
        tokio::select! {
            msg = source.next() => match msg {
                Some(Ok(Message::Text(text))) => session.on_client_text(&text),
                Some(Ok(Message::Binary(_))) => {
                    lock(&record).malformed += 1;
                    session.emit_error("invalid_request_error", "invalid_event", "Binary frames are not supported.", None);
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                Some(Ok(_)) => {}
            },
            // Paced audio of the response in progress.
            () = sleep_until_opt(tick_at) => session.on_tick(),
            // Configured lifetime reached: the model "fails".
            () = sleep_until_opt(close_at) => {
                let _ = sink.send(close_msg("fake: closing after configured time")).await;
                break;
            }
            // The test asked for every connection to be dropped.
            changed = kill.changed() => {
                if changed.is_ok() {
                    let _ = sink.send(close_msg("fake: closed by test")).await;
                }
                break;
            }
        }
    }
    {
        let mut rec = lock(&record);
        rec.closed = true;
        rec.closed_at = Some(Instant::now());
    }
    shared.open.fetch_sub(1, Ordering::SeqCst);
}

fn close_msg(reason: &'static str) -> Message {
    Message::Close(Some(CloseFrame {
        code: CloseCode::Error,
        reason: reason.into(),
    }))
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The response being streamed.
#[derive(Debug)]
struct Active {
    response_id: String,
    item_id: Option<String>,
    reply: AgentReply,
    total_bytes: usize,
    sent_bytes: usize,
    words: Vec<String>,
    words_sent: usize,
    next_at: Instant,
    output: Vec<Value>,
}

#[derive(Debug)]
struct Speech {
    item_id: String,
    silent_bytes: u64,
}

#[derive(Debug)]
struct PendingTool {
    call_id: String,
    after: Option<AgentReply>,
    output_received: bool,
}

/// One model session's state; all IO is done by the caller of its methods.
struct Session {
    conn_id: u64,
    cfg: Arc<FakeRealtimeBuilder>,
    record: Arc<Mutex<ConnRecord>>,
    script: Conversation,
    script_chosen: bool,
    next_turn: usize,
    greeted: bool,
    counter: u64,
    appended_bytes: u64,
    /// Echo mode with `chunk_ms`: audio appended and not echoed yet.
    echo_held: Vec<u8>,
    speech: Option<Speech>,
    last_item: Option<String>,
    active: Option<Active>,
    /// Audio bytes produced per item id (0 for items without model audio).
    produced: HashMap<String, usize>,
    pending_tool: Option<PendingTool>,
    last_user_text: Option<String>,
    /// Late bytes of the response being cancelled (for its record).
    late_bytes: usize,
    session: Value,
    out: VecDeque<Value>,
    /// Audio appended since the last commit.
    uncommitted_bytes: u64,
    /// Turn detection off: the answer to the caller's committed turn, for the next
    /// `response.create`.
    committed_turn: Option<AgentReply>,
    /// Client event types already refused once ([`FakeRealtimeBuilder::error_on_client_event`]).
    refused_once: Vec<String>,
    /// Audio deltas sent so far (picks the next size in [`DELTA_MS_CYCLE`]).
    deltas_sent: usize,
}

impl Session {
    fn new(conn_id: u64, cfg: Arc<FakeRealtimeBuilder>, record: Arc<Mutex<ConnRecord>>) -> Self {
        Self {
            conn_id,
            script: cfg.script.clone(),
            cfg,
            record,
            script_chosen: false,
            next_turn: 0,
            greeted: false,
            counter: 0,
            appended_bytes: 0,
            echo_held: Vec::new(),
            speech: None,
            last_item: None,
            active: None,
            produced: HashMap::new(),
            pending_tool: None,
            last_user_text: None,
            late_bytes: 0,
            session: json!({}),
            out: VecDeque::new(),
            uncommitted_bytes: 0,
            committed_turn: None,
            refused_once: Vec::new(),
            deltas_sent: 0,
        }
    }

    /// Server VAD runs unless the session turned turn detection off (`null`).
    fn vad_on(&self) -> bool {
        self.session
            .pointer("/audio/input/turn_detection")
            .is_none_or(|t| !t.is_null())
    }

    /// As the real server: the caller is transcribed only when the session asks for it
    /// (`audio.input.transcription` set); otherwise no caller text ever arrives.
    fn transcribes(&self) -> bool {
        self.session
            .pointer("/audio/input/transcription")
            .is_some_and(|t| !t.is_null())
    }

    fn id(&mut self, prefix: &str) -> String {
        self.counter += 1;
        format!("{prefix}_fk{}x{}", self.conn_id, self.counter)
    }

    fn emit(&mut self, mut event: Value) {
        let id = self.id("event");
        if let Some(obj) = event.as_object_mut() {
            obj.insert("event_id".into(), Value::String(id));
        }
        self.out.push_back(event);
    }

    fn error_event(
        &mut self,
        code: &str,
        message: &str,
        param: Option<&str>,
        client_event: Option<&str>,
    ) -> Value {
        json!({
            "type": "error",
            "event_id": self.id("event"),
            "error": {
                "type": "invalid_request_error",
                "code": code,
                "message": message,
                "param": param,
                "event_id": client_event,
            }
        })
    }

    fn emit_error(&mut self, _kind: &str, code: &str, message: &str, client_event: Option<&str>) {
        self.emit_error_at(code, message, None, client_event);
    }

    /// An `invalid_request_error` naming the refused field (`param`) and client event.
    fn emit_error_at(
        &mut self,
        code: &str,
        message: &str,
        param: Option<&str>,
        client_event: Option<&str>,
    ) {
        let e = self.error_event(code, message, param, client_event);
        record_error(&self.record, code, message, false);
        self.out.push_back(e);
    }

    fn session_object(&self, update: &Value) -> Value {
        let mut s = json!({
            "type": "realtime",
            "object": "realtime.session",
            "id": format!("sess_fk{}", self.conn_id),
            "model": "gpt-realtime",
            "output_modalities": ["audio"],
            "instructions": "",
            "audio": {
                "input": { "format": { "type": "audio/pcm", "rate": 24000 },
                           "turn_detection": { "type": "server_vad", "threshold": 0.5,
                               "prefix_padding_ms": 300, "silence_duration_ms": 200,
                               "create_response": true, "interrupt_response": true } },
                "output": { "format": { "type": "audio/pcm", "rate": 24000 }, "voice": "alloy" }
            },
            "tools": [],
        });
        merge(&mut s, &self.session);
        merge(&mut s, update);
        s
    }

    fn next_tick(&self) -> Option<Instant> {
        self.active
            .as_ref()
            .filter(|a| a.sent_bytes < a.total_bytes)
            .map(|a| a.next_at)
    }

    fn on_client_text(&mut self, text: &str) {
        let Ok(event) = serde_json::from_str::<Value>(text) else {
            lock(&self.record).malformed += 1;
            self.emit_error(
                "invalid_request_error",
                "invalid_json",
                "Invalid JSON.",
                None,
            );
            return;
        };
        let Some(kind) = event.get("type").and_then(Value::as_str).map(str::to_owned) else {
            lock(&self.record).malformed += 1;
            self.emit_error(
                "invalid_request_error",
                "invalid_event",
                "The 'type' field is missing.",
                None,
            );
            return;
        };
        let client_event_id = event
            .get("event_id")
            .and_then(Value::as_str)
            .map(str::to_owned);
        let ev_id = client_event_id.as_deref();
        if kind != "input_audio_buffer.append" {
            let mut rec = lock(&self.record);
            rec.client_events.push(kind.clone());
            rec.client_event_ids.push(client_event_id.clone());
        }
        // As the real server: an event its schema refuses is answered with an `error` and
        // has no other effect. Appends (50 a second per call) get the cheap check only.
        let refused = if kind == "input_audio_buffer.append" {
            event
                .as_object()
                .and_then(|o| o.keys().find(|k| !APPEND_FIELDS.contains(&k.as_str())))
                .map(|k| Refusal {
                    code: "unknown_parameter",
                    message: format!("Unknown parameter: '{k}'."),
                    param: k.clone(),
                })
        } else {
            realtime_schema::refusal(&event).err()
        };
        if let Some(r) = refused {
            self.emit_error_at(r.code, &r.message, Some(&r.param), ev_id);
            return;
        }
        if let Some((_, code, message)) = self
            .cfg
            .errors_on_client_events
            .iter()
            .find(|(ty, _, _)| *ty == kind && !self.refused_once.contains(ty))
            .cloned()
        {
            self.refused_once.push(kind.clone());
            let e = self.error_event(&code, &message, None, ev_id);
            record_error(&self.record, &code, &message, true);
            self.out.push_back(e);
            return;
        }
        match kind.as_str() {
            "session.update" => self.on_session_update(&event, ev_id),
            "input_audio_buffer.append" => self.on_append(&event, ev_id),
            "input_audio_buffer.commit" => self.on_commit(ev_id),
            "input_audio_buffer.clear" => self.emit(json!({"type": "input_audio_buffer.cleared"})),
            "conversation.item.create" => self.on_item_create(&event, ev_id),
            "conversation.item.truncate" => self.on_truncate(&event, ev_id),
            "conversation.item.delete" => {
                let item_id = event.get("item_id").cloned().unwrap_or(Value::Null);
                self.emit(json!({"type": "conversation.item.deleted", "item_id": item_id}));
            }
            "response.create" => self.on_response_create(&event, ev_id),
            "response.cancel" => {
                lock(&self.record).response_cancels += 1;
                if self.active.is_some() {
                    self.cancel_active("client_cancelled", 0);
                } else {
                    self.emit_error(
                        "invalid_request_error",
                        "response_cancel_not_active",
                        "Cancellation failed: no active response found",
                        ev_id,
                    );
                }
            }
            // Unknown events are tolerated, as the real server would answer with an error.
            other => {
                let msg = format!("Invalid value: '{other}'.");
                self.emit_error("invalid_request_error", "invalid_value", &msg, ev_id);
            }
        }
    }

    fn on_session_update(&mut self, event: &Value, ev_id: Option<&str>) {
        let Some(update) = event.get("session").filter(|s| s.is_object()) else {
            self.emit_error(
                "invalid_request_error",
                "missing_required_parameter",
                "Missing required parameter: 'session'.",
                ev_id,
            );
            return;
        };
        lock(&self.record).session_updates.push(update.clone());
        if update.get("type").and_then(Value::as_str) != Some("realtime") {
            self.emit_error(
                "invalid_request_error",
                "missing_required_parameter",
                "Missing required parameter: 'session.type'.",
                ev_id,
            );
            return;
        }
        if !self.script_chosen
            && let Some(instructions) = update.get("instructions").and_then(Value::as_str)
        {
            if let Some((_, script)) = self
                .cfg
                .scripts_by_marker
                .iter()
                .find(|(marker, _)| instructions.contains(marker.as_str()))
            {
                self.script = script.clone();
            }
            self.script_chosen = true;
        }
        let mut merged = self.session.clone();
        merge(&mut merged, update);
        self.session = merged;
        let full = self.session_object(&json!({}));
        self.emit(json!({"type": "session.updated", "session": full}));
    }

    fn on_append(&mut self, event: &Value, ev_id: Option<&str>) {
        let Some(audio) = event.get("audio").and_then(Value::as_str) else {
            self.emit_error(
                "invalid_request_error",
                "missing_required_parameter",
                "Missing required parameter: 'audio'.",
                ev_id,
            );
            return;
        };
        let Some(bytes) = audio::unb64(audio) else {
            self.emit_error(
                "invalid_request_error",
                "invalid_value",
                "Invalid 'audio'. Expected base64-encoded audio bytes.",
                ev_id,
            );
            return;
        };
        {
            let mut rec = lock(&self.record);
            if rec.first_append_at.is_none() {
                rec.first_append_at = Some(Instant::now());
            }
            rec.appends += 1;
            rec.appended_audio_bytes += bytes.len() as u64;
        }
        let before = self.appended_bytes;
        self.appended_bytes += bytes.len() as u64;
        self.uncommitted_bytes += bytes.len() as u64;
        if self.cfg.echo {
            if self.cfg.echo_speaking && before == 0 {
                self.emit(json!({"type": "input_audio_buffer.speech_started",
                    "item_id": "item_caller", "audio_start_ms": 0}));
            }
            let Some(ms) = self.cfg.chunk_ms else {
                self.emit(
                    json!({"type": "response.output_audio.delta", "response_id": "resp_echo",
                    "item_id": "item_echo", "output_index": 0, "content_index": 0, "delta": audio}),
                );
                return;
            };
            let chunk = ms as usize * audio::BYTES_PER_MS;
            self.echo_held.extend_from_slice(&bytes);
            while self.echo_held.len() >= chunk {
                let delta = audio::b64(&self.echo_held[..chunk]);
                self.echo_held.drain(..chunk);
                self.emit(
                    json!({"type": "response.output_audio.delta", "response_id": "resp_echo",
                    "item_id": "item_echo", "output_index": 0, "content_index": 0, "delta": delta}),
                );
            }
            return;
        }
        if !self.vad_on() {
            // Turn detection off: the client commits the turns.
            return;
        }
        let speech = audio::is_speech(&bytes);
        match (&mut self.speech, speech) {
            (None, true) => self.on_speech_started(before),
            (Some(seg), true) => seg.silent_bytes = 0,
            (Some(seg), false) => {
                seg.silent_bytes += bytes.len() as u64;
                if seg.silent_bytes >= u64::from(self.cfg.silence_ms) * 8 {
                    self.on_speech_stopped();
                }
            }
            (None, false) => {}
        }
    }

    fn on_speech_started(&mut self, start_bytes: u64) {
        let item_id = self.id("item");
        lock(&self.record).speech_segments += 1;
        self.emit(json!({"type": "input_audio_buffer.speech_started",
            "audio_start_ms": start_bytes / 8, "item_id": item_id}));
        self.speech = Some(Speech {
            item_id,
            silent_bytes: 0,
        });
        if self.active.is_some() {
            self.cancel_active("turn_detected", self.cfg.late_deltas);
        }
    }

    fn on_speech_stopped(&mut self) {
        let Some(seg) = self.speech.take() else {
            return;
        };
        let end_ms = (self.appended_bytes - seg.silent_bytes) / 8;
        let item_id = seg.item_id;
        self.emit(json!({"type": "input_audio_buffer.speech_stopped",
            "audio_end_ms": end_ms, "item_id": item_id}));
        let reply = self.commit_user_turn(item_id);
        if self.active.is_some() {
            // The real server refuses a second concurrent response too.
            return;
        }
        self.start_response(reply);
    }

    /// `input_audio_buffer.commit` (turn detection off): the buffer becomes the caller's
    /// turn, answered at the next `response.create`.
    fn on_commit(&mut self, ev_id: Option<&str>) {
        // The real server refuses less than 100 ms.
        if self.uncommitted_bytes < 100 * audio::BYTES_PER_MS as u64 {
            self.emit_error(
                "invalid_request_error",
                "input_audio_buffer_commit_empty",
                "Error committing input audio buffer: buffer too small.",
                ev_id,
            );
            return;
        }
        lock(&self.record).commits += 1;
        let item_id = self.id("item");
        let reply = self.commit_user_turn(item_id);
        self.committed_turn = Some(reply);
    }

    /// The buffer becomes a user item: committed, added, transcribed as the script's next
    /// caller line (when the session transcribes); its scripted answer is returned.
    fn commit_user_turn(&mut self, item_id: String) -> AgentReply {
        self.uncommitted_bytes = 0;
        let previous = self.last_item.replace(item_id.clone());
        self.emit(json!({"type": "input_audio_buffer.committed",
            "item_id": item_id, "previous_item_id": previous}));
        let item = json!({"id": item_id, "object": "realtime.item", "type": "message",
            "role": "user", "status": "completed",
            "content": [{"type": "input_audio", "transcript": null}]});
        self.emit(
            json!({"type": "conversation.item.added", "previous_item_id": previous, "item": item}),
        );
        self.emit(
            json!({"type": "conversation.item.done", "previous_item_id": previous, "item": item}),
        );
        self.produced.insert(item_id.clone(), 0);
        let turn = self.script.turns.get(self.next_turn).cloned();
        self.next_turn += 1;
        let (text, reply) = match turn {
            Some(t) => (t.caller.text, t.agent),
            None => ("(inaudible)".to_owned(), self.cfg.fallback_reply.clone()),
        };
        if !self.transcribes() {
            return reply;
        }
        if let Some((code, message)) = self.cfg.transcription_failure.clone() {
            self.emit(
                json!({"type": "conversation.item.input_audio_transcription.failed",
                "item_id": item_id, "content_index": 0,
                "error": {"type": "transcription_error", "code": code, "message": message,
                          "param": null}}),
            );
            return reply;
        }
        lock(&self.record).caller_transcripts.push(text.clone());
        let words = text.split_whitespace().count() as u64;
        self.emit(
            json!({"type": "conversation.item.input_audio_transcription.completed",
            "item_id": item_id, "content_index": 0, "transcript": text,
            "usage": {"type": "tokens", "input_tokens": 10 + words, "output_tokens": words,
                      "total_tokens": 10 + 2 * words,
                      "input_token_details": {"text_tokens": 0, "audio_tokens": 10 + words}}}),
        );
        reply
    }

    fn on_item_create(&mut self, event: &Value, ev_id: Option<&str>) {
        let Some(item) = event.get("item").filter(|i| i.is_object()).cloned() else {
            self.emit_error(
                "invalid_request_error",
                "missing_required_parameter",
                "Missing required parameter: 'item'.",
                ev_id,
            );
            return;
        };
        lock(&self.record).items_created.push(item.clone());
        let kind = item.get("type").and_then(Value::as_str).unwrap_or("");
        match kind {
            "function_call_output" => {
                let call_id = item.get("call_id").and_then(Value::as_str).unwrap_or("");
                let output_is_string = item.get("output").is_some_and(Value::is_string);
                // A replayed history may carry the call item itself (a new session).
                let replayed_call = lock(&self.record).items_created.iter().any(|i| {
                    i.get("type").and_then(Value::as_str) == Some("function_call")
                        && i.get("call_id").and_then(Value::as_str) == Some(call_id)
                });
                match &mut self.pending_tool {
                    Some(p) if p.call_id == call_id && output_is_string => {
                        p.output_received = true;
                    }
                    _ if replayed_call && output_is_string => {}
                    _ => {
                        let msg = format!("Tool call ID '{call_id}' not found in conversation.");
                        self.emit_error("invalid_request_error", "invalid_value", &msg, ev_id);
                        return;
                    }
                }
            }
            "message" => {
                let text = item
                    .get("content")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter_map(|c| c.get("text").and_then(Value::as_str))
                    .collect::<Vec<_>>()
                    .join(" ");
                let role = item.get("role").and_then(Value::as_str).unwrap_or("");
                // A resumed call's history ("Caller: <line>" for each line said so far),
                // or the conversation replayed item by item (a user message per caller
                // line): continue the script after the last line it mentions.
                let resumed_at = if role == "user" {
                    self.script
                        .turns
                        .iter()
                        .rposition(|t| text == t.caller.text)
                } else {
                    self.script
                        .turns
                        .iter()
                        .rposition(|t| text.contains(&format!("Caller: {}", t.caller.text)))
                };
                if role == "assistant" {
                    // Replayed assistant speech: whatever greeting there was is said.
                    self.greeted = true;
                } else if let Some(i) = resumed_at {
                    self.next_turn = self.next_turn.max(i + 1);
                    self.greeted = true;
                    lock(&self.record).resumed_at_turn = Some(i + 1);
                } else if !text.is_empty() {
                    self.last_user_text = Some(text);
                }
            }
            _ => {}
        }
        let item_id = item
            .get("id")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .unwrap_or_else(|| self.id("item"));
        let mut item = item;
        if let Some(obj) = item.as_object_mut() {
            obj.insert("id".into(), Value::String(item_id.clone()));
            obj.insert("status".into(), Value::String("completed".into()));
        }
        self.produced.insert(item_id.clone(), 0);
        let previous = self.last_item.replace(item_id);
        self.emit(
            json!({"type": "conversation.item.added", "previous_item_id": previous, "item": item}),
        );
        self.emit(
            json!({"type": "conversation.item.done", "previous_item_id": previous, "item": item}),
        );
    }

    fn on_truncate(&mut self, event: &Value, ev_id: Option<&str>) {
        let item_id = event
            .get("item_id")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned();
        let content_index = event
            .get("content_index")
            .and_then(Value::as_u64)
            .unwrap_or(0);
        let Some(end_ms) = event.get("audio_end_ms").and_then(Value::as_u64) else {
            self.emit_error(
                "invalid_request_error",
                "missing_required_parameter",
                "Missing required parameter: 'audio_end_ms'.",
                ev_id,
            );
            return;
        };
        let produced = self.produced.get(&item_id).copied();
        let produced_ms = produced.map(|b| (b / 8) as u64);
        let error = match produced {
            None => Some((
                "item_truncate_invalid_item_id",
                format!("Item with item_id not found: {item_id}"),
            )),
            Some(0) => Some((
                "unsupported_content_type",
                "Only model output audio messages can be truncated".to_owned(),
            )),
            Some(bytes) if end_ms > (bytes / 8) as u64 => Some((
                "invalid_value",
                format!(
                    "Audio content of {}ms is already shorter than {end_ms}ms",
                    bytes / 8
                ),
            )),
            Some(_) => None,
        };
        lock(&self.record).truncates.push(TruncateRecord {
            item_id: item_id.clone(),
            content_index,
            audio_end_ms: end_ms,
            produced_ms,
            error: error.as_ref().map(|(c, _)| (*c).to_owned()),
        });
        match error {
            Some((code, message)) => {
                self.emit_error("invalid_request_error", code, &message, ev_id);
            }
            None => self.emit(json!({"type": "conversation.item.truncated",
                "item_id": item_id, "content_index": content_index, "audio_end_ms": end_ms})),
        }
    }

    fn on_response_create(&mut self, event: &Value, ev_id: Option<&str>) {
        lock(&self.record).response_creates += 1;
        if self.active.is_some() {
            self.emit_error(
                "invalid_request_error",
                "conversation_already_has_active_response",
                "Conversation already has an active response in progress.",
                ev_id,
            );
            return;
        }
        let inline = event
            .pointer("/response/instructions")
            .and_then(Value::as_str)
            .map(str::to_owned);
        let reply = if let Some(p) = self.pending_tool.take_if(|p| p.output_received) {
            p.after.unwrap_or_default()
        } else if let Some(turn) = self.committed_turn.take() {
            // The caller's committed turn comes before a text item sent since.
            self.last_user_text = None;
            turn
        } else if !self.greeted
            && self.next_turn == 0
            && let Some(greeting) = self.script.greeting.clone()
            // Only an instruction that quotes the greeting word for word asks for it; one
            // to say something else (a voicemail) is answered with its own words.
            && self
                .last_user_text
                .as_deref()
                .is_none_or(|t| quoted_words(t) == greeting.text)
        {
            self.greeted = true;
            // The instruction that asked for the greeting is used up by it.
            self.last_user_text = None;
            greeting
        } else if let Some(text) = self.last_user_text.take().or(inline) {
            AgentReply::says(quoted_words(&text), self.cfg.say_audio_ms)
        } else {
            self.cfg.fallback_reply.clone()
        };
        self.start_response(reply);
    }

    fn start_response(&mut self, reply: AgentReply) {
        let response_id = self.id("resp");
        self.emit(json!({"type": "response.created", "response": {
            "id": response_id, "object": "realtime.response", "status": "in_progress",
            "status_details": null, "output": [], "conversation_id": "conv_fake",
            "output_modalities": ["audio"], "usage": null}}));
        self.emit(json!({"type": "rate_limits.updated", "rate_limits": [
            {"name": "requests", "limit": 5000, "remaining": 4999, "reset_seconds": 0.01},
            {"name": "tokens", "limit": 40000, "remaining": 39000, "reset_seconds": 1.5}]}));
        let speaks = reply.audio_ms > 0 || !reply.text.is_empty();
        let mut item_id = None;
        if speaks {
            let id = self.id("item");
            let item = json!({"id": id, "object": "realtime.item", "type": "message",
                "role": "assistant", "status": "in_progress", "content": []});
            self.emit(
                json!({"type": "response.output_item.added", "response_id": response_id,
                "output_index": 0, "item": item}),
            );
            let previous = self.last_item.replace(id.clone());
            self.emit(json!({"type": "conversation.item.added", "previous_item_id": previous, "item": item}));
            self.emit(
                json!({"type": "response.content_part.added", "response_id": response_id,
                "item_id": id, "output_index": 0, "content_index": 0,
                "part": {"type": "audio", "transcript": ""}}),
            );
            self.produced.insert(id.clone(), 0);
            item_id = Some(id);
        }
        let total_bytes = reply.audio_ms as usize * audio::BYTES_PER_MS;
        let words = reply.text.split_whitespace().map(str::to_owned).collect();
        self.active = Some(Active {
            response_id,
            item_id,
            reply,
            total_bytes,
            sent_bytes: 0,
            words,
            words_sent: 0,
            next_at: Instant::now(),
            output: Vec::new(),
        });
        if total_bytes == 0 {
            self.finish_active();
        }
    }

    /// Milliseconds of audio in the next delta: the fixed size if the test set one, else
    /// the next in [`DELTA_MS_CYCLE`].
    fn next_chunk_ms(&self) -> u32 {
        self.cfg
            .chunk_ms
            .unwrap_or(DELTA_MS_CYCLE[self.deltas_sent % DELTA_MS_CYCLE.len()])
    }

    /// Sends the next audio chunk of the active response; the one after follows when this
    /// one's audio would have played (at `speed`).
    fn on_tick(&mut self) {
        let chunk_ms = self.next_chunk_ms();
        let interval = Duration::from_secs_f64(f64::from(chunk_ms) / 1000.0 / self.cfg.speed);
        let chunk = chunk_ms as usize * audio::BYTES_PER_MS;
        self.deltas_sent += 1;
        let Some(a) = self.active.as_mut() else {
            return;
        };
        let Some(item_id) = a.item_id.clone() else {
            return;
        };
        let n = chunk.min(a.total_bytes - a.sent_bytes);
        let mut bytes = audio::tone(
            660.0,
            n.div_ceil(audio::BYTES_PER_MS) as u64,
            a.sent_bytes as u64,
        );
        bytes.truncate(n);
        a.sent_bytes += n;
        a.next_at += interval;
        let n_words = a.words.len();
        let upto = if a.total_bytes == 0 {
            n_words
        } else {
            (n_words * a.sent_bytes).div_ceil(a.total_bytes)
        };
        let transcript_delta = if upto > a.words_sent {
            let words = a.words[a.words_sent..upto].join(" ");
            let lead = if a.words_sent > 0 { " " } else { "" };
            a.words_sent = upto;
            Some(format!("{lead}{words}"))
        } else {
            None
        };
        let response_id = a.response_id.clone();
        let done = a.sent_bytes >= a.total_bytes;
        *self.produced.entry(item_id.clone()).or_default() += n;
        self.emit(
            json!({"type": "response.output_audio.delta", "response_id": response_id,
            "item_id": item_id, "output_index": 0, "content_index": 0,
            "delta": audio::b64(&bytes)}),
        );
        if let Some(delta) = transcript_delta {
            self.emit(json!({"type": "response.output_audio_transcript.delta",
                "response_id": response_id, "item_id": item_id, "output_index": 0,
                "content_index": 0, "delta": delta}));
        }
        if done {
            self.finish_active();
        }
    }

    /// Ends the spoken part of the active response (`status` of the item).
    fn close_message(&mut self, item_status: &str) {
        let Some(a) = self.active.as_mut() else {
            return;
        };
        let Some(item_id) = a.item_id.clone() else {
            return;
        };
        let response_id = a.response_id.clone();
        let transcript = a.reply.text.clone();
        let item = json!({"id": item_id, "object": "realtime.item", "type": "message",
            "role": "assistant", "status": item_status,
            "content": [{"type": "output_audio", "transcript": transcript}]});
        a.output.push(item.clone());
        let ids = json!({"response_id": response_id, "item_id": item_id, "output_index": 0, "content_index": 0});
        let with = |kind: &str, extra: Value| {
            let mut v = ids.clone();
            merge(&mut v, &json!({"type": kind}));
            merge(&mut v, &extra);
            v
        };
        let events = [
            with("response.output_audio.done", json!({})),
            with(
                "response.output_audio_transcript.done",
                json!({"transcript": transcript}),
            ),
            with(
                "response.content_part.done",
                json!({"part": {"type": "audio", "transcript": transcript}}),
            ),
            json!({"type": "response.output_item.done", "response_id": response_id,
                "output_index": 0, "item": item}),
            json!({"type": "conversation.item.done", "item": item}),
        ];
        for e in events {
            self.emit(e);
        }
    }

    fn finish_active(&mut self) {
        self.close_message("completed");
        let Some(a) = self.active.take() else {
            return;
        };
        let mut output = a.output.clone();
        let mut function_call = None;
        if let Some(call) = a.reply.function_call.clone() {
            let item_id = self.id("item");
            let call_id = self.id("call");
            let index = output.len();
            let added = json!({"id": item_id, "object": "realtime.item", "type": "function_call",
                "status": "in_progress", "call_id": call_id, "name": call.name, "arguments": ""});
            let done = json!({"id": item_id, "object": "realtime.item", "type": "function_call",
                "status": "completed", "call_id": call_id, "name": call.name,
                "arguments": call.arguments});
            self.emit(
                json!({"type": "response.output_item.added", "response_id": a.response_id,
                "output_index": index, "item": added}),
            );
            let previous = self.last_item.replace(item_id.clone());
            self.emit(json!({"type": "conversation.item.added", "previous_item_id": previous, "item": added}));
            self.emit(json!({"type": "response.function_call_arguments.delta",
                "response_id": a.response_id, "item_id": item_id, "output_index": index,
                "call_id": call_id, "delta": call.arguments}));
            self.emit(json!({"type": "response.function_call_arguments.done",
                "response_id": a.response_id, "item_id": item_id, "output_index": index,
                "call_id": call_id, "name": call.name, "arguments": call.arguments}));
            self.emit(
                json!({"type": "response.output_item.done", "response_id": a.response_id,
                "output_index": index, "item": done}),
            );
            self.emit(json!({"type": "conversation.item.done", "previous_item_id": previous, "item": done}));
            self.produced.insert(item_id, 0);
            output.push(done);
            function_call = Some((call_id.clone(), call.name.clone()));
            self.pending_tool = Some(PendingTool {
                call_id,
                after: a.reply.after_output.as_deref().cloned(),
                output_received: false,
            });
        }
        let nth = lock(&self.record).responses.len();
        match self.cfg.response_outcomes.iter().find(|(n, _)| *n == nth) {
            Some((_, outcome)) => {
                let mut details = json!({"type": outcome.status});
                if let Some(reason) = &outcome.reason {
                    details["reason"] = json!(reason);
                }
                if let Some((kind, code)) = &outcome.error {
                    details["error"] = json!({"type": kind, "code": code});
                }
                let status = outcome.status.clone();
                self.emit_done(&a, output, &status, Some(details), function_call);
            }
            None => self.emit_done(&a, output, "completed", None, function_call),
        }
    }

    /// Cuts the active response: `late` more deltas, then the cancelled tail.
    fn cancel_active(&mut self, reason: &str, late: u32) {
        let before = self.active.as_ref().map_or(0, |a| a.sent_bytes);
        for _ in 0..late {
            let more = self
                .active
                .as_ref()
                .is_some_and(|a| a.item_id.is_some() && a.sent_bytes < a.total_bytes);
            if !more {
                break;
            }
            // A late delta must not complete the response: keep at least one byte unsent.
            let next = self.next_chunk_ms() as usize * audio::BYTES_PER_MS;
            let almost_done = self
                .active
                .as_ref()
                .is_some_and(|a| a.total_bytes - a.sent_bytes <= next);
            if almost_done {
                break;
            }
            self.on_tick();
        }
        self.close_message("incomplete");
        let Some(a) = self.active.take() else {
            return;
        };
        let output = a.output.clone();
        self.late_bytes = a.sent_bytes - before;
        self.emit_done(
            &a,
            output,
            "cancelled",
            Some(json!({"type": "cancelled", "reason": reason})),
            None,
        );
    }

    fn emit_done(
        &mut self,
        a: &Active,
        output: Vec<Value>,
        status: &str,
        details: Option<Value>,
        function_call: Option<(String, String)>,
    ) {
        let audio_ms = (a.sent_bytes / audio::BYTES_PER_MS) as u64;
        let text_tokens = a.words.len() as u64;
        let audio_tokens = audio_ms / 50;
        let input_audio = self.appended_bytes / 800;
        let input_text = 50u64;
        let usage = json!({
            "total_tokens": input_text + input_audio + text_tokens + audio_tokens,
            "input_tokens": input_text + input_audio,
            "output_tokens": text_tokens + audio_tokens,
            "input_token_details": {"text_tokens": input_text, "audio_tokens": input_audio,
                "image_tokens": 0, "cached_tokens": 0,
                "cached_tokens_details": {"text_tokens": 0, "audio_tokens": 0, "image_tokens": 0}},
            "output_token_details": {"text_tokens": text_tokens, "audio_tokens": audio_tokens}
        });
        self.emit(json!({"type": "response.done", "response": {
            "id": a.response_id, "object": "realtime.response", "status": status,
            "status_details": details, "output": output, "conversation_id": "conv_fake",
            "output_modalities": ["audio"], "usage": usage}}));
        lock(&self.record).responses.push(ResponseRecord {
            response_id: a.response_id.clone(),
            item_id: a.item_id.clone(),
            text: a.reply.text.clone(),
            audio_sent_ms: audio_ms,
            late_audio_ms: (std::mem::take(&mut self.late_bytes) / audio::BYTES_PER_MS) as u64,
            status: status.to_owned(),
            function_call,
        });
    }
}

/// Deep-merges `patch` into `base` (objects merged key by key, everything else replaced).
fn merge(base: &mut Value, patch: &Value) {
    match (base, patch) {
        (Value::Object(b), Value::Object(p)) => {
            for (k, v) in p {
                merge(b.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
        (b, p) => *b = p.clone(),
    }
}

/// What an instruction asks the model to say: the words it quotes at its end (`… saying:
/// "Hello."` → `Hello.`), as the real model would say just those; the whole text when it
/// quotes nothing.
fn quoted_words(instruction: &str) -> &str {
    instruction
        .strip_suffix('"')
        .and_then(|head| head.split_once(": \""))
        .map_or(instruction, |(_, words)| words)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conversation::Turn;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;

    type Ws = tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >;

    const LIMIT: Duration = Duration::from_secs(10);

    #[test]
    fn an_instruction_that_quotes_its_words_is_answered_with_them_alone() {
        assert_eq!(
            quoted_words(
                "Leave this voicemail message now, saying exactly: \"Call us: \"back\".\""
            ),
            "Call us: \"back\"."
        );
        assert_eq!(
            quoted_words("Greet the caller now by saying: \"Hi.\""),
            "Hi."
        );
        assert_eq!(
            quoted_words("Tell them the order shipped."),
            "Tell them the order shipped."
        );
        assert_eq!(quoted_words("a \"quote\" inside"), "a \"quote\" inside");
    }

    async fn connect(fake: &FakeRealtime, key: Option<&str>) -> Result<Ws, String> {
        let mut req = format!("{}?model=gpt-realtime", fake.url())
            .into_client_request()
            .expect("valid url");
        if let Some(key) = key {
            req.headers_mut().insert(
                "authorization",
                format!("Bearer {key}").parse().expect("header"),
            );
        }
        tokio::time::timeout(LIMIT, tokio_tungstenite::connect_async(req))
            .await
            .expect("connect in time")
            .map(|(ws, _)| ws)
            .map_err(|e| e.to_string())
    }

    async fn send(ws: &mut Ws, v: Value) {
        tokio::time::timeout(LIMIT, ws.send(Message::text(v.to_string())))
            .await
            .expect("send in time")
            .expect("send");
    }

    /// Reads events until one of type `kind`, returning all read (inclusive).
    async fn until(ws: &mut Ws, kind: &str) -> Vec<Value> {
        let mut seen = Vec::new();
        loop {
            let msg = tokio::time::timeout(LIMIT, ws.next())
                .await
                .unwrap_or_else(|_| panic!("timed out waiting for {kind}; saw {seen:?}"))
                .expect("socket open")
                .expect("message");
            if let Message::Text(t) = msg {
                let v: Value = serde_json::from_str(&t).expect("json");
                let done = v["type"] == kind;
                seen.push(v);
                if done {
                    return seen;
                }
            }
        }
    }

    #[tokio::test]
    async fn manual_mode_hands_each_connection_to_the_test() {
        let (fake, mut conns) = FakeRealtime::builder().start_manual().await.expect("bind");
        let mut ws = connect(&fake, Some("sk-manual")).await.expect("accepted");
        let mut conn = crate::with_timeout(LIMIT, "a manual connection", conns.recv())
            .await
            .expect("connection handed over");
        assert_eq!(conn.authorization, "Bearer sk-manual");
        assert_eq!(conn.uri, "/v1/realtime?model=gpt-realtime");
        // Nothing scripted: the first server event is the test's.
        conn.send(json!({"type": "session.created", "session": {}}))
            .await;
        let seen = until(&mut ws, "session.created").await;
        assert_eq!(types(&seen), ["session.created"]);
        // Client events arrive parsed; next_of skips other types.
        send(
            &mut ws,
            json!({"type": "input_audio_buffer.append", "audio": "AA=="}),
        )
        .await;
        send(&mut ws, json!({"type": "response.create"})).await;
        assert_eq!(
            conn.next_of("response.create").await["type"],
            "response.create"
        );
        // The client's close code is reported, and the connection is recorded as closed.
        ws.close(Some(CloseFrame {
            code: CloseCode::Away,
            reason: "bye".into(),
        }))
        .await
        .expect("close");
        assert_eq!(conn.next_of("__closed").await["code"], 1001);
        assert!(
            crate::eventually(LIMIT, || fake.connections_open() == 0).await,
            "closed"
        );
        assert_eq!(fake.connections_accepted(), 1);
        assert!(fake.connection(0).expect("recorded").closed);

        // Dropping the sender closes the socket with a close frame.
        let mut ws = connect(&fake, Some("sk-manual")).await.expect("accepted");
        let conn = crate::with_timeout(LIMIT, "a second connection", conns.recv())
            .await
            .expect("connection handed over");
        drop(conn.tx);
        let closed = crate::with_timeout(LIMIT, "close frame", ws.next()).await;
        assert!(matches!(closed, Some(Ok(Message::Close(_)))), "{closed:?}");
        // Handshake checks still apply.
        assert!(connect(&fake, None).await.is_err());
        assert_eq!(fake.handshakes_rejected(), 1);
    }

    fn types(events: &[Value]) -> Vec<&str> {
        events.iter().filter_map(|e| e["type"].as_str()).collect()
    }

    async fn append(ws: &mut Ws, bytes: &[u8]) {
        for frame in bytes.chunks(audio::FRAME_BYTES) {
            send(
                ws,
                json!({"type": "input_audio_buffer.append", "audio": audio::b64(frame)}),
            )
            .await;
        }
    }

    fn script() -> Conversation {
        Conversation {
            greeting: Some(AgentReply::says("Hello there", 300)),
            turns: vec![
                Turn::new(
                    "What time is it",
                    400,
                    AgentReply::says("It is noon now", 1000),
                )
                .barge_in_after(200),
                Turn::new(
                    "Thanks",
                    300,
                    AgentReply::says("Bye", 200).then_calls("end_call", "{}"),
                ),
            ],
        }
    }

    #[tokio::test]
    async fn refuses_missing_or_wrong_key_with_401() {
        let fake = FakeRealtime::builder()
            .require_key("sk-good")
            .start()
            .await
            .expect("start");
        let err = connect(&fake, None).await.expect_err("no key refused");
        assert!(err.contains("401"), "{err}");
        let err = connect(&fake, Some("sk-bad"))
            .await
            .expect_err("bad key refused");
        assert!(err.contains("401"), "{err}");
        assert_eq!(fake.connections_accepted(), 0);
        assert_eq!(fake.handshakes_rejected(), 2);
        let _ws = connect(&fake, Some("sk-good"))
            .await
            .expect("good key accepted");
        assert_eq!(fake.connections_accepted(), 1);
    }

    #[tokio::test]
    async fn reject_auth_mode_refuses_everyone() {
        let fake = FakeRealtime::builder()
            .reject_auth()
            .start()
            .await
            .expect("start");
        assert!(connect(&fake, Some("sk-any")).await.is_err());
        assert_eq!(fake.connections_accepted(), 0);
    }

    #[tokio::test]
    async fn scripted_session_greets_answers_barge_in_truncates_and_calls_tools() {
        let fake = FakeRealtime::builder()
            .script(script())
            .speed(2.0)
            .chunk_ms(100)
            .late_deltas(1)
            .start()
            .await
            .expect("start");
        let mut ws = connect(&fake, Some("sk-test")).await.expect("connect");
        let first = until(&mut ws, "session.created").await;
        assert_eq!(first.len(), 1);
        send(
            &mut ws,
            json!({"type": "session.update", "session": {"type": "realtime",
            "instructions": "be nice", "audio": {"input": {"format": {"type": "audio/pcmu"},
            "transcription": {"model": "gpt-4o-mini-transcribe"}}}}}),
        )
        .await;
        let updated = until(&mut ws, "session.updated").await;
        let session = &updated.last().expect("event")["session"];
        assert_eq!(session["audio"]["input"]["format"]["type"], "audio/pcmu");
        assert_eq!(session["instructions"], "be nice");

        // Greeting on a response.create with no caller turn.
        send(&mut ws, json!({"type": "response.create"})).await;
        let greeting = until(&mut ws, "response.done").await;
        let deltas: usize = greeting
            .iter()
            .filter(|e| e["type"] == "response.output_audio.delta")
            .map(|e| audio::b64_len(e["delta"].as_str().expect("delta")))
            .sum();
        assert_eq!(deltas, 300 * 8);
        let transcript = greeting
            .iter()
            .find(|e| e["type"] == "response.output_audio_transcript.done")
            .expect("transcript done");
        assert_eq!(transcript["transcript"], "Hello there");

        // Caller turn 1: speech, then silence ends it and the answer starts.
        append(&mut ws, &audio::tone(300.0, 400, 0)).await;
        append(&mut ws, &audio::silence(200)).await;
        let turn = until(&mut ws, "response.output_audio.delta").await;
        let kinds = types(&turn);
        let pos = |k: &str| {
            kinds
                .iter()
                .position(|x| *x == k)
                .unwrap_or_else(|| panic!("{k} in {kinds:?}"))
        };
        assert!(
            pos("input_audio_buffer.speech_started") < pos("input_audio_buffer.speech_stopped")
        );
        assert!(pos("input_audio_buffer.committed") < pos("response.created"));
        let started = &turn[pos("input_audio_buffer.speech_started")];
        assert_eq!(started["audio_start_ms"], 0);
        let tr = &turn[pos("conversation.item.input_audio_transcription.completed")];
        assert_eq!(tr["transcript"], "What time is it");
        let item_id = turn.last().expect("delta")["item_id"]
            .as_str()
            .expect("id")
            .to_owned();

        // Barge in: speech during the answer cancels it (after one late delta).
        append(&mut ws, &audio::tone(300.0, 20, 0)).await;
        let cut = until(&mut ws, "response.done").await;
        let done = cut.last().expect("done");
        assert_eq!(done["response"]["status"], "cancelled");
        assert_eq!(
            done["response"]["status_details"]["reason"],
            "turn_detected"
        );
        let kinds = types(&cut);
        assert!(kinds.contains(&"input_audio_buffer.speech_started"));
        let cut_record = fake.connection(0).expect("conn").responses[1].clone();
        let produced = cut_record.audio_sent_ms;
        assert!(produced < 1000, "cut before the end: {produced}");
        assert_eq!(cut_record.late_audio_ms, 100, "one late 100 ms delta");

        // Truncates: over-long is refused, within is accepted, unknown item refused.
        send(
            &mut ws,
            json!({"type": "conversation.item.truncate", "item_id": item_id,
            "content_index": 0, "audio_end_ms": produced + 20}),
        )
        .await;
        let e = until(&mut ws, "error").await;
        assert!(
            e.last().expect("error")["error"]["message"]
                .as_str()
                .expect("message")
                .contains("is already shorter than")
        );
        send(
            &mut ws,
            json!({"type": "conversation.item.truncate", "item_id": item_id,
            "content_index": 0, "audio_end_ms": 100}),
        )
        .await;
        let t = until(&mut ws, "conversation.item.truncated").await;
        assert_eq!(t.last().expect("ev")["audio_end_ms"], 100);

        // Turn 2 (the barge-in speech continues, then silence): a function call.
        append(&mut ws, &audio::tone(300.0, 280, 160)).await;
        append(&mut ws, &audio::silence(200)).await;
        let call = until(&mut ws, "response.done").await;
        let args = call
            .iter()
            .find(|e| e["type"] == "response.function_call_arguments.done")
            .expect("function call");
        assert_eq!(args["name"], "end_call");
        let call_id = args["call_id"].as_str().expect("call id").to_owned();
        // A wrong call id is an error; the right one then response.create gets an answer.
        send(
            &mut ws,
            json!({"type": "conversation.item.create", "item": {
            "type": "function_call_output", "call_id": "call_nope", "output": "{}"}}),
        )
        .await;
        until(&mut ws, "error").await;
        send(
            &mut ws,
            json!({"type": "conversation.item.create", "item": {
            "type": "function_call_output", "call_id": call_id, "output": "{\"ok\":true}"}}),
        )
        .await;
        until(&mut ws, "conversation.item.done").await;
        send(&mut ws, json!({"type": "response.create"})).await;
        let after = until(&mut ws, "response.done").await;
        assert_eq!(
            after.last().expect("done")["response"]["status"],
            "completed"
        );

        let rec = fake.connection(0).expect("conn");
        assert_eq!(rec.truncates.len(), 2);
        assert_eq!(rec.truncates[0].error.as_deref(), Some("invalid_value"));
        assert_eq!(rec.truncates[1].error, None);
        assert_eq!(rec.caller_transcripts, vec!["What time is it", "Thanks"]);
        assert_eq!(rec.response_creates, 2);
        assert_eq!(rec.appended_audio_bytes, (400 + 200 + 20 + 280 + 200) * 8);
        assert!(!rec.beta_header);
        assert!(rec.uri.contains("model=gpt-realtime"));
    }

    #[tokio::test]
    async fn turn_detection_off_waits_for_commits_and_scripted_outcomes_apply() {
        let fake = FakeRealtime::builder()
            .script(script())
            .speed(4.0)
            .response_outcome(
                0,
                ResponseOutcome {
                    status: "incomplete".into(),
                    reason: Some("max_output_tokens".into()),
                    error: None,
                },
            )
            .error_on_client_event("conversation.item.delete", "test_refused", "no")
            .start()
            .await
            .expect("start");
        let mut ws = connect(&fake, Some("k")).await.expect("connect");
        until(&mut ws, "session.created").await;
        send(
            &mut ws,
            json!({"type": "session.update", "session": {"type": "realtime",
            "audio": {"input": {"turn_detection": null}}}}),
        )
        .await;
        until(&mut ws, "session.updated").await;
        // 50 ms: too little to commit.
        append(&mut ws, &audio::tone(300.0, 50, 0)).await;
        send(
            &mut ws,
            json!({"type": "input_audio_buffer.commit", "event_id": "c1"}),
        )
        .await;
        let refused = until(&mut ws, "error").await;
        let e = &refused.last().expect("error")["error"];
        assert_eq!(e["code"], "input_audio_buffer_commit_empty");
        assert_eq!(e["event_id"], "c1");
        // No VAD: speech then silence is not a turn by itself.
        append(&mut ws, &audio::tone(300.0, 400, 0)).await;
        append(&mut ws, &audio::silence(400)).await;
        send(&mut ws, json!({"type": "input_audio_buffer.commit"})).await;
        let committed = until(&mut ws, "conversation.item.done").await;
        assert_eq!(
            types(&committed),
            [
                "input_audio_buffer.committed",
                "conversation.item.added",
                "conversation.item.done"
            ],
            "no VAD events, no transcription (the session did not ask for one)"
        );
        send(&mut ws, json!({"type": "response.create"})).await;
        let answer = until(&mut ws, "response.done").await;
        let done = &answer.last().expect("done")["response"];
        assert_eq!(done["status"], "incomplete");
        assert_eq!(done["status_details"]["reason"], "max_output_tokens");
        let said = answer
            .iter()
            .find(|e| e["type"] == "response.output_audio_transcript.done")
            .expect("spoken");
        assert_eq!(
            said["transcript"], "It is noon now",
            "the first turn's answer"
        );
        send(
            &mut ws,
            json!({"type": "conversation.item.delete", "item_id": "x", "event_id": "d1"}),
        )
        .await;
        let refused = until(&mut ws, "error").await;
        assert_eq!(refused.last().expect("error")["error"]["event_id"], "d1");
        let rec = fake.connection(0).expect("conn");
        assert_eq!(rec.commits, 1);
        assert_eq!(rec.speech_segments, 0);
        assert!(rec.caller_transcripts.is_empty());
        assert_eq!(rec.client_event_ids[1].as_deref(), Some("c1"));
    }

    #[tokio::test]
    async fn default_deltas_vary_in_size_and_add_up() {
        let fake = FakeRealtime::builder()
            .script(Conversation {
                greeting: Some(AgentReply::says("Hello there", 900)),
                turns: Vec::new(),
            })
            .speed(8.0)
            .start()
            .await
            .expect("start");
        let mut ws = connect(&fake, Some("k")).await.expect("connect");
        until(&mut ws, "session.created").await;
        send(&mut ws, json!({"type": "response.create"})).await;
        let sizes: Vec<usize> = until(&mut ws, "response.done")
            .await
            .iter()
            .filter(|e| e["type"] == "response.output_audio.delta")
            .map(|e| audio::b64_len(e["delta"].as_str().expect("delta")))
            .collect();
        assert_eq!(sizes.iter().sum::<usize>(), 900 * 8);
        let cycle: Vec<usize> = DELTA_MS_CYCLE.iter().map(|ms| *ms as usize * 8).collect();
        assert_eq!(sizes[..8], cycle[..], "{sizes:?}");
        assert!(sizes.iter().any(|b| b % 160 != 0), "odd sizes: {sizes:?}");
    }

    #[tokio::test]
    async fn echo_mode_returns_each_append() {
        let fake = FakeRealtime::builder().echo().start().await.expect("start");
        let mut ws = connect(&fake, Some("k")).await.expect("connect");
        until(&mut ws, "session.created").await;
        let payload = audio::b64(&audio::tone(500.0, 20, 0));
        send(
            &mut ws,
            json!({"type": "input_audio_buffer.append", "audio": payload}),
        )
        .await;
        let got = until(&mut ws, "response.output_audio.delta").await;
        assert_eq!(got.last().expect("delta")["delta"], payload);
    }

    #[tokio::test]
    async fn echo_mode_with_chunk_ms_joins_appends_into_larger_deltas() {
        let fake = FakeRealtime::builder()
            .echo()
            .chunk_ms(40)
            .start()
            .await
            .expect("start");
        let mut ws = connect(&fake, Some("k")).await.expect("connect");
        until(&mut ws, "session.created").await;
        let frames: Vec<Vec<u8>> = (0..3)
            .map(|i| audio::tone(500.0 + 100.0 * f64::from(i), 20, 0))
            .collect();
        for f in &frames {
            send(
                &mut ws,
                json!({"type": "input_audio_buffer.append", "audio": audio::b64(f)}),
            )
            .await;
        }
        // Two 20 ms appends make one 40 ms delta; the third waits for a fourth.
        let got = until(&mut ws, "response.output_audio.delta").await;
        let delta = got.last().expect("delta")["delta"]
            .as_str()
            .expect("text")
            .to_owned();
        assert_eq!(
            audio::unb64(&delta),
            Some([frames[0].clone(), frames[1].clone()].concat())
        );
    }

    #[tokio::test]
    async fn echo_speaking_says_the_caller_speaks_once_then_echoes() {
        let fake = FakeRealtime::builder()
            .echo_speaking()
            .start()
            .await
            .expect("start");
        let mut ws = connect(&fake, Some("k")).await.expect("connect");
        until(&mut ws, "session.created").await;
        let payload = audio::b64(&audio::tone(500.0, 20, 0));
        let append = json!({"type": "input_audio_buffer.append", "audio": payload});
        send(&mut ws, append.clone()).await;
        let first = until(&mut ws, "response.output_audio.delta").await;
        let kinds: Vec<&str> = first.iter().filter_map(|v| v["type"].as_str()).collect();
        assert_eq!(
            kinds,
            [
                "input_audio_buffer.speech_started",
                "response.output_audio.delta"
            ]
        );
        send(&mut ws, append).await;
        let second = until(&mut ws, "response.output_audio.delta").await;
        assert_eq!(second.len(), 1, "no second speech_started: {second:?}");
        assert_eq!(second[0]["delta"], payload);
    }

    #[tokio::test]
    async fn faults_bad_input_errors_and_close_after_events() {
        let fake = FakeRealtime::builder()
            .close_after_events(3)
            .start()
            .await
            .expect("start");
        let mut ws = connect(&fake, Some("k")).await.expect("connect");
        until(&mut ws, "session.created").await;
        ws.send(Message::text("not json")).await.expect("send");
        until(&mut ws, "error").await;
        send(&mut ws, json!({"type": "no.such.event"})).await;
        until(&mut ws, "error").await;
        // Three events sent: the server closes.
        let end = tokio::time::timeout(LIMIT, ws.next())
            .await
            .expect("in time");
        assert!(
            matches!(end, Some(Ok(Message::Close(_))) | None | Some(Err(_))),
            "{end:?}"
        );
        let rec = fake.connection(0).expect("conn");
        assert_eq!(rec.malformed, 1);
        assert_eq!(rec.errors_sent, vec!["invalid_json", "invalid_value"]);
        let deadline = Instant::now() + LIMIT;
        while fake.connections_open() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(fake.connections_open(), 0);
    }

    #[tokio::test]
    async fn events_the_schema_refuses_get_the_real_apis_error_and_no_effect() {
        let fake = FakeRealtime::builder().start().await.expect("start");
        let mut ws = connect(&fake, Some("k")).await.expect("connect");
        until(&mut ws, "session.created").await;
        // A misspelt transcription field: the real server refuses the whole update.
        send(
            &mut ws,
            json!({"type": "session.update", "event_id": "su1", "session": {"type": "realtime",
            "audio": {"input": {"transcription": {"model": "gpt-4o-mini-transcribe",
            "lang": "en"}}}}}),
        )
        .await;
        let seen = until(&mut ws, "error").await;
        assert!(!types(&seen).contains(&"session.updated"), "{seen:?}");
        let e = &seen.last().expect("error")["error"];
        assert_eq!(e["type"], "invalid_request_error");
        assert_eq!(e["code"], "unknown_parameter");
        assert_eq!(e["param"], "session.audio.input.transcription.lang");
        assert_eq!(
            e["message"],
            "Unknown parameter: 'session.audio.input.transcription.lang'."
        );
        assert_eq!(e["event_id"], "su1");
        // An append with a field it does not have, and one whose audio is not base64.
        send(
            &mut ws,
            json!({"type": "input_audio_buffer.append", "audio": "AA==", "rate": 8000}),
        )
        .await;
        let e = until(&mut ws, "error").await;
        assert_eq!(e.last().expect("error")["error"]["param"], "rate");
        send(
            &mut ws,
            json!({"type": "input_audio_buffer.append", "audio": "not base64!"}),
        )
        .await;
        until(&mut ws, "error").await;
        let rec = fake.connection(0).expect("conn");
        assert!(rec.session_updates.is_empty(), "refused: no effect");
        assert_eq!(rec.appends, 0);
        assert_eq!(
            rec.errors_sent,
            ["unknown_parameter", "unknown_parameter", "invalid_value"]
        );
        assert!(
            rec.refusals[0].contains("session.audio.input.transcription.lang"),
            "{:?}",
            rec.refusals
        );
    }

    #[tokio::test]
    async fn undocumented_url_parameters_change_nothing() {
        // Only `model` is documented for a GA session; the Twilio samples' `temperature`
        // and `voice` are assumed ignored, so the fake ignores them (and the relay sends
        // neither).
        let fake = FakeRealtime::builder().start().await.expect("start");
        let req = format!(
            "{}?model=gpt-realtime&temperature=0.6&voice=cedar",
            fake.url()
        );
        let mut req = req.into_client_request().expect("valid url");
        req.headers_mut()
            .insert("authorization", "Bearer k".parse().expect("header"));
        let (mut ws, _) = tokio::time::timeout(LIMIT, tokio_tungstenite::connect_async(req))
            .await
            .expect("in time")
            .expect("accepted");
        let created = until(&mut ws, "session.created").await;
        let session = &created.last().expect("event")["session"];
        assert_eq!(session["audio"]["output"]["voice"], "alloy");
        assert!(session.get("temperature").is_none(), "{session}");
    }

    #[tokio::test]
    async fn close_all_drops_open_sessions() {
        let fake = FakeRealtime::builder().start().await.expect("start");
        let mut ws = connect(&fake, Some("k")).await.expect("connect");
        until(&mut ws, "session.created").await;
        assert_eq!(fake.connections_open(), 1);
        fake.close_all();
        let end = tokio::time::timeout(LIMIT, ws.next())
            .await
            .expect("in time");
        assert!(
            matches!(end, Some(Ok(Message::Close(_))) | None | Some(Err(_))),
            "{end:?}"
        );
    }
}

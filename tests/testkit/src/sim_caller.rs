//! A simulated Twilio caller: the voice webhook, the Media Streams WebSocket and the
//! `<Connect action>` request, each signed like Twilio signs them.
//!
//! It plays a [`Conversation`] script: silence (0xFF) between turns and a μ-law tone while
//! "speaking", at the real 20 ms frame pace. Audio from the relay goes into a play queue that
//! drains at real time (8 bytes/ms, or faster with `playback_speed`); a `mark` is echoed when
//! everything queued before it has played (at once when nothing is queued); `clear` drops the queue
//! and echoes every pending mark at once (`docs/protocols.md`, "Marks and clear"). Everything the
//! relay sent is recorded for assertions.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};

use crate::audio;
use crate::conversation::Conversation;
use crate::http::{self, HttpResponse};
use crate::signature::twilio_signature;
use crate::twiml::Twiml;

/// Largest relay message accepted (an outbound media message of a few seconds of audio).
const MAX_MESSAGE: usize = 1024 * 1024;

/// Round-robin over relay addresses, like a load balancer in front of relay pods. A test
/// can take an address out of rotation (what a balancer does once `/readyz` fails) and
/// put it back.
#[derive(Debug)]
pub struct LoadBalancer {
    addrs: Vec<SocketAddr>,
    out_of_rotation: std::sync::Mutex<Vec<SocketAddr>>,
    next: AtomicUsize,
}

impl LoadBalancer {
    /// A balancer over `addrs` (at least one).
    pub fn new(addrs: Vec<SocketAddr>) -> Arc<Self> {
        Arc::new(Self {
            addrs,
            out_of_rotation: std::sync::Mutex::new(Vec::new()),
            next: AtomicUsize::new(0),
        })
    }

    fn out(&self) -> std::sync::MutexGuard<'_, Vec<SocketAddr>> {
        self.out_of_rotation
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Takes `addr` out of rotation (`false`) or puts it back (`true`).
    pub fn set_in_rotation(&self, addr: SocketAddr, in_rotation: bool) {
        let mut out = self.out();
        out.retain(|a| *a != addr);
        if !in_rotation {
            out.push(addr);
        }
    }

    /// The next address in rotation.
    pub fn pick(&self) -> Result<SocketAddr, CallerError> {
        let out = self.out();
        let up: Vec<SocketAddr> = self
            .addrs
            .iter()
            .copied()
            .filter(|a| !out.contains(a))
            .collect();
        if up.is_empty() {
            return Err(CallerError::Config("no relay address in rotation".into()));
        }
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        Ok(up[n % up.len()])
    }
}

/// Who the caller is and how it behaves.
#[derive(Debug, Clone)]
pub struct CallerConfig {
    /// The public base URL Twilio believes it calls (`https://relay.example.com`); signed
    /// URLs are built from it.
    pub public_base: String,
    /// Where requests actually go.
    pub relays: Arc<LoadBalancer>,
    /// Twilio auth token to sign with; `None` sends no signature header.
    pub auth_token: Option<String>,
    /// Send a signature computed with a wrong token.
    pub wrong_signature: bool,
    /// `?callId=` on the webhook URL (pre-created calls).
    pub call_id: Option<String>,
    pub call_sid: String,
    pub account_sid: String,
    pub from: String,
    pub to: String,
    /// Twilio's `Direction` (`inbound`, `outbound-api`).
    pub direction: String,
    /// The script to play.
    pub script: Conversation,
    /// Tone frequency of the caller's "speech".
    pub tone_hz: f64,
    /// Silence before the caller answers once the agent finished (ms).
    pub gap_ms: u32,
    /// Silence at the start when there is no greeting to wait for (ms).
    pub initial_silence_ms: u32,
    /// Silence after the last answer before hanging up (ms).
    pub tail_ms: u32,
    /// Send `stop` and close after the script; otherwise keep streaming silence until the
    /// relay ends the stream (or `max_call` passes).
    pub hang_up_at_end: bool,
    /// Playback rate of the play queue: 1.0 is real time.
    pub playback_speed: f64,
    /// Longest wait for an expected answer (or greeting) before moving on.
    pub answer_wait: Duration,
    /// Longest a stream leg may last.
    pub max_call: Duration,
    /// Timeout of each HTTP request / WebSocket handshake.
    pub io_timeout: Duration,
    /// How many new `<Stream>`s returned by the action URL to follow.
    pub follow_streams: u32,
    /// Pause between the end of a stream and the `<Connect action>` request (Twilio's own
    /// reaction time).
    pub after_delay: Duration,
    /// Also request the `<Connect action>` URL when the stream ended abnormally: set it
    /// with [`CallerConfig::assume_action_after_abnormal_close`], which names the
    /// assumption. Off: an abnormal close ends the call.
    pub after_on_abnormal_close: bool,
}

impl CallerConfig {
    /// A caller of `relay` signing with `auth_token` for the public URL `public_base`.
    pub fn new(public_base: &str, relay: SocketAddr, auth_token: Option<&str>) -> Self {
        static N: AtomicU64 = AtomicU64::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let unique = format!("{:016x}{:08x}{:08x}", nanos(), std::process::id(), n);
        Self {
            public_base: public_base.trim_end_matches('/').to_owned(),
            relays: LoadBalancer::new(vec![relay]),
            auth_token: auth_token.map(str::to_owned),
            wrong_signature: false,
            call_id: None,
            call_sid: format!("CA{unique}"),
            account_sid: "AC00000000000000000000000000000001".to_owned(),
            from: "+14155550100".to_owned(),
            to: "+14155550199".to_owned(),
            direction: "inbound".to_owned(),
            script: Conversation::default(),
            tone_hz: 440.0,
            gap_ms: 300,
            initial_silence_ms: 200,
            tail_ms: 300,
            hang_up_at_end: true,
            playback_speed: 1.0,
            answer_wait: Duration::from_secs(10),
            max_call: Duration::from_secs(60),
            io_timeout: Duration::from_secs(10),
            follow_streams: 0,
            after_delay: Duration::ZERO,
            after_on_abnormal_close: false,
        }
    }

    /// ASSUMPTION: Twilio requests the `<Connect action>` URL after an abnormal stream close
    /// too (the socket failed or closed without a close frame, e.g. the relay was killed),
    /// as it does when the stream ends. Twilio documents the action request when the
    /// stream ends; it does not say an abnormal end is different, and failover relies on
    /// it (docs/resilience.md). Every test that relies on it calls this, so the
    /// assumption is named where it is used.
    pub fn assume_action_after_abnormal_close(&mut self) -> &mut Self {
        self.after_on_abnormal_close = true;
        self
    }

    /// The standard call parameters Twilio posts.
    pub fn call_params(&self, call_status: &str) -> Vec<(String, String)> {
        [
            ("AccountSid", self.account_sid.as_str()),
            ("ApiVersion", "2010-04-01"),
            ("CallSid", self.call_sid.as_str()),
            ("CallStatus", call_status),
            ("Direction", self.direction.as_str()),
            ("From", self.from.as_str()),
            ("To", self.to.as_str()),
        ]
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
    }

    fn signature(&self, url: &str, params: &[(String, String)]) -> Option<String> {
        let token = self.auth_token.as_deref()?;
        Some(if self.wrong_signature {
            twilio_signature(&format!("{token}-wrong"), url, params)
        } else {
            twilio_signature(token, url, params)
        })
    }
}

fn nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or_default()
}

/// Why the caller could not go on.
#[derive(Debug, thiserror::Error)]
pub enum CallerError {
    #[error("caller config: {0}")]
    Config(String),
    #[error("http: {0}")]
    Http(#[from] http::HttpError),
    #[error("websocket: {0}")]
    Ws(#[from] tungstenite::Error),
    #[error("timed out: {0}")]
    Timeout(&'static str),
    #[error("bad twiml: {0}")]
    Twiml(#[from] crate::twiml::TwimlError),
}

/// Something the test asks the caller to do mid-call.
#[derive(Debug, Clone)]
pub enum CallerCommand {
    /// Press a key (a Twilio `dtmf` message).
    Dtmf(String),
    /// Hang up: `stop`, then close.
    Stop,
    /// Drop the socket without `stop` (network failure).
    Drop,
    /// Twilio loses the stream (the relay's node froze or dropped off the network): the
    /// socket is dropped and the leg ends abnormally, so with
    /// [`CallerConfig::after_on_abnormal_close`] the action URL is requested.
    Lose,
}

/// An HTTP exchange and the TwiML in it (if it parsed).
#[derive(Debug, Clone)]
pub struct TwimlExchange {
    pub url: String,
    pub response: HttpResponse,
    pub twiml: Option<Twiml>,
}

/// Who ended a stream leg.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClosedBy {
    /// The caller (script end, `Stop`/`Drop` command, or time limit).
    Caller,
    /// The relay closed the socket (close code and reason if given).
    Relay { code: Option<u16>, reason: String },
    /// The socket failed.
    Error(String),
}

/// A `clear` from the relay.
#[derive(Debug, Clone, PartialEq)]
pub struct ClearRecord {
    /// Milliseconds since the stream started.
    pub at_ms: u64,
    /// Audio of the current answer played before the clear (ms, fractional).
    pub heard_answer_ms: f64,
    /// Audio of the current answer covered by marks echoed before the clear (ms): what a
    /// relay can know the caller heard.
    pub acked_answer_ms: f64,
    /// Audio dropped from the queue (ms).
    pub dropped_ms: f64,
}

/// The caller starting to speak over the agent (a scripted barge-in).
#[derive(Debug, Clone, PartialEq)]
pub struct BargeIn {
    /// Milliseconds since the stream started.
    pub at_ms: u64,
    /// Audio of the current answer played when the caller started speaking (ms).
    pub heard_answer_ms: f64,
}

/// One message from the relay.
#[derive(Debug, Clone)]
pub struct Received {
    pub at_ms: u64,
    pub event: Value,
}

/// One WebSocket stream of the call.
#[derive(Debug, Clone)]
pub struct LegReport {
    pub stream_url: String,
    /// HTTP status of a refused handshake (None when upgraded).
    pub refused_status: Option<u16>,
    pub stream_sid: String,
    /// Everything the relay sent, in order. Media payloads are replaced by their decoded
    /// length (`media.payload_bytes`) to keep long or many calls cheap.
    pub received: Vec<Received>,
    pub media_bytes_received: u64,
    pub media_bytes_played: u64,
    /// Names of marks echoed, in order.
    pub marks_echoed: Vec<String>,
    pub clears: Vec<ClearRecord>,
    /// Scripted barge-ins: when the caller started talking over the agent.
    pub barge_ins: Vec<BargeIn>,
    /// Longest time between two media messages (ms), a hint of gaps in the audio.
    pub max_media_gap_ms: u64,
    /// Messages that break Twilio's rules (wrong streamSid, unknown event, binary …).
    pub protocol_errors: Vec<String>,
    /// Media frames the caller sent.
    pub frames_sent: u64,
    /// Scripted turns spoken (index into the script), in order.
    pub turns_spoken: Vec<usize>,
    /// Waits for an answer/greeting that ran out (turn index; usize::MAX for greeting).
    pub answer_timeouts: Vec<usize>,
    pub closed_by: ClosedBy,
    /// Stream duration (ms).
    pub duration_ms: u64,
    /// When the stream opened, in ms since the call's first webhook.
    pub opened_at_ms: u64,
}

impl ClosedBy {
    /// The socket failed or closed without a close frame (a killed relay).
    pub fn is_abnormal(&self) -> bool {
        matches!(
            self,
            ClosedBy::Error(_) | ClosedBy::Relay { code: None, .. }
        )
    }
}

/// A stretch without assistant audio between two media messages the caller received.
#[derive(Debug, Clone, PartialEq)]
pub struct AudioGap {
    /// When the gap began (ms since the call's first webhook).
    pub at_ms: u64,
    /// Its length (ms).
    pub gap_ms: u64,
    /// Whether the stream changed (hand-off, failover) inside the gap.
    pub across_legs: bool,
}

/// The whole call as the caller saw it.
#[derive(Debug, Clone)]
pub struct CallReport {
    pub webhook: TwimlExchange,
    pub legs: Vec<LegReport>,
    /// `<Connect action>` requests and their answers, one per leg the relay ended.
    pub after: Vec<TwimlExchange>,
}

impl CallReport {
    /// The first (usually only) stream leg.
    pub fn leg(&self) -> Option<&LegReport> {
        self.legs.first()
    }

    /// The last `<Connect action>` answer.
    pub fn last_after(&self) -> Option<&Twiml> {
        self.after.last().and_then(|a| a.twiml.as_ref())
    }

    /// Every gap of at least `min_ms` between consecutive media messages, over every leg
    /// (a gap spanning two legs is marked). Silence while nobody speaks counts too; read
    /// the gaps against the script.
    pub fn audio_gaps(&self, min_ms: u64) -> Vec<AudioGap> {
        let mut out = Vec::new();
        let mut prev: Option<(u64, usize)> = None;
        for (n, leg) in self.legs.iter().enumerate() {
            for r in &leg.received {
                if r.event.get("event").and_then(Value::as_str) != Some("media") {
                    continue;
                }
                let t = leg.opened_at_ms + r.at_ms;
                if let Some((p, pn)) = prev
                    && t.saturating_sub(p) >= min_ms
                {
                    out.push(AudioGap {
                        at_ms: p,
                        gap_ms: t - p,
                        across_legs: pn != n,
                    });
                }
                prev = Some((t, n));
            }
        }
        out
    }
}

/// Live counters of a running caller.
#[derive(Debug, Default)]
pub struct LiveStats {
    pub media_bytes_received: AtomicU64,
    pub media_bytes_played: AtomicU64,
    pub frames_sent: AtomicU64,
    pub clears: AtomicU64,
    /// Turns fully spoken so far.
    pub turns_spoken: AtomicU64,
    /// 1 once a stream is up.
    pub streaming: AtomicU64,
    /// Every TwiML that opened a stream of this call, in order, as Twilio got it: what a
    /// leaked request would hold (the stream URL and the `<Parameter>`s `start` carries).
    pub stream_twimls: std::sync::Mutex<Vec<Twiml>>,
}

impl LiveStats {
    /// The TwiML of the `n`th stream (0 = the webhook's), once it was answered.
    pub fn stream_twiml(&self, n: usize) -> Option<Twiml> {
        self.stream_twimls
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(n)
            .cloned()
    }
}

/// A caller running in the background.
#[derive(Debug)]
pub struct CallerHandle {
    pub commands: mpsc::Sender<CallerCommand>,
    pub live: Arc<LiveStats>,
    task: JoinHandle<Result<CallReport, CallerError>>,
}

impl CallerHandle {
    /// Whether the call is over (its report waits in [`join`](Self::join)).
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// Waits for the call to end.
    pub async fn join(self) -> Result<CallReport, CallerError> {
        match self.task.await {
            Ok(r) => r,
            Err(e) => Err(CallerError::Config(format!("caller task failed: {e}"))),
        }
    }

    /// Sends a command (ignored if the call already ended).
    pub async fn command(&self, cmd: CallerCommand) {
        let _ = self.commands.send(cmd).await;
    }
}

/// Splits an absolute URL into (host, path-and-query).
fn split_url(url: &str) -> Option<(&str, &str)> {
    let rest = url.split_once("://")?.1;
    match rest.find('/') {
        Some(i) => Some((&rest[..i], &rest[i..])),
        None => Some((rest, "/")),
    }
}

/// A simulated Twilio caller.
#[derive(Debug, Clone)]
pub struct SimCaller {
    pub cfg: CallerConfig,
}

impl SimCaller {
    pub fn new(cfg: CallerConfig) -> Self {
        Self { cfg }
    }

    /// The public webhook URL (what Twilio signs).
    pub fn webhook_url(&self) -> String {
        match &self.cfg.call_id {
            Some(id) => format!("{}/api/twilio/voice?callId={id}", self.cfg.public_base),
            None => format!("{}/api/twilio/voice", self.cfg.public_base),
        }
    }

    /// Posts a signed form to a public URL (resolved against `public_base` if relative),
    /// sending it to the next relay address.
    pub async fn post_signed(
        &self,
        url: &str,
        params: &[(String, String)],
    ) -> Result<TwimlExchange, CallerError> {
        let url = if url.starts_with('/') {
            format!("{}{url}", self.cfg.public_base)
        } else {
            url.to_owned()
        };
        let (host, path) =
            split_url(&url).ok_or_else(|| CallerError::Config(format!("bad url {url}")))?;
        let mut headers = Vec::new();
        if let Some(sig) = self.cfg.signature(&url, params) {
            headers.push(("X-Twilio-Signature".to_owned(), sig));
        }
        // Like a health-checked load balancer: a relay that refuses connections is skipped.
        let mut attempts = self.cfg.relays.addrs.len().max(1);
        let response = loop {
            let r = http::request(
                self.cfg.relays.pick()?,
                "POST",
                host,
                path,
                &headers,
                Some(("application/x-www-form-urlencoded", http::form_body(params))),
                self.cfg.io_timeout,
            )
            .await;
            attempts -= 1;
            match r {
                Err(http::HttpError::Connect { .. }) if attempts > 0 => continue,
                other => break other?,
            }
        };
        let twiml = if response.status == 200 {
            Twiml::parse(&response.body).ok()
        } else {
            None
        };
        Ok(TwimlExchange {
            url,
            response,
            twiml,
        })
    }

    /// The voice webhook (`CallStatus=ringing`), requested once. As Twilio: an answer that
    /// is not 200 TwiML (a 5xx included) is not retried — Twilio retries only when the
    /// URL asks for it (connection overrides such as `#rc=`), which callbridge's URLs do
    /// not — and the call ends (Twilio would play its application error or go to the
    /// number's fallback URL).
    pub async fn webhook(&self) -> Result<TwimlExchange, CallerError> {
        self.post_signed(&self.webhook_url(), &self.cfg.call_params("ringing"))
            .await
    }

    /// Starts the whole call in the background.
    pub fn start(self) -> CallerHandle {
        let (tx, rx) = mpsc::channel(16);
        let live = Arc::new(LiveStats::default());
        let task = tokio::spawn(self.run_with(rx, live.clone()));
        CallerHandle {
            commands: tx,
            live,
            task,
        }
    }

    /// Runs the whole call: webhook, stream(s), action URL.
    pub async fn run(self) -> Result<CallReport, CallerError> {
        let (_tx, rx) = mpsc::channel(1);
        self.run_with(rx, Arc::new(LiveStats::default())).await
    }

    async fn run_with(
        self,
        mut commands: mpsc::Receiver<CallerCommand>,
        live: Arc<LiveStats>,
    ) -> Result<CallReport, CallerError> {
        let call_start = Instant::now();
        let webhook = self.webhook().await?;
        let mut report = CallReport {
            webhook: webhook.clone(),
            legs: Vec::new(),
            after: Vec::new(),
        };
        let mut twiml = webhook.twiml;
        let mut script = ScriptState::new(&self.cfg.script);
        let mut follows = 0;
        while let Some(t) = twiml.take() {
            let Some(stream_url) = t.stream_url.clone() else {
                break;
            };
            if !report.legs.is_empty() {
                if follows >= self.cfg.follow_streams {
                    break;
                }
                follows += 1;
            }
            live.stream_twimls
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(t.clone());
            let mut leg = self
                .stream(
                    &stream_url,
                    &t.parameters,
                    &mut script,
                    &mut commands,
                    &live,
                )
                .await?;
            leg.opened_at_ms =
                (call_start.elapsed().as_millis() as u64).saturating_sub(leg.duration_ms);
            let relay_ended = match &leg.closed_by {
                ClosedBy::Caller => false,
                c if c.is_abnormal() => self.cfg.after_on_abnormal_close,
                _ => true,
            };
            report.legs.push(leg);
            if !relay_ended {
                break;
            }
            let Some(action) = t.connect_action.clone() else {
                break;
            };
            tokio::time::sleep(self.cfg.after_delay).await;
            let after = self
                .post_signed(&action, &self.cfg.call_params("in-progress"))
                .await?;
            twiml = after.twiml.clone();
            report.after.push(after);
        }
        Ok(report)
    }

    /// Opens the media stream at `stream_url` (as written in `<Stream url>`) and plays the
    /// script on it until one side ends it.
    pub async fn stream(
        &self,
        stream_url: &str,
        parameters: &[(String, String)],
        script: &mut ScriptState,
        commands: &mut mpsc::Receiver<CallerCommand>,
        live: &LiveStats,
    ) -> Result<LegReport, CallerError> {
        let stream_sid = format!("MZ{:016x}{:016x}", nanos(), rand_u64());
        let mut leg = LegReport {
            stream_url: stream_url.to_owned(),
            refused_status: None,
            stream_sid: stream_sid.clone(),
            received: Vec::new(),
            media_bytes_received: 0,
            media_bytes_played: 0,
            marks_echoed: Vec::new(),
            clears: Vec::new(),
            barge_ins: Vec::new(),
            max_media_gap_ms: 0,
            protocol_errors: Vec::new(),
            frames_sent: 0,
            turns_spoken: Vec::new(),
            answer_timeouts: Vec::new(),
            closed_by: ClosedBy::Caller,
            duration_ms: 0,
            opened_at_ms: 0,
        };
        let ws = match self.connect_stream(stream_url).await? {
            Ok(ws) => ws,
            Err(status) => {
                leg.refused_status = Some(status);
                leg.closed_by = ClosedBy::Relay {
                    code: None,
                    reason: format!("handshake refused with HTTP {status}"),
                };
                return Ok(leg);
            }
        };
        live.streaming.store(1, Ordering::SeqCst);
        let mut custom = serde_json::Map::new();
        for (k, v) in parameters {
            custom.insert(k.clone(), Value::String(v.clone()));
        }
        let mut s = StreamState {
            cfg: &self.cfg,
            sink_queue: VecDeque::new(),
            seq: 0,
            chunk: 0,
            started: Instant::now(),
            queue: VecDeque::new(),
            budget: 0.0,
            last_drain: Instant::now(),
            played: 0,
            answer_base: 0,
            last_media_at: None,
            acked_played: 0,
            next_mark_due: None,
            leg,
            live,
        };
        s.send_raw(json!({"event": "connected", "protocol": "Call", "version": "1.0.0"}));
        let start = json!({
            "accountSid": self.cfg.account_sid, "streamSid": stream_sid,
            "callSid": self.cfg.call_sid, "tracks": ["inbound"],
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
            "customParameters": custom,
        });
        s.send_counted(json!({"event": "start", "start": start, "streamSid": stream_sid}));
        script.begin_leg(&self.cfg, s.played);
        let (mut sink, mut source) = ws.split();
        let mut frames = tokio::time::interval(Duration::from_millis(audio::FRAME_MS));
        frames.set_missed_tick_behavior(MissedTickBehavior::Burst);
        let deadline = Instant::now() + self.cfg.max_call;
        let mut commands_open = true;
        let closed_by = 'leg: loop {
            while let Some(msg) = s.sink_queue.pop_front() {
                if let Err(e) = sink.send(Message::text(msg.to_string())).await {
                    break 'leg ClosedBy::Error(e.to_string());
                }
            }
            if script.finished {
                let _ = sink.close().await;
                break ClosedBy::Caller;
            }
            tokio::select! {
                // The 20 ms media clock: play out, then send the next caller frame.
                _ = frames.tick() => {
                    s.drain();
                    let frame = script.next_frame(&self.cfg, &mut s);
                    if let Some(frame) = frame {
                        s.send_media(&frame);
                    }
                }
                // A queued mark's audio has played: echo it now, not at the next frame.
                () = sleep_until_opt(s.next_mark_due) => s.drain(),
                // What the relay sends: audio, marks, clears, or the end of the stream.
                msg = source.next() => match msg {
                    Some(Ok(Message::Text(text))) => s.on_relay_text(&text),
                    Some(Ok(Message::Binary(_))) => {
                        s.leg.protocol_errors.push("binary frame (Twilio warning 31950)".into());
                    }
                    Some(Ok(Message::Close(frame))) => {
                        // A close frame without a body is still a clean close: RFC 6455
                        // reports it as 1005 (no status received). `code: None` is kept
                        // for sockets that ended without any close frame.
                        break ClosedBy::Relay {
                            code: Some(frame.as_ref().map_or(1005, |f| u16::from(f.code))),
                            reason: frame.map(|f| f.reason.to_string()).unwrap_or_default(),
                        };
                    }
                    Some(Ok(_)) => {}
                    None => break ClosedBy::Relay { code: None, reason: "socket closed".into() },
                    Some(Err(e)) => break ClosedBy::Error(e.to_string()),
                },
                // Commands from the test; the branch is off once the handle is gone.
                cmd = commands.recv(), if commands_open => match cmd {
                    Some(CallerCommand::Dtmf(digit)) => s.send_dtmf(&digit),
                    Some(CallerCommand::Stop) => script.hang_up(),
                    Some(CallerCommand::Drop) => break ClosedBy::Caller,
                    Some(CallerCommand::Lose) => break ClosedBy::Error("stream lost".to_owned()),
                    None => commands_open = false,
                },
                // The leg's time limit: hang up.
                () = tokio::time::sleep_until(deadline) => {
                    script.hang_up();
                }
            }
        };
        let mut leg = s.leg;
        leg.media_bytes_played = s.played;
        leg.duration_ms = s.started.elapsed().as_millis() as u64;
        leg.closed_by = closed_by;
        live.streaming.store(0, Ordering::SeqCst);
        Ok(leg)
    }

    /// Opens the WebSocket for a `<Stream url>`: dials the next relay address with the
    /// public host, signs the URL as written. `Ok(Err(status))` when the upgrade is refused.
    pub async fn connect_stream(
        &self,
        stream_url: &str,
    ) -> Result<Result<WsStream, u16>, CallerError> {
        let (host, path) = split_url(stream_url)
            .ok_or_else(|| CallerError::Config(format!("bad stream url {stream_url}")))?;
        let mut req = format!("ws://{host}{path}").into_client_request()?;
        if let Some(sig) = self.cfg.signature(stream_url, &[]) {
            req.headers_mut().insert(
                "x-twilio-signature",
                sig.parse()
                    .map_err(|_| CallerError::Config("signature header".into()))?,
            );
        }
        let io = self.cfg.io_timeout;
        // Like a health-checked load balancer: a relay that refuses connections is skipped.
        let mut attempts = self.cfg.relays.addrs.len().max(1);
        let tcp = loop {
            let addr = self.cfg.relays.pick()?;
            attempts -= 1;
            match tokio::time::timeout(io, TcpStream::connect(addr)).await {
                Err(_) => return Err(CallerError::Timeout("connect to relay")),
                Ok(Ok(tcp)) => break tcp,
                Ok(Err(_)) if attempts > 0 => continue,
                Ok(Err(e)) => {
                    return Err(CallerError::Http(http::HttpError::Connect {
                        addr,
                        source: e,
                    }));
                }
            }
        };
        // 20 ms frames: Nagle + delayed ACK would add ~40 ms of latency.
        let _ = tcp.set_nodelay(true);
        let ws_cfg = WebSocketConfig::default()
            .max_message_size(Some(MAX_MESSAGE))
            .max_frame_size(Some(MAX_MESSAGE));
        let handshake = tokio_tungstenite::client_async_with_config(req, tcp, Some(ws_cfg));
        match tokio::time::timeout(io, handshake).await {
            Err(_) => Err(CallerError::Timeout("websocket handshake")),
            Ok(Ok((ws, _))) => Ok(Ok(ws)),
            Ok(Err(tungstenite::Error::Http(resp))) => Ok(Err(resp.status().as_u16())),
            Ok(Err(e)) => Err(e.into()),
        }
    }
}

/// What a relay did with a stream opened by hand ([`SimCaller::probe_stream`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeOutcome {
    /// The upgrade was refused with this HTTP status.
    Refused(u16),
    /// The relay closed the stream after `start`: the close code (None: no close frame)
    /// and reason.
    Closed {
        /// Close code.
        code: Option<u16>,
        /// Close reason.
        reason: String,
    },
    /// The relay sent a media message: the call runs (the probe then hangs up).
    Media,
}

impl SimCaller {
    /// Opens a stream at `stream_url` like Twilio (signed upgrade, `connected`, then
    /// `start` with `call_sid` and `parameters` as `customParameters`) and reports what the
    /// relay does: refuses the upgrade, closes the stream, or starts sending audio (an
    /// agent with a greeting). Sends silence at the media pace meanwhile, like Twilio.
    /// Replaying a captured stream is this with the captured URL and parameters.
    pub async fn probe_stream(
        &self,
        stream_url: &str,
        call_sid: &str,
        parameters: &[(String, String)],
    ) -> Result<ProbeOutcome, CallerError> {
        let mut ws = match self.connect_stream(stream_url).await? {
            Ok(ws) => ws,
            Err(status) => return Ok(ProbeOutcome::Refused(status)),
        };
        let stream_sid = format!("MZ{:016x}{:016x}", nanos(), rand_u64());
        let custom: serde_json::Map<String, Value> = parameters
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect();
        let start = json!({"event": "start", "streamSid": stream_sid, "start": {
            "accountSid": self.cfg.account_sid, "streamSid": stream_sid, "callSid": call_sid,
            "tracks": ["inbound"],
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
            "customParameters": custom}});
        ws.send(Message::text(
            json!({"event": "connected", "protocol": "Call", "version": "1.0.0"}).to_string(),
        ))
        .await?;
        ws.send(Message::text(start.to_string())).await?;
        let silence = audio::b64(&audio::silence(audio::FRAME_MS));
        let mut frames = tokio::time::interval(Duration::from_millis(audio::FRAME_MS));
        let mut seq = 2u64;
        loop {
            tokio::select! {
                _ = frames.tick() => {
                    seq += 1;
                    let media = json!({"event": "media", "streamSid": stream_sid,
                        "sequenceNumber": seq.to_string(),
                        "media": {"track": "inbound", "chunk": seq.to_string(),
                            "timestamp": (seq * audio::FRAME_MS).to_string(),
                            "payload": silence}});
                    // A refused stream may be gone already: its close is read below.
                    let _ = ws.send(Message::text(media.to_string())).await;
                }
                msg = ws.next() => match msg {
                    Some(Ok(Message::Close(frame))) => {
                        return Ok(ProbeOutcome::Closed {
                            code: Some(frame.as_ref().map_or(1005, |f| u16::from(f.code))),
                            reason: frame.map(|f| f.reason.to_string()).unwrap_or_default(),
                        });
                    }
                    Some(Ok(Message::Text(t))) if t.contains("\"media\"") => {
                        let _ = ws.close(None).await;
                        return Ok(ProbeOutcome::Media);
                    }
                    Some(Ok(_)) => {}
                    None | Some(Err(_)) => {
                        return Ok(ProbeOutcome::Closed { code: None, reason: String::new() });
                    }
                },
            }
        }
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The caller's end of a media stream.
pub type WsStream = tokio_tungstenite::WebSocketStream<TcpStream>;

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(nanos());
    h.finish()
}

/// An entry of the play queue.
#[derive(Debug)]
enum Queued {
    Audio(usize),
    Mark(String),
}

/// Per-leg state of the stream (owned by the leg loop; no sharing).
struct StreamState<'a> {
    cfg: &'a CallerConfig,
    sink_queue: VecDeque<Value>,
    seq: u64,
    chunk: u64,
    started: Instant,
    queue: VecDeque<Queued>,
    budget: f64,
    last_drain: Instant,
    /// Bytes played in this leg.
    played: u64,
    /// `played` when the current answer started (end of the caller's last line).
    answer_base: u64,
    last_media_at: Option<Instant>,
    /// `played` when the last mark was echoed because its audio had played.
    acked_played: u64,
    /// When the first queued mark will have played (wakes the loop to echo it on time).
    next_mark_due: Option<Instant>,
    leg: LegReport,
    live: &'a LiveStats,
}

impl StreamState<'_> {
    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    fn send_raw(&mut self, v: Value) {
        self.sink_queue.push_back(v);
    }

    /// Sends a message carrying the next `sequenceNumber`.
    fn send_counted(&mut self, mut v: Value) {
        self.seq += 1;
        if let Some(obj) = v.as_object_mut() {
            obj.insert("sequenceNumber".into(), Value::String(self.seq.to_string()));
        }
        self.sink_queue.push_back(v);
    }

    fn send_media(&mut self, frame: &[u8]) {
        self.chunk += 1;
        let ts = (self.chunk - 1) * audio::FRAME_MS;
        let sid = self.leg.stream_sid.clone();
        self.send_counted(json!({"event": "media", "streamSid": sid, "media": {
            "track": "inbound", "chunk": self.chunk.to_string(), "timestamp": ts.to_string(),
            "payload": audio::b64(frame)}}));
        self.leg.frames_sent += 1;
        self.live.frames_sent.fetch_add(1, Ordering::Relaxed);
    }

    fn send_dtmf(&mut self, digit: &str) {
        let sid = self.leg.stream_sid.clone();
        self.send_counted(json!({"event": "dtmf", "streamSid": sid,
            "dtmf": {"track": "inbound_track", "digit": digit}}));
    }

    fn send_stop(&mut self) {
        let sid = self.leg.stream_sid.clone();
        let stop = json!({"accountSid": self.cfg.account_sid, "callSid": self.cfg.call_sid});
        self.send_counted(json!({"event": "stop", "stop": stop, "streamSid": sid}));
    }

    fn echo_mark(&mut self, name: String) {
        let sid = self.leg.stream_sid.clone();
        self.send_counted(json!({"event": "mark", "streamSid": sid, "mark": {"name": name}}));
        self.leg.marks_echoed.push(name);
    }

    fn queued_audio(&self) -> usize {
        self.queue
            .iter()
            .map(|q| match q {
                Queued::Audio(n) => *n,
                Queued::Mark(_) => 0,
            })
            .sum()
    }

    /// Plays out audio for the time elapsed since the last call; echoes marks reached.
    fn drain(&mut self) {
        let now = Instant::now();
        let elapsed = now.duration_since(self.last_drain).as_secs_f64();
        self.last_drain = now;
        if self.queued_audio() == 0 {
            // Playing time cannot be banked while nothing is queued.
            self.budget = 0.0;
        } else {
            self.budget += elapsed * 1000.0 * audio::BYTES_PER_MS as f64 * self.cfg.playback_speed;
        }
        loop {
            match self.queue.front_mut() {
                Some(Queued::Mark(_)) => {
                    if let Some(Queued::Mark(name)) = self.queue.pop_front() {
                        self.acked_played = self.played;
                        self.echo_mark(name);
                    }
                }
                Some(Queued::Audio(n)) => {
                    let can = (self.budget.floor() as usize).min(*n);
                    if can == 0 {
                        break;
                    }
                    *n -= can;
                    self.budget -= can as f64;
                    self.played += can as u64;
                    self.live
                        .media_bytes_played
                        .fetch_add(can as u64, Ordering::Relaxed);
                    if *n == 0 {
                        self.queue.pop_front();
                    }
                }
                None => break,
            }
        }
        self.next_mark_due = self.mark_due(now);
    }

    /// When the first queued mark's audio will have played, at the current rate.
    fn mark_due(&self, now: Instant) -> Option<Instant> {
        let mut before = 0usize;
        for q in &self.queue {
            match q {
                Queued::Audio(n) => before += n,
                Queued::Mark(_) => {
                    let left = (before as f64 - self.budget).max(0.0);
                    let ms = left / (audio::BYTES_PER_MS as f64 * self.cfg.playback_speed);
                    return Some(now + Duration::from_secs_f64(ms / 1000.0));
                }
            }
        }
        None
    }

    fn on_relay_text(&mut self, text: &str) {
        let at_ms = self.now_ms();
        let Ok(event) = serde_json::from_str::<Value>(text) else {
            self.leg
                .protocol_errors
                .push(format!("invalid JSON from relay: {text:.80}"));
            return;
        };
        let mut kept = event.clone();
        if let Some(media) = kept.get_mut("media").and_then(Value::as_object_mut)
            && let Some(payload) = media.remove("payload")
        {
            let n = payload.as_str().map_or(0, audio::b64_len);
            media.insert("payload_bytes".into(), Value::from(n));
        }
        self.leg.received.push(Received { at_ms, event: kept });
        let kind = event.get("event").and_then(Value::as_str).unwrap_or("");
        if event.get("streamSid").and_then(Value::as_str) != Some(self.leg.stream_sid.as_str()) {
            self.leg.protocol_errors.push(format!(
                "{kind}: missing or wrong streamSid (warning 31951)"
            ));
        }
        match kind {
            "media" => {
                let payload = event.pointer("/media/payload").and_then(Value::as_str);
                let Some(bytes) = payload.and_then(audio::unb64) else {
                    self.leg
                        .protocol_errors
                        .push("media without a valid base64 payload".into());
                    return;
                };
                if let Some(media) = event.get("media").and_then(Value::as_object)
                    && media.keys().any(|k| k != "payload")
                {
                    self.leg
                        .protocol_errors
                        .push("outbound media with extra fields (warning 31951)".into());
                }
                let now = Instant::now();
                if let Some(prev) = self.last_media_at.replace(now) {
                    let gap = now.duration_since(prev).as_millis() as u64;
                    self.leg.max_media_gap_ms = self.leg.max_media_gap_ms.max(gap);
                }
                self.drain();
                self.leg.media_bytes_received += bytes.len() as u64;
                self.live
                    .media_bytes_received
                    .fetch_add(bytes.len() as u64, Ordering::Relaxed);
                self.queue.push_back(Queued::Audio(bytes.len()));
            }
            "mark" => {
                let Some(name) = event.pointer("/mark/name").and_then(Value::as_str) else {
                    self.leg
                        .protocol_errors
                        .push("mark without mark.name".into());
                    return;
                };
                self.drain();
                self.queue.push_back(Queued::Mark(name.to_owned()));
                self.drain();
            }
            "clear" => {
                self.drain();
                let dropped = self.queued_audio();
                let pending: Vec<String> = self
                    .queue
                    .drain(..)
                    .filter_map(|q| match q {
                        Queued::Mark(name) => Some(name),
                        Queued::Audio(_) => None,
                    })
                    .collect();
                for name in pending {
                    self.echo_mark(name);
                }
                self.budget = 0.0;
                self.next_mark_due = None;
                self.leg.clears.push(ClearRecord {
                    at_ms,
                    heard_answer_ms: (self.played - self.answer_base) as f64
                        / audio::BYTES_PER_MS as f64,
                    acked_answer_ms: self.acked_played.saturating_sub(self.answer_base) as f64
                        / audio::BYTES_PER_MS as f64,
                    dropped_ms: dropped as f64 / audio::BYTES_PER_MS as f64,
                });
                self.live.clears.fetch_add(1, Ordering::Relaxed);
            }
            other => self
                .leg
                .protocol_errors
                .push(format!("unsupported event {other:?} (warning 31951)")),
        }
    }
}

/// Where the caller is in its script; survives across stream legs (hand-off).
#[derive(Debug)]
pub struct ScriptState {
    script: Conversation,
    phase: Phase,
    finished: bool,
    stop_sent: bool,
}

#[derive(Debug, Clone)]
enum Phase {
    /// Waiting for `need` bytes of answer audio played after `base`, or until `deadline`;
    /// `barge` = bytes after which the caller interrupts. `turn` is usize::MAX for the greeting.
    WaitAnswer {
        turn: usize,
        need: u64,
        barge: Option<u64>,
        deadline: Instant,
    },
    /// Silence until `until`, then speak `turn`.
    Gap { turn: usize, until: Instant },
    /// Speaking `turn`, `left` frames to go.
    Speaking { turn: usize, left: u64, sample: u64 },
    /// Script done: silence until `until`, then hang up (or wait for the relay).
    Tail { until: Instant },
    /// Waiting for the relay to end the stream.
    Idle,
    /// `stop` to be sent.
    HangUp,
}

impl ScriptState {
    /// The start of `script`.
    pub fn new(script: &Conversation) -> Self {
        Self {
            script: script.clone(),
            phase: Phase::Idle,
            finished: false,
            stop_sent: false,
        }
    }

    fn begin_leg(&mut self, cfg: &CallerConfig, played: u64) {
        let _ = played;
        self.phase = match (&self.phase, &self.script.greeting) {
            // First leg: wait for the greeting, or start after a short silence.
            (Phase::Idle, Some(g)) if !self.stop_sent => Phase::WaitAnswer {
                turn: usize::MAX,
                need: u64::from(g.total_audio_ms()) * audio::BYTES_PER_MS as u64,
                barge: None,
                deadline: Instant::now() + cfg.answer_wait,
            },
            (Phase::Idle, None) => Phase::Gap {
                turn: 0,
                until: Instant::now() + Duration::from_millis(u64::from(cfg.initial_silence_ms)),
            },
            // A following leg resumes where the last one stopped; an answer being waited
            // for is not replayed.
            (Phase::WaitAnswer { turn, .. }, _) => self.after_answer(cfg, *turn),
            (Phase::Speaking { turn, .. }, _) => Phase::Gap {
                turn: *turn,
                until: Instant::now(),
            },
            (p, _) => p.clone(),
        };
    }

    fn after_answer(&self, cfg: &CallerConfig, turn: usize) -> Phase {
        let next = if turn == usize::MAX { 0 } else { turn + 1 };
        if next < self.script.turns.len() {
            Phase::Gap {
                turn: next,
                until: Instant::now() + Duration::from_millis(u64::from(cfg.gap_ms)),
            }
        } else {
            Phase::Tail {
                until: Instant::now() + Duration::from_millis(u64::from(cfg.tail_ms)),
            }
        }
    }

    fn hang_up(&mut self) {
        if !self.stop_sent {
            self.phase = Phase::HangUp;
        }
    }

    fn speak(&self, turn: usize, s: &mut StreamState<'_>) -> Phase {
        let t = &self.script.turns[turn];
        if let Some(d) = &t.dtmf_before {
            s.send_dtmf(d);
        }
        Phase::Speaking {
            turn,
            left: u64::from(t.caller.speech_ms).div_ceil(audio::FRAME_MS),
            sample: 0,
        }
    }

    /// Advances the script by one frame; returns the frame to send (None once `stop`).
    fn next_frame(&mut self, cfg: &CallerConfig, s: &mut StreamState<'_>) -> Option<Vec<u8>> {
        let now = Instant::now();
        let heard = s.played.saturating_sub(s.answer_base);
        // Transitions that happen before this frame.
        match self.phase.clone() {
            Phase::WaitAnswer {
                turn,
                need,
                barge,
                deadline,
            } => {
                if let Some(b) = barge
                    && heard >= b
                    && turn + 1 < self.script.turns.len()
                {
                    s.leg.barge_ins.push(BargeIn {
                        at_ms: s.now_ms(),
                        heard_answer_ms: heard as f64 / audio::BYTES_PER_MS as f64,
                    });
                    self.phase = self.speak(turn + 1, s);
                } else if heard >= need && s.queued_audio() == 0 {
                    self.phase = self.after_answer(cfg, turn);
                } else if now >= deadline {
                    s.leg.answer_timeouts.push(turn);
                    self.phase = self.after_answer(cfg, turn);
                }
            }
            Phase::Gap { turn, until } if now >= until => {
                self.phase = if turn < self.script.turns.len() {
                    self.speak(turn, s)
                } else {
                    Phase::Tail { until: now }
                };
            }
            Phase::Tail { until } if now >= until => {
                self.phase = if cfg.hang_up_at_end {
                    Phase::HangUp
                } else {
                    Phase::Idle
                };
            }
            _ => {}
        }
        match &mut self.phase {
            Phase::Speaking { turn, left, sample } => {
                let frame = audio::tone(cfg.tone_hz, audio::FRAME_MS, *sample);
                *sample += audio::FRAME_BYTES as u64;
                *left -= 1;
                if *left == 0 {
                    let turn = *turn;
                    s.leg.turns_spoken.push(turn);
                    s.live.turns_spoken.fetch_add(1, Ordering::Relaxed);
                    // The answer starts now: whatever plays from here on is its audio.
                    s.answer_base = s.played + s.queued_audio() as u64;
                    let t = &self.script.turns[turn];
                    self.phase = Phase::WaitAnswer {
                        turn,
                        need: u64::from(t.agent.total_audio_ms()) * audio::BYTES_PER_MS as u64,
                        barge: t
                            .barge_in_after_ms
                            .map(|ms| u64::from(ms) * audio::BYTES_PER_MS as u64),
                        deadline: now + cfg.answer_wait,
                    };
                }
                Some(frame)
            }
            Phase::HangUp => {
                s.send_stop();
                self.stop_sent = true;
                self.finished = true;
                None
            }
            _ => Some(audio::silence(audio::FRAME_MS)),
        }
    }
}

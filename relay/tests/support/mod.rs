//! In-test peers for the relay's component tests: a fake control plane (tonic, loopback),
//! the test kit's fake Realtime server in manual mode (the test plays the model) and a
//! Twilio-like WebSocket client. Only Twilio and OpenAI
//! (and here control's behaviour) are faked; the relay is the real server on 127.0.0.1:0.

// Test support: a failed unwrap is a failed test, with its location; the fakes share
// their recorded state with the test through a plain Mutex (the relay's lock ban is for
// the relay).
#![allow(
    dead_code,
    unreachable_pub,
    clippy::unwrap_used,
    clippy::result_large_err,
    clippy::disallowed_types
)]

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use callbridge_proto::pb;
use callbridge_proto::pb::relay_server::{Relay, RelayServer};
use callbridge_relay::call_id::CallId;
use callbridge_relay::config::{Config, Secret};
use callbridge_relay::stream_credential::{self, Segment, StreamKey};
use callbridge_relay::{Metrics, signature};
use callbridge_testkit::fake_realtime::FakeRealtime;
use futures_util::{SinkExt, Stream, StreamExt};
use serde_json::Value;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tonic::{Code, Request, Response, Status, Streaming};

pub const TWILIO_TOKEN: &str = "twilio-secret";
pub const STEP: Duration = Duration::from_secs(5);

/// Every await in a test goes through this: the test kit's timeout helper with one step.
#[track_caller]
pub fn within<F: std::future::Future>(
    what: impl std::fmt::Display,
    f: F,
) -> impl std::future::Future<Output = F::Output> {
    callbridge_testkit::with_timeout(STEP, what, f)
}

// ---- fake control -------------------------------------------------------------------------

#[derive(Default)]
pub struct ControlState {
    pub agent: pb::Agent,
    pub admit_error: Option<Code>,
    pub attach_error: Option<Code>,
    /// Answer this many more attaches with `UNAVAILABLE` (control restarting).
    pub attach_unavailable: usize,
    pub after: Option<pb::AfterResponse>,
    /// Every `After` request, in order.
    pub after_asked: Vec<pb::AfterRequest>,
    pub after_error: Option<Code>,
    pub last_seq: u64,
    /// Every event received, in arrival order (duplicates included).
    pub events: Vec<pb::CallEvent>,
    pub opens: Vec<pb::AttachOpen>,
    pub admits: Vec<pb::AdmitRequest>,
    /// Drop the first attach stream without acking after this many events.
    pub drop_first_after: Option<usize>,
    pub attaches: usize,
    /// Stop acknowledging (events stay unacked).
    pub no_acks: bool,
    pub commands: Option<mpsc::Receiver<pb::Command>>,
    /// Every Twilio status report forwarded.
    pub status_reports: Vec<pb::TwilioStatusReport>,
}

#[derive(Clone, Default)]
pub struct FakeControl {
    pub state: Arc<Mutex<ControlState>>,
}

impl FakeControl {
    pub fn events(&self) -> Vec<pb::CallEvent> {
        self.state.lock().unwrap().events.clone()
    }
    pub fn kinds(&self) -> Vec<String> {
        self.events().iter().map(kind_name).collect()
    }
    /// Waits (bounded) until an event of `kind` is stored.
    pub async fn wait_kind(&self, kind: &str) {
        within(&format!("{kind} stored"), async {
            while !self.kinds().iter().any(|k| k == kind) {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        })
        .await;
    }
}

pub fn kind_name(e: &pb::CallEvent) -> String {
    use pb::call_event::Kind;
    match &e.kind {
        Some(Kind::Started(_)) => "started",
        Some(Kind::Caller(_)) => "caller",
        Some(Kind::Assistant(_)) => "assistant",
        Some(Kind::Interruption(_)) => "interruption",
        Some(Kind::Dtmf(_)) => "dtmf",
        Some(Kind::ToolCall(_)) => "tool_call",
        Some(Kind::ToolResult(_)) => "tool_result",
        Some(Kind::Usage(_)) => "usage",
        Some(Kind::ModelError(_)) => "model_error",
        Some(Kind::CommandApplied(_)) => "command_applied",
        Some(Kind::Ended(_)) => "ended",
        Some(Kind::ResponseEnded(_)) => "response_ended",
        Some(Kind::TranscriptionFailed(_)) => "transcription_failed",
        Some(Kind::AnsweringMachine(_)) => "answering_machine",
        None => "none",
    }
    .to_owned()
}

type RespStream = Pin<Box<dyn Stream<Item = Result<pb::AttachResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Relay for FakeControl {
    async fn admit(
        &self,
        req: Request<pb::AdmitRequest>,
    ) -> Result<Response<pb::AdmitResponse>, Status> {
        let mut st = self.state.lock().unwrap();
        let req = req.into_inner();
        st.admits.push(req.clone());
        if let Some(code) = st.admit_error {
            return Err(Status::new(code, "refused by the fake"));
        }
        let call_id = if req.call_id.is_empty() {
            "call_new".to_owned()
        } else {
            req.call_id
        };
        Ok(Response::new(pb::AdmitResponse {
            call: Some(pb::Call {
                call_id,
                ..Default::default()
            }),
            agent: Some(st.agent.clone()),
        }))
    }

    type AttachStream = RespStream;

    async fn attach(
        &self,
        req: Request<Streaming<pb::AttachRequest>>,
    ) -> Result<Response<RespStream>, Status> {
        let mut inbound = req.into_inner();
        let open = match inbound.message().await? {
            Some(pb::AttachRequest {
                msg: Some(pb::attach_request::Msg::Open(o)),
            }) => o,
            _ => return Err(Status::invalid_argument("open first")),
        };
        let (tx, rx) = mpsc::channel(64);
        let (ctx, drop_after, commands, nth) = {
            let mut st = self.state.lock().unwrap();
            st.opens.push(open.clone());
            if let Some(code) = st.attach_error {
                return Err(Status::new(code, "refused by the fake"));
            }
            if st.attach_unavailable > 0 {
                st.attach_unavailable -= 1;
                return Err(Status::unavailable("restarting"));
            }
            st.attaches += 1;
            let stored = st.events.iter().map(|e| e.seq).max().unwrap_or(st.last_seq);
            let ctx = pb::CallContext {
                call: Some(pb::Call {
                    call_id: open.call_id.clone(),
                    ..Default::default()
                }),
                agent: Some(st.agent.clone()),
                last_seq: stored.max(st.last_seq),
                history: vec![],
                // The fake watches no heartbeats: the relay sends none.
                heartbeat_interval_ms: 0,
            };
            (ctx, st.drop_first_after, st.commands.take(), st.attaches)
        };
        tx.send(Ok(pb::AttachResponse {
            msg: Some(pb::attach_response::Msg::Context(ctx)),
        }))
        .await
        .ok();
        let state = self.state.clone();
        tokio::spawn(async move {
            let mut commands = commands;
            let mut received = 0usize;
            loop {
                let cmd = async {
                    match commands.as_mut() {
                        Some(c) => c.recv().await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    msg = inbound.message() => {
                        let Ok(Some(pb::AttachRequest { msg: Some(pb::attach_request::Msg::Event(ev)) })) = msg else { return };
                        received += 1;
                        let (ack, no_acks) = {
                            let mut st = state.lock().unwrap();
                            st.events.push(ev.clone());
                            (ev.seq, st.no_acks)
                        };
                        if nth == 1 && drop_after.is_some_and(|n| received >= n) {
                            return; // drop without ack: the relay must resend
                        }
                        if !no_acks {
                            let _ = tx.send(Ok(pb::AttachResponse { msg: Some(pb::attach_response::Msg::AckedSeq(ack)) })).await;
                        }
                    }
                    Some(c) = cmd => {
                        let _ = tx.send(Ok(pb::AttachResponse { msg: Some(pb::attach_response::Msg::Command(c)) })).await;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn after(
        &self,
        req: Request<pb::AfterRequest>,
    ) -> Result<Response<pb::AfterResponse>, Status> {
        let mut st = self.state.lock().unwrap();
        st.after_asked.push(req.into_inner());
        if let Some(code) = st.after_error {
            return Err(Status::new(code, "refused by the fake"));
        }
        Ok(Response::new(st.after.clone().unwrap_or(
            pb::AfterResponse {
                next: Some(pb::after_response::Next::Hangup(pb::HangupNext {})),
            },
        )))
    }

    async fn report_twilio_status(
        &self,
        req: Request<pb::TwilioStatusReport>,
    ) -> Result<Response<pb::TwilioStatusAck>, Status> {
        self.state
            .lock()
            .unwrap()
            .status_reports
            .push(req.into_inner());
        Ok(Response::new(pb::TwilioStatusAck { applied: true }))
    }

    async fn report_presence(
        &self,
        _req: Request<pb::RelayPresence>,
    ) -> Result<Response<pb::RelayPresenceAck>, Status> {
        // Another relay is always ready here: the drain tests follow a hand-off.
        Ok(Response::new(pb::RelayPresenceAck {
            other_ready_relays: 1,
            interval_ms: 1000,
        }))
    }
}

pub async fn start_control(fake: FakeControl) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(RelayServer::new(fake))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    addr
}

// ---- fake model ---------------------------------------------------------------------------

/// A model connection the test plays (the test kit's fake Realtime server, manual mode).
pub use callbridge_testkit::fake_realtime::ManualConn as ModelConn;

pub struct FakeModel {
    pub url: String,
    pub conns: mpsc::Receiver<ModelConn>,
    /// Serves until dropped.
    pub server: FakeRealtime,
}

impl Drop for FakeModel {
    /// Every client event the relay sent must be one OpenAI's GA schema accepts (the test
    /// plays the model, so the fake only records what the real API would refuse).
    fn drop(&mut self) {
        if std::thread::panicking() {
            return;
        }
        let refusals: Vec<String> = self
            .server
            .connections()
            .into_iter()
            .flat_map(|c| c.refusals)
            .collect();
        assert!(
            refusals.is_empty(),
            "the real API would refuse: {refusals:?}"
        );
    }
}

pub async fn start_model() -> FakeModel {
    let (server, conns) = FakeRealtime::builder().start_manual().await.unwrap();
    FakeModel {
        url: server.url(),
        conns,
        server,
    }
}

// ---- relay --------------------------------------------------------------------------------

pub struct Relay_ {
    pub addr: SocketAddr,
    pub metrics: Metrics,
    pub stop: Option<oneshot::Sender<()>>,
    pub done: tokio::task::JoinHandle<()>,
    pub public: String,
}

pub type RelayHandle = Relay_;

pub async fn start_relay(
    model_url: &str,
    control: Option<SocketAddr>,
    tweak: impl FnOnce(&mut Config),
) -> RelayHandle {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let public = format!("http://{addr}");
    let mut config = Config::for_tests(&public, model_url);
    config.insecure_skip_signature = false;
    config.twilio_auth_token = Some(Secret::new(TWILIO_TOKEN));
    config.control_url = control.map(|a| format!("http://{a}"));
    config.control_token = Some(Secret::new("relay-token-0123456789abcdef-0123456"));
    tweak(&mut config);
    let config = config.validate().unwrap();
    let metrics = Metrics::new();
    let (stop, stop_rx) = oneshot::channel::<()>();
    let m = metrics.clone();
    let done = tokio::spawn(async move {
        callbridge_relay::run_with_metrics(
            config,
            listener,
            async {
                let _ = stop_rx.await;
            },
            m,
        )
        .await
        .unwrap();
    });
    Relay_ {
        addr,
        metrics,
        stop: Some(stop),
        done,
        public,
    }
}

// ---- Twilio-like client -------------------------------------------------------------------

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Opens a media stream like Twilio: signed over the ws:// public URL, no params.
pub async fn twilio_ws(relay: &RelayHandle, path: &str) -> Result<Ws, tungstenite::Error> {
    let url = format!("ws://{}{path}", relay.addr);
    let sig = signature::compute(&Secret::new(TWILIO_TOKEN), &url, &[]);
    let mut req = url.into_client_request().unwrap();
    req.headers_mut()
        .insert("x-twilio-signature", sig.parse().unwrap());
    within("twilio connects", tokio_tungstenite::connect_async(req))
        .await
        .map(|(ws, _)| ws)
}

pub async fn send_json(ws: &mut Ws, v: Value) {
    within("twilio sends", ws.send(Message::text(v.to_string())))
        .await
        .unwrap();
}

/// The stream key of a test relay (derived from its Twilio token, like production's
/// default), to mint credentials as the relay's TwiML would carry them.
pub fn stream_key() -> StreamKey {
    StreamKey::from_auth_token(TWILIO_TOKEN.as_bytes())
}

/// A fresh credential for `call_id` (None: standalone), valid for a minute from now.
pub fn credential(call_id: Option<&str>) -> String {
    let id = call_id.map(|c| CallId::parse(c).unwrap());
    let segment = if id.is_some() {
        Segment::First
    } else {
        Segment::Standalone
    };
    stream_key().mint(
        id.as_ref(),
        segment,
        stream_credential::now_ms(),
        Duration::from_secs(60),
    )
}

/// The value of `<Parameter name="{name}">` in a TwiML answer, if any.
pub fn parameter_in<'a>(twiml: &'a str, name: &str) -> Option<&'a str> {
    let marker = format!(r#"<Parameter name="{name}" value=""#);
    let at = twiml.find(&marker)? + marker.len();
    Some(&twiml[at..at + twiml[at..].find('"')?])
}

/// The stream credential a TwiML answer carries (with the stream it follows, when it
/// names one), checked with the test key for `call_id` (None: standalone).
pub fn verified_in(twiml: &str, call_id: Option<&str>) -> stream_credential::Verified {
    let value = parameter_in(twiml, stream_credential::PARAMETER)
        .unwrap_or_else(|| panic!("no credential in {twiml}"));
    let id = call_id.map(|c| CallId::parse(c).unwrap());
    stream_key()
        .verify_after(
            Some(value),
            id.as_ref(),
            parameter_in(twiml, stream_credential::TAKES_OVER_PARAMETER),
            stream_credential::now_ms(),
        )
        .unwrap_or_else(|e| panic!("{e}: {value}"))
}

/// The segment of the stream credential a TwiML answer carries ([`verified_in`]).
pub fn credential_in(twiml: &str, call_id: Option<&str>) -> Segment {
    verified_in(twiml, call_id).segment
}

/// `start` with `customParameters` (callSid `CA1`).
pub fn start_with(params: Value) -> Value {
    serde_json::json!({"event":"start","sequenceNumber":"1","streamSid":"MZ1",
        "start":{"accountSid":"AC1","streamSid":"MZ1","callSid":"CA1","tracks":["inbound"],
        "mediaFormat":{"encoding":"audio/x-mulaw","sampleRate":8000,"channels":1},
        "customParameters":params}})
}

/// `start` of `/media-stream/call_1` as Twilio sends it: the call id and a fresh credential.
pub fn start_msg() -> Value {
    start_with(serde_json::json!({"callId":"call_1","credential":credential(Some("call_1"))}))
}

/// `start` of the standalone stream: a fresh standalone credential.
pub fn start_msg_simple() -> Value {
    start_with(serde_json::json!({"credential":credential(None)}))
}

pub fn media_msg(payload: &str) -> Value {
    serde_json::json!({"event":"media","streamSid":"MZ1","sequenceNumber":"2",
        "media":{"track":"inbound","chunk":"1","timestamp":"20","payload":payload}})
}

/// Next text frame from the relay as JSON, or `None` when the socket closed; the close
/// frame's code is returned through `close`.
pub async fn next_twilio(ws: &mut Ws) -> Result<Value, Option<u16>> {
    within("twilio receives", async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(t))) => return Ok(serde_json::from_str(&t).unwrap()),
                Some(Ok(Message::Close(f))) => return Err(f.map(|f| u16::from(f.code))),
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return Err(None),
            }
        }
    })
    .await
}

/// The relay's close of a stream: code and reason (None, "" when the socket ended
/// without a close frame); text frames before it are skipped.
pub async fn next_close(ws: &mut Ws) -> (Option<u16>, String) {
    within("twilio socket closed", async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(f))) => {
                    return f.map_or((None, String::new()), |f| {
                        (Some(u16::from(f.code)), f.reason.to_string())
                    });
                }
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return (None, String::new()),
            }
        }
    })
    .await
}

/// Signed webhook POST; returns status, headers and body.
pub async fn post_form(
    relay: &RelayHandle,
    path_and_query: &str,
    form: &[(&str, &str)],
    good_signature: bool,
) -> (u16, Vec<(String, String)>, String) {
    let url = format!("{}{path_and_query}", relay.public);
    let params: Vec<(String, String)> = form
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let token = if good_signature {
        TWILIO_TOKEN
    } else {
        "wrong"
    };
    let sig = signature::compute(&Secret::new(token), &url, &params);
    let body = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(form)
        .finish();
    let req = format!(
        "POST {path_and_query} HTTP/1.1\r\nHost: {}\r\nX-Twilio-Signature: {sig}\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        relay.addr,
        body.len()
    );
    raw_http(relay.addr, &req).await
}

pub async fn get(relay: &RelayHandle, path: &str) -> (u16, Vec<(String, String)>, String) {
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        relay.addr
    );
    raw_http(relay.addr, &req).await
}

async fn raw_http(addr: SocketAddr, req: &str) -> (u16, Vec<(String, String)>, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    within("http exchange", async {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(req.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.unwrap();
        let text = String::from_utf8_lossy(&buf).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let mut lines = head.lines();
        let status: u16 = lines
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|c| c.parse().ok())
            .unwrap();
        let headers = lines
            .filter_map(|l| l.split_once(": "))
            .map(|(k, v)| (k.to_ascii_lowercase(), v.to_owned()))
            .collect();
        // Bodies are small; chunked framing is stripped crudely for assertions.
        (status, headers, body.to_owned())
    })
    .await
}

pub fn agent(settings: pb::AgentSettings) -> pb::Agent {
    pb::Agent {
        agent_id: "agent_1".into(),
        version: 1,
        settings: Some(settings),
        ..Default::default()
    }
}

//! Harness for the control-plane tests: spawns the real `callbridge-control` binary on a
//! free loopback port against a real `redis-server`, waits for gRPC health, and hands out
//! authenticated clients.
#![allow(dead_code, unreachable_pub)]

use std::future::Future;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use callbridge_proto::pb;
use callbridge_testkit::redis_server::{RedisServer, free_port, temp_dir};
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

pub const APP_TOKEN: &str = "app-token-for-tests-0123456789abcdef";
pub const RELAY_TOKEN: &str = "relay-token-for-tests-0123456789abcd";
/// Limit for any single await in a test.
pub const STEP: Duration = Duration::from_secs(15);

/// Every await in a test goes through this, so a hang fails with a message.
pub async fn within<F: Future>(what: &'static str, fut: F) -> F::Output {
    match tokio::time::timeout(STEP, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {STEP:?}: {what}"),
    }
}

/// Awaits an RPC that must succeed and returns its message.
pub async fn answer<T, F>(what: &'static str, rpc: F) -> T
where
    F: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    match within(what, rpc).await {
        Ok(response) => response.into_inner(),
        Err(status) => panic!("{what}: {status:?}"),
    }
}

/// Awaits an RPC that must be refused with `code`; returns the status so the caller can
/// check its message too.
pub async fn refused<T, F>(what: &'static str, code: tonic::Code, rpc: F) -> tonic::Status
where
    F: Future<Output = Result<T, tonic::Status>>,
{
    let Err(status) = within(what, rpc).await else {
        panic!("{what}: expected {code:?}, the call succeeded");
    };
    assert_eq!(status.code(), code, "{what}: {status:?}");
    status
}

/// Polls `check` until it returns `Some`, at most [`STEP`]; for conditions another
/// process makes true (no sleeping as synchronisation).
pub async fn eventually<T, F, Fut>(what: &'static str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never happened: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The authenticated clients the tests use.
pub type AgentsRpc = pb::agents_client::AgentsClient<InterceptedService<Channel, Bearer>>;
pub type CallsRpc = pb::calls_client::CallsClient<InterceptedService<Channel, Bearer>>;
pub type RelayRpc = pb::relay_client::RelayClient<InterceptedService<Channel, Bearer>>;

pub fn agents_client(channel: Channel) -> AgentsRpc {
    pb::agents_client::AgentsClient::with_interceptor(channel, Bearer::new(APP_TOKEN))
}

pub fn calls_client(channel: Channel) -> CallsRpc {
    pb::calls_client::CallsClient::with_interceptor(channel, Bearer::new(APP_TOKEN))
}

pub fn relay_client(channel: Channel) -> RelayRpc {
    pb::relay_client::RelayClient::with_interceptor(channel, Bearer::new(RELAY_TOKEN))
}

/// One control process on its own redis-server, with agent "a", one outbound call for
/// it and that call's attach stream from "relay-1": where the relay-flow tests start.
/// Fields are in drop order (the stream closes before control stops, control before
/// redis); a destructuring `let` drops its bindings in reverse, so list them redis first.
pub struct AttachedCall {
    pub stream: RelayStream,
    pub id: String,
    pub relay: RelayRpc,
    pub calls: CallsRpc,
    pub control: Control,
    pub redis: RedisServer,
}

pub async fn attached_call(control_id: &str) -> AttachedCall {
    let redis = RedisServer::unix().expect("redis");
    let control = Control::start(ControlOpts::new(&redis.url(), control_id)).await;
    let mut agents = control.agents().await;
    let mut calls = control.calls().await;
    let mut relay = control.relay().await;
    create_agent(&mut agents, "a").await;
    let id = create_call(&mut calls, "a", "").await.call_id;
    let stream = attach(&mut relay, &id, "relay-1", false)
        .await
        .expect("attached");
    AttachedCall {
        stream,
        id,
        relay,
        calls,
        control,
        redis,
    }
}

/// A running `callbridge-control` process, killed on drop.
pub struct Control {
    child: Child,
    pub port: u16,
    pub metrics_port: u16,
    log: PathBuf,
    pub id: String,
}

/// Settings for one control process.
pub struct ControlOpts {
    pub redis_url: String,
    pub lease_secs: u64,
    /// `CONTROL_HEARTBEAT_TIMEOUT_SECS`; must stay below `lease_secs`.
    pub heartbeat_timeout_secs: u64,
    pub id: String,
    pub extra_env: Vec<(String, String)>,
}

impl ControlOpts {
    pub fn new(redis_url: &str, id: &str) -> Self {
        ControlOpts {
            redis_url: redis_url.to_owned(),
            lease_secs: 15,
            heartbeat_timeout_secs: 6,
            id: id.to_owned(),
            extra_env: Vec::new(),
        }
    }
}

impl Control {
    /// Spawns the binary and waits until its health service says SERVING.
    pub async fn start(opts: ControlOpts) -> Control {
        let control = Control::spawn(opts);
        control.wait_status(ServingStatus::Serving).await;
        control
    }

    /// Spawns the binary without waiting.
    pub fn spawn(opts: ControlOpts) -> Control {
        let port = free_port().expect("free port");
        let metrics_port = free_port().expect("free port");
        let dir = temp_dir("cb-control-test").expect("temp dir");
        let log = dir.join("control.log");
        let log_file = std::fs::File::create(&log).expect("log file");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_callbridge-control"));
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("CONTROL_LISTEN", format!("127.0.0.1:{port}"))
            .env(
                "CONTROL_METRICS_LISTEN",
                format!("127.0.0.1:{metrics_port}"),
            )
            .env("CONTROL_APP_TOKENS", APP_TOKEN)
            .env("CONTROL_RELAY_TOKENS", RELAY_TOKEN)
            .env("CONTROL_LEASE_SECS", opts.lease_secs.to_string())
            .env(
                "CONTROL_HEARTBEAT_TIMEOUT_SECS",
                opts.heartbeat_timeout_secs.to_string(),
            )
            .env("CONTROL_ID", &opts.id)
            .env("CONTROL_SHUTDOWN_GRACE_SECS", "2")
            .env("CONTROL_LOG", "info,callbridge_control=debug")
            .env("RELAY_PUBLIC_URL", "https://relay.example.com")
            .envs(opts.extra_env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::from(log_file.try_clone().expect("clone")))
            .stderr(Stdio::from(log_file));
        if !opts.redis_url.is_empty() {
            cmd.env("REDIS_URL", &opts.redis_url);
        }
        let child = cmd.spawn().expect("spawn callbridge-control");
        Control {
            child,
            port,
            metrics_port,
            log,
            id: opts.id,
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub async fn channel(&self) -> Channel {
        within(
            "connect to control",
            Channel::from_shared(self.url()).expect("uri").connect(),
        )
        .await
        .expect("control reachable")
    }

    /// Waits until the overall health status is `want`.
    pub async fn wait_status(&self, want: ServingStatus) {
        let url = self.url();
        eventually("control health status", || {
            let url = url.clone();
            async move {
                let channel = Channel::from_shared(url).ok()?.connect().await.ok()?;
                let reply = HealthClient::new(channel)
                    .check(tonic_health::pb::HealthCheckRequest {
                        service: String::new(),
                    })
                    .await
                    .ok()?;
                (reply.into_inner().status == want as i32).then_some(())
            }
        })
        .await;
    }

    pub async fn agents(&self) -> AgentsRpc {
        agents_client(self.channel().await)
    }

    pub async fn calls(&self) -> CallsRpc {
        calls_client(self.channel().await)
    }

    pub async fn relay(&self) -> RelayRpc {
        relay_client(self.channel().await)
    }

    /// `GET /metrics` over a raw HTTP/1.0 request.
    pub fn metrics_text(&self) -> String {
        let mut stream =
            std::net::TcpStream::connect(("127.0.0.1", self.metrics_port)).expect("metrics port");
        stream.set_read_timeout(Some(STEP)).expect("read timeout");
        stream
            .write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
            .expect("write");
        let mut out = String::new();
        stream.read_to_string(&mut out).expect("read");
        out
    }

    /// Reads `/metrics` once and asserts every line in `lines` is in it.
    pub fn assert_metrics(&self, lines: &[&str]) {
        let text = self.metrics_text();
        for line in lines {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Control {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("----- {} log -----\n{}", self.id, self.log_text());
        }
    }
}

/// Adds `authorization: Bearer <token>`.
#[derive(Clone)]
pub struct Bearer(Option<MetadataValue<tonic::metadata::Ascii>>);

impl Bearer {
    pub fn new(token: &str) -> Self {
        Bearer(Some(
            format!("Bearer {token}").parse().expect("ascii token"),
        ))
    }
    pub fn none() -> Self {
        Bearer(None)
    }
}

impl tonic::service::Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            request.metadata_mut().insert("authorization", v.clone());
        }
        Ok(request)
    }
}

// === builders ===

pub fn settings(name: &str) -> pb::AgentSettings {
    pb::AgentSettings {
        name: name.to_owned(),
        instructions: "You are a helpful receptionist.".to_owned(),
        voice: "coral".to_owned(),
        temperature: Some(0.8),
        ..Default::default()
    }
}

pub async fn create_agent(agents: &mut AgentsRpc, id: &str) -> pb::Agent {
    answer(
        "create agent",
        agents.create_agent(pb::CreateAgentRequest {
            agent_id: id.to_owned(),
            settings: Some(settings(id)),
        }),
    )
    .await
}

pub async fn create_call(calls: &mut CallsRpc, agent_id: &str, campaign: &str) -> pb::Call {
    answer(
        "create call",
        calls.create_call(pb::CreateCallRequest {
            agent_id: agent_id.to_owned(),
            direction: pb::Direction::Outbound as i32,
            from: "+14155550100".to_owned(),
            to: "+14155550123".to_owned(),
            campaign_id: campaign.to_owned(),
            metadata: Default::default(),
            dial: None,
        }),
    )
    .await
    .call
    .expect("call in response")
}

pub async fn get_call(calls: &mut CallsRpc, call_id: &str) -> pb::Call {
    answer(
        "get call",
        calls.get_call(pb::GetCallRequest {
            call_id: call_id.to_owned(),
        }),
    )
    .await
}

pub async fn transcript(calls: &mut CallsRpc, call_id: &str) -> pb::Transcript {
    answer(
        "transcript",
        calls.get_transcript(pb::GetTranscriptRequest {
            call_id: call_id.to_owned(),
        }),
    )
    .await
}

/// Opens a watch on one call's events after `after_seq`.
pub async fn watch_call(
    calls: &mut CallsRpc,
    call_id: &str,
    after_seq: u64,
) -> tonic::Streaming<pb::CallEvent> {
    answer(
        "watch call",
        calls.watch_call(pb::WatchCallRequest {
            call_id: call_id.to_owned(),
            after_seq,
        }),
    )
    .await
}

/// What the relay is told to do once a call's media stream has closed.
pub async fn after_next(relay: &mut RelayRpc, call_id: &str) -> Option<pb::after_response::Next> {
    answer(
        "after",
        relay.after(pb::AfterRequest {
            call_id: call_id.to_owned(),
            ..Default::default()
        }),
    )
    .await
    .next
}

/// A `say` command for `call_id`.
pub fn say(call_id: &str, text: &str) -> pb::SendCommandRequest {
    pb::SendCommandRequest {
        call_id: call_id.to_owned(),
        command: Some(pb::Command {
            command_id: String::new(),
            kind: Some(pb::command::Kind::Say(pb::SayCommand {
                text: text.to_owned(),
            })),
        }),
    }
}

/// `count` outbound calls for `agent_id` in `campaign`, to `{to_prefix}0000`, `…0001`, ….
pub fn bulk_calls(
    campaign: &str,
    agent_id: &str,
    count: u32,
    to_prefix: &str,
) -> pb::CreateCallsRequest {
    pb::CreateCallsRequest {
        campaign_id: campaign.to_owned(),
        calls: (0..count)
            .map(|i| pb::CreateCallRequest {
                agent_id: agent_id.to_owned(),
                to: format!("{to_prefix}{i:04}"),
                ..Default::default()
            })
            .collect(),
    }
}

/// The id of the first call a bulk create made.
pub fn first_call_id(created: &pb::CreateCallsResponse) -> String {
    created.calls[0]
        .call
        .as_ref()
        .expect("call")
        .call_id
        .clone()
}

pub fn event(call_id: &str, seq: u64, kind: pb::call_event::Kind) -> pb::CallEvent {
    pb::CallEvent {
        call_id: call_id.to_owned(),
        seq,
        at_ms: 1_700_000_000_000 + seq as i64,
        kind: Some(kind),
    }
}

/// The Twilio call sid the tests' calls have (Twilio's shape: `CA` and 32 hex digits).
pub const CALL_SID: &str = "CA00000000000000000000000000000001";

pub fn started(relay: &str) -> pb::call_event::Kind {
    pb::call_event::Kind::Started(pb::Started {
        twilio_call_sid: CALL_SID.into(),
        stream_sid: "MZ0001".into(),
        relay_id: relay.into(),
        resumed: false,
    })
}

pub fn caller(text: &str) -> pb::call_event::Kind {
    pb::call_event::Kind::Caller(pb::CallerSpeech {
        item_id: format!("item-{text}"),
        text: text.to_owned(),
    })
}

pub fn ended(reason: pb::EndReason) -> pb::call_event::Kind {
    pb::call_event::Kind::Ended(pb::Ended {
        reason: reason as i32,
        detail: String::new(),
        transfer_to: String::new(),
    })
}

/// A relay-side attach stream: send requests, read responses.
pub struct RelayStream {
    pub tx: tokio::sync::mpsc::Sender<pb::AttachRequest>,
    pub rx: tonic::Streaming<pb::AttachResponse>,
    pub context: pb::CallContext,
}

/// Opens an attach stream; `Err` is the refusal status.
pub async fn attach(
    relay: &mut RelayRpc,
    call_id: &str,
    relay_id: &str,
    reconnect: bool,
) -> Result<RelayStream, tonic::Status> {
    attach_open(
        relay,
        pb::AttachOpen {
            call_id: call_id.to_owned(),
            relay_id: relay_id.to_owned(),
            reconnect,
            ..Default::default()
        },
    )
    .await
}

/// Opens an attach stream with `open` as the first message; `Err` is the refusal status.
pub async fn attach_open(
    relay: &mut RelayRpc,
    open: pb::AttachOpen,
) -> Result<RelayStream, tonic::Status> {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tx.send(pb::AttachRequest {
        msg: Some(pb::attach_request::Msg::Open(open)),
    })
    .await
    .expect("queue open");
    let mut responses = within(
        "attach",
        relay.attach(tokio_stream::wrappers::ReceiverStream::new(rx)),
    )
    .await?
    .into_inner();
    let first = within("attach context", responses.message())
        .await?
        .expect("a first response");
    match first.msg {
        Some(pb::attach_response::Msg::Context(context)) => Ok(RelayStream {
            tx,
            rx: responses,
            context,
        }),
        other => panic!("expected context first, got {other:?}"),
    }
}

impl RelayStream {
    /// Sends an event and returns the next response (an ack, or the refusal).
    pub async fn send(
        &mut self,
        event: pb::CallEvent,
    ) -> Result<pb::attach_response::Msg, tonic::Status> {
        self.tx
            .send(pb::AttachRequest {
                msg: Some(pb::attach_request::Msg::Event(event)),
            })
            .await
            .expect("stream open");
        self.next().await
    }

    /// Queues every event before reading any response (so control finds them waiting
    /// and stores them in runs), then collects the acks until the stream is refused.
    pub async fn burst_until_refused(
        &mut self,
        events: impl IntoIterator<Item = pb::CallEvent>,
    ) -> (Vec<u64>, tonic::Status) {
        for e in events {
            within(
                "queue",
                self.tx.send(pb::AttachRequest {
                    msg: Some(pb::attach_request::Msg::Event(e)),
                }),
            )
            .await
            .expect("stream open");
        }
        let mut acks = Vec::new();
        loop {
            match self.next().await {
                Ok(pb::attach_response::Msg::AckedSeq(n)) => acks.push(n),
                Ok(other) => panic!("unexpected response {other:?}"),
                Err(status) => return (acks, status),
            }
        }
    }

    /// The next response.
    pub async fn next(&mut self) -> Result<pb::attach_response::Msg, tonic::Status> {
        let msg = within("attach response", self.rx.message()).await?;
        Ok(msg.expect("stream still open").msg.expect("message body"))
    }

    /// Sends an event and asserts it is acknowledged.
    pub async fn ack(&mut self, event: pb::CallEvent) {
        let seq = event.seq;
        match self.send(event).await {
            Ok(pb::attach_response::Msg::AckedSeq(n)) => assert_eq!(n, seq, "ack of seq {seq}"),
            other => panic!("expected ack {seq}, got {other:?}"),
        }
    }
}

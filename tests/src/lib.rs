//! Cross-process tests of callbridge, the one-command demo and benchmarks.
//!
//! Layout:
//! - this file: [`World`], the harness the end-to-end tests share: a throwaway
//!   `redis-server`, the REAL `callbridge-control` and `callbridge-relay` binaries as child
//!   processes, the fake OpenAI Realtime server, authenticated gRPC clients and callers.
//! - [`scenario`]: an end-to-end test written as the call it describes
//!   (`Scenario::inbound().caller_says(..).agent_replies(..).caller_hangs_up()`).
//! - [`stored_turns`]: which of the turns a caller spoke a call's store lacks, stream by
//!   stream (failover tests and `bench_faults`).
//! - `tests/*.rs`: the end-to-end tests.
//! - `src/bin/callbridge-demo.rs`: the demo (everything in-process, no Redis, no keys).
//! - `src/bin/bench_control.rs`: the control-plane benchmark.
//! - `src/bin/bench_relay.rs`: the relay benchmark (audio round trip, cost per call).

use std::net::SocketAddr;
use std::time::Duration;

use callbridge_proto::pb;
use callbridge_testkit::conversation::Conversation;
use callbridge_testkit::fake_realtime::{FakeRealtime, FakeRealtimeBuilder};
use callbridge_testkit::fake_twilio_rest::{FakeTwilio, RelayTarget};
use callbridge_testkit::pki::{PemPair, TestCa, Usage};
use callbridge_testkit::procs::{Proc, free_addr};
use callbridge_testkit::redis_cluster::RedisCluster;
use callbridge_testkit::redis_server::{RedisServer, RedisTls};
use callbridge_testkit::sim_caller::{CallerConfig, LoadBalancer};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

pub mod bench;
pub mod scenario;
pub mod stored_turns;

pub use callbridge_testkit::with_timeout;

/// The public base URL the relays are configured with (what Twilio would call).
pub const PUBLIC_URL: &str = "https://relay.callbridge.test";
/// Token of the application API.
pub const APP_TOKEN: &str = "app-token-e2e-0123456789abcdef0123";
/// Token of the relay API.
pub const RELAY_TOKEN: &str = "relay-token-e2e-0123456789abcdef012";
/// Twilio auth token shared by the relay and the simulated callers.
pub const TWILIO_TOKEN: &str = "twilio-token-e2e";
/// OpenAI key the relay presents to the fake.
pub const OPENAI_KEY: &str = "sk-e2e-fake";
/// How long a process may take to become ready.
pub const READY: Duration = Duration::from_secs(30);
/// Bound on a single RPC in tests.
pub const RPC: Duration = Duration::from_secs(10);

/// Adds `authorization: Bearer <token>` to every call.
#[derive(Clone)]
pub struct Bearer(MetadataValue<Ascii>);

impl Bearer {
    /// A bearer token interceptor.
    pub fn new(token: &str) -> Self {
        Self(
            format!("Bearer {token}")
                .parse()
                .expect("a token is valid header text"),
        )
    }
}

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

/// Authenticated `Agents` client.
pub type AgentsClient = pb::agents_client::AgentsClient<InterceptedService<Channel, Bearer>>;
/// Authenticated `Calls` client.
pub type CallsClient = pb::calls_client::CallsClient<InterceptedService<Channel, Bearer>>;

/// How to build a [`World`].
pub struct WorldBuilder {
    fake: FakeRealtimeBuilder,
    relays: usize,
    skip_signature: bool,
    control_env: Vec<(String, String)>,
    relay_env: Vec<(String, String)>,
    redis_tcp: bool,
    redis_aof: Option<String>,
    tls: bool,
    redis_cluster: usize,
    model_errors_expected: bool,
}

/// The certificates of a world with TLS on every hop (see [`WorldBuilder::tls`]).
pub struct WorldTls {
    /// The CA that issued every certificate below.
    pub ca: TestCa,
    /// Control's gRPC certificate, at the fixed paths control reads (replace the contents
    /// to rotate it).
    pub control: PemPair,
    /// The client certificate of the relays and of the test's own clients.
    pub client: PemPair,
    /// Redis's server certificate.
    pub redis_server: PemPair,
    /// Control's client certificate towards Redis.
    pub redis_client: PemPair,
}

impl WorldTls {
    /// A fresh CA and its certificates.
    pub fn generate() -> anyhow::Result<Self> {
        let ca = TestCa::new("world")?;
        let control = ca.mounted(&ca.issue("control", Usage::Server)?, "control")?;
        Ok(Self {
            client: ca.issue("relay", Usage::Client)?,
            redis_server: ca.issue("redis", Usage::Server)?,
            redis_client: ca.issue("control-to-redis", Usage::Client)?,
            control,
            ca,
        })
    }

    /// A client TLS config trusting the CA and presenting `identity` (if any).
    pub fn client_config(&self, identity: Option<&PemPair>) -> ClientTlsConfig {
        let ca = std::fs::read(self.ca.ca_file()).expect("CA file");
        let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
        if let Some(pair) = identity {
            let cert = std::fs::read(&pair.cert).expect("cert file");
            let key = std::fs::read(&pair.key).expect("key file");
            config = config.identity(Identity::from_pem(cert, key));
        }
        config
    }

    /// Control's environment for TLS on gRPC (mTLS) and towards Redis (mTLS).
    pub fn control_env(&self) -> Vec<(String, String)> {
        let path = |p: &std::path::Path| p.to_string_lossy().into_owned();
        vec![
            ("CONTROL_TLS_CERT_FILE".to_owned(), path(&self.control.cert)),
            ("CONTROL_TLS_KEY_FILE".to_owned(), path(&self.control.key)),
            (
                "CONTROL_TLS_CLIENT_CA_FILE".to_owned(),
                path(self.ca.ca_file()),
            ),
            ("REDIS_CA_FILE".to_owned(), path(self.ca.ca_file())),
            ("REDIS_CERT_FILE".to_owned(), path(&self.redis_client.cert)),
            ("REDIS_KEY_FILE".to_owned(), path(&self.redis_client.key)),
        ]
    }

    /// A relay's environment for mTLS towards control.
    pub fn relay_env(&self) -> Vec<(String, String)> {
        let path = |p: &std::path::Path| p.to_string_lossy().into_owned();
        vec![
            ("CONTROL_CA_FILE".to_owned(), path(self.ca.ca_file())),
            (
                "CONTROL_CLIENT_CERT_FILE".to_owned(),
                path(&self.client.cert),
            ),
            ("CONTROL_CLIENT_KEY_FILE".to_owned(), path(&self.client.key)),
        ]
    }
}

/// Everything an end-to-end test needs, all on loopback; dropped = all stopped.
pub struct World {
    // Field order is drop order: relays first, then control, then Redis.
    pub relays: Vec<Proc>,
    /// Each relay's `RELAY_METRICS_ADDR` (same order as `relays`).
    pub relay_metrics: Vec<SocketAddr>,
    pub control: Proc,
    pub redis: RedisServer,
    /// The Redis Cluster control uses instead of `redis`, with
    /// [`WorldBuilder::redis_cluster`].
    pub redis_cluster: Option<RedisCluster>,
    pub fake: FakeRealtime,
    channel: Channel,
    /// The certificates, when built with [`WorldBuilder::tls`] (dropped last: the
    /// processes read their files).
    pub tls: Option<WorldTls>,
    /// Set by [`WorldBuilder::model_errors_expected`]: the test provokes model `error`s.
    model_errors_expected: bool,
}

impl Drop for World {
    /// The real API answers an event it refuses with an `error`, so does the fake: a test
    /// that did not set out to provoke one fails when the relay caused any (an event
    /// outside OpenAI's GA schema, a truncate past the audio, a second response…). The
    /// errors a test configures the fake to send are not the relay's doing and not counted.
    fn drop(&mut self) {
        if self.model_errors_expected || std::thread::panicking() {
            return;
        }
        self.assert_no_model_errors();
    }
}

impl World {
    /// Panics when the fake model refused any client event (an `error` the test did not
    /// configure).
    pub fn assert_no_model_errors(&self) {
        let errors: Vec<(usize, String)> = self
            .fake
            .connections()
            .iter()
            .enumerate()
            .flat_map(|(n, c)| c.refusals.iter().map(move |e| (n, e.clone())))
            .collect();
        assert!(
            errors.is_empty(),
            "the model refused client events (connection, error): {errors:?}"
        );
    }
}

impl World {
    /// A world with one relay, real signatures, and `fake` as the model.
    pub fn builder(fake: FakeRealtimeBuilder) -> WorldBuilder {
        WorldBuilder {
            fake,
            relays: 1,
            skip_signature: false,
            control_env: Vec::new(),
            relay_env: Vec::new(),
            redis_tcp: false,
            redis_aof: None,
            tls: false,
            redis_cluster: 0,
            model_errors_expected: false,
        }
    }

    /// The URL of control's gRPC API (`https://` in a TLS world).
    pub fn control_url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.control.addr)
    }

    /// The `Agents` API as an application.
    pub fn agents(&self) -> AgentsClient {
        pb::agents_client::AgentsClient::with_interceptor(
            self.channel.clone(),
            Bearer::new(APP_TOKEN),
        )
    }

    /// The `Calls` API as an application.
    pub fn calls(&self) -> CallsClient {
        pb::calls_client::CallsClient::with_interceptor(
            self.channel.clone(),
            Bearer::new(APP_TOKEN),
        )
    }

    /// The relay addresses.
    pub fn relay_addrs(&self) -> Vec<SocketAddr> {
        self.relays.iter().map(|r| r.addr).collect()
    }

    /// The fake Twilio's answered calls and callbacks come to this world's relays (round
    /// robin, at the public URL the relays sign with). It asks no action URL after a
    /// stream that ended abnormally (`after_on_abnormal_close` off).
    pub fn answer_from(&self, twilio: &FakeTwilio) {
        twilio.set_relay(RelayTarget {
            public_base: PUBLIC_URL.to_owned(),
            relays: LoadBalancer::new(self.relay_addrs()),
            after_on_abnormal_close: false,
        });
    }

    /// A caller for this world (signing with the Twilio token, round robin over relays).
    pub fn caller(&self, script: Conversation) -> CallerConfig {
        let mut cfg = CallerConfig::new(PUBLIC_URL, self.relays[0].addr, Some(TWILIO_TOKEN));
        cfg.relays = LoadBalancer::new(self.relay_addrs());
        cfg.script = script;
        cfg
    }

    /// Creates an agent and returns its id.
    pub async fn create_agent(&self, id: &str, settings: pb::AgentSettings) -> String {
        let agent = with_timeout(
            RPC,
            "CreateAgent",
            self.agents().create_agent(pb::CreateAgentRequest {
                agent_id: id.to_owned(),
                settings: Some(settings),
            }),
        )
        .await
        .expect("CreateAgent succeeds")
        .into_inner();
        agent.agent_id
    }

    /// Creates an agent and makes it the default for inbound calls.
    pub async fn default_agent(&self, settings: pb::AgentSettings) -> String {
        let id = self.create_agent("", settings).await;
        with_timeout(
            RPC,
            "SetDefaultAgent",
            self.agents().set_default_agent(pb::DefaultAgent {
                agent_id: id.clone(),
            }),
        )
        .await
        .expect("SetDefaultAgent succeeds");
        id
    }

    /// Pre-creates a call for `agent_id`; returns its id.
    pub async fn create_call(&self, agent_id: &str, to: &str) -> String {
        let resp = with_timeout(
            RPC,
            "CreateCall",
            self.calls().create_call(pb::CreateCallRequest {
                agent_id: agent_id.to_owned(),
                direction: pb::Direction::Outbound as i32,
                from: "+14155550100".to_owned(),
                to: to.to_owned(),
                ..Default::default()
            }),
        )
        .await
        .expect("CreateCall succeeds")
        .into_inner();
        resp.call.expect("a call").call_id
    }

    /// The call as control stores it.
    pub async fn get_call(&self, call_id: &str) -> pb::Call {
        get_call(&self.calls(), call_id).await
    }

    /// Finds the call of a Twilio call sid (newest calls first).
    pub async fn call_by_sid(&self, twilio_call_sid: &str) -> Option<pb::Call> {
        let list = with_timeout(
            RPC,
            "ListCalls",
            self.calls().list_calls(pb::ListCallsRequest {
                page_size: 500,
                ..Default::default()
            }),
        )
        .await
        .expect("ListCalls succeeds")
        .into_inner();
        list.calls
            .into_iter()
            .find(|c| c.twilio_call_sid == twilio_call_sid)
    }

    /// Waits until the call reached a final status (control stores the `ended` event
    /// asynchronously after the caller saw the stream end).
    pub async fn wait_ended(&self, call_id: &str, limit: Duration) -> pb::Call {
        wait_call_final(&self.calls(), call_id, limit).await
    }

    /// The stored transcript.
    pub async fn transcript(&self, call_id: &str) -> pb::Transcript {
        with_timeout(
            RPC,
            "GetTranscript",
            self.calls().get_transcript(pb::GetTranscriptRequest {
                call_id: call_id.to_owned(),
            }),
        )
        .await
        .expect("GetTranscript succeeds")
        .into_inner()
    }

    /// Every stored event of a call up to its final `ended`, read back through
    /// `WatchCall` (a `HANDOFF` end is not final: the call goes on on another stream).
    pub async fn stored_events(&self, call_id: &str) -> Vec<pb::CallEvent> {
        let mut stream = with_timeout(
            RPC,
            "WatchCall",
            self.calls().watch_call(pb::WatchCallRequest {
                call_id: call_id.to_owned(),
                after_seq: 0,
            }),
        )
        .await
        .expect("WatchCall succeeds")
        .into_inner();
        let mut events = Vec::new();
        while let Some(event) = with_timeout(RPC, "WatchCall event", stream.message())
            .await
            .expect("WatchCall streams")
        {
            let ended = matches!(&event.kind, Some(pb::call_event::Kind::Ended(e))
                if e.reason != pb::EndReason::Handoff as i32);
            events.push(event);
            if ended {
                break;
            }
        }
        events
    }

    /// Relay `i`'s `/metrics` page.
    pub async fn relay_metrics_text(&self, i: usize) -> String {
        metrics_text(self.relay_metrics[i]).await
    }

    /// One sample of relay `i`'s metrics (`series` exactly as exposed, labels included).
    pub async fn relay_metric(&self, i: usize, series: &str) -> f64 {
        let text = self.relay_metrics_text(i).await;
        sample(&text, series).unwrap_or_else(|| panic!("{series} in relay {i}'s metrics"))
    }

    /// Restarts control (same address, same Redis) and waits until it serves.
    pub async fn restart_control(&mut self) {
        self.control.restart().expect("control restarts");
        let tls = self.tls.as_ref().map(|t| t.client_config(Some(&t.client)));
        self.control
            .wait_grpc_serving_tls(tls, READY)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
}

impl WorldBuilder {
    /// Number of relay processes (behind the callers' round robin).
    pub fn relays(mut self, n: usize) -> Self {
        self.relays = n.max(1);
        self
    }

    /// Run the relays with `RELAY_INSECURE_SKIP_SIGNATURE=true` (only for tests that are
    /// not about signatures).
    pub fn skip_signature(mut self) -> Self {
        self.skip_signature = true;
        self
    }

    /// An extra env var for control.
    pub fn control_env(mut self, k: &str, v: &str) -> Self {
        self.control_env.push((k.to_owned(), v.to_owned()));
        self
    }

    /// Control places calls through the fake Twilio: its account, token and base URL.
    pub fn dials_through(self, twilio: &FakeTwilio) -> Self {
        twilio
            .control_env()
            .into_iter()
            .fold(self, |world, (k, v)| world.control_env(k, &v))
    }

    /// An extra env var for every relay.
    pub fn relay_env(mut self, k: &str, v: &str) -> Self {
        self.relay_env.push((k.to_owned(), v.to_owned()));
        self
    }

    /// Redis on a loopback TCP port instead of a unix socket.
    pub fn redis_tcp(mut self) -> Self {
        self.redis_tcp = true;
        self
    }

    /// Redis on a loopback TCP port with the append-only file on and `appendfsync` set to
    /// `fsync`, as deployed (restart it in place with `World::redis`).
    pub fn redis_aof(mut self, fsync: &str) -> Self {
        self.redis_aof = Some(fsync.to_owned());
        self
    }

    /// TLS on every hop: Redis on `rediss://` with client certificates, control's gRPC
    /// over TLS asking for client certificates, the relays and the test's clients on
    /// `https://` presenting one. Certificates come from a fresh test CA.
    pub fn tls(mut self) -> Self {
        self.tls = true;
        self
    }

    /// Control on a Redis Cluster of `masters` nodes (`REDIS_CLUSTER_NODES`), TLS ones in a
    /// [`WorldBuilder::tls`] world (asking control for its client certificate, like the
    /// single node). `World::redis` still runs, unused by control.
    pub fn redis_cluster(mut self, masters: usize) -> Self {
        self.redis_cluster = masters;
        self
    }

    /// This test provokes model `error` events on purpose: dropping the world does not
    /// check that the fake model refused nothing (see `impl Drop for World`).
    pub fn model_errors_expected(mut self) -> Self {
        self.model_errors_expected = true;
        self
    }

    /// Starts Redis, control, the fake model and the relays; waits until all are ready.
    pub async fn start(self) -> World {
        let tls = self
            .tls
            .then(|| WorldTls::generate().expect("test certificates"));
        let redis = match &tls {
            Some(tls) => RedisServer::tls(&RedisTls {
                cert: tls.redis_server.cert.clone(),
                key: tls.redis_server.key.clone(),
                client_ca: tls.ca.ca_file().to_owned(),
                require_client_cert: true,
            }),
            None if self.redis_aof.is_some() => {
                RedisServer::tcp_aof(self.redis_aof.as_deref().unwrap_or("everysec"))
            }
            None if self.redis_tcp => RedisServer::tcp(),
            None => RedisServer::unix(),
        }
        .expect("redis-server starts");
        let redis_cluster = match self.redis_cluster {
            0 => None,
            masters => {
                let cluster_tls = tls.as_ref().map(|tls| {
                    let node = tls
                        .ca
                        .issue("redis-cluster-node", Usage::Peer)
                        .expect("cluster node certificate");
                    RedisTls {
                        cert: node.cert,
                        key: node.key,
                        client_ca: tls.ca.ca_file().to_owned(),
                        require_client_cert: true,
                    }
                });
                let started = tokio::task::spawn_blocking(move || match cluster_tls {
                    Some(t) => RedisCluster::start_tls(masters, &t),
                    None => RedisCluster::start(masters),
                });
                let cluster = with_timeout(Duration::from_secs(60), "redis cluster", started)
                    .await
                    .expect("cluster task")
                    .expect("redis cluster starts");
                Some(cluster)
            }
        };
        let fake = self.fake.start().await.expect("fake realtime starts");
        let control_addr = free_addr().expect("a free port");
        let mut control_env = vec![
            ("CONTROL_LISTEN".to_owned(), control_addr.to_string()),
            ("REDIS_URL".to_owned(), redis.url()),
            ("CONTROL_APP_TOKENS".to_owned(), APP_TOKEN.to_owned()),
            ("CONTROL_RELAY_TOKENS".to_owned(), RELAY_TOKEN.to_owned()),
            ("CONTROL_METRICS_LISTEN".to_owned(), String::new()),
            ("RELAY_PUBLIC_URL".to_owned(), PUBLIC_URL.to_owned()),
            ("CONTROL_LOG".to_owned(), "info".to_owned()),
        ];
        if let Some(tls) = &tls {
            control_env.extend(tls.control_env());
        }
        if let Some(cluster) = &redis_cluster {
            control_env.retain(|(k, _)| k != "REDIS_URL");
            control_env.push(("REDIS_CLUSTER_NODES".to_owned(), cluster.seeds()));
        }
        control_env.extend(self.control_env);
        let mut control =
            Proc::spawn("callbridge-control", control_env, control_addr).expect("control spawns");
        let client_tls = tls.as_ref().map(|t| t.client_config(Some(&t.client)));
        control
            .wait_grpc_serving_tls(client_tls.clone(), READY)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let control_url = match &tls {
            Some(_) => format!("https://{control_addr}"),
            None => format!("http://{control_addr}"),
        };
        let mut relays = Vec::new();
        let mut relay_metrics = Vec::new();
        for n in 0..self.relays {
            let addr = free_addr().expect("a free port");
            let metrics_addr = free_addr().expect("a free port");
            let mut env = vec![
                ("RELAY_LISTEN".to_owned(), addr.to_string()),
                ("RELAY_METRICS_ADDR".to_owned(), metrics_addr.to_string()),
                ("RELAY_PUBLIC_URL".to_owned(), PUBLIC_URL.to_owned()),
                ("CONTROL_URL".to_owned(), control_url.clone()),
                ("RELAY_CONTROL_TOKEN".to_owned(), RELAY_TOKEN.to_owned()),
                ("OPENAI_API_KEY".to_owned(), OPENAI_KEY.to_owned()),
                ("OPENAI_REALTIME_URL".to_owned(), fake.url()),
                ("TWILIO_AUTH_TOKEN".to_owned(), TWILIO_TOKEN.to_owned()),
                ("RELAY_ID".to_owned(), format!("relay-e2e-{n}")),
                ("RELAY_LOG".to_owned(), "info".to_owned()),
                ("RELAY_DRAIN_GRACE_SECS".to_owned(), "5".to_owned()),
            ];
            if self.skip_signature {
                env.push((
                    "RELAY_INSECURE_SKIP_SIGNATURE".to_owned(),
                    "true".to_owned(),
                ));
                // PUBLIC_URL is not loopback (it only names the relay in signatures).
                env.push(("RELAY_INSECURE_ALLOW_PUBLIC".to_owned(), "true".to_owned()));
            }
            if let Some(tls) = &tls {
                env.extend(tls.relay_env());
            }
            env.extend(self.relay_env.iter().cloned());
            let mut relay = Proc::spawn("callbridge-relay", env, addr).expect("relay spawns");
            relay
                .wait_http_ok("/healthz", READY)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            relays.push(relay);
            relay_metrics.push(metrics_addr);
        }
        let mut endpoint = tonic::transport::Endpoint::from_shared(control_url).expect("valid url");
        if let Some(client_tls) = client_tls {
            endpoint = endpoint.tls_config(client_tls).expect("tls config");
        }
        let channel = with_timeout(RPC, "connect to control", endpoint.connect())
            .await
            .expect("control reachable");
        World {
            relays,
            relay_metrics,
            control,
            redis,
            redis_cluster,
            fake,
            channel,
            tls,
            model_errors_expected: self.model_errors_expected,
        }
    }
}

/// The value of the sample `series` (name with labels, exactly as exposed) in a
/// Prometheus text page.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// The call as control stores it, read with `client`.
pub async fn get_call(client: &CallsClient, call_id: &str) -> pb::Call {
    with_timeout(
        RPC,
        "GetCall",
        client.clone().get_call(pb::GetCallRequest {
            call_id: call_id.to_owned(),
        }),
    )
    .await
    .expect("GetCall succeeds")
    .into_inner()
}

/// Waits (≤ `limit`) until the call reached a final status, and returns it as stored.
pub async fn wait_call_final(client: &CallsClient, call_id: &str, limit: Duration) -> pb::Call {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let call = get_call(client, call_id).await;
        let status = pb::CallStatus::try_from(call.status).unwrap_or_default();
        let done = matches!(
            status,
            pb::CallStatus::Completed
                | pb::CallStatus::Failed
                | pb::CallStatus::NoAnswer
                | pb::CallStatus::Canceled
                | pb::CallStatus::Busy
        );
        if done || tokio::time::Instant::now() >= deadline {
            return call;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Agent settings for tests: a name, instructions carrying `marker` (the fake picks its
/// script by it), an optional greeting.
pub fn agent_settings(marker: &str, greeting: Option<&str>) -> pb::AgentSettings {
    pb::AgentSettings {
        name: format!("agent {marker}"),
        instructions: format!("You are a test agent. Marker: {marker}."),
        greeting: greeting.unwrap_or_default().to_owned(),
        voice: "marin".to_owned(),
        input_transcription_model: "gpt-4o-mini-transcribe".to_owned(),
        ..Default::default()
    }
}

/// One transcript turn, flattened for comparison: ("caller"|"assistant"|…, text).
pub fn flatten(t: &pb::Transcript) -> Vec<(String, String)> {
    t.turns
        .iter()
        .filter_map(|turn| match &turn.kind {
            Some(pb::turn::Kind::Caller(c)) => Some(("caller".to_owned(), c.text.clone())),
            Some(pb::turn::Kind::Assistant(a)) => Some(("assistant".to_owned(), a.text.clone())),
            Some(pb::turn::Kind::ToolCall(c)) => Some(("tool_call".to_owned(), c.name.clone())),
            Some(pb::turn::Kind::ToolResult(r)) => {
                Some(("tool_result".to_owned(), r.output.clone()))
            }
            Some(pb::turn::Kind::Dtmf(d)) => Some(("dtmf".to_owned(), d.digit.clone())),
            None => None,
        })
        .collect()
}

/// What a script should leave in the transcript, in order (greeting, then each caller
/// line and answer), for a call where nobody barged in.
pub fn expected_transcript(script: &Conversation) -> Vec<(String, String)> {
    let mut out = Vec::new();
    if let Some(g) = &script.greeting {
        out.push(("assistant".to_owned(), g.text.clone()));
    }
    for t in &script.turns {
        out.push(("caller".to_owned(), t.caller.text.clone()));
        if !t.agent.text.is_empty() {
            out.push(("assistant".to_owned(), t.agent.text.clone()));
        }
    }
    out
}

/// The `/metrics` page served at `addr` (a relay's or control's metrics listener).
pub async fn metrics_text(addr: SocketAddr) -> String {
    callbridge_testkit::http::request(addr, "GET", &addr.to_string(), "/metrics", &[], None, RPC)
        .await
        .unwrap_or_else(|e| panic!("GET /metrics on {addr}: {e}"))
        .body
}

//! Scale-out, end to end: a 3-master Redis Cluster, 2 control replicas, 3 relays (two
//! attached to control A, one to control B), the fake model and a few hundred simulated
//! calls spread round robin over the relays (webhook, stream and action URL each go to the
//! next relay, as behind a load balancer). Some calls are watched through BOTH control
//! replicas (so also through the one their relay does not use), some get `say` / `hangup`
//! commands through either replica, and control A is SIGKILLed mid-run, while calls on it
//! are live, and replaced by a new replica (new `CONTROL_ID`) on the same port: a relay
//! takes exactly one `CONTROL_URL` (`relay/src/config.rs`), so that is how its attach
//! streams can come back. The ramp holds new calls while A is down (a relay on A cannot
//! admit a call without control; that refusal is not what is tested here).
//!
//! Proves: nothing lost, nothing duplicated, every call's events stored in order (seqs
//! exactly `1..=last`, `started` first, the scripted turns in order, `ended` last), every
//! call final, live watchers (resuming from their last seq when their replica dies) see
//! exactly the stored events, commands take effect once, and what control stored matches
//! what each caller said and heard and what the model heard. Figures (admission rate,
//! events stored, time) are printed, never asserted.
//!
//! Three product bugs found on the way have regression tests at the end of this file
//! (commands over a multi-node cluster, a command landing during a re-attach, events of a
//! call ended while control is down).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use callbridge_proto::pb;
use callbridge_testkit::conversation::{AgentReply, Conversation, Turn};
use callbridge_testkit::fake_realtime::FakeRealtime;
use callbridge_testkit::procs::{Proc, free_addr};
use callbridge_testkit::redis_cluster::RedisCluster;
use callbridge_testkit::sim_caller::{
    CallReport, CallerConfig, ClosedBy, LiveStats, LoadBalancer, SimCaller,
};
use callbridge_tests::{
    APP_TOKEN, Bearer, CallsClient, OPENAI_KEY, PUBLIC_URL, READY, RELAY_TOKEN, RPC, TWILIO_TOKEN,
    agent_settings, expected_transcript, flatten, wait_call_final, with_timeout,
};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tonic::transport::Channel;

/// Simulated calls in the run.
const CALLS: usize = 300;
/// Calls started per second (the ramp).
const RAMP_PER_SEC: f64 = 100.0;
/// Control A is killed once this many calls were started (the ramp pauses meanwhile).
const KILL_AT: usize = CALLS / 2;
/// How long control A stays dead (a pod restart; well under the 15 s lease, so relays come
/// back to it). Calls that end meanwhile keep their events on the relay until A is back
/// (see `events_of_a_call_ended_while_control_is_down_are_stored_when_it_returns`).
const OUTAGE: Duration = Duration::from_secs(3);
/// Bound on any one call, its commands and its watchers.
const CALL_LIMIT: Duration = Duration::from_secs(60);
/// Bound on the whole run.
const RUN_LIMIT: Duration = Duration::from_secs(150);
/// Audio of a `say` answer in the fake (its default).
const SAY_AUDIO_MS: u64 = 500;
/// An accepted command shows its effect (the say's audio, the call's end) this soon.
const APPLIED_WITHIN: Duration = Duration::from_secs(5);
/// Fake model pacing and caller playback: faster than real time (not what is tested).
const SPEED: f64 = 4.0;

/// What the test does to a call besides letting it run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// The caller hangs up at the end of its script.
    Plain,
    /// The application hangs up (through a control replica) once the script was heard.
    Hangup,
    /// The application makes the agent say something, then hangs up, through the two
    /// replicas in turn.
    SayThenHangup,
}

fn kind_of(n: usize) -> Kind {
    match n % 10 {
        3 => Kind::Hangup,
        7 => Kind::SayThenHangup,
        _ => Kind::Plain,
    }
}

/// Every fifth call is watched live through both control replicas.
fn watched(n: usize) -> bool {
    n % 5 == 1
}

fn marker(n: usize) -> String {
    // Delimited so that no marker is a substring of another.
    format!("scale-{n:04}-end")
}

fn say_text(n: usize) -> String {
    format!("Special offer for caller {n}")
}

fn script(n: usize) -> Conversation {
    Conversation {
        greeting: Some(AgentReply::says(format!("Hello caller {n}"), 200)),
        turns: vec![
            Turn::new(
                format!("Caller {n} asks about order {n}"),
                300,
                AgentReply::says(format!("Order {n} ships tomorrow"), 300),
            ),
            Turn::new(
                format!("Caller {n} asks about the fee"),
                300,
                AgentReply::says(format!("There is no fee for caller {n}"), 400),
            ),
            Turn::new(
                format!("Caller {n} says thanks"),
                300,
                AgentReply::says(format!("Goodbye caller {n}"), 200),
            ),
        ],
    }
}

fn script_audio_ms(script: &Conversation) -> u64 {
    let greeting = script
        .greeting
        .as_ref()
        .map_or(0, |g| u64::from(g.audio_ms));
    greeting
        + script
            .turns
            .iter()
            .map(|t| u64::from(t.agent.audio_ms))
            .sum::<u64>()
}

fn calls_client(channel: &Channel) -> CallsClient {
    pb::calls_client::CallsClient::with_interceptor(channel.clone(), Bearer::new(APP_TOKEN))
}

fn agents_client(
    channel: &Channel,
) -> pb::agents_client::AgentsClient<tonic::service::interceptor::InterceptedService<Channel, Bearer>>
{
    pb::agents_client::AgentsClient::with_interceptor(channel.clone(), Bearer::new(APP_TOKEN))
}

async fn connect(addr: SocketAddr) -> Channel {
    with_timeout(
        RPC,
        "connect to control",
        tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .expect("valid url")
            .connect_timeout(Duration::from_secs(2))
            .connect(),
    )
    .await
    .expect("control reachable")
}

fn control_env(addr: SocketAddr, seeds: &str, id: &str) -> Vec<(String, String)> {
    [
        ("CONTROL_LISTEN", addr.to_string()),
        ("CONTROL_ID", id.to_owned()),
        ("REDIS_CLUSTER_NODES", seeds.to_owned()),
        ("CONTROL_APP_TOKENS", APP_TOKEN.to_owned()),
        ("CONTROL_RELAY_TOKENS", RELAY_TOKEN.to_owned()),
        ("CONTROL_METRICS_LISTEN", String::new()),
        ("RELAY_PUBLIC_URL", PUBLIC_URL.to_owned()),
        ("CONTROL_LOG", "info".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

/// A control replica id starting with `prefix` whose command channel lives on the node at
/// `port`: the runs below place replicas' channels on chosen nodes, so that commands are
/// published to a node other than the first seed (control once subscribed there only and
/// answered FAILED_PRECONDITION for commands it had delivered; see
/// `send_command_reaches_the_holder_whatever_node_its_channel_hashes_to`).
fn control_id_on(cluster: &RedisCluster, port: u16, prefix: &str) -> String {
    (0..1000)
        .map(|i| format!("{prefix}-{i}"))
        .find(|id| {
            // `cb:bus:cmd:{id}`: control's command channel (control/src/store/keys.rs).
            cluster
                .owner_of(&format!("cb:bus:cmd:{id}"))
                .expect("CLUSTER KEYSLOT")
                == port
        })
        .expect("an id whose channel hashes to the node")
}

fn relay_env(
    addr: SocketAddr,
    metrics: SocketAddr,
    control: SocketAddr,
    fake: &str,
    id: &str,
) -> Vec<(String, String)> {
    [
        ("RELAY_LISTEN", addr.to_string()),
        ("RELAY_METRICS_ADDR", metrics.to_string()),
        ("RELAY_PUBLIC_URL", PUBLIC_URL.to_owned()),
        ("CONTROL_URL", format!("http://{control}")),
        ("RELAY_CONTROL_TOKEN", RELAY_TOKEN.to_owned()),
        ("OPENAI_API_KEY", OPENAI_KEY.to_owned()),
        ("OPENAI_REALTIME_URL", fake.to_owned()),
        ("TWILIO_AUTH_TOKEN", TWILIO_TOKEN.to_owned()),
        ("RELAY_ID", id.to_owned()),
        ("RELAY_LOG", "info".to_owned()),
        ("RELAY_DRAIN_GRACE_SECS", "5".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

/// Sends `command` for `call_id` through `clients[first]`, then alternately through the
/// other replica, until one accepts it (the replica may be dead, or the call's attach
/// stream may be between two replicas). Returns the command id and the replica that took it.
async fn send_command(
    clients: &[CallsClient; 2],
    first: usize,
    call_id: &str,
    kind: pb::command::Kind,
    deadline: Instant,
    log: &mut Vec<String>,
) -> Result<(String, usize), String> {
    let started = Instant::now();
    let mut attempt = 0;
    loop {
        let which = (first + attempt) % 2;
        let mut client = clients[which].clone();
        let req = pb::SendCommandRequest {
            call_id: call_id.to_owned(),
            command: Some(pb::Command {
                command_id: String::new(),
                kind: Some(kind.clone()),
            }),
        };
        let last = match tokio::time::timeout(RPC, client.send_command(req)).await {
            Ok(Ok(resp)) => {
                let id = resp.into_inner().command_id;
                log.push(format!(
                    "{:?} +{:?}: accepted by replica {which} as {id}",
                    kind_label(&kind),
                    started.elapsed()
                ));
                return Ok((id, which));
            }
            Ok(Err(status)) => format!("{:?}: {}", status.code(), status.message()),
            Err(_) => "timed out".to_owned(),
        };
        if log.last().is_none_or(|l| !l.ends_with(&last)) {
            log.push(format!(
                "{:?} +{:?}: replica {which}: {last}",
                kind_label(&kind),
                started.elapsed()
            ));
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "command for {call_id} not accepted after {attempt} attempts; last: {last}"
            ));
        }
        attempt += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn kind_label(kind: &pb::command::Kind) -> &'static str {
    match kind {
        pb::command::Kind::Say(_) => "say",
        pb::command::Kind::Hangup(_) => "hangup",
        _ => "other",
    }
}

/// Waits until the caller received at least `ms` of agent audio (bounded by `deadline`).
async fn heard(live: &LiveStats, ms: u64, deadline: Instant) -> Result<(), String> {
    while live.media_bytes_received.load(Ordering::Relaxed) < ms * 8 {
        if Instant::now() >= deadline {
            return Err(format!(
                "caller received {} bytes, waited for {}",
                live.media_bytes_received.load(Ordering::Relaxed),
                ms * 8
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// The commands the application sent for one call.
#[derive(Debug, Default)]
struct Sent {
    /// (command id, replica index that accepted it)
    say: Option<(String, usize)>,
    hangup: Option<(String, usize)>,
    /// What happened, for failure messages.
    log: Vec<String>,
}

/// Drives a `Hangup` / `SayThenHangup` call from the application side.
/// One call the application side drives with commands.
struct Driver {
    n: usize,
    kind: Kind,
    call_id: String,
    /// The caller's live counters.
    live: Arc<LiveStats>,
    /// Set when the caller's call is over.
    ended: Arc<AtomicBool>,
    /// `Calls` clients of replica A and replica B.
    clients: [CallsClient; 2],
    /// Agent audio of the whole script (ms).
    script_ms: u64,
}

async fn drive_commands(d: Driver) -> Sent {
    let mut sent = Sent::default();
    if let Err(e) = drive(&d, &mut sent).await {
        sent.log.push(format!("gave up: {e}"));
    }
    sent
}

async fn drive(d: &Driver, sent: &mut Sent) -> Result<(), String> {
    let Driver {
        n,
        kind,
        call_id,
        live,
        ended,
        clients,
        script_ms,
    } = d;
    let (n, kind, script_ms) = (*n, *kind, *script_ms);
    // Which replica gets the first command: alternates over the calls of each kind (`say`
    // through one replica, the `hangup` after it through the other).
    let first = (n / 10) % 2;
    let deadline = Instant::now() + CALL_LIMIT;
    // Once the whole script was heard the caller only streams silence: nothing else can
    // be in flight, so what is stored is deterministic.
    heard(live, script_ms, deadline).await?;
    if kind == Kind::SayThenHangup {
        let expect_ms = script_ms + SAY_AUDIO_MS;
        let say = pb::command::Kind::Say(pb::SayCommand { text: say_text(n) });
        let accepted = send_command(clients, first, call_id, say, deadline, &mut sent.log).await?;
        let effect = Instant::now() + APPLIED_WITHIN;
        if heard(live, expect_ms, effect.min(deadline)).await.is_err() {
            return Err(not_applied(sent, &accepted));
        }
        sent.say = Some(accepted);
    }
    let hangup = pb::command::Kind::Hangup(pb::HangupCommand {
        reason: format!("scale test {n}"),
    });
    let accepted = send_command(
        clients,
        (first + 1) % 2,
        call_id,
        hangup,
        deadline,
        &mut sent.log,
    )
    .await?;
    let effect = (Instant::now() + APPLIED_WITHIN).min(deadline);
    while !ended.load(Ordering::SeqCst) && Instant::now() < effect {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if !ended.load(Ordering::SeqCst) {
        return Err(not_applied(sent, &accepted));
    }
    sent.hangup = Some(accepted);
    Ok(())
}

/// An accepted command that had no effect in time (control once dropped a command that
/// landed while the call's stream re-attached; see
/// `a_command_accepted_while_a_stream_reattaches_reaches_it`): logged, and the run fails.
fn not_applied(sent: &mut Sent, accepted: &(String, usize)) -> String {
    sent.log.push(format!(
        "command {} accepted by replica {} but not applied within {APPLIED_WITHIN:?}",
        accepted.0, accepted.1
    ));
    "an accepted command was lost".to_owned()
}

/// What a watcher saw: the events, and how often it had to resume.
type Watched = (Vec<pb::CallEvent>, u32);

/// Every event of a call through one replica with `WatchCall`, resuming from the last seq
/// seen whenever the stream breaks (the replica died), until `ended`.
async fn watch(client: CallsClient, call_id: String, deadline: Instant) -> Result<Watched, String> {
    let mut events: Vec<pb::CallEvent> = Vec::new();
    let mut resumes = 0u32;
    loop {
        let after_seq = events.last().map_or(0, |e| e.seq);
        let mut c = client.clone();
        let opened = tokio::time::timeout(
            RPC,
            c.watch_call(pb::WatchCallRequest {
                call_id: call_id.clone(),
                after_seq,
            }),
        )
        .await;
        if let Ok(Ok(stream)) = opened {
            let mut stream = stream.into_inner();
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                match tokio::time::timeout(left, stream.message()).await {
                    Ok(Ok(Some(event))) => {
                        let ended = matches!(event.kind, Some(pb::call_event::Kind::Ended(_)));
                        events.push(event);
                        if ended {
                            return Ok((events, resumes));
                        }
                    }
                    Ok(Ok(None)) | Ok(Err(_)) => break,
                    Err(_) => {
                        return Err(format!(
                            "watch of {call_id} timed out after {} events",
                            events.len()
                        ));
                    }
                }
            }
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "watch of {call_id} gave up after {} events",
                events.len()
            ));
        }
        resumes += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Reads every stored event of a call (`WatchCall{after_seq: 0}` closes after `ended`).
async fn stored_events(client: &CallsClient, call_id: &str) -> Vec<pb::CallEvent> {
    let deadline = Instant::now() + RPC;
    let (events, resumes) = watch(client.clone(), call_id.to_owned(), deadline)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(resumes, 0, "{call_id}: stored events read in one stream");
    events
}

/// The relay's `callbridge_relay_control_reconnects_total`, from its metrics listener.
async fn relay_reconnects(addr: SocketAddr) -> u64 {
    let resp = callbridge_testkit::http::request(
        addr,
        "GET",
        &addr.to_string(),
        "/metrics",
        &[],
        None,
        Duration::from_secs(5),
    )
    .await
    .expect("relay metrics");
    resp.body
        .lines()
        .find_map(|l| l.strip_prefix("callbridge_relay_control_reconnects_total "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

struct Running {
    n: usize,
    kind: Kind,
    call_id: String,
    script: Conversation,
    live: Arc<LiveStats>,
    caller: JoinHandle<Result<CallReport, String>>,
    commands: Option<JoinHandle<Sent>>,
    /// Watchers through replica A and replica B.
    watchers: Vec<JoinHandle<Result<Watched, String>>>,
}

fn kind_name(e: &pb::CallEvent) -> &'static str {
    use pb::call_event::Kind as K;
    match &e.kind {
        Some(K::Started(_)) => "started",
        Some(K::Caller(_)) => "caller",
        Some(K::Assistant(_)) => "assistant",
        Some(K::Interruption(_)) => "interruption",
        Some(K::Dtmf(_)) => "dtmf",
        Some(K::ToolCall(_)) => "tool_call",
        Some(K::ToolResult(_)) => "tool_result",
        Some(K::Usage(_)) => "usage",
        Some(K::ModelError(_)) => "model_error",
        Some(K::CommandApplied(_)) => "command_applied",
        Some(K::Ended(_)) => "ended",
        Some(K::ResponseEnded(_)) => "response_ended",
        Some(K::TranscriptionFailed(_)) => "transcription_failed",
        Some(K::AnsweringMachine(_)) => "answering_machine",
        None => "none",
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_survive_scale_out_and_a_control_replica_kill() {
    with_timeout(RUN_LIMIT, "the scale-out run", run()).await;
}

async fn run() {
    let t0 = Instant::now();
    let (cluster, ids) = with_timeout(
        Duration::from_secs(40),
        "redis cluster",
        tokio::task::spawn_blocking(|| {
            let cluster = RedisCluster::start(3).expect("a 3-master redis cluster");
            // Each replica's command channel on a different node, so commands cross
            // nodes whichever replica they go through.
            let ports = cluster.ports();
            let ids = [("scale-a", 1), ("scale-b", 2), ("scale-a-again", 0)]
                .map(|(prefix, node)| control_id_on(&cluster, ports[node], prefix));
            (cluster, ids)
        }),
    )
    .await
    .expect("cluster task");
    let seeds = cluster.seeds();

    // Two control replicas on the same cluster.
    let addr_a = free_addr().expect("a free port");
    let addr_b = free_addr().expect("a free port");
    let spawn_control = |addr, id: &str| {
        Proc::spawn("callbridge-control", control_env(addr, &seeds, id), addr)
            .expect("control spawns")
    };
    let mut control_a = spawn_control(addr_a, &ids[0]);
    let mut control_b = spawn_control(addr_b, &ids[1]);
    for c in [&mut control_a, &mut control_b] {
        c.wait_grpc_serving(READY)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }

    // The fake model knows every call's script by its agent's marker.
    let mut fake = FakeRealtime::builder().speed(SPEED);
    for n in 0..CALLS {
        fake = fake.script_for(marker(n), script(n));
    }
    let fake = fake.start().await.expect("fake realtime starts");

    // Relays 0 and 2 attach through A, relay 1 through B.
    let mut relays = Vec::new();
    let mut relay_metrics = Vec::new();
    for (i, control) in [addr_a, addr_b, addr_a].into_iter().enumerate() {
        let addr = free_addr().expect("a free port");
        let metrics = free_addr().expect("a free port");
        relay_metrics.push(metrics);
        let env = relay_env(
            addr,
            metrics,
            control,
            &fake.url(),
            &format!("relay-scale-{i}"),
        );
        let mut relay = Proc::spawn("callbridge-relay", env, addr).expect("relay spawns");
        relay
            .wait_http_ok("/healthz", READY)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        relays.push(relay);
    }
    let relay_addrs: Vec<SocketAddr> = relays.iter().map(|r| r.addr).collect();
    let balancer = LoadBalancer::new(relay_addrs.clone());

    let channels = [connect(addr_a).await, connect(addr_b).await];
    let clients = [calls_client(&channels[0]), calls_client(&channels[1])];
    // Watch streams get their own connections so they do not crowd the RPCs' one.
    let watch_channels = [connect(addr_a).await, connect(addr_b).await];
    let watch_clients = [
        calls_client(&watch_channels[0]),
        calls_client(&watch_channels[1]),
    ];

    // One agent per call (its marker picks the fake's script) and the call pre-created,
    // alternately through either replica.
    let mut planned = Vec::with_capacity(CALLS);
    for n in 0..CALLS {
        let channel = &channels[n % 2];
        let script = script(n);
        let greeting = script.greeting.as_ref().map(|g| g.text.clone());
        let agent = with_timeout(
            RPC,
            "CreateAgent",
            agents_client(channel).create_agent(pb::CreateAgentRequest {
                agent_id: format!("scale-agent-{n}"),
                settings: Some(agent_settings(&marker(n), greeting.as_deref())),
            }),
        )
        .await
        .expect("CreateAgent succeeds")
        .into_inner();
        let created = with_timeout(
            RPC,
            "CreateCall",
            calls_client(channel).create_call(pb::CreateCallRequest {
                agent_id: agent.agent_id,
                direction: pb::Direction::Outbound as i32,
                from: "+14155550100".to_owned(),
                to: format!("+1415556{n:04}"),
                ..Default::default()
            }),
        )
        .await
        .expect("CreateCall succeeds")
        .into_inner();
        planned.push((n, created.call.expect("a call").call_id, script));
    }
    let setup = t0.elapsed();

    // The ramp. Control A dies at KILL_AT, once every call started so far is attached.
    let ramp_start = Instant::now();
    let mut paused = Duration::ZERO;
    let mut outage = Duration::ZERO;
    let mut running: Vec<Running> = Vec::with_capacity(CALLS);
    let mut peak_live = 0usize;
    for (n, call_id, script) in planned {
        if n == KILL_AT {
            let pause_start = Instant::now();
            let all_streaming = callbridge_testkit::eventually(Duration::from_secs(30), || {
                running
                    .iter()
                    .all(|r| r.live.streaming.load(Ordering::SeqCst) == 1 || r.caller.is_finished())
            })
            .await;
            assert!(all_streaming, "calls before the kill did not all start");
            let live_at_kill = running.iter().filter(|r| !r.caller.is_finished()).count();
            let killed_at = Instant::now();
            control_a.kill();
            tokio::time::sleep(OUTAGE).await;
            // A new replica (new id) on the freed port: the relays' one CONTROL_URL.
            control_a = spawn_control(addr_a, &ids[2]);
            control_a
                .wait_grpc_serving(READY)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            outage = killed_at.elapsed();
            paused = pause_start.elapsed();
            println!(
                "control A killed with {live_at_kill} calls live; serving again after {outage:?}"
            );
        }
        let due = ramp_start + paused + Duration::from_secs_f64(n as f64 / RAMP_PER_SEC);
        tokio::time::sleep_until(due).await;
        let live_now = running
            .iter()
            .filter(|r| r.live.streaming.load(Ordering::Relaxed) == 1 && !r.caller.is_finished())
            .count();
        peak_live = peak_live.max(live_now);

        let kind = kind_of(n);
        let mut cfg = CallerConfig::new(PUBLIC_URL, relay_addrs[0], Some(TWILIO_TOKEN));
        cfg.relays = balancer.clone();
        cfg.call_id = Some(call_id.clone());
        cfg.script = script.clone();
        cfg.tone_hz = 300.0 + (n % 7) as f64 * 50.0;
        cfg.gap_ms = 150;
        cfg.tail_ms = 200;
        cfg.playback_speed = SPEED;
        cfg.answer_wait = Duration::from_secs(20);
        cfg.max_call = CALL_LIMIT;
        // Calls the application hangs up keep streaming silence until the relay ends them.
        cfg.hang_up_at_end = kind == Kind::Plain;
        let handle = SimCaller::new(cfg).start();
        let live = handle.live.clone();
        let ended = Arc::new(AtomicBool::new(false));
        let caller_ended = ended.clone();
        let caller = tokio::spawn(async move {
            let r = match tokio::time::timeout(CALL_LIMIT, handle.join()).await {
                Ok(r) => r.map_err(|e| format!("caller failed: {e}")),
                Err(_) => Err("caller timed out".to_owned()),
            };
            caller_ended.store(true, Ordering::SeqCst);
            r
        });
        let commands = (kind != Kind::Plain).then(|| {
            tokio::spawn(drive_commands(Driver {
                n,
                kind,
                call_id: call_id.clone(),
                live: live.clone(),
                ended: ended.clone(),
                clients: clients.clone(),
                script_ms: script_audio_ms(&script),
            }))
        });
        let watchers = if watched(n) {
            watch_clients
                .iter()
                .map(|c| {
                    tokio::spawn(watch(
                        c.clone(),
                        call_id.clone(),
                        Instant::now() + CALL_LIMIT,
                    ))
                })
                .collect()
        } else {
            Vec::new()
        };
        running.push(Running {
            n,
            kind,
            call_id,
            script,
            live,
            caller,
            commands,
            watchers,
        });
    }
    let ramp = ramp_start.elapsed() - paused;

    // Collect what every caller, command driver and watcher saw.
    struct Done {
        n: usize,
        kind: Kind,
        call_id: String,
        script: Conversation,
        report: CallReport,
        sent: Sent,
        watched: Vec<Watched>,
    }
    let mut done = Vec::with_capacity(CALLS);
    for r in running {
        let sent = match r.commands {
            Some(h) => with_timeout(CALL_LIMIT, "commands", h)
                .await
                .expect("command task"),
            None => Sent::default(),
        };
        let report = with_timeout(CALL_LIMIT, "a caller", r.caller)
            .await
            .expect("caller task")
            .unwrap_or_else(|e| {
                panic!(
                    "call {} ({}): {e}; commands: {:?}",
                    r.n, r.call_id, sent.log
                )
            });
        assert!(
            sent.hangup.is_some() || r.kind == Kind::Plain,
            "call {}: {:?}",
            r.n,
            sent.log
        );
        let mut watched = Vec::new();
        for w in r.watchers {
            watched.push(
                with_timeout(CALL_LIMIT, "a watcher", w)
                    .await
                    .expect("watch task")
                    .unwrap_or_else(|e| panic!("call {}: {e}", r.n)),
            );
        }
        done.push(Done {
            n: r.n,
            kind: r.kind,
            call_id: r.call_id,
            script: r.script,
            report,
            sent,
            watched,
        });
    }
    let calls_done = t0.elapsed();

    // Check every call against what its caller said and heard.
    let mut events_stored = 0u64;
    let mut by_relay: BTreeMap<String, usize> = BTreeMap::new();
    let mut watch_resumes = 0u32;
    let mut cross_watched = 0usize;
    let mut commands_via = [0usize; 2];
    let mut closed_abruptly = 0usize;
    let mut after_answers: BTreeMap<String, usize> = BTreeMap::new();
    for d in &done {
        let n = d.n;
        let leg = d.report.leg().unwrap_or_else(|| {
            panic!(
                "call {n}: no stream; webhook answered {} {}",
                d.report.webhook.response.status, d.report.webhook.response.body
            )
        });
        assert_eq!(leg.refused_status, None, "call {n}: {:?}", leg.closed_by);
        assert!(
            leg.protocol_errors.is_empty(),
            "call {n}: {:?}",
            leg.protocol_errors
        );
        assert!(
            leg.answer_timeouts.is_empty(),
            "call {n}: {:?}",
            leg.answer_timeouts
        );
        assert_eq!(
            leg.turns_spoken,
            (0..d.script.turns.len()).collect::<Vec<_>>(),
            "call {n}"
        );
        let mut expected = expected_transcript(&d.script);
        let mut heard_ms = script_audio_ms(&d.script);
        if d.kind == Kind::SayThenHangup {
            expected.push(("assistant".to_owned(), say_text(n)));
            heard_ms += SAY_AUDIO_MS;
        }
        // Exactly its own agent's audio, every byte, once.
        assert_eq!(leg.media_bytes_received, heard_ms * 8, "call {n}");
        match d.kind {
            Kind::Plain => assert_eq!(leg.closed_by, ClosedBy::Caller, "call {n}"),
            Kind::Hangup | Kind::SayThenHangup => {
                // The relay ended the stream. A caller still streaming silence may hit the
                // closed socket (EPIPE / reset) before it reads the close frame.
                match &leg.closed_by {
                    ClosedBy::Relay { .. } => {}
                    ClosedBy::Error(e) => {
                        assert!(
                            e.contains("Broken pipe") || e.contains("reset"),
                            "call {n}: {e}"
                        );
                        closed_abruptly += 1;
                    }
                    ClosedBy::Caller => panic!("call {n}: the caller hung up"),
                }
                let answer = match (d.report.after.last(), d.report.last_after()) {
                    (_, Some(t)) if t.hangup && t.says.is_empty() => "hangup".to_owned(),
                    (_, Some(t)) if !t.says.is_empty() => "fallback say".to_owned(),
                    (_, Some(_)) => "other twiml".to_owned(),
                    (Some(a), None) => format!("HTTP {}", a.response.status),
                    (None, None) => "no request".to_owned(),
                };
                *after_answers.entry(answer).or_default() += 1;
            }
        }

        let reader = &clients[n % 2];
        let call = wait_call_final(reader, &d.call_id, Duration::from_secs(20)).await;
        let (status, reason) = match d.kind {
            Kind::Plain => (pb::CallStatus::Completed, pb::EndReason::CallerHangup),
            _ => (pb::CallStatus::Completed, pb::EndReason::AppHangup),
        };
        assert_eq!(call.status, status as i32, "call {n}: {call:?}");
        assert_eq!(call.end_reason, reason as i32, "call {n}: {call:?}");
        assert_eq!(call.stream_sid, leg.stream_sid, "call {n}");

        // Stored events: seqs exactly 1..=last, started first, ended last, once each.
        let events = stored_events(reader, &d.call_id).await;
        let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
        let want: Vec<u64> = (1..=events.len() as u64).collect();
        assert_eq!(seqs, want, "call {n}: no gap, no duplicate");
        assert_eq!(call.last_seq, events.len() as u64, "call {n}");
        events_stored += events.len() as u64;
        let kinds: Vec<&str> = events.iter().map(kind_name).collect();
        assert_eq!(kinds.first(), Some(&"started"), "call {n}: {kinds:?}");
        assert_eq!(kinds.last(), Some(&"ended"), "call {n}: {kinds:?}");
        assert_eq!(
            kinds.iter().filter(|k| **k == "started").count(),
            1,
            "call {n}"
        );
        assert_eq!(
            kinds.iter().filter(|k| **k == "ended").count(),
            1,
            "call {n}"
        );
        if let Some(pb::call_event::Kind::Started(s)) = &events[0].kind {
            assert_eq!(s.stream_sid, leg.stream_sid, "call {n}");
            *by_relay.entry(s.relay_id.clone()).or_default() += 1;
        }
        // The scripted turns, in order, exactly as said and answered.
        let spoken: Vec<(String, String)> = events
            .iter()
            .filter_map(|e| match &e.kind {
                Some(pb::call_event::Kind::Caller(c)) => {
                    Some(("caller".to_owned(), c.text.clone()))
                }
                Some(pb::call_event::Kind::Assistant(a)) => {
                    Some(("assistant".to_owned(), a.text.clone()))
                }
                _ => None,
            })
            .collect();
        assert_eq!(spoken, expected, "call {n}: stored events");
        let transcript = with_timeout(
            RPC,
            "GetTranscript",
            reader.clone().get_transcript(pb::GetTranscriptRequest {
                call_id: d.call_id.clone(),
            }),
        )
        .await
        .expect("GetTranscript succeeds")
        .into_inner();
        assert_eq!(flatten(&transcript), expected, "call {n}: transcript");

        // Commands took effect, once each, before the end.
        let applied: Vec<(usize, String)> = events
            .iter()
            .enumerate()
            .filter_map(|(i, e)| match &e.kind {
                Some(pb::call_event::Kind::CommandApplied(c)) => Some((i, c.command_id.clone())),
                _ => None,
            })
            .collect();
        let mut sent_ids = Vec::new();
        for (id, via) in [&d.sent.say, &d.sent.hangup].into_iter().flatten() {
            sent_ids.push(id.clone());
            commands_via[*via] += 1;
        }
        let applied_ids: Vec<String> = applied.iter().map(|(_, id)| id.clone()).collect();
        assert_eq!(applied_ids, sent_ids, "call {n}: commands applied in order");
        if let Some((say_id, _)) = &d.sent.say {
            // The say's answer comes after it was applied.
            let at = applied.iter().find(|(_, id)| id == say_id).map(|(i, _)| *i);
            let answer = events.iter().position(|e| {
                matches!(&e.kind, Some(pb::call_event::Kind::Assistant(a)) if a.text == say_text(n))
            });
            assert!(
                at < answer,
                "call {n}: say applied at {at:?}, answered at {answer:?}"
            );
        }

        // Live watchers through both replicas saw exactly the stored events.
        for (i, (seen, resumes)) in d.watched.iter().enumerate() {
            assert_eq!(seen, &events, "call {n}: watcher through replica {i}");
            watch_resumes += resumes;
        }
        if !d.watched.is_empty() {
            cross_watched += 1;
        }
    }
    assert_eq!(done.len(), CALLS);
    // One model session per call: nothing started twice; each heard its own caller.
    assert_eq!(fake.connections_accepted(), CALLS as u64);
    let mut sessions_seen = vec![0u32; CALLS];
    for session in fake.connections() {
        let instructions = session
            .session_updates
            .first()
            .and_then(|u| u["instructions"].as_str().map(str::to_owned))
            .unwrap_or_default();
        let n = (0..CALLS)
            .find(|n| instructions.contains(&marker(*n)))
            .unwrap_or_else(|| panic!("a session of no known call: {instructions}"));
        sessions_seen[n] += 1;
        let said: Vec<String> = script(n)
            .turns
            .iter()
            .map(|t| t.caller.text.clone())
            .collect();
        assert_eq!(
            session.caller_transcripts, said,
            "call {n}: what the model heard"
        );
    }
    assert!(sessions_seen.iter().all(|s| *s == 1), "{sessions_seen:?}");
    // The kill really hit live attach streams: relays on A reconnected, the one on B did not
    // need to.
    let reconnects = [
        relay_reconnects(relay_metrics[0]).await,
        relay_reconnects(relay_metrics[1]).await,
        relay_reconnects(relay_metrics[2]).await,
    ];
    assert!(
        reconnects[0] + reconnects[2] > 0,
        "relays on control A reconnected: {reconnects:?}"
    );
    assert_eq!(reconnects[1], 0, "relay on control B kept its streams");
    // Every relay carried calls.
    assert_eq!(by_relay.len(), 3, "{by_relay:?}");

    println!("scale-out figures (2-core shared box, debug build):");
    println!("  calls: {CALLS}, ramp {RAMP_PER_SEC}/s, stream relays {by_relay:?}");
    println!(
        "  calls/s admitted: {:.1} ({CALLS} over {ramp:?}, excluding the {paused:?} kill pause)",
        CALLS as f64 / ramp.as_secs_f64()
    );
    println!("  peak concurrent streams (seen at ramp steps): {peak_live}");
    println!("  events stored: {events_stored}");
    println!("  control A outage: {outage:?}; relay reconnect attempts {reconnects:?}");
    println!(
        "  watched calls: {cross_watched} (through both replicas), watch resumes: {watch_resumes}"
    );
    println!(
        "  commands applied, accepted via [A, B]: {commands_via:?}; after answers: {after_answers:?}"
    );
    println!("  app-hung-up streams the caller saw cut before the close frame: {closed_abruptly}");
    println!(
        "  time: setup {setup:?}, until all calls done {calls_done:?}, total {:?}",
        t0.elapsed()
    );
    drop(relays);
    drop(control_a);
    drop(control_b);
    drop(cluster);
}

type RelayClient =
    pb::relay_client::RelayClient<tonic::service::interceptor::InterceptedService<Channel, Bearer>>;

/// An agent and an outbound call created through `channel`, admitted as `twilio_call_sid`
/// by a relay client (returned, to attach with).
async fn admitted_call(
    channel: &Channel,
    marker: &str,
    to: &str,
    twilio_call_sid: &str,
) -> (String, RelayClient) {
    let agent = with_timeout(
        RPC,
        "CreateAgent",
        agents_client(channel).create_agent(pb::CreateAgentRequest {
            agent_id: String::new(),
            settings: Some(agent_settings(marker, None)),
        }),
    )
    .await
    .expect("CreateAgent")
    .into_inner();
    let call_id = with_timeout(
        RPC,
        "CreateCall",
        calls_client(channel).create_call(pb::CreateCallRequest {
            agent_id: agent.agent_id,
            direction: pb::Direction::Outbound as i32,
            to: to.to_owned(),
            ..Default::default()
        }),
    )
    .await
    .expect("CreateCall")
    .into_inner()
    .call
    .expect("a call")
    .call_id;
    let mut relay: RelayClient =
        pb::relay_client::RelayClient::with_interceptor(channel.clone(), Bearer::new(RELAY_TOKEN));
    with_timeout(
        RPC,
        "Admit",
        relay.admit(pb::AdmitRequest {
            call_id: call_id.clone(),
            twilio_call_sid: twilio_call_sid.to_owned(),
            ..Default::default()
        }),
    )
    .await
    .expect("Admit");
    (call_id, relay)
}

/// Regression test of a control bug on a multi-node Redis Cluster. One control replica,
/// one call attached by a hand-driven relay stream, one `SendCommand`: the command must be
/// accepted AND come down the attach stream, whichever node the replica's command channel
/// hashes to. Control used to subscribe on the first seed node only while `PUBLISH` was
/// routed to the channel's slot owner, which counts its own subscribers only:
/// FAILED_PRECONDITION ("the control replica holding it is gone") for a delivered command.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_command_reaches_the_holder_whatever_node_its_channel_hashes_to() {
    let (cluster, ids) = with_timeout(
        Duration::from_secs(40),
        "redis cluster",
        tokio::task::spawn_blocking(|| {
            let cluster = RedisCluster::start(3).expect("a 3-master redis cluster");
            let ports = cluster.ports();
            let ids: Vec<(u16, String)> = ports
                .iter()
                .map(|&p| (p, control_id_on(&cluster, p, "repro")))
                .collect();
            (cluster, ids)
        }),
    )
    .await
    .expect("cluster task");
    let mut outcomes = Vec::new();
    for (node, id) in &ids {
        let addr = free_addr().expect("a free port");
        let mut control = Proc::spawn(
            "callbridge-control",
            control_env(addr, &cluster.seeds(), id),
            addr,
        )
        .expect("control spawns");
        control
            .wait_grpc_serving(READY)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let channel = connect(addr).await;
        let (call_id, mut relay) =
            admitted_call(&channel, "repro", "+14155550123", &format!("CA{node:032x}")).await;
        let mut calls = calls_client(&channel);
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        tx.send(pb::AttachRequest {
            msg: Some(pb::attach_request::Msg::Open(pb::AttachOpen {
                call_id: call_id.clone(),
                relay_id: "relay-repro".to_owned(),
                reconnect: false,
                ..Default::default()
            })),
        })
        .await
        .expect("queue open");
        let mut down = with_timeout(
            RPC,
            "Attach",
            relay.attach(tokio_stream::wrappers::ReceiverStream::new(rx)),
        )
        .await
        .expect("Attach")
        .into_inner();
        tx.send(pb::AttachRequest {
            msg: Some(pb::attach_request::Msg::Event(pb::CallEvent {
                call_id: call_id.clone(),
                seq: 1,
                at_ms: 1,
                kind: Some(pb::call_event::Kind::Started(pb::Started {
                    twilio_call_sid: format!("CA{node:032x}"),
                    stream_sid: "MZrepro".to_owned(),
                    relay_id: "relay-repro".to_owned(),
                    resumed: false,
                })),
            })),
        })
        .await
        .expect("queue started");
        // Context, then the ack of `started`: the call is live.
        loop {
            let msg = with_timeout(RPC, "attach response", down.message())
                .await
                .expect("attach stream")
                .and_then(|r| r.msg);
            if matches!(msg, Some(pb::attach_response::Msg::AckedSeq(1))) {
                break;
            }
            assert!(msg.is_some(), "attach stream ended early");
        }
        let sent = with_timeout(
            RPC,
            "SendCommand",
            calls.send_command(pb::SendCommandRequest {
                call_id: call_id.clone(),
                command: Some(pb::Command {
                    command_id: "cmd-repro".to_owned(),
                    kind: Some(pb::command::Kind::Say(pb::SayCommand {
                        text: "hello".to_owned(),
                    })),
                }),
            }),
        )
        .await
        .map(|_| ())
        .map_err(|s| format!("{:?}: {}", s.code(), s.message()));
        let arrived = tokio::time::timeout(Duration::from_secs(2), down.message())
            .await
            .ok()
            .and_then(Result::ok)
            .flatten()
            .and_then(|r| r.msg);
        let delivered = matches!(
            arrived,
            Some(pb::attach_response::Msg::Command(ref c)) if c.command_id == "cmd-repro"
        );
        println!(
            "replica {id} (command channel on node {node}): SendCommand {sent:?}, delivered: \
             {delivered}"
        );
        outcomes.push((*node, sent, delivered));
        drop(tx);
    }
    for (node, sent, delivered) in &outcomes {
        assert!(delivered, "channel on node {node}: command not delivered");
        assert_eq!(sent, &Ok(()), "channel on node {node}: {outcomes:?}");
    }
}

/// Opens a relay-side attach stream by hand: sends `open`, returns the sender and the
/// response stream (the context is the first response).
async fn hand_attach(
    relay: &mut RelayClient,
    call_id: &str,
    reconnect: bool,
) -> (
    tokio::sync::mpsc::Sender<pb::AttachRequest>,
    tonic::Streaming<pb::AttachResponse>,
) {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tx.send(pb::AttachRequest {
        msg: Some(pb::attach_request::Msg::Open(pb::AttachOpen {
            call_id: call_id.to_owned(),
            relay_id: "relay-repro".to_owned(),
            reconnect,
            ..Default::default()
        })),
    })
    .await
    .expect("queue open");
    let down = with_timeout(
        RPC,
        "Attach",
        relay.attach(tokio_stream::wrappers::ReceiverStream::new(rx)),
    )
    .await
    .expect("Attach")
    .into_inner();
    (tx, down)
}

/// The Twilio call sid of the race case's call.
const RACE_SID: &str = "CA00000000000000000000000000000ace";

/// Regression test of a control race: on attach, control used to write the lease (naming
/// itself) BEFORE it registered the stream in its local hub, with the context reads in
/// between; a `SendCommand` in that window was accepted (the lease is held, this replica's
/// subscriber exists) and dropped silently, the hub having no stream to hand it to. A
/// reconnect reads the call's history first, which widens the window. Here a call with a long
/// history re-attaches while an application keeps sending one command until accepted;
/// the accepted command must come down the new stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_accepted_while_a_stream_reattaches_reaches_it() {
    const HISTORY: u64 = 2000;
    let redis = callbridge_testkit::redis_server::RedisServer::unix().expect("redis-server");
    let addr = free_addr().expect("a free port");
    let mut env = control_env(addr, "", "repro-race");
    env.retain(|(k, _)| k != "REDIS_CLUSTER_NODES");
    env.push(("REDIS_URL".to_owned(), redis.url()));
    let mut control = Proc::spawn("callbridge-control", env, addr).expect("control spawns");
    control
        .wait_grpc_serving(READY)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let channel = connect(addr).await;
    let calls = calls_client(&channel);
    let (call_id, mut relay) = admitted_call(&channel, "race", "+14155550124", RACE_SID).await;

    // First stream: `started` and a long conversation, all acknowledged, then the relay's
    // connection drops (no `ended`): the call stays live, its lease is released.
    let (tx, mut down) = hand_attach(&mut relay, &call_id, false).await;
    let feeder_call = call_id.clone();
    let feeder = tokio::spawn(async move {
        for seq in 1..=HISTORY {
            let kind = if seq == 1 {
                pb::call_event::Kind::Started(pb::Started {
                    twilio_call_sid: RACE_SID.to_owned(),
                    stream_sid: "MZrace".to_owned(),
                    relay_id: "relay-repro".to_owned(),
                    resumed: false,
                })
            } else {
                pb::call_event::Kind::Caller(pb::CallerSpeech {
                    item_id: format!("item-{seq}"),
                    text: format!("caller line {seq}"),
                })
            };
            let event = pb::CallEvent {
                call_id: feeder_call.clone(),
                seq,
                at_ms: i64::try_from(seq).unwrap_or_default(),
                kind: Some(kind),
            };
            if tx
                .send(pb::AttachRequest {
                    msg: Some(pb::attach_request::Msg::Event(event)),
                })
                .await
                .is_err()
            {
                break;
            }
        }
        tx
    });
    loop {
        let msg = with_timeout(RPC, "acks", down.message())
            .await
            .expect("attach stream")
            .and_then(|r| r.msg);
        match msg {
            Some(pb::attach_response::Msg::AckedSeq(n)) if n == HISTORY => break,
            Some(_) => {}
            None => panic!("attach stream ended early"),
        }
    }
    let tx = with_timeout(RPC, "feeder", feeder).await.expect("feeder");
    drop(tx);
    drop(down);
    // Wait until control saw the stream go (commands are refused: no lease).
    let gone = Instant::now() + RPC;
    loop {
        let probe = pb::SendCommandRequest {
            call_id: call_id.clone(),
            command: Some(pb::Command {
                command_id: "probe".to_owned(),
                kind: Some(pb::command::Kind::Say(pb::SayCommand {
                    text: "probe".to_owned(),
                })),
            }),
        };
        let r = with_timeout(RPC, "probe", calls.clone().send_command(probe)).await;
        if matches!(&r, Err(s) if s.code() == tonic::Code::FailedPrecondition) {
            break;
        }
        assert!(
            Instant::now() < gone,
            "the first stream never went away: {r:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // The application keeps sending one command until control accepts it, while the
    // relay re-attaches.
    let sender_call = call_id.clone();
    let sender = tokio::spawn(async move {
        let deadline = Instant::now() + RPC;
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let req = pb::SendCommandRequest {
                call_id: sender_call.clone(),
                command: Some(pb::Command {
                    command_id: format!("race-{attempt}"),
                    kind: Some(pb::command::Kind::Say(pb::SayCommand {
                        text: "hello".to_owned(),
                    })),
                }),
            };
            if let Ok(Ok(resp)) = tokio::time::timeout(RPC, calls.clone().send_command(req)).await {
                return Some((resp.into_inner().command_id, attempt));
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let (_tx2, mut down2) = hand_attach(&mut relay, &call_id, true).await;
    let (accepted, attempts) = with_timeout(RPC, "sender", sender)
        .await
        .expect("sender task")
        .expect("a command accepted once the stream is back");
    let mut arrived = Vec::new();
    while let Ok(Ok(Some(resp))) =
        tokio::time::timeout(Duration::from_secs(2), down2.message()).await
    {
        if let Some(pb::attach_response::Msg::Command(c)) = resp.msg {
            arrived.push(c.command_id);
        }
    }
    println!("accepted {accepted} after {attempts} attempts; arrived: {arrived:?}");
    assert!(
        arrived.contains(&accepted),
        "command {accepted} was accepted but never reached the attach stream (arrived: \
         {arrived:?})"
    );
}

/// Regression test of a relay bug: when a call ended while its control replica was
/// unreachable, the relay waited 3 s (`ENDED_ACK_WAIT`) for the `ended` ack, then aborted
/// the call's control link with the call's other tasks, dropping every unacknowledged
/// event, `ended` included, although the link would reconnect; control then ended the
/// call RELAY_LOST once the lease lapsed. The link now outlives the call's sockets.
/// Here control is down for 4 s around the caller's hang-up; once it is back, the call
/// must be stored as the caller ended it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_of_a_call_ended_while_control_is_down_are_stored_when_it_returns() {
    use callbridge_testkit::sim_caller::CallerCommand;
    let script = script(1);
    let mut world = callbridge_tests::World::builder(
        FakeRealtime::builder().script(script.clone()).speed(SPEED),
    )
    .start()
    .await;
    let greeting = script.greeting.as_ref().map(|g| g.text.clone());
    let agent = world
        .default_agent(agent_settings("outage", greeting.as_deref()))
        .await;
    let call_id = world.create_call(&agent, "+14155550125").await;
    let mut cfg = world.caller(script.clone());
    cfg.call_id = Some(call_id.clone());
    cfg.hang_up_at_end = false;
    cfg.playback_speed = SPEED;
    let handle = SimCaller::new(cfg).start();
    let all_audio = script_audio_ms(&script) * 8;
    let live = handle.live.clone();
    let heard_all = callbridge_testkit::eventually(Duration::from_secs(30), || {
        live.media_bytes_received.load(Ordering::Relaxed) >= all_audio
    })
    .await;
    assert!(heard_all, "the caller heard the script");

    world.control.kill();
    handle.command(CallerCommand::Stop).await;
    let report = with_timeout(Duration::from_secs(20), "the call", handle.join())
        .await
        .expect("the call runs");
    assert_eq!(report.leg().expect("a stream").closed_by, ClosedBy::Caller);
    tokio::time::sleep(Duration::from_secs(4)).await;
    world.restart_control().await;

    let call = world.wait_ended(&call_id, Duration::from_secs(25)).await;
    assert_eq!(
        (call.status, call.end_reason),
        (
            pb::CallStatus::Completed as i32,
            pb::EndReason::CallerHangup as i32
        ),
        "{call:?}"
    );
    let transcript = world.transcript(&call_id).await;
    assert_eq!(flatten(&transcript), expected_transcript(&script));
}

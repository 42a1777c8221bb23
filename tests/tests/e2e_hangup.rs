//! End-to-end: the caller hangs up at the worst moments (issue 14 item 6) — while the
//! model session is being reopened, while a rollover opens the next session, with an
//! application tool call pending, in the middle of a hand-off between relays, and while
//! the relay drains. Each time: every model socket the relay opened (or was still
//! opening) is closed, control stores exactly one final `ended` (the caller's hang-up),
//! and nothing leaks: the relay's live calls, waiting events and runtime tasks go back to
//! where they were before the call (`/metrics`).
//!
//! Real relays, control and redis-server on loopback; the model is the fake, reached
//! through [`Gate`], a TCP front that can hold a dial in flight (accepted, never
//! answered) so the hang-up lands while the relay waits for it; Twilio is the simulated
//! caller.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use callbridge_proto::pb;
use callbridge_testkit::conversation::{AgentReply, Conversation, Turn};
use callbridge_testkit::eventually;
use callbridge_testkit::fake_realtime::FakeRealtime;
use callbridge_testkit::sim_caller::{CallerCommand, CallerHandle, LoadBalancer, SimCaller};
use callbridge_tests::{RPC, World, agent_settings, sample, with_timeout};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};

const LIMIT: Duration = Duration::from_secs(30);
/// Long enough that a held dial is only ever closed by the relay giving it up, never by
/// its own connect timeout within a test.
const CONNECT_TIMEOUT_MS: &str = "60000";

/// A TCP front for the fake model. The first `pass` connections go through to it; the
/// ones after are held: accepted and never answered, like a dial still in flight. Counts
/// how many were held and how many of those the relay closed.
struct Gate {
    addr: SocketAddr,
    target: Arc<OnceLock<SocketAddr>>,
    held: Arc<AtomicUsize>,
    held_closed: Arc<AtomicUsize>,
}

impl Gate {
    async fn start(pass: usize) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let target: Arc<OnceLock<SocketAddr>> = Arc::default();
        let held = Arc::new(AtomicUsize::new(0));
        let held_closed = Arc::new(AtomicUsize::new(0));
        let (t, h, c) = (target.clone(), held.clone(), held_closed.clone());
        tokio::spawn(async move {
            let mut passed = 0;
            while let Ok((mut inbound, _)) = listener.accept().await {
                if passed < pass {
                    passed += 1;
                    let to = *t.get().expect("the gate's target is set before any dial");
                    tokio::spawn(async move {
                        if let Ok(mut outbound) = TcpStream::connect(to).await {
                            let _ =
                                tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        }
                    });
                } else {
                    h.fetch_add(1, Ordering::SeqCst);
                    let c = c.clone();
                    tokio::spawn(async move {
                        // The relay's handshake request arrives and is never answered; the
                        // read ends when the relay closes the socket.
                        let mut buf = [0u8; 4096];
                        while matches!(inbound.read(&mut buf).await, Ok(n) if n > 0) {}
                        c.fetch_add(1, Ordering::SeqCst);
                    });
                }
            }
        });
        Self {
            addr,
            target,
            held,
            held_closed,
        }
    }

    fn url(&self) -> String {
        format!("ws://{}/v1/realtime", self.addr)
    }

    fn held(&self) -> usize {
        self.held.load(Ordering::SeqCst)
    }

    fn held_closed(&self) -> usize {
        self.held_closed.load(Ordering::SeqCst)
    }
}

/// A world whose relays dial the model through `gate`.
async fn world_behind(gate: &Gate, builder: callbridge_tests::WorldBuilder) -> World {
    let world = builder
        .relay_env("OPENAI_REALTIME_URL", &gate.url())
        .relay_env("RELAY_UPSTREAM_CONNECT_TIMEOUT_MS", CONNECT_TIMEOUT_MS)
        .start()
        .await;
    gate.target
        .set(world.fake.addr())
        .expect("the gate's target is set once");
    world
}

fn lines(n: usize, answer_ms: u32) -> Vec<Turn> {
    (0..n)
        .map(|i| {
            Turn::new(
                format!("Caller line {i}"),
                300,
                AgentReply::says(format!("Agent line {i}"), answer_ms),
            )
        })
        .collect()
}

/// The relay's tasks, live calls and waiting events after one whole call: the level a
/// relay with no call comes back to (the first call also opens its pooled connections,
/// so a level taken before it would be lower for reasons that are not leaks).
struct Idle {
    tasks: f64,
}

async fn warm_up(world: &World, relay: usize) -> Idle {
    let script = Conversation {
        greeting: Some(AgentReply::says("Hi", 200)),
        turns: Vec::new(),
    };
    let mut cfg = world.caller(script);
    cfg.relays = LoadBalancer::new(vec![world.relays[relay].addr]);
    cfg.answer_wait = Duration::from_secs(5);
    let report = with_timeout(LIMIT, "warm-up call", SimCaller::new(cfg.clone()).run())
        .await
        .expect("the warm-up call runs");
    assert_eq!(report.legs.len(), 1, "warm-up call streamed");
    let call = world.call_by_sid(&cfg.call_sid).await.expect("listed");
    world.wait_ended(&call.call_id, LIMIT).await;
    let tasks = settled(world, relay).await;
    Idle { tasks }
}

/// Relay `relay`'s runtime tasks once live calls and waiting events are back to 0.
async fn settled(world: &World, relay: usize) -> f64 {
    let deadline = tokio::time::Instant::now() + LIMIT;
    loop {
        let text = world.relay_metrics_text(relay).await;
        let calls = sample(&text, "callbridge_relay_active_calls").expect("active_calls");
        let waiting = sample(&text, "callbridge_relay_event_queue_depth").expect("queue depth");
        if (calls == 0.0 && waiting == 0.0) || tokio::time::Instant::now() >= deadline {
            assert_eq!(calls, 0.0, "no live call left on relay {relay}");
            assert_eq!(waiting, 0.0, "no event left waiting on relay {relay}");
            return sample(&text, "callbridge_relay_runtime_tasks").expect("runtime_tasks");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The relay's runtime tasks come back to their idle level (a call's tasks all end).
async fn no_task_left(world: &World, relay: usize, idle: &Idle) {
    let deadline = tokio::time::Instant::now() + LIMIT;
    loop {
        let tasks = settled(world, relay).await;
        if tasks <= idle.tasks {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "relay {relay}: {tasks} runtime tasks, {} when idle",
            idle.tasks
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The call of `handle` ended once, by the caller's hang-up: control's final event is
/// its newest one and the only final `ended` (hand-offs aside).
async fn ended_once_by_the_caller(world: &World, call_sid: &str) -> Vec<pb::CallEvent> {
    let call = world.call_by_sid(call_sid).await.expect("listed");
    let call = world.wait_ended(&call.call_id, LIMIT).await;
    assert_eq!(
        call.end_reason,
        pb::EndReason::CallerHangup as i32,
        "ended by the caller: {call:?}"
    );
    let events = world.stored_events(&call.call_id).await;
    let finals: Vec<u64> = events
        .iter()
        .filter(|e| matches!(&e.kind, Some(pb::call_event::Kind::Ended(x)) if x.reason != pb::EndReason::Handoff as i32))
        .map(|e| e.seq)
        .collect();
    assert_eq!(finals.len(), 1, "one final end");
    // Nothing stored after it (the watch stops at the first final end).
    let again = world.get_call(&call.call_id).await;
    assert_eq!(
        again.last_seq, finals[0],
        "the final end is the newest event"
    );
    let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>(), "seqs");
    events
}

/// Every model socket that reached the fake is closed.
async fn model_sockets_closed(world: &World) {
    let fake = &world.fake;
    assert!(
        eventually(LIMIT, || fake.connections_open() == 0).await,
        "model sockets still open: {}",
        fake.connections_open()
    );
    assert!(world.fake.connections().iter().all(|c| c.closed));
}

async fn hang_up(handle: CallerHandle) {
    handle.command(CallerCommand::Stop).await;
    let report = with_timeout(LIMIT, "the caller's end", handle.join())
        .await
        .expect("the call runs");
    assert!(!report.legs.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hanging_up_while_the_model_session_is_being_reopened() {
    let script = Conversation {
        greeting: Some(AgentReply::says("Hello there", 400)),
        turns: lines(6, 400),
    };
    // The warm-up's session and the call's first one go through; the call's first session
    // is cut after 2.5 s, and its reconnect dial is held.
    let gate = Gate::start(2).await;
    let fake = FakeRealtime::builder()
        .script(script.clone())
        .speed(2.0)
        .close_after(Duration::from_millis(2500))
        .faults_only_on_first(2);
    let world = world_behind(&gate, World::builder(fake)).await;
    world
        .default_agent(agent_settings("hangup-reconnect", Some("Hello there")))
        .await;
    // The warm-up call is short enough to end before its session is cut.
    let idle = warm_up(&world, 0).await;

    let cfg = world.caller(script);
    let handle = SimCaller::new(cfg.clone()).start();
    assert!(
        eventually(LIMIT, || gate.held() == 1).await,
        "the relay is reopening the model session"
    );
    hang_up(handle).await;

    ended_once_by_the_caller(&world, &cfg.call_sid).await;
    assert!(
        eventually(LIMIT, || gate.held_closed() == 1).await,
        "the dial in flight was given up"
    );
    model_sockets_closed(&world).await;
    no_task_left(&world, 0, &idle).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hanging_up_while_a_rollover_opens_the_next_session() {
    let script = Conversation {
        greeting: Some(AgentReply::says("Hello there", 300)),
        turns: lines(12, 300),
    };
    let gate = Gate::start(2).await;
    let fake = FakeRealtime::builder().script(script.clone()).speed(2.0);
    let world = world_behind(
        &gate,
        World::builder(fake).relay_env("RELAY_MODEL_SESSION_SECS", "3"),
    )
    .await;
    world
        .default_agent(agent_settings("hangup-rollover", Some("Hello there")))
        .await;
    let idle = warm_up(&world, 0).await;

    let cfg = world.caller(script);
    let handle = SimCaller::new(cfg.clone()).start();
    assert!(
        eventually(LIMIT, || gate.held() == 1).await,
        "the relay is opening the next session"
    );
    hang_up(handle).await;

    ended_once_by_the_caller(&world, &cfg.call_sid).await;
    assert!(
        eventually(LIMIT, || gate.held_closed() == 1).await,
        "the rollover's dial was given up"
    );
    model_sockets_closed(&world).await;
    no_task_left(&world, 0, &idle).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hanging_up_with_a_tool_call_pending() {
    let script = Conversation {
        greeting: None,
        turns: vec![
            Turn::new(
                "Where is my order",
                400,
                AgentReply::says("Let me check", 300)
                    .then_calls("lookup_order", r#"{"order":"42"}"#)
                    .after_output(AgentReply::says("It ships tomorrow", 300)),
            ),
            Turn::new("Thanks", 300, AgentReply::says("Bye", 300)),
        ],
    };
    let gate = Gate::start(usize::MAX).await;
    let fake = FakeRealtime::builder().script(script.clone()).speed(2.0);
    let world = world_behind(&gate, World::builder(fake)).await;
    let mut settings = agent_settings("hangup-tool", None);
    settings.tools = vec![pb::Tool {
        name: "lookup_order".to_owned(),
        description: "Finds an order".to_owned(),
        parameters_json: r#"{"type":"object","properties":{"order":{"type":"string"}}}"#.to_owned(),
    }];
    world.default_agent(settings).await;
    let idle = warm_up(&world, 0).await;

    let cfg = world.caller(script);
    let handle = SimCaller::new(cfg.clone()).start();
    // The application sees the tool call and never answers it.
    let call_id = loop {
        if let Some(call) = world.call_by_sid(&cfg.call_sid).await {
            break call.call_id;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut watch = with_timeout(
        RPC,
        "WatchCall",
        world.calls().watch_call(pb::WatchCallRequest {
            call_id: call_id.clone(),
            after_seq: 0,
        }),
    )
    .await
    .expect("watch")
    .into_inner();
    let tool_call_id = loop {
        let event = with_timeout(LIMIT, "tool call event", watch.message())
            .await
            .expect("stream")
            .expect("an event before the end");
        if let Some(pb::call_event::Kind::ToolCall(c)) = event.kind {
            break c.tool_call_id;
        }
    };
    hang_up(handle).await;

    let events = ended_once_by_the_caller(&world, &cfg.call_sid).await;
    // The relay closed the pending call out for the application: an error result, once,
    // before the end.
    let results: Vec<&pb::ToolResult> = events
        .iter()
        .filter_map(|e| match &e.kind {
            Some(pb::call_event::Kind::ToolResult(r)) => Some(r),
            _ => None,
        })
        .collect();
    assert_eq!(results.len(), 1, "{results:?}");
    assert_eq!(results[0].tool_call_id, tool_call_id);
    assert!(results[0].is_error, "{:?}", results[0]);
    assert_eq!(results[0].output, r#"{"error":"the call ended"}"#);
    model_sockets_closed(&world).await;
    no_task_left(&world, 0, &idle).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hanging_up_in_the_middle_of_a_hand_off() {
    let script = Conversation {
        greeting: Some(AgentReply::says("Hello there", 300)),
        turns: lines(12, 300),
    };
    let gate = Gate::start(usize::MAX).await;
    let fake = FakeRealtime::builder().script(script.clone()).speed(2.0);
    let mut world = world_behind(
        &gate,
        World::builder(fake)
            .relays(2)
            .relay_env("RELAY_DRAIN_GRACE_SECS", "20"),
    )
    .await;
    world
        .default_agent(agent_settings("hangup-handoff", Some("Hello there")))
        .await;
    let idle = warm_up(&world, 1).await;

    // The call starts on relay 0 only; relay 1 takes over when relay 0 drains.
    let lb = LoadBalancer::new(world.relay_addrs());
    lb.set_in_rotation(world.relays[1].addr, false);
    let mut cfg = world.caller(script);
    cfg.relays = lb.clone();
    cfg.follow_streams = 4;
    let handle = SimCaller::new(cfg.clone()).start();
    let live = handle.live.clone();
    assert!(
        eventually(LIMIT, || live.turns_spoken.load(Ordering::SeqCst) >= 1).await,
        "the call is going on relay 0"
    );
    lb.set_in_rotation(world.relays[1].addr, true);
    lb.set_in_rotation(world.relays[0].addr, false);
    world.relays[0].terminate().expect("SIGTERM");
    // The hand-off: relay 0 ended its stream, Twilio got the resume, the new stream is
    // being opened on relay 1. The caller hangs up as it starts.
    assert!(
        eventually(LIMIT, || live.stream_twiml(1).is_some()).await,
        "relay 0 handed the call off"
    );
    hang_up(handle).await;

    let status = with_timeout(
        LIMIT,
        "relay 0 exit",
        world.relays[0].wait_exit(Duration::from_secs(25)),
    )
    .await
    .expect("relay 0 exits once its call is handed off");
    assert!(status.success(), "relay 0: {status}");
    let events = ended_once_by_the_caller(&world, &cfg.call_sid).await;
    assert!(
        events.iter().any(
            |e| matches!(&e.kind, Some(pb::call_event::Kind::Ended(x)) if x.reason == pb::EndReason::Handoff as i32)
        ),
        "the call was handed off before the hang-up"
    );
    model_sockets_closed(&world).await;
    no_task_left(&world, 1, &idle).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hanging_up_while_the_relay_drains() {
    // An answer that never leaves a quiet moment to hand the call off at.
    let script = Conversation {
        greeting: Some(AgentReply::says("Hello there", 300)),
        turns: vec![Turn::new(
            "Tell me everything",
            300,
            AgentReply::says("A very long story", 60_000),
        )],
    };
    let gate = Gate::start(usize::MAX).await;
    let fake = FakeRealtime::builder().script(script.clone());
    let mut world = world_behind(
        &gate,
        World::builder(fake).relay_env("RELAY_DRAIN_GRACE_SECS", "60"),
    )
    .await;
    world
        .default_agent(agent_settings("hangup-drain", Some("Hello there")))
        .await;

    let cfg = world.caller(script);
    let handle = SimCaller::new(cfg.clone()).start();
    let live = handle.live.clone();
    assert!(
        eventually(LIMIT, || live.turns_spoken.load(Ordering::SeqCst) >= 1).await,
        "the caller asked"
    );
    // The long answer is playing.
    let played = live.media_bytes_received.load(Ordering::SeqCst);
    assert!(
        eventually(LIMIT, || live.media_bytes_received.load(Ordering::SeqCst)
            > played + 8000)
        .await,
        "the answer is playing"
    );
    world.relays[0].terminate().expect("SIGTERM");
    let deadline = tokio::time::Instant::now() + LIMIT;
    while world
        .relay_metric(0, "callbridge_relay_draining")
        .await
        .ne(&1.0)
    {
        assert!(tokio::time::Instant::now() < deadline, "the relay drains");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    hang_up(handle).await;

    // The relay had nothing else to wait for: it exits long before its 60 s grace.
    let status = with_timeout(
        LIMIT,
        "relay exit",
        world.relays[0].wait_exit(Duration::from_secs(25)),
    )
    .await
    .expect("the relay exits once its last call is gone");
    assert!(status.success(), "{status}");
    ended_once_by_the_caller(&world, &cfg.call_sid).await;
    model_sockets_closed(&world).await;
}

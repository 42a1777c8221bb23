//! The Node client test: the public API used the way the company's Express app uses it.
//!
//! Runs a throwaway `redis-server`, the real `callbridge-control` binary on it, and
//! `node tests/node/client-test.mjs` (`@grpc/grpc-js` loading our `.proto` at runtime).
//! The Node script creates an agent and a call, reads the call back and opens `WatchCall`;
//! once it prints `WATCHING <call_id>`, this test plays the relay for that call (`Admit`,
//! then `Attach` with the relay token, sending `started`, then — after the Node client's
//! `SendCommand` comes down the stream — `command_applied` and `ended`), so the watcher
//! must see all three events and the stream close.
//!
//! Needs `node` and `tests/node/node_modules` (`bash scripts/checks/node-deps.sh`, which
//! `scripts/test.sh` runs first) and the control binary built next to this test
//! (`cargo build -p callbridge-control`), or `CALLBRIDGE_BIN_DIR` pointing at it
//! (found by [`callbridge_testkit::procs`]).

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use callbridge_proto::pb;
use callbridge_testkit::procs::{Proc, env, free_addr};
use callbridge_testkit::redis_server::RedisServer;
use callbridge_testkit::with_timeout;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::Command;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Status};

/// The Twilio call sid the test plays the relay for (Twilio's shape: `CA`, 32 hex digits).
const NODE_SID: &str = "CA0000000000000000000000000000c0de";
const APP_TOKEN: &str = "node-test-app-token-0123456789abcdef0";
const RELAY_TOKEN: &str = "node-test-relay-token-0123456789abcd";
const PUBLIC_URL: &str = "https://relay.node-test.example";
/// Bound on one RPC or one step of the exchange with the Node process.
const STEP: Duration = Duration::from_secs(10);
/// Bound on the whole Node script (npm-free start of node plus a handful of RPCs).
const NODE_RUN: Duration = Duration::from_secs(60);

/// Awaits `fut` for at most `limit`, failing the test with `what` on expiry (the test
/// kit's timeout helper, arguments in this file's order).
#[track_caller]
fn within<F: Future>(what: &str, limit: Duration, fut: F) -> impl Future<Output = F::Output> {
    with_timeout(limit, what.to_owned(), fut)
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits inside the workspace")
        .to_owned()
}

/// Adds `authorization: Bearer <token>` to every request of a client.
#[derive(Clone)]
struct Bearer(MetadataValue<Ascii>);

impl Bearer {
    fn new(token: &str) -> Self {
        Self(
            format!("Bearer {token}")
                .parse()
                .expect("test tokens are ASCII"),
        )
    }
}

impl Interceptor for Bearer {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

type Authed = InterceptedService<Channel, Bearer>;

/// A running control process on its own throwaway Redis; both die with this value.
struct Control {
    addr: String,
    channel: Channel,
    _proc: Proc,
    _redis: RedisServer,
}

impl Control {
    async fn start() -> Self {
        let redis = RedisServer::unix().expect("redis-server starts");
        let addr = free_addr().expect("a free loopback port");
        let redis_url = redis.url();
        let mut proc = Proc::spawn(
            "callbridge-control",
            env([
                ("CONTROL_LISTEN", &addr.to_string()),
                ("REDIS_URL", &redis_url),
                ("CONTROL_APP_TOKENS", APP_TOKEN),
                ("CONTROL_RELAY_TOKENS", RELAY_TOKEN),
                ("RELAY_PUBLIC_URL", PUBLIC_URL),
                ("CONTROL_ID", "control-node-test"),
                // The metrics listener defaults to a fixed port; parallel tests would clash.
                ("CONTROL_METRICS_LISTEN", ""),
                ("CONTROL_LOG", "info"),
            ]),
            addr,
        )
        .expect("callbridge-control starts (cargo build -p callbridge-control)");
        proc.wait_grpc_serving(Duration::from_secs(20))
            .await
            .unwrap_or_else(|e| panic!("control not serving: {e}"));
        let channel = Endpoint::from_shared(format!("http://{addr}"))
            .expect("valid endpoint")
            .connect_timeout(Duration::from_secs(1))
            .connect_lazy();
        Self {
            addr: addr.to_string(),
            channel,
            _proc: proc,
            _redis: redis,
        }
    }

    fn relay(&self) -> pb::relay_client::RelayClient<Authed> {
        pb::relay_client::RelayClient::with_interceptor(
            self.channel.clone(),
            Bearer::new(RELAY_TOKEN),
        )
    }

    fn calls(&self) -> pb::calls_client::CallsClient<Authed> {
        pb::calls_client::CallsClient::with_interceptor(
            self.channel.clone(),
            Bearer::new(APP_TOKEN),
        )
    }
}

/// Output of one run of the Node script, and what `on_watching` returned for each watch.
struct NodeRun<T> {
    status: ExitStatus,
    stdout: Vec<String>,
    stderr: String,
    watched: Vec<T>,
}

impl<T> NodeRun<T> {
    #[track_caller]
    fn assert_line(&self, line: &str) {
        assert!(
            self.stdout.iter().any(|l| l == line),
            "node did not print {line:?}\nstdout:\n{}\nstderr:\n{}",
            self.stdout.join("\n"),
            self.stderr
        );
    }
}

/// Runs `node tests/node/client-test.mjs` against `control` with `app_token`; when it
/// prints `WATCHING <id>`, runs `on_watching(id)` while the script keeps running.
async fn run_node<F, Fut, T>(control: &Control, app_token: &str, mut on_watching: F) -> NodeRun<T>
where
    F: FnMut(String) -> Fut,
    Fut: Future<Output = T>,
{
    let root = workspace_root();
    let script = root.join("tests/node/client-test.mjs");
    assert!(
        root.join("tests/node/node_modules/@grpc/grpc-js").exists(),
        "tests/node/node_modules is missing: run `bash scripts/checks/node-deps.sh`"
    );
    let mut child = Command::new("node")
        .arg(&script)
        .current_dir(&root)
        .env("CONTROL_ADDR", &control.addr)
        .env("CONTROL_APP_TOKEN", app_token)
        .env("RELAY_PUBLIC_URL", PUBLIC_URL)
        .env("WATCH_TIMEOUT_MS", "20000")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("spawning node (is Node.js >= 18 installed?): {e}"));
    let mut stderr_pipe = child.stderr.take().expect("stderr is piped");
    let stderr_task = tokio::spawn(async move {
        let mut text = String::new();
        let _ = stderr_pipe.read_to_string(&mut text).await;
        text
    });
    let mut lines = BufReader::new(child.stdout.take().expect("stdout is piped")).lines();
    let mut stdout = Vec::new();
    let mut watched = Vec::new();
    let deadline = Instant::now() + NODE_RUN;
    while let Some(line) = within(
        "a line from node",
        deadline.saturating_duration_since(Instant::now()),
        lines.next_line(),
    )
    .await
    .expect("reading node's stdout")
    {
        if let Some(call_id) = line.strip_prefix("WATCHING ") {
            watched.push(on_watching(call_id.to_owned()).await);
        }
        stdout.push(line);
    }
    let status = within("node to exit", STEP, child.wait())
        .await
        .expect("waiting for node");
    let stderr = within("node's stderr", STEP, stderr_task)
        .await
        .expect("stderr reader");
    NodeRun {
        status,
        stdout,
        stderr,
        watched,
    }
}

fn event(call_id: &str, seq: u64, kind: pb::call_event::Kind) -> pb::AttachRequest {
    let at_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis();
    pb::AttachRequest {
        msg: Some(pb::attach_request::Msg::Event(pb::CallEvent {
            call_id: call_id.to_owned(),
            seq,
            at_ms: i64::try_from(at_ms).expect("millis fit i64"),
            kind: Some(kind),
        })),
    }
}

/// Plays the relay for one call: admit it, attach, send `started`, wait for the Node
/// client's live command and report it applied, send `ended`, each event acknowledged,
/// then close the stream as the contract asks. Returns the command's id.
async fn act_as_relay(control: &Control, call_id: &str, twilio_sid: &str) -> String {
    let mut relay = control.relay();
    let admitted = within(
        "Relay.Admit",
        STEP,
        relay.admit(pb::AdmitRequest {
            call_id: call_id.to_owned(),
            twilio_call_sid: twilio_sid.to_owned(),
            from: "+14155550111".to_owned(),
            to: "+14155550122".to_owned(),
            twilio_direction: "outbound-api".to_owned(),
            account_sid: "ACnodetest".to_owned(),
        }),
    )
    .await
    .expect("Admit succeeds for a created call")
    .into_inner();
    let call = admitted.call.expect("AdmitResponse.call");
    assert_eq!(call.call_id, call_id);
    assert_eq!(call.status, pb::CallStatus::Ringing as i32);

    let (tx, rx) = mpsc::channel(8);
    tx.send(pb::AttachRequest {
        msg: Some(pb::attach_request::Msg::Open(pb::AttachOpen {
            call_id: call_id.to_owned(),
            relay_id: "relay-node-test".to_owned(),
            reconnect: false,
            ..Default::default()
        })),
    })
    .await
    .expect("attach channel open");
    let mut down = within("Relay.Attach", STEP, relay.attach(ReceiverStream::new(rx)))
        .await
        .expect("Attach accepted")
        .into_inner();
    let first = within("the call context", STEP, down.message())
        .await
        .expect("context arrives")
        .expect("stream not closed before the context");
    let Some(pb::attach_response::Msg::Context(context)) = first.msg else {
        panic!("first Attach reply must be the context, got {first:?}");
    };
    assert_eq!(context.last_seq, 0, "a fresh call has no stored events");
    assert_eq!(context.call.expect("context.call").call_id, call_id);

    let started = pb::call_event::Kind::Started(pb::Started {
        twilio_call_sid: twilio_sid.to_owned(),
        stream_sid: "MZnodetest".to_owned(),
        relay_id: "relay-node-test".to_owned(),
        resumed: false,
    });
    tx.send(event(call_id, 1, started))
        .await
        .expect("attach channel open");
    // The Node client sends its command once it sees `started`; that command and the ack
    // of `started` may come down in either order.
    let (mut acked, mut command) = (0, None);
    while acked < 1 || command.is_none() {
        let reply = within(
            "the ack of started and the app's command",
            STEP,
            down.message(),
        )
        .await
        .expect("attach stream healthy")
        .expect("stream not closed before the command");
        match reply.msg {
            Some(pb::attach_response::Msg::AckedSeq(seq)) => acked = seq,
            Some(pb::attach_response::Msg::Command(c)) => command = Some(c),
            other => panic!("unexpected Attach reply {other:?}"),
        }
    }
    assert_eq!(acked, 1, "started must be acknowledged");
    let command = command.expect("loop ends with a command");
    assert!(
        !command.command_id.is_empty(),
        "control assigns command ids"
    );
    assert_eq!(
        command.kind,
        Some(pb::command::Kind::Say(pb::SayCommand {
            text: "Please hold for a moment.".to_owned()
        })),
        "the Node client's say command arrives unchanged"
    );

    let applied = pb::call_event::Kind::CommandApplied(pb::CommandApplied {
        command_id: command.command_id.clone(),
    });
    let ended = pb::call_event::Kind::Ended(pb::Ended {
        reason: pb::EndReason::CallerHangup as i32,
        detail: "node client test".to_owned(),
        transfer_to: String::new(),
    });
    for (seq, kind) in [(2, applied), (3, ended)] {
        tx.send(event(call_id, seq, kind))
            .await
            .expect("attach channel open");
        let reply = within("an ack", STEP, down.message())
            .await
            .expect("ack arrives")
            .expect("stream not closed before the ack");
        assert_eq!(
            reply.msg,
            Some(pb::attach_response::Msg::AckedSeq(seq)),
            "event {seq} must be acknowledged"
        );
    }
    drop(tx);
    command.command_id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_client_creates_reads_and_watches_a_call() {
    let control = within(
        "control to start",
        Duration::from_secs(30),
        Control::start(),
    )
    .await;
    let run = run_node(&control, APP_TOKEN, |call_id| {
        let control = &control;
        async move {
            let command_id = act_as_relay(control, &call_id, NODE_SID).await;
            (call_id, command_id)
        }
    })
    .await;
    assert!(
        run.status.success(),
        "node client test failed ({})\nstdout:\n{}\nstderr:\n{}",
        run.status,
        run.stdout.join("\n"),
        run.stderr
    );
    // Shown with `--nocapture`: what the Node client did.
    println!("node client output:\n{}", run.stdout.join("\n"));
    assert_eq!(run.watched.len(), 1, "the script watches exactly one call");
    let (call_id, command_id) = &run.watched[0];
    run.assert_line("EVENT 1 started");
    run.assert_line(&format!("COMMAND {command_id}"));
    run.assert_line("EVENT 2 command_applied");
    run.assert_line("EVENT 3 ended");
    run.assert_line("PASS");

    // The call the Node app watched is the one this test drove, and its state is final.
    let call = within(
        "GetCall",
        STEP,
        control.calls().get_call(pb::GetCallRequest {
            call_id: call_id.clone(),
        }),
    )
    .await
    .expect("GetCall")
    .into_inner();
    assert_eq!(call.status, pb::CallStatus::Completed as i32);
    assert_eq!(call.last_seq, 3);
    assert_eq!(call.twilio_call_sid, NODE_SID);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_client_fails_loudly_with_a_wrong_token() {
    let control = within(
        "control to start",
        Duration::from_secs(30),
        Control::start(),
    )
    .await;
    let run = run_node(
        &control,
        "not-the-app-token",
        |call_id| async move { call_id },
    )
    .await;
    assert_eq!(run.status.code(), Some(1), "a refused client must exit 1");
    assert!(
        run.watched.is_empty(),
        "nothing may be watched without a valid token"
    );
    assert!(
        run.stdout
            .iter()
            .any(|l| l.starts_with("FAIL gRPC UNAUTHENTICATED")),
        "the failure must name the gRPC status\nstdout:\n{}",
        run.stdout.join("\n")
    );
    assert!(!run.stdout.iter().any(|l| l == "PASS"));
}

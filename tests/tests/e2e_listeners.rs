//! Listeners that hold under abuse (issue 12 item 4, issue 13 item 4), against the real
//! binaries over loopback: half-sent requests are closed within the header timeout while a
//! live call keeps every frame, the connection cap pauses accepting, `RELAY_MAX_CALLS`
//! turns the next call away with 503, `/metrics` lives on its own port (over TLS when a
//! certificate is set), control caps watch streams per token without cutting streams at the
//! unary deadline, reflection is off unless asked for, and every new bad setting exits 64
//! naming its variable.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use callbridge_proto::pb;
use callbridge_testkit::conversation::{AgentReply, Conversation, Turn};
use callbridge_testkit::fake_realtime::FakeRealtime;
use callbridge_testkit::pki::{TestCa, Usage};
use callbridge_testkit::procs::{bin_dir, free_addr};
use callbridge_testkit::sim_caller::{CallReport, ClosedBy, SimCaller};
use callbridge_tests::{World, agent_settings, expected_transcript, flatten, with_timeout};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const CALL: Duration = Duration::from_secs(90);
const WAIT: Duration = Duration::from_secs(30);
/// Half-open connections thrown at a listener.
const HALF_OPEN: usize = 500;

fn script(turns: usize) -> Conversation {
    Conversation {
        greeting: Some(AgentReply::says("Hello, listener test", 400)),
        turns: (0..turns)
            .map(|n| {
                Turn::new(
                    format!("Question number {n}"),
                    700,
                    AgentReply::says(format!("Answer number {n}"), 700),
                )
            })
            .collect(),
    }
}

/// `GET path` on `addr`, one request per connection.
async fn get(addr: SocketAddr, path: &str) -> callbridge_testkit::http::HttpResponse {
    callbridge_testkit::http::request(
        addr,
        "GET",
        &addr.to_string(),
        path,
        &[],
        None,
        Duration::from_secs(10),
    )
    .await
    .unwrap_or_else(|e| panic!("GET {path} on {addr}: {e}"))
}

/// The value of the sample `series` (name with labels, exactly as exposed) in `text`.
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {series} in\n{text}"))
}

/// Opens `n` connections that each send part of a request head and then nothing.
async fn half_open(addr: SocketAddr, n: usize) -> Vec<TcpStream> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let mut sock = TcpStream::connect(addr).await.expect("connect");
        // Every other one stops inside the request line, the rest inside the headers.
        let part: &[u8] = if i % 2 == 0 {
            b"POST /api/twilio/vo"
        } else {
            b"POST /api/twilio/voice HTTP/1.1\r\nHost: relay\r\nContent-Le"
        };
        sock.write_all(part).await.expect("write");
        out.push(sock);
    }
    out
}

/// Waits (bounded) for the server to close every socket; returns how many it closed.
async fn closed_by_server(socks: Vec<TcpStream>) -> usize {
    let mut tasks = tokio::task::JoinSet::new();
    for mut sock in socks {
        tasks.spawn(async move {
            let mut sink = Vec::new();
            // EOF or a reset: closed. Still open after the bound: not closed.
            tokio::time::timeout(WAIT, sock.read_to_end(&mut sink))
                .await
                .is_ok()
        });
    }
    let mut closed = 0;
    while let Some(done) = tasks.join_next().await {
        if done.expect("reader task") {
            closed += 1;
        }
    }
    closed
}

/// Asserts the call went through untouched: both sides heard everything, no frame lost.
async fn assert_call_intact(world: &World, report: &CallReport, script: &Conversation) {
    let leg = report.leg().expect("a stream leg");
    assert!(leg.protocol_errors.is_empty(), "{:?}", leg.protocol_errors);
    assert_eq!(leg.closed_by, ClosedBy::Caller, "the caller hung up");
    assert_eq!(
        leg.turns_spoken.len(),
        script.turns.len(),
        "every turn spoken"
    );
    assert!(leg.answer_timeouts.is_empty(), "{:?}", leg.answer_timeouts);
    let metrics = get(world.relay_metrics[0], "/metrics").await.body;
    assert_eq!(
        sample(
            &metrics,
            "callbridge_relay_frames_dropped_total{direction=\"caller_to_model\"}"
        ),
        0.0
    );
    assert_eq!(
        sample(
            &metrics,
            "callbridge_relay_frames_dropped_total{direction=\"model_to_caller\"}"
        ),
        0.0
    );
    let model = world.fake.connection(0).expect("the model session");
    assert_eq!(
        model.appends, leg.frames_sent,
        "every frame the caller sent reached the model"
    );
    let call = report
        .webhook
        .twiml
        .as_ref()
        .and_then(|t| t.parameters.iter().find(|(k, _)| k == "callId"))
        .map(|(_, v)| v.clone());
    if let Some(call_id) = call {
        world.wait_ended(&call_id, Duration::from_secs(10)).await;
        assert_eq!(
            flatten(&world.transcript(&call_id).await),
            expected_transcript(script)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_open_connections_are_closed_while_a_live_call_keeps_every_frame() {
    let script = script(4);
    let world = World::builder(FakeRealtime::builder().script(script.clone()))
        .relay_env("RELAY_HEADER_TIMEOUT_MS", "500")
        .start()
        .await;
    world
        .default_agent(agent_settings("slowloris", Some("Hello, listener test")))
        .await;
    let caller = SimCaller::new(world.caller(script.clone())).start();
    let live = caller.live.clone();
    assert!(
        callbridge_testkit::eventually(WAIT, || live.streaming.load(Ordering::SeqCst) == 1).await,
        "the call streams"
    );
    let socks = half_open(world.relays[0].addr, HALF_OPEN).await;
    assert_eq!(
        closed_by_server(socks).await,
        HALF_OPEN,
        "every half-open connection closed by the relay"
    );
    assert_eq!(
        live.streaming.load(Ordering::SeqCst),
        1,
        "the call is still up"
    );
    let report = with_timeout(CALL, "the call", caller.join())
        .await
        .expect("the call runs");
    assert_call_intact(&world, &report, &script).await;
    let metrics = get(world.relay_metrics[0], "/metrics").await.body;
    assert!(
        sample(&metrics, "callbridge_relay_http_header_timeouts_total") >= HALF_OPEN as f64,
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn above_the_connection_cap_the_relay_stops_accepting_and_metrics_are_apart() {
    let world = World::builder(FakeRealtime::builder())
        .relay_env("RELAY_MAX_CONNECTIONS", "4")
        .relay_env("RELAY_HEADER_TIMEOUT_MS", "60000")
        .start()
        .await;
    let relay = world.relays[0].addr;
    let metrics_addr = world.relay_metrics[0];

    // /metrics is not on the public port; it is on the metrics port.
    let public = get(relay, "/metrics").await;
    assert_eq!(public.status, 404, "{}", public.body);
    let scrape = get(metrics_addr, "/metrics").await;
    assert_eq!(scrape.status, 200);
    assert!(scrape.body.contains("callbridge_relay_active_calls"));
    assert!(sample(&scrape.body, "callbridge_relay_max_calls") >= 1.0);
    assert_eq!(
        get(metrics_addr, "/healthz").await.status,
        404,
        "metrics only"
    );

    // Four silent connections fill the cap; the fifth waits in the backlog.
    let mut holders = Vec::new();
    for _ in 0..4 {
        holders.push(TcpStream::connect(relay).await.expect("connect"));
    }
    let paused = async {
        loop {
            let text = get(metrics_addr, "/metrics").await.body;
            if sample(&text, "callbridge_relay_http_accept_paused_total") >= 1.0 {
                return text;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let text = with_timeout(WAIT, "accepting paused at the cap", paused).await;
    assert_eq!(sample(&text, "callbridge_relay_http_connections"), 4.0);
    let mut fifth = TcpStream::connect(relay)
        .await
        .expect("the backlog takes it");
    fifth
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: relay\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let text = get(metrics_addr, "/metrics").await.body;
    assert_eq!(
        sample(&text, "callbridge_relay_http_connections"),
        4.0,
        "the fifth is not accepted while four are open"
    );
    // A slot frees up: the fifth is served.
    drop(holders.pop());
    let mut answer = Vec::new();
    with_timeout(WAIT, "the fifth answered", fifth.read_to_end(&mut answer))
        .await
        .expect("read");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("ok\n"), "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn above_max_calls_the_next_webhook_and_upgrade_get_503_and_the_first_call_goes_on() {
    let script = script(3);
    let world = World::builder(FakeRealtime::builder().script(script.clone()))
        .relay_env("RELAY_MAX_CALLS", "1")
        .start()
        .await;
    let agent = world
        .default_agent(agent_settings("max-calls", Some("Hello, listener test")))
        .await;
    let first = SimCaller::new(world.caller(script.clone())).start();
    let live = first.live.clone();
    assert!(
        callbridge_testkit::eventually(WAIT, || live.streaming.load(Ordering::SeqCst) == 1).await,
        "the first call streams"
    );

    // A second inbound call: the webhook is turned away with Retry-After.
    let second = SimCaller::new(world.caller(script.clone()));
    let webhook = second.webhook().await.expect("webhook answered");
    assert_eq!(webhook.response.status, 503, "{}", webhook.response.body);
    assert_eq!(webhook.response.body, "relay is at capacity\n");
    assert_eq!(webhook.response.header("retry-after"), Some("5"));

    // A stream for a call admitted elsewhere: its upgrade is turned away too.
    let call_id = world.create_call(&agent, "+15550001111").await;
    let url = format!(
        "{}/api/twilio/media-stream/{call_id}",
        callbridge_proto::paths::ws_base(callbridge_tests::PUBLIC_URL)
    );
    let refused = second.connect_stream(&url).await.expect("an answer");
    assert_eq!(refused.err(), Some(503), "the upgrade is refused");

    let report = with_timeout(CALL, "the first call", first.join())
        .await
        .expect("the first call runs");
    assert_call_intact(&world, &report, &script).await;
    let metrics = get(world.relay_metrics[0], "/metrics").await.body;
    assert_eq!(
        sample(
            &metrics,
            "callbridge_relay_over_capacity_total{kind=\"webhook\"}"
        ),
        1.0
    );
    assert_eq!(
        sample(
            &metrics,
            "callbridge_relay_over_capacity_total{kind=\"stream\"}"
        ),
        1.0
    );
    assert_eq!(sample(&metrics, "callbridge_relay_max_calls"), 1.0);
    // The created call was never attached.
    let call = world.get_call(&call_id).await;
    assert_ne!(call.status, pb::CallStatus::InProgress as i32, "{call:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_s_metrics_listener_closes_half_open_connections_and_still_serves() {
    let metrics_addr = free_addr().expect("a free port");
    let world = World::builder(FakeRealtime::builder())
        .control_env("CONTROL_METRICS_LISTEN", &metrics_addr.to_string())
        .control_env("CONTROL_METRICS_HEADER_TIMEOUT_MS", "500")
        .start()
        .await;
    let socks = half_open(metrics_addr, HALF_OPEN).await;
    assert_eq!(closed_by_server(socks).await, HALF_OPEN);
    let scrape = get(metrics_addr, "/metrics").await;
    assert_eq!(scrape.status, 200);
    assert!(
        scrape.body.contains("callbridge_control_"),
        "{}",
        scrape.body
    );
    drop(world);
}

/// A rustls client that trusts only `ca`.
fn client_trusting(ca: &TestCa) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca.ca_file()).expect("CA") {
        roots.add(cert.expect("CA cert")).expect("root");
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

/// `GET /metrics` over TLS; the status line and body.
async fn scrape_tls(addr: SocketAddr, connector: &tokio_rustls::TlsConnector) -> String {
    let tcp = TcpStream::connect(addr).await.expect("tcp");
    let name = ServerName::try_from("127.0.0.1").expect("name");
    let mut tls = with_timeout(WAIT, "TLS handshake", connector.connect(name, tcp))
        .await
        .expect("handshake with the test CA");
    tls.write_all(b"GET /metrics HTTP/1.1\r\nHost: metrics\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut out = Vec::new();
    // rustls reports a close without close_notify as an error after the data; what was
    // read is what counts.
    let _ = with_timeout(WAIT, "the scrape", tls.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_listeners_serve_tls_with_a_certificate_from_the_test_ca() {
    let ca = TestCa::new("metrics-ca").expect("CA");
    let server = ca.issue("127.0.0.1", Usage::Server).expect("server cert");
    let cert = server.cert.to_string_lossy().into_owned();
    let key = server.key.to_string_lossy().into_owned();
    let control_metrics = free_addr().expect("a free port");
    let world = World::builder(FakeRealtime::builder())
        .control_env("CONTROL_METRICS_LISTEN", &control_metrics.to_string())
        .control_env("CONTROL_METRICS_TLS_CERT_FILE", &cert)
        .control_env("CONTROL_METRICS_TLS_KEY_FILE", &key)
        .relay_env("RELAY_METRICS_TLS_CERT_FILE", &cert)
        .relay_env("RELAY_METRICS_TLS_KEY_FILE", &key)
        .start()
        .await;
    let connector = client_trusting(&ca);
    let relay = scrape_tls(world.relay_metrics[0], &connector).await;
    assert!(relay.starts_with("HTTP/1.1 200"), "{relay}");
    assert!(relay.contains("callbridge_relay_active_calls"), "{relay}");
    let control = scrape_tls(control_metrics, &connector).await;
    assert!(control.starts_with("HTTP/1.1 200"), "{control}");
    assert!(control.contains("callbridge_control_"), "{control}");
    // Plaintext to a TLS listener gets no metrics.
    let mut plain = TcpStream::connect(world.relay_metrics[0])
        .await
        .expect("tcp");
    plain
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: metrics\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut out = Vec::new();
    let _ = with_timeout(WAIT, "plaintext answer", plain.read_to_end(&mut out)).await;
    assert!(
        !String::from_utf8_lossy(&out).contains("callbridge_relay_"),
        "no metrics in clear"
    );
    // A client that does not trust this CA does not get through the handshake.
    let other = TestCa::new("other-ca").expect("CA");
    let tcp = TcpStream::connect(control_metrics).await.expect("tcp");
    let name = ServerName::try_from("127.0.0.1").expect("name");
    assert!(
        client_trusting(&other).connect(name, tcp).await.is_err(),
        "a certificate from another CA is refused"
    );
}

/// A `WatchCall` on `call_id` as `token`; the open stream, or the refusal.
async fn watch(
    world: &World,
    token: &str,
    call_id: &str,
) -> Result<tonic::Streaming<pb::CallEvent>, tonic::Status> {
    let channel = tonic::transport::Endpoint::from_shared(world.control_url())
        .expect("url")
        .connect()
        .await
        .expect("control reachable");
    let mut client = pb::calls_client::CallsClient::with_interceptor(
        channel,
        callbridge_tests::Bearer::new(token),
    );
    with_timeout(
        WAIT,
        "WatchCall",
        client.watch_call(pb::WatchCallRequest {
            call_id: call_id.to_owned(),
            after_seq: 0,
        }),
    )
    .await
    .map(tonic::Response::into_inner)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_streams_are_capped_per_token_and_outlive_the_unary_deadline() {
    const OTHER_TOKEN: &str = "app-token-second-0123456789abcdef";
    let tokens = format!("{},{OTHER_TOKEN}", callbridge_tests::APP_TOKEN);
    let world = World::builder(FakeRealtime::builder())
        .control_env("CONTROL_APP_TOKENS", &tokens)
        .control_env("CONTROL_WATCH_STREAMS_PER_TOKEN", "2")
        .control_env("CONTROL_GRPC_UNARY_TIMEOUT_MS", "300")
        .start()
        .await;
    let agent = world.default_agent(agent_settings("watch-cap", None)).await;
    let call_id = world.create_call(&agent, "+15550002222").await;
    let app = callbridge_tests::APP_TOKEN;
    let first = watch(&world, app, &call_id).await.expect("first watch");
    let _second = watch(&world, app, &call_id).await.expect("second watch");
    let refused = watch(&world, app, &call_id).await.expect_err("third watch");
    assert_eq!(
        refused.code(),
        tonic::Code::ResourceExhausted,
        "{refused:?}"
    );
    assert!(
        refused
            .message()
            .contains("CONTROL_WATCH_STREAMS_PER_TOKEN"),
        "{refused:?}"
    );
    // Another token has places of its own.
    let _other = watch(&world, OTHER_TOKEN, &call_id)
        .await
        .expect("another token's watch");
    // Well past the unary deadline the two streams still hold their places: a deadline
    // that cut them would have freed both.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let still = watch(&world, app, &call_id)
        .await
        .expect_err("still capped");
    assert_eq!(still.code(), tonic::Code::ResourceExhausted);
    // Unary calls go on working under the short deadline.
    assert_eq!(world.get_call(&call_id).await.call_id, call_id);
    // A stream that ends frees its place.
    drop(first);
    let mut reopened = None;
    for _ in 0..100 {
        match watch(&world, app, &call_id).await {
            Ok(stream) => {
                reopened = Some(stream);
                break;
            }
            Err(status) => assert_eq!(status.code(), tonic::Code::ResourceExhausted),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(reopened.is_some(), "a closed watch frees its place");
}

/// Asks control's reflection service for its services.
async fn reflection_services(world: &World) -> Result<Vec<String>, tonic::Status> {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let channel = tonic::transport::Endpoint::from_shared(world.control_url())
        .expect("url")
        .connect()
        .await
        .expect("control reachable");
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = with_timeout(
        WAIT,
        "reflection",
        ServerReflectionClient::new(channel).server_reflection_info(tokio_stream::once(request)),
    )
    .await?
    .into_inner();
    let answer = with_timeout(WAIT, "reflection answer", stream.message())
        .await?
        .expect("an answer");
    match answer.message_response {
        Some(MessageResponse::ListServicesResponse(list)) => {
            Ok(list.service.into_iter().map(|s| s.name).collect())
        }
        other => panic!("unexpected reflection answer {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_is_off_by_default_and_on_when_asked_for() {
    let world = World::builder(FakeRealtime::builder()).start().await;
    let off = reflection_services(&world)
        .await
        .expect_err("no reflection");
    assert_eq!(off.code(), tonic::Code::Unimplemented, "{off:?}");
    drop(world);
    let world = World::builder(FakeRealtime::builder())
        .control_env("CONTROL_GRPC_REFLECTION", "true")
        .start()
        .await;
    let services = reflection_services(&world).await.expect("reflection");
    assert!(
        services.iter().any(|s| s == "callbridge.v1.Calls"),
        "{services:?}"
    );
}

/// Runs `binary` with only `env` and returns its exit code and stderr.
fn run_config(binary: &str, env: &[(&str, &str)]) -> (Option<i32>, String) {
    let out = std::process::Command::new(bin_dir().join(binary))
        .env_clear()
        .envs(env.iter().copied())
        .output()
        .expect("binary runs");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_listener_settings_exit_64_naming_the_variable() {
    let ca = TestCa::new("refusals").expect("CA");
    let pair = ca.issue("127.0.0.1", Usage::Server).expect("cert");
    let cert = pair.cert.to_string_lossy().into_owned();
    let key = pair.key.to_string_lossy().into_owned();
    let base_relay = [
        ("RELAY_PUBLIC_URL", "https://relay.example.com"),
        ("OPENAI_API_KEY", "sk-x"),
        ("RELAY_INSECURE_SKIP_SIGNATURE", "true"),
        ("RELAY_INSECURE_ALLOW_PUBLIC", "true"),
    ];
    let relay_cases: Vec<(Vec<(&str, &str)>, &str)> = vec![
        (
            vec![("RELAY_METRICS_ADDR", "metrics")],
            "RELAY_METRICS_ADDR",
        ),
        (
            vec![
                ("RELAY_LISTEN", "127.0.0.1:18080"),
                ("RELAY_METRICS_ADDR", "127.0.0.1:18080"),
            ],
            "RELAY_METRICS_ADDR",
        ),
        (
            vec![("RELAY_HEADER_TIMEOUT_MS", "0")],
            "RELAY_HEADER_TIMEOUT_MS",
        ),
        (
            vec![("RELAY_MAX_CONNECTIONS", "0")],
            "RELAY_MAX_CONNECTIONS",
        ),
        (vec![("RELAY_MAX_CALLS", "0")], "RELAY_MAX_CALLS"),
        (
            vec![("RELAY_MAX_CONNECTIONS", "10"), ("RELAY_MAX_CALLS", "11")],
            "RELAY_MAX_CALLS",
        ),
        (
            vec![("RELAY_METRICS_TLS_CERT_FILE", &cert)],
            "RELAY_METRICS_TLS_KEY_FILE",
        ),
        (
            vec![("RELAY_METRICS_TLS_KEY_FILE", &key)],
            "RELAY_METRICS_TLS_CERT_FILE",
        ),
        (
            vec![
                ("RELAY_METRICS_TLS_CERT_FILE", &key),
                ("RELAY_METRICS_TLS_KEY_FILE", &key),
            ],
            "RELAY_METRICS_TLS_CERT_FILE",
        ),
        (
            vec![
                ("RELAY_METRICS_ADDR", ""),
                ("RELAY_METRICS_TLS_CERT_FILE", &cert),
                ("RELAY_METRICS_TLS_KEY_FILE", &key),
            ],
            "RELAY_METRICS_TLS_CERT_FILE",
        ),
    ];
    for (env, var) in relay_cases {
        let mut all = base_relay.to_vec();
        all.extend(env.iter().copied());
        let (code, stderr) = run_config("callbridge-relay", &all);
        assert_eq!(code, Some(64), "{env:?}: {stderr}");
        assert!(stderr.contains(var), "{env:?} names {var}: {stderr}");
    }
    let base_control = [("CONTROL_INSECURE_NO_AUTH", "true")];
    let control_cases: Vec<(Vec<(&str, &str)>, &str)> = vec![
        (
            vec![("CONTROL_METRICS_HEADER_TIMEOUT_MS", "0")],
            "CONTROL_METRICS_HEADER_TIMEOUT_MS",
        ),
        (
            vec![("CONTROL_METRICS_MAX_CONNECTIONS", "0")],
            "CONTROL_METRICS_MAX_CONNECTIONS",
        ),
        (
            vec![("CONTROL_GRPC_MAX_CONCURRENT_STREAMS", "0")],
            "CONTROL_GRPC_MAX_CONCURRENT_STREAMS",
        ),
        (
            vec![("CONTROL_GRPC_UNARY_TIMEOUT_MS", "0")],
            "CONTROL_GRPC_UNARY_TIMEOUT_MS",
        ),
        (
            vec![("CONTROL_GRPC_MAX_HEADER_LIST_BYTES", "100")],
            "CONTROL_GRPC_MAX_HEADER_LIST_BYTES",
        ),
        (
            vec![("CONTROL_WATCH_STREAMS_PER_TOKEN", "0")],
            "CONTROL_WATCH_STREAMS_PER_TOKEN",
        ),
        (
            vec![("CONTROL_GRPC_REFLECTION", "maybe")],
            "CONTROL_GRPC_REFLECTION",
        ),
        (
            vec![("CONTROL_METRICS_TLS_CERT_FILE", &cert)],
            "CONTROL_METRICS_TLS_KEY_FILE",
        ),
        (
            vec![
                ("CONTROL_METRICS_TLS_CERT_FILE", "/nonexistent.crt"),
                ("CONTROL_METRICS_TLS_KEY_FILE", &key),
            ],
            "CONTROL_METRICS_TLS_CERT_FILE",
        ),
        (
            vec![
                ("CONTROL_METRICS_LISTEN", ""),
                ("CONTROL_METRICS_TLS_CERT_FILE", &cert),
                ("CONTROL_METRICS_TLS_KEY_FILE", &key),
            ],
            "CONTROL_METRICS_TLS_CERT_FILE",
        ),
    ];
    for (env, var) in control_cases {
        let mut all = base_control.to_vec();
        all.extend(env.iter().copied());
        let (code, stderr) = run_config("callbridge-control", &all);
        assert_eq!(code, Some(64), "{env:?}: {stderr}");
        assert!(stderr.contains(var), "{env:?} names {var}: {stderr}");
    }
}

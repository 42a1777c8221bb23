//! End-to-end with TLS on every hop inside the system: control on `rediss://` with a client
//! certificate, control's gRPC over TLS asking for client certificates, relays on an
//! `https://` CONTROL_URL presenting one. Real processes, real `redis-server` (Debian's
//! build speaks TLS), certificates from a CA generated in the test (rcgen).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use callbridge_proto::pb;
use callbridge_testkit::conversation::{AgentReply, Conversation, Turn};
use callbridge_testkit::fake_realtime::FakeRealtime;
use callbridge_testkit::http::request;
use callbridge_testkit::pki::{PemPair, TestCa, Usage};
use callbridge_testkit::procs::{bin_dir, free_addr};
use callbridge_testkit::sim_caller::{ClosedBy, SimCaller};
use callbridge_tests::{World, agent_settings, expected_transcript, flatten, with_timeout};
use rustls::pki_types::{CertificateDer, ServerName};
use tonic::Code;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

const CALL: Duration = Duration::from_secs(90);
const WAIT: Duration = Duration::from_secs(30);

fn script(n: usize, answer_ms: u32) -> Conversation {
    Conversation {
        greeting: Some(AgentReply::says(format!("Hello caller {n}"), 400)),
        turns: vec![
            Turn::new(
                format!("Caller {n} asks a question"),
                600,
                AgentReply::says(format!("Answer for caller {n}"), answer_ms),
            ),
            Turn::new(
                format!("Caller {n} says thanks"),
                400,
                AgentReply::says(format!("Goodbye caller {n}"), 300),
            ),
        ],
    }
}

/// A health check over `tls` (or plaintext with `None`) on a fresh connection.
async fn health(world: &World, tls: Option<ClientTlsConfig>) -> Result<i32, tonic::Status> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut endpoint = Endpoint::from_shared(format!("{scheme}://{}", world.control.addr))
        .expect("url")
        .connect_timeout(Duration::from_secs(5));
    if let Some(tls) = tls {
        endpoint = endpoint.tls_config(tls).expect("tls config");
    }
    let channel: Channel = endpoint.connect_lazy();
    let mut client = HealthClient::new(channel);
    let req = HealthCheckRequest {
        service: String::new(),
    };
    with_timeout(Duration::from_secs(15), "health check", client.check(req))
        .await
        .map(|r| r.into_inner().status)
}

/// `GET path` on control's plain-HTTP listener: the status and the trimmed body.
async fn probe(addr: SocketAddr, path: &str) -> (u16, String) {
    let host = addr.to_string();
    let resp = request(addr, "GET", &host, path, &[], None, Duration::from_secs(5))
        .await
        .unwrap_or_else(|e| panic!("GET {path}: {e}"));
    (resp.status, resp.body.trim().to_owned())
}

/// Waits until control's health (over TLS) reports `want`.
async fn wait_health(world: &World, want: ServingStatus) {
    let tls = world.tls.as_ref().expect("tls world");
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let got = health(world, Some(tls.client_config(Some(&tls.client)))).await;
        if matches!(&got, Ok(s) if *s == want as i32) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "health never became {want:?} (last {got:?}); control log:\n{}",
            world.control.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The leaf certificate control presents to a new TLS connection (a raw rustls client
/// trusting the test CA and presenting the relay's certificate).
async fn presented_certificate(world: &World) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject;
    let tls = world.tls.as_ref().expect("tls world");
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(tls.ca.ca_file()).expect("CA") {
        roots.add(cert.expect("CA cert")).expect("root");
    }
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&tls.client.cert)
        .expect("cert")
        .map(|c| c.expect("cert"))
        .collect();
    let key = rustls::pki_types::PrivateKeyDer::from_pem_file(&tls.client.key).expect("key");
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_client_auth_cert(chain, key)
    .expect("client auth");
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(world.control.addr)
        .await
        .expect("tcp");
    let name = ServerName::try_from("127.0.0.1").expect("name");
    let stream = with_timeout(WAIT, "TLS handshake", connector.connect(name, tcp))
        .await
        .expect("handshake");
    let (_, session) = stream.get_ref();
    assert_eq!(session.alpn_protocol(), Some(&b"h2"[..]), "gRPC needs h2");
    session.peer_certificates().expect("a certificate")[0].to_vec()
}

fn assert_transcript_once(events: &[pb::CallEvent], what: &str) {
    let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "{what}: seqs in order, none twice: {seqs:?}"
    );
    let ended = events
        .iter()
        .filter(|e| matches!(e.kind, Some(pb::call_event::Kind::Ended(_))))
        .count();
    assert_eq!(ended, 1, "{what}: one ended event");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_with_tls_on_every_hop_is_stored_as_said() {
    let script = script(0, 800);
    let world = World::builder(FakeRealtime::builder().script(script.clone()).speed(2.0))
        .tls()
        .start()
        .await;
    assert!(world.redis.url().starts_with("rediss://"));
    assert!(world.control_url().starts_with("https://"));
    world
        .default_agent(agent_settings("tls-call", Some("Hello caller 0")))
        .await;
    let caller = world.caller(script.clone());
    let call_sid = caller.call_sid.clone();
    let report = with_timeout(CALL, "the call", SimCaller::new(caller).run())
        .await
        .expect("the call runs");
    let leg = report.leg().expect("a stream leg");
    assert!(leg.protocol_errors.is_empty(), "{:?}", leg.protocol_errors);
    assert_eq!(leg.closed_by, ClosedBy::Caller);
    let call = world
        .call_by_sid(&call_sid)
        .await
        .expect("the call is stored");
    let call = world
        .wait_ended(&call.call_id, Duration::from_secs(10))
        .await;
    assert_eq!(call.status, pb::CallStatus::Completed as i32, "{call:?}");
    assert_eq!(
        flatten(&world.transcript(&call.call_id).await),
        expected_transcript(&script)
    );
    assert_transcript_once(&world.stored_events(&call.call_id).await, "the call");
    assert!(world.control.log_text().contains("gRPC over TLS."));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_over_a_tls_redis_cluster_is_stored_as_said() {
    let script = script(2, 800);
    let world = World::builder(FakeRealtime::builder().script(script.clone()).speed(2.0))
        .tls()
        .redis_cluster(3)
        .start()
        .await;
    let seeds = world.redis_cluster.as_ref().expect("a cluster").seeds();
    assert!(
        seeds.split(',').all(|s| s.starts_with("rediss://")),
        "{seeds}"
    );
    world
        .default_agent(agent_settings("tls-cluster-call", Some("Hello caller 2")))
        .await;
    let caller = world.caller(script.clone());
    let call_sid = caller.call_sid.clone();
    let report = with_timeout(CALL, "the call", SimCaller::new(caller).run())
        .await
        .expect("the call runs");
    let leg = report.leg().expect("a stream leg");
    assert!(leg.protocol_errors.is_empty(), "{:?}", leg.protocol_errors);
    let call = world
        .call_by_sid(&call_sid)
        .await
        .expect("the call is stored");
    let call = world
        .wait_ended(&call.call_id, Duration::from_secs(10))
        .await;
    assert_eq!(call.status, pb::CallStatus::Completed as i32, "{call:?}");
    assert_eq!(
        flatten(&world.transcript(&call.call_id).await),
        expected_transcript(&script)
    );
    assert_transcript_once(&world.stored_events(&call.call_id).await, "the call");
    // Nothing reached the single-node Redis: every key went to the cluster.
    assert_eq!(world.redis.admin(&["DBSIZE"]).expect("DBSIZE"), ":0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_certificates_and_plaintext_get_unavailable_naming_tls_and_nothing_crashes() {
    let mut world = World::builder(FakeRealtime::builder()).tls().start().await;
    let tls = world.tls.as_ref().expect("tls world");
    let other = TestCa::new("other").expect("other CA");
    let stranger = other.issue("stranger", Usage::Client).expect("cert");
    let expired = tls
        .ca
        .issue_expired("expired", Usage::Client)
        .expect("cert");

    let cases: Vec<(&str, Option<ClientTlsConfig>)> = vec![
        // Trusts another CA: control's certificate is refused by the client.
        (
            "wrong CA",
            Some({
                let ca = std::fs::read(other.ca_file()).expect("CA");
                ClientTlsConfig::new()
                    .ca_certificate(tonic::transport::Certificate::from_pem(ca))
                    .identity(identity(&tls.client))
            }),
        ),
        // A certificate from a CA control does not trust.
        (
            "client from another CA",
            Some(tls.client_config(Some(&stranger))),
        ),
        // An expired client certificate from the right CA.
        (
            "expired client certificate",
            Some(tls.client_config(Some(&expired))),
        ),
        // No client certificate while control requires one.
        ("no client certificate", Some(tls.client_config(None))),
        // Plaintext h2c to the TLS port.
        ("plaintext", None),
    ];
    let total = cases.len();
    for (what, config) in cases {
        let status = health(&world, config).await.expect_err(what);
        assert_ne!(status.code(), Code::Ok, "{what}");
        if what == "wrong CA" {
            // The client itself refuses control's certificate, and says so.
            assert_eq!(status.code(), Code::Unavailable, "{what}: {status:?}");
            assert!(
                status.message().contains("certificate"),
                "{what}: {status:?}"
            );
        }
    }
    // A refused client certificate reaches a TLS 1.3 client only as a closed connection
    // (its side of the handshake was already done), so control logs every refusal with
    // the peer and the reason; one line per case.
    // The client may see its error before control has written the line: wait for them.
    let reasons = [
        "UnknownCA",
        "UnknownIssuer",
        "certificate expired",
        "peer sent no certificates",
        "InvalidContentType",
    ];
    let all_logged = || {
        let log = world.control.log_text();
        let refusals = log
            .lines()
            .filter(|l| l.contains("TLS handshake failed"))
            .count();
        refusals >= total && reasons.iter().all(|r| log.contains(r))
    };
    assert!(
        callbridge_testkit::eventually(WAIT, all_logged).await,
        "one refusal per case, each with its reason ({reasons:?}):\n{}",
        world.control.log_text()
    );
    assert!(world.control.is_running());
    wait_health(&world, ServingStatus::Serving).await;
}

/// The relay's side of a refused client certificate: the webhook gets a 503 at once (not a
/// hang), the relay warns that control is unreachable with the transport's cause, and
/// control's log names the reason (a TLS 1.3 client only sees the connection close).
#[tokio::test]
async fn a_relay_whose_certificate_control_refuses_answers_503_and_both_sides_say_why() {
    let other = TestCa::new("other").expect("other CA");
    let stranger = other.issue("stranger-relay", Usage::Client).expect("cert");
    let path = |p: &std::path::Path| p.to_string_lossy().into_owned();
    let mut world = World::builder(FakeRealtime::builder())
        .tls()
        .relay_env("CONTROL_CLIENT_CERT_FILE", &path(&stranger.cert))
        .relay_env("CONTROL_CLIENT_KEY_FILE", &path(&stranger.key))
        .start()
        .await;
    let caller = SimCaller::new(world.caller(script(0, 500)));
    let hook = with_timeout(WAIT, "webhook", caller.webhook())
        .await
        .expect("the relay answers");
    assert_eq!(
        (hook.response.status, hook.response.body.as_str()),
        (503, "control plane unavailable\n")
    );
    let said = || {
        let relay = world.relays[0].log_text();
        let control = world.control.log_text();
        relay.lines().any(|l| {
            l.contains("WARN")
                && l.contains("Admit failed: control unreachable")
                && l.contains("transport error")
        }) && control
            .lines()
            .any(|l| l.contains("TLS handshake failed") && l.contains("UnknownIssuer"))
    };
    assert!(
        callbridge_testkit::eventually(WAIT, said).await,
        "relay:\n{}\ncontrol:\n{}",
        world.relays[0].log_text(),
        world.control.log_text()
    );
    assert!(world.relays[0].is_running() && world.control.is_running());
}

fn identity(pair: &PemPair) -> tonic::transport::Identity {
    tonic::transport::Identity::from_pem(
        std::fs::read(&pair.cert).expect("cert"),
        std::fs::read(&pair.key).expect("key"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_tls_failure_turns_health_not_serving_and_loses_no_admitted_call() {
    let script = script(1, 6_000);
    // The plain-HTTP probes beside TLS gRPC (what the prod overlay's kubelet probes).
    let probes = free_addr().expect("a free port");
    let world = World::builder(FakeRealtime::builder().script(script.clone()).speed(1.0))
        .tls()
        .control_env("CONTROL_METRICS_LISTEN", &probes.to_string())
        .start()
        .await;
    assert_eq!(probe(probes, "/readyz").await, (200, "SERVING".to_owned()));
    let tls = world.tls.as_ref().expect("tls world");
    world
        .default_agent(agent_settings("redis-tls", Some("Hello caller 1")))
        .await;
    let call_sid;
    let handle = {
        let cfg = world.caller(script.clone());
        call_sid = cfg.call_sid.clone();
        SimCaller::new(cfg).start()
    };
    // Once the call is admitted and attached, Redis starts presenting an expired
    // certificate and drops every client, so control's reconnections fail TLS.
    let deadline = tokio::time::Instant::now() + WAIT;
    let call_id = loop {
        if let Some(call) = world.call_by_sid(&call_sid).await
            && call.status == pb::CallStatus::InProgress as i32
        {
            break call.call_id;
        }
        assert!(tokio::time::Instant::now() < deadline, "call never started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let expired = tls
        .ca
        .issue_expired("redis-expired", Usage::Server)
        .expect("cert");
    // Both in one CONFIG SET: Redis refuses a certificate without its key.
    let set = |pair: &PemPair| {
        let (cert, key) = (pair.cert.to_string_lossy(), pair.key.to_string_lossy());
        let answer = world
            .redis
            .admin(&[
                "CONFIG",
                "SET",
                "tls-cert-file",
                &cert,
                "tls-key-file",
                &key,
            ])
            .expect("CONFIG SET");
        assert_eq!(answer, "+OK");
    };
    set(&expired);
    for kind in ["normal", "pubsub"] {
        let answer = world
            .redis
            .admin(&["CLIENT", "KILL", "TYPE", kind])
            .expect("CLIENT KILL");
        assert!(answer.starts_with(':'), "{answer}");
    }
    wait_health(&world, ServingStatus::NotServing).await;
    assert_eq!(
        probe(probes, "/readyz").await,
        (503, "NOT_SERVING".to_owned())
    );
    // Liveness stays up: restarting control would not bring Redis back.
    assert_eq!(probe(probes, "/healthz").await, (200, "SERVING".to_owned()));
    let log = world.control.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("NOT_SERVING") && l.to_lowercase().contains("tls")),
        "a log line names the Redis TLS failure:\n{log}"
    );
    // Back to a good certificate: control reconnects, the relay's buffered events land.
    set(&tls.redis_server);
    wait_health(&world, ServingStatus::Serving).await;
    assert_eq!(probe(probes, "/readyz").await, (200, "SERVING".to_owned()));
    let report = with_timeout(CALL, "the call", handle.join())
        .await
        .expect("the call runs");
    let leg = report.leg().expect("a stream leg");
    assert_eq!(leg.closed_by, ClosedBy::Caller);
    let call = world.wait_ended(&call_id, Duration::from_secs(30)).await;
    assert_eq!(call.status, pb::CallStatus::Completed as i32, "{call:?}");
    assert_eq!(
        flatten(&world.transcript(&call_id).await),
        expected_transcript(&script)
    );
    assert_transcript_once(&world.stored_events(&call_id).await, "the call");
    assert!(world.control.log_text().contains("Redis is back"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_certificate_is_presented_to_new_connections_while_20_calls_go_on() {
    const CALLS: usize = 20;
    let mut fake = FakeRealtime::builder().speed(1.0);
    for n in 0..CALLS {
        fake = fake.script_for(format!("rotate-{n}-end"), script(n, 2_500));
    }
    let world = World::builder(fake)
        .tls()
        .relays(2)
        .skip_signature()
        .start()
        .await;
    let tls = world.tls.as_ref().expect("tls world");
    let before = presented_certificate(&world).await;
    assert_eq!(before, tls.control.cert_der().expect("der"));

    let mut calls = Vec::new();
    for n in 0..CALLS {
        let agent = world
            .create_agent(
                &format!("rotate-{n}"),
                agent_settings(
                    &format!("rotate-{n}-end"),
                    Some(&format!("Hello caller {n}")),
                ),
            )
            .await;
        let call_id = world
            .create_call(&agent, &format!("+1415555030{n:02}"))
            .await;
        let mut cfg = world.caller(script(n, 2_500));
        cfg.call_id = Some(call_id.clone());
        calls.push((n, call_id, SimCaller::new(cfg).start()));
    }
    // Rotate while the calls are live (every one attached).
    let deadline = tokio::time::Instant::now() + WAIT;
    for (_, call_id, _) in &calls {
        while world.get_call(call_id).await.status != pb::CallStatus::InProgress as i32 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "calls never all started"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let next = tls.ca.issue("control-next", Usage::Server).expect("cert");
    next.install_as(&tls.control).expect("rotate");
    let expected = next.cert_der().expect("der");
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let presented = presented_certificate(&world).await;
        if presented == expected {
            break;
        }
        assert_eq!(presented, before, "only the old or the new certificate");
        assert!(
            tokio::time::Instant::now() < deadline,
            "the new certificate was never presented; log:\n{}",
            world.control.log_text()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let reloaded = || {
        world
            .control
            .log_text()
            .contains("TLS certificate reloaded")
    };
    assert!(callbridge_testkit::eventually(WAIT, reloaded).await);
    // A new client connection (the test's, with the relay's certificate) works on it.
    wait_health(&world, ServingStatus::Serving).await;

    for (n, call_id, handle) in calls {
        let report = with_timeout(CALL, "a call", handle.join())
            .await
            .expect("runs");
        let leg = report.leg().expect("a stream");
        assert!(
            leg.protocol_errors.is_empty(),
            "call {n}: {:?}",
            leg.protocol_errors
        );
        assert_eq!(leg.closed_by, ClosedBy::Caller, "call {n}");
        assert_eq!(report.legs.len(), 1, "call {n}: the stream was never cut");
        let call = world.wait_ended(&call_id, Duration::from_secs(20)).await;
        assert_eq!(
            call.status,
            pb::CallStatus::Completed as i32,
            "call {n}: {call:?}"
        );
        assert_eq!(
            flatten(&world.transcript(&call_id).await),
            expected_transcript(&script(n, 2_500)),
            "call {n}"
        );
        assert_transcript_once(&world.stored_events(&call_id).await, &format!("call {n}"));
    }
}

/// Runs `binary` with `env` only (plus PATH) and returns its exit code and stderr.
fn run_config(binary: &str, env: &[(&str, &str)]) -> (Option<i32>, String) {
    let out = std::process::Command::new(bin_dir().join(binary))
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .envs(env.iter().copied())
        .output()
        .expect("binary runs");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn settings_the_binaries_cannot_honour_exit_64_naming_the_variable() {
    let ca = TestCa::new("refusals").expect("CA");
    let pair = ca.issue("server", Usage::Server).expect("cert");
    let ca_file = ca.ca_file().to_string_lossy().into_owned();
    let cert = pair.cert.to_string_lossy().into_owned();
    let key = pair.key.to_string_lossy().into_owned();
    let base_control = [
        ("CONTROL_APP_TOKENS", "app-token-0123456789abcdef-0123456"),
        ("CONTROL_METRICS_LISTEN", ""),
    ];
    let control_cases: Vec<(Vec<(&str, &str)>, &str)> = vec![
        (
            vec![("REDIS_URL", "rediss://127.0.0.1:6380/#insecure")],
            "REDIS_URL",
        ),
        (
            vec![(
                "REDIS_CLUSTER_NODES",
                "rediss://127.0.0.1:7000,redis://127.0.0.1:7001",
            )],
            "REDIS_CLUSTER_NODES",
        ),
        (vec![("REDIS_URL", "http://127.0.0.1:6379")], "REDIS_URL"),
        (
            vec![
                ("REDIS_URL", "redis://127.0.0.1:6379"),
                ("REDIS_CA_FILE", &ca_file),
            ],
            "REDIS_CA_FILE",
        ),
        (
            vec![
                ("REDIS_URL", "rediss://127.0.0.1:6379"),
                ("REDIS_CERT_FILE", &cert),
            ],
            "REDIS_KEY_FILE",
        ),
        (
            vec![("CONTROL_TLS_CERT_FILE", &cert)],
            "CONTROL_TLS_KEY_FILE",
        ),
        (
            vec![
                ("CONTROL_TLS_CERT_FILE", "/nonexistent.crt"),
                ("CONTROL_TLS_KEY_FILE", &key),
            ],
            "CONTROL_TLS_CERT_FILE",
        ),
        (
            vec![("CONTROL_TLS_CLIENT_CA_FILE", &ca_file)],
            "CONTROL_TLS_CLIENT_CA_FILE",
        ),
        (
            vec![("RELAY_PUBLIC_URL", "ftp://relay")],
            "RELAY_PUBLIC_URL",
        ),
        (
            vec![("OTEL_EXPORTER_OTLP_ENDPOINT", "grpc://collector:4317")],
            "OTEL_EXPORTER_OTLP_ENDPOINT",
        ),
    ];
    for (env, var) in control_cases {
        let mut all = base_control.to_vec();
        all.extend(env.iter().copied());
        let (code, stderr) = run_config("callbridge-control", &all);
        assert_eq!(code, Some(64), "{env:?}: {stderr}");
        assert!(stderr.contains(var), "{env:?} names {var}: {stderr}");
    }
    let base_relay = [
        ("RELAY_PUBLIC_URL", "https://relay.example.com"),
        ("OPENAI_API_KEY", "sk-x"),
        ("RELAY_INSECURE_SKIP_SIGNATURE", "true"),
        ("RELAY_INSECURE_ALLOW_PUBLIC", "true"),
    ];
    let relay_cases: Vec<(Vec<(&str, &str)>, &str)> = vec![
        (vec![("CONTROL_URL", "grpc://control:50051")], "CONTROL_URL"),
        (
            vec![
                ("CONTROL_URL", "http://control:50051"),
                ("CONTROL_CA_FILE", &ca_file),
            ],
            "CONTROL_CA_FILE",
        ),
        (
            vec![
                ("CONTROL_URL", "https://control:50051"),
                ("CONTROL_CLIENT_CERT_FILE", &cert),
            ],
            "CONTROL_CLIENT_KEY_FILE",
        ),
        (
            vec![
                ("CONTROL_URL", "https://control:50051"),
                ("CONTROL_CA_FILE", &key),
            ],
            "CONTROL_CA_FILE",
        ),
        (
            vec![("OPENAI_REALTIME_URL", "https://api.openai.com/v1/realtime")],
            "OPENAI_REALTIME_URL",
        ),
        (
            vec![("RELAY_PUBLIC_URL", "ftp://relay")],
            "RELAY_PUBLIC_URL",
        ),
        (
            vec![("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4317")],
            "OTEL_EXPORTER_OTLP_ENDPOINT",
        ),
    ];
    for (env, var) in relay_cases {
        let mut all = base_relay.to_vec();
        all.extend(env.iter().copied());
        let (code, stderr) = run_config("callbridge-relay", &all);
        assert_eq!(code, Some(64), "{env:?}: {stderr}");
        assert!(stderr.contains(var), "{env:?} names {var}: {stderr}");
    }
}

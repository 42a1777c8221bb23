//! OpenTelemetry traces: with `OTEL_EXPORTER_OTLP_ENDPOINT` set, the real binaries export
//! their `tracing` spans over OTLP/gRPC. A fake collector (the real OTLP trace service,
//! served by tonic on loopback) records what arrives; a whole call runs through relay and
//! control, both are stopped with SIGTERM, and the spans they flushed are checked.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use callbridge_testkit::conversation::Conversation;
use callbridge_testkit::fake_realtime::FakeRealtime;
use callbridge_testkit::sim_caller::SimCaller;
use callbridge_tests::{World, agent_settings, with_timeout};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{KeyValue, any_value};

const CALL: Duration = Duration::from_secs(60);
const EXIT: Duration = Duration::from_secs(15);
/// The collector keeps at most this many spans; a runaway exporter cannot eat the box.
const MAX_SPANS: usize = 10_000;

/// One exported span, flattened: which service sent it, its name, its string attributes.
#[derive(Debug, Clone)]
struct Span {
    service: String,
    name: String,
    attributes: Vec<(String, String)>,
}

impl Span {
    fn attr(&self, key: &str) -> Option<&str> {
        self.attributes
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<Span>>>,
}

fn string_attrs(kvs: &[KeyValue]) -> Vec<(String, String)> {
    kvs.iter()
        .filter_map(|kv| match kv.value.as_ref()?.value.as_ref()? {
            any_value::Value::StringValue(s) => Some((kv.key.clone(), s.clone())),
            _ => None,
        })
        .collect()
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut stored = self.spans.lock().expect("collector lock");
        for rs in request.into_inner().resource_spans {
            let service = rs
                .resource
                .as_ref()
                .map(|r| string_attrs(&r.attributes))
                .unwrap_or_default()
                .into_iter()
                .find(|(k, _)| k == "service.name")
                .map(|(_, v)| v)
                .unwrap_or_default();
            for span in rs.scope_spans.into_iter().flat_map(|s| s.spans) {
                if stored.len() >= MAX_SPANS {
                    return Err(tonic::Status::resource_exhausted("collector is full"));
                }
                stored.push(Span {
                    service: service.clone(),
                    name: span.name,
                    attributes: string_attrs(&span.attributes),
                });
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

impl Collector {
    /// Serves the OTLP trace service on a fresh loopback port; returns its URL.
    async fn start(&self) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the collector");
        let addr = listener.local_addr().expect("collector address");
        let service = TraceServiceServer::new(self.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
        );
        format!("http://{addr}")
    }

    fn spans(&self) -> Vec<Span> {
        self.spans.lock().expect("collector lock").clone()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_and_control_export_their_spans_to_the_otlp_collector() {
    let collector = Collector::default();
    let endpoint = collector.start().await;
    let script = Conversation::sample();
    let mut world = World::builder(FakeRealtime::builder().script(script.clone()).speed(2.0))
        .control_env("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint)
        .relay_env("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint)
        // The override replaces the default name.
        .relay_env("OTEL_SERVICE_NAME", "relay-under-test")
        .start()
        .await;
    let greeting = script.greeting.as_ref().map(|g| g.text.as_str());
    world.default_agent(agent_settings("otel", greeting)).await;
    let report = with_timeout(
        CALL,
        "the call",
        SimCaller::new(world.caller(script.clone())).run(),
    )
    .await
    .expect("the call runs");
    let call_id = report
        .webhook
        .twiml
        .as_ref()
        .and_then(|t| t.parameters.iter().find(|(k, _)| k == "callId"))
        .map(|(_, v)| v.clone())
        .expect("callId parameter in the webhook TwiML");
    world.wait_ended(&call_id, Duration::from_secs(10)).await;

    // SIGTERM: the binaries flush the batch on the way out, so everything is in by exit.
    for relay in &mut world.relays {
        relay.terminate().expect("SIGTERM the relay");
        let status = relay.wait_exit(EXIT).await.expect("relay exits");
        assert!(status.success(), "relay exit: {status}");
    }
    world.control.terminate().expect("SIGTERM control");
    let status = world.control.wait_exit(EXIT).await.expect("control exits");
    assert!(status.success(), "control exit: {status}");

    let spans = collector.spans();
    let control: Vec<&Span> = spans
        .iter()
        .filter(|s| s.service == "callbridge-control")
        .collect();
    let relay: Vec<&Span> = spans
        .iter()
        .filter(|s| s.service == "relay-under-test")
        .collect();
    assert_eq!(
        control.len() + relay.len(),
        spans.len(),
        "spans from an unexpected service: {spans:?}"
    );
    // Control: the per-RPC span, e.g. the agent creation and the relay's attach for
    // this call, tagged with the call id.
    assert!(
        control
            .iter()
            .any(|s| s.name == "rpc" && s.attr("method").is_some()),
        "no RPC span from control: {control:?}"
    );
    assert!(
        control
            .iter()
            .any(|s| s.attr("call_id") == Some(call_id.as_str())),
        "no control span for call {call_id}: {control:?}"
    );
    // Relay: the per-call span carrying the call id.
    assert!(
        relay
            .iter()
            .any(|s| s.name == "call" && s.attr("call_id") == Some(call_id.as_str())),
        "no call span for {call_id} from the relay: {relay:?}"
    );
}

//! The Node example `examples/express-campaign`, run for real: Redis, the control binary
//! (dialling through the fake Twilio REST API), a relay forwarding Twilio's status
//! callbacks, and the Express app on a loopback port. The test drives the app over HTTP
//! only: `POST /campaigns` creates the agent and starts a campaign, and
//! `GET /campaigns/:id/progress` streams its progress (server-sent events from
//! `Calls/WatchCampaign`) until the campaign completes.
//!
//! Needs `node` and `examples/express-campaign/node_modules`
//! (`bash scripts/checks/node-deps.sh`, which `scripts/test.sh` runs first).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use callbridge_proto::pb;
use callbridge_testkit::fake_realtime::FakeRealtime;
use callbridge_testkit::fake_twilio_rest::{FakeTwilio, FakeTwilioConfig, Lifecycle};
use callbridge_testkit::http;
use callbridge_tests::{APP_TOKEN, TWILIO_TOKEN, World, with_timeout};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

const ACCOUNT: &str = "AC00000000000000000000000000000e59";
const STEP: Duration = Duration::from_secs(15);
const CAMPAIGN: Duration = Duration::from_secs(60);

fn example_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits inside the workspace")
        .join("examples")
        .join("express-campaign")
}

/// The Express app on a free loopback port; killed when dropped.
struct ExpressApp {
    addr: SocketAddr,
    _child: Child,
}

impl ExpressApp {
    async fn start(world: &World) -> Self {
        let dir = example_dir();
        assert!(
            dir.join("node_modules").join("express").exists(),
            "run `bash scripts/checks/node-deps.sh` first (examples/express-campaign/node_modules)"
        );
        let control = world.control_url().trim_start_matches("http://").to_owned();
        let mut child = Command::new("node")
            .arg("server.mjs")
            .current_dir(&dir)
            .env("CONTROL_ADDR", control)
            .env("CONTROL_APP_TOKEN", APP_TOKEN)
            .env("PORT", "0")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("node runs (Node.js >= 18 on PATH)");
        let stdout = child.stdout.take().expect("piped");
        let mut lines = BufReader::new(stdout).lines();
        let port: u16 = with_timeout(STEP, "the Express app listens", async {
            loop {
                let line = lines
                    .next_line()
                    .await
                    .expect("node stdout")
                    .expect("node exited before listening");
                if let Some(port) = line.strip_prefix("LISTENING ") {
                    return port.trim().parse().expect("a port");
                }
            }
        })
        .await;
        // Keep reading so the app never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        ExpressApp {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            _child: child,
        }
    }

    async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
        limit: Duration,
    ) -> (u16, String) {
        let body = body.map(|b| ("application/json", b.to_string()));
        let r = http::request(self.addr, method, "127.0.0.1", path, &[], body, limit)
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        (r.status, r.body)
    }
}

/// The events of a server-sent event stream: (name, JSON data).
fn sse_events(body: &str) -> Vec<(String, Value)> {
    body.split("\n\n")
        .filter(|block| !block.trim().is_empty())
        .map(|block| {
            let mut name = String::new();
            let mut data = String::new();
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("event: ") {
                    name = v.to_owned();
                } else if let Some(v) = line.strip_prefix("data: ") {
                    data.push_str(v);
                }
            }
            (name, serde_json::from_str(&data).unwrap_or(Value::Null))
        })
        .collect()
}

fn count(view: &Value, field: &str) -> u64 {
    view["progress"][field].as_u64().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_express_example_starts_a_campaign_and_streams_its_progress() {
    let twilio = FakeTwilio::start(FakeTwilioConfig::new(ACCOUNT, TWILIO_TOKEN))
        .await
        .expect("fake twilio starts");
    let world = World::builder(FakeRealtime::builder())
        .dials_through(&twilio)
        .start()
        .await;
    world.answer_from(&twilio);
    let numbers: Vec<String> = (0..8).map(|i| format!("+1415555{:04}", 7700 + i)).collect();
    for n in &numbers {
        twilio.script(n, Lifecycle::Busy { ring_ms: 200 });
    }
    let app = ExpressApp::start(&world).await;

    // A bad request is the app's 400, with the API's message.
    let (status, body) = app
        .call(
            "POST",
            "/campaigns",
            Some(json!({
                "agent": {"name": "Bad", "instructions": "x", "voice": "marin"},
                "campaign_id": "express-bad",
                "settings": {"from": "+14155550100", "calls_per_second": 0, "max_concurrent": 1},
                "numbers": [{"number": "+14155550001"}],
            })),
            STEP,
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("settings.calls_per_second"), "{body}");

    let (status, body) = app
        .call(
            "POST",
            "/campaigns",
            Some(json!({
                "agent_id": "express-agent",
                "agent": {"name": "Renewals", "instructions": "You call about renewals.", "voice": "marin"},
                "campaign_id": "express",
                "settings": {
                    "from": "+14155550100",
                    "calls_per_second": 3,
                    "max_concurrent": 2,
                    "dial": {"timeout_secs": 5},
                },
                "numbers": numbers.iter().map(|n| json!({"number": n, "metadata": {"crm": n}})).collect::<Vec<_>>(),
            })),
            STEP,
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let started: Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(started["agent_id"], "express-agent");
    assert_eq!(started["campaign"]["state"], "CAMPAIGN_STATE_RUNNING");

    // The progress stream, read to its end: the app ends it when the watch ends.
    let (status, body) = app
        .call("GET", "/campaigns/express/progress", None, CAMPAIGN)
        .await;
    assert_eq!(status, 200, "{body}");
    let events = sse_events(&body);
    let (last_name, _) = events.last().expect("events");
    assert_eq!(last_name, "end", "{body}");
    let views: Vec<&Value> = events
        .iter()
        .filter(|(name, _)| name == "progress")
        .map(|(_, v)| v)
        .collect();
    let last = views.last().expect("progress events");
    assert_eq!(last["state"], "CAMPAIGN_STATE_COMPLETED", "{body}");
    assert_eq!(
        (
            count(last, "numbers"),
            count(last, "busy"),
            count(last, "remaining")
        ),
        (8, 8, 0),
        "{body}"
    );
    // The stream showed the campaign running, not only its end.
    assert!(
        views
            .iter()
            .any(|v| v["state"] == "CAMPAIGN_STATE_RUNNING" && count(v, "remaining") > 0),
        "{body}"
    );
    for pair in views.windows(2) {
        assert!(
            count(pair[1], "dialled") >= count(pair[0], "dialled"),
            "{body}"
        );
    }

    // What the app showed is what control stores, and Twilio got one create per number.
    let stored = world
        .calls()
        .get_campaign(pb::CampaignRequest {
            campaign_id: "express".into(),
        })
        .await
        .expect("GetCampaign")
        .into_inner();
    assert_eq!(stored.state, pb::CampaignState::Completed as i32);
    let creates = twilio
        .requests()
        .into_iter()
        .filter(|r| r.is_create() && r.status < 300)
        .count();
    assert_eq!(creates, 8);
    let (status, body) = app
        .call("GET", "/campaigns/nope/progress", None, STEP)
        .await;
    assert_eq!(status, 404, "{body}");
    // The app is still up after a refused stream.
    let (status, body) = app.call("GET", "/campaigns/express", None, STEP).await;
    assert_eq!(status, 200, "{body}");
    let view: Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(view["state"], "CAMPAIGN_STATE_COMPLETED");
}

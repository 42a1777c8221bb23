//! `bench_relay`: audio round-trip latency through the relay, on loopback.
//!
//! Control (in-memory store) and a relay run in this process; the fake model runs in echo
//! mode (every `input_audio_buffer.append` comes straight back as a delta). N simulated
//! Twilio callers stream 20 ms frames for a few seconds; each frame carries its number,
//! so the caller can time frame → relay → model → relay → caller. Prints p50/p99/max
//! per concurrency level. Figures, not assertions: run it on a quiet machine.
//!
//!   cargo run -p callbridge-tests --bin bench_relay -- --calls 1,10,50 --secs 5

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use callbridge_proto::pb;
use callbridge_testkit::audio;
use callbridge_testkit::fake_realtime::FakeRealtime;
use callbridge_testkit::sim_caller::{CallerConfig, SimCaller};
use callbridge_tests::Bearer;
use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;

const APP_TOKEN: &str = "bench-app";
const RELAY_TOKEN: &str = "bench-relay";
const TWILIO_TOKEN: &str = "bench-twilio";

/// Relay audio round-trip benchmark.
#[derive(Debug, Parser)]
struct Args {
    /// Concurrency levels (calls at once), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,10,50")]
    calls: Vec<usize>,
    /// Seconds of audio per call.
    #[arg(long, default_value_t = 5)]
    secs: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.calls.iter().any(|&n| n == 0 || n > 200) || args.secs == 0 || args.secs > 60 {
        bail!("--calls must be 1..=200 each and --secs 1..=60 (loopback, bounded)");
    }
    let control_listener = TcpListener::bind("127.0.0.1:0").await?;
    let control_addr = control_listener.local_addr()?;
    let relay_listener = TcpListener::bind("127.0.0.1:0").await?;
    let relay_addr = relay_listener.local_addr()?;
    let public = format!("http://{relay_addr}");
    let control_config = callbridge_control::config::Config::from_args_iter(owned(&[
        "callbridge-control",
        "--listen",
        &control_addr.to_string(),
        "--app-tokens",
        APP_TOKEN,
        "--relay-tokens",
        RELAY_TOKEN,
        "--metrics-listen",
        "",
        "--relay-public-url",
        &public,
    ]))
    .map_err(|e| anyhow::anyhow!("control config: {e}"))?;
    let control = tokio::spawn(callbridge_control::serve(
        control_config,
        control_listener,
        std::future::pending(),
    ));
    let fake = FakeRealtime::builder().echo().start().await?;
    let relay_config = callbridge_relay::config::Config::from_args_and_env(owned(&[
        "callbridge-relay",
        "--listen",
        &relay_addr.to_string(),
        "--public-url",
        &public,
        "--control-url",
        &format!("http://{control_addr}"),
        "--control-token",
        RELAY_TOKEN,
        "--openai-api-key",
        "sk-bench",
        "--openai-realtime-url",
        &fake.url(),
        "--twilio-auth-token",
        TWILIO_TOKEN,
    ]))
    .map_err(|e| anyhow::anyhow!("relay config: {e}"))?;
    let relay = tokio::spawn(callbridge_relay::run(
        relay_config,
        relay_listener,
        std::future::pending(),
    ));

    let channel = tonic::transport::Endpoint::from_shared(format!("http://{control_addr}"))?
        .connect()
        .await?;
    let mut agents =
        pb::agents_client::AgentsClient::with_interceptor(channel, Bearer::new(APP_TOKEN));
    let agent = agents
        .create_agent(pb::CreateAgentRequest {
            agent_id: "bench".to_owned(),
            settings: Some(pb::AgentSettings {
                name: "bench".to_owned(),
                instructions: "echo".to_owned(),
                ..Default::default()
            }),
        })
        .await?
        .into_inner();
    agents
        .set_default_agent(pb::DefaultAgent {
            agent_id: agent.agent_id,
        })
        .await?;

    println!("relay audio round trip (caller → relay → model echo → relay → caller), loopback");
    println!(
        "machine: {} CPUs visible",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "{:>6} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "calls", "frames", "lost", "p50 ms", "p99 ms", "max ms"
    );
    for &n in &args.calls {
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..n {
            let cfg = CallerConfig::new(&public, relay_addr, Some(TWILIO_TOKEN));
            tasks.spawn(one_call(cfg, Duration::from_secs(args.secs)));
        }
        let mut rtts = Vec::new();
        let mut sent = 0u64;
        while let Some(r) = tasks.join_next().await {
            let (s, mut r) = r.context("call task")??;
            sent += s;
            rtts.append(&mut r);
        }
        rtts.sort_by(f64::total_cmp);
        let pct = |p: f64| {
            rtts.get(((rtts.len() as f64 * p) as usize).min(rtts.len().saturating_sub(1)))
                .copied()
                .unwrap_or(f64::NAN)
        };
        println!(
            "{n:>6} {sent:>9} {:>9} {:>9.2} {:>9.2} {:>9.2}",
            sent - rtts.len() as u64,
            pct(0.5),
            pct(0.99),
            rtts.last().copied().unwrap_or(f64::NAN)
        );
    }
    relay.abort();
    control.abort();
    Ok(())
}

/// One call streaming numbered frames for `length`; returns (frames sent, round trips ms).
async fn one_call(cfg: CallerConfig, length: Duration) -> anyhow::Result<(u64, Vec<f64>)> {
    let caller = SimCaller::new(cfg.clone());
    let webhook = caller.webhook().await?;
    let twiml = webhook.twiml.with_context(|| {
        format!(
            "webhook HTTP {}: {}",
            webhook.response.status, webhook.response.body
        )
    })?;
    let url = twiml.stream_url.context("no <Stream>")?;
    let ws = caller
        .connect_stream(&url)
        .await?
        .map_err(|s| anyhow::anyhow!("stream refused: HTTP {s}"))?;
    let (mut tx, mut rx) = ws.split();
    let sid = format!("MZbench{:x}", rand_suffix());
    let params: serde_json::Map<String, Value> = twiml
        .parameters
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    tx.send(Message::text(
        json!({"event": "connected", "protocol": "Call", "version": "1.0.0"}).to_string(),
    ))
    .await?;
    tx.send(Message::text(
        json!({"event": "start", "sequenceNumber": "1", "streamSid": sid,
        "start": {"streamSid": sid, "callSid": cfg.call_sid, "accountSid": cfg.account_sid,
        "tracks": ["inbound"], "customParameters": params,
        "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}}})
        .to_string(),
    ))
    .await?;
    let frames = length.as_millis() as u64 / audio::FRAME_MS;
    let mut sent_at: HashMap<u32, Instant> = HashMap::new();
    let mut rtts = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(audio::FRAME_MS));
    let mut n = 0u32;
    let end = Instant::now() + length + Duration::from_secs(2);
    loop {
        tokio::select! {
            // The 20 ms caller clock.
            _ = tick.tick(), if u64::from(n) < frames => {
                n += 1;
                let mut frame = audio::tone(440.0, audio::FRAME_MS, 0);
                frame[..4].copy_from_slice(&n.to_be_bytes());
                sent_at.insert(n, Instant::now());
                tx.send(Message::text(json!({"event": "media", "streamSid": sid,
                    "sequenceNumber": (n + 1).to_string(), "media": {"track": "inbound",
                    "chunk": n.to_string(), "timestamp": (u64::from(n - 1) * 20).to_string(),
                    "payload": audio::b64(&frame)}}).to_string())).await?;
            }
            // Echoed audio (and marks, which a real caller would echo back).
            msg = rx.next() => {
                let Some(Ok(Message::Text(t))) = msg else { break };
                let v: Value = serde_json::from_str(&t)?;
                if v["event"] == "media"
                    && let Some(bytes) = v["media"]["payload"].as_str().and_then(audio::unb64)
                    && bytes.len() >= 4
                {
                    let k = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
                    if let Some(at) = sent_at.remove(&k) {
                        rtts.push(at.elapsed().as_secs_f64() * 1000.0);
                    }
                } else if v["event"] == "mark" {
                    tx.send(Message::text(json!({"event": "mark", "streamSid": sid,
                        "mark": v["mark"]}).to_string())).await?;
                }
                if u64::from(n) >= frames && sent_at.is_empty() { break; }
            }
            () = tokio::time::sleep_until(end.into()) => break,
        }
    }
    let _ = tx
        .send(Message::text(
            json!({"event": "stop", "streamSid": sid,
            "stop": {"callSid": cfg.call_sid, "accountSid": cfg.account_sid}})
            .to_string(),
        ))
        .await;
    let _ = tx.close().await;
    Ok((u64::from(n), rtts))
}

fn owned(args: &[&str]) -> Vec<String> {
    args.iter().map(|a| (*a).to_owned()).collect()
}

fn rand_suffix() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(0);
    h.finish()
}

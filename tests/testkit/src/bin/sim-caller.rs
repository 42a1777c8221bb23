//! `sim-caller`: simulated Twilio callers against a running relay (compose stack, manual
//! runs). See `callbridge_testkit::sim_caller`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use callbridge_testkit::conversation::Conversation;
use callbridge_testkit::sim_caller::{CallerConfig, ClosedBy, LoadBalancer, SimCaller};
use clap::Parser;

/// Places simulated Twilio calls through a callbridge relay and reports what happened.
#[derive(Debug, Parser)]
#[command(name = "sim-caller")]
struct Args {
    /// The relay's public base URL (signed URLs are built from it; also dialled unless
    /// --connect is given).
    #[arg(
        long,
        env = "SIM_CALLER_RELAY",
        default_value = "http://127.0.0.1:8080"
    )]
    relay: String,
    /// Addresses actually dialled, comma-separated (round robin, like a load balancer).
    #[arg(long, env = "SIM_CALLER_CONNECT", value_delimiter = ',')]
    connect: Vec<SocketAddr>,
    /// Twilio auth token to sign with (no signature when absent).
    #[arg(long, env = "TWILIO_AUTH_TOKEN", hide_env_values = true)]
    twilio_auth_token: Option<String>,
    /// Conversation script (JSON); default: the built-in sample call.
    #[arg(long, env = "SIM_CALLER_SCRIPT")]
    script: Option<PathBuf>,
    /// Pre-created call id (`?callId=` on the webhook).
    #[arg(long)]
    call_id: Option<String>,
    /// Caller number.
    #[arg(long, default_value = "+14155550100")]
    from: String,
    /// Dialled number.
    #[arg(long, default_value = "+14155550199")]
    to: String,
    /// Concurrent calls to place.
    #[arg(long, default_value_t = 1)]
    calls: u32,
    /// Seconds to keep retrying the first webhook while the relay starts.
    #[arg(long, default_value_t = 30)]
    wait_secs: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let script = match &args.script {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            Conversation::from_json(&text).with_context(|| format!("parsing {}", path.display()))?
        }
        None => Conversation::sample(),
    };
    let addrs = if args.connect.is_empty() {
        let hostport = args
            .relay
            .split_once("://")
            .map_or(args.relay.as_str(), |(_, r)| r)
            .split('/')
            .next()
            .unwrap_or_default()
            .to_owned();
        let hostport = if hostport.contains(':') {
            hostport
        } else if args.relay.starts_with("https") {
            format!("{hostport}:443")
        } else {
            format!("{hostport}:80")
        };
        wait_resolve(&hostport, Duration::from_secs(args.wait_secs)).await?
    } else {
        args.connect.clone()
    };
    let balancer = LoadBalancer::new(addrs.clone());
    let mut handles = Vec::new();
    for n in 0..args.calls {
        let mut cfg = CallerConfig::new(&args.relay, addrs[0], args.twilio_auth_token.as_deref());
        cfg.relays = balancer.clone();
        cfg.script = script.clone();
        cfg.call_id = args.call_id.clone();
        cfg.from = args.from.clone();
        cfg.to = args.to.clone();
        cfg.tone_hz = 300.0 + 40.0 * f64::from(n);
        handles.push(SimCaller::new(cfg).start());
    }
    let mut failures = 0;
    for (n, h) in handles.into_iter().enumerate() {
        match h.join().await {
            Err(e) => {
                failures += 1;
                println!("call {n}: failed: {e}");
            }
            Ok(report) => {
                println!("call {n}: webhook HTTP {}", report.webhook.response.status);
                let Some(leg) = report.leg() else {
                    failures += 1;
                    println!("call {n}: no stream ({})", report.webhook.response.body);
                    continue;
                };
                println!(
                    "call {n}: {} ms, {} turns spoken, {} ms of agent audio heard, {} marks, \
                     {} clears, ended by {:?}",
                    leg.duration_ms,
                    leg.turns_spoken.len(),
                    leg.media_bytes_played / 8,
                    leg.marks_echoed.len(),
                    leg.clears.len(),
                    leg.closed_by
                );
                for e in &leg.protocol_errors {
                    println!("call {n}: protocol error: {e}");
                }
                if !leg.protocol_errors.is_empty()
                    || leg.refused_status.is_some()
                    || matches!(leg.closed_by, ClosedBy::Error(_))
                {
                    failures += 1;
                }
            }
        }
    }
    if failures > 0 {
        anyhow::bail!("{failures} of {} calls failed", args.calls);
    }
    Ok(())
}

/// Resolves the relay host, retrying while it is not up yet (compose start order).
async fn wait_resolve(hostport: &str, limit: Duration) -> anyhow::Result<Vec<SocketAddr>> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::net::lookup_host(hostport).await {
            Ok(addrs) => {
                let addrs: Vec<SocketAddr> = addrs.collect();
                if let Some(addr) = addrs.first()
                    && tokio::net::TcpStream::connect(addr).await.is_ok()
                {
                    return Ok(addrs);
                }
            }
            Err(e) if tokio::time::Instant::now() >= deadline => {
                return Err(e).with_context(|| format!("resolving {hostport}"));
            }
            Err(_) => {}
        }
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!("{hostport} not reachable within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

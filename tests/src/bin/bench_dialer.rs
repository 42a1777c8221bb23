//! `bench_dialer`: how closely the campaign dialer keeps its pace with a long queue.
//!
//! Real control, relay and redis-server on loopback, the fake Twilio REST API (every
//! request validated against Twilio's spec, signed status callbacks through the relay).
//! For each `--cps` rate: a campaign of `--numbers` numbers (10,000: the bulk-add limit of
//! one request) at that rate with `--max-concurrent` live calls allowed (so the pace, not
//! the cap, is the limit), every number busy after `--ring-ms`; after `--secs` seconds of
//! dialling the campaign is cancelled. From the fake's own request log (accepted creates
//! and their times): the sustained rate over the window (starts − 1 over first-to-last),
//! its ratio to the configured rate, the most starts in any 1-second window (the token
//! bucket allows 1 + rate), the gaps between starts (p50, p99, max, against the ideal
//! 1000/rate ms), the creates the fake refused, and control's CPU per create.
//!
//! Loopback only; bounded: each rate stops after `--secs` plus a settle. Usage: see
//! `scripts/bench-dialer.sh`. Writes a JSON result (`--out`, default
//! `bench-results/dialer.json`) with where it came from (`bench::provenance`).

use std::time::Duration;

use anyhow::{Context, ensure};
use callbridge_proto::pb;
use callbridge_testkit::fake_realtime::FakeRealtime;
use callbridge_testkit::fake_twilio_rest::{FakeTwilio, FakeTwilioConfig, Lifecycle};
use callbridge_tests::bench::{
    clock_ticks_per_sec, load_average, machine, max_in_window, percentile, process_cpu_ms,
    provenance, write_result,
};
use callbridge_tests::{TWILIO_TOKEN, World, agent_settings};
use clap::Parser;
use serde_json::{Value, json};
use tokio::time::Instant;

const ACCOUNT: &str = "AC00000000000000000000000000000b0d";

/// Dialer pacing benchmark (see the module docs). Loopback only.
#[derive(Debug, Parser)]
#[command(name = "bench_dialer")]
struct Args {
    /// Numbers queued in each campaign (one AddCampaignNumbers request each 10,000).
    #[arg(long, default_value_t = 10_000)]
    numbers: usize,
    /// Configured rates (calls started per second), one campaign each.
    #[arg(long, value_delimiter = ',', default_value = "10,50,100")]
    cps: Vec<f64>,
    /// Seconds of dialling measured per rate.
    #[arg(long, default_value_t = 30)]
    secs: u64,
    /// The campaign's cap on live calls (1..=1000).
    #[arg(long, default_value_t = 1000)]
    max_concurrent: u32,
    /// Ring time of every (busy) number at the fake Twilio, ms.
    #[arg(long, default_value_t = 200)]
    ring_ms: u64,
    /// Result file.
    #[arg(long, default_value = "bench-results/dialer.json")]
    out: String,
}

fn number(campaign: usize, i: usize) -> String {
    format!("+1{:03}{:07}", 200 + campaign, i)
}

/// Accepted creates of `campaign`'s numbers: their times since the fake started, in order.
fn create_times(twilio: &FakeTwilio, prefix: &str) -> (Vec<Duration>, usize) {
    let mut accepted = Vec::new();
    let mut refused = 0;
    for r in twilio.requests() {
        if !r.is_create() || !r.param("To").is_some_and(|t| t.starts_with(prefix)) {
            continue;
        }
        if r.status < 300 {
            accepted.push(r.at);
        } else {
            refused += 1;
        }
    }
    accepted.sort();
    (accepted, refused)
}

async fn run_rate(
    world: &World,
    twilio: &FakeTwilio,
    agent: &str,
    args: &Args,
    index: usize,
    cps: f64,
) -> anyhow::Result<Value> {
    let mut calls = world.calls();
    let id = format!("pace{index}");
    let prefix = format!("+1{:03}", 200 + index);
    calls
        .create_campaign(pb::CreateCampaignRequest {
            campaign_id: id.clone(),
            settings: Some(pb::CampaignSettings {
                agent_id: agent.to_owned(),
                from: "+14155550100".to_owned(),
                calls_per_second: cps,
                max_concurrent: args.max_concurrent,
                retry: None,
                dial: None,
                calling_window: None,
            }),
        })
        .await
        .context("CreateCampaign")?;
    let numbers: Vec<pb::CampaignNumber> = (0..args.numbers)
        .map(|i| pb::CampaignNumber {
            number: number(index, i),
            ..Default::default()
        })
        .collect();
    for chunk in numbers.chunks(10_000) {
        calls
            .add_campaign_numbers(pb::AddCampaignNumbersRequest {
                campaign_id: id.clone(),
                numbers: chunk.to_vec(),
            })
            .await
            .context("AddCampaignNumbers")?;
    }
    let clk = clock_ticks_per_sec();
    let control_pid = world.control.pid().unwrap_or_default();
    let cpu0 = process_cpu_ms(control_pid, clk).unwrap_or(f64::NAN);
    let req = pb::CampaignRequest {
        campaign_id: id.clone(),
    };
    calls
        .start_campaign(req.clone())
        .await
        .context("StartCampaign")?;
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.secs)).await;
    calls
        .pause_campaign(req.clone())
        .await
        .context("PauseCampaign")?;
    let cpu1 = process_cpu_ms(control_pid, clk).unwrap_or(f64::NAN);
    let elapsed = started.elapsed().as_secs_f64();
    let dialled = calls
        .get_campaign(req.clone())
        .await
        .context("GetCampaign")?
        .into_inner()
        .progress
        .unwrap_or_default()
        .dialled;
    calls.cancel_campaign(req).await.context("CancelCampaign")?;
    // Let the last ringing calls end before the next rate.
    tokio::time::sleep(Duration::from_millis(args.ring_ms + 1500)).await;

    let (times, refused) = create_times(twilio, &prefix);
    ensure!(times.len() >= 2, "rate {cps}: {} creates", times.len());
    let span = (times[times.len() - 1] - times[0]).as_secs_f64();
    let rate = (times.len() - 1) as f64 / span;
    let mut gaps: Vec<f64> = times
        .windows(2)
        .map(|w| (w[1] - w[0]).as_secs_f64() * 1000.0)
        .collect();
    gaps.sort_by(f64::total_cmp);
    let most_1s = max_in_window(&times, Duration::from_secs(1));
    let row = json!({
        "configured_cps": cps,
        "numbers_queued": args.numbers,
        "creates": times.len(),
        "dialled_per_control": dialled,
        "window_secs": elapsed,
        "sustained_cps": rate,
        "accuracy": rate / cps,
        "max_starts_in_1s": most_1s,
        "bucket_bound_1s": 1 + cps as usize,
        "gap_ideal_ms": 1000.0 / cps,
        "gap_p50_ms": percentile(&gaps, 50.0),
        "gap_p99_ms": percentile(&gaps, 99.0),
        "gap_max_ms": gaps.last(),
        "creates_refused": refused,
        "control_cpu_ms_per_create": (cpu1 - cpu0) / times.len() as f64,
    });
    println!(
        "{cps:>6.0} {:>8} {:>9.2} {:>8.3} {:>6}/{:<4} {:>7.1} {:>7.1} {:>7.1} {:>7.1} {:>7} {:>8.3}",
        times.len(),
        rate,
        rate / cps,
        most_1s,
        1 + cps as usize,
        1000.0 / cps,
        percentile(&gaps, 50.0).unwrap_or(f64::NAN),
        percentile(&gaps, 99.0).unwrap_or(f64::NAN),
        gaps.last().copied().unwrap_or(f64::NAN),
        refused,
        (cpu1 - cpu0) / times.len() as f64,
    );
    Ok(row)
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    ensure!(
        args.cps.iter().all(|&c| c > 0.0 && c <= 100.0),
        "--cps: each rate 0 < x <= 100 (the campaign's limit)"
    );
    ensure!(args.numbers > 0, "--numbers must be positive");
    let mut cfg = FakeTwilioConfig::new(ACCOUNT, TWILIO_TOKEN);
    cfg.default_lifecycle = Lifecycle::Busy {
        ring_ms: args.ring_ms,
    };
    let twilio = FakeTwilio::start(cfg).await.context("fake Twilio")?;
    let world = World::builder(FakeRealtime::builder())
        .dials_through(&twilio)
        .control_env("CONTROL_LOG", "warn")
        .relay_env("RELAY_LOG", "warn")
        .start()
        .await;
    world.answer_from(&twilio);
    let agent = world
        .create_agent("dialer", agent_settings("dialer", None))
        .await;
    let machine =
        machine("control, relay, redis-server, the fake Twilio and this process share these cores");
    println!(
        "dialer pace: {} numbers queued per campaign, {} s per rate, max {} live, busy after {} ms; \
         load average at start {:?}",
        args.numbers,
        args.secs,
        args.max_concurrent,
        args.ring_ms,
        load_average()
    );
    println!(
        "{:>6} {:>8} {:>9} {:>8} {:>11} {:>7} {:>7} {:>7} {:>7} {:>7} {:>8}",
        "cps",
        "creates",
        "sustained",
        "ratio",
        "max 1s/bnd",
        "gap id",
        "gap 50",
        "gap 99",
        "gap max",
        "refused",
        "cpu/cr"
    );
    let mut rows = Vec::new();
    for (i, &cps) in args.cps.iter().enumerate() {
        rows.push(run_rate(&world, &twilio, &agent, &args, i, cps).await?);
    }
    let doc = json!({
        "bench": "dialer",
        "provenance": provenance(),
        "machine": machine,
        "load_average_at_end": load_average(),
        "args": {
            "numbers": args.numbers,
            "secs": args.secs,
            "max_concurrent": args.max_concurrent,
            "ring_ms": args.ring_ms,
        },
        "rates": rows,
    });
    write_result(std::path::Path::new(&args.out), &doc)
        .with_context(|| format!("writing {}", args.out))?;
    println!("result file: {}", args.out);
    Ok(())
}

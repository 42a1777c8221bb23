//! `bench_survive`: how long a caller goes unheard when a call moves under them.
//!
//! Real relays, control and redis-server on loopback (binaries from `CALLBRIDGE_BIN_DIR`,
//! else this executable's directory), the fake model, simulated callers. Three figures:
//! - **reconnect gap**: the model socket closes mid-call; time from the close to the new
//!   session receiving the caller's audio again (the model hears the caller again);
//! - **hand-off gap**: a relay gets SIGTERM and hands its calls off; time from the old
//!   stream's close to the new stream being open on another relay (Twilio plays nothing
//!   and hears nothing in between);
//! - **failover gap**: a relay gets SIGKILL; the same, from the abnormal close.
//! - **outage fallback**: the model endpoint hangs (connect timeout); time from the voice
//!   webhook to the fallback TwiML in the caller's hand, with the circuit breaker off,
//!   for the calls that open it, and for the calls it then sends away from the webhook.
//!
//! The `<Connect action>` request is made at once (real Twilio adds its own reaction
//! time). Usage: `bench_survive [--calls N] [--reconnects N] [--outage-calls N]`; see scripts/bench-survive.sh.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, bail};
use callbridge_testkit::conversation::Conversation;
use callbridge_testkit::eventually;
use callbridge_testkit::fake_realtime::FakeRealtime;
use callbridge_testkit::sim_caller::{CallReport, LoadBalancer, SimCaller};
use callbridge_tests::bench::{load_average, machine, percentile, provenance, write_result};
use callbridge_tests::stored_turns::numbered_script;
use callbridge_tests::{World, agent_settings, with_timeout};
use serde_json::{Value, json};

const CALL: Duration = Duration::from_secs(120);

fn arg(name: &str, default: usize) -> anyhow::Result<usize> {
    let args: Vec<String> = std::env::args().collect();
    match args.iter().position(|a| a == name) {
        Some(i) => args
            .get(i + 1)
            .context("missing value")?
            .parse()
            .with_context(|| format!("{name} takes a number")),
        None => Ok(default),
    }
}

/// Prints one figure's line and returns it for the result file: n, p50, p99, max (ms).
fn summary(name: &str, mut ms: Vec<f64>) -> Value {
    if ms.is_empty() {
        println!("{name:<16} no samples");
        return json!({"n": 0});
    }
    ms.sort_by(f64::total_cmp);
    let at = |p: f64| percentile(&ms, p).unwrap_or(f64::NAN);
    let (p50, p99, max) = (at(50.0), at(99.0), ms[ms.len() - 1]);
    println!(
        "{name:<16} n={:<4} p50={p50:>7.1} ms  p99={p99:>7.1} ms  max={max:>7.1} ms",
        ms.len(),
    );
    json!({"n": ms.len(), "p50_ms": p50, "p99_ms": p99, "max_ms": max})
}

/// The `--out` argument: where the JSON result goes.
fn out_path() -> anyhow::Result<std::path::PathBuf> {
    let args: Vec<String> = std::env::args().collect();
    match args.iter().position(|a| a == "--out") {
        Some(i) => Ok(args.get(i + 1).context("--out takes a path")?.into()),
        None => Ok("bench-results/survive.json".into()),
    }
}

/// Gaps between consecutive legs of each call: old stream closed → new stream open.
fn leg_gaps(reports: &[CallReport]) -> Vec<f64> {
    let mut out = Vec::new();
    for r in reports {
        for pair in r.legs.windows(2) {
            let closed = pair[0].opened_at_ms + pair[0].duration_ms;
            out.push(pair[1].opened_at_ms.saturating_sub(closed) as f64);
        }
    }
    out
}

async fn reconnect_gaps(samples: usize) -> anyhow::Result<Vec<f64>> {
    let turns = 40;
    // Every session dies 3 s after it opens; the call keeps reconnecting. A session that
    // lived longer than RELAY_MODEL_RECONNECT_SECS starts a fresh outage, so every
    // sample is a first attempt (no backoff).
    let fake = FakeRealtime::builder()
        .script(numbered_script(turns))
        .speed(2.0)
        .close_after(Duration::from_millis(3000));
    let world = World::builder(fake)
        .relay_env("RELAY_MODEL_RECONNECT_SECS", "2")
        .relay_env("RELAY_LOG", "warn")
        .start()
        .await;
    world
        .default_agent(agent_settings("bench-reconnect", Some("Hello there")))
        .await;
    let mut cfg = world.caller(numbered_script(turns));
    cfg.answer_wait = Duration::from_secs(2);
    let handle = SimCaller::new(cfg).start();
    let fake = &world.fake;
    if !eventually(CALL, || fake.connections_accepted() as usize > samples).await {
        bail!("the call did not reconnect {samples} times");
    }
    handle
        .command(callbridge_testkit::sim_caller::CallerCommand::Stop)
        .await;
    let _ = with_timeout(CALL, "the call", handle.join()).await;
    let mut conns = world.fake.connections();
    conns.sort_by_key(|c| c.opened_at);
    Ok(conns
        .windows(2)
        .filter_map(|w| {
            let (closed, heard) = (w[0].closed_at?, w[1].first_append_at?);
            Some(heard.saturating_duration_since(closed).as_secs_f64() * 1000.0)
        })
        .take(samples)
        .collect())
}

async fn moved_calls(calls: usize, kill: bool) -> anyhow::Result<Vec<CallReport>> {
    let turns = 16;
    let mut world = World::builder(
        FakeRealtime::builder()
            .script(numbered_script(turns))
            .speed(2.0),
    )
    .relays(3)
    .relay_env("RELAY_DRAIN_GRACE_SECS", "30")
    .relay_env("RELAY_LOG", "warn")
    .start()
    .await;
    world
        .default_agent(agent_settings("bench-move", Some("Hello there")))
        .await;
    // Every call on relay 0, the one that goes away.
    let lb: Arc<LoadBalancer> = LoadBalancer::new(world.relay_addrs());
    lb.set_in_rotation(world.relays[1].addr, false);
    lb.set_in_rotation(world.relays[2].addr, false);
    let mut handles = Vec::new();
    for _ in 0..calls {
        let mut cfg = world.caller(numbered_script(turns));
        cfg.relays = lb.clone();
        cfg.follow_streams = 2;
        cfg.assume_action_after_abnormal_close();
        cfg.answer_wait = Duration::from_secs(5);
        handles.push(SimCaller::new(cfg).start());
    }
    let lives: Vec<_> = handles.iter().map(|h| h.live.clone()).collect();
    if !eventually(CALL, || {
        lives
            .iter()
            .all(|l| l.turns_spoken.load(Ordering::SeqCst) >= 2)
    })
    .await
    {
        bail!("the calls did not get going");
    }
    lb.set_in_rotation(world.relays[1].addr, true);
    lb.set_in_rotation(world.relays[2].addr, true);
    lb.set_in_rotation(world.relays[0].addr, false);
    if kill {
        world.relays[0].kill();
    } else {
        world.relays[0].terminate().context("SIGTERM")?;
    }
    let mut reports = Vec::new();
    for h in handles {
        reports.push(with_timeout(CALL, "a call", h.join()).await?);
    }
    Ok(reports)
}

/// Time from the voice webhook to the fallback TwiML in hand, for `calls` calls one after
/// the other while the model endpoint hangs (accepts TCP, never answers the handshake).
/// Returns the times of the calls that dialled and of those the breaker sent away.
async fn outage_fallbacks(
    calls: usize,
    breaker_failures: &str,
) -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
    let world = World::builder(FakeRealtime::builder().hanging())
        .relay_env("RELAY_MODEL_RECONNECT_SECS", "0")
        .relay_env("RELAY_MODEL_BREAKER_FAILURES", breaker_failures)
        // No probe during the run: every call after the opening ones meets an open breaker.
        .relay_env("RELAY_MODEL_BREAKER_PROBE_MS", "60000")
        .relay_env("RELAY_LOG", "warn")
        .start()
        .await;
    let mut settings = agent_settings("bench-outage", Some("Hello there"));
    settings.fallback = Some(callbridge_proto::pb::Fallback {
        action: Some(callbridge_proto::pb::fallback::Action::DialNumber(
            "+14155550111".to_owned(),
        )),
        preamble: String::new(),
    });
    world.default_agent(settings).await;
    let (mut dialled, mut sent_away) = (Vec::new(), Vec::new());
    for _ in 0..calls {
        let mut cfg = world.caller(Conversation::default());
        cfg.hang_up_at_end = false;
        let started = std::time::Instant::now();
        let report = with_timeout(CALL, "a call in the outage", SimCaller::new(cfg).run()).await?;
        let ms = started.elapsed().as_secs_f64() * 1000.0;
        let fallback = report
            .last_after()
            .or(report.webhook.twiml.as_ref())
            .and_then(|t| t.dial_number.clone());
        if fallback.as_deref() != Some("+14155550111") {
            bail!("the caller did not get the fallback: {report:?}");
        }
        if report.legs.is_empty() {
            sent_away.push(ms);
        } else {
            dialled.push(ms);
        }
    }
    Ok((dialled, sent_away))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    if std::env::args().any(|a| a == "--help" || a == "-h") {
        println!(
            "bench_survive [--calls N (default 20)] [--reconnects N (default 15)] \
             [--outage-calls N (default 6)] [--out FILE (default bench-results/survive.json)]"
        );
        return Ok(());
    }
    let calls = arg("--calls", 20)?;
    let reconnects = arg("--reconnects", 15)?;
    let outage_calls = arg("--outage-calls", 6)?;
    let out = out_path()?;
    let machine =
        machine("relays, control, redis-server, fake model and callers share these cores");
    println!(
        "bench_survive: {calls} calls per relay event, {reconnects} model reconnects (loopback, fake model)"
    );
    let reconnect = reconnect_gaps(reconnects).await?;
    let handoff = moved_calls(calls, false).await?;
    let handoff_moved = handoff.iter().filter(|r| r.legs.len() > 1).count();
    let failover = moved_calls(calls, true).await?;
    let failover_moved = failover.iter().filter(|r| r.legs.len() > 1).count();
    // With the breaker off every call waits out the dial timeout; with it on (after 2
    // failures) the calls after those get the fallback from the webhook.
    let (no_breaker, _) = outage_fallbacks(outage_calls, "0").await?;
    let (opening, short_circuited) = outage_fallbacks(outage_calls, "2").await?;
    let figures = json!({
        "reconnect_gap": summary("reconnect gap", reconnect),
        "handoff_gap": summary("hand-off gap", leg_gaps(&handoff)),
        "failover_gap": summary("failover gap", leg_gaps(&failover)),
        "outage_no_breaker": summary("outage, no brk", no_breaker),
        "outage_opening": summary("outage, opening", opening),
        "outage_open": summary("outage, open", short_circuited),
    });
    let by_caller = |reports: &[CallReport]| {
        reports
            .iter()
            .filter(|r| {
                r.legs.last().is_some_and(|l| {
                    l.closed_by == callbridge_testkit::sim_caller::ClosedBy::Caller
                })
            })
            .count()
    };
    let (handoff_finished, failover_finished) = (by_caller(&handoff), by_caller(&failover));
    println!(
        "calls moved: hand-off {handoff_moved}/{calls}, failover {failover_moved}/{calls}; \
         finished by the caller: hand-off {handoff_finished}/{calls}, failover {failover_finished}/{calls}"
    );
    let doc = json!({
        "bench": "survive",
        "provenance": provenance(),
        "machine": machine,
        "load_average_at_end": load_average(),
        "args": {"calls": calls, "reconnects": reconnects, "outage_calls": outage_calls,
                 "profile": if cfg!(debug_assertions) { "debug" } else { "release" }},
        "figures": figures,
        "calls_moved": {"handoff": handoff_moved, "failover": failover_moved},
        "finished_by_caller": {"handoff": handoff_finished, "failover": failover_finished},
    });
    write_result(&out, &doc).with_context(|| format!("writing {}", out.display()))?;
    println!("wrote {}", out.display());
    Ok(())
}

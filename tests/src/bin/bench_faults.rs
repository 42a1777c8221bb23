//! `bench_faults`: the fault table of `docs/resilience.md` — what a fault costs the calls
//! that are live when it happens.
//!
//! Real relays, control and redis-server on loopback (binaries from `CALLBRIDGE_BIN_DIR`,
//! else this executable's directory), the fake model, simulated callers. For each fault, a
//! fresh world, `--calls` calls of `--turns` scripted turns started 337 ms apart on relay 0;
//! once every call has spoken two turns, the fault; then every call runs to its end. Per
//! fault:
//!
//! - **completed**: calls whose every scripted turn was spoken and answered exactly once
//!   (across streams) and that the caller ended;
//! - **frames lost**: caller frames sent (all calls) minus frames the fake model received
//!   (all sessions); a reconnect resends the caller's untranscribed audio, so this can be
//!   negative there;
//! - **switch gap** p50/p99: old stream closed → new stream open (relay faults), or the
//!   model socket closed → the new session hearing the caller (model drop); `—` where the
//!   stream does not move;
//! - **acknowledged events lost**: events control had stored — and so acknowledged —
//!   just before the fault that are not stored, unchanged, once the calls ended (of how
//!   many there were);
//! - **transcript lines missing**: lines the store lacks after the calls ended, compared
//!   with what the script says for the turns the callers spoke. Unlike the column before,
//!   this counts what was in flight at the fault: a turn whose events a SIGKILLed relay
//!   had not yet sent is lost with it. The fake model names the caller's turns by its
//!   script, not by the audio, and a resumed stream's session goes on after the last
//!   stored caller line, so after such a loss every later line is named one turn early;
//!   the lines are therefore matched stream by stream ([`stored_turns`]), and the turn
//!   reported missing is the one lost, not the call's last.
//!
//! The faults: `sigterm` (relay 0 drains and hands its calls off), `sigkill` (relay 0
//! killed), `control` (control killed and restarted), `redis` (redis-server stopped with
//! SIGTERM and started again on its data, `appendonly yes`, `appendfsync everysec`), `model`
//! (every model session closed by the fake 4 s after it opened).
//!
//! The `<Connect action>` request is made at once after a stream ends, also after an
//! abnormal close (real Twilio adds its own reaction time; whether it asks after an
//! abnormal close is an assumption, docs/resilience.md). Usage:
//! `bench_faults [--calls N] [--turns N] [--only FAULT]`; see scripts/bench-faults.sh.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, bail};
use callbridge_proto::pb;
use callbridge_testkit::conversation::Conversation;
use callbridge_testkit::eventually;
use callbridge_testkit::fake_realtime::{FakeRealtime, FakeRealtimeBuilder};
use callbridge_testkit::sim_caller::{CallReport, ClosedBy, LoadBalancer, SimCaller};
use callbridge_tests::bench::{load_average, machine, percentile, provenance, write_result};
use callbridge_tests::stored_turns::numbered_script;
use callbridge_tests::{World, WorldBuilder, agent_settings, stored_turns, with_timeout};
use serde_json::{Value, json};

const CALL: Duration = Duration::from_secs(180);
/// Between two calls' starts.
const STAGGER: Duration = Duration::from_millis(337);
/// Bytes of one 20 ms μ-law frame.
const FRAME_BYTES: u64 = 160;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    Sigterm,
    Sigkill,
    Control,
    Redis,
    Model,
}

impl Fault {
    const ALL: [Fault; 5] = [
        Fault::Sigterm,
        Fault::Sigkill,
        Fault::Control,
        Fault::Redis,
        Fault::Model,
    ];

    fn name(self) -> &'static str {
        match self {
            Fault::Sigterm => "sigterm",
            Fault::Sigkill => "sigkill",
            Fault::Control => "control",
            Fault::Redis => "redis",
            Fault::Model => "model",
        }
    }

    fn moves_the_stream(self) -> bool {
        matches!(self, Fault::Sigterm | Fault::Sigkill)
    }
}

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn count(name: &str, default: usize, max: usize) -> anyhow::Result<usize> {
    let n = match arg(name) {
        Some(v) => v.parse().with_context(|| format!("{name} {v}"))?,
        None => default,
    };
    if n == 0 || n > max {
        bail!("{name} must be 1..={max}");
    }
    Ok(n)
}

/// One fault's figures.
struct Row {
    fault: Fault,
    calls: usize,
    completed: usize,
    frames_sent: u64,
    frames_received: u64,
    gaps_ms: Vec<f64>,
    lines_missing: usize,
    acked_before: usize,
    acked_lost: usize,
}

fn world(fault: Fault, turns: usize) -> WorldBuilder {
    let mut fake: FakeRealtimeBuilder = FakeRealtime::builder()
        .script(numbered_script(turns))
        .speed(2.0);
    if fault == Fault::Model {
        fake = fake.close_after(Duration::from_millis(4000));
    }
    let mut builder = World::builder(fake)
        .relays(3)
        .relay_env("RELAY_DRAIN_GRACE_SECS", "30")
        .relay_env("RELAY_MODEL_RECONNECT_SECS", "3")
        .relay_env("RELAY_LOG", "warn")
        .control_env("CONTROL_LOG", "warn");
    if fault == Fault::Redis {
        builder = builder.redis_aof("everysec");
    }
    builder
}

fn call_id_of(report: &CallReport) -> Option<String> {
    report
        .webhook
        .twiml
        .as_ref()
        .and_then(|t| t.parameter("callId"))
        .map(str::to_owned)
}

/// Every scripted turn spoken exactly once across the call's streams, and the caller
/// ended the call.
fn completed(report: &CallReport, turns: usize) -> bool {
    let mut spoken: Vec<usize> = report
        .legs
        .iter()
        .flat_map(|l| l.turns_spoken.iter().copied())
        .collect();
    spoken.sort_unstable();
    spoken == (0..turns).collect::<Vec<_>>()
        && report
            .legs
            .last()
            .is_some_and(|l| l.closed_by == ClosedBy::Caller)
}

/// Lines the script puts in the transcript for the turns spoken that the store lacks,
/// matched stream by stream with the names each stream's session gives its turns
/// ([`stored_turns`]): a turn lost whole with a killed relay is reported as itself, not
/// as the call's last line.
fn lines_missing(
    stored: &[pb::CallEvent],
    report: &CallReport,
    script: &Conversation,
) -> anyhow::Result<usize> {
    let legs: Vec<Vec<usize>> = report
        .legs
        .iter()
        .filter(|l| l.refused_status.is_none())
        .map(|l| l.turns_spoken.clone())
        .collect();
    let missing = stored_turns::missing_lines(stored, &legs, script).map_err(anyhow::Error::msg)?;
    if !missing.is_empty() {
        let lines: Vec<String> = missing
            .iter()
            .map(|m| match m.turn {
                Some(turn) => format!("stream {} turn {turn} {}: {:?}", m.leg, m.who, m.text),
                None => format!("stream {} greeting: {:?}", m.leg, m.text),
            })
            .collect();
        eprintln!("  missing from the store: {lines:?}");
    }
    Ok(missing.len())
}

/// The events stored for a live call right now: the call's `last_seq`, then that many
/// from `WatchCall` (which replays what is stored before it streams what comes).
async fn stored_now(world: &World, call_id: &str) -> anyhow::Result<Vec<pb::CallEvent>> {
    let last = world.get_call(call_id).await.last_seq;
    let mut stream = world
        .calls()
        .watch_call(pb::WatchCallRequest {
            call_id: call_id.to_owned(),
            after_seq: 0,
        })
        .await
        .context("WatchCall")?
        .into_inner();
    let mut events = Vec::new();
    while (events.len() as u64) < last {
        match with_timeout(Duration::from_secs(10), "WatchCall event", stream.message()).await? {
            Some(event) => events.push(event),
            None => break,
        }
    }
    Ok(events)
}

async fn run_fault(fault: Fault, calls: usize, turns: usize) -> anyhow::Result<Row> {
    let script = numbered_script(turns);
    let mut world = world(fault, turns).start().await;
    world
        .default_agent(agent_settings("bench-faults", Some("Hello there")))
        .await;
    // Every call starts on relay 0, the one a relay fault hits.
    let lb: Arc<LoadBalancer> = LoadBalancer::new(world.relay_addrs());
    lb.set_in_rotation(world.relays[1].addr, false);
    lb.set_in_rotation(world.relays[2].addr, false);
    let mut handles = Vec::new();
    for _ in 0..calls {
        let mut cfg = world.caller(script.clone());
        cfg.relays = lb.clone();
        cfg.follow_streams = 3;
        cfg.assume_action_after_abnormal_close();
        cfg.answer_wait = Duration::from_secs(10);
        handles.push(SimCaller::new(cfg).start());
        // Staggered, as calls arrive: the model fault's sessions then close at different
        // moments, and each replacement can be matched with the session it replaced.
        tokio::time::sleep(STAGGER).await;
    }
    let lives: Vec<_> = handles.iter().map(|h| h.live.clone()).collect();
    if !eventually(CALL, || {
        lives
            .iter()
            .all(|l| l.turns_spoken.load(Ordering::SeqCst) >= 2)
    })
    .await
    {
        bail!("{}: the calls did not get going", fault.name());
    }
    // What control has stored (and so acknowledged) before the fault, per call.
    let mut acked_before = Vec::new();
    for live in &lives {
        let twiml = live.stream_twiml(0).context("the webhook's TwiML")?;
        let call_id = twiml.parameter("callId").context("a callId")?.to_owned();
        acked_before.push((call_id.clone(), stored_now(&world, &call_id).await?));
    }
    for addr in world.relay_addrs() {
        lb.set_in_rotation(addr, true);
    }
    match fault {
        Fault::Sigterm | Fault::Sigkill => {
            lb.set_in_rotation(world.relays[0].addr, false);
            if fault == Fault::Sigkill {
                world.relays[0].kill();
            } else {
                world.relays[0].terminate().context("SIGTERM")?;
            }
        }
        Fault::Control => world.restart_control().await,
        Fault::Redis => {
            // As an orchestrator restarts it: SIGTERM (Redis syncs its append-only file),
            // then a new server on the same port and data.
            world
                .redis
                .shutdown(Duration::from_secs(10))
                .context("redis SIGTERM")?;
            world.redis.restart().context("redis restart")?;
        }
        // The fake closes every session on its own.
        Fault::Model => {}
    }
    let mut reports = Vec::new();
    for h in handles {
        reports.push(with_timeout(CALL, "a call", h.join()).await?);
    }
    let mut lines = 0;
    for report in &reports {
        let Some(call_id) = call_id_of(report) else {
            bail!("{}: a call without a call id: {report:?}", fault.name());
        };
        world.wait_ended(&call_id, Duration::from_secs(30)).await;
        let stored = world.stored_events(&call_id).await;
        let missing = lines_missing(&stored, report, &script)
            .with_context(|| format!("{}: call {call_id}", fault.name()))?;
        lines += missing;
    }
    // Acknowledged events lost: stored before the fault, not stored (the same) after it.
    let mut acked_lost = 0;
    for (call_id, before) in &acked_before {
        let after = world.stored_events(call_id).await;
        acked_lost += before
            .iter()
            .filter(|e| after.iter().find(|a| a.seq == e.seq) != Some(e))
            .count();
    }
    let conns = world.fake.connections();
    let frames_received = conns.iter().map(|c| c.appended_audio_bytes).sum::<u64>() / FRAME_BYTES;
    let gaps_ms = if fault.moves_the_stream() {
        reports
            .iter()
            .flat_map(|r| {
                r.legs.windows(2).map(|pair| {
                    let closed = pair[0].opened_at_ms + pair[0].duration_ms;
                    pair[1].opened_at_ms.saturating_sub(closed) as f64
                })
            })
            .collect()
    } else if fault == Fault::Model {
        // Sessions carry no call id, so a closed session is matched with the session that
        // replaced it by time: the one other session opened within 250 ms of the close.
        // A close with none or several such sessions (another call's reconnect at the
        // same moment) is left out, so `n` says how many gaps were matched.
        let window = Duration::from_millis(250);
        conns
            .iter()
            .filter_map(|c| {
                let closed = c.closed_at?;
                // (The fake stamps its close once the close handshake is over, by which
                // time the relay may already have the next session open.)
                let mut next = conns.iter().filter(|n| {
                    n.opened_at.is_some_and(|o| {
                        !std::ptr::eq(*n, c)
                            && (o.saturating_duration_since(closed) <= window
                                && closed.saturating_duration_since(o) <= window)
                    })
                });
                match (next.next(), next.next()) {
                    (Some(n), None) => n.first_append_at.map(|heard| {
                        heard.saturating_duration_since(closed).as_secs_f64() * 1000.0
                    }),
                    _ => None,
                }
            })
            .collect()
    } else {
        Vec::new()
    };
    Ok(Row {
        fault,
        calls,
        completed: reports.iter().filter(|r| completed(r, turns)).count(),
        frames_sent: reports
            .iter()
            .flat_map(|r| r.legs.iter().map(|l| l.frames_sent))
            .sum(),
        frames_received,
        gaps_ms,
        lines_missing: lines,
        acked_before: acked_before.iter().map(|(_, e)| e.len()).sum(),
        acked_lost,
    })
}

/// A row for the result file.
fn row_json(row: &Row) -> Value {
    let mut gaps = row.gaps_ms.clone();
    gaps.sort_by(f64::total_cmp);
    let at = |p: f64| percentile(&gaps, p);
    json!({
        "fault": row.fault.name(),
        "calls": row.calls,
        "completed": row.completed,
        "frames_sent": row.frames_sent,
        "frames_received": row.frames_received,
        "switch_gap_ms": {"p50": at(50.0), "p99": at(99.0), "n": gaps.len()},
        "acked_events_before": row.acked_before,
        "acked_events_lost": row.acked_lost,
        "transcript_lines_missing": row.lines_missing,
    })
}

fn print_row(row: &Row) {
    let mut gaps = row.gaps_ms.clone();
    gaps.sort_by(f64::total_cmp);
    let gap = if gaps.is_empty() {
        "—".to_owned()
    } else {
        let at = |p: f64| percentile(&gaps, p).unwrap_or(f64::NAN);
        format!("{:.1} / {:.1} ms (n={})", at(50.0), at(99.0), gaps.len())
    };
    let lost = i128::from(row.frames_sent) - i128::from(row.frames_received);
    println!(
        "| {} | {}/{} | {lost} of {} | {gap} | {} of {} | {} |",
        row.fault.name(),
        row.completed,
        row.calls,
        row.frames_sent,
        row.acked_lost,
        row.acked_before,
        row.lines_missing
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    if std::env::args().any(|a| a == "--help" || a == "-h") {
        println!(
            "bench_faults [--calls N (default 10, at most 100)] [--turns N (default 16, at most 60)] \
             [--only sigterm|sigkill|control|redis|model] [--out FILE (default bench-results/faults.json)]"
        );
        return Ok(());
    }
    let calls = count("--calls", 10, 100)?;
    let turns = count("--turns", 16, 60)?;
    let faults: Vec<Fault> = match arg("--only") {
        Some(name) => vec![
            *Fault::ALL
                .iter()
                .find(|f| f.name() == name)
                .with_context(|| format!("--only {name}: no such fault"))?,
        ],
        None => Fault::ALL.to_vec(),
    };
    println!(
        "bench_faults: {calls} calls of {turns} turns per fault (loopback, fake model, 3 relays)"
    );
    println!(
        "| fault | calls completed | frames lost (sent − received) | switch gap p50 / p99 | acknowledged events lost | transcript lines missing |"
    );
    println!("|---|---|---|---|---|---|");
    let machine =
        machine("3 relays, control, redis-server, fake model and callers share these cores");
    let mut rows = Vec::new();
    for fault in faults {
        let row = run_fault(fault, calls, turns).await?;
        print_row(&row);
        rows.push(row_json(&row));
    }
    let out = arg("--out").unwrap_or_else(|| "bench-results/faults.json".to_owned());
    let doc = json!({
        "bench": "faults",
        "provenance": provenance(),
        "machine": machine,
        "load_average_at_end": load_average(),
        "args": {"calls": calls, "turns": turns},
        "rows": rows,
    });
    write_result(std::path::Path::new(&out), &doc).with_context(|| format!("writing {out}"))?;
    println!("result file: {out}");
    Ok(())
}

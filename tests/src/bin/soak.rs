//! `soak`: calls churning through the whole system for a while, watching for growth.
//!
//! Real relay, control and redis-server (append-only file, `appendfsync everysec`, as
//! deployed) on loopback, the fake model talking in real time, simulated callers. `--calls`
//! slots (200) each place one call after another: through the voice webhook, a media
//! stream on the relay, control on Redis; each call lasts a random 20–60 s (the caller
//! hangs up then) and the next starts at once, so about `--calls` calls are always live.
//! Every minute it prints the relay's RSS, open FDs, runtime tasks and threads, control's
//! RSS and FDs, and Redis's `used_memory`; at the end, the slope of each after the
//! warm-up, as % of its mean per 10 minutes (flat: under 1 %). Each RSS is also split:
//! its anonymous part (heap, stacks: where a leak shows) apart from the binary's own file
//! pages, which the kernel maps in as code paths first run (they grow and settle however
//! long the process lives, and are dropped under memory pressure).
//!
//! Finished calls are kept by control for `CONTROL_RETENTION_SECS`; the soak sets it to
//! 60 s so that Redis reaches its steady state (calls expiring as fast as they are stored)
//! within the warm-up. Loopback only; stops by itself after `--minutes` plus the longest
//! call. Usage: `soak [--minutes M] [--calls N] [--warmup-minutes W] [--out FILE]`; see
//! scripts/soak.sh. The result file (default `bench-results/soak.json`) holds every sample,
//! the slopes and where the run came from (`bench::provenance`); `docs/results/` keeps the
//! ones the docs quote, and `scripts/doc_tables.py` writes the docs' table from them.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use callbridge_testkit::conversation::{AgentReply, Conversation, Turn};
use callbridge_testkit::fake_realtime::FakeRealtime;
use callbridge_testkit::sim_caller::{ClosedBy, SimCaller};
use callbridge_tests::bench::{machine, provenance, write_result};
use callbridge_tests::{World, agent_settings, sample};
use serde_json::json;

const MIN_CALL: Duration = Duration::from_secs(20);
const MAX_CALL: Duration = Duration::from_secs(60);
/// Slots start this far apart, so the first calls do not all arrive at once.
const RAMP_STEP: Duration = Duration::from_millis(100);

fn arg(name: &str, default: f64) -> anyhow::Result<f64> {
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

/// Every `--control-env KEY=VALUE`: extra env for control, e.g. the allocator settings its
/// deployment sets, so a soak runs control the way production does.
fn control_envs() -> anyhow::Result<Vec<(String, String)>> {
    let args: Vec<String> = std::env::args().collect();
    let mut out = Vec::new();
    for (i, a) in args.iter().enumerate() {
        if a == "--control-env" {
            let kv = args.get(i + 1).context("--control-env takes KEY=VALUE")?;
            let (k, v) = kv
                .split_once('=')
                .with_context(|| format!("--control-env takes KEY=VALUE, got '{kv}'"))?;
            out.push((k.to_owned(), v.to_owned()));
        }
    }
    Ok(out)
}

/// A conversation longer than any call: the caller's hang-up ends it.
fn script() -> Conversation {
    Conversation {
        greeting: Some(AgentReply::says("Hello, how can I help", 1200)),
        turns: (0..40)
            .map(|n| {
                Turn::new(
                    format!("Caller line {n}"),
                    1500,
                    AgentReply::says(format!("Agent line {n}"), 2000),
                )
            })
            .collect(),
    }
}

/// A small deterministic generator (xorshift64*): call lengths differ, runs repeat.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn call_length(&mut self) -> Duration {
        let span = (MAX_CALL - MIN_CALL).as_millis() as u64;
        MIN_CALL + Duration::from_millis(self.next() % (span + 1))
    }
}

#[derive(Default)]
struct Tally {
    completed: AtomicU64,
    failed: AtomicU64,
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    minute: f64,
    live: f64,
    relay_rss_kib: f64,
    /// Anonymous part of the RSS (heap, stacks): where a leak shows. The rest is the
    /// binary's own pages, mapped in as code paths first run.
    relay_anon_kib: f64,
    relay_fds: f64,
    relay_tasks: f64,
    relay_threads: f64,
    control_rss_kib: f64,
    control_anon_kib: f64,
    control_fds: f64,
    redis_used_kib: f64,
}

impl Sample {
    fn to_json(self) -> serde_json::Value {
        json!({
            "minute": finite(self.minute),
            "live": finite(self.live),
            "relay_rss_kib": finite(self.relay_rss_kib),
            "relay_anon_kib": finite(self.relay_anon_kib),
            "relay_fds": finite(self.relay_fds),
            "relay_tasks": finite(self.relay_tasks),
            "relay_threads": finite(self.relay_threads),
            "control_rss_kib": finite(self.control_rss_kib),
            "control_anon_kib": finite(self.control_anon_kib),
            "control_fds": finite(self.control_fds),
            "redis_used_kib": finite(self.redis_used_kib),
        })
    }
}

/// A figure's name and how to read it from a sample.
type Series = (&'static str, fn(&Sample) -> f64);

fn proc_status(pid: u32, field: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix(field)?
                    .split_whitespace()
                    .next()?
                    .parse()
                    .ok()
            })
        })
        .unwrap_or(f64::NAN)
}

fn open_fds(pid: u32) -> f64 {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(f64::NAN, |d| d.count() as f64)
}

async fn take_sample(world: &World, minute: f64) -> Sample {
    let relay = world.relays[0].pid().unwrap_or_default();
    let control = world.control.pid().unwrap_or_default();
    let metrics = world.relay_metrics_text(0).await;
    let info = world.redis.info("memory").unwrap_or_default();
    let used = info
        .lines()
        .find_map(|l| l.strip_prefix("used_memory:")?.trim().parse::<f64>().ok())
        .unwrap_or(f64::NAN);
    Sample {
        minute,
        live: sample(&metrics, "callbridge_relay_active_calls").unwrap_or(f64::NAN),
        relay_rss_kib: proc_status(relay, "VmRSS:"),
        relay_anon_kib: proc_status(relay, "RssAnon:"),
        relay_fds: open_fds(relay),
        relay_tasks: sample(&metrics, "callbridge_relay_runtime_tasks").unwrap_or(f64::NAN),
        relay_threads: proc_status(relay, "Threads:"),
        control_rss_kib: proc_status(control, "VmRSS:"),
        control_anon_kib: proc_status(control, "RssAnon:"),
        control_fds: open_fds(control),
        redis_used_kib: used / 1024.0,
    }
}

/// Least-squares slope of `y` over minutes, as % of the mean of `y` per 10 minutes.
fn slope_pct_per_10min(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    if points.len() < 2 {
        return f64::NAN;
    }
    let mx = points.iter().map(|p| p.0).sum::<f64>() / n;
    let my = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    let sxx: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    if sxx == 0.0 || my == 0.0 {
        return f64::NAN;
    }
    sxy / sxx * 10.0 / my * 100.0
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let minutes = arg("--minutes", 15.0)?;
    let slots = arg("--calls", 200.0)? as usize;
    let warmup = arg("--warmup-minutes", 3.0)?;
    let out = out_path();
    let extra_control_env = control_envs()?;
    let machine = machine("relay, control, redis-server, fake model and callers share these cores");
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "soak: {slots} calls of 20-60 s for {minutes} min, warm-up {warmup} min; \
         {} CPUs, load average at start {}",
        std::thread::available_parallelism().map_or(0, usize::from),
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );

    let mut builder = World::builder(FakeRealtime::builder().script(script()));
    for (k, v) in &extra_control_env {
        builder = builder.control_env(k, v);
    }
    let world = builder
        .redis_aof("everysec")
        .control_env("CONTROL_RETENTION_SECS", "60")
        .control_env("CONTROL_LOG", "warn")
        .relay_env("RELAY_LOG", "warn")
        .relay_env("RELAY_MAX_CALLS", &(slots * 2).to_string())
        .start()
        .await;
    world
        .default_agent(agent_settings("soak", Some("Hello, how can I help")))
        .await;
    let world = Arc::new(world);
    let tally = Arc::new(Tally::default());
    let started = Instant::now();
    let stop_at = started + Duration::from_secs_f64(minutes * 60.0);

    let mut slots_set = tokio::task::JoinSet::new();
    for slot in 0..slots {
        let world = world.clone();
        let tally = tally.clone();
        slots_set.spawn(async move {
            tokio::time::sleep(RAMP_STEP * slot as u32).await;
            let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (slot as u64 + 1));
            while Instant::now() < stop_at {
                let mut cfg = world.caller(script());
                cfg.max_call = rng.call_length();
                cfg.answer_wait = Duration::from_secs(10);
                let ok = match SimCaller::new(cfg).run().await {
                    Ok(report) => {
                        report.legs.len() == 1
                            && report.legs[0].closed_by == ClosedBy::Caller
                            && report.legs[0].refused_status.is_none()
                    }
                    Err(_) => false,
                };
                let counter = if ok { &tally.completed } else { &tally.failed };
                counter.fetch_add(1, Ordering::Relaxed);
            }
        });
    }

    println!(
        "{:>6} {:>5} {:>9} {:>9} {:>6} {:>7} {:>7} {:>9} {:>10} {:>6} {:>10} {:>10} {:>8}",
        "min",
        "live",
        "completed",
        "failed",
        "r_fds",
        "r_tasks",
        "r_thr",
        "r_rss_KiB",
        "r_anon_KiB",
        "c_fds",
        "c_rss_KiB",
        "c_anon_KiB",
        "redis_KiB"
    );
    let mut samples = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_secs(60));
    tick.tick().await;
    loop {
        tick.tick().await;
        let minute = started.elapsed().as_secs_f64() / 60.0;
        let s = take_sample(&world, minute).await;
        println!(
            "{:>6.1} {:>5} {:>9} {:>9} {:>6} {:>7} {:>7} {:>9} {:>10} {:>6} {:>10} {:>10} {:>8.0}",
            s.minute,
            s.live,
            tally.completed.load(Ordering::Relaxed),
            tally.failed.load(Ordering::Relaxed),
            s.relay_fds,
            s.relay_tasks,
            s.relay_threads,
            s.relay_rss_kib,
            s.relay_anon_kib,
            s.control_fds,
            s.control_rss_kib,
            s.control_anon_kib,
            s.redis_used_kib
        );
        samples.push(s);
        if Instant::now() >= stop_at {
            break;
        }
    }
    // No new calls from here; the running ones end within their length.
    let drained = tokio::time::timeout(MAX_CALL + Duration::from_secs(30), async {
        while slots_set.join_next().await.is_some() {}
    })
    .await
    .is_ok();
    // The relay closes a call just after its caller returned: give the last ones a moment.
    let settle = Instant::now();
    let mut after = take_sample(&world, started.elapsed().as_secs_f64() / 60.0).await;
    while after.live > 0.0 && settle.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(200)).await;
        after = take_sample(&world, started.elapsed().as_secs_f64() / 60.0).await;
    }
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();

    let steady: Vec<&Sample> = samples.iter().filter(|s| s.minute >= warmup).collect();
    let series: [Series; 9] = [
        ("relay RSS", |s| s.relay_rss_kib),
        ("relay RSS anonymous", |s| s.relay_anon_kib),
        ("relay open FDs", |s| s.relay_fds),
        ("relay runtime tasks", |s| s.relay_tasks),
        ("relay threads", |s| s.relay_threads),
        ("control RSS", |s| s.control_rss_kib),
        ("control RSS anonymous", |s| s.control_anon_kib),
        ("control open FDs", |s| s.control_fds),
        ("Redis used_memory", |s| s.redis_used_kib),
    ];
    println!(
        "slopes after the {warmup}-minute warm-up ({} samples), % of the mean per 10 min \
         (flat: |slope| < 1 %):",
        steady.len()
    );
    let mut slopes = serde_json::Map::new();
    for (name, get) in series {
        let points: Vec<(f64, f64)> = steady.iter().map(|s| (s.minute, get(s))).collect();
        let mean = points.iter().map(|p| p.1).sum::<f64>() / points.len().max(1) as f64;
        let pct = slope_pct_per_10min(&points);
        slopes.insert(
            name.to_owned(),
            json!({"mean": finite(mean), "slope_pct_per_10min": finite(pct)}),
        );
        let verdict = match pct {
            p if p.is_nan() => "n/a",
            p if p.abs() < 1.0 => "flat",
            p if p > 0.0 => "GROWS",
            _ => "falls",
        };
        println!("  {name:<20} mean {mean:>10.0}  slope {pct:>+7.2} %/10 min  {verdict}");
    }
    println!(
        "calls completed {}, failed {}; after the last call ended ({}): live {}, relay tasks {}, \
         relay FDs {}, control FDs {}; load average at end {}",
        tally.completed.load(Ordering::Relaxed),
        tally.failed.load(Ordering::Relaxed),
        if drained {
            "all ended"
        } else {
            "some still running"
        },
        after.live,
        after.relay_tasks,
        after.relay_fds,
        after.control_fds,
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    let doc = json!({
        "bench": "soak",
        "provenance": provenance(),
        "machine": machine,
        "load_average_at_end": callbridge_tests::bench::load_average(),
        "args": {
            "minutes": minutes,
            "calls": slots,
            "warmup_minutes": warmup,
            "control_env": extra_control_env
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>(),
        },
        "calls_completed": tally.completed.load(Ordering::Relaxed),
        "calls_failed": tally.failed.load(Ordering::Relaxed),
        "samples": samples.iter().map(|s| s.to_json()).collect::<Vec<_>>(),
        "slopes_after_warmup": slopes,
        "after_last_call": {
            "all_ended": drained,
            "live": finite(after.live),
            "relay_tasks": finite(after.relay_tasks),
            "relay_fds": finite(after.relay_fds),
            "control_fds": finite(after.control_fds),
        },
    });
    write_result(std::path::Path::new(&out), &doc).with_context(|| format!("writing {out}"))?;
    println!("result file: {out}");
    Ok(())
}

/// `--out FILE`, default `bench-results/soak.json`.
fn out_path() -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == "--out")
        .and_then(|i| args.get(i + 1).cloned())
        .unwrap_or_else(|| "bench-results/soak.json".to_owned())
}

/// JSON has no NaN: a figure that could not be read is `null`.
fn finite(v: f64) -> Option<f64> {
    v.is_finite().then_some(v)
}

//! `bench_relay`: how many calls one relay process carries, at what added latency and cost.
//!
//! The REAL `callbridge-relay` binary runs as a child process. This process holds the rest:
//! the fake OpenAI Realtime server in echo mode (every `input_audio_buffer.append` comes
//! straight back as a `response.output_audio.delta`; own runtime, threads `fake-model`) and
//! the load generator (one runtime, threads `loadgen`, one light task per call, frames
//! built once per call). Every 20 ms caller frame carries the call's index and its send
//! time (µs) in its first 12 audio bytes, so the caller times frame → relay → model →
//! relay → caller when the same bytes come back, without a lookup table.
//!
//! For each level N (calls at once) and each path:
//! - `baseline`: the callers speak Realtime straight to the echo fake (no relay): the round
//!   trip the harness itself costs;
//! - `standalone`: voice webhook → `<Stream>` to `/api/twilio/media-stream-simple`;
//! - `production`: the relay has `CONTROL_URL` (real `callbridge-control` + `redis-server`
//!   started here); calls are created with `Calls.CreateCalls` and admitted by the voice
//!   webhook (`?callId=`), so every call attaches and reports its events to Redis.
//!
//! A level: fresh relay process; N calls ramped in (webhook, stream upgrade, `connected`,
//! `start`); wait for the N model sockets; idle window (relay CPU and RSS with every call
//! connected and silent); load window (every call streams 20 ms frames and echoes the
//! relay's marks back, as Twilio does); drain; hang-up (`stop`, close); then the fake's
//! open-connection count must fall back to zero. Figures, not assertions.
//!
//! After the levels: the hang-up check (model sockets left open after each way a caller
//! can hang up) and the cold-start check (frames sent from right after `start`, while the
//! model is still being dialled, must all come back, the first one included).
//!
//!   scripts/bench-relay.sh            (release build, then this binary; --help for knobs)

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail, ensure};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use callbridge_proto::pb;
use callbridge_testkit::fake_realtime::FakeRealtime;
use callbridge_testkit::procs::{Proc, env, free_addr};
use callbridge_testkit::redis_server::{RedisServer, RedisTls};
use callbridge_testkit::signature::twilio_signature;
use callbridge_testkit::sim_caller::{CallerConfig, SimCaller};
use callbridge_tests::bench::{
    PerfCounts, children_named, clock_ticks_per_sec, cpu_count, cpus_allowed, create_calls,
    json_f64 as f, json_u64 as u, load_average, machine, parse_cpu_list, parse_key_value,
    percentile, pin_process, process_cpu_ms, prometheus_samples, provenance, rss_kib,
    thread_cpu_ms, write_result,
};
use callbridge_tests::{Bearer, WorldTls};
use clap::Parser;
use futures_util::stream::SplitSink;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::timeout;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

const APP_TOKEN: &str = "bench-app-token-0123456789abcdef0123";
const RELAY_TOKEN: &str = "bench-relay-token-0123456789abcdef01";
const TWILIO_TOKEN: &str = "bench-twilio";
const OPENAI_KEY: &str = "sk-bench";
/// One 20 ms μ-law frame.
const FRAME_BYTES: usize = 160;
const FRAME: Duration = Duration::from_millis(20);
/// Bytes of the frame that carry (call index u32, send time µs u64); 12 bytes are exactly
/// 16 base64 characters, so they can be patched into a pre-encoded payload.
const STAMP_BYTES: usize = 12;
const STAMP_CHARS: usize = 16;
/// The "call index" of the unstamped frames a call sends to flush a joining fake.
const FILLER: u32 = u32::MAX;
/// Bound on any single setup step (HTTP, handshake, RPC).
const STEP: Duration = Duration::from_secs(20);

/// Relay capacity benchmark: calls, round trip, CPU and memory per call.
#[derive(Debug, Parser)]
struct Args {
    /// Concurrency levels (calls at once), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "10,100,300,1000")]
    calls: Vec<usize>,
    /// Paths to run at every level: baseline, standalone, production.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "baseline,standalone,production"
    )]
    paths: Vec<String>,
    /// Seconds every call streams audio in the load window.
    #[arg(long, default_value_t = 10)]
    secs: u64,
    /// Seconds of the idle window (all calls connected, no audio).
    #[arg(long, default_value_t = 3)]
    idle_secs: u64,
    /// New calls per second while ramping up.
    #[arg(long, default_value_t = 250)]
    ramp_per_sec: u64,
    /// Extra environment for the relay (repeatable), e.g. `--relay-env RELAY_LOG=info`.
    #[arg(long, value_parser = parse_key_value)]
    relay_env: Vec<(String, String)>,
    /// Where the JSON result goes.
    #[arg(long, default_value = "bench-results/relay.json")]
    out: String,
    /// Where the SVG plot goes (empty: none).
    #[arg(long, default_value = "bench-results/relay.svg")]
    svg: String,
    /// Load-generator worker threads.
    #[arg(long, default_value_t = 2)]
    loadgen_threads: usize,
    /// Calls per way of hanging up in the hang-up check (0: skip it).
    #[arg(long, default_value_t = 20)]
    hangup_calls: usize,
    /// Calls per path in the cold-start check: frames from right after `start` (0: skip).
    #[arg(long, default_value_t = 20)]
    coldstart_calls: usize,
    /// Model dial time in the cold-start check, ms: a loopback proxy holds each new model
    /// connection this long before connecting it to the fake (0: straight to the fake).
    #[arg(long, default_value_t = 300)]
    coldstart_dial_ms: u64,
    /// Pin the relay, control and its redis-server to these CPUs (`taskset -c` list, e.g.
    /// `1`). Default: no pinning (with --harness-cpus: the CPUs the bench had before).
    #[arg(long, value_parser = parse_cpu_list)]
    relay_cpus: Option<String>,
    /// Pin this process (load generator and fake model) to these CPUs, before its runtimes
    /// start. Default: no pinning.
    #[arg(long, value_parser = parse_cpu_list)]
    harness_cpus: Option<String>,
    /// Fake-model worker threads.
    #[arg(long, default_value_t = 2)]
    fake_threads: usize,
    /// The fake tells the relay the caller is speaking from the first frame on (and never
    /// stops), so every call keeps its whole resend window, as during a real utterance.
    #[arg(long)]
    speaking: bool,
    /// Sizes of the model's audio deltas, ms, comma-separated (multiples of 20): every
    /// level runs once per size. The echo fake joins the caller's 20 ms appends into
    /// deltas this long (the real API sends larger deltas than Twilio's frames).
    #[arg(long, value_delimiter = ',', default_value = "20")]
    delta_ms: Vec<u32>,
    /// Seconds of the counting window after each load window (calls keep streaming):
    /// system calls, context switches and allocations of the relay per frame, counted by
    /// `perf stat` when it is installed and allowed to trace (0: skip).
    #[arg(long, default_value_t = 2)]
    count_secs: u64,
    /// Production path with TLS on every internal hop: Redis on `rediss://` with a client
    /// certificate, control's gRPC over TLS with client certificates, the relay on an
    /// `https://` CONTROL_URL presenting one (certificates from a CA generated for the run).
    #[arg(long)]
    tls: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    Baseline,
    Standalone,
    Production,
}

impl Path {
    fn name(self) -> &'static str {
        match self {
            Self::Baseline => "baseline",
            Self::Standalone => "standalone",
            Self::Production => "production",
        }
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    ensure!(
        args.calls.iter().all(|&n| (1..=5000).contains(&n)),
        "--calls: each level must be within 1..=5000 (loopback, bounded)"
    );
    ensure!(
        (1..=120).contains(&args.secs) && args.idle_secs <= 60 && args.ramp_per_sec > 0,
        "--secs 1..=120, --idle-secs ≤ 60, --ramp-per-sec > 0"
    );
    ensure!(
        !args.delta_ms.is_empty()
            && args
                .delta_ms
                .iter()
                .all(|&d| (20..=1000).contains(&d) && d % 20 == 0),
        "--delta-ms: each size a multiple of 20 within 20..=1000"
    );
    ensure!(args.count_secs <= 30, "--count-secs ≤ 30");
    ensure!(
        args.hangup_calls <= 1000 && args.coldstart_calls <= 1000 && args.coldstart_dial_ms <= 4000,
        "--hangup-calls ≤ 1000, --coldstart-calls ≤ 1000, --coldstart-dial-ms ≤ 4000 (below the relay's 5 s model connect timeout)"
    );
    let paths = args
        .paths
        .iter()
        .map(|p| match p.as_str() {
            "baseline" => Ok(Path::Baseline),
            "standalone" => Ok(Path::Standalone),
            "production" => Ok(Path::Production),
            other => Err(anyhow!("--paths: unknown path {other:?}")),
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    // Counted before any pinning: the machine's cores, not the harness's share of them.
    let machine = machine("relay, load generator and fake model share these cores");
    let mut args = args;
    if let Some(cpus) = &args.harness_cpus {
        // The processes this one starts inherit its affinity: unless told otherwise they
        // get back the CPUs this process had before.
        if args.relay_cpus.is_none() {
            args.relay_cpus = cpus_allowed(std::process::id()).into_iter().next();
        }
        // Only this thread exists yet; every runtime thread inherits its affinity.
        pin_process(std::process::id(), cpus).context("--harness-cpus")?;
    }
    let args = args;
    // The fake gets its own runtime so its CPU can be told apart (thread names) from the
    // load generator's: both share the machine with the relay.
    let fake_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.fake_threads.max(1))
        .thread_name("fake-model")
        .enable_all()
        .build()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.loadgen_threads.max(1))
        .thread_name("loadgen")
        .enable_all()
        .build()?;
    let echo_fake = |delta_ms: Option<u32>| {
        let speaking = args.speaking;
        async move {
            let builder = FakeRealtime::builder();
            let builder = if speaking {
                builder.echo_speaking()
            } else {
                builder.echo()
            };
            match delta_ms {
                Some(ms) => builder.chunk_ms(ms),
                None => builder,
            }
            .start()
            .await
        }
    };
    // One fake per delta size; the 20 ms one (each append echoed as it came) also serves
    // the hang-up and cold-start checks.
    let fake = fake_rt.block_on(echo_fake(None))?;
    let mut larger = Vec::new();
    for &d in args.delta_ms.iter().filter(|&&d| d != 20) {
        larger.push((d, fake_rt.block_on(echo_fake(Some(d)))?));
    }
    let fakes = Fakes {
        plain: &fake,
        larger: &larger,
    };
    let r = rt.block_on(run(&args, &paths, &fakes, machine));
    drop(larger);
    drop(fake);
    rt.shutdown_timeout(Duration::from_secs(2));
    fake_rt.shutdown_timeout(Duration::from_secs(2));
    r
}

/// The echo fakes, by delta size.
struct Fakes<'a> {
    /// Each append echoed as it came (20 ms deltas).
    plain: &'a FakeRealtime,
    /// Appends joined into larger deltas, by size (ms).
    larger: &'a [(u32, FakeRealtime)],
}

impl Fakes<'_> {
    fn for_delta(&self, ms: u32) -> &FakeRealtime {
        self.larger
            .iter()
            .find(|(d, _)| *d == ms)
            .map_or(self.plain, |(_, f)| f)
    }
}

/// Control + Redis for the production path; kept for the whole run.
struct ControlSide {
    _redis: RedisServer,
    /// The certificates of a `--tls` run (kept while the processes read them).
    tls: Option<WorldTls>,
    control: Proc,
    agent_id: String,
    channel: tonic::transport::Channel,
}

/// Starts Redis and control (pinned to `cpus` when given).
async fn start_control(cpus: Option<&str>, tls: bool) -> anyhow::Result<ControlSide> {
    let tls = if tls {
        Some(WorldTls::generate().context("test certificates")?)
    } else {
        None
    };
    let redis = match &tls {
        Some(tls) => RedisServer::tls(&RedisTls {
            cert: tls.redis_server.cert.clone(),
            key: tls.redis_server.key.clone(),
            client_ca: tls.ca.ca_file().to_owned(),
            require_client_cert: true,
        }),
        None => RedisServer::unix(),
    }
    .context("starting redis-server")?;
    let addr = free_addr()?;
    let mut control_env = env([
        ("CONTROL_LISTEN", &addr.to_string()),
        ("REDIS_URL", &redis.url()),
        ("CONTROL_APP_TOKENS", APP_TOKEN),
        ("CONTROL_RELAY_TOKENS", RELAY_TOKEN),
        ("RELAY_PUBLIC_URL", "http://127.0.0.1:9"),
        ("CONTROL_ID", "control-bench"),
        ("CONTROL_METRICS_LISTEN", ""),
        ("CONTROL_LOG", "warn"),
    ]);
    if let Some(tls) = &tls {
        control_env.extend(tls.control_env());
    }
    let mut control = Proc::spawn("callbridge-control", control_env, addr)
        .context("starting callbridge-control (scripts/bench-relay.sh builds it)")?;
    let client_tls = tls.as_ref().map(|t| t.client_config(Some(&t.client)));
    control
        .wait_grpc_serving_tls(client_tls.clone(), Duration::from_secs(30))
        .await
        .map_err(|e| anyhow!("control not serving: {e}"))?;
    if let Some(cpus) = cpus {
        pin_process(control.pid().context("control pid")?, cpus).context("--relay-cpus")?;
        // Redis is the production path's too; started by us, it has our affinity.
        for pid in children_named("redis-server") {
            pin_process(pid, cpus).context("--relay-cpus (redis-server)")?;
        }
    }
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut endpoint =
        tonic::transport::Endpoint::from_shared(format!("{scheme}://{addr}"))?.tcp_nodelay(true);
    if let Some(client_tls) = client_tls {
        endpoint = endpoint.tls_config(client_tls)?;
    }
    let channel = endpoint.connect().await?;
    let mut agents =
        pb::agents_client::AgentsClient::with_interceptor(channel.clone(), Bearer::new(APP_TOKEN));
    let agent = timeout(
        STEP,
        agents.create_agent(pb::CreateAgentRequest {
            agent_id: String::new(),
            settings: Some(pb::AgentSettings {
                name: "bench echo".to_owned(),
                instructions: "Echo.".to_owned(),
                ..Default::default()
            }),
        }),
    )
    .await??
    .into_inner();
    Ok(ControlSide {
        _redis: redis,
        tls,
        control,
        agent_id: agent.agent_id,
        channel,
    })
}

impl ControlSide {
    async fn create_calls(&self, n: usize, campaign: &str) -> anyhow::Result<Vec<String>> {
        let mut calls = pb::calls_client::CallsClient::with_interceptor(
            self.channel.clone(),
            Bearer::new(APP_TOKEN),
        );
        let ids = create_calls(&mut calls, &self.agent_id, n, campaign, STEP).await?;
        ensure!(ids.len() == n, "CreateCalls returned {} of {n}", ids.len());
        Ok(ids)
    }
}

async fn run(args: &Args, paths: &[Path], fakes: &Fakes<'_>, machine: Value) -> anyhow::Result<()> {
    let fake = fakes.plain;
    let clk_tck = clock_ticks_per_sec();
    let perf = if args.count_secs > 0 {
        PerfCounts::detect()
    } else {
        None
    };
    let counting = match &perf {
        Some(p) if p.counts_allocations() => "system calls and allocations counted by perf stat",
        Some(_) => "system calls counted by perf stat (allocations: no uprobes)",
        None => "perf stat unavailable: no system call or allocation counts",
    };
    let control = if paths.contains(&Path::Production) {
        Some(start_control(args.relay_cpus.as_deref(), args.tls).await?)
    } else {
        None
    };
    println!(
        "relay bench: {} CPUs, load average {:?}, {} s load per level, ramp {} calls/s; {counting}",
        machine["cores"],
        load_average(),
        args.secs,
        args.ramp_per_sec
    );
    println!(
        "per frame (one 20 ms caller frame and its echo): msg = WebSocket messages the relay read and wrote, wr = socket writes, sys = system calls, alloc = heap allocations"
    );
    println!(
        "{:>10} {:>4} {:>5} {:>5} {:>8} {:>8} {:>6} {:>7} {:>7} {:>7} {:>7} {:>8} {:>8} {:>8} {:>8} {:>6} {:>6} {:>5} {:>5} {:>5} {:>6} {:>6}",
        "path",
        "dms",
        "calls",
        "conn",
        "sent",
        "recv",
        "lost",
        "p50ms",
        "p99ms",
        "maxms",
        "+p99ms",
        "cpu/cs",
        "idle/cs",
        "KiB/call",
        "KiBidle",
        "gen%",
        "fake%",
        "open",
        "msg",
        "wr",
        "sys",
        "alloc"
    );
    let mut results = Vec::new();
    for &delta in &args.delta_ms {
        for &n in &args.calls {
            let mut base_p99 = f64::NAN;
            for &path in paths {
                let level = Level {
                    path,
                    calls: n,
                    delta_ms: delta,
                };
                let r = run_level(
                    args,
                    level,
                    fakes.for_delta(delta),
                    control.as_ref(),
                    perf.as_ref(),
                    clk_tck,
                )
                .await;
                let r = match r {
                    Ok(r) => r,
                    Err(e) => {
                        println!("{:>10} {delta:>4} {n:>5} failed: {e:#}", path.name());
                        results.push(json!({"path": path.name(), "calls": n, "delta_ms": delta,
                                        "error": format!("{e:#}")}));
                        continue;
                    }
                };
                let p99 = f(&r, &["rtt_ms", "p99"]);
                if path == Path::Baseline {
                    base_p99 = p99;
                }
                let added = p99 - base_p99;
                let mut r = r;
                r["added_p99_ms"] = json!(if added.is_finite() { Some(added) } else { None });
                println!(
                    "{:>10} {delta:>4} {n:>5} {:>5} {:>8} {:>8} {:>6} {:>7.2} {:>7.2} {:>7.2} {:>7.2} {:>8.3} {:>8.3} {:>8.1} {:>8.1} {:>6.0} {:>6.0} {:>5} {:>5.2} {:>5.2} {:>6.2} {:>6.2}",
                    path.name(),
                    u(&r, &["connected"]),
                    u(&r, &["frames", "sent"]),
                    u(&r, &["frames", "received"]),
                    u(&r, &["frames", "lost"]),
                    f(&r, &["rtt_ms", "p50"]),
                    p99,
                    f(&r, &["rtt_ms", "max"]),
                    added,
                    f(&r, &["relay", "cpu_ms_per_call_sec"]),
                    f(&r, &["relay", "idle_cpu_ms_per_call_sec"]),
                    f(&r, &["relay", "rss_kib_per_call_load"]),
                    f(&r, &["relay", "rss_kib_per_call_idle"]),
                    f(&r, &["loadgen_cpu_pct"]),
                    f(&r, &["fake_cpu_pct"]),
                    u(&r, &["upstream_open_after_end"]),
                    f(&r, &["per_frame", "messages"]),
                    f(&r, &["per_frame", "writes"]),
                    f(&r, &["counted", "per_frame", "syscalls"]),
                    f(&r, &["counted", "per_frame", "allocations"]),
                );
                results.push(r);
            }
        }
    }
    let hangups = if args.hangup_calls > 0 {
        match hangup_phases(args, fake).await {
            Ok(v) => v,
            Err(e) => json!({"error": format!("{e:#}")}),
        }
    } else {
        Value::Null
    };
    let coldstart = if args.coldstart_calls > 0 {
        match coldstart_check(args, fake, control.as_ref()).await {
            Ok(v) => v,
            Err(e) => json!({"error": format!("{e:#}")}),
        }
    } else {
        Value::Null
    };
    // Production vs standalone, per level.
    let mut ratios = Vec::new();
    for &delta in &args.delta_ms {
        for &n in &args.calls {
            let get = |p: &str| {
                results.iter().find(|r| {
                    r["path"] == p
                        && r["calls"] == n
                        && r["delta_ms"] == delta
                        && r.get("error").is_none()
                })
            };
            if let (Some(s), Some(p)) = (get("standalone"), get("production")) {
                let cs = f(s, &["relay", "cpu_ms_per_call_sec"]);
                let cp = f(p, &["relay", "cpu_ms_per_call_sec"]);
                let ratio = cp / cs;
                let rss = |r: &Value| f(r, &["relay", "rss_kib_per_call_load"]);
                let rss_ratio = rss(p) / rss(s);
                println!(
                    "production/standalone relay at {n} calls, {delta} ms deltas: CPU {ratio:.2}, memory {rss_ratio:.2}"
                );
                ratios.push(json!({"calls": n, "delta_ms": delta, "cpu_ratio": ratio,
                    "rss_ratio": rss_ratio}));
            }
        }
    }
    let pinning = json!({
        "relay_cpus": args.relay_cpus,
        "harness_cpus": args.harness_cpus,
        "method": "taskset -a -p -c: the relay, control and redis-server right after they start (every thread), this process before its runtimes start",
        "harness_cpus_allowed": args.harness_cpus.as_ref().map(|_| cpus_allowed(std::process::id())),
        "control_cpus_allowed": control.as_ref().filter(|_| args.relay_cpus.is_some())
            .and_then(|c| c.control.pid()).map(cpus_allowed),
        "redis_cpus_allowed": control.as_ref().filter(|_| args.relay_cpus.is_some())
            .map(|_| children_named("redis-server").into_iter().flat_map(cpus_allowed).collect::<Vec<_>>()),
    });
    let doc = json!({
        "bench": "relay",
        "provenance": provenance(),
        "machine": machine,
        "load_average_at_end": load_average(),
        "tls": args.tls,
        "pinning": pinning,
        // Where the relay and control binaries came from: a before/after comparison runs
        // this bench against an older build's directory.
        "bin_dir": std::env::var("CALLBRIDGE_BIN_DIR").ok(),
        "args": {"calls": args.calls, "paths": args.paths, "secs": args.secs,
                 "idle_secs": args.idle_secs, "ramp_per_sec": args.ramp_per_sec,
                 "speaking": args.speaking, "delta_ms": args.delta_ms,
                 "count_secs": args.count_secs},
        "counting": counting,
        "results": results,
        "production_vs_standalone": ratios,
        "hangup_phases": hangups,
        "coldstart": coldstart,
    });
    write_result(std::path::Path::new(&args.out), &doc)
        .with_context(|| format!("writing {}", args.out))?;
    println!("wrote {}", args.out);
    if !args.svg.is_empty() {
        if let Some(dir) = std::path::Path::new(&args.svg).parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(&args.svg, plot(&doc))?;
        println!("wrote {}", args.svg);
    }
    if let Some(c) = control {
        drop(c.control);
    }
    Ok(())
}

/// What every call task shares with the level driver.
struct Shared {
    /// Set to the load window's start when the calls may stream.
    go: watch::Receiver<Option<Instant>>,
    /// Calls whose stream is up (start sent / Realtime socket open).
    connected: AtomicU64,
    /// How long each call streams once it may.
    stream: Duration,
    /// The load window's length: frames sent within it count for CPU per call-second
    /// (calls stream on through the counting window).
    load: Duration,
    /// Unstamped frames a call sends after its last one, so that a fake joining appends
    /// into larger deltas echoes everything it holds.
    flush_frames: u32,
    /// How long a call waits for its last echoes after it stopped streaming.
    drain: Duration,
    /// Cold start: every call streams right after its `start` (no `go`, no clock spread).
    cold: bool,
    epoch: Instant,
}

/// What one call reports.
#[derive(Default)]
struct CallOut {
    connected: bool,
    sent: u64,
    /// Frames sent within the load window.
    sent_load: u64,
    received: u64,
    misrouted: u64,
    marks: u64,
    rtts_us: Vec<u32>,
    /// Send stamp (µs since the epoch) of the call's first frame.
    first_sent_us: Option<u64>,
    /// Round trip of the first frame, once it came back.
    first_rtt_us: Option<u32>,
    error: Option<String>,
}

/// How long each cold-start call streams, and how long it then waits for its echoes.
const COLD_STREAM: Duration = Duration::from_millis(1500);
const COLD_DRAIN: Duration = Duration::from_secs(3);

/// The issue's "no frame dropped at call start": each caller sends `connected` + `start`
/// and at once streams stamped 20 ms frames (the level's stamps) for 1.5 s, while the
/// relay is still dialling the model (held `--coldstart-dial-ms` by [`SlowDial`]); then
/// waits up to 3 s for the echoes. Per path (standalone; production when control runs):
/// frames lost, whether each call's first frame came back, and how late (that includes
/// the rest of the model dial). Fresh relay per path.
async fn coldstart_check(
    args: &Args,
    fake: &FakeRealtime,
    control: Option<&ControlSide>,
) -> anyhow::Result<Value> {
    let n = args.coldstart_calls;
    let mut out = serde_json::Map::new();
    println!(
        "cold-start check ({n} calls each; frames from right after `start` for {} ms; model dial held {} ms):",
        COLD_STREAM.as_millis(),
        args.coldstart_dial_ms
    );
    for path in [Path::Standalone, Path::Production] {
        let r = match (path, control) {
            (Path::Production, None) => {
                println!(
                    "  {:<10} skipped: no control (--paths without production)",
                    path.name()
                );
                json!({"skipped": "no control running (--paths without production)"})
            }
            _ => match coldstart_path(args, fake, path, control).await {
                Ok(r) => {
                    println!(
                        "  {:<10} calls {:>4} conn {:>4} sent {:>6} echoed {:>6} lost {:>5} first frame back {:>4}/{:<4} first echo p50 {:>7.1} ms max {:>7.1} ms open after {:>3} errors {}",
                        path.name(),
                        u(&r, &["calls"]),
                        u(&r, &["connected"]),
                        u(&r, &["frames", "sent"]),
                        u(&r, &["frames", "received"]),
                        u(&r, &["frames", "lost"]),
                        u(&r, &["first_frame_back"]),
                        u(&r, &["calls"]),
                        f(&r, &["first_echo_ms", "p50"]),
                        f(&r, &["first_echo_ms", "max"]),
                        u(&r, &["upstream_open_after_end"]),
                        u(&r, &["caller_errors"]),
                    );
                    r
                }
                Err(e) => {
                    println!("  {:<10} failed: {e:#}", path.name());
                    json!({"error": format!("{e:#}")})
                }
            },
        };
        out.insert(path.name().to_owned(), r);
    }
    Ok(Value::Object(out))
}

/// Loopback TCP proxy in front of the fake model that holds every new connection for
/// `delay` before connecting it through, so the relay's model dial takes about as long as a
/// real one. Stops (with every connection it carries) when dropped.
struct SlowDial {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

/// Connections a [`SlowDial`] carries at once; more are refused (closed).
const SLOW_DIAL_MAX: usize = 5000;

impl SlowDial {
    async fn start(upstream: SocketAddr, delay: Duration) -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            // Dropped with this task: aborting the proxy closes every connection.
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((mut inbound, _)) = listener.accept().await {
                while conns.try_join_next().is_some() {}
                if conns.len() >= SLOW_DIAL_MAX {
                    continue;
                }
                conns.spawn(async move {
                    tokio::time::sleep(delay).await;
                    let Ok(Ok(mut outbound)) = timeout(STEP, TcpStream::connect(upstream)).await
                    else {
                        return;
                    };
                    // 20 ms frames: Nagle + delayed ACK would add ~40 ms.
                    let _ = inbound.set_nodelay(true);
                    let _ = outbound.set_nodelay(true);
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                });
            }
        });
        Ok(Self { addr, task })
    }
}

impl Drop for SlowDial {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn coldstart_path(
    args: &Args,
    fake: &FakeRealtime,
    path: Path,
    control: Option<&ControlSide>,
) -> anyhow::Result<Value> {
    let n = args.coldstart_calls;
    let control = if path == Path::Production {
        control
    } else {
        None
    };
    // A real model dial is a TLS + WebSocket handshake across the internet; on loopback
    // the fake answers within a millisecond, before the caller's first frame is there.
    let slow = if args.coldstart_dial_ms > 0 {
        Some(SlowDial::start(fake.addr(), Duration::from_millis(args.coldstart_dial_ms)).await?)
    } else {
        None
    };
    let model_url = match &slow {
        Some(s) => format!("ws://{}/v1/realtime", s.addr),
        None => fake.url(),
    };
    let mut relay = start_relay(args, &model_url, control).await?;
    let ids = match control {
        Some(c) => c.create_calls(n, "bench-coldstart").await?,
        None => Vec::new(),
    };
    let accepted_before = fake.connections_accepted();
    let open_before = fake.connections_open();
    // `go` is never waited on by a cold call; the sender only has to outlive the calls.
    let (_go_tx, go_rx) = watch::channel(None);
    let shared = Arc::new(Shared {
        go: go_rx,
        connected: AtomicU64::new(0),
        stream: COLD_STREAM,
        load: COLD_STREAM,
        flush_frames: 0,
        drain: COLD_DRAIN,
        cold: true,
        epoch: Instant::now(),
    });
    let ramp_started = Instant::now();
    let gap = Duration::from_secs_f64(1.0 / args.ramp_per_sec as f64);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        let target = Target::Relay {
            addr: relay.proc.addr,
            call_id: ids.get(i).cloned(),
        };
        tasks.spawn(one_call(i as u32, target, shared.clone()));
        tokio::time::sleep_until((ramp_started + gap * (i as u32 + 1)).into()).await;
    }
    let outs = collect_calls(tasks, n).await;
    let (open_after, _) = wait_model_sockets_closed(fake, open_before).await;
    let model_sockets = fake.connections_accepted() - accepted_before;
    relay.proc.kill();

    let (mut sent, mut received, mut misrouted) = (0u64, 0u64, 0u64);
    let mut firsts: Vec<u32> = Vec::new();
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    for o in &outs {
        sent += o.sent;
        received += o.received;
        misrouted += o.misrouted;
        firsts.extend(o.first_rtt_us);
        if let Some(e) = &o.error {
            *errors.entry(e.clone()).or_default() += 1;
        }
    }
    firsts.sort_unstable();
    let ms = |us: Option<u32>| us.map(|us| f64::from(us) / 1000.0);
    let connected = outs.iter().filter(|o| o.connected).count();
    Ok(json!({
        "calls": n,
        "connected": connected,
        "stream_ms": COLD_STREAM.as_millis() as u64,
        "model_dial_ms": args.coldstart_dial_ms,
        "frames": {"sent": sent, "received": received, "lost": sent.saturating_sub(received),
                   "misrouted": misrouted},
        "first_frame_back": firsts.len(),
        "first_echo_ms": {"p50": ms(percentile(&firsts, 50.0)), "max": ms(firsts.last().copied())},
        "model_sockets_opened": model_sockets,
        "upstream_open_after_end": open_after,
        "caller_errors": errors.values().sum::<u64>(),
        "call_errors": errors,
    }))
}

/// Ways a caller can end a call, at different phases of the relay's call setup.
const HANGUPS: [&str; 5] = [
    "close_before_start",
    "close_right_after_start",
    "close_idle_after_start",
    "stop_mid_media",
    "drop_tcp_mid_media",
];

/// For each way of hanging up, `--hangup-calls` calls on a fresh standalone relay; then
/// how many model sockets are still open once the relay had 10 s to close them.
async fn hangup_phases(args: &Args, fake: &FakeRealtime) -> anyhow::Result<Value> {
    let relay = start_relay(args, &fake.url(), None).await?;
    let addr = relay.proc.addr;
    let mut out = serde_json::Map::new();
    println!(
        "hang-up check ({} calls each, standalone relay):",
        args.hangup_calls
    );
    for kind in HANGUPS {
        let open_before = fake.connections_open();
        let accepted_before = fake.connections_accepted();
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..args.hangup_calls {
            set.spawn(timeout(STEP * 2, hang_up_one(addr, kind)));
        }
        let mut failed = 0u64;
        while let Some(r) = set.join_next().await {
            if !matches!(r, Ok(Ok(Ok(())))) {
                failed += 1;
            }
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while fake.connections_open() > open_before && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let open = fake.connections_open().saturating_sub(open_before);
        let opened = fake.connections_accepted() - accepted_before;
        println!(
            "  {kind:<24} model sockets opened {opened:>4}, still open after 10 s {open:>4}, caller errors {failed}"
        );
        out.insert(
            kind.to_owned(),
            json!({"calls": args.hangup_calls, "model_sockets_opened": opened,
                   "model_sockets_open_after": open, "caller_errors": failed}),
        );
    }
    Ok(Value::Object(out))
}

async fn hang_up_one(addr: SocketAddr, kind: &str) -> anyhow::Result<()> {
    let (ws, sid) = if kind == "close_before_start" {
        let url = format!("ws://{addr}/api/twilio/media-stream-simple");
        let mut req = url.as_str().into_client_request()?;
        req.headers_mut().insert(
            "x-twilio-signature",
            twilio_signature(TWILIO_TOKEN, &url, &[]).parse()?,
        );
        let mut ws = dial(addr, req).await?;
        ws.close(None).await?;
        return Ok(());
    } else {
        connect_via_relay(addr, None).await?
    };
    let mut ws = ws;
    match kind {
        "close_right_after_start" => {
            ws.close(None).await?;
        }
        "close_idle_after_start" => {
            tokio::time::sleep(Duration::from_secs(1)).await;
            ws.close(None).await?;
        }
        _ => {
            let payload = B64.encode([0xffu8; FRAME_BYTES]);
            let frame = format!(
                r#"{{"event":"media","streamSid":"{sid}","media":{{"payload":"{payload}"}}}}"#
            );
            let mut tick = tokio::time::interval(FRAME);
            for _ in 0..25 {
                tick.tick().await;
                ws.send(Message::text(frame.clone())).await?;
            }
            if kind == "stop_mid_media" {
                ws.send(Message::text(format!(
                    r#"{{"event":"stop","streamSid":"{sid}","stop":{{"accountSid":"ACbench","callSid":"CAbench"}}}}"#
                )))
                .await?;
                ws.close(None).await?;
            }
            // drop_tcp_mid_media: the socket is dropped without a close frame.
        }
    }
    Ok(())
}

struct RelaySide {
    proc: Proc,
    pid: u32,
    /// Its `/metrics` listener.
    metrics: SocketAddr,
    /// The relay's threads' CPU lists after `--relay-cpus` pinning (`None`: not pinned).
    cpus_allowed: Option<Vec<String>>,
}

/// Starts a fresh relay whose model is at `model_url`.
async fn start_relay(
    args: &Args,
    model_url: &str,
    control: Option<&ControlSide>,
) -> anyhow::Result<RelaySide> {
    let addr = free_addr()?;
    let metrics = free_addr()?;
    let public = format!("http://{addr}");
    let mut e = env([
        ("RELAY_LISTEN", &addr.to_string()),
        // Scraped around the load and counting windows (messages, writes, frames).
        ("RELAY_METRICS_ADDR", &metrics.to_string()),
        ("RELAY_PUBLIC_URL", &public),
        ("OPENAI_API_KEY", OPENAI_KEY),
        ("OPENAI_REALTIME_URL", model_url),
        ("TWILIO_AUTH_TOKEN", TWILIO_TOKEN),
        ("RELAY_ID", "relay-bench"),
        ("RELAY_LOG", "warn"),
    ]);
    if let Some(c) = control {
        let scheme = if c.tls.is_some() { "https" } else { "http" };
        e.push((
            "CONTROL_URL".to_owned(),
            format!("{scheme}://{}", c.control.addr),
        ));
        if let Some(tls) = &c.tls {
            e.extend(tls.relay_env());
        }
        e.push(("RELAY_CONTROL_TOKEN".to_owned(), RELAY_TOKEN.to_owned()));
    }
    // Pinned after it starts (below), the relay would otherwise size its runtime for every
    // core of the machine and run more workers than it has CPUs.
    if let Some(cpus) = &args.relay_cpus {
        e.push((
            "TOKIO_WORKER_THREADS".to_owned(),
            cpu_count(cpus).to_string(),
        ));
    }
    e.extend(args.relay_env.iter().cloned());
    let mut proc = Proc::spawn("callbridge-relay", e, addr)
        .context("starting callbridge-relay (scripts/bench-relay.sh builds it)")?;
    proc.wait_http_ok("/healthz", Duration::from_secs(30))
        .await
        .map_err(|e| anyhow!("relay not healthy: {e}"))?;
    let pid = proc.pid().context("relay pid")?;
    // Pinned once healthy: its runtime's workers exist by then, and threads it starts
    // later inherit the affinity of the thread that starts them.
    let cpus_allowed = match &args.relay_cpus {
        Some(cpus) => {
            pin_process(pid, cpus).context("--relay-cpus")?;
            Some(cpus_allowed(pid))
        }
        None => None,
    };
    Ok(RelaySide {
        proc,
        pid,
        metrics,
        cpus_allowed,
    })
}

/// Waits (≤ 30 s) for every call task's report; a task that panicked or did not finish
/// in time is reported as a failed call.
async fn collect_calls(mut tasks: tokio::task::JoinSet<CallOut>, n: usize) -> Vec<CallOut> {
    let mut outs = Vec::with_capacity(n);
    let collect = async {
        while let Some(r) = tasks.join_next().await {
            outs.push(r.unwrap_or_else(|e| CallOut {
                error: Some(format!("task: {e}")),
                ..CallOut::default()
            }));
        }
    };
    if timeout(Duration::from_secs(30), collect).await.is_err() {
        tasks.abort_all();
    }
    outs
}

/// Waits (≤ 10 s) for the fake's open model sockets to fall back to `open_before`; returns
/// how many are still open above it and the seconds waited.
async fn wait_model_sockets_closed(fake: &FakeRealtime, open_before: u64) -> (u64, f64) {
    let started = Instant::now();
    let deadline = started + Duration::from_secs(10);
    while fake.connections_open() > open_before && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (
        fake.connections_open().saturating_sub(open_before),
        started.elapsed().as_secs_f64(),
    )
}

/// One level of the bench: a path, a number of calls, a delta size.
#[derive(Debug, Clone, Copy)]
struct Level {
    path: Path,
    calls: usize,
    delta_ms: u32,
}

/// The relay's counters of messages, writes and frames (`/metrics`).
async fn relay_counters(relay: Option<&RelaySide>) -> Option<BTreeMap<String, f64>> {
    let addr = relay?.metrics;
    let page = callbridge_testkit::http::request(
        addr,
        "GET",
        &addr.to_string(),
        "/metrics",
        &[],
        None,
        STEP,
    )
    .await
    .ok()?;
    Some(prometheus_samples(&page.body, "callbridge_relay_"))
}

/// Messages and writes per caller frame between two scrapes, with the frames counted.
fn per_frame(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>) -> Value {
    let d = |k: &str| after.get(k).copied().unwrap_or(0.0) - before.get(k).copied().unwrap_or(0.0);
    let frames = d(r#"callbridge_relay_frames_total{direction="caller_to_model"}"#).max(1.0);
    let msg = |socket: &str, dir: &str| {
        d(&format!(
            r#"callbridge_relay_ws_messages_total{{socket="{socket}",direction="{dir}"}}"#
        )) / frames
    };
    let writes = |socket: &str| {
        d(&format!(
            r#"callbridge_relay_ws_writes_total{{socket="{socket}"}}"#
        )) / frames
    };
    let by_socket = json!({
        "twilio_in": msg("twilio", "in"), "twilio_out": msg("twilio", "out"),
        "model_in": msg("model", "in"), "model_out": msg("model", "out"),
    });
    json!({
        "frames": frames,
        "messages": msg("twilio", "in") + msg("twilio", "out") + msg("model", "in") + msg("model", "out"),
        "messages_by_socket": by_socket,
        "writes": writes("twilio") + writes("model"),
        "writes_by_socket": {"twilio": writes("twilio"), "model": writes("model")},
    })
}

/// The counting window: `perf stat` on the relay while the calls stream on.
async fn counting_window(
    perf: &PerfCounts,
    relay: &RelaySide,
    window: Duration,
) -> anyhow::Result<Value> {
    let before = relay_counters(Some(relay))
        .await
        .context("relay /metrics")?;
    let (perf, pid) = (perf.clone(), relay.pid);
    let counts = tokio::task::spawn_blocking(move || perf.count(pid, window)).await??;
    let after = relay_counters(Some(relay))
        .await
        .context("relay /metrics")?;
    let frames = per_frame(&before, &after)["frames"].as_f64().unwrap_or(1.0);
    let c = |keys: &[&str]| -> Option<f64> {
        let mut sum = None;
        for k in keys {
            if let Some(&v) = counts.get(*k) {
                *sum.get_or_insert(0.0) += v as f64;
            }
        }
        sum.map(|v| v / frames)
    };
    Ok(json!({
        "secs": window.as_secs_f64(),
        "frames": frames,
        "per_frame": {
            "syscalls": c(&["raw_syscalls:sys_enter"]),
            "reads": c(&["syscalls:sys_enter_recvfrom", "syscalls:sys_enter_read"]),
            "writes": c(&["syscalls:sys_enter_sendto", "syscalls:sys_enter_write", "syscalls:sys_enter_writev"]),
            "epoll_waits": c(&["syscalls:sys_enter_epoll_wait"]),
            "futex": c(&["syscalls:sys_enter_futex"]),
            "sched_yield": c(&["syscalls:sys_enter_sched_yield"]),
            "context_switches": c(&["context-switches"]),
            "allocations": c(&["probe_libc:malloc", "probe_libc:realloc", "probe_libc:calloc"]),
        },
        "raw": counts,
    }))
}

async fn run_level(
    args: &Args,
    level: Level,
    fake: &FakeRealtime,
    control: Option<&ControlSide>,
    perf: Option<&PerfCounts>,
    clk_tck: f64,
) -> anyhow::Result<Value> {
    let Level {
        path,
        calls: n,
        delta_ms,
    } = level;
    let relay = match path {
        Path::Baseline => None,
        Path::Standalone => Some(start_relay(args, &fake.url(), None).await?),
        Path::Production => Some(start_relay(args, &fake.url(), control).await?),
    };
    let ids = match (path, control) {
        (Path::Production, Some(c)) => c.create_calls(n, &format!("bench-{n}")).await?,
        (Path::Production, None) => bail!("production path without control"),
        _ => Vec::new(),
    };
    let relay_pid = relay.as_ref().map(|r| r.pid);
    let rss_before = relay_pid.map(rss_kib).transpose()?;
    let accepted_before = fake.connections_accepted();
    let open_before = fake.connections_open();

    let (go_tx, go_rx) = watch::channel(None);
    let load = Duration::from_secs(args.secs);
    // The counting window follows the load window, while the calls stream on (a second
    // more covers the scrapes around it).
    let count = match (&relay, perf) {
        (Some(_), Some(_)) => Some(Duration::from_secs(args.count_secs)),
        _ => None,
    };
    let shared = Arc::new(Shared {
        go: go_rx,
        connected: AtomicU64::new(0),
        stream: load + count.map_or(Duration::ZERO, |c| c + Duration::from_secs(1)),
        load,
        flush_frames: delta_ms / 20 - 1,
        drain: Duration::from_secs(2),
        cold: false,
        epoch: Instant::now(),
    });
    // Ramp the calls in.
    let ramp_started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let gap = Duration::from_secs_f64(1.0 / args.ramp_per_sec as f64);
    for i in 0..n {
        let target = match &relay {
            Some(r) => Target::Relay {
                addr: r.proc.addr,
                call_id: ids.get(i).cloned(),
            },
            None => Target::Model(fake.url()),
        };
        tasks.spawn(one_call(i as u32, target, shared.clone()));
        tokio::time::sleep_until((ramp_started + gap * (i as u32 + 1)).into()).await;
    }
    // Every call connected and every model socket open (or a bounded wait).
    let connect_deadline = Instant::now() + Duration::from_secs(30);
    while (shared.connected.load(Ordering::Relaxed) < n as u64
        || fake.connections_accepted() - accepted_before < n as u64)
        && Instant::now() < connect_deadline
        && tasks.len() == n
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ramp_secs = ramp_started.elapsed().as_secs_f64();
    let connected = shared.connected.load(Ordering::Relaxed);
    let model_sockets = fake.connections_accepted() - accepted_before;

    // Idle window: every call connected, no audio.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle_cpu0 = relay_pid.map(|p| process_cpu_ms(p, clk_tck)).transpose()?;
    let rss_idle = relay_pid.map(rss_kib).transpose()?;
    tokio::time::sleep(Duration::from_secs(args.idle_secs)).await;
    let idle_cpu1 = relay_pid.map(|p| process_cpu_ms(p, clk_tck)).transpose()?;

    // Load window.
    let m0 = relay_counters(relay.as_ref()).await;
    let threads0 = thread_cpu_ms(clk_tck);
    let cpu0 = relay_pid.map(|p| process_cpu_ms(p, clk_tck)).transpose()?;
    let started = Instant::now();
    go_tx.send_replace(Some(started));
    let mut rss_load_max = 0u64;
    let load_end = started + Duration::from_secs(args.secs);
    while Instant::now() < load_end {
        tokio::time::sleep(Duration::from_millis(500).min(load_end - Instant::now())).await;
        if let Some(p) = relay_pid {
            rss_load_max = rss_load_max.max(rss_kib(p).unwrap_or(0));
        }
    }
    let cpu1 = relay_pid.map(|p| process_cpu_ms(p, clk_tck)).transpose()?;
    let threads1 = thread_cpu_ms(clk_tck);
    let load_secs = started.elapsed().as_secs_f64();
    let m1 = relay_counters(relay.as_ref()).await;
    let counted = match (&relay, perf, count) {
        (Some(r), Some(p), Some(window)) => match counting_window(p, r, window).await {
            Ok(v) => v,
            Err(e) => json!({"error": format!("{e:#}")}),
        },
        _ => Value::Null,
    };

    // Calls drain, hang up and report.
    let mut outs = collect_calls(tasks, n).await;
    // After every hang-up, the relay must close every model socket.
    let (open_after, close_secs) = wait_model_sockets_closed(fake, open_before).await;
    let relay_cpus_allowed = relay.as_ref().and_then(|r| r.cpus_allowed.clone());
    let relay_alive = match relay {
        Some(mut r) => {
            let alive = r.proc.is_running();
            r.proc.kill();
            Some(alive)
        }
        None => None,
    };

    let mut rtts: Vec<u32> = Vec::new();
    let (mut sent, mut sent_load, mut received, mut misrouted, mut marks) =
        (0u64, 0u64, 0u64, 0u64, 0u64);
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    for o in &mut outs {
        sent += o.sent;
        sent_load += o.sent_load;
        received += o.received;
        misrouted += o.misrouted;
        marks += o.marks;
        rtts.append(&mut o.rtts_us);
        if let Some(e) = &o.error {
            *errors.entry(e.clone()).or_default() += 1;
        }
    }
    rtts.sort_unstable();
    let pct = |p: f64| percentile(&rtts, p).map(|us| f64::from(us) / 1000.0);
    let call_secs = n as f64 * load_secs;
    // Call-seconds of audio actually carried: when the machine falls behind, calls send
    // fewer than 50 frames/s, and dividing by wall time would flatter the relay.
    let audio_secs = (sent_load as f64 * FRAME.as_secs_f64()).max(1e-9);
    let idle_secs = args.idle_secs.max(1) as f64;
    let gen_ms = threads1.get("loadgen").copied().unwrap_or(0.0)
        - threads0.get("loadgen").copied().unwrap_or(0.0);
    let fake_ms = threads1.get("fake-model").copied().unwrap_or(0.0)
        - threads0.get("fake-model").copied().unwrap_or(0.0);
    let relay_json = match (cpu0, cpu1, rss_before, rss_idle) {
        (Some(c0), Some(c1), Some(rb), Some(ri)) => json!({
            "cpu_ms_per_call_sec": (c1 - c0) / audio_secs,
            "cpu_ms_per_wall_call_sec": (c1 - c0) / call_secs,
            "cpu_pct_load": (c1 - c0) / (load_secs * 10.0),
            "idle_cpu_ms_per_call_sec": idle_cpu1.zip(idle_cpu0).map(|(a, b)| (a - b) / (n as f64 * idle_secs)),
            "rss_kib_before": rb,
            "rss_kib_idle": ri,
            "rss_kib_load_max": rss_load_max,
            "rss_kib_per_call_idle": (ri as f64 - rb as f64) / n as f64,
            "rss_kib_per_call_load": (rss_load_max as f64 - rb as f64) / n as f64,
            "alive_at_end": relay_alive,
        }),
        _ => Value::Null,
    };
    let per_frame = match (&m0, &m1) {
        (Some(a), Some(b)) => per_frame(a, b),
        _ => Value::Null,
    };
    let mut level = json!({
        "path": path.name(),
        "calls": n,
        "delta_ms": delta_ms,
        "per_frame": per_frame,
        "counted": counted,
        "connected": connected,
        "model_sockets_opened": model_sockets,
        "ramp_secs": ramp_secs,
        "load_secs": load_secs,
        "frames": {"sent": sent, "sent_in_load_window": sent_load, "received": received,
                   "lost": sent.saturating_sub(received), "misrouted": misrouted,
                   "marks_echoed": marks},
        "rtt_ms": {"samples": rtts.len(), "p50": pct(50.0), "p90": pct(90.0), "p99": pct(99.0),
                   "p999": pct(99.9), "max": rtts.last().map(|&v| f64::from(v) / 1000.0)},
        "relay": relay_json,
        "loadgen_cpu_pct": gen_ms / (load_secs * 10.0),
        "fake_cpu_pct": fake_ms / (load_secs * 10.0),
        "upstream_open_after_end": open_after,
        "upstream_close_wait_secs": close_secs,
        "call_errors": errors,
        "load_average": load_average(),
    });
    if let Some(cpus) = relay_cpus_allowed {
        level["relay_cpus_allowed"] = json!(cpus);
    }
    Ok(level)
}

enum Target {
    /// Through the relay: voice webhook (with `callId` on the production path), then the
    /// `<Stream>` URL it answers.
    Relay {
        addr: SocketAddr,
        call_id: Option<String>,
    },
    /// Straight to the echo model (the baseline).
    Model(String),
}

type Ws = WebSocketStream<TcpStream>;

/// One call; never fails the bench, reports what happened.
async fn one_call(idx: u32, target: Target, shared: Arc<Shared>) -> CallOut {
    let mut out = CallOut::default();
    if let Err(e) = call_inner(idx, target, &shared, &mut out).await {
        out.error = Some(format!("{e:#}"));
    }
    out
}

async fn call_inner(
    idx: u32,
    target: Target,
    shared: &Shared,
    out: &mut CallOut,
) -> anyhow::Result<()> {
    let twilio = matches!(target, Target::Relay { .. });
    let (ws, sid) = match target {
        Target::Relay { addr, call_id } => connect_via_relay(addr, call_id).await?,
        Target::Model(url) => (connect_model(&url).await?, String::new()),
    };
    let (mut tx, mut rx) = ws.split();
    // The frame, encoded once; each send patches its 16-character stamp.
    let silence = B64.encode([0xffu8; FRAME_BYTES]);
    let (template, stamp_at) = if twilio {
        let head = r#"{"event":"media","sequenceNumber":"2","media":{"track":"inbound","chunk":"1","timestamp":"0","payload":""#;
        (
            format!(r#"{head}{silence}"}},"streamSid":"{sid}"}}"#),
            head.len(),
        )
    } else {
        let head = r#"{"type":"input_audio_buffer.append","audio":""#;
        (format!(r#"{head}{silence}"}}"#), head.len())
    };
    out.connected = true;
    shared.connected.fetch_add(1, Ordering::Relaxed);

    let mut go = shared.go.clone();
    let start = if shared.cold {
        Instant::now()
    } else {
        loop {
            tokio::select! {
                r = go.wait_for(Option::is_some) => {
                    break r.map_err(|_| anyhow!("bench gone"))?.unwrap_or_else(Instant::now);
                }
                // Keep reading while idle (session events, pings).
                msg = timeout(STEP * 3, rx.next()) => match msg {
                    Ok(Some(Ok(_))) => {}
                    Ok(_) => bail!("socket closed before the load window"),
                    Err(_) => bail!("no load window"),
                },
            }
        }
    };
    // Calls' 20 ms clocks are spread over the frame period, as real calls would be; a cold
    // call sends its first frame at once.
    let offset = if shared.cold {
        Duration::ZERO
    } else {
        FRAME.mul_f64(f64::from(idx % 97) / 97.0)
    };
    let end = start + shared.stream;
    let load_end = start + shared.load;
    let mut flush_left = shared.flush_frames;
    let mut tick = tokio::time::interval_at((start + offset).into(), FRAME);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let drain_until = end + shared.drain;
    let mut sending = true;
    let mut buf = [0u8; STAMP_BYTES];
    let mut stamp = [0u8; STAMP_CHARS];
    loop {
        tokio::select! {
            _ = tick.tick(), if sending => {
                let now = Instant::now();
                let filler = now >= end;
                if filler && flush_left == 0 {
                    sending = false;
                    continue;
                }
                let us = shared.epoch.elapsed().as_micros() as u64;
                let from = if filler {
                    flush_left -= 1;
                    FILLER
                } else {
                    out.first_sent_us.get_or_insert(us);
                    out.sent += 1;
                    if now < load_end {
                        out.sent_load += 1;
                    }
                    idx
                };
                buf[..4].copy_from_slice(&from.to_be_bytes());
                buf[4..].copy_from_slice(&us.to_be_bytes());
                B64.encode_slice(buf, &mut stamp).map_err(|e| anyhow!("stamp: {e}"))?;
                let mut frame = template.clone();
                // Both are ASCII base64 of the same length: the frame keeps its size.
                frame.replace_range(stamp_at..stamp_at + STAMP_CHARS, std::str::from_utf8(&stamp)?);
                tx.send(Message::text(frame)).await?;
            }
            msg = rx.next() => {
                let text = match msg {
                    Some(Ok(Message::Text(t))) => t,
                    Some(Ok(Message::Close(_))) | None => bail!("socket closed mid-call"),
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => bail!("read: {e}"),
                };
                on_frame(idx, &text, twilio, shared, out, &mut tx, &sid).await?;
            }
            () = tokio::time::sleep_until(drain_until.into()), if !sending => break,
        }
        if !sending && out.received >= out.sent {
            break;
        }
    }
    // Hang up like Twilio: `stop`, then close.
    if twilio {
        let stop = format!(
            r#"{{"event":"stop","sequenceNumber":"9","streamSid":"{sid}","stop":{{"accountSid":"ACbench","callSid":"CAbench"}}}}"#
        );
        let _ = timeout(STEP, tx.send(Message::text(stop))).await;
    }
    let _ = timeout(STEP, tx.close()).await;
    Ok(())
}

/// One frame from the far side: time echoed audio, echo marks back.
async fn on_frame(
    idx: u32,
    text: &str,
    twilio: bool,
    shared: &Shared,
    out: &mut CallOut,
    tx: &mut SplitSink<Ws, Message>,
    sid: &str,
) -> anyhow::Result<()> {
    let key = if twilio {
        r#""payload":""#
    } else {
        r#""delta":""#
    };
    if let Some(at) = text.find(key) {
        let from_here = &text[at + key.len()..];
        let b64 = &from_here[..from_here.find('"').context("unterminated payload")?];
        // One 20 ms frame per 160 bytes, each with its stamp (a larger delta joins several).
        let audio = B64.decode(b64).context("payload is not base64")?;
        ensure!(
            !audio.is_empty() && audio.len() % FRAME_BYTES == 0,
            "payload of {} bytes is not whole 20 ms frames",
            audio.len()
        );
        let now_us = shared.epoch.elapsed().as_micros() as u64;
        for frame in audio.chunks_exact(FRAME_BYTES) {
            let from = u32::from_be_bytes([frame[0], frame[1], frame[2], frame[3]]);
            let mut us = [0u8; 8];
            us.copy_from_slice(&frame[4..STAMP_BYTES]);
            let sent_us = u64::from_be_bytes(us);
            if from == FILLER {
                continue;
            }
            if from != idx {
                out.misrouted += 1;
                continue;
            }
            let rtt = u32::try_from(now_us.saturating_sub(sent_us)).unwrap_or(u32::MAX);
            out.received += 1;
            out.rtts_us.push(rtt);
            // Stamps grow with every frame, so the first frame's stamp is unique.
            if out.first_sent_us == Some(sent_us) {
                out.first_rtt_us = Some(rtt);
            }
        }
        return Ok(());
    }
    if twilio && text.contains(r#""event":"mark""#) {
        let key = r#""name":""#;
        let at = text.find(key).context("mark without name")? + key.len();
        let len = text[at..].find('"').context("unterminated mark name")?;
        let name = &text[at..at + len];
        let echo = format!(
            r#"{{"event":"mark","sequenceNumber":"3","streamSid":"{sid}","mark":{{"name":"{name}"}}}}"#
        );
        tx.send(Message::text(echo)).await?;
        out.marks += 1;
    }
    Ok(())
}

async fn connect_via_relay(
    addr: SocketAddr,
    call_id: Option<String>,
) -> anyhow::Result<(Ws, String)> {
    let mut cfg = CallerConfig::new(&format!("http://{addr}"), addr, Some(TWILIO_TOKEN));
    cfg.call_id = call_id;
    cfg.io_timeout = STEP;
    let caller = SimCaller::new(cfg.clone());
    let hook = caller.webhook().await?;
    let twiml = hook.twiml.with_context(|| {
        format!(
            "webhook HTTP {}: {}",
            hook.response.status,
            hook.response.body.trim()
        )
    })?;
    let url = twiml.stream_url.context("TwiML without <Stream>")?;
    // Signed like Twilio signs it; dialled here (not with SimCaller::connect_stream) to
    // give the load generator's sockets small read buffers.
    let mut req = url.as_str().into_client_request()?;
    req.headers_mut().insert(
        "x-twilio-signature",
        twilio_signature(TWILIO_TOKEN, &url, &[]).parse()?,
    );
    let mut ws = dial(addr, req).await?;
    let sid = format!("MZ{}", &cfg.call_sid[2..]);
    let params: serde_json::Map<String, Value> = twiml
        .parameters
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    ws.send(Message::text(
        json!({"event": "connected", "protocol": "Call", "version": "1.0.0"}).to_string(),
    ))
    .await?;
    ws.send(Message::text(
        json!({"event": "start", "sequenceNumber": "1", "streamSid": sid,
        "start": {"streamSid": sid, "callSid": cfg.call_sid, "accountSid": cfg.account_sid,
        "tracks": ["inbound"], "customParameters": params,
        "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}}})
        .to_string(),
    ))
    .await?;
    Ok((ws, sid))
}

async fn connect_model(url: &str) -> anyhow::Result<Ws> {
    let url = format!("{url}?model=gpt-realtime");
    let mut req = url.as_str().into_client_request()?;
    req.headers_mut()
        .insert("authorization", format!("Bearer {OPENAI_KEY}").parse()?);
    let host: SocketAddr = url
        .strip_prefix("ws://")
        .and_then(|r| r.split('/').next())
        .context("model url")?
        .parse()?;
    dial(host, req).await
}

/// Opens a client WebSocket with buffers sized for ~300-byte frames (tungstenite's default
/// 128 KiB read buffer is zero-filled on every read: it would make the harness the limit).
async fn dial(
    addr: SocketAddr,
    req: tokio_tungstenite::tungstenite::handshake::client::Request,
) -> anyhow::Result<Ws> {
    let tcp = timeout(STEP, TcpStream::connect(addr)).await??;
    // 20 ms frames: Nagle + delayed ACK would add ~40 ms.
    tcp.set_nodelay(true)?;
    let cfg = WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0);
    let (ws, resp) = timeout(
        STEP,
        tokio_tungstenite::client_async_with_config(req, tcp, Some(cfg)),
    )
    .await??;
    ensure!(
        resp.status().as_u16() == 101,
        "upgrade answered {}",
        resp.status()
    );
    Ok(ws)
}

// ---- plot -----------------------------------------------------------------------------

/// Two panels against calls (log scale): RTT p99 per path, and relay CPU-ms per
/// call-second per path. Plain SVG polylines, no plotting crate.
fn plot(doc: &Value) -> String {
    const W: f64 = 420.0;
    const H: f64 = 260.0;
    const ML: f64 = 56.0;
    const MB: f64 = 36.0;
    const MT: f64 = 28.0;
    const MR: f64 = 12.0;
    let results = doc["results"].as_array().cloned().unwrap_or_default();
    let colours = [
        ("baseline", "#888888"),
        ("standalone", "#1f77b4"),
        ("production", "#d62728"),
    ];
    let panels: [(&str, &[&str]); 2] = [
        ("round trip p99 (ms)", &["rtt_ms", "p99"]),
        (
            "relay CPU-ms per call-second",
            &["relay", "cpu_ms_per_call_sec"],
        ),
    ];
    let xs: Vec<f64> = results.iter().filter_map(|r| r["calls"].as_f64()).collect();
    let (xmin, xmax) = xs
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), &x| (a.min(x), b.max(x)));
    let (lx0, lx1) = (xmin.max(1.0).log10(), xmax.max(10.0).log10());
    let lx1 = if lx1 - lx0 < 0.5 { lx0 + 1.0 } else { lx1 };
    let mut svg = String::new();
    let _ = write!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{}" height="{}" font-family="sans-serif" font-size="11">"#,
        W * 2.0,
        H + 20.0
    );
    let _ = write!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
    for (pi, (title, key)) in panels.iter().enumerate() {
        let ox = pi as f64 * W;
        let ys: Vec<f64> = results
            .iter()
            .map(|r| f(r, key))
            .filter(|v| v.is_finite())
            .collect();
        let ymax = ys.iter().fold(0.0f64, |a, &b| a.max(b)).max(1e-3) * 1.1;
        let px = |x: f64| ox + ML + (x.log10() - lx0) / (lx1 - lx0) * (W - ML - MR);
        let py = |y: f64| MT + (1.0 - y / ymax) * (H - MT - MB);
        let _ = write!(
            svg,
            r#"<text x="{}" y="16" text-anchor="middle" font-weight="bold">{title}</text>"#,
            ox + W / 2.0
        );
        let _ = write!(
            svg,
            r##"<line x1="{0}" y1="{1}" x2="{0}" y2="{2}" stroke="#000"/><line x1="{0}" y1="{2}" x2="{3}" y2="{2}" stroke="#000"/>"##,
            ox + ML,
            MT,
            H - MB,
            ox + W - MR
        );
        for i in 0..=4 {
            let y = ymax * f64::from(i) / 4.0;
            let _ = write!(
                svg,
                r##"<line x1="{0}" y1="{1}" x2="{2}" y2="{1}" stroke="#ddd"/><text x="{3}" y="{4}" text-anchor="end">{5:.2}</text>"##,
                ox + ML,
                py(y),
                ox + W - MR,
                ox + ML - 4.0,
                py(y) + 4.0,
                y
            );
        }
        let mut ticks: Vec<f64> = xs.clone();
        ticks.sort_by(f64::total_cmp);
        ticks.dedup();
        for x in ticks {
            let _ = write!(
                svg,
                r#"<text x="{}" y="{}" text-anchor="middle">{x}</text>"#,
                px(x),
                H - MB + 14.0
            );
        }
        let _ = write!(
            svg,
            r#"<text x="{}" y="{}" text-anchor="middle">calls (log scale)</text>"#,
            ox + ML + (W - ML - MR) / 2.0,
            H - 6.0
        );
        for (li, (path, colour)) in colours.iter().enumerate() {
            let pts: Vec<(f64, f64)> = results
                .iter()
                .filter(|r| r["path"] == *path)
                .filter_map(|r| Some((r["calls"].as_f64()?, f(r, key))))
                .filter(|(_, y)| y.is_finite())
                .collect();
            if pts.is_empty() {
                continue;
            }
            let line: Vec<String> = pts
                .iter()
                .map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y)))
                .collect();
            let _ = write!(
                svg,
                r#"<polyline fill="none" stroke="{colour}" stroke-width="2" points="{}"/>"#,
                line.join(" ")
            );
            for &(x, y) in &pts {
                let _ = write!(
                    svg,
                    r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{colour}"/>"#,
                    px(x),
                    py(y)
                );
            }
            let _ = write!(
                svg,
                r#"<text x="{}" y="{}" fill="{colour}">{path}</text>"#,
                ox + ML + 8.0,
                MT + 12.0 + li as f64 * 13.0
            );
        }
    }
    svg.push_str("</svg>\n");
    svg
}

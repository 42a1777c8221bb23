//! Control-plane benchmark: how many relay events one `callbridge-control` process stores
//! and acknowledges per second, and how soon a `WatchCall` watcher sees them.
//!
//! Run it through `scripts/bench-control.sh` (release build). It starts its own
//! `redis-server` on a unix socket and one control process (the real binary, found next
//! to this one or in `CALLBRIDGE_BIN_DIR`), then:
//! 1. **Throughput**, for each level of concurrent calls (default 1, 10, 100): every call is
//!    admitted, then one `Relay.Attach` stream per call pipelines its events (`started`,
//!    speech turns, `ended`) with at most `--window` unacknowledged. Figure: acknowledged
//!    events per second over the wall time of the level.
//! 2. **Watch latency** at `--watch-calls` calls: every call has a `WatchCall` watcher open
//!    before its relay stream starts; each stream sends `--watch-rate` events per second.
//!    For every event: send time, ack time, watcher receive time → p50/p99.
//! 3. **Bulk and serial**: one `CreateCalls` of `--bulk-calls` calls and `ListCalls` of them
//!    all (pages of 500), timed; then `--serial-events` events on one relay stream with one
//!    event in flight (each a full store + ack round trip).
//! 4. **Redis alone**: `redis-benchmark` XADD against the same server, for comparison.
//!
//! Alongside each figure it reads the CPU the control process and Redis used and the Redis
//! commands per event (`INFO commandstats`), which is where a slow path shows.
//! Prints a table and writes a JSON file (`--out`).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail, ensure};
use callbridge_proto::pb;
use callbridge_testkit::procs::{Proc, env, free_addr};
use callbridge_testkit::redis_server::{RedisServer, RedisTls};
use callbridge_tests::bench::{
    clock_ticks_per_sec, create_calls, json_f64 as f, load_average, machine, parse_key_value,
    percentile, process_cpu_ms, provenance, self_cpu_ms, write_result,
};
use callbridge_tests::{Bearer, CallsClient, WorldTls};
use clap::Parser;
use serde_json::{Value, json};
use tokio::process::Command;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior, timeout};
use tokio_stream::wrappers::ReceiverStream;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

const APP_TOKEN: &str = "bench-app-token-0123456789abcdef0123";
const RELAY_TOKEN: &str = "bench-relay-token-0123456789abcdef01";
/// Bound on any single wait for the server (an ack, a watch event, an RPC).
const STEP: Duration = Duration::from_secs(15);

/// Control-plane benchmark (see the module docs). Loopback only.
#[derive(Debug, Parser)]
#[command(name = "bench_control")]
struct Args {
    /// Events per throughput level, split evenly over its calls.
    #[arg(long, env = "BENCH_EVENTS", default_value_t = 60_000)]
    events: u64,
    /// Concurrent calls of each throughput level.
    #[arg(long, value_delimiter = ',', default_value = "1,10,100")]
    levels: Vec<u64>,
    /// Unacknowledged events a relay stream may have in flight. Note: with h2 0.4.20 the
    /// server closes a connection (GOAWAY ENHANCE_YOUR_CALM "too_many_data_frames") once
    /// a few thousand small unread DATA frames pile up on it, e.g. window 256 × 25 streams.
    #[arg(long, default_value_t = 64)]
    window: u64,
    /// HTTP/2 connections the calls are spread over (a relay pod holds one).
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Calls of the watch-latency run.
    #[arg(long, default_value_t = 100)]
    watch_calls: u64,
    /// Events per second each call sends in the watch-latency run.
    #[arg(long, default_value_t = 20)]
    watch_rate: u64,
    /// Length of the watch-latency run, seconds.
    #[arg(long, default_value_t = 10)]
    watch_secs: u64,
    /// Give up on one run after this many seconds.
    #[arg(long, default_value_t = 120)]
    run_timeout_secs: u64,
    /// Calls of the bulk run: one timed `CreateCalls` of this many calls, then `ListCalls`
    /// of them all in pages of 500 (0: skip both).
    #[arg(long, default_value_t = 1000)]
    bulk_calls: u64,
    /// Events of the serial run: one relay stream, one event in flight at a time, so each
    /// figure is a full store + ack round trip (0: skip).
    #[arg(long, default_value_t = 2000)]
    serial_events: u64,
    /// Requests of each `redis-benchmark` comparison run.
    #[arg(long, default_value_t = 200_000)]
    redis_requests: u64,
    /// Extra `KEY=VALUE` environment for the control process (repeatable), e.g.
    /// `--control-env CONTROL_LOG=info`.
    #[arg(long, value_parser = parse_key_value)]
    control_env: Vec<(String, String)>,
    /// Where to write the JSON result.
    #[arg(long, default_value = "bench-results/control.json")]
    out: PathBuf,
    /// TLS on both of control's hops: Redis on `rediss://` with a client certificate, and
    /// gRPC over TLS with client certificates (mTLS), from a CA generated for the run.
    /// redis-cli and redis-benchmark use Redis's plaintext loopback port.
    #[arg(long)]
    tls: bool,
}

type RelayClient = pb::relay_client::RelayClient<InterceptedService<Channel, Bearer>>;

/// The system under test: one control process on its own Redis.
struct Bench {
    redis: RedisServer,
    /// How redis-cli and redis-benchmark reach the server (`-s SOCK` or `-h … -p …`).
    redis_cli_target: Vec<String>,
    /// The certificates of a `--tls` run (kept for as long as control reads them).
    _tls: Option<WorldTls>,
    control: Proc,
    control_pid: u32,
    channels: Vec<Channel>,
    app: Bearer,
    relay: Bearer,
    clk_tck: f64,
}

impl Bench {
    async fn start(args: &Args) -> anyhow::Result<Self> {
        let tls = if args.tls {
            Some(WorldTls::generate().context("test certificates")?)
        } else {
            None
        };
        let (redis, redis_cli_target) = match &tls {
            Some(tls) => {
                let redis = RedisServer::tls(&RedisTls {
                    cert: tls.redis_server.cert.clone(),
                    key: tls.redis_server.key.clone(),
                    client_ca: tls.ca.ca_file().to_owned(),
                    require_client_cert: true,
                })
                .context("starting redis-server with TLS")?;
                let port = redis.admin_port().context("admin port")?;
                let target = vec![
                    "-h".to_owned(),
                    "127.0.0.1".to_owned(),
                    "-p".to_owned(),
                    port.to_string(),
                ];
                (redis, target)
            }
            None => {
                let redis = RedisServer::unix().context("starting redis-server")?;
                let sock = redis
                    .dir()
                    .join("redis.sock")
                    .to_string_lossy()
                    .into_owned();
                (redis, vec!["-s".to_owned(), sock])
            }
        };
        let addr = free_addr()?;
        let redis_url = redis.url();
        let mut control_env = env([
            ("CONTROL_LISTEN", &addr.to_string()),
            ("REDIS_URL", &redis_url),
            ("CONTROL_APP_TOKENS", APP_TOKEN),
            ("CONTROL_RELAY_TOKENS", RELAY_TOKEN),
            ("RELAY_PUBLIC_URL", "https://relay.bench.example"),
            ("CONTROL_ID", "control-bench"),
            // The metrics listener defaults to a fixed port; parallel runs would clash.
            ("CONTROL_METRICS_LISTEN", ""),
            ("CONTROL_LOG", "warn"),
        ]);
        if let Some(tls) = &tls {
            control_env.extend(tls.control_env());
        }
        control_env.extend(args.control_env.iter().cloned());
        // Found in CALLBRIDGE_BIN_DIR or next to this binary (target/release).
        let mut control = Proc::spawn("callbridge-control", control_env, addr)
            .context("starting callbridge-control (scripts/bench-control.sh builds it)")?;
        let client_tls = tls.as_ref().map(|t| t.client_config(Some(&t.client)));
        control
            .wait_grpc_serving_tls(client_tls.clone(), Duration::from_secs(30))
            .await
            .map_err(|e| anyhow!("control not serving: {e}"))?;
        let control_pid = control.pid().context("control has a pid")?;
        let scheme = if tls.is_some() { "https" } else { "http" };
        let mut endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))?
            .connect_timeout(Duration::from_secs(1))
            .tcp_nodelay(true);
        if let Some(client_tls) = client_tls {
            endpoint = endpoint.tls_config(client_tls)?;
        }
        let channels = (0..args.connections.max(1))
            .map(|_| endpoint.connect_lazy())
            .collect();
        Ok(Self {
            redis,
            redis_cli_target,
            _tls: tls,
            control,
            control_pid,
            channels,
            app: Bearer::new(APP_TOKEN),
            relay: Bearer::new(RELAY_TOKEN),
            clk_tck: clock_ticks_per_sec(),
        })
    }

    fn relay(&self, i: usize) -> RelayClient {
        let ch = self.channels[i % self.channels.len()].clone();
        pb::relay_client::RelayClient::with_interceptor(ch, self.relay.clone())
    }

    fn calls(&self, i: usize) -> CallsClient {
        let ch = self.channels[i % self.channels.len()].clone();
        pb::calls_client::CallsClient::with_interceptor(ch, self.app.clone())
    }

    async fn create_agent(&self) -> anyhow::Result<String> {
        let mut agents = pb::agents_client::AgentsClient::with_interceptor(
            self.channels[0].clone(),
            self.app.clone(),
        );
        let req = pb::CreateAgentRequest {
            agent_id: String::new(),
            settings: Some(pb::AgentSettings {
                name: "bench agent".to_owned(),
                instructions: "You are a benchmark. Be brief.".to_owned(),
                ..Default::default()
            }),
        };
        let agent = timeout(STEP, agents.create_agent(req)).await??.into_inner();
        Ok(agent.agent_id)
    }

    /// Creates and admits `n` calls (as a relay would at webhook time); returns their ids.
    async fn prepare_calls(
        &self,
        agent_id: &str,
        n: u64,
        campaign: &str,
    ) -> anyhow::Result<Vec<String>> {
        let mut calls = self.calls(0);
        let ids = create_calls(&mut calls, agent_id, n as usize, campaign, STEP).await?;
        ensure!(
            ids.len() as u64 == n,
            "CreateCalls returned {} calls for {n}",
            ids.len()
        );
        let mut relay = self.relay(0);
        for id in &ids {
            let req = pb::AdmitRequest {
                call_id: id.clone(),
                // Control's call ids are 32 hex digits: with `CA`, a Twilio-shaped sid.
                twilio_call_sid: format!("CA{id}"),
                from: "+14155550100".to_owned(),
                to: "+14155550199".to_owned(),
                twilio_direction: "outbound-api".to_owned(),
                account_sid: "ACbench".to_owned(),
            };
            timeout(STEP, relay.admit(req)).await??;
        }
        Ok(ids)
    }

    /// CPU seconds (user + system) the control process has used so far.
    fn control_cpu_secs(&self) -> anyhow::Result<f64> {
        Ok(process_cpu_ms(self.control_pid, self.clk_tck)? / 1000.0)
    }

    /// CPU seconds this benchmark process (the load generator) has used so far: it
    /// shares the cores with control and Redis, so it is part of the picture.
    fn client_cpu_secs(&self) -> anyhow::Result<f64> {
        Ok(self_cpu_ms(self.clk_tck)? / 1000.0)
    }

    async fn redis_cli(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = timeout(
            STEP,
            Command::new("redis-cli")
                .args(&self.redis_cli_target)
                .args(args)
                .kill_on_drop(true)
                .output(),
        )
        .await?
        .context("running redis-cli")?;
        ensure!(
            out.status.success(),
            "redis-cli {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Redis-side figures between two calls: command counts and CPU.
    async fn redis_snapshot(&self) -> anyhow::Result<RedisSnapshot> {
        let stats = self.redis_cli(&["INFO", "commandstats"]).await?;
        let cpu = self.redis_cli(&["INFO", "cpu"]).await?;
        Ok(RedisSnapshot::parse(&stats, &cpu))
    }
}

/// `INFO commandstats` (per command: calls, usec) and `INFO cpu` at one moment.
#[derive(Debug, Default)]
struct RedisSnapshot {
    commands: BTreeMap<String, (u64, u64)>,
    cpu_secs: f64,
}

impl RedisSnapshot {
    fn parse(stats: &str, cpu: &str) -> Self {
        let mut commands = BTreeMap::new();
        for line in stats.lines() {
            let Some((name, rest)) = line
                .trim()
                .strip_prefix("cmdstat_")
                .and_then(|l| l.split_once(':'))
            else {
                continue;
            };
            let field = |key: &str| {
                rest.split(',')
                    .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0)
            };
            commands.insert(name.to_owned(), (field("calls"), field("usec")));
        }
        let cpu_secs = cpu
            .lines()
            .filter_map(|l| {
                let (k, v) = l.trim().split_once(':')?;
                matches!(k, "used_cpu_sys" | "used_cpu_user").then(|| v.parse::<f64>().ok())?
            })
            .sum();
        Self { commands, cpu_secs }
    }

    /// What happened between `before` and `self`: (command, calls, usec), busiest first.
    fn since(&self, before: &Self) -> Vec<(String, u64, u64)> {
        let mut out: Vec<_> = self
            .commands
            .iter()
            .filter_map(|(name, &(calls, usec))| {
                let (c0, u0) = before.commands.get(name).copied().unwrap_or((0, 0));
                let calls = calls.saturating_sub(c0);
                (calls > 0 && name != "info")
                    .then(|| (name.clone(), calls, usec.saturating_sub(u0)))
            })
            .collect();
        out.sort_by_key(|c| std::cmp::Reverse(c.1));
        out
    }
}

/// How one relay stream sends its events.
#[derive(Debug, Clone, Copy)]
struct Plan {
    /// Events including the first `started` and the last `ended`.
    events: u64,
    window: u64,
    /// `None`: as fast as the window allows; `Some((p, phase))`: one event every `p`,
    /// the first after `phase`. Calls get different phases because real calls do not
    /// speak in lockstep; aligned ticks would measure a burst queue instead.
    pace: Option<(Duration, Duration)>,
}

/// Per-event times of one stream, micros since the run's base instant, index = seq - 1.
struct StreamTrace {
    call_id: String,
    sent_us: Vec<u64>,
    acked_us: Vec<u64>,
}

fn micros_since(base: Instant) -> u64 {
    u64::try_from(base.elapsed().as_micros()).unwrap_or(u64::MAX)
}

fn event(call_id: &str, seq: u64, last: u64) -> pb::AttachRequest {
    use pb::call_event::Kind;
    let kind = if seq == 1 {
        Kind::Started(pb::Started {
            twilio_call_sid: format!("CA{call_id}"),
            stream_sid: format!("MZbench{call_id}"),
            relay_id: "relay-bench".to_owned(),
            resumed: false,
        })
    } else if seq == last {
        Kind::Ended(pb::Ended {
            reason: pb::EndReason::CallerHangup as i32,
            detail: String::new(),
            transfer_to: String::new(),
        })
    } else if seq.is_multiple_of(2) {
        Kind::Caller(pb::CallerSpeech {
            item_id: format!("item_{seq}"),
            text: "Hi, I would like to move my appointment to Thursday afternoon.".to_owned(),
        })
    } else {
        Kind::Assistant(pb::AssistantSpeech {
            item_id: format!("item_{seq}"),
            text: "Of course. I have three o'clock or four thirty on Thursday.".to_owned(),
            interrupted: false,
            heard_ms: 2400,
            audio_ms: 2400,
        })
    };
    let at_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
    pb::AttachRequest {
        msg: Some(pb::attach_request::Msg::Event(pb::CallEvent {
            call_id: call_id.to_owned(),
            seq,
            at_ms,
            kind: Some(kind),
        })),
    }
}

/// Plays the relay of one call: open, then send the plan's events with a bounded window
/// of unacknowledged ones, until `ended` is acknowledged.
async fn drive_call(
    mut relay: RelayClient,
    call_id: String,
    plan: Plan,
    base: Instant,
) -> anyhow::Result<StreamTrace> {
    let total = plan.events.max(2);
    let window = plan.window.max(1);
    // Never more than `window` events are unacknowledged, so the channel never holds more.
    let (tx, rx) = mpsc::channel(usize::try_from(window)? + 1);
    let open = pb::AttachRequest {
        msg: Some(pb::attach_request::Msg::Open(pb::AttachOpen {
            call_id: call_id.clone(),
            relay_id: "relay-bench".to_owned(),
            reconnect: false,
            ..Default::default()
        })),
    };
    tx.send(open).await?;
    let mut down = timeout(STEP, relay.attach(ReceiverStream::new(rx)))
        .await
        .context("attach: no response headers")??
        .into_inner();
    match timeout(STEP, down.message())
        .await
        .context("attach: no context")??
        .and_then(|m| m.msg)
    {
        Some(pb::attach_response::Msg::Context(ctx)) => {
            ensure!(
                ctx.last_seq == 0,
                "call {call_id} already has {} events",
                ctx.last_seq
            )
        }
        other => bail!("attach {call_id}: first reply is not the context: {other:?}"),
    }

    let mut trace = StreamTrace {
        call_id: call_id.clone(),
        sent_us: vec![0; usize::try_from(total)?],
        acked_us: vec![0; usize::try_from(total)?],
    };
    let mut ticker = plan.pace.map(|(p, phase)| {
        let mut t = tokio::time::interval_at(Instant::now() + phase, p);
        t.set_missed_tick_behavior(MissedTickBehavior::Delay);
        t
    });
    let (mut next, mut acked) = (1u64, 0u64);
    while acked < total {
        let can_send = next <= total && next - 1 - acked < window;
        tokio::select! {
            biased;
            // Acks first, so the window opens as soon as the server allows.
            reply = timeout(STEP, down.message()) => {
                let reply = reply
                    .with_context(|| format!("call {call_id}: no ack for {STEP:?} (acked {acked}, sent {})", next - 1))?
                    .with_context(|| format!("call {call_id}: attach stream failed (acked {acked}, sent {})", next - 1))?;
                match reply.and_then(|m| m.msg) {
                    Some(pb::attach_response::Msg::AckedSeq(seq)) => {
                        ensure!(seq < next, "call {call_id}: ack {seq} for an event not sent yet");
                        let now = micros_since(base);
                        for s in acked + 1..=seq {
                            trace.acked_us[usize::try_from(s - 1)?] = now;
                        }
                        acked = acked.max(seq);
                    }
                    Some(pb::attach_response::Msg::Command(_)) => {}
                    Some(pb::attach_response::Msg::Context(_)) => bail!("call {call_id}: second context"),
                    None => bail!("call {call_id}: stream closed at ack {acked} of {total}"),
                }
            }
            // The next event, when the window has room (and, paced, when its time comes).
            () = next_tick(&mut ticker), if can_send => {
                trace.sent_us[usize::try_from(next - 1)?] = micros_since(base);
                tx.send(event(&call_id, next, total)).await.context("attach stream closed")?;
                next += 1;
            }
        }
    }
    Ok(trace)
}

async fn next_tick(ticker: &mut Option<tokio::time::Interval>) {
    if let Some(t) = ticker {
        t.tick().await;
    }
}

/// Collects a call's events from `WatchCall` until the stream ends: receive time per seq.
async fn drain_watch(
    mut stream: tonic::Streaming<pb::CallEvent>,
    call_id: String,
    expected: u64,
    base: Instant,
) -> anyhow::Result<(String, Vec<u64>)> {
    let mut seen = vec![0u64; usize::try_from(expected)?];
    let mut count = 0u64;
    while let Some(ev) = timeout(STEP, stream.message())
        .await
        .with_context(|| format!("watch {call_id}: nothing for {STEP:?} after {count} events"))??
    {
        let now = micros_since(base);
        ensure!(
            ev.call_id == call_id,
            "watch {call_id}: event of {}",
            ev.call_id
        );
        ensure!(
            ev.seq >= 1 && ev.seq <= expected,
            "watch {call_id}: unexpected seq {}",
            ev.seq
        );
        let slot = &mut seen[usize::try_from(ev.seq - 1)?];
        ensure!(
            *slot == 0,
            "watch {call_id}: seq {} delivered twice",
            ev.seq
        );
        *slot = now;
        count += 1;
    }
    ensure!(
        count == expected,
        "watch {call_id}: stream ended after {count} of {expected} events"
    );
    Ok((call_id, seen))
}

#[derive(Debug)]
struct Quantiles {
    p50_us: i64,
    p99_us: i64,
    max_us: i64,
    n: usize,
}

fn quantiles(mut v: Vec<i64>) -> Quantiles {
    v.sort_unstable();
    Quantiles {
        p50_us: percentile(&v, 50.0).unwrap_or(0),
        p99_us: percentile(&v, 99.0).unwrap_or(0),
        max_us: v.last().copied().unwrap_or(0),
        n: v.len(),
    }
}

impl Quantiles {
    fn json(&self) -> Value {
        json!({"p50_us": self.p50_us, "p99_us": self.p99_us, "max_us": self.max_us, "samples": self.n})
    }
}

fn ms(us: i64) -> String {
    format!("{:.2}", us as f64 / 1000.0)
}

/// One throughput level: `calls` attach streams pipelining `events_per_call` each.
async fn throughput_level(
    bench: &Bench,
    args: &Args,
    agent: &str,
    calls: u64,
) -> anyhow::Result<Value> {
    let per_call = (args.events / calls).max(2);
    let ids = bench
        .prepare_calls(agent, calls, &format!("tp{calls}"))
        .await?;
    let redis_before = bench.redis_snapshot().await?;
    let cpu_before = bench.control_cpu_secs()?;
    let client_before = bench.client_cpu_secs()?;
    let base = Instant::now();
    let mut set = JoinSet::new();
    for (i, id) in ids.into_iter().enumerate() {
        let plan = Plan {
            events: per_call,
            window: args.window,
            pace: None,
        };
        set.spawn(drive_call(bench.relay(i), id, plan, base));
    }
    let traces = timeout(
        Duration::from_secs(args.run_timeout_secs),
        join_all(&mut set),
    )
    .await
    .with_context(|| {
        format!(
            "{calls}-call level did not finish in {} s",
            args.run_timeout_secs
        )
    })??;
    let secs = base.elapsed().as_secs_f64();
    let control_cpu = bench.control_cpu_secs()? - cpu_before;
    let client_cpu = bench.client_cpu_secs()? - client_before;
    let redis_after = bench.redis_snapshot().await?;

    let events: u64 = traces.iter().map(|t| t.acked_us.len() as u64).sum();
    let ack = quantiles(
        traces
            .iter()
            .flat_map(|t| {
                t.sent_us
                    .iter()
                    .zip(&t.acked_us)
                    .map(|(s, a)| *a as i64 - *s as i64)
            })
            .collect(),
    );
    let redis_cmds = redis_after.since(&redis_before);
    let redis_calls: u64 = redis_cmds.iter().map(|c| c.1).sum();
    let rate = events as f64 / secs;
    Ok(json!({
        "calls": calls,
        "events": events,
        "window": args.window,
        "seconds": secs,
        "events_per_sec": rate,
        "send_to_ack_under_load": ack.json(),
        "control_cpu_percent": 100.0 * control_cpu / secs,
        "bench_client_cpu_percent": 100.0 * client_cpu / secs,
        "redis_cpu_percent": 100.0 * (redis_after.cpu_secs - redis_before.cpu_secs) / secs,
        "redis_commands_per_event": redis_calls as f64 / events as f64,
        "redis_commands": redis_cmds.iter().map(|(n, c, u)| json!({"command": n, "calls": c, "usec": u})).collect::<Vec<_>>(),
    }))
}

async fn join_all<T: 'static>(set: &mut JoinSet<anyhow::Result<T>>) -> anyhow::Result<Vec<T>> {
    let mut out = Vec::with_capacity(set.len());
    while let Some(res) = set.join_next().await {
        out.push(res.context("bench task panicked")??);
    }
    Ok(out)
}

/// `ListCalls` pages the bulk run asks for.
const LIST_PAGE: u32 = 500;

/// The bulk and serial runs: what an application waits for when it creates a campaign and
/// lists it, and what one event costs when nothing else is in flight (no pipelining).
async fn bulk_run(bench: &Bench, args: &Args, agent: &str) -> anyhow::Result<Value> {
    let mut out = serde_json::Map::new();
    if args.bulk_calls > 0 {
        let n = args.bulk_calls;
        let mut calls = bench.calls(0);
        let cpu0 = bench.control_cpu_secs()?;
        let t = Instant::now();
        let ids = create_calls(&mut calls, agent, usize::try_from(n)?, "bulk", STEP).await?;
        let create_ms = t.elapsed().as_secs_f64() * 1000.0;
        let cpu1 = bench.control_cpu_secs()?;
        ensure!(
            ids.len() as u64 == n,
            "CreateCalls returned {} calls for {n}",
            ids.len()
        );
        let t = Instant::now();
        let (mut token, mut listed, mut pages) = (String::new(), 0u64, 0u64);
        loop {
            let req = pb::ListCallsRequest {
                campaign_id: "bulk".to_owned(),
                page_size: LIST_PAGE,
                page_token: token.clone(),
                ..Default::default()
            };
            let page = timeout(STEP, calls.list_calls(req)).await??.into_inner();
            listed += page.calls.len() as u64;
            pages += 1;
            if page.next_page_token.is_empty() {
                break;
            }
            ensure!(pages <= n, "ListCalls did not end after {pages} pages");
            token = page.next_page_token;
        }
        let list_ms = t.elapsed().as_secs_f64() * 1000.0;
        let cpu2 = bench.control_cpu_secs()?;
        ensure!(listed == n, "ListCalls listed {listed} of {n} calls");
        out.insert(
            "create_calls".to_owned(),
            json!({"calls": n, "batch": 500, "ms": create_ms,
                   "calls_per_sec": n as f64 * 1000.0 / create_ms.max(1e-9),
                   "control_cpu_ms": (cpu1 - cpu0) * 1000.0}),
        );
        out.insert(
            "list_calls".to_owned(),
            json!({"calls": listed, "page_size": LIST_PAGE, "pages": pages, "ms": list_ms,
                   "control_cpu_ms": (cpu2 - cpu1) * 1000.0}),
        );
    }
    if args.serial_events > 0 {
        let ids = bench.prepare_calls(agent, 1, "serial").await?;
        let id = ids.into_iter().next().context("one serial call")?;
        // `started` and `ended` are part of the plan: serial_events + 2 events in all.
        let plan = Plan {
            events: args.serial_events + 2,
            window: 1,
            pace: None,
        };
        let base = Instant::now();
        let cpu0 = bench.control_cpu_secs()?;
        let trace = drive_call(bench.relay(0), id, plan, base).await?;
        let secs = base.elapsed().as_secs_f64();
        let cpu1 = bench.control_cpu_secs()?;
        let events = trace.acked_us.len() as u64;
        let rtt = quantiles(
            trace
                .sent_us
                .iter()
                .zip(&trace.acked_us)
                .map(|(s, a)| *a as i64 - *s as i64)
                .collect(),
        );
        out.insert(
            "serial_events".to_owned(),
            json!({"events": events, "seconds": secs,
                   "us_per_event": secs * 1e6 / events as f64,
                   "events_per_sec": events as f64 / secs,
                   "send_to_ack": rtt.json(),
                   "control_cpu_us_per_event": (cpu1 - cpu0) * 1e6 / events as f64}),
        );
    }
    Ok(Value::Object(out))
}

/// The watch-latency run: watchers first, then paced relay streams.
async fn watch_run(bench: &Bench, args: &Args, agent: &str) -> anyhow::Result<Value> {
    let calls = args.watch_calls.max(1);
    let rate = args.watch_rate.max(1);
    let per_call = (rate * args.watch_secs).max(2);
    let pace = Duration::from_micros(1_000_000 / rate);
    let ids = bench.prepare_calls(agent, calls, "watch").await?;

    // Every watcher is open (response headers received) before any event is sent, so each
    // event is a live one for its watcher.
    let base = Instant::now();
    let mut watchers = JoinSet::new();
    for (i, id) in ids.iter().enumerate() {
        let mut client = bench.calls(i);
        let req = pb::WatchCallRequest {
            call_id: id.clone(),
            after_seq: 0,
        };
        let stream = timeout(STEP, client.watch_call(req))
            .await
            .context("WatchCall: no response headers")??
            .into_inner();
        watchers.spawn(drain_watch(stream, id.clone(), per_call, base));
    }
    let redis_before = bench.redis_snapshot().await?;
    let cpu_before = bench.control_cpu_secs()?;
    let client_before = bench.client_cpu_secs()?;
    let started = Instant::now();
    let mut relays = JoinSet::new();
    for (i, id) in ids.iter().enumerate() {
        let plan = Plan {
            events: per_call,
            window: args.window,
            pace: Some((pace, pace.mul_f64(i as f64 / calls as f64))),
        };
        relays.spawn(drive_call(bench.relay(i), id.clone(), plan, base));
    }
    let limit = Duration::from_secs(args.run_timeout_secs);
    let traces = timeout(limit, join_all(&mut relays))
        .await
        .context("watch run: relays did not finish")??;
    let secs = started.elapsed().as_secs_f64();
    let control_cpu = bench.control_cpu_secs()? - cpu_before;
    let client_cpu = bench.client_cpu_secs()? - client_before;
    let redis_after = bench.redis_snapshot().await?;
    // Watcher traces come back in completion order; key them by call to pair with sends.
    let mut seen: std::collections::HashMap<String, Vec<u64>> =
        timeout(STEP, join_all(&mut watchers))
            .await
            .context("watch run: watchers did not finish")??
            .into_iter()
            .collect();

    let mut send_ack = Vec::new();
    let mut send_watch = Vec::new();
    let mut ack_watch = Vec::new();
    for t in &traces {
        let w = seen
            .remove(&t.call_id)
            .with_context(|| format!("no watcher trace for call {}", t.call_id))?;
        for ((s, a), r) in t.sent_us.iter().zip(&t.acked_us).zip(&w) {
            let (s, a, r) = (*s as i64, *a as i64, *r as i64);
            send_ack.push(a - s);
            send_watch.push(r - s);
            ack_watch.push(r - a);
        }
    }
    let events = send_ack.len() as u64;
    let (send_ack, send_watch, ack_watch) = (
        quantiles(send_ack),
        quantiles(send_watch),
        quantiles(ack_watch),
    );
    let redis_cmds = redis_after.since(&redis_before);
    Ok(json!({
        "calls": calls,
        "events": events,
        "events_per_call_per_sec": rate,
        "offered_events_per_sec": calls * rate,
        "seconds": secs,
        "send_to_ack": send_ack.json(),
        "send_to_watch": send_watch.json(),
        "ack_to_watch": ack_watch.json(),
        "control_cpu_percent": 100.0 * control_cpu / secs,
        "bench_client_cpu_percent": 100.0 * client_cpu / secs,
        "redis_cpu_percent": 100.0 * (redis_after.cpu_secs - redis_before.cpu_secs) / secs,
        "redis_commands_per_event": redis_cmds.iter().map(|c| c.1).sum::<u64>() as f64 / events as f64,
        "redis_commands": redis_cmds.iter().map(|(n, c, u)| json!({"command": n, "calls": c, "usec": u})).collect::<Vec<_>>(),
    }))
}

/// `redis-benchmark` XADD against the same server: the floor control stands on.
async fn redis_benchmark(
    target: &[String],
    requests: u64,
    clients: u32,
    pipeline: u32,
) -> anyhow::Result<Value> {
    let out = timeout(
        Duration::from_secs(120),
        Command::new("redis-benchmark")
            .args(target)
            .args(["-n", &requests.to_string(), "-c", &clients.to_string()])
            .args(["-P", &pipeline.to_string(), "-q"])
            .args(["XADD", "redisbench", "*", "f", "v"])
            .kill_on_drop(true)
            .output(),
    )
    .await
    .context("redis-benchmark took over 120 s")?
    .context("running redis-benchmark (apt-get install redis-tools)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    // -q prints progress lines separated by '\r' and ends with
    // `XADD …: 123456.79 requests per second, p50=0.183 msec`.
    let rps = text
        .split(['\r', '\n'])
        .filter_map(|l| {
            l.split_once(" requests per second")?
                .0
                .rsplit(' ')
                .next()?
                .parse::<f64>()
                .ok()
        })
        .next_back()
        .ok_or_else(|| anyhow!("no rate in redis-benchmark output: {text:?}"))?;
    Ok(json!({"clients": clients, "pipeline": pipeline, "requests": requests, "xadd_per_sec": rps}))
}

fn print_report(report: &Value) {
    println!();
    println!(
        "control-plane benchmark ({} cores: {})",
        report["machine"]["cores"],
        report["machine"]["cpu"].as_str().unwrap_or("?")
    );
    println!(
        "1-min load average: {} at start, {} at end (other work on the machine skews figures)",
        report["machine"]["load_average_at_start"], report["load_average_at_end"]
    );
    println!();
    println!(
        "throughput (attach streams, window {} unacked, {} connections)",
        report["window"], report["connections"]
    );
    println!(
        "{:>6} {:>9} {:>8} {:>11} {:>10} {:>10} {:>9} {:>9} {:>9} {:>10}",
        "calls",
        "events",
        "secs",
        "events/s",
        "ack p50ms",
        "ack p99ms",
        "ctl cpu%",
        "rds cpu%",
        "cli cpu%",
        "rds cmd/ev"
    );
    for lvl in report["throughput"].as_array().into_iter().flatten() {
        println!(
            "{:>6} {:>9} {:>8.2} {:>11.0} {:>10} {:>10} {:>9.0} {:>9.0} {:>9.0} {:>10.2}",
            lvl["calls"].as_u64().unwrap_or(0),
            lvl["events"].as_u64().unwrap_or(0),
            f(lvl, &["seconds"]),
            f(lvl, &["events_per_sec"]),
            ms(lvl["send_to_ack_under_load"]["p50_us"]
                .as_i64()
                .unwrap_or(0)),
            ms(lvl["send_to_ack_under_load"]["p99_us"]
                .as_i64()
                .unwrap_or(0)),
            f(lvl, &["control_cpu_percent"]),
            f(lvl, &["redis_cpu_percent"]),
            f(lvl, &["bench_client_cpu_percent"]),
            f(lvl, &["redis_commands_per_event"]),
        );
    }
    let w = &report["watch"];
    if w.is_object() {
        println!();
        println!(
            "watch latency: {} calls × {} events/s = {} events/s offered, {} events",
            w["calls"], w["events_per_call_per_sec"], w["offered_events_per_sec"], w["events"]
        );
        println!("{:>16} {:>9} {:>9} {:>9}", "", "p50 ms", "p99 ms", "max ms");
        for (label, key) in [
            ("send → ack", "send_to_ack"),
            ("send → watcher", "send_to_watch"),
            ("ack → watcher", "ack_to_watch"),
        ] {
            let q = &w[key];
            println!(
                "{:>16} {:>9} {:>9} {:>9}",
                label,
                ms(q["p50_us"].as_i64().unwrap_or(0)),
                ms(q["p99_us"].as_i64().unwrap_or(0)),
                ms(q["max_us"].as_i64().unwrap_or(0))
            );
        }
        println!(
            "  control cpu {:.0}%, redis cpu {:.0}%, bench client cpu {:.0}%, redis commands/event {:.2}",
            f(w, &["control_cpu_percent"]),
            f(w, &["redis_cpu_percent"]),
            f(w, &["bench_client_cpu_percent"]),
            f(w, &["redis_commands_per_event"])
        );
    }
    let b = &report["bulk"];
    if let Some(c) = b.get("create_calls") {
        println!();
        println!("bulk (one client, nothing else in flight)");
        println!(
            "  CreateCalls {} calls (batches of {}): {:>9.1} ms ({:.0} calls/s, control cpu {:.0} ms)",
            c["calls"],
            c["batch"],
            f(c, &["ms"]),
            f(c, &["calls_per_sec"]),
            f(c, &["control_cpu_ms"])
        );
        let l = &b["list_calls"];
        println!(
            "  ListCalls {} calls ({} pages of {}): {:>9.1} ms (control cpu {:.0} ms)",
            l["calls"],
            l["pages"],
            l["page_size"],
            f(l, &["ms"]),
            f(l, &["control_cpu_ms"])
        );
    }
    if let Some(e) = b.get("serial_events") {
        let q = &e["send_to_ack"];
        println!(
            "  serial events (window 1) {}: {:.1} us/event ({:.0} events/s), send → ack p50 {} ms, p99 {} ms, max {} ms",
            e["events"],
            f(e, &["us_per_event"]),
            f(e, &["events_per_sec"]),
            ms(q["p50_us"].as_i64().unwrap_or(0)),
            ms(q["p99_us"].as_i64().unwrap_or(0)),
            ms(q["max_us"].as_i64().unwrap_or(0))
        );
    }
    println!();
    println!(
        "redis-benchmark XADD on the same server (unix socket; its plaintext loopback port with --tls)"
    );
    for r in report["redis_benchmark"].as_array().into_iter().flatten() {
        println!(
            "  {:>3} clients, pipeline {:>2}: {:>10.0} XADD/s",
            r["clients"].as_u64().unwrap_or(0),
            r["pipeline"].as_u64().unwrap_or(0),
            f(r, &["xadd_per_sec"])
        );
    }
    println!();
    println!("redis commands in the busiest throughput level (calls, usec per call):");
    if let Some(last) = report["throughput"].as_array().and_then(|a| a.last()) {
        let events = f(last, &["events"]);
        for c in last["redis_commands"]
            .as_array()
            .into_iter()
            .flatten()
            .take(12)
        {
            let calls = f(c, &["calls"]);
            println!(
                "  {:<20} {:>10} ({:.2}/event, {:.1} usec each)",
                c["command"].as_str().unwrap_or("?"),
                calls,
                calls / events,
                f(c, &["usec"]) / calls.max(1.0)
            );
        }
    }
    println!();
    for t in report["targets"].as_array().into_iter().flatten() {
        println!(
            "target {}: {}",
            t["target"].as_str().unwrap_or("?"),
            if t["met"].as_bool() == Some(true) {
                "MET"
            } else {
                "NOT MET"
            }
        );
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    ensure!(
        !args.levels.is_empty() && args.levels.iter().all(|l| *l > 0),
        "--levels must be positive numbers"
    );
    let bench = Bench::start(&args).await?;
    eprintln!(
        "bench: control pid {} ready; redis at {}",
        bench.control_pid,
        bench.redis.url()
    );
    let report = match measure(&bench, &args).await {
        Ok(report) => report,
        Err(e) => {
            eprintln!("---- control log ----\n{}", bench.control.log_text());
            return Err(e);
        }
    };
    print_report(&report);
    write_result(&args.out, &report).with_context(|| format!("writing {}", args.out.display()))?;
    println!("\nwrote {}", args.out.display());
    Ok(())
}

/// Every run, in order; the whole report as JSON.
async fn measure(bench: &Bench, args: &Args) -> anyhow::Result<Value> {
    let machine = machine("bench client, control and redis share these cores");
    let agent = bench.create_agent().await?;
    let mut throughput = Vec::new();
    for &calls in &args.levels {
        eprintln!("bench: throughput with {calls} calls …");
        throughput.push(throughput_level(bench, args, &agent, calls).await?);
    }
    eprintln!("bench: watch latency with {} calls …", args.watch_calls);
    let watch = watch_run(bench, args, &agent).await?;
    eprintln!("bench: bulk CreateCalls/ListCalls and serial events …");
    let bulk = bulk_run(bench, args, &agent).await?;
    eprintln!("bench: redis-benchmark …");
    let mut redis_bench = Vec::new();
    for (clients, pipeline) in [(50, 1), (50, 16)] {
        redis_bench.push(
            redis_benchmark(
                &bench.redis_cli_target,
                args.redis_requests,
                clients,
                pipeline,
            )
            .await?,
        );
    }

    let best_rate = throughput
        .iter()
        .map(|l| f(l, &["events_per_sec"]))
        .fold(0.0, f64::max);
    let rate_at_100 = throughput
        .iter()
        .find(|l| l["calls"] == 100)
        .map(|l| f(l, &["events_per_sec"]));
    let watch_p99_ms = w_p99_ms(&watch);
    let report = json!({
        "bench": "control",
        "provenance": provenance(),
        "machine": machine,
        "load_average_at_end": load_average(),
        "tls": args.tls,
        "args": {"events": args.events, "levels": args.levels, "watch_calls": args.watch_calls,
                 "watch_rate": args.watch_rate, "watch_secs": args.watch_secs,
                 "bulk_calls": args.bulk_calls, "serial_events": args.serial_events,
                 "redis_requests": args.redis_requests},
        "window": args.window,
        "connections": args.connections,
        "throughput": throughput,
        "watch": watch,
        "bulk": bulk,
        "redis_benchmark": redis_bench,
        "targets": [
            {"target": ">= 50000 events/s acked (best level)", "value": best_rate, "met": best_rate >= 50_000.0},
            {"target": ">= 50000 events/s acked at 100 calls", "value": rate_at_100, "met": rate_at_100.is_some_and(|r| r >= 50_000.0)},
            {"target": format!("watch p99 < 5 ms at {} calls (send → watcher)", args.watch_calls), "value_ms": watch_p99_ms, "met": watch_p99_ms < 5.0},
        ],
    });
    Ok(report)
}

fn w_p99_ms(watch: &Value) -> f64 {
    watch["send_to_watch"]["p99_us"]
        .as_f64()
        .map_or(f64::INFINITY, |us| us / 1000.0)
}

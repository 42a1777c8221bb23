//! End-to-end: Redis restarted under live calls (issue 14 item 3).
//!
//! Redis runs as deployed (append-only file, `appendfsync everysec`) and is stopped and
//! started again in the same directory on the same port while 50 calls talk through one
//! relay: once as an orchestrator stops it (SIGTERM: Redis fsyncs its file and exits) and
//! once as a crash (SIGKILL: the last second of writes may never have reached the disk).
//! The calls must not notice: every answer reaches its caller whole on the one stream it
//! started on, every caller line reaches the model, each call's events wait on the relay
//! during the outage and are stored once afterwards, and every event stored before the
//! stop is still there after it (seqs `1..=last` with no gap or repeat, and the transcript
//! is the script, each line once).
//!
//! Real relay, control and redis-server on loopback; the model is the fake and Twilio the
//! simulated caller. The figures printed (outage, time to catch up, audio gaps) are for a
//! reader (`-- --nocapture`; docs/resilience.md says how); nothing here asserts on time.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use callbridge_proto::pb;
use callbridge_testkit::conversation::{AgentReply, Conversation, Turn};
use callbridge_testkit::fake_realtime::FakeRealtime;
use callbridge_testkit::sim_caller::{CallReport, CallerHandle, ClosedBy, SimCaller};
use callbridge_tests::{
    RPC, World, agent_settings, expected_transcript, flatten, sample, with_timeout,
};

const CALLS: usize = 50;
const TURNS: usize = 10;
/// How long Redis stays down (between its exit and the new process starting).
const DOWN: Duration = Duration::from_secs(2);
const CALL: Duration = Duration::from_secs(120);

/// How Redis goes away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// SIGTERM: Redis fsyncs its append-only file and exits.
    Term,
    /// SIGKILL: the process crashes. What it wrote to its file is in the kernel's page
    /// cache, so nothing acknowledged is lost (unless the disk stalled: Redis then holds
    /// writes back for up to 2 s).
    Kill,
    /// The host crashes: SIGKILL, and the last second of the file, which `everysec` had
    /// not fsynced yet, never reached the disk (the file is cut back to its size 1 s
    /// before the kill, as a power loss would leave it).
    HostCrash,
}

/// Samples the size of Redis's append-only file every 20 ms, to cut it back later.
struct AofSizes {
    stop: Arc<AtomicBool>,
    sizes: Arc<Mutex<Vec<(Instant, u64)>>>,
    path: PathBuf,
}

impl AofSizes {
    fn watch(path: PathBuf) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let sizes = Arc::new(Mutex::new(Vec::new()));
        let (s, z, p) = (stop.clone(), sizes.clone(), path.clone());
        std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                if let Ok(meta) = std::fs::metadata(&p) {
                    z.lock().expect("sizes").push((Instant::now(), meta.len()));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        Self { stop, sizes, path }
    }

    /// Cuts the (stopped server's) file back to its size `ago` before `at`; returns the
    /// bytes cut.
    fn cut_back(self, at: Instant, ago: Duration) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        let sizes = self.sizes.lock().expect("sizes").clone();
        let keep = sizes
            .iter()
            .rev()
            .find(|(t, _)| *t + ago <= at)
            .map(|(_, n)| *n)
            .expect("a size sampled long enough before the crash");
        let now = std::fs::metadata(&self.path).expect("AOF").len();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&self.path)
            .and_then(|f| f.set_len(keep))
            .expect("AOF cut back");
        now - keep
    }
}

fn script() -> Conversation {
    Conversation {
        greeting: Some(AgentReply::says("Hello there", 500)),
        turns: (0..TURNS)
            .map(|n| {
                Turn::new(
                    format!("Caller line {n}"),
                    400,
                    AgentReply::says(format!("Agent line {n}"), 600),
                )
            })
            .collect(),
    }
}

fn call_id_of(report: &CallReport) -> String {
    report
        .webhook
        .twiml
        .as_ref()
        .and_then(|t| t.parameters.iter().find(|(k, _)| k == "callId"))
        .map(|(_, v)| v.clone())
        .expect("callId parameter in the webhook TwiML")
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

/// Stored seq per Twilio call sid, read through control just before Redis goes away.
async fn stored_seqs(world: &World) -> HashMap<String, u64> {
    let list = with_timeout(
        RPC,
        "ListCalls",
        world.calls().list_calls(pb::ListCallsRequest {
            page_size: 500,
            ..Default::default()
        }),
    )
    .await
    .expect("ListCalls succeeds")
    .into_inner();
    list.calls
        .into_iter()
        .map(|c| (c.twilio_call_sid, c.last_seq))
        .collect()
}

async fn restart_under_live_calls(stop: Stop) {
    let script = script();
    let mut world = World::builder(FakeRealtime::builder().script(script.clone()).speed(2.0))
        .redis_aof("everysec")
        .start()
        .await;
    world
        .default_agent(agent_settings("redis-restart", Some("Hello there")))
        .await;
    let started = Instant::now();
    let callers: Vec<(String, Instant, CallerHandle)> = (0..CALLS)
        .map(|_| {
            let mut cfg = world.caller(script.clone());
            cfg.answer_wait = Duration::from_secs(5);
            let sid = cfg.call_sid.clone();
            (sid, Instant::now(), SimCaller::new(cfg).start())
        })
        .collect();
    let lives: Vec<_> = callers.iter().map(|(_, _, h)| h.live.clone()).collect();
    assert!(
        callbridge_testkit::eventually(CALL, || lives
            .iter()
            .all(|l| l.turns_spoken.load(std::sync::atomic::Ordering::SeqCst) >= 2))
        .await,
        "every call is going"
    );

    let mut aof = (stop == Stop::HostCrash).then(|| {
        AofSizes::watch(
            world
                .redis
                .aof_file()
                .expect("Redis writes an append-only file"),
        )
    });
    if aof.is_some() {
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    // What control had stored (and so acknowledged, or about to) just before the stop.
    let before = stored_seqs(&world).await;
    assert_eq!(before.len(), CALLS, "every call is stored");
    let overflow_before = world
        .relay_metric(0, "callbridge_relay_events_overflow_total")
        .await;
    let down_at = Instant::now();
    let down_ms = now_ms();
    // Blocking calls (they wait on the child process): off the async workers.
    let mut cut = 0;
    tokio::task::block_in_place(|| match stop {
        Stop::Term => world
            .redis
            .shutdown(Duration::from_secs(10))
            .expect("Redis exits on SIGTERM"),
        Stop::Kill => world.redis.stop(),
        Stop::HostCrash => {
            world.redis.stop();
            cut = aof
                .take()
                .expect("watching the AOF")
                .cut_back(down_at, Duration::from_secs(1));
        }
    });
    let exited = down_at.elapsed();
    tokio::time::sleep(DOWN).await;
    let waiting = world
        .relay_metric(0, "callbridge_relay_event_queue_depth")
        .await;
    tokio::task::block_in_place(|| world.redis.restart()).expect("Redis starts again");
    let back_at = Instant::now();
    let back_ms = now_ms();
    // How long the relay takes to have every waiting event stored.
    let mut caught_up = None;
    while back_at.elapsed() < Duration::from_secs(30) {
        let depth = world
            .relay_metric(0, "callbridge_relay_event_queue_depth")
            .await;
        if depth == 0.0 {
            caught_up = Some(back_at.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let mut within_outage = Vec::new();
    let mut outside = Vec::new();
    let mut events_in_outage = 0usize;
    for (n, (sid, t0, handle)) in callers.into_iter().enumerate() {
        let report = with_timeout(CALL, "a call", handle.join())
            .await
            .unwrap_or_else(|e| panic!("call {n}: {e}"));
        assert_eq!(report.legs.len(), 1, "call {n}: one stream throughout");
        let leg = &report.legs[0];
        assert_eq!(leg.closed_by, ClosedBy::Caller, "call {n}");
        assert_eq!(
            leg.turns_spoken,
            (0..TURNS).collect::<Vec<_>>(),
            "call {n}: every line spoken"
        );
        assert!(
            leg.answer_timeouts.is_empty(),
            "call {n}: every answer came: {:?}",
            leg.answer_timeouts
        );
        // Every answer reached the caller whole: no audio was lost to the outage.
        let expected_audio: u64 = script
            .greeting
            .iter()
            .chain(script.turns.iter().map(|t| &t.agent))
            .map(|a| u64::from(a.audio_ms) * 8)
            .sum();
        assert_eq!(leg.media_bytes_received, expected_audio, "call {n}: audio");
        // Gaps between two media messages inside an answer (shorter than the caller's
        // shortest line), split by whether they overlap the outage.
        let from = down_at.saturating_duration_since(t0).as_millis() as u64;
        let to = back_at.saturating_duration_since(t0).as_millis() as u64;
        for gap in report.audio_gaps(1) {
            if gap.gap_ms >= 300 {
                continue;
            }
            if gap.at_ms + gap.gap_ms >= from && gap.at_ms <= to {
                within_outage.push(gap.gap_ms);
            } else {
                outside.push(gap.gap_ms);
            }
        }

        let call_id = call_id_of(&report);
        let call = world.wait_ended(&call_id, Duration::from_secs(30)).await;
        assert_eq!(
            call.end_reason,
            pb::EndReason::CallerHangup as i32,
            "call {n}: {call:?}"
        );
        let events = world.stored_events(&call_id).await;
        let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
        assert_eq!(
            seqs,
            (1..=seqs.len() as u64).collect::<Vec<_>>(),
            "call {n}: stored seqs without gap or repeat"
        );
        let stored_before = before[&sid];
        assert!(
            seqs.len() as u64 >= stored_before,
            "call {n}: {} events stored, {stored_before} before the restart",
            seqs.len()
        );
        assert_eq!(
            events
                .iter()
                .filter(|e| matches!(e.kind, Some(pb::call_event::Kind::Started(_))))
                .count(),
            1,
            "call {n}: one stream"
        );
        events_in_outage += events
            .iter()
            .filter(|e| e.at_ms >= down_ms && e.at_ms <= back_ms)
            .count();
        assert_eq!(
            flatten(&world.transcript(&call_id).await),
            expected_transcript(&script),
            "call {n}: every line stored once, in order"
        );
    }
    // The outage mattered: events were produced while Redis was away and waited.
    assert!(
        events_in_outage > 0 && waiting > 0.0,
        "events during the outage: {events_in_outage}, waiting: {waiting}"
    );
    // Nothing was dropped for want of room while they waited.
    assert_eq!(
        world
            .relay_metric(0, "callbridge_relay_events_overflow_total")
            .await,
        overflow_before
    );
    // One model session per call (the outage never touched the audio path), all closed.
    let sessions = world.fake.connections();
    assert_eq!(sessions.len(), CALLS, "one model session per call");
    assert!(
        sessions.iter().all(|s| s.closed),
        "every model socket closed"
    );
    let metrics = world.relay_metrics_text(0).await;
    assert_eq!(
        sample(&metrics, "callbridge_relay_active_calls"),
        Some(0.0),
        "no call left"
    );
    assert_eq!(
        sample(&metrics, "callbridge_relay_event_queue_depth"),
        Some(0.0)
    );
    let log = world.relays[0].log_text();
    let resent_total = log.matches("sending them again").count();
    let renumbered = log.matches("the rest are renumbered").count();
    assert_eq!(
        renumbered, 0,
        "no acknowledged event was lost beyond what the relay kept"
    );
    if stop == Stop::HostCrash {
        // The crash took acknowledged events back, and the relay sent them again.
        assert!(
            cut > 0 && resent_total > 0,
            "cut {cut} bytes, {resent_total} calls re-sent"
        );
    }

    within_outage.sort_unstable();
    outside.sort_unstable();
    println!(
        "redis {stop:?}: {CALLS} calls, {} s in; Redis exited after {:.0} ms, down {:.1} s; \
         {waiting} events waiting at the relay, all stored {:.0} ms after Redis was back; \
         {events_in_outage} events produced during the outage; {cut} bytes of AOF cut; calls \
         that re-sent events Redis had lost: {resent_total}; media gaps inside answers: during the outage \
         n={} p50 {} ms p99 {} ms max {} ms, otherwise n={} p50 {} ms p99 {} ms max {} ms",
        started.elapsed().as_secs(),
        exited.as_secs_f64() * 1000.0,
        back_at.duration_since(down_at).as_secs_f64(),
        caught_up.map_or(f64::NAN, |d| d.as_secs_f64() * 1000.0),
        within_outage.len(),
        percentile(&within_outage, 0.5),
        percentile(&within_outage, 0.99),
        within_outage.last().copied().unwrap_or(0),
        outside.len(),
        percentile(&outside, 0.5),
        percentile(&outside, 0.99),
        outside.last().copied().unwrap_or(0),
    );
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_stopped_and_started_again_under_live_calls_loses_nothing() {
    restart_under_live_calls(Stop::Term).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_under_live_calls_loses_nothing() {
    restart_under_live_calls(Stop::Kill).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_crash_taking_back_a_second_of_redis_writes_loses_no_acknowledged_event() {
    restart_under_live_calls(Stop::HostCrash).await;
}

//! End-to-end: several calls at once, through two relays behind a round-robin balancer,
//! each with its own agent and script, do not mix.

use std::time::Duration;

use callbridge_testkit::conversation::{AgentReply, Conversation, Turn};
use callbridge_testkit::fake_realtime::FakeRealtime;
use callbridge_testkit::sim_caller::{ClosedBy, SimCaller};
use callbridge_tests::{World, agent_settings, expected_transcript, flatten, with_timeout};

const CALLS: usize = 5;

fn script(n: usize) -> Conversation {
    Conversation {
        greeting: Some(AgentReply::says(format!("Hello caller {n}"), 300)),
        turns: vec![
            Turn::new(
                format!("This is caller {n} asking a question"),
                400,
                AgentReply::says(format!("Answer for caller {n}"), 400 + 100 * n as u32),
            ),
            Turn::new(
                format!("Caller {n} says thanks"),
                300,
                AgentReply::says(format!("Goodbye caller {n}"), 300),
            ),
        ],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_concurrent_calls_do_not_mix() {
    let mut fake = FakeRealtime::builder().speed(2.0);
    for n in 0..CALLS {
        fake = fake.script_for(format!("marker-{n}-end"), script(n));
    }
    let world = World::builder(fake).relays(2).start().await;

    let mut handles = Vec::new();
    for n in 0..CALLS {
        let marker = format!("marker-{n}-end");
        let greeting = format!("Hello caller {n}");
        let agent = world
            .create_agent(
                &format!("agent-{n}"),
                agent_settings(&marker, Some(&greeting)),
            )
            .await;
        let call_id = world.create_call(&agent, &format!("+1415555020{n}")).await;
        let mut cfg = world.caller(script(n));
        cfg.call_id = Some(call_id.clone());
        cfg.tone_hz = 300.0 + 50.0 * n as f64;
        handles.push((n, call_id, SimCaller::new(cfg).start()));
    }
    for (n, call_id, handle) in handles {
        let report = with_timeout(Duration::from_secs(90), "a call", handle.join())
            .await
            .expect("runs");
        let leg = report.leg().expect("a stream");
        assert!(
            leg.protocol_errors.is_empty(),
            "call {n}: {:?}",
            leg.protocol_errors
        );
        assert_eq!(leg.closed_by, ClosedBy::Caller, "call {n}");
        assert!(
            leg.answer_timeouts.is_empty(),
            "call {n}: {:?}",
            leg.answer_timeouts
        );
        // Each caller heard exactly its own agent's audio.
        let own_ms = 300 + (400 + 100 * n as u64) + 300;
        assert_eq!(leg.media_bytes_received, own_ms * 8, "call {n}");
        let call = world.wait_ended(&call_id, Duration::from_secs(10)).await;
        assert_eq!(call.agent_id, format!("agent-{n}"));
        assert_eq!(call.stream_sid, leg.stream_sid, "call {n}");
        assert_eq!(
            flatten(&world.transcript(&call_id).await),
            expected_transcript(&script(n)),
            "call {n}"
        );
    }
    // One model session per call, each transcribing only its own caller.
    let sessions = world.fake.connections();
    assert_eq!(sessions.len(), CALLS);
    for s in &sessions {
        let n = (0..CALLS)
            .find(|n| {
                s.caller_transcripts.first()
                    == Some(&format!("This is caller {n} asking a question"))
            })
            .expect("a known caller");
        assert_eq!(s.caller_transcripts[1], format!("Caller {n} says thanks"));
    }
}

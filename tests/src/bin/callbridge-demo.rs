//! `callbridge-demo`: one command, no keys, no Redis. Runs the control plane (in-memory
//! store) and a relay in this process, a fake OpenAI Realtime server and a simulated
//! Twilio caller, all on loopback; prints the conversation live as the public API
//! (`Calls.WatchCalls`) reports it, with a barge-in, then reads the stored transcript
//! back through `Calls.GetTranscript`.
//!
//! Run it with `scripts/demo.sh`. Exit code 0 when the stored transcript matches what was
//! said; 1 otherwise.

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use callbridge_proto::pb;
use callbridge_testkit::conversation::{AgentReply, Conversation, Turn};
use callbridge_testkit::fake_realtime::FakeRealtime;
use callbridge_testkit::sim_caller::{CallerConfig, SimCaller};
use callbridge_tests::{Bearer, expected_transcript, flatten};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

const APP_TOKEN: &str = "demo-app-token-0123456789abcdef01234";
const RELAY_TOKEN: &str = "demo-relay-token-0123456789abcdef012";
const TWILIO_TOKEN: &str = "demo-twilio-token";
/// The whole demo must finish well inside a minute.
const DEADLINE: Duration = Duration::from_secs(50);

fn script() -> Conversation {
    Conversation {
        greeting: Some(AgentReply::says(
            "Hi, this is Ada from Acme Dental. How can I help you today?",
            1600,
        )),
        turns: vec![
            Turn::new(
                "Hi, I'd like to book a cleaning.",
                1000,
                AgentReply::says(
                    "Of course. We have openings on Tuesday at nine, Wednesday at two, \
                     and Friday at eleven, and if none of those work I can also check \
                     the following week for you.",
                    4000,
                ),
            )
            // The caller does not wait for the whole list.
            .barge_in_after(1500),
            Turn::new(
                "Wednesday at two works.",
                900,
                AgentReply::says("Great, you're booked for Wednesday at two.", 1400),
            ),
            Turn::new(
                "Thanks, bye!",
                600,
                AgentReply::says("Thank you for calling Acme Dental. Goodbye!", 1200),
            ),
        ],
    }
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("DEMO_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("demo failed: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(async { tokio::time::timeout(DEADLINE, demo()).await });
    // Servers still running after a failure must not keep the process alive.
    runtime.shutdown_timeout(Duration::from_secs(2));
    match outcome {
        Ok(Ok(())) => std::process::ExitCode::SUCCESS,
        Ok(Err(e)) => {
            eprintln!("demo failed: {e:#}");
            std::process::ExitCode::FAILURE
        }
        Err(_) => {
            eprintln!("demo failed: did not finish within {DEADLINE:?}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn demo() -> anyhow::Result<()> {
    let started = Instant::now();
    let script = script();
    if std::env::var_os("REDIS_URL").is_some() {
        println!("note: REDIS_URL is set in your environment; control will use it.");
    }

    // Control plane, in-process, in-memory store.
    let control_listener = TcpListener::bind("127.0.0.1:0").await?;
    let control_addr = control_listener.local_addr()?;
    let relay_listener = TcpListener::bind("127.0.0.1:0").await?;
    let relay_addr = relay_listener.local_addr()?;
    let public = format!("http://{relay_addr}");
    // Secrets are no flags: the demo's own, then the environment (REDIS_URL above).
    let secrets = |name: &str| match name {
        "CONTROL_APP_TOKENS" => Some(APP_TOKEN.into()),
        "CONTROL_RELAY_TOKENS" | "RELAY_CONTROL_TOKEN" => Some(RELAY_TOKEN.into()),
        "OPENAI_API_KEY" => Some("sk-demo-not-a-real-key".into()),
        "TWILIO_AUTH_TOKEN" => Some(TWILIO_TOKEN.into()),
        _ => std::env::var_os(name),
    };
    let control_config = callbridge_control::config::Config::from_args_and_secrets(
        [
            "callbridge-control".to_owned(),
            "--listen".to_owned(),
            control_addr.to_string(),
            "--metrics-listen".to_owned(),
            String::new(),
            "--relay-public-url".to_owned(),
            public.clone(),
        ],
        &secrets,
    )
    .map_err(|e| anyhow::anyhow!("control config: {e}"))?;
    let (stop_control, control_stopped) = oneshot::channel::<()>();
    let control = tokio::spawn(callbridge_control::serve(
        control_config,
        control_listener,
        async move {
            let _ = control_stopped.await;
        },
    ));

    // The fake model: a scripted conversation, audio a little faster than real time.
    let fake = FakeRealtime::builder()
        .script(script.clone())
        .speed(1.5)
        .chunk_ms(20)
        .late_deltas(2)
        .start()
        .await?;

    // The relay, in-process, pointed at control and the fake.
    let relay_config = callbridge_relay::config::Config::from_args_and_secrets(
        [
            "callbridge-relay".to_owned(),
            "--listen".to_owned(),
            relay_addr.to_string(),
            "--public-url".to_owned(),
            public.clone(),
            "--control-url".to_owned(),
            format!("http://{control_addr}"),
            "--openai-realtime-url".to_owned(),
            fake.url(),
            "--relay-id".to_owned(),
            "relay-demo".to_owned(),
            "--metrics-addr".to_owned(),
            String::new(),
        ],
        &secrets,
    )
    .map_err(|e| anyhow::anyhow!("relay config: {e}"))?;
    let (stop_relay, relay_stopped) = oneshot::channel::<()>();
    let relay = tokio::spawn(callbridge_relay::run(
        relay_config,
        relay_listener,
        async move {
            let _ = relay_stopped.await;
        },
    ));

    // The application's view: an agent, the default for inbound calls.
    let channel = connect(control_addr).await?;
    let mut agents =
        pb::agents_client::AgentsClient::with_interceptor(channel.clone(), Bearer::new(APP_TOKEN));
    let mut calls =
        pb::calls_client::CallsClient::with_interceptor(channel.clone(), Bearer::new(APP_TOKEN));
    let agent = agents
        .create_agent(pb::CreateAgentRequest {
            agent_id: "ada".to_owned(),
            settings: Some(pb::AgentSettings {
                name: "Ada, Acme Dental reception".to_owned(),
                instructions: "You are Ada, the receptionist of Acme Dental. Book appointments."
                    .to_owned(),
                voice: "marin".to_owned(),
                greeting: script
                    .greeting
                    .as_ref()
                    .map(|g| g.text.clone())
                    .unwrap_or_default(),
                input_transcription_model: "gpt-4o-mini-transcribe".to_owned(),
                ..Default::default()
            }),
        })
        .await
        .context("CreateAgent")?
        .into_inner();
    agents
        .set_default_agent(pb::DefaultAgent {
            agent_id: agent.agent_id.clone(),
        })
        .await
        .context("SetDefaultAgent")?;
    let mut watch = calls
        .watch_calls(pb::WatchCallsRequest::default())
        .await
        .context("WatchCalls")?
        .into_inner();

    println!("callbridge demo: control (in-memory) on {control_addr}, relay on {relay_addr},");
    println!(
        "fake OpenAI Realtime on {}, one simulated Twilio caller.\n",
        fake.addr()
    );

    // The caller dials in.
    let mut caller = CallerConfig::new(&public, relay_addr, Some(TWILIO_TOKEN));
    caller.script = script.clone();
    caller.from = "+14155550123".to_owned();
    caller.to = "+18005550100".to_owned();
    let handle = SimCaller::new(caller).start();

    // Print the call live from the public watch stream until it ends.
    let mut call_id = String::new();
    loop {
        let event = tokio::time::timeout(Duration::from_secs(30), watch.message())
            .await
            .context("no event for 30 s")?
            .context("watch stream")?;
        let Some(event) = event else {
            bail!("watch stream closed before the call ended");
        };
        if call_id.is_empty() {
            call_id = event.call_id.clone();
        }
        let at = started.elapsed().as_secs_f64();
        match event.kind {
            Some(pb::call_event::Kind::Started(s)) => {
                println!(
                    "{at:6.2}s  ── call {} started (stream {})",
                    event.call_id, s.stream_sid
                );
            }
            Some(pb::call_event::Kind::Caller(c)) => println!("{at:6.2}s  caller: {}", c.text),
            Some(pb::call_event::Kind::Assistant(a)) => {
                if a.interrupted {
                    println!(
                        "{at:6.2}s  agent:  {}  [cut off: caller heard {} of {} ms]",
                        a.text, a.heard_ms, a.audio_ms
                    );
                } else {
                    println!("{at:6.2}s  agent:  {}", a.text);
                }
            }
            Some(pb::call_event::Kind::Interruption(i)) => println!(
                "{at:6.2}s  ── barge-in: the caller spoke over the agent after {} ms",
                i.heard_ms
            ),
            Some(pb::call_event::Kind::ToolCall(t)) => {
                println!("{at:6.2}s  tool:   {}({})", t.name, t.arguments_json);
            }
            Some(pb::call_event::Kind::Ended(e)) => {
                let reason = pb::EndReason::try_from(e.reason)
                    .map(|r| r.as_str_name().to_owned())
                    .unwrap_or_else(|_| e.reason.to_string());
                println!("{at:6.2}s  ── call ended: {reason}");
                break;
            }
            _ => {}
        }
    }

    let report = tokio::time::timeout(Duration::from_secs(10), handle.join())
        .await
        .context("caller did not finish")??;
    let leg = report.leg().context("the caller never streamed")?;

    // Read it all back through the public API.
    let transcript = calls
        .get_transcript(pb::GetTranscriptRequest {
            call_id: call_id.clone(),
        })
        .await
        .context("GetTranscript")?
        .into_inner();
    let call = calls
        .get_call(pb::GetCallRequest {
            call_id: call_id.clone(),
        })
        .await
        .context("GetCall")?
        .into_inner();
    println!("\nStored transcript of {call_id} (Calls.GetTranscript):");
    for (who, text) in flatten(&transcript) {
        println!("  {who:>9}: {text}");
    }
    let usage = call.usage.unwrap_or_default();
    println!(
        "\nStatus {}, {} model responses, {} input / {} output tokens.",
        pb::CallStatus::try_from(call.status)
            .map(|s| s.as_str_name())
            .unwrap_or("?"),
        usage.responses,
        usage.input_tokens,
        usage.output_tokens
    );
    if let (Some(clear), Some(truncate)) = (
        leg.clears.first(),
        fake.connection(0)
            .and_then(|c| c.truncates.first().cloned()),
    ) {
        let started = leg
            .barge_ins
            .first()
            .map_or(f64::NAN, |b| b.heard_answer_ms);
        println!(
            "Barge-in: the caller started talking after hearing {started:.0} ms of the answer; \
             Twilio's buffer was cleared at {:.0} ms; the model was told {} ms.",
            clear.heard_answer_ms, truncate.audio_end_ms
        );
    }
    println!("Finished in {:.1} s.", started.elapsed().as_secs_f64());

    let _ = stop_relay.send(());
    let _ = stop_control.send(());
    let _ = tokio::time::timeout(Duration::from_secs(10), relay).await;
    let _ = tokio::time::timeout(Duration::from_secs(10), control).await;

    if flatten(&transcript) != expected_transcript(&script) {
        bail!("the stored transcript differs from what was said");
    }
    if leg.clears.len() != 1 {
        bail!("expected one barge-in, saw {}", leg.clears.len());
    }
    Ok(())
}

async fn connect(addr: std::net::SocketAddr) -> anyhow::Result<tonic::transport::Channel> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match endpoint.connect().await {
            Ok(ch) => return Ok(ch),
            Err(e) if Instant::now() > deadline => return Err(e).context("connecting to control"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

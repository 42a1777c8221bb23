//! `fake-realtime`: the fake OpenAI Realtime server as a process (compose stack, manual
//! runs). See `callbridge_testkit::fake_realtime`.

use std::path::PathBuf;

use anyhow::Context as _;
use callbridge_testkit::conversation::Conversation;
use callbridge_testkit::fake_realtime::FakeRealtime;
use clap::Parser;

/// A fake OpenAI Realtime (GA) server that plays a scripted conversation.
#[derive(Debug, Parser)]
#[command(name = "fake-realtime")]
struct Args {
    /// Listen address.
    #[arg(long, env = "FAKE_REALTIME_LISTEN", default_value = "127.0.0.1:9000")]
    listen: String,
    /// Conversation script (JSON); default: the built-in sample call.
    #[arg(long, env = "FAKE_REALTIME_SCRIPT")]
    script: Option<PathBuf>,
    /// Audio pacing (1.0 = real time).
    #[arg(long, env = "FAKE_REALTIME_SPEED", default_value_t = 1.0)]
    speed: f64,
    /// Milliseconds of audio per delta (unset: varying sizes, as the real API sends).
    #[arg(long, env = "FAKE_REALTIME_CHUNK_MS")]
    chunk_ms: Option<u32>,
    /// Deltas still sent after the caller barges in.
    #[arg(long, env = "FAKE_REALTIME_LATE_DELTAS", default_value_t = 0)]
    late_deltas: u32,
    /// Echo mode (benchmarks): every append comes straight back as a delta.
    #[arg(long, env = "FAKE_REALTIME_ECHO")]
    echo: bool,
    /// Accept only this bearer key (default: any non-empty key).
    #[arg(long, env = "FAKE_REALTIME_KEY", hide_env_values = true)]
    require_key: Option<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    let args = Args::parse();
    let script = match &args.script {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            Conversation::from_json(&text).with_context(|| format!("parsing {}", path.display()))?
        }
        None => Conversation::sample(),
    };
    let mut builder = FakeRealtime::builder()
        .script(script)
        .speed(args.speed)
        .late_deltas(args.late_deltas);
    if let Some(ms) = args.chunk_ms {
        builder = builder.chunk_ms(ms);
    }
    if args.echo {
        builder = builder.echo();
    }
    if let Some(key) = args.require_key {
        builder = builder.require_key(key);
    }
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let fake = builder.start_on(listener);
    println!(
        "fake-realtime listening on ws://{}/v1/realtime",
        fake.addr()
    );
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        // Either signal ends the process; the fake stops when dropped.
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    println!(
        "fake-realtime: {} sessions served, {} handshakes refused",
        fake.connections_accepted(),
        fake.handshakes_rejected()
    );
    Ok(())
}

//! Memory an empty bounded channel holds, per channel, for the item types the relay's
//! call/control-link channels carry: what chose futures-channel over tokio's `mpsc` for
//! them (docs/performance.md, "Production memory per call"). Each figure is the RSS growth
//! of a fresh process over many live channels, divided by their number, so it includes
//! the allocator's own overhead; a fresh process each, because one kind's freed or
//! alignment-padding memory would otherwise be reused by the next.
//!
//!   cargo run --release -p callbridge-tests --bin bench_channels

use std::process::Command;

use anyhow::{Context, Result, bail};
use callbridge_proto::pb;
use callbridge_tests::bench::rss_kib;

/// Channels kept alive at once per figure: enough that a 4 KiB page is noise.
const CHANNELS: usize = 50_000;

/// The figures, in the order `measure` numbers them.
const FIGURES: [&str; 8] = [
    "tokio Box<CallEvent>",
    "futures Box<CallEvent>",
    "tokio Box<Command>",
    "futures Box<Command>",
    "tokio Box<AttachRequest>",
    "futures Box<AttachRequest>",
    "tokio AttachRequest",
    "futures AttachRequest",
];

/// Bytes per live value of what `make` returns, from RSS over `CHANNELS` of them.
fn per_channel<T>(make: impl Fn() -> T) -> Result<f64> {
    let pid = std::process::id();
    let before = rss_kib(pid)?;
    let live: Vec<T> = (0..CHANNELS).map(|_| make()).collect();
    let after = rss_kib(pid)?;
    // The vector of handles is part of the growth; it is not part of a channel.
    let handles = (CHANNELS * size_of::<T>()) as f64;
    drop(live);
    Ok(((after.saturating_sub(before) * 1024) as f64 - handles) / CHANNELS as f64)
}

/// One figure, in this process: (item size, bytes per channel).
fn measure(figure: usize) -> Result<(usize, f64)> {
    use futures_channel::mpsc as futures;
    use tokio::sync::mpsc as tokio;
    type Event = Box<pb::CallEvent>;
    type Cmd = Box<pb::Command>;
    type Up = Box<pb::AttachRequest>;
    type Raw = pb::AttachRequest;
    Ok(match figure {
        0 => (
            size_of::<Event>(),
            per_channel(|| tokio::channel::<Event>(1024))?,
        ),
        1 => (
            size_of::<Event>(),
            per_channel(|| futures::channel::<Event>(1024))?,
        ),
        2 => (size_of::<Cmd>(), per_channel(|| tokio::channel::<Cmd>(32))?),
        3 => (
            size_of::<Cmd>(),
            per_channel(|| futures::channel::<Cmd>(32))?,
        ),
        4 => (size_of::<Up>(), per_channel(|| tokio::channel::<Up>(64))?),
        5 => (size_of::<Up>(), per_channel(|| futures::channel::<Up>(64))?),
        6 => (size_of::<Raw>(), per_channel(|| tokio::channel::<Raw>(64))?),
        7 => (
            size_of::<Raw>(),
            per_channel(|| futures::channel::<Raw>(64))?,
        ),
        _ => bail!("no figure {figure}"),
    })
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if let [_, flag, figure] = args.as_slice()
        && flag == "--one"
    {
        let (size, bytes) = measure(figure.parse()?)?;
        println!("{size} {bytes:.0}");
        return Ok(());
    }
    let exe = std::env::current_exe()?;
    println!("bytes per empty bounded channel ({CHANNELS} live, a fresh process each)");
    println!("{:<28} {:>9} {:>10}", "channel, item", "item size", "bytes");
    for (i, label) in FIGURES.iter().enumerate() {
        let out = Command::new(&exe)
            .args(["--one", &i.to_string()])
            .output()?;
        if !out.status.success() {
            bail!("{label}: {}", String::from_utf8_lossy(&out.stderr));
        }
        let text = String::from_utf8(out.stdout)?;
        let (size, bytes) = text
            .trim()
            .split_once(' ')
            .with_context(|| format!("{label}: unexpected output {text:?}"))?;
        println!("{label:<28} {size:>9} {bytes:>10}");
    }
    Ok(())
}

//! The per-call attach stream to control (one task): numbers events, keeps them until
//! acknowledged, resends them after a reconnect (to any control replica) and passes
//! commands down to the call. The audio path never waits on it: the call hands events
//! over with `try_send`.
//!
//! Bound: at most `capacity` unacknowledged events per call. When full, a new event is
//! dropped without taking a sequence number (so control never sees a gap) and counted in
//! `callbridge_relay_events_overflow_total`; the final `ended` event is always kept.
//!
//! Acknowledged is not yet durable: Redis with `appendfsync everysec` acknowledges a write
//! up to ~1 s (2 s at worst) before it reaches the disk, so a lost Redis host can take
//! back the newest acknowledged events. The link therefore keeps what was acknowledged in the
//! last [`RETAIN`] (at most `capacity` events) and, when a reconnect finds control's
//! `last_seq` behind its own acknowledgements, sends them again. If even those do not
//! reach back far enough, the events still held are renumbered from `last_seq + 1`, so
//! the call keeps being stored instead of every later event being refused as a gap.

use std::collections::VecDeque;
use std::time::Duration;

use callbridge_proto::pb;
use futures_channel::mpsc;
use futures_util::{SinkExt, StreamExt};
use tokio::time::{Instant, sleep_until};
use tonic::{Code, Streaming};
use tracing::{debug, info, warn};

use crate::call_id::CallId;
use crate::control::{AttachStream, Control};
use crate::metrics::Metrics;
use crate::stream_credential::now_ms;

/// An event the call hands to the link, timed when it happened; the link numbers it and
/// keeps this same box until control acknowledges it. One pointer: the channel keeps a
/// node of its item's size for the whole call (docs/performance.md).
#[derive(Debug)]
pub struct LinkIn(Box<pb::CallEvent>);

impl LinkIn {
    /// `kind`, happening now.
    pub fn now(kind: pb::call_event::Kind) -> Self {
        Self(Box::new(pb::CallEvent {
            call_id: String::new(),
            seq: 0,
            at_ms: now_ms(),
            kind: Some(kind),
        }))
    }
}

/// Everything the link needs besides its channels.
pub struct LinkSetup {
    /// The call.
    pub call_id: CallId,
    /// This relay.
    pub relay_id: String,
    /// Control client for reconnects.
    pub control: Control,
    /// Metrics.
    pub metrics: Metrics,
    /// Unacked events kept.
    pub capacity: usize,
    /// The newest stored seq at attach time.
    pub last_seq: u64,
    /// `CallContext.heartbeat_interval_ms` of the attach (0: control watches none).
    pub heartbeat_interval_ms: u32,
}

const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// How long acknowledged events are kept for a store that loses its newest writes: above
/// Redis's `appendfsync everysec` window (1 s, up to 2 s when the disk is slow).
pub const RETAIN: Duration = Duration::from_secs(3);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// Refusals of a reconnect that no retry can change. `ALREADY_EXISTS` there means another
/// relay holds the call's lease: the call moved on (a take-over, or a resume after this
/// relay went silent past control's heartbeat timeout), and this relay is fenced off.
fn permanent(code: Code) -> bool {
    matches!(
        code,
        Code::NotFound
            | Code::AlreadyExists
            | Code::FailedPrecondition
            | Code::Unauthenticated
            | Code::PermissionDenied
            | Code::InvalidArgument
    )
}

/// What came down the attach stream, reduced to what the link acts on. Kept small on
/// purpose: the select's output is part of the link task for the call's whole life, and a
/// raw response has room for a call context (~1 KiB inline).
enum Incoming {
    Acked(u64),
    Command(Box<pb::Command>),
    /// Nothing for the link (a context, an empty message).
    Nothing,
    /// The stream ended or failed: why.
    Lost(String),
}

async fn next_response(rx: &mut Option<Streaming<pb::AttachResponse>>) -> Incoming {
    let Some(rx) = rx.as_mut() else {
        return std::future::pending().await;
    };
    match rx.message().await {
        Ok(Some(pb::AttachResponse { msg: Some(msg) })) => match msg {
            pb::attach_response::Msg::AckedSeq(n) => Incoming::Acked(n),
            pb::attach_response::Msg::Command(c) => Incoming::Command(Box::new(c)),
            pb::attach_response::Msg::Context(_) => Incoming::Nothing,
        },
        Ok(Some(_)) => Incoming::Nothing,
        Ok(None) => Incoming::Lost("closed".to_owned()),
        Err(s) => Incoming::Lost(format!("{:?}: {}", s.code(), s.message())),
    }
}

/// The next heartbeat is due (never when control watches none).
async fn beat(heartbeat: &mut Option<tokio::time::Interval>) {
    match heartbeat.as_mut() {
        Some(every) => {
            every.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// Ticks every `interval_ms` (the first one an interval from now); `None` for 0.
fn heartbeat_every(interval_ms: u32) -> Option<tokio::time::Interval> {
    (interval_ms > 0).then(|| {
        let every = Duration::from_millis(u64::from(interval_ms));
        let mut tick = tokio::time::interval_at(Instant::now() + every, every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick
    })
}

/// The stream has room for one more request (`Err`: it is gone).
async fn room(
    tx: &mut Option<mpsc::Sender<Box<pb::AttachRequest>>>,
) -> Result<(), mpsc::SendError> {
    match tx.as_mut() {
        Some(tx) => std::future::poll_fn(|cx| tx.poll_ready(cx)).await,
        None => std::future::pending().await,
    }
}

/// Events are boxed: a deque keeps its capacity after it empties, and a call's first event
/// gives each deque room for four, so inline events would hold ~1.3 KiB per call for good.
struct Buffer {
    events: VecDeque<Box<pb::CallEvent>>,
    /// How many of `events` went out on the current stream.
    sent: usize,
    next_seq: u64,
    final_seq: Option<u64>,
    /// Acknowledged events of the last [`RETAIN`], oldest first, with when they were
    /// acknowledged: what a store that lost its newest writes is sent again.
    recent: VecDeque<(Instant, Box<pb::CallEvent>)>,
    /// The highest seq control acknowledged.
    acked: u64,
    /// Most events kept in `recent`.
    keep: usize,
    metrics: Metrics,
}

/// What a reconnect found about the store against this link's acknowledgements.
#[derive(Debug, PartialEq, Eq)]
enum Resync {
    /// The store has everything acknowledged.
    InStep,
    /// The store lost acknowledged events; this many were kept and go out again.
    Resent(usize),
    /// The store lost acknowledged events older than the ones kept: the events still held
    /// were renumbered from the store's `last_seq + 1` (this many seqs were lost).
    Renumbered(u64),
}

impl Buffer {
    fn new(next_seq: u64, keep: usize, metrics: Metrics) -> Self {
        Self {
            events: VecDeque::new(),
            sent: 0,
            next_seq,
            final_seq: None,
            recent: VecDeque::new(),
            acked: next_seq.saturating_sub(1),
            keep,
            metrics,
        }
    }

    fn ack(&mut self, acked: u64) {
        let now = Instant::now();
        while self.events.front().is_some_and(|e| e.seq <= acked) {
            let event = self.events.pop_front().expect("checked non-empty");
            self.recent.push_back((now, event));
            self.sent = self.sent.saturating_sub(1);
            self.metrics.event_queue_depth().dec();
        }
        self.acked = self.acked.max(acked);
        while self.recent.len() > self.keep
            || self
                .recent
                .front()
                .is_some_and(|(at, _)| now.duration_since(*at) > RETAIN)
        {
            self.recent.pop_front();
        }
    }

    /// Lines the buffer up with the store's `last_seq` after a reconnect.
    fn resync(&mut self, last_seq: u64) -> Resync {
        if last_seq >= self.acked {
            self.ack(last_seq);
            return Resync::InStep;
        }
        // The store went back in time: what it lost and this link kept goes out again.
        let mut resent = 0;
        while let Some((_, event)) = self.recent.pop_back() {
            if event.seq <= last_seq {
                break;
            }
            self.events.push_front(event);
            self.metrics.event_queue_depth().inc();
            resent += 1;
        }
        self.recent.clear();
        self.acked = last_seq;
        let first = self.events.front().map_or(self.next_seq, |e| e.seq);
        if first == last_seq + 1 {
            return Resync::Resent(resent);
        }
        let lost = first.saturating_sub(last_seq + 1);
        let mut seq = last_seq + 1;
        for event in &mut self.events {
            if self.final_seq == Some(event.seq) {
                self.final_seq = Some(seq);
            }
            event.seq = seq;
            seq += 1;
        }
        self.next_seq = seq;
        Resync::Renumbered(lost)
    }

    fn acked_final(&self) -> bool {
        self.final_seq.is_some() && self.events.is_empty()
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        let left = i64::try_from(self.events.len()).unwrap_or(i64::MAX);
        self.metrics.event_queue_depth().dec_by(left);
    }
}

/// The link's state between turns of its loop.
struct Link {
    call_id: CallId,
    relay_id: String,
    control: Control,
    metrics: Metrics,
    capacity: usize,
    buf: Buffer,
    tx: Option<mpsc::Sender<Box<pb::AttachRequest>>>,
    rx: Option<Streaming<pb::AttachResponse>>,
    commands: mpsc::Sender<Box<pb::Command>>,
    call_open: bool,
    gave_up: bool,
    /// Heartbeats on the current stream, at the interval its context named.
    heartbeat: Option<tokio::time::Interval>,
    backoff: Duration,
    retry_at: Instant,
}

/// Runs the link until the `ended` event is acknowledged, or the call is gone and nothing
/// is left to send, or control refused the call for good.
pub fn run(
    setup: LinkSetup,
    first: AttachStream,
    events: mpsc::Receiver<LinkIn>,
    commands: mpsc::Sender<Box<pb::Command>>,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    serve(Box::new(Link::new(setup, first, commands)), events)
}

/// The link's loop. The link comes built and boxed: an async fn keeps its arguments for
/// its whole life, and a second copy of any it uses across an await
/// (rust-lang/rust#62958), so the setup, the first stream and the link built from them
/// were all part of every call's link task.
async fn serve(mut link: Box<Link>, mut events: mpsc::Receiver<LinkIn>) {
    while !link.done() {
        let connected = link.tx.is_some();
        let to_send = connected && link.buf.sent < link.buf.events.len();
        tokio::select! {
            biased;
            // The call's events: always drained first, so the call's try_send rarely fails.
            msg = events.next(), if link.call_open => link.on_event(msg),
            // Acks and commands from control; a broken stream schedules a reconnect.
            incoming = next_response(&mut link.rx), if connected => {
                if let Some(c) = link.on_response(incoming) {
                    // The call reads commands promptly; if it is gone, drop them.
                    let _ = link.commands.send(c).await;
                }
            }
            // "Alive": control releases the lease of a stream silent for its timeout.
            () = beat(&mut link.heartbeat), if connected => link.on_beat(),
            // Send the next unsent event when the stream has room.
            ready = room(&mut link.tx), if to_send => link.on_room(ready),
            // Reconnect with backoff, to whichever control replica answers.
            () = sleep_until(link.retry_at), if !connected && !link.gave_up => {
                link.reconnect().await;
            }
        }
    }
}

impl Link {
    fn new(
        setup: LinkSetup,
        first: AttachStream,
        commands: mpsc::Sender<Box<pb::Command>>,
    ) -> Self {
        let LinkSetup {
            call_id,
            relay_id,
            control,
            metrics,
            capacity,
            last_seq,
            heartbeat_interval_ms,
        } = setup;
        Self {
            buf: Buffer::new(last_seq + 1, capacity, metrics.clone()),
            call_id,
            relay_id,
            control,
            metrics,
            capacity,
            tx: Some(first.tx),
            rx: Some(first.rx),
            commands,
            call_open: true,
            gave_up: false,
            heartbeat: heartbeat_every(heartbeat_interval_ms),
            backoff: BACKOFF_MIN,
            retry_at: Instant::now(),
        }
    }

    /// Nothing is left to do: `ended` acknowledged, or nothing more can be stored or sent.
    fn done(&self) -> bool {
        let buf = &self.buf;
        buf.acked_final()
            || (self.gave_up && (buf.final_seq.is_some() || !self.call_open))
            || (!self.call_open && buf.events.is_empty())
    }

    /// An event from the call: numbered and kept until acknowledged.
    fn on_event(&mut self, msg: Option<LinkIn>) {
        let Some(LinkIn(mut event)) = msg else {
            self.call_open = false;
            return;
        };
        let is_final = matches!(event.kind, Some(pb::call_event::Kind::Ended(_)));
        // Control refused the call for good (this event cannot be stored), or the buffer is
        // full (`ended` is always kept).
        if self.gave_up || (self.buf.events.len() >= self.capacity && !is_final) {
            self.metrics.events_overflow().inc();
            return;
        }
        let seq = self.buf.next_seq;
        self.buf.next_seq += 1;
        if is_final {
            self.buf.final_seq = Some(seq);
        }
        event.call_id = self.call_id.as_str().to_owned();
        event.seq = seq;
        self.buf.events.push_back(event);
        self.metrics.event_queue_depth().inc();
    }

    /// An ack, a command (returned, for the call) or the stream's end.
    fn on_response(&mut self, incoming: Incoming) -> Option<Box<pb::Command>> {
        match incoming {
            Incoming::Acked(n) => {
                self.buf.ack(n);
                self.backoff = BACKOFF_MIN;
                None
            }
            Incoming::Command(c) => Some(c),
            Incoming::Nothing => None,
            Incoming::Lost(why) => {
                warn!(
                    call_id = %self.call_id,
                    why, "Attach stream lost; reconnecting."
                );
                self.disconnect();
                None
            }
        }
    }

    fn disconnect(&mut self) {
        self.tx = None;
        self.rx = None;
        self.buf.sent = 0;
        self.retry_at = Instant::now() + self.backoff;
    }

    /// One tiny message; skipped when the stream's queue is full (then it is moving
    /// events, or it is stuck and control is right to stop counting on it).
    fn on_beat(&mut self) {
        if let Some(tx) = &mut self.tx {
            let _ = tx.try_send(Box::new(pb::AttachRequest {
                msg: Some(pb::attach_request::Msg::Heartbeat(pb::AttachHeartbeat {})),
            }));
        }
    }

    fn on_room(&mut self, ready: Result<(), mpsc::SendError>) {
        let Some(tx) = self.tx.as_mut().filter(|_| ready.is_ok()) else {
            return self.disconnect();
        };
        let event = pb::CallEvent::clone(&self.buf.events[self.buf.sent]);
        let request = Box::new(pb::AttachRequest {
            msg: Some(pb::attach_request::Msg::Event(event)),
        });
        if tx.start_send(request).is_err() {
            return self.disconnect();
        }
        self.buf.sent += 1;
    }

    async fn reconnect(&mut self) {
        self.metrics.control_reconnects().inc();
        // Boxed: the attach future is large and rare; inline, every link task would carry
        // its size for the whole call.
        let attach = Box::pin(
            self.control
                .attach(&self.call_id, &self.relay_id, true, None),
        )
        .await;
        let call_id = &self.call_id;
        match attach {
            Ok((ctx, stream)) => {
                info!(
                    %call_id,
                    last_seq = ctx.last_seq,
                    "Attach stream reconnected."
                );
                match self.buf.resync(ctx.last_seq) {
                    Resync::InStep => {}
                    Resync::Resent(n) => warn!(
                        %call_id,
                        last_seq = ctx.last_seq,
                        resent = n,
                        "Control's store lost acknowledged events (a Redis restart without fsync); sending them again."
                    ),
                    Resync::Renumbered(lost) => warn!(
                        %call_id,
                        last_seq = ctx.last_seq,
                        lost,
                        "Control's store lost acknowledged events older than the ones kept; the rest are renumbered after its last seq."
                    ),
                }
                self.buf.sent = 0;
                self.heartbeat = heartbeat_every(ctx.heartbeat_interval_ms);
                self.tx = Some(stream.tx);
                self.rx = Some(stream.rx);
            }
            Err(e) if permanent(e.code()) => {
                warn!(%call_id, error = %e, "Control refused the call on reconnect; events are no longer stored.");
                self.gave_up = true;
            }
            Err(e) => {
                debug!(%call_id, error = %e, "Attach reconnect failed.");
                self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
                self.retry_at = Instant::now() + self.backoff;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn buffer_with(seqs: std::ops::RangeInclusive<u64>) -> Buffer {
        let mut buf = Buffer::new(*seqs.start(), 8, Metrics::new());
        for seq in seqs {
            buf.events.push_back(Box::new(pb::CallEvent {
                seq,
                ..Default::default()
            }));
            buf.next_seq = seq + 1;
        }
        buf
    }

    fn seqs(buf: &Buffer) -> Vec<u64> {
        buf.events.iter().map(|e| e.seq).collect()
    }

    #[test]
    fn a_store_in_step_only_drops_what_it_has() {
        let mut buf = buffer_with(1..=5);
        buf.ack(2);
        assert_eq!(buf.resync(3), Resync::InStep);
        assert_eq!(seqs(&buf), [4, 5]);
    }

    #[test]
    fn acknowledged_events_a_store_lost_are_sent_again() {
        let mut buf = buffer_with(1..=5);
        buf.ack(4);
        assert_eq!(seqs(&buf), [5]);
        // Redis came back without its last second: it has 1..=2 only.
        assert_eq!(buf.resync(2), Resync::Resent(2));
        assert_eq!(seqs(&buf), [3, 4, 5]);
        assert_eq!(buf.next_seq, 6);
    }

    #[test]
    fn a_loss_beyond_what_was_kept_renumbers_after_the_store() {
        let mut buf = buffer_with(1..=6);
        buf.final_seq = Some(6);
        buf.ack(4);
        buf.recent.clear(); // as if they aged out
        assert_eq!(buf.resync(2), Resync::Renumbered(2));
        assert_eq!(seqs(&buf), [3, 4]);
        assert_eq!(buf.final_seq, Some(4));
        assert_eq!(buf.next_seq, 5);
    }

    #[test]
    fn the_kept_acknowledged_events_are_bounded() {
        let mut buf = buffer_with(1..=20);
        buf.ack(20);
        assert_eq!(buf.recent.len(), 8);
        assert_eq!(buf.resync(10), Resync::Renumbered(2));
        assert_eq!(seqs(&buf), (11..=18).collect::<Vec<_>>());
    }
}

//! The per-call attach stream to control (one task): numbers events, keeps them until
//! acknowledged, resends them after a reconnect (to any control replica) and passes
//! commands down to the call. The audio path never waits on it: the call hands events
//! over with `try_send`.
//!
//! Bound: at most `capacity` unacknowledged events per call. When full, a new event is
//! dropped without taking a sequence number (so control never sees a gap) and counted in
//! `callbridge_relay_events_overflow_total`; the final `ended` event is always kept.

use std::collections::VecDeque;
use std::time::Duration;

use callbridge_proto::pb;
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep_until};
use tonic::{Code, Streaming};
use tracing::{debug, info, warn};

use crate::control::{AttachStream, Control};
use crate::metrics::Metrics;

/// What the call hands to the link. Boxed: a channel allocates its slots 32 at a time,
/// and at a thousand calls 32 inline events per call were ~3 KiB each, held for the
/// whole call (docs/performance.md).
#[derive(Debug)]
pub enum LinkIn {
    /// An event, with its time.
    Event(i64, Box<pb::call_event::Kind>),
}

/// Everything the link needs besides its channels.
pub struct LinkSetup {
    /// The call.
    pub call_id: String,
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
}

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

fn permanent(code: Code) -> bool {
    matches!(
        code,
        Code::NotFound
            | Code::FailedPrecondition
            | Code::Unauthenticated
            | Code::PermissionDenied
            | Code::InvalidArgument
    )
}

async fn next_response(
    rx: &mut Option<Streaming<pb::AttachResponse>>,
) -> Result<Option<pb::AttachResponse>, tonic::Status> {
    match rx.as_mut() {
        Some(rx) => rx.message().await,
        None => std::future::pending().await,
    }
}

async fn reserve(
    tx: Option<mpsc::Sender<Box<pb::AttachRequest>>>,
) -> Option<mpsc::OwnedPermit<Box<pb::AttachRequest>>> {
    match tx {
        Some(tx) => tx.reserve_owned().await.ok(),
        None => std::future::pending().await,
    }
}

struct Buffer {
    events: VecDeque<pb::CallEvent>,
    /// How many of `events` went out on the current stream.
    sent: usize,
    next_seq: u64,
    final_seq: Option<u64>,
    metrics: Metrics,
}

impl Buffer {
    fn ack(&mut self, acked: u64) {
        while self.events.front().is_some_and(|e| e.seq <= acked) {
            self.events.pop_front();
            self.sent = self.sent.saturating_sub(1);
            self.metrics.event_queue_depth().dec();
        }
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

/// Runs the link until the `ended` event is acknowledged, or the call is gone and nothing
/// is left to send, or control refused the call for good.
pub async fn run(
    setup: LinkSetup,
    first: AttachStream,
    mut events: mpsc::Receiver<LinkIn>,
    commands: mpsc::Sender<Box<pb::Command>>,
) {
    let LinkSetup {
        call_id,
        relay_id,
        control,
        metrics,
        capacity,
        last_seq,
    } = setup;
    let mut buf = Buffer {
        events: VecDeque::new(),
        sent: 0,
        next_seq: last_seq + 1,
        final_seq: None,
        metrics: metrics.clone(),
    };
    let mut tx = Some(first.tx);
    let mut rx = Some(first.rx);
    let mut call_open = true;
    let mut gave_up = false;
    let mut backoff = BACKOFF_MIN;
    let mut retry_at = Instant::now();

    loop {
        if buf.acked_final() || (gave_up && (buf.final_seq.is_some() || !call_open)) {
            return;
        }
        if !call_open && buf.events.is_empty() {
            return;
        }
        let connected = tx.is_some();
        let to_send = connected && buf.sent < buf.events.len();
        tokio::select! {
            biased;
            // The call's events: always drained first, so the call's try_send rarely fails.
            msg = events.recv(), if call_open => match msg {
                Some(LinkIn::Event(at_ms, kind)) => {
                    let is_final = matches!(*kind, pb::call_event::Kind::Ended(_));
                    if gave_up {
                        // Control refused the call for good: this event cannot be stored.
                        metrics.events_overflow().inc();
                        continue;
                    }
                    if buf.events.len() >= capacity && !is_final {
                        metrics.events_overflow().inc();
                        continue;
                    }
                    let seq = buf.next_seq;
                    buf.next_seq += 1;
                    if is_final {
                        buf.final_seq = Some(seq);
                    }
                    buf.events.push_back(pb::CallEvent {
                        call_id: call_id.clone(),
                        seq,
                        at_ms,
                        kind: Some(*kind),
                    });
                    metrics.event_queue_depth().inc();
                }
                None => call_open = false,
            },
            // Acks and commands from control; a broken stream schedules a reconnect.
            resp = next_response(&mut rx), if connected => match resp {
                Ok(Some(pb::AttachResponse { msg: Some(msg) })) => match msg {
                    pb::attach_response::Msg::AckedSeq(n) => {
                        buf.ack(n);
                        backoff = BACKOFF_MIN;
                    }
                    pb::attach_response::Msg::Command(c) => {
                        // The call reads commands promptly; if it is gone, drop them.
                        let _ = commands.send(Box::new(c)).await;
                    }
                    pb::attach_response::Msg::Context(_) => {}
                },
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => {
                    let why = match resp {
                        Err(s) => format!("{:?}: {}", s.code(), s.message()),
                        _ => "closed".to_owned(),
                    };
                    warn!(call_id, why, "Attach stream lost; reconnecting.");
                    tx = None;
                    rx = None;
                    buf.sent = 0;
                    retry_at = Instant::now() + backoff;
                }
            },
            // Send the next unsent event when the stream has room.
            permit = reserve(tx.clone()), if to_send => match permit {
                Some(permit) => {
                    permit.send(Box::new(pb::AttachRequest {
                        msg: Some(pb::attach_request::Msg::Event(buf.events[buf.sent].clone())),
                    }));
                    buf.sent += 1;
                }
                None => {
                    tx = None;
                    rx = None;
                    buf.sent = 0;
                    retry_at = Instant::now() + backoff;
                }
            },
            // Reconnect with backoff, to whichever control replica answers.
            () = sleep_until(retry_at), if !connected && !gave_up => {
                metrics.control_reconnects().inc();
                // Boxed: the attach future is large and rare; inline, every link task
                // would carry its size for the whole call.
                match Box::pin(control.attach(&call_id, &relay_id, true)).await {
                    Ok((ctx, stream)) => {
                        info!(call_id, last_seq = ctx.last_seq, "Attach stream reconnected.");
                        buf.ack(ctx.last_seq);
                        buf.sent = 0;
                        tx = Some(stream.tx);
                        rx = Some(stream.rx);
                    }
                    Err(e) if permanent(e.code()) => {
                        warn!(call_id, error = %e, "Control refused the call on reconnect; events are no longer stored.");
                        gave_up = true;
                    }
                    Err(e) => {
                        debug!(call_id, error = %e, "Attach reconnect failed.");
                        backoff = (backoff * 2).min(BACKOFF_MAX);
                        retry_at = Instant::now() + backoff;
                    }
                }
            }
        }
    }
}

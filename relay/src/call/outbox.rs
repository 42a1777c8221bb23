//! A socket's write half driven by the call loop itself.
//!
//! A writer task per socket cost a channel hand-off and a task wake-up per frame, on top
//! of the socket write; both writers together were two of the four wake-ups per echoed
//! frame (docs/performance.md). Here the call loop queues frames and writes them when it
//! polls [`Outbox::drive`]: right after handling a frame (usually completing at once,
//! every queued frame in one flush) and, while the socket is full, as a branch of its
//! `select!`, woken when the socket can take more.
//!
//! The queue is bounded in frames and nothing is popped before the sink accepted it, so
//! a `drive` dropped half-way (another `select!` branch won) loses nothing.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use futures_util::{Sink, SinkExt};
use tokio_tungstenite::tungstenite::{self, Message};

use crate::metrics::SocketCounters;

/// The queue is full; the frame was not taken.
#[derive(Debug, thiserror::Error)]
#[error("write queue full")]
pub struct Full;

/// Frames waiting for one socket, and (once it is open) the socket's write half.
pub struct Outbox<S> {
    sink: Option<S>,
    queue: VecDeque<Message>,
    slots: usize,
    /// Frames were handed to the sink since its last flush.
    unflushed: bool,
    counters: Option<SocketCounters>,
}

impl<S> Outbox<S>
where
    S: Sink<Message, Error = tungstenite::Error> + Unpin,
{
    /// An outbox whose socket is still being opened: frames wait until [`Outbox::open`].
    pub fn pending(slots: usize) -> Self {
        Self {
            sink: None,
            queue: VecDeque::new(),
            slots,
            unflushed: false,
            counters: None,
        }
    }

    /// Counts what this outbox writes.
    pub fn counted(mut self, counters: &SocketCounters) -> Self {
        self.counters = Some(counters.clone());
        self
    }

    /// An outbox on an open socket.
    pub fn new(sink: S, slots: usize) -> Self {
        let mut o = Self::pending(slots);
        o.sink = Some(sink);
        o
    }

    /// The socket is open: what waited is written on the next [`Outbox::drive`].
    pub fn open(&mut self, sink: S) {
        self.sink = Some(sink);
    }

    /// Frames waiting.
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// Frames that can still be queued.
    pub fn free(&self) -> usize {
        self.slots.saturating_sub(self.queue.len())
    }

    /// Queues a frame (written on the next [`Outbox::drive`]).
    pub fn push(&mut self, msg: Message) -> Result<(), Full> {
        if self.queue.len() >= self.slots {
            return Err(Full);
        }
        self.queue.push_back(msg);
        Ok(())
    }

    /// Something is waiting to be written or flushed to an open socket.
    pub fn wants_drive(&self) -> bool {
        self.sink.is_some() && (self.unflushed || !self.queue.is_empty())
    }

    /// Writes every queued frame and flushes; pending while the socket is full.
    pub fn poll_drive(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), tungstenite::Error>> {
        let Some(sink) = self.sink.as_mut() else {
            return Poll::Ready(Ok(()));
        };
        while !self.queue.is_empty() {
            ready!(Pin::new(&mut *sink).poll_ready(cx))?;
            let msg = self.queue.pop_front().expect("checked non-empty");
            Pin::new(&mut *sink).start_send(msg)?;
            self.unflushed = true;
            if let Some(c) = &self.counters {
                c.messages_out.inc();
            }
        }
        if self.unflushed {
            ready!(Pin::new(&mut *sink).poll_flush(cx))?;
            self.unflushed = false;
            if let Some(c) = &self.counters {
                c.writes.inc();
            }
        }
        Poll::Ready(Ok(()))
    }

    /// [`Outbox::poll_drive`] as a future (cancel-safe).
    pub async fn drive(&mut self) -> Result<(), tungstenite::Error> {
        poll_fn(|cx| self.poll_drive(cx)).await
    }

    /// Writes what is queued, then `last` (a close frame), then closes the socket. Without
    /// an open socket, the queue is dropped.
    pub async fn close(mut self, last: Message) -> Result<(), tungstenite::Error> {
        if self.sink.is_none() {
            return Ok(());
        }
        self.drive().await?;
        let Some(mut sink) = self.sink.take() else {
            return Ok(());
        };
        sink.send(last).await?;
        sink.close().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sink that takes `room` frames, then is full until `room` is raised.
    #[derive(Default)]
    struct Tap {
        room: usize,
        taken: Vec<String>,
        flushes: usize,
    }

    impl Sink<Message> for Tap {
        type Error = tungstenite::Error;
        fn poll_ready(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            if self.room > 0 {
                Poll::Ready(Ok(()))
            } else {
                Poll::Pending
            }
        }
        fn start_send(mut self: Pin<&mut Self>, m: Message) -> Result<(), Self::Error> {
            self.room -= 1;
            self.taken
                .push(m.into_text().map(|t| t.to_string()).unwrap_or_default());
            Ok(())
        }
        fn poll_flush(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Result<(), Self::Error>> {
            self.flushes += 1;
            Poll::Ready(Ok(()))
        }
        fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }
    }

    fn poll(o: &mut Outbox<Tap>) -> Poll<Result<(), tungstenite::Error>> {
        o.poll_drive(&mut Context::from_waker(std::task::Waker::noop()))
    }

    #[test]
    fn frames_wait_for_the_socket_then_go_in_order_in_one_flush() {
        let mut o = Outbox::pending(3);
        for t in ["a", "b", "c"] {
            o.push(Message::text(t)).expect("room");
        }
        assert!(o.push(Message::text("d")).is_err(), "bounded in frames");
        assert!(!o.wants_drive(), "nothing to drive without a socket");
        o.open(Tap {
            room: 10,
            ..Tap::default()
        });
        assert!(o.wants_drive());
        assert!(matches!(poll(&mut o), Poll::Ready(Ok(()))));
        let tap = o.sink.as_ref().expect("open");
        assert_eq!(tap.taken, ["a", "b", "c"]);
        assert_eq!(tap.flushes, 1);
        assert!(!o.wants_drive());
        assert_eq!(o.free(), 3);
    }

    #[test]
    fn a_full_socket_keeps_the_rest_queued_and_loses_nothing() {
        let mut o = Outbox::new(
            Tap {
                room: 1,
                ..Tap::default()
            },
            8,
        );
        for t in ["a", "b", "c"] {
            o.push(Message::text(t)).expect("room");
        }
        assert!(poll(&mut o).is_pending());
        assert_eq!(o.queued(), 2, "only what the sink took left the queue");
        o.sink.as_mut().expect("open").room = 5;
        assert!(matches!(poll(&mut o), Poll::Ready(Ok(()))));
        assert_eq!(o.sink.as_ref().expect("open").taken, ["a", "b", "c"]);
        assert_eq!(o.queued(), 0);
    }
}

//! How each standalone stream ended, kept for its `<Connect action>` request
//! ([`crate::standalone_after`]).
//!
//! Without control nothing else remembers a call: the stream's end is noted here, keyed by
//! the stream's credential id (which its action URL names), just before the relay closes
//! the stream, and Twilio asks the action URL right after. An action request that finds
//! no note speaks for a stream whose relay stopped, crashed, or is another pod.
//!
//! The record is bounded twice, so a flood of calls cannot grow it: a note expires after
//! [`KEEP`] (the action request comes within a second or so), and above [`CAP`] notes the
//! oldest goes first. It is owned by one task and reached over a channel: the relay shares
//! no locked state.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use callbridge_proto::pb::EndReason;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

/// How long a note is kept.
pub const KEEP: Duration = Duration::from_secs(300);
/// Most notes kept (the oldest goes first): ~100 bytes each.
pub const CAP: usize = 10_000;
/// Requests waiting for the task (one per stream end or action request; a burst waits).
const SLOTS: usize = 256;

/// How a standalone stream ended, as far as what comes next is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    /// The model failed or could not be reached (or the relay failed): the caller gets the
    /// apology, and `RELAY_FALLBACK_DIAL` when set.
    Failed,
    /// The agent or the caller ended the call (or a limit did): hang up.
    Finished,
    /// The agent transferred the call to this number: dial it.
    Transferred(String),
}

impl Ended {
    /// What a call's end reason leaves for its action request. `None` for an end that
    /// leaves nothing to remember: a drain cut the stream (the relay is going away, as if
    /// it had crashed) or an unspecified end.
    pub fn of(reason: EndReason, transfer_to: &str) -> Option<Self> {
        use EndReason as R;
        match reason {
            R::ModelUnavailable | R::InternalError => Some(Self::Failed),
            R::Transferred if !transfer_to.is_empty() => {
                Some(Self::Transferred(transfer_to.to_owned()))
            }
            R::Drain | R::Handoff | R::Unspecified => None,
            R::CallerHangup
            | R::AgentHangup
            | R::AppHangup
            | R::Transferred
            | R::MaxDuration
            | R::StartTimeout
            | R::MediaTimeout
            | R::RelayLost
            | R::DialBusy
            | R::DialNoAnswer
            | R::DialFailed
            | R::DialCanceled
            | R::DialCompleted
            // Standalone streams have no answering-machine verdicts; were one to come,
            // the call is over.
            | R::AnsweringMachine
            | R::VoicemailLeft => Some(Self::Finished),
        }
    }
}

/// The bounded record itself: notes by stream id, oldest first.
#[derive(Debug)]
pub struct Record {
    notes: HashMap<Box<str>, (Instant, Ended)>,
    /// Stream ids in the order they were noted (the order they expire in).
    order: VecDeque<(Instant, Box<str>)>,
    keep: Duration,
    cap: usize,
}

impl Record {
    /// An empty record keeping notes for `keep`, at most `cap` of them.
    pub fn new(keep: Duration, cap: usize) -> Self {
        Self {
            notes: HashMap::new(),
            order: VecDeque::new(),
            keep,
            cap: cap.max(1),
        }
    }

    /// Notes how `stream` ended at `now`.
    pub fn note(&mut self, stream: &str, ended: Ended, now: Instant) {
        self.expire(now);
        match self.notes.entry(stream.into()) {
            // A stream ends once; a second note only replaces the first.
            Entry::Occupied(mut e) => e.get_mut().1 = ended,
            Entry::Vacant(v) => {
                v.insert((now, ended));
                self.order.push_back((now, stream.into()));
            }
        }
        while self.order.len() > self.cap {
            if let Some((_, oldest)) = self.order.pop_front() {
                self.notes.remove(&oldest);
            }
        }
    }

    /// How `stream` ended, if noted and not expired at `now`. Kept after it is read: a
    /// repeated action request gets the same answer.
    pub fn get(&mut self, stream: &str, now: Instant) -> Option<Ended> {
        self.expire(now);
        self.notes.get(stream).map(|(_, ended)| ended.clone())
    }

    /// Notes held.
    pub fn len(&self) -> usize {
        self.notes.len()
    }

    /// Whether no note is held.
    pub fn is_empty(&self) -> bool {
        self.notes.is_empty()
    }

    fn expire(&mut self, now: Instant) {
        while let Some((at, _)) = self.order.front() {
            if now.saturating_duration_since(*at) < self.keep {
                break;
            }
            if let Some((_, id)) = self.order.pop_front() {
                self.notes.remove(&id);
            }
        }
    }
}

enum Request {
    Note(Box<str>, Ended),
    Get(Box<str>, oneshot::Sender<Option<Ended>>),
}

/// The record's task, reached from the calls (notes) and the action route (reads);
/// clone-cheap.
#[derive(Debug, Clone)]
pub struct StreamEnds {
    tx: mpsc::Sender<Request>,
}

impl StreamEnds {
    /// Starts the task that owns the record (needs a Tokio runtime); it ends with the
    /// last handle.
    pub fn spawn() -> Self {
        let (tx, mut rx) = mpsc::channel::<Request>(SLOTS);
        tokio::spawn(async move {
            let mut record = Record::new(KEEP, CAP);
            while let Some(req) = rx.recv().await {
                let now = Instant::now();
                match req {
                    Request::Note(id, ended) => record.note(&id, ended, now),
                    Request::Get(id, answer) => {
                        let _ = answer.send(record.get(&id, now));
                    }
                }
            }
        });
        Self { tx }
    }

    /// Notes how `stream` ended. Queued before the stream is closed, so an action request
    /// (queued after the close) finds it.
    pub async fn note(&self, stream: &str, ended: Ended) {
        let _ = self.tx.send(Request::Note(stream.into(), ended)).await;
    }

    /// How `stream` ended, if this relay noted it (and still holds the note).
    pub async fn get(&self, stream: &str) -> Option<Ended> {
        let (answer, rx) = oneshot::channel();
        if self
            .tx
            .send(Request::Get(stream.into(), answer))
            .await
            .is_err()
        {
            return None;
        }
        rx.await.ok().flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn end_reasons_map_to_what_comes_next() {
        assert_eq!(
            Ended::of(EndReason::ModelUnavailable, ""),
            Some(Ended::Failed)
        );
        assert_eq!(Ended::of(EndReason::InternalError, ""), Some(Ended::Failed));
        assert_eq!(Ended::of(EndReason::AgentHangup, ""), Some(Ended::Finished));
        assert_eq!(
            Ended::of(EndReason::CallerHangup, ""),
            Some(Ended::Finished)
        );
        assert_eq!(Ended::of(EndReason::MaxDuration, ""), Some(Ended::Finished));
        assert_eq!(
            Ended::of(EndReason::Transferred, "+14155550111"),
            Some(Ended::Transferred("+14155550111".into()))
        );
        assert_eq!(Ended::of(EndReason::Transferred, ""), Some(Ended::Finished));
        assert_eq!(Ended::of(EndReason::Drain, ""), None);
    }

    #[test]
    fn notes_expire_after_the_keep_time() {
        let t0 = Instant::now();
        let keep = Duration::from_secs(300);
        let mut r = Record::new(keep, 10);
        r.note("a", Ended::Failed, t0);
        r.note("b", Ended::Finished, t0 + Duration::from_secs(100));
        assert_eq!(
            r.get("a", t0 + Duration::from_secs(299)),
            Some(Ended::Failed)
        );
        // Read twice: the same answer.
        assert_eq!(
            r.get("a", t0 + Duration::from_secs(299)),
            Some(Ended::Failed)
        );
        assert_eq!(r.get("a", t0 + keep), None, "expired at its keep time");
        assert_eq!(r.len(), 1, "the expired note is gone, not only hidden");
        assert_eq!(
            r.get("b", t0 + Duration::from_secs(399)),
            Some(Ended::Finished)
        );
        assert_eq!(r.get("b", t0 + Duration::from_secs(400)), None);
        assert!(r.is_empty());
        assert_eq!(r.get("never-noted", t0), None);
    }

    #[test]
    fn a_flood_of_streams_keeps_the_newest_up_to_the_cap() {
        let t0 = Instant::now();
        let mut r = Record::new(Duration::from_secs(300), 100);
        for n in 0..10_000u32 {
            r.note(&format!("s{n}"), Ended::Finished, t0);
            assert!(r.len() <= 100);
        }
        assert_eq!(r.len(), 100);
        assert_eq!(r.order.len(), 100, "the order holds no stale ids");
        assert_eq!(r.get("s9999", t0), Some(Ended::Finished));
        assert_eq!(r.get("s9900", t0), Some(Ended::Finished));
        assert_eq!(r.get("s9899", t0), None, "the oldest went first");
        // A second note of the same stream replaces the first and takes no more room.
        r.note("s9999", Ended::Failed, t0);
        assert_eq!(r.len(), 100);
        assert_eq!(r.get("s9999", t0), Some(Ended::Failed));
    }

    #[tokio::test]
    async fn the_task_answers_in_the_order_it_was_asked() {
        let ends = StreamEnds::spawn();
        ends.note("s1", Ended::Failed).await;
        assert_eq!(ends.get("s1").await, Some(Ended::Failed));
        assert_eq!(ends.get("s2").await, None);
    }
}

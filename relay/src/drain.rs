//! What a draining relay still owes Twilio after its last call is over.
//!
//! When the relay ends a call's stream itself (a hand-off, a call cut at the end of the
//! grace, an agent's hang-up), Twilio asks the call's `<Connect action>` URL right after
//! the socket closes. That request may come to this relay (the load balancer has not
//! dropped it yet, or a kept connection) or to another one. The calls note such an end on
//! [`ActionsDue`] during the drain, and the `/after` route notes each answer; the
//! [`ActionsLedger`], read by the drain alone, keeps the relay listening until each of
//! those calls had its action request answered here, or `RELAY_DRAIN_ACTION_WAIT_SECS`
//! passed since that call ended (the request went elsewhere: the bound is what usually
//! ends the wait). Notes travel on a channel: the relay shares no locked state.

use std::collections::HashMap;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::call_id::CallId;

enum Note {
    Ended(CallId, Instant),
    Answered(CallId),
}

/// Where calls and the `/after` route note what the drain waits for; clone-cheap. Notes
/// are only taken once the drain started (before, nothing reads them).
#[derive(Clone, Debug)]
pub struct ActionsDue {
    notes: mpsc::UnboundedSender<Note>,
    draining: CancellationToken,
}

/// What the drain reads the notes with ([`ActionsLedger::settled`]).
#[derive(Debug)]
pub struct ActionsLedger {
    notes: mpsc::UnboundedReceiver<Note>,
    bound: Duration,
}

/// How the wait of [`ActionsLedger::settled`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settled {
    /// Action requests of noted calls answered by this relay.
    pub answered: usize,
    /// Noted calls whose action request did not come here within the bound.
    pub elsewhere: usize,
}

/// A pair for a relay whose drain starts when `draining` is cancelled; each call is waited
/// for at most `bound` after its end.
pub fn actions_due(bound: Duration, draining: CancellationToken) -> (ActionsDue, ActionsLedger) {
    let (tx, rx) = mpsc::unbounded_channel();
    (
        ActionsDue {
            notes: tx,
            draining,
        },
        ActionsLedger { notes: rx, bound },
    )
}

impl ActionsDue {
    fn note(&self, note: Note) {
        if self.draining.is_cancelled() {
            // The ledger is gone only once the relay stopped waiting: nothing to tell.
            let _ = self.notes.send(note);
        }
    }

    /// The relay closed `call_id`'s stream: Twilio will ask its action URL.
    pub fn expect(&self, call_id: &CallId) {
        self.note(Note::Ended(call_id.clone(), Instant::now()));
    }

    /// This relay answered `call_id`'s action request.
    pub fn answered(&self, call_id: &CallId) {
        self.note(Note::Answered(call_id.clone()));
    }
}

impl ActionsLedger {
    /// Resolves once every noted call had its action request answered here or its bound
    /// passed (at once when nothing was noted).
    pub async fn settled(mut self) -> Settled {
        let mut ended: HashMap<CallId, Instant> = HashMap::new();
        let mut answered = 0;
        let mut apply = |note: Note, ended: &mut HashMap<CallId, Instant>| match note {
            Note::Ended(id, at) => {
                ended.insert(id, at);
            }
            Note::Answered(id) => {
                if ended.remove(&id).is_some() {
                    answered += 1;
                }
            }
        };
        loop {
            while let Ok(note) = self.notes.try_recv() {
                apply(note, &mut ended);
            }
            let last_deadline = ended.values().max().map(|t| *t + self.bound);
            let Some(deadline) = last_deadline.filter(|d| *d > Instant::now()) else {
                break;
            };
            tokio::select! {
                note = self.notes.recv() => match note {
                    Some(note) => apply(note, &mut ended),
                    // Every sender is gone: nothing more can be answered.
                    None => break,
                },
                () = tokio::time::sleep_until(deadline) => {}
            }
        }
        Settled {
            answered,
            elsewhere: ended.len(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> CallId {
        CallId::parse(s).expect("valid call id")
    }

    fn draining(bound: Duration) -> (ActionsDue, ActionsLedger) {
        let token = CancellationToken::new();
        token.cancel();
        actions_due(bound, token)
    }

    #[tokio::test]
    async fn nothing_noted_settles_at_once() {
        let (_due, ledger) = draining(Duration::from_secs(3600));
        let settled = tokio::time::timeout(Duration::from_secs(10), ledger.settled()).await;
        assert_eq!(
            settled.expect("settles without waiting for the bound"),
            Settled {
                answered: 0,
                elsewhere: 0
            }
        );
    }

    #[tokio::test]
    async fn the_wait_ends_when_every_noted_action_is_answered() {
        let (due, ledger) = draining(Duration::from_secs(3600));
        due.expect(&id("call_a"));
        due.expect(&id("call_b"));
        // An action request of a call not noted (ended before the drain) is not waited for.
        due.answered(&id("call_other"));
        let waiter = tokio::spawn(ledger.settled());
        due.answered(&id("call_a"));
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "call_b is still due");
        due.answered(&id("call_b"));
        let settled = tokio::time::timeout(Duration::from_secs(10), waiter)
            .await
            .expect("settles without waiting for the bound")
            .expect("the waiter runs");
        assert_eq!(
            settled,
            Settled {
                answered: 2,
                elsewhere: 0
            }
        );
    }

    #[tokio::test]
    async fn a_call_whose_action_went_elsewhere_is_given_up_after_the_bound() {
        let (due, ledger) = draining(Duration::ZERO);
        due.expect(&id("call_a"));
        let settled = tokio::time::timeout(Duration::from_secs(10), ledger.settled()).await;
        assert_eq!(
            settled.expect("the bound passed"),
            Settled {
                answered: 0,
                elsewhere: 1
            }
        );
    }

    #[tokio::test]
    async fn nothing_is_noted_before_the_drain() {
        let token = CancellationToken::new();
        let (due, ledger) = actions_due(Duration::from_secs(3600), token);
        due.expect(&id("call_a"));
        let settled = tokio::time::timeout(Duration::from_secs(10), ledger.settled()).await;
        assert_eq!(
            settled.expect("nothing to wait for"),
            Settled {
                answered: 0,
                elsewhere: 0
            }
        );
    }
}

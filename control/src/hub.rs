//! The replica-local end of the bus: fans stored events out to watchers and hands
//! commands to the attach stream that holds the call on this replica.
//!
//! The store feeds it (directly in memory, from pub/sub in Redis); it never talks to
//! Redis itself.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use callbridge_proto::pb;
use tokio::sync::{broadcast, mpsc};

use crate::domain::ids::{CallId, CampaignId, LeaseHolder};

/// A message carried between replicas.
#[derive(Debug, Clone)]
pub enum BusMessage {
    /// A stored event (for watchers everywhere).
    Event {
        /// The call's campaign (for `WatchCalls` filters).
        campaign_id: Option<CampaignId>,
        /// The event.
        event: pb::CallEvent,
    },
    /// A command for a call attached to the receiving replica.
    Command {
        /// The call.
        call_id: CallId,
        /// The command.
        command: pb::Command,
    },
}

/// Live events buffered per replica before slow watchers lag (and catch up from the store).
const EVENT_FANOUT_CAPACITY: usize = 1024;
/// Live events buffered per watched call before its slow watchers lag (and catch up).
const CALL_FANOUT_CAPACITY: usize = 256;

type EventTx = broadcast::Sender<Arc<HubEvent>>;

/// A stored event with the campaign it belongs to.
#[derive(Debug, Clone)]
pub struct HubEvent {
    /// The call's campaign, if any.
    pub campaign_id: Option<CampaignId>,
    /// The event.
    pub event: pb::CallEvent,
}

/// An attach stream registered on this replica.
#[derive(Debug)]
struct Attached {
    holder: LeaseHolder,
    commands: mpsc::Sender<pb::Command>,
}

/// The registration a newer attach stream replaced ([`Hub::register`]).
#[derive(Debug)]
pub struct Replaced(Attached);

/// Local fan-out, shared by every RPC of the replica.
#[derive(Debug)]
pub struct Hub {
    /// Every event (`WatchCalls`).
    events: EventTx,
    /// The events of each call someone watches (`WatchCall`): a watcher wakes for its
    /// call only, not for every event of the replica.
    calls: Mutex<HashMap<CallId, EventTx>>,
    attached: Mutex<HashMap<CallId, Attached>>,
}

impl Default for Hub {
    fn default() -> Self {
        Self::new()
    }
}

impl Hub {
    /// An empty hub.
    pub fn new() -> Self {
        let (events, _) = broadcast::channel(EVENT_FANOUT_CAPACITY);
        Hub {
            events,
            calls: Mutex::new(HashMap::new()),
            attached: Mutex::new(HashMap::new()),
        }
    }

    /// Delivers one bus message. Returns whether a command found its stream.
    pub fn dispatch(&self, message: BusMessage) -> bool {
        match message {
            BusMessage::Event { campaign_id, event } => {
                let event = Arc::new(HubEvent { campaign_id, event });
                // No receivers is normal (nobody watching).
                if let Some(tx) = lock(&self.calls).get(event.event.call_id.as_str()) {
                    let _ = tx.send(event.clone());
                }
                if self.events.receiver_count() > 0 {
                    let _ = self.events.send(event);
                }
                true
            }
            BusMessage::Command { call_id, command } => self.deliver_command(&call_id, command),
        }
    }

    /// Subscribes to every event stored from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<HubEvent>> {
        self.events.subscribe()
    }

    /// Subscribes to the events of one call stored from now on; dropping the
    /// subscription unsubscribes.
    pub fn subscribe_call(self: &Arc<Self>, call_id: &CallId) -> CallEvents {
        let rx = lock(&self.calls)
            .entry(call_id.clone())
            .or_insert_with(|| broadcast::channel(CALL_FANOUT_CAPACITY).0)
            .subscribe();
        CallEvents {
            hub: self.clone(),
            call_id: call_id.clone(),
            rx,
        }
    }

    /// Whether anyone on this replica watches events (a call or a campaign).
    pub fn has_event_watchers(&self) -> bool {
        self.events.receiver_count() > 0 || !lock(&self.calls).is_empty()
    }

    /// Number of calls with a watcher on this replica.
    pub fn watched_calls(&self) -> usize {
        lock(&self.calls).len()
    }

    /// Registers the attach stream `holder` for a call, replacing an older one (returned,
    /// for [`Hub::unregister_restoring`] if `holder` does not get the call after all).
    ///
    /// An attach stream registers BEFORE it takes the call's lease: a command accepted
    /// once the lease names this replica then always finds a stream to buffer it in.
    pub fn register(
        &self,
        call_id: &CallId,
        holder: &LeaseHolder,
        commands: mpsc::Sender<pb::Command>,
    ) -> Option<Replaced> {
        self.lock()
            .insert(
                call_id.clone(),
                Attached {
                    holder: holder.clone(),
                    commands,
                },
            )
            .map(Replaced)
    }

    /// Undoes [`Hub::register`] of `holder` (if still its): puts back the stream it
    /// replaced, and hands that stream whatever `buffered` took meanwhile.
    pub fn unregister_restoring(
        &self,
        call_id: &CallId,
        holder: &LeaseHolder,
        replaced: Option<Replaced>,
        buffered: &mut mpsc::Receiver<pb::Command>,
    ) {
        {
            let mut map = self.lock();
            if map.get(call_id).is_some_and(|a| a.holder == *holder) {
                match replaced {
                    Some(Replaced(previous)) => map.insert(call_id.clone(), previous),
                    None => map.remove(call_id),
                };
            }
        }
        while let Ok(command) = buffered.try_recv() {
            self.deliver_command(call_id, command);
        }
    }

    /// Removes the registration if it is still `holder`'s.
    pub fn unregister(&self, call_id: &CallId, holder: &LeaseHolder) {
        let mut map = self.lock();
        if map.get(call_id).is_some_and(|a| a.holder == *holder) {
            map.remove(call_id);
        }
    }

    /// Number of attach streams on this replica.
    pub fn attached_count(&self) -> usize {
        self.lock().len()
    }

    fn deliver_command(&self, call_id: &CallId, command: pb::Command) -> bool {
        let map = self.lock();
        match map.get(call_id) {
            // try_send: a stream that does not drain its commands must not stall the bus.
            Some(attached) => attached.commands.try_send(command).is_ok(),
            None => false,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<CallId, Attached>> {
        lock(&self.attached)
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding these short locks cannot leave a map half-updated (single
    // insert/remove/lookup), so a poisoned lock is still usable.
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// The live events of one call ([`Hub::subscribe_call`]).
#[derive(Debug)]
pub struct CallEvents {
    hub: Arc<Hub>,
    call_id: CallId,
    rx: broadcast::Receiver<Arc<HubEvent>>,
}

impl CallEvents {
    /// The next event; `Lagged` when this watcher fell behind (catch up from the store).
    pub async fn recv(&mut self) -> Result<Arc<HubEvent>, broadcast::error::RecvError> {
        self.rx.recv().await
    }
}

impl Drop for CallEvents {
    fn drop(&mut self) {
        let mut calls = lock(&self.hub.calls);
        // Under the lock no one subscribes meanwhile; `rx` still counts as one.
        if calls
            .get(&self.call_id)
            .is_some_and(|tx| tx.receiver_count() <= 1)
        {
            calls.remove(&self.call_id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> CallId {
        CallId::parse("call_id", s).expect("valid")
    }

    fn holder(stream: &str) -> LeaseHolder {
        LeaseHolder::new("replica", stream)
    }

    fn event(call_id: &str, seq: u64) -> BusMessage {
        BusMessage::Event {
            campaign_id: Some(CampaignId::parse("campaign_id", "q").expect("valid")),
            event: pb::CallEvent {
                call_id: call_id.into(),
                seq,
                ..Default::default()
            },
        }
    }

    fn command(command_id: &str) -> BusMessage {
        BusMessage::Command {
            call_id: id("c"),
            command: pb::Command {
                command_id: command_id.into(),
                kind: None,
            },
        }
    }

    #[test]
    fn a_failed_registration_gives_the_call_and_its_buffered_commands_back() {
        let hub = Hub::new();
        let (old_tx, mut old_rx) = mpsc::channel(4);
        assert!(hub.register(&id("c"), &holder("old"), old_tx).is_none());
        let (new_tx, mut new_rx) = mpsc::channel(4);
        let replaced = hub.register(&id("c"), &holder("new"), new_tx);
        assert!(
            hub.dispatch(command("during")),
            "buffered by the new stream"
        );
        hub.unregister_restoring(&id("c"), &holder("new"), replaced, &mut new_rx);
        assert!(hub.dispatch(command("after")));
        let ids: Vec<String> = std::iter::from_fn(|| old_rx.try_recv().ok())
            .map(|c| c.command_id)
            .collect();
        assert_eq!(ids, ["during", "after"]);
        assert_eq!(hub.attached_count(), 1);
    }

    #[test]
    fn a_failed_first_registration_leaves_nothing() {
        let hub = Hub::new();
        let (tx, mut rx) = mpsc::channel(4);
        let replaced = hub.register(&id("c"), &holder("only"), tx);
        hub.unregister_restoring(&id("c"), &holder("only"), replaced, &mut rx);
        assert_eq!(hub.attached_count(), 0);
        assert!(!hub.dispatch(command("late")));
    }

    #[tokio::test]
    async fn call_watchers_get_their_call_only_and_unsubscribe_on_drop() {
        let hub = Arc::new(Hub::new());
        let mut all = hub.subscribe();
        let mut a1 = hub.subscribe_call(&id("a"));
        let mut a2 = hub.subscribe_call(&id("a"));
        let b = hub.subscribe_call(&id("b"));
        assert_eq!(hub.watched_calls(), 2);
        hub.dispatch(event("b", 1));
        hub.dispatch(event("a", 1));
        hub.dispatch(event("a", 2));
        for rx in [&mut a1, &mut a2] {
            let seqs = [rx.recv().await, rx.recv().await].map(|e| {
                e.map(|e| (e.event.call_id.clone(), e.event.seq))
                    .expect("event")
            });
            assert_eq!(seqs, [("a".to_owned(), 1), ("a".to_owned(), 2)]);
            assert!(rx.rx.is_empty(), "nothing of call b");
        }
        let mut seen = Vec::new();
        while let Ok(e) = all.try_recv() {
            seen.push((e.event.call_id.clone(), e.event.seq));
        }
        assert_eq!(seen.len(), 3, "every event for WatchCalls: {seen:?}");
        drop(b);
        assert_eq!(hub.watched_calls(), 1);
        drop(a1);
        assert_eq!(hub.watched_calls(), 1, "a2 still watches a");
        drop(a2);
        assert_eq!(hub.watched_calls(), 0);
    }
}

//! The replica-local end of the bus: fans stored events out to watchers and hands
//! commands to the attach stream that holds the call on this replica.
//!
//! The store feeds it (directly in memory, from pub/sub in Redis); it never talks to
//! Redis itself.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use callbridge_proto::pb;
use tokio::sync::{broadcast, mpsc};

use crate::store::BusMessage;

/// Live events buffered per replica before slow watchers lag (and catch up from the store).
const EVENT_FANOUT_CAPACITY: usize = 1024;

/// A stored event with the campaign it belongs to.
#[derive(Debug, Clone)]
pub struct HubEvent {
    /// The call's campaign ("" if none).
    pub campaign_id: String,
    /// The event.
    pub event: pb::CallEvent,
}

/// An attach stream registered on this replica.
#[derive(Debug)]
struct Attached {
    holder: String,
    commands: mpsc::Sender<pb::Command>,
}

/// Local fan-out, shared by every RPC of the replica.
#[derive(Debug)]
pub struct Hub {
    events: broadcast::Sender<Arc<HubEvent>>,
    attached: Mutex<HashMap<String, Attached>>,
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
            attached: Mutex::new(HashMap::new()),
        }
    }

    /// Delivers one bus message. Returns whether a command found its stream.
    pub fn dispatch(&self, message: BusMessage) -> bool {
        match message {
            BusMessage::Event { campaign_id, event } => {
                // No receivers is normal (nobody watching).
                let _ = self.events.send(Arc::new(HubEvent { campaign_id, event }));
                true
            }
            BusMessage::Command { call_id, command } => self.deliver_command(&call_id, command),
        }
    }

    /// Subscribes to every event stored from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<HubEvent>> {
        self.events.subscribe()
    }

    /// Registers the attach stream `holder` for a call, replacing an older one.
    pub fn register(&self, call_id: &str, holder: &str, commands: mpsc::Sender<pb::Command>) {
        self.lock().insert(
            call_id.to_owned(),
            Attached {
                holder: holder.to_owned(),
                commands,
            },
        );
    }

    /// Removes the registration if it is still `holder`'s.
    pub fn unregister(&self, call_id: &str, holder: &str) {
        let mut map = self.lock();
        if map.get(call_id).is_some_and(|a| a.holder == holder) {
            map.remove(call_id);
        }
    }

    /// Number of attach streams on this replica.
    pub fn attached_count(&self) -> usize {
        self.lock().len()
    }

    fn deliver_command(&self, call_id: &str, command: pb::Command) -> bool {
        let map = self.lock();
        match map.get(call_id) {
            // try_send: a stream that does not drain its commands must not stall the bus.
            Some(attached) => attached.commands.try_send(command).is_ok(),
            None => false,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Attached>> {
        // A panic while holding this short lock cannot leave the map half-updated
        // (single insert/remove), so a poisoned lock is still usable.
        self.attached.lock().unwrap_or_else(|p| p.into_inner())
    }
}

//! The `event_id`s the relay puts on its client events, and the recent ones it remembers,
//! so an `error` naming one (`error.event_id`) can say which request caused it.
//!
//! Appends are not stamped: they are the hot path (50 a second), the relay checks their
//! base64 before sending, and an error about one would name nothing worth knowing.

use std::collections::VecDeque;

use crate::realtime;

/// Client events remembered for correlation. An error arrives within a round trip of its
/// event; a call sends a few non-append events per turn.
pub const REMEMBERED: usize = 64;

/// Numbers a call's client events and remembers the latest [`REMEMBERED`].
#[derive(Debug, Default)]
pub struct SentEvents {
    next: u64,
    recent: VecDeque<(u64, &'static str)>,
}

/// Ids are `cb_<n>`, numbered per call (unique across its model sessions too).
const PREFIX: &str = "cb_";

impl SentEvents {
    /// `event` (of type `kind`) with the next `event_id`; the id is remembered.
    pub fn stamp(&mut self, kind: &'static str, event: &str) -> String {
        self.next += 1;
        if self.recent.len() == REMEMBERED {
            self.recent.pop_front();
        }
        self.recent.push_back((self.next, kind));
        realtime::with_event_id(&format!("{PREFIX}{}", self.next), event)
    }

    /// The type of the remembered event `event_id`, if it is one of the relay's.
    pub fn kind_of(&self, event_id: &str) -> Option<&'static str> {
        let n: u64 = event_id.strip_prefix(PREFIX)?.parse().ok()?;
        self.recent
            .iter()
            .find(|(id, _)| *id == n)
            .map(|(_, kind)| *kind)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::*;

    #[test]
    fn stamps_ids_and_remembers_the_latest() {
        let mut sent = SentEvents::default();
        let first = sent.stamp("response.create", &realtime::response_create());
        let v: Value = serde_json::from_str(&first).expect("JSON");
        assert_eq!(v["event_id"], "cb_1");
        assert_eq!(v["type"], "response.create");
        assert_eq!(sent.kind_of("cb_1"), Some("response.create"));
        for _ in 0..REMEMBERED {
            sent.stamp("input_audio_buffer.commit", &realtime::commit());
        }
        assert_eq!(sent.kind_of("cb_1"), None, "forgotten");
        assert_eq!(
            sent.kind_of(&format!("cb_{}", REMEMBERED + 1)),
            Some("input_audio_buffer.commit")
        );
        assert_eq!(sent.kind_of("event_567"), None, "not ours");
        assert_eq!(sent.kind_of("cb_x"), None);
    }
}

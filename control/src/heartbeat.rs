//! Application-level heartbeats: how control tells a live relay from a lost one without
//! waiting for TCP or HTTP/2 keepalive (docs/resilience.md, "Heartbeats").
//!
//! A relay that opens an attach stream with `heartbeats` sends a tiny `heartbeat` on it
//! every [`interval`] (control names it in the call context, so the two never disagree).
//! Any message counts as a sign of life. When nothing arrived for the timeout, the
//! stream is treated as broken: its lease is released (one store write, the same as a
//! dropped stream) and the call can resume on another relay. Heartbeats themselves
//! write nothing to the store.

use std::time::Duration;

use tokio::time::Instant;

/// The heartbeat interval for a timeout: a third of it, so two heartbeats may be lost
/// (or late) before the third one's absence releases the lease.
pub fn interval(timeout: Duration) -> Duration {
    (timeout / 3).max(Duration::from_millis(100))
}

/// `interval` in the proto's milliseconds.
pub fn interval_ms(timeout: Duration) -> u32 {
    u32::try_from(interval(timeout).as_millis()).unwrap_or(u32::MAX)
}

/// When one attach stream last showed life, and whether it is overdue.
#[derive(Debug, Clone, Copy)]
pub struct Liveness {
    timeout: Duration,
    last_heard: Instant,
}

impl Liveness {
    /// A stream heard from at `now` (its `open`).
    pub fn new(timeout: Duration, now: Instant) -> Self {
        Self {
            timeout,
            last_heard: now,
        }
    }

    /// Something arrived on the stream at `now`; also called after control's own pause
    /// (a slow store write), when it was not listening, so that pause is never held
    /// against the relay.
    pub fn heard(&mut self, now: Instant) {
        self.last_heard = self.last_heard.max(now);
    }

    /// Whether the relay has been silent for the whole timeout at `now`.
    pub fn overdue(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.last_heard) >= self.timeout
    }

    /// How long it has been silent at `now`.
    pub fn silent_for(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.last_heard)
    }
}

/// The other relays the registry counts as ready at `now_ms`: seen within `alive_ms`, not
/// draining, not `me`. The in-memory store's rule; the Redis script applies the same one.
pub fn ready_others<'a>(
    relays: impl IntoIterator<Item = (&'a str, i64, bool)>,
    me: &str,
    now_ms: i64,
    alive_ms: i64,
) -> u32 {
    let n = relays
        .into_iter()
        .filter(|(id, seen, draining)| *id != me && !draining && *seen > now_ms - alive_ms)
        .count();
    u32::try_from(n).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMEOUT: Duration = Duration::from_secs(6);

    #[test]
    fn the_interval_is_a_third_of_the_timeout() {
        assert_eq!(interval(TIMEOUT), Duration::from_secs(2));
        assert_eq!(interval_ms(TIMEOUT), 2000);
        // Never a busy loop, however small the timeout.
        assert_eq!(
            interval(Duration::from_millis(30)),
            Duration::from_millis(100)
        );
    }

    #[test]
    fn a_stream_is_overdue_only_after_a_whole_timeout_of_silence() {
        let start = Instant::now();
        let mut live = Liveness::new(TIMEOUT, start);
        assert!(!live.overdue(start));
        assert!(!live.overdue(start + TIMEOUT - Duration::from_millis(1)));
        assert!(live.overdue(start + TIMEOUT));
        // A heartbeat just before the end starts the timeout again.
        live.heard(start + Duration::from_secs(5));
        assert!(!live.overdue(start + Duration::from_secs(10)));
        assert!(live.overdue(start + Duration::from_secs(11)));
        assert_eq!(
            live.silent_for(start + Duration::from_secs(12)),
            Duration::from_secs(7)
        );
    }

    #[test]
    fn every_interval_heartbeat_keeps_a_stream_alive_and_two_lost_ones_do_not_release_it() {
        let start = Instant::now();
        let mut live = Liveness::new(TIMEOUT, start);
        let every = interval(TIMEOUT);
        for n in 1..=100 {
            live.heard(start + every * n);
            assert!(!live.overdue(start + every * n + every));
        }
        // The next two heartbeats are lost; the stream is not overdue until the third.
        let last = start + every * 100;
        assert!(!live.overdue(last + every * 2));
        assert!(live.overdue(last + every * 3));
    }

    #[test]
    fn hearing_the_past_never_moves_the_last_sign_of_life_back() {
        let start = Instant::now();
        let mut live = Liveness::new(TIMEOUT, start + Duration::from_secs(4));
        live.heard(start);
        assert!(!live.overdue(start + Duration::from_secs(9)));
    }

    #[test]
    fn ready_relays_are_the_other_fresh_ones_not_draining() {
        let now = 100_000;
        let relays = [
            ("me", now, false),
            ("fresh", now - 1_000, false),
            ("draining", now - 1_000, true),
            ("stale", now - 6_000, false),
            ("old", now - 60_000, false),
        ];
        assert_eq!(ready_others(relays, "me", now, 6_000), 1);
        assert_eq!(ready_others(relays, "fresh", now, 6_000), 1);
        assert_eq!(ready_others([("me", now, false)], "me", now, 6_000), 0);
    }
}

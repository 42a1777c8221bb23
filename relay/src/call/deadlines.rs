//! The call's own timers: `start` from Twilio, media from Twilio, the agent's maximum
//! duration and the goodbye's playback. Pure: every method takes `now`. The model
//! session's timers (stall, outage) and the tools' are in their components; the call
//! loop sleeps until the earliest of all (`Call::next_deadline`).

use std::time::Duration;

use tokio::time::Instant;

/// Longest an `end_call`/transfer waits for the goodbye audio to play.
pub const PLAYBACK_DRAIN_MAX: Duration = Duration::from_secs(20);

/// A timer that ran out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expired {
    /// No `start` in time.
    Start,
    /// The agent's maximum duration.
    MaxDuration,
    /// No media for the media timeout.
    Media,
    /// The goodbye's marks never came back: end anyway.
    Goodbye,
}

/// The timers.
#[derive(Debug)]
pub struct Deadlines {
    start_by: Instant,
    media_timeout: Duration,
    max_duration: Duration,
    started_at: Option<Instant>,
    last_media: Instant,
    /// When media silence is checked next (moved on as media comes, lazily: not per frame).
    media_check: Instant,
    goodbye_by: Option<Instant>,
}

impl Deadlines {
    /// Timers of a call upgraded at `upgraded_at`.
    pub fn new(
        upgraded_at: Instant,
        start_timeout: Duration,
        media_timeout: Duration,
        max_duration: Duration,
    ) -> Self {
        Self {
            start_by: upgraded_at + start_timeout,
            media_timeout,
            max_duration,
            started_at: None,
            last_media: upgraded_at,
            media_check: upgraded_at + media_timeout,
            goodbye_by: None,
        }
    }

    /// Twilio's `start` came.
    pub fn started(&mut self, now: Instant) {
        self.started_at = Some(now);
        self.last_media = now;
        self.media_check = now + self.media_timeout;
    }

    /// When the stream started.
    pub fn started_at(&self) -> Option<Instant> {
        self.started_at
    }

    /// Caller audio came.
    pub fn media(&mut self, now: Instant) {
        self.last_media = now;
    }

    /// A goodbye started playing: the call ends when it was heard, or at this limit.
    pub fn goodbye(&mut self, now: Instant) {
        self.goodbye_by = Some(now + PLAYBACK_DRAIN_MAX);
    }

    /// The earliest of the timers.
    pub fn next(&self) -> Instant {
        let next = match self.started_at {
            None => self.start_by,
            Some(s) => (s + self.max_duration).min(self.media_check),
        };
        self.goodbye_by.map_or(next, |g| next.min(g))
    }

    /// The timer that ran out at `now`, if one did (the most final first). Before `start`
    /// only the start timer runs.
    pub fn check(&mut self, now: Instant) -> Option<Expired> {
        let Some(started) = self.started_at else {
            return (now >= self.start_by).then_some(Expired::Start);
        };
        if now >= started + self.max_duration {
            return Some(Expired::MaxDuration);
        }
        if now >= self.media_check {
            if now.duration_since(self.last_media) >= self.media_timeout {
                return Some(Expired::Media);
            }
            self.media_check = self.last_media + self.media_timeout;
        }
        if self.goodbye_by.is_some_and(|d| now >= d) {
            self.goodbye_by = None;
            return Some(Expired::Goodbye);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn timers(t0: Instant) -> Deadlines {
        Deadlines::new(t0, 5 * S, 30 * S, 3600 * S)
    }

    #[test]
    fn no_start_in_time_expires_and_nothing_else_runs_before_start() {
        let t0 = Instant::now();
        let mut d = timers(t0);
        assert_eq!(d.next(), t0 + 5 * S);
        assert_eq!(d.check(t0 + 4 * S), None);
        d.goodbye(t0);
        assert_eq!(d.check(t0 + 4 * S), None, "no goodbye before start");
        assert_eq!(d.check(t0 + 5 * S), Some(Expired::Start));
    }

    #[test]
    fn media_silence_expires_and_media_moves_the_check_on() {
        let t0 = Instant::now();
        let mut d = timers(t0);
        d.started(t0 + S);
        assert_eq!(d.started_at(), Some(t0 + S));
        assert_eq!(d.next(), t0 + 31 * S);
        d.media(t0 + 20 * S);
        // The check is moved lazily, when it fires.
        assert_eq!(d.check(t0 + 31 * S), None);
        assert_eq!(d.next(), t0 + 50 * S);
        assert_eq!(d.check(t0 + 49 * S), None);
        assert_eq!(d.check(t0 + 50 * S), Some(Expired::Media));
    }

    #[test]
    fn max_duration_expires_first() {
        let t0 = Instant::now();
        let mut d = Deadlines::new(t0, 5 * S, 30 * S, 10 * S);
        d.started(t0);
        assert_eq!(d.next(), t0 + 10 * S);
        d.goodbye(t0);
        assert_eq!(d.check(t0 + 10 * S), Some(Expired::MaxDuration));
    }

    #[test]
    fn goodbye_limit_expires_once() {
        let t0 = Instant::now();
        let mut d = Deadlines::new(t0, 5 * S, 300 * S, 3600 * S);
        d.started(t0);
        d.goodbye(t0 + S);
        assert_eq!(d.next(), t0 + S + PLAYBACK_DRAIN_MAX);
        assert_eq!(d.check(t0 + PLAYBACK_DRAIN_MAX), None);
        assert_eq!(d.check(t0 + S + PLAYBACK_DRAIN_MAX), Some(Expired::Goodbye));
        assert_eq!(d.check(t0 + S + PLAYBACK_DRAIN_MAX), None);
        assert_eq!(d.next(), t0 + 300 * S);
    }
}

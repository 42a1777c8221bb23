//! The caller's media rate: Twilio sends one 20 ms frame every 20 ms, so audio arriving
//! faster than real time (beyond a short burst, e.g. after a network stall) is not a
//! phone call. Such frames are dropped and counted, never queued: queued, they would
//! hold memory and delay the caller's real speech.

use std::time::Duration;

use tokio::time::Instant;

/// Audio one Twilio media frame carries.
pub const FRAME: Duration = Duration::from_millis(20);
/// Audio that may arrive ahead of real time at once.
pub const BURST: Duration = Duration::from_secs(2);

/// A token bucket measured in audio time: it fills at real time up to [`BURST`], and each
/// frame takes [`FRAME`] from it.
#[derive(Debug, Default)]
pub struct MediaRate {
    credit: Duration,
    last: Option<Instant>,
}

impl MediaRate {
    /// Whether a frame arriving at `now` is within the rate; takes its share if so.
    pub fn allow(&mut self, now: Instant) -> bool {
        let credit = match self.last {
            None => BURST,
            Some(last) => (self.credit + now.saturating_duration_since(last)).min(BURST),
        };
        self.last = Some(now);
        match credit.checked_sub(FRAME) {
            Some(left) => {
                self.credit = left;
                true
            }
            None => {
                self.credit = credit;
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allowed(rate: &mut MediaRate, at: Instant, frames: u32) -> u32 {
        (0..frames).filter(|_| rate.allow(at)).count() as u32
    }

    #[test]
    fn real_time_always_passes() {
        let mut rate = MediaRate::default();
        let t0 = Instant::now();
        for i in 0..10_000 {
            assert!(rate.allow(t0 + FRAME * i), "frame {i}");
        }
    }

    #[test]
    fn a_burst_passes_then_only_real_time() {
        let mut rate = MediaRate::default();
        let t0 = Instant::now();
        // 2 s of audio at once pass; the rest of a flood does not.
        assert_eq!(allowed(&mut rate, t0, 1000), 100);
        // 200 ms later, 200 ms worth (10 frames) passes again.
        assert_eq!(allowed(&mut rate, t0 + Duration::from_millis(200), 50), 10);
        // After a long quiet the burst is back, capped at 2 s.
        assert_eq!(allowed(&mut rate, t0 + Duration::from_secs(60), 1000), 100);
    }

    #[test]
    fn double_speed_is_held_to_real_time_after_the_burst() {
        let mut rate = MediaRate::default();
        let t0 = Instant::now();
        // 20 s of audio sent in 10 s (a frame every 10 ms).
        let passed = (0..1000u32)
            .filter(|&i| rate.allow(t0 + Duration::from_millis(10) * i))
            .count();
        // Real time over 10 s (500 frames) plus the burst (100), give or take one.
        assert!((599..=601).contains(&passed), "{passed}");
    }
}

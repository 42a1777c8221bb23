//! Where the caller's playback is between mark echoes.
//!
//! Marks go to Twilio at a cadence (about one per 100 ms of audio, [`super::phase`]), not
//! one per delta, so an echo says what was heard only now and then. In between, the
//! position follows from how Twilio plays: what it was sent, back to back, each piece
//! starting when it arrived or when the one before it ended, whichever is later. The last
//! echo anchors that clock; audio sent after everything before it would have played (an
//! underrun) restarts it. A mark not yet echoed caps the estimate: past it, its echo would
//! have come. Positions are ms of audio sent since the last `clear`.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

/// Restart points kept; underruns are rare (the model sends faster than real time), and
/// losing the oldest only loosens the estimate.
const MAX_STARTS: usize = 64;
/// Unechoed marks kept (one per ~100 ms of queued audio: over a minute).
const MAX_MARKS: usize = 1024;

/// The playback clock of one call.
#[derive(Debug, Default)]
pub struct Playhead {
    /// Where playback (re)started and when, in position order: first the last echo (or
    /// the first audio), then each underrun after it.
    starts: VecDeque<(u32, Instant)>,
    /// Positions of marks sent and not yet echoed, in order.
    marks: VecDeque<u32>,
    sent_ms: u32,
}

impl Playhead {
    /// Audio sent since the last `clear`, ms.
    pub fn sent_ms(&self) -> u32 {
        self.sent_ms
    }

    /// `ms` of audio were sent at `now`.
    pub fn sent(&mut self, ms: u32, now: Instant) {
        let underrun = match self.starts.back() {
            None => true,
            Some(&(pos, at)) => now > at + ms_duration(self.sent_ms.saturating_sub(pos)),
        };
        if underrun {
            if self.starts.len() == MAX_STARTS {
                self.starts.pop_front();
            }
            self.starts.push_back((self.sent_ms, now));
        }
        self.sent_ms = self.sent_ms.saturating_add(ms);
    }

    /// A mark was sent at the current end of the audio.
    pub fn marked(&mut self) {
        if self.marks.len() == MAX_MARKS {
            self.marks.pop_front();
        }
        self.marks.push_back(self.sent_ms);
    }

    /// The mark at `pos` came back at `at`: playback was there then.
    pub fn echoed(&mut self, pos: u32, at: Instant) {
        let pos = pos.min(self.sent_ms);
        while self.marks.front().is_some_and(|&m| m <= pos) {
            self.marks.pop_front();
        }
        // Re-anchor, and keep only the later restarts that are still underruns from here
        // (in place: this runs on every echo).
        while self.starts.front().is_some_and(|&(p, _)| p < pos) {
            self.starts.pop_front();
        }
        self.starts.push_front((pos, at));
        let mut last = None;
        self.starts.retain(|&(p, a)| {
            let keep = match last {
                None => true,
                Some((last_pos, last_at)) => a > last_at + ms_duration(p.saturating_sub(last_pos)),
            };
            if keep {
                last = Some((p, a));
            }
            keep
        });
    }

    /// The estimated position at `now`: never past an unechoed mark or the audio sent.
    pub fn heard(&self, now: Instant) -> u32 {
        let mut heard = 0;
        for (i, &(pos, at)) in self.starts.iter().enumerate() {
            if at > now {
                break;
            }
            let next = self.starts.get(i + 1).map_or(self.sent_ms, |&(p, _)| p);
            let played = now.duration_since(at).as_millis();
            heard = pos.saturating_add(
                u32::try_from(played)
                    .unwrap_or(u32::MAX)
                    .min(next.saturating_sub(pos)),
            );
        }
        let cap = self.marks.front().copied().unwrap_or(self.sent_ms);
        heard.min(cap)
    }

    /// A `clear` emptied Twilio's buffer: nothing is queued any more.
    pub fn clear(&mut self) {
        self.starts.clear();
        self.marks.clear();
        self.sent_ms = 0;
    }

    /// Marks in flight will never prove anything (their generation is over); the audio
    /// they follow still plays.
    pub fn forget_marks(&mut self) {
        self.marks.clear();
    }
}

fn ms_duration(ms: u32) -> Duration {
    Duration::from_millis(u64::from(ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn follows_the_clock_from_the_first_audio_up_to_the_first_mark() {
        let t0 = Instant::now();
        let mut p = Playhead::default();
        // 200 ms sent at once (faster than real time), a mark at 100 and one at 200.
        for k in 0..10 {
            p.sent(20, t0 + ms(k));
            if k == 4 || k == 9 {
                p.marked();
            }
        }
        assert_eq!(p.heard(t0), 0);
        assert_eq!(p.heard(t0 + ms(60)), 60);
        // The mark at 100 ms has not come back: the estimate waits for it.
        assert_eq!(p.heard(t0 + ms(130)), 100);
        p.echoed(100, t0 + ms(101));
        assert_eq!(p.heard(t0 + ms(131)), 130);
        assert_eq!(p.heard(t0 + ms(500)), 200, "never past what was sent");
    }

    #[test]
    fn an_underrun_restarts_the_clock_when_the_audio_arrives() {
        let t0 = Instant::now();
        let mut p = Playhead::default();
        p.sent(40, t0); // plays until t0+40
        p.sent(40, t0 + ms(100)); // arrives after a 60 ms gap of silence
        assert_eq!(p.heard(t0 + ms(70)), 40);
        assert_eq!(p.heard(t0 + ms(120)), 60);
        // An echo that shows the first piece ended late keeps the later restart (still an
        // underrun from there) but not one it overtakes.
        p.echoed(40, t0 + ms(45));
        assert_eq!(p.heard(t0 + ms(110)), 50);
        p.echoed(40, t0 + ms(105));
        assert_eq!(p.heard(t0 + ms(110)), 45);
    }

    #[test]
    fn a_clear_starts_over() {
        let t0 = Instant::now();
        let mut p = Playhead::default();
        p.sent(100, t0);
        p.marked();
        p.clear();
        assert_eq!((p.sent_ms(), p.heard(t0 + ms(50))), (0, 0));
        p.sent(20, t0 + ms(60));
        assert_eq!(p.heard(t0 + ms(70)), 10);
    }
}

//! The caller's latest audio, kept to resend to a new model session after a drop
//! (`Call::utterance`).
//!
//! Kept decoded. A 20 ms μ-law frame is 160 bytes. As its `input_audio_buffer.append`
//! text it is ~270 bytes in an allocation of its own, ~320 with the allocator's and the
//! shared buffer's overhead. During caller speech the window holds up to 150 frames: ~24
//! KiB decoded instead of ~47 KiB, which kept a speaking call well above the 64 KiB per
//! call target (docs/performance.md). Decoding costs well under a microsecond per frame.
//! Re-encoding happens only on a resend.

use std::collections::VecDeque;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;

use crate::realtime;

/// A 20 ms μ-law frame, as Twilio sends it.
pub const FRAME_BYTES: usize = 160;
/// Frames up to this size decode on the stack.
const STACK_FRAME: usize = 1024;

/// The last frames of caller audio, oldest first, bounded in frames.
#[derive(Debug, Default)]
pub struct Utterance {
    /// The frames' μ-law bytes, back to back.
    audio: VecDeque<u8>,
    /// Each frame's length in `audio`.
    frames: VecDeque<u16>,
}

impl Utterance {
    /// Keeps one frame (base64, as Twilio sent it), dropping the oldest beyond `cap`
    /// frames. A payload that does not decode, or is over 64 KiB, is not kept.
    pub fn push_base64(&mut self, payload: &str, cap: usize) -> bool {
        let mut stack = [0u8; STACK_FRAME];
        let heap;
        let decoded: &[u8] = match STANDARD.decode_slice(payload, &mut stack) {
            Ok(n) => &stack[..n],
            Err(_) => match STANDARD.decode(payload) {
                Ok(v) => {
                    heap = v;
                    &heap
                }
                Err(_) => return false,
            },
        };
        let Ok(len) = u16::try_from(decoded.len()) else {
            return false;
        };
        while self.frames.len() >= cap.max(1) {
            let old = usize::from(self.frames.pop_front().unwrap_or(0));
            self.audio.drain(..old.min(self.audio.len()));
        }
        // Sized for the window once, not doubled past it.
        let want = cap.max(1) * decoded.len();
        if self.audio.capacity() < want {
            self.audio.reserve_exact(want - self.audio.len());
        }
        self.audio.extend(decoded);
        self.frames.push_back(len);
        true
    }

    /// Frames kept.
    pub fn len(&self) -> usize {
        self.frames.len()
    }

    /// Nothing kept.
    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// Forgets every frame and gives back memory beyond `keep_bytes` (the pre-roll's
    /// worth): a call that spoke once must not hold a whole utterance's room forever.
    pub fn clear(&mut self, keep_bytes: usize) {
        self.audio.clear();
        self.frames.clear();
        self.audio.shrink_to(keep_bytes);
        self.frames.shrink_to(keep_bytes / FRAME_BYTES);
    }

    /// Bytes held for audio (capacity, not length).
    pub fn retained_bytes(&self) -> usize {
        self.audio.capacity()
    }

    /// The kept frames as `input_audio_buffer.append` events, oldest first, one per frame.
    pub fn appends(&self) -> impl Iterator<Item = String> + '_ {
        let mut at = 0;
        self.frames.iter().map(move |&len| {
            let len = usize::from(len);
            let frame: Vec<u8> = self.audio.range(at..at + len).copied().collect();
            at += len;
            realtime::append(&STANDARD.encode(frame))
        })
    }
}

/// Caller frames of the utterance in progress kept to resend to a new model session
/// (3 s).
pub const UTTERANCE_FRAMES: usize = 150;
/// Caller frames kept before any utterance (300 ms: speech starts before the model's VAD
/// says so).
pub const PREROLL_FRAMES: usize = 15;

/// The caller's latest audio and whether an utterance is open (started, not transcribed
/// yet): the words a new model session must hear again after a drop.
#[derive(Debug, Default)]
pub struct CallerAudio {
    frames: Utterance,
    open: bool,
}

impl CallerAudio {
    /// Keeps a caller frame (its base64 payload): the whole open utterance (up to
    /// [`UTTERANCE_FRAMES`]), or a pre-roll of [`PREROLL_FRAMES`] when none is open.
    pub fn remember(&mut self, payload: &str) {
        let cap = if self.open {
            UTTERANCE_FRAMES
        } else {
            PREROLL_FRAMES
        };
        self.frames.push_base64(payload, cap);
    }

    /// The model heard the caller start speaking.
    pub fn speech_started(&mut self) {
        self.open = true;
    }

    /// The model has the words now (a new session gets them as an item): only a pre-roll
    /// is kept from here on.
    pub fn transcribed(&mut self) {
        self.open = false;
        self.frames.clear(PREROLL_FRAMES * FRAME_BYTES);
    }

    /// The frames to resend to a new session: the open utterance, if there is one.
    pub fn resend(&self) -> impl Iterator<Item = String> + '_ {
        let n = if self.open { self.frames.len() } else { 0 };
        self.frames.appends().take(n)
    }

    /// Frames kept.
    pub fn len(&self) -> usize {
        self.frames.len()
    }

    /// Nothing kept.
    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caller_audio_keeps_a_preroll_then_the_open_utterance_for_a_resend() {
        let mut a = CallerAudio::default();
        for i in 0..40 {
            a.remember(&frame(i));
        }
        assert_eq!(a.len(), PREROLL_FRAMES);
        assert_eq!(a.resend().count(), 0, "nothing open: nothing to resend");
        a.speech_started();
        for i in 0..200u8 {
            a.remember(&frame(i));
        }
        assert_eq!(a.len(), UTTERANCE_FRAMES);
        let resent: Vec<String> = a.resend().collect();
        assert_eq!(resent.len(), UTTERANCE_FRAMES);
        assert_eq!(audio_of(&resent[UTTERANCE_FRAMES - 1]), vec![199u8; 160]);
        a.transcribed();
        assert!(a.is_empty());
        assert_eq!(a.resend().count(), 0);
    }

    fn frame(i: u8) -> String {
        STANDARD.encode([i; 160])
    }

    fn audio_of(append: &str) -> Vec<u8> {
        let v: serde_json::Value = serde_json::from_str(append).expect("JSON");
        assert_eq!(v["type"], "input_audio_buffer.append");
        STANDARD
            .decode(v["audio"].as_str().expect("audio"))
            .expect("base64")
    }

    #[test]
    fn keeps_the_last_frames_and_resends_them_as_they_came() {
        let mut u = Utterance::default();
        for i in 0..20 {
            assert!(u.push_base64(&frame(i), 15));
        }
        assert_eq!(u.len(), 15);
        let resent: Vec<Vec<u8>> = u.appends().map(|a| audio_of(&a)).collect();
        let expected: Vec<Vec<u8>> = (5..20).map(|i| vec![i; 160]).collect();
        assert_eq!(resent, expected);
    }

    #[test]
    fn frames_of_other_sizes_and_bad_payloads() {
        let mut u = Utterance::default();
        assert!(u.push_base64(&STANDARD.encode([7u8; 3]), 4));
        assert!(
            u.push_base64(&STANDARD.encode(vec![9u8; 4000]), 4),
            "decoded on the heap"
        );
        assert!(!u.push_base64("not base64!", 4));
        let resent: Vec<Vec<u8>> = u.appends().map(|a| audio_of(&a)).collect();
        assert_eq!(resent, vec![vec![7u8; 3], vec![9u8; 4000]]);
    }

    #[test]
    fn a_full_utterance_holds_its_decoded_size_and_clearing_gives_it_back() {
        let mut u = Utterance::default();
        for i in 0..200 {
            u.push_base64(&frame((i % 250) as u8), 150);
        }
        assert_eq!(u.len(), 150);
        // 150 × 160 bytes, not the ~47 KiB the append texts took.
        assert!(
            u.retained_bytes() <= 150 * 160 + 160,
            "{}",
            u.retained_bytes()
        );
        u.clear(15 * 160);
        assert!(u.is_empty());
        assert!(
            u.retained_bytes() <= 15 * 160 + 160,
            "{}",
            u.retained_bytes()
        );
    }
}

//! Turn detection off (an agent's `turn_detection.type = NONE`): the model never ends the
//! caller's turn by itself, so the relay does. It listens to the caller's frames (μ-law
//! energy) and says when to send `input_audio_buffer.commit` — after the agent's
//! `silence_commit_ms` of silence following speech — and whether there is enough audio
//! to commit for a `CommitInput` command (the model refuses a buffer under 100 ms).
//! Pure: no sockets, no clock; audio time is counted in frames.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;

/// The model refuses to commit less audio than this.
pub const MIN_COMMIT_MS: u32 = 100;
/// Speech needed before silence can end a turn: a click or a cough is not a turn.
pub const MIN_SPEECH_MS: u32 = 60;
/// Silence after speech during which the caller still counts as speaking (a pause between
/// words), as a VAD's `speech_stopped` would come.
pub const SPEAKING_HANGOVER_MS: u32 = 500;
/// Mean absolute amplitude (of 32 767) above which a frame is speech: about −44 dBFS,
/// well above a phone line's idle noise (−60 dBFS and below).
pub const SPEECH_LEVEL: u32 = 200;

/// What a caller frame means for the turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Heard {
    /// Nothing changes.
    Nothing,
    /// The first speech since the last commit: the caller's turn has begun.
    SpeechStarted,
    /// Enough silence followed speech: commit now.
    Commit,
}

/// The caller's audio since the last commit.
#[derive(Debug, Default)]
pub struct TurnCommit {
    /// `silence_commit_ms`; `None`: only a command commits.
    silence_after_ms: Option<u32>,
    /// Audio appended since the last commit.
    buffered_ms: u32,
    speech_ms: u32,
    silence_ms: u32,
}

impl TurnCommit {
    /// Commits after `silence_after_ms` of silence following speech (`None`: only on a
    /// command).
    pub fn new(silence_after_ms: Option<u32>) -> Self {
        Self {
            silence_after_ms,
            ..Self::default()
        }
    }

    /// A caller frame (Twilio's base64 payload) that went to the model.
    pub fn heard_base64(&mut self, payload: &str) -> Heard {
        let mut buf = [0u8; 1024];
        match STANDARD.decode_slice(payload, &mut buf) {
            Ok(n) => self.heard(&buf[..n]),
            // Oversized frames still count as audio in the buffer, as neither speech nor
            // silence.
            Err(_) => {
                self.buffered_ms = self.buffered_ms.saturating_add(1);
                Heard::Nothing
            }
        }
    }

    /// A caller frame of μ-law bytes (8 per ms) that went to the model.
    pub fn heard(&mut self, mulaw: &[u8]) -> Heard {
        let ms = u32::try_from(mulaw.len() / 8).unwrap_or(u32::MAX);
        self.buffered_ms = self.buffered_ms.saturating_add(ms);
        if is_speech(mulaw) {
            let started = self.speech_ms == 0;
            self.speech_ms = self.speech_ms.saturating_add(ms);
            self.silence_ms = 0;
            return if started {
                Heard::SpeechStarted
            } else {
                Heard::Nothing
            };
        }
        if self.speech_ms < MIN_SPEECH_MS {
            return Heard::Nothing;
        }
        self.silence_ms = self.silence_ms.saturating_add(ms);
        match self.silence_after_ms {
            Some(after) if self.silence_ms >= after && self.can_commit() => Heard::Commit,
            _ => Heard::Nothing,
        }
    }

    /// The caller is speaking (spoke since the last commit, and has not been silent for
    /// [`SPEAKING_HANGOVER_MS`]): not a moment to switch sessions.
    pub fn speaking(&self) -> bool {
        self.speech_ms > 0 && self.silence_ms < SPEAKING_HANGOVER_MS
    }

    /// Whether the buffer holds enough audio for the model to accept a commit.
    pub fn can_commit(&self) -> bool {
        self.buffered_ms >= MIN_COMMIT_MS
    }

    /// The buffer was committed (or the session replaced): a new turn starts.
    pub fn committed(&mut self) {
        self.buffered_ms = 0;
        self.speech_ms = 0;
        self.silence_ms = 0;
    }
}

/// Whether a μ-law frame holds speech (mean absolute amplitude over [`SPEECH_LEVEL`]).
pub fn is_speech(mulaw: &[u8]) -> bool {
    if mulaw.is_empty() {
        return false;
    }
    let sum: u64 = mulaw.iter().map(|&b| u64::from(mulaw_magnitude(b))).sum();
    sum / mulaw.len() as u64 > u64::from(SPEECH_LEVEL)
}

/// |linear sample| of a G.711 μ-law byte.
fn mulaw_magnitude(byte: u8) -> u16 {
    let b = !byte;
    let exponent = (b >> 4) & 0x07;
    let mantissa = u16::from(b & 0x0F);
    (((mantissa << 3) + 0x84) << exponent) - 0x84
}

#[cfg(test)]
mod tests {
    use super::*;

    const SILENCE: [u8; 160] = [0xFF; 160];

    /// 20 ms of a loud-ish tone (alternating ±~8000).
    fn speech() -> [u8; 160] {
        let mut f = [0u8; 160];
        for (i, b) in f.iter_mut().enumerate() {
            *b = if i % 2 == 0 { 0x9F } else { 0x1F };
        }
        f
    }

    #[test]
    fn mulaw_decodes_to_the_g711_table() {
        assert_eq!(mulaw_magnitude(0xFF), 0);
        assert_eq!(mulaw_magnitude(0x7F), 0);
        assert_eq!(mulaw_magnitude(0x80), 32_124);
        assert_eq!(mulaw_magnitude(0x00), 32_124);
        assert!(is_speech(&speech()));
        assert!(!is_speech(&SILENCE));
        assert!(!is_speech(&[0xFE; 160]), "idle line noise");
    }

    #[test]
    fn commits_after_the_silence_that_follows_speech() {
        let mut t = TurnCommit::new(Some(200));
        // Silence alone never commits.
        for _ in 0..50 {
            assert_eq!(t.heard(&SILENCE), Heard::Nothing);
        }
        assert_eq!(t.heard(&speech()), Heard::SpeechStarted);
        for _ in 0..10 {
            assert_eq!(t.heard(&speech()), Heard::Nothing);
        }
        // 180 ms of silence: not yet; the 200th ms commits.
        for _ in 0..9 {
            assert_eq!(t.heard(&SILENCE), Heard::Nothing);
        }
        assert!(t.speaking(), "a pause is not the end of speech");
        assert_eq!(t.heard(&SILENCE), Heard::Commit);
        t.committed();
        assert!(!t.speaking());
        assert!(!t.can_commit());
        assert_eq!(t.heard(&SILENCE), Heard::Nothing);
    }

    #[test]
    fn a_click_is_not_a_turn_and_speech_resets_the_silence() {
        let mut t = TurnCommit::new(Some(100));
        t.heard(&speech()); // 20 ms < MIN_SPEECH_MS
        for _ in 0..20 {
            assert_eq!(t.heard(&SILENCE), Heard::Nothing);
        }
        for _ in 0..3 {
            t.heard(&speech());
        }
        for _ in 0..4 {
            assert_eq!(t.heard(&SILENCE), Heard::Nothing);
        }
        t.heard(&speech());
        for _ in 0..4 {
            assert_eq!(t.heard(&SILENCE), Heard::Nothing);
        }
        assert_eq!(t.heard(&SILENCE), Heard::Commit);
    }

    #[test]
    fn without_a_silence_setting_only_a_command_commits() {
        let mut t = TurnCommit::new(None);
        assert!(!t.can_commit());
        for _ in 0..10 {
            t.heard(&speech());
        }
        for _ in 0..100 {
            assert_eq!(t.heard(&SILENCE), Heard::Nothing);
        }
        assert!(!t.speaking(), "long silent");
        assert!(t.can_commit());
    }

    #[test]
    fn base64_frames_are_decoded() {
        let mut t = TurnCommit::new(Some(20));
        let b64 = |f: &[u8]| STANDARD.encode(f);
        for _ in 0..4 {
            t.heard_base64(&b64(&speech()));
        }
        assert_eq!(t.heard_base64(&b64(&SILENCE)), Heard::Commit);
    }
}

//! μ-law audio helpers: silence, a tone that stands in for speech, and the speech test the
//! fake model uses instead of real voice activity detection.

use base64::Engine as _;

/// μ-law silence (a zero sample).
pub const SILENCE: u8 = 0xFF;
/// The other μ-law encoding of zero ("negative zero").
pub const SILENCE_NEG: u8 = 0x7F;
/// μ-law bytes per millisecond at 8 kHz.
pub const BYTES_PER_MS: usize = 8;
/// One Twilio media frame: 20 ms.
pub const FRAME_BYTES: usize = 160;
/// Duration of one Twilio media frame.
pub const FRAME_MS: u64 = 20;

/// Encodes one 16-bit linear sample as G.711 μ-law.
pub fn linear_to_mulaw(sample: i16) -> u8 {
    const BIAS: i32 = 0x84;
    const CLIP: i32 = 32635;
    let mut s = i32::from(sample);
    let sign = if s < 0 { 0x80 } else { 0 };
    if s < 0 {
        s = -s;
    }
    s = s.min(CLIP) + BIAS;
    let mut exponent = 7;
    let mut mask = 0x4000;
    while exponent > 0 && s & mask == 0 {
        exponent -= 1;
        mask >>= 1;
    }
    let mantissa = (s >> (exponent + 3)) & 0x0F;
    // The value is masked to 8 bits, so the conversion cannot truncate.
    u8::try_from(!(sign | (exponent << 4) | mantissa) & 0xFF).expect("masked to 8 bits")
}

/// `ms` milliseconds of a sine tone at `hz`, μ-law encoded. Stands in for speech: every
/// 20 ms frame of it has non-silent bytes.
pub fn tone(hz: f64, ms: u64, start_sample: u64) -> Vec<u8> {
    let n = ms as usize * BYTES_PER_MS;
    (0..n)
        .map(|i| {
            let t = (start_sample + i as u64) as f64 / 8000.0;
            let v = (2.0 * std::f64::consts::PI * hz * t).sin() * 8000.0;
            linear_to_mulaw(v as i16)
        })
        .collect()
}

/// `ms` milliseconds of μ-law silence.
pub fn silence(ms: u64) -> Vec<u8> {
    vec![SILENCE; ms as usize * BYTES_PER_MS]
}

/// Whether a chunk of μ-law audio holds anything but silence.
pub fn is_speech(mulaw: &[u8]) -> bool {
    mulaw.iter().any(|&b| b != SILENCE && b != SILENCE_NEG)
}

/// Base64 (standard, padded), as both Twilio and OpenAI carry audio.
pub fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Decodes base64 audio; `None` when it is not valid base64.
pub fn unb64(text: &str) -> Option<Vec<u8>> {
    base64::engine::general_purpose::STANDARD.decode(text).ok()
}

/// Byte length of base64 text without decoding it (`docs/protocols.md`, "Audio").
pub fn b64_len(text: &str) -> usize {
    let pad = text.bytes().rev().take_while(|&b| b == b'=').count();
    (text.len() * 3 / 4).saturating_sub(pad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_encodes_to_silence() {
        assert_eq!(linear_to_mulaw(0), SILENCE);
        assert!(!is_speech(&silence(20)));
    }

    #[test]
    fn tone_frames_are_all_speech() {
        let t = tone(440.0, 200, 0);
        assert_eq!(t.len(), 200 * BYTES_PER_MS);
        assert!(t.chunks(FRAME_BYTES).all(is_speech));
    }

    #[test]
    fn known_mulaw_values() {
        // Reference values of the G.711 μ-law encoder.
        assert_eq!(linear_to_mulaw(32767), 0x80);
        assert_eq!(linear_to_mulaw(-32768), 0x00);
        assert_eq!(linear_to_mulaw(1000), 0xCE);
    }

    #[test]
    fn base64_length_without_decoding() {
        for n in [0, 1, 2, 3, 160, 400, 8000] {
            let text = b64(&vec![7u8; n]);
            assert_eq!(b64_len(&text), n);
            assert_eq!(unb64(&text).map(|v| v.len()), Some(n));
        }
    }
}

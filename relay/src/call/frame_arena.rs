//! Outgoing text frames built in one reused buffer per call.
//!
//! tungstenite takes each message by value and copies it into its own write buffer, so a
//! frame only has to live until its socket's next flush. Built as a `String` each, the
//! media frame to Twilio and the append to the model cost a heap allocation per audio
//! message each way (`bench_relay` counts allocations per frame, docs/performance.md).
//! Here frames are split off one `BytesMut`: once written and dropped, the next
//! `reserve` takes the same memory back, so the audio path allocates only when a socket
//! falls behind and its queued frames keep the arena's memory.

use bytes::{BufMut, BytesMut};
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

/// Bytes the arena asks for when it needs memory: a turn's frames (a media frame is
/// ~330 bytes for 20 ms of audio, ~1.2 KiB for 100 ms, and its mark) fit. It stays
/// resident per call (4 KiB cost 3.4 KiB per call in `bench_relay`); a larger frame grows
/// it.
const ARENA_BYTES: usize = 2048;

/// Where a call builds its outgoing audio frames.
#[derive(Debug, Default)]
pub struct FrameArena {
    buf: BytesMut,
}

impl FrameArena {
    /// A text frame of `parts` joined.
    pub fn text(&mut self, parts: &[&str]) -> Message {
        let len = parts.iter().map(|p| p.len()).sum();
        if self.buf.capacity() < len {
            self.buf.reserve(len.max(ARENA_BYTES));
        }
        for p in parts {
            self.buf.put_slice(p.as_bytes());
        }
        let bytes = self.buf.split().freeze();
        // Joined from `&str`s: valid UTF-8 by construction.
        Message::Text(Utf8Bytes::try_from(bytes).expect("joined from str"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_reuse_the_arena_once_written() {
        let mut a = FrameArena::default();
        let first = a.text(&["{\"a\":", "1}"]);
        assert_eq!(first.to_text().ok(), Some("{\"a\":1}"));
        let Message::Text(t) = &first else {
            panic!("text")
        };
        let at = t.as_str().as_ptr();
        drop(first);
        // Enough frames to exhaust the arena: with every earlier one dropped, the memory
        // is taken back rather than allocated anew.
        let mut back = false;
        for _ in 0..ARENA_BYTES {
            let m = a.text(&["0123456789"]);
            let Message::Text(t) = &m else { panic!("text") };
            back |= t.as_str().as_ptr() == at;
        }
        assert!(back, "the arena's first bytes were reused");
    }

    #[test]
    fn a_frame_larger_than_the_arena_still_comes_whole() {
        let mut a = FrameArena::default();
        let big = "x".repeat(3 * ARENA_BYTES);
        let m = a.text(&["[", &big, "]"]);
        assert_eq!(m.len(), big.len() + 2);
    }
}

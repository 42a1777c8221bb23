//! What one call counts, for its end-of-call log line. (The process-wide figures are in
//! [`crate::metrics`]; the call loop bumps both.)

/// Consecutive read errors from Twilio before the stream counts as gone.
pub const MAX_READ_ERRORS: u32 = 3;

/// One call's counts.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Counters {
    /// Caller frames sent to the model.
    pub frames_in: u64,
    /// Assistant frames sent to Twilio.
    pub frames_out: u64,
    /// Caller frames dropped.
    pub dropped_in: u64,
    /// Assistant frames dropped.
    pub dropped_out: u64,
    /// Times the caller cut the assistant off.
    pub barge_ins: u64,
    read_errors: u32,
    first_audio_sent: bool,
}

impl Counters {
    /// A read from Twilio failed: whether that was one too many in a row.
    pub fn read_failed(&mut self) -> bool {
        self.read_errors += 1;
        self.read_errors >= MAX_READ_ERRORS
    }

    /// A read from Twilio worked.
    pub fn read_ok(&mut self) {
        self.read_errors = 0;
    }

    /// Assistant audio went to Twilio: whether it was the first.
    pub fn first_audio(&mut self) -> bool {
        !std::mem::replace(&mut self.first_audio_sent, true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_errors_count_in_a_row_and_first_audio_once() {
        let mut c = Counters::default();
        assert!(!c.read_failed());
        assert!(!c.read_failed());
        c.read_ok();
        assert!(!c.read_failed());
        assert!(!c.read_failed());
        assert!(c.read_failed());
        assert!(c.first_audio());
        assert!(!c.first_audio());
    }
}

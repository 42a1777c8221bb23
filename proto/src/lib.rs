//! The callbridge gRPC contract: package `callbridge.v1`.
//!
//! The `.proto` source is `proto/proto/callbridge/v1/callbridge.proto`; it is compiled at
//! build time (protox + tonic-prost-build), so there is no generated code to drift.

pub mod codec;
pub mod paths;

/// Generated types, clients and servers of `callbridge.v1`.
#[allow(
    missing_docs,
    unreachable_pub,
    clippy::all,
    clippy::pedantic,
    clippy::unwrap_used
)]
pub mod pb {
    tonic::include_proto!("callbridge.v1");
}

/// The input transcription model an agent asks the Realtime API for when its
/// `input_transcription_model` is empty (control's agents and the relay's standalone
/// agent alike). Without transcription the API sends no caller text: no caller lines in
/// stored transcripts, and none in the conversation replayed into a new model session.
pub const DEFAULT_INPUT_TRANSCRIPTION_MODEL: &str = "gpt-4o-mini-transcribe";

/// The `input_transcription_model` value that turns input transcription off.
pub const INPUT_TRANSCRIPTION_OFF: &str = "none";

/// Longest greeting, in characters: the exact words the agent says first (about 30 s of
/// speech).
pub const MAX_GREETING_CHARS: usize = 500;

/// The transcription model an agent's `input_transcription_model` setting asks for:
/// empty means [`DEFAULT_INPUT_TRANSCRIPTION_MODEL`], [`INPUT_TRANSCRIPTION_OFF`] means
/// none.
pub fn input_transcription_model(setting: &str) -> Option<&str> {
    match setting {
        "" => Some(DEFAULT_INPUT_TRANSCRIPTION_MODEL),
        INPUT_TRANSCRIPTION_OFF => None,
        model => Some(model),
    }
}

/// Why `greeting` cannot be spoken as written, if it cannot: longer than
/// [`MAX_GREETING_CHARS`], or a control character (a line break included: it is one
/// utterance).
pub fn greeting_problem(greeting: &str) -> Option<String> {
    let chars = greeting.chars().count();
    if chars > MAX_GREETING_CHARS {
        return Some(format!(
            "is {chars} characters, at most {MAX_GREETING_CHARS} allowed"
        ));
    }
    greeting
        .chars()
        .find(|c| c.is_control())
        .map(|c| format!("contains the control character U+{:04X}", u32::from(c)))
}

/// Encoded `FileDescriptorSet` of the contract, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/callbridge_descriptor.bin"));

/// Path of the `.proto` file inside this crate, for clients in other languages.
pub const PROTO_PATH: &str = "proto/callbridge/v1/callbridge.proto";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transcription_is_on_unless_turned_off_and_greetings_are_words() {
        assert_eq!(
            input_transcription_model(""),
            Some(DEFAULT_INPUT_TRANSCRIPTION_MODEL)
        );
        assert_eq!(input_transcription_model("none"), None);
        assert_eq!(input_transcription_model("whisper-1"), Some("whisper-1"));
        assert_eq!(greeting_problem("Hello, thanks for calling."), None);
        assert!(greeting_problem("Hello\nthere").is_some_and(|p| p.contains("U+000A")));
        assert!(greeting_problem(&"a".repeat(MAX_GREETING_CHARS + 1)).is_some());
        assert_eq!(greeting_problem(&"é".repeat(MAX_GREETING_CHARS)), None);
    }
}

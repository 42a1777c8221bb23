//! Twilio Media Streams wire format (`docs/protocols.md`, "Twilio Media Streams"): borrowed parsing
//! of what Twilio sends, and outgoing frames built straight into one `String` each.

use std::borrow::Cow;

use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tokio_tungstenite::WebSocketStream;
use warp::hyper::upgrade::Upgraded;

/// A string borrowed from the frame when it has no escapes (serde does not borrow a
/// `Cow` nested in an `Option`, but does inside this newtype).
#[derive(Debug, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Str<'a>(#[serde(borrow)] pub Cow<'a, str>);

impl std::ops::Deref for Str<'_> {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

/// The upgraded Twilio socket (upgraded by hand in `crate::http`, with buffers sized for
/// Twilio's frames).
pub type TwilioWs = WebSocketStream<TokioIo<Upgraded>>;

/// Twilio's call id (`CA…`), from the stream's `start`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallSid(String);

impl CallSid {
    /// `None` when empty (Twilio always sends one; a test client may not).
    pub fn new(s: impl Into<String>) -> Option<Self> {
        let s = s.into();
        (!s.is_empty()).then_some(Self(s))
    }

    /// The id.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for CallSid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Twilio's stream id (`MZ…`); only ids safe to write into JSON unescaped
/// ([`is_safe_id`]) are made into one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamSid(String);

impl StreamSid {
    /// `None` unless `s` is a safe id.
    pub fn new(s: impl Into<String>) -> Option<Self> {
        let s = s.into();
        is_safe_id(&s).then_some(Self(s))
    }

    /// The id.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The Twilio events the relay knows; every other name is [`Self::Other`]. A call
/// handles them in one exhaustive `match` (`call::twilio_side`), so an event added here
/// is a compile error until it is handled there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TwilioEventKind {
    /// Caller audio (the hot path).
    Media,
    /// A mark the relay sent came back: its audio was played.
    Mark,
    /// A key press.
    Dtmf,
    /// The stream starts: ids and custom parameters.
    Start,
    /// The stream ends (the caller hung up, or the call moved on).
    Stop,
    /// The socket is open (the first message).
    Connected,
    /// Any other name.
    Other,
}

impl TwilioEventKind {
    /// From the `event` field; no allocation.
    pub fn from_name(name: &str) -> Self {
        // Media is nearly all the traffic: compared first.
        match name {
            "media" => Self::Media,
            "mark" => Self::Mark,
            "dtmf" => Self::Dtmf,
            "start" => Self::Start,
            "stop" => Self::Stop,
            "connected" => Self::Connected,
            _ => Self::Other,
        }
    }
}

impl<'de> Deserialize<'de> for TwilioEventKind {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(NameVisitor(Self::from_name))
    }
}

/// Reads an event name and maps it, without allocating (borrowed or transient `&str`).
pub(crate) struct NameVisitor<T>(pub(crate) fn(&str) -> T);

impl<T> serde::de::Visitor<'_> for NameVisitor<T> {
    type Value = T;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("an event name")
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<T, E> {
        Ok((self.0)(v))
    }
}

/// One message from Twilio. Only the fields routing needs are read; strings borrow from
/// the frame (the `Cow` only allocates if Twilio ever escapes a character).
#[derive(Debug, Deserialize)]
pub struct Inbound<'a> {
    /// `connected`, `start`, `media`, `mark`, `dtmf`, `stop`.
    pub event: TwilioEventKind,
    /// Top-level stream id (absent on `connected`).
    #[serde(borrow, default, rename = "streamSid")]
    pub stream_sid: Option<Str<'a>>,
    /// `start` body.
    #[serde(borrow, default)]
    pub start: Option<Start<'a>>,
    /// `media` body.
    #[serde(borrow, default)]
    pub media: Option<Media<'a>>,
    /// `mark` body.
    #[serde(borrow, default)]
    pub mark: Option<Mark<'a>>,
    /// `dtmf` body.
    #[serde(borrow, default)]
    pub dtmf: Option<Dtmf<'a>>,
}

/// `start` body.
#[derive(Debug, Deserialize)]
pub struct Start<'a> {
    /// `MZ…`
    #[serde(borrow, rename = "streamSid")]
    pub stream_sid: Cow<'a, str>,
    /// `CA…`
    #[serde(borrow, default, rename = "callSid")]
    pub call_sid: Cow<'a, str>,
    /// `<Parameter>` values.
    #[serde(default, rename = "customParameters")]
    pub custom_parameters: Option<std::collections::HashMap<String, String>>,
}

/// `media` body.
#[derive(Debug, Deserialize)]
pub struct Media<'a> {
    /// Base64 μ-law, passed through untouched.
    #[serde(borrow)]
    pub payload: Cow<'a, str>,
}

/// `mark` body.
#[derive(Debug, Deserialize)]
pub struct Mark<'a> {
    /// The name the relay gave the mark.
    #[serde(borrow)]
    pub name: Cow<'a, str>,
}

/// `dtmf` body.
#[derive(Debug, Deserialize)]
pub struct Dtmf<'a> {
    /// The key pressed.
    #[serde(borrow)]
    pub digit: Cow<'a, str>,
}

/// Parses one text frame.
pub fn parse(text: &str) -> Result<Inbound<'_>, serde_json::Error> {
    serde_json::from_str(text)
}

/// Cheap base64 check (length and alphabet, padding only at the end); no decoding.
pub fn is_base64(s: &str) -> bool {
    let b = s.as_bytes();
    if b.is_empty() || !b.len().is_multiple_of(4) {
        return false;
    }
    let pad = b.iter().rev().take_while(|&&c| c == b'=').count();
    if pad > 2 {
        return false;
    }
    b[..b.len() - pad]
        .iter()
        .all(|&c| c.is_ascii_alphanumeric() || c == b'+' || c == b'/')
}

/// Decoded byte length of a valid base64 string: `len*3/4 − padding`.
pub fn decoded_len(s: &str) -> usize {
    let pad = s.bytes().rev().take_while(|&c| c == b'=').take(2).count();
    (s.len() / 4) * 3 - pad
}

/// Whether a stream id is safe to write into JSON unescaped (Twilio's are `MZ` + hex).
pub fn is_safe_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-')
}

/// `{"event":"media","streamSid":…,"media":{"payload":…}}` in parts, to be joined where
/// the frame is built ([`crate::call::frame_arena`]). `payload` must be valid base64 and
/// `sid` a safe id (both checked by the caller), so no escaping is needed.
pub fn media_parts<'a>(sid: &'a str, payload: &'a str) -> [&'a str; 5] {
    [
        r#"{"event":"media","streamSid":""#,
        sid,
        r#"","media":{"payload":""#,
        payload,
        r#""}}"#,
    ]
}

/// `{"event":"mark","streamSid":…,"mark":{"name":…}}` in parts, when `name` needs no JSON
/// escaping (the relay's own names, unless a model item id has quotes or controls).
pub fn mark_parts<'a>(sid: &'a str, name: &'a str) -> Option<[&'a str; 5]> {
    let plain = name.bytes().all(|c| c >= 0x20 && c != b'"' && c != b'\\');
    plain.then_some([
        r#"{"event":"mark","streamSid":""#,
        sid,
        r#"","mark":{"name":""#,
        name,
        r#""}}"#,
    ])
}

/// `{"event":"mark","streamSid":…,"mark":{"name":…}}`; the name is JSON-escaped.
pub fn mark_frame(sid: &str, name: &str) -> String {
    const A: &str = r#"{"event":"mark","streamSid":""#;
    const B: &str = r#"","mark":{"name":"#;
    let mut s = String::with_capacity(A.len() + sid.len() + B.len() + name.len() + 4);
    s.push_str(A);
    s.push_str(sid);
    s.push_str(B);
    push_json_str(&mut s, name);
    s.push_str("}}");
    s
}

/// `{"event":"clear","streamSid":…}`.
pub fn clear_frame(sid: &str) -> String {
    format!(r#"{{"event":"clear","streamSid":"{sid}"}}"#)
}

/// Appends `v` as a JSON string literal (with quotes).
pub fn push_json_str(out: &mut String, v: &str) {
    if v.bytes().all(|c| c >= 0x20 && c != b'"' && c != b'\\') {
        out.push('"');
        out.push_str(v);
        out.push('"');
    } else {
        // Rare: fall back to serde_json's escaping.
        out.push_str(&serde_json::Value::from(v).to_string());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_documented_samples() {
        let start = r#"{"event":"start","sequenceNumber":"1","start":{"accountSid":"AC1","streamSid":"MZ1","callSid":"CA1","tracks":["inbound"],"mediaFormat":{"encoding":"audio/x-mulaw","sampleRate":8000,"channels":1},"customParameters":{"callId":"call_1"}},"streamSid":"MZ1"}"#;
        let m = parse(start).unwrap();
        assert_eq!(m.event, TwilioEventKind::Start);
        let s = m.start.unwrap();
        assert_eq!(s.stream_sid, "MZ1");
        assert_eq!(s.call_sid, "CA1");
        assert_eq!(s.custom_parameters.unwrap()["callId"], "call_1");

        let media = r#"{"event":"media","sequenceNumber":"4","media":{"track":"inbound","chunk":"2","timestamp":"5","payload":"no+JhoaJjpzS"},"streamSid":"MZ1"}"#;
        let m = parse(media).unwrap();
        assert!(matches!(
            m.media.as_ref().unwrap().payload,
            Cow::Borrowed("no+JhoaJjpzS")
        ));

        let mark = r#"{"event":"mark","sequenceNumber":"4","streamSid":"MZ1","mark":{"name":"g0:20:item_1"}}"#;
        assert_eq!(parse(mark).unwrap().mark.unwrap().name, "g0:20:item_1");
        let dtmf = r#"{"event":"dtmf","streamSid":"MZ1","sequenceNumber":"5","dtmf":{"track":"inbound_track","digit":"1"}}"#;
        assert_eq!(parse(dtmf).unwrap().dtmf.unwrap().digit, "1");
        let connected = r#"{"event":"connected","protocol":"Call","version":"1.0.0"}"#;
        assert_eq!(parse(connected).unwrap().event, TwilioEventKind::Connected);
        let other = r#"{"event":"future_event","streamSid":"MZ1"}"#;
        assert_eq!(parse(other).unwrap().event, TwilioEventKind::Other);
        assert!(parse(r#"{"event":7}"#).is_err());
        assert!(parse("not json").is_err());
        assert!(parse(r#"{"no_event":1}"#).is_err());
    }

    #[test]
    fn base64_check_and_length() {
        assert!(is_base64("no+JhoaJjpzS"));
        assert!(is_base64("QQ=="));
        assert!(is_base64("QUI="));
        assert!(!is_base64(""));
        assert!(!is_base64("QQ="));
        assert!(!is_base64("Q==="));
        assert!(!is_base64("QQ\"="));
        assert!(!is_base64("Q=QQ"));
        assert_eq!(decoded_len("QQ=="), 1);
        assert_eq!(decoded_len("QUI="), 2);
        assert_eq!(decoded_len("QUJD"), 3);
        // 160 bytes of μ-law is 216 base64 chars.
        assert_eq!(decoded_len(&"A".repeat(216)), 162);
        assert_eq!(decoded_len(&format!("{}==", "A".repeat(214))), 160);
    }

    #[test]
    fn frames_are_valid_json() {
        let v: serde_json::Value =
            serde_json::from_str(&media_parts("MZ1", "QUJD").concat()).unwrap();
        assert_eq!(v["event"], "media");
        assert_eq!(v["streamSid"], "MZ1");
        assert_eq!(v["media"]["payload"], "QUJD");
        assert_eq!(v.as_object().unwrap().len(), 3);
        let v: serde_json::Value =
            serde_json::from_str(&mark_frame("MZ1", "g1:20:it\"em")).unwrap();
        assert_eq!(v["mark"]["name"], "g1:20:it\"em");
        // The fast path joins parts only for names that need no escaping.
        assert!(mark_parts("MZ1", "g1:20:it\"em").is_none());
        let plain = mark_parts("MZ1", "g1:20:item_1").expect("plain").concat();
        assert_eq!(plain, mark_frame("MZ1", "g1:20:item_1"));
        let v: serde_json::Value = serde_json::from_str(&plain).unwrap();
        assert_eq!(v["mark"]["name"], "g1:20:item_1");
        let v: serde_json::Value = serde_json::from_str(&clear_frame("MZ1")).unwrap();
        assert_eq!(v["event"], "clear");
        assert!(is_safe_id("MZ0123abc"));
        assert!(!is_safe_id("MZ\"x"));
        assert!(StreamSid::new("MZ\"x").is_none());
        assert_eq!(StreamSid::new("MZ1").unwrap().as_str(), "MZ1");
        assert!(CallSid::new("").is_none());
    }
}

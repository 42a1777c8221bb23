//! The relay's public URL paths, built in one place: the relay serves them (warp routes),
//! checks Twilio signatures against them and writes them into TwiML; control hands them
//! out from `CreateCall` (`webhook_url`, `stream_url`). A path changed here changes for
//! both binaries at once.
//!
//! | path | what |
//! |---|---|
//! | `POST /api/twilio/voice[?callId=]` | voice webhook |
//! | `POST /api/twilio/after/{callId}?stream=&after=` | `<Connect action>`: what comes after the stream |
//! | `POST /api/twilio/after-simple?stream=&leg=` | `<Connect action>` of a standalone stream (no control) |
//! | `POST /api/twilio/status[?callId=]` | Twilio status and async AMD callbacks |
//! | `POST /api/twilio/fallback` | the number's fallback URL: an apology TwiML from relay config |
//! | `WS /api/twilio/media-stream/{callId}` | control-backed media stream |
//! | `WS /api/twilio/media-stream-simple` | standalone media stream |
//!
//! `base` is the relay's public URL (`RELAY_PUBLIC_URL`, `https://…`, no trailing slash);
//! stream URLs take its WebSocket form, [`ws_base`].

/// The segments every Twilio-facing route sits under: `/api/twilio/…`.
pub const PREFIX: [&str; 2] = ["api", "twilio"];
/// Last segment of the voice webhook.
pub const VOICE: &str = "voice";
/// Segment of the `<Connect action>` route, followed by the call id.
pub const AFTER: &str = "after";
/// Last segment of the `<Connect action>` route of standalone streams.
pub const AFTER_SIMPLE: &str = "after-simple";
/// Segment of the control-backed media stream, followed by the call id.
pub const MEDIA_STREAM: &str = "media-stream";
/// Last segment of the standalone media stream.
pub const MEDIA_STREAM_SIMPLE: &str = "media-stream-simple";
/// Last segment of the status-callback route.
pub const STATUS: &str = "status";
/// Last segment of the fallback route (the phone number's fallback URL).
pub const FALLBACK: &str = "fallback";
/// Query parameter of the voice webhook naming a call created beforehand (`CreateCall`).
pub const CALL_ID_PARAM: &str = "callId";

fn join(base: &str, segment: &str, call_id: Option<&str>) -> String {
    let [api, twilio] = PREFIX;
    match call_id {
        Some(id) => format!("{base}/{api}/{twilio}/{segment}/{id}"),
        None => format!("{base}/{api}/{twilio}/{segment}"),
    }
}

/// The WebSocket form of a public URL: `https` → `wss`, `http` → `ws`, anything else as is.
pub fn ws_base(public_url: &str) -> String {
    if let Some(rest) = public_url.strip_prefix("https://") {
        format!("wss://{rest}")
    } else if let Some(rest) = public_url.strip_prefix("http://") {
        format!("ws://{rest}")
    } else {
        public_url.to_owned()
    }
}

/// The voice webhook, with `?callId=` for a call created beforehand.
pub fn voice_webhook(base: &str, call_id: Option<&str>) -> String {
    let url = join(base, VOICE, None);
    match call_id {
        Some(id) => {
            let id: String = form_urlencoded::byte_serialize(id.as_bytes()).collect();
            format!("{url}?{CALL_ID_PARAM}={id}")
        }
        None => url,
    }
}

/// The status (and async AMD) callback URL, with `?callId=` for a call control dialled.
pub fn status_callback(base: &str, call_id: Option<&str>) -> String {
    let url = join(base, STATUS, None);
    match call_id {
        Some(id) => {
            let id: String = form_urlencoded::byte_serialize(id.as_bytes()).collect();
            format!("{url}?{CALL_ID_PARAM}={id}")
        }
        None => url,
    }
}

/// Query parameter of the `<Connect action>` URL naming the stream (its credential id)
/// whose action it is.
pub const AFTER_STREAM_PARAM: &str = "stream";
/// Query parameter of the `<Connect action>` URL naming the stream that stream followed
/// (absent for a call's first stream).
pub const AFTER_PREVIOUS_PARAM: &str = "after";

/// The `<Connect action>` path of a call, without the query that names its stream.
pub fn after(base: &str, call_id: &str) -> String {
    join(base, AFTER, Some(call_id))
}

/// The `<Connect action>` URL of one stream of a call: `?stream={stream}[&after={after}]`.
pub fn after_stream(base: &str, call_id: &str, stream: &str, after: Option<&str>) -> String {
    let mut query = form_urlencoded::Serializer::new(String::new());
    query.append_pair(AFTER_STREAM_PARAM, stream);
    if let Some(after) = after {
        query.append_pair(AFTER_PREVIOUS_PARAM, after);
    }
    format!("{}?{}", self::after(base, call_id), query.finish())
}

/// Query parameter of the standalone `<Connect action>` URL counting the call's streams
/// (1 for the voice webhook's): fresh streams after a lost one stop at a bound.
pub const AFTER_LEG_PARAM: &str = "leg";

/// The standalone `<Connect action>` path, without its query.
pub fn after_simple_path(base: &str) -> String {
    join(base, AFTER_SIMPLE, None)
}

/// The `<Connect action>` URL of a standalone stream: `?stream={stream}&leg={leg}`, the
/// stream's credential id and which stream of the call it is. Twilio signs the whole URL,
/// so neither can be changed.
pub fn after_simple(base: &str, stream: &str, leg: u32) -> String {
    let query = form_urlencoded::Serializer::new(String::new())
        .append_pair(AFTER_STREAM_PARAM, stream)
        .append_pair(AFTER_LEG_PARAM, &leg.to_string())
        .finish();
    format!("{}?{query}", after_simple_path(base))
}

/// The fallback URL to set on the phone number (Twilio asks it when the voice webhook
/// fails).
pub fn fallback(base: &str) -> String {
    join(base, FALLBACK, None)
}

/// The media stream URL of a control-backed call; `ws_base` is the [`ws_base`] form.
pub fn media_stream(ws_base: &str, call_id: &str) -> String {
    join(ws_base, MEDIA_STREAM, Some(call_id))
}

/// The standalone media stream URL; `ws_base` is the [`ws_base`] form.
pub fn media_stream_simple(ws_base: &str) -> String {
    join(ws_base, MEDIA_STREAM_SIMPLE, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let base = "https://relay.example.com";
        assert_eq!(
            voice_webhook(base, None),
            "https://relay.example.com/api/twilio/voice"
        );
        assert_eq!(
            voice_webhook(base, Some("call_1")),
            "https://relay.example.com/api/twilio/voice?callId=call_1"
        );
        assert_eq!(
            voice_webhook(base, Some("a b&c")),
            "https://relay.example.com/api/twilio/voice?callId=a+b%26c"
        );
        assert_eq!(
            after(base, "call_1"),
            "https://relay.example.com/api/twilio/after/call_1"
        );
        assert_eq!(
            after_simple(base, "0a0b", 2),
            "https://relay.example.com/api/twilio/after-simple?stream=0a0b&leg=2"
        );
        assert_eq!(
            fallback(base),
            "https://relay.example.com/api/twilio/fallback"
        );
        let ws = ws_base(base);
        assert_eq!(ws, "wss://relay.example.com");
        assert_eq!(
            media_stream(&ws, "call_1"),
            "wss://relay.example.com/api/twilio/media-stream/call_1"
        );
        assert_eq!(
            media_stream_simple(&ws),
            "wss://relay.example.com/api/twilio/media-stream-simple"
        );
    }

    #[test]
    fn ws_bases() {
        assert_eq!(ws_base("http://127.0.0.1:8080"), "ws://127.0.0.1:8080");
        assert_eq!(ws_base("https://r.example:8443"), "wss://r.example:8443");
        assert_eq!(ws_base("wss://r.example"), "wss://r.example");
    }
}

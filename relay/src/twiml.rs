//! TwiML documents the relay answers with. Hand-written XML; every interpolated value is
//! escaped.

use callbridge_proto::pb;

/// Content type of every TwiML answer.
pub const CONTENT_TYPE: &str = "application/xml";

const HEADER: &str = r#"<?xml version="1.0" encoding="UTF-8"?>"#;
/// Said when an agent has no fallback and the model could not be reached.
pub const DEFAULT_APOLOGY: &str =
    "Sorry, our assistant is not available right now. Please call again later.";

/// Escapes text for XML content and attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            // Control characters other than whitespace are not allowed in XML 1.0.
            c if c.is_control() && !matches!(c, '\n' | '\r' | '\t') => {}
            c => out.push(c),
        }
    }
    out
}

fn doc(body: &str) -> String {
    format!("{HEADER}<Response>{body}</Response>")
}

/// `<Connect action><Stream url><Parameter callId/></Stream></Connect>` for a control-backed call.
pub fn connect_stream(public_url: &str, public_ws_base: &str, call_id: &str) -> String {
    let id = escape(call_id);
    let action = escape(&format!("{public_url}/api/twilio/after/{call_id}"));
    let url = escape(&format!(
        "{public_ws_base}/api/twilio/media-stream/{call_id}"
    ));
    doc(&format!(
        r#"<Connect action="{action}" method="POST"><Stream url="{url}"><Parameter name="callId" value="{id}"/></Stream></Connect>"#
    ))
}

/// `<Connect><Stream>` to the standalone stream (no control, nothing to do afterwards).
pub fn connect_simple(public_ws_base: &str) -> String {
    let url = escape(&format!("{public_ws_base}/api/twilio/media-stream-simple"));
    doc(&format!(r#"<Connect><Stream url="{url}"/></Connect>"#))
}

fn say(s: &pb::Say) -> String {
    let mut attrs = String::new();
    if !s.voice.is_empty() {
        attrs.push_str(&format!(r#" voice="{}""#, escape(&s.voice)));
    }
    if !s.language.is_empty() {
        attrs.push_str(&format!(r#" language="{}""#, escape(&s.language)));
    }
    format!("<Say{attrs}>{}</Say>", escape(&s.text))
}

fn say_text(text: &str) -> String {
    format!("<Say>{}</Say>", escape(text))
}

/// `<Say>` then `<Hangup/>`.
pub fn say_and_hangup(text: &str) -> String {
    doc(&format!("{}<Hangup/>", say_text(text)))
}

/// Just `<Hangup/>`.
pub fn hangup() -> String {
    doc("<Hangup/>")
}

/// `<Dial>` a number.
pub fn dial(number: &str) -> String {
    doc(&format!("<Dial>{}</Dial>", escape(number)))
}

/// The agent's fallback (say then hang up; dial; conference), or the default apology.
pub fn fallback(f: Option<&pb::Fallback>) -> String {
    use pb::fallback::Action;
    let Some(f) = f else {
        return say_and_hangup(DEFAULT_APOLOGY);
    };
    let preamble = if f.preamble.is_empty() {
        String::new()
    } else {
        say_text(&f.preamble)
    };
    match &f.action {
        Some(Action::Say(s)) => doc(&format!("{preamble}{}<Hangup/>", say(s))),
        Some(Action::DialNumber(n)) => doc(&format!("{preamble}<Dial>{}</Dial>", escape(n))),
        Some(Action::ConferenceRoom(room)) => doc(&format!(
            "{preamble}<Dial><Conference>{}</Conference></Dial>",
            escape(room)
        )),
        None if !f.preamble.is_empty() => doc(&format!("{preamble}<Hangup/>")),
        None => say_and_hangup(DEFAULT_APOLOGY),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_stream_has_action_stream_and_parameter() {
        let x = connect_stream("https://r.example.com", "wss://r.example.com", "call_1");
        assert_eq!(
            x,
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Response><Connect action=\"https://r.example.com/api/twilio/after/call_1\" method=\"POST\"><Stream url=\"wss://r.example.com/api/twilio/media-stream/call_1\"><Parameter name=\"callId\" value=\"call_1\"/></Stream></Connect></Response>"
        );
    }

    #[test]
    fn values_are_escaped() {
        let x = connect_stream("https://r", "wss://r", "a&b\"<c>");
        assert!(x.contains("value=\"a&amp;b&quot;&lt;c&gt;\""), "{x}");
        assert!(!x.contains("a&b"));
        let s = say_and_hangup("Tom & Jerry's <show>");
        assert!(s.contains("<Say>Tom &amp; Jerry&apos;s &lt;show&gt;</Say><Hangup/>"));
    }

    #[test]
    fn fallbacks() {
        use pb::fallback::Action;
        assert!(fallback(None).contains(&escape(DEFAULT_APOLOGY)));
        let f = pb::Fallback {
            action: Some(Action::Say(pb::Say {
                text: "Bye".into(),
                voice: "Polly.Joanna".into(),
                language: "en-US".into(),
            })),
            preamble: String::new(),
        };
        assert!(fallback(Some(&f)).ends_with(
            "<Response><Say voice=\"Polly.Joanna\" language=\"en-US\">Bye</Say><Hangup/></Response>"
        ));
        let f = pb::Fallback {
            action: Some(Action::DialNumber("+15550001".into())),
            preamble: "Connecting you".into(),
        };
        assert!(
            fallback(Some(&f))
                .ends_with("<Say>Connecting you</Say><Dial>+15550001</Dial></Response>")
        );
        let f = pb::Fallback {
            action: Some(Action::ConferenceRoom("room-1".into())),
            preamble: String::new(),
        };
        assert!(
            fallback(Some(&f))
                .ends_with("<Response><Dial><Conference>room-1</Conference></Dial></Response>")
        );
    }

    #[test]
    fn simple_and_dial() {
        assert!(
            connect_simple("ws://127.0.0.1:1")
                .contains("<Stream url=\"ws://127.0.0.1:1/api/twilio/media-stream-simple\"/>")
        );
        assert!(dial("+1").contains("<Dial>+1</Dial>"));
        assert!(hangup().ends_with("<Response><Hangup/></Response>"));
    }
}

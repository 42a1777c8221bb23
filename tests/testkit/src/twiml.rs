//! A tiny TwiML reader: enough of XML to find the verbs the relay answers with.
//!
//! Hand-written on purpose: it shares no code with the relay's writer (quick-xml), so a
//! strict reader here catches malformed output (unbalanced tags, unescaped attribute
//! values) that Twilio would reject.

/// What a TwiML document asks Twilio to do.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Twiml {
    /// `<Connect action=…>`.
    pub connect_action: Option<String>,
    /// `<Stream url=…>`.
    pub stream_url: Option<String>,
    /// `<Parameter name value>` pairs inside `<Stream>`.
    pub parameters: Vec<(String, String)>,
    /// Texts of `<Say>` verbs, in order.
    pub says: Vec<String>,
    /// URLs of `<Play>` verbs, in order.
    pub plays: Vec<String>,
    /// `<Dial>`: its number (text, or a `<Number>` child).
    pub dial_number: Option<String>,
    /// `<Dial><Conference>` room.
    pub conference: Option<String>,
    /// `<Hangup/>` present.
    pub hangup: bool,
    /// Element names in document order (for assertions on structure).
    pub elements: Vec<String>,
}

/// Why a document could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TwimlError {
    #[error("malformed TwiML: {0}")]
    Malformed(String),
    #[error("TwiML root element is not <Response>")]
    NoResponse,
}

impl Twiml {
    /// The value of `<Parameter name>` inside `<Stream>`, if written.
    pub fn parameter(&self, name: &str) -> Option<&str> {
        self.parameters
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Parses a TwiML document.
    pub fn parse(xml: &str) -> Result<Self, TwimlError> {
        let mut out = Twiml::default();
        let mut stack: Vec<String> = Vec::new();
        let mut rest = xml;
        let mut text = String::new();
        while let Some(lt) = rest.find('<') {
            text.push_str(&rest[..lt]);
            rest = &rest[lt..];
            let gt = rest
                .find('>')
                .ok_or_else(|| TwimlError::Malformed("unterminated tag".into()))?;
            let tag = &rest[1..gt];
            rest = &rest[gt + 1..];
            if tag.starts_with('?') || tag.starts_with('!') {
                continue;
            }
            if let Some(name) = tag.strip_prefix('/') {
                let name = name.trim();
                let open = stack
                    .pop()
                    .ok_or_else(|| TwimlError::Malformed(format!("stray </{name}>")))?;
                if open != name {
                    return Err(TwimlError::Malformed(format!(
                        "<{open}> closed by </{name}>"
                    )));
                }
                let body = unescape(text.trim());
                text.clear();
                match name {
                    "Say" => out.says.push(body),
                    "Play" => out.plays.push(body),
                    "Number" => out.dial_number = Some(body),
                    "Conference" => out.conference = Some(body),
                    "Dial" if !body.is_empty() && out.dial_number.is_none() => {
                        out.dial_number = Some(body);
                    }
                    _ => {}
                }
                continue;
            }
            text.clear();
            let self_closing = tag.ends_with('/');
            let tag = tag.trim_end_matches('/');
            let (name, attrs) = split_tag(tag)?;
            if stack.is_empty() && name != "Response" {
                return Err(TwimlError::NoResponse);
            }
            out.elements.push(name.clone());
            match name.as_str() {
                "Connect" => out.connect_action = attr(&attrs, "action"),
                "Stream" => out.stream_url = attr(&attrs, "url"),
                "Parameter" => {
                    if let (Some(n), Some(v)) = (attr(&attrs, "name"), attr(&attrs, "value")) {
                        out.parameters.push((n, v));
                    }
                }
                "Hangup" => out.hangup = true,
                _ => {}
            }
            if !self_closing {
                stack.push(name);
            }
        }
        if let Some(open) = stack.pop() {
            return Err(TwimlError::Malformed(format!("<{open}> not closed")));
        }
        if out.elements.first().map(String::as_str) != Some("Response") {
            return Err(TwimlError::NoResponse);
        }
        Ok(out)
    }
}

fn attr(attrs: &[(String, String)], name: &str) -> Option<String> {
    attrs
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.clone())
}

fn split_tag(tag: &str) -> Result<(String, Vec<(String, String)>), TwimlError> {
    let tag = tag.trim();
    let name_end = tag.find(char::is_whitespace).unwrap_or(tag.len());
    let name = tag[..name_end].to_owned();
    if name.is_empty() {
        return Err(TwimlError::Malformed("empty tag".into()));
    }
    let mut attrs = Vec::new();
    let mut rest = tag[name_end..].trim_start();
    while !rest.is_empty() {
        let eq = rest
            .find('=')
            .ok_or_else(|| TwimlError::Malformed(format!("attribute without value in <{name}>")))?;
        let key = rest[..eq].trim().to_owned();
        let after = rest[eq + 1..].trim_start();
        let quote = after
            .chars()
            .next()
            .filter(|c| *c == '"' || *c == '\'')
            .ok_or_else(|| TwimlError::Malformed(format!("unquoted attribute {key}")))?;
        let close = after[1..]
            .find(quote)
            .ok_or_else(|| TwimlError::Malformed(format!("unterminated attribute {key}")))?;
        let raw = &after[1..1 + close];
        if raw.contains('<') || raw.contains('"') {
            return Err(TwimlError::Malformed(format!(
                "bad character in attribute {key}"
            )));
        }
        attrs.push((key, unescape(raw)));
        rest = after[close + 2..].trim_start();
    }
    Ok((name, attrs))
}

fn unescape(s: &str) -> String {
    s.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&apos;", "'")
        .replace("&amp;", "&")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_connect_stream_and_parameters() {
        let t = Twiml::parse(
            r#"<?xml version="1.0" encoding="UTF-8"?>
<Response>
  <Connect action="https://relay.example.com/api/twilio/after/call_1" method="POST">
    <Stream url="wss://relay.example.com/api/twilio/media-stream/call_1">
      <Parameter name="callId" value="call_1"/>
    </Stream>
  </Connect>
</Response>"#,
        )
        .expect("valid");
        assert_eq!(
            t.connect_action.as_deref(),
            Some("https://relay.example.com/api/twilio/after/call_1")
        );
        assert_eq!(
            t.stream_url.as_deref(),
            Some("wss://relay.example.com/api/twilio/media-stream/call_1")
        );
        assert_eq!(
            t.parameters,
            vec![("callId".to_owned(), "call_1".to_owned())]
        );
        assert!(!t.hangup);
    }

    #[test]
    fn reads_say_dial_hangup() {
        let t = Twiml::parse(
            "<Response><Say voice=\"Polly.Joanna\">Sorry &amp; bye</Say>\
             <Dial><Number>+15551234567</Number></Dial><Hangup/></Response>",
        )
        .expect("valid");
        assert_eq!(t.says, vec!["Sorry & bye".to_owned()]);
        assert_eq!(t.dial_number.as_deref(), Some("+15551234567"));
        assert!(t.hangup);
        let t = Twiml::parse("<Response><Dial>+15550001111</Dial></Response>").expect("valid");
        assert_eq!(t.dial_number.as_deref(), Some("+15550001111"));
    }

    #[test]
    fn rejects_malformed_documents() {
        assert!(Twiml::parse("<Response><Say>x</Response>").is_err());
        assert!(Twiml::parse("<Foo/>").is_err());
        assert!(Twiml::parse("<Response><Stream url=x/></Response>").is_err());
        assert!(Twiml::parse("<Response>").is_err());
    }
}

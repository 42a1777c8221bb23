//! TwiML documents the relay answers with, written with `quick-xml`'s writer, which
//! escapes every text and attribute value (attributes also keep `\t`, `\n` and `\r` as
//! character references, so a value survives attribute normalisation).
//!
//! The verbs and attributes used, and why, are in `docs/protocols.md`, "TwiML".

use std::borrow::Cow;
use std::io;

use callbridge_proto::{paths, pb};
use quick_xml::Writer;
use quick_xml::events::{BytesDecl, BytesText, Event};

use crate::call_id::CallId;
use crate::stream_credential::Minted;

/// Content type of every TwiML answer.
pub const CONTENT_TYPE: &str = "application/xml";

/// Said when an agent has no fallback and the model could not be reached.
pub const DEFAULT_APOLOGY: &str =
    "Sorry, our assistant is not available right now. Please call again later.";

type Xml = Writer<Vec<u8>>;

/// Drops control characters other than whitespace, and the noncharacters U+FFFE and
/// U+FFFF: XML 1.0 cannot carry them even as character references, and a greeting or
/// fallback text typed into an admin form may hold one. Escaping is the writer's job; this
/// is only about what XML can represent.
fn xml_chars(s: &str) -> Cow<'_, str> {
    let allowed = |c: char| {
        (!c.is_control() || matches!(c, '\n' | '\r' | '\t'))
            && !matches!(c, '\u{fffe}' | '\u{ffff}')
    };
    if s.chars().all(allowed) {
        Cow::Borrowed(s)
    } else {
        Cow::Owned(s.chars().filter(|&c| allowed(c)).collect())
    }
}

/// `<?xml …?><Response>` + what `body` writes + `</Response>`.
fn doc(body: impl FnOnce(&mut Xml) -> io::Result<()>) -> String {
    let mut w = Writer::new(Vec::with_capacity(256));
    w.write_event(Event::Decl(BytesDecl::new("1.0", Some("UTF-8"), None)))
        .and_then(|()| w.create_element("Response").write_inner_content(body))
        .expect("writing to a Vec cannot fail");
    String::from_utf8(w.into_inner()).expect("the writer emits the UTF-8 it is given")
}

/// `<name>text</name>`.
fn element_text(w: &mut Xml, name: &str, text: &str) -> io::Result<()> {
    w.create_element(name)
        .write_text_content(BytesText::new(&xml_chars(text)))
        .map(drop)
}

fn empty(w: &mut Xml, name: &str) -> io::Result<()> {
    w.create_element(name).write_empty().map(drop)
}

/// `<Parameter name value/>`.
fn parameter(w: &mut Xml, name: &str, value: &str) -> io::Result<()> {
    w.create_element("Parameter")
        .with_attribute(("name", name))
        .with_attribute(("value", &*xml_chars(value)))
        .write_empty()
        .map(drop)
}

/// `<Connect action><Stream url><Parameter callId/><Parameter credential/>[<Parameter
/// takesOver/>]</Stream></Connect>` for a control-backed call; `credential` is the stream's
/// (`crate::stream_credential`), `after` the stream it follows (a resumed stream).
///
/// The action URL names the stream and its predecessor (`?stream=…&after=…`): Twilio signs
/// the whole URL, so the names cannot be changed, and control resumes the call only for an
/// action request that speaks for the call's current stream (docs/resilience.md).
pub fn connect_stream(
    public_url: &str,
    public_ws_base: &str,
    call_id: &CallId,
    credential: &Minted,
    after: Option<&str>,
) -> String {
    let action = paths::after_stream(public_url, call_id.as_str(), &credential.id, after);
    let url = paths::media_stream(public_ws_base, call_id.as_str());
    doc(|w| {
        w.create_element("Connect")
            .with_attribute(("action", &*xml_chars(&action)))
            .with_attribute(("method", "POST"))
            .write_inner_content(|w| {
                w.create_element("Stream")
                    .with_attribute(("url", &*xml_chars(&url)))
                    .write_inner_content(|w| {
                        parameter(w, paths::CALL_ID_PARAM, call_id.as_str())?;
                        parameter(w, crate::stream_credential::PARAMETER, &credential.text)?;
                        if let Some(after) = after {
                            parameter(w, crate::stream_credential::TAKES_OVER_PARAMETER, after)?;
                        }
                        Ok(())
                    })
                    .map(drop)
            })
            .map(drop)
    })
}

/// `<Connect action><Stream><Parameter credential/></Stream></Connect>` to the standalone
/// stream: the call's `leg`th stream (1 for the voice webhook's). The action URL names the
/// stream (its credential id) and the leg, both signed by Twilio with the URL
/// ([`crate::standalone_after`]).
pub fn connect_simple(
    public_url: &str,
    public_ws_base: &str,
    credential: &Minted,
    leg: u32,
) -> String {
    let action = paths::after_simple(public_url, &credential.id, leg);
    let url = paths::media_stream_simple(public_ws_base);
    doc(|w| {
        w.create_element("Connect")
            .with_attribute(("action", &*xml_chars(&action)))
            .with_attribute(("method", "POST"))
            .write_inner_content(|w| {
                w.create_element("Stream")
                    .with_attribute(("url", &*xml_chars(&url)))
                    .write_inner_content(|w| {
                        parameter(w, crate::stream_credential::PARAMETER, &credential.text)
                    })
                    .map(drop)
            })
            .map(drop)
    })
}

/// `<Say voice language>` (attributes only when set).
fn say(w: &mut Xml, s: &pb::Say) -> io::Result<()> {
    let mut el = w.create_element("Say");
    if !s.voice.is_empty() {
        el = el.with_attribute(("voice", &*xml_chars(&s.voice)));
    }
    if !s.language.is_empty() {
        el = el.with_attribute(("language", &*xml_chars(&s.language)));
    }
    el.write_text_content(BytesText::new(&xml_chars(&s.text)))
        .map(drop)
}

/// `<Say>` then `<Hangup/>`.
pub fn say_and_hangup(text: &str) -> String {
    doc(|w| {
        element_text(w, "Say", text)?;
        empty(w, "Hangup")
    })
}

/// Just `<Hangup/>`.
pub fn hangup() -> String {
    doc(|w| empty(w, "Hangup"))
}

/// `<Dial>` a number.
pub fn dial(number: &str) -> String {
    doc(|w| element_text(w, "Dial", number))
}

/// The agent's voicemail, said (`<Say>`) or played (`<Play>`), then `<Hangup/>`. A spoken
/// one (left on the stream) or none: just the hang-up.
pub fn voicemail(v: &pb::Voicemail) -> String {
    use pb::voicemail::Message;
    doc(|w| {
        match &v.message {
            Some(Message::Say(s)) => say(w, s)?,
            Some(Message::PlayUrl(url)) => element_text(w, "Play", url)?,
            Some(Message::SpokenText(_)) | None => {}
        }
        empty(w, "Hangup")
    })
}

/// The agent's fallback (say then hang up; dial; conference), or the default apology.
pub fn fallback(f: Option<&pb::Fallback>) -> String {
    use pb::fallback::Action;
    let Some(f) = f else {
        return say_and_hangup(DEFAULT_APOLOGY);
    };
    if f.action.is_none() && f.preamble.is_empty() {
        return say_and_hangup(DEFAULT_APOLOGY);
    }
    doc(|w| {
        if !f.preamble.is_empty() {
            element_text(w, "Say", &f.preamble)?;
        }
        match &f.action {
            Some(Action::Say(s)) => {
                say(w, s)?;
                empty(w, "Hangup")
            }
            Some(Action::DialNumber(n)) => element_text(w, "Dial", n),
            Some(Action::ConferenceRoom(room)) => w
                .create_element("Dial")
                .write_inner_content(|w| element_text(w, "Conference", room))
                .map(drop),
            None => empty(w, "Hangup"),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use quick_xml::XmlVersion;
    use quick_xml::events::BytesStart;
    use quick_xml::reader::Reader;

    /// One element as a strict reader sees it: name, attribute values, text content.
    #[derive(Debug, Default)]
    struct Node {
        name: String,
        attrs: Vec<(String, String)>,
        text: String,
    }

    impl Node {
        fn attr(&self, key: &str) -> Option<&str> {
            self.attrs
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.as_str())
        }
    }

    fn node(e: &BytesStart<'_>) -> Node {
        let attrs = e
            .attributes()
            .map(|a| {
                let a = a.expect("well-formed attribute");
                let value = a
                    .normalized_value(XmlVersion::Explicit1_0)
                    .expect("attribute value unescapes");
                (a.key.as_ref().to_owned(), value.into_owned())
            })
            .collect();
        Node {
            name: e.name().as_ref().to_owned(),
            attrs,
            text: String::new(),
        }
    }

    /// Reads `xml` with quick-xml's reader (end names checked), in document order; panics
    /// on anything that is not well-formed.
    fn read(xml: &str) -> Vec<Node> {
        use quick_xml::events::Event;
        // XML 1.0's Char production, which the reader does not enforce.
        let legal = |c: char| {
            matches!(c, '\t' | '\n' | '\r' | '\u{20}'..='\u{d7ff}' | '\u{e000}'..='\u{fffd}')
                || c >= '\u{10000}'
        };
        assert!(
            xml.chars().all(legal),
            "character XML cannot carry: {xml:?}"
        );
        let mut reader = Reader::from_str(xml);
        let mut nodes: Vec<Node> = Vec::new();
        let mut open: Vec<usize> = Vec::new();
        loop {
            let event = reader
                .read_event()
                .unwrap_or_else(|e| panic!("not well-formed ({e}): {xml}"));
            let top = open.last().copied();
            match event {
                Event::Eof => break,
                Event::Decl(_) => {}
                Event::Start(e) => {
                    nodes.push(node(&e));
                    open.push(nodes.len() - 1);
                }
                Event::Empty(e) => nodes.push(node(&e)),
                Event::End(_) => {
                    open.pop().expect("balanced");
                }
                Event::Text(t) => {
                    let i = top.expect("text inside an element");
                    nodes[i].text.push_str(&t.xml10_content());
                }
                Event::GeneralRef(r) => {
                    let i = top.expect("reference inside an element");
                    let c = match r.resolve_char_ref().expect("valid character reference") {
                        Some(c) => c.to_string(),
                        None => {
                            let name: &str = &r;
                            quick_xml::escape::resolve_predefined_entity(name)
                                .unwrap_or_else(|| panic!("unknown entity &{name};"))
                                .to_owned()
                        }
                    };
                    nodes[i].text.push_str(&c);
                }
                other => panic!("unexpected {other:?} in {xml}"),
            }
        }
        assert!(open.is_empty(), "unclosed element in {xml}");
        assert_eq!(nodes.first().map(|n| n.name.as_str()), Some("Response"));
        nodes
    }

    fn find<'a>(nodes: &'a [Node], name: &str) -> &'a Node {
        nodes
            .iter()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("no <{name}> in {nodes:?}"))
    }

    #[test]
    fn connect_stream_has_action_stream_and_parameter() {
        let id = CallId::parse("call_1").expect("valid");
        let cred = Minted {
            text: "cred-1".into(),
            id: "0a".repeat(16),
        };
        let x = connect_stream(
            "https://r.example.com",
            "wss://r.example.com",
            &id,
            &cred,
            None,
        );
        assert_eq!(
            x,
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Response><Connect action=\"https://r.example.com/api/twilio/after/call_1?stream=0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a\" method=\"POST\"><Stream url=\"wss://r.example.com/api/twilio/media-stream/call_1\"><Parameter name=\"callId\" value=\"call_1\"/><Parameter name=\"credential\" value=\"cred-1\"/></Stream></Connect></Response>"
        );
        // A resumed stream: its predecessor in the action URL and as a parameter.
        let x = connect_stream(
            "https://r.example.com",
            "wss://r.example.com",
            &id,
            &cred,
            Some(&"0b".repeat(16)),
        );
        assert!(
            x.contains("after/call_1?stream=0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a&amp;after=0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b\""),
            "{x}"
        );
        assert!(
            x.contains("<Parameter name=\"takesOver\" value=\"0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b\"/></Stream>"),
            "{x}"
        );
    }

    #[test]
    fn values_are_escaped() {
        // (A call id cannot hold such characters: `CallId` refuses them where it enters.)
        let x = dial("a&b\"<c>");
        assert!(x.contains("<Dial>a&amp;b&quot;&lt;c&gt;</Dial>"), "{x}");
        assert!(!x.contains("a&b"));
        let s = say_and_hangup("Tom & Jerry's <show>");
        assert!(
            s.contains("<Say>Tom &amp; Jerry&apos;s &lt;show&gt;</Say><Hangup/>"),
            "{s}"
        );
    }

    #[test]
    fn control_characters_are_dropped() {
        let s = say_and_hangup("a\u{0}b\u{1b}c\u{7f}d\te");
        assert!(s.contains("<Say>abcd\te</Say>"), "{s}");
    }

    #[test]
    fn voicemails_are_said_or_played_then_hung_up() {
        use pb::voicemail::Message;
        let vm = |m| pb::Voicemail { message: Some(m) };
        let played = read(&voicemail(&vm(Message::PlayUrl(
            "https://a.test/vm.mp3?x=1&y=2".into(),
        ))));
        assert_eq!(find(&played, "Play").text, "https://a.test/vm.mp3?x=1&y=2");
        assert!(played.iter().any(|n| n.name == "Hangup"));
        let said = voicemail(&vm(Message::Say(pb::Say {
            text: "Call <us> back".into(),
            voice: "Polly.Joanna".into(),
            language: String::new(),
        })));
        assert!(said.ends_with(
            "<Response><Say voice=\"Polly.Joanna\">Call &lt;us&gt; back</Say><Hangup/></Response>"
        ));
        assert_eq!(voicemail(&vm(Message::SpokenText("Hi".into()))), hangup());
    }

    #[test]
    fn fallbacks() {
        use pb::fallback::Action;
        let apology = read(&fallback(None));
        assert_eq!(find(&apology, "Say").text, DEFAULT_APOLOGY);
        assert_eq!(fallback(Some(&pb::Fallback::default())), fallback(None));
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
        let f = pb::Fallback {
            action: None,
            preamble: "Goodbye".into(),
        };
        assert!(fallback(Some(&f)).ends_with("<Response><Say>Goodbye</Say><Hangup/></Response>"));
    }

    #[test]
    fn simple_and_dial() {
        let cred = Minted {
            text: "cred-2".into(),
            id: "0d".repeat(16),
        };
        assert_eq!(
            connect_simple("http://127.0.0.1:1", "ws://127.0.0.1:1", &cred, 2),
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Response><Connect action=\"http://127.0.0.1:1/api/twilio/after-simple?stream=0d0d0d0d0d0d0d0d0d0d0d0d0d0d0d0d&amp;leg=2\" method=\"POST\"><Stream url=\"ws://127.0.0.1:1/api/twilio/media-stream-simple\"><Parameter name=\"credential\" value=\"cred-2\"/></Stream></Connect></Response>"
        );
        assert!(dial("+1").contains("<Dial>+1</Dial>"));
        assert!(hangup().ends_with("<Response><Hangup/></Response>"));
    }

    /// Deterministic xorshift64*, so a failure reproduces (the seed is in the message).
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        /// A string mixing XML's special characters, whitespace, control characters,
        /// multi-byte text and arbitrary Unicode scalars.
        fn string(&mut self) -> String {
            const TRICKY: &[&str] = &[
                "&", "<", ">", "\"", "'", "&amp;", "]]>", "<!--", "-->", "<?xml", "\r\n", "\r",
                "\n", "\t", " ", "\u{0}", "\u{1}", "\u{1f}", "\u{7f}", "\u{85}", "é", "日本", "😀",
                "\u{feff}", "\u{fffe}", "\u{ffff}", "\u{2028}", "&#x26;", "%20", "+",
            ];
            let len = self.next() % 24;
            let mut s = String::new();
            for _ in 0..len {
                match self.next() % 3 {
                    0 => s.push_str(TRICKY[(self.next() % TRICKY.len() as u64) as usize]),
                    1 => s.push(char::from(b' ' + (self.next() % 95) as u8)),
                    _ => {
                        let c = char::from_u32((self.next() % 0x11_0000) as u32);
                        s.push(c.unwrap_or('\u{fffd}'));
                    }
                }
            }
            s
        }
    }

    /// What XML can carry of `s`: the text minus control characters other than whitespace.
    fn carried(s: &str) -> String {
        xml_chars(s).into_owned()
    }

    /// For arbitrary greeting, fallback and parameter text, every document is well-formed
    /// (a strict reader accepts it) and gives back exactly the text it was given.
    #[test]
    fn arbitrary_text_round_trips() {
        use pb::fallback::Action;
        let seed = 0x5eed_cafe_f00d_u64;
        let mut rng = Rng(seed);
        for case in 0..2_000 {
            let (a, b, c) = (rng.string(), rng.string(), rng.string());
            let ctx = format!("seed {seed:#x} case {case}: {a:?} {b:?} {c:?}");

            let nodes = read(&say_and_hangup(&a));
            assert_eq!(find(&nodes, "Say").text, carried(&a), "{ctx}");
            find(&nodes, "Hangup");

            // A call id made of what `a` holds that a call id may hold.
            let id: String = a
                .chars()
                .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
                .chain(std::iter::once('x'))
                .take(crate::call_id::MAX_LEN)
                .collect();
            let id = CallId::parse(id).expect("only allowed characters");
            let minted = Minted {
                text: b.clone(),
                id: "0c".repeat(16),
            };
            let nodes = read(&connect_stream(
                "https://r.example",
                "wss://r.example",
                &id,
                &minted,
                None,
            ));
            let param = find(&nodes, "Parameter");
            assert_eq!(param.attr("name"), Some("callId"), "{ctx}");
            assert_eq!(param.attr("value"), Some(id.as_str()), "{ctx}");
            let cred = nodes
                .iter()
                .find(|n| n.name == "Parameter" && n.attr("name") == Some("credential"))
                .expect("a credential parameter");
            assert_eq!(cred.attr("value"), Some(carried(&b).as_str()), "{ctx}");
            let action = format!(
                "https://r.example/api/twilio/after/{id}?stream={}",
                minted.id
            );
            assert_eq!(
                find(&nodes, "Connect").attr("action"),
                Some(action.as_str()),
                "{ctx}"
            );

            let f = pb::Fallback {
                action: Some(Action::Say(pb::Say {
                    text: a.clone(),
                    voice: b.clone(),
                    language: c.clone(),
                })),
                preamble: b.clone(),
            };
            let nodes = read(&fallback(Some(&f)));
            let says: Vec<&Node> = nodes.iter().filter(|n| n.name == "Say").collect();
            let said = says.last().expect("a <Say>");
            assert_eq!(said.text, carried(&a), "{ctx}");
            assert_eq!(
                said.attr("voice"),
                (!b.is_empty()).then(|| carried(&b)).as_deref(),
                "{ctx}"
            );
            assert_eq!(
                said.attr("language"),
                (!c.is_empty()).then(|| carried(&c)).as_deref(),
                "{ctx}"
            );
            if !b.is_empty() {
                assert_eq!(says[0].text, carried(&b), "{ctx}");
            }

            let f = pb::Fallback {
                action: Some(Action::ConferenceRoom(c.clone())),
                preamble: String::new(),
            };
            assert_eq!(
                find(&read(&fallback(Some(&f))), "Conference").text,
                carried(&c),
                "{ctx}"
            );
            assert_eq!(find(&read(&dial(&b)), "Dial").text, carried(&b), "{ctx}");
        }
    }
}

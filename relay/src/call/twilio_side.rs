//! The Twilio side of the call loop: one handler per Twilio event, chosen by an
//! exhaustive `match` on [`TwilioEventKind`].

use callbridge_proto::pb;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tracing::{debug, info, warn};

use super::turn_commit::Heard;
use super::{Call, GAP_FRAMES, HEADROOM, Read, TWILIO_MAX_ACCEPTED};
use crate::error::{EndKind, TwilioError};
use crate::realtime;
use crate::twilio::{self, CallSid, Inbound, StreamSid, TwilioEventKind};

impl Call {
    fn bad_twilio(&mut self, what: &str) {
        self.deps.metrics.bad_twilio().inc();
        debug!(what, "Bad message from Twilio.");
    }

    pub(super) fn on_twilio(&mut self, msg: Read, now: Instant) {
        let msg = match msg {
            None => return self.end(EndKind::CallerHangup, "caller socket closed"),
            Some(Err(e)) => {
                // Oversized or malformed frames surface here; a few in a row mean the
                // socket is gone.
                self.bad_twilio("read error");
                if self.counters.read_failed() {
                    let e = TwilioError::Read(e);
                    self.end(EndKind::TwilioReadFailed, e.to_string());
                }
                return;
            }
            Some(Ok(m)) => m,
        };
        self.counters.read_ok();
        self.deps.metrics.twilio_socket().messages_in.inc();
        let text = match &msg {
            Message::Text(text) => text.as_str(),
            Message::Close(_) => return self.end(EndKind::CallerHangup, "caller socket closed"),
            Message::Ping(_) | Message::Pong(_) => return,
            Message::Binary(_) | Message::Frame(_) => return self.bad_twilio("binary frame"),
        };
        if text.len() > TWILIO_MAX_ACCEPTED {
            return self.bad_twilio("oversized message");
        }
        let Ok(parsed) = twilio::parse(text) else {
            return self.bad_twilio("malformed JSON");
        };
        match parsed.event {
            TwilioEventKind::Media => self.on_media(parsed, now),
            TwilioEventKind::Mark => self.on_mark(parsed, now),
            TwilioEventKind::Dtmf => self.on_dtmf(parsed, now),
            TwilioEventKind::Start => self.on_start(parsed, now),
            TwilioEventKind::Stop => self.end(EndKind::CallerHangup, "Twilio stop"),
            TwilioEventKind::Connected => {}
            TwilioEventKind::Other => self.bad_twilio("unknown event"),
        }
    }

    /// Caller audio: checked and forwarded to the model as it came (base64 untouched).
    fn on_media(&mut self, parsed: Inbound<'_>, now: Instant) {
        let Some(sid) = &self.stream_sid else {
            return self.bad_twilio("media before start");
        };
        let Some(media) = parsed.media else {
            return self.bad_twilio("media without body");
        };
        if parsed.stream_sid.is_some_and(|s| *s != *sid.as_str()) {
            return self.bad_twilio("media for another stream");
        }
        if !twilio::is_base64(&media.payload) {
            return self.bad_twilio("media payload is not base64");
        }
        self.deadlines.media(now);
        if !self.media_rate.allow(now) {
            self.counters.dropped_in += 1;
            self.deps.metrics.rate_dropped().inc();
            return;
        }
        // While a lost model is redialled, keep only the first GAP_FRAMES.
        if let Some(resent) = self.session.gap_resent()
            && self.model.queued() >= GAP_FRAMES + resent
        {
            self.counters.dropped_in += 1;
            self.deps.metrics.gap_dropped().inc();
            return;
        }
        // Keep headroom so truncate/close never find the queue full.
        if self.model.free() <= HEADROOM {
            self.counters.dropped_in += 1;
            self.deps.metrics.dropped_c2m().inc();
            return;
        }
        if self.deps.config.model_reconnect_secs > 0 {
            self.caller.remember(&media.payload);
        }
        let frame = self.frames.text(&realtime::append_parts(&media.payload));
        if self.model.push(frame).is_ok() {
            self.counters.frames_in += 1;
            self.deps.metrics.frames_c2m().inc();
        } else {
            self.counters.dropped_in += 1;
            self.deps.metrics.dropped_c2m().inc();
            return;
        }
        // Turn detection off: the relay hears the turn's end itself.
        let heard = self
            .turn_commit
            .as_mut()
            .map_or(Heard::Nothing, |t| t.heard_base64(&media.payload));
        match heard {
            Heard::Nothing => {}
            // Kept for a resend, as the model's `speech_started` would.
            Heard::SpeechStarted => self.caller.speech_started(),
            Heard::Commit => self.commit_turn(now),
        }
    }

    fn on_mark(&mut self, parsed: Inbound<'_>, now: Instant) {
        let Some(mark) = parsed.mark else {
            return self.bad_twilio("mark without body");
        };
        match self.playback.mark_echoed(&mark.name, now) {
            Some(outs) => self.apply(outs),
            None => self.bad_twilio("unknown mark"),
        }
    }

    fn on_dtmf(&mut self, parsed: Inbound<'_>, now: Instant) {
        if self.stream_sid.is_none() {
            return self.bad_twilio("dtmf before start");
        }
        match parsed.dtmf {
            Some(d) if is_dtmf_digit(&d.digit) => {
                let digit = d.digit.into_owned();
                if self.agent.dtmf_to_model {
                    // Realtime has no DTMF input over WebSocket (`input_audio_buffer.
                    // dtmf_event_received` is SIP only): the key is a user message, and a
                    // key press is a turn the model answers.
                    let text = format!("DTMF: {digit}");
                    self.send_model("conversation.item.create", &realtime::user_text(&text));
                    self.answer_caller(now);
                }
                self.event(pb::call_event::Kind::Dtmf(pb::Dtmf { digit }));
            }
            _ => self.bad_twilio("dtmf without a keypad digit"),
        }
    }

    fn on_start(&mut self, parsed: Inbound<'_>, now: Instant) {
        let Some(start) = parsed.start else {
            return self.bad_twilio("start without body");
        };
        let Some(stream_sid) = StreamSid::new(start.stream_sid.as_ref()) else {
            return self.bad_twilio("start with an unusable streamSid");
        };
        if !self.life.start() {
            return self.bad_twilio("second start");
        }
        // The <Parameter name="callId"> we wrote must match the signed path.
        let param = start
            .custom_parameters
            .as_ref()
            .and_then(|p| p.get("callId"));
        if let (Some(param), Some(call_id)) = (param, &self.call_id)
            && param.as_str() != call_id.as_str()
        {
            self.bad_twilio("start for another call id");
            warn!(param = %param, "Twilio start names another call id.");
        }
        self.deadlines.started(now);
        self.call_sid = CallSid::new(start.call_sid.into_owned());
        let call_sid = self.call_sid.as_ref().map_or("", CallSid::as_str);
        tracing::Span::current().record("call_sid", call_sid);
        info!(call_sid, resumed = self.resumed, "Stream started.");
        self.event(pb::call_event::Kind::Started(pb::Started {
            twilio_call_sid: call_sid.to_owned(),
            stream_sid: stream_sid.as_str().to_owned(),
            relay_id: self.deps.relay_id.to_string(),
            resumed: self.resumed,
        }));
        self.stream_sid = Some(stream_sid);
        self.opening_turn(now);
    }

    /// After `start`: the greeting (not on a resumed call).
    fn opening_turn(&mut self, now: Instant) {
        // A machine verdict that came first takes the greeting's place.
        if self.apply_verdict(now) || self.resumed {
            // The model session was told the conversation so far (as items) when it was
            // set up; the greeting was said on the first line.
            return;
        }
        if !self.agent.greeting.is_empty() {
            let text = format!(
                "Greet the caller now by saying: \"{}\"",
                self.agent.greeting
            );
            self.send_model("conversation.item.create", &realtime::system_text(&text));
            self.request_answer(now);
        }
    }
}

/// A keypad key as Twilio reports it: `0`–`9`, `*`, `#`, `A`–`D` (it also goes into a model
/// message, so nothing else passes).
fn is_dtmf_digit(digit: &str) -> bool {
    matches!(digit.as_bytes(), [b'0'..=b'9' | b'*' | b'#' | b'A'..=b'D'])
}

#[cfg(test)]
mod tests {
    #[test]
    fn keypad_digits_only() {
        for ok in ["0", "9", "*", "#", "A", "D"] {
            assert!(super::is_dtmf_digit(ok), "{ok}");
        }
        for bad in ["", "10", "E", "a", " ", "5\"", "\u{0}"] {
            assert!(!super::is_dtmf_digit(bad), "{bad:?}");
        }
    }
}

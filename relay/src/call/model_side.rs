//! The model side of the call loop: dials finishing, and one handler per Realtime server
//! event, chosen by an exhaustive `match` on [`RealtimeEventKind`].

use callbridge_proto::pb;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::{self, Message};
use tracing::{debug, warn};

use super::dial::close_model_later;
use super::outbox::Outbox;
use super::phase::{Delta, Out};
use super::{Call, HEADROOM, MODEL_MAX_ACCEPTED, ModelLinkEvent, PARTIAL_TRANSCRIPT_MAX, Read};
use crate::error::{EndKind, RealtimeError};
use crate::realtime::{self, ErrorClass, RealtimeEventKind, ServerEvent};
use crate::twilio;

impl Call {
    fn bad_model(&mut self, what: &str) {
        self.deps.metrics.bad_realtime().inc();
        debug!(what, "Bad message from the model.");
    }

    /// The session is gone; it is redialled (or the call gives up) after the turn.
    fn lose_model(&mut self, why: RealtimeError, now: Instant) {
        self.links.read = None;
        self.session.lose(why, now);
    }

    pub(super) fn on_model_link(&mut self, ev: ModelLinkEvent, now: Instant) {
        match ev {
            // The model socket is up (and set up): start reading it, write what waited.
            ModelLinkEvent::Dialled(Ok((sink, read))) => {
                self.model.open(sink);
                self.links.read = Some(read);
                self.session.dialled(now);
            }
            ModelLinkEvent::Dialled(Err(why)) => self.lose_model(why, now),
            // A replacement session is up and set up: switched to at a quiet moment.
            ModelLinkEvent::Replacement(Ok((sink, read))) => {
                if self.session.replacement_dialled(true, now) {
                    self.links.standby = Some((sink, read));
                } else {
                    close_model_later(&mut self.tasks, Outbox::new(sink, 0));
                }
            }
            ModelLinkEvent::Replacement(Err(why)) => {
                debug!(%why, "Replacement model session failed; the current one goes on.");
                self.session.replacement_dialled(false, now);
            }
            ModelLinkEvent::Read(msg) => self.on_model(msg, now),
        }
    }

    fn on_model(&mut self, msg: Read, now: Instant) {
        let msg = match msg {
            None => return self.lose_model(RealtimeError::Gone, now),
            Some(Err(tungstenite::Error::Capacity(e))) => {
                return self.bad_model(&format!("oversized: {e}"));
            }
            Some(Err(e)) => return self.lose_model(RealtimeError::Read(e), now),
            Some(Ok(m)) => m,
        };
        self.session.heard(now);
        self.deps.metrics.model_socket().messages_in.inc();
        let text = match &msg {
            Message::Text(t) => t.as_str(),
            Message::Close(frame) => {
                let why = match frame {
                    Some(f) => RealtimeError::Closed {
                        code: u16::from(f.code),
                        reason: f.reason.to_string(),
                    },
                    None => RealtimeError::ClosedWithoutFrame,
                };
                return self.lose_model(why, now);
            }
            Message::Binary(_) => return self.bad_model("binary frame"),
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => return,
        };
        if text.len() > MODEL_MAX_ACCEPTED {
            return self.bad_model("oversized message");
        }
        let Ok(ev) = realtime::parse(text) else {
            return self.bad_model("malformed JSON");
        };
        match ev.kind {
            RealtimeEventKind::OutputAudioDelta => self.on_audio_delta(&ev, now),
            RealtimeEventKind::OutputAudioDone => self.on_audio_done(&ev),
            RealtimeEventKind::OutputAudioTranscriptDelta => self.on_transcript_delta(&ev),
            RealtimeEventKind::OutputAudioTranscriptDone => self.on_transcript_done(&ev),
            RealtimeEventKind::ResponseCreated => self.on_response_created(&ev),
            RealtimeEventKind::ResponseDone => self.on_response_done(ev, now),
            RealtimeEventKind::SpeechStarted => self.on_speech_started(now),
            RealtimeEventKind::SpeechStopped => self.on_speech_stopped(now),
            RealtimeEventKind::InputCommitted => self.on_input_committed(),
            RealtimeEventKind::InputTranscriptionCompleted => self.on_caller_transcript(&ev),
            RealtimeEventKind::InputTranscriptionFailed => self.on_transcription_failed(ev),
            RealtimeEventKind::RateLimitsUpdated => self.on_rate_limits(&ev),
            RealtimeEventKind::FunctionCallArgumentsDone => self.on_function_call(&ev, now),
            RealtimeEventKind::Error => self.on_model_error(ev, now),
            RealtimeEventKind::SessionUpdated => self.on_session_updated(&ev),
            RealtimeEventKind::Other => {}
        }
    }

    /// Assistant audio: forwarded to Twilio as it came (base64 untouched), with a mark
    /// behind it so playback knows when it was heard.
    fn on_audio_delta(&mut self, ev: &ServerEvent<'_>, now: Instant) {
        let (Some(delta), Some(item_id)) = (ev.delta.as_deref(), ev.item_id.as_deref()) else {
            return self.bad_model("audio delta without delta or item_id");
        };
        let response_id = ev.response_id.as_deref().unwrap_or("");
        if self.playback.drops(response_id) {
            return; // late audio of an interrupted response
        }
        if !twilio::is_base64(delta) {
            return self.bad_model("audio delta is not base64");
        }
        // Two messages (media, mark) and the headroom.
        let Some(sid) = self
            .stream_sid
            .as_ref()
            .filter(|_| self.tw.free() > HEADROOM + 1)
        else {
            self.counters.dropped_out += 1;
            self.deps.metrics.dropped_m2c().inc();
            return;
        };
        let Delta::Forward { mark } =
            self.playback
                .audio_delta(response_id, item_id, twilio::decoded_len(delta), now)
        else {
            return;
        };
        let media = self.frames.text(&twilio::media_parts(sid.as_str(), delta));
        let mark = mark.map(|at| {
            self.mark_name.clear();
            at.write_name(item_id, &mut self.mark_name);
            match twilio::mark_parts(sid.as_str(), &self.mark_name) {
                Some(parts) => self.frames.text(&parts),
                None => Message::text(twilio::mark_frame(sid.as_str(), &self.mark_name)),
            }
        });
        // Cannot fail with the room checked above (this loop is the only writer).
        if self.tw.push(media).is_err() || mark.is_some_and(|m| self.tw.push(m).is_err()) {
            self.deps.metrics.dropped_m2c().inc();
            return;
        }
        self.counters.frames_out += 1;
        self.deps.metrics.frames_m2c().inc();
        if self.counters.first_audio()
            && let Some(s) = self.deadlines.started_at()
        {
            let secs = now.duration_since(s).as_secs_f64();
            self.deps.metrics.time_to_first_audio().observe(secs);
        }
    }

    fn on_audio_done(&mut self, ev: &ServerEvent<'_>) {
        if let Some(item) = ev.item_id.as_deref() {
            let outs = self.playback.audio_done(item);
            self.apply(outs);
        }
    }

    fn on_transcript_delta(&mut self, ev: &ServerEvent<'_>) {
        let (Some(item), Some(delta)) = (ev.item_id.as_deref(), ev.delta.as_deref()) else {
            return;
        };
        match &mut self.partial_transcript {
            Some((id, text)) if id == item => {
                if text.len() + delta.len() <= PARTIAL_TRANSCRIPT_MAX {
                    text.push_str(delta);
                }
            }
            slot => *slot = Some((item.to_owned(), delta.to_owned())),
        }
    }

    fn on_transcript_done(&mut self, ev: &ServerEvent<'_>) {
        self.partial_transcript = None;
        if let Some(item) = ev.item_id.as_deref() {
            let text = ev.transcript.as_deref().unwrap_or("");
            let outs = self.playback.transcript_done(item, text);
            self.apply(outs);
        }
    }

    fn on_response_created(&mut self, ev: &ServerEvent<'_>) {
        self.awaiting_answer = None;
        if let Some(id) = ev.response.as_ref().and_then(|r| r.id.as_deref()) {
            self.playback.response_created(id);
        }
    }

    fn on_response_done(&mut self, ev: ServerEvent<'_>, now: Instant) {
        self.awaiting_answer = None;
        let Some(r) = ev.response else { return };
        if let Some(id) = r.id.as_deref() {
            let outs = self.playback.response_done(id);
            self.apply(outs);
        }
        if let Some(u) = &r.usage {
            self.event(pb::call_event::Kind::Usage(u.to_pb()));
        }
        let status = r.status.as_deref().unwrap_or("completed");
        if status != "completed" {
            if status == "failed" {
                self.deps.metrics.model_errors().inc();
            }
            let details = r.status_details.unwrap_or_default();
            let error = details.error.unwrap_or_default();
            debug!(status, reason = ?details.reason, code = ?error.code, "Response did not complete.");
            self.event(pb::call_event::Kind::ResponseEnded(pb::ResponseEnded {
                response_id: r.id.as_deref().unwrap_or("").to_owned(),
                status: status.to_owned(),
                reason: details.reason.unwrap_or_default(),
                error_type: error.kind.unwrap_or_default(),
                error_code: error.code.unwrap_or_default(),
            }));
        }
        // A caller's turn that ended while this response ran is answered now.
        if std::mem::take(&mut self.answer_after_response) {
            self.request_answer(now);
        }
    }

    fn on_speech_started(&mut self, now: Instant) {
        self.caller_speaking = true;
        self.caller.speech_started();
        let outs = self.playback.speech_started(now);
        if outs
            .iter()
            .any(|o| matches!(o, Out::ClearTwilio | Out::Truncate { .. }))
        {
            self.counters.barge_ins += 1;
            self.deps.metrics.barge_ins().inc();
        }
        self.apply(outs);
    }

    fn on_speech_stopped(&mut self, now: Instant) {
        self.caller_speaking = false;
        // An agent with `create_response: false` answers only when asked.
        let answers = self
            .agent
            .turn_detection
            .as_ref()
            .and_then(|t| t.create_response)
            != Some(false);
        if answers {
            self.awaiting_answer = Some(now);
        }
    }

    /// The caller's audio so far is a user item. Without transcription this is the turn's
    /// end for the relay too: nothing will say the words arrived, and a new session could
    /// not be told them anyway, so the audio is not kept for a resend. With transcription
    /// it stays kept until the words arrive (or fail to): a session lost in between is
    /// told the words by a resend.
    fn on_input_committed(&mut self) {
        self.caller_speaking = false;
        if !self.agent.transcribes() {
            self.caller.transcribed();
        }
    }

    /// The caller's words will not arrive: their audio is not kept any longer, and the
    /// application learns which item has no transcript.
    fn on_transcription_failed(&mut self, ev: ServerEvent<'_>) {
        self.caller.transcribed();
        let e = ev.error.unwrap_or_default();
        debug!(code = ?e.code, "Caller transcription failed.");
        self.event(pb::call_event::Kind::TranscriptionFailed(
            pb::TranscriptionFailed {
                item_id: ev.item_id.as_deref().unwrap_or("").to_owned(),
                error_type: e.kind.unwrap_or_default(),
                error_code: e.code.unwrap_or_default(),
                message: e.message.unwrap_or_default(),
            },
        ));
    }

    /// Kept on the call (logged at its end) and exported as the pod's latest values.
    fn on_rate_limits(&mut self, ev: &ServerEvent<'_>) {
        for limit in ev.rate_limits.iter().flatten() {
            let (Some(name), Some(remaining), Some(max)) =
                (limit.name.as_deref(), limit.remaining, limit.limit)
            else {
                continue;
            };
            let slot = match name {
                "requests" => &mut self.rate_limits.requests,
                "tokens" => &mut self.rate_limits.tokens,
                // The schema names only these two; others would make labels unbounded.
                _ => continue,
            };
            *slot = Some((remaining, max));
            self.deps.metrics.model_rate_limit(name, remaining, max);
        }
    }

    fn on_caller_transcript(&mut self, ev: &ServerEvent<'_>) {
        // The model has the words now: a new session gets them as an item.
        self.caller.transcribed();
        let item_id = ev.item_id.as_deref().unwrap_or("").to_owned();
        let text = ev.transcript.as_deref().unwrap_or("").to_owned();
        self.event(pb::call_event::Kind::Caller(pb::CallerSpeech {
            item_id,
            text,
        }));
    }

    fn on_function_call(&mut self, ev: &ServerEvent<'_>, now: Instant) {
        let call_id = ev.call_id.as_deref().unwrap_or("").to_owned();
        let name = ev.name.as_deref().unwrap_or("").to_owned();
        let args = ev.arguments.as_deref().unwrap_or("{}").to_owned();
        if call_id.is_empty() || name.is_empty() {
            return self.bad_model("function call without call_id or name");
        }
        self.on_tool_call(call_id, name, args, now);
    }

    /// Reported with the client event that caused it (by its `event_id`). A fatal class
    /// replaces the session, or ends the call when no session can work.
    fn on_model_error(&mut self, ev: ServerEvent<'_>, now: Instant) {
        let e = ev.error.unwrap_or_default();
        self.deps.metrics.model_errors().inc();
        let class = e.class();
        let client_event_id = e.event_id.clone().unwrap_or_default();
        let client_event_type = self.sent.kind_of(&client_event_id).unwrap_or("");
        let code = e.code.clone().or(e.kind.clone()).unwrap_or_default();
        let message = e.message.unwrap_or_default();
        warn!(
            %code,
            class = ?class,
            client_event_id,
            client_event_type,
            "Model error event."
        );
        // The model's words may quote the caller: not at the default level.
        debug!(%message, "Model error message.");
        self.event(pb::call_event::Kind::ModelError(pb::ModelError {
            code: code.clone(),
            message: message.clone(),
            fatal: class != ErrorClass::Recoverable,
            client_event_id: client_event_id.clone(),
            client_event_type: client_event_type.to_owned(),
        }));
        // A refused `response.create` will not be answered: no stall to wait for.
        if client_event_type == "response.create" {
            self.awaiting_answer = None;
        }
        match class {
            ErrorClass::Recoverable => {}
            ErrorClass::SessionOver => {
                self.lose_model(RealtimeError::Fatal { code, message }, now);
            }
            ErrorClass::Unusable => {
                self.end(
                    EndKind::ModelUnavailable,
                    format!("model error {code}: {message}"),
                );
            }
        }
    }

    fn on_session_updated(&mut self, ev: &ServerEvent<'_>) {
        if ev.session.as_ref().is_some_and(|s| !s.is_pcmu()) {
            warn!("Model session is not audio/pcmu; the caller would hear noise.");
            self.deps.metrics.model_errors().inc();
        }
    }
}

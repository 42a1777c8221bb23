//! The end of a call: pending work answered, the model closed, control told (and its
//! acknowledgement awaited briefly), Twilio closed, and the end counted and logged with
//! the side that caused it.

use callbridge_proto::pb;
use callbridge_proto::pb::EndReason;
use futures_util::{SinkExt, StreamExt};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tracing::{debug, info, warn};

use super::control_link::LinkIn;
use super::dial::{close_model_later, model_close};
use super::outbox::Outbox;
use super::phase::Ending;
use super::{CLOSE_WAIT, Call, ENDED_ACK_WAIT, LinkTask, TwilioRead};
use crate::call_id::CallId;
use crate::error::{EndKind, Side};
use crate::stream_ends::Ended;

impl Call {
    pub(super) async fn finish(mut self, link: &mut LinkTask, tw_read: TwilioRead) {
        let ending = self
            .life
            .ending()
            .cloned()
            .unwrap_or_else(|| Ending::new(EndReason::InternalError, "no end reason"));
        let kind = self
            .end_kind
            .or(self.pending_kind)
            .unwrap_or_else(|| EndKind::from_reason(ending.reason));
        self.report_loose_ends(&ending);

        // Close the model first, while control acknowledges the end; its close is awaited
        // (bounded) before the call's tasks are aborted, so the session gets its close
        // frame. A session still being dialled is closed by its dial task, or dropped when
        // the tasks are aborted below.
        let links = std::mem::take(&mut self.links);
        if let Some((sink, _)) = links.standby {
            close_model_later(&mut self.tasks, Outbox::new(sink, 0));
        }
        let model = std::mem::replace(&mut self.model, Outbox::pending(0));
        let model_closed = tokio::spawn(async move {
            let _ = tokio::time::timeout(CLOSE_WAIT, model.close(model_close())).await;
        });
        drop(links.read);

        // Report the end and wait briefly for its ack, before Twilio is let go: Twilio
        // fetches the <Connect action> as soon as the socket closes, and control must
        // already know how the call ended to answer it.
        if let Some(mut tx) = self.link_tx.take() {
            let ended = pb::call_event::Kind::Ended(pb::Ended {
                reason: ending.reason as i32,
                detail: ending.detail.clone(),
                transfer_to: ending.transfer_to.clone(),
            });
            let sent = tokio::time::timeout(ENDED_ACK_WAIT, tx.send(LinkIn::now(ended))).await;
            drop(tx);
            if matches!(sent, Ok(Ok(())))
                && tokio::time::timeout(ENDED_ACK_WAIT, link.ended())
                    .await
                    .is_err()
            {
                warn!("Control did not acknowledge the end in time; still trying after the close.");
            }
        }

        // Twilio asks the action URL of a stream the relay closed (not of a caller who
        // hung up); while draining, the relay stays to answer it.
        if let Some(call_id) = &self.call_id
            && kind.side() != Side::Twilio
        {
            self.deps.actions_due.expect(call_id);
        }
        // A standalone stream's action request is answered from a note of its end
        // (crate::standalone_after); queued before the close, so it is there in time.
        if let Some(stream) = &self.standalone_stream
            && kind.side() != Side::Twilio
        {
            if let Some(ended) = Ended::of(ending.reason, &ending.transfer_to) {
                self.deps.stream_ends.note(stream, ended).await;
            }
            // The stream id stands in for the call id standalone calls lack.
            if let Ok(id) = CallId::parse(&**stream) {
                self.deps.actions_due.expect(&id);
            }
        }
        self.close_twilio(ending.reason).await;
        // Apart: the call is over for everyone; only the socket's last bytes are awaited.
        tokio::spawn(read_to_close(tw_read));
        let _ = model_closed.await;
        self.tasks.abort_all();
        self.deps.metrics.call_ended(kind.label());
        self.log_end(kind, &ending, Instant::now());
    }

    /// What the application must still hear: what the caller heard of the assistant, a
    /// fatal model error, and the tool calls that will never be answered.
    fn report_loose_ends(&mut self, ending: &Ending) {
        let outs = self.playback.flush(Instant::now());
        self.apply(outs);
        if ending.reason == EndReason::ModelUnavailable {
            self.deps.metrics.model_errors().inc();
            self.event(pb::call_event::Kind::ModelError(pb::ModelError {
                code: "model_unavailable".to_owned(),
                message: ending.detail.clone(),
                fatal: true,
                ..Default::default()
            }));
        }
        for call_id in self.tools.take_all() {
            self.event(pb::call_event::Kind::ToolResult(pb::ToolResult {
                tool_call_id: call_id,
                output: r#"{"error":"the call ended"}"#.to_owned(),
                is_error: true,
            }));
        }
    }

    async fn close_twilio(&mut self, reason: EndReason) {
        let (code, why) = match reason {
            EndReason::Drain => (CloseCode::Away, "call ended"),
            EndReason::Handoff => {
                self.deps.metrics.handoffs().inc();
                (CloseCode::Normal, "call handed off")
            }
            _ => (CloseCode::Normal, "call ended"),
        };
        let tw = std::mem::replace(&mut self.tw, Outbox::pending(0));
        let close = Message::Close(Some(CloseFrame {
            code,
            reason: why.into(),
        }));
        let _ = tokio::time::timeout(CLOSE_WAIT, tw.close(close)).await;
    }

    /// One line per call: at info for a normal end, at warn for an abnormal one.
    fn log_end(&self, kind: EndKind, ending: &Ending, now: Instant) {
        let c = &self.counters;
        let duration_ms = now.duration_since(self.upgraded_at).as_millis() as u64;
        macro_rules! end_line {
            ($level:ident) => {
                $level!(
                    reason = kind.label(),
                    side = kind.side().as_str(),
                    duration_ms,
                    frames_in = c.frames_in,
                    frames_out = c.frames_out,
                    dropped_in = c.dropped_in,
                    dropped_out = c.dropped_out,
                    barge_ins = c.barge_ins,
                    rate_limit_requests_left = ?self.rate_limits.requests.map(|(left, _)| left),
                    rate_limit_tokens_left = ?self.rate_limits.tokens.map(|(left, _)| left),
                    "Call ended."
                )
            };
        }
        if kind.is_normal() {
            end_line!(info);
        } else {
            end_line!(warn);
        }
        // Free text (a model's or application's words) and phone numbers stay out of the
        // default log level.
        if !ending.detail.is_empty() || !ending.transfer_to.is_empty() {
            debug!(detail = %ending.detail, transfer_to = %ending.transfer_to, "Call end detail.");
        }
    }
}

/// Reads what Twilio still sends until its close reply or the end of the socket (at most
/// [`CLOSE_WAIT`]). A socket dropped with unread frames (the caller's audio keeps coming
/// until Twilio sees the close) is reset by the kernel, and the reset can overtake the
/// close frame: Twilio would see a lost stream instead of a clean hand-off or end.
async fn read_to_close(mut tw_read: TwilioRead) {
    let _ = tokio::time::timeout(CLOSE_WAIT, async {
        while let Some(Ok(msg)) = tw_read.next().await {
            if msg.is_close() {
                break;
            }
        }
    })
    .await;
}

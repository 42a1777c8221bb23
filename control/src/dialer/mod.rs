//! Calls control places itself through Twilio's REST API: the create, the statuses Twilio
//! reports back (through the relay's status-callback route), and steering a call that has
//! no stream (cancel a ringing call, hang up a call in progress).
//!
//! A dialled call's record moves with Twilio's statuses: the relay's webhook admits it
//! (`RINGING`), its stream's `started` makes it `IN_PROGRESS`, and a final Twilio status for
//! a call without a live stream appends a final `ended` event (`DIAL_BUSY`, …) that makes
//! it `BUSY`, `NO_ANSWER`, `FAILED`, `CANCELED` or `COMPLETED`. A call whose stream holds
//! its lease is ended by that stream, as any other call.

pub(crate) mod campaign;
pub(crate) mod orphans;

use callbridge_proto::pb;

use crate::domain::call::{is_final, now_ms};
use crate::domain::ids::{CallId, CallSid};
use crate::domain::record::CallRecord;
use crate::domain::twilio::{self, TwilioCallStatus};
use crate::error::Error;
use crate::service::Shared;
use crate::store::{AppendOutcome, CallStore, TwilioUpdate};
use crate::twilio_rest::{CreateCall, TwilioError, TwilioRest, UpdateCall};

/// The Twilio events a dialled call reports.
const EVENTS: [&str; 4] = ["initiated", "ringing", "answered", "completed"];

/// How often a final `ended` is retried when a concurrent event took its seq.
const END_ATTEMPTS: usize = 5;

/// Checks that this replica can dial; the client when it can.
pub(crate) fn dialer<S>(shared: &Shared<S>) -> Result<(&TwilioRest, &str), Error> {
    let twilio = shared.twilio.as_ref().ok_or(Error::DialingUnavailable(
        "control has no Twilio account (set TWILIO_ACCOUNT_SID and its credentials)",
    ))?;
    let base = shared
        .config
        .relay_public_url
        .as_deref()
        .ok_or(Error::DialingUnavailable(
            "RELAY_PUBLIC_URL is not set, so Twilio has no webhook to fetch",
        ))?;
    Ok((twilio, base))
}

/// A status or AMD callback the relay forwarded (`Relay.ReportTwilioStatus`), checked.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Report {
    /// The call (`?callId=` of a call control dialled); `None`: found by `sid`.
    pub(crate) call_id: Option<CallId>,
    /// Twilio's sid of the call; always there when `call_id` is not.
    pub(crate) sid: Option<CallSid>,
    /// `CallStatus`; `None` for an AMD callback.
    pub(crate) status: Option<TwilioCallStatus>,
    pub(crate) sequence_number: u32,
    pub(crate) call_duration_secs: u32,
    pub(crate) sip_response_code: u32,
    /// `AnsweredBy` of an AMD callback.
    pub(crate) answered_by: Option<String>,
    /// `ErrorCode` and `ErrorMessage`, when Twilio sent a code.
    pub(crate) error: Option<(u32, String)>,
}

impl Report {
    /// Checks a report's fields, naming the first bad one.
    pub(crate) fn parse(req: pb::TwilioStatusReport) -> Result<Self, Error> {
        let (call_id, sid) = if req.call_id.is_empty() {
            let sid = CallSid::parse("twilio_call_sid", req.twilio_call_sid)?;
            (None, Some(sid))
        } else {
            let call_id = CallId::parse("call_id", req.call_id)?;
            (
                Some(call_id),
                CallSid::parse_optional("twilio_call_sid", req.twilio_call_sid)?,
            )
        };
        if req.call_status.is_empty() && req.answered_by.is_empty() {
            return Err(Error::invalid(
                "call_status",
                "a report needs a call status or an answering-machine verdict",
            ));
        }
        // Twilio's word goes into the record, logs and a command: only a plain word.
        if !req.answered_by.is_empty()
            && (req.answered_by.len() > 32
                || !req
                    .answered_by
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b == b'_'))
        {
            return Err(Error::invalid(
                "answered_by",
                "at most 32 lowercase letters and underscores",
            ));
        }
        Ok(Report {
            call_id,
            sid,
            status: TwilioCallStatus::parse_optional("call_status", &req.call_status)?,
            sequence_number: req.sequence_number,
            call_duration_secs: req.call_duration_secs,
            sip_response_code: req.sip_response_code,
            answered_by: (!req.answered_by.is_empty()).then_some(req.answered_by),
            error: (req.error_code > 0).then_some((req.error_code, req.error_message)),
        })
    }
}

/// Checks `CreateCallRequest.dial` (prefix names the request in a bulk create).
pub(crate) fn check_dial(
    prefix: &str,
    direction: pb::Direction,
    dial: &pb::DialOptions,
) -> Result<(), Error> {
    let field = |name: &str| format!("{prefix}dial.{name}");
    if direction != pb::Direction::Outbound {
        return Err(Error::invalid(
            format!("{prefix}dial"),
            "only outbound calls are dialled",
        ));
    }
    if dial.timeout_secs != 0 && !(5..=600).contains(&dial.timeout_secs) {
        return Err(Error::invalid(
            field("timeout_secs"),
            "0 (Twilio's default) or 5..=600",
        ));
    }
    if dial.time_limit_secs > 24 * 3600 {
        return Err(Error::invalid(field("time_limit_secs"), "at most 86400"));
    }
    if dial.caller_id.len() > 256 {
        return Err(Error::invalid(field("caller_id"), "at most 256 bytes"));
    }
    if pb::MachineDetection::try_from(dial.machine_detection).is_err() {
        return Err(Error::invalid(
            field("machine_detection"),
            format!("unknown value {}", dial.machine_detection),
        ));
    }
    Ok(())
}

/// The relay URL Twilio posts status (and AMD) callbacks of `call_id` to.
pub(crate) fn status_callback_url(base: &str, call_id: &CallId) -> String {
    callbridge_proto::paths::status_callback(base, Some(call_id.as_str()))
}

/// The Twilio create request for a stored call.
pub(crate) fn create_request(base: &str, call: &CallRecord, dial: &pb::DialOptions) -> CreateCall {
    let callback = status_callback_url(base, &call.call_id);
    let detection = match pb::MachineDetection::try_from(dial.machine_detection) {
        Ok(pb::MachineDetection::Enable) => Some(("Enable", callback.clone())),
        Ok(pb::MachineDetection::DetectMessageEnd) => Some(("DetectMessageEnd", callback.clone())),
        _ => None,
    };
    CreateCall {
        to: call.to.clone(),
        from: call.from.clone(),
        url: callbridge_proto::paths::voice_webhook(base, Some(call.call_id.as_str())),
        status_callback: Some(callback),
        status_callback_events: EVENTS.to_vec(),
        timeout_secs: (dial.timeout_secs > 0).then_some(dial.timeout_secs),
        time_limit_secs: (dial.time_limit_secs > 0).then_some(dial.time_limit_secs),
        caller_id: (!dial.caller_id.is_empty()).then(|| dial.caller_id.clone()),
        machine_detection: detection,
    }
}

/// Asks Twilio to place a stored call. Twilio's refusal, or no answer, is the call's final
/// `FAILED` outcome (with Twilio's code and message), not an RPC error.
pub(crate) async fn place<S: CallStore>(
    shared: &Shared<S>,
    call: &CallRecord,
    dial: &pb::DialOptions,
) -> Result<(), Error> {
    let (twilio, base) = dialer(shared)?;
    let request = create_request(base, call, dial);
    match twilio.create_call(&request).await {
        Ok(created) => {
            tracing::info!(call_id = %call.call_id, sid = %created.sid, "Twilio is placing the call.");
            // Twilio's answer, not a client's input: what does not parse is not recorded
            // (the status callbacks will say it again).
            let sid = CallSid::parse("sid", created.sid)
                .map_err(|err| tracing::warn!(error = %err, "Twilio answered an odd sid."))
                .ok();
            shared
                .store
                .record_twilio(
                    &call.call_id,
                    &TwilioUpdate {
                        sid,
                        status: TwilioCallStatus::from_name(&created.status),
                        ..TwilioUpdate::default()
                    },
                )
                .await?;
        }
        Err(err) => {
            tracing::info!(call_id = %call.call_id, error = %err, "Twilio did not place the call.");
            let (code, message) = match &err {
                TwilioError::Api { code, message, .. } => (*code, message.clone()),
                other => (0, other.to_string()),
            };
            shared
                .store
                .record_twilio(
                    &call.call_id,
                    &TwilioUpdate {
                        status: Some(TwilioCallStatus::Failed),
                        error: Some((code, message.clone())),
                        ..TwilioUpdate::default()
                    },
                )
                .await?;
            let detail = if code > 0 {
                format!("twilio {code}: {message}")
            } else {
                message
            };
            end_without_stream(shared, &call.call_id, pb::EndReason::DialFailed, detail).await?;
        }
    }
    Ok(())
}

/// Ends a call with a final `ended` event, unless a stream holds its lease (that stream
/// ends it) or it has ended already. Returns whether this call ended it.
async fn end_without_stream<S: CallStore>(
    shared: &Shared<S>,
    call_id: &CallId,
    reason: pb::EndReason,
    detail: String,
) -> Result<bool, Error> {
    for _ in 0..END_ATTEMPTS {
        let call = shared.call(call_id).await?;
        let now = now_ms();
        if is_final(call.status) || call.lease_held(now) {
            return Ok(false);
        }
        let event = pb::CallEvent {
            call_id: call_id.to_string(),
            seq: call.last_seq + 1,
            at_ms: now,
            kind: Some(pb::call_event::Kind::Ended(pb::Ended {
                reason: reason as i32,
                detail: detail.clone(),
                transfer_to: String::new(),
            })),
        };
        // A call that never had a stream has no lease to wait for (and no stream will
        // come after a final Twilio status); one that had a stream must have lost it.
        let condition = (call.lease_until_ms > 0).then_some(now + 1);
        match shared.record_event(&call, &event, condition).await {
            Ok(AppendOutcome::Stored) => {
                tracing::info!(%call_id, ?reason, "Dialled call ended without a stream.");
                return Ok(true);
            }
            // A relay event took the seq, or a stream attached: look again.
            Ok(_) | Err(Error::EventGap { .. }) => {}
            Err(err) => return Err(err),
        }
    }
    Ok(false)
}

/// Applies a status or AMD callback the relay forwarded. Whether it changed anything.
pub(crate) async fn apply_report<S: CallStore>(
    shared: &Shared<S>,
    report: &Report,
) -> Result<bool, Error> {
    let call_id = match (&report.call_id, &report.sid) {
        (Some(call_id), _) => call_id.clone(),
        (None, Some(sid)) => match shared.store.call_id_by_sid(sid).await? {
            Some(id) => id,
            // A callback for a call control never saw (another system's call on the
            // same account, or one long expired): nothing to do.
            None => return Ok(false),
        },
        (None, None) => return Ok(false),
    };
    let call = shared.call(&call_id).await?;
    if let (Some(stored), Some(reported)) = (&call.twilio_call_sid, &report.sid)
        && stored != reported
    {
        return Err(Error::WrongTwilioCall(call_id.to_string()));
    }
    let changed = shared
        .store
        .record_twilio(
            &call_id,
            &TwilioUpdate {
                sid: report.sid.clone(),
                status: report.status,
                seq: report.status.map(|_| report.sequence_number),
                error: report.error.clone(),
                answered_by: report.answered_by.clone(),
            },
        )
        .await?
        .ok_or_else(|| Error::CallNotFound(call_id.to_string()))?;
    if let Some(answered_by) = &report.answered_by
        && call.answered_by.is_none()
    {
        tracing::info!(call_id = %call_id, answered_by = %answered_by, "Answering-machine verdict.");
        verdict_to_stream(shared, &call, answered_by, None).await;
    }
    // A final status ends a call that has no stream; the rank check makes a stale or
    // repeated callback a no-op.
    let mut ended = false;
    if let Some(status) = report.status
        && let Some(reason) = status.end_reason()
    {
        let detail = match (report.sip_response_code, report.call_duration_secs) {
            (0, secs) => format!("twilio {status} after {secs} s"),
            (sip, secs) => format!("twilio {status} (SIP {sip}) after {secs} s"),
        };
        ended = end_without_stream(shared, &call_id, reason, detail).await?;
    }
    Ok(changed || ended)
}

/// Hands a call's first answering-machine verdict to the relay carrying its stream, which
/// reports it and acts on it (the agent's `voicemail`). A call with no stream yet gets it
/// with its context when the stream attaches (`Call.answered_by`); one that is over has no
/// use for it.
async fn verdict_to_stream<S: CallStore>(
    shared: &Shared<S>,
    call: &CallRecord,
    answered_by: &str,
    command_id: Option<String>,
) {
    // The attach registers its stream for commands before its lease names it, and reads
    // the context after: a verdict stored before that read is in the context, one stored
    // after finds the lease held and the command waits for the stream. The relay applies
    // the first it gets.
    if is_final(call.status)
        || !call.lease_held(now_ms())
        || crate::validate::answered_by("answered_by", answered_by).is_err()
    {
        return;
    }
    let command = pb::Command {
        command_id: command_id.unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string()),
        kind: Some(pb::command::Kind::AnsweringMachine(
            pb::AnsweringMachineCommand {
                answered_by: answered_by.to_owned(),
            },
        )),
    };
    match shared
        .store
        .publish_command(call.lease_replica(), &call.call_id, &command)
        .await
    {
        Ok(true) => {}
        // The stream is moving (hand-off, failover): the next one reads the stored verdict.
        Ok(false) => {
            tracing::debug!(call_id = %call.call_id, "No stream took the verdict; its next stream reads it.");
        }
        Err(err) => {
            tracing::warn!(call_id = %call.call_id, error = %err, "Could not hand the verdict to the stream.");
        }
    }
}

/// An application's own answering-machine verdict (`SendCommand`): stored like Twilio's,
/// first one wins, and handed to the call's stream (now, or in the context of the stream
/// to come). A call that is over gets `CallNotLive`.
pub(crate) async fn app_verdict<S: CallStore>(
    shared: &Shared<S>,
    call: &CallRecord,
    answered_by: &str,
    command_id: String,
) -> Result<(), Error> {
    if is_final(call.status) {
        return Err(Error::CallNotLive {
            call_id: call.call_id.to_string(),
            status: call.status.as_str_name(),
            attached: call.lease_held(now_ms()),
        });
    }
    // Only the verdict is written: "changed" means it was the first.
    let first = shared
        .store
        .record_twilio(
            &call.call_id,
            &TwilioUpdate {
                answered_by: Some(answered_by.to_owned()),
                ..TwilioUpdate::default()
            },
        )
        .await?
        .ok_or_else(|| Error::CallNotFound(call.call_id.to_string()))?;
    if first {
        tracing::info!(call_id = %call.call_id, answered_by = %answered_by, "Answering-machine verdict from the application.");
        verdict_to_stream(shared, call, answered_by, Some(command_id)).await;
    }
    Ok(())
}

/// An application `Hangup` of a dialled call that has no live stream: cancel it at
/// Twilio while it is queued or ringing, complete it when it is in progress. `Ok(false)`
/// when REST has nothing to do with this call.
pub(crate) async fn hang_up<S: CallStore>(
    shared: &Shared<S>,
    call: &CallRecord,
) -> Result<bool, Error> {
    let Some(twilio) = shared.twilio.as_ref() else {
        return Ok(false);
    };
    let Some(sid) = &call.twilio_call_sid else {
        return Ok(false);
    };
    if is_final(call.status) || call.twilio_status.is_some_and(TwilioCallStatus::is_final) {
        return Ok(false);
    }
    let update = if twilio::rank(call.twilio_status) >= 3 {
        UpdateCall::Complete
    } else {
        UpdateCall::Cancel
    };
    let answer = match twilio.update_call(sid.as_str(), &update).await {
        Ok(answer) => answer,
        Err(source) if source.is_refusal() => {
            return Err(Error::TwilioRefused {
                call_id: call.call_id.to_string(),
                source,
            });
        }
        Err(source) => {
            return Err(Error::TwilioUnavailable {
                call_id: call.call_id.to_string(),
                source,
            });
        }
    };
    tracing::info!(call_id = %call.call_id, ?update, status = %answer.status, "Asked Twilio to end the call.");
    // Twilio's answer already says how it ended; its callback will say it again.
    apply_report(
        shared,
        &Report {
            call_id: Some(call.call_id.clone()),
            sid: Some(sid.clone()),
            status: TwilioCallStatus::from_name(&answer.status),
            sequence_number: call.twilio_seq,
            call_duration_secs: 0,
            sip_response_code: 0,
            answered_by: None,
            error: None,
        },
    )
    .await?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_request_points_twilio_at_the_relay() {
        let call = CallRecord {
            to: "+14155550123".into(),
            from: "+14155550100".into(),
            ..CallRecord::new(
                CallId::parse("call_id", "c1").expect("valid"),
                crate::domain::ids::AgentId::parse("agent_id", "a").expect("valid"),
                pb::Direction::Outbound,
                pb::CallStatus::Created,
                0,
            )
        };
        let dial = pb::DialOptions {
            timeout_secs: 20,
            machine_detection: pb::MachineDetection::DetectMessageEnd as i32,
            ..Default::default()
        };
        let req = create_request("https://r.test", &call, &dial);
        assert_eq!(req.url, "https://r.test/api/twilio/voice?callId=c1");
        assert_eq!(
            req.status_callback.as_deref(),
            Some("https://r.test/api/twilio/status?callId=c1")
        );
        assert_eq!(req.timeout_secs, Some(20));
        assert_eq!(req.time_limit_secs, None);
        assert_eq!(
            req.machine_detection,
            Some((
                "DetectMessageEnd",
                "https://r.test/api/twilio/status?callId=c1".into()
            ))
        );
    }

    #[test]
    fn reports_are_checked_field_by_field() {
        let sid = "CA0123456789abcdef0123456789abcdef";
        let by_sid = Report::parse(pb::TwilioStatusReport {
            twilio_call_sid: sid.into(),
            call_status: "no-answer".into(),
            sequence_number: 3,
            ..Default::default()
        })
        .expect("valid");
        assert_eq!(by_sid.call_id, None);
        assert_eq!(by_sid.sid.as_ref().map(CallSid::as_str), Some(sid));
        assert_eq!(by_sid.status, Some(TwilioCallStatus::NoAnswer));
        let refused = |report: pb::TwilioStatusReport| {
            Report::parse(report).expect_err("refused").to_string()
        };
        assert_eq!(
            refused(pb::TwilioStatusReport {
                twilio_call_sid: "CA1".into(),
                call_status: "busy".into(),
                ..Default::default()
            }),
            "twilio_call_sid: not a Twilio call sid (CA + 32 hex digits)"
        );
        assert_eq!(
            refused(pb::TwilioStatusReport {
                call_id: "c 1".into(),
                call_status: "busy".into(),
                ..Default::default()
            }),
            "call_id: 'c 1' must be 1..=64 of [a-zA-Z0-9_-]"
        );
        assert_eq!(
            refused(pb::TwilioStatusReport {
                call_id: "c1".into(),
                ..Default::default()
            }),
            "call_status: a report needs a call status or an answering-machine verdict"
        );
        assert_eq!(
            refused(pb::TwilioStatusReport {
                call_id: "c1".into(),
                call_status: "on-hold".into(),
                ..Default::default()
            }),
            "call_status: unknown Twilio call status 'on-hold'"
        );
    }
}

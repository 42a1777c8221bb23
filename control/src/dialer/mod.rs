//! Calls control places itself through Twilio's REST API: the create, the statuses Twilio
//! reports back (through the relay's status-callback route), and steering a call that has
//! no stream (cancel a ringing call, hang up a call in progress).
//!
//! A dialled call's record moves with Twilio's statuses: the relay's webhook admits it
//! (`RINGING`), its stream's `started` makes it `IN_PROGRESS`, and a final Twilio status for
//! a call without a live stream appends a final `ended` event (`DIAL_BUSY`, …) that makes
//! it `BUSY`, `NO_ANSWER`, `FAILED`, `CANCELED` or `COMPLETED`. A call whose stream holds
//! its lease is ended by that stream, as any other call.

use callbridge_proto::pb;

use crate::domain::call::{is_final, now_ms};
use crate::domain::record::CallRecord;
use crate::error::Error;
use crate::service::Shared;
use crate::store::{AppendOutcome, CallStore, TwilioUpdate, twilio_rank};
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

/// A Twilio call sid: `CA` and 32 hex digits.
pub(crate) fn check_sid(field: &str, sid: &str) -> Result<(), Error> {
    if sid.len() == 34 && sid.starts_with("CA") && sid[2..].bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(())
    } else {
        Err(Error::invalid(
            field,
            "not a Twilio call sid (CA + 32 hex digits)",
        ))
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
pub(crate) fn status_callback_url(base: &str, call_id: &str) -> String {
    callbridge_proto::paths::status_callback(base, Some(call_id))
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
        url: callbridge_proto::paths::voice_webhook(base, Some(&call.call_id)),
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
            shared
                .store
                .record_twilio(
                    &call.call_id,
                    &TwilioUpdate {
                        sid: created.sid,
                        status: created.status,
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
                        status: "failed".into(),
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

/// The end reason of a final Twilio status.
fn end_reason(twilio_status: &str) -> Option<pb::EndReason> {
    Some(match twilio_status {
        "busy" => pb::EndReason::DialBusy,
        "no-answer" => pb::EndReason::DialNoAnswer,
        "failed" => pb::EndReason::DialFailed,
        "canceled" => pb::EndReason::DialCanceled,
        "completed" => pb::EndReason::DialCompleted,
        _ => return None,
    })
}

/// Ends a call with a final `ended` event, unless a stream holds its lease (that stream
/// ends it) or it has ended already. Returns whether this call ended it.
async fn end_without_stream<S: CallStore>(
    shared: &Shared<S>,
    call_id: &str,
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
            call_id: call_id.to_owned(),
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
        match shared
            .record_event(&call.campaign_id, &event, condition)
            .await
        {
            Ok(AppendOutcome::Stored) => {
                tracing::info!(call_id, ?reason, "Dialled call ended without a stream.");
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
    report: &pb::TwilioStatusReport,
) -> Result<bool, Error> {
    let call_id = if report.call_id.is_empty() {
        match shared.store.call_id_by_sid(&report.twilio_call_sid).await? {
            Some(id) => id,
            // A callback for a call control never saw (another system's call on the
            // same account, or one long expired): nothing to do.
            None => return Ok(false),
        }
    } else {
        report.call_id.clone()
    };
    let call = shared.call(&call_id).await?;
    if !call.twilio_call_sid.is_empty()
        && !report.twilio_call_sid.is_empty()
        && call.twilio_call_sid != report.twilio_call_sid
    {
        return Err(Error::WrongTwilioCall(call_id));
    }
    let error = (report.error_code > 0).then(|| (report.error_code, report.error_message.clone()));
    let changed = shared
        .store
        .record_twilio(
            &call_id,
            &TwilioUpdate {
                sid: report.twilio_call_sid.clone(),
                status: report.call_status.clone(),
                seq: (!report.call_status.is_empty()).then_some(report.sequence_number),
                error,
                answered_by: report.answered_by.clone(),
            },
        )
        .await?
        .ok_or_else(|| Error::CallNotFound(call_id.clone()))?;
    if !report.answered_by.is_empty() {
        tracing::info!(call_id = %call_id, answered_by = %report.answered_by, "Answering-machine verdict.");
    }
    // A final status ends a call that has no stream; the rank check makes a stale or
    // repeated callback a no-op.
    let mut ended = false;
    if twilio_rank(&report.call_status) == 4
        && let Some(reason) = end_reason(&report.call_status)
    {
        let detail = match (report.sip_response_code, report.call_duration_secs) {
            (0, secs) => format!("twilio {} after {secs} s", report.call_status),
            (sip, secs) => format!("twilio {} (SIP {sip}) after {secs} s", report.call_status),
        };
        ended = end_without_stream(shared, &call_id, reason, detail).await?;
    }
    Ok(changed || ended)
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
    if call.twilio_call_sid.is_empty()
        || is_final(call.status)
        || twilio_rank(&call.twilio_status) == 4
    {
        return Ok(false);
    }
    let update = if twilio_rank(&call.twilio_status) >= 3 {
        UpdateCall::Complete
    } else {
        UpdateCall::Cancel
    };
    let answer = match twilio.update_call(&call.twilio_call_sid, &update).await {
        Ok(answer) => answer,
        Err(source) if source.is_refusal() => {
            return Err(Error::TwilioRefused {
                call_id: call.call_id.clone(),
                source,
            });
        }
        Err(source) => {
            return Err(Error::TwilioUnavailable {
                call_id: call.call_id.clone(),
                source,
            });
        }
    };
    tracing::info!(call_id = %call.call_id, ?update, status = %answer.status, "Asked Twilio to end the call.");
    // Twilio's answer already says how it ended; its callback will say it again.
    apply_report(
        shared,
        &pb::TwilioStatusReport {
            call_id: call.call_id.clone(),
            twilio_call_sid: call.twilio_call_sid.clone(),
            call_status: answer.status,
            sequence_number: call.twilio_seq,
            ..Default::default()
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
            call_id: "c1".into(),
            to: "+14155550123".into(),
            from: "+14155550100".into(),
            ..Default::default()
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
    fn final_statuses_have_end_reasons() {
        assert_eq!(end_reason("busy"), Some(pb::EndReason::DialBusy));
        assert_eq!(end_reason("no-answer"), Some(pb::EndReason::DialNoAnswer));
        assert_eq!(end_reason("ringing"), None);
        assert_eq!(twilio_rank("initiated"), twilio_rank("queued"));
        assert!(twilio_rank("ringing") < twilio_rank("in-progress"));
        assert!(twilio_rank("in-progress") < twilio_rank("completed"));
    }
}

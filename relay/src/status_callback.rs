//! `POST /api/twilio/status`: Twilio's call status callbacks and async answering-machine
//! callbacks, signed like any webhook. The relay checks the signature, answers `204` at
//! once (Twilio wants a quick 2xx and does not retry) and forwards the report to control
//! (`Relay.ReportTwilioStatus`), which orders them by Twilio's status order and
//! `SequenceNumber`, so a late or repeated callback changes nothing.
//!
//! Calls control dialled carry `?callId=`; for inbound calls the operator sets this URL as
//! the phone number's status callback and control finds the call by `CallSid`.

use std::convert::Infallible;

use callbridge_proto::pb;
use http::StatusCode;
use tracing::{debug, warn};
use warp::reply::Response;
use warp::{Filter, Rejection};

use callbridge_proto::paths;

use crate::call_id::{self, CallId};
use crate::http::{Deps, param as form_param, query_param, signed, text, twilio_path, with_query};

/// Largest callback body accepted.
const MAX_FORM_BYTES: u64 = 16 * 1024;

/// The route.
pub fn route(deps: Deps) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    twilio_path(paths::STATUS)
        .and(warp::path::end())
        .and(warp::post())
        .and(warp::query::raw().or(warp::any().map(String::new)).unify())
        .and(warp::header::optional::<String>("x-twilio-signature"))
        .and(warp::body::content_length_limit(MAX_FORM_BYTES))
        .and(warp::body::form::<Vec<(String, String)>>())
        .and(warp::any().map(move || deps.clone()))
        .and_then(status)
}

/// The report for control, or what is wrong with the callback.
fn report(
    raw_query: &str,
    form: &[(String, String)],
) -> Result<pb::TwilioStatusReport, &'static str> {
    let call_id =
        CallId::parse_optional(query_param(raw_query, paths::CALL_ID_PARAM).unwrap_or_default())
            .map_err(|_| "callId: invalid\n")?;
    let number = |name: &str| -> Result<u32, &'static str> {
        match form_param(form, name) {
            "" => Ok(0),
            v => v.parse().map_err(|_| "a numeric field is not a number\n"),
        }
    };
    let report = pb::TwilioStatusReport {
        call_id: call_id::to_proto(call_id.as_ref()),
        twilio_call_sid: form_param(form, "CallSid").to_owned(),
        account_sid: form_param(form, "AccountSid").to_owned(),
        call_status: form_param(form, "CallStatus").to_owned(),
        sequence_number: number("SequenceNumber")?,
        call_duration_secs: number("CallDuration")?,
        sip_response_code: number("SipResponseCode")?,
        answered_by: form_param(form, "AnsweredBy").to_owned(),
        error_code: number("ErrorCode")?,
        error_message: form_param(form, "ErrorMessage").to_owned(),
    };
    if report.twilio_call_sid.is_empty() {
        return Err("CallSid: missing\n");
    }
    if report.call_status.is_empty() && report.answered_by.is_empty() {
        return Err("CallStatus or AnsweredBy: missing\n");
    }
    Ok(report)
}

async fn status(
    raw_query: String,
    sig: Option<String>,
    form: Vec<(String, String)>,
    deps: Deps,
) -> Result<Response, Infallible> {
    let url = with_query(
        paths::status_callback(&deps.call.config.public_url, None),
        &raw_query,
    );
    if !signed(&deps, "status", &url, &form, sig.as_deref()) {
        return Ok(text(StatusCode::FORBIDDEN, "invalid X-Twilio-Signature\n"));
    }
    let report = match report(&raw_query, &form) {
        Ok(report) => report,
        Err(why) => return Ok(text(StatusCode::BAD_REQUEST, why)),
    };
    let Some(control) = deps.call.control.clone() else {
        // Standalone: nothing stores calls, so there is nothing to update.
        return Ok(text(StatusCode::NO_CONTENT, ""));
    };
    tokio::spawn(async move {
        let sid = report.twilio_call_sid.clone();
        match control.report_twilio_status(report).await {
            Ok(ack) => debug!(sid = %sid, applied = ack.applied, "Twilio status forwarded."),
            Err(err) => warn!(sid = %sid, error = %err, "Twilio status not forwarded to control."),
        }
    });
    Ok(text(StatusCode::NO_CONTENT, ""))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn form(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn callbacks_become_reports() {
        let r = report(
            "callId=c-1",
            &form(&[
                ("CallSid", "CA0123456789abcdef0123456789abcdef"),
                ("CallStatus", "busy"),
                ("SequenceNumber", "2"),
                ("SipResponseCode", "486"),
                ("CallDuration", "0"),
            ]),
        )
        .expect("valid");
        assert_eq!(r.call_id, "c-1");
        assert_eq!(
            (
                r.call_status.as_str(),
                r.sequence_number,
                r.sip_response_code
            ),
            ("busy", 2, 486)
        );
        let amd = report(
            "callId=c-1",
            &form(&[
                ("CallSid", "CA0123456789abcdef0123456789abcdef"),
                ("AnsweredBy", "machine_end_beep"),
            ]),
        )
        .expect("an AMD callback is valid");
        assert_eq!(amd.answered_by, "machine_end_beep");
        assert!(
            report("", &form(&[("CallStatus", "ringing")])).is_err(),
            "no sid"
        );
        assert!(
            report(
                "callId=a%20b",
                &form(&[("CallSid", "CA1"), ("CallStatus", "x")])
            )
            .is_err()
        );
        assert!(
            report(
                "",
                &form(&[
                    ("CallSid", "CA1"),
                    ("CallStatus", "x"),
                    ("SequenceNumber", "two")
                ])
            )
            .is_err()
        );
    }
}

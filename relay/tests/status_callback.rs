//! `POST /api/twilio/status` on the real relay: signature checked, bad callbacks refused
//! with a 400, good ones answered 204 and forwarded to (fake) control.

// Test code: a failed unwrap is a failed test, with its location.
#![allow(clippy::unwrap_used)]

mod support;

use support::*;

#[tokio::test]
async fn status_callbacks_are_checked_and_forwarded() {
    let control = FakeControl::default();
    let caddr = start_control(control.clone()).await;
    let model = start_model().await;
    let relay = start_relay(&model.url, Some(caddr), |_| {}).await;
    let sid = "CA0123456789abcdef0123456789abcdef";
    let busy = [
        ("CallSid", sid),
        ("CallStatus", "busy"),
        ("SequenceNumber", "3"),
        ("SipResponseCode", "486"),
        ("CallDuration", "0"),
    ];
    let (status, _, _) = post_form(&relay, "/api/twilio/status?callId=call_7", &busy, false).await;
    assert_eq!(status, 403, "a wrong signature is refused");
    let (status, _, body) =
        post_form(&relay, "/api/twilio/status?callId=call_7", &busy, true).await;
    assert_eq!(status, 204, "{body}");
    let amd = [("CallSid", sid), ("AnsweredBy", "machine_end_beep")];
    let (status, _, _) = post_form(&relay, "/api/twilio/status?callId=call_7", &amd, true).await;
    assert_eq!(status, 204);
    let (status, _, body) = post_form(
        &relay,
        "/api/twilio/status?callId=call_7",
        &[
            ("CallSid", sid),
            ("CallStatus", "busy"),
            ("SequenceNumber", "x"),
        ],
        true,
    )
    .await;
    assert_eq!(status, 400, "{body}");
    let reports = within("two reports forwarded", async {
        loop {
            let reports = control.state.lock().unwrap().status_reports.clone();
            if reports.len() >= 2 {
                return reports;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    })
    .await;
    let busy = reports.iter().find(|r| r.call_status == "busy").unwrap();
    assert_eq!(busy.call_id, "call_7");
    assert_eq!(busy.twilio_call_sid, sid);
    assert_eq!((busy.sequence_number, busy.sip_response_code), (3, 486));
    let amd = reports.iter().find(|r| !r.answered_by.is_empty()).unwrap();
    assert_eq!(amd.answered_by, "machine_end_beep");
    assert_eq!(reports.len(), 2, "the malformed callback was not forwarded");
}

//! What a relay sends is checked before it is stored or put in TwiML: one real
//! `callbridge-control` process on a real redis-server, a test client as the relay.

mod common;

use callbridge_proto::pb;
use common::*;
use pb::call_event::Kind;
use tonic::Code;

fn transferred(to: &str) -> Kind {
    Kind::Ended(pb::Ended {
        reason: pb::EndReason::Transferred as i32,
        detail: String::new(),
        transfer_to: to.to_owned(),
    })
}

/// A `transfer_to` that is not an E.164 number never reaches the record or the `<Dial>`
/// of the after-stream answer: the event is refused naming the field, the call stays
/// live, and a valid number afterwards is stored and dialled.
#[tokio::test]
async fn a_transfer_target_that_is_not_a_number_is_refused() {
    let AttachedCall {
        redis: _redis,
        control: _control,
        mut calls,
        mut relay,
        id,
        mut stream,
    } = attached_call("relay-input").await;
    stream.ack(event(&id, 1, started("relay-1"))).await;
    let err = stream
        .send(event(&id, 2, transferred("sip:attacker@evil.example")))
        .await
        .expect_err("refused");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().starts_with("event.ended.transfer_to"),
        "{}",
        err.message()
    );
    let got = get_call(&mut calls, &id).await;
    assert_eq!(got.last_seq, 1, "the refused event was not stored");
    assert_eq!(got.status, pb::CallStatus::InProgress as i32);
    assert!(got.transfer_to.is_empty(), "{got:?}");
    drop(stream);

    // The relay comes back (same relay id) with a real number: stored and dialled.
    let mut stream = eventually("reattached", || {
        let mut relay = relay.clone();
        let id = id.clone();
        async move { attach(&mut relay, &id, "relay-1", true).await.ok() }
    })
    .await;
    stream.ack(event(&id, 2, transferred("+15550001111"))).await;
    let got = get_call(&mut calls, &id).await;
    assert_eq!(got.transfer_to, "+15550001111");
    assert_eq!(
        after_next(&mut relay, &id).await,
        Some(pb::after_response::Next::DialNumber("+15550001111".into()))
    );
}

/// Call sids from a relay must have Twilio's shape (`CA` + 32 hex) wherever they enter.
#[tokio::test]
async fn call_sids_not_of_twilios_shape_are_refused_where_a_relay_sends_them() {
    let AttachedCall {
        redis: _redis,
        control: _control,
        mut calls,
        mut relay,
        id,
        mut stream,
    } = attached_call("relay-sids").await;
    for sid in [
        "CA1",
        "CA0000000000000000000000000000000g",
        "<Dial>",
        "ca00000000000000000000000000000001",
    ] {
        let status = refused(
            "admit with a bad sid",
            Code::InvalidArgument,
            relay.admit(pb::AdmitRequest {
                call_id: String::new(),
                twilio_call_sid: sid.to_owned(),
                from: "+15550002222".into(),
                to: "+15550003333".into(),
                twilio_direction: "inbound".into(),
                account_sid: String::new(),
            }),
        )
        .await;
        assert!(
            status.message().starts_with("twilio_call_sid"),
            "{sid}: {status:?}"
        );
    }
    let err = stream
        .send(event(
            &id,
            1,
            Kind::Started(pb::Started {
                twilio_call_sid: "CA-not-a-sid".into(),
                stream_sid: "MZ0001".into(),
                relay_id: "relay-1".into(),
                resumed: false,
            }),
        ))
        .await
        .expect_err("refused");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().starts_with("event.started.twilio_call_sid"),
        "{}",
        err.message()
    );
    let got = get_call(&mut calls, &id).await;
    assert_eq!(got.last_seq, 0);
    assert!(got.twilio_call_sid.is_empty(), "{got:?}");
}

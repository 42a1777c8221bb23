//! The Twilio REST client against the fake Twilio REST server (real HTTP on loopback,
//! every request validated against Twilio's OpenAPI description of the Call resource).

use std::time::Duration;

use callbridge_control::config::Secret;
use callbridge_control::twilio_rest::{
    CreateCall, TwilioConfig, TwilioError, TwilioRest, UpdateCall,
};
use callbridge_testkit::fake_twilio_rest::{FakeTwilio, FakeTwilioConfig, Lifecycle};
use callbridge_testkit::with_timeout;

const ACCOUNT: &str = "AC0123456789abcdef0123456789abcdef";
const TOKEN: &str = "fake-auth-token";
const LIMIT: Duration = Duration::from_secs(20);

fn client(fake: &FakeTwilio, user: &str, password: &str, retries: u32) -> TwilioRest {
    TwilioRest::new(TwilioConfig {
        base_url: fake.base_url(),
        account_sid: ACCOUNT.into(),
        username: user.into(),
        password: Secret::new(password),
        timeout: Duration::from_secs(5),
        max_retries: retries,
        backoff_base: Duration::from_millis(20),
        backoff_max: Duration::from_millis(100),
    })
    .expect("client builds")
}

fn create(to: &str) -> CreateCall {
    CreateCall {
        to: to.into(),
        from: "+14155550100".into(),
        url: "https://relay.test/api/twilio/voice?callId=c1".into(),
        status_callback: Some("https://relay.test/api/twilio/status?callId=c1".into()),
        status_callback_events: vec!["initiated", "ringing", "answered", "completed"],
        timeout_secs: Some(15),
        time_limit_secs: Some(600),
        caller_id: None,
        machine_detection: Some((
            "DetectMessageEnd",
            "https://relay.test/api/twilio/status?callId=c1".into(),
        )),
    }
}

async fn fake() -> FakeTwilio {
    let mut cfg = FakeTwilioConfig::new(ACCOUNT, TOKEN);
    cfg.api_key = Some((
        "SK0123456789abcdef0123456789abcdef".into(),
        "key-secret".into(),
    ));
    cfg.default_lifecycle = Lifecycle::RingForever;
    FakeTwilio::start(cfg).await.expect("fake starts")
}

#[tokio::test]
async fn create_is_valid_for_twilio_and_cancel_ends_a_ringing_call() {
    let fake = fake().await;
    let twilio = client(&fake, ACCOUNT, TOKEN, 0);
    let call = with_timeout(LIMIT, "create", twilio.create_call(&create("+14155550123")))
        .await
        .expect("the fake accepts every field we send");
    assert!(
        call.sid.starts_with("CA") && call.sid.len() == 34,
        "{}",
        call.sid
    );
    assert_eq!(call.status, "queued");
    let log = fake.requests();
    assert_eq!(log.len(), 1);
    assert_eq!(log[0].status, 201);
    assert_eq!(
        log[0]
            .params
            .iter()
            .filter(|(k, _)| k == "StatusCallbackEvent")
            .count(),
        4
    );
    assert_eq!(log[0].param("AsyncAmd"), Some("true"));
    assert!(
        fake.wait_calls(LIMIT, |calls| calls.iter().any(|c| c.status == "ringing"))
            .await,
        "the call rings"
    );
    let fetched = twilio.fetch_call(&call.sid).await.expect("fetch");
    assert_eq!(fetched.status, "ringing");
    let canceled = twilio
        .update_call(&call.sid, &UpdateCall::Cancel)
        .await
        .expect("cancel");
    assert_eq!(canceled.status, "canceled");
    // A redirect of a call that is not in progress is Twilio's 21220, kept as such.
    let err = twilio
        .update_call(
            &call.sid,
            &UpdateCall::Redirect("https://relay.test/resume".into()),
        )
        .await
        .expect_err("not in progress");
    assert_eq!(err.code(), 21220);
    let listed = twilio.list_calls_to("+14155550123").await.expect("list");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].sid, call.sid);
}

#[tokio::test]
async fn an_api_key_authenticates_and_a_wrong_secret_is_not_retried() {
    let fake = fake().await;
    let by_key = client(&fake, "SK0123456789abcdef0123456789abcdef", "key-secret", 3);
    by_key
        .create_call(&create("+14155550124"))
        .await
        .expect("API key accepted");
    let wrong = client(&fake, ACCOUNT, "not-the-token", 3);
    let err = wrong
        .create_call(&create("+14155550125"))
        .await
        .expect_err("wrong token");
    match &err {
        TwilioError::Api { status, code, .. } => assert_eq!((*status, *code), (401, 20003)),
        other => panic!("expected a 401, got {other:?}"),
    }
    assert!(!err.to_string().contains("not-the-token"));
    assert_eq!(fake.requests().len(), 2, "a 401 is not retried");
}

#[tokio::test]
async fn too_many_requests_and_server_errors_are_retried_then_given_up() {
    let fake = fake().await;
    let twilio = client(&fake, ACCOUNT, TOKEN, 3);
    fake.fail_next(2, 429, 20429);
    fake.fail_next(1, 503, 20500);
    twilio
        .create_call(&create("+14155550126"))
        .await
        .expect("succeeds after backing off");
    let statuses: Vec<u16> = fake.requests().iter().map(|r| r.status).collect();
    assert_eq!(statuses, [429, 429, 503, 201]);
    fake.fail_next(10, 500, 20500);
    let err = twilio
        .create_call(&create("+14155550127"))
        .await
        .expect_err("retries exhausted");
    assert_eq!((err.code(), err.is_refusal()), (20500, false));
    assert_eq!(fake.requests().len(), 4 + 4, "one try and three retries");
}

#[tokio::test]
async fn a_refused_number_keeps_twilios_code_and_message() {
    let fake = fake().await;
    fake.script(
        "+15005550001",
        Lifecycle::Reject {
            status: 400,
            code: 21211,
            message: "Invalid 'To' Phone Number: +15005550001".into(),
        },
    );
    let twilio = client(&fake, ACCOUNT, TOKEN, 3);
    let err = twilio
        .create_call(&create("+15005550001"))
        .await
        .expect_err("refused");
    assert!(err.is_refusal());
    assert_eq!(err.code(), 21211);
    assert!(
        err.to_string().contains("Invalid 'To' Phone Number"),
        "{err}"
    );
    assert_eq!(fake.requests().len(), 1, "a 400 is not retried");
}

//! End-to-end: campaigns that really dial. Real control (one, or several on one Redis),
//! real relay and redis-server; the fake Twilio REST API (every request validated against
//! Twilio's spec, signed status callbacks to the relay), the sim caller and the fake
//! Realtime model for answered calls.
//!
//! What is measured comes from the fake's own logs: accepted creates (with their time and
//! the call id in their `Url`) and the final status callbacks. Pacing is a count bound
//! over windows, concurrency a count of overlapping [create, final callback] intervals.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use callbridge_proto::pb;
use callbridge_testkit::conversation::Conversation;
use callbridge_testkit::fake_realtime::FakeRealtime;
use callbridge_testkit::fake_twilio_rest::{FakeTwilio, FakeTwilioConfig, Lifecycle, RelayTarget};
use callbridge_testkit::procs::{Proc, free_addr};
use callbridge_testkit::sim_caller::LoadBalancer;
use callbridge_tests::{
    APP_TOKEN, Bearer, PUBLIC_URL, READY, RELAY_TOKEN, TWILIO_TOKEN, World, agent_settings,
    flatten, with_timeout,
};
use tonic::Code;

const ACCOUNT: &str = "AC00000000000000000000000000000ca5";
const LIMIT: Duration = Duration::from_secs(50);
const FROM: &str = "+14155550100";

type CallsClient = pb::calls_client::CallsClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Bearer>,
>;

fn twilio_env(twilio: &FakeTwilio) -> Vec<(&'static str, String)> {
    vec![
        ("TWILIO_ACCOUNT_SID", ACCOUNT.to_owned()),
        ("TWILIO_AUTH_TOKEN", TWILIO_TOKEN.to_owned()),
        ("TWILIO_API_BASE_URL", twilio.base_url()),
        // A create is over (answered or given up) within ~3 s, so a take-over may create
        // an unrecorded attempt soon.
        ("TWILIO_HTTP_TIMEOUT_MS", "1000".to_owned()),
        ("TWILIO_MAX_RETRIES", "1".to_owned()),
    ]
}

async fn fake_twilio() -> FakeTwilio {
    FakeTwilio::start(FakeTwilioConfig::new(ACCOUNT, TWILIO_TOKEN))
        .await
        .expect("fake twilio starts")
}

fn route_to_relays(twilio: &FakeTwilio, world: &World) {
    twilio.set_relay(RelayTarget {
        public_base: PUBLIC_URL.to_owned(),
        relays: LoadBalancer::new(world.relay_addrs()),
        after_on_abnormal_close: false,
    });
}

fn number(i: usize) -> String {
    format!("+1415555{i:04}")
}

fn settings(agent: &str, cps: f64, max: u32, retry: pb::RetryPolicy) -> pb::CampaignSettings {
    pb::CampaignSettings {
        agent_id: agent.to_owned(),
        from: FROM.to_owned(),
        calls_per_second: cps,
        max_concurrent: max,
        retry: Some(retry),
        dial: Some(pb::DialOptions {
            // Scaled by the fake (0.01): a no-answer rings 50 ms.
            timeout_secs: 5,
            ..Default::default()
        }),
    }
}

async fn create_campaign(
    calls: &mut CallsClient,
    id: &str,
    settings: pb::CampaignSettings,
    numbers: &[String],
) -> pb::Campaign {
    let campaign = calls
        .create_campaign(pb::CreateCampaignRequest {
            campaign_id: id.to_owned(),
            settings: Some(settings),
        })
        .await
        .expect("CreateCampaign")
        .into_inner();
    let added = calls
        .add_campaign_numbers(pb::AddCampaignNumbersRequest {
            campaign_id: id.to_owned(),
            numbers: numbers
                .iter()
                .map(|n| pb::CampaignNumber {
                    number: n.clone(),
                    metadata: [("crm_id".to_owned(), format!("crm-{n}"))].into(),
                })
                .collect(),
        })
        .await
        .expect("AddCampaignNumbers")
        .into_inner();
    assert_eq!(added.numbers as usize, numbers.len());
    campaign
}

fn req(id: &str) -> pb::CampaignRequest {
    pb::CampaignRequest {
        campaign_id: id.to_owned(),
    }
}

async fn get_campaign(calls: &mut CallsClient, id: &str) -> pb::Campaign {
    calls
        .get_campaign(req(id))
        .await
        .expect("GetCampaign")
        .into_inner()
}

fn state(c: &pb::Campaign) -> pb::CampaignState {
    pb::CampaignState::try_from(c.state).unwrap_or_default()
}

fn progress(c: &pb::Campaign) -> pb::CampaignProgress {
    c.progress.unwrap_or_default()
}

/// Polls GetCampaign until `cond` holds (bounded).
async fn wait_campaign(
    calls: &mut CallsClient,
    id: &str,
    what: &str,
    cond: impl Fn(&pb::Campaign) -> bool,
) -> pb::Campaign {
    let deadline = tokio::time::Instant::now() + LIMIT;
    loop {
        let c = get_campaign(calls, id).await;
        if cond(&c) {
            return c;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "campaign {id}: {what} not reached: {c:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every call of a campaign, from ListCalls.
async fn campaign_calls(calls: &mut CallsClient, id: &str) -> Vec<pb::Call> {
    let mut out = Vec::new();
    let mut token = String::new();
    loop {
        let page = calls
            .list_calls(pb::ListCallsRequest {
                campaign_id: id.to_owned(),
                page_size: 500,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .expect("ListCalls")
            .into_inner();
        out.extend(page.calls);
        if page.next_page_token.is_empty() {
            return out;
        }
        token = page.next_page_token;
    }
}

fn call_id_of(url: &str) -> Option<String> {
    url.split_once("callId=")
        .map(|(_, rest)| rest.split('&').next().unwrap_or_default().to_owned())
}

/// Accepted creates: (time, call id, to).
fn creates(twilio: &FakeTwilio) -> Vec<(Duration, String, String)> {
    twilio
        .requests()
        .into_iter()
        .filter(|r| r.is_create() && r.status < 300)
        .map(|r| {
            (
                r.at,
                r.param("Url").and_then(call_id_of).unwrap_or_default(),
                r.param("To").unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

/// The most accepted creates in any window of `window`.
fn max_in_window(times: &[Duration], window: Duration) -> usize {
    let mut sorted = times.to_vec();
    sorted.sort();
    let mut best = 0;
    let mut start = 0;
    for end in 0..sorted.len() {
        while sorted[end] - sorted[start] >= window {
            start += 1;
        }
        best = best.max(end - start + 1);
    }
    best
}

/// The most calls live at Twilio at once: each from its create to its final callback.
fn max_concurrent_at_twilio(twilio: &FakeTwilio) -> usize {
    let mut ends: HashMap<String, Duration> = HashMap::new();
    for cb in twilio.callbacks() {
        let status = cb.param("CallStatus").unwrap_or_default();
        if ["completed", "busy", "no-answer", "failed", "canceled"].contains(&status)
            && let Some(id) = call_id_of(&cb.url)
        {
            let end = ends.entry(id).or_insert(cb.at);
            *end = (*end).min(cb.at);
        }
    }
    let mut points: Vec<(Duration, i32)> = Vec::new();
    for (at, id, _) in creates(twilio) {
        points.push((at, 1));
        // A call without a final callback yet counts as live to the end.
        points.push((ends.get(&id).copied().unwrap_or(Duration::MAX), -1));
    }
    // Ends before starts at the same instant.
    points.sort();
    let (mut live, mut best) = (0i32, 0i32);
    for (_, d) in points {
        live += d;
        best = best.max(live);
    }
    usize::try_from(best).unwrap_or(0)
}

/// No attempt was created twice at Twilio, and every accepted create is one of the
/// campaign's calls, to that call's number; per number, calls = creates.
fn assert_one_create_per_attempt(twilio: &FakeTwilio, calls: &[pb::Call]) {
    let by_id: HashMap<&str, &pb::Call> = calls.iter().map(|c| (c.call_id.as_str(), c)).collect();
    let mut seen: HashMap<String, usize> = HashMap::new();
    for (_, id, to) in creates(twilio) {
        let call = by_id
            .get(id.as_str())
            .unwrap_or_else(|| panic!("create for unknown call {id}"));
        assert_eq!(call.to, to);
        *seen.entry(id).or_default() += 1;
    }
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "attempts created twice: {twice:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_campaign_paces_caps_retries_and_gives_every_number_one_outcome() {
    let script = Conversation::sample();
    let twilio = fake_twilio().await;
    let mut builder = World::builder(FakeRealtime::builder().script(script.clone()).speed(4.0));
    for (k, v) in twilio_env(&twilio) {
        builder = builder.control_env(k, &v);
    }
    let world = builder.start().await;
    route_to_relays(&twilio, &world);
    let greeting = script.greeting.as_ref().map(|g| g.text.as_str());
    let agent = world
        .create_agent("campaigner", agent_settings("campaigner", greeting))
        .await;

    // 40 numbers, by i % 10: 0-2 busy, 3 no answer, 4 answered, 5 carrier failure,
    // 6 refused (21211), 7 do-not-call, 8-9 busy then never again (same as busy).
    let numbers: Vec<String> = (0..40).map(number).collect();
    let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
    for (i, n) in numbers.iter().enumerate() {
        let kind = i % 10;
        kinds.insert(n.clone(), kind);
        let lifecycle = match kind {
            3 => Lifecycle::NoAnswer,
            4 => Lifecycle::Answer {
                ring_ms: 50,
                script: script.clone(),
            },
            5 => Lifecycle::Failed {
                ring_ms: 50,
                sip_code: 503,
            },
            6 => Lifecycle::Reject {
                status: 400,
                code: 21211,
                message: format!("The 'To' number {n} is not a valid phone number."),
            },
            _ => Lifecycle::Busy { ring_ms: 150 },
        };
        twilio.script(n, lifecycle);
    }
    let mut calls = world.calls();
    let dnc: Vec<String> = numbers.iter().filter(|n| kinds[*n] == 7).cloned().collect();
    calls
        .add_do_not_call(pb::DoNotCallRequest { numbers: dnc })
        .await
        .expect("AddDoNotCall");

    let (cps, max) = (8.0, 4);
    let retry = pb::RetryPolicy {
        busy: true,
        no_answer: true,
        failed: true,
        retryable_failed_codes: vec![],
        max_attempts: 2,
        delay_ms: 300,
    };
    create_campaign(
        &mut calls,
        "paced",
        settings(&agent, cps, max, retry),
        &numbers,
    )
    .await;
    let started = calls.start_campaign(req("paced")).await.expect("start");
    assert_eq!(state(&started.into_inner()), pb::CampaignState::Running);
    // A 429 on the way: the client backs off and tries again, the campaign goes on.
    twilio.fail_next(1, 429, 20429);

    let done = with_timeout(
        LIMIT,
        "campaign completes",
        wait_campaign(&mut calls, "paced", "completed", |c| {
            state(c) == pb::CampaignState::Completed
        }),
    )
    .await;
    let p = progress(&done);
    // busy (0-2, 8, 9): 20 numbers; no-answer 4; answered 4; carrier failure 4; refused 4;
    // do-not-call 4. Everything but answered, refused and do-not-call retried once.
    assert_eq!(p.numbers, 40);
    assert_eq!(p.remaining, 0);
    assert_eq!(p.in_flight, 0);
    assert_eq!(p.busy, 20, "{p:?}");
    assert_eq!(p.no_answer, 4, "{p:?}");
    assert_eq!(p.answered, 4, "{p:?}");
    assert_eq!(p.failed, 8, "{p:?}");
    assert_eq!(p.do_not_call, 4, "{p:?}");
    assert_eq!(p.retried, 20 + 4 + 4, "{p:?}");
    assert_eq!(p.dialled, 28 * 2 + 4 + 4, "{p:?}");

    // Pacing: at most 1 + rate·window starts in any window (the bucket holds one token).
    let times: Vec<Duration> = creates(&twilio).iter().map(|c| c.0).collect();
    assert_eq!(times.len(), 64 - 4, "the refused creates are not accepted");
    for secs in [1u64, 2, 3] {
        let most = max_in_window(&times, Duration::from_secs(secs));
        #[allow(clippy::cast_precision_loss)]
        let bound = 1 + (cps * secs as f64) as usize;
        assert!(most <= bound, "{most} creates in {secs} s; at most {bound}");
    }
    let live = max_concurrent_at_twilio(&twilio);
    assert!(live <= max as usize, "{live} calls live at Twilio at once");
    assert!(live >= 2, "the campaign ran calls side by side ({live})");

    let all = campaign_calls(&mut calls, "paced").await;
    assert_one_create_per_attempt(&twilio, &all);
    let mut per_number: BTreeMap<&str, Vec<&pb::Call>> = BTreeMap::new();
    for c in &all {
        per_number.entry(c.to.as_str()).or_default().push(c);
    }
    for n in &numbers {
        let tries = per_number.get(n.as_str()).map_or(0, Vec::len);
        let expected = match kinds[n] {
            4 | 6 => 1,
            7 => 0,
            _ => 2,
        };
        assert_eq!(tries, expected, "calls to {n} (kind {})", kinds[n]);
        for c in per_number.get(n.as_str()).into_iter().flatten() {
            let status = pb::CallStatus::try_from(c.status).unwrap_or_default();
            assert!(
                !matches!(
                    status,
                    pb::CallStatus::Created | pb::CallStatus::Ringing | pb::CallStatus::InProgress
                ),
                "{c:?} ended"
            );
            assert_eq!(c.metadata.get("crm_id"), Some(&format!("crm-{n}")));
            assert!(c.dialed);
        }
    }
    // Retries waited for the delay: the second create of a number comes after the first
    // call's final callback plus the delay.
    let mut first_end: HashMap<String, Duration> = HashMap::new();
    for cb in twilio.callbacks() {
        if cb.param("CallStatus") == Some("busy")
            && let Some(to) = cb.param("To")
        {
            first_end.entry(to.to_owned()).or_insert(cb.at);
        }
    }
    let mut create_times: BTreeMap<String, Vec<Duration>> = BTreeMap::new();
    for (at, _, to) in creates(&twilio) {
        create_times.entry(to).or_default().push(at);
    }
    for (to, end) in &first_end {
        let second = create_times[to][1];
        assert!(
            second >= *end + Duration::from_millis(300),
            "{to}: retried {second:?} before its busy at {end:?} + 300 ms"
        );
    }
    let refused = &per_number[number(6).as_str()][0];
    assert_eq!(refused.twilio_error_code, 21211);
    // Answered calls spoke with the agent.
    let answered = &per_number[number(4).as_str()][0];
    let transcript = world.transcript(&answered.call_id).await;
    assert!(!flatten(&transcript).is_empty(), "{transcript:?}");
    // Every request was valid for Twilio's spec: the only refusals are the scripted
    // 21211s and the forced 429s.
    for r in twilio.requests() {
        let scripted = r.param("To").is_some_and(|t| kinds.get(t) == Some(&6));
        assert!(r.status < 400 || r.status == 429 || scripted, "{r:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_resume_cancel_and_refusals() {
    let twilio = fake_twilio().await;
    let mut builder = World::builder(FakeRealtime::builder());
    for (k, v) in twilio_env(&twilio) {
        builder = builder.control_env(k, &v);
    }
    let world = builder.start().await;
    route_to_relays(&twilio, &world);
    let agent = world
        .create_agent("pauser", agent_settings("pauser", None))
        .await;
    let numbers: Vec<String> = (100..130).map(number).collect();
    for n in &numbers {
        twilio.script(n, Lifecycle::Busy { ring_ms: 100 });
    }
    let mut calls = world.calls();
    let no_retry = pb::RetryPolicy::default();
    create_campaign(
        &mut calls,
        "pr",
        settings(&agent, 10.0, 3, no_retry.clone()),
        &numbers,
    )
    .await;

    // Refusals: a bad number names its index and adds nothing; wrong transitions.
    let mut bad: Vec<pb::CampaignNumber> = (0..3)
        .map(|i| pb::CampaignNumber {
            number: number(200 + i),
            ..Default::default()
        })
        .collect();
    bad[2].number = "4155550123".into();
    let err = calls
        .add_campaign_numbers(pb::AddCampaignNumbersRequest {
            campaign_id: "pr".into(),
            numbers: bad,
        })
        .await
        .expect_err("refused");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().starts_with("numbers[2].number:"),
        "{}",
        err.message()
    );
    assert_eq!(progress(&get_campaign(&mut calls, "pr").await).numbers, 30);
    let err = calls.pause_campaign(req("pr")).await.expect_err("draft");
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(err.message(), "campaign 'pr' is draft; cannot pause it");
    let err = calls.get_campaign(req("nope")).await.expect_err("missing");
    assert_eq!(err.code(), Code::NotFound);
    let err = calls
        .create_campaign(pb::CreateCampaignRequest {
            campaign_id: "pr".into(),
            settings: Some(settings(&agent, 10.0, 3, no_retry.clone())),
        })
        .await
        .expect_err("taken");
    assert_eq!(err.code(), Code::AlreadyExists);
    let err = calls
        .create_campaign(pb::CreateCampaignRequest {
            campaign_id: "fast".into(),
            settings: Some(settings(&agent, 0.0, 3, no_retry.clone())),
        })
        .await
        .expect_err("no pace");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().starts_with("settings.calls_per_second"),
        "{}",
        err.message()
    );

    calls.start_campaign(req("pr")).await.expect("start");
    let err = calls.start_campaign(req("pr")).await.expect_err("running");
    assert_eq!(err.code(), Code::FailedPrecondition);
    wait_campaign(&mut calls, "pr", "5 dialled", |c| progress(c).dialled >= 5).await;
    calls.pause_campaign(req("pr")).await.expect("pause");
    // Paused: the calls in flight end, and nothing new is created.
    let paused = wait_campaign(&mut calls, "pr", "in flight drained", |c| {
        progress(c).in_flight == 0
    })
    .await;
    let before = creates(&twilio).len();
    assert_eq!(before, progress(&paused).dialled as usize);
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        creates(&twilio).len(),
        before,
        "nothing dialled while paused"
    );
    assert_eq!(
        state(&get_campaign(&mut calls, "pr").await),
        pb::CampaignState::Paused
    );

    calls.resume_campaign(req("pr")).await.expect("resume");
    wait_campaign(&mut calls, "pr", "more dialled", |c| {
        progress(c).dialled as usize >= before + 5
    })
    .await;
    calls.cancel_campaign(req("pr")).await.expect("cancel");
    let canceled = wait_campaign(&mut calls, "pr", "settled", |c| progress(c).remaining == 0).await;
    assert_eq!(state(&canceled), pb::CampaignState::Canceled);
    let p = progress(&canceled);
    assert!(p.canceled > 0, "{p:?}");
    assert_eq!(p.busy + p.canceled, 30, "{p:?}");
    assert_eq!(p.busy, p.dialled, "{p:?}");
    let err = calls
        .resume_campaign(req("pr"))
        .await
        .expect_err("canceled");
    assert_eq!(err.code(), Code::FailedPrecondition);
    let all = campaign_calls(&mut calls, "pr").await;
    assert_eq!(all.len(), p.dialled as usize);
    assert_one_create_per_attempt(&twilio, &all);
}

/// A control replica with Twilio configured, on the world's Redis.
fn dialer_replica(world: &World, twilio: &FakeTwilio, id: &str) -> Proc {
    let addr = free_addr().expect("a free port");
    let mut env: Vec<(String, String)> = vec![
        ("CONTROL_LISTEN".into(), addr.to_string()),
        ("REDIS_URL".into(), world.redis.url()),
        ("CONTROL_APP_TOKENS".into(), APP_TOKEN.into()),
        ("CONTROL_RELAY_TOKENS".into(), RELAY_TOKEN.into()),
        ("CONTROL_METRICS_LISTEN".into(), String::new()),
        ("RELAY_PUBLIC_URL".into(), PUBLIC_URL.into()),
        ("CONTROL_LOG".into(), "info".into()),
        ("CONTROL_ID".into(), id.into()),
        ("CONTROL_LEASE_SECS".into(), "3".into()),
        ("CONTROL_HEARTBEAT_TIMEOUT_SECS".into(), "2".into()),
    ];
    env.extend(
        twilio_env(twilio)
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v)),
    );
    Proc::spawn("callbridge-control", env, addr).expect("control spawns")
}

async fn client_of(proc: &Proc) -> CallsClient {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", proc.addr))
        .expect("url")
        .connect()
        .await
        .expect("control reachable");
    pb::calls_client::CallsClient::with_interceptor(channel, Bearer::new(APP_TOKEN))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dialer_moves_to_another_replica_when_its_holder_dies() {
    let twilio = fake_twilio().await;
    // The world's control has no Twilio account: it only serves the relay (status
    // callbacks land in the shared store); the two others dial.
    let world = World::builder(FakeRealtime::builder())
        .control_env("CONTROL_LEASE_SECS", "3")
        .control_env("CONTROL_HEARTBEAT_TIMEOUT_SECS", "2")
        .start()
        .await;
    route_to_relays(&twilio, &world);
    let agent = world
        .create_agent("replicas", agent_settings("replicas", None))
        .await;
    let mut replicas = vec![
        dialer_replica(&world, &twilio, "dialer-b"),
        dialer_replica(&world, &twilio, "dialer-c"),
    ];
    for r in &mut replicas {
        r.wait_grpc_serving(READY)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let numbers: Vec<String> = (300..340).map(number).collect();
    for n in &numbers {
        twilio.script(n, Lifecycle::Busy { ring_ms: 300 });
    }
    let mut calls = client_of(&replicas[0]).await;
    let retry = pb::RetryPolicy {
        busy: true,
        max_attempts: 2,
        delay_ms: 200,
        ..Default::default()
    };
    create_campaign(
        &mut calls,
        "failover",
        settings(&agent, 10.0, 6, retry),
        &numbers,
    )
    .await;
    calls.start_campaign(req("failover")).await.expect("start");
    wait_campaign(&mut calls, "failover", "15 dialled", |c| {
        progress(c).dialled >= 15
    })
    .await;

    let holder = replicas
        .iter()
        .position(|r| r.log_text().contains("Dialing campaign (lease taken)."))
        .expect("one replica dials");
    let survivor = 1 - holder;
    replicas[holder].kill();
    let mut calls = client_of(&replicas[survivor]).await;
    let done = with_timeout(
        LIMIT,
        "campaign completes on the survivor",
        wait_campaign(&mut calls, "failover", "completed", |c| {
            state(c) == pb::CampaignState::Completed
        }),
    )
    .await;
    assert!(
        replicas[survivor]
            .log_text()
            .contains("Dialing campaign (lease taken)."),
        "the survivor took the campaign over"
    );
    let p = progress(&done);
    assert_eq!((p.busy, p.remaining), (40, 0), "{p:?}");
    assert_eq!(p.dialled, 80, "{p:?}");
    let all = campaign_calls(&mut calls, "failover").await;
    assert_eq!(all.len(), 80);
    assert_one_create_per_attempt(&twilio, &all);
    assert_eq!(
        creates(&twilio).len(),
        80,
        "each attempt created once at Twilio"
    );
}

/// The holder dies after Twilio created an attempt's call and before it learnt the sid,
/// and Twilio sends no callback: the replica taking over finds the call at Twilio (calls
/// to the number) and adopts it instead of dialling the number again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attempt_created_but_not_recorded_is_adopted_not_dialled_again() {
    let twilio = fake_twilio().await;
    let world = World::builder(FakeRealtime::builder())
        .control_env("CONTROL_LEASE_SECS", "3")
        .control_env("CONTROL_HEARTBEAT_TIMEOUT_SECS", "2")
        .start()
        .await;
    route_to_relays(&twilio, &world);
    let agent = world
        .create_agent("adopter", agent_settings("adopter", None))
        .await;
    let mut replicas = vec![
        dialer_replica(&world, &twilio, "dialer-d"),
        dialer_replica(&world, &twilio, "dialer-e"),
    ];
    for r in &mut replicas {
        r.wait_grpc_serving(READY)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let to = number(500);
    twilio.script(&to, Lifecycle::Busy { ring_ms: 100 });
    twilio.silence_callbacks(&to);
    // Longer than the client's timeout: the holder never sees the answer.
    twilio.delay_create_answers(Duration::from_secs(20));
    let mut calls = client_of(&replicas[0]).await;
    create_campaign(
        &mut calls,
        "adopt",
        settings(&agent, 5.0, 1, pb::RetryPolicy::default()),
        std::slice::from_ref(&to),
    )
    .await;
    calls.start_campaign(req("adopt")).await.expect("start");
    assert!(
        twilio
            .wait_calls(LIMIT, |calls| calls.iter().any(|c| c.to == to))
            .await,
        "Twilio has the call"
    );
    let holder = replicas
        .iter()
        .position(|r| r.log_text().contains("Dialing campaign (lease taken)."))
        .expect("one replica dials");
    replicas[holder].kill();
    let survivor = 1 - holder;
    let mut calls = client_of(&replicas[survivor]).await;
    let done = with_timeout(
        LIMIT,
        "campaign completes on the survivor",
        wait_campaign(&mut calls, "adopt", "completed", |c| {
            state(c) == pb::CampaignState::Completed
        }),
    )
    .await;
    let p = progress(&done);
    assert_eq!((p.busy, p.dialled, p.remaining), (1, 1, 0), "{p:?}");
    assert!(
        replicas[survivor]
            .log_text()
            .contains("Adopting the call Twilio placed for an unrecorded attempt."),
        "the survivor adopted the call"
    );
    let created = creates(&twilio);
    assert_eq!(created.len(), 1, "dialled once: {created:?}");
    let all = campaign_calls(&mut calls, "adopt").await;
    assert_eq!(all.len(), 1);
    let fake_sid = twilio.calls()[0].sid.clone();
    assert_eq!(all[0].twilio_call_sid, fake_sid);
    assert_eq!(all[0].twilio_status, "busy");
    assert!(twilio.callbacks().is_empty(), "no callback recorded it");
}

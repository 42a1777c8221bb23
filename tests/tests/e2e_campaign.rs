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
use callbridge_testkit::fake_twilio_rest::{FakeTwilio, FakeTwilioConfig, Lifecycle};
use callbridge_testkit::procs::{Proc, free_addr};
use callbridge_tests::bench::max_in_window;
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
    let mut env = Vec::from(twilio.control_env());
    // A create is over (answered or given up) within ~3 s, so a take-over may create an
    // unrecorded attempt soon.
    env.push(("TWILIO_HTTP_TIMEOUT_MS", "1000".to_owned()));
    env.push(("TWILIO_MAX_RETRIES", "1".to_owned()));
    env
}

async fn fake_twilio() -> FakeTwilio {
    FakeTwilio::start(FakeTwilioConfig::new(ACCOUNT, TWILIO_TOKEN))
        .await
        .expect("fake twilio starts")
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
        calling_window: None,
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
                    time_zone: String::new(),
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

/// Polls GetCampaign until `cond` holds (within `LIMIT`).
async fn wait_campaign(
    calls: &mut CallsClient,
    id: &str,
    what: &str,
    cond: impl Fn(&pb::Campaign) -> bool,
) -> pb::Campaign {
    wait_campaign_for(calls, id, what, LIMIT, cond).await
}

/// Polls GetCampaign until `cond` holds (within `limit`).
async fn wait_campaign_for(
    calls: &mut CallsClient,
    id: &str,
    what: &str,
    limit: Duration,
    cond: impl Fn(&pb::Campaign) -> bool,
) -> pb::Campaign {
    let deadline = tokio::time::Instant::now() + limit;
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

/// Twilio's codes for a create it could not take then (after the client's retries).
const TWILIO_BUSY: [u32; 2] = [20429, 20500];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_campaign_paces_caps_retries_and_gives_every_number_one_outcome() {
    // The campaign: 200 numbers at 10 calls/s, at most 20 live; 30 % busy, 10 %
    // no answer, 10 % machines (which get the agent's voicemail), 20 % people.
    const NUMBERS: usize = 200;
    const VOICEMAIL: &str = "Hi, this is Acme about your delivery. Please call us back.";
    let slow = LIMIT * 3;
    let script = Conversation::sample();
    let twilio = fake_twilio().await;
    let mut builder = World::builder(FakeRealtime::builder().script(script.clone()).speed(4.0));
    for (k, v) in twilio_env(&twilio) {
        builder = builder.control_env(k, &v);
    }
    let world = builder.start().await;
    world.answer_from(&twilio);
    let greeting = script.greeting.as_ref().map(|g| g.text.as_str());
    let mut agent_config = agent_settings("campaigner", greeting);
    agent_config.voicemail = Some(pb::Voicemail {
        message: Some(pb::voicemail::Message::SpokenText(VOICEMAIL.into())),
    });
    let agent = world.create_agent("campaigner", agent_config).await;
    // A machine's greeting, then it records (silence) until the call is ended for it.
    let machine_greeting = Conversation {
        greeting: script.greeting.clone(),
        turns: Vec::new(),
    };

    // By i % 10: 0-2 busy, 3 no answer, 4 machine, 5 carrier failure, 6 refused (21211),
    // 7 do-not-call, 8-9 a person (detection says `human`).
    let numbers: Vec<String> = (0..NUMBERS).map(number).collect();
    let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
    for (i, n) in numbers.iter().enumerate() {
        let kind = i % 10;
        kinds.insert(n.clone(), kind);
        let lifecycle = match kind {
            3 => Lifecycle::NoAnswer,
            4 => Lifecycle::Machine {
                ring_ms: 50,
                detect_ms: 600,
                answered_by: "machine_end_beep".into(),
                script: machine_greeting.clone(),
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
            8 | 9 => Lifecycle::Machine {
                ring_ms: 50,
                detect_ms: 300,
                answered_by: "human".into(),
                script: script.clone(),
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

    let (cps, max) = (10.0, 20);
    let retry = pb::RetryPolicy {
        busy: true,
        no_answer: true,
        failed: true,
        retryable_failed_codes: vec![],
        max_attempts: 2,
        // Longer than the storms below last: a number they hit is hit once.
        delay_ms: 1000,
    };
    let mut campaign = settings(&agent, cps, max, retry);
    if let Some(dial) = campaign.dial.as_mut() {
        dial.machine_detection = pb::MachineDetection::DetectMessageEnd as i32;
    }
    create_campaign(&mut calls, "paced", campaign, &numbers).await;
    let started = calls.start_campaign(req("paced")).await.expect("start");
    assert_eq!(state(&started.into_inner()), pb::CampaignState::Running);
    // Twilio too busy for a while: four 429s, then four 500s. The client retries each
    // create once (TWILIO_MAX_RETRIES=1) after a backoff under 200 ms, so at least one
    // create fails in each, and the dialer dials its number again (it never rang). Both
    // are over before any first attempt can be retried (busy: 150 ms ring + 1 s delay),
    // so they change attempts, never final outcomes.
    twilio.fail_next(4, 429, 20429);
    twilio.fail_next(4, 500, 20500);

    let done = with_timeout(
        slow,
        "campaign completes",
        wait_campaign_for(&mut calls, "paced", "completed", slow, |c| {
            state(c) == pb::CampaignState::Completed
        }),
    )
    .await;
    let p = progress(&done);
    let per_kind = (NUMBERS / 10) as u32;
    // Final outcomes per number: busy (0-2), no answer, machine, failed (carrier and
    // refused), do-not-call, answered (8-9). A storm changes the attempts, not these.
    assert_eq!(p.numbers as usize, NUMBERS);
    assert_eq!(p.remaining, 0);
    assert_eq!(p.in_flight, 0);
    assert_eq!(p.busy, 3 * per_kind, "{p:?}");
    assert_eq!(p.no_answer, per_kind, "{p:?}");
    assert_eq!(p.machine, per_kind, "{p:?}");
    assert_eq!(p.failed, 2 * per_kind, "{p:?}");
    assert_eq!(p.do_not_call, per_kind, "{p:?}");
    assert_eq!(p.answered, 2 * per_kind, "{p:?}");

    let all = campaign_calls(&mut calls, "paced").await;
    assert_eq!(all.len(), p.dialled as usize);
    assert_one_create_per_attempt(&twilio, &all);
    let mut per_number: BTreeMap<&str, Vec<&pb::Call>> = BTreeMap::new();
    for c in &all {
        per_number.entry(c.to.as_str()).or_default().push(c);
    }
    let mut storm_hits = BTreeMap::<u32, usize>::new();
    let mut retried = 0;
    for n in &numbers {
        let mut tries = per_number.get(n.as_str()).cloned().unwrap_or_default();
        tries.sort_by_key(|c| c.created_at_ms);
        let hit: Vec<u32> = tries
            .iter()
            .map(|c| c.twilio_error_code)
            .filter(|code| TWILIO_BUSY.contains(code))
            .collect();
        assert!(
            hit.len() <= 1,
            "{n}: the storms hit it once at most: {tries:?}"
        );
        for code in &hit {
            *storm_hits.entry(*code).or_default() += 1;
        }
        // Busy, no-answer and carrier failures retry once; the others once more only
        // when a storm failed their create.
        let expected = match kinds[n] {
            7 => 0,
            0..=3 | 5 => 2,
            _ => 1 + hit.len(),
        };
        assert_eq!(
            tries.len(),
            expected,
            "calls to {n} (kind {}): {tries:?}",
            kinds[n]
        );
        retried += tries.len().saturating_sub(1);
        for c in &tries {
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
        let last = tries.last();
        match kinds[n] {
            // The machine got the voicemail: the model said it, then the call hung up.
            4 => {
                let c = last.expect("a machine call");
                assert_eq!(c.answered_by, "machine_end_beep");
                assert_eq!(
                    pb::EndReason::try_from(c.end_reason).unwrap_or_default(),
                    pb::EndReason::VoicemailLeft,
                    "{c:?}"
                );
                let said = flatten(&world.transcript(&c.call_id).await);
                assert!(
                    said.last()
                        .is_some_and(|(who, line)| who == "assistant" && line.contains(VOICEMAIL)),
                    "{n}: {said:?}"
                );
            }
            // A person: the conversation, to its end.
            8 | 9 => {
                let c = last.expect("an answered call");
                assert_eq!(c.answered_by, "human");
                let said = world.transcript(&c.call_id).await;
                assert_eq!(
                    flatten(&said),
                    callbridge_tests::expected_transcript(&script),
                    "{n}"
                );
            }
            6 => assert_eq!(last.expect("refused").twilio_error_code, 21211),
            _ => {}
        }
    }
    assert_eq!(p.retried as usize, retried, "{p:?}");
    // Both storms failed creates (four answers each, one retry per create), and each
    // such number was dialled again.
    for code in TWILIO_BUSY {
        assert!(
            storm_hits.get(&code).is_some_and(|&n| n >= 1),
            "{code}: {storm_hits:?}"
        );
    }

    // Pacing: at most 1 + rate·window starts in any window (one slot per 1/rate).
    let times: Vec<Duration> = creates(&twilio).iter().map(|c| c.0).collect();
    let refused = per_kind as usize;
    let storm_failed: usize = storm_hits.values().sum();
    assert_eq!(
        times.len(),
        all.len() - refused - storm_failed,
        "the refused and storm-failed creates are not accepted"
    );
    for secs in [1u64, 2, 5] {
        let most = max_in_window(&times, Duration::from_secs(secs));
        #[allow(clippy::cast_precision_loss)]
        let bound = 1 + (cps * secs as f64) as usize;
        assert!(most <= bound, "{most} creates in {secs} s; at most {bound}");
    }
    let live = max_concurrent_at_twilio(&twilio);
    assert!(live <= max as usize, "{live} calls live at Twilio at once");
    assert!(live >= 5, "the campaign ran calls side by side ({live})");

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
        if let Some(&second) = create_times[to].get(1) {
            assert!(
                second >= *end + Duration::from_millis(1000),
                "{to}: retried {second:?} before its busy at {end:?} + 1000 ms"
            );
        }
    }
    // Every request was valid for Twilio's spec: the only refusals are the scripted
    // 21211s and the forced storms.
    for r in twilio.requests() {
        let scripted = r.param("To").is_some_and(|t| kinds.get(t) == Some(&6));
        assert!(
            r.status < 400 || r.status == 429 || r.status == 500 || scripted,
            "{r:?}"
        );
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
    world.answer_from(&twilio);
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
    world.answer_from(&twilio);
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
    world.answer_from(&twilio);
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

// --- calling windows -----------------------------------------------------------------

/// The local date and time in `zone` now.
fn local_now(zone: &str) -> jiff::civil::DateTime {
    jiff::tz::TimeZone::get(zone)
        .expect("a zone of the bundled tz database")
        .to_datetime(jiff::Timestamp::now())
}

fn minute_of_day(t: jiff::civil::DateTime) -> i32 {
    i32::from(t.hour()) * 60 + i32::from(t.minute())
}

fn hhmm(minutes: i32) -> String {
    let m = minutes.rem_euclid(24 * 60);
    format!("{:02}:{:02}", m / 60, m % 60)
}

/// A window open now in Tokyo (its local time ± 2 h, on today and yesterday there, so it
/// holds across a local midnight) and therefore closed in Phoenix (16 h behind, no
/// daylight saving in either): true at any hour the test runs.
fn tokyo_window() -> pb::CallingWindow {
    let tokyo = local_now("Asia/Tokyo");
    let phoenix = local_now("America/Phoenix");
    let (t, p) = (minute_of_day(tokyo), minute_of_day(phoenix));
    let apart = (t - p).rem_euclid(24 * 60).min((p - t).rem_euclid(24 * 60));
    assert!(
        apart > 150,
        "Phoenix {p} min is outside Tokyo {t} min ± 2 h"
    );
    let today = u32::try_from(tokyo.weekday().to_monday_one_offset()).expect("1..=7");
    let yesterday = (today + 5) % 7 + 1;
    pb::CallingWindow {
        start: hhmm(t - 120),
        end: hhmm(t + 120),
        days: vec![yesterday, today],
        time_zone: "Asia/Tokyo".to_owned(),
    }
}

/// Numbers 0-3 in the window's default zone (Tokyo), 4-7 in Phoenix, 8-9 in Tokyo named.
fn zoned_numbers(base: usize) -> (Vec<pb::CampaignNumber>, Vec<String>, Vec<String>) {
    let mut all = Vec::new();
    let (mut open, mut closed) = (Vec::new(), Vec::new());
    for i in 0..10 {
        let n = number(base + i);
        let zone = match i {
            0..=3 => "",
            4..=7 => "America/Phoenix",
            _ => "Asia/Tokyo",
        };
        if zone == "America/Phoenix" {
            closed.push(n.clone());
        } else {
            open.push(n.clone());
        }
        all.push(pb::CampaignNumber {
            number: n,
            metadata: Default::default(),
            time_zone: zone.to_owned(),
        });
    }
    (all, open, closed)
}

/// Dials a campaign whose numbers are half in an open window and half in a closed one:
/// the open ones are dialled, the closed ones are not and stay pending, counted as
/// waiting; canceling ends them `canceled`. Returns nothing; asserts on the way.
async fn window_splits_numbers(
    calls: &mut CallsClient,
    twilio: &FakeTwilio,
    agent: &str,
    id: &str,
    base: usize,
) {
    let (numbers, open, closed) = zoned_numbers(base);
    for n in numbers.iter() {
        twilio.script(&n.number, Lifecycle::Busy { ring_ms: 100 });
    }
    let mut s = settings(agent, 20.0, 10, pb::RetryPolicy::default());
    s.calling_window = Some(tokyo_window());
    calls
        .create_campaign(pb::CreateCampaignRequest {
            campaign_id: id.to_owned(),
            settings: Some(s),
        })
        .await
        .expect("CreateCampaign");
    calls
        .add_campaign_numbers(pb::AddCampaignNumbersRequest {
            campaign_id: id.to_owned(),
            numbers,
        })
        .await
        .expect("AddCampaignNumbers");
    let draft = progress(&get_campaign(calls, id).await);
    assert_eq!(draft.waiting_for_window, 4, "{draft:?}");
    calls.start_campaign(req(id)).await.expect("start");
    let p = progress(
        &wait_campaign(calls, id, "the open numbers dialled", |c| {
            progress(c).dialled as usize >= open.len()
        })
        .await,
    );
    assert_eq!(p.waiting_for_window, 4, "{p:?}");
    // Long past a 20/s pace for ten numbers: the closed ones are still not dialled.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let dialled: Vec<String> = creates(twilio)
        .into_iter()
        .map(|(_, _, to)| to)
        .filter(|to| open.contains(to) || closed.contains(to))
        .collect();
    for n in &open {
        assert_eq!(
            dialled.iter().filter(|d| *d == n).count(),
            1,
            "{n} dialled once"
        );
    }
    for n in &closed {
        assert!(!dialled.contains(n), "{n} dialled outside its window");
    }
    let c = get_campaign(calls, id).await;
    let p = progress(&c);
    assert_eq!(state(&c), pb::CampaignState::Running);
    assert_eq!(
        (p.dialled, p.waiting_for_window, p.failed, p.canceled),
        (6, 4, 0, 0),
        "the closed ones stay pending: {p:?}"
    );
    assert!(p.remaining >= 4, "{p:?}");
    calls.cancel_campaign(req(id)).await.expect("cancel");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn numbers_are_dialled_only_inside_their_calling_window_in_their_zone() {
    let twilio = fake_twilio().await;
    let mut builder = World::builder(FakeRealtime::builder());
    for (k, v) in twilio_env(&twilio) {
        builder = builder.control_env(k, &v);
    }
    let world = builder.start().await;
    world.answer_from(&twilio);
    let agent = world
        .create_agent("windowed", agent_settings("windowed", None))
        .await;
    let mut calls = world.calls();

    // Refusals name the field.
    let mut bad = settings(&agent, 5.0, 2, pb::RetryPolicy::default());
    bad.calling_window = Some(pb::CallingWindow {
        start: "9am".into(),
        end: "17:00".into(),
        days: vec![],
        time_zone: "Europe/Paris".into(),
    });
    let err = calls
        .create_campaign(pb::CreateCampaignRequest {
            campaign_id: "bad-window".into(),
            settings: Some(bad.clone()),
        })
        .await
        .expect_err("refused");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().starts_with("settings.calling_window.start:"),
        "{}",
        err.message()
    );
    if let Some(w) = bad.calling_window.as_mut() {
        w.start = "09:00".into();
        w.time_zone = "Europe/Pariss".into();
    }
    let err = calls
        .create_campaign(pb::CreateCampaignRequest {
            campaign_id: "bad-zone".into(),
            settings: Some(bad),
        })
        .await
        .expect_err("refused");
    assert!(
        err.message()
            .starts_with("settings.calling_window.time_zone:"),
        "{}",
        err.message()
    );
    create_campaign(
        &mut calls,
        "zones",
        settings(&agent, 5.0, 2, pb::RetryPolicy::default()),
        &[number(700)],
    )
    .await;
    let err = calls
        .add_campaign_numbers(pb::AddCampaignNumbersRequest {
            campaign_id: "zones".into(),
            numbers: vec![
                pb::CampaignNumber {
                    number: number(701),
                    metadata: Default::default(),
                    time_zone: "Asia/Tokyo".into(),
                },
                pb::CampaignNumber {
                    number: number(702),
                    metadata: Default::default(),
                    time_zone: "Atlantis/Capital".into(),
                },
            ],
        })
        .await
        .expect_err("refused");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().starts_with("numbers[1].time_zone:"),
        "{}",
        err.message()
    );

    window_splits_numbers(&mut calls, &twilio, &agent, "window", 600).await;
    let canceled = wait_campaign(&mut calls, "window", "settled", |c| {
        progress(c).remaining == 0
    })
    .await;
    let p = progress(&canceled);
    assert_eq!(
        (p.busy, p.canceled, p.waiting_for_window),
        (6, 4, 0),
        "{p:?}"
    );

    // A window that opens during the test (UTC, to the second): nothing is dialled
    // before it, everything after.
    // On a whole second: the window's start has no fraction.
    let opens =
        jiff::Timestamp::from_second(jiff::Timestamp::now().as_second() + 6).expect("in range");
    let start = jiff::tz::TimeZone::UTC.to_datetime(opens);
    let end = start + jiff::SignedDuration::from_hours(1);
    let fmt =
        |t: jiff::civil::DateTime| format!("{:02}:{:02}:{:02}", t.hour(), t.minute(), t.second());
    let later: Vec<String> = (650..653).map(number).collect();
    for n in &later {
        twilio.script(n, Lifecycle::Busy { ring_ms: 100 });
    }
    let mut s = settings(&agent, 20.0, 5, pb::RetryPolicy::default());
    s.calling_window = Some(pb::CallingWindow {
        start: fmt(start),
        end: fmt(end),
        days: vec![],
        time_zone: "UTC".into(),
    });
    create_campaign(&mut calls, "opens", s, &later).await;
    calls.start_campaign(req("opens")).await.expect("start");
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let before = progress(&get_campaign(&mut calls, "opens").await);
    let seen = creates(&twilio);
    assert!(
        jiff::Timestamp::now() < opens,
        "the checks before the opening ran before it (slow machine?)"
    );
    assert_eq!(
        (before.dialled, before.waiting_for_window),
        (0, 3),
        "{before:?}"
    );
    assert!(
        !seen.iter().any(|(_, _, to)| later.contains(to)),
        "dialled before the window opened"
    );
    let done = wait_campaign(&mut calls, "opens", "completed once open", |c| {
        state(c) == pb::CampaignState::Completed
    })
    .await;
    assert_eq!(progress(&done).busy, 3, "{done:?}");
    assert!(jiff::Timestamp::now() >= opens);
}

/// The same on the in-memory store: one control, no Redis (its calls never end here —
/// no relay forwards Twilio's callbacks —, which is enough to see what it dials).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_calling_window_holds_on_the_in_memory_store() {
    let twilio = fake_twilio().await;
    let addr = free_addr().expect("a free port");
    let mut env: Vec<(String, String)> = vec![
        ("CONTROL_LISTEN".into(), addr.to_string()),
        ("CONTROL_APP_TOKENS".into(), APP_TOKEN.into()),
        ("CONTROL_RELAY_TOKENS".into(), RELAY_TOKEN.into()),
        ("CONTROL_METRICS_LISTEN".into(), String::new()),
        ("RELAY_PUBLIC_URL".into(), PUBLIC_URL.into()),
        ("CONTROL_ID".into(), "memory-dialer".into()),
    ];
    env.extend(
        twilio_env(&twilio)
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v)),
    );
    let mut control = Proc::spawn("callbridge-control", env, addr).expect("control spawns");
    control
        .wait_grpc_serving(READY)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("url")
        .connect()
        .await
        .expect("control reachable");
    let mut agents =
        pb::agents_client::AgentsClient::with_interceptor(channel.clone(), Bearer::new(APP_TOKEN));
    let agent = agents
        .create_agent(pb::CreateAgentRequest {
            agent_id: "memory".into(),
            settings: Some(agent_settings("memory", None)),
        })
        .await
        .expect("CreateAgent")
        .into_inner()
        .agent_id;
    let mut calls =
        pb::calls_client::CallsClient::with_interceptor(channel, Bearer::new(APP_TOKEN));
    window_splits_numbers(&mut calls, &twilio, &agent, "memory-window", 800).await;
    let canceled = wait_campaign(&mut calls, "memory-window", "pending ones canceled", |c| {
        progress(c).canceled == 4
    })
    .await;
    assert_eq!(state(&canceled), pb::CampaignState::Canceled);
    let p = progress(&canceled);
    assert_eq!((p.canceled, p.waiting_for_window), (4, 0), "{p:?}");
}

// --- progress watch ------------------------------------------------------------------

/// Reads a `WatchCampaign` stream to its end (bounded).
async fn drain_watch(stream: &mut tonic::Streaming<pb::Campaign>, what: &str) -> Vec<pb::Campaign> {
    let mut seen = Vec::new();
    with_timeout(LIMIT, what.to_owned(), async {
        while let Some(c) = stream.message().await.expect("watch stream") {
            seen.push(c);
        }
    })
    .await;
    seen
}

/// The watch is served by a replica that does not dial (the world's control has no
/// Twilio account); the dialer is another replica on the same Redis. The watcher sees the
/// campaign at once, each change after, and the stream ends with the completed campaign.
/// A second watcher reads nothing until the end and still gets the last view, and the
/// campaign is not held up by it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_campaign_streams_progress_across_replicas_until_it_settles() {
    let twilio = fake_twilio().await;
    let world = World::builder(FakeRealtime::builder()).start().await;
    world.answer_from(&twilio);
    let agent = world
        .create_agent("watched", agent_settings("watched", None))
        .await;
    let mut dialer = dialer_replica(&world, &twilio, "dialer-w");
    dialer
        .wait_grpc_serving(READY)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let numbers: Vec<String> = (900..912).map(number).collect();
    for n in &numbers {
        twilio.script(n, Lifecycle::Busy { ring_ms: 200 });
    }
    let mut dialer_calls = client_of(&dialer).await;
    create_campaign(
        &mut dialer_calls,
        "watched",
        settings(&agent, 4.0, 3, pb::RetryPolicy::default()),
        &numbers,
    )
    .await;

    let mut calls = world.calls();
    // Refusals: no token, no campaign, a bad id.
    let channel = tonic::transport::Endpoint::from_shared(world.control_url())
        .expect("url")
        .connect()
        .await
        .expect("control reachable");
    let err = pb::calls_client::CallsClient::new(channel)
        .watch_campaign(req("watched"))
        .await
        .expect_err("no token");
    assert_eq!(err.code(), Code::Unauthenticated);
    let err = calls
        .watch_campaign(req("nope"))
        .await
        .expect_err("missing");
    assert_eq!(err.code(), Code::NotFound);
    let err = calls
        .watch_campaign(req("no way"))
        .await
        .expect_err("bad id");
    assert_eq!(err.code(), Code::InvalidArgument);

    let mut watch = calls
        .watch_campaign(req("watched"))
        .await
        .expect("WatchCampaign")
        .into_inner();
    let first = with_timeout(LIMIT, "first view", watch.message())
        .await
        .expect("stream")
        .expect("a first view at once");
    assert_eq!(state(&first), pb::CampaignState::Draft);
    assert_eq!(
        (progress(&first).numbers, progress(&first).dialled),
        (12, 0)
    );
    let mut idle = world
        .calls()
        .watch_campaign(req("watched"))
        .await
        .expect("WatchCampaign")
        .into_inner();

    dialer_calls
        .start_campaign(req("watched"))
        .await
        .expect("start");
    let rest = drain_watch(&mut watch, "the watch ends when the campaign settles").await;
    let last = rest.last().expect("views after the first");
    assert_eq!(state(last), pb::CampaignState::Completed, "{last:?}");
    let p = progress(last);
    assert_eq!((p.busy, p.remaining, p.in_flight), (12, 0, 0), "{p:?}");
    // Each change came as it happened: the counts only move forward, no view is sent
    // twice in a row, and the run was seen in between, not only its end.
    let mut views = vec![first];
    views.extend(rest.iter().cloned());
    for pair in views.windows(2) {
        let (a, b) = (progress(&pair[0]), progress(&pair[1]));
        assert!(
            b.dialled >= a.dialled && b.busy >= a.busy,
            "{a:?} then {b:?}"
        );
        assert!(b.remaining <= a.remaining, "{a:?} then {b:?}");
        assert_ne!(pair[0], pair[1], "a view sent twice");
    }
    let midway = views
        .iter()
        .filter(|c| state(c) == pb::CampaignState::Running && progress(c).dialled > 0)
        .count();
    assert!(midway >= 2, "progress while running: {views:?}");

    // The reader that took nothing until now gets the final view last, then the end.
    let late = drain_watch(&mut idle, "the idle watcher's stream ends").await;
    let final_view = late.last().expect("views");
    assert_eq!(state(final_view), pb::CampaignState::Completed);
    assert_eq!(progress(final_view).busy, 12);
    // A settled campaign: one view, then the end.
    let settled = drain_watch(
        &mut calls
            .watch_campaign(req("watched"))
            .await
            .expect("WatchCampaign")
            .into_inner(),
        "a settled campaign's watch ends",
    )
    .await;
    assert_eq!(settled.len(), 1);
    assert_eq!(state(&settled[0]), pb::CampaignState::Completed);
}

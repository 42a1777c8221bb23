//! The public API of one real `callbridge-control` process on a real redis-server:
//! agents, routes, listing, validation, auth, health, reflection, metrics, config exits.

mod common;

use callbridge_proto::pb;
use callbridge_testkit::redis_server::RedisServer;
use common::*;
use tonic::Code;

async fn default_agent_id(agents: &mut AgentsRpc) -> String {
    answer(
        "get default",
        agents.get_default_agent(pb::GetDefaultAgentRequest {}),
    )
    .await
    .agent_id
}

#[tokio::test]
async fn agents_routes_and_default_agent_round_trip() {
    let redis = RedisServer::unix().expect("redis");
    let control = Control::start(ControlOpts::new(&redis.url(), "api-agents")).await;
    let mut agents = control.agents().await;

    let a = create_agent(&mut agents, "front-desk").await;
    assert_eq!((a.version, a.agent_id.as_str()), (1, "front-desk"));
    assert_eq!(
        a.settings.as_ref().map(|s| s.model.as_str()),
        Some("gpt-realtime")
    );
    let generated = answer(
        "create generated",
        agents.create_agent(pb::CreateAgentRequest {
            agent_id: String::new(),
            settings: Some(settings("gen")),
        }),
    )
    .await;
    assert!(!generated.agent_id.is_empty());

    refused(
        "dup",
        Code::AlreadyExists,
        agents.create_agent(pb::CreateAgentRequest {
            agent_id: "front-desk".into(),
            settings: Some(settings("x")),
        }),
    )
    .await;

    // Optimistic replace: the right version wins once, a stale one is ABORTED.
    let mut s2 = settings("front-desk v2");
    s2.voice = "marin".into();
    let replaced = answer(
        "replace",
        agents.replace_agent(pb::ReplaceAgentRequest {
            agent_id: "front-desk".into(),
            settings: Some(s2.clone()),
            expected_version: 1,
        }),
    )
    .await;
    assert_eq!(replaced.version, 2);
    refused(
        "stale replace",
        Code::Aborted,
        agents.replace_agent(pb::ReplaceAgentRequest {
            agent_id: "front-desk".into(),
            settings: Some(s2),
            expected_version: 1,
        }),
    )
    .await;
    let got = answer(
        "get",
        agents.get_agent(pb::GetAgentRequest {
            agent_id: "front-desk".into(),
        }),
    )
    .await;
    assert_eq!(got.settings.expect("settings").name, "front-desk v2");
    refused(
        "get missing",
        Code::NotFound,
        agents.get_agent(pb::GetAgentRequest {
            agent_id: "nope".into(),
        }),
    )
    .await;

    // Paging in id order.
    for id in ["p1", "p2", "p3"] {
        create_agent(&mut agents, id).await;
    }
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = answer(
            "list",
            agents.list_agents(pb::ListAgentsRequest {
                page_size: 2,
                page_token: token.clone(),
            }),
        )
        .await;
        assert!(page.agents.len() <= 2);
        seen.extend(page.agents.into_iter().map(|a| a.agent_id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    let mut sorted = seen.clone();
    sorted.sort();
    assert_eq!(seen, sorted);
    assert_eq!(seen.len(), 5);

    // Routes and default; deleting the agent removes both.
    within(
        "route",
        agents.set_number_route(pb::NumberRoute {
            number: "+14155550123".into(),
            agent_id: "p1".into(),
        }),
    )
    .await
    .expect("route");
    refused(
        "route to missing",
        Code::NotFound,
        agents.set_number_route(pb::NumberRoute {
            number: "+14155550124".into(),
            agent_id: "ghost".into(),
        }),
    )
    .await;
    within(
        "default",
        agents.set_default_agent(pb::DefaultAgent {
            agent_id: "p1".into(),
        }),
    )
    .await
    .expect("default");
    assert_eq!(default_agent_id(&mut agents).await, "p1");
    refused(
        "delete v9",
        Code::Aborted,
        agents.delete_agent(pb::DeleteAgentRequest {
            agent_id: "p1".into(),
            expected_version: 9,
        }),
    )
    .await;
    within(
        "delete",
        agents.delete_agent(pb::DeleteAgentRequest {
            agent_id: "p1".into(),
            expected_version: 1,
        }),
    )
    .await
    .expect("deleted");
    let routes = answer(
        "routes",
        agents.list_number_routes(pb::ListNumberRoutesRequest {}),
    )
    .await;
    assert!(routes.routes.is_empty(), "{routes:?}");
    assert_eq!(default_agent_id(&mut agents).await, "");
    refused(
        "delete route",
        Code::NotFound,
        agents.delete_number_route(pb::DeleteNumberRouteRequest {
            number: "+14155550123".into(),
        }),
    )
    .await;
}

#[tokio::test]
async fn bad_input_is_refused_naming_the_field() {
    let redis = RedisServer::unix().expect("redis");
    let control = Control::start(ControlOpts::new(&redis.url(), "api-validation")).await;
    let mut agents = control.agents().await;
    let mut calls = control.calls().await;
    create_agent(&mut agents, "a1").await;

    let agent_cases: Vec<(pb::AgentSettings, &str)> = vec![
        (
            pb::AgentSettings {
                temperature: Some(1.5),
                ..settings("t")
            },
            "settings.temperature",
        ),
        (
            pb::AgentSettings {
                voice: "nova".into(),
                ..settings("t")
            },
            "settings.voice",
        ),
        (
            pb::AgentSettings {
                instructions: String::new(),
                ..settings("t")
            },
            "settings.instructions",
        ),
        (
            pb::AgentSettings {
                instructions: "x".repeat(32 * 1024 + 1),
                ..settings("t")
            },
            "settings.instructions",
        ),
        (
            pb::AgentSettings {
                tools: vec![pb::Tool {
                    name: "lookup".into(),
                    description: String::new(),
                    parameters_json: "\"str\"".into(),
                }],
                ..settings("t")
            },
            "settings.tools[0].parameters_json",
        ),
        (
            pb::AgentSettings {
                tools: vec![pb::Tool {
                    name: "lookup".into(),
                    description: String::new(),
                    parameters_json: format!("{{\"d\":\"{}\"}}", "y".repeat(16 * 1024)),
                }],
                ..settings("t")
            },
            "settings.tools[0].parameters_json",
        ),
        (
            pb::AgentSettings {
                builtin_tools: Some(pb::BuiltinTools {
                    end_call: false,
                    transfer_call: true,
                    transfer_numbers: vec!["555-1234".into()],
                }),
                ..settings("t")
            },
            "settings.builtin_tools.transfer_numbers[0]",
        ),
    ];
    for (s, field) in agent_cases {
        let err = within(
            "create bad agent",
            agents.create_agent(pb::CreateAgentRequest {
                agent_id: String::new(),
                settings: Some(s),
            }),
        )
        .await
        .expect_err("invalid");
        assert_eq!(err.code(), Code::InvalidArgument, "{field}: {err:?}");
        assert!(
            err.message().contains(field),
            "{field} not in '{}'",
            err.message()
        );
    }
    let err = within(
        "bad agent id",
        agents.create_agent(pb::CreateAgentRequest {
            agent_id: "has space".into(),
            settings: Some(settings("t")),
        }),
    )
    .await
    .expect_err("invalid id");
    assert!(err.message().contains("agent_id"));

    let call = |to: &str, meta: usize| pb::CreateCallRequest {
        agent_id: "a1".into(),
        direction: pb::Direction::Outbound as i32,
        from: String::new(),
        to: to.into(),
        campaign_id: String::new(),
        metadata: (0..meta)
            .map(|i| (format!("k{i}"), "v".to_owned()))
            .collect(),
        dial: None,
    };
    for (req, field) in [
        (call("4155550123", 0), "to"),
        (call("+0155", 0), "to"),
        (call("+14155550123", 33), "metadata"),
    ] {
        let err = refused("bad call", Code::InvalidArgument, calls.create_call(req)).await;
        assert!(
            err.message().starts_with(field),
            "{field} vs '{}'",
            err.message()
        );
    }
    refused(
        "call to missing agent",
        Code::NotFound,
        calls.create_call(pb::CreateCallRequest {
            agent_id: "ghost".into(),
            ..call("+14155550123", 0)
        }),
    )
    .await;

    // Bulk: too many, and one bad entry means nothing is created.
    let too_many = pb::CreateCallsRequest {
        campaign_id: "big".into(),
        calls: (0..1001).map(|_| call("+14155550123", 0)).collect(),
    };
    let err = within("bulk too big", calls.create_calls(too_many))
        .await
        .expect_err("too many");
    assert!(err.message().starts_with("calls"), "{}", err.message());
    let mut batch: Vec<_> = (0..5).map(|_| call("+14155550123", 0)).collect();
    batch[3].to = "nope".into();
    let err = within(
        "bulk one bad",
        calls.create_calls(pb::CreateCallsRequest {
            campaign_id: "c1".into(),
            calls: batch,
        }),
    )
    .await
    .expect_err("bad entry");
    assert!(
        err.message().starts_with("calls[3].to"),
        "{}",
        err.message()
    );
    let listed = answer(
        "list c1",
        calls.list_calls(pb::ListCallsRequest {
            campaign_id: "c1".into(),
            ..Default::default()
        }),
    )
    .await;
    assert!(
        listed.calls.is_empty(),
        "nothing created from an invalid bulk"
    );

    let err = within(
        "page size",
        calls.list_calls(pb::ListCallsRequest {
            page_size: 501,
            ..Default::default()
        }),
    )
    .await
    .expect_err("page size");
    assert!(err.message().starts_with("page_size"));
    let err = within(
        "page token",
        calls.list_calls(pb::ListCallsRequest {
            page_token: "zz".into(),
            ..Default::default()
        }),
    )
    .await
    .expect_err("token");
    assert!(err.message().starts_with("page_token"));
    let err = within(
        "command",
        calls.send_command(pb::SendCommandRequest {
            call_id: "c".into(),
            command: None,
        }),
    )
    .await
    .expect_err("no command");
    assert!(err.message().starts_with("command"));

    // Oversized messages are refused by the server's decoding limit, not processed.
    let huge = pb::CreateAgentRequest {
        agent_id: String::new(),
        settings: Some(pb::AgentSettings {
            instructions: "z".repeat(2 * 1024 * 1024),
            ..settings("t")
        }),
    };
    let err = within("huge", agents.create_agent(huge))
        .await
        .expect_err("too large");
    assert_ne!(err.code(), Code::Ok);
    // The process is still healthy afterwards.
    create_agent(&mut agents, "after-huge").await;
}

#[tokio::test]
async fn tokens_are_checked_per_api_and_probes_need_none() {
    let redis = RedisServer::unix().expect("redis");
    // Reflection is off by default outside the insecure mode; this test asks for it.
    let mut opts = ControlOpts::new(&redis.url(), "api-auth");
    opts.extra_env
        .push(("CONTROL_GRPC_REFLECTION".into(), "true".into()));
    let control = Control::start(opts).await;
    let channel = control.channel().await;
    let agents_with =
        |b: Bearer| pb::agents_client::AgentsClient::with_interceptor(channel.clone(), b);
    let relay_with =
        |b: Bearer| pb::relay_client::RelayClient::with_interceptor(channel.clone(), b);
    let req = || pb::GetDefaultAgentRequest {};

    let cases = [
        (Bearer::none(), "missing"),
        (Bearer::new("wrong"), "invalid token"),
        (
            Bearer::new(RELAY_TOKEN),
            "relay token cannot be used on the public API",
        ),
    ];
    for (bearer, text) in cases {
        let err = refused(
            "agents auth",
            Code::Unauthenticated,
            agents_with(bearer).get_default_agent(req()),
        )
        .await;
        assert!(
            err.message().contains(text),
            "'{}' lacks '{text}'",
            err.message()
        );
    }
    let err = refused(
        "relay with app token",
        Code::Unauthenticated,
        relay_with(Bearer::new(APP_TOKEN)).after(pb::AfterRequest {
            call_id: "x".into(),
            ..Default::default()
        }),
    )
    .await;
    assert!(
        err.message()
            .contains("application token cannot be used on the relay API"),
        "{}",
        err.message()
    );
    let mut calls =
        pb::calls_client::CallsClient::with_interceptor(channel.clone(), Bearer::new(RELAY_TOKEN));
    refused(
        "calls relay token",
        Code::Unauthenticated,
        calls.get_call(pb::GetCallRequest {
            call_id: "x".into(),
        }),
    )
    .await;
    // The right token passes (NOT_FOUND proves we got past auth).
    refused(
        "relay ok",
        Code::NotFound,
        relay_with(Bearer::new(RELAY_TOKEN)).after(pb::AfterRequest {
            call_id: "x".into(),
            ..Default::default()
        }),
    )
    .await;

    // Health and reflection answer without a token.
    let health = answer(
        "health",
        tonic_health::pb::health_client::HealthClient::new(channel.clone()).check(
            tonic_health::pb::HealthCheckRequest {
                service: "callbridge.v1.Calls".into(),
            },
        ),
    )
    .await;
    assert_eq!(
        health.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut replies = answer(
        "reflection",
        ServerReflectionClient::new(channel.clone())
            .server_reflection_info(tokio_stream::iter(vec![request])),
    )
    .await;
    let reply = within("reflection reply", replies.message())
        .await
        .expect("ok")
        .expect("one reply");
    let Some(MessageResponse::ListServicesResponse(list)) = reply.message_response else {
        panic!("unexpected {reply:?}")
    };
    let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
    for want in [
        "callbridge.v1.Agents",
        "callbridge.v1.Calls",
        "callbridge.v1.Relay",
    ] {
        assert!(names.iter().any(|n| n == want), "{want} not in {names:?}");
    }

    // Refusals and successes show up in the metrics.
    let text = control.metrics_text();
    assert!(text.contains("200 OK"), "{text}");
    assert!(
        text.contains(
            r#"callbridge_control_rpc_total{service="Relay",method="After",code="NotFound"} 1"#
        ),
        "{text}"
    );
    assert!(text.contains("callbridge_control_redis_up 1"), "{text}");
    // Redis latency is measured on the store's real commands, not only the probe's PING.
    let commands: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("callbridge_control_redis_latency_seconds_count{"))
        .filter_map(|l| l.split('"').nth(1))
        .collect();
    assert!(commands.contains(&"ping"), "{text}");
    assert!(
        commands.iter().any(|c| *c != "ping" && *c != "other"),
        "a store command is timed: {commands:?}"
    );
    // 3 refused on Agents, 1 on Calls; 1 on Relay.
    assert!(
        text.contains(r#"callbridge_control_auth_refused_total{api="public"} 4"#),
        "{text}"
    );
    assert!(
        text.contains(r#"callbridge_control_auth_refused_total{api="relay"} 1"#),
        "{text}"
    );
}

#[tokio::test]
async fn list_calls_is_newest_first_filtered_and_paged() {
    let redis = RedisServer::unix().expect("redis");
    let control = Control::start(ControlOpts::new(&redis.url(), "api-list")).await;
    let mut agents = control.agents().await;
    let mut calls = control.calls().await;
    create_agent(&mut agents, "a1").await;
    create_agent(&mut agents, "a2").await;
    within(
        "default",
        agents.set_default_agent(pb::DefaultAgent {
            agent_id: "a2".into(),
        }),
    )
    .await
    .expect("default");

    let mut created = Vec::new();
    for _ in 0..3 {
        created.push(create_call(&mut calls, "a1", "").await.call_id);
    }
    // A bulk of 250 in one campaign (same creation ms: paging must not loop or skip).
    let bulk = pb::CreateCallsRequest {
        campaign_id: "spring".into(),
        calls: (0..250)
            .map(|i| pb::CreateCallRequest {
                agent_id: String::new(), // the default agent
                direction: 0,
                from: String::new(),
                to: format!("+1415555{i:04}"),
                campaign_id: String::new(),
                metadata: [("row".to_owned(), i.to_string())].into_iter().collect(),
                dial: None,
            })
            .collect(),
    };
    let resp = answer("bulk", calls.create_calls(bulk)).await;
    assert_eq!(resp.calls.len(), 250);
    let first = &resp.calls[0];
    let c = first.call.as_ref().expect("call");
    assert_eq!(c.agent_id, "a2");
    assert_eq!(c.campaign_id, "spring");
    assert_eq!(
        first.webhook_url,
        format!(
            "https://relay.example.com/api/twilio/voice?callId={}",
            c.call_id
        )
    );
    assert_eq!(
        first.stream_url,
        format!(
            "wss://relay.example.com/api/twilio/media-stream/{}",
            c.call_id
        )
    );

    // Whole campaign in pages of 100: every call exactly once.
    let mut seen = std::collections::HashSet::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = answer(
            "page",
            calls.list_calls(pb::ListCallsRequest {
                campaign_id: "spring".into(),
                page_size: 100,
                page_token: token.clone(),
                ..Default::default()
            }),
        )
        .await;
        pages += 1;
        for call in page.calls {
            assert!(seen.insert(call.call_id), "duplicate across pages");
        }
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
        assert!(pages < 10, "paging does not end");
    }
    assert_eq!(seen.len(), 250);

    // Agent filter, newest first over everything.
    let by_a1 = answer(
        "by agent",
        calls.list_calls(pb::ListCallsRequest {
            agent_id: "a1".into(),
            ..Default::default()
        }),
    )
    .await;
    let ids: Vec<_> = by_a1.calls.iter().map(|c| c.call_id.clone()).collect();
    assert_eq!(ids.len(), 3);
    let times: Vec<_> = by_a1.calls.iter().map(|c| c.created_at_ms).collect();
    assert!(
        times.windows(2).all(|w| w[0] >= w[1]),
        "newest first: {times:?}"
    );
    // Status and time filters.
    let ringing = answer(
        "ringing",
        calls.list_calls(pb::ListCallsRequest {
            status: pb::CallStatus::Ringing as i32,
            ..Default::default()
        }),
    )
    .await;
    assert!(ringing.calls.is_empty());
    let newest = by_a1.calls[0].created_at_ms;
    let after = answer(
        "after",
        calls.list_calls(pb::ListCallsRequest {
            created_after_ms: newest,
            agent_id: "a1".into(),
            ..Default::default()
        }),
    )
    .await;
    assert!(after.calls.is_empty());
    let before = answer(
        "before",
        calls.list_calls(pb::ListCallsRequest {
            created_before_ms: newest + 1,
            agent_id: "a1".into(),
            ..Default::default()
        }),
    )
    .await;
    assert_eq!(before.calls.len(), 3);
    let usage = answer(
        "campaign usage",
        calls.get_usage(pb::GetUsageRequest {
            scope: Some(pb::get_usage_request::Scope::CampaignId("spring".into())),
        }),
    )
    .await;
    assert_eq!(usage.calls, 250);
}

#[test]
fn bad_config_exits_64_and_help_lists_every_variable() {
    let bin = env!("CARGO_BIN_EXE_callbridge-control");
    let status = std::process::Command::new(bin)
        .env_clear()
        .env("CONTROL_LISTEN", "127.0.0.1:0")
        .stderr(std::process::Stdio::null())
        .status()
        .expect("runs");
    assert_eq!(status.code(), Some(64), "no tokens and not insecure");
    let status = std::process::Command::new(bin)
        .env_clear()
        .env("CONTROL_APP_TOKENS", "t")
        .env("CONTROL_LEASE_SECS", "zero")
        .stderr(std::process::Stdio::null())
        .status()
        .expect("runs");
    assert_eq!(status.code(), Some(64), "unparsable number");
    let help = std::process::Command::new(bin)
        .arg("--help")
        .env_clear()
        .output()
        .expect("runs");
    assert!(help.status.success());
    let text = String::from_utf8_lossy(&help.stdout);
    for var in [
        "CONTROL_LISTEN",
        "REDIS_URL",
        "REDIS_CLUSTER_NODES",
        "CONTROL_APP_TOKENS",
        "CONTROL_RELAY_TOKENS",
        "CONTROL_INSECURE_NO_AUTH",
        "RELAY_PUBLIC_URL",
        "CONTROL_LOG",
        "CONTROL_LOG_FORMAT",
        "CONTROL_LEASE_SECS",
        "CONTROL_RETENTION_SECS",
        "CONTROL_METRICS_LISTEN",
        "CONTROL_ID",
    ] {
        assert!(text.contains(var), "--help lacks {var}");
    }
}

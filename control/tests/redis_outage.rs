//! Redis stops and comes back under a running control process: health flips to
//! NOT_SERVING, RPCs answer UNAVAILABLE, and everything recovers without a restart.

mod common;

use callbridge_proto::pb;
use callbridge_testkit::redis_server::RedisServer;
use common::*;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

#[tokio::test]
async fn redis_outage_flips_health_and_recovers_without_restart() {
    let mut redis = RedisServer::tcp().expect("redis");
    let control = Control::start(ControlOpts::new(&redis.url(), "outage")).await;
    let mut agents = control.agents().await;
    create_agent(&mut agents, "before").await;

    redis.stop();
    control.wait_status(ServingStatus::NotServing).await;
    // Liveness stays SERVING: restarting a replica would not bring Redis back.
    let liveness = answer(
        "liveness during outage",
        tonic_health::pb::health_client::HealthClient::new(control.channel().await).check(
            tonic_health::pb::HealthCheckRequest {
                service: callbridge_control::LIVENESS_SERVICE.into(),
            },
        ),
    )
    .await;
    assert_eq!(liveness.status, ServingStatus::Serving as i32);
    let code = eventually("RPCs answer UNAVAILABLE", || {
        let mut agents = agents.clone();
        async move {
            let err = agents
                .get_agent(pb::GetAgentRequest {
                    agent_id: "before".into(),
                })
                .await
                .err()?;
            (err.code() == Code::Unavailable).then_some(err.code())
        }
    })
    .await;
    assert_eq!(code, Code::Unavailable);
    let err = within(
        "create during outage",
        agents.create_agent(pb::CreateAgentRequest {
            agent_id: "during".into(),
            settings: Some(settings("d")),
        }),
    )
    .await
    .expect_err("no redis");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    control.assert_metrics(&["callbridge_control_redis_up 0"]);

    redis.restart().expect("redis back");
    control.wait_status(ServingStatus::Serving).await;
    // The restarted server is empty; what matters is that writes and reads work again.
    let agent = eventually("writes work again", || {
        let mut agents = agents.clone();
        async move {
            agents
                .create_agent(pb::CreateAgentRequest {
                    agent_id: "after".into(),
                    settings: Some(settings("after")),
                })
                .await
                .ok()
                .map(|r| r.into_inner())
        }
    })
    .await;
    assert_eq!(agent.version, 1);
    let got = answer(
        "read back",
        agents.get_agent(pb::GetAgentRequest {
            agent_id: "after".into(),
        }),
    )
    .await;
    assert_eq!(got.agent_id, "after");

    // Cross-replica machinery (pub/sub) is back too: a command reaches the attach stream.
    let mut calls = control.calls().await;
    let mut relay = control.relay().await;
    let id = create_call(&mut calls, "after", "").await.call_id;
    let mut stream = attach(&mut relay, &id, "relay-1", false)
        .await
        .expect("attached");
    stream.ack(event(&id, 1, started("relay-1"))).await;
    let sent = eventually("command delivered after the outage", || {
        let mut calls = calls.clone();
        let id = id.clone();
        async move {
            calls
                .send_command(pb::SendCommandRequest {
                    call_id: id,
                    command: Some(pb::Command {
                        command_id: String::new(),
                        kind: Some(pb::command::Kind::Hangup(pb::HangupCommand {
                            reason: "done".into(),
                        })),
                    }),
                })
                .await
                .ok()
        }
    })
    .await
    .into_inner();
    match stream.next().await.expect("command") {
        pb::attach_response::Msg::Command(c) => assert_eq!(c.command_id, sent.command_id),
        other => panic!("expected command, got {other:?}"),
    }
}

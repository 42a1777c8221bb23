//! `REDIS_CLUSTER_NODES`: the control plane on a (single-node) Redis Cluster. Redis
//! refuses any multi-key command or script whose keys hash to different slots even on
//! one node, so this proves every call's keys share a hash tag.

mod common;

use callbridge_proto::pb;
use callbridge_testkit::redis_server::RedisServer;
use common::*;

/// A one-node cluster owning every slot.
fn cluster_node() -> RedisServer {
    let server = RedisServer::tcp_with_args(vec![
        "--cluster-enabled".into(),
        "yes".into(),
        "--cluster-config-file".into(),
        "nodes.conf".into(),
    ])
    .expect("redis cluster node");
    let client = redis::Client::open(server.url()).expect("url");
    let mut conn = client.get_connection().expect("connect");
    let _: () = redis::cmd("CLUSTER")
        .arg("ADDSLOTSRANGE")
        .arg(0)
        .arg(16383)
        .query(&mut conn)
        .expect("add slots");
    server
}

fn cluster_ok(url: &str) -> bool {
    redis::Client::open(url)
        .and_then(|c| c.get_connection())
        .and_then(|mut c| redis::cmd("CLUSTER").arg("INFO").query::<String>(&mut c))
        .is_ok_and(|info| info.contains("cluster_state:ok"))
}

#[tokio::test]
async fn a_call_runs_on_redis_cluster() {
    let redis = cluster_node();
    let url = redis.url();
    eventually("cluster state ok", || {
        let url = url.clone();
        async move { cluster_ok(&url).then_some(()) }
    })
    .await;
    let mut opts = ControlOpts::new("", "cluster-a");
    opts.extra_env = vec![("REDIS_CLUSTER_NODES".into(), redis.url())];
    let control = Control::start(opts).await;
    let mut agents = control.agents().await;
    let mut calls = control.calls().await;
    let mut relay = control.relay().await;
    create_agent(&mut agents, "agent").await;
    let bulk = bulk_calls("c", "agent", 20, "+1415555");
    let created = answer("bulk", calls.create_calls(bulk)).await;
    let id = first_call_id(&created);
    within(
        "admit",
        relay.admit(pb::AdmitRequest {
            call_id: id.clone(),
            twilio_call_sid: "CA00000000000000000000000000000009".into(),
            ..Default::default()
        }),
    )
    .await
    .expect("admit");
    let mut watch = watch_call(&mut calls, &id, 0).await;
    let mut stream = attach(&mut relay, &id, "relay-1", false)
        .await
        .expect("attach");
    stream.ack(event(&id, 1, started("relay-1"))).await;
    stream.ack(event(&id, 1, started("relay-1"))).await;
    stream.ack(event(&id, 2, caller("hello"))).await;
    let sent = answer("command", calls.send_command(say(&id, "hi"))).await;
    match stream.next().await.expect("command") {
        pb::attach_response::Msg::Command(c) => assert_eq!(c.command_id, sent.command_id),
        other => panic!("expected command, got {other:?}"),
    }
    stream
        .ack(event(&id, 3, ended(pb::EndReason::CallerHangup)))
        .await;
    let mut seqs = Vec::new();
    while let Some(ev) = within("watch", watch.message()).await.expect("watch ok") {
        seqs.push(ev.seq);
    }
    assert_eq!(seqs, vec![1, 2, 3]);
    let listed = answer(
        "list",
        calls.list_calls(pb::ListCallsRequest {
            campaign_id: "c".into(),
            ..Default::default()
        }),
    )
    .await;
    assert_eq!(listed.calls.len(), 20);
    let transcript = transcript(&mut calls, &id).await;
    assert_eq!(transcript.turns.len(), 1);
}

//! Two real control processes sharing one real redis-server: watches see events written
//! through the other replica, commands reach the replica holding the call, and a call
//! whose relay vanished ends with RELAY_LOST once its lease runs out.

mod common;

use std::collections::HashSet;

use callbridge_proto::pb;
use callbridge_testkit::redis_server::RedisServer;
use common::*;
use pb::attach_response::Msg;
use tonic::Code;

/// Reads `n` events from a watch stream.
async fn take(stream: &mut tonic::Streaming<pb::CallEvent>, n: usize) -> Vec<pb::CallEvent> {
    let mut out = Vec::new();
    while out.len() < n {
        let ev = within("watch event", stream.message())
            .await
            .expect("watch ok")
            .expect("watch open");
        out.push(ev);
    }
    out
}

#[tokio::test]
async fn watches_on_one_replica_see_events_written_through_another() {
    let redis = RedisServer::unix().expect("redis");
    let a = Control::start(ControlOpts::new(&redis.url(), "replica-a")).await;
    let b = Control::start(ControlOpts::new(&redis.url(), "replica-b")).await;
    let mut agents = a.agents().await;
    let mut calls_a = a.calls().await;
    let mut calls_b = b.calls().await;
    let mut relay_a = a.relay().await;
    create_agent(&mut agents, "agent").await;
    let id = create_call(&mut calls_a, "agent", "camp").await.call_id;

    // Watchers on B, opened before anything is written: one per call, one per campaign.
    let mut watch = watch_call(&mut calls_b, &id, 0).await;
    let mut campaign = answer(
        "watch campaign",
        calls_b.watch_calls(pb::WatchCallsRequest {
            campaign_id: "camp".into(),
        }),
    )
    .await;

    let mut stream = attach(&mut relay_a, &id, "relay-1", false)
        .await
        .expect("attached");
    stream.ack(event(&id, 1, started("relay-1"))).await;
    for seq in 2..=40 {
        stream
            .ack(event(&id, seq, caller(&format!("line {seq}"))))
            .await;
    }
    let first = take(&mut watch, 40).await;
    let seqs: Vec<u64> = first.iter().map(|e| e.seq).collect();
    assert_eq!(
        seqs,
        (1..=40).collect::<Vec<_>>(),
        "in order, no gap, no duplicate"
    );
    let live = take(&mut campaign, 1).await;
    assert_eq!(live[0].call_id, id);

    // A second watcher on B resumes from seq 25 while writing continues on A.
    let mut resumed = watch_call(&mut calls_b, &id, 25).await;
    for seq in 41..=60 {
        stream
            .ack(event(&id, seq, caller(&format!("line {seq}"))))
            .await;
    }
    stream
        .ack(event(&id, 61, ended(pb::EndReason::AgentHangup)))
        .await;
    let rest = take(&mut resumed, 36).await;
    let seqs: Vec<u64> = rest.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (26..=61).collect::<Vec<_>>());
    // Both watches end after the final event.
    assert!(
        within("resumed ends", resumed.message())
            .await
            .expect("clean end")
            .is_none()
    );
    let tail = take(&mut watch, 21).await;
    assert_eq!(tail.last().map(|e| e.seq), Some(61));
    assert!(
        within("watch ends", watch.message())
            .await
            .expect("clean end")
            .is_none()
    );

    // Watching a finished call replays it and closes.
    let mut replay = watch_call(&mut calls_a, &id, 59).await;
    let seqs: Vec<u64> = take(&mut replay, 2).await.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, vec![60, 61]);
    assert!(
        within("replay ends", replay.message())
            .await
            .expect("clean end")
            .is_none()
    );
    refused(
        "watch unknown",
        Code::NotFound,
        calls_b.watch_call(pb::WatchCallRequest {
            call_id: "nope".into(),
            after_seq: 0,
        }),
    )
    .await;
}

#[tokio::test]
async fn commands_reach_the_replica_holding_the_call() {
    let redis = RedisServer::unix().expect("redis");
    let a = Control::start(ControlOpts::new(&redis.url(), "cmd-a")).await;
    let b = Control::start(ControlOpts::new(&redis.url(), "cmd-b")).await;
    let mut agents = a.agents().await;
    let mut calls_b = b.calls().await;
    let mut relay_a = a.relay().await;
    create_agent(&mut agents, "agent").await;
    let id = create_call(&mut calls_b, "agent", "").await.call_id;

    // Not attached yet: not live.
    refused(
        "not live",
        Code::FailedPrecondition,
        calls_b.send_command(say(&id, "early")),
    )
    .await;

    let mut stream = attach(&mut relay_a, &id, "relay-1", false)
        .await
        .expect("attached");
    stream.ack(event(&id, 1, started("relay-1"))).await;
    let mut sent = HashSet::new();
    for i in 0..5 {
        let reply = answer(
            "send via B",
            calls_b.send_command(say(&id, &format!("say {i}"))),
        )
        .await;
        sent.insert(reply.command_id);
    }
    let mut received = HashSet::new();
    while received.len() < 5 {
        match stream.next().await.expect("stream ok") {
            Msg::Command(c) => {
                received.insert(c.command_id);
            }
            other => panic!("expected a command, got {other:?}"),
        }
    }
    assert_eq!(
        sent, received,
        "every command sent through B arrived on A's attach stream"
    );
    a.assert_metrics(&[
        "callbridge_control_commands_routed_total 5",
        "callbridge_control_attached_calls 1",
    ]);

    // Once the call ends, commands are refused again.
    stream
        .ack(event(&id, 2, ended(pb::EndReason::CallerHangup)))
        .await;
    refused(
        "after end",
        Code::FailedPrecondition,
        calls_b.send_command(say(&id, "late")),
    )
    .await;
}

#[tokio::test]
async fn relay_reconnects_to_another_replica_and_lost_relays_end_the_call() {
    let redis = RedisServer::unix().expect("redis");
    // A short lease, and the heartbeat timeout below it as control requires: the test's
    // relay streams send no heartbeats, so B may release the lease after 2 s of silence,
    // which ends the call the same way (RELAY_LOST once the lease has run out).
    let mut opts_a = ControlOpts::new(&redis.url(), "lease-a");
    opts_a.lease_secs = 3;
    opts_a.heartbeat_timeout_secs = 2;
    let mut opts_b = ControlOpts::new(&redis.url(), "lease-b");
    opts_b.lease_secs = 3;
    opts_b.heartbeat_timeout_secs = 2;
    let mut a = Control::start(opts_a).await;
    let b = Control::start(opts_b).await;
    let mut agents = b.agents().await;
    let mut calls_b = b.calls().await;
    let mut relay_a = a.relay().await;
    let mut relay_b = b.relay().await;
    create_agent(&mut agents, "agent").await;
    let id = create_call(&mut calls_b, "agent", "").await.call_id;
    let mut watch = watch_call(&mut calls_b, &id, 0).await;

    let mut stream = attach(&mut relay_a, &id, "relay-1", false)
        .await
        .expect("attached on A");
    stream.ack(event(&id, 1, started("relay-1"))).await;
    // Replica A dies with the stream open (no release): its lease must run out first.
    a.kill();
    drop(stream);
    refused(
        "lease still held by the dead stream",
        Code::AlreadyExists,
        attach(&mut relay_b, &id, "relay-2", false),
    )
    .await;
    // The same relay reconnecting is let in at once, on the other replica.
    let mut stream = attach(&mut relay_b, &id, "relay-1", true)
        .await
        .expect("reconnect on B");
    assert_eq!(stream.context.last_seq, 1);
    stream.ack(event(&id, 2, caller("still here"))).await;

    // Now the relay vanishes without `ended`: after the lease the call ends RELAY_LOST.
    drop(stream);
    let call = eventually("call ended by the sweeper", || {
        let mut calls = calls_b.clone();
        let id = id.clone();
        async move {
            let call = calls
                .get_call(pb::GetCallRequest { call_id: id })
                .await
                .ok()?
                .into_inner();
            (call.status == pb::CallStatus::Failed as i32).then_some(call)
        }
    })
    .await;
    assert_eq!(call.end_reason, pb::EndReason::RelayLost as i32);
    assert_eq!(call.last_seq, 3, "the end is stored as an event");
    let events = take(&mut watch, 3).await;
    match &events[2].kind {
        Some(pb::call_event::Kind::Ended(e)) => {
            assert_eq!(e.reason, pb::EndReason::RelayLost as i32)
        }
        other => panic!("expected ended, got {other:?}"),
    }
    assert!(
        within("watch ends", watch.message())
            .await
            .expect("clean end")
            .is_none()
    );
    refused(
        "ended",
        Code::FailedPrecondition,
        attach(&mut relay_b, &id, "relay-1", true),
    )
    .await;
    b.assert_metrics(&["callbridge_control_relay_lost_total 1"]);
}

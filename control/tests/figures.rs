//! Figures, not assertions of speed: `cargo test -p callbridge-control --test figures --
//! --ignored --nocapture` prints how long the real binary (debug build) takes for a few
//! operations on a unix-socket redis-server. Ignored by default: timings vary with the box.

mod common;

use std::time::Instant;

use callbridge_proto::pb;
use callbridge_testkit::redis_server::RedisServer;
use common::*;

#[tokio::test]
#[ignore = "prints timings; run explicitly"]
async fn print_event_and_bulk_figures() {
    let redis = RedisServer::unix().expect("redis");
    let control = Control::start(ControlOpts::new(&redis.url(), "figures")).await;
    let mut agents = control.agents().await;
    let mut calls = control.calls().await;
    let mut relay = control.relay().await;
    create_agent(&mut agents, "agent").await;

    let bulk = bulk_calls("bulk", "agent", 1000, "+1415556");
    let t = Instant::now();
    let created = answer("bulk", calls.create_calls(bulk)).await;
    let bulk_ms = t.elapsed().as_secs_f64() * 1000.0;
    assert_eq!(created.calls.len(), 1000);

    let t = Instant::now();
    let mut token = String::new();
    let mut listed = 0;
    loop {
        let page = answer(
            "list",
            calls.list_calls(pb::ListCallsRequest {
                campaign_id: "bulk".into(),
                page_size: 500,
                page_token: token.clone(),
                ..Default::default()
            }),
        )
        .await;
        listed += page.calls.len();
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    let list_ms = t.elapsed().as_secs_f64() * 1000.0;
    assert_eq!(listed, 1000);

    let id = first_call_id(&created);
    let mut stream = attach(&mut relay, &id, "relay-1", false)
        .await
        .expect("attach");
    stream.ack(event(&id, 1, started("relay-1"))).await;
    let n = 2000u64;
    let t = Instant::now();
    for seq in 2..=n + 1 {
        stream.ack(event(&id, seq, caller("x"))).await;
    }
    let per_event_us = t.elapsed().as_secs_f64() * 1e6 / n as f64;

    println!("figures (debug build, unix-socket redis, loopback gRPC):");
    println!("  CreateCalls 1000 calls:           {bulk_ms:8.1} ms");
    println!("  ListCalls 1000 calls (2 pages):   {list_ms:8.1} ms");
    println!(
        "  event store+ack, one at a time:   {per_event_us:8.1} us/event ({:.0} events/s)",
        1e6 / per_event_us
    );
}

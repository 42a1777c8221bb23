//! The library entry point `serve` with the in-memory store (no REDIS_URL), in-process on
//! a loopback listener: the zero-setup demo path behaves like the Redis one.

mod common;

use std::time::Duration;

use callbridge_control::config::Config;
use common::*;
use tonic::Code;

#[tokio::test]
async fn serve_with_the_in_memory_store_runs_a_call_and_shuts_down() {
    let secrets = |name: &str| match name {
        "CONTROL_APP_TOKENS" => Some(APP_TOKEN.into()),
        "CONTROL_RELAY_TOKENS" => Some(RELAY_TOKEN.into()),
        _ => None,
    };
    let config = Config::from_args_and_secrets(
        [
            "callbridge-control",
            "--metrics-listen",
            "",
            "--lease-secs",
            "2",
            // Below the lease (CONTROL_HEARTBEAT_TIMEOUT_SECS must be).
            "--heartbeat-timeout-secs",
            "1",
        ],
        &secrets,
    )
    .expect("valid config");
    assert_eq!(
        config.store,
        callbridge_control::config::StoreConfig::Memory
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(callbridge_control::serve(config, listener, async move {
        let _ = stop_rx.await;
    }));

    let channel = eventually("in-process control reachable", || async move {
        tonic::transport::Channel::from_shared(format!("http://{addr}"))
            .ok()?
            .connect()
            .await
            .ok()
    })
    .await;
    let mut agents = agents_client(channel.clone());
    let mut calls = calls_client(channel.clone());
    let mut relay = relay_client(channel);
    create_agent(&mut agents, "demo").await;
    let id = create_call(&mut calls, "demo", "").await.call_id;
    let mut watch = watch_call(&mut calls, &id, 0).await;
    let mut stream = attach(&mut relay, &id, "relay-1", false)
        .await
        .expect("attached");
    stream.ack(event(&id, 1, started("relay-1"))).await;
    stream.ack(event(&id, 1, started("relay-1"))).await;
    let err = stream
        .send(event(&id, 5, caller("gap")))
        .await
        .expect_err("gap");
    assert_eq!(err.code(), Code::FailedPrecondition);
    let first = within("watch event", watch.message())
        .await
        .expect("ok")
        .expect("event");
    assert_eq!(first.seq, 1);

    // A second stream is open when shutdown starts: it is ended, and serve returns.
    let mut stream = attach(&mut relay, &id, "relay-1", true)
        .await
        .expect("reconnect");
    stop_tx.send(()).expect("server running");
    let ended = within("stream ends on shutdown", stream.rx.message()).await;
    assert!(
        matches!(&ended, Err(s) if s.code() == Code::Unavailable) || matches!(ended, Ok(None)),
        "{ended:?}"
    );
    let result = tokio::time::timeout(Duration::from_secs(15), server)
        .await
        .expect("serve returns within the grace");
    result.expect("task").expect("clean shutdown");
}

//! Test kit for callbridge: the outside world, faked over real sockets, and the pieces
//! every cross-process test needs.
//!
//! Layout:
//! - [`conversation`]: the scripted call both fakes follow (serde-loadable).
//! - [`fake_realtime`]: a fake OpenAI Realtime server speaking the GA protocol.
//! - [`fake_twilio_rest`]: a fake Twilio REST API (Call resource), validated against Twilio's
//!   OpenAPI description, with scriptable call lifecycles and signed status callbacks.
//! - [`sim_caller`]: a simulated Twilio caller speaking Media Streams, signing like Twilio.
//! - [`signature`]: Twilio's `X-Twilio-Signature` algorithm (checked against SDK vectors).
//! - [`twiml`]: a small TwiML reader for what the relay answers.
//! - [`audio`]: μ-law tone/silence generation and the fake's speech test.
//! - [`http`]: a minimal HTTP/1.1 client (forms with a chosen `Host`).
//! - [`pki`]: a throwaway CA issuing server/client certificates (rcgen) as PEM files.
//! - [`procs`]: spawns the real `callbridge-control` / `callbridge-relay` binaries.
//! - [`redis_server`]: a throwaway `redis-server` (unix socket or loopback port), killed on drop.
//! - [`redis_cluster`]: a throwaway multi-master Redis Cluster on loopback, killed on drop.

pub mod audio;
pub mod conversation;
pub mod fake_realtime;
pub mod fake_twilio_rest;
pub mod http;
pub mod pki;
pub mod procs;
pub mod realtime_schema;
pub mod redis_cluster;
pub mod redis_server;
pub mod signature;
pub mod sim_caller;
pub mod twiml;

use std::future::Future;
use std::time::Duration;

/// Runs `fut` under `limit`, panicking with `what` and the caller's location when it
/// takes longer: every await in a test goes through this (or a wrapper of it with a fixed
/// limit), so a hang fails fast with a message.
#[track_caller]
pub fn with_timeout<F: Future>(
    limit: Duration,
    what: impl std::fmt::Display,
    fut: F,
) -> impl Future<Output = F::Output> {
    let caller = std::panic::Location::caller();
    async move {
        match tokio::time::timeout(limit, fut).await {
            Ok(v) => v,
            Err(_) => panic!("timed out after {limit:?}: {what} (at {caller})"),
        }
    }
}

/// Polls `cond` every 10 ms until it holds or `limit` passes; returns whether it held.
pub async fn eventually(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if cond() {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

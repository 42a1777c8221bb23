//! `RELAY_MAX_CALLS`: how many calls one relay carries at once, and the refusal above it.
//!
//! The default is sized from the memory the relay may use (cgroup v2 `memory.max`, as a
//! container limit sets it) rather than from the CPU: a relay that runs out of CPU
//! degrades audio for a while, one that runs out of memory is killed with every call on
//! it. Budget per call: [`BUDGET_PER_CALL`] (1 MiB), about eight times the worst RSS per
//! call measured under load in production mode (docs/performance.md: ≈ 70–135 KiB), which
//! leaves room for a call whose control link is away (up to `RELAY_EVENT_BUFFER` events
//! held) or whose model session is being replaced (two sockets for a moment). The first
//! [`BASE_RESERVE`] (64 MiB) of the limit is kept for the process itself:
//!
//! `max_calls = max(1, (memory.max − 64 MiB) / 1 MiB)`; no limit set (or no cgroup v2):
//! [`UNLIMITED_DEFAULT`] (2000). Either way at most `RELAY_MAX_CONNECTIONS`, since every
//! call holds one connection.
//!
//! Above the limit a new voice webhook answers 503 with `Retry-After` (Twilio then uses the
//! number's fallback URL) and a new stream upgrade answers 503; calls already carried are
//! not touched. The check comes before the signature check on purpose: an overloaded
//! relay does no HMAC for requests it will refuse anyway.

use std::path::Path;

use http::{HeaderValue, StatusCode};
use warp::reply::Response;
use warp::{Filter, Rejection};

use crate::http::Deps;

/// Memory budgeted per call.
pub const BUDGET_PER_CALL: u64 = 1024 * 1024;
/// Memory kept for the process before any call.
pub const BASE_RESERVE: u64 = 64 * 1024 * 1024;
/// The limit when the memory is not limited.
pub const UNLIMITED_DEFAULT: usize = 2000;
/// Where cgroup v2 exposes the container's memory limit.
const CGROUP_MEMORY_MAX: &str = "/sys/fs/cgroup/memory.max";
/// Seconds Twilio (or any client) is told to wait before trying again.
const RETRY_AFTER_SECS: &str = "5";

/// The default `RELAY_MAX_CALLS` for this process's memory limit.
pub fn sized_from_memory() -> usize {
    calls_for_memory(read_memory_max(Path::new(CGROUP_MEMORY_MAX)))
}

/// The formula: `None` means no limit.
pub fn calls_for_memory(memory_max: Option<u64>) -> usize {
    match memory_max {
        None => UNLIMITED_DEFAULT,
        Some(bytes) => {
            let calls = bytes.saturating_sub(BASE_RESERVE) / BUDGET_PER_CALL;
            usize::try_from(calls).unwrap_or(usize::MAX).max(1)
        }
    }
}

/// `memory.max` in bytes; `None` for `max` (no limit), a missing file or anything unreadable.
fn read_memory_max(path: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    text.trim().parse().ok()
}

/// Refused because the relay carries `RELAY_MAX_CALLS` calls already.
#[derive(Debug)]
pub(crate) struct AtCapacity;

impl warp::reject::Reject for AtCapacity {}

/// What is being refused, for the metric's label.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Refused {
    /// A voice webhook.
    Webhook,
    /// A media stream upgrade.
    Stream,
}

/// Passes while fewer than `RELAY_MAX_CALLS` calls are carried; rejects with
/// [`AtCapacity`] (counted) otherwise. A call counts from its upgrade to its end (the
/// drain's task tracker holds exactly those).
pub(crate) fn below_max_calls(
    deps: Deps,
    what: Refused,
) -> impl Filter<Extract = (), Error = Rejection> + Clone {
    warp::any()
        .and_then(move || {
            let deps = deps.clone();
            async move {
                if deps.tracker.len() < deps.call.config.max_calls() {
                    Ok(())
                } else {
                    deps.call.metrics.listeners().over_capacity(what);
                    Err(warp::reject::custom(AtCapacity))
                }
            }
        })
        .untuple_one()
}

/// The answer to [`AtCapacity`].
pub(crate) fn refusal() -> Response {
    let mut resp = crate::http::text(StatusCode::SERVICE_UNAVAILABLE, "relay is at capacity\n");
    resp.headers_mut().insert(
        http::header::RETRY_AFTER,
        HeaderValue::from_static(RETRY_AFTER_SECS),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sized_from_the_memory_limit() {
        const MIB: u64 = 1024 * 1024;
        assert_eq!(calls_for_memory(None), UNLIMITED_DEFAULT);
        assert_eq!(calls_for_memory(Some(512 * MIB)), 448);
        assert_eq!(calls_for_memory(Some(2048 * MIB)), 1984);
        // Less than the reserve still carries one call rather than none.
        assert_eq!(calls_for_memory(Some(32 * MIB)), 1);
    }

    #[test]
    fn memory_max_file_forms() {
        let dir = std::env::temp_dir().join(format!("relay-capacity-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let file = dir.join("memory.max");
        std::fs::write(&file, "max\n").expect("write");
        assert_eq!(read_memory_max(&file), None, "no limit");
        std::fs::write(&file, "536870912\n").expect("write");
        assert_eq!(read_memory_max(&file), Some(536_870_912));
        assert_eq!(read_memory_max(&dir.join("missing")), None);
        let _ = std::fs::remove_dir_all(&dir);
    }
}

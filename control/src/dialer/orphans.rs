//! The second path back for a call whose relay vanished: when Twilio does not ask the
//! `<Connect action>` URL after the stream's abnormal end (it is not bound to), the call
//! sits in Twilio with nothing to run until its lease lapses and it ends `RELAY_LOST`.
//! Control redirects such a call by REST (`POST Calls/{Sid}.json` with `Url` = that same
//! action URL), so Twilio asks it and any relay answers with a fresh stream, exactly as
//! if the action request had come (docs/twilio-rest.md, "Orphaned calls").
//!
//! A candidate is a live call (`IN_PROGRESS`, a Twilio sid, Twilio's status not final)
//! whose lease was released — its attach stream broke or went silent — at least
//! [`wait`] ago and not taken again. The wait is a third of the lease plus a second: a
//! held lease is renewed every third of it, so its expiry never falls in the candidates'
//! range, and the usual action request (within a second of the stream's end) has long
//! brought a new stream by then. Each lost stream is redirected at most once, across
//! replicas (an atomic claim in the store names the stream).

use std::sync::Arc;
use std::time::Duration;

use callbridge_proto::{paths, pb};

use crate::domain::call::{is_final, now_ms};
use crate::domain::twilio::TwilioCallStatus;
use crate::error::Error;
use crate::service::Shared;
use crate::store::CallStore;
use crate::twilio_rest::UpdateCall;

/// How often the replica looks for orphaned calls.
const TICK: Duration = Duration::from_millis(500);
/// Candidates examined per look.
const BATCH: usize = 100;

/// How long a released lease waits for its call to come back before the redirect.
pub(crate) fn wait(lease: Duration) -> Duration {
    lease / 3 + Duration::from_secs(1)
}

/// Runs until shutdown on a replica that can talk to Twilio.
pub(crate) async fn run<S: CallStore>(shared: Arc<Shared<S>>) {
    let (Some(_), Some(_)) = (&shared.twilio, &shared.config.relay_public_url) else {
        return;
    };
    if wait(shared.config.lease) >= shared.config.lease {
        tracing::info!(
            "CONTROL_LEASE_SECS too short to wait for an action request; no orphan redirects."
        );
        return;
    }
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shared.shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Err(err) = sweep(&shared).await {
            tracing::debug!(error = %err, "Orphan sweep failed; retrying next tick.");
        }
    }
}

async fn sweep<S: CallStore>(shared: &Arc<Shared<S>>) -> Result<(), Error> {
    let now = now_ms();
    let lease_ms = i64::try_from(shared.config.lease.as_millis()).unwrap_or(i64::MAX);
    let wait_ms = i64::try_from(wait(shared.config.lease).as_millis()).unwrap_or(i64::MAX);
    // Leases run out at release + lease: released `wait` ago or more means running out by
    // now + lease - wait. Those already out are the RELAY_LOST sweep's.
    let ids = shared
        .store
        .expired_leases(now + lease_ms - wait_ms, BATCH)
        .await?;
    for call in shared.store.get_calls(&ids).await?.into_iter().flatten() {
        let (Some(sid), Some(stream)) = (&call.twilio_call_sid, &call.lease_stream) else {
            continue;
        };
        let orphaned = call.lease_holder.is_none()
            && call.lease_until_ms > now
            && call.status == pb::CallStatus::InProgress
            && !is_final(call.status)
            && !call.twilio_status.is_some_and(TwilioCallStatus::is_final);
        if !orphaned {
            continue;
        }
        if !shared
            .store
            .claim_orphan_redirect(&call.call_id, stream, now)
            .await?
        {
            continue;
        }
        let Some(base) = shared.config.relay_public_url.as_deref() else {
            return Ok(());
        };
        let Some(twilio) = shared.twilio.as_ref() else {
            return Ok(());
        };
        let url = paths::after_stream(base, call.call_id.as_str(), stream.as_str(), None);
        match twilio
            .update_call(sid.as_str(), &UpdateCall::Redirect(url))
            .await
        {
            Ok(answer) => {
                shared.metrics.orphans_redirected.inc();
                tracing::info!(call_id = %call.call_id, status = %answer.status, "Orphaned call redirected by REST to its action URL.");
            }
            // 21220: the call is no longer in progress at Twilio; nothing to bring back.
            Err(err) => {
                tracing::warn!(call_id = %call.call_id, error = %err, "Orphaned call not redirected.");
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wait_leaves_held_leases_out_and_fits_in_the_lease() {
        let lease = Duration::from_secs(15);
        // Renewed every lease/3: a held lease always ends after now + 2/3 lease.
        assert!(lease - wait(lease) < lease - lease / 3);
        assert!(wait(lease) < lease);
        assert_eq!(wait(Duration::from_secs(9)), Duration::from_secs(4));
    }
}

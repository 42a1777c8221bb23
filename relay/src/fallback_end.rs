//! The end of a call the voice webhook sent straight to the fallback because the model
//! endpoint's circuit breaker was open ([`crate::model_breaker`]): the call never gets a
//! stream, so the relay attaches it once by itself and reports `MODEL_UNAVAILABLE`, as the
//! stream would have. Control then holds the same record as for a call whose dial failed
//! (`ended`, a fatal `model_error`), instead of an admitted call that never ends.

use std::time::Duration;

use callbridge_proto::pb;
use futures_channel::mpsc;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info_span, warn};

use crate::call::CallDeps;
use crate::call::control_link::{self, LinkIn, LinkSetup};
use crate::call_id::CallId;
use crate::control::AttachProof;
use crate::stream_credential::{Segment, StreamCredentials, now_ms};

/// Longest the report may take (an attach and one acknowledged batch; control restarting
/// is retried by the link meanwhile).
const REPORT_MAX: Duration = Duration::from_secs(30);

/// Why the call ended, as control stores it.
pub const DETAIL: &str = "model endpoint unreachable (circuit breaker open); not dialled";

/// Reports, in the background, that `call_id` ended with `MODEL_UNAVAILABLE` without a
/// stream. The drain waits for it (`tracker`). Without control there is nothing to tell.
pub fn spawn(
    deps: &CallDeps,
    streams: &StreamCredentials,
    tracker: &TaskTracker,
    call_id: CallId,
    call_sid: &str,
) {
    let Some(control) = deps.control.clone() else {
        return;
    };
    // The attach proves itself like a stream's first one: with a credential of its own,
    // which control consumes, so nothing can attach the call with it later.
    let now = now_ms();
    let credential = streams
        .key
        .mint(Some(&call_id), Segment::First, now, streams.ttl);
    let Ok(verified) = streams.key.verify(Some(&credential), Some(&call_id), now) else {
        warn!("A credential just minted does not verify; the call's end is not reported.");
        return;
    };
    let proof = AttachProof::of(
        verified,
        (!call_sid.is_empty()).then(|| call_sid.to_owned()),
    );
    let relay_id = deps.relay_id.to_string();
    let metrics = deps.metrics.clone();
    let capacity = deps.config.event_buffer;
    let token = tracker.token();
    let span = info_span!("call", call_id = %call_id, call_sid = %call_sid);
    let report = async move {
        let (ctx, stream) = match control
            .attach(&call_id, &relay_id, false, Some(proof))
            .await
        {
            Ok(attached) => attached,
            Err(e) => {
                warn!(error = %e, "Control refused the attach; the fallback call's end is not stored.");
                return;
            }
        };
        let (mut tx, rx) = mpsc::channel(2);
        // Commands have no call to go to; a closed channel is how the link learns that.
        let (commands, _) = mpsc::channel(1);
        let setup = LinkSetup {
            call_id,
            relay_id,
            control,
            metrics,
            capacity,
            last_seq: ctx.last_seq,
            heartbeat_interval_ms: ctx.heartbeat_interval_ms,
        };
        let events = [
            pb::call_event::Kind::ModelError(pb::ModelError {
                code: "model_unavailable".to_owned(),
                message: DETAIL.to_owned(),
                fatal: true,
                ..Default::default()
            }),
            pb::call_event::Kind::Ended(pb::Ended {
                reason: pb::EndReason::ModelUnavailable as i32,
                detail: DETAIL.to_owned(),
                transfer_to: String::new(),
            }),
        ];
        for kind in events {
            let _ = tx.try_send(LinkIn::now(kind));
        }
        drop(tx);
        control_link::run(setup, stream, rx, commands).await;
        debug!("The fallback call's end is stored.");
    };
    tokio::spawn(
        async move {
            if tokio::time::timeout(REPORT_MAX, report).await.is_err() {
                warn!("Control did not store the fallback call's end in time.");
            }
            drop(token);
        }
        .instrument(span),
    );
}

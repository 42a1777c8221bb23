//! The relay's place in control's ready-relay registry, and the drain's hand-off gate.
//!
//! The relay reports itself to control (`Relay.ReportPresence`) at the interval control
//! names, and says when it drains. A draining relay hands its calls off only when
//! control's answer counts another ready relay: handing calls to nobody would send every
//! caller through the action URL to a relay that does not exist, and the calls would
//! end. Without one, the calls stay on this relay until they end or the drain grace
//! ends; a relay that becomes ready meanwhile (the replacement pod) opens the gate.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tonic::Code;
use tracing::{debug, info, warn};

use crate::control::Control;
use crate::metrics::Metrics;

/// Next report after a failed one, and before control named an interval.
const RETRY: Duration = Duration::from_secs(2);
/// Bounds on control's interval (a bad answer must not make the relay spin or go quiet).
const MIN_INTERVAL: Duration = Duration::from_millis(100);
const MAX_INTERVAL: Duration = Duration::from_secs(60);

/// What the reporting task needs.
pub struct Presence {
    /// Control's client.
    pub control: Control,
    /// This relay.
    pub relay_id: Arc<str>,
    /// Cancelled at SIGTERM.
    pub drain_started: CancellationToken,
    /// Cancelled by this task when the drain may hand calls off.
    pub handoff: CancellationToken,
    /// `RELAY_DRAIN_HANDOFF`: off, the gate never opens.
    pub handoff_enabled: bool,
    /// Metrics.
    pub metrics: Metrics,
}

/// What a draining relay does with its calls after one answer (or failure) of control.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    /// Hand them off: another relay is ready (or control is too old to say).
    Open,
    /// Keep them: control knows no other ready relay, or could not be asked.
    Closed,
}

/// The drain's decision from control's answer to a report.
pub fn gate(answer: &Result<u32, Code>) -> Gate {
    match answer {
        Ok(others) if *others > 0 => Gate::Open,
        // A control without the registry: hand off as before it existed.
        Err(Code::Unimplemented) => Gate::Open,
        Ok(_) | Err(_) => Gate::Closed,
    }
}

impl Presence {
    /// Reports until the task is dropped (the relay exits).
    pub async fn run(self) {
        let mut warned = false;
        loop {
            let draining = self.drain_started.is_cancelled();
            let answer = self
                .control
                .report_presence(&self.relay_id, draining)
                .await
                .map_err(|e| {
                    debug!(error = %e, "Presence report failed.");
                    e.code()
                });
            let next = match &answer {
                Ok(ack) => Duration::from_millis(u64::from(ack.interval_ms))
                    .clamp(MIN_INTERVAL, MAX_INTERVAL),
                Err(_) => RETRY,
            };
            if draining && self.handoff_enabled && !self.handoff.is_cancelled() {
                match gate(
                    &answer
                        .as_ref()
                        .map(|a| a.other_ready_relays)
                        .map_err(|c| *c),
                ) {
                    Gate::Open => {
                        info!("Another relay is ready; live calls are handed off.");
                        self.metrics.drain_handoff_withheld().set(0);
                        self.handoff.cancel();
                    }
                    Gate::Closed if !warned => {
                        warned = true;
                        self.metrics.drain_handoff_withheld().set(1);
                        warn!(
                            "No other ready relay known to control: live calls stay here until they end or the drain grace (RELAY_DRAIN_GRACE_SECS) ends."
                        );
                    }
                    Gate::Closed => {}
                }
            }
            tokio::select! {
                () = tokio::time::sleep(next) => {}
                // Say "draining" at once: the other relays stop counting this one.
                () = self.drain_started.cancelled(), if !draining => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_are_handed_off_only_to_a_ready_relay() {
        assert_eq!(gate(&Ok(1)), Gate::Open);
        assert_eq!(gate(&Ok(0)), Gate::Closed);
        assert_eq!(gate(&Err(Code::Unavailable)), Gate::Closed);
        assert_eq!(gate(&Err(Code::DeadlineExceeded)), Gate::Closed);
        assert_eq!(gate(&Err(Code::Unimplemented)), Gate::Open);
    }
}

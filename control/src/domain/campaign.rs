//! What a campaign is, and the rules the dialer follows: the state machine, what becomes
//! of a number after each attempt (retry or final outcome), the progress counts, and the
//! pacer. Free of gRPC services and stores, like the rest of the domain.

use std::collections::BTreeMap;

use callbridge_proto::pb;
use serde::{Deserialize, Serialize};

use super::ids::{CallId, CampaignId};
use super::record::CallRecord;
use crate::error::Error;

/// Numbers per `AddCampaignNumbers` request, at most.
pub const MAX_NUMBERS_PER_REQUEST: usize = 10_000;
/// Pacing bounds (calls started per second).
pub const MAX_CALLS_PER_SECOND: f64 = 100.0;
/// Concurrency bound.
pub const MAX_CONCURRENT: u32 = 1000;
/// Attempts per number, at most.
pub const MAX_ATTEMPTS: u32 = 10;
/// Longest retry delay (a day).
pub const MAX_RETRY_DELAY_MS: u32 = 86_400_000;

/// One campaign as stored (the numbers are stored apart, one [`NumberState`] each).
#[derive(Debug, Clone, PartialEq)]
pub struct CampaignRecord {
    /// Campaign id (also the `campaign_id` of its calls).
    pub campaign_id: CampaignId,
    /// What the application asked for.
    pub settings: pb::CampaignSettings,
    /// Where the campaign is.
    pub state: pb::CampaignState,
    /// Creation time (ms).
    pub created_at_ms: i64,
    /// Last state change (ms).
    pub updated_at_ms: i64,
    /// Numbers added so far (their indexes are `0..numbers`).
    pub numbers: u32,
    /// Every number has its final outcome and no dialer needs to look at it again.
    pub settled: bool,
    /// Grows with every stored change of the campaign or of its numbers, so a watcher
    /// re-reads the numbers only when it moved.
    pub revision: u64,
}

impl CampaignRecord {
    /// The public view, with `progress` computed from the numbers.
    pub fn to_pb(&self, progress: pb::CampaignProgress) -> pb::Campaign {
        pb::Campaign {
            campaign_id: self.campaign_id.to_string(),
            settings: Some(self.settings.clone()),
            state: self.state as i32,
            progress: Some(progress),
            created_at_ms: self.created_at_ms,
            updated_at_ms: self.updated_at_ms,
        }
    }
}

/// A number's final outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Answered by a person (or with AMD off).
    Answered,
    /// Answered by a machine or fax (AMD).
    Machine,
    /// Busy on the last attempt.
    Busy,
    /// Not answered on the last attempt.
    NoAnswer,
    /// Failed (or refused by Twilio) on the last attempt.
    Failed,
    /// The campaign was canceled before the number was dialled (or its call was canceled).
    Canceled,
    /// On the do-not-call set when its turn came: never dialled.
    DoNotCall,
}

/// Where one number is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "snake_case")]
pub enum Phase {
    /// Waiting for its (next) attempt, not before this time (ms).
    Pending {
        /// Earliest dial time (ms); 0: at once.
        not_before_ms: i64,
    },
    /// An attempt is claimed: its call record (id `call_id`, the attempt's request key)
    /// was stored before Twilio was asked to create it, so a dialer that takes over can
    /// tell whether Twilio has the call.
    Placed {
        /// The attempt's call.
        call_id: String,
        /// When it was claimed (ms).
        claimed_at_ms: i64,
    },
    /// Final.
    Done {
        /// The outcome.
        outcome: Outcome,
    },
}

/// One number of a campaign as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NumberState {
    /// E.164.
    pub to: String,
    /// Copied onto each call.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub meta: BTreeMap<String, String>,
    /// IANA zone of the calling window; empty: the window's own.
    #[serde(default, rename = "tz", skip_serializing_if = "String::is_empty")]
    pub time_zone: String,
    /// Attempts claimed so far.
    #[serde(default)]
    pub attempts: u32,
    /// The calls of earlier attempts (their Twilio sids are not this attempt's).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub previous: Vec<String>,
    /// Where it is.
    #[serde(flatten)]
    pub phase: Phase,
}

impl NumberState {
    /// A number not dialled yet.
    pub fn new(to: String, meta: BTreeMap<String, String>) -> Self {
        NumberState {
            to,
            meta,
            time_zone: String::new(),
            attempts: 0,
            previous: Vec::new(),
            phase: Phase::Pending { not_before_ms: 0 },
        }
    }

    /// The stored form (JSON).
    pub fn encode(&self) -> String {
        // A struct of strings and numbers always serializes.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// From the stored form.
    pub fn decode(raw: &str) -> Option<Self> {
        serde_json::from_str(raw).ok()
    }

    /// The call of the attempt in flight, if one is.
    pub fn placed_call(&self) -> Option<&str> {
        match &self.phase {
            Phase::Placed { call_id, .. } => Some(call_id),
            _ => None,
        }
    }
}

/// A state change the API asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Draft → running.
    Start,
    /// Running → paused.
    Pause,
    /// Paused → running.
    Resume,
    /// Draft, running or paused → canceled.
    Cancel,
}

impl Action {
    /// The name used in errors.
    pub fn name(self) -> &'static str {
        match self {
            Action::Start => "start",
            Action::Pause => "pause",
            Action::Resume => "resume",
            Action::Cancel => "cancel",
        }
    }

    /// The states this action leaves from, and the one it goes to.
    pub fn edge(self) -> (&'static [pb::CampaignState], pb::CampaignState) {
        use pb::CampaignState as S;
        match self {
            Action::Start => (&[S::Draft], S::Running),
            Action::Pause => (&[S::Running], S::Paused),
            Action::Resume => (&[S::Paused], S::Running),
            Action::Cancel => (&[S::Draft, S::Running, S::Paused], S::Canceled),
        }
    }
}

/// The lower-case name of a state, for messages.
pub fn state_name(state: pb::CampaignState) -> &'static str {
    match state {
        pb::CampaignState::Unspecified => "unspecified",
        pb::CampaignState::Draft => "draft",
        pb::CampaignState::Running => "running",
        pb::CampaignState::Paused => "paused",
        pb::CampaignState::Completed => "completed",
        pb::CampaignState::Canceled => "canceled",
    }
}

/// Whether a campaign's numbers may still change (numbers added, calls placed).
pub fn is_open(state: pb::CampaignState) -> bool {
    matches!(
        state,
        pb::CampaignState::Draft | pb::CampaignState::Running | pb::CampaignState::Paused
    )
}

/// The refusal of `action` on a campaign in `current`.
pub fn wrong_state(campaign_id: &CampaignId, current: pb::CampaignState, action: Action) -> Error {
    Error::CampaignState {
        campaign_id: campaign_id.to_string(),
        current: state_name(current),
        action: action.name(),
    }
}

/// Checks a campaign's settings, naming the first bad field.
pub fn check_settings(settings: &pb::CampaignSettings) -> Result<(), Error> {
    crate::validate::e164("settings.from", &settings.from)?;
    let cps = settings.calls_per_second;
    if !(cps.is_finite() && cps > 0.0 && cps <= MAX_CALLS_PER_SECOND) {
        return Err(Error::invalid(
            "settings.calls_per_second",
            format!("{cps} is not in (0, {MAX_CALLS_PER_SECOND}]"),
        ));
    }
    if !(1..=MAX_CONCURRENT).contains(&settings.max_concurrent) {
        return Err(Error::invalid(
            "settings.max_concurrent",
            format!("{} is not in 1..={MAX_CONCURRENT}", settings.max_concurrent),
        ));
    }
    if let Some(retry) = &settings.retry {
        if retry.max_attempts > MAX_ATTEMPTS {
            return Err(Error::invalid(
                "settings.retry.max_attempts",
                format!("{} is more than {MAX_ATTEMPTS}", retry.max_attempts),
            ));
        }
        if retry.delay_ms > MAX_RETRY_DELAY_MS {
            return Err(Error::invalid(
                "settings.retry.delay_ms",
                format!("{} is more than {MAX_RETRY_DELAY_MS}", retry.delay_ms),
            ));
        }
        if retry.retryable_failed_codes.len() > 100 {
            return Err(Error::invalid(
                "settings.retry.retryable_failed_codes",
                "at most 100 codes",
            ));
        }
    }
    if let Some(dial) = &settings.dial {
        crate::dialer::check_dial("settings.", pb::Direction::Outbound, dial)?;
    }
    super::calling_window::Window::from_settings(settings)?;
    Ok(())
}

/// Checks numbers to add, naming the index of the first bad one.
pub fn check_numbers(numbers: &[pb::CampaignNumber]) -> Result<(), Error> {
    if numbers.is_empty() || numbers.len() > MAX_NUMBERS_PER_REQUEST {
        return Err(Error::invalid(
            "numbers",
            format!(
                "{} numbers; 1..={MAX_NUMBERS_PER_REQUEST} per request",
                numbers.len()
            ),
        ));
    }
    for (i, n) in numbers.iter().enumerate() {
        crate::validate::e164(&format!("numbers[{i}].number"), &n.number)?;
        crate::validate::metadata(&format!("numbers[{i}].metadata"), &n.metadata)?;
    }
    super::calling_window::check_number_zones(numbers)
}

/// Attempts a number gets in all.
pub fn max_attempts(settings: &pb::CampaignSettings) -> u32 {
    settings.retry.as_ref().map_or(1, |r| r.max_attempts.max(1))
}

/// The outcome of an attempt whose call has ended, from its final record.
pub fn attempt_outcome(call: &CallRecord) -> Outcome {
    match call.status {
        pb::CallStatus::Busy => Outcome::Busy,
        pb::CallStatus::NoAnswer => Outcome::NoAnswer,
        pb::CallStatus::Failed => Outcome::Failed,
        pb::CallStatus::Canceled => Outcome::Canceled,
        _ => match call.answered_by.as_deref() {
            Some(by) if by.starts_with("machine") || by == "fax" => Outcome::Machine,
            _ => Outcome::Answered,
        },
    }
}

/// Twilio's codes for a create it could not take then (too many requests, its own
/// error, unavailable), still there after the client's own retries. The number never
/// rang: it is not a failed call of the number.
pub const TWILIO_BUSY_CODES: [u32; 3] = [20429, 20500, 20503];

/// Whether the policy dials again after `outcome` (the attempt count is checked apart).
/// A create Twilio could not take then ([`TWILIO_BUSY_CODES`]) is dialled again whenever
/// attempts are left, whatever `failed` says.
pub fn retries(settings: &pb::CampaignSettings, outcome: Outcome, error_code: u32) -> bool {
    let Some(policy) = &settings.retry else {
        return false;
    };
    match outcome {
        Outcome::Busy => policy.busy,
        Outcome::NoAnswer => policy.no_answer,
        Outcome::Failed if TWILIO_BUSY_CODES.contains(&error_code) => true,
        Outcome::Failed => {
            policy.failed
                && (error_code == 0 || policy.retryable_failed_codes.contains(&error_code))
        }
        _ => false,
    }
}

/// What a number becomes once its attempt's call ended at `now_ms`.
pub fn after_attempt(
    settings: &pb::CampaignSettings,
    number: &NumberState,
    call: &CallRecord,
    now_ms: i64,
) -> Phase {
    let outcome = attempt_outcome(call);
    if number.attempts < max_attempts(settings)
        && retries(settings, outcome, call.twilio_error_code)
    {
        let delay = settings.retry.as_ref().map_or(0, |r| r.delay_ms);
        Phase::Pending {
            not_before_ms: now_ms + i64::from(delay),
        }
    } else {
        Phase::Done { outcome }
    }
}

/// The progress counts of a campaign's numbers.
pub fn progress<'a>(numbers: impl IntoIterator<Item = &'a NumberState>) -> pb::CampaignProgress {
    let mut p = pb::CampaignProgress::default();
    for n in numbers {
        p.numbers += 1;
        // A claimed attempt counts as dialled: its call record exists and Twilio is
        // being asked (or was).
        p.dialled += n.attempts;
        p.retried += n.attempts.saturating_sub(1);
        match &n.phase {
            Phase::Pending { .. } => p.remaining += 1,
            Phase::Placed { .. } => {
                p.remaining += 1;
                p.in_flight += 1;
            }
            Phase::Done { outcome } => match outcome {
                Outcome::Answered => p.answered += 1,
                Outcome::Machine => p.machine += 1,
                Outcome::Busy => p.busy += 1,
                Outcome::NoAnswer => p.no_answer += 1,
                Outcome::Failed => p.failed += 1,
                Outcome::Canceled => p.canceled += 1,
                Outcome::DoNotCall => p.do_not_call += 1,
            },
        }
    }
    p
}

/// The call id of a new attempt: fresh, and stored in the number before Twilio hears of
/// it (the attempt's request key).
pub fn attempt_call_id() -> CallId {
    CallId::generate()
}

/// Paces call starts at most `rate` per second by giving each a start slot: the first at
/// once, each next one `1/rate` after the one before, never in the past. Idle time builds
/// no burst, so any window of `t` seconds holds at most `1 + rate·t` slots (the generic
/// cell rate algorithm with a depth of one start). Slots may be handed out ahead, up to
/// a horizon: the dialer looks once per tick and takes every slot inside the next tick,
/// so a rate above one start per tick is kept too.
#[derive(Debug, Clone)]
pub struct Pacer {
    interval_ms: f64,
    next_ms: f64,
}

impl Pacer {
    /// A pacer whose first slot is `now_ms`.
    pub fn new(rate_per_second: f64, now_ms: i64) -> Self {
        let mut p = Pacer {
            interval_ms: 0.0,
            // Precision loss on ms counts is irrelevant here.
            #[allow(clippy::cast_precision_loss)]
            next_ms: now_ms as f64,
        };
        p.set_rate(rate_per_second);
        p
    }

    /// Changes the rate from the next slot on.
    pub fn set_rate(&mut self, rate_per_second: f64) {
        self.interval_ms = if rate_per_second > 0.0 {
            1000.0 / rate_per_second
        } else {
            f64::INFINITY
        };
    }

    /// Takes the next slot if it starts before `horizon_ms`: its time (ms, at or after
    /// `now_ms`). `None`: the next slot is at or beyond the horizon.
    pub fn slot_before(&mut self, now_ms: i64, horizon_ms: i64) -> Option<i64> {
        #[allow(clippy::cast_precision_loss)]
        let slot = self.next_ms.max(now_ms as f64);
        #[allow(clippy::cast_precision_loss)]
        if !slot.is_finite() || slot >= horizon_ms as f64 {
            return None;
        }
        self.next_ms = slot + self.interval_ms;
        #[allow(clippy::cast_possible_truncation)]
        Some(slot.ceil() as i64)
    }

    /// Milliseconds from `now_ms` until the next slot (0 if it is due).
    pub fn wait_ms(&self, now_ms: i64) -> i64 {
        #[allow(clippy::cast_precision_loss)]
        let wait = self.next_ms - now_ms as f64;
        if wait <= 0.0 {
            0
        } else if wait.is_finite() {
            #[allow(clippy::cast_possible_truncation)]
            let ms = wait.ceil() as i64;
            ms
        } else {
            i64::MAX
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(retry: pb::RetryPolicy) -> pb::CampaignSettings {
        pb::CampaignSettings {
            agent_id: "a".into(),
            from: "+14155550100".into(),
            calls_per_second: 10.0,
            max_concurrent: 5,
            retry: Some(retry),
            dial: None,
            calling_window: None,
        }
    }

    fn ended(status: pb::CallStatus, code: u32, answered_by: Option<&str>) -> CallRecord {
        CallRecord {
            twilio_error_code: code,
            answered_by: answered_by.map(str::to_owned),
            ..CallRecord::new(
                CallId::generate(),
                crate::domain::ids::AgentId::parse("agent_id", "a").expect("valid"),
                pb::Direction::Outbound,
                status,
                0,
            )
        }
    }

    #[test]
    fn the_pacer_never_starts_more_than_one_plus_rate_times_window() {
        // Looked at every 50 ms (the dialer's tick), taking every slot inside the next
        // tick: 10 s at 10, 33.3 and 100 starts per second.
        for rate in [10.0, 100.0 / 3.0, 100.0] {
            let mut pacer = Pacer::new(rate, 0);
            let mut slots = Vec::new();
            for now in (0..10_000).step_by(50) {
                while let Some(slot) = pacer.slot_before(now, now + 50) {
                    assert!(slot >= now, "never in the past");
                    slots.push(slot);
                }
            }
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            let expected = (rate * 10.0).ceil() as usize;
            assert_eq!(slots.len(), expected, "rate {rate}");
            for secs in [1i64, 2, 5] {
                #[allow(
                    clippy::cast_possible_truncation,
                    clippy::cast_sign_loss,
                    clippy::cast_precision_loss
                )]
                let bound = 1 + (rate * secs as f64) as usize;
                let most = slots
                    .iter()
                    .map(|&a| {
                        slots
                            .iter()
                            .filter(|&&b| b >= a && b < a + secs * 1000)
                            .count()
                    })
                    .max()
                    .unwrap_or(0);
                assert!(most <= bound, "rate {rate}: {most} in {secs} s");
            }
        }
        let mut idle = Pacer::new(10.0, 0);
        // A long idle time does not build a burst.
        assert_eq!(idle.slot_before(60_000, 60_050), Some(60_000));
        assert_eq!(idle.slot_before(60_001, 60_050), None);
        assert_eq!(idle.wait_ms(60_001), 99);
        // A slot at the horizon belongs to the next look.
        assert_eq!(idle.slot_before(60_050, 60_100), None);
        assert_eq!(idle.slot_before(60_100, 60_150), Some(60_100));
    }

    #[test]
    fn retries_follow_the_policy_and_stop_at_the_limit() {
        let s = settings(pb::RetryPolicy {
            busy: true,
            no_answer: false,
            failed: true,
            retryable_failed_codes: vec![31005],
            max_attempts: 3,
            delay_ms: 500,
        });
        let mut n = NumberState::new("+14155550001".into(), BTreeMap::new());
        n.attempts = 1;
        let busy = ended(pb::CallStatus::Busy, 0, None);
        assert_eq!(
            after_attempt(&s, &n, &busy, 1000),
            Phase::Pending {
                not_before_ms: 1500
            }
        );
        n.attempts = 3;
        assert_eq!(
            after_attempt(&s, &n, &busy, 1000),
            Phase::Done {
                outcome: Outcome::Busy
            }
        );
        n.attempts = 1;
        let no_answer = ended(pb::CallStatus::NoAnswer, 0, None);
        assert_eq!(
            after_attempt(&s, &n, &no_answer, 0),
            Phase::Done {
                outcome: Outcome::NoAnswer
            }
        );
        // A refused create (21211) is final; a listed code and a carrier failure retry.
        for (code, retried) in [(21211, false), (31005, true), (0, true)] {
            let failed = ended(pb::CallStatus::Failed, code, None);
            assert_eq!(
                matches!(after_attempt(&s, &n, &failed, 0), Phase::Pending { .. }),
                retried,
                "code {code}"
            );
        }
        // Twilio too busy to take the create (after the client's retries): the number
        // never rang, so it is dialled again even when failures do not retry.
        let no_failures = settings(pb::RetryPolicy {
            failed: false,
            max_attempts: 2,
            ..Default::default()
        });
        for (code, retried) in [
            (20429, true),
            (20500, true),
            (20503, true),
            (21211, false),
            (0, false),
        ] {
            let failed = ended(pb::CallStatus::Failed, code, None);
            assert_eq!(
                matches!(
                    after_attempt(&no_failures, &n, &failed, 0),
                    Phase::Pending { .. }
                ),
                retried,
                "code {code}"
            );
        }
        n.attempts = 2;
        let throttled = ended(pb::CallStatus::Failed, 20429, None);
        assert!(matches!(
            after_attempt(&no_failures, &n, &throttled, 0),
            Phase::Done {
                outcome: Outcome::Failed
            }
        ));
        let machine = ended(pb::CallStatus::Completed, 0, Some("machine_end_beep"));
        assert_eq!(attempt_outcome(&machine), Outcome::Machine);
        let human = ended(pb::CallStatus::Completed, 0, Some("human"));
        assert_eq!(attempt_outcome(&human), Outcome::Answered);
    }

    #[test]
    fn transitions_leave_only_from_their_states() {
        use pb::CampaignState as S;
        assert_eq!(Action::Start.edge(), (&[S::Draft][..], S::Running));
        assert!(!Action::Pause.edge().0.contains(&S::Draft));
        assert!(!Action::Cancel.edge().0.contains(&S::Completed));
        let err = wrong_state(
            &CampaignId::parse("campaign_id", "q3").expect("valid"),
            S::Completed,
            Action::Pause,
        );
        assert_eq!(
            err.to_string(),
            "campaign 'q3' is completed; cannot pause it"
        );
    }

    #[test]
    fn numbers_are_checked_by_index_and_stored_as_json() {
        let numbers = vec![
            pb::CampaignNumber {
                number: "+14155550001".into(),
                ..Default::default()
            },
            pb::CampaignNumber {
                number: "4155550002".into(),
                ..Default::default()
            },
        ];
        let err = check_numbers(&numbers).expect_err("refused");
        assert!(
            err.to_string()
                .starts_with("numbers[1].number: '4155550002'"),
            "{err}"
        );
        let n = NumberState {
            attempts: 2,
            phase: Phase::Placed {
                call_id: "c1".into(),
                claimed_at_ms: 5,
            },
            ..NumberState::new(
                "+14155550001".into(),
                BTreeMap::from([("k".into(), "v".into())]),
            )
        };
        assert_eq!(NumberState::decode(&n.encode()), Some(n));
    }
}

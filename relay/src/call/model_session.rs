//! A call's model session as a state machine: dialling the first session, ready, rolling
//! over to a replacement at a quiet moment, reconnecting (with backoff) after a loss, and
//! lost. Pure: no sockets, no clock (every method takes `now`). The call loop owns the
//! sockets and the dial tasks and does what the [`Action`]s say; `super::dial` opens
//! the sessions.
//!
//! Each [`State`] holds exactly the data valid in it: a rollover in flight always has its
//! replacement (dialling or on standby), a reconnect always has its outage, and only a lost
//! session has a reason it was lost.

use std::time::Duration;

use tokio::time::Instant;

use crate::error::RealtimeError;

/// Model sessions opened per call at most (a guard against a flapping model).
pub const MAX_MODEL_SESSIONS: u32 = 64;
/// First and largest pause before redialling a lost model.
pub const RECONNECT_BACKOFF_MIN: Duration = Duration::from_millis(100);
/// See [`RECONNECT_BACKOFF_MIN`].
pub const RECONNECT_BACKOFF_MAX: Duration = Duration::from_secs(2);
/// Pause before trying again when a rollover session could not be opened.
pub const ROLLOVER_RETRY: Duration = Duration::from_secs(5);

/// The settings the machine runs with (from the relay's configuration).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// How long a lost model may be retried (`None`: a loss ends the call).
    pub reconnect: Option<Duration>,
    /// When a session is replaced (`None`: never).
    pub rollover_after: Option<Duration>,
    /// How long a session owing an answer may stay silent.
    pub stall: Duration,
}

/// A run of failed sessions: since when the model is away, and how many redials so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outage {
    /// When the outage started.
    pub since: Instant,
    /// Redials in this outage (for the backoff).
    pub attempt: u32,
}

/// A replacement session during a rollover.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replacement {
    /// Being dialled and set up.
    Dialling,
    /// Set up; switched to at the next quiet moment.
    Standby,
}

/// Where the model session is.
#[derive(Debug)]
pub enum State {
    /// The call's first session is being dialled.
    Dialling,
    /// A session is up.
    Ready {
        /// When it opened.
        since: Instant,
        /// The last outage (a later loss within the reconnect limit continues it).
        outage: Option<Outage>,
    },
    /// A session is up and its replacement is on the way.
    RollingOver {
        /// When the current session opened.
        since: Instant,
        /// The last outage.
        outage: Option<Outage>,
        /// The replacement's session number.
        number: u32,
        /// Where the replacement is.
        replacement: Replacement,
    },
    /// The session was lost; a new one is being dialled (after a backoff).
    Reconnecting {
        /// The outage this redial is part of.
        outage: Outage,
        /// Caller frames queued for the new session before the gap began (they do not
        /// count against the gap budget).
        resent: usize,
    },
    /// The session went away this turn; [`ModelSession::after_turn`] decides what next.
    Lost {
        /// Why.
        why: RealtimeError,
        /// How long the lost session had been up (zero if it never came up).
        lived: Duration,
        /// The outage it was part of, if any.
        outage: Option<Outage>,
    },
}

/// What the call loop must do for the model session.
#[derive(Debug)]
pub enum Action {
    /// Let the lost session go and dial a new one after `delay`, told the conversation.
    Reconnect {
        /// Why the old one was lost.
        why: RealtimeError,
        /// Backoff before the dial.
        delay: Duration,
        /// Redials in this outage, this one included.
        attempt: u32,
    },
    /// No working session can be had: end the call (`MODEL_UNAVAILABLE`) with this detail.
    GiveUp(String),
    /// Quiet moment while draining: hand the call off.
    Handoff,
    /// Dial a replacement session (number `number`), told the conversation.
    DialReplacement {
        /// Its session number.
        number: u32,
    },
    /// Switch to the replacement on standby now; the old session goes.
    SwitchToReplacement {
        /// Its session number.
        number: u32,
    },
}

/// What the call loop knows about the turn that just ended.
#[derive(Debug, Clone, Copy)]
pub struct Turn {
    /// The call is ending.
    pub ending: bool,
    /// Nothing is in flight on the call's side (see `Call::quiet`); the session adds its
    /// own condition (not lost).
    pub quiet: bool,
    /// The relay is draining and wants to hand the call off.
    pub handoff_wanted: bool,
}

/// The model session of one call.
#[derive(Debug)]
pub struct ModelSession {
    state: State,
    limits: Limits,
    /// Sessions opened so far (numbers the next one).
    sessions: u32,
    /// A session was up at least once (a first dial that fails is not retried).
    ever_up: bool,
    /// When the current session last sent anything (stall detection).
    last_event: Instant,
    /// No rollover attempt before this (after a failed one).
    rollover_not_before: Option<Instant>,
}

impl ModelSession {
    /// The call's first session is being dialled.
    pub fn new(limits: Limits, now: Instant) -> Self {
        Self {
            state: State::Dialling,
            limits,
            sessions: 1,
            ever_up: false,
            last_event: now,
            rollover_not_before: None,
        }
    }

    /// The state.
    pub fn state(&self) -> &State {
        &self.state
    }

    /// Sessions opened so far.
    pub fn sessions(&self) -> u32 {
        self.sessions
    }

    /// A session is up (ready or rolling over).
    pub fn is_up(&self) -> bool {
        matches!(self.state, State::Ready { .. } | State::RollingOver { .. })
    }

    /// The session went away this turn.
    pub fn is_lost(&self) -> bool {
        matches!(self.state, State::Lost { .. })
    }

    /// While a lost session is redialled: the frames resent to the new one (the gap budget
    /// comes on top). `None` otherwise.
    pub fn gap_resent(&self) -> Option<usize> {
        match self.state {
            State::Reconnecting { resent, .. } => Some(resent),
            _ => None,
        }
    }

    /// Records how many frames were queued for the new session when it was dialled.
    pub fn set_resent(&mut self, n: usize) {
        if let State::Reconnecting { resent, .. } = &mut self.state {
            *resent = n;
        }
    }

    /// The current session sent something.
    pub fn heard(&mut self, now: Instant) {
        self.last_event = now;
    }

    /// The session being dialled is up and set up.
    pub fn dialled(&mut self, now: Instant) {
        let outage = match self.state {
            State::Dialling => None,
            State::Reconnecting { outage, .. } => Some(outage),
            _ => return,
        };
        self.state = State::Ready { since: now, outage };
        self.ever_up = true;
        self.last_event = now;
    }

    /// The session (or the dial of one) failed. The first reason of a turn is kept.
    pub fn lose(&mut self, why: RealtimeError, now: Instant) {
        let (lived, outage) = match self.state {
            State::Lost { .. } => return,
            State::Dialling => (Duration::ZERO, None),
            State::Ready { since, outage } | State::RollingOver { since, outage, .. } => {
                (now.duration_since(since), outage)
            }
            State::Reconnecting { outage, .. } => (Duration::ZERO, Some(outage)),
        };
        self.state = State::Lost { why, lived, outage };
    }

    /// The replacement dial finished. Returns whether the replacement is wanted (kept on
    /// standby); a failed one is retried after [`ROLLOVER_RETRY`].
    pub fn replacement_dialled(&mut self, ok: bool, now: Instant) -> bool {
        let State::RollingOver {
            since,
            outage,
            replacement,
            ..
        } = &mut self.state
        else {
            return false;
        };
        if ok {
            *replacement = Replacement::Standby;
            return true;
        }
        self.state = State::Ready {
            since: *since,
            outage: *outage,
        };
        self.rollover_not_before = Some(now + ROLLOVER_RETRY);
        false
    }

    /// When the current session should be replaced, if that is configured and not under
    /// way (and not while a hand-off is wanted: the next relay starts a fresh session).
    pub fn rollover_at(&self, handoff_wanted: bool) -> Option<Instant> {
        let after = self.limits.rollover_after?;
        let State::Ready { since, .. } = self.state else {
            return None;
        };
        if handoff_wanted {
            return None;
        }
        let at = since + after;
        Some(self.rollover_not_before.map_or(at, |t| t.max(at)))
    }

    /// When the model away counts as unavailable: the outage's start plus the reconnect
    /// limit, while no session is up.
    fn outage_deadline(&self) -> Option<Instant> {
        let limit = self.limits.reconnect?;
        let outage = match &self.state {
            State::Reconnecting { outage, .. } => Some(*outage),
            State::Lost { outage, .. } => *outage,
            _ => None,
        };
        outage.map(|o| o.since + limit)
    }

    /// When the session counts as stalled, if it owes an answer (`answer_due`).
    fn stall_at(&self, answer_due: bool) -> Option<Instant> {
        (self.is_up() && answer_due).then(|| self.last_event + self.limits.stall)
    }

    /// The session's next deadline: outage limit, stall, or a moment a rollover may
    /// become due (only a future one: a past one would spin the loop).
    pub fn next_deadline(
        &self,
        now: Instant,
        answer_due: bool,
        handoff_wanted: bool,
    ) -> Option<Instant> {
        let rollover = self.rollover_at(handoff_wanted).filter(|&at| at > now);
        [self.outage_deadline(), self.stall_at(answer_due), rollover]
            .into_iter()
            .flatten()
            .min()
    }

    /// A timer fired: when the outage outlasted the reconnect limit, returns the detail to
    /// end the call with (`MODEL_UNAVAILABLE`); a stalled session is lost (and redialled
    /// after the turn).
    pub fn on_timer(&mut self, now: Instant, answer_due: bool) -> Option<String> {
        if let (Some(at), Some(limit)) = (self.outage_deadline(), self.limits.reconnect)
            && now >= at
        {
            return Some(format!(
                "no working model session for {} s",
                limit.as_secs()
            ));
        }
        if self.stall_at(answer_due).is_some_and(|at| now >= at) {
            let secs = self.limits.stall.as_secs();
            self.lose(RealtimeError::Stalled { secs }, now);
        }
        None
    }

    /// The rules after every turn of the call loop, in order: a lost session is redialled
    /// (or the call gives up); at a quiet moment, a wanted hand-off happens, a replacement
    /// on standby is switched to, or a due rollover starts.
    pub fn after_turn(&mut self, now: Instant, turn: Turn) -> Vec<Action> {
        let mut actions = Vec::new();
        if turn.ending {
            return actions;
        }
        let state = std::mem::replace(&mut self.state, State::Dialling);
        if let State::Lost { why, lived, outage } = state {
            let action = self.recover(now, why, lived, outage);
            let gave_up = matches!(action, Action::GiveUp(_));
            actions.push(action);
            if gave_up {
                return actions;
            }
        } else {
            self.state = state;
        }
        if !turn.quiet {
            return actions;
        }
        if turn.handoff_wanted {
            actions.push(Action::Handoff);
            return actions;
        }
        if let State::RollingOver {
            number,
            outage,
            replacement: Replacement::Standby,
            ..
        } = self.state
        {
            self.state = State::Ready { since: now, outage };
            self.last_event = now;
            actions.push(Action::SwitchToReplacement { number });
        } else if self.rollover_at(false).is_some_and(|at| now >= at)
            && let State::Ready { since, outage } = self.state
        {
            let number = self.sessions;
            self.sessions += 1;
            self.state = State::RollingOver {
                since,
                outage,
                number,
                replacement: Replacement::Dialling,
            };
            actions.push(Action::DialReplacement { number });
        }
        actions
    }

    /// A lost session: redial (after a backoff) unless the model has been away too long,
    /// reconnecting is off, or it never came up (the fallback then serves the caller better
    /// than silence).
    fn recover(
        &mut self,
        now: Instant,
        why: RealtimeError,
        lived: Duration,
        outage: Option<Outage>,
    ) -> Action {
        let limit = match self.limits.reconnect {
            Some(limit) if self.ever_up => limit,
            _ => {
                let detail = why.to_string();
                self.state = State::Lost { why, lived, outage };
                return Action::GiveUp(detail);
            }
        };
        // A session that stayed up for the whole limit ends the previous outage; one that
        // died sooner (a flapping model) does not, so flapping ends the call in time too.
        let mut outage = match outage {
            Some(o) if lived < limit => o,
            _ => Outage {
                since: now,
                attempt: 0,
            },
        };
        let away = now.duration_since(outage.since);
        if away >= limit || self.sessions >= MAX_MODEL_SESSIONS {
            let detail = format!("{why}; no working model session for {} s", away.as_secs());
            self.state = State::Lost {
                why,
                lived,
                outage: Some(outage),
            };
            return Action::GiveUp(detail);
        }
        let delay = backoff(outage.attempt);
        outage.attempt += 1;
        self.sessions += 1;
        self.state = State::Reconnecting { outage, resent: 0 };
        Action::Reconnect {
            why,
            delay,
            attempt: outage.attempt,
        }
    }
}

/// Pause before the `attempt`-th redial of an outage (0: at once).
fn backoff(attempt: u32) -> Duration {
    match attempt {
        0 => Duration::ZERO,
        n => (RECONNECT_BACKOFF_MIN * 2u32.saturating_pow(n - 1)).min(RECONNECT_BACKOFF_MAX),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn limits() -> Limits {
        Limits {
            reconnect: Some(10 * S),
            rollover_after: Some(100 * S),
            stall: 5 * S,
        }
    }

    const QUIET: Turn = Turn {
        ending: false,
        quiet: true,
        handoff_wanted: false,
    };
    const BUSY: Turn = Turn {
        ending: false,
        quiet: false,
        handoff_wanted: false,
    };

    fn gone() -> RealtimeError {
        RealtimeError::Gone
    }

    fn up(now: Instant) -> ModelSession {
        let mut m = ModelSession::new(limits(), now);
        m.dialled(now);
        m
    }

    #[test]
    fn dial_ok_makes_the_session_ready() {
        let t0 = Instant::now();
        let mut m = ModelSession::new(limits(), t0);
        assert!(matches!(m.state(), State::Dialling));
        assert!(!m.is_up());
        assert!(m.after_turn(t0, QUIET).is_empty());
        m.dialled(t0 + S);
        assert!(matches!(m.state(), State::Ready { since, outage: None } if *since == t0 + S));
        assert!(m.is_up());
        assert_eq!(m.sessions(), 1);
    }

    #[test]
    fn a_first_dial_that_fails_gives_up_at_once() {
        let t0 = Instant::now();
        let mut m = ModelSession::new(limits(), t0);
        m.lose(RealtimeError::ConnectTimeout, t0);
        let actions = m.after_turn(t0, QUIET);
        assert!(
            matches!(&actions[..], [Action::GiveUp(d)] if d == "model connect timed out"),
            "{actions:?}"
        );
        assert!(m.is_lost());
    }

    #[test]
    fn no_reconnect_configured_gives_up_on_a_loss() {
        let t0 = Instant::now();
        let mut m = ModelSession::new(
            Limits {
                reconnect: None,
                ..limits()
            },
            t0,
        );
        m.dialled(t0);
        m.lose(gone(), t0 + S);
        assert!(matches!(
            &m.after_turn(t0 + S, BUSY)[..],
            [Action::GiveUp(d)] if d == "model socket closed"
        ));
    }

    #[test]
    fn dial_fail_backs_off_and_retries_until_one_works() {
        let t0 = Instant::now();
        let mut m = up(t0);
        m.lose(gone(), t0 + 20 * S);
        let mut delays = Vec::new();
        let mut now = t0 + 20 * S;
        for _ in 0..6 {
            match &m.after_turn(now, BUSY)[..] {
                [Action::Reconnect { delay, attempt, .. }] => {
                    delays.push(*delay);
                    assert_eq!(*attempt as usize, delays.len());
                }
                other => panic!("{other:?}"),
            }
            assert!(matches!(m.state(), State::Reconnecting { .. }));
            assert!(m.gap_resent().is_some());
            now += S / 10;
            m.lose(RealtimeError::ConnectTimeout, now);
        }
        assert_eq!(
            delays,
            [0, 100, 200, 400, 800, 1600].map(Duration::from_millis)
        );
        // The seventh is capped.
        assert!(matches!(
            &m.after_turn(now, BUSY)[..],
            [Action::Reconnect { delay, .. }] if *delay == RECONNECT_BACKOFF_MAX
        ));
        m.dialled(now + S);
        assert!(m.is_up());
        assert_eq!(m.sessions(), 8);
    }

    #[test]
    fn an_outage_longer_than_the_limit_gives_up() {
        let t0 = Instant::now();
        let mut m = up(t0);
        m.lose(gone(), t0 + 20 * S);
        assert!(matches!(
            &m.after_turn(t0 + 20 * S, BUSY)[..],
            [Action::Reconnect { .. }]
        ));
        // The redial's timer: the outage limit.
        assert_eq!(m.next_deadline(t0, false, false), Some(t0 + 30 * S));
        assert!(m.on_timer(t0 + 29 * S, false).is_none());
        assert!(matches!(
            m.on_timer(t0 + 30 * S, false),
            Some(d) if d == "no working model session for 10 s"
        ));
        // A dial failing past the limit gives up too.
        m.lose(RealtimeError::ConnectTimeout, t0 + 31 * S);
        assert!(matches!(
            &m.after_turn(t0 + 31 * S, BUSY)[..],
            [Action::GiveUp(d)] if d.starts_with("model connect timed out; no working model session for 11 s")
        ));
    }

    #[test]
    fn a_flapping_model_continues_its_outage_a_stable_one_starts_anew() {
        let t0 = Instant::now();
        let mut m = up(t0);
        m.lose(gone(), t0 + 20 * S);
        m.after_turn(t0 + 20 * S, BUSY);
        m.dialled(t0 + 21 * S);
        // Up for 2 s only (< the 10 s limit): the same outage, the backoff goes on.
        m.lose(gone(), t0 + 23 * S);
        assert!(matches!(
            &m.after_turn(t0 + 23 * S, BUSY)[..],
            [Action::Reconnect { attempt: 2, .. }]
        ));
        assert!(
            matches!(m.state(), State::Reconnecting { outage, .. } if outage.since == t0 + 20 * S)
        );
        m.dialled(t0 + 24 * S);
        // Up for 15 s: a new outage.
        m.lose(gone(), t0 + 39 * S);
        assert!(matches!(
            &m.after_turn(t0 + 39 * S, BUSY)[..],
            [Action::Reconnect { attempt: 1, delay, .. }] if delay.is_zero()
        ));
        assert!(
            matches!(m.state(), State::Reconnecting { outage, .. } if outage.since == t0 + 39 * S)
        );
    }

    #[test]
    fn the_session_cap_gives_up() {
        let t0 = Instant::now();
        let mut m = up(t0);
        let mut now = t0;
        loop {
            now += 20 * S;
            m.lose(gone(), now);
            let actions = m.after_turn(now, BUSY);
            if let [Action::GiveUp(d)] = &actions[..] {
                assert!(d.contains("no working model session"), "{d}");
                break;
            }
            assert!(matches!(&actions[..], [Action::Reconnect { .. }]));
            m.dialled(now);
        }
        assert_eq!(m.sessions(), MAX_MODEL_SESSIONS);
    }

    #[test]
    fn stall_loses_the_session_and_it_is_redialled() {
        let t0 = Instant::now();
        let mut m = up(t0);
        // Nothing owed: no stall deadline.
        assert_eq!(m.next_deadline(t0, false, false), Some(t0 + 100 * S));
        assert_eq!(m.next_deadline(t0, true, false), Some(t0 + 5 * S));
        m.heard(t0 + 2 * S);
        assert_eq!(m.next_deadline(t0, true, false), Some(t0 + 7 * S));
        assert!(m.on_timer(t0 + 6 * S, true).is_none());
        assert!(m.is_up());
        assert!(m.on_timer(t0 + 7 * S, true).is_none());
        assert!(matches!(
            m.state(),
            State::Lost { why: RealtimeError::Stalled { secs: 5 }, lived, .. } if *lived == 7 * S
        ));
        assert!(matches!(
            &m.after_turn(t0 + 7 * S, QUIET)[..],
            [Action::Reconnect {
                why: RealtimeError::Stalled { .. },
                ..
            }]
        ));
    }

    #[test]
    fn the_first_loss_of_a_turn_is_the_reason() {
        let t0 = Instant::now();
        let mut m = up(t0);
        m.lose(gone(), t0);
        m.lose(RealtimeError::ConnectTimeout, t0);
        assert!(matches!(
            m.state(),
            State::Lost {
                why: RealtimeError::Gone,
                ..
            }
        ));
    }

    #[test]
    fn rollover_waits_for_a_quiet_moment_then_switches_at_another() {
        let t0 = Instant::now();
        let mut m = up(t0);
        assert_eq!(m.rollover_at(false), Some(t0 + 100 * S));
        assert!(m.after_turn(t0 + 99 * S, QUIET).is_empty());
        assert!(
            m.after_turn(t0 + 100 * S, BUSY).is_empty(),
            "not while busy"
        );
        assert!(matches!(
            &m.after_turn(t0 + 101 * S, QUIET)[..],
            [Action::DialReplacement { number: 1 }]
        ));
        assert!(matches!(
            m.state(),
            State::RollingOver {
                replacement: Replacement::Dialling,
                ..
            }
        ));
        assert_eq!(m.rollover_at(false), None, "one at a time");
        assert!(m.after_turn(t0 + 102 * S, QUIET).is_empty());
        assert!(m.replacement_dialled(true, t0 + 102 * S));
        assert!(
            m.after_turn(t0 + 103 * S, BUSY).is_empty(),
            "not while busy"
        );
        assert!(matches!(
            &m.after_turn(t0 + 104 * S, QUIET)[..],
            [Action::SwitchToReplacement { number: 1 }]
        ));
        assert!(matches!(m.state(), State::Ready { since, .. } if *since == t0 + 104 * S));
        assert_eq!(m.rollover_at(false), Some(t0 + 204 * S));
        assert_eq!(m.sessions(), 2);
    }

    #[test]
    fn a_failed_replacement_is_retried_later_and_the_session_goes_on() {
        let t0 = Instant::now();
        let mut m = up(t0);
        m.after_turn(t0 + 100 * S, QUIET);
        assert!(!m.replacement_dialled(false, t0 + 101 * S));
        assert!(matches!(m.state(), State::Ready { since, .. } if *since == t0));
        assert_eq!(m.rollover_at(false), Some(t0 + 106 * S));
        // The retry moment wakes the loop.
        assert_eq!(
            m.next_deadline(t0 + 101 * S, false, false),
            Some(t0 + 106 * S)
        );
        assert!(m.after_turn(t0 + 105 * S, QUIET).is_empty());
        assert!(matches!(
            &m.after_turn(t0 + 106 * S, QUIET)[..],
            [Action::DialReplacement { number: 2 }]
        ));
    }

    #[test]
    fn a_loss_during_a_rollover_drops_the_replacement_and_reconnects() {
        let t0 = Instant::now();
        let mut m = up(t0);
        m.after_turn(t0 + 100 * S, QUIET);
        m.replacement_dialled(true, t0 + 100 * S);
        m.lose(gone(), t0 + 100 * S);
        assert!(matches!(
            &m.after_turn(t0 + 100 * S, BUSY)[..],
            [Action::Reconnect { .. }]
        ));
        // A replacement arriving now is not wanted.
        assert!(!m.replacement_dialled(true, t0 + 100 * S));
        assert!(matches!(m.state(), State::Reconnecting { .. }));
    }

    #[test]
    fn handoff_happens_at_a_quiet_moment_and_stops_rollovers() {
        let t0 = Instant::now();
        let mut m = up(t0);
        let drain = Turn {
            handoff_wanted: true,
            ..QUIET
        };
        assert_eq!(m.rollover_at(true), None);
        assert!(
            m.after_turn(
                t0,
                Turn {
                    quiet: false,
                    ..drain
                }
            )
            .is_empty()
        );
        assert!(matches!(
            &m.after_turn(t0 + 200 * S, drain)[..],
            [Action::Handoff]
        ));
        // Not while lost: the loss is handled first, then the moment counts.
        m.lose(gone(), t0 + 201 * S);
        assert!(matches!(
            &m.after_turn(t0 + 201 * S, drain)[..],
            [Action::Reconnect { .. }, Action::Handoff]
        ));
    }

    #[test]
    fn nothing_happens_once_the_call_is_ending() {
        let t0 = Instant::now();
        let mut m = up(t0);
        m.lose(gone(), t0);
        let ending = Turn {
            ending: true,
            ..QUIET
        };
        assert!(m.after_turn(t0 + 200 * S, ending).is_empty());
        assert!(m.is_lost());
    }

    #[test]
    fn no_rollover_configured_never_rolls_over() {
        let t0 = Instant::now();
        let mut m = ModelSession::new(
            Limits {
                rollover_after: None,
                ..limits()
            },
            t0,
        );
        m.dialled(t0);
        assert_eq!(m.rollover_at(false), None);
        assert!(m.after_turn(t0 + 100_000 * S, QUIET).is_empty());
        assert_eq!(m.next_deadline(t0, false, false), None);
    }
}

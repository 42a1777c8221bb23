//! The circuit breaker of one model endpoint as a pure state machine: no sockets, no
//! clock (every method takes `now`). [`super::ModelBreakers`] feeds it the outcome of
//! every dial, asks it whether a new call may dial, and runs the probe it asks for.
//!
//! Closed → (N consecutive dial failures) → Open → (probe due) → HalfOpen (one probe
//! dial in flight) → Closed on success, or back to Open with a doubled pause on failure.
//! A successful dial of a live call closes the breaker from Open or HalfOpen too: the
//! endpoint answers again, whoever found out first.

use std::time::Duration;

use tokio::time::Instant;

/// Where the breaker is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Dials go out; `failures` consecutive ones failed so far.
    Closed {
        /// Consecutive dial failures.
        failures: u32,
    },
    /// New calls get the fallback at once; a probe dials at `next_probe`.
    Open {
        /// When the breaker opened.
        since: Instant,
        /// When the next probe may dial.
        next_probe: Instant,
        /// The pause before the next probe after this one fails.
        pause: Duration,
    },
    /// Open, with one probe dial in flight.
    HalfOpen {
        /// When the breaker opened.
        since: Instant,
        /// The pause before the next probe if this one fails.
        pause: Duration,
    },
}

/// A change worth a log line and a metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// The breaker opened after `failures` consecutive dial failures.
    Opened {
        /// The failures that opened it.
        failures: u32,
    },
    /// The breaker closed after being open for `open_for`.
    Closed {
        /// How long new calls got the fallback.
        open_for: Duration,
    },
}

/// What the prober does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// Dial now (the breaker is half-open until [`Breaker::probe_done`]).
    Now,
    /// Wait until then and ask again.
    At(Instant),
    /// A probe is out; its end ([`Breaker::probe_done`]) says what comes next.
    InFlight,
    /// The breaker is closed: no probe is needed.
    Stop,
}

/// The breaker's settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Consecutive dial failures that open the breaker (0: never opens).
    pub failures: u32,
    /// Pause before the first probe after opening; it doubles after each failed probe.
    pub probe_first: Duration,
    /// The longest pause between probes.
    pub probe_max: Duration,
}

/// One endpoint's breaker.
#[derive(Debug, Clone)]
pub struct Breaker {
    limits: Limits,
    state: State,
}

impl Breaker {
    /// A closed breaker.
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            state: State::Closed { failures: 0 },
        }
    }

    /// Where it is.
    pub fn state(&self) -> State {
        self.state
    }

    /// Whether a new call may dial (false while open or half-open).
    pub fn admits_new_calls(&self) -> bool {
        matches!(self.state, State::Closed { .. })
    }

    /// A dial (of a call, not a probe) could not connect: refused, timed out, or its
    /// handshake failed.
    pub fn dial_failed(&mut self, now: Instant) -> Option<Transition> {
        let State::Closed { failures } = self.state else {
            // Open already: the probe's schedule is what matters, not more failures.
            return None;
        };
        let failures = failures.saturating_add(1);
        if self.limits.failures == 0 || failures < self.limits.failures {
            self.state = State::Closed { failures };
            return None;
        }
        self.state = State::Open {
            since: now,
            next_probe: now + self.limits.probe_first,
            pause: self.limits.probe_first,
        };
        Some(Transition::Opened { failures })
    }

    /// A dial (of a call, not a probe) connected: the endpoint answers.
    pub fn dial_succeeded(&mut self, now: Instant) -> Option<Transition> {
        self.close(now)
    }

    /// What the prober does next; `Now` makes the breaker half-open.
    pub fn next_probe(&mut self, now: Instant) -> Probe {
        match self.state {
            State::Closed { .. } => Probe::Stop,
            State::Open {
                since,
                next_probe,
                pause,
            } => {
                if now < next_probe {
                    return Probe::At(next_probe);
                }
                self.state = State::HalfOpen { since, pause };
                Probe::Now
            }
            // One probe at a time: the one in flight reports through `probe_done`.
            State::HalfOpen { .. } => Probe::InFlight,
        }
    }

    /// The probe's dial finished.
    pub fn probe_done(&mut self, connected: bool, now: Instant) -> Option<Transition> {
        if connected {
            return self.close(now);
        }
        if let State::HalfOpen { since, pause } = self.state {
            let next = (pause * 2).min(self.limits.probe_max.max(self.limits.probe_first));
            self.state = State::Open {
                since,
                next_probe: now + pause,
                pause: next,
            };
        }
        None
    }

    fn close(&mut self, now: Instant) -> Option<Transition> {
        let was = std::mem::replace(&mut self.state, State::Closed { failures: 0 });
        match was {
            State::Closed { .. } => None,
            State::Open { since, .. } | State::HalfOpen { since, .. } => Some(Transition::Closed {
                open_for: now.duration_since(since),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIRST: Duration = Duration::from_millis(500);
    const MAX: Duration = Duration::from_secs(2);

    fn breaker(failures: u32) -> Breaker {
        Breaker::new(Limits {
            failures,
            probe_first: FIRST,
            probe_max: MAX,
        })
    }

    fn open(b: &mut Breaker, n: u32, now: Instant) {
        for _ in 1..n {
            assert_eq!(b.dial_failed(now), None);
        }
        assert_eq!(b.dial_failed(now), Some(Transition::Opened { failures: n }));
    }

    #[test]
    fn opens_after_n_consecutive_failures_only() {
        let t0 = Instant::now();
        let mut b = breaker(3);
        assert_eq!(b.dial_failed(t0), None);
        assert_eq!(b.dial_failed(t0), None);
        // A success in between starts the count again.
        assert_eq!(b.dial_succeeded(t0), None);
        assert_eq!(b.state(), State::Closed { failures: 0 });
        assert_eq!(b.dial_failed(t0), None);
        assert_eq!(b.dial_failed(t0), None);
        assert!(b.admits_new_calls());
        assert_eq!(b.dial_failed(t0), Some(Transition::Opened { failures: 3 }));
        assert!(!b.admits_new_calls());
        // More failures while open change nothing.
        assert_eq!(b.dial_failed(t0 + FIRST), None);
        assert_eq!(
            b.state(),
            State::Open {
                since: t0,
                next_probe: t0 + FIRST,
                pause: FIRST
            }
        );
    }

    #[test]
    fn zero_failures_never_opens() {
        let t0 = Instant::now();
        let mut b = breaker(0);
        for _ in 0..1000 {
            assert_eq!(b.dial_failed(t0), None);
        }
        assert!(b.admits_new_calls());
        assert_eq!(b.next_probe(t0), Probe::Stop);
    }

    #[test]
    fn one_probe_at_a_time_and_its_success_closes() {
        let t0 = Instant::now();
        let mut b = breaker(2);
        open(&mut b, 2, t0);
        assert_eq!(b.next_probe(t0), Probe::At(t0 + FIRST));
        let t1 = t0 + FIRST;
        assert_eq!(b.next_probe(t1), Probe::Now);
        assert!(matches!(b.state(), State::HalfOpen { .. }));
        assert!(
            !b.admits_new_calls(),
            "half-open still sends new calls away"
        );
        // Asked again while the probe is out: no second probe.
        assert_eq!(b.next_probe(t1), Probe::InFlight);
        let t2 = t1 + Duration::from_millis(30);
        assert_eq!(
            b.probe_done(true, t2),
            Some(Transition::Closed { open_for: t2 - t0 })
        );
        assert!(b.admits_new_calls());
        assert_eq!(b.next_probe(t2), Probe::Stop);
    }

    #[test]
    fn failed_probes_back_off_to_the_limit() {
        let t0 = Instant::now();
        let mut b = breaker(1);
        open(&mut b, 1, t0);
        let mut now = t0;
        let mut pauses = Vec::new();
        for _ in 0..5 {
            let Probe::At(at) = b.next_probe(now) else {
                panic!("waits first")
            };
            pauses.push(at - now);
            now = at;
            assert_eq!(b.next_probe(now), Probe::Now);
            assert_eq!(b.probe_done(false, now), None);
            assert!(!b.admits_new_calls());
        }
        assert_eq!(
            pauses,
            [FIRST, FIRST, FIRST * 2, FIRST * 4, MAX],
            "doubling after each failed probe, capped"
        );
    }

    #[test]
    fn a_live_calls_dial_closes_an_open_breaker() {
        let t0 = Instant::now();
        let mut b = breaker(1);
        open(&mut b, 1, t0);
        let t1 = t0 + Duration::from_millis(100);
        assert_eq!(
            b.dial_succeeded(t1),
            Some(Transition::Closed {
                open_for: Duration::from_millis(100)
            })
        );
        // The prober then finds nothing to do, and its late failure changes nothing.
        assert_eq!(b.next_probe(t1), Probe::Stop);
        assert_eq!(b.probe_done(false, t1), None);
        assert_eq!(b.state(), State::Closed { failures: 0 });
    }

    #[test]
    fn a_live_calls_dial_closes_a_half_open_breaker() {
        let t0 = Instant::now();
        let mut b = breaker(1);
        open(&mut b, 1, t0);
        assert_eq!(b.next_probe(t0 + FIRST), Probe::Now);
        assert!(matches!(
            b.dial_succeeded(t0 + FIRST),
            Some(Transition::Closed { .. })
        ));
        assert_eq!(b.probe_done(true, t0 + FIRST), None, "closed once only");
    }
}

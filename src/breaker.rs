//! Circuit breakers: a subscription's [`CircuitBreaker`] settings, and the state machine that
//! runs them ([`Breaker`]).
//!
//! Ground rules: a leaf. The rule is the classic consecutive-failures breaker: *closed* until
//! `failures` attempts in a row fail, then *open* for a cool-down, then *half-open*: exactly
//! one delivery (the probe) runs; its success closes the breaker, its failure opens it again
//! with the cool-down doubled (up to `max_cool_down`). While open or half-open the
//! subscription's deliveries park (see `shard::park`); the engine moves the breaker on, reads
//! its state, and reports its changes.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::sync::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering};

/// A breaker's change callback.
pub(crate) type OnChange = Arc<dyn Fn(&BreakerChange) + Send + Sync>;

/// A subscription's circuit breaker (see
/// [`SubscribeOptions::circuit_breaker`](crate::SubscribeOptions::circuit_breaker)): opens
/// after `failures` failed attempts in a row, parks the subscription's deliveries for a
/// cool-down, then lets one delivery through to probe; its success closes the breaker and
/// releases the parked deliveries in order, its failure opens it again for twice the
/// cool-down (up to [`max_cool_down`](Self::max_cool_down)). A probe that fails spends no
/// attempt: it parks again, first in line — unless it failed for good (permanent, or
/// discarded), when it goes its way and the next delivery probes.
///
/// # Examples
///
/// ```
/// use microbus::CircuitBreaker;
/// use std::time::Duration;
///
/// let breaker = CircuitBreaker::new(5, Duration::from_secs(1))
///     .max_cool_down(Duration::from_secs(30))
///     .on_change(|change| eprintln!("{change}"));
/// # let _ = breaker;
/// ```
#[derive(Clone)]
pub struct CircuitBreaker {
    pub(crate) failures: u32,
    pub(crate) cool_down: Duration,
    pub(crate) max_cool_down: Duration,
    pub(crate) on_change: Option<OnChange>,
}

impl CircuitBreaker {
    /// Opens after `failures` failed attempts in a row (at least 1), for `cool_down` (longer
    /// than zero); the cool-down doubles after each failed probe, up to 32 times `cool_down`
    /// unless [`max_cool_down`](Self::max_cool_down) says otherwise.
    pub fn new(failures: u32, cool_down: Duration) -> CircuitBreaker {
        CircuitBreaker {
            failures,
            cool_down,
            max_cool_down: cool_down.saturating_mul(32),
            on_change: None,
        }
    }

    /// The longest cool-down (at least the first one).
    pub fn max_cool_down(mut self, max: Duration) -> CircuitBreaker {
        self.max_cool_down = max;
        self
    }

    /// Called with each change of state, in order, on the bus's report thread (never a worker
    /// or the timer: one that blocks holds back only the reports after it), under the bus's
    /// guard: a panic is counted in
    /// [`CallbackPanics::breaker`](crate::CallbackPanics::breaker).
    pub fn on_change(
        mut self,
        callback: impl Fn(&BreakerChange) + Send + Sync + 'static,
    ) -> CircuitBreaker {
        self.on_change = Some(Arc::new(callback));
        self
    }

    /// What is wrong with the settings, if anything.
    pub(crate) fn check(&self) -> Result<(), &'static str> {
        if self.failures == 0 {
            return Err("failures must be at least 1");
        }
        if self.cool_down.is_zero() {
            return Err("the cool-down must be longer than zero");
        }
        if self.max_cool_down < self.cool_down {
            return Err("max_cool_down must be at least the cool-down");
        }
        Ok(())
    }
}

impl fmt::Debug for CircuitBreaker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreaker")
            .field("failures", &self.failures)
            .field("cool_down", &self.cool_down)
            .field("max_cool_down", &self.max_cool_down)
            .field("on_change", &self.on_change.is_some())
            .finish()
    }
}

/// Where a circuit breaker is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum BreakerState {
    /// Deliveries run.
    Closed,
    /// Deliveries park until the cool-down ends.
    Open,
    /// One delivery runs to probe; the others park.
    HalfOpen,
}

impl BreakerState {
    /// `closed`, `open` or `half-open`.
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half-open",
        }
    }

    fn from_u8(v: u8) -> BreakerState {
        match v {
            OPEN => BreakerState::Open,
            HALF_OPEN => BreakerState::HalfOpen,
            _ => BreakerState::Closed,
        }
    }
}

impl fmt::Display for BreakerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A circuit breaker's change of state, as [`CircuitBreaker::on_change`] is told it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct BreakerChange {
    /// The subscribing service.
    pub service: String,
    /// The handler's name.
    pub handler: String,
    /// The state it left.
    pub from: BreakerState,
    /// The state it entered.
    pub to: BreakerState,
    /// When it opened: for how long.
    pub cool_down: Option<Duration>,
}

impl fmt::Display for BreakerChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "circuit breaker of {} ({}): {} -> {}",
            self.handler, self.service, self.from, self.to
        )?;
        if let Some(d) = self.cool_down {
            write!(f, " for {d:?}")?;
        }
        Ok(())
    }
}

const CLOSED: u8 = 0;
const OPEN: u8 = 1;
const HALF_OPEN: u8 = 2;

/// Told of a change while the breaker can make no other.
pub(crate) type Report<'a> = &'a mut dyn FnMut(Transition);

/// A change the engine reports, and acts on (park, release).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Transition {
    pub(crate) from: BreakerState,
    pub(crate) to: BreakerState,
    pub(crate) cool_down: Option<Duration>,
}

/// A breaker as a subscription runs it.
pub(crate) struct Breaker {
    pub(crate) config: CircuitBreaker,
    state: AtomicU8,
    /// Failed attempts in a row.
    consecutive: AtomicU32,
    /// Set while half-open until a worker takes the probe.
    probe: AtomicBool,
    /// The cool-down now, and when the open breaker turns half-open.
    timing: Mutex<(Duration, Option<Instant>)>,
    /// Times it opened.
    pub(crate) opened: AtomicU64,
}

impl Breaker {
    pub(crate) fn new(config: CircuitBreaker) -> Breaker {
        let cool_down = config.cool_down;
        Breaker {
            config,
            state: AtomicU8::new(CLOSED),
            consecutive: AtomicU32::new(0),
            probe: AtomicBool::new(false),
            timing: Mutex::new((cool_down, None)),
            opened: AtomicU64::new(0),
        }
    }

    pub(crate) fn state(&self) -> BreakerState {
        BreakerState::from_u8(self.state.load(Ordering::Acquire))
    }

    /// A failed attempt: opens a closed breaker at the `failures`th in a row, and a half-open
    /// one at once (its probe failed), for twice the cool-down. `report` is told of the
    /// change while no other change can happen, so that reports keep the changes' order.
    pub(crate) fn failure(&self, now: Instant, report: Report<'_>) -> Option<Transition> {
        let n = self
            .consecutive
            .fetch_add(1, Ordering::AcqRel)
            .saturating_add(1);
        if self.state.load(Ordering::Acquire) == HALF_OPEN {
            return self.open_from(HALF_OPEN, now, true, report);
        }
        if n < self.config.failures {
            return None;
        }
        self.open_from(CLOSED, now, false, report)
    }

    /// A successful attempt: closes a half-open breaker.
    pub(crate) fn success(&self, report: Report<'_>) -> Option<Transition> {
        self.consecutive.store(0, Ordering::Release);
        if self.state.load(Ordering::Acquire) == CLOSED {
            return None;
        }
        let mut timing = self.timing.lock();
        self.state
            .compare_exchange(HALF_OPEN, CLOSED, Ordering::AcqRel, Ordering::Acquire)
            .ok()?;
        timing.0 = self.config.cool_down;
        let change = Transition {
            from: BreakerState::HalfOpen,
            to: BreakerState::Closed,
            cool_down: None,
        };
        report(change);
        Some(change)
    }

    fn open_from(
        &self,
        from: u8,
        now: Instant,
        backoff: bool,
        report: Report<'_>,
    ) -> Option<Transition> {
        let mut timing = self.timing.lock();
        self.state
            .compare_exchange(from, OPEN, Ordering::AcqRel, Ordering::Acquire)
            .ok()?;
        self.opened.fetch_add(1, Ordering::Relaxed);
        if backoff {
            timing.0 = timing.0.saturating_mul(2).min(self.config.max_cool_down);
        }
        let cool_down = timing.0;
        // A cool-down too long for the clock never ends.
        timing.1 = now.checked_add(cool_down);
        let change = Transition {
            from: BreakerState::from_u8(from),
            to: BreakerState::Open,
            cool_down: Some(cool_down),
        };
        report(change);
        Some(change)
    }

    /// When the open breaker turns half-open, if it is open.
    pub(crate) fn due(&self) -> Option<Instant> {
        if self.state.load(Ordering::Acquire) != OPEN {
            return None;
        }
        self.timing.lock().1
    }

    /// Turns an open breaker whose cool-down has ended half-open, with a probe to take.
    pub(crate) fn half_open(&self, now: Instant, report: Report<'_>) -> Option<Transition> {
        if self.due().is_none_or(|due| due > now) {
            return None;
        }
        let _timing = self.timing.lock();
        self.state
            .compare_exchange(OPEN, HALF_OPEN, Ordering::AcqRel, Ordering::Acquire)
            .ok()?;
        let change = Transition {
            from: BreakerState::Open,
            to: BreakerState::HalfOpen,
            cool_down: None,
        };
        // Reported before a probe can be taken (and fail, and report).
        report(change);
        self.probe.store(true, Ordering::Release);
        Some(change)
    }

    /// Gives back a probe taken by a delivery that could not run (it waits behind its key).
    pub(crate) fn give_back_probe(&self) {
        if self.state.load(Ordering::Acquire) == HALF_OPEN {
            self.probe.store(true, Ordering::Release);
        }
    }

    /// Takes the half-open breaker's one probe: `true` for one caller.
    pub(crate) fn take_probe(&self) -> bool {
        self.state.load(Ordering::Acquire) == HALF_OPEN
            && self
                .probe
                .compare_exchange(true, false, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    #[test]
    fn it_opens_at_the_nth_failure_in_a_row_and_backs_off_after_a_failed_probe() {
        let breaker = Breaker::new(CircuitBreaker::new(3, SECOND).max_cool_down(3 * SECOND));
        let mut reported = Vec::new();
        let mut log = |t: Transition| reported.push(t.to);
        let now = Instant::now();
        assert_eq!(breaker.failure(now, &mut log), None);
        assert_eq!(breaker.success(&mut log), None);
        assert_eq!(breaker.failure(now, &mut log), None);
        assert_eq!(breaker.failure(now, &mut log), None);
        let opened = breaker.failure(now, &mut log).unwrap();
        assert_eq!(
            (opened.from, opened.to, opened.cool_down),
            (BreakerState::Closed, BreakerState::Open, Some(SECOND))
        );
        // Further failures while open change nothing.
        assert_eq!(breaker.failure(now, &mut log), None);
        assert_eq!(
            breaker.half_open(now, &mut log),
            None,
            "not before the cool-down ends"
        );
        assert!(!breaker.take_probe());
        let half = breaker.half_open(now + SECOND, &mut log).unwrap();
        assert_eq!(half.to, BreakerState::HalfOpen);
        assert!(breaker.take_probe());
        assert!(!breaker.take_probe(), "one probe");
        let reopened = breaker.failure(now + SECOND, &mut log).unwrap();
        assert_eq!(reopened.cool_down, Some(2 * SECOND));
        breaker.half_open(now + 3 * SECOND, &mut log).unwrap();
        assert!(breaker.take_probe());
        assert_eq!(
            breaker
                .failure(now + 3 * SECOND, &mut log)
                .unwrap()
                .cool_down,
            Some(3 * SECOND),
            "capped"
        );
        breaker.half_open(now + 6 * SECOND, &mut log).unwrap();
        assert!(breaker.take_probe());
        let closed = breaker.success(&mut log).unwrap();
        assert_eq!(
            (closed.from, closed.to),
            (BreakerState::HalfOpen, BreakerState::Closed)
        );
        assert_eq!(breaker.opened.load(Ordering::Relaxed), 3);
        // The cool-down starts over.
        for _ in 0..3 {
            breaker.failure(now, &mut log);
        }
        assert_eq!(breaker.due(), now.checked_add(SECOND));
        use BreakerState::{Closed, HalfOpen, Open};
        assert_eq!(
            reported,
            [Open, HalfOpen, Open, HalfOpen, Open, HalfOpen, Closed, Open]
        );
    }

    #[test]
    fn bad_settings_are_named() {
        assert!(CircuitBreaker::new(0, SECOND).check().is_err());
        assert!(CircuitBreaker::new(1, Duration::ZERO).check().is_err());
        assert!(
            CircuitBreaker::new(1, SECOND)
                .max_cool_down(Duration::from_millis(1))
                .check()
                .is_err()
        );
        assert!(CircuitBreaker::new(1, Duration::MAX).check().is_ok());
    }
}

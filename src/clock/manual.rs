//! The manual clock (the `testing` feature): [`ManualClock`], and the [`Drive`] through which
//! its `advance` moves the buses built on it.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;

/// A manual clock's time, kept out of the system clock's path.
#[cold]
#[inline(never)]
pub(super) fn manual_nanos(manual: &Manual) -> u64 {
    manual.unix_nanos()
}

/// What a bus built on a manual clock lets [`ManualClock::advance`] do.
pub(crate) trait Drive: Send + Sync {
    /// Whether the calling thread is one of the bus's own (a handler): `advance` refuses.
    fn is_own_thread(&self) -> bool;
    /// What the bus is running when an advance begins (see [`settle`](Self::settle)).
    fn running(&self) -> Vec<Option<u64>>;
    /// Fires what is due at the clock's time now, waits until the work that made due has run
    /// (what `running` was running is not waited for), and returns when the next thing falls
    /// due, if anything waits on the clock.
    fn step(&self, running: &[Option<u64>]) -> Option<Instant>;
}

/// The state of a manual clock, shared by its handles and the buses built on it.
pub(crate) struct Manual {
    /// Offset zero.
    base: Instant,
    /// Offset zero, as nanoseconds since the Unix epoch.
    base_unix: u64,
    /// How far the clock has moved, in nanoseconds.
    offset: AtomicU64,
    drivers: Mutex<Vec<Weak<dyn Drive>>>,
    /// Held by the advance in progress: one at a time.
    advancing: Mutex<()>,
}

impl Manual {
    #[inline]
    pub(super) fn instant(&self) -> Instant {
        self.at(self.offset.load(Ordering::Acquire))
    }

    fn at(&self, offset: u64) -> Instant {
        // Past what an `Instant` holds the clock stands at the last one it can.
        let mut step = Duration::from_nanos(offset);
        loop {
            if let Some(at) = self.base.checked_add(step) {
                return at;
            }
            step /= 2;
        }
    }

    /// The wall-clock time it stands at.
    pub(super) fn system_time(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_nanos(self.unix_nanos())
    }

    #[inline]
    fn unix_nanos(&self) -> u64 {
        self.base_unix
            .saturating_add(self.offset.load(Ordering::Acquire))
    }

    /// The offset of `at` (rounded up to the nanosecond).
    fn offset_of(&self, at: Instant) -> u64 {
        let nanos = at.saturating_duration_since(self.base).as_nanos();
        u64::try_from(nanos).unwrap_or(u64::MAX)
    }

    /// Lets `advance` drive `driver` from now on (for as long as it lives).
    pub(crate) fn register(&self, driver: Weak<dyn Drive>) {
        let mut drivers = self.drivers.lock();
        drivers.retain(|d| d.strong_count() > 0);
        drivers.push(driver);
    }

    fn drivers(&self) -> Vec<Arc<dyn Drive>> {
        self.drivers
            .lock()
            .iter()
            .filter_map(Weak::upgrade)
            .collect()
    }
}

/// A clock a test moves by hand: build a bus on it with
/// [`BusBuilder::clock`](crate::BusBuilder::clock), and the bus reads every time it keeps from
/// it — ids and publish times, retry and publish delays, breaker cool-downs, stall detection,
/// dead-letter times, latencies, [`Context::deadline`](crate::Context::deadline). Nothing
/// that waits on it runs until [`advance`](Self::advance) moves it. Timeouts a caller passes
/// (`flush`, shutdown, `publish_timeout`, `Tracker::wait`) stay real time.
///
/// Handles are cheap clones of one clock; a clock may drive several buses.
///
/// # Examples
///
/// ```
/// use microbus::{Bus, Context, Event, HandlerError, HandlerResult, RetryPolicy};
/// use microbus::testing::ManualClock;
/// use serde::{Deserialize, Serialize};
/// use std::sync::atomic::{AtomicU32, Ordering};
/// use std::sync::Arc;
/// use std::time::Duration;
///
/// #[derive(Serialize, Deserialize)]
/// struct PaymentRequested { order: u64 }
/// impl Event for PaymentRequested { const NAME: &'static str = "PaymentRequested"; }
///
/// let clock = ManualClock::new();
/// let bus = Bus::builder().clock(&clock).build()?;
/// let calls = Arc::new(AtomicU32::new(0));
/// let seen = calls.clone();
/// bus.subscribe_with(
///     microbus::SubscribeOptions::new().retry(RetryPolicy::exponential(Duration::from_secs(5))),
///     move |_: &PaymentRequested, _: &Context| -> HandlerResult {
///         match seen.fetch_add(1, Ordering::SeqCst) {
///             0 | 1 => Err(HandlerError::msg("gateway down")),
///             _ => Ok(()),
///         }
///     },
/// )?;
/// bus.publish(PaymentRequested { order: 1 })?;
/// clock.advance(Duration::ZERO)?; // the first attempt runs, and fails
/// assert_eq!(calls.load(Ordering::SeqCst), 1);
/// clock.advance(Duration::from_secs(5))?; // the second, 5 s later
/// assert_eq!(calls.load(Ordering::SeqCst), 2);
/// clock.advance(Duration::from_secs(10))?; // the third, 10 s after that, succeeds
/// assert_eq!(calls.load(Ordering::SeqCst), 3);
/// bus.flush(Duration::from_secs(5))?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone)]
pub struct ManualClock {
    pub(crate) inner: Arc<Manual>,
}

impl ManualClock {
    /// A clock standing at the current wall-clock time.
    pub fn new() -> ManualClock {
        ManualClock::starting_at(SystemTime::now())
    }

    /// A clock standing at `start` (a time before the Unix epoch stands at the epoch).
    pub fn starting_at(start: SystemTime) -> ManualClock {
        let base_unix = start
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        ManualClock {
            inner: Arc::new(Manual {
                base: Instant::now(),
                base_unix,
                offset: AtomicU64::new(0),
                drivers: Mutex::new(Vec::new()),
                advancing: Mutex::new(()),
            }),
        }
    }

    /// The clock's time.
    pub fn now(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_nanos(self.inner.unix_nanos())
    }

    /// How far the clock has moved since it was made.
    pub fn elapsed(&self) -> Duration {
        Duration::from_nanos(self.inner.offset.load(Ordering::Acquire))
    }

    /// Moves the clock `by` (any duration; the clock stops at about 584 years), one due
    /// instant at a time: at each instant something waits for — a retry, a delayed publish, a
    /// breaker's cool-down, a stall check — it sets the clock to that instant, fires what is
    /// due, and waits until the work that made due has run to completion (handled, or failed
    /// and scheduled for later), before it moves on. It returns once the clock stands at the
    /// end and that work has run. `advance(Duration::ZERO)` runs what is due now.
    ///
    /// It does not wait for deliveries that were running when it was called (a handler
    /// blocked on something the test does next), nor for deferred deliveries to be completed,
    /// nor for reports to user callbacks (stalls, breaker changes), which run on the bus's
    /// report thread. It does wait for every delivery that falls due while it runs: one that
    /// blocks until the test does something after `advance` returns never lets it return.
    /// Events published from other threads meanwhile are run if they are due.
    ///
    /// # Errors
    ///
    /// [`AdvanceError`] when called from a handler (or another thread of a bus on this
    /// clock): it would wait for itself. The clock does not move.
    pub fn advance(&self, by: Duration) -> Result<(), AdvanceError> {
        let manual = &self.inner;
        let drivers = manual.drivers();
        if drivers.iter().any(|d| d.is_own_thread()) {
            return Err(AdvanceError(()));
        }
        let _one = manual.advancing.lock();
        let start = manual.offset.load(Ordering::Acquire);
        let by = u64::try_from(by.as_nanos()).unwrap_or(u64::MAX);
        let target = start.saturating_add(by);
        let running: Vec<Vec<Option<u64>>> = drivers.iter().map(|d| d.running()).collect();
        loop {
            let now = manual.offset.load(Ordering::Acquire);
            let next = drivers
                .iter()
                .zip(&running)
                .filter_map(|(d, r)| d.step(r))
                .map(|at| manual.offset_of(at))
                .min();
            match next {
                // Something fell due while the last instant's work ran: run it at that time.
                Some(at) if at <= now => continue,
                Some(at) if at <= target => manual.offset.store(at, Ordering::Release),
                _ if now == target => return Ok(()),
                _ => manual.offset.store(target, Ordering::Release),
            }
        }
    }
}

impl Default for ManualClock {
    fn default() -> Self {
        ManualClock::new()
    }
}

impl fmt::Debug for ManualClock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ManualClock")
            .field("now", &self.now())
            .field("elapsed", &self.elapsed())
            .finish()
    }
}

/// [`ManualClock::advance`] was called from a handler (or another thread of a bus on the
/// clock), where it would wait for itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdvanceError(());

impl fmt::Display for AdvanceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a manual clock cannot be advanced from a handler: it would wait for itself")
    }
}

impl std::error::Error for AdvanceError {}

#[cfg(test)]
mod tests {
    use super::super::Clock;
    use super::*;

    #[test]
    fn a_manual_clock_moves_only_when_advanced() {
        let start = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let clock = ManualClock::starting_at(start);
        let inner = Clock::Manual(clock.inner.clone());
        let before = inner.now();
        assert_eq!(clock.now(), start);
        assert_eq!(inner.system_time(), start);
        std::thread::sleep(Duration::from_millis(2));
        assert_eq!(inner.now(), before);
        clock.advance(Duration::from_millis(1_500)).unwrap();
        assert_eq!(inner.now() - before, Duration::from_millis(1_500));
        assert_eq!(clock.elapsed(), Duration::from_millis(1_500));
        assert_eq!(
            inner.unix_nanos(),
            1_700_000_001_500_000_000,
            "ids carry the clock's time"
        );
        clock.advance(Duration::MAX).unwrap();
        assert_eq!(clock.elapsed(), Duration::from_nanos(u64::MAX));
        assert!(inner.now() > before);
    }
}

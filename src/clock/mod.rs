//! The one clock a bus reads: the system's (the TSC, scaled against one wall-clock anchor), or,
//! with the `testing` feature, a [`ManualClock`](crate::testing::ManualClock) a test moves by
//! hand.
//!
//! Ground rules: every time the bus keeps — ids and so envelope publish times, retry and
//! publish delays, breaker cool-downs, stall detection, dead-letter times, latencies, handler
//! deadlines — comes from the bus's [`Clock`]. Timeouts a caller passes (`flush`, shutdown,
//! `publish_timeout`, `Tracker::wait`, a recorder's `wait_for`) are real time, whatever the
//! clock. Without the `testing` feature the clock is the system's alone, and reading it costs
//! what reading the system's clock does. A manual clock stands still until
//! `ManualClock::advance` moves it; the buses built on it register a `Drive` with it, through
//! which `advance` fires what falls due at each instant it steps to and waits for that work to
//! run.

use std::time::{Instant, SystemTime};

#[cfg(feature = "testing")]
mod manual;

#[cfg(feature = "testing")]
pub use self::manual::{AdvanceError, ManualClock};
#[cfg(feature = "testing")]
pub(crate) use self::manual::{Drive, Manual};
#[cfg(feature = "testing")]
use std::sync::Arc;

/// Where a bus reads the time.
#[derive(Clone, Default)]
pub(crate) enum Clock {
    /// The system's clock.
    #[default]
    System,
    /// A test's clock.
    #[cfg(feature = "testing")]
    Manual(Arc<Manual>),
}

impl Clock {
    /// The monotonic time now.
    #[inline]
    pub(crate) fn now(&self) -> Instant {
        match self {
            Clock::System => crate::sync::clock_now(),
            #[cfg(feature = "testing")]
            Clock::Manual(manual) => manual.instant(),
        }
    }

    /// Nanoseconds since the Unix epoch now (what ids carry).
    #[inline(always)]
    pub(crate) fn unix_nanos(&self) -> u64 {
        match self {
            Clock::System => crate::id::unix_nanos(),
            #[cfg(feature = "testing")]
            Clock::Manual(manual) => self::manual::manual_nanos(manual),
        }
    }

    /// The wall-clock time now.
    pub(crate) fn system_time(&self) -> SystemTime {
        match self {
            Clock::System => SystemTime::now(),
            #[cfg(feature = "testing")]
            Clock::Manual(manual) => manual.system_time(),
        }
    }

    /// Whether this is a manual clock.
    #[inline]
    pub(crate) fn is_manual(&self) -> bool {
        !matches!(self, Clock::System)
    }

    /// The manual clock, if this is one.
    #[cfg(feature = "testing")]
    pub(crate) fn manual(&self) -> Option<&Arc<Manual>> {
        match self {
            Clock::System => None,
            Clock::Manual(manual) => Some(manual),
        }
    }
}

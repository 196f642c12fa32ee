//! Retrying failed deliveries: the [`RetryPolicy`], the timing wheel and the timer thread that
//! drives it.

use std::fmt;
use std::time::Duration;

use crate::error::ConfigError;
use crate::handler::Verdict;

/// The default delay before the first retry of [`RetryPolicy::default`].
pub const DEFAULT_RETRY_DELAY: Duration = Duration::from_secs(5);
/// The default number of attempts, the first included.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 4;
/// The default longest delay between two attempts of an exponential policy.
pub const DEFAULT_MAX_RETRY_DELAY: Duration = Duration::from_secs(300);
/// The most attempts a policy may allow.
pub const MAX_ATTEMPTS: u32 = 1_000;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Backoff {
    None,
    Fixed(Duration),
    Exponential {
        base: Duration,
        factor: f64,
        max: Duration,
    },
}

/// How a failed delivery is tried again: the delays between attempts and how many attempts
/// there are in all.
///
/// A retry runs only the subscription that failed, on the event's shard, after the delay, with
/// [`Context::attempt`](crate::Context::attempt) counting up. `max_attempts` counts every
/// attempt, the first included. An error made with
/// [`HandlerError::permanent`](crate::HandlerError::permanent) is not retried.
///
/// Jitter shortens each delay by a random fraction of at most `jitter`: with `jitter(0.2)` a
/// 10 s delay becomes anything from 8 s to 10 s. The randomness comes from the bus's seedable
/// generator ([`BusBuilder::retry_seed`](crate::BusBuilder::retry_seed)).
///
/// # Examples
///
/// ```
/// use microbus::RetryPolicy;
/// use std::time::Duration;
///
/// let policy = RetryPolicy::exponential(Duration::from_millis(100))
///     .factor(3.0)
///     .max_delay(Duration::from_secs(1))
///     .max_attempts(5);
/// let delays: Vec<_> = (1..=5).map(|attempt| policy.delay_after(attempt, 0)).collect();
/// assert_eq!(
///     delays,
///     [
///         Some(Duration::from_millis(100)),
///         Some(Duration::from_millis(300)),
///         Some(Duration::from_millis(900)),
///         Some(Duration::from_secs(1)),
///         None, // the fifth attempt was the last
///     ]
/// );
/// ```
#[derive(Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    backoff: Backoff,
    max_attempts: u32,
    jitter: f64,
}

impl Default for RetryPolicy {
    /// Exponential from [`DEFAULT_RETRY_DELAY`], doubling up to [`DEFAULT_MAX_RETRY_DELAY`],
    /// [`DEFAULT_MAX_ATTEMPTS`] attempts in all.
    fn default() -> Self {
        RetryPolicy::exponential(DEFAULT_RETRY_DELAY)
    }
}

impl RetryPolicy {
    /// No retries: one attempt.
    pub fn none() -> RetryPolicy {
        RetryPolicy {
            backoff: Backoff::None,
            max_attempts: 1,
            jitter: 0.0,
        }
    }

    /// The same delay before every retry; [`DEFAULT_MAX_ATTEMPTS`] attempts.
    pub fn fixed(delay: Duration) -> RetryPolicy {
        RetryPolicy {
            backoff: Backoff::Fixed(delay),
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            jitter: 0.0,
        }
    }

    /// `base` before the first retry, doubling (see [`factor`](Self::factor)) up to
    /// [`DEFAULT_MAX_RETRY_DELAY`] (see [`max_delay`](Self::max_delay));
    /// [`DEFAULT_MAX_ATTEMPTS`] attempts.
    pub fn exponential(base: Duration) -> RetryPolicy {
        RetryPolicy {
            backoff: Backoff::Exponential {
                base,
                factor: 2.0,
                max: DEFAULT_MAX_RETRY_DELAY,
            },
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            jitter: 0.0,
        }
    }

    /// How many attempts in all, the first included (1 means no retry).
    pub fn max_attempts(mut self, attempts: u32) -> RetryPolicy {
        self.max_attempts = attempts;
        self
    }

    /// The growth of an exponential policy's delay from one retry to the next (at least 1).
    /// Other policies ignore it.
    pub fn factor(mut self, factor: f64) -> RetryPolicy {
        if let Backoff::Exponential { factor: f, .. } = &mut self.backoff {
            *f = factor;
        }
        self
    }

    /// The longest delay of an exponential policy. Other policies ignore it.
    pub fn max_delay(mut self, max: Duration) -> RetryPolicy {
        if let Backoff::Exponential { max: m, .. } = &mut self.backoff {
            *m = max;
        }
        self
    }

    /// Shortens each delay by a random fraction of at most `jitter` (from 0 to 1), so that
    /// deliveries that failed together do not all come back together.
    pub fn jitter(mut self, jitter: f64) -> RetryPolicy {
        self.jitter = jitter;
        self
    }

    /// The attempts allowed in all.
    pub fn attempts(&self) -> u32 {
        self.max_attempts
    }

    /// What becomes of failed attempt `attempt` given `verdict`: tried again after a delay
    /// (`Ok`), or given up (`Err`, and why): at once when the verdict is `Permanent` or
    /// `Discard`, or when the attempts are spent. `draw` gives the jitter's random number; it
    /// is called only for the policy's delay. The one place where a failure is decided, for
    /// handlers and deferred deliveries.
    pub(crate) fn decide(
        &self,
        verdict: Verdict,
        attempt: u32,
        draw: impl FnOnce() -> u64,
    ) -> Result<Duration, GiveUp> {
        match verdict {
            Verdict::Permanent => Err(GiveUp::Permanent),
            Verdict::Discard => Err(GiveUp::Discard),
            Verdict::RetryAfter(delay) if attempt < self.max_attempts => Ok(delay),
            Verdict::RetryAfter(_) => Err(GiveUp::Exhausted),
            _ => self.delay_after(attempt, draw()).ok_or(GiveUp::Exhausted),
        }
    }

    /// The delay before the attempt that follows failed attempt `attempt` (counting from 1),
    /// or `None` when `attempt` was the last. `draw` is the random number that sets the jitter
    /// (any `u64`; 0 means no shortening).
    ///
    /// The arithmetic saturates and never panics, whatever the policy: an exponential delay
    /// that outgrows the cap (or `f64`) is the cap, a factor below 1 or not a number counts as
    /// 1 and a jitter outside 0 to 1 is clamped into it (validation refuses such policies for
    /// a bus; this keeps a direct call total).
    pub fn delay_after(&self, attempt: u32, draw: u64) -> Option<Duration> {
        if attempt >= self.max_attempts {
            return None;
        }
        let delay = match self.backoff {
            Backoff::None => return None,
            Backoff::Fixed(delay) => delay,
            Backoff::Exponential { base, factor, max } => {
                let factor = if factor >= 1.0 { factor } else { 1.0 };
                let exponent = i32::try_from(attempt.saturating_sub(1)).unwrap_or(i32::MAX);
                let grown = factor.powi(exponent);
                // `grown` is at least 1 (or infinite): at or past the cap's ratio, the cap.
                let ratio = max.as_secs_f64() / base.as_secs_f64();
                if base.is_zero() {
                    Duration::ZERO
                } else if grown >= ratio {
                    max.max(base)
                } else {
                    Duration::try_from_secs_f64(base.as_secs_f64() * grown)
                        .map_or(max.max(base), |d| d.min(max.max(base)))
                }
            }
        };
        // A uniform fraction in [0, 1) from the top 53 bits of the draw.
        let unit = (draw >> 11) as f64 / (1u64 << 53) as f64;
        let jitter = if self.jitter > 0.0 {
            self.jitter.min(1.0)
        } else {
            0.0
        };
        let fraction = (1.0 - jitter * unit).clamp(0.0, 1.0);
        if fraction == 1.0 {
            return Some(delay);
        }
        // Below 1: the result is shorter than `delay` (its `f64` rounding aside, caught here).
        Some(
            Duration::try_from_secs_f64(delay.as_secs_f64() * fraction)
                .map_or(delay, |d| d.min(delay)),
        )
    }

    /// Checks the policy, naming `field` in the error.
    pub(crate) fn validate(&self, field: &'static str) -> Result<(), ConfigError> {
        if self.max_attempts == 0 || self.max_attempts > MAX_ATTEMPTS {
            return Err(ConfigError::new(
                field,
                format!(
                    "max_attempts must be from 1 to {MAX_ATTEMPTS} (got {})",
                    self.max_attempts
                ),
            ));
        }
        if !(0.0..=1.0).contains(&self.jitter) {
            return Err(ConfigError::new(
                field,
                format!("jitter must be from 0 to 1 (got {})", self.jitter),
            ));
        }
        if let Backoff::Exponential { factor, base, max } = self.backoff {
            if !(factor.is_finite() && factor >= 1.0) {
                return Err(ConfigError::new(
                    field,
                    format!("factor must be a number of at least 1 (got {factor})"),
                ));
            }
            if max < base {
                return Err(ConfigError::new(
                    field,
                    format!("max_delay ({max:?}) must not be below the first delay ({base:?})"),
                ));
            }
        }
        Ok(())
    }
}

impl fmt::Debug for RetryPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut s = f.debug_struct("RetryPolicy");
        match self.backoff {
            Backoff::None => s.field("backoff", &"none"),
            Backoff::Fixed(delay) => s.field("fixed", &delay),
            Backoff::Exponential { base, factor, max } => s
                .field("exponential", &base)
                .field("factor", &factor)
                .field("max_delay", &max),
        };
        s.field("max_attempts", &self.max_attempts)
            .field("jitter", &self.jitter)
            .finish()
    }
}

/// A small seedable generator (SplitMix64) for jitter.
#[derive(Debug, Clone)]
pub struct Jitter(u64);

impl Jitter {
    /// A generator seeded with `seed`: the same seed draws the same numbers.
    pub fn new(seed: u64) -> Jitter {
        Jitter(seed)
    }

    /// The next number.
    pub fn draw(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// Why a failed delivery is not tried again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum GiveUp {
    /// The handler said the error is permanent.
    Permanent,
    /// Every attempt the policy allows failed.
    Exhausted,
    /// The failure said to drop the event ([`Verdict::Discard`]).
    Discard,
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn defaults_follow_the_seed() {
        let policy = RetryPolicy::default();
        assert_eq!(policy.attempts(), 4);
        assert_eq!(policy.delay_after(1, 0), Some(Duration::from_secs(5)));
        assert_eq!(policy.delay_after(2, 0), Some(Duration::from_secs(10)));
        assert_eq!(policy.delay_after(3, 0), Some(Duration::from_secs(20)));
        assert_eq!(policy.delay_after(4, 0), None);
    }

    #[test]
    fn none_and_fixed() {
        assert_eq!(RetryPolicy::none().delay_after(1, 0), None);
        assert_eq!(RetryPolicy::none().attempts(), 1);
        let fixed = RetryPolicy::fixed(7 * MS).max_attempts(3);
        assert_eq!(fixed.delay_after(1, 0), Some(7 * MS));
        assert_eq!(fixed.delay_after(2, u64::MAX >> 1), Some(7 * MS));
        assert_eq!(fixed.delay_after(3, 0), None);
    }

    #[test]
    fn exponential_grows_by_the_factor_up_to_the_cap() {
        let policy = RetryPolicy::exponential(10 * MS)
            .factor(3.0)
            .max_delay(100 * MS)
            .max_attempts(10);
        let delays: Vec<_> = (1..10).map(|a| policy.delay_after(a, 0).unwrap()).collect();
        assert_eq!(
            delays,
            [10, 30, 90, 100, 100, 100, 100, 100, 100].map(|m| m * MS)
        );
        // Far past the cap nothing overflows.
        let long = RetryPolicy::exponential(MS).max_attempts(MAX_ATTEMPTS);
        assert_eq!(long.delay_after(999, 0), Some(DEFAULT_MAX_RETRY_DELAY));
    }

    #[test]
    fn policy_arithmetic_saturates_and_never_panics() {
        // 0 × ∞ used to be NaN.
        let zero = RetryPolicy::exponential(Duration::ZERO)
            .factor(1e300)
            .max_attempts(MAX_ATTEMPTS);
        assert!(zero.validate("retry").is_ok());
        for attempt in [1, 2, 310, 999] {
            assert_eq!(zero.delay_after(attempt, u64::MAX), Some(Duration::ZERO));
        }
        // Factor 10 overflowed `f64` near attempt 310: the cap from there on.
        let ten = RetryPolicy::exponential(MS)
            .factor(10.0)
            .max_attempts(MAX_ATTEMPTS);
        assert_eq!(ten.delay_after(309, 0), Some(DEFAULT_MAX_RETRY_DELAY));
        assert_eq!(ten.delay_after(999, 0), Some(DEFAULT_MAX_RETRY_DELAY));
        // The longest delays there are, with and without jitter.
        let forever = RetryPolicy::fixed(Duration::MAX).jitter(1.0);
        assert!(forever.validate("retry").is_ok());
        assert_eq!(forever.delay_after(1, 0), Some(Duration::MAX));
        // The most jitter takes all but 2^-53 of the delay off.
        assert!(forever.delay_after(1, u64::MAX).unwrap() < Duration::from_secs(4096));
        let huge = RetryPolicy::exponential(Duration::MAX).max_delay(Duration::MAX);
        assert_eq!(huge.delay_after(3, 0), Some(Duration::MAX));
        // Values validation refuses still give an answer.
        for policy in [
            RetryPolicy::exponential(MS).factor(f64::NAN),
            RetryPolicy::exponential(MS).factor(-3.0),
            RetryPolicy::exponential(MS).factor(f64::INFINITY),
            RetryPolicy::exponential(10 * MS).max_delay(MS),
            RetryPolicy::fixed(MS).jitter(2.0),
            RetryPolicy::fixed(MS).jitter(-1.0),
            RetryPolicy::fixed(MS).jitter(f64::NAN),
        ] {
            for attempt in [0, 1, 2, 3] {
                for draw in [0, 1 << 40, u64::MAX] {
                    let delay = policy.delay_after(attempt, draw).unwrap();
                    assert!(delay <= DEFAULT_MAX_RETRY_DELAY, "{policy:?}: {delay:?}");
                }
            }
        }
    }

    #[test]
    fn jitter_stays_within_its_bounds() {
        let policy = RetryPolicy::fixed(Duration::from_secs(10))
            .jitter(0.2)
            .max_attempts(2);
        let mut rng = Jitter::new(99);
        let mut lowest = Duration::MAX;
        let mut highest = Duration::ZERO;
        for _ in 0..10_000 {
            let delay = policy.delay_after(1, rng.draw()).unwrap();
            assert!(delay > Duration::from_secs(8) && delay <= Duration::from_secs(10));
            lowest = lowest.min(delay);
            highest = highest.max(delay);
        }
        assert!(lowest < Duration::from_millis(8_010), "{lowest:?}");
        assert!(highest > Duration::from_millis(9_990), "{highest:?}");
        assert_eq!(policy.delay_after(1, 0), Some(Duration::from_secs(10)));
        // The same seed draws the same delays.
        let (mut a, mut b) = (Jitter::new(5), Jitter::new(5));
        assert_eq!(
            policy.delay_after(1, a.draw()),
            policy.delay_after(1, b.draw())
        );
    }

    #[test]
    fn invalid_policies_name_their_field() {
        for (policy, reason) in [
            (RetryPolicy::fixed(MS).max_attempts(0), "max_attempts"),
            (
                RetryPolicy::fixed(MS).max_attempts(MAX_ATTEMPTS + 1),
                "max_attempts",
            ),
            (RetryPolicy::fixed(MS).jitter(1.5), "jitter"),
            (RetryPolicy::fixed(MS).jitter(f64::NAN), "jitter"),
            (RetryPolicy::exponential(MS).factor(0.5), "factor"),
            (RetryPolicy::exponential(MS).factor(f64::INFINITY), "factor"),
            (RetryPolicy::exponential(MS * 10).max_delay(MS), "max_delay"),
        ] {
            let err = policy.validate("retry").unwrap_err();
            assert_eq!(err.field(), "retry");
            assert!(err.reason().contains(reason), "{err}");
        }
        assert!(RetryPolicy::default().validate("retry").is_ok());
        assert!(RetryPolicy::none().validate("retry").is_ok());
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            /// Any policy at all, valid or not, answers without panicking, never above the
            /// longer of its first delay and its cap.
            #[test]
            fn any_policy_answers(
                base in any::<u64>(),
                base_nanos in 0u32..1_000_000_000,
                max in any::<u64>(),
                factor in any::<f64>(),
                jitter in any::<f64>(),
                attempts in any::<u32>(),
                attempt in any::<u32>(),
                draw in any::<u64>(),
            ) {
                let base = Duration::new(base, base_nanos);
                let max = Duration::from_secs(max);
                let policy = RetryPolicy::exponential(base)
                    .factor(factor)
                    .max_delay(max)
                    .jitter(jitter)
                    .max_attempts(attempts);
                if let Some(delay) = policy.delay_after(attempt, draw) {
                    prop_assert!(delay <= base.max(max));
                }
            }

            /// Exponential backoff stays within its bounds: no delay after the last attempt,
            /// none above the cap, none shortened by more than the jitter, and without jitter
            /// delays never shrink from one attempt to the next.
            #[test]
            fn backoff_stays_within_its_bounds(
                base_ms in 1u64..10_000,
                factor in 1.0f64..4.0,
                cap_factor in 1u64..100,
                jitter in 0.0f64..=1.0,
                attempts in 1u32..12,
                draw in any::<u64>(),
            ) {
                let base = Duration::from_millis(base_ms);
                let max = base * cap_factor as u32;
                let policy = RetryPolicy::exponential(base)
                    .factor(factor)
                    .max_delay(max)
                    .jitter(jitter)
                    .max_attempts(attempts);
                prop_assert!(policy.validate("retry").is_ok());
                let mut previous = Duration::ZERO;
                for attempt in 1..=attempts + 1 {
                    let delay = policy.delay_after(attempt, draw);
                    let full = policy.delay_after(attempt, 0);
                    if attempt >= attempts {
                        prop_assert_eq!(delay, None);
                        prop_assert_eq!(full, None);
                        continue;
                    }
                    let (delay, full) = (delay.unwrap(), full.unwrap());
                    prop_assert!(full <= max);
                    prop_assert!(full >= base);
                    prop_assert!(full >= previous, "{:?} after {:?}", full, previous);
                    prop_assert!(delay <= full);
                    let floor = full.as_secs_f64() * (1.0 - jitter);
                    prop_assert!(delay.as_secs_f64() >= floor - 1e-9, "{:?} below {}", delay, floor);
                    previous = full;
                }
            }
        }
    }
}

//! Validated settings and their defaults.

use std::time::Duration;

use crate::error::ConfigError;
use crate::retry::RetryPolicy;

/// The default per-shard channel capacity, in events.
pub const DEFAULT_CHANNEL_CAPACITY: usize = 1024;
/// The largest per-shard channel capacity, in events (see also [`MAX_CHANNEL_MEMORY`]).
pub const MAX_CHANNEL_CAPACITY: usize = 1 << 24;
/// The most memory the shards' channels may take together, in bytes: `workers ×
/// channel_capacity × CHANNEL_SLOT_BYTES` (136 bytes a slot, allocated when the bus is built).
/// 1 GiB, about 7.9 million queued events.
pub const MAX_CHANNEL_MEMORY: usize = 1 << 30;
/// The bytes one channel slot takes: a message of at most 128 bytes and the channel's stamp.
pub(crate) const CHANNEL_SLOT_BYTES: usize = 136;
/// The largest number of workers (shards).
pub const MAX_WORKERS: usize = 1024;
/// The default time `shutdown` gives handlers to finish what was accepted.
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);
/// The default name stamped as the source of events published through the bus itself.
pub const DEFAULT_SERVICE_NAME: &str = "app";
/// The default number of dead letters kept.
pub const DEFAULT_DEAD_LETTER_CAPACITY: usize = 10_000;
/// The longest service name, in bytes.
pub const MAX_NAME_LEN: usize = 256;

/// How an idle worker waits for work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum WaitStrategy {
    /// Park at once in the channel (the default): an idle worker uses no CPU, and a publisher
    /// that finds it parked pays for waking it (a system call), which the event waits for.
    #[default]
    Block,
    /// Poll the channel, busy-waiting, for up to the given time, and park after that. Events
    /// that arrive within it are picked up without a wake-up: lower and steadier latency, for
    /// a core kept busy while the bus is idle for less than that. A worker that shares its core
    /// with the publisher (a process pinned to one CPU) takes that time from it. At most 1
    /// second.
    SpinThenPark(Duration),
}

impl WaitStrategy {
    /// [`SpinThenPark`](Self::SpinThenPark) for `spin`.
    pub fn spin_then_park(spin: Duration) -> WaitStrategy {
        WaitStrategy::SpinThenPark(spin)
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Config {
    pub(crate) service_name: String,
    pub(crate) workers: usize,
    pub(crate) channel_capacity: usize,
    /// `None`: as large as the channel capacity.
    pub(crate) spill_capacity: Option<usize>,
    pub(crate) shutdown_timeout: Duration,
    pub(crate) retry: RetryPolicy,
    pub(crate) retry_seed: Option<u64>,
    pub(crate) dead_letter_capacity: usize,
    /// Whether shutdown keeps the deliveries that never ran as dead letters.
    pub(crate) dead_letter_left: bool,
    pub(crate) trace_capacity: usize,
    pub(crate) metrics: bool,
    pub(crate) metrics_sample_every: u32,
    pub(crate) wait_strategy: WaitStrategy,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            service_name: DEFAULT_SERVICE_NAME.to_owned(),
            workers: std::thread::available_parallelism().map_or(1, |n| n.get()),
            channel_capacity: DEFAULT_CHANNEL_CAPACITY,
            spill_capacity: None,
            shutdown_timeout: DEFAULT_SHUTDOWN_TIMEOUT,
            retry: RetryPolicy::default(),
            retry_seed: None,
            dead_letter_capacity: DEFAULT_DEAD_LETTER_CAPACITY,
            dead_letter_left: false,
            trace_capacity: 0,
            metrics: true,
            metrics_sample_every: 1,
            wait_strategy: WaitStrategy::Block,
        }
    }
}

/// Checks a service name: not empty, not padded with spaces, no control characters, at most
/// [`MAX_NAME_LEN`] bytes.
pub(crate) fn check_name(field: &'static str, name: &str) -> Result<(), ConfigError> {
    if name.trim().is_empty() {
        return Err(ConfigError::new(field, "must not be empty"));
    }
    if name.trim() != name {
        return Err(ConfigError::new(
            field,
            format!("must not start or end with white space (got {name:?})"),
        ));
    }
    if name.chars().any(char::is_control) {
        return Err(ConfigError::new(
            field,
            format!("must not contain control characters (got {name:?})"),
        ));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(ConfigError::new(
            field,
            format!("must be at most {MAX_NAME_LEN} bytes (got {})", name.len()),
        ));
    }
    Ok(())
}

impl Config {
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        check_name("service_name", &self.service_name)?;
        if self.workers == 0 {
            return Err(ConfigError::new("workers", "must be at least 1 (got 0)"));
        }
        if self.workers > MAX_WORKERS {
            return Err(ConfigError::new(
                "workers",
                format!("must be at most {MAX_WORKERS} (got {})", self.workers),
            ));
        }
        if self.channel_capacity == 0 {
            return Err(ConfigError::new(
                "channel_capacity",
                "must be at least 1 (got 0)",
            ));
        }
        if self.channel_capacity > MAX_CHANNEL_CAPACITY {
            return Err(ConfigError::new(
                "channel_capacity",
                format!(
                    "must be at most {MAX_CHANNEL_CAPACITY} (got {})",
                    self.channel_capacity
                ),
            ));
        }
        let channels = self
            .workers
            .saturating_mul(self.channel_capacity)
            .saturating_mul(CHANNEL_SLOT_BYTES);
        if channels > MAX_CHANNEL_MEMORY {
            return Err(ConfigError::new(
                "channel_capacity",
                format!(
                    "the channels of all workers must fit in {} MiB (got {} workers × {} \
                     slots × {CHANNEL_SLOT_BYTES} bytes = {} MiB)",
                    MAX_CHANNEL_MEMORY >> 20,
                    self.workers,
                    self.channel_capacity,
                    channels >> 20
                ),
            ));
        }
        if let Some(spill) = self.spill_capacity
            && spill > MAX_CHANNEL_CAPACITY
        {
            return Err(ConfigError::new(
                "spill_capacity",
                format!("must be at most {MAX_CHANNEL_CAPACITY} (got {spill})"),
            ));
        }
        if self.shutdown_timeout > Duration::from_secs(24 * 3600) {
            return Err(ConfigError::new(
                "shutdown_timeout",
                format!("must be at most 24 hours (got {:?})", self.shutdown_timeout),
            ));
        }
        if self.dead_letter_capacity > MAX_CHANNEL_CAPACITY {
            return Err(ConfigError::new(
                "dead_letter_capacity",
                format!(
                    "must be at most {MAX_CHANNEL_CAPACITY} (got {})",
                    self.dead_letter_capacity
                ),
            ));
        }
        if self.trace_capacity > MAX_CHANNEL_CAPACITY {
            return Err(ConfigError::new(
                "trace_capacity",
                format!(
                    "must be at most {MAX_CHANNEL_CAPACITY} (got {})",
                    self.trace_capacity
                ),
            ));
        }
        if let WaitStrategy::SpinThenPark(spin) = self.wait_strategy
            && spin > Duration::from_secs(1)
        {
            return Err(ConfigError::new(
                "wait_strategy",
                format!("must spin at most 1 second (got {spin:?})"),
            ));
        }
        if self.metrics_sample_every == 0 {
            return Err(ConfigError::new(
                "metrics_sample_every",
                "must be at least 1 (got 0)",
            ));
        }
        self.retry.validate("retry")
    }

    pub(crate) fn spill_capacity(&self) -> usize {
        self.spill_capacity.unwrap_or(self.channel_capacity)
    }
}

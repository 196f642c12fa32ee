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

/// How long a delivery may run before the bus reports it as stalled, by default (see
/// [`BusBuilder::stall_after`](crate::BusBuilder::stall_after)): a minute, long past what an
/// in-process handler should take, so that only a stuck one is reported.
pub const DEFAULT_STALL_AFTER: Duration = Duration::from_secs(60);

/// How many deliveries a bus with metrics on counts for each one it times, by default (see
/// [`BusBuilder::metrics_sample_every`](crate::BusBuilder::metrics_sample_every)): latencies
/// from one delivery in 16, counters from every one. Timing every delivery (two clock reads
/// and three histogram records) would cost a quarter of a single publish's work.
pub const DEFAULT_METRICS_SAMPLE_EVERY: u32 = 16;
/// The default name stamped as the source of events published through the bus itself.
pub const DEFAULT_SERVICE_NAME: &str = "app";
/// The default number of dead letters kept.
pub const DEFAULT_DEAD_LETTER_CAPACITY: usize = 10_000;
/// The longest service name, in bytes.
pub const MAX_NAME_LEN: usize = 256;
/// The most lanes a bus has, the default lane included.
pub const MAX_LANES: usize = 8;
/// The name of the bus's own lane, the one its [`workers`](crate::BusBuilder::workers) make.
pub const DEFAULT_LANE: &str = "default";

/// How an idle worker waits for work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum WaitStrategy {
    /// Park in the channel (the default): an idle worker uses no CPU, and a publisher that
    /// finds it parked pays for waking it (a system call), which the event waits for. A worker
    /// that sees its channel fill faster than it drains it one message at a time (a publisher
    /// running flat out on another core) looks again after 3 µs, staying off the channel
    /// meanwhile, before it parks: the channel then fills some events ahead of the worker
    /// instead of handing it each event's cache lines as the publisher writes them.
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

/// What a lane does with a delivery when the shard it goes to is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Backpressure {
    /// The publisher waits for room, as in the default lane (`try_publish` and
    /// `publish_timeout` hand the event back instead, unless another lane took it already).
    #[default]
    Block,
    /// The delivery is shed: settled at once as a dead letter with reason
    /// [`Shed`](crate::DeadLetterReason::Shed) (discarded when dead letters are off), counted
    /// per lane. The publisher never waits for this lane.
    Shed,
}

/// The settings of a lane: a set of workers of its own, each with its own bounded channel,
/// for the subscriptions given to it with
/// [`SubscribeOptions::lane`](crate::SubscribeOptions::lane). Declared with
/// [`BusBuilder::lane`](crate::BusBuilder::lane).
///
/// # Examples
///
/// ```
/// use microbus::{Backpressure, Bus, Lane};
///
/// let bus = Bus::builder()
///     .workers(2)
///     .lane("email", Lane::new(1).channel_capacity(256).backpressure(Backpressure::Shed))
///     .build()?;
/// assert_eq!(bus.workers(), 3);
/// # Ok::<(), microbus::ConfigError>(())
/// ```
#[derive(Debug, Clone)]
pub struct Lane {
    pub(crate) workers: usize,
    pub(crate) channel_capacity: Option<usize>,
    pub(crate) wait_strategy: Option<WaitStrategy>,
    pub(crate) backpressure: Backpressure,
}

impl Lane {
    /// A lane of `workers` worker threads (shards): at most that many of its handlers run at
    /// once. Its channel capacity and wait strategy are the bus's unless set.
    pub fn new(workers: usize) -> Lane {
        Lane {
            workers,
            channel_capacity: None,
            wait_strategy: None,
            backpressure: Backpressure::Block,
        }
    }

    /// Each of its shards' channel capacity, in events.
    pub fn channel_capacity(mut self, capacity: usize) -> Lane {
        self.channel_capacity = Some(capacity);
        self
    }

    /// How its idle workers wait for work.
    pub fn wait_strategy(mut self, strategy: WaitStrategy) -> Lane {
        self.wait_strategy = Some(strategy);
        self
    }

    /// What it does when a shard is full (default [`Backpressure::Block`]).
    pub fn backpressure(mut self, backpressure: Backpressure) -> Lane {
        self.backpressure = backpressure;
        self
    }
}

/// A lane as the bus runs it: its shards are `start..start + workers`.
#[derive(Debug, Clone)]
pub(crate) struct LaneConfig {
    pub(crate) name: String,
    pub(crate) start: usize,
    pub(crate) workers: usize,
    pub(crate) channel_capacity: usize,
    pub(crate) wait_strategy: WaitStrategy,
    pub(crate) backpressure: Backpressure,
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
    /// The lanes declared besides the default one, in order.
    pub(crate) lanes: Vec<(String, Lane)>,
    pub(crate) stall_after: Duration,
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
            metrics_sample_every: DEFAULT_METRICS_SAMPLE_EVERY,
            wait_strategy: WaitStrategy::Block,
            lanes: Vec::new(),
            stall_after: DEFAULT_STALL_AFTER,
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
        check_positive("stall_after", self.stall_after)?;
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
        self.lanes()?;
        self.retry.validate("retry")
    }

    /// Every lane, the default one first, with its shards: or a [`ConfigError`] for field
    /// `lane` naming the lane that is wrong (a bad or duplicate name, no workers, too many
    /// lanes or workers, a channel too small or too large).
    pub(crate) fn lanes(&self) -> Result<Vec<LaneConfig>, ConfigError> {
        let mut lanes = vec![LaneConfig {
            name: DEFAULT_LANE.to_owned(),
            start: 0,
            workers: self.workers,
            channel_capacity: self.channel_capacity,
            wait_strategy: self.wait_strategy,
            backpressure: Backpressure::Block,
        }];
        if 1 + self.lanes.len() > MAX_LANES {
            return Err(ConfigError::new(
                "lane",
                format!(
                    "at most {MAX_LANES} lanes, the default one included (got {})",
                    1 + self.lanes.len()
                ),
            ));
        }
        let mut start = self.workers;
        let mut memory = self.workers.saturating_mul(self.channel_capacity);
        for (name, lane) in &self.lanes {
            let wrong = |why: String| ConfigError::new("lane", format!("lane {name:?}: {why}"));
            check_name("lane", name).map_err(|e| wrong(e.to_string()))?;
            if lanes.iter().any(|l| l.name == *name) {
                return Err(wrong("declared twice".to_owned()));
            }
            if lane.workers == 0 {
                return Err(wrong("must have at least 1 worker (got 0)".to_owned()));
            }
            let capacity = lane.channel_capacity.unwrap_or(self.channel_capacity);
            if capacity == 0 || capacity > MAX_CHANNEL_CAPACITY {
                return Err(wrong(format!(
                    "channel capacity must be 1 to {MAX_CHANNEL_CAPACITY} (got {capacity})"
                )));
            }
            let wait_strategy = lane.wait_strategy.unwrap_or(self.wait_strategy);
            if let WaitStrategy::SpinThenPark(spin) = wait_strategy
                && spin > Duration::from_secs(1)
            {
                return Err(wrong(format!("must spin at most 1 second (got {spin:?})")));
            }
            lanes.push(LaneConfig {
                name: name.clone(),
                start,
                workers: lane.workers,
                channel_capacity: capacity,
                wait_strategy,
                backpressure: lane.backpressure,
            });
            start = start.saturating_add(lane.workers);
            memory = memory.saturating_add(lane.workers.saturating_mul(capacity));
        }
        if start > MAX_WORKERS {
            return Err(ConfigError::new(
                "lane",
                format!("all lanes together may have at most {MAX_WORKERS} workers (got {start})"),
            ));
        }
        if memory.saturating_mul(CHANNEL_SLOT_BYTES) > MAX_CHANNEL_MEMORY {
            return Err(ConfigError::new(
                "lane",
                format!(
                    "the channels of all lanes must fit in {} MiB",
                    MAX_CHANNEL_MEMORY >> 20
                ),
            ));
        }
        Ok(lanes)
    }

    pub(crate) fn spill_capacity(&self) -> usize {
        self.spill_capacity.unwrap_or(self.channel_capacity)
    }
}

/// Refuses a zero duration for setting `field`.
pub(crate) fn check_positive(field: &'static str, d: Duration) -> Result<(), ConfigError> {
    if d.is_zero() {
        return Err(ConfigError::new(field, "must be longer than zero"));
    }
    Ok(())
}

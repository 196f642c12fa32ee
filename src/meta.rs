//! What a subscription is apart from its handler ([`SubMeta`]): its identity, its retry
//! policy and its counters, read by the registry, the workers and the metrics.
//!
//! Ground rules: a leaf. The counters that a worker writes on every delivery are per worker
//! ([`CellsByWorker`]), each with one writer; the rest are shared atomics on the failure path.

use std::any::TypeId;
use std::fmt;
use std::time::Duration;

use crossbeam_utils::CachePadded;
use parking_lot::Mutex;

use crate::breaker::{Breaker, CircuitBreaker};
use crate::event::NameId;
use crate::handler::Classifier;
use crate::retry::RetryPolicy;
use crate::stats::OutcomeCounters;
use crate::sync::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering};

/// [`SubMeta::hold`]: paused by the user.
pub(crate) const PAUSED: u8 = 1;
/// [`SubMeta::hold`]: its circuit breaker is open or half-open.
pub(crate) const BREAKER: u8 = 2;

/// How many deliveries of a subscription may park (paused, or behind an open breaker) by
/// default before its publishers wait: see
/// [`SubscribeOptions::park_capacity`](crate::SubscribeOptions::park_capacity).
pub const DEFAULT_PARK_CAPACITY: u64 = 10_000;

/// How a subscription runs, as its options and the bus's configuration settled it.
pub(crate) struct SubSettings {
    pub(crate) retry: RetryPolicy,
    pub(crate) classify: Option<Classifier>,
    /// Its own `stall_after`, if it has one.
    pub(crate) stall_after: Option<Duration>,
    /// How long each call of its handler has ([`Context::deadline`](crate::Context::deadline)).
    pub(crate) timeout: Option<Duration>,
    /// How many of its deliveries may park before publishers wait (or a `Shed` lane sheds).
    pub(crate) park_capacity: u64,
    pub(crate) breaker: Option<CircuitBreaker>,
    /// At most one delivery per key in progress.
    pub(crate) ordered: bool,
    /// A dead-lettered head holds its key's later deliveries.
    pub(crate) hold_dead: bool,
    /// Its lane's index.
    pub(crate) lane: u8,
}

impl SubSettings {
    /// Retried by `retry` in lane `lane`, nothing else set.
    pub(crate) fn new(retry: RetryPolicy, lane: u8) -> SubSettings {
        SubSettings {
            retry,
            classify: None,
            stall_after: None,
            timeout: None,
            park_capacity: DEFAULT_PARK_CAPACITY,
            breaker: None,
            ordered: false,
            hold_dead: false,
            lane,
        }
    }
}

/// What a subscription is, apart from its handler.
pub(crate) struct SubMeta {
    pub(crate) id: u64,
    pub(crate) name: Box<str>,
    pub(crate) service: NameId,
    pub(crate) filter: Option<NameId>,
    pub(crate) event_name: &'static str,
    pub(crate) type_id: TypeId,
    /// The generation of the first snapshot that holds the subscription.
    pub(crate) since_gen: AtomicU32,
    pub(crate) retry: RetryPolicy,
    /// What decides its failures that the handler left to the policy.
    pub(crate) classify: Option<Classifier>,
    /// Its own `stall_after`, if it has one (else the bus's).
    pub(crate) stall_after: Option<Duration>,
    /// How long each call of its handler has.
    pub(crate) timeout: Option<Duration>,
    /// What holds its deliveries back ([`PAUSED`], [`BREAKER`]): while any, they park
    /// instead of running.
    pub(crate) hold: AtomicU8,
    /// Its circuit breaker, if it has one.
    pub(crate) breaker: Option<Breaker>,
    /// At most one delivery per key in progress ([`SubscribeOptions::ordered`]).
    ///
    /// [`SubscribeOptions::ordered`]: crate::SubscribeOptions::ordered
    pub(crate) ordered: bool,
    /// A dead-lettered head holds its key's later deliveries until the dead letter is
    /// redriven, skipped, purged or evicted.
    pub(crate) hold_dead: bool,
    /// Its deliveries parked now, on all shards.
    pub(crate) parked: AtomicU64,
    pub(crate) park_capacity: u64,
    /// The lane whose workers run it.
    pub(crate) lane: u8,
    pub(crate) active: AtomicBool,
    /// Its outcomes. `succeeded` counts only deferred deliveries completed with success (on
    /// whatever thread completed them): a worker counts its successes in `cells`, which no
    /// other worker writes.
    pub(crate) outcomes: OutcomeCounters,
    pub(crate) last_error: Mutex<Option<String>>,
    /// Counters each worker writes on every delivery (none with metrics off).
    pub(crate) cells: CellsByWorker,
}

impl SubMeta {
    /// A new subscription `id` of event type `E`, named `name`, for service `service` (and only
    /// events from `filter`, if given), run by `settings`, with `cells` for its hot counters.
    pub(crate) fn new<E: crate::event::Event>(
        id: u64,
        name: Box<str>,
        service: NameId,
        filter: Option<NameId>,
        settings: SubSettings,
        cells: CellsByWorker,
    ) -> SubMeta {
        SubMeta {
            id,
            name,
            service,
            filter,
            event_name: E::NAME,
            type_id: TypeId::of::<E>(),
            since_gen: AtomicU32::new(0),
            retry: settings.retry,
            classify: settings.classify,
            stall_after: settings.stall_after,
            timeout: settings.timeout,
            hold: AtomicU8::new(0),
            breaker: settings.breaker.map(Breaker::new),
            ordered: settings.ordered,
            hold_dead: settings.hold_dead,
            parked: AtomicU64::new(0),
            park_capacity: settings.park_capacity,
            lane: settings.lane,
            active: AtomicBool::new(true),
            outcomes: OutcomeCounters::default(),
            last_error: Mutex::new(None),
            cells,
        }
    }

    /// Whether its deliveries park instead of running now.
    #[inline]
    pub(crate) fn holds(&self) -> bool {
        self.hold.load(Ordering::Relaxed) != 0
    }

    /// Whether it is paused.
    pub(crate) fn is_paused(&self) -> bool {
        self.hold.load(Ordering::SeqCst) & PAUSED != 0
    }

    /// Whether as many of its deliveries are parked as it may have.
    #[inline]
    pub(crate) fn park_full(&self) -> bool {
        self.parked.load(Ordering::Relaxed) >= self.park_capacity
    }

    pub(crate) fn matches(&self, source: NameId) -> bool {
        self.filter.is_none_or(|f| f == source)
    }

    /// Whether an event of generation `generation` from `source` was matched to this
    /// subscription, which runs in lane `lane` (given that the subscription was in that
    /// generation's snapshot or is still subscribed).
    #[inline]
    pub(crate) fn matched(&self, lane: u8, generation: u32, source: NameId) -> bool {
        self.lane == lane
            && !before(generation, self.since_gen.load(Ordering::Relaxed))
            && self.matches(source)
    }

    pub(crate) fn record_failure(&self, error: &dyn fmt::Display, panicked: bool) {
        self.outcomes.failed.fetch_add(1, Ordering::Relaxed);
        if panicked {
            self.outcomes.panicked.fetch_add(1, Ordering::Relaxed);
        }
        *self.last_error.lock() = Some(error.to_string());
    }
}

/// Whether generation `a` comes before generation `b`. Generations are 32-bit and wrap; they
/// compare as serial numbers, which is exact while an event is handled fewer than 2^31
/// subscription changes after it was published.
#[inline]
pub(crate) fn before(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) < 0
}

/// The counters of one subscription that one worker writes on every delivery.
#[derive(Default)]
pub(crate) struct HandlerCells {
    pub(crate) delivered: AtomicU64,
    pub(crate) succeeded: AtomicU64,
}

/// Per-subscription, per-worker hot counters; empty when metrics are off.
pub(crate) type CellsByWorker = Box<[CachePadded<HandlerCells>]>;

/// Makes a subscription's hot counters: one cell per worker, or none with metrics off.
pub(crate) fn cells(enabled: bool, workers: usize) -> CellsByWorker {
    let n = if enabled { workers } else { 0 };
    (0..n)
        .map(|_| CachePadded::new(HandlerCells::default()))
        .collect()
}

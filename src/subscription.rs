//! Subscriptions as users hold them: [`SubscribeOptions`], and the [`Subscription`] handle
//! that reports a subscription's counts and ends it.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::breaker::CircuitBreaker;
use crate::bus::Core;
use crate::handler::{Classifier, HandlerError, Verdict};
use crate::meta::{PAUSED, SubMeta};
use crate::retry::RetryPolicy;
use crate::sync::Ordering;

/// Options for a subscription: its name and the one source service it listens to.
///
/// # Examples
///
/// ```
/// use microbus::SubscribeOptions;
///
/// let options = SubscribeOptions::new().named("audit-log").from("OrderService");
/// # let _ = options;
/// ```
#[derive(Clone, Default)]
pub struct SubscribeOptions {
    pub(crate) name: Option<String>,
    pub(crate) from: Option<String>,
    pub(crate) retry: Option<RetryPolicy>,
    pub(crate) lane: Option<String>,
    pub(crate) classify: Option<Classifier>,
    pub(crate) stall_after: Option<Duration>,
    pub(crate) timeout: Option<Duration>,
    pub(crate) park_capacity: Option<u64>,
    pub(crate) breaker: Option<CircuitBreaker>,
    pub(crate) ordered: bool,
    pub(crate) hold_dead: bool,
}

impl SubscribeOptions {
    /// Default options: named after the handler's type, events from every source.
    pub fn new() -> SubscribeOptions {
        SubscribeOptions::default()
    }

    /// Names the handler in statistics and reports.
    pub fn named(mut self, name: impl Into<String>) -> SubscribeOptions {
        self.name = Some(name.into());
        self
    }

    /// Receives only events published by service `source`.
    pub fn from(mut self, source: impl Into<String>) -> SubscribeOptions {
        self.from = Some(source.into());
        self
    }

    /// Retries this subscription's failed deliveries by `policy` instead of the bus's.
    pub fn retry(mut self, policy: RetryPolicy) -> SubscribeOptions {
        self.retry = Some(policy);
        self
    }

    /// Runs the handler on the workers of lane `name`, declared with
    /// [`BusBuilder::lane`](crate::BusBuilder::lane), instead of the bus's own (the lane
    /// [`DEFAULT_LANE`](crate::DEFAULT_LANE)): a slow or failing handler there holds back
    /// nothing outside its lane.
    pub fn lane(mut self, name: impl Into<String>) -> SubscribeOptions {
        self.lane = Some(name.into());
        self
    }

    /// Reports a call of this handler still running after `stall_after`, instead of the bus's
    /// [`stall_after`](crate::BusBuilder::stall_after). `Duration::MAX` never reports it;
    /// zero is [`SubscribeError::Invalid`](crate::SubscribeError::Invalid).
    pub fn stall_after(mut self, stall_after: Duration) -> SubscribeOptions {
        self.stall_after = Some(stall_after);
        self
    }

    /// Gives each call of the handler a deadline `timeout` after it starts, which it reads
    /// with [`Context::deadline`](crate::Context::deadline) and
    /// [`Context::is_expired`](crate::Context::is_expired) to stop itself: the bus never
    /// interrupts a handler. A handler that returns an error after its deadline is retried as
    /// usual. `Duration::MAX` is no deadline; zero is
    /// [`SubscribeError::Invalid`](crate::SubscribeError::Invalid).
    pub fn timeout(mut self, timeout: Duration) -> SubscribeOptions {
        self.timeout = Some(timeout);
        self
    }

    /// How many of its deliveries may wait parked — while it is [paused](Subscription::pause)
    /// — before publishers are held back (default
    /// [`DEFAULT_PARK_CAPACITY`](crate::DEFAULT_PARK_CAPACITY)). Past it, a publish of an event
    /// it matches waits in a `Block` lane (`try_publish` and `publish_timeout` get `Full`),
    /// and in a `Shed` lane its delivery is shed. Work already accepted — retries, delayed
    /// events, events handlers published — parks all the same and may go past it; so may
    /// publishers that checked at the same moment, by one event each, and a batch, which is
    /// held back or let in as a whole. Zero is
    /// [`SubscribeError::Invalid`](crate::SubscribeError::Invalid).
    pub fn park_capacity(mut self, capacity: u64) -> SubscribeOptions {
        self.park_capacity = Some(capacity);
        self
    }

    /// Makes the subscription *ordered*: at most one delivery per key is in progress at a
    /// time — running, deferred, or failed and waiting for its retry — and the key's later
    /// deliveries wait, in the order they came, until it settles; then the next one runs. So
    /// each publisher's events of a key reach the handler in publish order *with every
    /// attempt*: a retry never falls behind a later event of its key. Other keys, unkeyed
    /// events and other subscriptions are not held back, and a waiting delivery holds no
    /// worker. When a key's head is dead-lettered, its later deliveries run. Waiting
    /// deliveries count against [`park_capacity`](Self::park_capacity), and at the shutdown
    /// deadline they are dead-lettered with reason `Shutdown`, in order. A delayed event takes
    /// its place in its key's order when it falls due. An ordered subscription that never
    /// fails costs one check per delivery that no key is in progress.
    pub fn ordered(mut self) -> SubscribeOptions {
        self.ordered = true;
        self
    }

    /// With [`ordered`](Self::ordered): when a key's head is dead-lettered, its later
    /// deliveries stay waiting until the dead letter is redriven and succeeds,
    /// [skipped](crate::DeadLetters::skip) (the key goes on without it), purged, or evicted
    /// from the full ring (counted in `BusStats::held_keys_evicted`). Without `ordered`, or
    /// on a bus with dead letters off, it is
    /// [`SubscribeError::Invalid`](crate::SubscribeError::Invalid).
    pub fn hold_on_dead_letter(mut self) -> SubscribeOptions {
        self.hold_dead = true;
        self
    }

    /// Gives the subscription a [`CircuitBreaker`]: after its `failures` failed attempts in a
    /// row, its deliveries park (as for a [pause](Subscription::pause), bounded by
    /// [`park_capacity`](Self::park_capacity)) for a cool-down; then one delivery probes, and
    /// its success releases the rest, in order. Bad settings are
    /// [`SubscribeError::Invalid`](crate::SubscribeError::Invalid) (`circuit_breaker`).
    pub fn circuit_breaker(mut self, breaker: CircuitBreaker) -> SubscribeOptions {
        self.breaker = Some(breaker);
        self
    }

    /// Decides what becomes of each failure the handler left to the policy (an error it did
    /// not mark with a [`Verdict`], or a panic): `classify` sees the [`HandlerError`] — its
    /// [`downcast_ref`](HandlerError::downcast_ref) reaches the handler's own error type —
    /// and returns retry, retry after a delay, permanent (dead-lettered at once) or discard
    /// (settled as dropped). It runs on the worker, after the attempt, under the guard: a
    /// classifier that panics is counted (`callback_panics.classifier`) and the policy
    /// decides, as if it had returned [`Verdict::Retry`].
    ///
    /// # Examples
    ///
    /// ```
    /// use microbus::{Bus, Context, Event, HandlerError, HandlerResult, SubscribeOptions, Verdict};
    /// use serde::{Deserialize, Serialize};
    /// use std::time::Duration;
    ///
    /// #[derive(Debug)]
    /// enum GatewayError { Declined, Busy }
    /// impl std::fmt::Display for GatewayError {
    ///     fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
    ///         write!(f, "{self:?}")
    ///     }
    /// }
    /// impl std::error::Error for GatewayError {}
    ///
    /// #[derive(Debug, Serialize, Deserialize)]
    /// struct Charge { cents: u64 }
    /// impl Event for Charge { const NAME: &'static str = "Charge"; }
    ///
    /// let bus = Bus::builder().build()?;
    /// let options = SubscribeOptions::new().retry_if(|err: &HandlerError| {
    ///     match err.downcast_ref::<GatewayError>() {
    ///         Some(GatewayError::Declined) => Verdict::Permanent,
    ///         _ => Verdict::Retry,
    ///     }
    /// });
    /// bus.subscribe_with(options, |_: &Charge, _: &Context| -> HandlerResult {
    ///     Err(GatewayError::Declined.into())
    /// })?;
    /// bus.publish(Charge { cents: 500 })?;
    /// bus.flush(Duration::from_secs(5))?;
    /// // Declined is permanent: dead-lettered on the first attempt, never retried.
    /// assert_eq!((bus.stats().dead_lettered, bus.stats().retried), (1, 0));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn retry_if(
        mut self,
        classify: impl Fn(&HandlerError) -> Verdict + Send + Sync + 'static,
    ) -> SubscribeOptions {
        self.classify = Some(Arc::new(classify));
        self
    }
}

impl fmt::Debug for SubscribeOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SubscribeOptions")
            .field("name", &self.name)
            .field("from", &self.from)
            .field("retry", &self.retry)
            .field("lane", &self.lane)
            .field("retry_if", &self.classify.is_some())
            .field("stall_after", &self.stall_after)
            .field("timeout", &self.timeout)
            .field("park_capacity", &self.park_capacity)
            .field("circuit_breaker", &self.breaker)
            .field("ordered", &self.ordered)
            .field("hold_on_dead_letter", &self.hold_dead)
            .finish()
    }
}

/// A handle to one subscription.
///
/// Dropping it does **not** unsubscribe: `bus.subscribe(..)?;` subscribes for the life of the
/// bus. Keep it to call [`unsubscribe`](Self::unsubscribe) or read [`stats`](Self::stats).
pub struct Subscription {
    pub(crate) core: Arc<Core>,
    pub(crate) meta: Arc<SubMeta>,
}

/// Failure and cancellation counts of one subscription.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SubscriptionStats {
    /// Failed attempts: errors returned and panics.
    pub failed: u64,
    /// Of the failed attempts, how many were panics.
    pub panicked: u64,
    /// Deliveries that were queued when the subscription ended, and never ran.
    pub cancelled: u64,
    /// The text of the most recent failure.
    pub last_error: Option<String>,
}

impl Subscription {
    /// The subscription's id, unique within the bus.
    pub fn id(&self) -> u64 {
        self.meta.id
    }

    /// The handler's name.
    pub fn handler_name(&self) -> &str {
        &self.meta.name
    }

    /// The [`Event::NAME`](crate::Event::NAME) of the events it receives.
    pub fn event_name(&self) -> &'static str {
        self.meta.event_name
    }

    /// The service that subscribed.
    pub fn service(&self) -> &'static str {
        self.meta.service.as_str()
    }

    /// Whether it still receives events.
    pub fn is_active(&self) -> bool {
        self.meta.active.load(Ordering::SeqCst)
    }

    /// Its failure and cancellation counts so far.
    pub fn stats(&self) -> SubscriptionStats {
        let outcomes = self.meta.outcomes.read();
        SubscriptionStats {
            failed: outcomes.failed,
            panicked: outcomes.panicked,
            cancelled: outcomes.cancelled,
            last_error: self.meta.last_error.lock().clone(),
        }
    }

    /// Pauses the subscription: its handler runs no more, and its deliveries park on their
    /// shards in the order they came (per key too), spending no attempt — retries that fall
    /// due park as well — until [`resume`](Self::resume). Other subscriptions, on the same
    /// shards too, keep running. Returns once no call of the handler is running (called from
    /// the handler itself, it does not wait for that call). At most
    /// [`park_capacity`](SubscribeOptions::park_capacity) deliveries park before publishers
    /// are held back. Parked deliveries are outstanding: [`flush`](crate::Bus::flush) waits for
    /// them (its timeout error counts them per handler), and shutdown dead-letters them at its
    /// deadline with reason `Shutdown`, in order. Pausing an ended subscription, or a paused
    /// one, does nothing.
    ///
    /// # Examples
    ///
    /// ```
    /// use microbus::{Bus, Context, Event, HandlerResult};
    /// use serde::{Deserialize, Serialize};
    /// use std::sync::atomic::{AtomicU64, Ordering};
    /// use std::sync::Arc;
    /// use std::time::Duration;
    ///
    /// #[derive(Debug, Serialize, Deserialize)]
    /// struct Mail { to: String }
    /// impl Event for Mail { const NAME: &'static str = "Mail"; }
    ///
    /// let bus = Bus::builder().workers(1).build()?;
    /// let sent = Arc::new(AtomicU64::new(0));
    /// let counter = sent.clone();
    /// let mailer = bus.subscribe(move |_: &Mail, _: &Context| -> HandlerResult {
    ///     counter.fetch_add(1, Ordering::SeqCst);
    ///     Ok(())
    /// })?;
    /// mailer.pause();
    /// bus.publish(Mail { to: "ada@example.com".into() })?;
    /// // Parked, not lost: a flush waits for it.
    /// assert!(bus.flush(Duration::from_millis(50)).is_err());
    /// assert_eq!(sent.load(Ordering::SeqCst), 0);
    /// mailer.resume();
    /// bus.flush(Duration::from_secs(5))?;
    /// assert_eq!(sent.load(Ordering::SeqCst), 1);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn pause(&self) {
        if !self.is_active() || self.meta.hold.fetch_or(PAUSED, Ordering::SeqCst) & PAUSED != 0 {
            return;
        }
        self.core.wait_for_open_batches();
    }

    /// Resumes a paused subscription: on each shard, its parked deliveries run first, oldest
    /// first, before any newer delivery of it. Resuming one that is not paused does nothing.
    pub fn resume(&self) {
        if self.meta.hold.fetch_and(!PAUSED, Ordering::SeqCst) & PAUSED != 0 {
            self.core.release_parked(self.meta.lane);
        }
    }

    /// Whether it is paused.
    pub fn is_paused(&self) -> bool {
        self.meta.is_paused()
    }

    /// Ends the subscription and waits until no call of its handler is running.
    ///
    /// After it returns, no call of the handler starts. Deliveries still queued for it are
    /// counted as cancelled (in [`stats`](Self::stats) and the bus's statistics) when a worker
    /// reaches them. It waits for the batches of events the workers are handling to finish,
    /// so it may wait for a slow handler of another subscription too. Called from inside a
    /// handler it does not wait for the call it is made from, nor for calls on workers that
    /// are themselves inside `unsubscribe`. Calling it again does nothing more.
    pub fn unsubscribe(&self) {
        if self.meta.active.swap(false, Ordering::SeqCst) {
            self.core.registry.remove(&self.meta);
            self.core.metrics.unsubscribed(self.meta.id);
            // What it parked is cancelled when its shards run it.
            if self.meta.hold.swap(0, Ordering::SeqCst) != 0 {
                self.core.release_parked(self.meta.lane);
            }
        }
        self.core.wait_for_open_batches();
    }
}

impl fmt::Debug for Subscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscription")
            .field("id", &self.meta.id)
            .field("event", &self.meta.event_name)
            .field("service", &self.meta.service)
            .field("handler", &self.meta.name)
            .field("active", &self.is_active())
            .finish()
    }
}

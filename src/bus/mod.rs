//! The bus: its builder, the publish paths, flush, shutdown and the report.
//!
//! Ground rules: [`Core`] is shared by user handles, subscriptions, workers and the timer
//! thread. Only user handles ([`Bus`] values) count towards its lifetime: dropping the last
//! one shuts the bus down. Publishing goes through the shard's [`Gate`](crate::ledger::Gate)
//! (see `ledger`); a publisher that finds its shard full blocks in a `select` on the channel
//! and the shutdown signal, a channel that is never sent on and whose sender shutdown drops, so
//! shutdown wakes every blocked publisher and hands its event back.

use std::any::TypeId;
use std::cell::Cell;
use std::fmt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::{Receiver, Select, SendTimeoutError, Sender, TrySendError};
use crossbeam_utils::CachePadded;
use parking_lot::{Condvar, Mutex};

use crate::config::{Backpressure, Config, WaitStrategy, check_name};
use crate::context::{BatchFn, Context, Handler, HandlerFn, Sub};
use crate::dead_letter::{DeadLetter, DeadLetterReason, DeadLetterSink, RedriveError, Ring};
use crate::defer::Deferrals;
use crate::error::{
    ConfigError, FlushError, LanePending, ParkedPending, Pending, PublishBatchError, PublishError,
    PublishTimeoutError, ShutdownError, SubscribeError, TryPublishError,
};
use crate::event::{Envelope, Event, EventId, NameId, Publish, Stamp, Track};
use crate::guard::{Leftovers, Panics, Runner, drop_with};
use crate::handler::HandlerResult;
use crate::ledger::{Quiescence, net_sum, outstanding};
use crate::metrics::{BridgeCounters, Collect, Metrics, MetricsSnapshot};

/// Reads one bridge's counters for a metrics snapshot; `None` once the bridge is gone.
pub(crate) type BridgeReport = Box<dyn Fn() -> Option<BridgeCounters> + Send + Sync>;
use crate::meta::SubSettings;
use crate::registry::{Registry, SubMeta};
use crate::retry::RetryPolicy;
use crate::shard::{
    ABANDONED, Batch, Burial, Fanout, IDLE, MAX_GROUP, Msg, Retry, Routed, Shard, Task, Work,
    WorkerCounts, WorkerShared, offer_due, run_worker, seam_of, wait_for_batches,
};
use crate::stats::{
    AbandonedDelivery, BusStats, LaneReport, Outcomes, SHUTDOWN_GRACE, ShutdownReport,
};
use crate::subscription::{SubscribeOptions, Subscription};
use crate::sync::{Arc, AtomicBool, AtomicU64, AtomicUsize, Ordering};
use crate::tap::{Tapped, Taps};
use crate::timer::Timer;
use crate::trace::{Trace, TraceRing};
use crate::track::{Settled, Tracker, Tracking};

mod batches;
mod breakers;
mod builder;
mod clocked;
mod core;
mod dead_letters;
mod intake;
mod lanes;
mod lifecycle;
mod rebuild;
mod redrive;
mod stalls;
mod unmatched;

use self::clocked::Early;
use self::core::*;
pub(crate) use self::core::{Core, LaneState, Mode, OwnThread};
use self::intake::Counted;
pub use builder::BusBuilder;
pub use dead_letters::{DeadLetters, LoadSummary, RedriveCutShort};

/// A handle to an event bus, as seen from one service.
///
/// Handles are cheap to clone and share one bus. Events published through a handle come from
/// its service: the bus's own [`service_name`](BusBuilder::service_name), or the name given to
/// [`Bus::service`]. Dropping the last handle shuts the bus down as [`Bus::shutdown`] does.
///
/// # Publishing
///
/// | | waits for room | never waits | waits at most `timeout` |
/// |---|---|---|---|
/// | an event | [`publish`](Bus::publish) | [`try_publish`](Bus::try_publish) | [`publish_timeout`](Bus::publish_timeout) |
/// | an event with [`Publish`] options | [`publish_with`](Bus::publish_with) | [`try_publish_with`](Bus::try_publish_with) | [`publish_timeout_with`](Bus::publish_timeout_with) |
/// | events of one type, grouped per shard | [`publish_batch`](Bus::publish_batch), [`publish_batch_with`](Bus::publish_batch_with) | | |
/// | a rayon parallel iterator (feature `rayon`) | `publish_par_iter`, `publish_par_iter_with` | | |
///
/// [`Publish`] holds what varies: a key, correlation, causation and headers, or an envelope
/// made elsewhere ([`Publish::envelope`]); a delay on the timer ([`Publish::delay`]; a
/// delayed publish never waits for room); and tracking ([`Publish::tracked`]). A single
/// publish returns the event's [`EventId`], or a [`Tracker`] when it is tracked; every error
/// hands the event back. A handler publishes through its [`Context`] with the same
/// `publish`, `publish_with`, `publish_batch` and `publish_batch_with`, staged until it
/// returns `Ok`.
///
/// # Examples
///
/// ```
/// use microbus::{Bus, Context, Event, HandlerResult};
/// use serde::{Deserialize, Serialize};
/// use std::time::Duration;
///
/// #[derive(Debug, Serialize, Deserialize)]
/// struct OrderCreated { order_id: u64 }
/// impl Event for OrderCreated { const NAME: &'static str = "OrderCreated"; }
///
/// let bus = Bus::builder().service_name("OrderService").workers(2).build()?;
/// let payments = bus.service("PaymentService")?;
/// payments.subscribe_from("OrderService", |order: &OrderCreated, ctx: &Context| -> HandlerResult {
///     assert_eq!(ctx.source(), "OrderService");
///     assert_eq!(ctx.service(), "PaymentService");
///     Ok(())
/// })?;
/// bus.publish(OrderCreated { order_id: 1 })?;
/// bus.flush(Duration::from_secs(5))?;
/// let report = bus.shutdown()?;
/// assert_eq!(report.stats.succeeded, 1);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone)]
pub struct Bus {
    handle: Arc<Handle>,
    source: NameId,
}

impl Bus {
    /// A builder with the default settings.
    pub fn builder() -> BusBuilder {
        BusBuilder::default()
    }

    pub(crate) fn core(&self) -> &Arc<Core> {
        &self.handle.core
    }

    /// A handle for service `name` on the same bus: what it publishes comes from `name`, and
    /// what it subscribes is reported under `name`.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] for field `service` when the name is empty, padded with white space,
    /// has control characters or is longer than [`MAX_NAME_LEN`](crate::MAX_NAME_LEN) bytes.
    pub fn service(&self, name: &str) -> Result<Bus, ConfigError> {
        check_name("service", name)?;
        Ok(Bus {
            handle: self.handle.clone(),
            source: NameId::intern(name),
        })
    }

    /// The service this handle publishes as.
    pub fn service_name(&self) -> &'static str {
        self.source.as_str()
    }

    /// The number of workers (and shards).
    pub fn workers(&self) -> usize {
        self.core().shards.len()
    }

    /// Publishes `event`, waiting while its shard is full, and returns its id.
    ///
    /// The event is stamped with a new id, its own correlation, this handle's service as its
    /// source and the current time, and matched against the subscriptions of its type now.
    /// Its handlers run later, on a worker. An event that matches no subscription is counted
    /// in [`BusStats::unmatched`] and dropped. Called from inside a handler (through a
    /// captured handle), it never waits: a full shard's event waits in the worker's spill queue
    /// instead.
    ///
    /// # Errors
    ///
    /// [`PublishError::Shutdown`] with the event when the bus is shutting down, including
    /// when shutdown starts while this call waits for room.
    pub fn publish<E: Event>(&self, event: E) -> Result<EventId, PublishError<E>> {
        self.publish_with(event, Publish::new())
    }

    /// Publishes `event` with options — a key, correlation, causation, headers, an envelope
    /// given whole, a delay, tracking — waiting while its shard is full. Returns the event's
    /// [`EventId`], or a [`Tracker`] for a [`tracked`](Publish::tracked) publish.
    ///
    /// # Examples
    ///
    /// A tracked publish, and a delayed one:
    ///
    /// ```
    /// use microbus::{Bus, Context, Event, HandlerError, HandlerResult, Publish, RetryPolicy};
    /// use serde::{Deserialize, Serialize};
    /// use std::time::Duration;
    ///
    /// #[derive(Debug, Serialize, Deserialize)]
    /// struct OrderPaid { order_id: u64 }
    /// impl Event for OrderPaid { const NAME: &'static str = "OrderPaid"; }
    ///
    /// let bus = Bus::builder().retry(RetryPolicy::none()).build()?;
    /// bus.subscribe(|_: &OrderPaid, _: &Context| -> HandlerResult { Ok(()) })?;
    /// bus.subscribe(|_: &OrderPaid, _: &Context| -> HandlerResult {
    ///     Err(HandlerError::msg("out of stock"))
    /// })?;
    /// let tracker = bus.publish_with(OrderPaid { order_id: 7 }, Publish::keyed(7u64).tracked())?;
    /// let done = tracker.wait(Duration::from_secs(5)).expect("settled");
    /// assert_eq!((done.deliveries, done.succeeded, done.dead_lettered), (2, 1, 1));
    ///
    /// let later = Publish::keyed(8u64).delay(Duration::from_millis(10)).tracked();
    /// let tracker = bus.publish_with(OrderPaid { order_id: 8 }, later)?;
    /// assert_eq!(tracker.wait(Duration::from_secs(5)).expect("settled").succeeded, 1);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// An envelope that travelled as JSON, say from another process, re-enters as the same
    /// event:
    ///
    /// ```
    /// use microbus::{Bus, Context, Envelope, Event, HandlerResult, Publish};
    /// use serde::{Deserialize, Serialize};
    /// use std::sync::{Arc, Mutex};
    /// use std::time::Duration;
    ///
    /// #[derive(Debug, Serialize, Deserialize)]
    /// struct OrderPaid { order_id: u64 }
    /// impl Event for OrderPaid { const NAME: &'static str = "OrderPaid"; }
    ///
    /// let original = Bus::builder().service_name("payments").build()?;
    /// let seen = Arc::new(Mutex::new(None));
    /// let sent = seen.clone();
    /// original.subscribe(move |_: &OrderPaid, ctx: &Context| -> HandlerResult {
    ///     *sent.lock().unwrap() = Some(serde_json::to_string(ctx.envelope()).unwrap());
    ///     Ok(())
    /// })?;
    /// let id = original.publish(OrderPaid { order_id: 7 })?;
    /// original.flush(Duration::from_secs(5))?;
    /// let json = seen.lock().unwrap().take().unwrap();
    ///
    /// let bus = Bus::builder().service_name("shipping").build()?;
    /// let arrived = Arc::new(Mutex::new(None));
    /// let got = arrived.clone();
    /// bus.subscribe(move |_: &OrderPaid, ctx: &Context| -> HandlerResult {
    ///     *got.lock().unwrap() = Some(ctx.envelope().clone());
    ///     Ok(())
    /// })?;
    /// let envelope: Envelope = serde_json::from_str(&json)?;
    /// assert_eq!(bus.publish_with(OrderPaid { order_id: 7 }, Publish::envelope(envelope.clone()))?, id);
    /// bus.flush(Duration::from_secs(5))?;
    /// let arrived = arrived.lock().unwrap().take().unwrap();
    /// assert_eq!(arrived, envelope);
    /// assert_eq!(arrived.source(), "payments");
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    ///
    /// As [`publish`](Self::publish).
    pub fn publish_with<E: Event, T: Track>(
        &self,
        event: E,
        options: Publish<T>,
    ) -> Result<T::Receipt, PublishError<E>> {
        self.send(event, options, Mode::Block)
            .map_err(|(why, e)| refused(why, e))
    }

    /// Publishes `event` if its shard has room now; never waits.
    ///
    /// # Errors
    ///
    /// [`TryPublishError::Full`] or [`TryPublishError::Shutdown`], with the event.
    pub fn try_publish<E: Event>(&self, event: E) -> Result<EventId, TryPublishError<E>> {
        self.try_publish_with(event, Publish::new())
    }

    /// [`try_publish`](Self::try_publish) with options, returning what
    /// [`publish_with`](Self::publish_with) returns.
    ///
    /// # Errors
    ///
    /// As [`try_publish`](Self::try_publish).
    pub fn try_publish_with<E: Event, T: Track>(
        &self,
        event: E,
        options: Publish<T>,
    ) -> Result<T::Receipt, TryPublishError<E>> {
        self.send(event, options, Mode::Try)
            .map_err(|(why, e)| match why {
                Refusal::Shutdown => TryPublishError::Shutdown(e),
                Refusal::Full | Refusal::Timeout => TryPublishError::Full(e),
            })
    }

    /// Publishes `event`, waiting at most `timeout` for room in its shard.
    ///
    /// # Errors
    ///
    /// [`PublishTimeoutError::Timeout`] or [`PublishTimeoutError::Shutdown`], with the event.
    pub fn publish_timeout<E: Event>(
        &self,
        event: E,
        timeout: Duration,
    ) -> Result<EventId, PublishTimeoutError<E>> {
        self.publish_timeout_with(event, Publish::new(), timeout)
    }

    /// [`publish_timeout`](Self::publish_timeout) with options, returning what
    /// [`publish_with`](Self::publish_with) returns.
    ///
    /// # Errors
    ///
    /// As [`publish_timeout`](Self::publish_timeout).
    pub fn publish_timeout_with<E: Event, T: Track>(
        &self,
        event: E,
        options: Publish<T>,
        timeout: Duration,
    ) -> Result<T::Receipt, PublishTimeoutError<E>> {
        let mode = match Instant::now().checked_add(timeout) {
            Some(deadline) => Mode::Until(deadline),
            None => Mode::Block,
        };
        self.send(event, options, mode)
            .map_err(|(why, e)| match why {
                Refusal::Shutdown => PublishTimeoutError::Shutdown(e),
                Refusal::Full | Refusal::Timeout => PublishTimeoutError::Timeout(e),
            })
    }

    /// The one publish of a single event behind the methods above: tracking armed when
    /// asked for, the source a given envelope names or this handle's.
    #[inline]
    fn send<E: Event, T: Track>(
        &self,
        event: E,
        options: Publish<T>,
        mode: Mode,
    ) -> Result<T::Receipt, (Refusal, E)> {
        let (mut stamp, delay) = options.into_parts();
        let tracking = T::TRACKED.then(|| {
            let tracking = Tracking::new();
            stamp.track(tracking.clone());
            Tracker(tracking)
        });
        let source = stamp.source(self.source);
        let id = self.core().publish(source, event, stamp, delay, mode)?;
        Ok(T::receipt(id, tracking))
    }

    /// Publishes events of one type in batches: they are grouped per shard and each group of
    /// up to 64 events travels as one channel message, which costs a fraction of a message per
    /// event. Unkeyed events fill one shard's group before the next shard's; use
    /// [`publish_batch_with`](Self::publish_batch_with) to give events keys. Events with the
    /// same key keep their order. Waits while a shard is full, as [`publish`](Self::publish)
    /// does; a shard's capacity counts messages, so a full shard holds up to 64 times as many
    /// events.
    ///
    /// # Examples
    ///
    /// ```
    /// use microbus::{Bus, Context, Event, HandlerResult};
    /// use serde::{Deserialize, Serialize};
    /// use std::time::Duration;
    ///
    /// #[derive(Debug, Serialize, Deserialize)]
    /// struct PriceChanged { sku: u32, cents: u64 }
    /// impl Event for PriceChanged { const NAME: &'static str = "PriceChanged"; }
    ///
    /// let bus = Bus::builder().workers(2).build()?;
    /// bus.subscribe(|_: &PriceChanged, _: &Context| -> HandlerResult { Ok(()) })?;
    /// bus.publish_batch((0..1_000).map(|sku| PriceChanged { sku, cents: 999 }))?;
    /// bus.flush(Duration::from_secs(5))?;
    /// assert_eq!(bus.stats().succeeded, 1_000);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    ///
    /// [`PublishBatchError`] with every event not accepted when the bus is shutting down; the
    /// others were published.
    pub fn publish_batch<E: Event>(
        &self,
        events: impl IntoIterator<Item = E>,
    ) -> Result<(), PublishBatchError<E>> {
        self.publish_batch_with(events.into_iter().map(|event| (event, Publish::new())))
    }

    /// Like [`publish_batch`](Self::publish_batch), each event with its own options (a key,
    /// headers, a correlation, an envelope given whole). An event with a
    /// [`delay`](Publish::delay) goes to the timer on its own.
    ///
    /// # Errors
    ///
    /// As [`publish_batch`](Self::publish_batch).
    pub fn publish_batch_with<E: Event>(
        &self,
        items: impl IntoIterator<Item = (E, Publish)>,
    ) -> Result<(), PublishBatchError<E>> {
        self.core()
            .publish_batch(
                self.source,
                items.into_iter().map(|(event, options)| {
                    let (stamp, delay) = options.into_parts();
                    (event, stamp, delay)
                }),
            )
            .map_err(|(why, back)| match why {
                Refusal::Full => PublishBatchError::full(back),
                Refusal::Timeout | Refusal::Shutdown => PublishBatchError::new(back),
            })
    }

    fn subscribe_boxed<E: Event>(
        &self,
        options: SubscribeOptions,
        default_name: &str,
        handler: HandlerFn<E>,
        batch: Option<Arc<BatchFn<E>>>,
    ) -> Result<Subscription, SubscribeError> {
        let core = self.core();
        if batch.is_some() && options.ordered {
            return Err(SubscribeError::Invalid {
                option: "ordered",
                reason: "a batch subscription cannot be ordered",
            });
        }
        if core.is_closing() {
            return Err(SubscribeError::Shutdown);
        }
        let retry = options.retry.unwrap_or(core.config.retry);
        retry
            .validate("retry")
            .map_err(|_| SubscribeError::InvalidRetry)?;
        for (field, value) in [
            ("stall_after", options.stall_after),
            ("timeout", options.timeout),
        ] {
            if value.is_some_and(|d| d.is_zero()) {
                return Err(SubscribeError::Invalid {
                    option: field,
                    reason: "must be longer than zero",
                });
            }
        }
        if let Some(Err(reason)) = options.breaker.as_ref().map(|b| b.check()) {
            return Err(SubscribeError::Invalid {
                option: "circuit_breaker",
                reason,
            });
        }
        if options.hold_dead && !options.ordered {
            return Err(SubscribeError::Invalid {
                option: "hold_on_dead_letter",
                reason: "needs an ordered subscription",
            });
        }
        if options.hold_dead && !core.dead_letters.enabled() {
            return Err(SubscribeError::Invalid {
                option: "hold_on_dead_letter",
                reason: "needs dead letters, which are off on this bus",
            });
        }
        if options.park_capacity == Some(0) {
            return Err(SubscribeError::Invalid {
                option: "park_capacity",
                reason: "must be at least 1",
            });
        }
        let filter = match &options.from {
            Some(name) => {
                check_name("source", name).map_err(|_| SubscribeError::InvalidSource)?;
                Some(NameId::intern(name))
            }
            None => None,
        };
        let lane = match &options.lane {
            None => 0,
            Some(name) => core
                .lanes
                .iter()
                .position(|lane| lane.name == *name)
                .ok_or_else(|| SubscribeError::UnknownLane(NameId::intern(name).as_str()))?,
        };
        let meta = Arc::new(SubMeta::new::<E>(
            core.registry.next_id(),
            options.name.as_deref().unwrap_or(default_name).into(),
            self.source,
            filter,
            SubSettings {
                classify: options.classify.clone(),
                stall_after: options.stall_after,
                timeout: options.timeout,
                park_capacity: options
                    .park_capacity
                    .unwrap_or(crate::meta::DEFAULT_PARK_CAPACITY),
                breaker: options.breaker.clone(),
                ordered: options.ordered,
                hold_dead: options.hold_dead,
                ..SubSettings::new(retry, lane as u8)
            },
            crate::metrics::cells(core.metrics.enabled, core.shards.len()),
        ));
        core.metrics.subscribed(&meta);
        if meta.breaker.is_some() {
            core.breakers.lock().push(meta.clone());
        }
        if let Some(after) = meta.stall_after
            && core.stalls.subscribed(after)
        {
            // The timer thread looks more often from now on.
            core.timer.nudge();
        }
        core.rebuilders.add_decoder::<E>();
        let meta = core.registry.insert(Sub {
            meta,
            handler,
            batch,
        });
        Ok(Subscription {
            core: core.clone(),
            meta,
        })
    }

    /// Subscribes `handler` to events of type `E` from every service.
    ///
    /// Only the event type needs writing: `bus.subscribe(|e: &OrderPaid, ctx| Ok(()))`. The
    /// handler runs on the workers, possibly on several at once for events on different
    /// shards. Events already published are not delivered to it.
    ///
    /// # Errors
    ///
    /// [`SubscribeError::Shutdown`] when the bus is shutting down.
    pub fn subscribe<E, F>(&self, handler: F) -> Result<Subscription, SubscribeError>
    where
        E: Event,
        F: Fn(&E, &Context<'_>) -> HandlerResult + Send + Sync + 'static,
    {
        self.subscribe_with(SubscribeOptions::new(), handler)
    }

    /// Subscribes `handler` to events of type `E` published by service `source` only.
    ///
    /// # Errors
    ///
    /// [`SubscribeError::Shutdown`], or [`SubscribeError::InvalidSource`] for a malformed name.
    pub fn subscribe_from<E, F>(
        &self,
        source: &str,
        handler: F,
    ) -> Result<Subscription, SubscribeError>
    where
        E: Event,
        F: Fn(&E, &Context<'_>) -> HandlerResult + Send + Sync + 'static,
    {
        self.subscribe_with(SubscribeOptions::new().from(source), handler)
    }

    /// Subscribes `handler` with options (its name, its source service).
    ///
    /// # Errors
    ///
    /// As [`subscribe_from`](Self::subscribe_from).
    pub fn subscribe_with<E, F>(
        &self,
        options: SubscribeOptions,
        handler: F,
    ) -> Result<Subscription, SubscribeError>
    where
        E: Event,
        F: Fn(&E, &Context<'_>) -> HandlerResult + Send + Sync + 'static,
    {
        self.subscribe_boxed(options, std::any::type_name::<F>(), Box::new(handler), None)
    }

    /// Subscribes a [`Handler`] type, named by [`Handler::name`].
    ///
    /// # Errors
    ///
    /// As [`subscribe`](Self::subscribe).
    pub fn subscribe_handler<E, H>(&self, handler: H) -> Result<Subscription, SubscribeError>
    where
        E: Event,
        H: Handler<E>,
    {
        self.subscribe_handler_with(SubscribeOptions::new(), handler)
    }

    /// Subscribes a [`Handler`] type with options.
    ///
    /// # Errors
    ///
    /// As [`subscribe_from`](Self::subscribe_from).
    pub fn subscribe_handler_with<E, H>(
        &self,
        options: SubscribeOptions,
        handler: H,
    ) -> Result<Subscription, SubscribeError>
    where
        E: Event,
        H: Handler<E>,
    {
        let name = handler.name().to_owned();
        self.subscribe_boxed(
            options,
            &name,
            Box::new(move |event: &E, ctx: &Context<'_>| handler.handle(event, ctx)),
            None,
        )
    }

    /// Waits until nothing is queued, running or waiting to be offered again: every event
    /// accepted so far, and everything its handlers published, has been handled. What the
    /// handlers did is visible to the caller when it returns `Ok`.
    ///
    /// # Errors
    ///
    /// On timeout, a [`FlushError`] that says what remains ([`FlushError::pending`]). Called
    /// from a handler of this bus, an error at once (it would wait for itself).
    pub fn flush(&self, timeout: Duration) -> Result<(), FlushError> {
        self.core().flush(timeout)
    }

    /// Shuts the bus down with the configured
    /// [`shutdown_timeout`](BusBuilder::shutdown_timeout). See
    /// [`shutdown_timeout`](Self::shutdown_timeout).
    ///
    /// # Errors
    ///
    /// As [`shutdown_timeout`](Self::shutdown_timeout).
    pub fn shutdown(&self) -> Result<ShutdownReport, ShutdownError> {
        self.shutdown_timeout(self.core().config.shutdown_timeout)
    }

    /// Shuts the bus down, giving handlers `timeout` to finish what was accepted.
    ///
    /// It closes intake (publishers waiting on a full shard get their event back, and every
    /// later publish returns it), lets the workers handle what was accepted and what their
    /// handlers publish until the bus is idle or the deadline passes, then stops the workers
    /// and the timer and joins them. Past the deadline, deliveries never started are counted as
    /// `left`, and a worker still inside a handler is detached and its delivery reported as
    /// abandoned. The report's terms add up. Calling it again returns the same report.
    ///
    /// # Errors
    ///
    /// [`ShutdownError::InHandler`] when called from a handler of this bus.
    pub fn shutdown_timeout(&self, timeout: Duration) -> Result<ShutdownReport, ShutdownError> {
        self.core().shutdown(timeout)
    }

    /// The counts so far (after shutdown: the final ones).
    pub fn stats(&self) -> BusStats {
        self.core().stats()
    }

    /// The bus at a glance: open circuit breakers, paused subscriptions, stalled deliveries,
    /// full lanes and lagging bridge imports — one call for an operator or a readiness probe
    /// (see [`Health::is_ready`](crate::Health::is_ready)). Cheap: it reads counters and asks no worker anything.
    ///
    /// # Examples
    ///
    /// ```
    /// use microbus::Bus;
    ///
    /// let bus = Bus::builder().build()?;
    /// let health = bus.health();
    /// assert!(health.is_ready());
    /// assert_eq!(health.to_string(), "ready");
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn health(&self) -> crate::health::Health {
        self.core().health()
    }

    /// A snapshot of the metrics: counters per event type and source service and per handler,
    /// latency percentiles per handler and per event type, queue depths. See
    /// [`MetricsSnapshot`] for what each figure means and how to render it.
    ///
    /// The workers hand over their latencies between two batches of deliveries; this waits for
    /// them up to 100 ms, and names in [`MetricsSnapshot::workers_behind`] any worker that a
    /// handler kept busy longer (its earlier latencies are included; counters are always
    /// current). Called from a handler, it does not wait for that handler's own worker.
    ///
    /// # Examples
    ///
    /// ```
    /// use microbus::{Bus, Context, Event, HandlerResult};
    /// use serde::{Deserialize, Serialize};
    /// use std::time::Duration;
    ///
    /// #[derive(Debug, Serialize, Deserialize)]
    /// struct OrderCreated { order_id: u64 }
    /// impl Event for OrderCreated { const NAME: &'static str = "OrderCreated"; }
    ///
    /// let bus = Bus::builder().service_name("orders").workers(2).build()?;
    /// bus.service("payments")?
    ///     .subscribe(|_: &OrderCreated, _: &Context| -> HandlerResult { Ok(()) })?;
    /// for order_id in 0..100 {
    ///     bus.publish(OrderCreated { order_id })?;
    /// }
    /// bus.flush(Duration::from_secs(5))?;
    ///
    /// let metrics = bus.metrics();
    /// assert_eq!(metrics.event("OrderCreated", "orders").unwrap().published, 100);
    /// let handler = &metrics.handlers[0];
    /// assert_eq!((handler.service.as_str(), handler.succeeded), ("payments", 100));
    /// // Counters are exact; latencies come from one delivery in 16 by default.
    /// assert_eq!(metrics.sample_every, 16);
    /// assert!(handler.handler_time.count >= 100 / 16);
    /// println!("{metrics}"); // an aligned table; also to_json() and to_prometheus()
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn metrics(&self) -> MetricsSnapshot {
        self.core().metrics()
    }

    /// Registers how an event of type `E` written as an older version `from` (its
    /// [`Event::VERSION`] then) becomes today's `E`: `upcast` gets the old payload as JSON.
    /// [`DeadLetters::load_json_lines`] uses it for dead letters of that version, and a
    /// bridge's import for stream entries of it, so that a rolling deploy across a version
    /// loses nothing. `upcast` runs under the bus's guard: a panic, like an `Err`, leaves the
    /// entry undecodable (a dead letter that says why). A second upcaster for the same version
    /// replaces the first.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] naming `upcast` when `from` is not older than `E::VERSION`.
    ///
    /// # Examples
    ///
    /// ```
    /// use microbus::{Bus, Event};
    /// use serde::{Deserialize, Serialize};
    ///
    /// #[derive(Debug, Serialize, Deserialize)]
    /// struct OrderCreated { order_id: u64, currency: String }
    /// impl Event for OrderCreated {
    ///     const NAME: &'static str = "OrderCreated";
    ///     const VERSION: u32 = 2; // version 1 had no currency
    /// }
    ///
    /// let bus = Bus::builder().workers(1).build()?;
    /// bus.upcast::<OrderCreated>(1, |old| {
    ///     let order_id = old["order_id"].as_u64().ok_or("no order_id")?;
    ///     Ok(OrderCreated { order_id, currency: "EUR".to_owned() })
    /// })?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn upcast<E: Event>(
        &self,
        from: u32,
        upcast: impl Fn(serde_json::Value) -> Result<E, String> + Send + Sync + 'static,
    ) -> Result<(), ConfigError> {
        if from >= E::VERSION {
            return Err(ConfigError::new(
                "upcast",
                format!(
                    "an upcaster reads an older version of {} (version {}), not version {from}",
                    E::NAME,
                    E::VERSION
                ),
            ));
        }
        self.core()
            .rebuilders
            .add_upcaster::<E>(from, Arc::new(upcast));
        Ok(())
    }

    /// Adds an audit tap: `tap` sees every event published on the bus, of every type — its
    /// name, envelope and payload as JSON on demand — without being a subscription (it cannot
    /// fail a delivery). An accepted event is shown once, on the worker that takes it, before
    /// its handlers run; an event that matches no subscription is shown where it is published.
    /// Taps run on those threads: keep them quick. A tap that panics is counted in
    /// [`tap_failures`](Self::tap_failures) and the bus goes on.
    ///
    /// # Examples
    ///
    /// ```
    /// use microbus::{Bus, Context, Event, HandlerResult};
    /// use serde::{Deserialize, Serialize};
    /// use std::sync::{Arc, Mutex};
    ///
    /// #[derive(Debug, Serialize, Deserialize)]
    /// struct Ping { n: u32 }
    /// impl Event for Ping { const NAME: &'static str = "Ping"; }
    ///
    /// let bus = Bus::builder().workers(1).build()?;
    /// let log = Arc::new(Mutex::new(Vec::new()));
    /// let seen = log.clone();
    /// bus.tap(move |t| seen.lock().unwrap().push((t.event_name(), t.payload_json())));
    /// bus.publish(Ping { n: 1 })?; // nobody subscribes: the tap still sees it
    /// assert_eq!(*log.lock().unwrap(), [("Ping", r#"{"n":1}"#.to_owned())]);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn tap(&self, tap: impl Fn(&Tapped<'_>) + Send + Sync + 'static) {
        self.core().taps.add(Arc::new(tap));
    }

    /// Adds a tap that appends every event to the file at `path`, one JSON line each
    /// ([`Tapped::to_json`]). Lines that cannot be written are counted in
    /// [`tap_failures`](Self::tap_failures).
    ///
    /// # Errors
    ///
    /// The error of opening (creating) the file.
    pub fn tap_json_lines(&self, path: impl AsRef<std::path::Path>) -> std::io::Result<()> {
        self.core().taps.add_file(path.as_ref())
    }

    /// How many times a tap panicked or a JSON-lines tap could not write a line.
    pub fn tap_failures(&self) -> u64 {
        self.core().taps.failures()
    }

    /// The deliveries of the conversation `correlation_id` that the trace ring still holds
    /// (see [`BusBuilder::trace_capacity`]); print it for a causal tree.
    pub fn trace(&self, correlation_id: EventId) -> Trace {
        self.core().traces.trace(correlation_id)
    }

    /// The dead letters: deliveries that failed for good.
    pub fn dead_letters(&self) -> DeadLetters {
        DeadLetters {
            core: self.core().clone(),
        }
    }
}

impl fmt::Debug for Bus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Bus")
            .field("service", &self.source)
            .field("workers", &self.workers())
            .field("channel_capacity", &self.core().config.channel_capacity)
            .field("closing", &self.core().is_closing())
            .finish()
    }
}

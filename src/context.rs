//! Handlers and the [`Context`] they run in.
//!
//! Ground rules: a handler runs on a worker thread and gets `&E` and `&Context`. Everything it
//! publishes through the context is staged in the worker's outbox and leaves only when the
//! handler returns `Ok` (see [`Context::publish`]). Panics are caught by the worker, in one
//! place, and count as a failed attempt.

use std::fmt;
use std::time::Instant;

use crate::bus::Core;
use crate::defer::Deferred;
use crate::error::{PublishBatchError, PublishError};
use crate::event::{Envelope, Event, EventId, Publish};
use crate::handler::HandlerResult;
use crate::meta::SubMeta;
use crate::shard::WorkerShared;
use crate::sync::{Arc, Ordering};

/// A handler of events of type `E`, for handlers that are types rather than closures.
///
/// Closures subscribe directly (`bus.subscribe(|e: &E, ctx| ..)`); a type implementing this
/// trait subscribes with [`Bus::subscribe_handler`](crate::Bus::subscribe_handler).
///
/// # Examples
///
/// ```
/// use microbus::{Bus, Context, Event, Handler, HandlerResult};
/// use serde::{Deserialize, Serialize};
/// use std::sync::atomic::{AtomicU64, Ordering};
/// use std::sync::Arc;
///
/// #[derive(Debug, Serialize, Deserialize)]
/// struct OrderPaid { order_id: u64 }
/// impl Event for OrderPaid { const NAME: &'static str = "OrderPaid"; }
///
/// struct Ledger { total: Arc<AtomicU64> }
/// impl Handler<OrderPaid> for Ledger {
///     fn handle(&self, event: &OrderPaid, _ctx: &Context) -> HandlerResult {
///         self.total.fetch_add(event.order_id, Ordering::Relaxed);
///         Ok(())
///     }
/// }
///
/// let bus = Bus::builder().workers(1).build()?;
/// let total = Arc::new(AtomicU64::new(0));
/// bus.subscribe_handler(Ledger { total: total.clone() })?;
/// bus.publish(OrderPaid { order_id: 7 })?;
/// bus.flush(std::time::Duration::from_secs(5))?;
/// assert_eq!(total.load(Ordering::Relaxed), 7);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub trait Handler<E: Event>: Send + Sync + 'static {
    /// Handles one event.
    ///
    /// # Errors
    ///
    /// A returned error counts as a failed attempt; see [`HandlerError`](crate::HandlerError).
    fn handle(&self, event: &E, ctx: &Context<'_>) -> HandlerResult;

    /// The handler's name in statistics and reports. Defaults to the type's name.
    fn name(&self) -> &str {
        std::any::type_name::<Self>()
    }
}

pub(crate) type HandlerFn<E> = Box<dyn Fn(&E, &Context<'_>) -> HandlerResult + Send + Sync>;

/// A batch handler, as the engine keeps it.
pub(crate) type BatchFn<E> = dyn Fn(&Batch<'_, E>, &Context<'_>) -> HandlerResult + Send + Sync;

/// A subscription as the engine keeps it: what it is, and its handler. A batch subscription's
/// `handler` calls `batch` with one event.
pub(crate) struct Sub<E> {
    pub(crate) meta: Arc<SubMeta>,
    pub(crate) handler: HandlerFn<E>,
    pub(crate) batch: Option<Arc<BatchFn<E>>>,
}

/// The events one call of a batch handler gets, each with its envelope, in the order they were
/// published (see [`Bus::subscribe_batch`](crate::Bus::subscribe_batch)): everything one
/// channel message carried (up to 64 events of a `publish_batch`, or of a handler's), or one
/// event. Never empty.
pub struct Batch<'a, E> {
    items: Items<'a, E>,
}

enum Items<'a, E> {
    One(&'a Envelope, &'a E),
    Many(&'a [(Envelope, E)]),
}

impl<E> Clone for Items<'_, E> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<E> Copy for Items<'_, E> {}

impl<E> Clone for Batch<'_, E> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<E> Copy for Batch<'_, E> {}

impl<'a, E> Batch<'a, E> {
    pub(crate) fn one(envelope: &'a Envelope, event: &'a E) -> Batch<'a, E> {
        Batch {
            items: Items::One(envelope, event),
        }
    }

    pub(crate) fn many(items: &'a [(Envelope, E)]) -> Batch<'a, E> {
        Batch {
            items: Items::Many(items),
        }
    }

    /// How many events.
    pub fn len(&self) -> usize {
        match self.items {
            Items::One(..) => 1,
            Items::Many(items) => items.len(),
        }
    }

    /// Whether there are none (never: a batch has at least one event).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Event `index` with its envelope.
    pub fn get(&self, index: usize) -> Option<(&'a Envelope, &'a E)> {
        match self.items {
            Items::One(envelope, event) => (index == 0).then_some((envelope, event)),
            Items::Many(items) => items.get(index).map(|(envelope, event)| (envelope, event)),
        }
    }

    /// The events with their envelopes, in order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = (&'a Envelope, &'a E)> + 'a
    where
        E: 'a,
    {
        let batch = *self;
        (0..self.len()).map(move |i| batch.get(i).expect("within the batch"))
    }

    /// The events, in order.
    pub fn events(&self) -> impl ExactSizeIterator<Item = &'a E> + 'a
    where
        E: 'a,
    {
        self.iter().map(|(_, event)| event)
    }
}

impl<E> fmt::Debug for Batch<'_, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Batch").field("len", &self.len()).finish()
    }
}

impl<E: Event> crate::registry::Subscriber for Sub<E> {
    type Event = E;

    #[inline]
    fn meta(&self) -> &Arc<SubMeta> {
        &self.meta
    }
}

/// What a handler knows about the delivery it is running: the envelope, the subscribing
/// service, the attempt, and a way to publish follow-up events.
pub struct Context<'a> {
    pub(crate) envelope: &'a Envelope,
    pub(crate) event_name: &'static str,
    pub(crate) sub: &'a SubMeta,
    pub(crate) attempt: u32,
    pub(crate) core: &'a Arc<Core>,
    pub(crate) worker: &'a WorkerShared,
    /// When the call must end, with a [`timeout`](crate::SubscribeOptions::timeout).
    pub(crate) deadline: Option<Instant>,
}

impl Context<'_> {
    /// The envelope of the event being handled.
    pub fn envelope(&self) -> &Envelope {
        self.envelope
    }

    /// The id of the event being handled.
    pub fn event_id(&self) -> EventId {
        self.envelope.id()
    }

    /// The correlation id of the event being handled.
    pub fn correlation_id(&self) -> EventId {
        self.envelope.correlation_id()
    }

    /// The causation id of the event being handled.
    pub fn causation_id(&self) -> Option<EventId> {
        self.envelope.causation_id()
    }

    /// The service that published the event being handled.
    pub fn source(&self) -> &'static str {
        self.envelope.source()
    }

    /// The [`Event::NAME`] of the event being handled.
    pub fn event_name(&self) -> &'static str {
        self.event_name
    }

    /// The service this handler subscribed for; events published through this context come
    /// from it.
    pub fn service(&self) -> &str {
        self.sub.service.as_str()
    }

    /// The handler's name.
    pub fn handler_name(&self) -> &str {
        &self.sub.name
    }

    /// Which attempt this is, counting from 1.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// When this call of the handler should have returned by: its start plus the
    /// subscription's [`timeout`](crate::SubscribeOptions::timeout); `None` without one. The
    /// bus never interrupts a handler: a long one checks [`is_expired`](Self::is_expired) and
    /// stops itself (an error it then returns is retried as usual).
    ///
    /// # Examples
    ///
    /// ```
    /// use microbus::{Bus, Context, Event, HandlerError, HandlerResult, SubscribeOptions};
    /// use serde::{Deserialize, Serialize};
    /// use std::time::Duration;
    ///
    /// #[derive(Debug, Serialize, Deserialize)]
    /// struct Report { rows: u32 }
    /// impl Event for Report { const NAME: &'static str = "Report"; }
    ///
    /// let bus = Bus::builder().build()?;
    /// let options = SubscribeOptions::new().timeout(Duration::from_secs(2));
    /// bus.subscribe_with(options, |r: &Report, ctx: &Context| -> HandlerResult {
    ///     assert!(ctx.deadline().is_some());
    ///     for _row in 0..r.rows {
    ///         if ctx.is_expired() {
    ///             return Err(HandlerError::msg("out of time; try again"));
    ///         }
    ///         // ... one row's work ...
    ///     }
    ///     Ok(())
    /// })?;
    /// bus.publish(Report { rows: 1_000 })?;
    /// bus.flush(Duration::from_secs(5))?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// Whether this call has passed its [`deadline`](Self::deadline) (never, without one).
    pub fn is_expired(&self) -> bool {
        self.deadline.is_some_and(|at| self.core.clock.now() >= at)
    }

    /// Defers this delivery's outcome: the handler returns, the worker moves on, and the
    /// delivery settles when the returned [`Deferred`] is completed, from any thread.
    ///
    /// This is for handlers that hand their work to something slower than the worker and do
    /// not want to hold it meanwhile: a thread that writes to a socket in batches, say, and
    /// completes each delivery once its batch is confirmed. Until then the delivery is
    /// outstanding ([`Bus::flush`](crate::Bus::flush) waits for it); a failure is retried
    /// (the handler runs again) or dead-lettered as if the handler had returned it.
    ///
    /// The deferral counts only if the handler then returns `Ok`: after an error or a panic,
    /// the attempt failed as usual and completing the `Deferred` does nothing. Events the
    /// handler published through this context leave when it returns, not when the deferral
    /// completes. Latencies of a deferred delivery end when the handler returns.
    ///
    /// # Panics
    ///
    /// When called a second time for the same delivery (the panic fails the attempt).
    ///
    /// # Examples
    ///
    /// ```
    /// use microbus::{Bus, Context, Deferred, Event, HandlerResult};
    /// use serde::{Deserialize, Serialize};
    /// use std::time::Duration;
    ///
    /// #[derive(Debug, Serialize, Deserialize)]
    /// struct Shipped { order_id: u64 }
    /// impl Event for Shipped { const NAME: &'static str = "Shipped"; }
    ///
    /// let (tx, rx) = crossbeam_channel::unbounded::<(u64, Deferred)>();
    /// // Another thread does the slow part and settles each delivery.
    /// let writer = std::thread::spawn(move || {
    ///     for (order_id, done) in rx {
    ///         if order_id % 2 == 0 { done.succeed() } else { done.fail(microbus::HandlerError::msg("odd")) }
    ///     }
    /// });
    ///
    /// let bus = Bus::builder().workers(1).retry(microbus::RetryPolicy::none()).build()?;
    /// bus.subscribe(move |e: &Shipped, ctx: &Context| -> HandlerResult {
    ///     tx.send((e.order_id, ctx.defer())).expect("the writer runs");
    ///     Ok(())
    /// })?;
    /// bus.publish(Shipped { order_id: 2 })?;
    /// bus.publish(Shipped { order_id: 3 })?;
    /// bus.flush(Duration::from_secs(5))?; // waits for both deferrals
    /// let report = bus.shutdown()?;
    /// assert_eq!((report.stats.succeeded, report.stats.dead_lettered), (1, 1));
    /// # drop(bus); writer.join().unwrap();
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn defer(&self) -> Deferred {
        let mut current = self.worker.deferral.lock();
        assert!(
            current.is_none(),
            "Context::defer was called twice for one delivery"
        );
        let slot = self
            .core
            .deferrals
            .slot(self.event_name, self.envelope.id(), self.sub.id);
        *current = Some(slot.clone());
        drop(current);
        self.worker.staged.store(true, Ordering::Relaxed);
        Deferred {
            core: self.core.clone(),
            slot: Some(slot),
        }
    }

    /// Whether the bus is shutting down; a long handler may stop early.
    pub fn is_shutting_down(&self) -> bool {
        self.core.is_closing()
    }

    /// Stages `event` to be published when this handler returns `Ok`, and returns its id.
    ///
    /// The event inherits the handled event's correlation id, names it as its causation, and
    /// comes from this handler's service. It is matched against the subscriptions now. If the
    /// handler fails, its staged events are dropped, so a failed attempt publishes nothing.
    /// Staged events never make the worker wait: when their shard is full they wait in a
    /// bounded spill queue, and past that on a timer that offers them again with backoff.
    ///
    /// # Errors
    ///
    /// [`PublishError::Shutdown`] with the event when the bus has already stopped (a handler
    /// that outlived the shutdown deadline).
    pub fn publish<E: Event>(&self, event: E) -> Result<EventId, PublishError<E>> {
        self.publish_with(event, Publish::new())
    }

    /// Like [`publish`](Self::publish), with options, as
    /// [`Bus::publish_with`](crate::Bus::publish_with) takes them: the correlation and
    /// causation default to the handled event's (options that set them win), and an event
    /// with a [`delay`](Publish::delay) waits on the timer once the handler has returned `Ok`.
    /// A handler's publish is not tracked: its events are sent only if it succeeds.
    ///
    /// # Errors
    ///
    /// As [`publish`](Self::publish).
    pub fn publish_with<E: Event>(
        &self,
        event: E,
        options: Publish,
    ) -> Result<EventId, PublishError<E>> {
        let (stamp, delay) = options.into_parts();
        let stamp = stamp.caused_by(self.envelope);
        let id = self
            .core
            .prepare(self.sub.service, event, stamp, |routed| {
                self.worker.outbox.lock().push((routed, delay));
                self.worker.staged.store(true, Ordering::Relaxed);
            })
            .map_err(PublishError::Shutdown)?;
        Ok(id)
    }

    /// Stages events of one type to be published, in batches, when this handler returns `Ok`:
    /// grouped per shard as [`Bus::publish_batch`](crate::Bus::publish_batch) does, each
    /// inheriting the correlation and naming the handled event as its cause.
    ///
    /// # Errors
    ///
    /// [`PublishBatchError`] with the events when the bus has already stopped.
    pub fn publish_batch<E: Event>(
        &self,
        events: impl IntoIterator<Item = E>,
    ) -> Result<(), PublishBatchError<E>> {
        self.publish_batch_with(events.into_iter().map(|event| (event, Publish::new())))
    }

    /// Like [`publish_batch`](Self::publish_batch), each event with its own options; the
    /// correlation and causation default to the handled event's.
    ///
    /// # Errors
    ///
    /// As [`publish_batch`](Self::publish_batch).
    pub fn publish_batch_with<E: Event>(
        &self,
        items: impl IntoIterator<Item = (E, Publish)>,
    ) -> Result<(), PublishBatchError<E>> {
        let items = items.into_iter().map(|(event, options)| {
            let (stamp, delay) = options.into_parts();
            (event, stamp.caused_by(self.envelope), delay)
        });
        let mut staged = Vec::new();
        self.core
            .prepare_batch(self.sub.service, items, |routed, delay| {
                staged.push((routed, delay))
            })
            .map_err(PublishBatchError::new)?;
        if !staged.is_empty() {
            self.worker.outbox.lock().append(&mut staged);
            self.worker.staged.store(true, Ordering::Relaxed);
        }
        Ok(())
    }
}

impl fmt::Debug for Context<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Context")
            .field("event", &self.event_name)
            .field("envelope", self.envelope)
            .field("service", &self.sub.service)
            .field("handler", &self.sub.name)
            .field("attempt", &self.attempt)
            .finish_non_exhaustive()
    }
}

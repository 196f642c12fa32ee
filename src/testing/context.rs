//! [`TestContext`]: a handler called directly, without a running bus, and what it staged.
//!
//! Ground rules: a test context owns a small bus of its own (one worker, no subscriptions, on
//! a manual clock) so that a [`Context`] made for a call publishes exactly as it would on a
//! worker: matched (against nothing), stamped from the clock, staged. Nothing staged is ever
//! sent: the test context keeps what a successful call staged and drops what a failed call
//! staged, as the worker would.

use std::fmt;
use std::time::Duration;

use crate::bus::Bus;
use crate::clock::ManualClock;
use crate::context::Context;
use crate::defer::Slot;
use crate::event::{Envelope, Event, EventId, Headers, NameId};
use crate::handler::HandlerResult;
use crate::meta::{SubMeta, SubSettings, cells};
use crate::retry::RetryPolicy;
use crate::shard::{Routed, Work, WorkerShared};
use crate::sync::{Arc, Ordering};

/// A [`Context`] for calling a handler directly in a unit test, and what the handler did with
/// it: the events it published (with their envelopes and delays), whether it deferred and how
/// the deferral was completed.
///
/// Built with [`TestContext::builder`] (event id, correlation, causation, source, key,
/// headers, attempt, subscribing service and handler name, a timeout for
/// [`Context::deadline`], a [`ManualClock`]); [`call`](Self::call) runs a handler with it.
/// As on a worker, a call that fails drops what it staged, and a deferral counts only when
/// the call returns `Ok`. Calls add up: [`published`](Self::published) lists what every
/// successful call published.
///
/// # Examples
///
/// ```
/// use microbus::{Context, Event, HandlerError, HandlerResult, Publish};
/// use microbus::testing::{Deferral, TestContext};
/// use serde::{Deserialize, Serialize};
/// use std::time::Duration;
///
/// #[derive(Debug, PartialEq, Serialize, Deserialize)]
/// struct OrderPlaced { order: u64, total: u64 }
/// impl Event for OrderPlaced { const NAME: &'static str = "OrderPlaced"; }
/// #[derive(Debug, PartialEq, Serialize, Deserialize)]
/// struct PaymentRequested { order: u64, amount: u64 }
/// impl Event for PaymentRequested { const NAME: &'static str = "PaymentRequested"; }
/// #[derive(Debug, PartialEq, Serialize, Deserialize)]
/// struct PaymentReminder { order: u64 }
/// impl Event for PaymentReminder { const NAME: &'static str = "PaymentReminder"; }
///
/// // The handler under test.
/// fn request_payment(order: &OrderPlaced, ctx: &Context) -> HandlerResult {
///     if order.total == 0 {
///         return Err(HandlerError::permanent(HandlerError::msg("nothing to pay")));
///     }
///     ctx.publish(PaymentRequested { order: order.order, amount: order.total })?;
///     ctx.publish_with(
///         PaymentReminder { order: order.order },
///         Publish::new().delay(Duration::from_secs(3600)),
///     )?;
///     Ok(())
/// }
///
/// let mut ctx = TestContext::builder().service("payments").attempt(1).build();
/// ctx.call(&OrderPlaced { order: 7, total: 30 }, request_payment).unwrap();
/// assert_eq!(ctx.published::<PaymentRequested>(), [&PaymentRequested { order: 7, amount: 30 }]);
/// assert_eq!(
///     ctx.delayed::<PaymentReminder>(),
///     [(&PaymentReminder { order: 7 }, Duration::from_secs(3600))]
/// );
/// // The staged events carry the handled event's correlation and name it as their cause.
/// let (_, envelope, _) = &ctx.staged::<PaymentRequested>()[0];
/// assert_eq!(envelope.correlation_id(), ctx.envelope().correlation_id());
/// assert_eq!(envelope.causation_id(), Some(ctx.envelope().id()));
/// assert_eq!(envelope.source(), "payments");
/// assert_eq!(ctx.deferral(), None);
///
/// // A failed call publishes nothing.
/// let mut ctx = TestContext::new();
/// assert!(ctx.call(&OrderPlaced { order: 8, total: 0 }, request_payment).is_err());
/// assert!(ctx.published::<PaymentRequested>().is_empty());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct TestContext {
    bus: Bus,
    clock: ManualClock,
    envelope: Envelope,
    attempt: u32,
    timeout: Option<Duration>,
    service: NameId,
    handler: String,
    /// What successful calls staged, in order, with their delays.
    staged: Vec<(Routed, Option<Duration>)>,
    /// How many events failed calls staged (and dropped).
    dropped: usize,
    deferral: Option<Arc<Slot>>,
}

/// How the delivery a [`TestContext`] ran was deferred
/// ([`Context::defer`](crate::Context::defer)) and completed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Deferral {
    /// Deferred, not completed yet.
    Pending,
    /// Completed with success.
    Succeeded,
    /// Completed with a failure (or the [`Deferred`](crate::Deferred) was dropped): the
    /// error's text.
    Failed(String),
}

impl TestContext {
    /// A test context with the defaults of [`TestContextBuilder`].
    pub fn new() -> TestContext {
        TestContext::builder().build()
    }

    /// Sets up a test context.
    pub fn builder() -> TestContextBuilder {
        TestContextBuilder::default()
    }

    /// Calls `handler` with `event` and a [`Context`] made from this test context, and
    /// returns what it returned. When it returns `Ok`, what it staged is kept (see
    /// [`published`](Self::published)) and a deferral counts; otherwise both are dropped, as
    /// on a worker. A panic in the handler propagates to the test.
    pub fn call<E: Event>(
        &mut self,
        event: &E,
        handler: impl FnOnce(&E, &Context<'_>) -> HandlerResult,
    ) -> HandlerResult {
        let core = self.bus.core();
        let meta = SubMeta::new::<E>(
            0,
            self.handler.clone().into_boxed_str(),
            self.service,
            None,
            SubSettings::new(RetryPolicy::default(), 0),
            cells(false, 0),
        );
        let worker = WorkerShared::default();
        let ctx = Context {
            envelope: &self.envelope,
            event_name: E::NAME,
            sub: &meta,
            attempt: self.attempt,
            core,
            worker: &worker,
            deadline: self
                .timeout
                .and_then(|timeout| core.clock.now().checked_add(timeout)),
        };
        let result = handler(event, &ctx);
        let staged = std::mem::take(&mut *worker.outbox.lock());
        let deferral = worker.deferral.lock().take();
        worker.staged.store(false, Ordering::Relaxed);
        if result.is_ok() {
            self.staged.extend(staged);
            if deferral.is_some() {
                self.deferral = deferral;
            }
        } else {
            self.dropped += staged.len();
        }
        result
    }

    /// The envelope of the event the handler is called with.
    pub fn envelope(&self) -> &Envelope {
        &self.envelope
    }

    /// The clock the context reads ([`Context::deadline`], the ids of staged events).
    pub fn clock(&self) -> &ManualClock {
        &self.clock
    }

    /// The events of type `T` that successful calls published without a delay, in order.
    pub fn published<T: Event>(&self) -> Vec<&T> {
        self.staged::<T>()
            .into_iter()
            .filter(|(_, _, delay)| delay.is_none())
            .map(|(event, _, _)| event)
            .collect()
    }

    /// The events of type `T` that successful calls published with a delay, with the delay.
    pub fn delayed<T: Event>(&self) -> Vec<(&T, Duration)> {
        self.staged::<T>()
            .into_iter()
            .filter_map(|(event, _, delay)| Some((event, delay?)))
            .collect()
    }

    /// Every event of type `T` that successful calls published, with its envelope and its
    /// delay if it has one, in order.
    pub fn staged<T: Event>(&self) -> Vec<(&T, &Envelope, Option<Duration>)> {
        self.staged
            .iter()
            .filter_map(|(routed, delay)| match &routed.work {
                Work::Task(task) => Some((task.event::<T>()?, &task.envelope, *delay)),
                _ => None,
            })
            .collect()
    }

    /// How many events, of any type, successful calls published.
    pub fn published_count(&self) -> usize {
        self.staged.len()
    }

    /// How many events calls that failed had staged: dropped, never published.
    pub fn dropped(&self) -> usize {
        self.dropped
    }

    /// Whether a successful call deferred its outcome, and how the
    /// [`Deferred`](crate::Deferred) was completed since.
    pub fn deferral(&self) -> Option<Deferral> {
        let slot = self.deferral.as_ref()?;
        Some(match slot.completed() {
            None => Deferral::Pending,
            Some(Ok(())) => Deferral::Succeeded,
            Some(Err(error)) => Deferral::Failed(error),
        })
    }
}

impl Default for TestContext {
    fn default() -> Self {
        TestContext::new()
    }
}

impl fmt::Debug for TestContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestContext")
            .field("envelope", &self.envelope)
            .field("attempt", &self.attempt)
            .field("service", &self.service)
            .field("handler", &self.handler)
            .field("published", &self.staged.len())
            .field("dropped", &self.dropped)
            .field("deferral", &self.deferral())
            .finish()
    }
}

/// Sets up a [`TestContext`]: every setting has a default.
#[derive(Debug, Clone, Default)]
pub struct TestContextBuilder {
    event_id: Option<EventId>,
    correlation_id: Option<EventId>,
    causation_id: Option<EventId>,
    source: Option<String>,
    key: Option<u64>,
    headers: Headers,
    attempt: Option<u32>,
    timeout: Option<Duration>,
    service: Option<String>,
    handler: Option<String>,
    clock: Option<ManualClock>,
}

impl TestContextBuilder {
    /// The handled event's id (default: a new id from the clock).
    pub fn event_id(mut self, id: EventId) -> Self {
        self.event_id = Some(id);
        self
    }

    /// Its correlation id (default: its own id).
    pub fn correlation_id(mut self, id: EventId) -> Self {
        self.correlation_id = Some(id);
        self
    }

    /// The event that caused it (default: none).
    pub fn causation_id(mut self, id: EventId) -> Self {
        self.causation_id = Some(id);
        self
    }

    /// The service that published it (default
    /// [`DEFAULT_SERVICE_NAME`](crate::DEFAULT_SERVICE_NAME)).
    pub fn source(mut self, service: impl Into<String>) -> Self {
        self.source = Some(service.into());
        self
    }

    /// Its partition key (default: none).
    pub fn key(mut self, key: u64) -> Self {
        self.key = Some(key);
        self
    }

    /// A header on it.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(name, value);
        self
    }

    /// Which attempt the call is ([`Context::attempt`]; default 1).
    pub fn attempt(mut self, attempt: u32) -> Self {
        self.attempt = Some(attempt);
        self
    }

    /// How long the call has: [`Context::deadline`] is this long after the clock's time when
    /// the call starts (default: no deadline).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// The subscribing service: the source of what the handler publishes (default
    /// [`DEFAULT_SERVICE_NAME`](crate::DEFAULT_SERVICE_NAME)).
    pub fn service(mut self, service: impl Into<String>) -> Self {
        self.service = Some(service.into());
        self
    }

    /// The handler's name ([`Context::handler_name`]; default `"handler"`).
    pub fn handler(mut self, name: impl Into<String>) -> Self {
        self.handler = Some(name.into());
        self
    }

    /// The clock the context reads (default: a new [`ManualClock`]): advance it to pass the
    /// deadline.
    pub fn clock(mut self, clock: &ManualClock) -> Self {
        self.clock = Some(clock.clone());
        self
    }

    /// The test context.
    ///
    /// # Panics
    ///
    /// If its bus cannot start a thread.
    pub fn build(self) -> TestContext {
        let clock = self.clock.unwrap_or_default();
        let service = self
            .service
            .unwrap_or_else(|| crate::DEFAULT_SERVICE_NAME.to_owned());
        let bus = Bus::builder()
            .workers(1)
            .metrics(false)
            .trace_capacity(0)
            .service_name(service.clone())
            .clock(&clock)
            .build()
            .expect("a test context's bus starts");
        let id = self
            .event_id
            .unwrap_or_else(|| EventId::at(bus.core().clock.unix_nanos()));
        let source = self
            .source
            .unwrap_or_else(|| crate::DEFAULT_SERVICE_NAME.to_owned());
        let envelope = Envelope::from_parts(
            id,
            self.correlation_id.unwrap_or(id),
            self.causation_id,
            &source,
            self.key,
            self.headers,
        );
        TestContext {
            clock,
            envelope,
            attempt: self.attempt.unwrap_or(1),
            timeout: self.timeout,
            service: NameId::intern(&service),
            handler: self.handler.unwrap_or_else(|| "handler".to_owned()),
            staged: Vec::new(),
            dropped: 0,
            deferral: None,
            bus,
        }
    }
}

//! An in-process, synchronous event bus for integration events between the logical services
//! of one program.
//!
//! Services publish typed events; other services subscribe, from any source or from one named
//! service. Publishing never runs handlers: events go through bounded channels to a pool of
//! sharded worker threads (same key, same shard, same order), and the publisher waits only when
//! its shard is full. No async runtime is involved.
//!
//! # Quick start
//!
//! ```
//! use microbus::{Bus, Context, Event, HandlerResult, Publish};
//! use serde::{Deserialize, Serialize};
//! use std::time::Duration;
//!
//! #[derive(Debug, Clone, Serialize, Deserialize)]
//! struct OrderCreated { order_id: u64, total_cents: i64 }
//! impl Event for OrderCreated { const NAME: &'static str = "OrderCreated"; }
//!
//! #[derive(Debug, Clone, Serialize, Deserialize)]
//! struct OrderPaid { order_id: u64 }
//! impl Event for OrderPaid { const NAME: &'static str = "OrderPaid"; }
//!
//! let bus = Bus::builder()
//!     .service_name("OrderService")
//!     .workers(2)
//!     .channel_capacity(1024)
//!     .build()?;
//!
//! let payments = bus.service("PaymentService")?;
//! payments.subscribe_from("OrderService", |order: &OrderCreated, ctx: &Context| -> HandlerResult {
//!     // Published when this handler returns Ok; same correlation, caused by this event.
//!     ctx.publish(OrderPaid { order_id: order.order_id })?;
//!     Ok(())
//! })?;
//! bus.subscribe(|paid: &OrderPaid, ctx: &Context| -> HandlerResult {
//!     assert_eq!(ctx.source(), "PaymentService");
//!     assert!(ctx.causation_id().is_some());
//!     Ok(())
//! })?;
//!
//! bus.publish(OrderCreated { order_id: 1, total_cents: 4_200 })?;
//! bus.publish_with(OrderCreated { order_id: 2, total_cents: 990 }, Publish::keyed(2u64))?;
//! bus.flush(Duration::from_secs(5))?;
//!
//! let report = bus.shutdown()?;
//! assert_eq!(report.stats.succeeded, 4);
//! assert!(report.is_balanced());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Publishing
//!
//! [`Bus::publish`] stamps an [`Envelope`] (id, correlation, causation, source, time, key,
//! headers), matches the event against the current subscriptions of its type (a lock-free
//! read), sends it to a shard — `hash(key)` for a keyed event ([`Publish::keyed`]), the next
//! shard in turn otherwise — and returns its [`EventId`]. It waits while the shard is full;
//! [`Bus::try_publish`] never waits and [`Bus::publish_timeout`] gives up after a while.
//! Whenever an event is not accepted, the error hands it back. An event that matches no
//! subscription is counted ([`BusStats::unmatched`]), not silently dropped.
//! [`Bus::publish_batch`] groups many events per shard and moves up to 64 through the channel
//! as one message, keeping per-key order.
//!
//! Each form has a `_with` twin that takes [`Publish`] options: besides a key, correlation
//! and headers, [`Publish::delay`] hands the event to the timer to be delivered later,
//! [`Publish::envelope`] lets it re-enter with an [`Envelope`] made elsewhere (a file, another
//! process) keeping its id, correlation and source, and [`Publish::tracked`] makes the publish
//! return a [`Tracker`] that completes, with a [`Completion`], once every delivery of the
//! event has settled. The table at the top of [`Bus`] lists them all.
//!
//! Idle workers park in their channel ([`WaitStrategy::Block`]); with
//! [`WaitStrategy::SpinThenPark`] they poll for a while first, for lower latency at the price
//! of a busy core.
//!
//! # Subscribing
//!
//! [`Bus::service`] gives a handle for another service of the program. [`Bus::subscribe`]
//! takes a closure (only the event type needs writing); [`Bus::subscribe_from`] listens to one
//! source service; [`Bus::subscribe_handler`] takes a [`Handler`] type;
//! [`Bus::subscribe_batch`] takes a handler of a [`Batch`] of events (a channel message's, up to
//! 64), settled with one result. The returned [`Subscription`] can
//! [`unsubscribe`](Subscription::unsubscribe); dropping it does not.
//!
//! Handlers publish follow-up events through [`Context::publish`]: they inherit the
//! correlation id, name the handled event as their causation, and leave only when the handler
//! returns `Ok` (an outbox). They never make a worker wait.
//!
//! A handler that hands its work to a slower thread calls [`Context::defer`] and returns: the
//! delivery stays outstanding until the [`Deferred`] is completed from any thread, and a failure
//! is retried and dead-lettered as if the handler had returned it.
//!
//! # Lanes
//!
//! A [`Lane`] is a set of workers of its own, with their own channels, declared with
//! [`BusBuilder::lane`]; the bus's own workers are the lane [`DEFAULT_LANE`]. A subscription
//! given a lane with [`SubscribeOptions::lane`] runs there, so a slow or failing service holds
//! back no subscription outside its lane, and the lane's worker count bounds how many of its
//! handlers run at once. Per-key order holds in every lane. A full lane either makes the
//! publisher wait ([`Backpressure::Block`], the default) or sheds the delivery as a dead letter
//! ([`Backpressure::Shed`]). An event whose subscriptions live in several lanes is shared by
//! them, and handed back to its publisher only if no lane took it.
//!
//! ```
//! use microbus::{Backpressure, Bus, Context, Event, HandlerResult, Lane, SubscribeOptions};
//! use serde::{Deserialize, Serialize};
//! use std::time::Duration;
//!
//! #[derive(Debug, Serialize, Deserialize)]
//! struct OrderCreated { order_id: u64 }
//! impl Event for OrderCreated { const NAME: &'static str = "OrderCreated"; }
//!
//! let bus = Bus::builder()
//!     .workers(2)
//!     .lane("email", Lane::new(1).backpressure(Backpressure::Shed))
//!     .build()?;
//! bus.service("PaymentService")?
//!     .subscribe(|_: &OrderCreated, _: &Context| -> HandlerResult { Ok(()) })?;
//! bus.service("NotificationService")?.subscribe_with(
//!     SubscribeOptions::new().lane("email"),
//!     |_: &OrderCreated, _: &Context| -> HandlerResult { Ok(()) },
//! )?;
//! let tracker = bus.publish_with(OrderCreated { order_id: 1 }, microbus::Publish::new().tracked())?;
//! assert_eq!(tracker.wait(Duration::from_secs(5)).unwrap().succeeded, 2);
//! assert_eq!(bus.metrics().lanes[1].name, "email");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Control
//!
//! A service whose downstream is down, or whose handler is stuck, can be held back without
//! losing anything: [`Subscription::pause`] parks its deliveries in order (spending no
//! attempt) until [`Subscription::resume`]; a [`CircuitBreaker`]
//! ([`SubscribeOptions::circuit_breaker`]) does so by itself after consecutive failures, then
//! probes with one delivery; the timer thread reports deliveries running past
//! [`BusBuilder::stall_after`]; [`SubscribeOptions::timeout`] gives a handler
//! [`Context::deadline`]; a [`HandlerError`] can say what to do ([`Verdict`]:
//! [`HandlerError::retry_after`], [`HandlerError::discard`]) and
//! [`SubscribeOptions::retry_if`] classifies the rest; [`Bus::health`] sums it up. An
//! *ordered* subscription ([`SubscribeOptions::ordered`]) keeps each key's events in order
//! through all of it, retries included: one delivery per key is in progress at a time.
//!
//! ```
//! use microbus::{
//!     Bus, CircuitBreaker, Context, Event, HandlerError, HandlerResult, RetryPolicy,
//!     SubscribeOptions,
//! };
//! use serde::{Deserialize, Serialize};
//! use std::sync::atomic::{AtomicBool, Ordering};
//! use std::sync::Arc;
//! use std::time::Duration;
//!
//! #[derive(Debug, Serialize, Deserialize)]
//! struct Charge { cents: u64 }
//! impl Event for Charge { const NAME: &'static str = "Charge"; }
//!
//! let retry = RetryPolicy::fixed(Duration::from_millis(5));
//! let bus = Bus::builder().workers(1).retry(retry).build()?;
//! let down = Arc::new(AtomicBool::new(true));
//! let gateway = down.clone();
//! let breaker = CircuitBreaker::new(2, Duration::from_millis(10));
//! bus.subscribe_with(
//!     SubscribeOptions::new().circuit_breaker(breaker),
//!     move |_: &Charge, _: &Context| -> HandlerResult {
//!         if gateway.load(Ordering::SeqCst) {
//!             return Err(HandlerError::msg("gateway down"));
//!         }
//!         Ok(())
//!     },
//! )?;
//! for cents in 0..10 {
//!     bus.publish(Charge { cents })?;
//! }
//! while bus.health().is_ready() {
//!     std::thread::yield_now(); // until the breaker opens
//! }
//! down.store(false, Ordering::SeqCst); // the gateway is back
//! bus.flush(Duration::from_secs(5))?;
//! assert_eq!((bus.stats().succeeded, bus.stats().dead_lettered), (10, 0));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # rayon
//!
//! With the `rayon` cargo feature (on by default), `Bus::publish_par_iter` and
//! `Bus::publish_par_iter_with` publish the events of a parallel iterator, each rayon task
//! grouping its events per shard through the batch path. Handlers may use rayon for their own
//! work: the bus's workers are threads of their own, never rayon's, so a `par_iter` in a
//! handler runs on rayon's pool while the worker waits for it.
//!
//! The two together could deadlock: the pool's threads publish into a full shard while the
//! shard's worker runs a handler that waits for that same pool. So a publish on a rayon worker
//! thread (of any pool) never blocks on a full shard. While the shard is full it runs other work
//! of its pool (the waiting handler's, perhaps) and tries again; once the shard's worker has
//! made no progress for 100 ms, the event goes to the shard's overflow queue (bounded by
//! [`BusBuilder::spill_capacity`], taken by the worker ahead of its channel, so the event may
//! overtake earlier ones of its key); and when that is
//! full too, the event comes back: [`PublishError::Full`], or [`PublishBatchError::is_full`]
//! with the events not accepted. Every event is handled or handed back; publish what came back
//! from a thread outside the pool, or give the handlers' rayon work a pool of its own
//! (`rayon::ThreadPool::install`). Publishes from other threads wait for room as always.
//!
//! # Retries
//!
//! A handler that returns an error or panics fails that one delivery: the worker and the
//! event's other handlers carry on. The failed delivery is tried again alone, on the event's
//! shard, after the delay its [`RetryPolicy`] gives — the bus's
//! ([`BusBuilder::retry`]; by default exponential from 5 s, 4 attempts in all) or the
//! subscription's own ([`SubscribeOptions::retry`]). A waiting retry holds no worker: it
//! waits on a timing wheel driven by one timer thread. [`Context::attempt`] counts the
//! attempts from 1. An error made with [`HandlerError::permanent`] is not retried. Failures
//! are counted ([`BusStats::failed`], [`Subscription::stats`]) with the last error's text.
//! With `panic = "abort"` in the application's profile a panicking handler ends the process
//! instead.
//!
//! # Dead letters
//!
//! A delivery that fails for good — its attempts exhausted, a permanent error, or a retry still
//! waiting at shutdown — lands in a bounded ring ([`BusBuilder::dead_letter_capacity`]). Each
//! [`DeadLetter`] keeps the envelope, the event as JSON, the handler, every attempt's error and
//! the reason. [`Bus::dead_letters`] lists, filters, exports (JSON lines), redrives (to the same
//! subscription, with the same envelope) and purges them. The oldest entry of a full ring is
//! evicted, counted and handed to the [`dead_letter_sink`](BusBuilder::dead_letter_sink) or
//! written to the [`dead_letter_file`](BusBuilder::dead_letter_file), from which
//! [`DeadLetters::load_json_lines`] reads it back after a restart.
//!
//! # Metrics
//!
//! [`Bus::metrics`] returns a [`MetricsSnapshot`]: per event type and source service, events
//! published and those that matched no subscription; per handler, deliveries, successes,
//! failed attempts, panics, retries, dead letters and cancellations; per shard, the queue
//! depth; and HdrHistograms of queue wait (publish → handler start), handler time and
//! end-to-end time (publish → success, retries included) per handler and per event type. It
//! serializes with serde ([`MetricsSnapshot::to_json`]), prints as an aligned table
//! (`Display`: count, p50, p90, p99, p99.9 and max in human units) and renders as Prometheus
//! text exposition ([`MetricsSnapshot::to_prometheus`]).
//!
//! Counters are exact. Each worker records into its own histograms, without a lock, and hands
//! them over when a snapshot asks; the publish time comes from the event id, so a timed
//! delivery reads the TSC twice. [`BusBuilder::metrics_sample_every`] times one delivery in
//! `n` — by default one in [`DEFAULT_METRICS_SAMPLE_EVERY`] (16), and the snapshot states `n`; [`BusBuilder::metrics`]`(false)` turns recording off, and a
//! delivery then takes no timestamp. Memory is per use and given back: a worker counts each
//! handler's three latencies (1 ns to 68.7 s, two significant digits) as a short list of
//! buckets while few are used (a few hundred bytes), and in arrays of every bucket, 92,160
//! bytes per worker × handler, once a handler is busy; a snapshot merges them into the bus's
//! copy (a list or arrays likewise), and a worker lets go of what a handler no longer uses.
//! A busy handler's recording allocates nothing. An unsubscribed handler's row stays among the
//! last 64 removed, then goes. 10,000 handlers that ran 10 events each take about 15 MiB with
//! a snapshot, on two workers.
//!
//! # Audit taps and tracing
//!
//! [`Bus::tap`] sees every published event of every type — name, envelope, payload as JSON on
//! demand — without being a subscription; [`Bus::tap_json_lines`] writes them to a file. With
//! the `tracing` cargo feature each handler run is a span (`microbus.handle`) carrying the
//! event name, event id, correlation id, service, handler and attempt. With
//! [`BusBuilder::trace_capacity`] the bus keeps its last handler runs, and [`Bus::trace`] returns
//! one conversation, which prints as a causal tree.
//!
//! # Testing
//!
//! [`testing`] holds the test kit, behind the `testing` cargo feature (for
//! `[dev-dependencies]`; off, the bus reads the system's clock with no branch for another). A [`ManualClock`](testing::ManualClock) given to
//! [`BusBuilder::clock`] is the one clock the bus reads — ids, delays, cool-downs, stall
//! detection, dead-letter times, latencies, deadlines — and
//! [`advance`](testing::ManualClock::advance) steps through each due instant and returns once
//! the work that fell due has run, so a test of retries minutes apart takes microseconds;
//! [`Bus::flush`] says at once when only the clock can finish
//! ([`FlushError::is_waiting_on_clock`]). A [`TestContext`](testing::TestContext) calls a
//! handler without a bus and tells what it published and whether it deferred;
//! [`Bus::record`] keeps every event of a type that flows through the bus; and
//! [`Trace::path`] gives a conversation's shape for `assert_eq!`. With one worker per lane and
//! a manual clock, a flow runs the same way every time.
//!
//! ```
//! use microbus::testing::ManualClock;
//! use microbus::{Bus, Context, Event, HandlerError, HandlerResult};
//! use serde::{Deserialize, Serialize};
//! use std::time::Duration;
//!
//! #[derive(Serialize, Deserialize)]
//! struct Charge { order: u64 }
//! impl Event for Charge { const NAME: &'static str = "Charge"; }
//!
//! let clock = ManualClock::new();
//! let bus = Bus::builder().workers(1).clock(&clock).build()?;
//! bus.subscribe(|_: &Charge, _: &Context| -> HandlerResult {
//!     Err(HandlerError::msg("declined"))
//! })?;
//! bus.publish(Charge { order: 1 })?;
//! // The default policy: 4 attempts, 5 s, 10 s and 20 s apart, then a dead letter.
//! clock.advance(Duration::from_secs(35))?;
//! bus.flush(Duration::from_secs(5))?;
//! assert_eq!(bus.stats().failed, 4);
//! assert_eq!(bus.dead_letters().len(), 1);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Shutdown
//!
//! [`Bus::flush`] waits until everything accepted has been handled. [`Bus::shutdown`] closes
//! intake, lets the workers finish until the [`shutdown_timeout`](BusBuilder::shutdown_timeout)
//! deadline and returns a [`ShutdownReport`]. Dropping the last [`Bus`] handle does the same.
//! Neither may be called from a handler: they return an error instead of waiting for
//! themselves.
//!
//! The deadline is absolute: shutdown returns by it plus [`SHUTDOWN_GRACE`], whatever user code
//! is running. A worker still in a handler, or in a tap, a hook, a sink, a tracker's callback or
//! an event's `Serialize` or `Drop`, is detached and reported in
//! [`ShutdownReport::abandoned`] with what it held; the shutdown thread runs no user code
//! itself (the trackers' callbacks, dead letters and drops of what it swept go to a thread it
//! can leave behind, [`ShutdownReport::cut_off`]). A stopped bus lets go of its handlers, taps
//! and callbacks, so a handler that captured a [`Bus`] leaks nothing.
//! [`BusBuilder::dead_letter_left_at_shutdown`] keeps the deliveries that never ran as dead
//! letters, to be redriven after a restart.
//!
//! # Guarantees
//!
//! - Every event is either accepted or handed back to its publisher, never both, never neither.
//! - Each accepted delivery (an event × a subscription it matched when published) is settled
//!   exactly once, whatever its retries: succeeded, dead-lettered (or discarded, with dead
//!   letters off), cancelled by `unsubscribe`, abandoned or left at the shutdown deadline. The
//!   counts add up ([`BusStats::is_balanced`]).
//! - Events published by one thread with the same key reach each subscription in publish
//!   order. Unkeyed events are spread over the shards and may be handled in any order; retries,
//!   and events published by handlers that had to wait for room, may fall behind later ones;
//!   an event a rayon thread put in a stuck shard's overflow queue (see rayon above) may
//!   overtake earlier ones still in the shard's channel.
//! - All subscriptions of an event run on its shard, one after another, so a slow handler
//!   delays the events behind it on that shard.
//! - User code is isolated: a panic in a handler fails that attempt; a panic in a hook, a sink,
//!   a tracker's callback, a tap, or an event's `Serialize` or `Drop` is caught and counted
//!   ([`CallbackPanics`], in [`BusStats::callback_panics`]) and the delivery it concerned is
//!   settled as if the code had returned. Callbacks run after the delivery is settled. Nothing
//!   unwinds out of `flush`, `shutdown`, `metrics`, the dead-letter operations or the drop of
//!   the last handle.
//! - Every `Duration` a method takes may be anything up to `Duration::MAX` (for ever, where
//!   that is the meaning), and retry policies saturate instead of overflowing.
//! - Nothing survives the process: the bus lives in memory.
//!
//! # The life of an event
//!
//! 1. **Publish** (`bus/intake.rs`): the publisher's thread looks up the routes of the event's
//!    type in the registry's snapshot (`registry.rs`, cached per thread), mints its id
//!    (`id.rs`) and stamps its envelope (`event.rs`), and picks its shard from its key.
//! 2. **Gate** (`ledger.rs`): one atomic add on the shard's gate accepts its deliveries (one
//!    per matching subscription), unless shutdown has closed it; a refused event goes back to
//!    its publisher.
//! 3. **Shard** (`shard/mod.rs`): the event travels as one message through the shard's bounded
//!    channel; a full channel makes the publisher wait (or hands the event back to
//!    `try_publish`).
//! 4. **Worker** (`shard/worker.rs`, `shard/work.rs`): the shard's thread receives it, finds
//!    the subscriptions of its generation, and runs each handler with a [`Context`]
//!    (`context.rs`) under one guard that catches a panic (`guard.rs`).
//! 5. Then one of: **success**, and what the handler published through its context (its
//!    outbox) leaves for its own shards; a **retry** on the timer (`timer/`) after the delay of
//!    its policy (`retry.rs`); a **dead letter** in the ring (`dead_letter.rs`); or a
//!    **deferral** settled later from another thread (`defer.rs`, `shard/settle.rs`). Each
//!    outcome is counted once (`stats.rs`), and the callbacks it owes (a tracker, a hook, a
//!    sink) run after it is settled.
//!
//! # Where things live
//!
//! Leaves, which import nothing above them:
//!
//! | module | what it holds |
//! | --- | --- |
//! | `sync.rs` | the atomics and locks (loom's under `--cfg loom`) |
//! | `error.rs`, `config.rs` | every public error; the validated settings and their defaults |
//! | `id.rs`, `event.rs` | [`EventId`]; [`Event`], [`Envelope`], [`Publish`], keys and names |
//! | `stats.rs` | [`BusStats`] and [`ShutdownReport`]: one list of the ledger's terms |
//! | `ledger.rs` | the shard's gate word and quiescence |
//! | `handler.rs` | [`HandlerResult`], [`HandlerError`] |
//! | `retry.rs` | [`RetryPolicy`] and its jitter |
//! | `clock.rs` | the one clock a bus reads: the system's, or a [`ManualClock`](testing::ManualClock) |
//! | `timer/` | the hashed timing wheel and the delay thread that fires due items |
//! | `meta.rs`, `registry.rs` | a subscription's identity and counters; the handler tables |
//! | `dead_letter.rs` | the ring, its entries and their file format |
//! | `guard.rs`, `track.rs`, `tap.rs`, `trace.rs`, `metrics/` | the guard for user code, trackers, taps, traces, metrics |
//!
//! The engine, above them: `bus/core.rs` (the state one bus shares, its lanes), `bus/intake.rs`
//! (every publish path), `bus/unmatched.rs` (events no subscription matched, and the
//! taps), `bus/lanes.rs` (an event for several lanes, shedding),
//! `bus/lifecycle.rs` (flush, statistics, shutdown), `bus/clocked.rs` (a bus driven by a
//! manual clock), `bus/redrive.rs` and
//! `bus/rebuild.rs` (dead letters back to their subscriptions), `shard/` (the work
//! vocabulary, the worker, deferred settlement, dead letters made and read back),
//! `context.rs` ([`Context`], [`Handler`]), `defer.rs` ([`Deferred`]). The public handles on top: `bus/mod.rs` ([`Bus`]),
//! `bus/builder.rs`, `bus/dead_letters.rs` ([`DeadLetters`]), `subscription.rs`, `par.rs`
//! (rayon), `bridge/` (Redis Streams) and `testing/` (the test kit).

#![deny(unsafe_code)]
#![warn(
    missing_docs,
    missing_debug_implementations,
    unreachable_pub,
    rust_2018_idioms
)]

mod breaker;
#[cfg(feature = "redis")]
pub mod bridge;
mod bus;
mod clock;
mod config;
mod context;
mod dead_letter;
mod defer;
mod error;
mod event;
mod guard;
mod handler;
mod health;
mod id;
mod ledger;
mod meta;
mod metrics;
#[cfg(feature = "rayon")]
mod par;
mod registry;
mod retry;
mod shard;
mod stats;
mod subscription;
mod sync;
mod tap;
#[cfg(feature = "testing")]
pub mod testing;
mod timer;
mod trace;
mod track;

pub use crate::breaker::{BreakerChange, BreakerState, CircuitBreaker};
pub use crate::bus::{Bus, BusBuilder, DeadLetters, LoadSummary, RedriveCutShort};
pub use crate::config::{
    Backpressure, DEFAULT_CHANNEL_CAPACITY, DEFAULT_DEAD_LETTER_CAPACITY, DEFAULT_LANE,
    DEFAULT_METRICS_SAMPLE_EVERY, DEFAULT_SERVICE_NAME, DEFAULT_SHUTDOWN_TIMEOUT,
    DEFAULT_STALL_AFTER, Lane, MAX_CHANNEL_CAPACITY, MAX_CHANNEL_MEMORY, MAX_LANES, MAX_NAME_LEN,
    MAX_WORKERS, WaitStrategy,
};
pub use crate::context::{Batch, Context, Handler};
pub use crate::dead_letter::{
    DeadLetter, DeadLetterFilter, DeadLetterReason, DeadLetterSink, RedriveError,
};
pub use crate::defer::Deferred;
pub use crate::error::{
    ConfigError, FlushError, LanePending, ParkedPending, Pending, PublishBatchError, PublishError,
    PublishTimeoutError, ShutdownError, SubscribeError, TryPublishError,
};
pub use crate::event::{
    Envelope, Event, EventId, Headers, ParseEventIdError, PartitionKey, Publish, Track, Tracked,
    Untracked,
};
pub use crate::guard::CallbackPanics;
pub use crate::handler::{HandlerError, HandlerResult, Verdict};
pub use crate::health::{HandlerHealth, Health, ImportLag, LaneHealth};
pub use crate::meta::DEFAULT_PARK_CAPACITY;
pub use crate::metrics::{
    BridgeCounters, EventCounts, EventLatency, HandlerMetrics, ImportStatus, LaneMetrics, Latency,
    MetricsSnapshot,
};
pub use crate::retry::{
    DEFAULT_MAX_ATTEMPTS, DEFAULT_MAX_RETRY_DELAY, DEFAULT_RETRY_DELAY, MAX_ATTEMPTS, RetryPolicy,
};
pub use crate::stats::{
    AbandonedDelivery, BusStats, HeldKey, LaneReport, SHUTDOWN_GRACE, ShutdownReport, Stall,
};
pub use crate::subscription::{SubscribeOptions, Subscription, SubscriptionStats};
pub use crate::tap::Tapped;
pub use crate::trace::{Trace, TraceEntry, TraceOutcome};
pub use crate::track::{Completion, Tracker};

/// Building blocks exposed for the benchmarks. Not part of the stable API.
#[doc(hidden)]
pub mod internals {
    pub use crate::retry::Jitter;
    pub use crate::timer::wheel::Wheel;
}

/// The README's examples, run as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

//! Shards: one bounded channel and one worker thread each, and the worker loop.
//!
//! Ground rules: shard `k`'s channel has many senders (publishers, other workers, the timer)
//! and one receiver in normal operation, its worker; at shutdown the bus sweeps what is left
//! in it. A message is one published event with the generation of the handler tables it was
//! matched against (the worker runs its deliveries one at a time), or one failed delivery
//! tried again.
//!
//! Each worker has a `state` word: `IDLE`, the id of the subscription it is running, or
//! `ABANDONED`. The worker stores the id before a handler runs and moves it back `id → IDLE`
//! with a compare-and-swap when the handler returns; at the deadline shutdown moves it
//! `id → ABANDONED` to give up on a delivery that is still running. Whoever wins the swap owns
//! the delivery's outcome, so a delivery is settled exactly once.
//!
//! Work is done in batches of up to [`BATCH`] events. A worker opens a batch by storing an odd
//! value in its `batch` word (`SeqCst`) and closes it with the next even one. `unsubscribe`
//! clears the subscription's `active` flag (`SeqCst`) and then waits for every open batch to
//! close: a delivery in a batch opened later reads the cleared flag (the two `SeqCst` stores
//! and the loads after them are a Dekker pair), and a delivery in the batch it waited for
//! started before `unsubscribe` returned. That is one fence per batch instead of one per
//! delivery. Shutdown stops a worker between deliveries with its `stop` flag.
//!
//! The worker's counters are written only by the worker thread; `settled` is stored last with
//! `Release`, so a reader that `Acquire`s it sees the outcome counters and the handlers'
//! effects.

use std::any::{Any, TypeId};
use std::collections::VecDeque;
use std::marker::PhantomData;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::{Receiver, Sender, TryRecvError, TrySendError};
use crossbeam_utils::CachePadded;
use parking_lot::Mutex;
use smallbox::{SmallBox, smallbox};

use crate::bus::Core;
use crate::config::WaitStrategy;
use crate::dead_letter::{Aftermath, DeadLetter, DeadLetterReason};
use crate::defer::Slot;
use crate::event::{Envelope, Event, EventId, NameId, unix_nanos};
use crate::guard::{Runner, Seam, drop_with};
use crate::handler::{Context, HandlerError, HandlerResult};
use crate::ledger::Gate;
use crate::metrics::{Collect, Recorder, Span};
use crate::registry::{Snapshot, Sub, SubMeta, TypeTable, before};
use crate::retry::Jitter;
use crate::sync::{Arc, AtomicBool, AtomicU64, AtomicUsize, Ordering, fence};
use crate::trace::{TraceEntry, TraceOutcome};
use crate::track::{Done, Settled};

pub(crate) const IDLE: u64 = 0;
pub(crate) const ABANDONED: u64 = u64::MAX;
/// The state word while the worker runs user code outside a handler, at seam `s`:
/// `CALLBACK - s` (subscription ids are far below).
const CALLBACK: u64 = u64::MAX - 1;

/// The state word of a worker running user code at `seam`.
fn callback_word(seam: Seam) -> u64 {
    CALLBACK - seam as u64
}

/// The seam a state word names, if it is a callback's.
pub(crate) fn seam_of(state: u64) -> Option<Seam> {
    let index = CALLBACK.checked_sub(state)?;
    Seam::ALL.get(usize::try_from(index).ok()?).copied()
}

/// The most events a worker handles in one batch.
const BATCH: usize = 64;

/// How long an idle worker with spilled events waits before offering them again.
const SPILL_RETRY: Duration = Duration::from_micros(500);

/// What travels through a shard's channel.
pub(crate) enum Msg {
    Work(Work),
    /// Wakes an idle worker so that it notices it was stopped, or that events were handed to
    /// it.
    Wake,
}

/// Deliveries to run: a published event, a batch of them, or one failed delivery tried again.
pub(crate) enum Work {
    Task(Task),
    Batch(Batch),
    Retry(Retry),
}

impl Work {
    /// How many deliveries it holds.
    pub(crate) fn deliveries(&self) -> usize {
        match self {
            Work::Task(task) => task.deliveries(),
            Work::Batch(batch) => batch.deliveries(),
            Work::Retry(_) => 1,
        }
    }

    /// Settles the tracked deliveries it holds as `how` (batches are never tracked): the
    /// tracker's callback, if that completed it, for the caller to run.
    #[must_use = "a completed tracker's callback must be run"]
    pub(crate) fn track(&self, how: Settled) -> Option<Done> {
        match self {
            Work::Task(task) => task
                .envelope
                .tracker()
                .and_then(|t| t.settle(how, task.deliveries())),
            Work::Batch(_) => None,
            Work::Retry(retry) => retry.track(how),
        }
    }

    /// The deliveries of published events that never ran, each as a first attempt to bury: one
    /// per event and subscription it matched that `snapshot` still has. Its other deliveries
    /// (to subscriptions since removed) are settled as left in its tracker, which may complete
    /// (its callback goes to `done`). Moves the events; runs no user code.
    pub(crate) fn never_ran(self, snapshot: &Snapshot, done: &mut Vec<Done>) -> Vec<Retry> {
        match &self {
            Work::Task(task) => (task.ops.never_ran)(self, snapshot, done),
            Work::Batch(batch) => (batch.ops.never_ran)(self, snapshot, done),
            Work::Retry(_) => Vec::new(),
        }
    }

    /// Whether dropping it runs code of the event's (a `Drop` of its own or of a field).
    pub(crate) fn needs_drop(&self) -> bool {
        match self {
            Work::Task(task) => task.ops.needs_drop,
            Work::Batch(batch) => batch.ops.needs_drop,
            Work::Retry(retry) => retry.ops.needs_drop,
        }
    }

    /// How many published events it holds, and their type (none for a retry).
    pub(crate) fn events(&self) -> Option<(TypeId, NameId, usize)> {
        match self {
            Work::Task(task) => Some(((task.ops.type_id)(), task.envelope.source_id(), 1)),
            Work::Batch(batch) => Some(((batch.ops.type_id)(), batch.source, batch.len())),
            Work::Retry(_) => None,
        }
    }
}

/// What happens to the worker after a delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Flow {
    Continue,
    /// The worker was stopped; it exits.
    Stop,
    /// The delivery outran the shutdown deadline and was given up; the thread exits at once.
    Abandoned,
}

/// Inline room for an event: events of up to three words (a `String`, a `Vec`, three `u64`s)
/// travel without an allocation, and a task stays within 128 bytes, which moves without a call
/// to `memcpy`.
type Payload = SmallBox<dyn Any + Send, [usize; 3]>;

/// The functions that handle one event type, chosen when the event is published.
pub(crate) struct TaskOps {
    run: fn(&mut Worker<'_>, &Task) -> Flow,
    run_batch: fn(&mut Worker<'_>, Batch) -> Flow,
    share: fn(Task) -> Arc<SharedEvent>,
    retry: fn(&mut Worker<'_>, &Retry) -> Flow,
    bury: fn(Retry, DeadLetterReason, u64, &mut dyn Runner) -> DeadLetter,
    subscription: fn(&Arc<dyn Any + Send + Sync>) -> u64,
    meta: fn(&Arc<dyn Any + Send + Sync>) -> &SubMeta,
    type_id: fn() -> TypeId,
    needs_drop: bool,
    never_ran: fn(Work, &Snapshot, &mut Vec<Done>) -> Vec<Retry>,
}

struct OpsOf<E>(PhantomData<E>);

impl<E: Event> OpsOf<E> {
    const OPS: TaskOps = TaskOps {
        run: run_task::<E>,
        run_batch: run_batch::<E>,
        share: share_task::<E>,
        retry: run_retry::<E>,
        bury: bury::<E>,
        subscription: subscription_of::<E>,
        meta: meta_of::<E>,
        type_id: TypeId::of::<E>,
        needs_drop: std::mem::needs_drop::<E>(),
        never_ran: never_ran::<E>,
    };
}

/// A published event on its way to a worker: the envelope, the event, the generation of the
/// handler tables it was matched against and how many subscriptions it matched. `ops` are the
/// event type's functions.
pub(crate) struct Task {
    ops: &'static TaskOps,
    pub(crate) envelope: Envelope,
    pub(crate) generation: u32,
    deliveries: u32,
    payload: Payload,
}

impl Task {
    pub(crate) fn new<E: Event>(
        envelope: Envelope,
        generation: u32,
        deliveries: usize,
        event: E,
    ) -> Task {
        Task {
            ops: &OpsOf::<E>::OPS,
            envelope,
            generation,
            deliveries: u32::try_from(deliveries).expect("fewer than 2^32 subscriptions"),
            payload: smallbox!(event),
        }
    }

    /// How many subscriptions the event matched.
    pub(crate) fn deliveries(&self) -> usize {
        self.deliveries as usize
    }

    /// Takes the event back out of a task that was not accepted.
    pub(crate) fn into_event<E: Event>(self) -> E {
        match self.payload.downcast::<E>() {
            Ok(event) => event.into_inner(),
            Err(_) => unreachable!("a returned task holds the caller's event type"),
        }
    }
}

/// Runs the deliveries of an event of type `E`.
fn run_task<E: Event>(worker: &mut Worker<'_>, task: &Task) -> Flow {
    let Some(event) = task.payload.downcast_ref::<E>() else {
        unreachable!("a task's dispatch function matches its payload")
    };
    run_event(
        worker,
        &task.envelope,
        event,
        task.generation,
        task.deliveries(),
    )
}

/// Runs the `deliveries` deliveries of a published event of type `E`, matched in generation
/// `generation`.
#[inline]
fn run_event<E: Event>(
    worker: &mut Worker<'_>,
    envelope: &Envelope,
    event: &E,
    generation: u32,
    deliveries: usize,
) -> Flow {
    worker.shared.start_event(envelope.id());
    if worker.core.taps.on() {
        let core = worker.core;
        core.tap(envelope, event, worker);
        if worker.detached {
            return Flow::Abandoned;
        }
    }
    let snapshot = worker.snapshot_for(generation);
    let flow = deliver_all(
        worker,
        snapshot.table::<E>(),
        envelope,
        event,
        generation,
        deliveries,
    );
    worker.snapshot = Some(snapshot);
    flow
}

/// Runs the deliveries of one event to the subscriptions of `table` it was matched to.
#[inline]
fn deliver_all<E: Event>(
    worker: &mut Worker<'_>,
    table: Option<&TypeTable<E>>,
    envelope: &Envelope,
    event: &E,
    generation: u32,
    deliveries: usize,
) -> Flow {
    let source = envelope.source_id();
    let mut flow = Flow::Continue;
    let mut remaining = deliveries;
    if let Some(table) = table {
        for sub in table
            .subs
            .iter()
            .filter(|s| s.meta.matched(generation, source))
        {
            debug_assert!(remaining > 0, "more subscriptions than were matched");
            remaining -= 1;
            flow = worker.deliver(envelope, sub, event, remaining, 1, true);
            if flow != Flow::Continue {
                break;
            }
        }
        if flow == Flow::Continue && remaining > 0 {
            // Subscriptions removed since the event was published.
            for tomb in table.removed.iter() {
                if before(generation, tomb.removed_gen) && tomb.meta.matched(generation, source) {
                    tomb.meta.cancelled.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
    if flow == Flow::Continue && remaining > 0 {
        worker.track(envelope, Settled::Cancelled, remaining);
        worker.shared.settle_cancelled(remaining);
        if !worker.later.is_empty() {
            worker.call_back();
            if worker.detached {
                return Flow::Abandoned;
            }
        }
    }
    flow
}

/// Events of type `E` from one source, bound for one shard, in publish order: one channel
/// message for up to [`MAX_GROUP`] events, matched in one generation.
pub(crate) struct Batch {
    ops: &'static TaskOps,
    generation: u32,
    /// Deliveries of each event.
    per_event: u32,
    source: NameId,
    /// A `Vec<(Envelope, E)>`, inline (a `Vec` is three words).
    items: Payload,
    len: u32,
}

/// The most events one batch message carries.
pub(crate) const MAX_GROUP: usize = 64;

impl Batch {
    pub(crate) fn new<E: Event>(
        items: Vec<(Envelope, E)>,
        source: NameId,
        generation: u32,
        per_event: usize,
    ) -> Batch {
        Batch {
            ops: &OpsOf::<E>::OPS,
            generation,
            per_event: u32::try_from(per_event).expect("fewer than 2^32 subscriptions"),
            source,
            len: u32::try_from(items.len()).expect("a batch message holds a few events"),
            items: smallbox!(items),
        }
    }

    /// How many events it holds.
    pub(crate) fn len(&self) -> usize {
        self.len as usize
    }

    /// How many deliveries it holds.
    pub(crate) fn deliveries(&self) -> usize {
        self.len() * self.per_event as usize
    }

    /// Takes the events back out of a batch that was not accepted.
    pub(crate) fn into_events<E: Event>(self) -> impl Iterator<Item = E> {
        match self.items.downcast::<Vec<(Envelope, E)>>() {
            Ok(items) => items.into_inner().into_iter().map(|(_, event)| event),
            Err(_) => unreachable!("a returned batch holds the caller's event type"),
        }
    }
}

/// Runs the events of a batch of type `E`, one after another, each as a task would run.
fn run_batch<E: Event>(worker: &mut Worker<'_>, batch: Batch) -> Flow {
    let per_event = batch.per_event as usize;
    let mut rest = batch.deliveries();
    let Ok(items) = batch.items.downcast::<Vec<(Envelope, E)>>() else {
        unreachable!("a batch's functions match its payload")
    };
    // One snapshot, table and tap check for the whole message: its events share their type,
    // source and generation.
    worker.shared.hold(rest);
    let snapshot = worker.snapshot_for(batch.generation);
    let table = snapshot.table::<E>();
    let tapped = worker.core.taps.on();
    let mut items = items.into_inner().into_iter();
    while let Some((envelope, event)) = items.next() {
        rest -= per_event;
        // Shutdown reads these if it gives up on a delivery of this event.
        worker.rest = rest;
        worker.shared.start_event(envelope.id());
        worker.open_batch();
        let mut flow = Flow::Continue;
        if tapped {
            let core = worker.core;
            core.tap(&envelope, &event, worker);
            if worker.detached {
                flow = Flow::Abandoned;
            }
        }
        if flow == Flow::Continue {
            flow = deliver_all(
                worker,
                table,
                &envelope,
                &event,
                batch.generation,
                per_event,
            );
        }
        worker.count_in_batch();
        if !worker.pending.is_empty() || !worker.deferred.is_empty() {
            let shared = Arc::new(SharedEvent {
                envelope,
                event: Box::new(event),
            });
            worker.arm_deferred(batch.ops, &shared, None, true);
            worker.retry_failed(batch.ops, shared);
        } else if std::mem::needs_drop::<E>() {
            drop_with(worker, event);
        }
        if flow != Flow::Continue {
            worker.rest = 0;
            if flow == Flow::Stop {
                worker.shared.settle_left(rest);
            }
            worker.snapshot = Some(snapshot);
            // The events that did not run (their `Drop` may be user code).
            drop_with(worker, items);
            return flow;
        }
    }
    worker.rest = 0;
    worker.snapshot = Some(snapshot);
    Flow::Continue
}

/// Moves a task's event to the heap, to be shared by the retries of its failed deliveries.
fn share_task<E: Event>(task: Task) -> Arc<SharedEvent> {
    let Ok(event) = task.payload.downcast::<E>() else {
        unreachable!("a task's functions match its payload")
    };
    Arc::new(SharedEvent {
        envelope: task.envelope,
        event: Box::new(event.into_inner()),
    })
}

/// An event whose failed deliveries wait to be tried again.
pub(crate) struct SharedEvent {
    pub(crate) envelope: Envelope,
    event: Box<dyn Any + Send + Sync>,
}

/// The failures of one delivery so far.
#[derive(Clone)]
pub(crate) struct History {
    errors: Vec<String>,
    first_failure: SystemTime,
}

/// One failed delivery, to be tried again: attempt `attempt` of subscription `sub`.
pub(crate) struct Retry {
    ops: &'static TaskOps,
    pub(crate) event: Arc<SharedEvent>,
    /// The `Arc<Sub<E>>` of the subscription.
    sub: Arc<dyn Any + Send + Sync>,
    pub(crate) attempt: u32,
    history: History,
    /// Whether the event's tracker (if any) counts this delivery: not for a redrive.
    tracked: bool,
}

impl Clone for Retry {
    fn clone(&self) -> Self {
        Retry {
            ops: self.ops,
            event: self.event.clone(),
            sub: self.sub.clone(),
            attempt: self.attempt,
            history: self.history.clone(),
            tracked: self.tracked,
        }
    }
}

impl Retry {
    /// Settles the delivery in the event's tracker, if it counts there: the tracker's callback,
    /// if that completed it, for the caller to run.
    #[must_use = "a completed tracker's callback must be run"]
    pub(crate) fn track(&self, how: Settled) -> Option<Done> {
        if !self.tracked {
            return None;
        }
        self.event.envelope.tracker()?.settle(how, 1)
    }

    /// Turns the retry into dead letter `id`; the event is serialized under `runner`'s guard.
    pub(crate) fn bury(
        self,
        reason: DeadLetterReason,
        id: u64,
        runner: &mut dyn Runner,
    ) -> DeadLetter {
        (self.ops.bury)(self, reason, id, runner)
    }

    /// The id of the subscription it goes to.
    pub(crate) fn subscription(&self) -> u64 {
        (self.ops.subscription)(&self.sub)
    }
}

/// Runs a retry of one delivery of an event of type `E`.
fn run_retry<E: Event>(worker: &mut Worker<'_>, retry: &Retry) -> Flow {
    let Ok(sub) = retry.sub.clone().downcast::<Sub<E>>() else {
        unreachable!("a retry's functions match its subscription")
    };
    let Some(event) = retry.event.event.downcast_ref::<E>() else {
        unreachable!("a retry's functions match its event")
    };
    worker.untracked = !retry.tracked;
    worker.shared.start_event(retry.event.envelope.id());
    let flow = worker.deliver(&retry.event.envelope, &sub, event, 0, retry.attempt, false);
    worker.untracked = false;
    if !worker.deferred.is_empty() {
        worker.arm_deferred(retry.ops, &retry.event, Some(&retry.history), retry.tracked);
    }
    let failed = std::mem::take(&mut worker.pending);
    for failure in failed {
        let mut history = retry.history.clone();
        history.errors.push(failure.error);
        worker.follow_up(
            Retry {
                ops: retry.ops,
                event: retry.event.clone(),
                sub: failure.sub,
                attempt: failure.attempt + 1,
                history,
                tracked: retry.tracked,
            },
            failure.then,
        );
    }
    worker.shared.held_retries.store(0, Ordering::Relaxed);
    flow
}

/// Makes a dead letter of a delivery of an event of type `E` that failed for good. The event's
/// `Serialize` runs under `runner`'s guard.
fn bury<E: Event>(
    retry: Retry,
    reason: DeadLetterReason,
    id: u64,
    runner: &mut dyn Runner,
) -> DeadLetter {
    let Ok(sub) = retry.sub.clone().downcast::<Sub<E>>() else {
        unreachable!("a retry's functions match its subscription")
    };
    let Some(event) = retry.event.event.downcast_ref::<E>() else {
        unreachable!("a retry's functions match its event")
    };
    let payload = to_json(event, runner);
    sub.meta.dead_lettered.fetch_add(1, Ordering::Relaxed);
    let attempts = u32::try_from(retry.history.errors.len()).unwrap_or(u32::MAX);
    let redrive = Some(Retry {
        ops: retry.ops,
        event: retry.event.clone(),
        sub: retry.sub,
        attempt: 1,
        history: History {
            errors: Vec::new(),
            first_failure: retry.history.first_failure,
        },
        tracked: false,
    });
    DeadLetter {
        id,
        envelope: retry.event.envelope.clone(),
        event_name: E::NAME,
        event_version: E::VERSION,
        payload,
        subscription: sub.meta.id,
        handler: sub.meta.name.to_string(),
        service: sub.meta.service.as_str(),
        attempts,
        first_failure: retry.history.first_failure,
        last_failure: SystemTime::now(),
        errors: retry.history.errors,
        reason,
        redrive,
        republish: None,
        blocked: None,
    }
}

/// The event as JSON, serialized under `runner`'s guard; when it fails or panics, the error
/// text as a JSON string instead.
pub(crate) fn to_json<E: Event>(event: &E, runner: &mut dyn Runner) -> String {
    let mut json = None;
    runner.run(Seam::Serde, &mut || {
        json = Some(serde_json::to_string(event))
    });
    let error = match json {
        Some(Ok(json)) => return json,
        Some(Err(e)) => format!("the event did not serialize: {e}"),
        None => "the event's Serialize panicked".to_owned(),
    };
    serde_json::to_string(&error).expect("a string serializes")
}

/// See [`Work::never_ran`]: the deliveries of a task or a batch of events of type `E`.
fn never_ran<E: Event>(work: Work, snapshot: &Snapshot, done: &mut Vec<Done>) -> Vec<Retry> {
    let deliveries = work.deliveries();
    let (events, generation, source): (Vec<(Envelope, E)>, u32, NameId) = match work {
        Work::Task(task) => {
            let (generation, source) = (task.generation, task.envelope.source_id());
            let Ok(event) = task.payload.downcast::<E>() else {
                unreachable!("a task's functions match its payload")
            };
            (
                vec![(task.envelope, event.into_inner())],
                generation,
                source,
            )
        }
        Work::Batch(batch) => {
            let (generation, source) = (batch.generation, batch.source);
            let Ok(items) = batch.items.downcast::<Vec<(Envelope, E)>>() else {
                unreachable!("a batch's functions match its payload")
            };
            (items.into_inner(), generation, source)
        }
        Work::Retry(_) => return Vec::new(),
    };
    let subs: Vec<&Arc<Sub<E>>> = snapshot.table::<E>().map_or_else(Vec::new, |table| {
        table
            .subs
            .iter()
            .filter(|s| s.meta.matched(generation, source))
            .collect()
    });
    let now = SystemTime::now();
    let mut retries = Vec::with_capacity(events.len() * subs.len());
    let gone = (deliveries / events.len().max(1)).saturating_sub(subs.len());
    for (envelope, event) in events {
        if gone > 0
            && let Some(d) = envelope
                .tracker()
                .and_then(|t| t.settle(Settled::Left, gone))
        {
            done.push(d);
        }
        let event = Arc::new(SharedEvent {
            envelope,
            event: Box::new(event),
        });
        for sub in &subs {
            retries.push(Retry {
                ops: &OpsOf::<E>::OPS,
                event: event.clone(),
                sub: Arc::clone(sub) as Arc<dyn Any + Send + Sync>,
                attempt: 1,
                history: History {
                    errors: Vec::new(),
                    first_failure: now,
                },
                tracked: true,
            });
        }
    }
    retries
}

/// Rebuilds a delivery of an event of type `E` read back from a dead-letter file: the event
/// decoded from `payload`, to the subscription now named `handler` in service `service`.
pub(crate) fn decode_retry<E: Event>(
    snapshot: &Snapshot,
    envelope: Envelope,
    payload: &str,
    handler: &str,
    service: &str,
) -> Result<Retry, String> {
    let event: E = serde_json::from_str(payload).map_err(|e| {
        format!(
            "the payload does not decode as {} v{}: {e}",
            E::NAME,
            E::VERSION
        )
    })?;
    retry_for(snapshot, envelope, event, handler, service)
}

/// A delivery of `event` to the subscription now named `handler` in service `service`, as a
/// first attempt (a dead letter read back from a file, made ready to redrive).
pub(crate) fn retry_for<E: Event>(
    snapshot: &Snapshot,
    envelope: Envelope,
    event: E,
    handler: &str,
    service: &str,
) -> Result<Retry, String> {
    let sub = snapshot
        .table::<E>()
        .and_then(|t| {
            t.subs.iter().find(|s| {
                &*s.meta.name == handler
                    && s.meta.service.as_str() == service
                    && s.meta.active.load(Ordering::SeqCst)
            })
        })
        .cloned()
        .ok_or_else(|| {
            format!(
                "no subscription of {service} named {handler:?} handles {}",
                E::NAME
            )
        })?;
    Ok(Retry {
        ops: &OpsOf::<E>::OPS,
        event: Arc::new(SharedEvent {
            envelope,
            event: Box::new(event),
        }),
        sub,
        attempt: 1,
        history: History {
            errors: Vec::new(),
            first_failure: SystemTime::now(),
        },
        tracked: false,
    })
}

/// The id of the subscription in an `Arc<Sub<E>>`.
fn subscription_of<E: Event>(sub: &Arc<dyn Any + Send + Sync>) -> u64 {
    meta_of::<E>(sub).id
}

/// The subscription in an `Arc<Sub<E>>`.
fn meta_of<E: Event>(sub: &Arc<dyn Any + Send + Sync>) -> &SubMeta {
    match sub.downcast_ref::<Sub<E>>() {
        Some(sub) => &sub.meta,
        None => unreachable!("a retry's functions match its subscription"),
    }
}

/// Settles a deferred delivery, on whatever thread completed it: as a handler returning
/// `result` would (a failure is tried again on shard `shard`, or dead-lettered). `seed` draws
/// the retry's jitter.
pub(crate) fn settle_deferred(
    core: &Core,
    mut retry: Retry,
    shard: usize,
    result: HandlerResult,
    seed: u64,
    runner: &mut dyn Runner,
) {
    let counts = &core.deferrals;
    let meta = (retry.ops.meta)(&retry.sub);
    let error = match result {
        Ok(()) => {
            meta.deferred_succeeded.fetch_add(1, Ordering::Relaxed);
            counts.succeeded.fetch_add(1, Ordering::Relaxed);
            // Trackers first: once the ledger says settled (`flush`), trackers have completed.
            // Their callbacks run once it is settled.
            let done = retry.track(Settled::Succeeded);
            counts.settle(1);
            if let Some(done) = done {
                done.run(runner);
            }
            drop_with(runner, retry);
            return;
        }
        Err(error) => error,
    };
    meta.record_failure(&error, false);
    counts.failed.fetch_add(1, Ordering::Relaxed);
    if retry.history.errors.is_empty() {
        retry.history.first_failure = SystemTime::now();
    }
    retry.history.errors.push(error.to_string());
    let then = if error.is_permanent() {
        Then::Bury(DeadLetterReason::Permanent)
    } else {
        let draw = Jitter::new(core.worker_seed(core.shards.len()) ^ seed).draw();
        match meta.retry.delay_after(retry.attempt, draw) {
            Some(delay) => Then::Retry(delay),
            None => Then::Bury(DeadLetterReason::RetriesExhausted),
        }
    };
    let reason = match then {
        Then::Retry(delay) => {
            counts.retried.fetch_add(1, Ordering::Relaxed);
            meta.retried.fetch_add(1, Ordering::Relaxed);
            retry.attempt += 1;
            let routed = Routed {
                shard,
                work: Work::Retry(retry),
            };
            match core.wait_on_timer(routed, delay) {
                Ok(()) => return,
                Err(Routed {
                    work: Work::Retry(back),
                    ..
                }) => {
                    retry = back;
                    DeadLetterReason::Shutdown
                }
                Err(_) => unreachable!("a retry was scheduled"),
            }
        }
        Then::Bury(reason) => reason,
    };
    let (done, after) = if core.dead_letters.enabled() {
        let done = retry.track(Settled::DeadLettered);
        let id = core.dead_letters.next_id();
        let after = core.dead_letters.push(retry.bury(reason, id, runner));
        counts.dead_lettered.fetch_add(1, Ordering::Relaxed);
        (done, Some(after))
    } else {
        let done = retry.track(Settled::Discarded);
        counts.discarded.fetch_add(1, Ordering::Relaxed);
        drop_with(runner, retry);
        (done, None)
    };
    counts.settle(1);
    if let Some(done) = done {
        done.run(runner);
    }
    if let Some(after) = after {
        core.dead_letters.call_back(after, runner);
    }
}

/// What becomes of a failed attempt.
#[derive(Debug, Clone, Copy)]
enum Then {
    /// Tried again after the delay.
    Retry(Duration),
    /// Kept in the dead-letter ring.
    Bury(DeadLetterReason),
}

/// A failed attempt whose next step waits until the work is done with the event.
struct Failed {
    sub: Arc<dyn Any + Send + Sync>,
    attempt: u32,
    error: String,
    then: Then,
}

/// Work bound for shard `shard`.
pub(crate) struct Routed {
    pub(crate) shard: usize,
    pub(crate) work: Work,
}

impl crate::timer::Delayed for Routed {
    fn deliveries(&self) -> usize {
        self.work.deliveries()
    }
}

/// Offers work that fell due on the timer to its shard: through its channel, or, when that
/// is full, to the shard's worker, which runs it from its spill queue before it takes new work
/// (the delay has been served). The wake-up reaches the worker if it emptied its channel
/// meanwhile.
pub(crate) fn offer_due(shards: &[Shard], routed: Routed) {
    let shard = &shards[routed.shard];
    match shard.tx.try_send(Msg::Work(routed.work)) {
        Ok(()) => {}
        Err(TrySendError::Full(msg) | TrySendError::Disconnected(msg)) => {
            let Msg::Work(work) = msg else {
                unreachable!("work was sent")
            };
            shard.worker.hand_over(Routed { work, ..routed });
            let _ = shard.tx.try_send(Msg::Wake);
        }
    }
}

/// Counters that only the worker thread writes.
#[derive(Default)]
pub(crate) struct WorkerStats {
    pub(crate) settled: AtomicU64,
    pub(crate) succeeded: AtomicU64,
    pub(crate) failed: AtomicU64,
    pub(crate) panicked: AtomicU64,
    pub(crate) discarded: AtomicU64,
    pub(crate) cancelled: AtomicU64,
    pub(crate) left: AtomicU64,
    pub(crate) retried: AtomicU64,
    pub(crate) dead_lettered: AtomicU64,
}

impl WorkerStats {
    /// The counts now: `settled` first (`Acquire`), so that the outcome counters read after it
    /// are at least as far along.
    pub(crate) fn read(&self) -> WorkerCounts {
        WorkerCounts {
            settled: self.settled.load(Ordering::Acquire),
            succeeded: self.succeeded.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            panicked: self.panicked.load(Ordering::Relaxed),
            discarded: self.discarded.load(Ordering::Relaxed),
            cancelled: self.cancelled.load(Ordering::Relaxed),
            left: self.left.load(Ordering::Relaxed),
            retried: self.retried.load(Ordering::Relaxed),
            dead_lettered: self.dead_lettered.load(Ordering::Relaxed),
        }
    }
}

/// A worker's counts, read at one moment ([`WorkerStats::read`]).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct WorkerCounts {
    pub(crate) settled: u64,
    pub(crate) succeeded: u64,
    pub(crate) failed: u64,
    pub(crate) panicked: u64,
    pub(crate) discarded: u64,
    pub(crate) cancelled: u64,
    pub(crate) left: u64,
    pub(crate) retried: u64,
    pub(crate) dead_lettered: u64,
}

/// Adds to a counter that has one writer: a load and a store, no read-modify-write.
#[inline]
fn bump(counter: &AtomicU64, n: u64) {
    counter.store(counter.load(Ordering::Relaxed) + n, Ordering::Relaxed);
}

/// A worker's state that other threads read (and, at shutdown, take over).
#[derive(Default)]
pub(crate) struct WorkerShared {
    pub(crate) state: AtomicU64,
    /// Odd while a batch is open; each batch moves it on by one.
    pub(crate) batch: AtomicU64,
    /// Set by shutdown: the worker starts no more deliveries.
    pub(crate) stop: AtomicBool,
    /// Deliveries of the current event after the one running.
    pub(crate) remaining: AtomicU64,
    /// Deliveries of the message the worker runs that it has neither settled nor handed on
    /// (to the timer, to a deferral): what shutdown counts as abandoned if it detaches the
    /// worker in a callback.
    pub(crate) holding: AtomicU64,
    pub(crate) event_hi: AtomicU64,
    pub(crate) event_lo: AtomicU64,
    pub(crate) stats: WorkerStats,
    pub(crate) spill: Mutex<VecDeque<Routed>>,
    pub(crate) spill_len: AtomicUsize,
    /// Events the running handler published, with their delay if any.
    pub(crate) outbox: Mutex<Vec<(Routed, Option<Duration>)>>,
    /// Set when the running handler staged events or deferred its outcome.
    pub(crate) staged: AtomicBool,
    /// The running handler's deferral ([`Context::defer`]).
    pub(crate) deferral: Mutex<Option<Arc<Slot>>>,
    /// Failed deliveries of the current event whose retries are not scheduled yet (they are
    /// once the event's other deliveries have run).
    pub(crate) held_retries: AtomicU64,
    /// Requests for the worker's latencies, and its answers.
    pub(crate) collect: Collect,
    /// What publishers waiting on a full shard last saw of the worker's progress, and when
    /// (see [`stalled_for`](WorkerShared::stalled_for)).
    #[cfg(feature = "rayon")]
    watch: AtomicU64,
    #[cfg(feature = "rayon")]
    watch_at: AtomicU64,
}

/// Opens a batch: the word becomes odd. The fence orders the store before the reads of the
/// subscriptions' `active` flags that follow: with the fence in
/// [`wait_for_batches`], a Dekker pair.
#[inline]
pub(crate) fn open_batch_word(batch: &AtomicU64) {
    batch.store(batch.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
    fence(Ordering::SeqCst);
}

/// Closes the open batch: the word becomes even. `Release`: a waiter that sees it closed sees
/// everything its deliveries did.
#[inline]
pub(crate) fn close_batch_word(batch: &AtomicU64) {
    batch.store(batch.load(Ordering::Relaxed) + 1, Ordering::Release);
}

/// The unsubscriber's side: after a subscription's `active` flag was cleared, waits until each
/// of `batches` that is open now has closed (or `stop` says no call starts anywhere any more).
/// A delivery in a batch opened later reads the cleared flag; one in a batch waited for started
/// before this returned.
pub(crate) fn wait_for_batches<'a>(
    batches: impl Iterator<Item = &'a AtomicU64>,
    stop: impl Fn() -> bool,
    mut pause: impl FnMut(),
) {
    fence(Ordering::SeqCst);
    for batch in batches {
        let seen = batch.load(Ordering::Acquire);
        if seen % 2 == 1 {
            while batch.load(Ordering::Acquire) == seen && !stop() {
                pause();
            }
        }
    }
}

impl WorkerShared {
    /// Marks delivery to subscription `id` as running. `Release`: whoever takes the delivery
    /// over with [`abandon`](Self::abandon) sees the stores before it (the event id, the
    /// deliveries remaining).
    #[inline]
    pub(crate) fn begin(&self, id: u64) {
        self.state.store(id, Ordering::Release);
    }

    /// Marks the running delivery to `id` done; `false` when shutdown abandoned it first (and
    /// has reported it).
    #[inline]
    pub(crate) fn finish(&self, id: u64) -> bool {
        self.state
            .compare_exchange(id, IDLE, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// Takes over the running delivery, if there is one, or detaches the worker from the user
    /// code it runs outside a handler: the state word it found (a subscription id, or a
    /// callback's word: see [`seam_of`]). Exactly one of this and [`finish`](Self::finish)
    /// succeeds for a delivery; after it, the worker settles nothing more.
    pub(crate) fn abandon(&self) -> Option<u64> {
        let s = self.state.load(Ordering::Acquire);
        (s != IDLE
            && s != ABANDONED
            && self
                .state
                .compare_exchange(s, ABANDONED, Ordering::AcqRel, Ordering::Acquire)
                .is_ok())
        .then_some(s)
    }

    /// Whether a handler is running.
    pub(crate) fn running(&self) -> bool {
        let state = self.state.load(Ordering::Relaxed);
        !matches!(state, IDLE | ABANDONED) && seam_of(state).is_none()
    }

    /// The worker starts on the deliveries of event `id`.
    #[inline]
    pub(crate) fn start_event(&self, id: EventId) {
        let id = id.as_u128();
        self.event_hi.store((id >> 64) as u64, Ordering::Relaxed);
        self.event_lo.store(id as u64, Ordering::Relaxed);
    }

    /// The event whose deliveries the worker runs (or ran last).
    pub(crate) fn current_event(&self) -> Option<EventId> {
        let hi = self.event_hi.load(Ordering::Relaxed);
        let lo = self.event_lo.load(Ordering::Relaxed);
        EventId::from_u128((u128::from(hi) << 64) | u128::from(lo))
    }

    /// Whether the worker has started no new event and opened or closed no batch for `d`, as
    /// far as callers of this have seen: how a publisher that must not block tells a busy
    /// worker from one that is stuck (perhaps waiting for that publisher's thread pool).
    #[cfg(feature = "rayon")]
    pub(crate) fn stalled_for(&self, d: Duration) -> bool {
        let progress = self.event_lo.load(Ordering::Relaxed)
            ^ self.batch.load(Ordering::Relaxed).rotate_left(32);
        let now = unix_nanos();
        let at = self.watch_at.load(Ordering::Relaxed);
        if at == 0 || self.watch.load(Ordering::Relaxed) != progress {
            self.watch.store(progress, Ordering::Relaxed);
            self.watch_at.store(now, Ordering::Relaxed);
            return false;
        }
        u128::from(now.saturating_sub(at)) >= d.as_nanos()
    }

    /// Settles `n` deliveries as left over (never run).
    pub(crate) fn settle_left(&self, n: usize) {
        bump(&self.stats.left, n as u64);
        self.settle(n);
    }

    /// Settles a failed delivery kept in the dead-letter ring.
    fn settle_dead_lettered(&self) {
        bump(&self.stats.dead_lettered, 1);
        self.settle(1);
    }

    /// Settles a failed delivery that will not be tried again.
    fn settle_discarded(&self) {
        bump(&self.stats.discarded, 1);
        self.settle(1);
    }

    /// Settles `n` deliveries whose subscriptions ended before they ran.
    fn settle_cancelled(&self, n: usize) {
        bump(&self.stats.cancelled, n as u64);
        self.settle(n);
    }

    /// Settles `n` deliveries of the message it runs (see [`hold`](Self::hold)).
    pub(crate) fn settle(&self, n: usize) {
        self.hand_off(n);
        let settled = &self.stats.settled;
        settled.store(
            settled.load(Ordering::Relaxed) + n as u64,
            Ordering::Release,
        );
    }

    /// The worker takes a message of `n` deliveries.
    #[inline]
    pub(crate) fn hold(&self, n: usize) {
        self.holding.store(n as u64, Ordering::Relaxed);
    }

    /// Settles `n` deliveries that were not the running message's but were accepted while it
    /// ran (its handlers' events, when the timer has stopped) as left over.
    pub(crate) fn settle_left_accepted(&self, n: usize) {
        if n > 0 {
            bump(&self.holding, n as u64);
            self.settle_left(n);
        }
    }

    /// `n` deliveries of the message it runs went elsewhere: to the timer, or to a deferral.
    #[inline]
    fn hand_off(&self, n: usize) {
        let holding = &self.holding;
        holding.store(
            holding.load(Ordering::Relaxed).wrapping_sub(n as u64),
            Ordering::Relaxed,
        );
    }

    /// Adds to the spill queue; `Err` gives the event back when the queue is full.
    #[allow(clippy::result_large_err)] // The error is the event itself, handed back.
    pub(crate) fn spill(&self, routed: Routed, capacity: usize) -> Result<(), Routed> {
        let mut spill = self.spill.lock();
        if spill.len() >= capacity {
            return Err(routed);
        }
        spill.push_back(routed);
        self.spill_len.store(spill.len(), Ordering::SeqCst);
        Ok(())
    }

    fn pop_spill(&self) -> Option<Routed> {
        let mut spill = self.spill.lock();
        let routed = spill.pop_front();
        self.spill_len.store(spill.len(), Ordering::Relaxed);
        routed
    }

    /// Appends to the spill queue whatever its length: for events that already waited
    /// elsewhere (they were in memory there too).
    pub(crate) fn hand_over(&self, routed: Routed) {
        let mut spill = self.spill.lock();
        spill.push_back(routed);
        self.spill_len.store(spill.len(), Ordering::SeqCst);
    }

    /// Takes everything spilled (at shutdown, once the worker has stopped).
    pub(crate) fn take_spill(&self) -> VecDeque<Routed> {
        let mut spill = self.spill.lock();
        self.spill_len.store(0, Ordering::Relaxed);
        std::mem::take(&mut *spill)
    }
}

/// One shard: its gate, its channel and its worker's shared state.
pub(crate) struct Shard {
    pub(crate) gate: CachePadded<Gate>,
    pub(crate) tx: Sender<Msg>,
    pub(crate) rx: Receiver<Msg>,
    pub(crate) worker: CachePadded<WorkerShared>,
}

/// The worker thread's own view.
pub(crate) struct Worker<'a> {
    core: &'a Arc<Core>,
    index: usize,
    shared: &'a WorkerShared,
    scratch: Vec<(Routed, Option<Duration>)>,
    /// Whether a batch is open, and how many events it has handled.
    in_batch: bool,
    batch_len: usize,
    /// The worker's copy of the handler tables; `None` only while a task borrows it.
    snapshot: Option<Arc<Snapshot>>,
    /// Failed attempts of the current work that are retried or dead-lettered.
    pending: Vec<Failed>,
    /// Deferred deliveries of the current work, armed once the work is done with its event.
    deferred: Vec<Deferral>,
    jitter: Jitter,
    /// The worker's latencies; `None` with metrics off.
    recorder: Option<Recorder>,
    /// Deliveries of the events after the current one in the batch message being run.
    rest: usize,
    /// Set while a retry runs that the event's tracker does not count (a redrive).
    untracked: bool,
    /// User code to run once the deliveries it concerns are settled: trackers' callbacks, the
    /// dead-letter hook and sink.
    later: Vec<Later>,
    /// Set once shutdown detached the worker (past its deadline, in a handler or a callback):
    /// it settles nothing more and exits.
    detached: bool,
}

/// User code a worker runs once what it concerns is settled.
enum Later {
    Tracker(Done),
    Ring(Box<Aftermath>),
}

impl Runner for Worker<'_> {
    /// Runs user code outside a handler, under the guard and in a window in which shutdown may
    /// detach the worker: the state word names the seam while it runs.
    fn run(&mut self, seam: Seam, f: &mut dyn FnMut()) -> bool {
        let state = &self.shared.state;
        if self.detached || state.load(Ordering::Relaxed) != IDLE {
            return self.core.panics.run(seam, f).is_some();
        }
        let word = callback_word(seam);
        state.store(word, Ordering::Release);
        let ran = self.core.panics.run(seam, f).is_some();
        if state
            .compare_exchange(word, IDLE, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            // Shutdown gave up on the worker while it was in there, and has counted what it
            // held.
            self.detached = true;
        }
        ran
    }
}

enum Outcome {
    Succeeded,
    /// The handler returned `Ok` after [`Context::defer`]: settled when the deferral completes.
    Deferred(Arc<Slot>),
    Cancelled,
    Failed(HandlerError, bool),
}

/// A deferred delivery of the current work, waiting to be armed with its event.
struct Deferral {
    slot: Arc<Slot>,
    sub: Arc<dyn Any + Send + Sync>,
    attempt: u32,
}

impl Worker<'_> {
    /// Opens a batch unless one is open.
    #[inline]
    fn open_batch(&mut self) {
        if !self.in_batch {
            if let Some(recorder) = &mut self.recorder {
                recorder.answer(&self.core.metrics, &self.shared.collect);
            }
            open_batch_word(&self.shared.batch);
            self.in_batch = true;
            self.batch_len = 0;
        }
    }

    /// Closes the open batch, if any.
    #[inline]
    fn close_batch(&mut self) {
        if self.in_batch {
            close_batch_word(&self.shared.batch);
            self.in_batch = false;
        }
    }

    /// Runs work inside a batch, closing the batch when it is full. The caller then hands the
    /// work to [`after`](Self::after).
    #[inline]
    fn run(&mut self, work: &Work) -> Flow {
        self.shared.hold(work.deliveries());
        self.open_batch();
        let flow = match work {
            Work::Task(task) => (task.ops.run)(self, task),
            Work::Retry(retry) => (retry.ops.retry)(self, retry),
            Work::Batch(_) => unreachable!("batch messages are run by `handle`"),
        };
        self.count_in_batch();
        flow
    }

    /// Counts an event run in the open batch, closing it when it is full.
    #[inline]
    fn count_in_batch(&mut self) {
        self.batch_len += 1;
        if self.batch_len >= BATCH {
            self.close_batch();
        }
    }

    /// Runs work taken by value.
    fn handle(&mut self, work: Work) -> Flow {
        if let Work::Batch(batch) = work {
            let flow = (batch.ops.run_batch)(self, batch);
            return self.finished(flow);
        }
        let flow = self.run(&work);
        self.after(work);
        self.finished(flow)
    }

    /// Done with a message: what the worker does next. A worker that shutdown detached (in a
    /// callback, say the event's `Drop`) exits.
    #[inline]
    fn finished(&self, flow: Flow) -> Flow {
        if self.detached {
            return Flow::Abandoned;
        }
        debug_assert!(
            flow != Flow::Continue || self.shared.holding.load(Ordering::Relaxed) == 0,
            "a message's deliveries were all settled or handed on"
        );
        flow
    }

    /// Done with `work`: retries or dead-letters its failed deliveries, moving the event to the
    /// heap to share it between them.
    #[inline]
    fn after(&mut self, work: Work) {
        if self.pending.is_empty() && self.deferred.is_empty() {
            return self.dispose(work);
        }
        let Work::Task(task) = work else {
            unreachable!("retries and batches handle their own failures")
        };
        let ops = task.ops;
        let event = (ops.share)(task);
        self.arm_deferred(ops, &event, None, true);
        self.retry_failed(ops, event);
    }

    /// Hands the deferred deliveries of `event` over to their slots: as first attempts
    /// (`history` `None`) or as retries with their history.
    #[cold]
    fn arm_deferred(
        &mut self,
        ops: &'static TaskOps,
        event: &Arc<SharedEvent>,
        history: Option<&History>,
        tracked: bool,
    ) {
        for deferral in std::mem::take(&mut self.deferred) {
            let retry = Retry {
                ops,
                event: event.clone(),
                sub: deferral.sub,
                attempt: deferral.attempt,
                history: history.cloned().unwrap_or_else(|| History {
                    errors: Vec::new(),
                    first_failure: SystemTime::now(),
                }),
                tracked,
            };
            let core = self.core;
            deferral.slot.arm(core, retry, self.index, self);
        }
    }

    /// Retries or dead-letters the failed deliveries of `event`.
    fn retry_failed(&mut self, ops: &'static TaskOps, event: Arc<SharedEvent>) {
        let failed = std::mem::take(&mut self.pending);
        let now = SystemTime::now();
        for failure in failed {
            self.follow_up(
                Retry {
                    ops,
                    event: event.clone(),
                    sub: failure.sub,
                    attempt: failure.attempt + 1,
                    history: History {
                        errors: vec![failure.error],
                        first_failure: now,
                    },
                    tracked: true,
                },
                failure.then,
            );
        }
        self.shared.held_retries.store(0, Ordering::Relaxed);
        // The last holder of the event may be this one (its `Drop` may be user code).
        drop_with(self, event);
    }

    /// Puts a failed delivery on the timer to be tried again, or in the dead-letter ring.
    /// Once the timer has stopped (shutdown), a retry is dead-lettered.
    fn follow_up(&mut self, retry: Retry, then: Then) {
        if self.detached {
            return self.dispose(Work::Retry(retry));
        }
        let reason = match then {
            Then::Retry(delay) => {
                let routed = Routed {
                    shard: self.index,
                    work: Work::Retry(retry),
                };
                match self.core.wait_on_timer(routed, delay) {
                    Ok(()) => return self.shared.hand_off(1),
                    Err(Routed {
                        work: Work::Retry(retry),
                        ..
                    }) => return self.bury(retry, DeadLetterReason::Shutdown),
                    Err(_) => unreachable!("a retry was scheduled"),
                }
            }
            Then::Bury(reason) => reason,
        };
        self.bury(retry, reason);
    }

    /// Settles a failed delivery in the dead-letter ring (or as discarded when it is off);
    /// then runs the user code that follows (the tracker's callback, the hook, the sink).
    fn bury(&mut self, retry: Retry, reason: DeadLetterReason) {
        let core = self.core;
        let kept = core.dead_letters.enabled();
        if kept {
            let id = core.dead_letters.next_id();
            let tracked = retry.tracked.then(|| retry.event.clone());
            // The event's `Serialize` runs here, in a window.
            let letter = retry.bury(reason, id, self);
            if self.detached {
                // Shutdown counted this delivery while `Serialize` ran.
                return drop_with(&mut &core.panics, (letter, tracked));
            }
            let tracker = tracked.as_ref().and_then(|event| event.envelope.tracker());
            if let Some(done) = tracker.and_then(|t| t.settle(Settled::DeadLettered, 1)) {
                self.later.push(Later::Tracker(done));
            }
            let after = core.dead_letters.push(letter);
            self.shared.settle_dead_lettered();
            self.later.push(Later::Ring(Box::new(after)));
        } else {
            if let Some(done) = retry.track(Settled::Discarded) {
                self.later.push(Later::Tracker(done));
            }
            self.shared.settle_discarded();
            self.dispose(Work::Retry(retry));
        }
        self.call_back();
    }

    /// Takes the worker's snapshot, first refreshing it if it is older than generation `generation`.
    /// The caller puts it back.
    #[inline]
    fn snapshot_for(&mut self, generation: u32) -> Arc<Snapshot> {
        let snapshot = self
            .snapshot
            .take()
            .expect("the snapshot is put back after each task");
        if !before(snapshot.generation, generation) {
            return snapshot;
        }
        self.core.registry.load_full()
    }

    /// Lets go of handler tables that unsubscribe replaced: called before the worker waits.
    fn refresh_snapshot(&mut self) {
        let current = self.core.registry.generation();
        if self
            .snapshot
            .as_ref()
            .is_some_and(|s| s.generation != current)
        {
            self.snapshot = Some(self.core.registry.load_full());
        }
    }

    /// Runs attempt `attempt` of the delivery of `event` to `sub`, with `remaining` deliveries
    /// of the same event after it, and settles it, or asks for a retry. `first`: the delivery
    /// comes with the published event (not a retry or a redrive).
    fn deliver<E: Event>(
        &mut self,
        envelope: &Envelope,
        sub: &Arc<Sub<E>>,
        event: &E,
        remaining: usize,
        attempt: u32,
        first: bool,
    ) -> Flow {
        let shared = self.shared;
        let id = sub.meta.id;
        if self.detached {
            return Flow::Abandoned;
        }
        if shared.stop.load(Ordering::Relaxed) {
            // Trackers first: once the ledger says settled (`flush`), trackers have completed.
            self.track(envelope, Settled::Left, remaining + 1);
            shared.settle_left(remaining + 1);
            self.call_back();
            return Flow::Stop;
        }
        debug_assert!(self.in_batch, "deliveries run inside a batch");
        let outcome = if sub.meta.active.load(Ordering::Relaxed) {
            shared
                .remaining
                .store((remaining + self.rest) as u64, Ordering::Relaxed);
            shared.begin(id);
            let ctx = Context {
                envelope,
                event_name: E::NAME,
                sub: &sub.meta,
                attempt,
                core: self.core,
                worker: shared,
            };
            #[cfg(feature = "tracing")]
            let span = tracing::info_span!(
                "microbus.handle",
                event = E::NAME,
                event_id = %envelope.id(),
                correlation_id = %envelope.correlation_id(),
                service = sub.meta.service.as_str(),
                handler = &*sub.meta.name,
                attempt,
            );
            #[cfg(feature = "tracing")]
            let _entered = span.enter();
            let traced = self
                .core
                .traces
                .on()
                .then(|| (SystemTime::now(), Instant::now()));
            let sampled = match &mut self.recorder {
                Some(recorder) => {
                    recorder.starts(&sub.meta, attempt == 1);
                    recorder.sample().then(unix_nanos)
                }
                None => None,
            };
            let mut result = match catch_unwind(AssertUnwindSafe(|| (sub.handler)(event, &ctx))) {
                Ok(Ok(())) => Outcome::Succeeded,
                Ok(Err(error)) => Outcome::Failed(error, false),
                Err(payload) => Outcome::Failed(HandlerError::from_panic(payload), true),
            };
            if shared.staged.load(Ordering::Relaxed) {
                result = take_deferral(shared, result);
            }
            if let Some(recorder) = &mut self.recorder {
                let succeeded = matches!(result, Outcome::Succeeded);
                if succeeded {
                    recorder.succeeded(&sub.meta);
                }
                if let Some(start) = sampled {
                    let span = Span {
                        start,
                        end: unix_nanos(),
                        first,
                        from_publish: first || attempt > 1,
                        succeeded,
                    };
                    recorder.record(&sub.meta, envelope.id(), span);
                }
            }
            if let Some((started_at, start)) = traced {
                self.record_trace(envelope, E::NAME, sub, attempt, &result, started_at, start);
            }
            if !shared.finish(id) {
                // Shutdown gave up on this delivery and has already reported it, with the
                // failed deliveries of the event held for retry as discarded.
                self.detached = true;
                if let Outcome::Deferred(slot) = &result {
                    slot.void();
                }
                for failed in std::mem::take(&mut self.pending) {
                    self.track(envelope, Settled::Discarded, 1);
                    drop_with(&mut &self.core.panics, failed);
                }
                self.discard_outbox();
                self.track(envelope, Settled::Left, remaining);
                self.track(envelope, Settled::Abandoned, 1);
                self.call_back();
                return Flow::Abandoned;
            }
            result
        } else {
            Outcome::Cancelled
        };
        let stats = &shared.stats;
        let settled = match outcome {
            Outcome::Succeeded => {
                self.flush_outbox();
                bump(&stats.succeeded, 1);
                Settled::Succeeded
            }
            Outcome::Deferred(slot) => {
                // Outstanding until the deferral completes (or shutdown takes it over).
                self.flush_outbox();
                self.core.deferrals.register(&slot);
                shared.hand_off(1);
                self.deferred.push(Deferral {
                    slot,
                    sub: sub.clone(),
                    attempt,
                });
                return Flow::Continue;
            }
            Outcome::Cancelled => {
                sub.meta.cancelled.fetch_add(1, Ordering::Relaxed);
                bump(&stats.cancelled, 1);
                Settled::Cancelled
            }
            Outcome::Failed(error, panicked) => {
                if self.failed(sub, attempt, error, panicked) {
                    return Flow::Continue;
                }
                Settled::Discarded
            }
        };
        self.track(envelope, settled, 1);
        shared.settle(1);
        if !self.later.is_empty() {
            // Settled first, then the tracker's callback.
            self.call_back();
            if self.detached {
                return Flow::Abandoned;
            }
        }
        Flow::Continue
    }

    /// Settles `n` deliveries of `envelope`'s event in its tracker, if it is tracked (and this
    /// is not a redrive).
    #[inline]
    fn track(&mut self, envelope: &Envelope, how: Settled, n: usize) {
        if envelope.has_extra() {
            self.track_slow(envelope, how, n);
        }
    }

    #[cold]
    #[inline(never)]
    fn track_slow(&mut self, envelope: &Envelope, how: Settled, n: usize) {
        if !self.untracked
            && let Some(done) = envelope.tracker().and_then(|t| t.settle(how, n))
        {
            self.later.push(Later::Tracker(done));
        }
    }

    /// Runs the user code waiting for settled deliveries ([`Later`]), each in its window.
    #[cold]
    #[inline(never)]
    fn call_back(&mut self) {
        for later in std::mem::take(&mut self.later) {
            match later {
                Later::Tracker(done) => done.run(self),
                Later::Ring(after) => {
                    let core = self.core;
                    core.dead_letters.call_back(*after, self);
                }
            }
        }
    }

    /// Drops `work` (the event in it: its `Drop` may be user code, run in a window).
    #[inline]
    fn dispose(&mut self, work: Work) {
        if work.needs_drop() {
            self.dispose_slow(work);
        }
    }

    #[cold]
    #[inline(never)]
    fn dispose_slow(&mut self, work: Work) {
        drop_with(self, work);
    }

    /// Adds a handler run to the trace ring.
    #[cold]
    #[allow(clippy::too_many_arguments)]
    fn record_trace<E: Event>(
        &self,
        envelope: &Envelope,
        event: &'static str,
        sub: &Sub<E>,
        attempt: u32,
        result: &Outcome,
        started_at: SystemTime,
        start: Instant,
    ) {
        self.core.traces.record(TraceEntry {
            event_id: envelope.id(),
            event,
            source: envelope.source(),
            correlation_id: envelope.correlation_id(),
            causation_id: envelope.causation_id(),
            service: sub.meta.service.as_str(),
            handler: sub.meta.name.to_string(),
            attempt,
            outcome: match result {
                Outcome::Failed(error, _) => TraceOutcome::Failed(error.to_string()),
                Outcome::Deferred(_) => TraceOutcome::Deferred,
                _ => TraceOutcome::Succeeded,
            },
            started_at,
            took: start.elapsed(),
        });
    }

    /// Counts a failed attempt and decides what becomes of it: `true` when it is retried or
    /// dead-lettered later (still outstanding), `false` when it is discarded now.
    #[cold]
    #[inline(never)]
    fn failed<E: Event>(
        &mut self,
        sub: &Arc<Sub<E>>,
        attempt: u32,
        error: HandlerError,
        panicked: bool,
    ) -> bool {
        let shared = self.shared;
        let stats = &shared.stats;
        if shared.staged.load(Ordering::Relaxed) {
            shared.staged.store(false, Ordering::Relaxed);
            self.discard_outbox();
        }
        sub.meta.record_failure(&error, panicked);
        bump(&stats.failed, 1);
        if panicked {
            bump(&stats.panicked, 1);
        }
        let then = if error.is_permanent() {
            Then::Bury(DeadLetterReason::Permanent)
        } else {
            match sub.meta.retry.delay_after(attempt, self.jitter.draw()) {
                Some(delay) => Then::Retry(delay),
                None => Then::Bury(DeadLetterReason::RetriesExhausted),
            }
        };
        if matches!(then, Then::Retry(_)) || self.core.dead_letters.enabled() {
            // Still outstanding: settled by the attempt that succeeds, or in the ring.
            if let Then::Retry(_) = then {
                bump(&stats.retried, 1);
                sub.meta.retried.fetch_add(1, Ordering::Relaxed);
            }
            self.pending.push(Failed {
                sub: sub.clone(),
                attempt,
                error: error.to_string(),
                then,
            });
            shared
                .held_retries
                .store(self.pending.len() as u64, Ordering::Relaxed);
            return true;
        }
        bump(&stats.discarded, 1);
        false
    }

    /// Sends what the handler staged: it is accepted before its parent delivery is settled.
    #[inline]
    fn flush_outbox(&mut self) {
        if self.shared.staged.load(Ordering::Relaxed) {
            self.send_staged();
        }
    }

    /// Drops what a failed handler staged: those events were never published.
    fn discard_outbox(&mut self) {
        for (routed, _) in self.shared.outbox.lock().drain(..) {
            if let Some((type_id, source, events)) = routed.work.events() {
                let registry = &self.core.registry;
                registry.uncount(type_id, source, events as u64, false);
            }
        }
    }

    fn send_staged(&mut self) {
        self.shared.staged.store(false, Ordering::Relaxed);
        std::mem::swap(&mut *self.shared.outbox.lock(), &mut self.scratch);
        for (routed, delay) in self.scratch.drain(..) {
            let deliveries = routed.work.deliveries();
            self.core.shards[routed.shard].gate.accept(deliveries);
            let left = match delay {
                None => self.core.offer(self.index, routed),
                Some(delay) => match self.core.wait_on_timer(routed, delay) {
                    Ok(()) => 0,
                    Err(_) => deliveries,
                },
            };
            self.shared.settle_left_accepted(left);
        }
    }

    /// Offers spilled events again; runs the ones bound for this worker's own shard.
    fn drain_spill(&mut self) -> Flow {
        let mut attempts = self.shared.spill_len.load(Ordering::Relaxed);
        while attempts > 0 {
            attempts -= 1;
            let Some(routed) = self.shared.pop_spill() else {
                break;
            };
            if routed.shard == self.index {
                let flow = self.handle(routed.work);
                if flow != Flow::Continue {
                    return flow;
                }
                continue;
            }
            match self.core.shards[routed.shard]
                .tx
                .try_send(Msg::Work(routed.work))
            {
                Ok(()) => {}
                Err(TrySendError::Full(msg) | TrySendError::Disconnected(msg)) => {
                    let Msg::Work(work) = msg else {
                        unreachable!("work was sent")
                    };
                    self.shared.hand_over(Routed { work, ..routed });
                }
            }
        }
        Flow::Continue
    }

    fn run_loop(&mut self, rx: &Receiver<Msg>) -> Flow {
        loop {
            // `SeqCst`, paired with the fences in the channel: an event handed over while this
            // worker emptied its channel is seen here, or its wake-up finds room.
            if self.shared.spill_len.load(Ordering::SeqCst) > 0 {
                let flow = self.drain_spill();
                if flow != Flow::Continue {
                    return flow;
                }
            }
            // Matched by reference throughout: a task is 128 bytes, and every move is a copy.
            let mut received = rx.try_recv();
            if let Err(TryRecvError::Empty) = received {
                self.close_batch();
                if let Some(recorder) = &mut self.recorder {
                    recorder.answer(&self.core.metrics, &self.shared.collect);
                }
                self.core.notify_idle();
                self.refresh_snapshot();
                if let WaitStrategy::SpinThenPark(spin) = self.core.config.wait_strategy {
                    received = spin_for(rx, spin);
                }
            }
            if let Err(TryRecvError::Empty) = received {
                received = if self.shared.spill_len.load(Ordering::SeqCst) > 0 {
                    match rx.recv_timeout(SPILL_RETRY) {
                        Err(e) if e.is_timeout() => continue,
                        other => other.map_err(|_| TryRecvError::Disconnected),
                    }
                } else {
                    rx.recv().map_err(|_| TryRecvError::Disconnected)
                };
            }
            match &received {
                Ok(Msg::Work(Work::Batch(_))) => {
                    let Ok(Msg::Work(work)) = received else {
                        unreachable!("matched above")
                    };
                    let flow = self.handle(work);
                    if flow != Flow::Continue {
                        return flow;
                    }
                }
                Ok(Msg::Work(work)) => {
                    let flow = self.run(work);
                    if let Ok(Msg::Work(work)) = received {
                        self.after(work);
                    }
                    let flow = self.finished(flow);
                    if flow != Flow::Continue {
                        return flow;
                    }
                }
                Ok(Msg::Wake) => {
                    if self.shared.stop.load(Ordering::SeqCst) {
                        return Flow::Stop;
                    }
                }
                Err(_) => return Flow::Stop,
            }
        }
    }
}

/// After a handler that staged events or deferred: its deferral, if it made one, turns a
/// success into [`Outcome::Deferred`]; after a failure the deferral is void.
#[cold]
#[inline(never)]
fn take_deferral(shared: &WorkerShared, result: Outcome) -> Outcome {
    match (shared.deferral.lock().take(), result) {
        (Some(slot), Outcome::Succeeded) => Outcome::Deferred(slot),
        (Some(slot), result) => {
            slot.void();
            result
        }
        (None, result) => result,
    }
}

/// Polls `rx` for up to `spin` before the worker parks, busy-waiting between polls.
fn spin_for(rx: &Receiver<Msg>, spin: Duration) -> Result<Msg, TryRecvError> {
    let spin = u64::try_from(spin.as_nanos()).unwrap_or(u64::MAX);
    let deadline = unix_nanos().saturating_add(spin);
    let mut polls = 0u32;
    loop {
        match rx.try_recv() {
            Err(TryRecvError::Empty) => {}
            other => return other,
        }
        std::hint::spin_loop();
        polls = polls.wrapping_add(1);
        if polls.is_multiple_of(64) && unix_nanos() >= deadline {
            return Err(TryRecvError::Empty);
        }
    }
}

/// The body of worker thread `index`.
pub(crate) fn run_worker(core: Arc<Core>, index: usize) {
    let _current = crate::bus::OwnThread::enter(core.id, Some(index));
    let shard = &core.shards[index];
    let mut worker = Worker {
        core: &core,
        index,
        shared: &shard.worker,
        scratch: Vec::new(),
        in_batch: false,
        batch_len: 0,
        snapshot: Some(core.registry.load_full()),
        pending: Vec::new(),
        deferred: Vec::new(),
        jitter: Jitter::new(core.worker_seed(index)),
        recorder: core
            .metrics
            .enabled
            .then(|| Recorder::new(index, core.metrics.sample_every)),
        rest: 0,
        untracked: false,
        later: Vec::new(),
        detached: false,
    };
    worker.run_loop(&shard.rx);
    worker.close_batch();
    if let Some(recorder) = &mut worker.recorder {
        recorder.exit(&core.metrics, &shard.worker.collect);
    } else {
        shard
            .worker
            .collect
            .done
            .store(crate::metrics::EXITED, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_task_fits_in_two_cache_lines() {
        assert!(
            std::mem::size_of::<Msg>() <= 128,
            "{}",
            std::mem::size_of::<Msg>()
        );
        // The configuration's memory ceiling counts a slot as a message and its stamp.
        assert!(
            std::mem::size_of::<Msg>() + std::mem::size_of::<usize>()
                <= crate::config::CHANNEL_SLOT_BYTES
        );
    }
}

/// Loom models of the worker's protocols: `RUSTFLAGS="--cfg loom" cargo test --release --lib loom_`.
#[cfg(all(test, loom))]
mod loom_models {
    use super::*;
    use loom::sync::Arc;
    use loom::thread;

    /// A delivery to subscription 7 runs while shutdown tries to abandon it: exactly one of
    /// the worker (finishing) and shutdown (abandoning) owns the outcome.
    #[test]
    fn loom_a_delivery_is_settled_by_exactly_one_side() {
        loom::model(|| {
            let shared = Arc::new(WorkerShared::default());
            let worker = {
                let shared = shared.clone();
                thread::spawn(move || {
                    shared.remaining.store(3, Ordering::Relaxed);
                    shared.begin(7);
                    shared.finish(7)
                })
            };
            let abandoned = shared.abandon();
            let finished = worker.join().unwrap();
            match abandoned {
                Some(id) => {
                    assert_eq!(id, 7);
                    assert!(!finished, "both sides settled the delivery");
                    // The takeover sees what the worker stored before it began.
                    assert_eq!(shared.remaining.load(Ordering::Relaxed), 3);
                }
                None => assert!(finished, "nobody settled the delivery"),
            }
        });
    }

    /// Unsubscribe against a worker starting a delivery: once `wait_for_batches` returns, no
    /// delivery starts that read the subscription as active.
    #[test]
    fn loom_no_call_starts_after_unsubscribe_returns() {
        loom::model(|| {
            let active = Arc::new(AtomicBool::new(true));
            let batch = Arc::new(AtomicU64::new(0));
            let returned = Arc::new(AtomicBool::new(false));
            let worker = {
                let (active, batch, returned) = (active.clone(), batch.clone(), returned.clone());
                thread::spawn(move || {
                    for _ in 0..2 {
                        open_batch_word(&batch);
                        if active.load(Ordering::Relaxed) {
                            // The handler starts.
                            assert!(
                                !returned.load(Ordering::Relaxed),
                                "a call started after unsubscribe returned"
                            );
                        }
                        close_batch_word(&batch);
                    }
                })
            };
            active.swap(false, Ordering::SeqCst);
            wait_for_batches(std::iter::once(&*batch), || false, thread::yield_now);
            returned.store(true, Ordering::Relaxed);
            worker.join().unwrap();
        });
    }
}

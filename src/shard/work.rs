//! The erased task vocabulary: what a shard's channel carries (a task, a batch, a retry),
//! and how each runs its deliveries for its event type.

use super::*;

/// Deliveries to run: a published event, a batch of them, a published event shared by the
/// lanes it goes to, or one failed delivery tried again.
pub(crate) enum Work {
    Task(Task),
    Batch(Batch),
    Fanout(Fanout),
    Retry(Retry),
}

impl Work {
    /// How many deliveries it holds.
    #[inline]
    pub(crate) fn deliveries(&self) -> usize {
        match self {
            Work::Task(task) => task.deliveries(),
            Work::Batch(batch) => batch.deliveries(),
            Work::Fanout(fanout) => fanout.deliveries(),
            Work::Retry(_) => 1,
        }
    }

    /// Settles the tracked deliveries it holds as `how` (batches are never tracked): the
    /// tracker's callback, if that completed it, for the caller to run.
    #[must_use = "a completed tracker's callback must be run"]
    #[inline]
    pub(crate) fn track(&self, how: Settled) -> Option<Done> {
        match self {
            Work::Task(task) => task
                .envelope
                .tracker()
                .and_then(|t| t.settle(how, task.deliveries())),
            Work::Batch(_) => None,
            Work::Fanout(fanout) => fanout
                .event
                .envelope
                .tracker()
                .and_then(|t| t.settle(how, fanout.deliveries())),
            Work::Retry(retry) => retry.track(how),
        }
    }

    /// The deliveries in lane `lane` of published events that never ran, each as a first
    /// attempt to bury: one per event and subscription of the lane it matched that `snapshot`
    /// still has. Its other deliveries (to subscriptions since removed) are settled as left in
    /// its tracker, which may complete (its callback goes to `done`). Moves the events; runs no
    /// user code.
    pub(crate) fn never_ran(
        self,
        lane: u8,
        snapshot: &Snapshot,
        done: &mut Vec<Done>,
    ) -> Vec<Retry> {
        match &self {
            Work::Task(task) => (task.ops.never_ran)(self, lane, snapshot, done),
            Work::Batch(batch) => (batch.ops.never_ran)(self, lane, snapshot, done),
            Work::Fanout(fanout) => (fanout.ops.never_ran)(self, lane, snapshot, done),
            Work::Retry(_) => Vec::new(),
        }
    }

    /// Whether dropping it runs code of the event's (a `Drop` of its own or of a field).
    #[inline]
    pub(crate) fn needs_drop(&self) -> bool {
        match self {
            Work::Task(task) => task.ops.needs_drop,
            Work::Batch(batch) => batch.ops.needs_drop,
            Work::Fanout(fanout) => fanout.ops.needs_drop,
            Work::Retry(retry) => retry.ops.needs_drop,
        }
    }

    /// How many published events it holds, and their type (none for a retry).
    #[inline]
    pub(crate) fn events(&self) -> Option<(TypeId, NameId, usize)> {
        match self {
            Work::Task(task) => Some(((task.ops.type_id)(), task.envelope.source_id(), 1)),
            Work::Batch(batch) => Some(((batch.ops.type_id)(), batch.source, batch.len())),
            Work::Fanout(fanout) => fanout.counts_publish.then(|| {
                let source = fanout.event.envelope.source_id();
                ((fanout.ops.type_id)(), source, 1)
            }),
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
pub(super) type Payload = SmallBox<dyn Any + Send, [usize; 3]>;

/// The functions that handle one event type, chosen when the event is published.
pub(crate) struct TaskOps {
    pub(super) run: fn(&mut Worker<'_>, &Task) -> Flow,
    pub(super) run_batch: fn(&mut Worker<'_>, Batch) -> Flow,
    pub(super) run_fanout: fn(&mut Worker<'_>, &Fanout) -> Flow,
    pub(super) share: fn(Task) -> Arc<SharedEvent>,
    pub(super) retry: fn(&mut Worker<'_>, &Retry) -> Flow,
    pub(super) bury: fn(Retry, DeadLetterReason, u64, &mut dyn Runner) -> DeadLetter,
    pub(super) subscription: fn(&Arc<dyn Any + Send + Sync>) -> u64,
    pub(super) meta: fn(&Arc<dyn Any + Send + Sync>) -> &SubMeta,
    pub(super) type_id: fn() -> TypeId,
    pub(super) needs_drop: bool,
    pub(super) never_ran: fn(Work, u8, &Snapshot, &mut Vec<Done>) -> Vec<Retry>,
    pub(super) unmatched: fn(&mut Worker<'_>, &Task),
}

pub(super) struct OpsOf<E>(PhantomData<E>);

impl<E: Event> OpsOf<E> {
    pub(super) const OPS: TaskOps = TaskOps {
        run: run_task::<E>,
        run_batch: run_batch::<E>,
        run_fanout: run_fanout::<E>,
        share: share_task::<E>,
        retry: run_retry::<E>,
        bury: bury::<E>,
        subscription: subscription_of::<E>,
        meta: meta_of::<E>,
        type_id: TypeId::of::<E>,
        needs_drop: std::mem::needs_drop::<E>(),
        never_ran: never_ran::<E>,
        unmatched: show_unmatched::<E>,
    };
}

/// The top bit of [`Task::deliveries`]: see [`Task::admitted`] (a task is 128 bytes, with no
/// room for a field more).
const ADMITTED: u32 = 1 << 31;

/// A published event on its way to a worker: the envelope, the event, the generation of the
/// handler tables it was matched against and how many subscriptions it matched. `ops` are the
/// event type's functions.
pub(crate) struct Task {
    pub(super) ops: &'static TaskOps,
    pub(crate) envelope: Envelope,
    pub(crate) generation: u32,
    pub(super) deliveries: u32,
    pub(super) payload: Payload,
}

impl Task {
    /// Its event, if it is an `E`.
    #[cfg(feature = "testing")]
    pub(crate) fn event<E: Event>(&self) -> Option<&E> {
        (*self.payload).downcast_ref::<E>()
    }

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
    #[inline]
    pub(crate) fn deliveries(&self) -> usize {
        (self.deliveries & !ADMITTED) as usize
    }

    /// Marks the task as a publish admitted into a `Shed` lane: a delivery of it that would
    /// park past its subscription's park capacity is shed (see [`admitted`](Self::admitted)).
    /// Retries, delayed events and a handler's events are never marked: they may go past it.
    pub(crate) fn admitted_to_shed_lane(mut self) -> Task {
        self.deliveries |= ADMITTED;
        self
    }

    /// Whether it was [marked](Self::admitted_to_shed_lane).
    #[inline]
    pub(crate) fn admitted(&self) -> bool {
        self.deliveries & ADMITTED != 0
    }

    /// Takes the event back out of a task that was not accepted.
    pub(crate) fn into_event<E: Event>(self) -> E {
        match self.payload.downcast::<E>() {
            Ok(event) => event.into_inner(),
            Err(_) => unreachable!("a returned task holds the caller's event type"),
        }
    }
}

/// A published event whose deliveries go to several lanes: each lane's message shares it.
pub(crate) struct Fanout {
    pub(super) ops: &'static TaskOps,
    pub(crate) event: Arc<SharedEvent>,
    pub(crate) generation: u32,
    /// Its deliveries in the lane this message goes to.
    pub(super) deliveries: u32,
    /// Whether this message carries the event's publish count (one of its messages does).
    pub(super) counts_publish: bool,
    /// A publish admitted into a `Shed` lane (see [`Task::admitted`]).
    pub(crate) admitted: bool,
}

impl Fanout {
    /// The event shared for its lanes, before it is sent to any.
    pub(crate) fn share<E: Event>(envelope: Envelope, event: E) -> Arc<SharedEvent> {
        Arc::new(SharedEvent {
            envelope,
            event: Box::new(event),
        })
    }

    /// The message for one lane: `deliveries` of the event's deliveries.
    pub(crate) fn new<E: Event>(
        event: Arc<SharedEvent>,
        generation: u32,
        deliveries: usize,
        counts_publish: bool,
    ) -> Fanout {
        Fanout {
            ops: &OpsOf::<E>::OPS,
            event,
            generation,
            deliveries: u32::try_from(deliveries).expect("fewer than 2^32 subscriptions"),
            counts_publish,
            admitted: false,
        }
    }

    /// Its deliveries in its lane.
    #[inline]
    pub(crate) fn deliveries(&self) -> usize {
        self.deliveries as usize
    }
}

impl SharedEvent {
    /// Takes the event back out, once no lane holds it (`Err`: one still does).
    pub(crate) fn into_event<E: Event>(this: Arc<SharedEvent>) -> Result<E, Arc<SharedEvent>> {
        let shared = Arc::try_unwrap(this)?;
        match shared.event.downcast::<E>() {
            Ok(event) => Ok(*event),
            Err(_) => unreachable!("a shared event holds the publisher's type"),
        }
    }
}

/// Runs the deliveries in this worker's lane of a shared event of type `E`.
pub(super) fn run_fanout<E: Event>(worker: &mut Worker<'_>, fanout: &Fanout) -> Flow {
    let Some(event) = fanout.event.event.downcast_ref::<E>() else {
        unreachable!("a fanout's functions match its event")
    };
    worker.admitted = fanout.admitted;
    let flow = run_event(
        worker,
        &fanout.event.envelope,
        event,
        fanout.generation,
        fanout.deliveries(),
        // The taps see the event once, with the lane that counts its publish.
        fanout.counts_publish,
    );
    worker.admitted = false;
    flow
}

/// Publishes an event of type `E` that a handler staged and no subscription matched, as the
/// handler succeeds: counted as unmatched and shown to the taps, on the handler's worker
/// (so before the handler's delivery settles, and before a `flush` can return).
fn show_unmatched<E: Event>(worker: &mut Worker<'_>, task: &Task) {
    let Some(event) = task.payload.downcast_ref::<E>() else {
        unreachable!("a task's functions match its payload")
    };
    let core = worker.core;
    core.unmatched.fetch_add(1, Ordering::Relaxed);
    if core.taps.on() {
        core.show_taps(&task.envelope, event, worker);
    }
}

/// Runs the deliveries of an event of type `E`.
pub(super) fn run_task<E: Event>(worker: &mut Worker<'_>, task: &Task) -> Flow {
    let Some(event) = task.payload.downcast_ref::<E>() else {
        unreachable!("a task's dispatch function matches its payload")
    };
    if task.admitted() {
        return run_admitted(
            worker,
            &task.envelope,
            event,
            task.generation,
            task.deliveries(),
        );
    }
    if task.deliveries() == 0 {
        // A handler's delayed event that matched no subscription, now due.
        worker.core.unmatched.fetch_add(1, Ordering::Relaxed);
    }
    run_event(
        worker,
        &task.envelope,
        event,
        task.generation,
        task.deliveries(),
        true,
    )
}

/// [`run_event`] for a publish admitted into a `Shed` lane ([`Task::admitted`]).
#[cold]
#[inline(never)]
fn run_admitted<E: Event>(
    worker: &mut Worker<'_>,
    envelope: &Envelope,
    event: &E,
    generation: u32,
    deliveries: usize,
) -> Flow {
    worker.admitted = true;
    let flow = run_event(worker, envelope, event, generation, deliveries, true);
    worker.admitted = false;
    flow
}

/// Runs the `deliveries` deliveries of a published event of type `E`, matched in generation
/// `generation`, first showing it to the taps if `tap`.
#[inline(always)]
pub(super) fn run_event<E: Event>(
    worker: &mut Worker<'_>,
    envelope: &Envelope,
    event: &E,
    generation: u32,
    deliveries: usize,
    tap: bool,
) -> Flow {
    worker.shared.start_event(envelope.id());
    if tap && worker.core.taps.on() {
        let core = worker.core;
        core.show_taps(envelope, event, worker);
        if worker.detached {
            return Flow::Abandoned;
        }
    }
    let snapshot = worker.snapshot_for(generation);
    let flow = deliver_all(
        worker,
        snapshot.table::<Sub<E>>(),
        envelope,
        event,
        generation,
        deliveries,
        &[],
    );
    worker.snapshot = Some(snapshot);
    flow
}

/// Runs the deliveries of one event to the subscriptions of `table` it was matched to.
#[inline]
pub(super) fn deliver_all<E: Event>(
    worker: &mut Worker<'_>,
    table: Option<&TypeTable<Sub<E>>>,
    envelope: &Envelope,
    event: &E,
    generation: u32,
    deliveries: usize,
    batched: &[u64],
) -> Flow {
    let source = envelope.source_id();
    let lane = worker.lane;
    let mut flow = Flow::Continue;
    let mut remaining = deliveries;
    if let Some(table) = table {
        for sub in table.subs.iter().filter(|s| {
            s.meta.matched(lane, generation, source)
                && (batched.is_empty() || !batched.contains(&s.meta.id))
        }) {
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
                if before(generation, tomb.removed_gen)
                    && tomb.meta.matched(lane, generation, source)
                {
                    tomb.meta.outcomes.cancelled.fetch_add(1, Ordering::Relaxed);
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
    pub(super) ops: &'static TaskOps,
    pub(super) generation: u32,
    /// Deliveries of each event.
    pub(super) per_event: u32,
    pub(super) source: NameId,
    /// A `Vec<(Envelope, E)>`, inline (a `Vec` is three words).
    pub(super) items: Payload,
    pub(super) len: u32,
    /// A publish admitted into a `Shed` lane (see [`Task::admitted`]).
    pub(crate) admitted: bool,
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
            admitted: false,
        }
    }

    /// How many events it holds.
    #[inline]
    pub(crate) fn len(&self) -> usize {
        self.len as usize
    }

    /// How many deliveries it holds.
    #[inline]
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
pub(super) fn run_batch<E: Event>(worker: &mut Worker<'_>, batch: Batch) -> Flow {
    let per_event = batch.per_event as usize;
    let mut rest = batch.deliveries();
    let Ok(items) = batch.items.downcast::<Vec<(Envelope, E)>>() else {
        unreachable!("a batch's functions match its payload")
    };
    // One snapshot, table and tap check for the whole message: its events share their type,
    // source and generation.
    worker.shared.hold(rest);
    worker.admitted = batch.admitted;
    let snapshot = worker.snapshot_for(batch.generation);
    let table = snapshot.table::<Sub<E>>();
    let tapped = worker.core.taps.on();
    let items = items.into_inner();
    // Batch subscriptions first: one call each for all the events, which settles their
    // deliveries to it, or leaves them to run one by one below.
    let mut batched: Vec<u64> = Vec::new();
    if let Some(table) = table {
        let lane = worker.lane;
        for sub in table
            .subs
            .iter()
            .filter(|s| s.batch.is_some() && s.meta.matched(lane, batch.generation, batch.source))
        {
            match worker.deliver_batch(sub, &items, per_event, rest) {
                None => {}
                Some(Flow::Continue) => {
                    batched.push(sub.meta.id);
                    rest -= items.len();
                }
                Some(flow) => {
                    worker.admitted = false;
                    worker.snapshot = Some(snapshot);
                    drop_with(worker, items);
                    return flow;
                }
            }
        }
    }
    let per_event = per_event - batched.len();
    if per_event == 0 && !tapped {
        // Batch subscriptions took every delivery: nothing runs event by event.
        worker.admitted = false;
        worker.snapshot = Some(snapshot);
        // The events' and envelopes' `Drop` (a tracker's too) may be user code.
        recycle(worker, items);
        return Flow::Continue;
    }
    let mut items = items;
    let mut events = items.drain(..);
    while let Some((envelope, event)) = events.next() {
        rest -= per_event;
        // Shutdown reads these if it gives up on a delivery of this event.
        worker.rest = rest;
        worker.shared.start_event(envelope.id());
        worker.open_batch();
        let mut flow = Flow::Continue;
        if tapped {
            let core = worker.core;
            core.show_taps(&envelope, &event, worker);
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
                &batched,
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
            worker.admitted = false;
            if flow == Flow::Stop {
                worker.shared.settle_left(rest);
            }
            worker.snapshot = Some(snapshot);
            // The events that did not run (their `Drop` may be user code).
            drop_with(worker, events);
            return flow;
        }
    }
    drop(events);
    worker.rest = 0;
    worker.admitted = false;
    worker.snapshot = Some(snapshot);
    recycle(worker, items);
    Flow::Continue
}

/// Moves a task's event to the heap, to be shared by the retries of its failed deliveries.
pub(super) fn share_task<E: Event>(task: Task) -> Arc<SharedEvent> {
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
    pub(super) event: Box<dyn Any + Send + Sync>,
}

/// The failures of one delivery so far.
#[derive(Clone)]
pub(crate) struct History {
    pub(super) errors: Vec<String>,
    pub(super) first_failure: SystemTime,
}

/// One failed delivery, to be tried again: attempt `attempt` of subscription `sub`.
pub(crate) struct Retry {
    pub(super) ops: &'static TaskOps,
    pub(crate) event: Arc<SharedEvent>,
    /// The `Arc<Sub<E>>` of the subscription.
    pub(super) sub: Arc<dyn Any + Send + Sync>,
    pub(crate) attempt: u32,
    pub(super) history: History,
    /// Whether the event's tracker (if any) counts this delivery: not for a redrive.
    pub(super) tracked: bool,
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
    #[inline]
    pub(crate) fn track(&self, how: Settled) -> Option<Done> {
        if !self.tracked {
            return None;
        }
        self.event.envelope.tracker()?.settle(how, 1)
    }

    /// The retry, no longer counted by the event's tracker (which was settled for it).
    pub(crate) fn untracked(mut self) -> Retry {
        self.tracked = false;
        self
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
    #[inline]
    pub(crate) fn subscription(&self) -> u64 {
        (self.ops.subscription)(&self.sub)
    }
}

/// Runs a retry of one delivery of an event of type `E`.
pub(super) fn run_retry<E: Event>(worker: &mut Worker<'_>, retry: &Retry) -> Flow {
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
        let parks = matches!(
            failure.then,
            Then::Park | Then::Repark | Then::Shed | Then::Wait
        );
        let mut history = retry.history.clone();
        if !parks {
            if history.errors.is_empty() {
                history.first_failure = worker.core.clock.system_time();
            }
            history.errors.push(failure.error);
        }
        worker.follow_up(
            Retry {
                ops: retry.ops,
                event: retry.event.clone(),
                sub: failure.sub,
                attempt: failure.attempt + u32::from(!parks),
                history,
                tracked: retry.tracked,
            },
            failure.then,
        );
    }
    worker.shared.held_retries.store(0, Ordering::Relaxed);
    flow
}

/// The id of the subscription in an `Arc<Sub<E>>`.
pub(super) fn subscription_of<E: Event>(sub: &Arc<dyn Any + Send + Sync>) -> u64 {
    meta_of::<E>(sub).id
}

/// The subscription in an `Arc<Sub<E>>`.
pub(super) fn meta_of<E: Event>(sub: &Arc<dyn Any + Send + Sync>) -> &SubMeta {
    match sub.downcast_ref::<Sub<E>>() {
        Some(sub) => &sub.meta,
        None => unreachable!("a retry's functions match its subscription"),
    }
}

//! The publish paths: route, stamp, enter the shard's gate, send (or wait, spill, or go to
//! the timer), and on refusal refund and hand the event back.

use super::*;
use crate::registry::Route;

/// How often a publisher waiting for room for an event another lane has taken checks whether
/// the bus has stopped.
const ACCEPTED_RETRY: Duration = Duration::from_millis(10);

/// The most shards a lane can have for a batch publish to group its events on the stack.
const INLINE_GROUPS: usize = 8;

/// How long a publisher on a rayon worker thread waits for a full shard whose worker makes no
/// progress before it uses the shard's overflow queue.
#[cfg(feature = "rayon")]
pub(super) const RAYON_STALL: Duration = Duration::from_millis(100);

/// How deep publishers on one rayon thread nest other work of their pool while they wait: the
/// work they run may publish and wait in turn, each level on the same stack. One level is
/// enough to run a handler's job that waits in the pool's queue; deeper levels were measured
/// to help no further (a parallel iterator's own jobs come first and keep coming).
#[cfg(feature = "rayon")]
pub(super) const RAYON_NESTING: u32 = 1;

#[cfg(feature = "rayon")]
thread_local! {
    /// How many publishers on this rayon thread are running other work of its pool.
    static NESTED: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// Runs one unit of other work of the current rayon pool, unless this thread already runs
/// [`RAYON_NESTING`] of them for waiting publishers (each nests on its stack). Whether it ran one.
#[cfg(feature = "rayon")]
pub(super) fn run_other_rayon_work() -> bool {
    struct Nested;
    impl Drop for Nested {
        fn drop(&mut self) {
            NESTED.set(NESTED.get() - 1);
        }
    }
    if NESTED.get() >= RAYON_NESTING {
        return false;
    }
    NESTED.set(NESTED.get() + 1);
    let _nested = Nested;
    rayon::yield_now() == Some(rayon::Yield::Executed)
}

/// The publishes an admission counted: `events` events of one type from one source (none
/// for a redrive, which is not a publish).
#[derive(Clone, Copy)]
pub(super) struct Counted {
    type_id: TypeId,
    source: NameId,
    events: u64,
}

impl Counted {
    #[inline]
    pub(super) fn of<E: Event>(source: NameId, events: usize) -> Counted {
        Counted {
            type_id: TypeId::of::<E>(),
            source,
            events: events as u64,
        }
    }

    /// A redrive of an event from `source`: deliveries, no publish.
    pub(super) fn redrive(source: NameId) -> Counted {
        Counted {
            type_id: TypeId::of::<()>(),
            source,
            events: 0,
        }
    }
}

impl Core {
    /// The first half of the accept/refund protocol, the same for every publish path: lets
    /// `deliveries` in at shard `index`'s gate. `false` when the gate is closed (the bus is
    /// shutting down): nothing was let in, and the caller takes back the publishes it counted
    /// with [`uncount`](Self::uncount).
    #[inline]
    #[must_use = "an admission is either sent or refunded"]
    pub(super) fn admit(&self, index: usize, deliveries: usize) -> bool {
        self.shards[index].gate.enter(deliveries)
    }

    /// The second half: gives back an admission whose work was not sent (no room, or the bus
    /// is shutting down): its deliveries at the gate, and the publishes `counted`.
    #[cold]
    pub(super) fn refund(&self, index: usize, deliveries: usize, counted: Counted) {
        self.shards[index].gate.refund(deliveries);
        self.uncount(counted);
    }

    /// Takes back publishes counted for events that were not accepted after all.
    #[cold]
    pub(super) fn uncount(&self, counted: Counted) {
        if counted.events > 0 {
            self.registry
                .uncount(counted.type_id, counted.source, counted.events, false);
        }
    }

    /// Counts `events` handed back to their publisher: a refusal when the bus is shutting
    /// down (a full shard's event is not refused, only not published yet).
    #[cold]
    pub(super) fn refuse(&self, why: Refusal, events: usize) {
        if why == Refusal::Shutdown {
            self.refused.fetch_add(events as u64, Ordering::Relaxed);
        }
    }

    /// Sends a message to shard `index`: at once when it has room, else as `mode` says.
    #[inline]
    #[allow(clippy::result_large_err)] // The error is the message itself, handed back.
    pub(super) fn send(&self, index: usize, msg: Msg, mode: Mode) -> Result<(), (Refusal, Msg)> {
        match self.shards[index].tx.try_send(msg) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(msg)) => self.send_full_timed(index, msg, mode),
            Err(TrySendError::Disconnected(msg)) => Err((Refusal::Shutdown, msg)),
        }
    }

    /// Publishes one event from outside a handler's outbox: routes and stamps it, then
    /// [`submit`](Self::submit)s it to its lane (or [`fan_out`](Self::fan_out) to its lanes).
    /// Returns its id; a refusal is counted.
    pub(crate) fn publish<E: Event>(
        &self,
        source: NameId,
        event: E,
        stamp: Stamp,
        delay: Option<Duration>,
        mode: Mode,
    ) -> Result<EventId, (Refusal, E)> {
        self.publish_one(source, event, stamp, delay, mode)
            .map_err(|(why, event)| {
                self.refuse(why, 1);
                (why, event)
            })
    }

    /// [`publish`](Self::publish), without counting a refusal.
    #[inline(always)]
    pub(super) fn publish_one<E: Event>(
        &self,
        source: NameId,
        event: E,
        stamp: Stamp,
        delay: Option<Duration>,
        mode: Mode,
    ) -> Result<EventId, (Refusal, E)> {
        let route = self.registry.route::<E>(source, 1);
        if self.parks_full.load(Ordering::Relaxed) > 0
            && let Err(why) = self.wait_for_park_room::<E>(source, mode, &|| false)
        {
            self.uncount(Counted::of::<E>(source, 1));
            return Err((why, event));
        }
        let envelope = stamp.envelope(&self.clock, source);
        let id = envelope.id();
        if route.deliveries == 0 {
            return match delay {
                None => self.publish_unmatched(source, event, envelope),
                Some(delay) => self.publish_unmatched_later(source, event, envelope, delay),
            };
        }
        let (generation, deliveries) = (route.generation, route.deliveries);
        match (route.lanes, delay) {
            // The common case, made on its own: the default lane only (which blocks), now.
            (1, None) => self.submit(0, envelope, generation, deliveries, event, None, mode)?,
            _ => self.publish_elsewhere(&route, envelope, event, delay, mode)?,
        }
        Ok(id)
    }

    /// Holds a publish of an event of type `E` from `source` back while a subscription it
    /// matches in a `Block` lane has as many deliveries parked as it may have: waits (a
    /// blocking publish), or refuses (`Full`, or `Timeout` at the deadline). A handler's
    /// thread and a rayon thread never wait here: what they publish is accepted work, which
    /// may park past the bound.
    #[cold]
    #[inline(never)]
    fn wait_for_park_room<E: Event>(
        &self,
        source: NameId,
        mode: Mode,
        give_up: &dyn Fn() -> bool,
    ) -> Result<(), Refusal> {
        if OwnThread::worker_of(self.id).is_some() || matches!(mode, Mode::Accepted) {
            return Ok(());
        }
        #[cfg(feature = "rayon")]
        if rayon::current_thread_index().is_some() {
            return Ok(());
        }
        let mut step = 0;
        loop {
            let snapshot = self.registry.load_full();
            let full = snapshot.table::<Sub<E>>().is_some_and(|table| {
                table.subs.iter().any(|sub| {
                    let meta = &sub.meta;
                    meta.matches(source)
                        && meta.park_full()
                        && self.lanes[meta.lane as usize].backpressure == Backpressure::Block
                })
            });
            if !full {
                return Ok(());
            }
            if self.is_closing() || give_up() {
                return Err(Refusal::Shutdown);
            }
            match mode {
                Mode::Try => return Err(Refusal::Full),
                Mode::Until(deadline) if Instant::now() >= deadline => {
                    return Err(Refusal::Timeout);
                }
                _ => backoff(&mut step),
            }
        }
    }

    /// A publish to another lane than the default one, to several, or with a delay.
    #[inline(never)]
    fn publish_elsewhere<E: Event>(
        &self,
        route: &Route,
        envelope: Envelope,
        event: E,
        delay: Option<Duration>,
        mode: Mode,
    ) -> Result<(), (Refusal, E)> {
        let (generation, deliveries) = (route.generation, route.deliveries);
        match route.single() {
            Some(lane) => self.submit(lane, envelope, generation, deliveries, event, delay, mode),
            None => self.fan_out(route, envelope, event, delay, mode),
        }
    }

    /// Admits one routed, stamped event (its publish counted already) at its shard of lane
    /// `lane` and sends it there — or, with a delay, to the timer; a refusal refunds the
    /// admission, takes back the publish and hands the event back. A full shard of a `Shed`
    /// lane sheds it.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn submit<E: Event>(
        &self,
        lane: usize,
        envelope: Envelope,
        generation: u32,
        deliveries: usize,
        event: E,
        delay: Option<Duration>,
        mode: Mode,
    ) -> Result<(), (Refusal, E)> {
        if let Some(t) = envelope.tracker() {
            // With deliveries to come, arming completes nothing.
            let _none = t.arm(envelope.id(), deliveries);
        }
        let index = match lane {
            // The default lane's shards come first.
            0 => super::core::shard_among(self.default_workers, &envelope),
            _ => self.lanes[lane].shard_for(&envelope),
        };
        let counted = || Counted::of::<E>(envelope.source_id(), 1);
        if !self.admit(index, deliveries) {
            self.uncount(counted());
            return Err((Refusal::Shutdown, event));
        }
        let source = envelope.source_id();
        // The message is made where it is sent, so that a task is moved once (a closure
        // called in three arms is not inlined).
        let sent = match delay {
            // The default lane always blocks.
            None if lane == 0 || self.lanes[lane].backpressure == Backpressure::Block => match self
                .shards[index]
                .tx
                .try_send(Msg::Work(Work::Task(Task::new(
                    envelope, generation, deliveries, event,
                )))) {
                Ok(()) => return Ok(()),
                Err(TrySendError::Full(msg)) => self.send_full_timed(index, msg, mode),
                Err(TrySendError::Disconnected(msg)) => Err((Refusal::Shutdown, msg)),
            }
            .map_err(|(why, msg)| (why, msg.into_work())),
            None => {
                let task = Task::new(envelope, generation, deliveries, event);
                self.send_or_shed(index, Work::Task(task.admitted_to_shed_lane()))
            }
            Some(delay) => self
                .timer
                .schedule(
                    Routed {
                        shard: index,
                        work: Work::Task(Task::new(envelope, generation, deliveries, event)),
                    },
                    delay,
                )
                .map_err(|routed| (Refusal::Shutdown, routed.work)),
        };
        sent.map_err(|(why, work)| {
            self.refund(index, deliveries, Counted::of::<E>(source, 1));
            let Work::Task(task) = work else {
                unreachable!("a single publish sends a task")
            };
            (why, task.into_event())
        })
    }

    /// Publishes events of one type as batch messages (see [`in_groups`](Self::in_groups));
    /// an event with a delay goes to the timer on its own. Waits while a shard is full. `Err`
    /// hands back every event that was not accepted (the bus is shutting down).
    pub(crate) fn publish_batch<E: Event>(
        &self,
        source: NameId,
        items: impl IntoIterator<Item = (E, Stamp, Option<Duration>)>,
    ) -> Result<(), (Refusal, Vec<E>)> {
        self.publish_batch_or_give_up(source, items, &|| false)
    }

    /// [`publish_batch`](Self::publish_batch), giving up (`Shutdown`) while held back by a
    /// full park once `give_up` says so (a bridge that stops).
    pub(crate) fn publish_batch_or_give_up<E: Event>(
        &self,
        source: NameId,
        items: impl IntoIterator<Item = (E, Stamp, Option<Duration>)>,
        give_up: &dyn Fn() -> bool,
    ) -> Result<(), (Refusal, Vec<E>)> {
        let route = self.registry.route::<E>(source, 0);
        let (generation, deliveries) = (route.generation, route.deliveries);
        let held = match self.parks_full.load(Ordering::Relaxed) {
            0 => Ok(()),
            _ => self.wait_for_park_room::<E>(source, Mode::Block, give_up),
        };
        let result = if let Err(why) = held {
            Err((why, items.into_iter().map(|(event, ..)| event).collect()))
        } else if deliveries == 0 && self.is_closing() {
            let back = items.into_iter().map(|(event, ..)| event).collect();
            Err((Refusal::Shutdown, back))
        } else if let Some(lane) = route.single().or((deliveries == 0).then_some(0)) {
            self.in_groups(
                source,
                lane,
                items,
                deliveries,
                |index, group| self.send_group(index, group, source, generation, deliveries),
                |envelope, event, delay| {
                    self.registry.count::<E>(source, 1, false);
                    self.submit(
                        lane,
                        envelope,
                        generation,
                        deliveries,
                        event,
                        Some(delay),
                        Mode::Block,
                    )
                },
            )
        } else {
            // Subscriptions in several lanes: each event is shared by its lanes.
            one_by_one(items, |event, stamp, delay| {
                self.publish_one(source, event, stamp, delay, Mode::Block)
                    .map(|_| ())
            })
        };
        if let Err((why, back)) = &result {
            self.refuse(*why, back.len());
        }
        result
    }

    /// Prepares a batch published by a handler: grouped as [`publish_batch`](Self::publish_batch)
    /// does, handed to `stage` (with the delay of an event that has one), and sent when the
    /// handler succeeds.
    pub(crate) fn prepare_batch<E: Event>(
        &self,
        source: NameId,
        items: impl IntoIterator<Item = (E, Stamp, Option<Duration>)>,
        mut stage: impl FnMut(Routed, Option<Duration>),
    ) -> Result<(), Vec<E>> {
        if self.stopped.load(Ordering::SeqCst) {
            return Err(items.into_iter().map(|(event, ..)| event).collect());
        }
        let route = self.registry.route::<E>(source, 0);
        let (generation, deliveries) = (route.generation, route.deliveries);
        let Some(lane) = route.single().filter(|_| deliveries > 0) else {
            // Subscriptions in several lanes: each event is shared by its lanes. None: each
            // is staged to be counted as unmatched if the handler succeeds.
            return one_by_one(items, |event, stamp, delay| {
                self.prepare(source, event, stamp, |routed| stage(routed, delay))
                    .map(|_| ())
                    .map_err(|event| (Refusal::Shutdown, event))
            })
            .map_err(|(_, back)| back);
        };
        let stage = std::cell::RefCell::new(&mut stage);
        self.in_groups(
            source,
            lane,
            items,
            deliveries,
            |index, group| {
                self.registry.count::<E>(source, group.len() as u64, false);
                let batch = Batch::new(group, source, generation, deliveries);
                (stage.borrow_mut())(
                    Routed {
                        shard: index,
                        work: Work::Batch(batch),
                    },
                    None,
                );
                Ok(())
            },
            |envelope, event, delay| {
                self.registry.count::<E>(source, 1, false);
                let shard = self.lanes[lane].shard_for(&envelope);
                let task = Task::new(envelope, generation, deliveries, event);
                (stage.borrow_mut())(
                    Routed {
                        shard,
                        work: Work::Task(task),
                    },
                    Some(delay),
                );
                Ok(())
            },
        )
        .map_err(|(_, back)| back)
    }

    /// Stamps `items` (an envelope given is kept, its tracker armed) and groups them per
    /// shard — by key; unkeyed events fill one shard's group, then the next one's — and hands
    /// each group of up to [`MAX_GROUP`] events, in publish order, to `emit`: as soon as it is
    /// full, and the rest at the end. An event with a delay goes to `later` on its own.
    /// Events that match no subscription (`deliveries` is 0) are counted, not grouped. At the
    /// first `Err` it stops and returns every event not handed over, with those `emit` or
    /// `later` gave back.
    pub(super) fn in_groups<E: Event>(
        &self,
        source: NameId,
        lane: usize,
        items: impl IntoIterator<Item = (E, Stamp, Option<Duration>)>,
        deliveries: usize,
        mut emit: impl FnMut(usize, Vec<(Envelope, E)>) -> Result<(), (Refusal, Vec<E>)>,
        mut later: impl FnMut(Envelope, E, Duration) -> Result<(), (Refusal, E)>,
    ) -> Result<(), (Refusal, Vec<E>)> {
        let mut items = items.into_iter();
        if deliveries == 0 {
            for (event, stamp, _) in items {
                self.registry.count::<E>(source, 1, true);
                self.count_unmatched(&event, stamp.envelope(&self.clock, source));
            }
            return Ok(());
        }
        let LaneState { start, workers, .. } = self.lanes[lane];
        // One group per shard of the lane: on the stack for lanes of up to `INLINE_GROUPS`
        // workers (an empty `Vec` allocates nothing; a group takes a spare buffer when it
        // gets its first event).
        let mut inline: [Vec<(Envelope, E)>; INLINE_GROUPS] = Default::default();
        let mut spilled: Vec<Vec<(Envelope, E)>>;
        let groups: &mut [Vec<(Envelope, E)>] = if workers <= INLINE_GROUPS {
            &mut inline[..workers]
        } else {
            spilled = (0..workers).map(|_| Vec::new()).collect();
            &mut spilled
        };
        let mut unkeyed = next_in_turn(workers);
        let mut failed = None;
        let mut now = 0;
        for (i, (event, stamp, delay)) in items.by_ref().enumerate() {
            let envelope = match stamp {
                Stamp::New(options) => {
                    // The clock is read once per message's worth of events: ids stay unique
                    // and ordered by their sequence numbers.
                    if now == 0 || i % MAX_GROUP == 0 {
                        now = self.clock.unix_nanos();
                    }
                    Envelope::stamp_at(now, source, options)
                }
                Stamp::Given(envelope) => {
                    if let Some(t) = envelope.tracker() {
                        // With deliveries to come, arming completes nothing.
                        let _none = t.arm(envelope.id(), deliveries);
                    }
                    envelope
                }
            };
            if let Some(delay) = delay {
                if let Err((why, event)) = later(envelope, event, delay) {
                    failed = Some((why, vec![event]));
                    break;
                }
                continue;
            }
            let index = match envelope.key() {
                Some(key) => key.shard(workers),
                None => unkeyed,
            };
            let group = &mut groups[index];
            if group.capacity() == 0 {
                *group = self.shards[start + index].spares.take();
            }
            group.push((envelope, event));
            if group.len() == MAX_GROUP {
                if index == unkeyed {
                    unkeyed = (unkeyed + 1) % workers;
                }
                if let Err(back) = emit(start + index, std::mem::take(group)) {
                    failed = Some(back);
                    break;
                }
            }
        }
        let mut groups = groups.iter_mut().map(std::mem::take).enumerate();
        if failed.is_none() {
            failed = groups
                .by_ref()
                .filter(|(_, group)| !group.is_empty())
                .find_map(|(index, group)| emit(start + index, group).err());
        }
        let Some((why, mut back)) = failed else {
            return Ok(());
        };
        back.extend(groups.flat_map(|(_, group)| group).map(|(_, event)| event));
        back.extend(items.map(|(event, ..)| event));
        Err((why, back))
    }

    /// Sends one group of a batch to shard `index`: counted, admitted, sent; refunded when
    /// refused.
    pub(super) fn send_group<E: Event>(
        &self,
        index: usize,
        group: Vec<(Envelope, E)>,
        source: NameId,
        generation: u32,
        per_event: usize,
    ) -> Result<(), (Refusal, Vec<E>)> {
        let events = group.len();
        let batch = Batch::new(group, source, generation, per_event);
        self.registry.count::<E>(source, events as u64, false);
        let deliveries = events * per_event;
        if !self.admit(index, deliveries) {
            self.uncount(Counted::of::<E>(source, events));
            return Err((Refusal::Shutdown, batch.into_events().collect()));
        }
        let shed_lane = self.lane_of(index).backpressure == Backpressure::Shed;
        let mut batch = batch;
        batch.admitted = shed_lane;
        let work = Work::Batch(batch);
        let sent = if shed_lane {
            self.send_or_shed(index, work)
        } else {
            self.send(index, Msg::Work(work), Mode::Block)
                .map_err(|(why, msg)| (why, msg.into_work()))
        };
        sent.map_err(|(why, work)| {
            self.refund(index, deliveries, Counted::of::<E>(source, events));
            let Work::Batch(batch) = work else {
                unreachable!("a batch was sent")
            };
            (why, batch.into_events().collect())
        })
    }

    /// [`send_full`](Self::send_full), adding the time it waited to its lane's.
    #[cold]
    #[inline(never)]
    #[allow(clippy::result_large_err)] // The error is the message itself, handed back.
    fn send_full_timed(&self, index: usize, msg: Msg, mode: Mode) -> Result<(), (Refusal, Msg)> {
        let start = Instant::now();
        let sent = self.send_full(index, msg, mode);
        let waited = u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.lane_of(index)
            .waited_nanos
            .fetch_add(waited, Ordering::Relaxed);
        sent
    }

    /// The slow path of a publish that found its shard full.
    #[cold]
    // The error is the message itself, handed back whole: nothing to shrink.
    #[allow(clippy::result_large_err)]
    pub(super) fn send_full(
        &self,
        index: usize,
        msg: Msg,
        mode: Mode,
    ) -> Result<(), (Refusal, Msg)> {
        if let Mode::Try = mode {
            return Err((Refusal::Full, msg));
        }
        if let Some(worker) = OwnThread::worker_of(self.id) {
            // A worker never blocks on a channel: that is how buses deadlock. The event is
            // accepted and waits in this worker's spill queue or on the timer.
            let Msg::Work(work) = msg else {
                unreachable!("publishers send tasks")
            };
            let routed = Routed { shard: index, work };
            let left = self.spill_or_wait(worker, routed);
            self.shards[worker].worker.settle_left_accepted(left);
            return Ok(());
        }
        #[cfg(feature = "rayon")]
        if rayon::current_thread_index().is_some() {
            return self.send_on_rayon(index, msg, mode);
        }
        let tx = &self.shards[index].tx;
        // First wait without registering with the channel, as crossbeam's own `send` does: on
        // a busy core, yielding lets the worker drain a batch instead of waking this thread for
        // every slot it frees.
        let mut msg = msg;
        for step in 0..SEND_BACKOFF_STEPS {
            if step < 6 {
                for _ in 0..1 << step {
                    std::hint::spin_loop();
                }
            } else {
                std::thread::yield_now();
            }
            if self.is_closing() && !matches!(mode, Mode::Accepted) {
                return Err((Refusal::Shutdown, msg));
            }
            if let Mode::Until(deadline) = mode
                && Instant::now() >= deadline
            {
                return Err((Refusal::Timeout, msg));
            }
            msg = match tx.try_send(msg) {
                Ok(()) => return Ok(()),
                Err(TrySendError::Full(msg)) => msg,
                Err(TrySendError::Disconnected(msg)) => return Err((Refusal::Shutdown, msg)),
            };
        }
        if let Mode::Accepted = mode {
            // Waits for the workers, or for shutdown's sweep once they stopped; gives up only
            // once the bus has stopped taking anything from its channels.
            loop {
                msg = match tx.send_timeout(msg, ACCEPTED_RETRY) {
                    Ok(()) => return Ok(()),
                    Err(SendTimeoutError::Timeout(msg)) if !self.is_done() => msg,
                    Err(SendTimeoutError::Timeout(msg) | SendTimeoutError::Disconnected(msg)) => {
                        return Err((Refusal::Shutdown, msg));
                    }
                };
            }
        }
        let mut select = Select::new();
        let send = select.send(tx);
        select.recv(&self.signal_rx);
        let oper = match mode {
            Mode::Until(deadline) => match select.select_deadline(deadline) {
                Ok(oper) => oper,
                Err(_) => return Err((Refusal::Timeout, msg)),
            },
            _ => select.select(),
        };
        if oper.index() == send {
            oper.send(tx, msg)
                .map_err(|e| (Refusal::Shutdown, e.into_inner()))
        } else {
            let _ = oper.recv(&self.signal_rx);
            Err((Refusal::Shutdown, msg))
        }
    }

    /// The slow path on a rayon worker thread, which must not block: the shard's worker may be
    /// inside a handler that waits for this very pool (`par_iter` in a handler), and a pool
    /// whose threads all wait for the worker would never run it. So while the shard is full the
    /// publisher runs other work of its pool (`rayon::yield_now`: the handler's, perhaps) and
    /// tries again; once the worker has made no progress for [`RAYON_STALL`], the event goes to
    /// the shard's overflow queue (its worker's spill queue, which the worker takes ahead of
    /// its channel), and when that is full too it comes back as [`Refusal::Full`].
    #[cfg(feature = "rayon")]
    #[cold]
    #[allow(clippy::result_large_err)] // The error is the message itself, handed back.
    pub(super) fn send_on_rayon(
        &self,
        index: usize,
        mut msg: Msg,
        mode: Mode,
    ) -> Result<(), (Refusal, Msg)> {
        let shard = &self.shards[index];
        loop {
            if self.is_closing() && !matches!(mode, Mode::Accepted) {
                return Err((Refusal::Shutdown, msg));
            }
            if let Mode::Until(deadline) = mode
                && Instant::now() >= deadline
            {
                return Err((Refusal::Timeout, msg));
            }
            msg = match shard.tx.try_send(msg) {
                Ok(()) => return Ok(()),
                Err(TrySendError::Full(msg)) => msg,
                Err(TrySendError::Disconnected(msg)) => return Err((Refusal::Shutdown, msg)),
            };
            if shard.worker.stalled_for(RAYON_STALL) {
                let Msg::Work(work) = msg else {
                    unreachable!("publishers send work")
                };
                return match shard
                    .worker
                    .spill(Routed { shard: index, work }, self.spill_capacity)
                {
                    Ok(()) => {
                        // Wakes the worker if it has emptied its channel and parked since.
                        let _ = shard.tx.try_send(Msg::Wake);
                        Ok(())
                    }
                    Err(routed) => Err((Refusal::Full, Msg::Work(routed.work))),
                };
            }
            if !run_other_rayon_work() {
                std::thread::yield_now();
            }
        }
    }

    /// Prepares an event published by a handler: matched and stamped now, handed to `stage`
    /// (one message per lane it goes to) to be sent when the handler succeeds. Its id (when it
    /// matched no subscription it is counted, and nothing is staged); `Err` once the bus has
    /// stopped.
    pub(crate) fn prepare<E: Event>(
        &self,
        source: NameId,
        event: E,
        stamp: Stamp,
        mut stage: impl FnMut(Routed),
    ) -> Result<EventId, E> {
        if self.stopped.load(Ordering::SeqCst) {
            return Err(event);
        }
        let route = self.registry.route::<E>(source, 1);
        let envelope = stamp.envelope(&self.clock, source);
        let id = envelope.id();
        if route.deliveries == 0 {
            // Staged like any other: when the handler succeeds its worker counts it as
            // unmatched and shows it to the taps (a delayed one, the worker it falls due on).
            let shard = self.lanes[0].shard_for(&envelope);
            let task = Task::new(envelope, route.generation, 0, event);
            stage(Routed {
                shard,
                work: Work::Task(task),
            });
            return Ok(id);
        }
        match route.single() {
            Some(lane) => {
                let shard = self.lanes[lane].shard_for(&envelope);
                let task = Task::new(envelope, route.generation, route.deliveries, event);
                stage(Routed {
                    shard,
                    work: Work::Task(task),
                });
            }
            None => {
                let counts = self.registry.lane_counts::<E>(source, route.generation);
                let shared = Fanout::share(envelope, event);
                for (i, (lane, deliveries)) in counts.iter().enumerate() {
                    let shard = self.lanes[lane].shard_for(&shared.envelope);
                    let fanout =
                        Fanout::new::<E>(shared.clone(), route.generation, deliveries, i == 0);
                    stage(Routed {
                        shard,
                        work: Work::Fanout(fanout),
                    });
                }
            }
        }
        Ok(id)
    }

    /// Offers an accepted event to its shard without blocking; when the shard is full it waits
    /// in worker `from`'s spill queue, or on the timer. Returns the deliveries that could not
    /// be kept (the timer has stopped), which the caller settles as left.
    pub(crate) fn offer(&self, from: usize, routed: Routed) -> usize {
        match self.shards[routed.shard].try_offer(routed) {
            Ok(()) => 0,
            Err(routed) => self.spill_or_wait(from, routed),
        }
    }

    pub(super) fn spill_or_wait(&self, from: usize, routed: Routed) -> usize {
        let Err(routed) = self.shards[from].worker.spill(routed, self.spill_capacity) else {
            return 0;
        };
        match self.timer.reoffer(routed) {
            Ok(()) => 0,
            Err(routed) => {
                // The timer has stopped: the bus is shutting down, and the event never runs.
                if let Some(done) = routed.work.track(Settled::Left) {
                    done.run(&mut &self.panics);
                }
                let left = routed.work.deliveries();
                self.panics.drop(routed);
                left
            }
        }
    }

    /// Puts work on the timer for `delay`; `Err` gives it back once the timer has stopped.
    #[allow(clippy::result_large_err)] // The error is the work itself, handed back.
    pub(crate) fn wait_on_timer(&self, routed: Routed, delay: Duration) -> Result<(), Routed> {
        self.timer.schedule(routed, delay)
    }
}

/// Publishes `items` one at a time with `publish`; at the first refusal, hands back that event
/// and every one after it.
pub(super) fn one_by_one<E>(
    items: impl IntoIterator<Item = (E, Stamp, Option<Duration>)>,
    mut publish: impl FnMut(E, Stamp, Option<Duration>) -> Result<(), (Refusal, E)>,
) -> Result<(), (Refusal, Vec<E>)> {
    let mut items = items.into_iter();
    while let Some((event, stamp, delay)) = items.next() {
        if let Err((why, event)) = publish(event, stamp, delay) {
            let mut back = vec![event];
            back.extend(items.map(|(event, ..)| event));
            return Err((why, back));
        }
    }
    Ok(())
}

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

use crossbeam_channel::{Receiver, Select, Sender, TrySendError};
use crossbeam_utils::CachePadded;
use parking_lot::{Condvar, Mutex};

use crate::config::{Config, WaitStrategy, check_name};
use crate::dead_letter::{
    DeadLetter, DeadLetterReason, DeadLetterSink, DeadLetters, RedriveError, Ring,
};
use crate::defer::Deferrals;
use crate::error::{
    ConfigError, FlushError, Pending, PublishBatchError, PublishError, PublishTimeoutError,
    ShutdownError, SubscribeError, TryPublishError,
};
use crate::event::{Envelope, Event, EventId, NameId, Publish, Stamp};
use crate::guard::{Leftovers, Panics, Runner, drop_with};
use crate::handler::{Context, Handler, HandlerResult};
use crate::ledger::{Gate, Quiescence, net_sum, outstanding};
use crate::metrics::{BridgeCounters, Collect, Metrics, MetricsSnapshot};

/// Reads one bridge's counters for a metrics snapshot; `None` once the bridge is gone.
pub(crate) type BridgeReport = Box<dyn Fn() -> Option<BridgeCounters> + Send + Sync>;
use crate::registry::{HandlerFn, Registry, Sub, SubMeta, SubscribeOptions, Subscription};
use crate::retry::RetryPolicy;
use crate::shard::{
    ABANDONED, Batch, IDLE, MAX_GROUP, Msg, Retry, Routed, Shard, Task, Work, WorkerCounts,
    WorkerShared, offer_due, run_worker, seam_of, wait_for_batches,
};
use crate::stats::{AbandonedDelivery, BusStats, SHUTDOWN_GRACE, ShutdownReport};
use crate::sync::{Arc, AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use crate::tap::{Tapped, Taps};
use crate::timer::{REOFFER_DELAY, Timer};
use crate::trace::{Trace, TraceRing};
use crate::track::{Settled, Tracker, Tracking};

thread_local! {
    /// The bus whose worker or timer thread this is (0: none), and the worker's index.
    static OWN: Cell<(u64, usize)> = const { Cell::new((0, usize::MAX)) };
    /// Where this thread's unkeyed events go next.
    static ROUND_ROBIN: Cell<usize> = const { Cell::new(0) };
}

/// Marks the current thread as one of a bus's own threads while it lives.
pub(crate) struct OwnThread(());

impl OwnThread {
    pub(crate) fn enter(bus: u64, worker: Option<usize>) -> OwnThread {
        OWN.with(|own| own.set((bus, worker.unwrap_or(usize::MAX))));
        OwnThread(())
    }

    /// Whether the current thread is a worker or the timer of bus `bus`.
    fn is_own(bus: u64) -> bool {
        OWN.with(|own| own.get().0 == bus)
    }

    /// The index of the current thread if it is a worker of bus `bus`.
    fn worker_of(bus: u64) -> Option<usize> {
        OWN.with(|own| {
            let (b, index) = own.get();
            (b == bus && index != usize::MAX).then_some(index)
        })
    }
}

impl Drop for OwnThread {
    fn drop(&mut self) {
        OWN.with(|own| own.set((0, usize::MAX)));
    }
}

static NEXT_BUS_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// How many times a publisher that found its shard full tries again (spinning, then yielding)
/// before it blocks.
const SEND_BACKOFF_STEPS: u32 = 10;

/// How a publisher waits when its shard is full.
#[derive(Clone, Copy)]
pub(crate) enum Mode {
    Block,
    Try,
    Until(Instant),
}

/// Why an event was handed back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    Full,
    Timeout,
    Shutdown,
}

/// The error of a blocking publish that was refused.
fn refused<E>(why: Refusal, event: E) -> PublishError<E> {
    match why {
        Refusal::Full => PublishError::Full(event),
        Refusal::Timeout | Refusal::Shutdown => PublishError::Shutdown(event),
    }
}

/// How long a publisher on a rayon worker thread waits for a full shard whose worker makes no
/// progress before it uses the shard's overflow queue.
#[cfg(feature = "rayon")]
const RAYON_STALL: Duration = Duration::from_millis(100);

/// How deep publishers on one rayon thread nest other work of their pool while they wait: the
/// work they run may publish and wait in turn, each level on the same stack. One level is
/// enough to run a handler's job that waits in the pool's queue; deeper levels were measured
/// to help no further (a parallel iterator's own jobs come first and keep coming).
#[cfg(feature = "rayon")]
const RAYON_NESTING: u32 = 1;

#[cfg(feature = "rayon")]
thread_local! {
    /// How many publishers on this rayon thread are running other work of its pool.
    static NESTED: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// Runs one unit of other work of the current rayon pool, unless this thread already runs
/// [`RAYON_NESTING`] of them for waiting publishers (each nests on its stack). Whether it ran one.
#[cfg(feature = "rayon")]
fn run_other_rayon_work() -> bool {
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

enum Lifecycle {
    Running,
    Stopping,
    Done(Box<ShutdownReport>),
}

/// The state shared by every handle, subscription and thread of one bus.
pub(crate) struct Core {
    pub(crate) id: u64,
    /// Panics caught in user code outside handlers, by seam.
    pub(crate) panics: Panics,
    pub(crate) dead_letters: Ring,
    pub(crate) taps: Taps,
    pub(crate) traces: TraceRing,
    pub(crate) metrics: Metrics,
    /// Deliveries whose handlers deferred their outcome.
    pub(crate) deferrals: Deferrals,
    /// The counters of the bridges on the bus; `None` once a bridge is gone.
    pub(crate) bridges: Mutex<Vec<BridgeReport>>,
    /// How to publish a dead letter of an event type (name, version) that came from outside
    /// and was never published: see `DeadLetter::republish`.
    pub(crate) republishers:
        Mutex<std::collections::HashMap<(&'static str, u32), crate::dead_letter::Republish>>,
    jitter_seed: u64,
    pub(crate) config: Config,
    spill_capacity: usize,
    pub(crate) registry: Registry,
    pub(crate) shards: Box<[Shard]>,
    timer: Timer<Routed>,
    signal_tx: Mutex<Option<Sender<()>>>,
    signal_rx: Receiver<()>,
    closing: AtomicBool,
    stopped: AtomicBool,
    unmatched: CachePadded<AtomicU64>,
    refused: AtomicU64,
    idle_lock: Mutex<()>,
    idle_cv: Condvar,
    idle_waiters: AtomicUsize,
    lifecycle: Mutex<Lifecycle>,
    lifecycle_cv: Condvar,
    worker_threads: Mutex<Vec<JoinHandle<()>>>,
    timer_thread: Mutex<Option<JoinHandle<()>>>,
}

/// Deliveries that shutdown settles itself: events that never ran, and retries that never ran
/// (dead-lettered, or discarded when dead letters are off).
#[derive(Debug, Clone, Copy, Default)]
struct Swept {
    left: u64,
    dead_lettered: u64,
    discarded: u64,
}

impl Swept {
    /// Settles what shutdown found waiting: events that never ran are left, retries that never
    /// ran are dead letters (reason [`Shutdown`](DeadLetterReason::Shutdown)), or discarded
    /// with dead letters off. It only counts: the user code that follows (trackers' callbacks,
    /// the event's `Serialize` and `Drop`, the hook and the sink) goes to `leftovers`.
    fn add(&mut self, core: &Arc<Core>, work: Work, leftovers: &mut Leftovers) {
        let kept = core.dead_letters.enabled();
        if kept && core.config.dead_letter_left && !matches!(work, Work::Retry(_)) {
            // Kept as dead letters, to be redriven (after a restart, from a file).
            let deliveries = work.deliveries() as u64;
            let mut done = Vec::new();
            let retries = work.never_ran(&core.registry.load_full(), &mut done);
            self.dead_lettered += retries.len() as u64;
            self.left += deliveries - retries.len() as u64;
            done.extend(
                retries
                    .iter()
                    .filter_map(|r| r.track(Settled::DeadLettered)),
            );
            for done in done {
                leftovers.push(move |runner| done.run(runner));
            }
            for retry in retries {
                self.bury(core, retry, leftovers);
            }
            return;
        }
        let how = match &work {
            Work::Retry(_) if kept => Settled::DeadLettered,
            Work::Retry(_) => Settled::Discarded,
            _ => Settled::Left,
        };
        if let Some(done) = work.track(how) {
            leftovers.push(move |runner| done.run(runner));
        }
        match work {
            Work::Task(_) | Work::Batch(_) => {
                self.left += work.deliveries() as u64;
                if work.needs_drop() {
                    leftovers.drop(work);
                }
            }
            Work::Retry(retry) if kept => {
                self.dead_lettered += 1;
                self.bury(core, retry, leftovers);
            }
            Work::Retry(retry) => {
                self.discarded += 1;
                leftovers.drop(retry);
            }
        }
    }

    /// Leaves `retry` to be made a dead letter (reason `Shutdown`).
    fn bury(&mut self, core: &Arc<Core>, retry: Retry, leftovers: &mut Leftovers) {
        let core = core.clone();
        leftovers.push(move |runner| {
            let id = core.dead_letters.next_id();
            let letter = retry.bury(DeadLetterReason::Shutdown, id, runner);
            let after = core.dead_letters.push(letter);
            core.dead_letters.call_back(after, runner);
        });
    }

    fn total(&self) -> u64 {
        self.left + self.dead_lettered + self.discarded
    }
}

/// Backs off in a wait loop that expects to be short: spin, then yield, then sleep briefly.
fn backoff(step: &mut u32) {
    *step += 1;
    match *step {
        0..=16 => std::hint::spin_loop(),
        17..=64 => std::thread::yield_now(),
        _ => std::thread::sleep(Duration::from_micros(50)),
    }
}

impl Core {
    /// Whether no shutdown has started.
    fn is_running(&self) -> bool {
        matches!(*self.lifecycle.lock(), Lifecycle::Running)
    }

    pub(crate) fn is_closing(&self) -> bool {
        self.closing.load(Ordering::Relaxed)
    }

    /// Whether shutdown has passed its deadline: no delivery starts any more.
    #[cfg(feature = "redis")]
    pub(crate) fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::SeqCst)
    }

    #[inline]
    fn shard_for(&self, envelope: &Envelope) -> usize {
        let shards = self.shards.len();
        match envelope.key() {
            Some(key) => key.shard(shards),
            None if shards == 1 => 0,
            None => self.round_robin(),
        }
    }

    /// The next shard in turn for an unkeyed event from this thread.
    #[inline]
    fn round_robin(&self) -> usize {
        ROUND_ROBIN.with(|rr| {
            let next = rr.get();
            rr.set(next.wrapping_add(1));
            next % self.shards.len()
        })
    }

    fn unmatched<E: Event>(
        &self,
        source: NameId,
        event: E,
        stamp: Stamp,
    ) -> Result<(), (Refusal, E)> {
        if self.is_closing() {
            self.refused.fetch_add(1, Ordering::Relaxed);
            self.registry.uncount(TypeId::of::<E>(), source, 1, true);
            return Err((Refusal::Shutdown, event));
        }
        self.count_unmatched(source, &event, stamp);
        Ok(())
    }

    /// Counts an event that matched no subscription, and shows it to the taps (it never
    /// reaches a worker).
    fn count_unmatched<E: Event>(&self, source: NameId, event: &E, stamp: Stamp) {
        self.unmatched.fetch_add(1, Ordering::Relaxed);
        let tracked = stamp.is_tracked();
        if self.taps.on() || tracked {
            let envelope = stamp.envelope(source);
            if let Some(done) = envelope.tracker().and_then(|t| t.arm(envelope.id(), 0)) {
                done.run(&mut &self.panics);
            }
            if self.taps.on() {
                self.tap(&envelope, event, &mut &self.panics);
            }
            self.panics.drop(envelope);
        }
    }

    /// Shows an event to the taps, each under `runner`'s guard (the event's `Serialize`, when
    /// a tap asks for the payload, under the guard too).
    #[cold]
    pub(crate) fn tap<E: Event>(&self, envelope: &Envelope, event: &E, runner: &mut dyn Runner) {
        let payload = || crate::shard::to_json(event, &mut &self.panics);
        self.taps.call(
            &Tapped {
                event: E::NAME,
                version: E::VERSION,
                envelope,
                payload: &payload,
            },
            runner,
        );
    }

    /// Publishes from outside a handler's outbox: through the gate.
    pub(crate) fn publish<E: Event>(
        &self,
        source: NameId,
        event: E,
        stamp: Stamp,
        mode: Mode,
    ) -> Result<(), (Refusal, E)> {
        let (generation, deliveries) = self.registry.route::<E>(source, 1);
        if deliveries == 0 {
            return self.unmatched(source, event, stamp);
        }
        let envelope = stamp.envelope(source);
        if let Some(t) = envelope.tracker() {
            // With deliveries to come, arming completes nothing.
            let _none = t.arm(envelope.id(), deliveries);
        }
        let index = self.shard_for(&envelope);
        let shard = &self.shards[index];
        if !shard.gate.enter(deliveries) {
            self.refused.fetch_add(1, Ordering::Relaxed);
            self.registry.uncount(TypeId::of::<E>(), source, 1, false);
            return Err((Refusal::Shutdown, event));
        }
        let msg = Msg::Work(Work::Task(Task::new(
            envelope, generation, deliveries, event,
        )));
        let sent = match shard.tx.try_send(msg) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(msg)) => self.send_full(index, msg, mode),
            Err(TrySendError::Disconnected(msg)) => Err((Refusal::Shutdown, msg)),
        };
        match sent {
            Ok(()) => Ok(()),
            Err((why, msg)) => {
                shard.gate.refund(deliveries);
                self.registry.uncount(TypeId::of::<E>(), source, 1, false);
                if why == Refusal::Shutdown {
                    self.refused.fetch_add(1, Ordering::Relaxed);
                }
                let Msg::Work(Work::Task(task)) = msg else {
                    unreachable!("publishers send tasks")
                };
                Err((why, task.into_event()))
            }
        }
    }

    /// Publishes through the gate onto the timer: the event goes to its shard after `delay`.
    pub(crate) fn publish_delayed<E: Event>(
        &self,
        source: NameId,
        event: E,
        options: Publish,
        delay: Duration,
    ) -> Result<(), E> {
        let (generation, deliveries) = self.registry.route::<E>(source, 1);
        if deliveries == 0 {
            return self
                .unmatched(source, event, Stamp::New(options))
                .map_err(|(_, e)| e);
        }
        let envelope = Envelope::stamp(source, options);
        let index = self.shard_for(&envelope);
        let gate = &self.shards[index].gate;
        if !gate.enter(deliveries) {
            self.refused.fetch_add(1, Ordering::Relaxed);
            self.registry.uncount(TypeId::of::<E>(), source, 1, false);
            return Err(event);
        }
        let routed = Routed {
            shard: index,
            work: Work::Task(Task::new(envelope, generation, deliveries, event)),
        };
        match self.timer.schedule(routed, delay) {
            Ok(()) => Ok(()),
            Err(routed) => {
                gate.refund(deliveries);
                self.registry.uncount(TypeId::of::<E>(), source, 1, false);
                self.refused.fetch_add(1, Ordering::Relaxed);
                let Work::Task(task) = routed.work else {
                    unreachable!("a task was scheduled")
                };
                Err(task.into_event())
            }
        }
    }

    /// Publishes events of one type as batch messages (see [`in_groups`](Self::in_groups)).
    /// Waits while a shard is full. `Err` hands back every event that was not accepted (the
    /// bus is shutting down).
    pub(crate) fn publish_batch<E: Event>(
        &self,
        source: NameId,
        items: impl IntoIterator<Item = (E, Stamp)>,
    ) -> Result<(), (Refusal, Vec<E>)> {
        let (generation, deliveries) = self.registry.route::<E>(source, 0);
        if deliveries == 0 && self.is_closing() {
            let back: Vec<E> = items.into_iter().map(|(event, _)| event).collect();
            self.refused.fetch_add(back.len() as u64, Ordering::Relaxed);
            return Err((Refusal::Shutdown, back));
        }
        let result = self.in_groups(source, items, deliveries, |index, group| {
            self.send_group(index, group, source, generation, deliveries)
        });
        if let Err((Refusal::Shutdown, back)) = &result {
            self.refused.fetch_add(back.len() as u64, Ordering::Relaxed);
        }
        result
    }

    /// Prepares a batch published by a handler: grouped as [`publish_batch`](Self::publish_batch)
    /// does, handed to `stage`, and sent when the handler succeeds.
    pub(crate) fn prepare_batch<E: Event>(
        &self,
        source: NameId,
        items: impl IntoIterator<Item = (E, Publish)>,
        mut stage: impl FnMut(Routed),
    ) -> Result<(), Vec<E>> {
        if self.stopped.load(Ordering::SeqCst) {
            return Err(items.into_iter().map(|(event, _)| event).collect());
        }
        let (generation, deliveries) = self.registry.route::<E>(source, 0);
        let items = items
            .into_iter()
            .map(|(event, options)| (event, Stamp::New(options)));
        self.in_groups(source, items, deliveries, |index, group| {
            self.registry.count::<E>(source, group.len() as u64, false);
            stage(Routed {
                shard: index,
                work: Work::Batch(Batch::new(group, source, generation, deliveries)),
            });
            Ok(())
        })
        .map_err(|(_, back)| back)
    }

    /// Stamps `items` (an envelope given is kept, its tracker armed) and groups them per
    /// shard — by key; unkeyed events fill one shard's group, then the next one's — and hands
    /// each group of up to [`MAX_GROUP`] events, in publish order, to `emit`: as soon as it is
    /// full, and the rest at the end. Events that match no subscription (`deliveries` is 0)
    /// are counted, not grouped. At the first `Err` it stops and returns every event not
    /// handed over, with those `emit` gave back.
    fn in_groups<E: Event>(
        &self,
        source: NameId,
        items: impl IntoIterator<Item = (E, Stamp)>,
        deliveries: usize,
        mut emit: impl FnMut(usize, Vec<(Envelope, E)>) -> Result<(), (Refusal, Vec<E>)>,
    ) -> Result<(), (Refusal, Vec<E>)> {
        let mut items = items.into_iter();
        if deliveries == 0 {
            for (event, stamp) in items {
                self.registry.count::<E>(source, 1, true);
                self.count_unmatched(source, &event, stamp);
            }
            return Ok(());
        }
        let shards = self.shards.len();
        let mut groups: Vec<Vec<(Envelope, E)>> = (0..shards).map(|_| Vec::new()).collect();
        let mut unkeyed = self.round_robin();
        let mut failed = None;
        let mut now = 0;
        for (i, (event, stamp)) in items.by_ref().enumerate() {
            let envelope = match stamp {
                Stamp::New(options) => {
                    // The clock is read once per message's worth of events: ids stay unique
                    // and ordered by their sequence numbers.
                    if now == 0 || i % MAX_GROUP == 0 {
                        now = crate::event::unix_nanos();
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
            let index = match envelope.key() {
                Some(key) => key.shard(shards),
                None => unkeyed,
            };
            let group = &mut groups[index];
            if group.capacity() == 0 {
                group.reserve_exact(MAX_GROUP);
            }
            group.push((envelope, event));
            if group.len() == MAX_GROUP {
                if index == unkeyed {
                    unkeyed = (unkeyed + 1) % shards;
                }
                if let Err(back) = emit(index, std::mem::take(group)) {
                    failed = Some(back);
                    break;
                }
            }
        }
        let mut groups = groups.into_iter().enumerate();
        if failed.is_none() {
            failed = groups
                .by_ref()
                .filter(|(_, group)| !group.is_empty())
                .find_map(|(index, group)| emit(index, group).err());
        }
        let Some((why, mut back)) = failed else {
            return Ok(());
        };
        back.extend(groups.flat_map(|(_, group)| group).map(|(_, event)| event));
        back.extend(items.map(|(event, _)| event));
        Err((why, back))
    }

    /// Sends one group of a batch to shard `index` through its gate.
    fn send_group<E: Event>(
        &self,
        index: usize,
        group: Vec<(Envelope, E)>,
        source: NameId,
        generation: u32,
        per_event: usize,
    ) -> Result<(), (Refusal, Vec<E>)> {
        let events = group.len();
        let deliveries = events * per_event;
        let shard = &self.shards[index];
        let batch = Batch::new(group, source, generation, per_event);
        if !shard.gate.enter(deliveries) {
            return Err((Refusal::Shutdown, batch.into_events().collect()));
        }
        let msg = Msg::Work(Work::Batch(batch));
        let sent = match shard.tx.try_send(msg) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(msg)) => self.send_full(index, msg, Mode::Block),
            Err(TrySendError::Disconnected(msg)) => Err((Refusal::Shutdown, msg)),
        };
        match sent {
            Ok(()) => {
                self.registry.count::<E>(source, events as u64, false);
                Ok(())
            }
            Err((why, msg)) => {
                shard.gate.refund(deliveries);
                let Msg::Work(Work::Batch(batch)) = msg else {
                    unreachable!("a batch was sent")
                };
                Err((why, batch.into_events().collect()))
            }
        }
    }

    /// The slow path of a publish that found its shard full.
    #[cold]
    // The error is the message itself, handed back whole: nothing to shrink.
    #[allow(clippy::result_large_err)]
    fn send_full(&self, index: usize, msg: Msg, mode: Mode) -> Result<(), (Refusal, Msg)> {
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
            if self.is_closing() {
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
    fn send_on_rayon(&self, index: usize, mut msg: Msg, mode: Mode) -> Result<(), (Refusal, Msg)> {
        let shard = &self.shards[index];
        loop {
            if self.is_closing() {
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

    /// Prepares an event published by a handler: matched now, sent when the handler succeeds.
    /// `Ok(None)` when it matched no subscription (counted); `Err` once the bus has stopped.
    pub(crate) fn prepare<E: Event>(
        &self,
        source: NameId,
        event: E,
        options: Publish,
    ) -> Result<Option<Routed>, E> {
        if self.stopped.load(Ordering::SeqCst) {
            return Err(event);
        }
        let (generation, deliveries) = self.registry.route::<E>(source, 1);
        if deliveries == 0 {
            self.count_unmatched(source, &event, Stamp::New(options));
            return Ok(None);
        }
        let envelope = Envelope::stamp(source, options);
        let shard = self.shard_for(&envelope);
        Ok(Some(Routed {
            shard,
            work: Work::Task(Task::new(envelope, generation, deliveries, event)),
        }))
    }

    /// Offers an accepted event to its shard without blocking; when the shard is full it waits
    /// in worker `from`'s spill queue, or on the timer. Returns the deliveries that could not
    /// be kept (the timer has stopped), which the caller settles as left.
    pub(crate) fn offer(&self, from: usize, routed: Routed) -> usize {
        match self.shards[routed.shard]
            .tx
            .try_send(Msg::Work(routed.work))
        {
            Ok(()) => 0,
            Err(TrySendError::Full(msg) | TrySendError::Disconnected(msg)) => {
                let Msg::Work(work) = msg else {
                    unreachable!("work was sent")
                };
                self.spill_or_wait(from, Routed { work, ..routed })
            }
        }
    }

    fn spill_or_wait(&self, from: usize, routed: Routed) -> usize {
        let Err(routed) = self.shards[from].worker.spill(routed, self.spill_capacity) else {
            return 0;
        };
        match self.timer.schedule(routed, REOFFER_DELAY) {
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

    /// Sends a dead letter back to its subscription as a new delivery; gives it back with the
    /// reason when it cannot go.
    #[allow(clippy::result_large_err)] // The error hands the dead letter back.
    pub(crate) fn redrive(&self, letter: DeadLetter) -> Result<(), (DeadLetter, RedriveError)> {
        let id = letter.id();
        // First: a stopped bus has let go of every letter's way back.
        if self.is_closing() {
            return Err((letter, RedriveError::Shutdown(id)));
        }
        let Some(retry) = &letter.redrive else {
            return match letter.republish {
                Some(republish) => republish(self, &letter).map_err(|e| (letter, e)),
                None => Err((letter, RedriveError::NotRedrivable(id))),
            };
        };
        if self
            .registry
            .lookup(retry.subscription())
            .is_none_or(|meta| !meta.active.load(Ordering::SeqCst))
        {
            return Err((letter, RedriveError::SubscriptionGone(id)));
        }
        let index = self.shard_for(&retry.event.envelope);
        // Counted in before it can be settled; given back if the timer has stopped.
        self.shards[index].gate.accept(1);
        let routed = Routed {
            shard: index,
            work: Work::Retry(retry.clone()),
        };
        match self.timer.schedule(routed, Duration::ZERO) {
            Ok(()) => Ok(()),
            Err(_) => {
                self.shards[index].gate.refund(1);
                Err((letter, RedriveError::Shutdown(id)))
            }
        }
    }

    /// Rebuilds a dead letter read from a file, matching it to today's event types and
    /// subscriptions.
    pub(crate) fn rebuild(&self, line: crate::dead_letter::Line) -> DeadLetter {
        let envelope = line.envelope.clone();
        let event_name = NameId::intern(&line.event).as_str();
        let service = NameId::intern(&line.service).as_str();
        let payload = line.payload.get().to_owned();
        let snapshot = self.registry.load_full();
        let decode = |decode: &dyn Fn() -> Result<Retry, String>| {
            // The event's `Deserialize`, or an upcaster: user code.
            self.panics
                .run(crate::guard::Seam::Serde, decode)
                .unwrap_or_else(|| Err("decoding the payload panicked".to_owned()))
        };
        let redrive = match (
            self.registry.decoder(&line.event, line.version),
            self.registry.upcast_rebuild(&line.event, line.version),
        ) {
            (Some(decoder), _) => decode(&|| {
                decoder(
                    &snapshot,
                    envelope.clone(),
                    &payload,
                    &line.handler,
                    service,
                )
            }),
            (None, Some(upcast)) => decode(&|| {
                upcast(
                    &snapshot,
                    envelope.clone(),
                    &payload,
                    &line.handler,
                    service,
                )
            }),
            (None, None) => Err(format!(
                "no event type {} v{} is subscribed on this bus",
                line.event, line.version
            )),
        };
        let at = |nanos: u64| SystemTime::UNIX_EPOCH + Duration::from_nanos(nanos);
        let (subscription, redrive, blocked) = match redrive {
            Ok(retry) => (retry.subscription(), Some(retry), None),
            Err(why) => (0, None, Some(why)),
        };
        DeadLetter {
            id: self.dead_letters.next_id(),
            envelope,
            event_name,
            event_version: line.version,
            payload,
            subscription,
            handler: line.handler,
            service,
            errors: line.errors,
            attempts: line.attempts,
            first_failure: at(line.first_failure_unix_nanos),
            last_failure: at(line.last_failure_unix_nanos),
            reason: line.reason,
            republish: redrive
                .is_none()
                .then(|| {
                    self.republishers
                        .lock()
                        .get(&(event_name, line.version))
                        .copied()
                })
                .flatten(),
            redrive,
            blocked,
        }
    }

    /// Keeps a message from outside the process that is not published as a dead letter: its
    /// raw text (as a JSON string), the envelope if that much decoded, and why —
    /// [`DeadLetterReason::Undecodable`] when it did not decode, else
    /// [`DeadLetterReason::RetriesExhausted`] (delivered too often). It is not a delivery (no
    /// subscription ran it), so the statistics do not count it. With `republish`, a redrive
    /// publishes it into the bus (when it decodes then).
    #[cfg(feature = "redis")]
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn bury_unpublished(
        &self,
        event: &str,
        version: u32,
        envelope: Option<Envelope>,
        raw: &[u8],
        handler: &str,
        why: String,
        undecodable: bool,
        republish: Option<crate::dead_letter::Republish>,
    ) {
        if !self.dead_letters.enabled() {
            return;
        }
        let now = SystemTime::now();
        let envelope =
            envelope.unwrap_or_else(|| Envelope::stamp(NameId::intern(handler), Publish::new()));
        let service = envelope.source();
        let letter = DeadLetter {
            id: self.dead_letters.next_id(),
            envelope,
            event_name: NameId::intern(event).as_str(),
            event_version: version,
            payload: serde_json::to_string(&String::from_utf8_lossy(raw))
                .expect("a string serializes"),
            subscription: 0,
            handler: handler.to_owned(),
            service,
            errors: vec![why.clone()],
            attempts: 0,
            first_failure: now,
            last_failure: now,
            reason: if undecodable {
                DeadLetterReason::Undecodable
            } else {
                DeadLetterReason::RetriesExhausted
            },
            redrive: None,
            blocked: republish.is_none().then_some(why),
            republish,
        };
        let after = self.dead_letters.push(letter);
        self.dead_letters.call_back(after, &mut &self.panics);
    }

    /// The seed of worker `index`'s jitter generator.
    pub(crate) fn worker_seed(&self, index: usize) -> u64 {
        self.jitter_seed ^ (index as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15)
    }

    /// Called by a worker about to wait for work: wakes anyone waiting for quiescence.
    pub(crate) fn notify_idle(&self) {
        if self.idle_waiters.load(Ordering::SeqCst) > 0 {
            let _guard = self.idle_lock.lock();
            self.idle_cv.notify_all();
        }
    }

    fn settled(&self) -> u64 {
        self.settled_with(&[])
    }

    /// The deliveries settled, with the counts of the workers shutdown detached.
    fn settled_with(&self, frozen: &[Option<WorkerCounts>]) -> u64 {
        let deferred = self.deferrals.settled.load(Ordering::Acquire);
        self.shards
            .iter()
            .enumerate()
            .fold(deferred, |sum, (index, shard)| {
                let settled = match frozen.get(index).copied().flatten() {
                    Some(counts) => counts.settled,
                    None => shard.worker.stats.settled.load(Ordering::Acquire),
                };
                sum.wrapping_add(settled)
            })
    }

    fn is_quiescent(&self) -> bool {
        Quiescence::check(self.shards.iter().map(|s| &*s.gate), || self.settled())
    }

    /// Deliveries outstanding now (live; may read a settlement before its count).
    fn outstanding_now(&self) -> i64 {
        outstanding(
            net_sum(self.shards.iter().map(|s| &*s.gate)),
            self.settled(),
        )
    }

    /// Whether everything outstanding waits on the timer, none of it due before `deadline`:
    /// read twice around the timer, so that nothing moved in between.
    fn parked_past(&self, deadline: Instant) -> bool {
        let before = self.outstanding_now();
        if before <= 0 {
            return false;
        }
        let (waiting, next_due) = self.timer.parked();
        before == waiting as i64
            && next_due.is_some_and(|due| due > deadline)
            && self.outstanding_now() == before
    }

    /// Waits until the bus is quiescent or `deadline` passes (`None`: no deadline). With
    /// `early`, it also stops waiting when all that is left waits on the timer past the
    /// deadline. Returns whether the bus was quiescent.
    fn wait_quiescent(&self, deadline: Option<Instant>, early: bool) -> bool {
        self.idle_waiters.fetch_add(1, Ordering::SeqCst);
        let mut guard = self.idle_lock.lock();
        let quiet = loop {
            if self.is_quiescent() {
                break true;
            }
            if early && deadline.is_some_and(|d| self.parked_past(d)) {
                break false;
            }
            let now = Instant::now();
            let wait = match deadline {
                Some(d) if d <= now => break false,
                Some(d) => (d - now).min(Duration::from_millis(10)),
                None => Duration::from_millis(10),
            };
            self.idle_cv.wait_for(&mut guard, wait);
        };
        drop(guard);
        self.idle_waiters.fetch_sub(1, Ordering::SeqCst);
        quiet
    }

    /// Waits until every batch that other workers have open has closed (see `shard`): after a
    /// subscription's `active` flag was cleared, no call of it starts once this returns.
    ///
    /// Called from a handler, it first closes its own worker's batch (and opens a new one
    /// after): two handlers unsubscribing at once on two workers would otherwise wait for each
    /// other forever.
    pub(crate) fn wait_for_open_batches(&self) {
        let own = OwnThread::worker_of(self.id);
        let own_batch = own.map(|index| &self.shards[index].worker.batch);
        let reopen = own_batch.is_some_and(|batch| {
            let value = batch.load(Ordering::Relaxed);
            let open = value % 2 == 1;
            if open {
                batch.store(value + 1, Ordering::SeqCst);
            }
            open
        });
        let others = self
            .shards
            .iter()
            .enumerate()
            .filter(|(index, _)| own != Some(*index))
            .map(|(_, shard)| &shard.worker.batch);
        let mut step = 0;
        // Once the bus has stopped no call starts anywhere; a worker detached inside a handler
        // may keep its batch open for as long as that handler runs.
        wait_for_batches(
            others,
            || self.stopped.load(Ordering::SeqCst),
            || backoff(&mut step),
        );
        if let Some(batch) = own_batch.filter(|_| reopen) {
            batch.store(batch.load(Ordering::Relaxed) + 1, Ordering::SeqCst);
        }
    }

    fn pending(&self) -> Pending {
        let now = Instant::now();
        Pending {
            queued: self
                .shards
                .iter()
                .map(|s| s.rx.len() + s.worker.spill_len.load(Ordering::Relaxed))
                .sum(),
            running: self.shards.iter().filter(|s| s.worker.running()).count(),
            waiting: self.timer.len(),
            next_due_in: self
                .timer
                .earliest()
                .map(|due| due.saturating_duration_since(now)),
            deferred: self.deferrals.outstanding(),
        }
    }

    fn flush(&self, timeout: Duration) -> Result<(), FlushError> {
        if OwnThread::is_own(self.id) {
            return Err(FlushError::in_handler());
        }
        if self.wait_quiescent(Instant::now().checked_add(timeout), false) {
            Ok(())
        } else {
            Err(FlushError::timeout(self.pending()))
        }
    }

    /// Each worker's counts: read now, or as `frozen` when shutdown detached it (a detached
    /// worker's later writes do not count).
    fn worker_counts<'a>(
        &'a self,
        frozen: &'a [Option<WorkerCounts>],
    ) -> impl Iterator<Item = WorkerCounts> + 'a {
        self.shards.iter().enumerate().map(|(index, shard)| {
            match frozen.get(index).copied().flatten() {
                Some(counts) => counts,
                None => shard.worker.stats.read(),
            }
        })
    }

    /// The counts, with what shutdown itself settled (`abandoned`, `swept`), the gates' net
    /// count (read now when `None`) and the counts of the workers shutdown detached.
    fn stats_with(
        &self,
        abandoned: u64,
        swept: Swept,
        net: Option<u64>,
        frozen: &[Option<WorkerCounts>],
    ) -> BusStats {
        let mut stats = BusStats {
            abandoned,
            left: swept.left,
            dead_lettered: swept.dead_lettered,
            discarded: swept.discarded,
            evicted: self.dead_letters.evicted(),
            unmatched: self.unmatched.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
            callback_panics: self.panics.counts(),
            ..BusStats::default()
        };
        let d = &self.deferrals;
        stats.succeeded += d.succeeded.load(Ordering::Relaxed);
        stats.failed += d.failed.load(Ordering::Relaxed);
        stats.retried += d.retried.load(Ordering::Relaxed);
        stats.dead_lettered += d.dead_lettered.load(Ordering::Relaxed);
        stats.discarded += d.discarded.load(Ordering::Relaxed);
        let mut settled = abandoned + swept.total() + d.settled.load(Ordering::Acquire);
        for w in self.worker_counts(frozen) {
            settled += w.settled;
            stats.succeeded += w.succeeded;
            stats.failed += w.failed;
            stats.panicked += w.panicked;
            stats.discarded += w.discarded;
            stats.cancelled += w.cancelled;
            stats.left += w.left;
            stats.retried += w.retried;
            stats.dead_lettered += w.dead_lettered;
        }
        let net = net.unwrap_or_else(|| net_sum(self.shards.iter().map(|s| &*s.gate)));
        let out = outstanding(net, settled);
        stats.in_flight = out.max(0) as u64;
        stats.delivered = settled.wrapping_add_signed(out);
        stats
    }

    fn stats(&self) -> BusStats {
        if let Lifecycle::Done(report) = &*self.lifecycle.lock() {
            return BusStats {
                refused: self.refused.load(Ordering::Relaxed),
                callback_panics: self.panics.counts(),
                ..report.stats.clone()
            };
        }
        let stats = self.stats_with(0, Swept::default(), None, &[]);
        BusStats {
            // A worker may settle an event a moment before its publisher counts it accepted:
            // live counts never show fewer deliveries than outcomes.
            delivered: stats.succeeded
                + stats.dead_lettered
                + stats.discarded
                + stats.cancelled
                + stats.left
                + stats.in_flight,
            ..stats
        }
    }

    fn metrics(&self) -> MetricsSnapshot {
        let metrics = &self.metrics;
        let mut snapshot = MetricsSnapshot {
            enabled: metrics.enabled,
            sample_every: metrics.sample_every,
            stats: BusStats::default(),
            events: Vec::new(),
            handlers: Vec::new(),
            event_latency: Vec::new(),
            queue_depth: Vec::new(),
            timer_pending: 0,
            dead_letters_held: 0,
            workers_behind: Vec::new(),
            bridges: Vec::new(),
        };
        if metrics.enabled {
            let asked: Vec<(&Collect, u64)> = self
                .shards
                .iter()
                .map(|shard| {
                    let asked = shard.worker.collect.ask();
                    // Wakes a waiting worker; a full channel means the worker is busy and
                    // answers between two batches.
                    let _ = shard.tx.try_send(Msg::Wake);
                    (&shard.worker.collect, asked)
                })
                .collect();
            // A handler asking cannot wait for its own worker.
            let own = OwnThread::worker_of(self.id);
            snapshot.workers_behind = Collect::wait_all(asked.iter().copied(), own);
            snapshot.events = self.registry.counters.event_counts();
            (snapshot.handlers, snapshot.event_latency) = metrics.handler_metrics();
        }
        snapshot.stats = self.stats();
        snapshot.queue_depth = self
            .shards
            .iter()
            .map(|s| (s.rx.len() + s.worker.spill_len.load(Ordering::Relaxed)) as u64)
            .collect();
        snapshot.timer_pending = self.timer.len() as u64;
        snapshot.dead_letters_held = self.dead_letters.len() as u64;
        snapshot.bridges = self.bridges.lock().iter().filter_map(|b| b()).collect();
        snapshot
    }

    pub(crate) fn shutdown(
        self: &Arc<Self>,
        timeout: Duration,
    ) -> Result<ShutdownReport, ShutdownError> {
        if OwnThread::is_own(self.id) {
            return Err(ShutdownError::InHandler);
        }
        {
            let mut lifecycle = self.lifecycle.lock();
            loop {
                match &*lifecycle {
                    Lifecycle::Running => break,
                    Lifecycle::Stopping => self.lifecycle_cv.wait(&mut lifecycle),
                    Lifecycle::Done(report) => return Ok((**report).clone()),
                }
            }
            *lifecycle = Lifecycle::Stopping;
        }
        let started = Instant::now();
        // The shutdown thread runs no user code, so nothing should unwind out of `stop`; if
        // something does all the same, the bus still ends up stopped, never half-way.
        let report = catch_unwind(AssertUnwindSafe(|| self.stop(started, timeout))).unwrap_or_else(
            |payload| {
                crate::guard::drop_payload(payload);
                self.stopped.store(true, Ordering::SeqCst);
                ShutdownReport {
                    stats: self.stats_with(0, Swept::default(), None, &[]),
                    deadline_passed: true,
                    abandoned: Vec::new(),
                    cut_off: 0,
                    elapsed: started.elapsed(),
                }
            },
        );
        *self.lifecycle.lock() = Lifecycle::Done(Box::new(report.clone()));
        self.lifecycle_cv.notify_all();
        Ok(report)
    }

    /// Stops the bus (see [`Bus::shutdown`]): by `timeout` after `started` plus
    /// [`SHUTDOWN_GRACE`], whatever user code is running.
    fn stop(self: &Arc<Self>, started: Instant, timeout: Duration) -> ShutdownReport {
        let deadline = started.checked_add(timeout);
        // The latest it returns (`None`: it waits for ever).
        let last = deadline.and_then(|d| d.checked_add(SHUTDOWN_GRACE));
        let past = |at: Option<Instant>| at.is_some_and(|at| Instant::now() >= at);
        self.closing.store(true, Ordering::SeqCst);
        for shard in self.shards.iter() {
            shard.gate.close();
        }
        drop(self.signal_tx.lock().take());
        // Retries not due before the deadline will not run: no need to wait for it.
        let quiet = self.wait_quiescent(deadline, true);

        self.timer.stop();
        if let Some(thread) = self.timer_thread.lock().take() {
            let _ = thread.join();
        }
        // What waits on the timer does not run: events to re-offer are left, retries not yet
        // due are failed deliveries given up. User code that follows goes to `leftovers`, for
        // a thread that shutdown can leave behind.
        let mut leftovers = Leftovers::default();
        let mut swept = Swept::default();
        for routed in self.timer.take() {
            swept.add(self, routed.work, &mut leftovers);
        }

        // Stop the workers between deliveries. Past the deadline, a worker still inside a
        // handler or a callback is detached: the compare-and-swap on its state word decides
        // whether the worker or shutdown owns what it holds, and its counts are frozen.
        for shard in self.shards.iter() {
            shard.worker.stop.store(true, Ordering::SeqCst);
            let _ = shard.tx.try_send(Msg::Wake);
        }
        let mut running: Vec<(usize, JoinHandle<()>)> =
            std::mem::take(&mut *self.worker_threads.lock())
                .into_iter()
                .enumerate()
                .collect();
        let mut abandoned = Vec::new();
        let mut frozen: Vec<Option<WorkerCounts>> = vec![None; self.shards.len()];
        let mut step = 0;
        while !running.is_empty() {
            let past_deadline = past(deadline);
            let past_last = past(last);
            let mut index = 0;
            while index < running.len() {
                let (worker, thread) = &running[index];
                let worker = *worker;
                let shared = &self.shards[worker].worker;
                if thread.is_finished() {
                    let (_, thread) = running.swap_remove(index);
                    let _ = thread.join();
                    continue;
                }
                let taken = if past_deadline {
                    shared.abandon()
                } else {
                    None
                };
                // Past the grace a worker that has not come back from the bus's own code is
                // left too (it settles nothing the report counts).
                let taken = taken
                    .or_else(|| past_last.then(|| shared.state.swap(ABANDONED, Ordering::AcqRel)));
                match taken {
                    Some(state) => {
                        frozen[worker] = Some(shared.stats.read());
                        abandoned.push((worker, state));
                        // Detached: it exits when it comes back.
                        running.swap_remove(index);
                    }
                    None => index += 1,
                }
            }
            if !running.is_empty() {
                backoff(&mut step);
            }
        }
        self.stopped.store(true, Ordering::SeqCst);

        // Deferred deliveries not completed by now never will be, as far as the report goes.
        let mut detached = self.deferrals.abandon_all(
            |sub| {
                self.registry
                    .lookup(sub)
                    .map_or_else(|| "?".to_owned(), |m| m.name.to_string())
            },
            &mut leftovers,
        );
        let mut given_up = detached.len() as u64;
        for &(index, state) in &abandoned {
            let worker: &WorkerShared = &self.shards[index].worker;
            let name = format!("microbus-worker-{index}");
            let event_id = worker.current_event();
            let in_handler = state != IDLE && state != ABANDONED && seam_of(state).is_none();
            match in_handler {
                false => {
                    // In a callback (or the bus's own code): what it held is abandoned.
                    let held = worker.holding.load(Ordering::Relaxed);
                    given_up += held;
                    detached.push(AbandonedDelivery {
                        worker: name,
                        event: "?",
                        event_id,
                        handler: String::new(),
                        seam: Some(seam_of(state).map_or("bus", |seam| seam.name())),
                        deliveries: held,
                    });
                }
                true => {
                    // In a handler: that delivery is abandoned, the event's later deliveries
                    // are left, and its failed ones held for retry are discarded.
                    let left = worker.remaining.load(Ordering::Relaxed);
                    let held = worker.held_retries.load(Ordering::Relaxed);
                    given_up += 1;
                    swept.left += left;
                    swept.discarded += held;
                    let meta = self.registry.lookup(state);
                    detached.push(AbandonedDelivery {
                        worker: name,
                        event: meta.as_ref().map_or("?", |m| m.event_name),
                        event_id,
                        handler: meta.map_or_else(|| "?".to_owned(), |m| m.name.to_string()),
                        seam: None,
                        deliveries: 1 + left + held,
                    });
                }
            }
        }
        // What is left in the channels and spill queues never ran. A publisher that counted
        // its event in before the gates closed may still be sending it, or giving it back:
        // sweep until the ledger balances (or, should it not, until the grace runs out: what
        // is missing then is counted as abandoned).
        let mut step = 0;
        let net = loop {
            for shard in self.shards.iter() {
                while let Ok(msg) = shard.rx.try_recv() {
                    if let Msg::Work(work) = msg {
                        swept.add(self, work, &mut leftovers);
                    }
                }
                for routed in shard.worker.take_spill() {
                    swept.add(self, routed.work, &mut leftovers);
                }
            }
            let settled = self
                .settled_with(&frozen)
                .wrapping_add(given_up)
                .wrapping_add(swept.total());
            let net = net_sum(self.shards.iter().map(|s| &*s.gate));
            // A publisher refused after the closing may add and refund in between: that only
            // ever makes the reading larger for a moment.
            let out = outstanding(net, settled);
            if out <= 0 {
                break net;
            }
            if past(last) {
                given_up += out as u64;
                break net;
            }
            backoff(&mut step);
        };
        // A stopped bus keeps no user code: the handler tables, the taps, the dead-letter hook
        // and sink, and the dead letters' way back to their handlers go, so that the user's
        // handles are their last owners (a handler that captured a `Bus` is no cycle).
        leftovers.drop(self.registry.forget());
        leftovers.drop(self.taps.forget());
        leftovers.drop(self.dead_letters.forget_callbacks());
        // Last, once the leftovers have made their dead letters too.
        let core = self.clone();
        leftovers.push(move |runner| drop_with(runner, core.dead_letters.strip_redrives()));
        let cut_off = self.clean_up(leftovers, last);
        ShutdownReport {
            stats: self.stats_with(given_up, swept, Some(net), &frozen),
            deadline_passed: !quiet || !detached.is_empty(),
            abandoned: detached,
            cut_off,
            elapsed: started.elapsed(),
        }
    }

    /// Runs the user code shutdown left over on a thread of its own, and waits for it until
    /// `last`: how many jobs it had not finished by then (it carries on, detached).
    fn clean_up(self: &Arc<Self>, leftovers: Leftovers, last: Option<Instant>) -> u64 {
        let jobs = leftovers.len() as u64;
        if jobs == 0 {
            return 0;
        }
        let finished = Arc::new(AtomicU64::new(0));
        let (done_tx, done_rx) = crossbeam_channel::bounded::<()>(1);
        let jobs_cell = Arc::new(Mutex::new(Some(leftovers)));
        let thread = {
            let (finished, jobs_cell, core) = (finished.clone(), jobs_cell.clone(), self.clone());
            std::thread::Builder::new()
                .name("microbus-cleanup".to_owned())
                .spawn(move || {
                    if let Some(leftovers) = jobs_cell.lock().take() {
                        leftovers.run(&mut &core.panics, &finished);
                    }
                    let _ = done_tx.send(());
                })
        };
        if thread.is_err() {
            // No thread to be had: run them here, whatever the deadline.
            if let Some(leftovers) = jobs_cell.lock().take() {
                leftovers.run(&mut &self.panics, &finished);
            }
            return 0;
        }
        let _ = match last {
            Some(last) => done_rx.recv_deadline(last).map_err(|_| ()),
            None => done_rx.recv().map_err(|_| ()),
        };
        jobs - finished.load(Ordering::Acquire).min(jobs)
    }
}

impl Drop for Core {
    /// The dead letters still held go last, their events' `Drop` (user code) under the guard:
    /// nothing unwinds out of the drop of the last handle.
    fn drop(&mut self) {
        let letters = self
            .dead_letters
            .take(&crate::dead_letter::DeadLetterFilter::new());
        self.panics.drop(letters);
    }
}

/// The user handle's share of the bus: dropping the last one shuts the bus down.
struct Handle {
    core: Arc<Core>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        let timeout = self.core.config.shutdown_timeout;
        if OwnThread::is_own(self.core.id) {
            // The last handle went away on one of the bus's own threads (a handler held it):
            // that thread cannot join itself, so another one shuts the bus down.
            let core = self.core.clone();
            let _ = std::thread::Builder::new()
                .name("microbus-shutdown".to_owned())
                .spawn(move || {
                    let _ = core.shutdown(timeout);
                });
        } else if self.core.is_running() {
            // Not while a shutdown is under way: this may be its own leftovers being dropped
            // (a handler that held the last handle), which it waits for.
            let _ = self.core.shutdown(timeout);
        }
    }
}

/// Builds a [`Bus`]: `Bus::builder().workers(4).build()?`.
///
/// Every setting is checked by [`build`](Self::build), which names the field it refuses.
#[derive(Clone, Default)]
pub struct BusBuilder {
    config: Config,
    dead_letter_sink: Option<DeadLetterSink>,
    dead_letter_file: Option<std::path::PathBuf>,
    on_dead_letter: Option<DeadLetterSink>,
}

impl fmt::Debug for BusBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BusBuilder")
            .field("config", &self.config)
            .field("dead_letter_sink", &self.dead_letter_sink.is_some())
            .field("dead_letter_file", &self.dead_letter_file)
            .field("on_dead_letter", &self.on_dead_letter.is_some())
            .finish()
    }
}

impl BusBuilder {
    /// The service name stamped as the source of events published through the bus handle
    /// itself (default [`DEFAULT_SERVICE_NAME`](crate::DEFAULT_SERVICE_NAME)).
    pub fn service_name(mut self, name: impl Into<String>) -> Self {
        self.config.service_name = name.into();
        self
    }

    /// The number of worker threads, which is also the number of shards and the most handlers
    /// that run at once (default: the number of cores; at most
    /// [`MAX_WORKERS`](crate::MAX_WORKERS)).
    pub fn workers(mut self, workers: usize) -> Self {
        self.config.workers = workers;
        self
    }

    /// Each shard's channel capacity, in events (default
    /// [`DEFAULT_CHANNEL_CAPACITY`](crate::DEFAULT_CHANNEL_CAPACITY)). A full shard makes
    /// `publish` wait.
    pub fn channel_capacity(mut self, capacity: usize) -> Self {
        self.config.channel_capacity = capacity;
        self
    }

    /// How many events published by handlers a worker keeps aside while their shard is full,
    /// before it hands them to the timer (default: the channel capacity; 0 sends them straight
    /// to the timer).
    pub fn spill_capacity(mut self, capacity: usize) -> Self {
        self.config.spill_capacity = Some(capacity);
        self
    }

    /// How long [`Bus::shutdown`] (and dropping the last handle) lets handlers finish what was
    /// accepted (default [`DEFAULT_SHUTDOWN_TIMEOUT`](crate::DEFAULT_SHUTDOWN_TIMEOUT)).
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.config.shutdown_timeout = timeout;
        self
    }

    /// The retry policy of subscriptions that do not set their own (default
    /// [`RetryPolicy::default`]: exponential from 5 s, 4 attempts in all).
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.config.retry = policy;
        self
    }

    /// How many dead letters the ring keeps (default
    /// [`DEFAULT_DEAD_LETTER_CAPACITY`](crate::DEFAULT_DEAD_LETTER_CAPACITY); 0 turns dead
    /// letters off, and deliveries that fail for good are discarded).
    pub fn dead_letter_capacity(mut self, capacity: usize) -> Self {
        self.config.dead_letter_capacity = capacity;
        self
    }

    /// Receives every dead letter evicted from the full ring, so that none disappears without
    /// a trace. It runs on the thread that dead-lettered the delivery (a worker), after the
    /// delivery is settled, so it should be quick; it runs under the bus's guard: a panic is
    /// caught and counted in [`CallbackPanics::sink`](crate::CallbackPanics::sink), and a sink still running at the
    /// shutdown deadline is left behind.
    pub fn dead_letter_sink(mut self, sink: impl Fn(&DeadLetter) + Send + Sync + 'static) -> Self {
        self.dead_letter_sink = Some(Arc::new(sink));
        self
    }

    /// Appends every dead letter evicted from the full ring to the file at `path`, one JSON
    /// line each ([`DeadLetter::to_json`]), so that they outlive the ring and the process;
    /// [`DeadLetters::load_json_lines`] reads them back. Works beside a
    /// [`dead_letter_sink`](Self::dead_letter_sink). The file is opened (and created) by
    /// [`build`](Self::build). A line that cannot be written is counted in
    /// [`DeadLetters::sink_failures`].
    pub fn dead_letter_file(mut self, path: impl Into<std::path::PathBuf>) -> Self {
        self.dead_letter_file = Some(path.into());
        self
    }

    /// At shutdown, keeps the deliveries that never ran as dead letters (reason
    /// [`Shutdown`](DeadLetterReason::Shutdown), no attempts, no errors) instead of counting
    /// them as left: with a [`dead_letter_file`](Self::dead_letter_file), or an
    /// [`export_json`](DeadLetters::export_json) before exit, they survive a restart and can be
    /// redriven. It takes those waiting in the shards' channels, the workers' spill queues and
    /// on the timer (delayed events); the deliveries after a handler still running at the
    /// deadline stay left, and so does everything with dead letters off. Off by default.
    pub fn dead_letter_left_at_shutdown(mut self, keep: bool) -> Self {
        self.config.dead_letter_left = keep;
        self
    }

    /// Called with every new dead letter, for alerting, once it is in the ring (and its
    /// delivery settled). It runs on the thread that dead-lettered it (a worker), so it should
    /// be quick; it runs under the bus's guard: a panic is caught and counted in
    /// [`CallbackPanics::hook`](crate::CallbackPanics::hook), and a hook still running at the shutdown deadline is left
    /// behind.
    pub fn on_dead_letter(mut self, hook: impl Fn(&DeadLetter) + Send + Sync + 'static) -> Self {
        self.on_dead_letter = Some(Arc::new(hook));
        self
    }

    /// Keeps the last `capacity` deliveries (event ids, names, sources, correlation and
    /// causation, handler, outcome, timing) for [`Bus::trace`] (default 0: off, and a
    /// delivery pays nothing for it).
    pub fn trace_capacity(mut self, capacity: usize) -> Self {
        self.config.trace_capacity = capacity;
        self
    }

    /// Turns metrics on or off (default on). Off, a delivery takes no timestamps and touches
    /// no metrics counter, and [`Bus::metrics`] returns only the bus-wide figures.
    pub fn metrics(mut self, enabled: bool) -> Self {
        self.config.metrics = enabled;
        self
    }

    /// How idle workers wait for work (default [`WaitStrategy::Block`]).
    pub fn wait_strategy(mut self, strategy: WaitStrategy) -> Self {
        self.config.wait_strategy = strategy;
        self
    }

    /// Records latencies for one delivery in `n` (default 1: every delivery). Counters stay
    /// exact; the snapshot states `n`.
    pub fn metrics_sample_every(mut self, n: u32) -> Self {
        self.config.metrics_sample_every = n;
        self
    }

    /// Seeds the generator that jitters retry delays, for runs that repeat exactly (default: a
    /// random seed).
    pub fn retry_seed(mut self, seed: u64) -> Self {
        self.config.retry_seed = Some(seed);
        self
    }

    /// Checks the settings and starts the worker threads and the timer thread.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] naming the first invalid field: zero or too many `workers`, a zero or
    /// too large `channel_capacity` or `spill_capacity`, an empty or malformed `service_name`,
    /// a `shutdown_timeout` over a day, a `retry` policy out of bounds. If the system refuses to start a thread, the error
    /// names `workers`.
    pub fn build(self) -> Result<Bus, ConfigError> {
        let config = self.config.clone();
        config.validate()?;
        let (signal_tx, signal_rx) = crossbeam_channel::bounded(0);
        let shards = (0..config.workers)
            .map(|_| {
                let (tx, rx) = crossbeam_channel::bounded(config.channel_capacity);
                Shard {
                    gate: CachePadded::new(Gate::new()),
                    tx,
                    rx,
                    worker: CachePadded::new(WorkerShared::default()),
                }
            })
            .collect();
        let source = NameId::intern(&config.service_name);
        let id = NEXT_BUS_ID.fetch_add(1, Ordering::Relaxed);
        let jitter_seed = config.retry_seed.unwrap_or_else(|| {
            use std::hash::{BuildHasher, Hasher};
            let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
            hasher.write_u64(id);
            hasher.finish()
        });
        let sink_failures = Arc::new(AtomicU64::new(0));
        let sink = match &self.dead_letter_file {
            None => self.dead_letter_sink,
            Some(path) => {
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|e| {
                        ConfigError::new(
                            "dead_letter_file",
                            format!("cannot open {}: {e}", path.display()),
                        )
                    })?;
                let file = Mutex::new(std::io::LineWriter::new(file));
                let user = self.dead_letter_sink;
                let failures = sink_failures.clone();
                let sink: DeadLetterSink = Arc::new(move |letter: &DeadLetter| {
                    use std::io::Write;
                    if writeln!(file.lock(), "{}", letter.to_json()).is_err() {
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                    if let Some(user) = &user {
                        user(letter);
                    }
                });
                Some(sink)
            }
        };
        let dead_letters = Ring::new(
            config.dead_letter_capacity,
            sink,
            self.on_dead_letter,
            sink_failures,
        );
        let metrics_on = config.metrics;
        let core = Arc::new(Core {
            id,
            panics: Panics::default(),
            dead_letters,
            taps: Taps::default(),
            traces: TraceRing::new(config.trace_capacity),
            metrics: Metrics::new(config.metrics, config.metrics_sample_every),
            deferrals: Deferrals::default(),
            bridges: Mutex::new(Vec::new()),
            republishers: Mutex::default(),
            jitter_seed,
            spill_capacity: config.spill_capacity(),
            config,
            registry: Registry::new(id, metrics_on),
            shards,
            timer: Timer::new(),
            signal_tx: Mutex::new(Some(signal_tx)),
            signal_rx,
            closing: AtomicBool::new(false),
            stopped: AtomicBool::new(false),
            unmatched: CachePadded::new(AtomicU64::new(0)),
            refused: AtomicU64::new(0),
            idle_lock: Mutex::new(()),
            idle_cv: Condvar::new(),
            idle_waiters: AtomicUsize::new(0),
            lifecycle: Mutex::new(Lifecycle::Running),
            lifecycle_cv: Condvar::new(),
            worker_threads: Mutex::new(Vec::new()),
            timer_thread: Mutex::new(None),
        });
        // From here on the handle owns the bus: if a thread fails to start, dropping it stops
        // the threads already running.
        let bus = Bus {
            handle: Arc::new(Handle { core: core.clone() }),
            source,
        };
        let spawn_error = |e: std::io::Error| {
            ConfigError::new("workers", format!("could not start a thread: {e}"))
        };
        for index in 0..core.shards.len() {
            let worker_core = core.clone();
            let thread = std::thread::Builder::new()
                .name(format!("microbus-worker-{index}"))
                .spawn(move || run_worker(worker_core, index))
                .map_err(spawn_error)?;
            core.worker_threads.lock().push(thread);
        }
        let timer_core = core.clone();
        let thread = std::thread::Builder::new()
            .name("microbus-timer".to_owned())
            .spawn(move || {
                let _own = OwnThread::enter(timer_core.id, None);
                timer_core
                    .timer
                    .run(|routed| offer_due(&timer_core.shards, routed));
            })
            .map_err(spawn_error)?;
        *core.timer_thread.lock() = Some(thread);
        Ok(bus)
    }
}

/// A handle to an event bus, as seen from one service.
///
/// Handles are cheap to clone and share one bus. Events published through a handle come from
/// its service: the bus's own [`service_name`](BusBuilder::service_name), or the name given to
/// [`Bus::service`]. Dropping the last handle shuts the bus down as [`Bus::shutdown`] does.
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

    /// Publishes `event`, waiting while its shard is full.
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
    pub fn publish<E: Event>(&self, event: E) -> Result<(), PublishError<E>> {
        self.publish_with(event, Publish::new())
    }

    /// Publishes `event` with options (key, correlation, causation, headers), waiting while
    /// its shard is full.
    ///
    /// # Errors
    ///
    /// As [`publish`](Self::publish).
    pub fn publish_with<E: Event>(
        &self,
        event: E,
        options: Publish,
    ) -> Result<(), PublishError<E>> {
        self.core()
            .publish(self.source, event, Stamp::New(options), Mode::Block)
            .map_err(|(why, e)| refused(why, e))
    }

    /// Publishes `event` with an envelope made elsewhere — read back from a file or received
    /// from another process — keeping its id, correlation, causation, source, key and
    /// headers: the event re-enters the bus as the same event, published by the service the
    /// envelope names. Waits while the shard is full, as [`publish`](Self::publish) does.
    ///
    /// # Examples
    ///
    /// ```
    /// use microbus::{Bus, Context, Envelope, Event, HandlerResult};
    /// use serde::{Deserialize, Serialize};
    /// use std::sync::{Arc, Mutex};
    /// use std::time::Duration;
    ///
    /// #[derive(Debug, Serialize, Deserialize)]
    /// struct OrderPaid { order_id: u64 }
    /// impl Event for OrderPaid { const NAME: &'static str = "OrderPaid"; }
    ///
    /// // An envelope that travelled as JSON, say from another process.
    /// let original = Bus::builder().service_name("payments").build()?;
    /// let seen = Arc::new(Mutex::new(None));
    /// let sent = seen.clone();
    /// original.subscribe(move |_: &OrderPaid, ctx: &Context| -> HandlerResult {
    ///     *sent.lock().unwrap() = Some(serde_json::to_string(ctx.envelope()).unwrap());
    ///     Ok(())
    /// })?;
    /// original.publish(OrderPaid { order_id: 7 })?;
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
    /// bus.publish_envelope(OrderPaid { order_id: 7 }, envelope.clone())?;
    /// bus.flush(Duration::from_secs(5))?;
    /// let arrived = arrived.lock().unwrap().take().unwrap();
    /// assert_eq!(arrived, envelope);
    /// assert_eq!(arrived.source(), "payments");
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    ///
    /// [`PublishError::Shutdown`] with the event when the bus is shutting down.
    pub fn publish_envelope<E: Event>(
        &self,
        event: E,
        envelope: Envelope,
    ) -> Result<(), PublishError<E>> {
        let source = envelope.source_id();
        self.core()
            .publish(source, event, Stamp::Given(envelope), Mode::Block)
            .map_err(|(why, e)| refused(why, e))
    }

    /// Publishes `event` as [`publish_with`](Self::publish_with) does and returns a
    /// [`Tracker`] that completes once every delivery of the event has settled (succeeded,
    /// dead-lettered, discarded, cancelled, left or abandoned), with what became of each.
    ///
    /// # Examples
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
    /// let tracker = bus.publish_tracked(OrderPaid { order_id: 7 }, Publish::new())?;
    /// let done = tracker.wait(Duration::from_secs(5)).expect("settled");
    /// assert_eq!((done.deliveries, done.succeeded, done.dead_lettered), (2, 1, 1));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    ///
    /// [`PublishError::Shutdown`] with the event when the bus is shutting down.
    pub fn publish_tracked<E: Event>(
        &self,
        event: E,
        options: Publish,
    ) -> Result<Tracker, PublishError<E>> {
        let tracking = Tracking::new();
        let options = options.tracked(tracking.clone());
        self.core()
            .publish(self.source, event, Stamp::New(options), Mode::Block)
            .map_err(|(why, e)| refused(why, e))?;
        Ok(Tracker(tracking))
    }

    /// [`publish_envelope`](Self::publish_envelope) with a [`Tracker`], as
    /// [`publish_tracked`](Self::publish_tracked) gives: what a bridge acknowledges by.
    ///
    /// # Errors
    ///
    /// [`PublishError::Shutdown`] with the event when the bus is shutting down.
    pub fn publish_envelope_tracked<E: Event>(
        &self,
        event: E,
        envelope: Envelope,
    ) -> Result<Tracker, PublishError<E>> {
        let tracking = Tracking::new();
        let envelope = envelope.with_tracker(tracking.clone());
        let source = envelope.source_id();
        self.core()
            .publish(source, event, Stamp::Given(envelope), Mode::Block)
            .map_err(|(why, e)| refused(why, e))?;
        Ok(Tracker(tracking))
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
    /// headers, a correlation).
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
                items
                    .into_iter()
                    .map(|(event, options)| (event, Stamp::New(options))),
            )
            .map_err(|(why, back)| match why {
                Refusal::Full => PublishBatchError::full(back),
                Refusal::Timeout | Refusal::Shutdown => PublishBatchError::new(back),
            })
    }

    /// Publishes `event` to be delivered after `delay`: it is accepted now (and counted by
    /// `flush` and `shutdown`) and waits on the timer, then goes to its shard. Never waits.
    /// Shutdown does not wait for a delayed event that falls due after its deadline; it is
    /// reported as left.
    ///
    /// # Errors
    ///
    /// [`PublishError::Shutdown`] with the event when the bus is shutting down.
    pub fn publish_delayed<E: Event>(
        &self,
        event: E,
        delay: Duration,
    ) -> Result<(), PublishError<E>> {
        self.publish_delayed_with(event, Publish::new(), delay)
    }

    /// [`publish_delayed`](Self::publish_delayed) with options.
    ///
    /// # Errors
    ///
    /// As [`publish_delayed`](Self::publish_delayed).
    pub fn publish_delayed_with<E: Event>(
        &self,
        event: E,
        options: Publish,
        delay: Duration,
    ) -> Result<(), PublishError<E>> {
        self.core()
            .publish_delayed(self.source, event, options, delay)
            .map_err(PublishError::Shutdown)
    }

    /// Publishes `event` if its shard has room now; never waits.
    ///
    /// # Errors
    ///
    /// [`TryPublishError::Full`] or [`TryPublishError::Shutdown`], with the event.
    pub fn try_publish<E: Event>(&self, event: E) -> Result<(), TryPublishError<E>> {
        self.try_publish_with(event, Publish::new())
    }

    /// [`try_publish`](Self::try_publish) with options.
    ///
    /// # Errors
    ///
    /// As [`try_publish`](Self::try_publish).
    pub fn try_publish_with<E: Event>(
        &self,
        event: E,
        options: Publish,
    ) -> Result<(), TryPublishError<E>> {
        self.core()
            .publish(self.source, event, Stamp::New(options), Mode::Try)
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
    ) -> Result<(), PublishTimeoutError<E>> {
        self.publish_timeout_with(event, Publish::new(), timeout)
    }

    /// [`publish_timeout`](Self::publish_timeout) with options.
    ///
    /// # Errors
    ///
    /// As [`publish_timeout`](Self::publish_timeout).
    pub fn publish_timeout_with<E: Event>(
        &self,
        event: E,
        options: Publish,
        timeout: Duration,
    ) -> Result<(), PublishTimeoutError<E>> {
        let mode = match Instant::now().checked_add(timeout) {
            Some(deadline) => Mode::Until(deadline),
            None => Mode::Block,
        };
        self.core()
            .publish(self.source, event, Stamp::New(options), mode)
            .map_err(|(why, e)| match why {
                Refusal::Shutdown => PublishTimeoutError::Shutdown(e),
                Refusal::Full | Refusal::Timeout => PublishTimeoutError::Timeout(e),
            })
    }

    fn subscribe_boxed<E: Event>(
        &self,
        options: SubscribeOptions,
        default_name: &str,
        handler: HandlerFn<E>,
    ) -> Result<Subscription, SubscribeError> {
        let core = self.core();
        if core.is_closing() {
            return Err(SubscribeError::Shutdown);
        }
        let retry = options.retry.unwrap_or(core.config.retry);
        retry
            .validate("retry")
            .map_err(|_| SubscribeError::InvalidRetry)?;
        let filter = match &options.from {
            Some(name) => {
                check_name("source", name).map_err(|_| SubscribeError::InvalidSource)?;
                Some(NameId::intern(name))
            }
            None => None,
        };
        let meta = Arc::new(SubMeta {
            id: core.registry.next_id(),
            name: options.name.as_deref().unwrap_or(default_name).into(),
            service: self.source,
            filter,
            event_name: E::NAME,
            type_id: TypeId::of::<E>(),
            since_gen: AtomicU32::new(0),
            retry,
            active: AtomicBool::new(true),
            failed: AtomicU64::new(0),
            panicked: AtomicU64::new(0),
            cancelled: AtomicU64::new(0),
            retried: AtomicU64::new(0),
            dead_lettered: AtomicU64::new(0),
            deferred_succeeded: AtomicU64::new(0),
            last_error: Mutex::new(None),
            cells: crate::metrics::cells(core.metrics.enabled, core.shards.len()),
        });
        core.metrics.subscribed(&meta);
        let meta = core.registry.insert(Sub { meta, handler });
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
        self.subscribe_boxed(options, std::any::type_name::<F>(), Box::new(handler))
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
    /// assert_eq!(handler.handler_time.count, 100);
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
            .registry
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

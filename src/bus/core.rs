//! The state one bus shares between its handles, subscriptions and threads ([`Core`]), and
//! the handle count that decides its lifetime.

use super::*;

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
    #[inline]
    pub(super) fn is_own(bus: u64) -> bool {
        OWN.with(|own| own.get().0 == bus)
    }

    /// The index of the current thread if it is a worker of bus `bus`.
    #[inline]
    pub(super) fn worker_of(bus: u64) -> Option<usize> {
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

pub(super) static NEXT_BUS_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// How many times a publisher that found its shard full tries again (spinning, then yielding)
/// before it blocks.
pub(super) const SEND_BACKOFF_STEPS: u32 = 10;

/// How a publisher waits when its shard is full.
#[derive(Clone, Copy)]
pub(crate) enum Mode {
    Block,
    Try,
    Until(Instant),
    /// Waits for room even while the bus shuts down: the event is accepted already (another
    /// lane has it), and the workers drain the channel until the deadline, then shutdown.
    Accepted,
}

/// Why an event was handed back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    Full,
    Timeout,
    Shutdown,
}

/// The error of a blocking publish that was refused.
pub(super) fn refused<E>(why: Refusal, event: E) -> PublishError<E> {
    match why {
        Refusal::Full => PublishError::Full(event),
        Refusal::Timeout | Refusal::Shutdown => PublishError::Shutdown(event),
    }
}

pub(super) enum Lifecycle {
    Running,
    Stopping,
    Done(Box<ShutdownReport>),
}

/// The state shared by every handle, subscription and thread of one bus.
pub(crate) struct Core {
    /// Itself, for threads that must not keep it alive (user callbacks run off the workers).
    pub(crate) this: std::sync::Weak<Core>,
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
    pub(super) jitter_seed: u64,
    pub(crate) config: Config,
    pub(super) spill_capacity: usize,
    pub(crate) registry: Registry,
    /// How dead letters read from a file become deliveries again.
    pub(crate) rebuilders: super::rebuild::Rebuilders,
    /// Every lane's shards, lane after lane (see [`LaneState::start`]).
    pub(crate) shards: Box<[Shard]>,
    /// The default lane's worker count, kept here (its shards are the first ones) so that
    /// a publish to the default lane reads nothing of [`lanes`](Self::lanes).
    pub(crate) default_workers: usize,
    /// The lanes, the default one first.
    pub(crate) lanes: Box<[LaneState]>,
    /// Deliveries settled by publishers: shed by a full `Shed` lane, or left when shutdown
    /// closed a lane while the event waited for room in it after another lane had taken it.
    pub(crate) shed_books: ShedBooks,
    /// Stalled deliveries.
    pub(crate) stalls: super::stalls::Stalls,
    /// Subscriptions with as many deliveries parked as they may have: while any, a publish
    /// checks whether it matches one.
    pub(crate) parks_full: AtomicUsize,
    /// Keys released because the dead letter that held them was evicted.
    pub(crate) held_evicted: AtomicU64,
    /// The thread that runs stall and breaker reports to user code.
    pub(crate) reports: super::stalls::Reports,
    /// The subscriptions with circuit breakers, for the timer thread to watch.
    pub(crate) breakers: Mutex<Vec<Arc<SubMeta>>>,
    pub(super) timer: Timer<Routed>,
    /// Where the bus reads the time (see `clock`).
    pub(crate) clock: crate::clock::Clock,
    pub(super) signal_tx: Mutex<Option<Sender<()>>>,
    pub(super) signal_rx: Receiver<()>,
    pub(super) closing: AtomicBool,
    pub(super) stopped: AtomicBool,
    pub(crate) unmatched: CachePadded<AtomicU64>,
    pub(super) refused: AtomicU64,
    pub(super) idle_lock: Mutex<()>,
    pub(super) idle_cv: Condvar,
    pub(super) idle_waiters: AtomicUsize,
    pub(super) lifecycle: Mutex<Lifecycle>,
    pub(super) lifecycle_cv: Condvar,
    pub(super) worker_threads: Mutex<Vec<JoinHandle<()>>>,
    pub(super) timer_thread: Mutex<Option<JoinHandle<()>>>,
}

/// A lane as the bus runs it: its settings and its counters.
pub(crate) struct LaneState {
    pub(crate) name: String,
    /// Its first shard; its shards are `start..start + workers`.
    pub(crate) start: usize,
    pub(crate) workers: usize,
    pub(crate) wait_strategy: WaitStrategy,
    pub(crate) backpressure: Backpressure,
    /// Deliveries it shed.
    pub(crate) shed: AtomicU64,
    /// Nanoseconds publishers waited for room in its shards.
    pub(crate) waited_nanos: AtomicU64,
    /// Its deliveries settled on other threads than its workers: shed, left by a publisher
    /// at shutdown, or deferred and completed.
    pub(crate) settled_elsewhere: AtomicU64,
}

impl LaneState {
    pub(super) fn new(lane: crate::config::LaneConfig) -> LaneState {
        LaneState {
            name: lane.name,
            start: lane.start,
            workers: lane.workers,
            wait_strategy: lane.wait_strategy,
            backpressure: lane.backpressure,
            shed: AtomicU64::new(0),
            waited_nanos: AtomicU64::new(0),
            settled_elsewhere: AtomicU64::new(0),
        }
    }

    /// Its shard for `envelope`: by key, or the next in turn on this thread.
    #[inline]
    pub(crate) fn shard_for(&self, envelope: &Envelope) -> usize {
        self.start + shard_among(self.workers, envelope)
    }
}

/// Which of `workers` shards takes `envelope`: by key, or the next in turn on this thread.
#[inline]
pub(crate) fn shard_among(workers: usize, envelope: &Envelope) -> usize {
    match envelope.key() {
        Some(key) => key.shard(workers),
        None if workers == 1 => 0,
        None => next_in_turn(workers),
    }
}

/// The next of `n` shards in turn for an unkeyed event from this thread.
#[inline]
pub(super) fn next_in_turn(n: usize) -> usize {
    ROUND_ROBIN.with(|rr| {
        let next = rr.get();
        rr.set(next.wrapping_add(1));
        next % n
    })
}

/// The books of deliveries settled on publishers' threads (see [`Core::shed_books`]).
#[derive(Default)]
pub(crate) struct ShedBooks {
    pub(crate) settled: AtomicU64,
    pub(crate) outcomes: crate::stats::OutcomeCounters,
}

/// Backs off in a wait loop that expects to be short: spin, then yield, then sleep briefly.
pub(super) fn backoff(step: &mut u32) {
    *step += 1;
    match *step {
        0..=16 => std::hint::spin_loop(),
        17..=64 => std::thread::yield_now(),
        _ => std::thread::sleep(Duration::from_micros(50)),
    }
}

impl Core {
    /// Whether no shutdown has started.
    #[inline]
    pub(super) fn is_running(&self) -> bool {
        matches!(*self.lifecycle.lock(), Lifecycle::Running)
    }

    #[inline]
    pub(crate) fn is_closing(&self) -> bool {
        self.closing.load(Ordering::Relaxed)
    }

    /// Whether shutdown has finished: nothing takes from the channels any more.
    pub(super) fn is_done(&self) -> bool {
        matches!(*self.lifecycle.lock(), Lifecycle::Done(_))
    }

    /// Whether shutdown has passed its deadline: no delivery starts any more.
    #[cfg(feature = "redis")]
    #[inline]
    pub(crate) fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::SeqCst)
    }

    /// Counts a delivery of shard `index` settled on another thread than its worker, in its
    /// lane's books (before the ledger's count of it).
    pub(crate) fn settled_in_lane(&self, index: usize) {
        self.lane_of(index)
            .settled_elsewhere
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Asks each worker of lane `lane` to run what it parked for subscriptions that no longer
    /// hold it.
    pub(crate) fn release_parked(&self, lane: u8) {
        let lane = &self.lanes[lane as usize];
        for shard in &self.shards[lane.start..lane.start + lane.workers] {
            shard.worker.release.store(true, Ordering::SeqCst);
            // A full channel: the worker is busy, and looks before its next message.
            let _ = shard.tx.try_send(Msg::Wake);
        }
    }

    /// The lane of shard `index`.
    #[inline]
    pub(crate) fn lane_of(&self, index: usize) -> &LaneState {
        &self.lanes[self.shards[index].lane as usize]
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
pub(super) struct Handle {
    pub(super) core: Arc<Core>,
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

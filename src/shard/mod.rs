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
use crate::context::Context;
use crate::context::Sub;
use crate::dead_letter::{Aftermath, DeadLetter, DeadLetterReason};
use crate::defer::Slot;
use crate::event::{Envelope, Event, EventId, NameId, unix_nanos};
use crate::guard::{Runner, Seam, drop_with};
use crate::handler::{HandlerError, HandlerResult, Verdict};
use crate::ledger::Gate;
use crate::meta::{SubMeta, before};
use crate::metrics::{Collect, Recorder, Span};
use crate::registry::{Snapshot, TypeTable};
use crate::retry::Jitter;
use crate::stats::{OutcomeCounters, Outcomes};
use crate::sync::{Arc, AtomicBool, AtomicU64, AtomicUsize, Ordering, fence};
use crate::trace::{TraceEntry, TraceOutcome};
use crate::track::{Done, Settled};

mod batch_sub;
mod burial;
mod follow_up;
mod idle;
mod ordered;
mod park;
mod settle;
mod spares;
mod work;
mod worker;

pub(crate) use self::burial::*;
use self::idle::*;
pub(crate) use self::ordered::*;
pub(crate) use self::park::*;
pub(crate) use self::settle::*;
pub(crate) use self::spares::*;
pub(crate) use self::work::*;
pub(crate) use self::worker::*;

pub(crate) const IDLE: u64 = 0;
pub(crate) const ABANDONED: u64 = u64::MAX;
/// The state word while the worker runs user code outside a handler, at seam `s`:
/// `CALLBACK - s` (subscription ids are far below).
const CALLBACK: u64 = u64::MAX - 1;

/// The state word of a worker running user code at `seam`.
#[inline]
fn callback_word(seam: Seam) -> u64 {
    CALLBACK - seam as u64
}

/// The seam a state word names, if it is a callback's.
#[inline]
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

impl Msg {
    /// The work of a message that was handed back (publishers send only work).
    pub(crate) fn into_work(self) -> Work {
        match self {
            Msg::Work(work) => work,
            Msg::Wake => unreachable!("publishers send work"),
        }
    }
}

/// Work bound for shard `shard`.
pub(crate) struct Routed {
    pub(crate) shard: usize,
    pub(crate) work: Work,
}

impl crate::timer::Delayed for Routed {
    #[inline]
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
    if let Err(routed) = shard.try_offer(routed) {
        shard.worker.hand_over(routed);
        let _ = shard.tx.try_send(Msg::Wake);
    }
}

/// Counters that only the worker thread writes.
#[derive(Default)]
pub(crate) struct WorkerStats {
    pub(crate) settled: AtomicU64,
    pub(crate) outcomes: OutcomeCounters,
}

impl WorkerStats {
    /// The counts now: `settled` first (`Acquire`), so that the outcome counters read after it
    /// are at least as far along.
    pub(crate) fn read(&self) -> WorkerCounts {
        WorkerCounts {
            settled: self.settled.load(Ordering::Acquire),
            outcomes: self.outcomes.read(),
        }
    }
}

/// A worker's counts, read at one moment ([`WorkerStats::read`]).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct WorkerCounts {
    pub(crate) settled: u64,
    pub(crate) outcomes: Outcomes,
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
    /// Deliveries begun: with `state`, how the timer thread tells one delivery running long
    /// from several in a row (see [`begin`](Self::begin)).
    pub(crate) begun: AtomicU64,
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
    /// Deliveries parked on this shard (see `park`).
    pub(crate) parked: Mutex<Parked>,
    /// Set by a resume: the worker runs what it parked before its next message.
    pub(crate) release: AtomicBool,
    /// Set while the worker runs what it released (before it clears `release`): a manual
    /// clock's advance waits for it.
    pub(crate) releasing: AtomicBool,
    /// Deliveries waiting behind their keys' heads (ordered subscriptions).
    pub(crate) waiting: Mutex<Waiting>,
    /// Keys whose head settled on another thread: (subscription, key, head).
    pub(crate) key_releases: Mutex<Vec<(u64, u64, EventId)>>,
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
        // One writer: a plain increment.
        self.begun
            .store(self.begun.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
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
    #[inline]
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
    #[inline]
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
    #[inline]
    pub(crate) fn settle_left(&self, n: usize) {
        bump(&self.stats.outcomes.left, n as u64);
        self.settle(n);
    }

    /// Settles a failed delivery kept in the dead-letter ring.
    #[inline]
    fn settle_dead_lettered(&self) {
        bump(&self.stats.outcomes.dead_lettered, 1);
        self.settle(1);
    }

    /// Settles a failed delivery that will not be tried again.
    #[inline]
    fn settle_discarded(&self) {
        bump(&self.stats.outcomes.discarded, 1);
        self.settle(1);
    }

    /// Settles `n` deliveries whose subscriptions ended before they ran.
    #[inline]
    fn settle_cancelled(&self, n: usize) {
        bump(&self.stats.outcomes.cancelled, n as u64);
        self.settle(n);
    }

    /// Settles `n` deliveries of the message it runs (see [`hold`](Self::hold)).
    #[inline]
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
    #[inline]
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

    #[inline]
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

    /// Appends `items` to the spill queue at once (see [`hand_over`](Self::hand_over)).
    #[cfg(feature = "testing")]
    pub(crate) fn hand_over_all(&self, items: Vec<Routed>) {
        let mut spill = self.spill.lock();
        spill.extend(items);
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
    /// The lane it belongs to.
    pub(crate) lane: u8,
    /// Emptied batch buffers its worker hands back to publishers.
    pub(crate) spares: Spares,
}

impl Shard {
    /// A shard of lane `lane` whose channel is `(tx, rx)`.
    pub(crate) fn new(tx: Sender<Msg>, rx: Receiver<Msg>, lane: u8) -> Shard {
        Shard {
            gate: CachePadded::new(Gate::new()),
            tx,
            rx,
            worker: CachePadded::new(WorkerShared::default()),
            lane,
            spares: Spares::new(),
        }
    }

    /// Offers work bound for this shard to its channel without waiting; gives it back when the
    /// channel is full (or gone), for the caller to spill, hand over or put on the timer.
    #[inline]
    #[allow(clippy::result_large_err)] // The error is the work itself, handed back.
    pub(crate) fn try_offer(&self, routed: Routed) -> Result<(), Routed> {
        match self.tx.try_send(Msg::Work(routed.work)) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(msg) | TrySendError::Disconnected(msg)) => {
                let Msg::Work(work) = msg else {
                    unreachable!("work was sent")
                };
                Err(Routed { work, ..routed })
            }
        }
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

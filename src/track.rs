//! Tracked publishes: a handle on one event's deliveries that completes once every one of them
//! has settled — succeeded, dead-lettered, discarded, cancelled, left or abandoned.
//!
//! Ground rules: the tracking rides in the event's envelope (in the box that holds headers, so
//! untracked events pay one branch for it). Each place that settles a delivery of a tracked
//! event (the worker, a retry's end, shutdown's sweep) adds to its outcome and counts the
//! remaining deliveries down with one atomic subtraction; whoever takes it to zero completes
//! the tracker, wakes its waiters and runs its callback. A redrive of a dead letter is a new
//! delivery that no tracker counts.

use std::fmt;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::guard::{Runner, Seam};
use crate::id::EventId;
use crate::sync::{Arc, AtomicU32, Ordering};

/// What became of every delivery of one tracked event (see [`Publish::tracked`]).
///
/// [`Publish::tracked`]: crate::Publish::tracked
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Completion {
    /// The subscriptions the event matched when it was published.
    pub deliveries: u32,
    /// Deliveries whose handler returned `Ok` (on any attempt).
    pub succeeded: u32,
    /// Deliveries that ended in the dead-letter ring.
    pub dead_lettered: u32,
    /// Deliveries that failed for good with dead letters off.
    pub discarded: u32,
    /// Deliveries whose failure said to drop the event
    /// ([`HandlerError::discard`](crate::HandlerError::discard)).
    pub dropped: u32,
    /// Deliveries whose subscription ended before they ran.
    pub cancelled: u32,
    /// Deliveries that never ran because the shutdown deadline passed.
    pub left: u32,
    /// Deliveries whose handler was still running at the shutdown deadline.
    pub abandoned: u32,
}

impl Completion {
    /// Whether every delivery succeeded (also when the event matched no subscription).
    pub fn all_succeeded(&self) -> bool {
        self.succeeded == self.deliveries
    }
}

/// How one delivery settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Settled {
    Succeeded,
    DeadLettered,
    Discarded,
    Cancelled,
    Left,
    Abandoned,
    Dropped,
}

type Callback = Box<dyn FnOnce(Completion) + Send>;

/// The shared state of one tracked event.
pub(crate) struct Tracking {
    event_id: Mutex<Option<EventId>>,
    /// Deliveries not settled yet; `u32::MAX` until the event is accepted.
    remaining: AtomicU32,
    counts: [AtomicU32; 7],
    deliveries: AtomicU32,
    done: Mutex<Option<Completion>>,
    completed: Condvar,
    callback: Mutex<Option<Callback>>,
}

impl Tracking {
    pub(crate) fn new() -> Arc<Tracking> {
        Arc::new(Tracking {
            event_id: Mutex::new(None),
            remaining: AtomicU32::new(u32::MAX),
            counts: Default::default(),
            deliveries: AtomicU32::new(0),
            done: Mutex::new(None),
            completed: Condvar::new(),
            callback: Mutex::new(None),
        })
    }

    /// The event was accepted with `deliveries` deliveries (before any of them can settle).
    /// With none, it completes at once: the callback, if one is set already, is returned to
    /// be run.
    pub(crate) fn arm(&self, event_id: EventId, deliveries: usize) -> Option<Done> {
        let deliveries = u32::try_from(deliveries).expect("fewer than 2^32 subscriptions");
        *self.event_id.lock() = Some(event_id);
        self.deliveries.store(deliveries, Ordering::Relaxed);
        self.remaining.store(deliveries, Ordering::Release);
        if deliveries == 0 {
            return self.complete();
        }
        None
    }

    /// Settles `n` deliveries as `how`. When that completes the tracker (waiters are woken at
    /// once), its callback, if any, is returned: the caller runs it under the guard once it
    /// has settled the deliveries in the ledger too.
    #[must_use = "a completed tracker's callback must be run"]
    pub(crate) fn settle(&self, how: Settled, n: usize) -> Option<Done> {
        if n == 0 {
            return None;
        }
        let n = n as u32;
        self.counts[how as usize].fetch_add(n, Ordering::Relaxed);
        if self.remaining.fetch_sub(n, Ordering::AcqRel) == n {
            return self.complete();
        }
        None
    }

    fn complete(&self) -> Option<Done> {
        let count = |how: Settled| self.counts[how as usize].load(Ordering::Relaxed);
        let completion = Completion {
            deliveries: self.deliveries.load(Ordering::Relaxed),
            succeeded: count(Settled::Succeeded),
            dead_lettered: count(Settled::DeadLettered),
            discarded: count(Settled::Discarded),
            dropped: count(Settled::Dropped),
            cancelled: count(Settled::Cancelled),
            left: count(Settled::Left),
            abandoned: count(Settled::Abandoned),
        };
        // The callback is taken under the lock that `on_complete` holds while it decides
        // whether to store one or run it: exactly one of them runs it.
        let callback = {
            let mut callback = self.callback.lock();
            *self.done.lock() = Some(completion);
            callback.take()
        };
        self.completed.notify_all();
        callback.map(|callback| Done {
            callback,
            completion,
        })
    }
}

/// A tracker's callback to run: user code, run under the guard by whoever completed it.
pub(crate) struct Done {
    callback: Callback,
    completion: Completion,
}

impl Done {
    /// Runs the callback under `runner`'s guard.
    pub(crate) fn run(self, runner: &mut dyn Runner) {
        let mut call = Some(move || (self.callback)(self.completion));
        runner.run(Seam::Tracker, &mut || {
            if let Some(call) = call.take() {
                call();
            }
        });
    }
}

/// A handle on one published event's deliveries: it completes once every one of them has
/// settled. Returned by a publish made [`tracked`](crate::Publish::tracked).
///
/// A delivery abandoned at the shutdown deadline counts when its handler finally returns; a
/// tracker whose handler never returns never completes (wait with a timeout). Redriving a dead
/// letter later is a new delivery, outside the tracker.
#[derive(Clone)]
pub struct Tracker(pub(crate) Arc<Tracking>);

impl Tracker {
    /// The event's id.
    pub fn event_id(&self) -> EventId {
        self.0
            .event_id
            .lock()
            .expect("a tracker is returned only for an accepted event")
    }

    /// The outcome, once every delivery has settled.
    pub fn completion(&self) -> Option<Completion> {
        *self.0.done.lock()
    }

    /// Waits up to `timeout` for every delivery to settle.
    pub fn wait(&self, timeout: Duration) -> Option<Completion> {
        // A timeout past what an `Instant` can hold waits for ever.
        let deadline = Instant::now().checked_add(timeout);
        let mut done = self.0.done.lock();
        while done.is_none() {
            match deadline {
                Some(deadline) => {
                    if self.0.completed.wait_until(&mut done, deadline).timed_out() {
                        break;
                    }
                }
                None => self.0.completed.wait(&mut done),
            }
        }
        *done
    }

    /// Calls `f` with the outcome once every delivery has settled — at once, on this thread,
    /// if they have. Otherwise it runs on the thread that settles the last delivery (a worker,
    /// a thread completing a [`Deferred`](crate::Deferred), or the thread shutdown leaves its
    /// leftovers to), after that delivery is settled, under the bus's guard: a panic is
    /// caught and counted in [`CallbackPanics::tracker`](crate::CallbackPanics), and one that
    /// blocks past the shutdown deadline is left behind. Keep it quick. A second callback
    /// replaces the first if that has not run yet.
    pub fn on_complete(&self, f: impl FnOnce(Completion) + Send + 'static) {
        let mut callback = self.0.callback.lock();
        let done = *self.0.done.lock();
        match done {
            Some(completion) => {
                drop(callback);
                f(completion);
            }
            None => *callback = Some(Box::new(f)),
        }
    }
}

impl fmt::Debug for Tracker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tracker")
            .field("event_id", &*self.0.event_id.lock())
            .field("completion", &self.completion())
            .finish()
    }
}

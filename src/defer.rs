//! Deferred deliveries: a handler hands its outcome to another thread, which settles the
//! delivery later.
//!
//! Ground rules: [`Context::defer`](crate::Context::defer) makes a [`Slot`] and returns a
//! [`Deferred`] for it. When the handler returns `Ok`, the worker registers the slot (it is now
//! outstanding, counted by shutdown) and, once it is done with the event, *arms* it with the
//! delivery (a [`Retry`] that can be tried again or dead-lettered). The outcome can arrive
//! before the slot is armed (it waits in the slot) or after (it settles at once, on the
//! completing thread). A slot's mutex decides who settles it: the completion, the worker arming
//! it, or shutdown taking it over at its deadline; whoever moves it to `Closed` owns the outcome.
//!
//! If the handler returns an error or panics after deferring, or shutdown gave up on the
//! running delivery, the slot is never registered and a later completion does nothing: the
//! delivery was settled as the failed attempt (or abandoned) it was.
//!
//! Settlements from other threads are counted here with atomic adds (a worker's counters have
//! one writer, the worker); the ledger sums both.

use std::collections::HashMap;
use std::fmt;

use parking_lot::Mutex;

use crate::bus::Core;
use crate::event::EventId;
use crate::guard::Leftovers;
use crate::guard::{Runner, drop_with};
use crate::handler::{HandlerError, HandlerResult};
use crate::shard::Retry;
use crate::stats::AbandonedDelivery;
use crate::stats::OutcomeCounters;
use crate::sync::{Arc, AtomicU64, Ordering};
use crate::track::Settled;

/// What a slot holds.
enum State {
    /// Deferred by a handler; not yet handed over by its worker. An outcome that arrives now
    /// waits here.
    Open(Option<HandlerResult>),
    /// Handed over: the delivery, bound for shard `shard` if it is tried again.
    Armed(Box<Retry>, usize),
    /// Settled, void, or taken over by shutdown.
    Closed,
}

/// One deferred delivery.
pub(crate) struct Slot {
    id: u64,
    event: &'static str,
    event_id: EventId,
    subscription: u64,
    state: Mutex<State>,
}

/// The deferred deliveries of a bus: those outstanding, and the counts of those settled.
#[derive(Default)]
pub(crate) struct Deferrals {
    next_id: AtomicU64,
    /// Registered and not yet closed.
    outstanding: Mutex<HashMap<u64, Arc<Slot>>>,
    pub(crate) settled: AtomicU64,
    pub(crate) outcomes: OutcomeCounters,
}

impl Deferrals {
    /// A new slot for the delivery of event `event_id` (an `event`) to subscription
    /// `subscription`, not yet registered.
    pub(crate) fn slot(
        &self,
        event: &'static str,
        event_id: EventId,
        subscription: u64,
    ) -> Arc<Slot> {
        Arc::new(Slot {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            event,
            event_id,
            subscription,
            state: Mutex::new(State::Open(None)),
        })
    }

    /// Registers a slot whose handler returned `Ok`: the delivery is outstanding until it is
    /// settled or shutdown takes it over.
    pub(crate) fn register(&self, slot: &Arc<Slot>) {
        self.outstanding.lock().insert(slot.id, slot.clone());
    }

    /// How many deferred deliveries are outstanding.
    pub(crate) fn outstanding(&self) -> usize {
        self.outstanding.lock().len()
    }

    fn forget(&self, slot: &Slot) {
        self.outstanding.lock().remove(&slot.id);
    }

    /// Counts `n` deliveries settled from another thread. `Release`: a reader that sees the
    /// count sees the outcome counters and trackers before it.
    pub(crate) fn settle(&self, n: u64) {
        self.settled.fetch_add(n, Ordering::Release);
    }

    /// Shutdown, past its deadline, with the workers stopped or detached: takes over every
    /// deferred delivery still outstanding, reporting each as abandoned. `handler` names a
    /// subscription and its lane. What it took over goes to `leftovers`: tracker callbacks to run and
    /// events to drop (user code the shutdown thread does not run itself).
    pub(crate) fn abandon_all(
        &self,
        handler: impl Fn(u64) -> (String, String),
        leftovers: &mut Leftovers,
    ) -> Vec<AbandonedDelivery> {
        let slots: Vec<Arc<Slot>> = self.outstanding.lock().drain().map(|(_, s)| s).collect();
        let mut abandoned = Vec::new();
        for slot in slots {
            let state = std::mem::replace(&mut *slot.state.lock(), State::Closed);
            match state {
                State::Closed => continue,
                State::Armed(retry, _) => {
                    if let Some(done) = retry.track(Settled::Abandoned) {
                        leftovers.push(move |runner| done.run(runner));
                    }
                    leftovers.drop(retry);
                }
                // A worker detached in a later delivery of the same event never armed it
                // (its tracker, if any, does not complete).
                State::Open(result) => leftovers.drop(result),
            }
            let (handler, lane) = handler(slot.subscription);
            abandoned.push(AbandonedDelivery {
                worker: DEFERRED.to_owned(),
                lane,
                event: slot.event,
                event_id: Some(slot.event_id),
                handler,
                seam: None,
                deliveries: 1,
            });
        }
        abandoned
    }
}

/// The name [`AbandonedDelivery::worker`] gives a deferred delivery never completed.
pub(crate) const DEFERRED: &str = "deferred";

impl Slot {
    /// How a slot that was never armed (a [`TestContext`](crate::testing::TestContext)'s)
    /// was completed: `None` while it was not; the error's text for a failure.
    #[cfg(feature = "testing")]
    pub(crate) fn completed(&self) -> Option<Result<(), String>> {
        match &*self.state.lock() {
            State::Open(Some(result)) => {
                Some(result.as_ref().map(|_| ()).map_err(|e| e.to_string()))
            }
            _ => None,
        }
    }

    /// The worker hands the delivery over; settles it at once if its outcome has arrived
    /// (user code, the hook or a tracker's callback, then runs under `runner`'s guard).
    pub(crate) fn arm(&self, core: &Core, retry: Retry, shard: usize, runner: &mut dyn Runner) {
        let mut state = self.state.lock();
        match std::mem::replace(&mut *state, State::Closed) {
            State::Open(None) => *state = State::Armed(Box::new(retry), shard),
            State::Open(Some(result)) => {
                drop(state);
                core.deferrals.forget(self);
                crate::shard::settle_deferred(core, retry, shard, result, self.id, runner);
            }
            // Taken over by shutdown.
            State::Armed(..) | State::Closed => {
                drop(state);
                drop_with(runner, retry);
            }
        }
    }

    fn complete(&self, core: &Core, result: HandlerResult) {
        let mut state = self.state.lock();
        match std::mem::replace(&mut *state, State::Closed) {
            State::Open(None) => *state = State::Open(Some(result)),
            State::Armed(retry, shard) => {
                drop(state);
                core.deferrals.forget(self);
                crate::shard::settle_deferred(
                    core,
                    *retry,
                    shard,
                    result,
                    self.id,
                    &mut &core.panics,
                );
            }
            State::Open(Some(_)) | State::Closed => {}
        }
    }

    /// The handler failed after deferring, or shutdown gave up on it: its outcome is settled
    /// elsewhere, and a completion does nothing.
    pub(crate) fn void(&self) {
        *self.state.lock() = State::Closed;
    }
}

/// The outcome of a delivery whose handler called [`Context::defer`](crate::Context::defer):
/// complete it, from any thread, with [`succeed`](Self::succeed), [`fail`](Self::fail) or
/// [`complete`](Self::complete).
///
/// Until then the delivery is outstanding: [`Bus::flush`](crate::Bus::flush) waits for it, a
/// [`Tracker`](crate::Tracker) of its event has not completed, and shutdown waits for it until
/// its deadline, then reports it abandoned. A failure is retried on the bus's timer (the
/// handler runs again) and dead-lettered as the subscription's retry policy says, exactly as if
/// the handler had returned the error. Dropping a `Deferred` without completing it fails the
/// delivery, so nothing is lost by forgetting one.
#[must_use = "a deferred delivery stays outstanding until it is completed; dropping it fails it"]
pub struct Deferred {
    pub(crate) core: Arc<Core>,
    pub(crate) slot: Option<Arc<Slot>>,
}

impl Deferred {
    /// The delivery succeeded.
    pub fn succeed(self) {
        self.complete(Ok(()));
    }

    /// The delivery failed with `error` (retried unless it is
    /// [`permanent`](HandlerError::permanent)).
    pub fn fail(self, error: impl Into<HandlerError>) {
        self.complete(Err(error.into()));
    }

    /// Settles the delivery as a handler returning `result` would.
    pub fn complete(mut self, result: HandlerResult) {
        if let Some(slot) = self.slot.take() {
            slot.complete(&self.core, result);
        }
    }
}

impl Drop for Deferred {
    fn drop(&mut self) {
        if let Some(slot) = self.slot.take() {
            slot.complete(
                &self.core,
                Err(HandlerError::msg(
                    "the deferred delivery was dropped without being completed",
                )),
            );
        }
    }
}

impl fmt::Debug for Deferred {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Deferred")
            .field("completed", &self.slot.is_none())
            .finish_non_exhaustive()
    }
}

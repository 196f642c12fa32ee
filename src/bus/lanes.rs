//! Lanes: one publish that goes to several lanes, and what a `Shed` lane does when it is
//! full.
//!
//! Ground rules (see the crate docs, "Lanes"): an event whose subscriptions live in several
//! lanes is shared (one heap copy, one message per lane). Every lane's gate is entered before
//! anything is sent, so shutdown cannot take some lanes' deliveries and hand the event back
//! for the others. `Block` lanes are sent to first, in declaration order: while none has the
//! event a try/timeout/rayon publish may get it back; from the moment one lane has it, the
//! other lanes' deliveries are never handed back — a `Block` lane's wait for room as today, a
//! `Shed` lane sheds. A delivery that a lane can no longer take because the bus is shutting
//! down is settled as left.

use super::*;
use crate::registry::Route;
use crate::shard::{Fanout, SharedEvent};

impl Core {
    /// Publishes an event to the several lanes `route` names (see the module docs).
    #[cold]
    #[inline(never)]
    pub(super) fn fan_out<E: Event>(
        &self,
        route: &Route,
        envelope: Envelope,
        event: E,
        delay: Option<Duration>,
        mode: Mode,
    ) -> Result<(), (Refusal, E)> {
        let source = envelope.source_id();
        let counts = self.registry.lane_counts::<E>(source, route.generation);
        if let Some(t) = envelope.tracker() {
            // With deliveries to come, arming completes nothing.
            let _none = t.arm(envelope.id(), route.deliveries);
        }
        let mut lanes: Vec<(usize, usize)> = counts.iter().collect();
        lanes.sort_by_key(|&(lane, _)| self.lanes[lane].backpressure == Backpressure::Shed);
        let indexes: Vec<usize> = lanes
            .iter()
            .map(|&(lane, _)| self.lanes[lane].shard_for(&envelope))
            .collect();
        let shared = Fanout::share(envelope, event);
        // Every gate first: the publish is counted with the first lane's admission.
        let counted = |i: usize| {
            let events = usize::from(i == 0);
            Counted::of::<E>(source, events)
        };
        for (i, &(_, deliveries)) in lanes.iter().enumerate() {
            if !self.admit(indexes[i], deliveries) {
                for (j, &(_, deliveries)) in lanes[..i].iter().enumerate() {
                    self.refund(indexes[j], deliveries, counted(j));
                }
                self.uncount(counted(i));
                return Err((Refusal::Shutdown, take_back(shared)));
            }
        }
        let mut sent_any = false;
        for (i, &(lane, deliveries)) in lanes.iter().enumerate() {
            let index = indexes[i];
            let mut fanout = Fanout::new::<E>(shared.clone(), route.generation, deliveries, i == 0);
            fanout.admitted =
                delay.is_none() && self.lanes[lane].backpressure == Backpressure::Shed;
            let work = Work::Fanout(fanout);
            let sent = match delay {
                Some(delay) => self
                    .timer
                    .schedule(Routed { shard: index, work }, delay)
                    .map_err(|routed| (Refusal::Shutdown, routed.work)),
                None if self.lanes[lane].backpressure == Backpressure::Shed => {
                    self.send_or_shed(index, work)
                }
                None => {
                    let mode = if sent_any { Mode::Accepted } else { mode };
                    self.send(index, Msg::Work(work), mode)
                        .map_err(|(why, msg)| (why, msg.into_work()))
                }
            };
            match sent {
                Ok(()) => sent_any = true,
                Err((why, work)) if !sent_any => {
                    // No lane has it: hand it back.
                    drop(work);
                    for (j, &(_, deliveries)) in lanes.iter().enumerate().skip(i) {
                        self.refund(indexes[j], deliveries, counted(j));
                    }
                    return Err((why, take_back(shared)));
                }
                Err((Refusal::Full, work)) => {
                    // A rayon publisher whose shard stayed full: the timer offers it again.
                    let routed = Routed { shard: index, work };
                    if let Err(routed) = self.timer.reoffer(routed) {
                        self.settle_left(index, routed.work);
                    }
                }
                Err((_, work)) => self.settle_left(index, work),
            }
        }
        Ok(())
    }

    /// Sends work to shard `index` of a `Shed` lane: never waits; when the shard is full the
    /// work is shed.
    #[inline]
    #[allow(clippy::result_large_err)] // The error is the work itself, handed back.
    pub(super) fn send_or_shed(&self, index: usize, work: Work) -> Result<(), (Refusal, Work)> {
        match self.shards[index].tx.try_send(Msg::Work(work)) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(msg)) => {
                self.shed(index, msg.into_work());
                Ok(())
            }
            Err(TrySendError::Disconnected(msg)) => Err((Refusal::Shutdown, msg.into_work())),
        }
    }

    /// Sheds accepted work that shard `index`'s lane has no room for: each delivery becomes a
    /// dead letter with reason [`Shed`](DeadLetterReason::Shed) (discarded with dead letters
    /// off; one to a subscription removed meanwhile is left), settled on this thread.
    #[cold]
    #[inline(never)]
    pub(super) fn shed(&self, index: usize, work: Work) {
        let lane = self.shards[index].lane;
        let deliveries = work.deliveries();
        let state = &self.lanes[lane as usize];
        state.shed.fetch_add(deliveries as u64, Ordering::Relaxed);
        state
            .settled_elsewhere
            .fetch_add(deliveries as u64, Ordering::Relaxed);
        let mut done = Vec::new();
        let retries = work.never_ran(lane, &self.registry.load_full(), &mut done);
        let books = &self.shed_books;
        let gone = deliveries - retries.len();
        books
            .outcomes
            .left
            .fetch_add(gone as u64, Ordering::Relaxed);
        let runner = &mut &self.panics;
        let mut burials = Vec::with_capacity(retries.len());
        for retry in retries {
            let Some(burial) = Burial::make(self, retry, DeadLetterReason::Shed, runner) else {
                unreachable!("only a worker is detached")
            };
            let counter = match burial.how {
                Settled::DeadLettered => &books.outcomes.dead_lettered,
                _ => &books.outcomes.discarded,
            };
            counter.fetch_add(1, Ordering::Relaxed);
            burials.push(burial);
        }
        books
            .settled
            .fetch_add(deliveries as u64, Ordering::Release);
        for done in done {
            done.run(runner);
        }
        for burial in burials {
            burial.finish(self, runner);
        }
        self.notify_idle();
    }

    /// Settles accepted work that a lane could not take because the bus is shutting down
    /// (another lane has the event): its deliveries are left.
    #[cold]
    pub(super) fn settle_left(&self, index: usize, work: Work) {
        let deliveries = work.deliveries();
        self.lane_of(index)
            .settled_elsewhere
            .fetch_add(deliveries as u64, Ordering::Relaxed);
        let done = work.track(Settled::Left);
        let books = &self.shed_books;
        books
            .outcomes
            .left
            .fetch_add(deliveries as u64, Ordering::Relaxed);
        books
            .settled
            .fetch_add(deliveries as u64, Ordering::Release);
        let runner = &mut &self.panics;
        if let Some(done) = done {
            done.run(runner);
        }
        drop_with(runner, work);
        self.notify_idle();
    }
}

/// The event of a publish that no lane took, once nothing else holds it.
fn take_back<E: Event>(shared: Arc<SharedEvent>) -> E {
    match SharedEvent::into_event::<E>(shared) {
        Ok(event) => event,
        Err(_) => unreachable!("no lane holds an event handed back"),
    }
}

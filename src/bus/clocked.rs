//! A bus on a manual clock: how [`ManualClock::advance`](crate::testing::ManualClock::advance)
//! drives it, and how `flush` tells that only the clock moving can make progress.
//!
//! Ground rules: under a manual clock the timer thread leaves the wheel alone. Each step of an
//! advance, at one instant, waits for the bus to settle, takes what is due on the wheel and
//! hands it to its shards' workers (one hand-over per shard, which the worker runs before
//! anything it publishes), asks the breakers and the stall watch what is due, and waits for
//! the bus to settle again. Settled: every delivery outstanding is on the wheel, parked,
//! waiting behind its key's head or deferred, and no worker has a release to run — or, when
//! deliveries that were running before the advance still run, every other worker is idle
//! with nothing queued, twice in a row with nothing begun in between.

use super::*;

/// When a wait for quiescence stops before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Early {
    /// When all that is left cannot run before the deadline (shutdown).
    Unreachable,
    /// Under a manual clock, when all that is left waits for the clock to move (`flush`).
    OnClock,
}

impl Core {
    /// When the next thing waiting on the clock falls due: a delivery on the wheel, or a
    /// breaker holding parked deliveries half-opening.
    pub(super) fn next_due(&self) -> Option<Instant> {
        let breakers = self
            .shards
            .iter()
            .filter_map(|s| s.worker.breaker_due())
            .min();
        match (self.timer.earliest(), breakers) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Under a manual clock, when nothing outstanding can run until the clock moves: the next
    /// time something falls due.
    pub(super) fn waiting_on_clock(&self) -> Option<Instant> {
        if !self.clock.is_manual() {
            return None;
        }
        if !self.parked_past(None) {
            return None;
        }
        self.next_due()
    }
}

#[cfg(feature = "testing")]
impl Core {
    /// Deliveries outstanding that no worker can run now: on the wheel, parked, waiting
    /// behind their keys' heads, or deferred.
    fn held(&self) -> i64 {
        let (wheel, _) = self.timer.parked();
        let held: usize = self.shards.iter().map(|s| s.worker.held_back()).sum();
        (wheel + held + self.deferrals.outstanding()) as i64
    }

    /// Waits until the work an advance's step made due has run (see the module's docs).
    fn settle_step(&self, running: &[Option<u64>]) {
        // A delivery that was running before the advance began (and still is): not waited
        // for, nor what its worker has queued or been told to release behind it.
        let old = |index: usize, shard: &Shard| {
            shard.worker.running()
                && running.get(index).copied().flatten()
                    == Some(shard.worker.begun.load(Ordering::Acquire))
        };
        let mut step = 0;
        let mut quiet_before: Option<(i64, Vec<u64>)> = None;
        while !self.stopped.load(Ordering::SeqCst) {
            let before = self.outstanding_now();
            let any_old = self.shards.iter().enumerate().any(|(i, s)| old(i, s));
            // Work in motion that no delivery counts: a release a worker has yet to run, an
            // event nobody subscribed to in a spill queue, a re-offer.
            let moving = self.timer.reoffering()
                || self.shards.iter().enumerate().any(|(i, s)| {
                    !old(i, s)
                        && (s.worker.release.load(Ordering::SeqCst)
                            || s.worker.releasing.load(Ordering::SeqCst)
                            || s.worker.spill_len.load(Ordering::SeqCst) > 0)
                });
            if !moving && !any_old {
                if before == self.held() && self.outstanding_now() == before {
                    return;
                }
            } else if !moving {
                // Settled once every other worker has been idle with nothing queued, twice in
                // a row with nothing begun in between.
                let quiet = self
                    .shards
                    .iter()
                    .enumerate()
                    .all(|(i, s)| old(i, s) || (!s.worker.running() && s.rx.is_empty()));
                if quiet {
                    let begun: Vec<u64> = self
                        .shards
                        .iter()
                        .map(|s| s.worker.begun.load(Ordering::Acquire))
                        .collect();
                    if quiet_before.as_ref() == Some(&(before, begun.clone())) {
                        return;
                    }
                    quiet_before = Some((before, begun));
                    for _ in 0..4 {
                        std::thread::yield_now();
                    }
                    continue;
                }
            }
            quiet_before = None;
            backoff(&mut step);
        }
    }
}

#[cfg(feature = "testing")]
impl crate::clock::Drive for Core {
    fn is_own_thread(&self) -> bool {
        OwnThread::is_own(self.id)
    }

    fn running(&self) -> Vec<Option<u64>> {
        self.shards
            .iter()
            .map(|s| {
                s.worker
                    .running()
                    .then(|| s.worker.begun.load(Ordering::Acquire))
            })
            .collect()
    }

    fn step(&self, running: &[Option<u64>]) -> Option<Instant> {
        let this = self.this.upgrade()?;
        if self.stopped.load(Ordering::SeqCst) {
            return None;
        }
        // What was in motion before this instant runs first (a publish just before the
        // advance), so that what falls due now finds the workers idle.
        self.settle_step(running);
        let mut due = Vec::new();
        self.timer.take_due(&mut due);
        // Each shard gets what falls due for it in one hand-over, which its worker runs before
        // anything the first of them publishes: the order does not depend on how fast this
        // thread hands them over.
        let mut by_shard: Vec<Vec<Routed>> = self.shards.iter().map(|_| Vec::new()).collect();
        for routed in due {
            by_shard[routed.shard].push(routed);
        }
        for (shard, items) in self.shards.iter().zip(by_shard) {
            if !items.is_empty() {
                shard.worker.hand_over_all(items);
                let _ = shard.tx.try_send(Msg::Wake);
            }
        }
        let breakers = super::breakers::watch_breakers(&this);
        let stalls = super::stalls::watch_stalls(&this);
        self.settle_step(running);
        // The stall watch looks again only while something runs.
        let stalls = stalls.filter(|_| self.shards.iter().any(|s| s.worker.running()));
        let now = self.clock.now();
        // What the work scheduled meanwhile falls due at the wheel's next tick at the soonest.
        [self.timer.next_due_after_now(), stalls, breakers]
            .into_iter()
            .flatten()
            .filter(|at| *at > now)
            .min()
    }
}

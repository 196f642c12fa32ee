//! Circuit breakers as the bus runs them: a change of state parks or releases the
//! subscription's deliveries, is counted, and is reported; the timer thread turns open
//! breakers half-open when their cool-down ends.

use super::stalls::call_off_thread;
use super::*;
use crate::breaker::{Breaker, BreakerChange, BreakerState, Report, Transition};
use crate::guard::Seam;
use crate::meta::BREAKER;

impl Core {
    /// Moves `meta`'s breaker on by `step` (given the report of a change to make while the
    /// breaker can make no other), then acts on the change: open, its deliveries park (and
    /// the timer thread learns when to look again); half-open, its shards look for the probe;
    /// closed, what it parked runs, in order.
    pub(crate) fn move_breaker(
        &self,
        meta: &SubMeta,
        step: impl FnOnce(&Breaker, Report<'_>) -> Option<Transition>,
    ) {
        let Some(breaker) = &meta.breaker else {
            return;
        };
        let mut report = |change: Transition| self.report_breaker(meta, change);
        let Some(change) = step(breaker, &mut report) else {
            return;
        };
        match change.to {
            BreakerState::Open => {
                meta.hold.fetch_or(BREAKER, Ordering::SeqCst);
                self.timer.nudge();
            }
            BreakerState::HalfOpen => self.release_parked(meta.lane),
            BreakerState::Closed => {
                meta.hold.fetch_and(!BREAKER, Ordering::SeqCst);
                self.release_parked(meta.lane);
            }
        }
    }

    /// Hands a change of `meta`'s breaker to its callback, on the report thread.
    fn report_breaker(&self, meta: &SubMeta, change: Transition) {
        let Some(callback) = meta
            .breaker
            .as_ref()
            .and_then(|b| b.config.on_change.clone())
        else {
            return;
        };
        let report = BreakerChange {
            service: meta.service.as_str().to_owned(),
            handler: meta.name.to_string(),
            from: change.from,
            to: change.to,
            cool_down: change.cool_down,
        };
        call_off_thread(self, Seam::Breaker, move || callback(&report));
    }
}

/// The timer thread's look at the open breakers: turns half-open those whose cool-down has
/// ended. Returns when the next one ends.
pub(crate) fn watch_breakers(core: &Arc<Core>) -> Option<Instant> {
    let now = core.clock.now();
    let metas: Vec<Arc<SubMeta>> = core.breakers.lock().clone();
    let mut next: Option<Instant> = None;
    for meta in metas.iter().filter(|m| m.active.load(Ordering::Relaxed)) {
        let Some(breaker) = &meta.breaker else {
            continue;
        };
        core.move_breaker(meta, |b, report| b.half_open(now, report));
        if let Some(due) = breaker.due() {
            next = Some(next.map_or(due, |n| n.min(due)));
        }
    }
    next
}

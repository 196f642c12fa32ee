//! What follows a delivery that did not succeed: deciding a failure (the verdict, the
//! breaker, the retry policy), and then retrying it on the timer, parking it, making it wait
//! behind its key, or burying it; and handing deferred deliveries to their slots.

use super::*;

impl Worker<'_> {
    /// Hands the deferred deliveries of `event` over to their slots: as first attempts
    /// (`history` `None`) or as retries with their history.
    #[cold]
    pub(super) fn arm_deferred(
        &mut self,
        ops: &'static TaskOps,
        event: &Arc<SharedEvent>,
        history: Option<&History>,
        tracked: bool,
    ) {
        for deferral in std::mem::take(&mut self.deferred) {
            let retry = Retry {
                ops,
                event: event.clone(),
                sub: deferral.sub,
                attempt: deferral.attempt,
                history: history.cloned().unwrap_or_else(|| History {
                    errors: Vec::new(),
                    first_failure: self.core.clock.system_time(),
                }),
                tracked,
            };
            let core = self.core;
            deferral.slot.arm(core, retry, self.index, self);
        }
    }

    /// Retries or dead-letters the failed deliveries of `event`.
    pub(super) fn retry_failed(&mut self, ops: &'static TaskOps, event: Arc<SharedEvent>) {
        let failed = std::mem::take(&mut self.pending);
        let now = self.core.clock.system_time();
        for failure in failed {
            let parks = matches!(
                failure.then,
                Then::Park | Then::Repark | Then::Shed | Then::Wait
            );
            self.follow_up(
                Retry {
                    ops,
                    event: event.clone(),
                    sub: failure.sub,
                    attempt: failure.attempt + u32::from(!parks),
                    history: History {
                        errors: if parks {
                            Vec::new()
                        } else {
                            vec![failure.error]
                        },
                        first_failure: now,
                    },
                    tracked: true,
                },
                failure.then,
            );
        }
        self.shared.held_retries.store(0, Ordering::Relaxed);
        // The last holder of the event may be this one (its `Drop` may be user code).
        drop_with(self, event);
    }

    /// Puts a failed delivery on the timer to be tried again, or in the dead-letter ring.
    /// Once the timer has stopped (shutdown), a retry is dead-lettered.
    pub(super) fn follow_up(&mut self, retry: Retry, then: Then) {
        if self.detached {
            return self.dispose(Work::Retry(retry));
        }
        let reason = match then {
            Then::Retry(delay) => {
                let routed = Routed {
                    shard: self.index,
                    work: Work::Retry(retry),
                };
                match self.core.wait_on_timer(routed, delay) {
                    Ok(()) => return self.shared.hand_off(1),
                    Err(Routed {
                        work: Work::Retry(retry),
                        ..
                    }) => return self.bury(retry, DeadLetterReason::Shutdown),
                    Err(_) => unreachable!("a retry was scheduled"),
                }
            }
            Then::Bury(reason) => reason,
            Then::Park => return self.park(retry, false),
            Then::Wait => return self.wait_for_key(retry),
            Then::Repark => return self.park(retry, true),
            Then::Shed => {
                self.core
                    .lane_of(self.index)
                    .shed
                    .fetch_add(1, Ordering::Relaxed);
                DeadLetterReason::Shed
            }
            Then::Drop => unreachable!("a dropped delivery settles when its attempt fails"),
        };
        self.bury(retry, reason);
    }

    /// Settles a failed delivery in the dead-letter ring (or as discarded when it is off);
    /// then runs the user code that follows (the tracker's callback, the hook, the sink).
    pub(super) fn bury(&mut self, retry: Retry, reason: DeadLetterReason) {
        let core = self.core;
        let meta = (retry.ops.meta)(&retry.sub);
        if !holds_key(meta, reason) {
            self.key_settled(meta, &retry.event.envelope);
        }
        // The event's `Serialize` runs in a window: `None` when shutdown detached the worker
        // meanwhile and counted the delivery.
        let Some(burial) = Burial::make(core, retry, reason, self) else {
            return;
        };
        match burial.how {
            Settled::DeadLettered => self.shared.settle_dead_lettered(),
            _ => self.shared.settle_discarded(),
        }
        if let Some(done) = burial.done {
            self.later.push(Later::Tracker(done));
        }
        if let Some(after) = burial.after {
            self.later.push(Later::Ring(Box::new(after)));
        }
        if let Some(retry) = burial.discarded {
            self.dispose(Work::Retry(retry));
        }
        self.call_back();
    }

    /// Counts a failed attempt and decides what becomes of it: `None` when it is retried or
    /// dead-lettered later (still outstanding), or how it settled now (discarded with dead
    /// letters off, or dropped on the failure's word).
    #[cold]
    #[inline(never)]
    pub(super) fn failed<E: Event>(
        &mut self,
        sub: &Arc<Sub<E>>,
        attempt: u32,
        error: HandlerError,
        panicked: bool,
    ) -> Option<Settled> {
        let shared = self.shared;
        let stats = &shared.stats;
        if shared.staged.load(Ordering::Relaxed) {
            shared.staged.store(false, Ordering::Relaxed);
            self.discard_outbox();
        }
        sub.meta.record_failure(&error, panicked);
        bump(&stats.outcomes.failed, 1);
        if panicked {
            bump(&stats.outcomes.panicked, 1);
        }
        let verdict = verdict(&sub.meta, &error, self);
        if sub.meta.breaker.is_some() {
            let probed = self.probing.take() == Some(sub.meta.id);
            let now = self.core.clock.now();
            self.core
                .move_breaker(&sub.meta, |b, report| b.failure(now, report));
            if probed && matches!(verdict, Verdict::Retry | Verdict::RetryAfter(_)) {
                // A failed probe spends no attempt: it waits again, first in line. (One that
                // failed for good goes its way, and the next one probes.)
                self.pending.push(Failed {
                    sub: sub.clone(),
                    attempt,
                    error: error.to_string(),
                    then: Then::Repark,
                });
                shared
                    .held_retries
                    .store(self.pending.len() as u64, Ordering::Relaxed);
                return None;
            }
        }
        let jitter = &mut self.jitter;
        let then = Then::from(sub.meta.retry.decide(verdict, attempt, || jitter.draw()));
        if let Then::Drop = then {
            sub.meta.outcomes.dropped.fetch_add(1, Ordering::Relaxed);
            bump(&stats.outcomes.dropped, 1);
            return Some(Settled::Dropped);
        }
        if matches!(then, Then::Retry(_)) || self.core.dead_letters.enabled() {
            // Still outstanding: settled by the attempt that succeeds, or in the ring.
            if let Then::Retry(_) = then {
                bump(&stats.outcomes.retried, 1);
                sub.meta.outcomes.retried.fetch_add(1, Ordering::Relaxed);
            }
            self.pending.push(Failed {
                sub: sub.clone(),
                attempt,
                error: error.to_string(),
                then,
            });
            shared
                .held_retries
                .store(self.pending.len() as u64, Ordering::Relaxed);
            return None;
        }
        bump(&stats.outcomes.discarded, 1);
        Some(Settled::Discarded)
    }
}

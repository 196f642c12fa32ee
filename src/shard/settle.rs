//! Settling a deferred delivery on whatever thread completed it: success, a retry on the
//! timer, or a dead letter.

use super::*;

/// Settles a deferred delivery, on whatever thread completed it: as a handler returning
/// `result` would (a failure is tried again on shard `shard`, or dead-lettered). `seed` draws
/// the retry's jitter.
pub(crate) fn settle_deferred(
    core: &Core,
    mut retry: Retry,
    shard: usize,
    result: HandlerResult,
    seed: u64,
    runner: &mut dyn Runner,
) {
    let counts = &core.deferrals;
    let meta = (retry.ops.meta)(&retry.sub);
    let error = match result {
        Ok(()) => {
            meta.deferred_succeeded.fetch_add(1, Ordering::Relaxed);
            counts.succeeded.fetch_add(1, Ordering::Relaxed);
            // Trackers first: once the ledger says settled (`flush`), trackers have completed.
            // Their callbacks run once it is settled.
            let done = retry.track(Settled::Succeeded);
            counts.settle(1);
            if let Some(done) = done {
                done.run(runner);
            }
            drop_with(runner, retry);
            return;
        }
        Err(error) => error,
    };
    meta.record_failure(&error, false);
    counts.failed.fetch_add(1, Ordering::Relaxed);
    if retry.history.errors.is_empty() {
        retry.history.first_failure = SystemTime::now();
    }
    retry.history.errors.push(error.to_string());
    let then = Then::from(meta.retry.decide(error.is_permanent(), retry.attempt, || {
        Jitter::new(core.worker_seed(core.shards.len()) ^ seed).draw()
    }));
    let reason = match then {
        Then::Retry(delay) => {
            counts.retried.fetch_add(1, Ordering::Relaxed);
            meta.retried.fetch_add(1, Ordering::Relaxed);
            retry.attempt += 1;
            let routed = Routed {
                shard,
                work: Work::Retry(retry),
            };
            match core.wait_on_timer(routed, delay) {
                Ok(()) => return,
                Err(Routed {
                    work: Work::Retry(back),
                    ..
                }) => {
                    retry = back;
                    DeadLetterReason::Shutdown
                }
                Err(_) => unreachable!("a retry was scheduled"),
            }
        }
        Then::Bury(reason) => reason,
    };
    let (done, after) = if core.dead_letters.enabled() {
        let done = retry.track(Settled::DeadLettered);
        let id = core.dead_letters.next_id();
        let after = core.dead_letters.push(retry.bury(reason, id, runner));
        counts.dead_lettered.fetch_add(1, Ordering::Relaxed);
        (done, Some(after))
    } else {
        let done = retry.track(Settled::Discarded);
        counts.discarded.fetch_add(1, Ordering::Relaxed);
        drop_with(runner, retry);
        (done, None)
    };
    counts.settle(1);
    if let Some(done) = done {
        done.run(runner);
    }
    if let Some(after) = after {
        core.dead_letters.call_back(after, runner);
    }
}

/// What becomes of a failed attempt.
#[derive(Debug, Clone, Copy)]
pub(super) enum Then {
    /// Tried again after the delay.
    Retry(Duration),
    /// Kept in the dead-letter ring.
    Bury(DeadLetterReason),
}

impl From<Result<Duration, crate::retry::GiveUp>> for Then {
    fn from(decided: Result<Duration, crate::retry::GiveUp>) -> Then {
        match decided {
            Ok(delay) => Then::Retry(delay),
            Err(crate::retry::GiveUp::Permanent) => Then::Bury(DeadLetterReason::Permanent),
            Err(crate::retry::GiveUp::Exhausted) => Then::Bury(DeadLetterReason::RetriesExhausted),
        }
    }
}

/// A failed attempt whose next step waits until the work is done with the event.
pub(super) struct Failed {
    pub(super) sub: Arc<dyn Any + Send + Sync>,
    pub(super) attempt: u32,
    pub(super) error: String,
    pub(super) then: Then,
}

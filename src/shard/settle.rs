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
    let now = core.clock.now();
    core.move_breaker(meta, |b, report| match &result {
        Ok(()) => b.success(report),
        Err(_) => b.failure(now, report),
    });
    let error = match result {
        Ok(()) => return settle_now(core, retry, shard, Settled::Succeeded, runner),
        Err(error) => error,
    };
    meta.record_failure(&error, false);
    counts.outcomes.failed.fetch_add(1, Ordering::Relaxed);
    if retry.history.errors.is_empty() {
        retry.history.first_failure = core.clock.system_time();
    }
    retry.history.errors.push(error.to_string());
    let verdict = verdict(meta, &error, runner);
    let then = Then::from(meta.retry.decide(verdict, retry.attempt, || {
        Jitter::new(core.worker_seed(core.shards.len()) ^ seed).draw()
    }));
    let reason = match then {
        Then::Retry(delay) => {
            counts.outcomes.retried.fetch_add(1, Ordering::Relaxed);
            meta.outcomes.retried.fetch_add(1, Ordering::Relaxed);
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
        Then::Drop => return settle_now(core, retry, shard, Settled::Dropped, runner),
        Then::Bury(reason) => reason,
        Then::Park | Then::Repark | Then::Shed | Then::Wait => {
            unreachable!("a failure is decided, never parked")
        }
    };
    let meta = (retry.ops.meta)(&retry.sub);
    if !holds_key(meta, reason) {
        core.key_settled_elsewhere(shard, meta, &retry.event.envelope);
    }
    let Some(burial) = Burial::make(core, retry, reason, runner) else {
        unreachable!("only a worker is detached")
    };
    match burial.how {
        Settled::DeadLettered => counts
            .outcomes
            .dead_lettered
            .fetch_add(1, Ordering::Relaxed),
        _ => counts.outcomes.discarded.fetch_add(1, Ordering::Relaxed),
    };
    core.settled_in_lane(shard);
    counts.settle(1);
    burial.finish(core, runner);
}

/// Settles a deferred delivery at once as `how` (succeeded, or dropped on its failure's
/// word): counted for its subscription and in the deferrals' books, its tracker first — once
/// the ledger says settled (`flush`), trackers have completed — then the tracker's callback
/// and the event's drop, under `runner`.
fn settle_now(core: &Core, retry: Retry, shard: usize, how: Settled, runner: &mut dyn Runner) {
    let meta = (retry.ops.meta)(&retry.sub);
    core.key_settled_elsewhere(shard, meta, &retry.event.envelope);
    let counts = &core.deferrals;
    let (mine, all) = match how {
        Settled::Succeeded => (&meta.outcomes.succeeded, &counts.outcomes.succeeded),
        _ => (&meta.outcomes.dropped, &counts.outcomes.dropped),
    };
    mine.fetch_add(1, Ordering::Relaxed);
    all.fetch_add(1, Ordering::Relaxed);
    let done = retry.track(how);
    core.settled_in_lane(shard);
    counts.settle(1);
    if let Some(done) = done {
        done.run(runner);
    }
    drop_with(runner, retry);
}

/// Whether a dead letter for `reason` of `meta`'s subscription keeps holding its key's later
/// deliveries ([`hold_on_dead_letter`](crate::SubscribeOptions::hold_on_dead_letter)): a
/// failure's, not one shed or swept at shutdown.
pub(crate) fn holds_key(meta: &SubMeta, reason: DeadLetterReason) -> bool {
    meta.hold_dead && !matches!(reason, DeadLetterReason::Shed | DeadLetterReason::Shutdown)
}

/// A delivery that failed for good, on its way out: kept as a dead letter, or discarded
/// with dead letters off. [`make`](Burial::make) is the one place that decides which; the
/// caller counts the settlement (`how`), then [`finish`](Burial::finish)es it: user code
/// (the tracker's callback, the hook, the sink, the event's `Drop`) runs only after that.
pub(crate) struct Burial {
    pub(crate) how: Settled,
    /// The tracker's callback, when this delivery completed it.
    pub(crate) done: Option<Done>,
    /// What the ring calls back: the hook, the sink for an evicted letter.
    pub(crate) after: Option<Aftermath>,
    /// A discarded delivery, to drop (its event's `Drop` may be user code).
    pub(crate) discarded: Option<Retry>,
}

impl Burial {
    /// Makes `retry` dead letter `reason` in the ring (the event's `Serialize` under
    /// `runner`'s guard) or, with dead letters off, discards it; settles its tracker.
    /// `None` when `runner` was detached while `Serialize` ran: shutdown has counted the
    /// delivery, and the letter is dropped.
    pub(crate) fn make(
        core: &Core,
        retry: Retry,
        reason: DeadLetterReason,
        runner: &mut dyn Runner,
    ) -> Option<Burial> {
        if !core.dead_letters.enabled() {
            return Some(Burial {
                how: Settled::Discarded,
                done: retry.track(Settled::Discarded),
                after: None,
                discarded: Some(retry),
            });
        }
        let id = core.dead_letters.next_id();
        let tracked = retry.tracked.then(|| retry.event.clone());
        let never_failed = retry.history.errors.is_empty();
        let mut letter = retry.bury(reason, id, runner);
        letter.last_failure = core.clock.system_time();
        if never_failed {
            letter.first_failure = letter.last_failure;
        }
        if runner.detached() {
            drop_with(&mut &core.panics, (letter, tracked));
            return None;
        }
        let tracker = tracked.as_ref().and_then(|event| event.envelope.tracker());
        let done = tracker.and_then(|t| t.settle(Settled::DeadLettered, 1));
        let after = core.dead_letters.push(letter);
        core.letters_gone(after.evicted(), true);
        Some(Burial {
            how: Settled::DeadLettered,
            done,
            after: Some(after),
            discarded: None,
        })
    }

    /// Runs the user code that follows a counted burial, under `runner`'s guard: the
    /// tracker's callback, then the hook and the sink, then the discarded event's `Drop`.
    pub(crate) fn finish(self, core: &Core, runner: &mut dyn Runner) {
        if let Some(done) = self.done {
            done.run(runner);
        }
        if let Some(after) = self.after {
            core.dead_letters.call_back(after, runner);
        }
        if let Some(retry) = self.discarded {
            drop_with(runner, retry);
        }
    }
}

/// What becomes of a failed attempt.
#[derive(Debug, Clone, Copy)]
pub(super) enum Then {
    /// Tried again after the delay.
    Retry(Duration),
    /// Kept in the dead-letter ring.
    Bury(DeadLetterReason),
    /// Settled as dropped: the failure said to drop the event.
    Drop,
    /// Not run: parked until its subscription is resumed (at the same attempt).
    Park,
    /// A failed probe of a half-open breaker: parked again, first in line, spending no
    /// attempt.
    Repark,
    /// Not run: a publish admitted into a `Shed` lane that would park past its
    /// subscription's park capacity, dead-lettered with reason `Shed`.
    Shed,
    /// Not run: waiting behind its key's head (an ordered subscription), at the same attempt.
    Wait,
}

/// What becomes of a failed attempt whose error is `error`: what the handler said on it, or
/// else the subscription's classifier's word (run under `runner`'s guard: a panic is counted
/// and the policy decides), or else the policy's.
pub(crate) fn verdict(meta: &SubMeta, error: &HandlerError, runner: &mut dyn Runner) -> Verdict {
    if let Some(said) = error.verdict() {
        return said;
    }
    let Some(classify) = &meta.classify else {
        return Verdict::Retry;
    };
    let mut verdict = Verdict::Retry;
    runner.run(Seam::Classifier, &mut || verdict = classify(error));
    verdict
}

impl From<Result<Duration, crate::retry::GiveUp>> for Then {
    fn from(decided: Result<Duration, crate::retry::GiveUp>) -> Then {
        match decided {
            Ok(delay) => Then::Retry(delay),
            Err(crate::retry::GiveUp::Permanent) => Then::Bury(DeadLetterReason::Permanent),
            Err(crate::retry::GiveUp::Exhausted) => Then::Bury(DeadLetterReason::RetriesExhausted),
            Err(crate::retry::GiveUp::Discard) => Then::Drop,
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

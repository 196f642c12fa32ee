//! A batch subscription's call: one call of its handler for the events of a message.
//!
//! Ground rules: a batch runs only when a delivery to the subscription could run now (not
//! parked, not stopping, still subscribed) and the message has more than one event; otherwise,
//! and when the call fails, each event goes the way of any delivery, one by one, as a first
//! attempt (the subscription's `handler` calls the batch handler with one event). While the
//! call runs the worker holds one delivery and the message's others, as shutdown counts them if
//! it gives up on the call.

use super::*;
use crate::context::Batch;

impl Worker<'_> {
    /// Runs batch subscription `sub`'s handler once for `items`, each an event with `per_event`
    /// deliveries in the message, which holds `rest` deliveries in all. `Some(flow)` once the
    /// call settled every event's delivery to `sub` (it succeeded), or gave the worker up;
    /// `None` when they are to run one by one (it failed, or could not run now).
    pub(super) fn deliver_batch<E: Event>(
        &mut self,
        sub: &Arc<Sub<E>>,
        items: &[(Envelope, E)],
        per_event: usize,
        rest: usize,
    ) -> Option<Flow> {
        let batch = sub.batch.as_ref()?;
        let shared = self.shared;
        let meta = &sub.meta;
        if items.len() < 2
            || self.detached
            || shared.stop.load(Ordering::Relaxed)
            || !meta.active.load(Ordering::Relaxed)
            || self.must_park(meta)
        {
            return None;
        }
        let n = items.len();
        let first = &items[0].0;
        self.open_batch();
        shared.start_event(first.id());
        shared.remaining.store((rest - 1) as u64, Ordering::Relaxed);
        shared.begin(meta.id);
        let ctx = Context {
            envelope: first,
            event_name: E::NAME,
            sub: meta,
            attempt: 1,
            core: self.core,
            worker: shared,
            deadline: meta
                .timeout
                .and_then(|timeout| self.core.clock.now().checked_add(timeout)),
        };
        let traced = self.trace_start();
        let sampled = match &mut self.recorder {
            Some(recorder) => recorder.sample().then(|| self.core.clock.unix_nanos()),
            None => None,
        };
        let view = Batch::many(items);
        let mut result = match catch_unwind(AssertUnwindSafe(|| batch(&view, &ctx))) {
            Ok(Ok(())) => Outcome::Succeeded,
            Ok(Err(error)) => Outcome::Failed(error, false),
            Err(payload) => Outcome::Failed(HandlerError::from_panic(payload), true),
        };
        if shared.staged.load(Ordering::Relaxed) {
            result = match take_deferral(shared, result) {
                Outcome::Deferred(slot) => {
                    // A batch is settled with one result, now: its events run one by one,
                    // where each may defer.
                    slot.void();
                    Outcome::Failed(HandlerError::msg("a batch handler cannot defer"), false)
                }
                result => result,
            };
        }
        let succeeded = matches!(result, Outcome::Succeeded);
        if let Some(recorder) = &mut self.recorder {
            if succeeded {
                for _ in 0..n {
                    recorder.starts(meta, true);
                    recorder.succeeded(meta);
                }
            }
            if let Some(start) = sampled {
                let span = Span {
                    start,
                    end: self.core.clock.unix_nanos(),
                    first: true,
                    from_publish: true,
                    succeeded,
                };
                recorder.record(meta, first.id(), span);
            }
        }
        if let Some((started_at, start)) = traced {
            for (envelope, _) in items {
                self.record_trace(envelope, E::NAME, sub, 1, &result, started_at, start);
            }
        }
        self.count_in_batch();
        if !shared.finish(meta.id) {
            // Shutdown gave up on the call: it counted one delivery abandoned and the
            // message's others left.
            self.detached = true;
            self.discard_outbox();
            for (i, (envelope, _)) in items.iter().enumerate() {
                if i == 0 {
                    self.track(envelope, Settled::Abandoned, 1);
                    self.track(envelope, Settled::Left, per_event - 1);
                } else {
                    self.track(envelope, Settled::Left, per_event);
                }
            }
            self.call_back();
            return Some(Flow::Abandoned);
        }
        match result {
            Outcome::Succeeded => {
                self.flush_outbox();
                bump(&shared.stats.outcomes.succeeded, n as u64);
                if meta.breaker.is_some() {
                    self.core.move_breaker(meta, |b, report| b.success(report));
                }
                for (envelope, _) in items {
                    self.track(envelope, Settled::Succeeded, 1);
                }
                shared.settle(n);
                if !self.later.is_empty() {
                    self.call_back();
                    if self.detached {
                        return Some(Flow::Abandoned);
                    }
                }
                Some(Flow::Continue)
            }
            Outcome::Failed(error, _) => {
                // No attempt spent, no delivery settled: one breaker failure, and the events
                // run one by one.
                self.discard_outbox();
                *meta.last_error.lock() = Some(error.to_string());
                if meta.breaker.is_some() {
                    let now = self.core.clock.now();
                    self.core
                        .move_breaker(meta, |b, report| b.failure(now, report));
                }
                None
            }
            Outcome::Deferred(_) | Outcome::Cancelled => None,
        }
    }
}

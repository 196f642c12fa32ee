//! The worker thread: its loop, its channel waits, and the delivery of each message's work.

use super::*;

/// The worker thread's own view.
pub(crate) struct Worker<'a> {
    pub(super) core: &'a Arc<Core>,
    pub(super) index: usize,
    /// The lane of its shard: it runs that lane's deliveries only.
    pub(super) lane: u8,
    pub(super) shared: &'a WorkerShared,
    pub(super) scratch: Vec<(Routed, Option<Duration>)>,
    /// Whether a batch is open, and how many events it has handled.
    pub(super) in_batch: bool,
    pub(super) batch_len: usize,
    /// The worker's copy of the handler tables; `None` only while a task borrows it.
    pub(super) snapshot: Option<Arc<Snapshot>>,
    /// Failed attempts of the current work that are retried or dead-lettered.
    pub(super) pending: Vec<Failed>,
    /// Deferred deliveries of the current work, armed once the work is done with its event.
    pub(super) deferred: Vec<Deferral>,
    pub(super) jitter: Jitter,
    /// The worker's latencies; `None` with metrics off.
    pub(super) recorder: Option<Recorder>,
    /// Deliveries of the events after the current one in the batch message being run.
    pub(super) rest: usize,
    /// Set while a retry runs that the event's tracker does not count (a redrive).
    pub(super) untracked: bool,
    /// User code to run once the deliveries it concerns are settled: trackers' callbacks, the
    /// dead-letter hook and sink.
    pub(super) later: Vec<Later>,
    /// Set once shutdown detached the worker (past its deadline, in a handler or a callback):
    /// it settles nothing more and exits.
    pub(super) detached: bool,
    /// The subscriptions with deliveries parked on this shard.
    pub(super) parking: Vec<u64>,
    /// The subscription whose parked deliveries are being run.
    pub(super) releasing: Option<u64>,
    /// The subscription whose half-open breaker's probe is running.
    pub(super) probing: Option<u64>,
    /// Set while the message run is a publish admitted into a `Shed` lane
    /// ([`Task::admitted`]).
    pub(super) admitted: bool,
    /// The keys of ordered subscriptions in progress on this shard.
    pub(super) keys: Keys,
    /// How it waits when its channel is empty.
    pub(super) pacing: Pacing,
}

/// User code a worker runs once what it concerns is settled.
pub(super) enum Later {
    Tracker(Done),
    Ring(Box<Aftermath>),
}

impl Runner for Worker<'_> {
    /// Runs user code outside a handler, under the guard and in a window in which shutdown may
    /// detach the worker: the state word names the seam while it runs.
    fn detached(&self) -> bool {
        self.detached
    }

    fn run(&mut self, seam: Seam, f: &mut dyn FnMut()) -> bool {
        let state = &self.shared.state;
        if self.detached || state.load(Ordering::Relaxed) != IDLE {
            return self.core.panics.run(seam, f).is_some();
        }
        let word = callback_word(seam);
        state.store(word, Ordering::Release);
        let ran = self.core.panics.run(seam, f).is_some();
        if state
            .compare_exchange(word, IDLE, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            // Shutdown gave up on the worker while it was in there, and has counted what it
            // held.
            self.detached = true;
        }
        ran
    }
}

pub(super) enum Outcome {
    Succeeded,
    /// The handler returned `Ok` after [`Context::defer`]: settled when the deferral completes.
    Deferred(Arc<Slot>),
    Cancelled,
    Failed(HandlerError, bool),
}

/// A deferred delivery of the current work, waiting to be armed with its event.
pub(super) struct Deferral {
    pub(super) slot: Arc<Slot>,
    pub(super) sub: Arc<dyn Any + Send + Sync>,
    pub(super) attempt: u32,
}

impl Worker<'_> {
    /// Opens a batch unless one is open.
    #[inline]
    pub(super) fn open_batch(&mut self) {
        if !self.in_batch {
            if let Some(recorder) = &mut self.recorder {
                recorder.answer(&self.core.metrics, &self.shared.collect);
            }
            open_batch_word(&self.shared.batch);
            self.in_batch = true;
            self.batch_len = 0;
        }
    }

    /// Closes the open batch, if any.
    #[inline]
    pub(super) fn close_batch(&mut self) {
        if self.in_batch {
            close_batch_word(&self.shared.batch);
            self.in_batch = false;
        }
    }

    /// Runs work inside a batch, closing the batch when it is full. The caller then hands the
    /// work to [`after`](Self::after).
    #[inline]
    pub(super) fn run(&mut self, work: &Work) -> Flow {
        self.shared.hold(work.deliveries());
        self.open_batch();
        let flow = match work {
            Work::Task(task) => (task.ops.run)(self, task),
            Work::Fanout(fanout) => (fanout.ops.run_fanout)(self, fanout),
            Work::Retry(retry) => (retry.ops.retry)(self, retry),
            Work::Batch(_) => unreachable!("batch messages are run by `handle`"),
        };
        self.count_in_batch();
        flow
    }

    /// Counts an event run in the open batch, closing it when it is full.
    #[inline]
    pub(super) fn count_in_batch(&mut self) {
        self.batch_len += 1;
        if self.batch_len >= BATCH {
            self.close_batch();
        }
    }

    /// Runs work taken by value.
    pub(super) fn handle(&mut self, work: Work) -> Flow {
        if let Work::Batch(batch) = work {
            let flow = (batch.ops.run_batch)(self, batch);
            return self.finished(flow);
        }
        let flow = self.run(&work);
        self.after(work);
        self.finished(flow)
    }

    /// Done with a message: what the worker does next. A worker that shutdown detached (in a
    /// callback, say the event's `Drop`) exits.
    #[inline]
    pub(super) fn finished(&self, flow: Flow) -> Flow {
        if self.detached {
            return Flow::Abandoned;
        }
        debug_assert!(
            flow != Flow::Continue || self.shared.holding.load(Ordering::Relaxed) == 0,
            "a message's deliveries were all settled or handed on"
        );
        flow
    }

    /// Done with `work`: retries or dead-letters its failed deliveries, moving the event to the
    /// heap to share it between them.
    #[inline]
    pub(super) fn after(&mut self, work: Work) {
        if self.pending.is_empty() && self.deferred.is_empty() {
            if work.needs_drop() {
                self.dispose_slow(work);
            }
            // Else dropped here, in place.
            return;
        }
        let (ops, event) = match work {
            Work::Task(task) => (task.ops, (task.ops.share)(task)),
            Work::Fanout(fanout) => (fanout.ops, fanout.event),
            _ => unreachable!("retries and batches handle their own failures"),
        };
        self.arm_deferred(ops, &event, None, true);
        self.retry_failed(ops, event);
    }

    /// Takes the worker's snapshot, first refreshing it if it is older than generation `generation`.
    /// The caller puts it back.
    #[inline]
    pub(super) fn snapshot_for(&mut self, generation: u32) -> Arc<Snapshot> {
        let snapshot = self
            .snapshot
            .take()
            .expect("the snapshot is put back after each task");
        if !before(snapshot.generation, generation) {
            return snapshot;
        }
        self.core.registry.load_full()
    }

    /// Lets go of handler tables that unsubscribe replaced: called before the worker waits.
    pub(super) fn refresh_snapshot(&mut self) {
        let current = self.core.registry.generation();
        if self
            .snapshot
            .as_ref()
            .is_some_and(|s| s.generation != current)
        {
            self.snapshot = Some(self.core.registry.load_full());
        }
    }

    /// Runs attempt `attempt` of the delivery of `event` to `sub`, with `remaining` deliveries
    /// of the same event after it, and settles it, or asks for a retry. `first`: the delivery
    /// comes with the published event (not a retry or a redrive).
    pub(super) fn deliver<E: Event>(
        &mut self,
        envelope: &Envelope,
        sub: &Arc<Sub<E>>,
        event: &E,
        remaining: usize,
        attempt: u32,
        first: bool,
    ) -> Flow {
        let shared = self.shared;
        let id = sub.meta.id;
        if self.detached {
            return Flow::Abandoned;
        }
        if shared.stop.load(Ordering::Relaxed) {
            // Trackers first: once the ledger says settled (`flush`), trackers have completed.
            self.track(envelope, Settled::Left, remaining + 1);
            shared.settle_left(remaining + 1);
            self.call_back();
            return Flow::Stop;
        }
        debug_assert!(self.in_batch, "deliveries run inside a batch");
        if self.must_park(&sub.meta) && sub.meta.active.load(Ordering::Relaxed) {
            // Run later, at this same attempt, after those parked before it; or, a publish
            // admitted into a `Shed` lane past the subscription's park capacity, shed. One
            // being released when the subscription was paused again goes back first in line:
            // it is the oldest.
            let shed = self.admitted && first && sub.meta.park_full();
            let then = match () {
                _ if shed => Then::Shed,
                _ if self.releasing == Some(sub.meta.id) => Then::Repark,
                _ => Then::Park,
            };
            self.pending.push(Failed {
                sub: sub.clone(),
                attempt,
                error: String::new(),
                then,
            });
            shared
                .held_retries
                .store(self.pending.len() as u64, Ordering::Relaxed);
            return Flow::Continue;
        }
        if self.must_wait(&sub.meta, envelope) && sub.meta.active.load(Ordering::Relaxed) {
            return self.wait_behind_head(sub, attempt, first);
        }
        let outcome = if sub.meta.active.load(Ordering::Relaxed) {
            shared
                .remaining
                .store((remaining + self.rest) as u64, Ordering::Relaxed);
            shared.begin(id);
            let ctx = Context {
                envelope,
                event_name: E::NAME,
                sub: &sub.meta,
                attempt,
                core: self.core,
                worker: shared,
                deadline: match sub.meta.timeout {
                    None => None,
                    Some(timeout) => self.core.clock.now().checked_add(timeout),
                },
            };
            #[cfg(feature = "tracing")]
            let span = tracing::info_span!(
                "microbus.handle",
                event = E::NAME,
                event_id = %envelope.id(),
                correlation_id = %envelope.correlation_id(),
                service = sub.meta.service.as_str(),
                handler = &*sub.meta.name,
                attempt,
            );
            #[cfg(feature = "tracing")]
            let _entered = span.enter();
            let traced = self.trace_start();
            let sampled = match &mut self.recorder {
                Some(recorder) => {
                    recorder.starts(&sub.meta, attempt == 1);
                    recorder.sample().then(|| self.core.clock.unix_nanos())
                }
                None => None,
            };
            let mut result = match catch_unwind(AssertUnwindSafe(|| (sub.handler)(event, &ctx))) {
                Ok(Ok(())) => Outcome::Succeeded,
                Ok(Err(error)) => Outcome::Failed(error, false),
                Err(payload) => Outcome::Failed(HandlerError::from_panic(payload), true),
            };
            if shared.staged.load(Ordering::Relaxed) {
                result = take_deferral(shared, result);
            }
            if let Some(recorder) = &mut self.recorder {
                let succeeded = matches!(result, Outcome::Succeeded);
                if succeeded {
                    recorder.succeeded(&sub.meta);
                }
                if let Some(start) = sampled {
                    let span = Span {
                        start,
                        end: self.core.clock.unix_nanos(),
                        first,
                        from_publish: first || attempt > 1,
                        succeeded,
                    };
                    recorder.record(&sub.meta, envelope.id(), span);
                }
            }
            if let Some((started_at, start)) = traced {
                self.record_trace(envelope, E::NAME, sub, attempt, &result, started_at, start);
            }
            if !shared.finish(id) {
                // Shutdown gave up on this delivery and has already reported it, with the
                // failed deliveries of the event held for retry as discarded.
                self.detached = true;
                if let Outcome::Deferred(slot) = &result {
                    slot.void();
                }
                for failed in std::mem::take(&mut self.pending) {
                    self.track(envelope, Settled::Discarded, 1);
                    drop_with(&mut &self.core.panics, failed);
                }
                self.discard_outbox();
                self.track(envelope, Settled::Left, remaining);
                self.track(envelope, Settled::Abandoned, 1);
                self.call_back();
                return Flow::Abandoned;
            }
            result
        } else {
            Outcome::Cancelled
        };
        let stats = &shared.stats;
        let settled = match outcome {
            Outcome::Succeeded => {
                self.flush_outbox();
                bump(&stats.outcomes.succeeded, 1);
                self.key_settled(&sub.meta, envelope);
                if sub.meta.breaker.is_some() {
                    self.probing = None;
                    self.core
                        .move_breaker(&sub.meta, |b, report| b.success(report));
                }
                Settled::Succeeded
            }
            Outcome::Deferred(slot) => {
                // A deferred probe's outcome moves the breaker when it completes.
                self.probing = None;
                self.key_in_progress(&sub.meta, envelope);
                // Outstanding until the deferral completes (or shutdown takes it over).
                self.flush_outbox();
                self.core.deferrals.register(&slot);
                shared.hand_off(1);
                self.deferred.push(Deferral {
                    slot,
                    sub: sub.clone(),
                    attempt,
                });
                return Flow::Continue;
            }
            Outcome::Cancelled => {
                sub.meta.outcomes.cancelled.fetch_add(1, Ordering::Relaxed);
                bump(&stats.outcomes.cancelled, 1);
                self.key_settled(&sub.meta, envelope);
                Settled::Cancelled
            }
            Outcome::Failed(error, panicked) => match self.failed(sub, attempt, error, panicked) {
                Some(settled) => {
                    self.key_settled(&sub.meta, envelope);
                    settled
                }
                None => {
                    self.key_in_progress(&sub.meta, envelope);
                    return Flow::Continue;
                }
            },
        };
        self.track(envelope, settled, 1);
        shared.settle(1);
        if !self.later.is_empty() {
            // Settled first, then the tracker's callback.
            self.call_back();
            if self.detached {
                return Flow::Abandoned;
            }
        }
        Flow::Continue
    }

    /// Settles `n` deliveries of `envelope`'s event in its tracker, if it is tracked (and this
    /// is not a redrive).
    #[inline]
    pub(super) fn track(&mut self, envelope: &Envelope, how: Settled, n: usize) {
        if envelope.has_extra() {
            self.track_slow(envelope, how, n);
        }
    }

    #[cold]
    #[inline(never)]
    pub(super) fn track_slow(&mut self, envelope: &Envelope, how: Settled, n: usize) {
        if !self.untracked
            && let Some(done) = envelope.tracker().and_then(|t| t.settle(how, n))
        {
            self.later.push(Later::Tracker(done));
        }
    }

    /// Runs the user code waiting for settled deliveries ([`Later`]), each in its window.
    #[cold]
    #[inline(never)]
    pub(super) fn call_back(&mut self) {
        for later in std::mem::take(&mut self.later) {
            match later {
                Later::Tracker(done) => done.run(self),
                Later::Ring(after) => {
                    let core = self.core;
                    core.dead_letters.call_back(*after, self);
                }
            }
        }
    }

    /// Drops `work` (the event in it: its `Drop` may be user code, run in a window).
    #[inline(always)]
    pub(super) fn dispose(&mut self, work: Work) {
        if work.needs_drop() {
            self.dispose_slow(work);
        }
    }

    #[cold]
    #[inline(never)]
    pub(super) fn dispose_slow(&mut self, work: Work) {
        drop_with(self, work);
    }

    /// When a handler run starts, in wall-clock and monotonic time, if the trace ring is on.
    #[inline]
    pub(super) fn trace_start(&self) -> Option<(SystemTime, Instant)> {
        let clock = &self.core.clock;
        self.core
            .traces
            .on()
            .then(|| (clock.system_time(), clock.now()))
    }

    /// Adds a handler run to the trace ring.
    #[cold]
    #[allow(clippy::too_many_arguments)]
    pub(super) fn record_trace<E: Event>(
        &self,
        envelope: &Envelope,
        event: &'static str,
        sub: &Sub<E>,
        attempt: u32,
        result: &Outcome,
        started_at: SystemTime,
        start: Instant,
    ) {
        self.core.traces.record(TraceEntry {
            event_id: envelope.id(),
            event,
            source: envelope.source(),
            correlation_id: envelope.correlation_id(),
            causation_id: envelope.causation_id(),
            service: sub.meta.service.as_str(),
            handler: sub.meta.name.to_string(),
            attempt,
            outcome: match result {
                Outcome::Failed(error, _) => TraceOutcome::Failed(error.to_string()),
                Outcome::Deferred(_) => TraceOutcome::Deferred,
                _ => TraceOutcome::Succeeded,
            },
            started_at,
            took: self.core.clock.now().saturating_duration_since(start),
        });
    }

    /// Sends what the handler staged: it is accepted before its parent delivery is settled.
    #[inline]
    pub(super) fn flush_outbox(&mut self) {
        if self.shared.staged.load(Ordering::Relaxed) {
            self.send_staged();
        }
    }

    /// Drops what a failed handler staged: those events were never published.
    pub(super) fn discard_outbox(&mut self) {
        for (routed, _) in self.shared.outbox.lock().drain(..) {
            if let Some((type_id, source, events)) = routed.work.events() {
                // A single event staged with no subscription was counted as unmatched.
                let unmatched = matches!(&routed.work, Work::Task(t) if t.deliveries() == 0);
                let registry = &self.core.registry;
                registry.uncount(type_id, source, events as u64, unmatched);
            }
        }
    }

    pub(super) fn send_staged(&mut self) {
        self.shared.staged.store(false, Ordering::Relaxed);
        std::mem::swap(&mut *self.shared.outbox.lock(), &mut self.scratch);
        let mut staged = std::mem::take(&mut self.scratch);
        let mut items = staged.drain(..);
        for (routed, delay) in items.by_ref() {
            if delay.is_none()
                && let Work::Task(task) = &routed.work
                && task.deliveries() == 0
            {
                (task.ops.unmatched)(self, task);
                drop_with(self, routed);
                if self.detached {
                    // Shutdown took the worker over while a tap ran: the rest is never sent.
                    break;
                }
                continue;
            }
            let deliveries = routed.work.deliveries();
            self.core.shards[routed.shard].gate.accept(deliveries);
            let left = match delay {
                None => self.core.offer(self.index, routed),
                Some(delay) => match self.core.wait_on_timer(routed, delay) {
                    Ok(()) => 0,
                    Err(_) => deliveries,
                },
            };
            self.shared.settle_left_accepted(left);
        }
        for (routed, _) in items {
            drop_with(self, routed);
        }
        self.scratch = staged;
    }

    /// Offers spilled events again; runs the ones bound for this worker's own shard.
    pub(super) fn drain_spill(&mut self) -> Flow {
        let mut attempts = self.shared.spill_len.load(Ordering::Relaxed);
        while attempts > 0 {
            attempts -= 1;
            let Some(routed) = self.shared.pop_spill() else {
                break;
            };
            if routed.shard == self.index {
                let flow = self.handle(routed.work);
                if flow != Flow::Continue {
                    return flow;
                }
                continue;
            }
            if let Err(routed) = self.core.shards[routed.shard].try_offer(routed) {
                self.shared.hand_over(routed);
            }
        }
        Flow::Continue
    }

    pub(super) fn run_loop(&mut self, rx: &Receiver<Msg>) -> Flow {
        loop {
            if self.shared.release.load(Ordering::Relaxed) {
                let flow = self.release_parked();
                if flow != Flow::Continue {
                    return flow;
                }
            }
            // `SeqCst`, paired with the fences in the channel: an event handed over while this
            // worker emptied its channel is seen here, or its wake-up finds room.
            if self.shared.spill_len.load(Ordering::SeqCst) > 0 {
                let flow = self.drain_spill();
                if flow != Flow::Continue {
                    return flow;
                }
            }
            // Matched by reference throughout: a task is 128 bytes, and every move is a copy.
            let mut received = rx.try_recv();
            if let Err(TryRecvError::Empty) = received {
                self.close_batch();
                if let Some(recorder) = &mut self.recorder {
                    recorder.answer(&self.core.metrics, &self.shared.collect);
                }
                self.core.notify_idle();
                self.refresh_snapshot();
                let lane = &self.core.lanes[self.lane as usize];
                if let WaitStrategy::SpinThenPark(spin) = lane.wait_strategy {
                    received = spin_for(rx, spin);
                } else {
                    received = self.pacing.wait(rx);
                }
            }
            if let Err(TryRecvError::Empty) = received {
                received = if self.shared.spill_len.load(Ordering::SeqCst) > 0 {
                    match rx.recv_timeout(SPILL_RETRY) {
                        Err(e) if e.is_timeout() => continue,
                        other => other.map_err(|_| TryRecvError::Disconnected),
                    }
                } else {
                    rx.recv().map_err(|_| TryRecvError::Disconnected)
                };
            }
            if received.is_ok() {
                self.pacing.received();
            }
            match &received {
                Ok(Msg::Work(Work::Batch(_))) => {
                    let Ok(Msg::Work(work)) = received else {
                        unreachable!("matched above")
                    };
                    let flow = self.handle(work);
                    if flow != Flow::Continue {
                        return flow;
                    }
                }
                Ok(Msg::Work(work)) => {
                    let flow = self.run(work);
                    if let Ok(Msg::Work(work)) = received {
                        self.after(work);
                    }
                    let flow = self.finished(flow);
                    if flow != Flow::Continue {
                        return flow;
                    }
                }
                Ok(Msg::Wake) => {
                    if self.shared.stop.load(Ordering::SeqCst) {
                        return Flow::Stop;
                    }
                }
                Err(_) => return Flow::Stop,
            }
        }
    }
}

/// After a handler that staged events or deferred: its deferral, if it made one, turns a
/// success into [`Outcome::Deferred`]; after a failure the deferral is void.
#[cold]
#[inline(never)]
pub(super) fn take_deferral(shared: &WorkerShared, result: Outcome) -> Outcome {
    match (shared.deferral.lock().take(), result) {
        (Some(slot), Outcome::Succeeded) => Outcome::Deferred(slot),
        (Some(slot), result) => {
            slot.void();
            result
        }
        (None, result) => result,
    }
}

/// The body of worker thread `index`.
pub(crate) fn run_worker(core: Arc<Core>, index: usize) {
    let _current = crate::bus::OwnThread::enter(core.id, Some(index));
    let shard = &core.shards[index];
    let mut worker = Worker {
        core: &core,
        index,
        lane: shard.lane,
        shared: &shard.worker,
        scratch: Vec::new(),
        in_batch: false,
        batch_len: 0,
        snapshot: Some(core.registry.load_full()),
        pending: Vec::new(),
        deferred: Vec::new(),
        jitter: Jitter::new(core.worker_seed(index)),
        recorder: core
            .metrics
            .enabled
            .then(|| Recorder::new(index, core.metrics.sample_every)),
        rest: 0,
        untracked: false,
        later: Vec::new(),
        detached: false,
        parking: Vec::new(),
        releasing: None,
        probing: None,
        admitted: false,
        keys: Keys::default(),
        pacing: Pacing::default(),
    };
    worker.run_loop(&shard.rx);
    worker.close_batch();
    if let Some(recorder) = &mut worker.recorder {
        recorder.exit(&core.metrics, &shard.worker.collect);
    } else {
        shard
            .worker
            .collect
            .done
            .store(crate::metrics::EXITED, Ordering::Release);
    }
}

//! Quiescence, flush, the statistics and metrics read from every shard, and shutdown.

use super::*;

/// Deliveries that shutdown settles itself: events that never ran, and retries that never ran
/// (dead-lettered, or discarded when dead letters are off).
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Swept {
    pub(super) outcomes: Outcomes,
    /// Deliveries it settled in each lane.
    pub(super) by_lane: [u64; crate::config::MAX_LANES],
}

impl Swept {
    /// Settles what shutdown found waiting: events that never ran are left, retries that never
    /// ran are dead letters (reason [`Shutdown`](DeadLetterReason::Shutdown)), or discarded
    /// with dead letters off. It only counts: the user code that follows (trackers' callbacks,
    /// the event's `Serialize` and `Drop`, the hook and the sink) goes to `leftovers`.
    fn add(&mut self, core: &Arc<Core>, shard: usize, work: Work, leftovers: &mut Leftovers) {
        self.by_lane[core.shards[shard].lane as usize] += work.deliveries() as u64;
        let kept = core.dead_letters.enabled();
        if kept && core.config.dead_letter_left && !matches!(work, Work::Retry(_)) {
            // Kept as dead letters, to be redriven (after a restart, from a file).
            let deliveries = work.deliveries() as u64;
            let mut done = Vec::new();
            let lane = core.shards[shard].lane;
            let retries = work.never_ran(lane, &core.registry.load_full(), &mut done);
            self.outcomes.dead_lettered += retries.len() as u64;
            self.outcomes.left += deliveries - retries.len() as u64;
            done.extend(
                retries
                    .iter()
                    .filter_map(|r| r.track(Settled::DeadLettered)),
            );
            for done in done {
                leftovers.push(move |runner| done.run(runner));
            }
            for retry in retries {
                self.bury(core, retry, leftovers);
            }
            return;
        }
        let how = match &work {
            Work::Retry(_) if kept => Settled::DeadLettered,
            Work::Retry(_) => Settled::Discarded,
            _ => Settled::Left,
        };
        if let Some(done) = work.track(how) {
            leftovers.push(move |runner| done.run(runner));
        }
        match work {
            Work::Task(_) | Work::Batch(_) | Work::Fanout(_) => {
                self.outcomes.left += work.deliveries() as u64;
                if work.needs_drop() {
                    leftovers.drop(work);
                }
            }
            Work::Retry(retry) if kept => {
                self.outcomes.dead_lettered += 1;
                self.bury(core, retry, leftovers);
            }
            Work::Retry(retry) => {
                self.outcomes.discarded += 1;
                leftovers.drop(retry);
            }
        }
    }

    /// Leaves `retry` to be made a dead letter (reason `Shutdown`); it is counted, and its
    /// tracker settled, already.
    pub(super) fn bury(&mut self, core: &Arc<Core>, retry: Retry, leftovers: &mut Leftovers) {
        let core = core.clone();
        let retry = retry.untracked();
        leftovers.push(move |runner| {
            if let Some(burial) = Burial::make(&core, retry, DeadLetterReason::Shutdown, runner) {
                burial.finish(&core, runner);
            }
        });
    }

    pub(super) fn total(&self) -> u64 {
        self.outcomes.settled()
    }
}

impl Core {
    pub(super) fn settled(&self) -> u64 {
        self.settled_with(&[])
    }

    /// The deliveries settled, with the counts of the workers shutdown detached.
    pub(super) fn settled_with(&self, frozen: &[Option<WorkerCounts>]) -> u64 {
        let deferred = self
            .deferrals
            .settled
            .load(Ordering::Acquire)
            .wrapping_add(self.shed_books.settled.load(Ordering::Acquire));
        self.shards
            .iter()
            .enumerate()
            .fold(deferred, |sum, (index, shard)| {
                let settled = match frozen.get(index).copied().flatten() {
                    Some(counts) => counts.settled,
                    None => shard.worker.stats.settled.load(Ordering::Acquire),
                };
                sum.wrapping_add(settled)
            })
    }

    pub(super) fn is_quiescent(&self) -> bool {
        Quiescence::check(self.shards.iter().map(|s| &*s.gate), || self.settled())
    }

    /// Deliveries outstanding now (live; may read a settlement before its count).
    pub(super) fn outstanding_now(&self) -> i64 {
        outstanding(
            net_sum(self.shards.iter().map(|s| &*s.gate)),
            self.settled(),
        )
    }

    /// Whether everything outstanding waits on the timer, none of it due before `deadline`, or
    /// is parked by a paused subscription or a breaker open past it: read twice around them,
    /// so that nothing moved in between. `None`: whether it all waits on the (manual) clock,
    /// or on a resume.
    pub(super) fn parked_past(&self, deadline: Option<Instant>) -> bool {
        let before = self.outstanding_now();
        if before <= 0 {
            return false;
        }
        let (waiting, next_due) = self.timer.parked();
        // Parked past it, or waiting behind a key's head (which is outstanding itself).
        let paused: usize = self
            .shards
            .iter()
            .map(|s| s.worker.parked_past(deadline) + s.worker.waiting.lock().len())
            .sum();
        let past = |due: Instant| deadline.is_none_or(|d| due > d);
        before == (waiting + paused) as i64
            && (waiting == 0 || next_due.is_some_and(past))
            && self.outstanding_now() == before
    }

    /// Waits until the bus is quiescent or `deadline` passes (`None`: no deadline), or
    /// `early` says to stop. Returns whether the bus was quiescent.
    pub(super) fn wait_quiescent(&self, deadline: Option<Instant>, early: Early) -> bool {
        let manual = self.clock.is_manual();
        self.idle_waiters.fetch_add(1, Ordering::SeqCst);
        let mut guard = self.idle_lock.lock();
        let quiet = loop {
            if self.is_quiescent() {
                break true;
            }
            let stop = match early {
                // Under a manual clock, what waits on it will not run before any deadline.
                Early::Unreachable if manual => self.parked_past(None),
                Early::Unreachable => deadline.is_some_and(|d| self.parked_past(Some(d))),
                Early::OnClock => manual && self.waiting_on_clock().is_some(),
            };
            if stop {
                break false;
            }
            let now = Instant::now();
            let poll = if manual {
                Duration::from_millis(1)
            } else {
                Duration::from_millis(10)
            };
            let wait = match deadline {
                Some(d) if d <= now => break false,
                Some(d) => (d - now).min(poll),
                None => poll,
            };
            self.idle_cv.wait_for(&mut guard, wait);
        };
        drop(guard);
        self.idle_waiters.fetch_sub(1, Ordering::SeqCst);
        quiet
    }

    /// Waits until every batch that other workers have open has closed (see `shard`): after a
    /// subscription's `active` flag was cleared, no call of it starts once this returns.
    ///
    /// Called from a handler, it first closes its own worker's batch (and opens a new one
    /// after): two handlers unsubscribing at once on two workers would otherwise wait for each
    /// other forever.
    pub(crate) fn wait_for_open_batches(&self) {
        let own = OwnThread::worker_of(self.id);
        let own_batch = own.map(|index| &self.shards[index].worker.batch);
        let reopen = own_batch.is_some_and(|batch| {
            let value = batch.load(Ordering::Relaxed);
            let open = value % 2 == 1;
            if open {
                batch.store(value + 1, Ordering::SeqCst);
            }
            open
        });
        let others = self
            .shards
            .iter()
            .enumerate()
            .filter(|(index, _)| own != Some(*index))
            .map(|(_, shard)| &shard.worker.batch);
        let mut step = 0;
        // Once the bus has stopped no call starts anywhere; a worker detached inside a handler
        // may keep its batch open for as long as that handler runs.
        wait_for_batches(
            others,
            || self.stopped.load(Ordering::SeqCst),
            || backoff(&mut step),
        );
        if let Some(batch) = own_batch.filter(|_| reopen) {
            batch.store(batch.load(Ordering::Relaxed) + 1, Ordering::SeqCst);
        }
    }

    pub(super) fn pending(&self) -> Pending {
        let now = self.clock.now();
        Pending {
            queued: self
                .shards
                .iter()
                .map(|s| s.rx.len() + s.worker.spill_len.load(Ordering::Relaxed))
                .sum(),
            running: self.shards.iter().filter(|s| s.worker.running()).count(),
            waiting: self.timer.len(),
            next_due_in: if self.clock.is_manual() {
                // What the clock must reach: a breaker's cool-down as well.
                self.next_due()
            } else {
                self.timer.earliest()
            }
            .map(|due| due.saturating_duration_since(now)),
            deferred: self.deferrals.outstanding(),
            lanes: self
                .lanes
                .iter()
                .map(|lane| {
                    let shards = &self.shards[lane.start..lane.start + lane.workers];
                    LanePending {
                        lane: lane.name.clone(),
                        queued: shards
                            .iter()
                            .map(|s| s.rx.len() + s.worker.spill_len.load(Ordering::Relaxed))
                            .sum(),
                        running: shards.iter().filter(|s| s.worker.running()).count(),
                    }
                })
                .collect(),
            parked: self
                .registry
                .live()
                .iter()
                .filter(|meta| meta.parked.load(Ordering::Relaxed) > 0)
                .map(|meta| ParkedPending {
                    service: meta.service.as_str().to_owned(),
                    handler: meta.name.to_string(),
                    lane: self.lanes[meta.lane as usize].name.clone(),
                    parked: meta.parked.load(Ordering::Relaxed),
                    paused: meta.is_paused(),
                })
                .collect(),
            held: self.held_keys(),
        }
    }

    pub(super) fn flush(&self, timeout: Duration) -> Result<(), FlushError> {
        if OwnThread::is_own(self.id) {
            return Err(FlushError::in_handler());
        }
        if self.wait_quiescent(Instant::now().checked_add(timeout), Early::OnClock) {
            Ok(())
        } else if self.waiting_on_clock().is_some() {
            Err(FlushError::waiting_on_clock(self.pending()))
        } else {
            Err(FlushError::timeout(self.pending()))
        }
    }

    /// Each worker's counts: read now, or as `frozen` when shutdown detached it (a detached
    /// worker's later writes do not count).
    pub(super) fn worker_counts<'a>(
        &'a self,
        frozen: &'a [Option<WorkerCounts>],
    ) -> impl Iterator<Item = WorkerCounts> + 'a {
        self.shards.iter().enumerate().map(|(index, shard)| {
            match frozen.get(index).copied().flatten() {
                Some(counts) => counts,
                None => shard.worker.stats.read(),
            }
        })
    }

    /// The counts, with what shutdown itself settled (`abandoned`, `swept`), the gates' net
    /// count (read now when `None`) and the counts of the workers shutdown detached.
    pub(super) fn stats_with(
        &self,
        abandoned: u64,
        swept: Swept,
        net: Option<u64>,
        frozen: &[Option<WorkerCounts>],
    ) -> BusStats {
        let mut stats = BusStats {
            abandoned,
            evicted: self.dead_letters.evicted(),
            unmatched: self.unmatched.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
            stalled: self.stalls.total(),
            held_keys_evicted: self.held_evicted.load(Ordering::Relaxed),
            callback_panics: self.panics.counts(),
            ..BusStats::default()
        };
        stats += swept.outcomes;
        let d = &self.deferrals;
        let shed = &self.shed_books;
        let mut settled = abandoned
            + swept.total()
            + d.settled.load(Ordering::Acquire)
            + shed.settled.load(Ordering::Acquire);
        stats += d.outcomes.read();
        stats += shed.outcomes.read();
        for w in self.worker_counts(frozen) {
            settled += w.settled;
            stats += w.outcomes;
        }
        let net = net.unwrap_or_else(|| net_sum(self.shards.iter().map(|s| &*s.gate)));
        let out = outstanding(net, settled);
        stats.in_flight = out.max(0) as u64;
        stats.delivered = settled.wrapping_add_signed(out);
        stats
    }

    pub(super) fn stats(&self) -> BusStats {
        if let Lifecycle::Done(report) = &*self.lifecycle.lock() {
            return BusStats {
                refused: self.refused.load(Ordering::Relaxed),
                callback_panics: self.panics.counts(),
                stalled: self.stalls.total(),
                held_keys_evicted: self.held_evicted.load(Ordering::Relaxed),
                ..report.stats.clone()
            };
        }
        let stats = self.stats_with(0, Swept::default(), None, &[]);
        BusStats {
            // A worker may settle an event a moment before its publisher counts it accepted:
            // live counts never show fewer deliveries than outcomes.
            delivered: stats.sum(crate::stats::Role::Outcome),
            ..stats
        }
    }

    pub(super) fn metrics(&self) -> MetricsSnapshot {
        let metrics = &self.metrics;
        let mut snapshot = MetricsSnapshot {
            enabled: metrics.enabled,
            sample_every: metrics.sample_every,
            stats: BusStats::default(),
            events: Vec::new(),
            handlers: Vec::new(),
            event_latency: Vec::new(),
            queue_depth: Vec::new(),
            timer_pending: 0,
            dead_letters_held: 0,
            workers_behind: Vec::new(),
            bridges: Vec::new(),
            lanes: Vec::new(),
            stalls: self.stalls_now(),
        };
        if metrics.enabled {
            let asked: Vec<(&Collect, u64)> = self
                .shards
                .iter()
                .map(|shard| {
                    let asked = shard.worker.collect.ask();
                    // Wakes a waiting worker; a full channel means the worker is busy and
                    // answers between two batches.
                    let _ = shard.tx.try_send(Msg::Wake);
                    (&shard.worker.collect, asked)
                })
                .collect();
            // A handler asking cannot wait for its own worker.
            let own = OwnThread::worker_of(self.id);
            snapshot.workers_behind = Collect::wait_all(asked.iter().copied(), own);
            snapshot.events = self.registry.counters.event_counts();
            (snapshot.handlers, snapshot.event_latency) = metrics.handler_metrics();
            let held = self.held_keys();
            for h in snapshot.handlers.iter_mut().filter(|h| h.ordered) {
                h.held_keys = held.iter().filter(|k| k.subscription == h.id).count() as u64;
            }
        }
        snapshot.stats = self.stats();
        snapshot.queue_depth = self
            .shards
            .iter()
            .map(|s| (s.rx.len() + s.worker.spill_len.load(Ordering::Relaxed)) as u64)
            .collect();
        snapshot.timer_pending = self.timer.len() as u64;
        snapshot.dead_letters_held = self.dead_letters.len() as u64;
        snapshot.bridges = self.bridges.lock().iter().filter_map(|b| b()).collect();
        snapshot.lanes = self
            .lanes
            .iter()
            .map(|lane| self.lane_metrics(lane))
            .collect();
        snapshot
    }

    pub(super) fn health(&self) -> crate::health::Health {
        use crate::health::{HandlerHealth, Health, ImportLag, LaneHealth};
        let handler = |meta: &SubMeta| HandlerHealth {
            service: meta.service.as_str().to_owned(),
            handler: meta.name.to_string(),
            lane: self.lanes[meta.lane as usize].name.clone(),
            breaker: meta.breaker.as_ref().map(|b| b.state()),
            paused: meta.is_paused(),
            parked: meta.parked.load(Ordering::Relaxed),
        };
        let live = self.registry.live();
        let open = |h: &HandlerHealth| {
            h.breaker
                .is_some_and(|b| b != crate::breaker::BreakerState::Closed)
        };
        Health {
            open_breakers: live.iter().map(|m| handler(m)).filter(open).collect(),
            paused: live
                .iter()
                .map(|m| handler(m))
                .filter(|h| h.paused)
                .collect(),
            stalls: self.stalls_now(),
            full_lanes: self
                .lanes
                .iter()
                .filter_map(|lane| {
                    let shards = &self.shards[lane.start..lane.start + lane.workers];
                    let full = shards.iter().filter(|s| s.tx.is_full()).count();
                    (full > 0).then(|| LaneHealth {
                        lane: lane.name.clone(),
                        backpressure: match lane.backpressure {
                            Backpressure::Shed => "shed",
                            _ => "block",
                        }
                        .to_owned(),
                        full_shards: full,
                        shards: shards.len(),
                        shed: lane.shed.load(Ordering::Relaxed),
                    })
                })
                .collect(),
            imports: self
                .bridges
                .lock()
                .iter()
                .filter_map(|b| b())
                .flat_map(|b| {
                    let prefix = b.prefix.clone();
                    b.imports.into_iter().map(move |i| ImportLag {
                        bridge: prefix.clone(),
                        stream: i.stream,
                        lag: i.lag,
                        pending: i.pending,
                    })
                })
                .filter(|i| i.lag != Some(0) || i.pending > 0)
                .collect(),
        }
    }

    fn lane_metrics(&self, lane: &LaneState) -> crate::metrics::LaneMetrics {
        let shards = &self.shards[lane.start..lane.start + lane.workers];
        let sum = |f: &dyn Fn(&Shard) -> u64| shards.iter().map(f).sum::<u64>();
        crate::metrics::LaneMetrics {
            name: lane.name.clone(),
            workers: lane.workers,
            backpressure: match lane.backpressure {
                Backpressure::Shed => "shed",
                _ => "block",
            }
            .to_owned(),
            queue_depth: sum(&|s| s.rx.len() as u64),
            overflow_depth: sum(&|s| s.worker.spill_len.load(Ordering::Relaxed) as u64),
            busy_workers: sum(&|s| u64::from(s.worker.state.load(Ordering::Relaxed) != IDLE)),
            shed: lane.shed.load(Ordering::Relaxed),
            publisher_wait_nanos: lane.waited_nanos.load(Ordering::Relaxed),
        }
    }

    pub(crate) fn shutdown(
        self: &Arc<Self>,
        timeout: Duration,
    ) -> Result<ShutdownReport, ShutdownError> {
        if OwnThread::is_own(self.id) {
            return Err(ShutdownError::InHandler);
        }
        {
            let mut lifecycle = self.lifecycle.lock();
            loop {
                match &*lifecycle {
                    Lifecycle::Running => break,
                    Lifecycle::Stopping => self.lifecycle_cv.wait(&mut lifecycle),
                    Lifecycle::Done(report) => return Ok((**report).clone()),
                }
            }
            *lifecycle = Lifecycle::Stopping;
        }
        let started = Instant::now();
        // The shutdown thread runs no user code, so nothing should unwind out of `stop`; if
        // something does all the same, the bus still ends up stopped, never half-way.
        let report = catch_unwind(AssertUnwindSafe(|| self.stop(started, timeout))).unwrap_or_else(
            |payload| {
                crate::guard::drop_payload(payload);
                self.stopped.store(true, Ordering::SeqCst);
                ShutdownReport {
                    stats: self.stats_with(0, Swept::default(), None, &[]),
                    deadline_passed: true,
                    abandoned: Vec::new(),
                    cut_off: 0,
                    elapsed: started.elapsed(),
                    lanes: Vec::new(),
                }
            },
        );
        *self.lifecycle.lock() = Lifecycle::Done(Box::new(report.clone()));
        self.lifecycle_cv.notify_all();
        Ok(report)
    }

    /// Stops the bus (see [`Bus::shutdown`]): by `timeout` after `started` plus
    /// [`SHUTDOWN_GRACE`], whatever user code is running.
    pub(super) fn stop(self: &Arc<Self>, started: Instant, timeout: Duration) -> ShutdownReport {
        let deadline = started.checked_add(timeout);
        // The latest it returns (`None`: it waits for ever).
        let last = deadline.and_then(|d| d.checked_add(SHUTDOWN_GRACE));
        let past = |at: Option<Instant>| at.is_some_and(|at| Instant::now() >= at);
        self.closing.store(true, Ordering::SeqCst);
        for shard in self.shards.iter() {
            shard.gate.close();
        }
        drop(self.signal_tx.lock().take());
        // Retries not due before the deadline will not run: no need to wait for it.
        let quiet = self.wait_quiescent(deadline, Early::Unreachable);

        self.timer.stop();
        if let Some(thread) = self.timer_thread.lock().take() {
            let _ = thread.join();
        }
        // What waits on the timer does not run: events to re-offer are left, retries not yet
        // due are failed deliveries given up. User code that follows goes to `leftovers`, for
        // a thread that shutdown can leave behind.
        let mut leftovers = Leftovers::default();
        let mut swept = Swept::default();
        for routed in self.timer.take() {
            swept.add(self, routed.shard, routed.work, &mut leftovers);
        }

        // Stop the workers between deliveries. Past the deadline, a worker still inside a
        // handler or a callback is detached: the compare-and-swap on its state word decides
        // whether the worker or shutdown owns what it holds, and its counts are frozen.
        for shard in self.shards.iter() {
            shard.worker.stop.store(true, Ordering::SeqCst);
            let _ = shard.tx.try_send(Msg::Wake);
        }
        let mut running: Vec<(usize, JoinHandle<()>)> =
            std::mem::take(&mut *self.worker_threads.lock())
                .into_iter()
                .enumerate()
                .collect();
        let mut abandoned = Vec::new();
        let mut frozen: Vec<Option<WorkerCounts>> = vec![None; self.shards.len()];
        let mut step = 0;
        while !running.is_empty() {
            let past_deadline = past(deadline);
            let past_last = past(last);
            let mut index = 0;
            while index < running.len() {
                let (worker, thread) = &running[index];
                let worker = *worker;
                let shared = &self.shards[worker].worker;
                if thread.is_finished() {
                    let (_, thread) = running.swap_remove(index);
                    let _ = thread.join();
                    continue;
                }
                let taken = if past_deadline {
                    shared.abandon()
                } else {
                    None
                };
                // Past the grace a worker that has not come back from the bus's own code is
                // left too (it settles nothing the report counts).
                let taken = taken
                    .or_else(|| past_last.then(|| shared.state.swap(ABANDONED, Ordering::AcqRel)));
                match taken {
                    Some(state) => {
                        frozen[worker] = Some(shared.stats.read());
                        abandoned.push((worker, state));
                        // Detached: it exits when it comes back.
                        running.swap_remove(index);
                    }
                    None => index += 1,
                }
            }
            if !running.is_empty() {
                backoff(&mut step);
            }
        }
        self.stopped.store(true, Ordering::SeqCst);

        // Deferred deliveries not completed by now never will be, as far as the report goes.
        let mut detached = self.deferrals.abandon_all(
            |sub| match self.registry.lookup(sub) {
                Some(meta) => (
                    meta.name.to_string(),
                    self.lanes[meta.lane as usize].name.clone(),
                ),
                None => ("?".to_owned(), "?".to_owned()),
            },
            &mut leftovers,
        );
        let mut given_up = detached.len() as u64;
        for &(index, state) in &abandoned {
            let worker: &WorkerShared = &self.shards[index].worker;
            let name = format!("microbus-worker-{index}");
            let lane = self.lane_of(index).name.clone();
            let event_id = worker.current_event();
            let in_handler = state != IDLE && state != ABANDONED && seam_of(state).is_none();
            match in_handler {
                false => {
                    // In a callback (or the bus's own code): what it held is abandoned.
                    let held = worker.holding.load(Ordering::Relaxed);
                    given_up += held;
                    detached.push(AbandonedDelivery {
                        worker: name,
                        lane,
                        event: "?",
                        event_id,
                        handler: String::new(),
                        seam: Some(seam_of(state).map_or("bus", |seam| seam.name())),
                        deliveries: held,
                    });
                }
                true => {
                    // In a handler: that delivery is abandoned, the event's later deliveries
                    // are left, and its failed ones held for retry are discarded.
                    let left = worker.remaining.load(Ordering::Relaxed);
                    let held = worker.held_retries.load(Ordering::Relaxed);
                    given_up += 1;
                    swept.outcomes.left += left;
                    swept.outcomes.discarded += held;
                    let meta = self.registry.lookup(state);
                    detached.push(AbandonedDelivery {
                        worker: name,
                        lane,
                        event: meta.as_ref().map_or("?", |m| m.event_name),
                        event_id,
                        handler: meta.map_or_else(|| "?".to_owned(), |m| m.name.to_string()),
                        seam: None,
                        deliveries: 1 + left + held,
                    });
                }
            }
        }
        // What is left in the channels and spill queues never ran. A publisher that counted
        // its event in before the gates closed may still be sending it, or giving it back:
        // sweep until the ledger balances (or, should it not, until the grace runs out: what
        // is missing then is counted as abandoned).
        let mut step = 0;
        let net = loop {
            for (index, shard) in self.shards.iter().enumerate() {
                // Parked deliveries, and those waiting for their key, are dead letters now,
                // like retries not yet due; oldest first (by id: each publisher's in publish
                // order), so that a redrive replays each key in order. Then the channel.
                let mut retries = shard.worker.take_parked(self);
                let mut spilled = Vec::new();
                for routed in shard.worker.take_spill() {
                    match routed.work {
                        Work::Retry(retry) if routed.shard == index => retries.push(retry),
                        work => spilled.push((routed.shard, work)),
                    }
                }
                retries.sort_by_key(|retry| retry.event.envelope.id());
                for retry in retries {
                    swept.add(self, index, Work::Retry(retry), &mut leftovers);
                }
                while let Ok(msg) = shard.rx.try_recv() {
                    if let Msg::Work(work) = msg {
                        swept.add(self, index, work, &mut leftovers);
                    }
                }
                for (shard, work) in spilled {
                    swept.add(self, shard, work, &mut leftovers);
                }
            }
            let settled = self
                .settled_with(&frozen)
                .wrapping_add(given_up)
                .wrapping_add(swept.total());
            let net = net_sum(self.shards.iter().map(|s| &*s.gate));
            // A publisher refused after the closing may add and refund in between: that only
            // ever makes the reading larger for a moment.
            let out = outstanding(net, settled);
            if out <= 0 {
                break net;
            }
            if past(last) {
                given_up += out as u64;
                break net;
            }
            backoff(&mut step);
        };
        // A stopped bus keeps no user code: the handler tables, the taps, the dead-letter hook
        // and sink, and the dead letters' way back to their handlers go, so that the user's
        // handles are their last owners (a handler that captured a `Bus` is no cycle).
        leftovers.drop((self.registry.forget(), self.rebuilders.forget()));
        leftovers.drop(self.taps.forget());
        leftovers.drop(self.dead_letters.forget_callbacks());
        // Last, once the leftovers have made their dead letters too.
        let core = self.clone();
        leftovers.push(move |runner| drop_with(runner, core.dead_letters.strip_redrives()));
        let cut_off = self.clean_up(leftovers, last);
        let workers: Vec<WorkerCounts> = self.worker_counts(&frozen).collect();
        let lanes = self
            .lanes
            .iter()
            .enumerate()
            .map(|(i, lane)| {
                let shards = lane.start..lane.start + lane.workers;
                let abandoned = detached
                    .iter()
                    .filter(|a| a.lane == lane.name)
                    .map(|a| a.deliveries)
                    .sum();
                let settled = workers[shards.clone()]
                    .iter()
                    .map(|w| w.settled)
                    .sum::<u64>()
                    + lane.settled_elsewhere.load(Ordering::Acquire)
                    + swept.by_lane[i]
                    + abandoned;
                LaneReport {
                    lane: lane.name.clone(),
                    accepted: net_sum(self.shards[shards].iter().map(|s| &*s.gate)),
                    settled,
                    shed: lane.shed.load(Ordering::Relaxed),
                    swept: swept.by_lane[i],
                    abandoned,
                }
            })
            .collect();
        ShutdownReport {
            stats: self.stats_with(given_up, swept, Some(net), &frozen),
            deadline_passed: !quiet || !detached.is_empty(),
            abandoned: detached,
            cut_off,
            elapsed: started.elapsed(),
            lanes,
        }
    }

    /// Runs the user code shutdown left over on a thread of its own, and waits for it until
    /// `last`: how many jobs it had not finished by then (it carries on, detached).
    pub(super) fn clean_up(self: &Arc<Self>, leftovers: Leftovers, last: Option<Instant>) -> u64 {
        let jobs = leftovers.len() as u64;
        if jobs == 0 {
            return 0;
        }
        let finished = Arc::new(AtomicU64::new(0));
        let (done_tx, done_rx) = crossbeam_channel::bounded::<()>(1);
        let jobs_cell = Arc::new(Mutex::new(Some(leftovers)));
        let thread = {
            let (finished, jobs_cell, core) = (finished.clone(), jobs_cell.clone(), self.clone());
            std::thread::Builder::new()
                .name("microbus-cleanup".to_owned())
                .spawn(move || {
                    if let Some(leftovers) = jobs_cell.lock().take() {
                        leftovers.run(&mut &core.panics, &finished);
                    }
                    let _ = done_tx.send(());
                })
        };
        if thread.is_err() {
            // No thread to be had: run them here, whatever the deadline.
            if let Some(leftovers) = jobs_cell.lock().take() {
                leftovers.run(&mut &self.panics, &finished);
            }
            return 0;
        }
        let _ = match last {
            Some(last) => done_rx.recv_deadline(last).map_err(|_| ()),
            None => done_rx.recv().map_err(|_| ()),
        };
        jobs - finished.load(Ordering::Acquire).min(jobs)
    }
}

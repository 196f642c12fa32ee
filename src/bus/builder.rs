//! [`BusBuilder`]: every setting, checked when the bus is built.

use super::stalls::StallHook;
use super::*;
use crate::stats::Stall;

/// Builds a [`Bus`]: `Bus::builder().workers(4).build()?`.
///
/// Every setting is checked by [`build`](Self::build), which names the field it refuses.
#[derive(Clone, Default)]
pub struct BusBuilder {
    config: Config,
    dead_letter_sink: Option<DeadLetterSink>,
    dead_letter_file: Option<std::path::PathBuf>,
    on_dead_letter: Option<DeadLetterSink>,
    on_stall: Option<StallHook>,
    clock: crate::clock::Clock,
}

impl fmt::Debug for BusBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BusBuilder")
            .field("config", &self.config)
            .field("dead_letter_sink", &self.dead_letter_sink.is_some())
            .field("dead_letter_file", &self.dead_letter_file)
            .field("on_dead_letter", &self.on_dead_letter.is_some())
            .field("on_stall", &self.on_stall.is_some())
            .field("manual_clock", &self.clock.is_manual())
            .finish()
    }
}

impl BusBuilder {
    /// The service name stamped as the source of events published through the bus handle
    /// itself (default [`DEFAULT_SERVICE_NAME`](crate::DEFAULT_SERVICE_NAME)).
    pub fn service_name(mut self, name: impl Into<String>) -> Self {
        self.config.service_name = name.into();
        self
    }

    /// The number of worker threads, which is also the number of shards and the most handlers
    /// that run at once (default: the number of cores; at most
    /// [`MAX_WORKERS`](crate::MAX_WORKERS)).
    pub fn workers(mut self, workers: usize) -> Self {
        self.config.workers = workers;
        self
    }

    /// Each shard's channel capacity, in events (default
    /// [`DEFAULT_CHANNEL_CAPACITY`](crate::DEFAULT_CHANNEL_CAPACITY)). A full shard makes
    /// `publish` wait.
    pub fn channel_capacity(mut self, capacity: usize) -> Self {
        self.config.channel_capacity = capacity;
        self
    }

    /// How many events published by handlers a worker keeps aside while their shard is full,
    /// before it hands them to the timer (default: the channel capacity; 0 sends them straight
    /// to the timer).
    pub fn spill_capacity(mut self, capacity: usize) -> Self {
        self.config.spill_capacity = Some(capacity);
        self
    }

    /// How long [`Bus::shutdown`] (and dropping the last handle) lets handlers finish what was
    /// accepted (default [`DEFAULT_SHUTDOWN_TIMEOUT`](crate::DEFAULT_SHUTDOWN_TIMEOUT)).
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.config.shutdown_timeout = timeout;
        self
    }

    /// The retry policy of subscriptions that do not set their own (default
    /// [`RetryPolicy::default`]: exponential from 5 s, 4 attempts in all).
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.config.retry = policy;
        self
    }

    /// How many dead letters the ring keeps (default
    /// [`DEFAULT_DEAD_LETTER_CAPACITY`](crate::DEFAULT_DEAD_LETTER_CAPACITY); 0 turns dead
    /// letters off, and deliveries that fail for good are discarded).
    pub fn dead_letter_capacity(mut self, capacity: usize) -> Self {
        self.config.dead_letter_capacity = capacity;
        self
    }

    /// Receives every dead letter evicted from the full ring, so that none disappears without
    /// a trace. It runs on the thread that dead-lettered the delivery (a worker), after the
    /// delivery is settled, so it should be quick; it runs under the bus's guard: a panic is
    /// caught and counted in [`CallbackPanics::sink`](crate::CallbackPanics::sink), and a sink still running at the
    /// shutdown deadline is left behind.
    pub fn dead_letter_sink(mut self, sink: impl Fn(&DeadLetter) + Send + Sync + 'static) -> Self {
        self.dead_letter_sink = Some(Arc::new(sink));
        self
    }

    /// Appends every dead letter evicted from the full ring to the file at `path`, one JSON
    /// line each ([`DeadLetter::to_json`]), so that they outlive the ring and the process;
    /// [`DeadLetters::load_json_lines`] reads them back. Works beside a
    /// [`dead_letter_sink`](Self::dead_letter_sink). The file is opened (and created) by
    /// [`build`](Self::build). A line that cannot be written is counted in
    /// [`DeadLetters::sink_failures`].
    pub fn dead_letter_file(mut self, path: impl Into<std::path::PathBuf>) -> Self {
        self.dead_letter_file = Some(path.into());
        self
    }

    /// At shutdown, keeps the deliveries that never ran as dead letters (reason
    /// [`Shutdown`](DeadLetterReason::Shutdown), no attempts, no errors) instead of counting
    /// them as left: with a [`dead_letter_file`](Self::dead_letter_file), or an
    /// [`export_json_lines`](DeadLetters::export_json_lines) before exit, they survive a restart and can be
    /// redriven. It takes those waiting in the shards' channels, the workers' spill queues and
    /// on the timer (delayed events); the deliveries after a handler still running at the
    /// deadline stay left, and so does everything with dead letters off. Off by default.
    pub fn dead_letter_left_at_shutdown(mut self, keep: bool) -> Self {
        self.config.dead_letter_left = keep;
        self
    }

    /// Called with every new dead letter, for alerting, once it is in the ring (and its
    /// delivery settled). It runs on the thread that dead-lettered it (a worker), so it should
    /// be quick; it runs under the bus's guard: a panic is caught and counted in
    /// [`CallbackPanics::hook`](crate::CallbackPanics::hook), and a hook still running at the shutdown deadline is left
    /// behind.
    pub fn on_dead_letter(mut self, hook: impl Fn(&DeadLetter) + Send + Sync + 'static) -> Self {
        self.on_dead_letter = Some(Arc::new(hook));
        self
    }

    /// Reports a delivery still running after `stall_after` (default
    /// [`DEFAULT_STALL_AFTER`](crate::DEFAULT_STALL_AFTER), a minute; a subscription may set
    /// its own with [`SubscribeOptions::stall_after`](crate::SubscribeOptions::stall_after)):
    /// the timer thread notices it — a stall is observed, never pre-empted — counts it once
    /// in [`BusStats::stalled`](crate::BusStats::stalled), lists it in
    /// [`MetricsSnapshot::stalls`](crate::MetricsSnapshot::stalls) while it runs, and hands it
    /// to [`on_stall`](Self::on_stall). Checking costs a worker one counter per delivery and
    /// the timer thread a look at each worker a few times per `stall_after`.
    /// `Duration::MAX` turns it off; zero is a [`ConfigError`].
    pub fn stall_after(mut self, stall_after: Duration) -> Self {
        self.config.stall_after = stall_after;
        self
    }

    /// Called once with each stalled delivery (see [`stall_after`](Self::stall_after)), on the
    /// bus's report thread — never a worker or the timer — so that a callback that blocks holds
    /// back nothing but the reports after it; a panic is caught and counted in
    /// [`CallbackPanics::stall`](crate::CallbackPanics::stall).
    pub fn on_stall(mut self, callback: impl Fn(&Stall) + Send + Sync + 'static) -> Self {
        self.on_stall = Some(Arc::new(callback));
        self
    }

    /// Keeps the last `capacity` deliveries (event ids, names, sources, correlation and
    /// causation, handler, outcome, timing) for [`Bus::trace`] (default 0: off, and a
    /// delivery pays nothing for it).
    pub fn trace_capacity(mut self, capacity: usize) -> Self {
        self.config.trace_capacity = capacity;
        self
    }

    /// Turns metrics on or off (default on). Off, a delivery takes no timestamps and touches
    /// no metrics counter, and [`Bus::metrics`] returns only the bus-wide figures.
    pub fn metrics(mut self, enabled: bool) -> Self {
        self.config.metrics = enabled;
        self
    }

    /// Declares lane `name`: workers of its own, with their own channels, for the
    /// subscriptions given to it with [`SubscribeOptions::lane`](crate::SubscribeOptions::lane)
    /// (see [`Lane`](crate::Lane)). The bus's own workers are the lane named
    /// [`DEFAULT_LANE`](crate::DEFAULT_LANE). Lanes are declared here, before the bus runs.
    pub fn lane(mut self, name: impl Into<String>, lane: crate::config::Lane) -> Self {
        self.config.lanes.push((name.into(), lane));
        self
    }

    /// How idle workers wait for work (default [`WaitStrategy::Block`]).
    pub fn wait_strategy(mut self, strategy: WaitStrategy) -> Self {
        self.config.wait_strategy = strategy;
        self
    }

    /// Records latencies for one delivery in `n` (default
    /// [`DEFAULT_METRICS_SAMPLE_EVERY`](crate::DEFAULT_METRICS_SAMPLE_EVERY), 16; 1 times every
    /// delivery). Counters stay exact; the snapshot states `n`.
    pub fn metrics_sample_every(mut self, n: u32) -> Self {
        self.config.metrics_sample_every = n;
        self
    }

    /// Builds the bus on a [`ManualClock`](crate::testing::ManualClock) a test moves by hand
    /// (default: the system's clock). The bus reads every time it keeps from it — ids and
    /// publish times, retry and publish delays, breaker cool-downs, stall detection,
    /// dead-letter times, latencies, handler deadlines — and what waits on it runs only when
    /// [`ManualClock::advance`](crate::testing::ManualClock::advance) moves it there. Timeouts
    /// a caller passes stay real time. See the README's "Testing your services".
    #[cfg(feature = "testing")]
    pub fn clock(mut self, clock: &crate::clock::ManualClock) -> Self {
        self.clock = crate::clock::Clock::Manual(clock.inner.clone());
        self
    }

    /// Seeds the generator that jitters retry delays, for runs that repeat exactly (default: a
    /// random seed).
    pub fn retry_seed(mut self, seed: u64) -> Self {
        self.config.retry_seed = Some(seed);
        self
    }

    /// Checks the settings and starts the worker threads and the timer thread.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] naming the first invalid field: zero or too many `workers`, a zero or
    /// too large `channel_capacity` or `spill_capacity`, an empty or malformed `service_name`,
    /// a `shutdown_timeout` over a day, a `retry` policy out of bounds. If the system refuses to start a thread, the error
    /// names `workers`.
    pub fn build(self) -> Result<Bus, ConfigError> {
        let config = self.config.clone();
        config.validate()?;
        let lanes = config.lanes()?;
        let (signal_tx, signal_rx) = crossbeam_channel::bounded(0);
        let shards: Box<[Shard]> = lanes
            .iter()
            .enumerate()
            .flat_map(|(index, lane)| (0..lane.workers).map(move |_| (index, lane)))
            .map(|(index, lane)| {
                let (tx, rx) = crossbeam_channel::bounded(lane.channel_capacity);
                Shard::new(tx, rx, index as u8)
            })
            .collect();
        let lanes = lanes.into_iter().map(LaneState::new).collect();
        let stalls =
            super::stalls::Stalls::new(config.stall_after, self.on_stall.clone(), shards.len());
        let source = NameId::intern(&config.service_name);
        let id = NEXT_BUS_ID.fetch_add(1, Ordering::Relaxed);
        let jitter_seed = config.retry_seed.unwrap_or_else(|| {
            use std::hash::{BuildHasher, Hasher};
            let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
            hasher.write_u64(id);
            hasher.finish()
        });
        let sink_failures = Arc::new(AtomicU64::new(0));
        let sink = match &self.dead_letter_file {
            None => self.dead_letter_sink,
            Some(path) => {
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|e| {
                        ConfigError::new(
                            "dead_letter_file",
                            format!("cannot open {}: {e}", path.display()),
                        )
                    })?;
                let file = Mutex::new(std::io::LineWriter::new(file));
                let user = self.dead_letter_sink;
                let failures = sink_failures.clone();
                let sink: DeadLetterSink = Arc::new(move |letter: &DeadLetter| {
                    use std::io::Write;
                    if writeln!(file.lock(), "{}", letter.to_json()).is_err() {
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                    if let Some(user) = &user {
                        user(letter);
                    }
                });
                Some(sink)
            }
        };
        let dead_letters = Ring::new(
            config.dead_letter_capacity,
            sink,
            self.on_dead_letter,
            sink_failures,
        );
        let metrics_on = config.metrics;
        let core = Arc::new_cyclic(|this| Core {
            this: this.clone(),
            id,
            panics: Panics::default(),
            dead_letters,
            taps: Taps::default(),
            traces: TraceRing::new(config.trace_capacity),
            metrics: Metrics::new(config.metrics, config.metrics_sample_every),
            deferrals: Deferrals::default(),
            bridges: Mutex::new(Vec::new()),
            republishers: Mutex::default(),
            jitter_seed,
            spill_capacity: config.spill_capacity(),
            default_workers: config.workers,
            config,
            registry: Registry::new(id, metrics_on),
            rebuilders: super::rebuild::Rebuilders::default(),
            shards,
            lanes,
            shed_books: ShedBooks::default(),
            stalls,
            parks_full: AtomicUsize::new(0),
            breakers: Mutex::new(Vec::new()),
            reports: super::stalls::Reports::default(),
            held_evicted: AtomicU64::new(0),
            timer: Timer::new(self.clock.clone()),
            clock: self.clock.clone(),
            signal_tx: Mutex::new(Some(signal_tx)),
            signal_rx,
            closing: AtomicBool::new(false),
            stopped: AtomicBool::new(false),
            unmatched: CachePadded::new(AtomicU64::new(0)),
            refused: AtomicU64::new(0),
            idle_lock: Mutex::new(()),
            idle_cv: Condvar::new(),
            idle_waiters: AtomicUsize::new(0),
            lifecycle: Mutex::new(Lifecycle::Running),
            lifecycle_cv: Condvar::new(),
            worker_threads: Mutex::new(Vec::new()),
            timer_thread: Mutex::new(None),
        });
        // From here on the handle owns the bus: if a thread fails to start, dropping it stops
        // the threads already running.
        let bus = Bus {
            handle: Arc::new(Handle { core: core.clone() }),
            source,
        };
        let spawn_error = |e: std::io::Error| {
            ConfigError::new("workers", format!("could not start a thread: {e}"))
        };
        for index in 0..core.shards.len() {
            let worker_core = core.clone();
            let thread = std::thread::Builder::new()
                .name(format!("microbus-worker-{index}"))
                .spawn(move || run_worker(worker_core, index))
                .map_err(spawn_error)?;
            core.worker_threads.lock().push(thread);
        }
        let timer_core = core.clone();
        let thread = std::thread::Builder::new()
            .name("microbus-timer".to_owned())
            .spawn(move || {
                let _own = OwnThread::enter(timer_core.id, None);
                timer_core.timer.run(
                    |routed| offer_due(&timer_core.shards, routed),
                    || {
                        let stalls = super::stalls::watch_stalls(&timer_core);
                        let breakers = super::breakers::watch_breakers(&timer_core);
                        match (stalls, breakers) {
                            (Some(a), Some(b)) => Some(a.min(b)),
                            (a, b) => a.or(b),
                        }
                    },
                );
            })
            .map_err(spawn_error)?;
        *core.timer_thread.lock() = Some(thread);
        #[cfg(feature = "testing")]
        if let Some(manual) = core.clock.manual() {
            let driver: Arc<dyn crate::clock::Drive> = core.clone();
            manual.register(Arc::downgrade(&driver));
        }
        Ok(bus)
    }
}

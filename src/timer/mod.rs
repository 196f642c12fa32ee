//! The timer thread: holds what must wait, on a [`Wheel`] of [`TICK`]-long ticks, and fires
//! each item into a callback the bus gives it when its time comes.
//!
//! Ground rules: the wheel lives behind one mutex. Schedulers compute the deadline tick from
//! the wall time (rounded up, so an entry never fires early) and wake the thread when they add
//! an entry earlier than the one it sleeps for. The thread sleeps on a condition variable until
//! the wheel's next occupied slot (never ticking while idle), takes what is due, and fires each
//! item outside the lock. The timer knows nothing of what it carries but how many deliveries
//! each item holds ([`Delayed`]), which it keeps summed for `flush`; at shutdown the bus stops
//! the thread, joins it and takes what is left.
//!
//! The bus puts on it retries waiting for their delay, delayed publishes, events that
//! handlers published while their shard and the worker's spill queue were both full (the delay
//! throttles handlers that feed each other through full shards), and redriven dead letters
//! whose shard was full.

use std::time::{Duration, Instant};

use crate::sync::{AtomicUsize, Condvar, Mutex, Ordering, clock_now};

pub(crate) mod wheel;

use wheel::Wheel;

/// The wheel's tick.
pub(crate) const TICK: Duration = Duration::from_millis(1);
/// How long an event waits on the timer before it is offered again.
pub(crate) const REOFFER_DELAY: Duration = Duration::from_micros(200);

/// What waits on the timer.
pub(crate) trait Delayed {
    /// How many deliveries it carries.
    fn deliveries(&self) -> usize;
}

struct State<T> {
    wheel: Wheel<T>,
    /// The deliveries of the work on the wheel.
    deliveries: usize,
    stopped: bool,
    /// Set by [`Timer::nudge`]: the thread asks its watch again.
    nudged: bool,
}

pub(crate) struct Timer<T> {
    state: Mutex<State<T>>,
    wake: Condvar,
    len: AtomicUsize,
    /// Tick 0.
    start: Instant,
}

impl<T: Delayed> Timer<T> {
    pub(crate) fn new() -> Timer<T> {
        Timer {
            state: Mutex::new(State {
                wheel: Wheel::new(0),
                deliveries: 0,
                stopped: false,
                nudged: false,
            }),
            wake: Condvar::new(),
            len: AtomicUsize::new(0),
            start: clock_now(),
        }
    }

    /// The tick in progress at `at`.
    fn tick_at(&self, at: Instant) -> u64 {
        (at.saturating_duration_since(self.start).as_nanos() / TICK.as_nanos()) as u64
    }

    /// The first tick that starts at or after `at`.
    fn tick_from(&self, at: Instant) -> u64 {
        let nanos = at.saturating_duration_since(self.start).as_nanos();
        nanos.div_ceil(TICK.as_nanos()) as u64
    }

    fn instant_of(&self, tick: u64) -> Instant {
        self.start + TICK * u32::try_from(tick).unwrap_or(u32::MAX)
    }

    /// Schedules `item` to be fired after `delay`. `Err` gives it back when the timer has
    /// stopped.
    #[allow(clippy::result_large_err)] // The error is the item itself, handed back.
    pub(crate) fn schedule(&self, item: T, delay: Duration) -> Result<(), T> {
        // A delay past what an `Instant` can hold never falls due: the wheel's overflow list
        // keeps it until shutdown.
        let deadline = clock_now()
            .checked_add(delay)
            .map_or(u64::MAX, |at| self.tick_from(at));
        let mut state = self.state.lock();
        if state.stopped {
            return Err(item);
        }
        let sleeping_until = state.wheel.next_tick();
        state.deliveries += item.deliveries();
        state.wheel.schedule(deadline, item);
        self.len.store(state.wheel.len(), Ordering::Relaxed);
        if sleeping_until.is_none_or(|tick| deadline < tick) {
            self.wake.notify_one();
        }
        Ok(())
    }

    /// How many events wait.
    pub(crate) fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    /// No event waiting is due before this.
    pub(crate) fn earliest(&self) -> Option<Instant> {
        let next = self.state.lock().wheel.next_tick()?;
        Some(self.instant_of(next))
    }

    /// The deliveries waiting, and the time before which none of them is due.
    pub(crate) fn parked(&self) -> (usize, Option<Instant>) {
        let state = self.state.lock();
        let next = state.wheel.next_tick().map(|tick| self.instant_of(tick));
        (state.deliveries, next)
    }

    /// Tells the thread to stop; later `schedule` calls fail.
    pub(crate) fn stop(&self) {
        self.state.lock().stopped = true;
        self.wake.notify_all();
    }

    /// Takes every waiting item (after the thread has been joined).
    pub(crate) fn take(&self) -> Vec<T> {
        let mut state = self.state.lock();
        self.len.store(0, Ordering::Relaxed);
        state.deliveries = 0;
        state.wheel.drain()
    }

    /// Wakes the thread to ask `watch` again when it next looks (see [`run`](Self::run)).
    pub(crate) fn nudge(&self) {
        self.state.lock().nudged = true;
        self.wake.notify_all();
    }

    /// The body of the timer thread: fires each item that falls due into `fire`, outside the
    /// lock, until the timer stops. Between items it calls `watch` when the time it last
    /// returned has come (and once at the start, and after a [`nudge`](Self::nudge)): `None`
    /// means not again until nudged.
    pub(crate) fn run(&self, mut fire: impl FnMut(T), mut watch: impl FnMut() -> Option<Instant>) {
        let mut due = Vec::new();
        let mut next_watch = watch();
        loop {
            let nudged;
            {
                let mut state = self.state.lock();
                loop {
                    if state.stopped {
                        return;
                    }
                    let now = self.tick_at(clock_now());
                    state.wheel.advance(now, &mut due);
                    let taken: usize = due.iter().map(T::deliveries).sum();
                    state.deliveries -= taken;
                    self.len.store(state.wheel.len(), Ordering::Relaxed);
                    if !due.is_empty() || state.nudged {
                        break;
                    }
                    if next_watch.is_some_and(|at| Instant::now() >= at) {
                        break;
                    }
                    let next_item = state.wheel.next_tick().map(|tick| self.instant_of(tick));
                    let until = match (next_item, next_watch) {
                        (Some(a), Some(b)) => Some(a.min(b)),
                        (a, b) => a.or(b),
                    };
                    match until {
                        Some(until) => {
                            self.wake.wait_until(&mut state, until);
                        }
                        None => self.wake.wait(&mut state),
                    }
                }
                nudged = std::mem::take(&mut state.nudged);
            }
            for item in due.drain(..) {
                fire(item);
            }
            if nudged || next_watch.is_some_and(|at| Instant::now() >= at) {
                next_watch = watch();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Probe;

    impl Delayed for Probe {
        fn deliveries(&self) -> usize {
            1
        }
    }

    #[test]
    fn deadlines_round_up_and_current_ticks_round_down() {
        let timer = Timer::<Probe>::new();
        let at = timer.start + Duration::from_micros(1_500);
        assert_eq!(timer.tick_at(at), 1);
        assert_eq!(timer.tick_from(at), 2);
        assert_eq!(timer.tick_from(timer.start + TICK), 1);
        assert_eq!(timer.instant_of(3), timer.start + 3 * TICK);
    }
}

/// Loom models of the timer's hand-offs: `RUSTFLAGS="--cfg loom" cargo test --release --lib loom_`.
#[cfg(all(test, loom))]
mod loom_models {
    use super::*;
    use crate::event::{Envelope, Event, NameId};
    use crate::ledger::Gate;
    use crate::shard::{Msg, Routed, Shard, Task, Work, WorkerShared, offer_due};
    use crossbeam_utils::CachePadded;
    use loom::sync::Arc;
    use loom::thread;

    #[derive(serde::Serialize, serde::Deserialize)]
    struct Probe(u64);

    impl Event for Probe {
        const NAME: &'static str = "Probe";
    }

    fn routed(id: u64) -> Routed {
        let envelope = Envelope::stamp(NameId::intern("loom"), Default::default());
        Routed {
            shard: 0,
            work: Work::Task(Task::new(envelope, 0, 1, Probe(id))),
        }
    }

    /// A timer, one shard whose channel holds one message, and the timer thread running.
    fn running_timer() -> (Arc<Timer<Routed>>, Arc<Vec<Shard>>, thread::JoinHandle<()>) {
        let timer = Arc::new(Timer::new());
        let (tx, rx) = crossbeam_channel::bounded(1);
        let shards = Arc::new(vec![Shard {
            gate: CachePadded::new(Gate::new()),
            tx,
            rx,
            worker: CachePadded::new(WorkerShared::default()),
            lane: 0,
        }]);
        let runner = {
            let (timer, shards) = (timer.clone(), shards.clone());
            thread::spawn(move || timer.run(|routed| offer_due(&shards, routed), || None))
        };
        (timer, shards, runner)
    }

    fn id_of(work: Work) -> u64 {
        match work {
            Work::Task(task) => task.into_event::<Probe>().0,
            _ => unreachable!("the model schedules tasks"),
        }
    }

    /// Two threads schedule retries while the timer thread sleeps and shutdown stops it: the
    /// sleeping thread is woken (no lost wake-up: loom reports a deadlock otherwise), and each
    /// entry is either refused to its scheduler or taken exactly once at shutdown. (The delay
    /// is long so that no entry falls due: loom needs each run to repeat exactly, and due-ness
    /// depends on the clock.)
    #[test]
    fn loom_each_scheduled_entry_is_taken_once_and_the_timer_stops() {
        loom::model(|| {
            let (timer, shards, runner) = running_timer();
            let hour = Duration::from_secs(3600);
            let scheduler = {
                let timer = timer.clone();
                thread::spawn(move || timer.schedule(routed(1), hour).is_ok())
            };
            timer.stop();
            let late = timer.schedule(routed(2), hour).is_ok();
            let first = scheduler.join().unwrap();
            runner.join().unwrap();
            assert!(!late, "an entry was accepted after the timer stopped");
            assert!(shards[0].rx.try_recv().is_err(), "nothing fell due");
            let taken: Vec<u64> = timer.take().into_iter().map(|r| id_of(r.work)).collect();
            assert_eq!(taken, if first { vec![1] } else { vec![] });
            assert_eq!(timer.parked().0, 0);
        });
    }

    /// Work falls due while another thread schedules more and the shard's channel has room
    /// for one message: each entry reaches the shard's channel or its worker's spill queue
    /// (with a wake-up), or is taken at shutdown, or is refused after the stop — exactly once.
    /// (The model's clock stands still, so that every run repeats: due-ness does not depend
    /// on timing.)
    #[test]
    fn loom_due_work_reaches_the_shard_exactly_once() {
        loom::model(|| {
            let (timer, shards, runner) = running_timer();
            let scheduler = {
                let timer = timer.clone();
                thread::spawn(move || {
                    let a = timer.schedule(routed(1), Duration::ZERO).is_ok();
                    let b = timer.schedule(routed(2), Duration::ZERO).is_ok();
                    (a, b)
                })
            };
            let (a, b) = scheduler.join().unwrap();
            timer.stop();
            runner.join().unwrap();
            let mut seen = Vec::new();
            while let Ok(msg) = shards[0].rx.try_recv() {
                if let Msg::Work(work) = msg {
                    seen.push(id_of(work));
                }
            }
            seen.extend(
                shards[0]
                    .worker
                    .take_spill()
                    .into_iter()
                    .map(|r| id_of(r.work)),
            );
            seen.extend(timer.take().into_iter().map(|r| id_of(r.work)));
            seen.sort_unstable();
            let expected: Vec<u64> = [(a, 1), (b, 2)]
                .into_iter()
                .filter(|&(ok, _)| ok)
                .map(|(_, id)| id)
                .collect();
            assert_eq!(seen, expected);
        });
    }
}

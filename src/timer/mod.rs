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
//!
//! The wheel reads the bus's [`Clock`]. Under a manual clock the thread leaves the wheel to
//! [`ManualClock::advance`](crate::testing::ManualClock::advance) (through
//! [`take_due`](Timer::take_due)) and only re-offers events to full shards, after a real
//! [`REOFFER_DELAY`]: a full shard drains in real time, whatever the clock says.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::clock::Clock;
use crate::sync::{AtomicUsize, Condvar, Mutex, Ordering};

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
    /// Under a manual clock, re-offers and when (in real time) they are due, in that order.
    soon: VecDeque<(Instant, T)>,
}

pub(crate) struct Timer<T> {
    state: Mutex<State<T>>,
    wake: Condvar,
    len: AtomicUsize,
    /// Tick 0.
    start: Instant,
    clock: Clock,
}

impl<T: Delayed> Timer<T> {
    pub(crate) fn new(clock: Clock) -> Timer<T> {
        Timer {
            state: Mutex::new(State {
                wheel: Wheel::new(0),
                deliveries: 0,
                stopped: false,
                nudged: false,
                soon: VecDeque::new(),
            }),
            wake: Condvar::new(),
            len: AtomicUsize::new(0),
            start: clock.now(),
            clock,
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

    /// When `tick` starts (`None`: later than an `Instant` can tell).
    fn instant_of(&self, tick: u64) -> Option<Instant> {
        let nanos = u128::from(tick) * TICK.as_nanos();
        let nanos = u64::try_from(nanos).ok()?;
        self.start.checked_add(Duration::from_nanos(nanos))
    }

    /// When `tick` starts, or a century on for a tick later than that.
    fn instant_or_far(&self, tick: u64) -> Instant {
        self.instant_of(tick).unwrap_or_else(|| {
            let far = Duration::from_secs(100 * 365 * 24 * 3600);
            self.start.checked_add(far).unwrap_or(self.start)
        })
    }

    /// Schedules `item` to be fired after `delay`. `Err` gives it back when the timer has
    /// stopped.
    #[allow(clippy::result_large_err)] // The error is the item itself, handed back.
    pub(crate) fn schedule(&self, item: T, delay: Duration) -> Result<(), T> {
        // A delay past what an `Instant` can hold never falls due: the wheel's overflow list
        // keeps it until shutdown.
        let deadline = self
            .clock
            .now()
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

    /// Schedules `item` to be offered again to its full shard a moment from now (real time,
    /// whatever the clock). `Err` gives it back when the timer has stopped.
    #[allow(clippy::result_large_err)] // The error is the item itself, handed back.
    pub(crate) fn reoffer(&self, item: T) -> Result<(), T> {
        if !self.clock.is_manual() {
            return self.schedule(item, REOFFER_DELAY);
        }
        let mut state = self.state.lock();
        if state.stopped {
            return Err(item);
        }
        state.soon.push_back((Instant::now() + REOFFER_DELAY, item));
        self.wake.notify_one();
        Ok(())
    }

    /// How many events wait on the wheel.
    pub(crate) fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    /// Whether re-offers wait (under a manual clock): work in motion, not waiting on it.
    #[cfg(feature = "testing")]
    pub(crate) fn reoffering(&self) -> bool {
        !self.state.lock().soon.is_empty()
    }

    /// When the earliest event waiting is due (the start of its tick).
    pub(crate) fn earliest(&self) -> Option<Instant> {
        let next = self.state.lock().wheel.earliest()?;
        Some(self.instant_or_far(next))
    }

    /// The deliveries waiting on the wheel, and when the earliest of them is due.
    pub(crate) fn parked(&self) -> (usize, Option<Instant>) {
        let state = self.state.lock();
        let next = state.wheel.earliest().map(|tick| self.instant_or_far(tick));
        (state.deliveries, next)
    }

    /// Takes what is due at the clock's time now (under a manual clock, which the thread
    /// leaves the wheel to).
    #[cfg(feature = "testing")]
    pub(crate) fn take_due(&self, due: &mut Vec<T>) {
        let mut state = self.state.lock();
        let now = self.tick_at(self.clock.now());
        state.wheel.advance(now, due);
        let taken: usize = due.iter().map(T::deliveries).sum();
        state.deliveries -= taken;
        self.len.store(state.wheel.len(), Ordering::Relaxed);
    }

    /// When [`take_due`](Self::take_due) next has something to take: the start of a tick
    /// after the one in progress (`None`: nothing waits, or not within an `Instant`'s reach).
    #[cfg(feature = "testing")]
    pub(crate) fn next_due_after_now(&self) -> Option<Instant> {
        let state = self.state.lock();
        let now = self.tick_at(self.clock.now());
        let next = state.wheel.earliest()?;
        self.instant_of(next.max(now + 1))
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
        let mut taken: Vec<T> = state.soon.drain(..).map(|(_, item)| item).collect();
        taken.extend(state.wheel.drain());
        taken
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
        if self.clock.is_manual() {
            return self.run_reoffers(fire);
        }
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
                    let now = self.tick_at(self.clock.now());
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
                    let next_item = state
                        .wheel
                        .next_tick()
                        .map(|tick| self.instant_or_far(tick));
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

    /// The thread's body under a manual clock: re-offers each event when its real time comes.
    fn run_reoffers(&self, mut fire: impl FnMut(T)) {
        let mut due = Vec::new();
        loop {
            {
                let mut state = self.state.lock();
                loop {
                    if state.stopped {
                        return;
                    }
                    let now = Instant::now();
                    while state.soon.front().is_some_and(|(at, _)| *at <= now) {
                        due.extend(state.soon.pop_front().map(|(_, item)| item));
                    }
                    if !due.is_empty() {
                        break;
                    }
                    match state.soon.front().map(|(at, _)| *at) {
                        Some(at) => {
                            self.wake.wait_until(&mut state, at);
                        }
                        None => self.wake.wait(&mut state),
                    }
                }
            }
            for item in due.drain(..) {
                fire(item);
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
        let timer = Timer::<Probe>::new(Clock::System);
        let at = timer.start + Duration::from_micros(1_500);
        assert_eq!(timer.tick_at(at), 1);
        assert_eq!(timer.tick_from(at), 2);
        assert_eq!(timer.tick_from(timer.start + TICK), 1);
        assert_eq!(timer.instant_of(3), Some(timer.start + 3 * TICK));
        assert_eq!(timer.instant_of(u64::MAX), None);
        assert!(timer.instant_or_far(u64::MAX) > timer.start + Duration::from_secs(1 << 30));
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
        let timer = Arc::new(Timer::new(Clock::System));
        let (tx, rx) = crossbeam_channel::bounded(1);
        let shards = Arc::new(vec![Shard::new(tx, rx, 0)]);
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

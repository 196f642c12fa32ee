//! The one guard for user code outside handlers: hooks, sinks, tracker callbacks, taps, and an
//! event's `Serialize`, `Deserialize` and `Drop`.
//!
//! Ground rules: every call of such code goes through [`Panics::run`] (or a [`Runner`] built on
//! it), which catches a panic, counts it at its [`Seam`] and carries on: whatever the bus was
//! settling is settled as if the callback had returned normally. A panic payload is dropped
//! under the guard too (its `Drop` is user code as well). Handlers have their own guard on the
//! worker, where a panic is a failed attempt.

use std::any::Any;
use std::panic::{AssertUnwindSafe, catch_unwind};

use serde::{Deserialize, Serialize};

use crate::sync::{AtomicU64, Ordering};

/// Where user code outside a handler runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Seam {
    /// [`BusBuilder::on_dead_letter`](crate::BusBuilder::on_dead_letter).
    Hook,
    /// [`BusBuilder::dead_letter_sink`](crate::BusBuilder::dead_letter_sink), and the file sink.
    Sink,
    /// [`Tracker::on_complete`](crate::Tracker::on_complete).
    Tracker,
    /// [`Bus::tap`](crate::Bus::tap).
    Tap,
    /// An event's `Serialize` (dead letters, taps) or `Deserialize` (loading dead letters).
    Serde,
    /// An event's `Drop`, and other user values the bus drops (handlers, callbacks).
    Drop,
    /// [`SubscribeOptions::retry_if`](crate::SubscribeOptions::retry_if).
    Classifier,
    /// [`BusBuilder::on_stall`](crate::BusBuilder::on_stall).
    Stall,
    /// [`CircuitBreaker::on_change`](crate::CircuitBreaker::on_change).
    Breaker,
}

/// How many seams there are.
pub(crate) const SEAMS: usize = 9;

impl Seam {
    /// Every seam, in the order of [`CallbackPanics`]' fields.
    pub(crate) const ALL: [Seam; SEAMS] = [
        Seam::Hook,
        Seam::Sink,
        Seam::Tracker,
        Seam::Tap,
        Seam::Serde,
        Seam::Drop,
        Seam::Classifier,
        Seam::Stall,
        Seam::Breaker,
    ];

    /// The seam's name, as in [`CallbackPanics`] and the metrics.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Seam::Hook => "hook",
            Seam::Sink => "sink",
            Seam::Tracker => "tracker",
            Seam::Tap => "tap",
            Seam::Serde => "serde",
            Seam::Drop => "drop",
            Seam::Classifier => "classifier",
            Seam::Stall => "stall",
            Seam::Breaker => "breaker",
        }
    }
}

/// Runs user code under the guard, at a seam: the worker's runner also lets shutdown detach it
/// while the code runs.
pub(crate) trait Runner {
    /// Runs `f` under the guard; `false` when it panicked (counted).
    fn run(&mut self, seam: Seam, f: &mut dyn FnMut()) -> bool;

    /// Whether shutdown has given up on this runner's thread (a worker it detached while user
    /// code ran): what the thread settles afterwards was counted already.
    fn detached(&self) -> bool {
        false
    }
}

/// The panics caught at each seam.
#[derive(Default)]
pub(crate) struct Panics {
    counts: [AtomicU64; SEAMS],
}

impl Panics {
    /// Runs `f`, catching and counting a panic at `seam`: `None` when it panicked.
    pub(crate) fn run<R>(&self, seam: Seam, f: impl FnOnce() -> R) -> Option<R> {
        match catch_unwind(AssertUnwindSafe(f)) {
            Ok(value) => Some(value),
            Err(payload) => {
                self.counts[seam as usize].fetch_add(1, Ordering::Relaxed);
                drop_payload(payload);
                None
            }
        }
    }

    /// Drops `value` under the guard (its `Drop` may be user code).
    pub(crate) fn drop<T>(&self, value: T) {
        if std::mem::needs_drop::<T>() {
            self.run(Seam::Drop, move || drop(value));
        }
    }

    /// Counts a panic caught at `seam` elsewhere.
    pub(crate) fn count(&self, seam: Seam) {
        self.counts[seam as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// The counts so far.
    pub(crate) fn counts(&self) -> CallbackPanics {
        let n = Seam::ALL.map(|seam| self.counts[seam as usize].load(Ordering::Relaxed));
        // In the order of `Seam::ALL`.
        CallbackPanics {
            hook: n[0],
            sink: n[1],
            tracker: n[2],
            tap: n[3],
            serde: n[4],
            drop: n[5],
            classifier: n[6],
            stall: n[7],
            breaker: n[8],
        }
    }
}

impl Runner for &Panics {
    fn run(&mut self, seam: Seam, f: &mut dyn FnMut()) -> bool {
        Panics::run(self, seam, f).is_some()
    }
}

/// User code that the shutdown thread leaves to another thread, one it can leave behind:
/// tracker callbacks, dead letters to make (`Serialize`) and keep (the hook, the sink), values to
/// drop.
#[derive(Default)]
pub(crate) struct Leftovers {
    jobs: Vec<Job>,
}

type Job = Box<dyn FnOnce(&mut dyn Runner) + Send>;

impl Leftovers {
    /// Adds a job.
    pub(crate) fn push(&mut self, job: impl FnOnce(&mut dyn Runner) + Send + 'static) {
        self.jobs.push(Box::new(job));
    }

    /// Adds `value` to drop (if dropping it runs any code).
    pub(crate) fn drop<T: Send + 'static>(&mut self, value: T) {
        if std::mem::needs_drop::<T>() {
            self.push(move |runner| drop_with(runner, value));
        }
    }

    /// How many jobs there are.
    pub(crate) fn len(&self) -> usize {
        self.jobs.len()
    }

    /// Runs the jobs in order under `runner`, counting each one finished in `finished`.
    pub(crate) fn run(self, runner: &mut dyn Runner, finished: &AtomicU64) {
        for job in self.jobs {
            job(runner);
            finished.fetch_add(1, Ordering::Release);
        }
    }
}

/// Drops `value` under `runner`'s guard (its `Drop` may be user code).
pub(crate) fn drop_with<T>(runner: &mut dyn Runner, value: T) {
    if std::mem::needs_drop::<T>() {
        let mut value = Some(value);
        runner.run(Seam::Drop, &mut || drop(value.take()));
    }
}

/// Drops a panic's payload, whose own `Drop` may panic in turn: that one is forgotten.
pub(crate) fn drop_payload(payload: Box<dyn Any + Send>) {
    if let Err(again) = catch_unwind(AssertUnwindSafe(move || drop(payload))) {
        std::mem::forget(again);
    }
}

/// Panics the bus caught in user code outside handlers, by where they happened. Each was
/// counted and the bus went on: the delivery concerned was settled as if the code had returned.
/// Handler panics are failed attempts, counted in [`BusStats::panicked`](crate::BusStats).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct CallbackPanics {
    /// In the [`on_dead_letter`](crate::BusBuilder::on_dead_letter) hook.
    pub hook: u64,
    /// In the [`dead_letter_sink`](crate::BusBuilder::dead_letter_sink).
    pub sink: u64,
    /// In [`Tracker::on_complete`](crate::Tracker::on_complete) callbacks.
    pub tracker: u64,
    /// In [taps](crate::Bus::tap).
    pub tap: u64,
    /// In an event's `Serialize` (a dead letter then keeps the error text instead of the
    /// JSON) or `Deserialize` (a loaded line then counts as malformed).
    pub serde: u64,
    /// In an event's `Drop`, or another user value's the bus dropped.
    pub drop: u64,
    /// In a subscription's [`retry_if`](crate::SubscribeOptions::retry_if) classifier (the
    /// retry policy then decided).
    pub classifier: u64,
    /// In the [`on_stall`](crate::BusBuilder::on_stall) callback.
    pub stall: u64,
    /// In a circuit breaker's [`on_change`](crate::CircuitBreaker::on_change) callback.
    pub breaker: u64,
}

impl CallbackPanics {
    /// All of them.
    pub fn total(&self) -> u64 {
        self.fields().iter().map(|&(_, n)| n).sum()
    }

    /// Each seam's name and count, in field order: what every rendering lists.
    pub(crate) fn fields(&self) -> [(&'static str, u64); SEAMS] {
        let values = [
            self.hook,
            self.sink,
            self.tracker,
            self.tap,
            self.serde,
            self.drop,
            self.classifier,
            self.stall,
            self.breaker,
        ];
        std::array::from_fn(|i| (Seam::ALL[i].name(), values[i]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_is_counted_at_its_seam_and_the_caller_goes_on() {
        let panics = Panics::default();
        assert_eq!(panics.run(Seam::Hook, || 7), Some(7));
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {}));
        assert_eq!(panics.run(Seam::Sink, || -> u32 { panic!("sink") }), None);
        assert_eq!(panics.run(Seam::Sink, || -> u32 { panic!("sink") }), None);
        struct Bomb;
        impl Drop for Bomb {
            fn drop(&mut self) {
                panic!("drop");
            }
        }
        panics.drop(Bomb);
        // A payload whose own drop panics is forgotten, not propagated.
        assert_eq!(
            panics.run(Seam::Tap, || std::panic::panic_any(Bomb)),
            None::<()>
        );
        std::panic::set_hook(previous);
        let counts = panics.counts();
        assert_eq!(
            (counts.hook, counts.sink, counts.drop, counts.tap),
            (0, 2, 1, 1)
        );
        assert_eq!(counts.total(), 4);
        assert_eq!(
            counts.fields().map(|(name, _)| name),
            [
                "hook",
                "sink",
                "tracker",
                "tap",
                "serde",
                "drop",
                "classifier",
                "stall",
                "breaker"
            ]
        );
    }
}

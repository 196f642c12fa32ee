//! The synchronisation primitives the crate's own protocols use, in one place, so that the
//! loom model checker stands in for them under `cfg(loom)` (see the `loom` tests).
//!
//! Process-wide counters in statics, and the crates the bus builds on (crossbeam's channels,
//! parking_lot's locks, arc-swap) keep the standard primitives: the models check the bus's own
//! protocols around them.

pub(crate) use std::sync::Arc;

#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{
    AtomicBool, AtomicU8, AtomicU32, AtomicU64, AtomicUsize, Ordering, fence,
};

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{
    AtomicBool, AtomicU8, AtomicU32, AtomicU64, AtomicUsize, Ordering, fence,
};

/// The cell that holds the current handler tables: arc-swap's lock-free `ArcSwap` normally, a
/// loom mutex around an `Arc` (the same interface) under `cfg(loom)`.
#[cfg(not(loom))]
pub(crate) type SwapCell<T> = arc_swap::ArcSwap<T>;

#[cfg(loom)]
pub(crate) use self::loom_lock::SwapCell;

/// The time the timer reads: the monotonic clock, or under `cfg(loom)` a clock that stands
/// still (loom needs every run of a model to repeat exactly).
#[cfg(not(loom))]
pub(crate) fn clock_now() -> std::time::Instant {
    std::time::Instant::now()
}

#[cfg(loom)]
pub(crate) fn clock_now() -> std::time::Instant {
    static FROZEN: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    *FROZEN.get_or_init(std::time::Instant::now)
}

/// The lock and condition variable of the timer, whose hand-offs the loom models check:
/// parking_lot's normally, loom's (behind the same interface) under `cfg(loom)`.
#[cfg(not(loom))]
pub(crate) use parking_lot::{Condvar, Mutex};

#[cfg(loom)]
pub(crate) use self::loom_lock::{Condvar, Mutex};

#[cfg(loom)]
mod loom_lock {
    use std::ops::{Deref, DerefMut};
    use std::time::Instant;

    /// loom's mutex with parking_lot's interface.
    pub(crate) struct Mutex<T>(loom::sync::Mutex<T>);

    /// Its guard; `Condvar` takes it out and puts it back while it waits.
    pub(crate) struct MutexGuard<'a, T>(Option<loom::sync::MutexGuard<'a, T>>);

    impl<T> Mutex<T> {
        pub(crate) fn new(value: T) -> Mutex<T> {
            Mutex(loom::sync::Mutex::new(value))
        }

        pub(crate) fn lock(&self) -> MutexGuard<'_, T> {
            MutexGuard(Some(self.0.lock().expect("no lock is poisoned in a model")))
        }
    }

    impl<T> Deref for MutexGuard<'_, T> {
        type Target = T;

        fn deref(&self) -> &T {
            self.0.as_ref().expect("held")
        }
    }

    impl<T> DerefMut for MutexGuard<'_, T> {
        fn deref_mut(&mut self) -> &mut T {
            self.0.as_mut().expect("held")
        }
    }

    /// An `ArcSwap` stand-in: a loom mutex around an `Arc`.
    pub(crate) struct SwapCell<T>(loom::sync::Mutex<std::sync::Arc<T>>);

    impl<T> SwapCell<T> {
        pub(crate) fn from_pointee(value: T) -> SwapCell<T> {
            SwapCell(loom::sync::Mutex::new(std::sync::Arc::new(value)))
        }

        pub(crate) fn load(&self) -> std::sync::Arc<T> {
            self.load_full()
        }

        pub(crate) fn load_full(&self) -> std::sync::Arc<T> {
            self.0
                .lock()
                .expect("no lock is poisoned in a model")
                .clone()
        }

        pub(crate) fn store(&self, value: std::sync::Arc<T>) {
            *self.0.lock().expect("no lock is poisoned in a model") = value;
        }
    }

    /// loom's condition variable with parking_lot's interface.
    pub(crate) struct Condvar(loom::sync::Condvar);

    impl Condvar {
        pub(crate) fn new() -> Condvar {
            Condvar(loom::sync::Condvar::new())
        }

        pub(crate) fn wait<T>(&self, guard: &mut MutexGuard<'_, T>) {
            let inner = guard.0.take().expect("held");
            guard.0 = Some(self.0.wait(inner).expect("no lock is poisoned in a model"));
        }

        /// A timed wait: loom may end it at any point, as a spurious wake-up.
        pub(crate) fn wait_until<T>(&self, guard: &mut MutexGuard<'_, T>, until: Instant) {
            let inner = guard.0.take().expect("held");
            let timeout = until.saturating_duration_since(Instant::now());
            let (inner, _) = self
                .0
                .wait_timeout(inner, timeout)
                .expect("no lock is poisoned in a model");
            guard.0 = Some(inner);
        }

        pub(crate) fn notify_one(&self) {
            self.0.notify_one();
        }

        pub(crate) fn notify_all(&self) {
            self.0.notify_all();
        }
    }
}

//! The timer thread: offers events again, later, when their shard was full.
//!
//! Ground rules: the timer owns a min-heap of `(due, sequence)` entries behind one mutex. Its
//! thread sleeps on a condition variable until the earliest entry is due (not ticking while
//! idle), takes every due entry out of the heap, and offers each to its shard with `try_send`
//! outside the lock. An entry whose shard is still full goes back in with twice the delay, up
//! to [`MAX_BACKOFF`]. Entries stay accepted in the ledger while they wait, so `flush` waits for
//! them; at shutdown the bus stops the thread, joins it and takes what is left.

use std::cmp::Ordering as CmpOrdering;
use std::collections::BinaryHeap;
use std::time::{Duration, Instant};

use crossbeam_channel::{Sender, TrySendError};
use parking_lot::{Condvar, Mutex};

use crate::shard::{Msg, Routed};
use crate::sync::{AtomicUsize, Ordering};

/// The first delay before an event is offered again.
pub(crate) const INITIAL_BACKOFF: Duration = Duration::from_micros(200);
/// The longest delay between two offers of one event.
pub(crate) const MAX_BACKOFF: Duration = Duration::from_millis(50);

struct Entry {
    due: Instant,
    seq: u64,
    backoff: Duration,
    routed: Routed,
}

impl PartialEq for Entry {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == CmpOrdering::Equal
    }
}

impl Eq for Entry {}

impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(other))
    }
}

impl Ord for Entry {
    /// Reversed, so that `BinaryHeap` (a max-heap) pops the earliest entry first.
    fn cmp(&self, other: &Self) -> CmpOrdering {
        (other.due, other.seq).cmp(&(self.due, self.seq))
    }
}

#[derive(Default)]
struct State {
    heap: BinaryHeap<Entry>,
    seq: u64,
    stopped: bool,
}

impl State {
    fn push(&mut self, routed: Routed, backoff: Duration, now: Instant) {
        self.seq += 1;
        self.heap.push(Entry {
            due: now + backoff,
            seq: self.seq,
            backoff,
            routed,
        });
    }
}

#[derive(Default)]
pub(crate) struct Timer {
    state: Mutex<State>,
    wake: Condvar,
    len: AtomicUsize,
}

impl Timer {
    /// Schedules `routed` to be offered to its shard after a first backoff. `Err` gives it back
    /// when the timer has stopped.
    pub(crate) fn schedule(&self, routed: Routed) -> Result<(), Routed> {
        let mut state = self.state.lock();
        if state.stopped {
            return Err(routed);
        }
        let earliest = state.heap.peek().map(|e| e.due);
        let now = Instant::now();
        state.push(routed, INITIAL_BACKOFF, now);
        self.len.store(state.heap.len(), Ordering::Relaxed);
        if earliest.is_none_or(|due| now + INITIAL_BACKOFF < due) {
            self.wake.notify_one();
        }
        Ok(())
    }

    /// How many events wait.
    pub(crate) fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    /// When the next event is due, if any waits.
    pub(crate) fn earliest(&self) -> Option<Instant> {
        self.state.lock().heap.peek().map(|e| e.due)
    }

    /// Tells the thread to stop; later `schedule` calls fail.
    pub(crate) fn stop(&self) {
        self.state.lock().stopped = true;
        self.wake.notify_all();
    }

    /// Takes every waiting event (after the thread has been joined).
    pub(crate) fn take(&self) -> Vec<Routed> {
        let mut state = self.state.lock();
        self.len.store(0, Ordering::Relaxed);
        std::mem::take(&mut state.heap)
            .into_iter()
            .map(|e| e.routed)
            .collect()
    }

    /// The body of the timer thread.
    pub(crate) fn run(&self, senders: &[Sender<Msg>]) {
        let mut due = Vec::new();
        loop {
            {
                let mut state = self.state.lock();
                loop {
                    if state.stopped {
                        return;
                    }
                    let now = Instant::now();
                    match state.heap.peek() {
                        Some(top) if top.due <= now => break,
                        Some(top) => {
                            let until = top.due;
                            self.wake.wait_until(&mut state, until);
                        }
                        None => self.wake.wait(&mut state),
                    }
                }
                let now = Instant::now();
                while state.heap.peek().is_some_and(|e| e.due <= now) {
                    due.extend(state.heap.pop());
                }
                self.len.store(state.heap.len(), Ordering::Relaxed);
            }
            let mut retry = Vec::new();
            for entry in due.drain(..) {
                let Entry {
                    backoff, routed, ..
                } = entry;
                match senders[routed.shard].try_send(Msg::Task(routed.job)) {
                    Ok(()) => {}
                    Err(TrySendError::Full(msg) | TrySendError::Disconnected(msg)) => {
                        let Msg::Task(job) = msg else {
                            unreachable!("a task was sent")
                        };
                        retry.push((Routed { job, ..routed }, (backoff * 2).min(MAX_BACKOFF)));
                    }
                }
            }
            if !retry.is_empty() {
                // Entries taken out stay the timer's: they go back even once it is stopped, and
                // the bus takes them after joining the thread.
                let mut state = self.state.lock();
                let now = Instant::now();
                for (routed, backoff) in retry {
                    state.push(routed, backoff, now);
                }
                self.len.store(state.heap.len(), Ordering::Relaxed);
            }
        }
    }
}

//! The timer thread: offers events again, later, when their shard and the publishing worker's
//! spill queue were full.
//!
//! Ground rules: the timer owns a min-heap of `(due, sequence)` entries behind one mutex. Its
//! thread sleeps on a condition variable until the earliest entry is due (not ticking while
//! idle), takes every due entry out of the heap, and offers each to its shard with `try_send`
//! outside the lock. An entry whose shard is still full is handed to that shard's worker, which
//! runs it from its spill queue before it takes new work; the delay it served is what throttles
//! handlers that feed each other through full shards. Entries stay accepted in the ledger while
//! they wait, so `flush` waits for them; at shutdown the bus stops the thread, joins it and
//! takes what is left.

use std::cmp::Ordering as CmpOrdering;
use std::collections::BinaryHeap;
use std::time::{Duration, Instant};

use crossbeam_channel::TrySendError;
use parking_lot::{Condvar, Mutex};

use crate::shard::{Msg, Routed, Shard};
use crate::sync::{AtomicUsize, Ordering};

/// How long an event waits on the timer before it is offered again.
pub(crate) const REOFFER_DELAY: Duration = Duration::from_micros(200);

struct Entry {
    due: Instant,
    seq: u64,
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
    fn push(&mut self, routed: Routed, due: Instant) {
        self.seq += 1;
        self.heap.push(Entry {
            due,
            seq: self.seq,
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
    /// Schedules `routed` to be offered to its shard after [`REOFFER_DELAY`]. `Err` gives it
    /// back when the timer has stopped.
    #[allow(clippy::result_large_err)] // The error is the event itself, handed back.
    pub(crate) fn schedule(&self, routed: Routed) -> Result<(), Routed> {
        let mut state = self.state.lock();
        if state.stopped {
            return Err(routed);
        }
        let earliest = state.heap.peek().map(|e| e.due);
        let due = Instant::now() + REOFFER_DELAY;
        state.push(routed, due);
        self.len.store(state.heap.len(), Ordering::Relaxed);
        if earliest.is_none_or(|earliest| due < earliest) {
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
    pub(crate) fn run(&self, shards: &[Shard]) {
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
            for entry in due.drain(..) {
                let routed = entry.routed;
                let shard = &shards[routed.shard];
                match shard.tx.try_send(Msg::Task(routed.task)) {
                    Ok(()) => {}
                    Err(TrySendError::Full(msg) | TrySendError::Disconnected(msg)) => {
                        let Msg::Task(task) = msg else {
                            unreachable!("a task was sent")
                        };
                        // The backoff has been served: the shard's own worker takes the event
                        // from its spill queue before it takes new work. The wake-up reaches
                        // it if it emptied its channel meanwhile.
                        shard.worker.hand_over(Routed { task, ..routed });
                        let _ = shard.tx.try_send(Msg::Wake);
                    }
                }
            }
        }
    }
}

//! Events and helpers shared by the integration tests.
#![allow(dead_code, unreachable_pub)]

pub mod live_heap;

use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::Duration;

use microbus::Event;
use serde::{Deserialize, Serialize};

pub const WAIT: Duration = Duration::from_secs(30);

/// A numbered event from a numbered publisher.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Numbered {
    pub publisher: u32,
    pub seq: u64,
}
impl Event for Numbered {
    const NAME: &'static str = "Numbered";
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Keyed {
    pub key: u64,
    pub seq: u64,
}
impl Event for Keyed {
    const NAME: &'static str = "Keyed";
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FollowUp {
    pub parent: u64,
    pub index: u8,
}
impl Event for FollowUp {
    const NAME: &'static str = "FollowUp";
}

/// One counter per expected event, to show each arrives exactly once.
pub struct Tally {
    seen: Vec<AtomicU8>,
}

impl Tally {
    pub fn new(n: usize) -> Tally {
        Tally {
            seen: (0..n).map(|_| AtomicU8::new(0)).collect(),
        }
    }

    pub fn mark(&self, i: usize) {
        self.seen[i].fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(&self, i: usize) -> u8 {
        self.seen[i].load(Ordering::Relaxed)
    }

    /// Checks a run in which some events were handed back to their publishers: each event was
    /// handled exactly once or handed back, never both, never neither, and none came back
    /// twice. `returned` are the indices handed back.
    pub fn assert_handled_or_returned(&self, returned: &[u64]) {
        let returned_set: std::collections::HashSet<u64> = returned.iter().copied().collect();
        assert_eq!(
            returned_set.len(),
            returned.len(),
            "an event came back twice"
        );
        let wrong: Vec<_> = self
            .not_once()
            .into_iter()
            .filter(|&(i, c)| !(c == 0 && returned_set.contains(&(i as u64))))
            .collect();
        assert_eq!(wrong, vec![], "handled other than once, or lost");
        for &i in returned {
            assert_eq!(
                self.get(i as usize),
                0,
                "event {i} came back and was handled"
            );
        }
    }

    /// Indices seen other than exactly once, with their counts.
    pub fn not_once(&self) -> Vec<(usize, u8)> {
        self.seen
            .iter()
            .enumerate()
            .map(|(i, c)| (i, c.load(Ordering::Relaxed)))
            .filter(|&(_, c)| c != 1)
            .collect()
    }
}

/// Keeps the expected panics of handlers and callbacks (on the bus's worker and cleanup
/// threads) off the test output.
pub fn quiet_worker_panics() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let on_worker = std::thread::current()
            .name()
            .is_some_and(|n| n.starts_with("microbus-"));
        if !on_worker {
            default(info);
        }
    }));
}

pub fn count(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::SeqCst)
}

/// A bus with one worker whose handler of `Numbered` blocks on event 0 until released.
pub struct Held {
    pub bus: microbus::Bus,
    /// Lets the held handler return.
    pub release: crossbeam_channel::Sender<()>,
    /// Gets the held event's id once the worker is inside the handler.
    pub entered: crossbeam_channel::Receiver<microbus::EventId>,
    /// The `seq` of every event handled, in order.
    pub handled: std::sync::Arc<std::sync::Mutex<Vec<u64>>>,
}

impl Held {
    pub fn handled(&self) -> Vec<u64> {
        self.handled.lock().unwrap().clone()
    }
}

pub fn hold_the_only_worker(capacity: usize) -> Held {
    let bus = microbus::Bus::builder()
        .workers(1)
        .channel_capacity(capacity)
        .build()
        .unwrap();
    let (entered_tx, entered) = crossbeam_channel::bounded(1);
    let (release, release_rx) = crossbeam_channel::bounded::<()>(1);
    let handled = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    {
        let handled = handled.clone();
        bus.subscribe(
            move |e: &Numbered, ctx: &microbus::Context| -> microbus::HandlerResult {
                if e.seq == 0 {
                    entered_tx.send(ctx.event_id()).unwrap();
                    release_rx.recv().unwrap();
                }
                handled.lock().unwrap().push(e.seq);
                Ok(())
            },
        )
        .unwrap();
    }
    Held {
        bus,
        release,
        entered,
        handled,
    }
}

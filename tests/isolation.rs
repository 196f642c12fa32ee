//! User code outside handlers — the dead-letter hook and sink, tracker callbacks, taps, an
//! event's `Serialize` and `Drop` — is isolated like a handler: a panic is caught and counted
//! at its seam, and the delivery is settled as if the code had returned; code that blocks is
//! left behind at the shutdown deadline, which holds, and the report still balances.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{Numbered, WAIT, count, quiet_worker_panics};
use microbus::{
    Bus, Context, DeadLetterReason, Event, HandlerError, HandlerResult, Publish, RetryPolicy,
    SHUTDOWN_GRACE,
};
use serde::{Deserialize, Serialize, Serializer};

/// What an event's own code does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
enum Mischief {
    #[default]
    None,
    /// `Serialize` panics.
    SerializePanics,
    /// `Drop` panics.
    DropPanics,
    /// `Drop` blocks until the gate opens.
    DropBlocks,
}

/// An event whose `Serialize` or `Drop` misbehaves, as each value says.
#[derive(Debug, Deserialize)]
struct Hostile {
    seq: u64,
    mischief: Mischief,
    #[serde(skip)]
    gate: Option<Arc<AtomicBool>>,
}

impl Hostile {
    fn new(seq: u64, mischief: Mischief) -> Hostile {
        Hostile {
            seq,
            mischief,
            gate: None,
        }
    }
}

impl Event for Hostile {
    const NAME: &'static str = "Hostile";
}

impl Serialize for Hostile {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if self.mischief == Mischief::SerializePanics {
            panic!("Serialize of {}", self.seq);
        }
        (self.seq, self.mischief).serialize(serializer)
    }
}

impl Drop for Hostile {
    fn drop(&mut self) {
        match self.mischief {
            Mischief::DropPanics if !std::thread::panicking() => panic!("Drop of {}", self.seq),
            Mischief::DropBlocks => wait_for(self.gate.as_deref()),
            _ => {}
        }
    }
}

/// Blocks until `gate` opens (at once without one).
fn wait_for(gate: Option<&AtomicBool>) {
    while gate.is_some_and(|g| !g.load(Ordering::SeqCst)) {
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Opens a gate when dropped, so that a failing test does not leave threads blocked.
struct Opens(Arc<AtomicBool>);

impl Drop for Opens {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

fn gate() -> (Arc<AtomicBool>, Opens) {
    let gate = Arc::new(AtomicBool::new(false));
    (gate.clone(), Opens(gate))
}

const DEADLINE: Duration = Duration::from_millis(200);

/// Shuts `bus` down, checking that the report balances and that shutdown took no longer than
/// its deadline plus the grace, with room for a loaded machine: what it guards against is a
/// shutdown that waits for blocked user code (for ever here).
fn shutdown_promptly(bus: &Bus) -> microbus::ShutdownReport {
    let started = Instant::now();
    let report = bus.shutdown().unwrap();
    let elapsed = started.elapsed();
    println!("shutdown took {elapsed:?} against a deadline of {DEADLINE:?}");
    let bound = DEADLINE + SHUTDOWN_GRACE + Duration::from_secs(2);
    assert!(elapsed < bound, "shutdown took {elapsed:?}");
    assert!(report.is_balanced(), "{report}");
    report
}

#[test]
fn panics_in_the_hook_the_sink_and_serialize_are_counted_and_the_letters_kept() {
    quiet_worker_panics();
    let hooked = Arc::new(AtomicU64::new(0));
    let bus = {
        let hooked = hooked.clone();
        Bus::builder()
            .workers(1)
            .retry(RetryPolicy::none())
            .dead_letter_capacity(2)
            .on_dead_letter(move |_| {
                hooked.fetch_add(1, Ordering::SeqCst);
                panic!("hook");
            })
            .dead_letter_sink(|_| panic!("sink"))
            .build()
            .unwrap()
    };
    bus.subscribe(|_: &Hostile, _: &Context| -> HandlerResult { Err(HandlerError::msg("no")) })
        .unwrap();
    let handled = Arc::new(AtomicU64::new(0));
    {
        let handled = handled.clone();
        bus.subscribe(move |_: &Numbered, _: &Context| -> HandlerResult {
            handled.fetch_add(1, Ordering::SeqCst);
            Ok(())
        })
        .unwrap();
    }
    for seq in 0..5 {
        let mischief = if seq % 2 == 0 {
            Mischief::SerializePanics
        } else {
            Mischief::None
        };
        bus.publish(Hostile::new(seq, mischief)).unwrap();
    }
    // The worker lives on.
    bus.publish(Numbered {
        publisher: 0,
        seq: 0,
    })
    .unwrap();
    bus.flush(WAIT).unwrap();
    assert_eq!(count(&handled), 1);
    assert_eq!(count(&hooked), 5);
    let stats = bus.stats();
    assert_eq!((stats.dead_lettered, stats.evicted), (5, 3), "{stats:?}");
    let panics = stats.callback_panics;
    assert_eq!(
        (panics.hook, panics.sink, panics.serde),
        (5, 3, 3),
        "{panics:?}"
    );
    assert_eq!(panics.total(), 11);
    // The letters whose Serialize panicked keep the error text; the others their JSON.
    let payloads: Vec<String> = bus
        .dead_letters()
        .list()
        .iter()
        .map(|l| l.payload_json().to_owned())
        .collect();
    assert_eq!(
        payloads,
        [r#"[3,"None"]"#, r#""the event's Serialize panicked""#]
    );
    let metrics = bus.metrics();
    assert!(
        metrics
            .to_prometheus()
            .contains("microbus_callback_panics_total{seam=\"hook\"} 5"),
        "{}",
        metrics.to_prometheus()
    );
    assert!(
        metrics
            .to_string()
            .contains("callback panics: hook 5, sink 3")
    );
    let report = bus.shutdown().unwrap();
    assert!(report.is_balanced(), "{report}");
    assert_eq!(report.stats.callback_panics, panics);
}

#[test]
fn a_tracker_callback_that_panics_is_counted_on_every_path() {
    quiet_worker_panics();
    let bus = Bus::builder()
        .workers(1)
        .retry(RetryPolicy::none())
        .build()
        .unwrap();
    let (entered_tx, entered) = crossbeam_channel::bounded(1);
    let (go_tx, go) = crossbeam_channel::bounded::<()>(1);
    let (gate, _opens) = gate();
    {
        let gate = gate.clone();
        bus.subscribe(move |e: &Numbered, _: &Context| -> HandlerResult {
            match e.seq {
                0 => Ok(()),
                1 => Err(HandlerError::msg("failed")),
                // Holds the worker until the callbacks are registered.
                100 => go.recv().map_err(HandlerError::msg),
                _ => {
                    let _ = entered_tx.try_send(());
                    wait_for(Some(&gate));
                    Ok(())
                }
            }
        })
        .unwrap();
    }
    let tracked = |seq: u64| {
        let tracker = bus
            .publish_with(Numbered { publisher: 0, seq }, Publish::new().tracked())
            .unwrap();
        tracker.on_complete(|_| panic!("tracker callback"));
        tracker
    };
    // Completed by the worker: succeeded, and dead-lettered.
    bus.publish(Numbered {
        publisher: 0,
        seq: 100,
    })
    .unwrap();
    let (a, b) = (tracked(0), tracked(1));
    go_tx.send(()).unwrap();
    bus.flush(WAIT).unwrap();
    assert_eq!(a.completion().unwrap().succeeded, 1);
    assert_eq!(b.completion().unwrap().dead_lettered, 1);
    assert_eq!(bus.stats().callback_panics.tracker, 2);
    // Completed by shutdown: left in the channel behind a handler that is still running.
    let stuck = tracked(2);
    entered.recv().unwrap();
    let left = tracked(3);
    let report = bus.shutdown_timeout(DEADLINE).unwrap();
    assert!(report.is_balanced(), "{report}");
    assert_eq!(left.completion().unwrap().left, 1);
    assert_eq!(stuck.completion(), None, "its handler has not returned");
    assert_eq!(report.stats.callback_panics.tracker, 3);
    assert_eq!((report.stats.abandoned, report.stats.left), (1, 1));
    // The lifecycle is complete: a second shutdown returns the same report at once.
    assert_eq!(bus.shutdown().unwrap(), report);
}

#[test]
fn an_events_drop_that_panics_is_counted_wherever_it_is_dropped() {
    quiet_worker_panics();
    const EVENTS: u64 = 200;
    let bus = Bus::builder()
        .workers(2)
        .retry(RetryPolicy::fixed(Duration::from_millis(1)).max_attempts(2))
        .dead_letter_capacity(0)
        .build()
        .unwrap();
    let handled = Arc::new(AtomicU64::new(0));
    {
        let handled = handled.clone();
        bus.subscribe(move |e: &Hostile, ctx: &Context| -> HandlerResult {
            handled.fetch_add(1, Ordering::SeqCst);
            // Every tenth fails for good (dropped after its retry), the rest succeed.
            if e.seq.is_multiple_of(10) {
                return Err(HandlerError::msg(format_args!("attempt {}", ctx.attempt())));
            }
            Ok(())
        })
        .unwrap();
    }
    for seq in 0..EVENTS {
        bus.publish(Hostile::new(seq, Mischief::DropPanics))
            .unwrap();
    }
    let batch: Vec<Hostile> = (EVENTS..2 * EVENTS)
        .map(|seq| Hostile::new(seq, Mischief::DropPanics))
        .collect();
    bus.publish_batch(batch).unwrap();
    bus.flush(WAIT).unwrap();
    assert_eq!(count(&handled), 2 * EVENTS + 2 * EVENTS / 10);
    let stats = bus.stats();
    assert_eq!(stats.succeeded, 2 * EVENTS - 2 * EVENTS / 10);
    assert_eq!(stats.discarded, 2 * EVENTS / 10);
    // An event is dropped once its deliveries have settled, so a moment after `flush` may
    // return: wait for the last drops.
    let start = std::time::Instant::now();
    while bus.stats().callback_panics.drop < 2 * EVENTS && start.elapsed() < WAIT {
        std::thread::yield_now();
    }
    let stats = bus.stats();
    assert_eq!(stats.callback_panics.drop, 2 * EVENTS, "{stats:?}");
    assert!(bus.shutdown().unwrap().is_balanced());
}

#[test]
fn the_deadline_holds_with_a_tap_that_blocks() {
    let bus = Bus::builder()
        .workers(1)
        .shutdown_timeout(DEADLINE)
        .build()
        .unwrap();
    let (gate, _opens) = gate();
    let handled = Arc::new(AtomicU64::new(0));
    for _ in 0..3 {
        let handled = handled.clone();
        bus.subscribe(move |_: &Numbered, _: &Context| -> HandlerResult {
            handled.fetch_add(1, Ordering::SeqCst);
            Ok(())
        })
        .unwrap();
    }
    let (tapped_tx, tapped) = crossbeam_channel::unbounded();
    {
        let gate = gate.clone();
        bus.tap(move |t| {
            let _ = tapped_tx.send(t.envelope().id());
            wait_for(Some(&gate));
        });
    }
    bus.publish(Numbered {
        publisher: 0,
        seq: 0,
    })
    .unwrap();
    bus.publish(Numbered {
        publisher: 0,
        seq: 1,
    })
    .unwrap();
    let first = tapped.recv().unwrap();
    let report = shutdown_promptly(&bus);
    assert!(report.deadline_passed);
    // The tapped event's three deliveries were held by the worker; the next event never ran.
    assert_eq!(
        (report.stats.abandoned, report.stats.left),
        (3, 3),
        "{report}"
    );
    assert_eq!(report.abandoned.len(), 1);
    let detached = &report.abandoned[0];
    assert_eq!((detached.seam, detached.deliveries), (Some("tap"), 3));
    assert_eq!(detached.event_id, Some(first));
    assert_eq!(count(&handled), 0);
    // Let the tap go: the detached worker runs nothing more.
    gate.store(true, Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(count(&handled), 0);
    assert_eq!(bus.stats(), report.stats);
}

#[test]
fn the_deadline_holds_with_a_sink_that_blocks_and_the_letter_counts_once() {
    let (gate, _opens) = gate();
    let sunk = Arc::new(AtomicU64::new(0));
    let bus = {
        let (gate, sunk) = (gate.clone(), sunk.clone());
        Bus::builder()
            .workers(1)
            .retry(RetryPolicy::none())
            .dead_letter_capacity(1)
            .dead_letter_sink(move |_| {
                sunk.fetch_add(1, Ordering::SeqCst);
                wait_for(Some(&gate));
            })
            .shutdown_timeout(DEADLINE)
            .build()
            .unwrap()
    };
    bus.subscribe(|_: &Numbered, _: &Context| -> HandlerResult { Err(HandlerError::msg("no")) })
        .unwrap();
    for seq in 0..3 {
        bus.publish(Numbered { publisher: 0, seq }).unwrap();
    }
    // The second dead letter evicts the first: the sink blocks the worker there.
    while count(&sunk) == 0 {
        std::thread::sleep(Duration::from_millis(1));
    }
    let report = shutdown_promptly(&bus);
    // Settled before the sink ran: dead-lettered, not abandoned; the third never ran.
    let s = &report.stats;
    assert_eq!(
        (s.delivered, s.dead_lettered, s.abandoned, s.left),
        (3, 2, 0, 1),
        "{report}"
    );
    assert_eq!(report.abandoned.len(), 1);
    assert_eq!(
        (report.abandoned[0].seam, report.abandoned[0].deliveries),
        (Some("sink"), 0)
    );
    gate.store(true, Ordering::SeqCst);
}

#[test]
fn the_deadline_holds_with_events_whose_drop_blocks() {
    let (gate, _opens) = gate();
    let bus = Bus::builder()
        .workers(1)
        .channel_capacity(16)
        .retry(RetryPolicy::fixed(Duration::from_secs(3600)))
        .shutdown_timeout(DEADLINE)
        .build()
        .unwrap();
    let handled = Arc::new(AtomicU64::new(0));
    {
        let handled = handled.clone();
        bus.subscribe(move |e: &Hostile, _: &Context| -> HandlerResult {
            handled.fetch_add(1, Ordering::SeqCst);
            if e.seq == 1 {
                return Err(HandlerError::msg("retried in an hour"));
            }
            Ok(())
        })
        .unwrap();
    }
    let blocking = |seq: u64| Hostile {
        seq,
        mischief: Mischief::DropBlocks,
        gate: Some(gate.clone()),
    };
    // Event 0 blocks the worker in its drop once handled; 1 waits for a retry on the timer;
    // 2..10 stay in the channel. Shutdown meets a blocking drop in each of those places.
    bus.publish(blocking(1)).unwrap();
    while bus.stats().retried == 0 {
        std::thread::sleep(Duration::from_millis(1));
    }
    bus.publish(blocking(0)).unwrap();
    while count(&handled) < 2 {
        std::thread::sleep(Duration::from_millis(1));
    }
    for seq in 2..10 {
        bus.publish(blocking(seq)).unwrap();
    }
    let report = shutdown_promptly(&bus);
    let s = &report.stats;
    assert_eq!(
        (s.succeeded, s.dead_lettered, s.left, s.abandoned),
        (1, 1, 8, 0),
        "{report}"
    );
    assert_eq!(report.abandoned.len(), 1);
    assert_eq!(report.abandoned[0].seam, Some("drop"));
    // The retry's dead letter and the left events' drops went to the cleanup thread, which
    // the first blocking drop holds up: cut off, and still to come.
    assert!(report.cut_off > 0, "{report}");
    gate.store(true, Ordering::SeqCst);
    let deadline = Instant::now() + WAIT;
    while bus.dead_letters().is_empty() {
        assert!(
            Instant::now() < deadline,
            "the cleanup thread never finished"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let letter = &bus.dead_letters().list()[0];
    assert_eq!(letter.reason(), DeadLetterReason::Shutdown);
    assert_eq!(letter.errors(), ["retried in an hour"]);
}

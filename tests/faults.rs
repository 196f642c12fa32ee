//! Fault injection: while 4 services publish, fail, retry and dead-letter, and a shutdown with
//! a short deadline cuts in, every kind of user code outside handlers — the dead-letter hook
//! and sink, tracker callbacks, a tap, the event's `Serialize` and `Drop` — panics about 1% of
//! the time. Nothing is lost or doubled, every panic is counted at its seam and nowhere else,
//! shutdown returns within its deadline plus the grace, and the report balances.
//!
//! 5,000 events per publisher by default; `MICROBUS_FAULTS_EVENTS` sets another number (run it
//! in release: `MICROBUS_FAULTS_EVENTS=500000 cargo test --release --test faults`).

mod common;

use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::quiet_worker_panics;
use microbus::{
    Bus, CallbackPanics, Context, Event, HandlerError, HandlerResult, Publish, RetryPolicy,
    SHUTDOWN_GRACE, SubscribeOptions,
};
use serde::{Deserialize, Serialize, Serializer};

fn events() -> u64 {
    std::env::var("MICROBUS_FAULTS_EVENTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5_000)
}

const PUBLISHERS: u32 = 4;
/// Short enough that the shutdown meets a backlog: deliveries left, retries waiting.
const DEADLINE: Duration = Duration::from_millis(10);

/// The panics the test's own code raised, by seam, to hold against the bus's counts.
#[derive(Default)]
struct Raised {
    hook: AtomicU64,
    sink: AtomicU64,
    tracker: AtomicU64,
    tap: AtomicU64,
    serde: AtomicU64,
    drop: AtomicU64,
}

static RAISED: Raised = Raised {
    hook: AtomicU64::new(0),
    sink: AtomicU64::new(0),
    tracker: AtomicU64::new(0),
    tap: AtomicU64::new(0),
    serde: AtomicU64::new(0),
    drop: AtomicU64::new(0),
};

impl Raised {
    fn counts(&self) -> CallbackPanics {
        let mut c = CallbackPanics::default();
        c.hook = self.hook.load(Ordering::SeqCst);
        c.sink = self.sink.load(Ordering::SeqCst);
        c.tracker = self.tracker.load(Ordering::SeqCst);
        c.tap = self.tap.load(Ordering::SeqCst);
        c.serde = self.serde.load(Ordering::SeqCst);
        c.drop = self.drop.load(Ordering::SeqCst);
        c
    }
}

/// Counts a panic at `seam`, then raises it.
fn raise(seam: &AtomicU64, what: &str) -> ! {
    seam.fetch_add(1, Ordering::SeqCst);
    panic!("injected: {what}");
}

/// About one in a hundred, chosen by a hash of `n` and `salt`.
fn one_in_a_hundred(n: u64, salt: u64) -> bool {
    let mut x = n.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ salt;
    x ^= x >> 31;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 29;
    x.is_multiple_of(100)
}

/// An order whose `Serialize` or `Drop` panics when its flags say so.
#[derive(Debug, Deserialize)]
struct Order {
    id: u64,
    serialize_panics: bool,
    #[serde(skip)]
    drop_panics: bool,
}

impl Event for Order {
    const NAME: &'static str = "Order";
}

impl Order {
    fn new(id: u64) -> Order {
        Order {
            id,
            serialize_panics: one_in_a_hundred(id, 1),
            drop_panics: one_in_a_hundred(id, 2),
        }
    }

    /// Handed back to the test: it drops the order itself, quietly.
    fn defuse(mut self) {
        self.drop_panics = false;
    }
}

impl Serialize for Order {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if self.serialize_panics {
            raise(&RAISED.serde, "Serialize");
        }
        (self.id, self.serialize_panics).serialize(serializer)
    }
}

impl Drop for Order {
    fn drop(&mut self) {
        if self.drop_panics && !std::thread::panicking() {
            raise(&RAISED.drop, "Drop");
        }
    }
}

/// Whether the current thread is one of a bus's (a callback on the caller's own thread, such
/// as a tracker's that completed before `on_complete`, is the caller's business).
fn on_a_bus_thread() -> bool {
    std::thread::current()
        .name()
        .is_some_and(|n| n.starts_with("microbus-"))
}

#[test]
fn callbacks_that_panic_everywhere_lose_nothing_and_are_counted_at_their_seam() {
    quiet_worker_panics();
    let per_publisher = events();
    let total = per_publisher * u64::from(PUBLISHERS);
    let bus = Bus::builder()
        .service_name("orders")
        .workers(2)
        .channel_capacity(256)
        .retry(RetryPolicy::fixed(Duration::from_millis(1)).max_attempts(3))
        .dead_letter_capacity(64)
        .on_dead_letter(|letter| {
            if one_in_a_hundred(letter.id(), 3) {
                raise(&RAISED.hook, "hook");
            }
        })
        .dead_letter_sink(|letter| {
            if one_in_a_hundred(letter.id(), 4) {
                raise(&RAISED.sink, "sink");
            }
        })
        .shutdown_timeout(DEADLINE)
        .build()
        .unwrap();
    bus.tap(|t| {
        let id = t.envelope().id().as_u128() as u64;
        // Asking for the payload runs the event's `Serialize`.
        if one_in_a_hundred(id, 5) {
            let _ = t.payload_json();
        }
        if one_in_a_hundred(id, 6) {
            raise(&RAISED.tap, "tap");
        }
    });
    // Four services: one always succeeds (it sees every accepted order exactly once, or not
    // at all if the shutdown came first), one fails some orders for a while, one fails some
    // for good, one panics on some.
    let seen: Arc<Vec<AtomicU8>> = Arc::new((0..total).map(|_| AtomicU8::new(0)).collect());
    let audit = bus.service("audit").unwrap();
    {
        let seen = seen.clone();
        audit
            .subscribe_with(
                SubscribeOptions::new().named("record"),
                move |o: &Order, _: &Context| -> HandlerResult {
                    seen[o.id as usize].fetch_add(1, Ordering::SeqCst);
                    Ok(())
                },
            )
            .unwrap();
    }
    bus.service("payments")
        .unwrap()
        .subscribe(|o: &Order, ctx: &Context| -> HandlerResult {
            if o.id.is_multiple_of(7) && ctx.attempt() < 3 {
                return Err(HandlerError::msg("gateway busy"));
            }
            Ok(())
        })
        .unwrap();
    bus.service("fraud")
        .unwrap()
        .subscribe(|o: &Order, _: &Context| -> HandlerResult {
            if o.id.is_multiple_of(11) {
                return Err(HandlerError::permanent(HandlerError::msg("blocked")));
            }
            Ok(())
        })
        .unwrap();
    bus.service("shipping")
        .unwrap()
        .subscribe(|o: &Order, ctx: &Context| -> HandlerResult {
            if o.id.is_multiple_of(13) && ctx.attempt() == 1 {
                panic!("shipping {}", o.id);
            }
            // A slow one now and then keeps a backlog for the shutdown to meet.
            if o.id.is_multiple_of(10) {
                std::thread::sleep(Duration::from_millis(1));
            }
            Ok(())
        })
        .unwrap();

    let accepted = Arc::new(Mutex::new(Vec::new()));
    let stop_publishing = Arc::new(AtomicBool::new(false));
    let publishers: Vec<_> = (0..PUBLISHERS)
        .map(|p| {
            let (bus, accepted, stop) = (bus.clone(), accepted.clone(), stop_publishing.clone());
            std::thread::spawn(move || {
                let mut mine = Vec::new();
                let mut trackers = Vec::new();
                for seq in 0..per_publisher {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let id = u64::from(p) * per_publisher + seq;
                    let order = Order::new(id);
                    let result = if seq % 16 == 0 {
                        bus.publish_with(order, Publish::keyed(id).tracked())
                            .map(|tracker| {
                                tracker.on_complete(move |_| {
                                    if on_a_bus_thread() && one_in_a_hundred(id, 7) {
                                        raise(&RAISED.tracker, "tracker");
                                    }
                                });
                                trackers.push(tracker);
                            })
                    } else {
                        bus.publish_with(order, Publish::keyed(id)).map(|_id| ())
                    };
                    match result {
                        Ok(()) => mine.push(id),
                        Err(refused) => {
                            refused.into_event().defuse();
                            break;
                        }
                    }
                }
                accepted.lock().unwrap().extend(mine);
                trackers
            })
        })
        .collect();
    // Let the stream run a while, then shut down in the middle of it.
    let half = total / 2;
    let started = Instant::now();
    while bus.stats().delivered < half * 4 && started.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(1));
    }
    let shutdown_started = Instant::now();
    let report = bus.shutdown().unwrap();
    let took = shutdown_started.elapsed();
    stop_publishing.store(true, Ordering::Relaxed);
    let trackers: Vec<_> = publishers
        .into_iter()
        .flat_map(|p| p.join().unwrap())
        .collect();
    println!("{report}");
    println!(
        "shutdown took {took:?} against a deadline of {DEADLINE:?} (+{:?} grace)",
        SHUTDOWN_GRACE
    );
    assert!(
        took < DEADLINE + SHUTDOWN_GRACE + Duration::from_secs(2),
        "shutdown took {took:?}"
    );

    // The books: every accepted order's 4 deliveries, each settled once.
    let accepted = accepted.lock().unwrap().clone();
    let s = &report.stats;
    assert!(report.is_balanced(), "{report}");
    assert_eq!(s.delivered, 4 * accepted.len() as u64, "{report}");
    assert_eq!(report.cut_off, 0, "{report}");
    // Nothing doubled: the auditor saw each accepted order at most once, and nothing else.
    let mut handled = 0u64;
    let accepted_set: std::collections::HashSet<u64> = accepted.iter().copied().collect();
    for (id, count) in seen.iter().enumerate() {
        let count = count.load(Ordering::SeqCst);
        assert!(count <= 1, "order {id} audited {count} times");
        if count == 1 {
            assert!(
                accepted_set.contains(&(id as u64)),
                "order {id} was never accepted"
            );
            handled += 1;
        }
    }
    // Nothing lost: what the auditor did not see was left or abandoned at the deadline.
    let audit_row = report_row(&bus, "audit", "record");
    assert_eq!(audit_row, handled);
    assert!(
        accepted.len() as u64 - handled <= s.left + s.abandoned,
        "{} accepted orders unaudited, {report}",
        accepted.len() as u64 - handled
    );
    // Every tracker of an accepted order completed (none was left running at the deadline
    // here) or its delivery is among those abandoned.
    let incomplete = trackers.iter().filter(|t| t.completion().is_none()).count() as u64;
    assert!(
        incomplete <= s.abandoned,
        "{incomplete} trackers never completed"
    );

    // Every panic raised was caught and counted at its seam, and nothing else was: the
    // counts are final once a detached worker (if any) came back.
    let deadline = Instant::now() + Duration::from_secs(10);
    while bus.stats().callback_panics != RAISED.counts() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let caught = bus.stats().callback_panics;
    println!("panics raised and caught: {caught:?}");
    assert_eq!(caught, RAISED.counts());
    for (seam, n) in [
        ("hook", caught.hook),
        ("tap", caught.tap),
        ("serde", caught.serde),
        ("drop", caught.drop),
    ] {
        assert!(n > 0, "no {seam} panic was injected: make the run longer");
    }
}

/// How many deliveries one handler completed, from the metrics.
fn report_row(bus: &Bus, service: &str, handler: &str) -> u64 {
    bus.metrics()
        .handler(service, handler)
        .map_or(0, |h| h.succeeded)
}

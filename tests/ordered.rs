//! Ordered subscriptions: a key's events reach the handler in publish order with every
//! attempt — a retry holds the key's later events back, not other keys — through failures,
//! pauses and shutdown.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::WAIT;
use microbus::{
    Bus, Context, DeadLetterReason, Event, HandlerError, HandlerResult, Publish, RetryPolicy,
    SubscribeOptions,
};
use serde::{Deserialize, Serialize};

const KEYS: u64 = 64;
const PER_PUBLISHER: u64 = 20_000;
const MAX_ATTEMPTS: u32 = 4;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Step {
    publisher: u32,
    key: u64,
    seq: u64,
}
impl Event for Step {
    const NAME: &'static str = "Step";
}

/// Every call of a handler, per (publisher, key): (seq, attempt) in the order it saw them.
type Calls = HashMap<(u32, u64), Vec<(u64, u32)>>;

/// The same for one publisher, per key.
type KeyCalls = HashMap<u64, Vec<(u64, u32)>>;

/// Whether attempt `attempt` of `step` fails: one attempt in ten, at random, never the last.
fn fails(step: &Step, attempt: u32) -> bool {
    let mut x = (u64::from(step.publisher) << 40 ^ step.key << 24 ^ step.seq)
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
        ^ u64::from(attempt).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 31;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^= x >> 29;
    attempt < MAX_ATTEMPTS && x.is_multiple_of(10)
}

#[test]
fn each_key_keeps_its_order_with_every_attempt_through_failures() {
    let bus = Arc::new(
        Bus::builder()
            .workers(2)
            .retry(RetryPolicy::fixed(Duration::from_millis(1)).max_attempts(MAX_ATTEMPTS))
            .build()
            .unwrap(),
    );
    // Every call, per (publisher, key), in the order the handler saw them.
    let calls: Arc<Mutex<Calls>> = Arc::default();
    let failures = Arc::new(AtomicU64::new(0));
    {
        let (calls, failures) = (calls.clone(), failures.clone());
        bus.subscribe_with(
            SubscribeOptions::new().ordered(),
            move |step: &Step, ctx: &Context| -> HandlerResult {
                calls
                    .lock()
                    .unwrap()
                    .entry((step.publisher, step.key))
                    .or_default()
                    .push((step.seq, ctx.attempt()));
                if fails(step, ctx.attempt()) {
                    failures.fetch_add(1, Ordering::SeqCst);
                    return Err(HandlerError::msg("transient"));
                }
                Ok(())
            },
        )
        .unwrap();
    }
    let publishers: Vec<_> = (0..2u32)
        .map(|publisher| {
            let bus = bus.clone();
            std::thread::spawn(move || {
                let mut seqs = [0u64; KEYS as usize];
                for i in 0..PER_PUBLISHER {
                    let key = (i * 7 + u64::from(publisher)) % KEYS;
                    let seq = seqs[key as usize];
                    seqs[key as usize] += 1;
                    bus.publish_with(
                        Step {
                            publisher,
                            key,
                            seq,
                        },
                        Publish::keyed(key),
                    )
                    .unwrap();
                }
            })
        })
        .collect();
    for publisher in publishers {
        publisher.join().unwrap();
    }
    bus.flush(WAIT).unwrap();
    let stats = bus.stats();
    let failed = failures.load(Ordering::SeqCst);
    assert!(failed > 2_000, "about one attempt in ten fails: {failed}");
    assert_eq!(stats.succeeded, 2 * PER_PUBLISHER);
    assert_eq!((stats.failed, stats.retried), (failed, failed));
    assert_eq!(stats.dead_lettered, 0);
    let calls = calls.lock().unwrap();
    assert_eq!(calls.len() as u64, 2 * KEYS);
    let mut events = 0;
    for ((publisher, key), seen) in calls.iter() {
        // Successful seqs are 0, 1, 2, …; each seq's attempts are 1, 2, … in a row, and no
        // seq runs before its predecessor succeeded.
        let mut next = 0u64;
        let mut attempt = 1u32;
        for &(seq, a) in seen {
            assert_eq!(
                (seq, a),
                (next, attempt),
                "publisher {publisher}, key {key}: {seen:?}"
            );
            let step = Step {
                publisher: *publisher,
                key: *key,
                seq,
            };
            if fails(&step, a) {
                attempt += 1;
            } else {
                next += 1;
                attempt = 1;
                events += 1;
            }
        }
    }
    assert_eq!(events, 2 * PER_PUBLISHER);
    drop(calls);
    assert!(
        Arc::try_unwrap(bus)
            .unwrap()
            .shutdown()
            .unwrap()
            .is_balanced()
    );
}

#[test]
fn a_retry_holds_back_its_key_only() {
    let clock = microbus::testing::ManualClock::new();
    let bus = Bus::builder()
        .workers(1)
        .clock(&clock)
        .retry(RetryPolicy::fixed(Duration::from_millis(50)).max_attempts(2))
        .build()
        .unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    {
        let seen = seen.clone();
        bus.subscribe_with(
            SubscribeOptions::new().ordered(),
            move |s: &Step, ctx: &Context| -> HandlerResult {
                seen.lock().unwrap().push((s.key, s.seq, ctx.attempt()));
                if s.key == 0 && s.seq == 0 && ctx.attempt() == 1 {
                    return Err(HandlerError::msg("once"));
                }
                Ok(())
            },
        )
        .unwrap();
    }
    // Key 0's first event fails; key 1's events, and unkeyed ones, do not wait for it.
    publish_steps(&bus, 2, 0..3);
    bus.publish(Step {
        publisher: 0,
        key: 9,
        seq: 0,
    })
    .unwrap();
    // Everything but key 0 runs; key 0 waits for its retry, 50 ms on.
    clock.advance(Duration::ZERO).unwrap();
    assert_eq!(seen.lock().unwrap().len(), 5);
    assert!(bus.flush(WAIT).unwrap_err().is_waiting_on_clock());
    clock.advance(Duration::from_millis(50)).unwrap();
    bus.flush(WAIT).unwrap();
    let seen = seen.lock().unwrap().clone();
    let key0: Vec<(u64, u32)> = seen
        .iter()
        .filter(|s| s.0 == 0)
        .map(|s| (s.1, s.2))
        .collect();
    assert_eq!(key0, [(0, 1), (0, 2), (1, 1), (2, 1)]);
    // Everything else ran before the retry did.
    let retry_at = seen.iter().position(|s| *s == (0, 0, 2)).unwrap();
    assert_eq!(retry_at, 5, "{seen:?}");
    assert_eq!(bus.stats().succeeded, 7);
}

#[test]
fn ordered_with_pauses_and_a_shutdown_midway_keeps_order_and_balances() {
    let bus = Arc::new(
        Bus::builder()
            .workers(2)
            .retry(RetryPolicy::fixed(Duration::from_millis(2)).max_attempts(MAX_ATTEMPTS))
            .shutdown_timeout(Duration::from_millis(300))
            .build()
            .unwrap(),
    );
    // One publisher: the calls per key.
    let calls: Arc<Mutex<KeyCalls>> = Arc::default();
    let subscription = {
        let calls = calls.clone();
        bus.subscribe_with(
            SubscribeOptions::new().ordered(),
            move |step: &Step, ctx: &Context| -> HandlerResult {
                calls
                    .lock()
                    .unwrap()
                    .entry(step.key)
                    .or_default()
                    .push((step.seq, ctx.attempt()));
                if fails(step, ctx.attempt()) {
                    return Err(HandlerError::msg("transient"));
                }
                Ok(())
            },
        )
        .unwrap()
    };
    let publisher = {
        let bus = bus.clone();
        std::thread::spawn(move || {
            let mut seqs = [0u64; 8];
            for i in 0..20_000u64 {
                let key = i % 8;
                let seq = seqs[key as usize];
                seqs[key as usize] += 1;
                if bus
                    .publish_with(
                        Step {
                            publisher: 0,
                            key,
                            seq,
                        },
                        Publish::keyed(key),
                    )
                    .is_err()
                {
                    return i;
                }
            }
            20_000
        })
    };
    for _ in 0..5 {
        subscription.pause();
        std::thread::sleep(Duration::from_millis(2));
        subscription.resume();
        std::thread::sleep(Duration::from_millis(2));
    }
    // Paused when shutdown comes: what parked and what waits for its key are dead letters.
    subscription.pause();
    let report = bus.shutdown().unwrap();
    let published = publisher.join().unwrap();
    assert!(report.is_balanced(), "{report}");
    assert!(report.lanes.iter().all(|l| l.is_balanced()), "{report}");
    // Order among everything that ran, per key, every attempt.
    let calls = calls.lock().unwrap();
    let mut ran_to = HashMap::new();
    for (key, seen) in calls.iter() {
        let (mut next, mut attempt) = (0u64, 1u32);
        for &(seq, a) in seen {
            assert_eq!((seq, a), (next, attempt), "key {key}");
            let step = Step {
                publisher: 0,
                key: *key,
                seq,
            };
            if fails(&step, a) {
                attempt += 1;
            } else {
                (next, attempt) = (next + 1, 1);
            }
        }
        ran_to.insert(*key, (next, attempt));
    }
    // The dead letters of each key continue where its handler stopped, in order.
    let mut letters: HashMap<u64, Vec<u64>> = HashMap::new();
    for letter in bus.dead_letters().list() {
        assert_eq!(letter.reason(), DeadLetterReason::Shutdown);
        let step: Step = serde_json::from_str(letter.payload_json()).unwrap();
        letters.entry(step.key).or_default().push(step.seq);
    }
    for (key, seqs) in &letters {
        let from = ran_to.get(key).map_or(0, |r| r.0);
        let bad = seqs
            .windows(2)
            .position(|w| w[0] >= w[1])
            .map(|i| &seqs[i.saturating_sub(3)..(i + 4).min(seqs.len())]);
        assert!(bad.is_none(), "key {key}: out of order around {bad:?}");
        assert!(
            seqs[0] >= from,
            "key {key}: {} ran, {} dead-lettered",
            from,
            seqs[0]
        );
    }
    let stats = &report.stats;
    assert_eq!(
        stats.delivered,
        stats.succeeded + stats.dead_lettered + stats.left
    );
    assert!(published > 0);
}

/// What a handler handled: (key, seq).
type Handled = Vec<(u64, u64)>;

/// An ordered subscription that holds a key behind its dead letter; the handler fails
/// `broken` (key, seq) for good, and records what it handled.
/// A failure to make for good: (key, seq).
type Broken = Arc<Mutex<Option<(u64, u64)>>>;

fn holding_bus(capacity: usize) -> (Bus, Broken, Arc<Mutex<Handled>>) {
    let bus = Bus::builder()
        .workers(2)
        .dead_letter_capacity(capacity)
        .build()
        .unwrap();
    let broken: Broken = Arc::default();
    let handled: Arc<Mutex<Handled>> = Arc::default();
    {
        let (broken, handled) = (broken.clone(), handled.clone());
        bus.subscribe_with(
            SubscribeOptions::new()
                .named("ledger")
                .ordered()
                .hold_on_dead_letter(),
            move |s: &Step, _: &Context| -> HandlerResult {
                if *broken.lock().unwrap() == Some((s.key, s.seq)) {
                    return Err(HandlerError::permanent(HandlerError::msg("bad entry")));
                }
                handled.lock().unwrap().push((s.key, s.seq));
                Ok(())
            },
        )
        .unwrap();
    }
    (bus, broken, handled)
}

fn publish_steps(bus: &Bus, keys: u64, seqs: std::ops::Range<u64>) {
    for seq in seqs {
        for key in 0..keys {
            bus.publish_with(
                Step {
                    publisher: 0,
                    key,
                    seq,
                },
                Publish::keyed(key),
            )
            .unwrap();
        }
    }
}

fn seqs_of(handled: &Mutex<Handled>, key: u64) -> Vec<u64> {
    handled
        .lock()
        .unwrap()
        .iter()
        .filter(|h| h.0 == key)
        .map(|h| h.1)
        .collect()
}

#[test]
fn a_dead_letter_holds_its_key_until_redriven_or_skipped() {
    let (bus, broken, handled) = holding_bus(100);
    *broken.lock().unwrap() = Some((0, 3));
    publish_steps(&bus, 4, 0..10);
    // Key 0 holds exactly its events after the dead letter; the other keys finish.
    let err = bus.flush(Duration::from_millis(100)).unwrap_err();
    let pending = err.pending().unwrap();
    assert_eq!(
        (pending.parked[0].handler.as_str(), pending.parked[0].parked),
        ("ledger", 6)
    );
    assert_eq!(seqs_of(&handled, 0), [0, 1, 2]);
    for key in 1..4 {
        assert_eq!(seqs_of(&handled, key), (0..10).collect::<Vec<_>>());
    }
    let held = bus.dead_letters().list();
    assert_eq!(held.len(), 1);
    // Which key is held, by which dead letter, and how many wait: in the dead letters and in
    // the flush's error.
    let keys = bus.dead_letters().held();
    assert_eq!(keys.len(), 1);
    assert_eq!(
        (
            keys[0].key,
            keys[0].dead_letter,
            keys[0].waiting,
            keys[0].handler.as_str()
        ),
        (0, held[0].id(), 6, "ledger")
    );
    assert_eq!(pending.held, keys);
    let metrics = bus.metrics();
    assert_eq!(
        (metrics.handlers[0].held_keys, metrics.handlers[0].parked),
        (1, 6)
    );
    assert!(
        metrics
            .to_prometheus()
            .contains("microbus_handler_held_keys{")
    );
    assert!(err.to_string().contains("key 0 of ledger"), "{err}");
    // Fixed, then redriven: the key goes on in order.
    *broken.lock().unwrap() = None;
    bus.dead_letters().redrive(held[0].id()).unwrap();
    bus.flush(WAIT).unwrap();
    assert_eq!(seqs_of(&handled, 0), (0..10).collect::<Vec<_>>());
    // Broken again; this time the dead letter is skipped: the key goes on without it.
    *broken.lock().unwrap() = Some((0, 13));
    publish_steps(&bus, 1, 10..20);
    assert!(bus.flush(Duration::from_millis(50)).is_err());
    let held = bus.dead_letters().list();
    assert!(bus.dead_letters().skip(held[0].id()));
    assert!(!bus.dead_letters().skip(held[0].id()), "skipped once");
    bus.flush(WAIT).unwrap();
    let expected: Vec<u64> = (0..20).filter(|s| *s != 13).collect();
    assert_eq!(seqs_of(&handled, 0), expected);
    let stats = bus.stats();
    assert_eq!((stats.dead_lettered, stats.succeeded), (2, 4 * 10 + 9));
    assert!(bus.shutdown().unwrap().is_balanced());
}

#[test]
fn a_purged_or_evicted_dead_letter_releases_its_key() {
    // A ring of one: the second key's dead letter evicts the first's.
    let (bus, broken, handled) = holding_bus(1);
    *broken.lock().unwrap() = Some((0, 1));
    publish_steps(&bus, 1, 0..5);
    assert!(bus.flush(Duration::from_millis(50)).is_err());
    assert_eq!(seqs_of(&handled, 0), [0]);
    *broken.lock().unwrap() = Some((1, 0));
    bus.publish_with(
        Step {
            publisher: 0,
            key: 1,
            seq: 0,
        },
        Publish::keyed(1u64),
    )
    .unwrap();
    // Key 0 runs on; key 1 holds nothing behind it.
    bus.flush(WAIT).unwrap();
    assert_eq!(seqs_of(&handled, 0), [0, 2, 3, 4]);
    assert_eq!(bus.stats().held_keys_evicted, 1);
    // A purge releases too: key 2's first event is dead-lettered (evicting key 1's letter,
    // which held nothing), its second waits until the purge.
    *broken.lock().unwrap() = Some((2, 0));
    for seq in 0..2 {
        bus.publish_with(
            Step {
                publisher: 0,
                key: 2,
                seq,
            },
            Publish::keyed(2u64),
        )
        .unwrap();
    }
    assert!(bus.flush(Duration::from_millis(50)).is_err());
    assert_eq!(seqs_of(&handled, 2), Vec::<u64>::new());
    assert_eq!(bus.dead_letters().purge(), 1);
    bus.flush(WAIT).unwrap();
    assert_eq!(seqs_of(&handled, 2), [1]);
    assert_eq!(bus.stats().held_keys_evicted, 2);
    assert!(bus.shutdown().unwrap().is_balanced());
}

#[test]
fn holding_needs_an_ordered_subscription_and_dead_letters() {
    let bus = Bus::builder().build().unwrap();
    let handler = |_: &Step, _: &Context| -> HandlerResult { Ok(()) };
    let err = bus
        .subscribe_with(SubscribeOptions::new().hold_on_dead_letter(), handler)
        .unwrap_err();
    assert!(
        matches!(
            err,
            microbus::SubscribeError::Invalid {
                option: "hold_on_dead_letter",
                ..
            }
        ),
        "{err}"
    );
    let off = Bus::builder().dead_letter_capacity(0).build().unwrap();
    let err = off
        .subscribe_with(
            SubscribeOptions::new().ordered().hold_on_dead_letter(),
            handler,
        )
        .unwrap_err();
    assert!(err.to_string().contains("dead letters"), "{err}");
}

#[test]
fn deferred_heads_delayed_events_and_an_unsubscribe_keep_the_order() {
    let bus = Bus::builder()
        .workers(2)
        .retry(RetryPolicy::fixed(Duration::from_millis(1)).max_attempts(3))
        .build()
        .unwrap();
    let seen: Arc<Mutex<Handled>> = Arc::default();
    // Key 5's head defers until this lets it go.
    let (release, released) = crossbeam_channel::bounded::<()>(1);
    let subscription = {
        let seen = seen.clone();
        bus.subscribe_with(
            SubscribeOptions::new().ordered(),
            move |s: &Step, ctx: &Context| -> HandlerResult {
                seen.lock().unwrap().push((s.key, s.seq));
                if s.key == 5 {
                    let (deferred, released) = (ctx.defer(), released.clone());
                    std::thread::spawn(move || {
                        let _ = released.recv();
                        deferred.succeed();
                    });
                } else if s.seq.is_multiple_of(3) {
                    // Every third event completes on another thread a moment later; key 0's
                    // first fails there once.
                    let deferred = ctx.defer();
                    let fail = s.key == 0 && s.seq == 0 && ctx.attempt() == 1;
                    std::thread::spawn(move || {
                        std::thread::sleep(Duration::from_millis(1));
                        if fail {
                            deferred.fail(HandlerError::msg("later"));
                        } else {
                            deferred.succeed();
                        }
                    });
                }
                Ok(())
            },
        )
        .unwrap()
    };
    // A delayed event takes its place in its key's order when it falls due: published first,
    // due after the others, it runs last.
    bus.publish_with(
        Step {
            publisher: 0,
            key: 0,
            seq: 100,
        },
        Publish::keyed(0u64).delay(Duration::from_millis(300)),
    )
    .unwrap();
    publish_steps(&bus, 2, 0..30);
    bus.flush(WAIT).unwrap();
    let mut expected: Vec<u64> = vec![0];
    expected.extend(0..30);
    expected.push(100);
    assert_eq!(
        seqs_of(&seen, 0),
        expected,
        "seq 0 twice (its retry), the rest in order, 100 last"
    );
    assert_eq!(seqs_of(&seen, 1), (0..30).collect::<Vec<_>>());
    let stats = bus.stats();
    assert_eq!((stats.succeeded, stats.retried), (61, 1));
    // Waiting deliveries of an ended subscription are cancelled, and counted.
    for seq in 0..4 {
        bus.publish_with(
            Step {
                publisher: 1,
                key: 5,
                seq,
            },
            Publish::keyed(5u64),
        )
        .unwrap();
    }
    let started = std::time::Instant::now();
    while bus.metrics().handlers[0].parked < 3 {
        assert!(started.elapsed() < WAIT, "the later events never waited");
        std::thread::yield_now();
    }
    subscription.unsubscribe();
    release.send(()).unwrap();
    bus.flush(WAIT).unwrap();
    assert_eq!(seqs_of(&seen, 5), [0]);
    let stats = bus.stats();
    assert_eq!((stats.cancelled, stats.succeeded), (3, 62));
    assert!(bus.shutdown().unwrap().is_balanced());
}

#[test]
fn behind_a_circuit_breaker_each_key_keeps_its_order_with_every_attempt() {
    use microbus::CircuitBreaker;
    use std::sync::atomic::AtomicBool;
    let bus = Bus::builder()
        .workers(2)
        .retry(RetryPolicy::fixed(Duration::from_millis(2)).max_attempts(3))
        .build()
        .unwrap();
    let down = Arc::new(AtomicBool::new(true));
    let calls: Arc<Mutex<KeyCalls>> = Arc::default();
    {
        let (down, calls) = (down.clone(), calls.clone());
        bus.subscribe_with(
            SubscribeOptions::new().ordered().circuit_breaker(
                CircuitBreaker::new(3, Duration::from_millis(5))
                    .max_cool_down(Duration::from_millis(20)),
            ),
            move |s: &Step, ctx: &Context| -> HandlerResult {
                calls
                    .lock()
                    .unwrap()
                    .entry(s.key)
                    .or_default()
                    .push((s.seq, ctx.attempt()));
                if down.load(Ordering::SeqCst) {
                    return Err(HandlerError::msg("down"));
                }
                Ok(())
            },
        )
        .unwrap();
    }
    publish_steps(&bus, 8, 0..100);
    std::thread::sleep(Duration::from_millis(100));
    down.store(false, Ordering::SeqCst);
    publish_steps(&bus, 8, 100..200);
    bus.flush(WAIT).unwrap();
    let stats = bus.stats();
    assert_eq!(
        (stats.succeeded, stats.dead_lettered),
        (1_600, 0),
        "{stats:?}"
    );
    // Per key: seqs never go back, and a seq starts only after the one before succeeded (the
    // last call of a seq is its success: nothing was dead-lettered).
    for (key, seen) in calls.lock().unwrap().iter() {
        let mut successes = Vec::new();
        for pair in seen.windows(2) {
            let ((seq, _), (next, attempt)) = (pair[0], pair[1]);
            assert!(
                next == seq || (next > seq && attempt == 1),
                "key {key}: {seen:?}"
            );
            if next != seq {
                successes.push(seq);
            }
        }
        successes.push(seen.last().unwrap().0);
        assert_eq!(successes, (0..200).collect::<Vec<_>>(), "key {key}");
    }
    assert!(bus.shutdown().unwrap().is_balanced());
}

#[test]
fn waiting_deliveries_count_against_the_park_capacity() {
    let bus = Bus::builder().workers(1).build().unwrap();
    let (release, released) = crossbeam_channel::bounded::<()>(1);
    let handled = Arc::new(AtomicU64::new(0));
    {
        let handled = handled.clone();
        bus.subscribe_with(
            SubscribeOptions::new().ordered().park_capacity(10),
            move |s: &Step, ctx: &Context| -> HandlerResult {
                if s.seq == 0 {
                    // The head defers until released: the key's later events wait.
                    let (deferred, released) = (ctx.defer(), released.clone());
                    std::thread::spawn(move || {
                        let _ = released.recv();
                        deferred.succeed();
                    });
                }
                handled.fetch_add(1, Ordering::SeqCst);
                Ok(())
            },
        )
        .unwrap();
    }
    publish_steps(&bus, 1, 0..11);
    let started = std::time::Instant::now();
    while bus.metrics().handlers[0].parked < 10 {
        assert!(started.elapsed() < WAIT);
        std::thread::yield_now();
    }
    // Ten wait: the next publish is held back (a try gets it back).
    let back = bus.try_publish_with(
        Step {
            publisher: 0,
            key: 0,
            seq: 11,
        },
        Publish::keyed(0u64),
    );
    assert!(
        matches!(back, Err(microbus::TryPublishError::Full(_))),
        "{back:?}"
    );
    release.send(()).unwrap();
    bus.flush(WAIT).unwrap();
    assert_eq!(handled.load(Ordering::SeqCst), 11);
    assert!(bus.shutdown().unwrap().is_balanced());
}

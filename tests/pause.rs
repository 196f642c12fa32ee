//! Pause and resume: a paused subscription's deliveries park in order, spend no attempt, are
//! bounded by its park capacity where publishes are admitted, and are flushed, released,
//! cancelled or dead-lettered at shutdown exactly once.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Keyed, Numbered, WAIT, count};
use microbus::{
    Bus, Context, DeadLetterReason, HandlerError, HandlerResult, PublishTimeoutError, RetryPolicy,
    SubscribeOptions, TryPublishError,
};

const EVENTS: u64 = 10_000;
const KEYS: u64 = 64;

/// Waits until `counter` reaches `n`.
fn wait_until(counter: &AtomicU64, n: u64) {
    let start = Instant::now();
    while count(counter) < n {
        assert!(start.elapsed() < WAIT, "stuck at {} of {n}", count(counter));
        std::thread::yield_now();
    }
}

#[test]
fn a_pause_with_events_in_flight_parks_them_in_order_until_resume() {
    let bus = Arc::new(Bus::builder().workers(2).build().unwrap());
    // (key, seq, attempt) as the paused subscription saw them.
    let seen = Arc::new(Mutex::new(Vec::new()));
    let handled = Arc::new(AtomicU64::new(0));
    let paused = {
        let (seen, handled) = (seen.clone(), handled.clone());
        bus.subscribe_with(
            SubscribeOptions::new().named("paused"),
            move |k: &Keyed, ctx: &Context| -> HandlerResult {
                seen.lock().unwrap().push((k.key, k.seq, ctx.attempt()));
                handled.fetch_add(1, Ordering::SeqCst);
                Ok(())
            },
        )
        .unwrap()
    };
    let other = Arc::new(AtomicU64::new(0));
    {
        let other = other.clone();
        bus.subscribe(move |_: &Keyed, _: &Context| -> HandlerResult {
            other.fetch_add(1, Ordering::SeqCst);
            Ok(())
        })
        .unwrap();
    }
    let publisher = {
        let bus = bus.clone();
        std::thread::spawn(move || {
            for seq in 0..EVENTS {
                bus.publish_with(
                    Keyed {
                        key: seq % KEYS,
                        seq,
                    },
                    microbus::Publish::keyed(seq % KEYS),
                )
                .unwrap();
            }
        })
    };
    wait_until(&handled, 100);
    paused.pause();
    assert!(paused.is_paused());
    let before = count(&handled);
    publisher.join().unwrap();
    // The other subscription handles everything while the paused one handles nothing more.
    wait_until(&other, EVENTS);
    assert_eq!(count(&handled), before);
    assert!(before < EVENTS, "the pause came after the last event");
    let parked = EVENTS - before;
    let err = bus.flush(Duration::from_millis(20)).unwrap_err();
    let pending = err.pending().unwrap();
    assert_eq!(pending.parked.len(), 1);
    assert_eq!(
        (
            pending.parked[0].handler.as_str(),
            pending.parked[0].parked,
            pending.parked[0].paused
        ),
        ("paused", parked, true)
    );
    assert!(
        err.to_string()
            .contains(&format!("{parked} parked for paused")),
        "{err}"
    );
    let metrics = bus.metrics();
    let row = metrics
        .handlers
        .iter()
        .find(|h| h.handler == "paused")
        .unwrap();
    assert_eq!((row.paused, row.parked), (true, parked));
    assert!(metrics.to_string().contains("paused (paused)"));
    // A pause is someone's choice: reported, and the bus still ready.
    let health = bus.health();
    assert!(health.is_ready(), "{health}");
    assert_eq!((health.paused.len(), health.paused[0].parked), (1, parked));
    assert!(health.to_string().contains("paused ("), "{health}");
    paused.resume();
    bus.flush(WAIT).unwrap();
    assert_eq!(count(&handled), EVENTS);
    let seen = seen.lock().unwrap();
    // Every event once, at attempt 1, and each key's events in publish order.
    let mut by_key: HashMap<u64, Vec<u64>> = HashMap::new();
    for &(key, seq, attempt) in seen.iter() {
        assert_eq!(attempt, 1, "a parked delivery spends no attempt");
        by_key.entry(key).or_default().push(seq);
    }
    assert_eq!(by_key.len() as u64, KEYS);
    for (key, seqs) in &by_key {
        let expected: Vec<u64> = (0..EVENTS).filter(|s| s % KEYS == *key).collect();
        assert_eq!(seqs, &expected, "key {key}");
    }
    let stats = bus.stats();
    assert_eq!(
        (stats.succeeded, stats.failed, stats.in_flight),
        (2 * EVENTS, 0, 0)
    );
    assert_eq!(bus.metrics().handlers[0].parked, 0);
    drop(seen);
    assert!(bus.shutdown().unwrap().is_balanced());
}

#[test]
fn retries_that_fall_due_while_paused_park_without_spending_an_attempt() {
    let clock = microbus::testing::ManualClock::new();
    let bus = Bus::builder()
        .workers(2)
        .clock(&clock)
        .retry(RetryPolicy::fixed(Duration::from_millis(30)).max_attempts(2))
        .build()
        .unwrap();
    let attempts = Arc::new(Mutex::new(Vec::new()));
    let failed = Arc::new(AtomicU64::new(0));
    let subscription = {
        let (attempts, failed) = (attempts.clone(), failed.clone());
        bus.subscribe(move |n: &Numbered, ctx: &Context| -> HandlerResult {
            attempts.lock().unwrap().push((n.seq, ctx.attempt()));
            if ctx.attempt() == 1 {
                failed.fetch_add(1, Ordering::SeqCst);
                return Err(HandlerError::msg("once"));
            }
            Ok(())
        })
        .unwrap()
    };
    for seq in 0..200 {
        bus.publish(Numbered { publisher: 0, seq }).unwrap();
    }
    clock.advance(Duration::ZERO).unwrap();
    assert_eq!(count(&failed), 200);
    subscription.pause();
    // Every retry falls due and parks: nothing is outstanding but the parked ones.
    clock.advance(Duration::from_millis(30)).unwrap();
    assert_eq!(bus.metrics().handlers[0].parked, 200);
    assert_eq!(attempts.lock().unwrap().len(), 200);
    subscription.resume();
    bus.flush(WAIT).unwrap();
    let attempts = attempts.lock().unwrap();
    let mut seconds: Vec<u64> = attempts
        .iter()
        .filter(|(_, a)| *a == 2)
        .map(|(s, _)| *s)
        .collect();
    seconds.sort_unstable();
    assert_eq!(seconds, (0..200).collect::<Vec<_>>());
    assert_eq!(attempts.len(), 400);
    let stats = bus.stats();
    assert_eq!(
        (
            stats.failed,
            stats.retried,
            stats.succeeded,
            stats.dead_lettered
        ),
        (200, 200, 200, 0)
    );
    drop(attempts);
    assert!(bus.shutdown().unwrap().is_balanced());
}

#[test]
fn a_full_park_holds_publishers_back_in_a_block_lane() {
    let bus = Arc::new(Bus::builder().workers(2).build().unwrap());
    let handled = Arc::new(AtomicU64::new(0));
    let subscription = {
        let handled = handled.clone();
        bus.subscribe_with(
            SubscribeOptions::new().park_capacity(100),
            move |_: &Numbered, _: &Context| -> HandlerResult {
                handled.fetch_add(1, Ordering::SeqCst);
                Ok(())
            },
        )
        .unwrap()
    };
    subscription.pause();
    for seq in 0..100 {
        bus.publish(Numbered { publisher: 0, seq }).unwrap();
    }
    let start = Instant::now();
    while bus.metrics().handlers[0].parked < 100 {
        assert!(start.elapsed() < WAIT);
        std::thread::yield_now();
    }
    // Full: a try gets its event back, a timeout times out, a blocking publish waits.
    match bus.try_publish(Numbered {
        publisher: 1,
        seq: 0,
    }) {
        Err(TryPublishError::Full(back)) => assert_eq!(back.publisher, 1),
        other => panic!("{other:?}"),
    }
    match bus.publish_timeout(
        Numbered {
            publisher: 2,
            seq: 0,
        },
        Duration::from_millis(20),
    ) {
        Err(PublishTimeoutError::Timeout(back)) => assert_eq!(back.publisher, 2),
        other => panic!("{other:?}"),
    }
    let (done_tx, done) = crossbeam_channel::bounded::<()>(1);
    let blocked = {
        let bus = bus.clone();
        std::thread::spawn(move || {
            bus.publish(Numbered {
                publisher: 3,
                seq: 0,
            })
            .unwrap();
            done_tx.send(()).unwrap();
        })
    };
    assert!(
        done.recv_timeout(Duration::from_millis(50)).is_err(),
        "a blocking publish went past a full park"
    );
    subscription.resume();
    done.recv_timeout(WAIT).unwrap();
    blocked.join().unwrap();
    bus.flush(WAIT).unwrap();
    assert_eq!(count(&handled), 101);
    let stats = bus.stats();
    assert_eq!((stats.refused, stats.succeeded), (0, 101));
    assert!(
        Arc::try_unwrap(bus)
            .unwrap()
            .shutdown()
            .unwrap()
            .is_balanced()
    );
}

#[test]
fn shutdown_dead_letters_parked_deliveries_in_order_without_waiting_out_its_deadline() {
    let bus = Bus::builder()
        .workers(2)
        .shutdown_timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    let subscription = bus
        .subscribe(|_: &Keyed, _: &Context| -> HandlerResult { Ok(()) })
        .unwrap();
    subscription.pause();
    for seq in 0..500 {
        bus.publish_with(
            Keyed { key: seq % 8, seq },
            microbus::Publish::keyed(seq % 8),
        )
        .unwrap();
    }
    let report = bus.shutdown().unwrap();
    assert!(report.is_balanced(), "{report}");
    // Nothing else could have run: shutdown did not wait for its 20 s.
    assert!(report.elapsed < Duration::from_secs(10), "{report}");
    assert_eq!(
        (report.stats.dead_lettered, report.stats.succeeded),
        (500, 0)
    );
    let letters = bus.dead_letters().list();
    assert_eq!(letters.len(), 500);
    assert!(
        letters
            .iter()
            .all(|l| l.reason() == DeadLetterReason::Shutdown && l.attempts() == 0)
    );
    // Each key's letters in publish order, so that a redrive replays them in order.
    let mut by_key: HashMap<u64, Vec<u64>> = HashMap::new();
    for letter in &letters {
        let event: Keyed = serde_json::from_str(letter.payload_json()).unwrap();
        by_key.entry(event.key).or_default().push(event.seq);
    }
    for (key, seqs) in by_key {
        let expected: Vec<u64> = (0..500).filter(|s| s % 8 == key).collect();
        assert_eq!(seqs, expected, "key {key}");
    }
}

#[test]
fn unsubscribing_a_paused_subscription_cancels_what_it_parked() {
    let bus = Bus::builder().workers(2).build().unwrap();
    let subscription = bus
        .subscribe(|_: &Numbered, _: &Context| -> HandlerResult { Ok(()) })
        .unwrap();
    subscription.pause();
    for seq in 0..300 {
        bus.publish(Numbered { publisher: 0, seq }).unwrap();
    }
    subscription.unsubscribe();
    bus.flush(WAIT).unwrap();
    let stats = bus.stats();
    assert_eq!((stats.cancelled, stats.succeeded), (300, 0));
    assert_eq!(subscription.stats().cancelled, 300);
    // Pausing or resuming an ended subscription does nothing.
    subscription.pause();
    assert!(!subscription.is_paused());
    subscription.resume();
    assert!(bus.shutdown().unwrap().is_balanced());
}

#[test]
fn pause_returns_once_no_call_of_the_handler_runs() {
    let bus = Arc::new(Bus::builder().workers(2).build().unwrap());
    let (release, released) = crossbeam_channel::bounded::<()>(0);
    let (entered_tx, entered) = crossbeam_channel::bounded::<()>(1);
    let subscription = Arc::new(
        bus.subscribe(move |n: &Numbered, _: &Context| -> HandlerResult {
            if n.seq == 0 {
                entered_tx.send(()).unwrap();
                released.recv().unwrap();
            }
            Ok(())
        })
        .unwrap(),
    );
    bus.publish(Numbered {
        publisher: 0,
        seq: 0,
    })
    .unwrap();
    entered.recv_timeout(WAIT).unwrap();
    let (paused_tx, paused) = crossbeam_channel::bounded::<()>(1);
    let pauser = {
        let subscription = subscription.clone();
        std::thread::spawn(move || {
            subscription.pause();
            paused_tx.send(()).unwrap();
        })
    };
    assert!(
        paused.recv_timeout(Duration::from_millis(50)).is_err(),
        "pause returned while the handler ran"
    );
    release.send(()).unwrap();
    paused.recv_timeout(WAIT).unwrap();
    pauser.join().unwrap();
    bus.publish(Numbered {
        publisher: 0,
        seq: 1,
    })
    .unwrap();
    subscription.resume();
    bus.flush(WAIT).unwrap();
    assert_eq!(bus.stats().succeeded, 2);
}

#[test]
fn a_full_park_sheds_publishes_in_a_shed_lane_but_keeps_what_handlers_publish() {
    use microbus::{Backpressure, Lane};
    let bus = Bus::builder()
        .workers(1)
        .lane("mail", Lane::new(1).backpressure(Backpressure::Shed))
        .build()
        .unwrap();
    let mailed = Arc::new(Mutex::new(Vec::new()));
    let mailer = {
        let mailed = mailed.clone();
        bus.subscribe_with(
            SubscribeOptions::new()
                .named("mailer")
                .lane("mail")
                .park_capacity(50),
            move |n: &Numbered, _: &Context| -> HandlerResult {
                mailed.lock().unwrap().push((n.publisher, n.seq));
                Ok(())
            },
        )
        .unwrap()
    };
    // A handler on the default lane that publishes into the mailer's lane.
    bus.subscribe(|k: &Keyed, ctx: &Context| -> HandlerResult {
        ctx.publish(Numbered {
            publisher: 9,
            seq: k.seq,
        })?;
        Ok(())
    })
    .unwrap();
    mailer.pause();
    for seq in 0..200 {
        // Never waits: the lane sheds.
        bus.try_publish(Numbered { publisher: 0, seq }).unwrap();
    }
    let settled = |bus: &Bus| {
        let m = bus.metrics();
        m.handlers[0].parked + m.lanes[1].shed
    };
    let start = Instant::now();
    while settled(&bus) < 200 {
        assert!(start.elapsed() < WAIT);
        std::thread::yield_now();
    }
    assert_eq!(
        (
            bus.metrics().handlers[0].parked,
            bus.metrics().lanes[1].shed
        ),
        (50, 150)
    );
    // What a handler publishes is accepted work: it parks past the capacity.
    for seq in 0..20 {
        bus.publish(Keyed { key: 0, seq }).unwrap();
    }
    while bus.metrics().handlers[0].parked < 70 {
        assert!(start.elapsed() < WAIT);
        std::thread::yield_now();
    }
    mailer.resume();
    bus.flush(WAIT).unwrap();
    let mailed = mailed.lock().unwrap().clone();
    let expected: Vec<(u32, u64)> = (0..50)
        .map(|seq| (0, seq))
        .chain((0..20).map(|seq| (9, seq)))
        .collect();
    assert_eq!(mailed, expected);
    let letters = bus.dead_letters().list();
    assert_eq!(letters.len(), 150);
    assert!(
        letters
            .iter()
            .all(|l| l.reason() == DeadLetterReason::Shed && l.handler() == "mailer")
    );
    let report = bus.shutdown().unwrap();
    assert!(report.is_balanced(), "{report}");
    assert_eq!(report.lanes[1].shed, 150);
}

#[test]
fn pausing_again_while_parked_deliveries_are_released_keeps_each_key_in_order() {
    for _round in 0..8 {
        let bus = Arc::new(Bus::builder().workers(2).build().unwrap());
        let seen: Arc<Mutex<HashMap<u64, Vec<u64>>>> = Arc::default();
        let subscription = {
            let seen = seen.clone();
            bus.subscribe(move |k: &Keyed, _: &Context| -> HandlerResult {
                seen.lock().unwrap().entry(k.key).or_default().push(k.seq);
                Ok(())
            })
            .unwrap()
        };
        let publisher = {
            let bus = bus.clone();
            std::thread::spawn(move || {
                for seq in 0..EVENTS {
                    bus.publish_with(
                        Keyed { key: seq % 8, seq },
                        microbus::Publish::keyed(seq % 8),
                    )
                    .unwrap();
                }
            })
        };
        // Pauses and resumes back to back: some land while a worker releases what it
        // parked.
        while !publisher.is_finished() {
            subscription.pause();
            std::thread::yield_now();
            subscription.resume();
        }
        publisher.join().unwrap();
        subscription.resume();
        bus.flush(WAIT).unwrap();
        for (key, seqs) in seen.lock().unwrap().iter() {
            let expected: Vec<u64> = (0..EVENTS).filter(|s| s % 8 == *key).collect();
            assert_eq!(seqs, &expected, "key {key}");
        }
    }
}

//! Batch subscriptions: one call per message, each event settled once; a failed batch runs its
//! events one by one, so that a poison event is dead-lettered alone.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Keyed, Numbered, WAIT};
use microbus::testing::ManualClock;
use microbus::{
    Batch, BreakerState, Bus, CircuitBreaker, Context, DeadLetterReason, HandlerError,
    HandlerResult, Publish, RetryPolicy, SubscribeError, SubscribeOptions,
};

/// Every call a batch handler got: the (key, seq) of its events, and the attempt.
type Calls = Arc<Mutex<Vec<(Vec<(u64, u64)>, u32)>>>;

fn keyed_batch(bus: &Bus, keys: u64, per_key: u64) {
    let mut items = Vec::new();
    for seq in 0..per_key {
        for key in 0..keys {
            items.push((Keyed { key, seq }, Publish::new().key(key)));
        }
    }
    bus.publish_batch_with(items).unwrap();
}

#[test]
fn one_call_per_message_settles_each_event_once_in_per_key_order() {
    let bus = Bus::builder().workers(2).build().unwrap();
    let calls: Calls = Arc::default();
    {
        let calls = calls.clone();
        bus.subscribe_batch(
            move |batch: &Batch<Keyed>, ctx: &Context| -> HandlerResult {
                assert_eq!(batch.iter().len(), batch.len());
                let seen = batch.events().map(|k| (k.key, k.seq)).collect();
                calls.lock().unwrap().push((seen, ctx.attempt()));
                Ok(())
            },
        )
        .unwrap();
    }
    let plain = Arc::new(AtomicU64::new(0));
    {
        let plain = plain.clone();
        bus.subscribe(move |_: &Keyed, _: &Context| -> HandlerResult {
            plain.fetch_add(1, Ordering::SeqCst);
            Ok(())
        })
        .unwrap();
    }
    keyed_batch(&bus, 8, 250);
    // Single publishes reach it as batches of one.
    for seq in 250..260 {
        bus.publish_with(Keyed { key: 0, seq }, Publish::new().key(0))
            .unwrap();
    }
    bus.flush(WAIT).unwrap();
    let calls = calls.lock().unwrap();
    let events: usize = calls.iter().map(|(c, _)| c.len()).sum();
    assert_eq!(events, 2_010);
    assert!(
        calls
            .iter()
            .all(|(c, attempt)| *attempt == 1 && c.len() <= 64)
    );
    assert!(calls.len() <= 2_000 / 8 + 20, "{} calls", calls.len());
    assert_eq!(calls.iter().filter(|(c, _)| c.len() == 1).count(), 10);
    let mut last: HashMap<u64, u64> = HashMap::new();
    let mut once = std::collections::HashSet::new();
    for (call, _) in calls.iter() {
        for &(key, seq) in call {
            assert!(once.insert((key, seq)), "{key}/{seq} twice");
            if let Some(&before) = last.get(&key) {
                assert!(seq > before, "key {key}: {seq} after {before}");
            }
            last.insert(key, seq);
        }
    }
    assert_eq!(plain.load(Ordering::SeqCst), 2_010);
    let stats = bus.stats();
    assert_eq!(
        (stats.succeeded, stats.delivered, stats.failed),
        (4_020, 4_020, 0)
    );
    let metrics = bus.metrics();
    let batched = metrics
        .handlers
        .iter()
        .find(|h| h.succeeded == 2_010)
        .unwrap();
    assert_eq!(batched.delivered, 2_010);
    drop(calls);
    assert!(bus.shutdown().unwrap().is_balanced());
}

#[test]
fn a_failed_batch_runs_its_events_one_by_one_and_dead_letters_the_poison_alone() {
    let clock = ManualClock::new();
    let bus = Bus::builder()
        .workers(1)
        .clock(&clock)
        .retry(RetryPolicy::fixed(Duration::from_secs(1)).max_attempts(3))
        .build()
        .unwrap();
    let calls: Calls = Arc::default();
    {
        let calls = calls.clone();
        bus.subscribe_batch(
            move |batch: &Batch<Numbered>, ctx: &Context| -> HandlerResult {
                let seen: Vec<(u64, u64)> = batch.events().map(|n| (0, n.seq)).collect();
                calls.lock().unwrap().push((seen, ctx.attempt()));
                if batch.events().any(|n| n.seq == 13) {
                    return Err(HandlerError::msg("poison"));
                }
                Ok(())
            },
        )
        .unwrap();
    }
    bus.publish_batch((0..40).map(|seq| Numbered { publisher: 0, seq }))
        .unwrap();
    clock.advance(Duration::from_secs(10)).unwrap();
    bus.flush(WAIT).unwrap();
    let calls = calls.lock().unwrap();
    // The batch of 40 failed; then 40 calls of one as first attempts; then the poison's two
    // retries.
    assert_eq!(calls[0].0.len(), 40);
    assert_eq!(calls.len(), 1 + 40 + 2);
    assert!(calls[1..].iter().all(|(c, _)| c.len() == 1));
    let ones: Vec<u64> = calls[1..41].iter().map(|(c, _)| c[0].1).collect();
    assert_eq!(ones, (0..40).collect::<Vec<_>>(), "one by one, in order");
    assert!(calls[1..41].iter().all(|(_, attempt)| *attempt == 1));
    assert_eq!(
        calls[41..]
            .iter()
            .map(|(c, a)| (c[0].1, *a))
            .collect::<Vec<_>>(),
        [(13, 2), (13, 3)]
    );
    let letters = bus.dead_letters().list();
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].attempts(), 3);
    assert_eq!(letters[0].reason(), DeadLetterReason::RetriesExhausted);
    let stats = bus.stats();
    assert_eq!(
        (
            stats.succeeded,
            stats.failed,
            stats.retried,
            stats.dead_lettered
        ),
        (39, 3, 2, 1)
    );
    drop(calls);
    assert!(bus.shutdown().unwrap().is_balanced());
}

#[test]
fn a_failed_batch_counts_one_breaker_failure_and_its_events_then_park() {
    let clock = ManualClock::new();
    let bus = Bus::builder().workers(1).clock(&clock).build().unwrap();
    let calls = Arc::new(AtomicU64::new(0));
    {
        let calls = calls.clone();
        bus.subscribe_batch_with(
            SubscribeOptions::new()
                .circuit_breaker(CircuitBreaker::new(1, Duration::from_secs(60))),
            move |batch: &Batch<Numbered>, _: &Context| -> HandlerResult {
                calls.fetch_add(1, Ordering::SeqCst);
                if batch.len() > 1 {
                    return Err(HandlerError::msg("down"));
                }
                Ok(())
            },
        )
        .unwrap();
    }
    bus.publish_batch((0..10).map(|seq| Numbered { publisher: 0, seq }))
        .unwrap();
    clock.advance(Duration::ZERO).unwrap();
    // One failure opened it: the ten events park, none ran alone.
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    let handler = bus.metrics().handlers[0].clone();
    assert_eq!(handler.breaker, Some(BreakerState::Open));
    assert_eq!((handler.parked, handler.failed), (10, 0));
    // The cool-down ends: the probe (one event) succeeds and the rest follow one by one.
    clock.advance(Duration::from_secs(60)).unwrap();
    bus.flush(WAIT).unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 11);
    assert_eq!(bus.stats().succeeded, 10);
    assert!(bus.shutdown().unwrap().is_balanced());
}

#[test]
fn a_batch_handler_blocked_past_the_shutdown_deadline_leaves_the_books_balanced() {
    let bus = Bus::builder()
        .workers(1)
        .shutdown_timeout(Duration::from_millis(50))
        .build()
        .unwrap();
    let (entered_tx, entered) = crossbeam_channel::bounded::<()>(1);
    let (release, released) = crossbeam_channel::bounded::<()>(1);
    bus.subscribe_batch(move |_: &Batch<Numbered>, _: &Context| -> HandlerResult {
        let _ = entered_tx.try_send(());
        let _ = released.recv();
        Ok(())
    })
    .unwrap();
    bus.subscribe(|_: &Numbered, _: &Context| -> HandlerResult { Ok(()) })
        .unwrap();
    bus.publish_batch((0..30).map(|seq| Numbered { publisher: 0, seq }))
        .unwrap();
    entered.recv_timeout(WAIT).unwrap();
    let report = bus.shutdown().unwrap();
    drop(release);
    assert!(report.is_balanced(), "{report}");
    let s = &report.stats;
    assert_eq!(s.delivered, 60);
    assert_eq!((s.abandoned, s.left), (1, 59), "{report}");
}

#[test]
fn ordered_batch_subscriptions_are_refused() {
    let bus = Bus::builder().workers(1).build().unwrap();
    let err = bus
        .subscribe_batch_with(
            SubscribeOptions::new().ordered(),
            |_: &Batch<Numbered>, _: &Context| -> HandlerResult { Ok(()) },
        )
        .unwrap_err();
    assert!(
        matches!(
            err,
            SubscribeError::Invalid {
                option: "ordered",
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn a_batch_handler_publishes_about_each_event_and_its_calls_are_timed() {
    let bus = Bus::builder()
        .workers(1)
        .metrics_sample_every(1)
        .build()
        .unwrap();
    let calls = Arc::new(AtomicU64::new(0));
    {
        let calls = calls.clone();
        bus.service("audit")
            .unwrap()
            .subscribe_batch(
                move |batch: &Batch<Numbered>, ctx: &Context| -> HandlerResult {
                    calls.fetch_add(1, Ordering::SeqCst);
                    for (envelope, n) in batch.iter() {
                        ctx.publish_with(
                            Keyed { key: n.seq, seq: 0 },
                            Publish::new().caused_by(envelope),
                        )?;
                    }
                    Ok(())
                },
            )
            .unwrap();
    }
    let follow_ups = bus.record::<Keyed>();
    let ids: Vec<_> = (0..100)
        .map(|seq| Numbered { publisher: 0, seq })
        .collect::<Vec<_>>();
    bus.publish_batch(ids).unwrap();
    bus.flush(WAIT).unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 2, "64 and 36");
    let recorded = follow_ups.recorded();
    assert_eq!(recorded.len(), 100);
    for (k, envelope) in &recorded {
        assert_eq!(envelope.source(), "audit");
        assert!(envelope.causation_id().is_some());
        assert_eq!(
            Some(envelope.correlation_id()),
            envelope.causation_id(),
            "{k:?}"
        );
    }
    let causes: std::collections::HashSet<_> =
        recorded.iter().map(|(_, e)| e.causation_id()).collect();
    assert_eq!(causes.len(), 100, "each names its own event");
    let handler = bus.metrics().handlers[0].clone();
    assert_eq!((handler.delivered, handler.succeeded), (100, 100));
    assert_eq!(handler.handler_time.count, 2, "one timing a call");
}

#[test]
fn a_paused_batch_subscription_parks_each_event_and_runs_them_after_resume() {
    let bus = Bus::builder().workers(1).build().unwrap();
    let sizes = Arc::new(Mutex::new(Vec::new()));
    let subscription = {
        let sizes = sizes.clone();
        bus.subscribe_batch(move |batch: &Batch<Keyed>, _: &Context| -> HandlerResult {
            sizes
                .lock()
                .unwrap()
                .push(batch.events().map(|k| k.seq).collect::<Vec<_>>());
            Ok(())
        })
        .unwrap()
    };
    subscription.pause();
    keyed_batch(&bus, 1, 50);
    let start = std::time::Instant::now();
    while bus.metrics().handlers[0].parked < 50 {
        assert!(start.elapsed() < WAIT, "never parked");
        std::thread::yield_now();
    }
    assert!(sizes.lock().unwrap().is_empty());
    subscription.resume();
    bus.flush(WAIT).unwrap();
    let sizes = sizes.lock().unwrap();
    let seqs: Vec<u64> = sizes.iter().flatten().copied().collect();
    assert_eq!(seqs, (0..50).collect::<Vec<_>>());
    assert!(sizes.iter().all(|s| s.len() == 1));
    assert_eq!(bus.stats().succeeded, 50);
}

#[test]
fn a_batch_that_defers_runs_its_events_one_by_one_where_each_may_defer() {
    let bus = Bus::builder().workers(1).build().unwrap();
    let sizes = Arc::new(Mutex::new(Vec::new()));
    {
        let sizes = sizes.clone();
        bus.subscribe_batch(
            move |batch: &Batch<Numbered>, ctx: &Context| -> HandlerResult {
                sizes.lock().unwrap().push(batch.len());
                ctx.defer().succeed();
                Ok(())
            },
        )
        .unwrap();
    }
    bus.publish_batch((0..5).map(|seq| Numbered { publisher: 0, seq }))
        .unwrap();
    bus.flush(WAIT).unwrap();
    assert_eq!(*sizes.lock().unwrap(), [5, 1, 1, 1, 1, 1]);
    let stats = bus.stats();
    assert_eq!((stats.succeeded, stats.failed), (5, 0));
    assert!(bus.shutdown().unwrap().is_balanced());
}

static DROPPED: AtomicU64 = AtomicU64::new(0);

#[derive(serde::Serialize, serde::Deserialize)]
struct Dropped(u64);

impl microbus::Event for Dropped {
    const NAME: &'static str = "Dropped";
}

impl Drop for Dropped {
    fn drop(&mut self) {
        DROPPED.fetch_add(1, Ordering::SeqCst);
    }
}

#[test]
fn events_only_batch_subscriptions_take_are_dropped_once_each() {
    let bus = Bus::builder().workers(1).build().unwrap();
    let seen = Arc::new(AtomicU64::new(0));
    {
        let seen = seen.clone();
        bus.subscribe_batch(
            move |batch: &Batch<Dropped>, _: &Context| -> HandlerResult {
                seen.fetch_add(batch.events().map(|d| d.0).sum::<u64>(), Ordering::SeqCst);
                Ok(())
            },
        )
        .unwrap();
    }
    bus.publish_batch((0..100).map(Dropped)).unwrap();
    bus.flush(WAIT).unwrap();
    assert_eq!(seen.load(Ordering::SeqCst), 4_950);
    assert_eq!(DROPPED.load(Ordering::SeqCst), 100);
    assert!(bus.shutdown().unwrap().is_balanced());
    assert_eq!(DROPPED.load(Ordering::SeqCst), 100);
}

static DROPS: AtomicU64 = AtomicU64::new(0);

/// An event whose `Drop` panics when its number is a multiple of 32.
#[derive(serde::Serialize, serde::Deserialize)]
struct Brittle(u64);

impl microbus::Event for Brittle {
    const NAME: &'static str = "Brittle";
}

impl Drop for Brittle {
    fn drop(&mut self) {
        DROPS.fetch_add(1, Ordering::SeqCst);
        if self.0.is_multiple_of(32) {
            panic!("brittle {}", self.0);
        }
    }
}

#[test]
fn events_whose_drop_panics_twice_in_one_message_are_each_dropped_once_and_counted() {
    let bus = Bus::builder().workers(1).build().unwrap();
    let seen = Arc::new(AtomicU64::new(0));
    {
        let seen = seen.clone();
        bus.subscribe_batch(
            move |batch: &Batch<Brittle>, _: &Context| -> HandlerResult {
                seen.fetch_add(batch.len() as u64, Ordering::SeqCst);
                Ok(())
            },
        )
        .unwrap();
    }
    // Twenty messages of 64 events (each with two that panic as they drop): the worker's
    // emptied buffers go back to the publisher and carry the next messages.
    for round in 0..20 {
        bus.publish_batch((round * 64..(round + 1) * 64).map(Brittle))
            .unwrap();
    }
    bus.flush(WAIT).unwrap();
    assert_eq!(seen.load(Ordering::SeqCst), 1_280);
    assert_eq!(DROPS.load(Ordering::SeqCst), 1_280);
    assert_eq!(bus.stats().callback_panics.drop, 40);
    assert!(bus.shutdown().unwrap().is_balanced());
}

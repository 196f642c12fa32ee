//! Durations never panic: every method that takes a `Duration` accepts anything up to
//! `Duration::MAX` ("for ever"), and retry policies saturate instead of overflowing.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{FollowUp, Numbered, WAIT, count};
use microbus::{Bus, Context, HandlerError, HandlerResult, Publish, RetryPolicy};

fn numbered(seq: u64) -> Numbered {
    Numbered { publisher: 0, seq }
}

#[test]
fn an_event_delayed_for_ever_waits_on_the_timer_until_shutdown() {
    let bus = Bus::builder().workers(1).build().unwrap();
    let handled = Arc::new(AtomicU64::new(0));
    {
        let handled = handled.clone();
        bus.subscribe(move |_: &Numbered, _: &Context| -> HandlerResult {
            handled.fetch_add(1, Ordering::SeqCst);
            Ok(())
        })
        .unwrap();
    }
    bus.publish_with(numbered(0), Publish::new().delay(Duration::MAX))
        .unwrap();
    bus.publish_with(numbered(1), Publish::keyed(1u64).delay(Duration::MAX))
        .unwrap();
    // The bus goes on working around it.
    bus.publish(numbered(2)).unwrap();
    let error = bus.flush(Duration::from_millis(50)).unwrap_err();
    assert_eq!(error.pending().unwrap().waiting, 2, "{error}");
    assert_eq!(count(&handled), 1);
    let report = bus.shutdown_timeout(Duration::from_millis(100)).unwrap();
    assert!(report.is_balanced(), "{report}");
    assert_eq!(report.stats.delivered, 3);
    assert_eq!(report.stats.succeeded, 1);
    assert_eq!(report.stats.left, 2);
}

#[test]
fn a_handler_delaying_for_ever_keeps_its_worker() {
    let bus = Bus::builder().workers(1).build().unwrap();
    let followed = Arc::new(AtomicU64::new(0));
    bus.subscribe(|e: &Numbered, ctx: &Context| -> HandlerResult {
        ctx.publish_with(
            FollowUp {
                parent: e.seq,
                index: 0,
            },
            Publish::new().delay(Duration::MAX),
        )?;
        Ok(())
    })
    .unwrap();
    {
        let followed = followed.clone();
        bus.subscribe(move |_: &FollowUp, _: &Context| -> HandlerResult {
            followed.fetch_add(1, Ordering::SeqCst);
            Ok(())
        })
        .unwrap();
    }
    for seq in 0..10 {
        bus.publish(numbered(seq)).unwrap();
    }
    // The worker is alive: each of the ten handlers ran and staged its follow-up.
    let deadline = Instant::now() + WAIT;
    while bus.stats().succeeded < 10 {
        assert!(Instant::now() < deadline, "{:?}", bus.stats());
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(
        bus.flush(Duration::from_millis(20))
            .unwrap_err()
            .pending()
            .unwrap()
            .waiting,
        10
    );
    let report = bus.shutdown_timeout(Duration::from_millis(100)).unwrap();
    assert!(report.is_balanced(), "{report}");
    assert_eq!(report.stats.succeeded, 10);
    assert_eq!(report.stats.left, 10);
    assert_eq!(count(&followed), 0);
}

#[test]
fn waits_and_timeouts_accept_the_longest_duration() {
    let bus = Bus::builder().workers(1).build().unwrap();
    bus.subscribe(|_: &Numbered, _: &Context| -> HandlerResult { Ok(()) })
        .unwrap();
    let tracker = bus
        .publish_with(numbered(0), Publish::new().tracked())
        .unwrap();
    assert_eq!(tracker.wait(Duration::MAX).unwrap().succeeded, 1);
    // A tracker that completes later wakes its waiter.
    let tracker = bus
        .publish_with(numbered(1), Publish::new().tracked())
        .unwrap();
    let waiter = std::thread::spawn(move || tracker.wait(Duration::MAX));
    assert_eq!(waiter.join().unwrap().unwrap().succeeded, 1);
    bus.publish_timeout(numbered(2), Duration::MAX).unwrap();
    bus.flush(Duration::MAX).unwrap();
    let report = bus.shutdown_timeout(Duration::MAX).unwrap();
    assert!(report.is_balanced(), "{report}");
    assert_eq!(report.stats.succeeded, 3);
}

#[test]
fn a_retry_delayed_for_ever_is_dead_lettered_at_shutdown() {
    let bus = Bus::builder()
        .workers(1)
        .retry(RetryPolicy::fixed(Duration::MAX).jitter(0.5))
        .build()
        .unwrap();
    bus.subscribe(|_: &Numbered, _: &Context| -> HandlerResult { Err(HandlerError::msg("no")) })
        .unwrap();
    bus.publish(numbered(0)).unwrap();
    let deadline = Instant::now() + WAIT;
    while bus.stats().retried < 1 {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(1));
    }
    let report = bus.shutdown_timeout(Duration::from_millis(100)).unwrap();
    assert!(report.is_balanced(), "{report}");
    assert_eq!(report.stats.dead_lettered, 1);
    assert_eq!(bus.dead_letters().list()[0].errors(), ["no"]);
}

#[test]
fn exponential_growth_saturates_on_the_workers() {
    // 0 × ∞ and 10^310 used to panic on the worker (NaN, overflow) and kill it.
    for policy in [
        RetryPolicy::exponential(Duration::ZERO)
            .factor(1e300)
            .max_attempts(microbus::MAX_ATTEMPTS),
        RetryPolicy::exponential(Duration::from_nanos(1))
            .factor(10.0)
            .max_delay(Duration::from_nanos(1))
            .max_attempts(microbus::MAX_ATTEMPTS),
    ] {
        let bus = Bus::builder().workers(1).retry(policy).build().unwrap();
        bus.subscribe(|_: &Numbered, ctx: &Context| -> HandlerResult {
            if ctx.attempt() < 400 {
                return Err(HandlerError::msg("not yet"));
            }
            Ok(())
        })
        .unwrap();
        bus.publish(numbered(0)).unwrap();
        bus.flush(WAIT).unwrap();
        let stats = bus.stats();
        assert_eq!(stats.succeeded, 1, "{stats:?}");
        assert_eq!(stats.failed, 399);
        assert_eq!(stats.retried, 399);
        assert!(bus.shutdown().unwrap().is_balanced());
    }
}

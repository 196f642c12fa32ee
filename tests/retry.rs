//! Retries: a failed delivery is tried again alone, after its delay, up to its attempts.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{FollowUp, Numbered, WAIT, count};
use microbus::{
    Bus, Context, HandlerError, HandlerResult, Publish, RetryPolicy, SubscribeError,
    SubscribeOptions,
};

const MS: Duration = Duration::from_millis(1);

fn fast(attempts: u32) -> RetryPolicy {
    RetryPolicy::fixed(MS).max_attempts(attempts)
}

#[test]
fn a_handler_that_fails_twice_succeeds_on_attempt_three_and_its_sibling_runs_once() {
    let bus = Bus::builder().workers(2).retry(fast(4)).build().unwrap();
    let attempts = Arc::new(Mutex::new(Vec::new()));
    let sibling = Arc::new(AtomicU64::new(0));
    {
        let attempts = attempts.clone();
        bus.subscribe(move |_: &Numbered, ctx: &Context| -> HandlerResult {
            attempts.lock().unwrap().push(ctx.attempt());
            if ctx.attempt() < 3 {
                return Err(HandlerError::msg("not yet"));
            }
            Ok(())
        })
        .unwrap();
        let sibling = sibling.clone();
        bus.subscribe(move |_: &Numbered, _: &Context| -> HandlerResult {
            sibling.fetch_add(1, Ordering::SeqCst);
            Ok(())
        })
        .unwrap();
    }
    bus.publish(Numbered {
        publisher: 0,
        seq: 0,
    })
    .unwrap();
    bus.flush(WAIT).unwrap();
    assert_eq!(*attempts.lock().unwrap(), vec![1, 2, 3]);
    assert_eq!(count(&sibling), 1);
    let stats = bus.stats();
    assert_eq!((stats.delivered, stats.succeeded), (2, 2));
    assert_eq!(
        (stats.failed, stats.retried, stats.dead_lettered),
        (2, 2, 0)
    );
    assert!(stats.is_balanced());
}

#[test]
fn retries_run_out_and_permanent_errors_are_not_retried() {
    let bus = Bus::builder().workers(1).build().unwrap();
    let always = bus
        .subscribe_with(
            SubscribeOptions::new().retry(fast(3)),
            |_: &Numbered, _: &Context| -> HandlerResult { Err(HandlerError::msg("down")) },
        )
        .unwrap();
    let permanent = bus
        .subscribe_with(
            SubscribeOptions::new().retry(fast(3)),
            |_: &Numbered, _: &Context| -> HandlerResult {
                Err(HandlerError::permanent(HandlerError::msg("bad card")))
            },
        )
        .unwrap();
    bus.publish(Numbered {
        publisher: 0,
        seq: 0,
    })
    .unwrap();
    bus.flush(WAIT).unwrap();
    assert_eq!(always.stats().failed, 3);
    assert_eq!(permanent.stats().failed, 1);
    let stats = bus.stats();
    assert_eq!(
        (stats.failed, stats.retried, stats.dead_lettered),
        (4, 2, 2)
    );
    assert!(stats.is_balanced());
}

#[test]
fn a_retry_never_runs_before_its_delay() {
    let delay = Duration::from_millis(30);
    let bus = Bus::builder()
        .workers(1)
        .retry(RetryPolicy::exponential(delay).max_attempts(3))
        .build()
        .unwrap();
    let times = Arc::new(Mutex::new(Vec::new()));
    {
        let times = times.clone();
        bus.subscribe(move |_: &Numbered, _: &Context| -> HandlerResult {
            times.lock().unwrap().push(Instant::now());
            Err(HandlerError::msg("again"))
        })
        .unwrap();
    }
    bus.publish(Numbered {
        publisher: 0,
        seq: 0,
    })
    .unwrap();
    bus.flush(WAIT).unwrap();
    let times = times.lock().unwrap();
    assert_eq!(times.len(), 3);
    assert!(times[1] - times[0] >= delay, "{:?}", times[1] - times[0]);
    assert!(
        times[2] - times[1] >= 2 * delay,
        "{:?}",
        times[2] - times[1]
    );
}

#[test]
fn a_retried_handler_publishes_its_follow_ups_once() {
    let bus = Bus::builder().workers(2).retry(fast(5)).build().unwrap();
    let follow_ups = Arc::new(AtomicU64::new(0));
    {
        let follow_ups = follow_ups.clone();
        bus.subscribe(move |_: &FollowUp, _: &Context| -> HandlerResult {
            follow_ups.fetch_add(1, Ordering::SeqCst);
            Ok(())
        })
        .unwrap();
    }
    bus.subscribe(|e: &Numbered, ctx: &Context| -> HandlerResult {
        ctx.publish(FollowUp {
            parent: e.seq,
            index: 0,
        })?;
        if ctx.attempt() < 4 {
            return Err(HandlerError::msg("flaky"));
        }
        Ok(())
    })
    .unwrap();
    for seq in 0..50 {
        bus.publish(Numbered { publisher: 0, seq }).unwrap();
    }
    bus.flush(WAIT).unwrap();
    assert_eq!(count(&follow_ups), 50);
    let stats = bus.stats();
    assert_eq!((stats.retried, stats.succeeded), (150, 100));
}

#[test]
fn flush_waits_for_retries_and_says_when_the_next_is_due() {
    let bus = Bus::builder()
        .workers(1)
        .retry(RetryPolicy::fixed(Duration::from_secs(60)).max_attempts(2))
        .shutdown_timeout(Duration::from_millis(20))
        .build()
        .unwrap();
    bus.subscribe(|_: &Numbered, _: &Context| -> HandlerResult { Err(HandlerError::msg("no")) })
        .unwrap();
    bus.publish(Numbered {
        publisher: 0,
        seq: 0,
    })
    .unwrap();
    let err = bus.flush(Duration::from_millis(50)).unwrap_err();
    let pending = err.pending().unwrap();
    assert_eq!(
        (pending.queued, pending.running, pending.waiting),
        (0, 0, 1)
    );
    assert!(
        pending
            .next_due_in
            .is_some_and(|d| d > Duration::from_secs(50))
    );
    // At shutdown the retry not yet due is given up, and counted.
    let report = bus.shutdown().unwrap();
    assert!(report.deadline_passed);
    assert_eq!((report.stats.delivered, report.stats.dead_lettered), (1, 1));
    assert_eq!(report.stats.retried, 1);
    assert!(report.is_balanced(), "{report}");
}

#[test]
fn a_retry_for_a_subscription_that_ended_is_cancelled() {
    let clock = microbus::testing::ManualClock::new();
    let bus = Bus::builder()
        .workers(1)
        .clock(&clock)
        .retry(RetryPolicy::fixed(Duration::from_millis(100)).max_attempts(2))
        .build()
        .unwrap();
    let (failed_tx, failed_rx) = crossbeam_channel::bounded(1);
    let sub = bus
        .subscribe(move |_: &Numbered, _: &Context| -> HandlerResult {
            let _ = failed_tx.try_send(());
            Err(HandlerError::msg("no"))
        })
        .unwrap();
    bus.publish(Numbered {
        publisher: 0,
        seq: 0,
    })
    .unwrap();
    clock.advance(Duration::ZERO).unwrap();
    failed_rx.try_recv().unwrap();
    sub.unsubscribe();
    clock.advance(Duration::from_millis(100)).unwrap();
    bus.flush(WAIT).unwrap();
    assert_eq!(sub.stats().failed, 1);
    assert_eq!(sub.stats().cancelled, 1);
    let stats = bus.stats();
    assert_eq!(
        (stats.delivered, stats.cancelled, stats.dead_lettered),
        (1, 1, 0)
    );
}

#[test]
fn invalid_retry_policies_are_refused() {
    let err = Bus::builder()
        .retry(RetryPolicy::fixed(MS).max_attempts(0))
        .build()
        .unwrap_err();
    assert_eq!(err.field(), "retry");
    let bus = Bus::builder().workers(1).build().unwrap();
    let err = bus
        .subscribe_with(
            SubscribeOptions::new().retry(RetryPolicy::fixed(MS).jitter(2.0)),
            |_: &Numbered, _: &Context| -> HandlerResult { Ok(()) },
        )
        .unwrap_err();
    assert_eq!(err, SubscribeError::InvalidRetry);
}

#[test]
fn shutdown_does_not_wait_for_retries_due_after_its_deadline() {
    let timeout = Duration::from_secs(30);
    let bus = Bus::builder()
        .workers(1)
        .retry(RetryPolicy::fixed(Duration::from_secs(300)).max_attempts(2))
        .shutdown_timeout(timeout)
        .build()
        .unwrap();
    let (failed_tx, failed_rx) = crossbeam_channel::bounded(1);
    bus.subscribe(move |_: &Numbered, _: &Context| -> HandlerResult {
        let _ = failed_tx.try_send(());
        Err(HandlerError::msg("later"))
    })
    .unwrap();
    bus.publish(Numbered {
        publisher: 0,
        seq: 0,
    })
    .unwrap();
    failed_rx.recv().unwrap();
    let report = bus.shutdown().unwrap();
    // Nothing could run before the deadline, so shutdown gave the retry up at once instead
    // of waiting out its 30 s.
    assert!(report.elapsed < timeout / 3, "{:?}", report.elapsed);
    assert!(report.deadline_passed);
    assert_eq!((report.stats.dead_lettered, report.stats.retried), (1, 1));
    assert!(report.is_balanced(), "{report}");
}

#[test]
fn delayed_events_arrive_after_their_delay_and_count_as_pending() {
    let bus = Bus::builder().workers(2).build().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    {
        let seen = seen.clone();
        bus.subscribe(move |e: &FollowUp, ctx: &Context| -> HandlerResult {
            seen.lock()
                .unwrap()
                .push((e.parent, Instant::now(), ctx.causation_id().is_some()));
            Ok(())
        })
        .unwrap();
    }
    bus.subscribe(|e: &Numbered, ctx: &Context| -> HandlerResult {
        ctx.publish_with(
            FollowUp {
                parent: e.seq,
                index: 1,
            },
            Publish::new().delay(Duration::from_millis(30)),
        )?;
        Ok(())
    })
    .unwrap();
    let start = Instant::now();
    bus.publish_with(
        FollowUp {
            parent: 0,
            index: 0,
        },
        Publish::new().delay(Duration::from_millis(40)),
    )
    .unwrap();
    bus.publish(Numbered {
        publisher: 0,
        seq: 1,
    })
    .unwrap();
    bus.flush(WAIT).unwrap();
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 2);
    for &(parent, at, caused) in seen.iter() {
        let least = if parent == 0 { 40 } else { 30 };
        assert!(
            at - start >= Duration::from_millis(least),
            "{parent}: {:?}",
            at - start
        );
        assert_eq!(
            caused,
            parent == 1,
            "only the handler's event has a causation"
        );
    }
}

#[test]
fn a_delayed_event_still_waiting_at_shutdown_is_left() {
    let bus = Bus::builder().workers(1).build().unwrap();
    let handled = Arc::new(AtomicU64::new(0));
    {
        let handled = handled.clone();
        bus.subscribe(move |_: &FollowUp, _: &Context| -> HandlerResult {
            handled.fetch_add(1, Ordering::SeqCst);
            Ok(())
        })
        .unwrap();
    }
    bus.publish_with(
        FollowUp {
            parent: 0,
            index: 0,
        },
        Publish::new().delay(Duration::from_secs(600)),
    )
    .unwrap();
    let report = bus.shutdown().unwrap();
    assert_eq!(count(&handled), 0);
    assert_eq!((report.stats.delivered, report.stats.left), (1, 1));
    assert!(report.is_balanced(), "{report}");
    let late = bus
        .publish_with(
            FollowUp {
                parent: 1,
                index: 0,
            },
            Publish::new().delay(MS),
        )
        .unwrap_err();
    assert_eq!(
        late.into_event(),
        FollowUp {
            parent: 1,
            index: 0
        }
    );
}

//! Stalled handlers (observed by the timer thread, reported once, listed while they run) and
//! the cooperative deadline a subscription's `timeout` gives its handler.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{Numbered, WAIT, count, quiet_worker_panics};
use microbus::{
    Bus, Context, HandlerError, HandlerResult, RetryPolicy, Stall, SubscribeError, SubscribeOptions,
};

/// Long enough that no quick delivery, descheduled on a busy machine, runs this long.
const STALL: Duration = Duration::from_millis(100);

/// Waits until the bus lists a stall that has run for at least `d`.
fn wait_for_stall_of(bus: &Bus, d: Duration) -> Stall {
    let start = Instant::now();
    loop {
        if let Some(stall) = bus.metrics().stalls.first()
            && stall.running_for >= d
        {
            return stall.clone();
        }
        assert!(start.elapsed() < WAIT, "no stall of {d:?} listed");
        std::thread::yield_now();
    }
}

#[test]
fn a_stalled_handler_is_reported_once_with_its_ids_and_listed_while_it_runs() {
    let (stalls_tx, stalls) = crossbeam_channel::unbounded::<Stall>();
    let bus = Bus::builder()
        .workers(2)
        .stall_after(STALL)
        .on_stall(move |stall| stalls_tx.send(stall.clone()).unwrap())
        .build()
        .unwrap()
        .service("billing")
        .unwrap();
    let (release, released) = crossbeam_channel::bounded::<()>(1);
    let handled = Arc::new(AtomicU64::new(0));
    let counter = handled.clone();
    bus.subscribe_with(
        SubscribeOptions::new().named("invoice"),
        move |n: &Numbered, _: &Context| -> HandlerResult {
            if n.seq == 0 {
                released.recv().unwrap();
            }
            counter.fetch_add(1, Ordering::SeqCst);
            Ok(())
        },
    )
    .unwrap();
    let stuck = bus
        .publish(Numbered {
            publisher: 0,
            seq: 0,
        })
        .unwrap();
    // Quick deliveries on the other worker are never reported.
    for seq in 1..1_000 {
        bus.publish(Numbered { publisher: 0, seq }).unwrap();
    }
    let stall = stalls.recv_timeout(WAIT).unwrap();
    assert_eq!(
        (
            stall.service.as_str(),
            stall.handler.as_str(),
            stall.event.as_str(),
            stall.lane.as_str(),
            stall.event_id
        ),
        ("billing", "invoice", "Numbered", "default", stuck)
    );
    assert!(stall.worker < 2);
    assert!(stall.running_for >= STALL, "{stall:?}");
    // Still running three thresholds later: listed, with its running time growing, and not
    // reported again.
    let listed = wait_for_stall_of(&bus, 3 * STALL);
    assert_eq!((listed.event_id, listed.worker), (stuck, stall.worker));
    assert!(stalls.try_recv().is_err(), "a stall is reported once");
    let metrics = bus.metrics();
    assert_eq!(metrics.stats.stalled, 1);
    assert!(metrics.to_string().contains("stalled deliveries"));
    let health = bus.health();
    assert!(!health.is_ready());
    assert_eq!(health.stalls[0].event_id, stuck);
    assert!(
        metrics
            .to_prometheus()
            .contains("microbus_stalled_deliveries 1")
    );
    release.send(()).unwrap();
    bus.flush(WAIT).unwrap();
    assert_eq!(count(&handled), 1_000);
    let metrics = bus.metrics();
    assert!(metrics.stalls.is_empty(), "{:?}", metrics.stalls);
    assert_eq!(metrics.stats.stalled, 1);
    assert!(
        metrics
            .to_prometheus()
            .contains("microbus_bus_stalled_total 1")
    );
    assert!(bus.shutdown().unwrap().is_balanced());
    assert!(stalls.try_recv().is_err());
}

#[test]
fn a_subscriptions_own_stall_after_overrides_the_buses() {
    let clock = microbus::testing::ManualClock::new();
    let (stalls_tx, stalls) = crossbeam_channel::unbounded::<Stall>();
    let bus = Bus::builder()
        .workers(2)
        .clock(&clock)
        .on_stall(move |stall| stalls_tx.send(stall.clone()).unwrap())
        .build()
        .unwrap();
    let (started_tx, started) = crossbeam_channel::unbounded::<()>();
    let (release, released) = crossbeam_channel::bounded::<()>(2);
    for (name, options) in [
        ("watched", SubscribeOptions::new().stall_after(STALL)),
        ("default", SubscribeOptions::new()),
    ] {
        let (released, started_tx) = (released.clone(), started_tx.clone());
        bus.subscribe_with(
            options.named(name),
            move |_: &Numbered, _: &Context| -> HandlerResult {
                started_tx.send(()).unwrap();
                released.recv().unwrap();
                Ok(())
            },
        )
        .unwrap();
    }
    // One event: both handlers block, on one worker after the other.
    bus.publish(Numbered {
        publisher: 0,
        seq: 0,
    })
    .unwrap();
    started.recv_timeout(WAIT).unwrap();
    clock.advance(STALL - Duration::from_millis(1)).unwrap();
    assert_eq!(bus.stats().stalled, 0);
    clock.advance(STALL).unwrap();
    let stall = stalls.recv_timeout(WAIT).unwrap();
    assert_eq!(stall.handler, "watched");
    assert!(stall.running_for >= STALL && stall.running_for < 2 * STALL);
    release.send(()).unwrap();
    // The second handler now blocks; the bus's default (a minute) does not report it within
    // 59 s, and does at a minute.
    started.recv_timeout(WAIT).unwrap();
    clock.advance(Duration::from_secs(59)).unwrap();
    assert!(stalls.try_recv().is_err());
    assert_eq!(bus.stats().stalled, 1);
    clock.advance(Duration::from_secs(2)).unwrap();
    assert_eq!(stalls.recv_timeout(WAIT).unwrap().handler, "default");
    assert_eq!(bus.stats().stalled, 2);
    release.send(()).unwrap();
    bus.flush(WAIT).unwrap();
    assert!(bus.shutdown().unwrap().is_balanced());
}

#[test]
fn a_stall_callback_that_panics_or_blocks_holds_back_nothing() {
    quiet_worker_panics();
    let (hold, held) = crossbeam_channel::bounded::<()>(0);
    let calls = Arc::new(AtomicU64::new(0));
    let seen = calls.clone();
    let bus = Bus::builder()
        .workers(1)
        .stall_after(STALL)
        .retry(RetryPolicy::fixed(Duration::from_millis(1)).max_attempts(2))
        .on_stall(move |_| {
            if seen.fetch_add(1, Ordering::SeqCst) == 0 {
                panic!("on_stall");
            }
            // Every later report blocks until the test ends.
            let _ = held.recv();
        })
        .build()
        .unwrap();
    let retried = Arc::new(AtomicU64::new(0));
    let counter = retried.clone();
    bus.subscribe(move |n: &Numbered, ctx: &Context| -> HandlerResult {
        if n.seq < 2 && ctx.attempt() == 1 {
            // Two slow first attempts, each reported; then a retry that must still run.
            let start = Instant::now();
            while start.elapsed() < 3 * STALL {
                std::thread::yield_now();
            }
            return Err(HandlerError::msg("slow and failed"));
        }
        if ctx.attempt() == 2 {
            counter.fetch_add(1, Ordering::SeqCst);
        }
        Ok(())
    })
    .unwrap();
    for seq in 0..100 {
        bus.publish(Numbered { publisher: 0, seq }).unwrap();
    }
    // The second report's callback is blocked: the retries run all the same.
    bus.flush(WAIT).unwrap();
    assert_eq!(count(&retried), 2);
    let stats = bus.stats();
    assert_eq!(stats.stalled, 2);
    let start = Instant::now();
    while bus.stats().callback_panics.stall == 0 {
        assert!(
            start.elapsed() < WAIT,
            "the callback's panic was never counted"
        );
        std::thread::yield_now();
    }
    assert_eq!(count(&calls), 2);
    let report = bus.shutdown().unwrap();
    assert!(report.is_balanced());
    assert!(report.elapsed < Duration::from_secs(5), "{report}");
    drop(hold);
}

#[test]
fn a_timeout_gives_each_call_a_deadline_it_can_stop_itself_by() {
    let bus = Bus::builder()
        .workers(1)
        .retry(RetryPolicy::fixed(Duration::from_millis(1)).max_attempts(3))
        .build()
        .unwrap();
    let timeout = Duration::from_millis(30);
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = seen.clone();
    bus.subscribe_with(
        SubscribeOptions::new().timeout(timeout),
        move |_: &Numbered, ctx: &Context| -> HandlerResult {
            let start = Instant::now();
            let deadline = ctx.deadline().expect("a timeout gives a deadline");
            log.lock().unwrap().push((ctx.attempt(), deadline - start));
            if ctx.attempt() == 1 {
                // A long first attempt that gives up at its deadline: retried as usual.
                while !ctx.is_expired() {
                    std::thread::yield_now();
                }
                assert!(Instant::now() >= deadline);
                return Err(HandlerError::msg("out of time"));
            }
            Ok(())
        },
    )
    .unwrap();
    let untimed = Arc::new(AtomicU64::new(0));
    let counter = untimed.clone();
    bus.subscribe(move |_: &Numbered, ctx: &Context| -> HandlerResult {
        assert_eq!((ctx.deadline(), ctx.is_expired()), (None, false));
        counter.fetch_add(1, Ordering::SeqCst);
        Ok(())
    })
    .unwrap();
    bus.publish(Numbered {
        publisher: 0,
        seq: 0,
    })
    .unwrap();
    bus.flush(WAIT).unwrap();
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.iter().map(|s| s.0).collect::<Vec<_>>(), [1, 2]);
    // Each call's deadline is its own start plus the timeout.
    assert!(seen.iter().all(|&(_, left)| left <= timeout), "{seen:?}");
    let stats = bus.stats();
    assert_eq!((stats.failed, stats.retried, stats.succeeded), (1, 1, 2));
    assert_eq!(count(&untimed), 1);
    // `Duration::MAX` is no deadline.
    bus.subscribe_with(
        SubscribeOptions::new()
            .timeout(Duration::MAX)
            .named("forever"),
        |_: &Numbered, ctx: &Context| -> HandlerResult {
            assert_eq!((ctx.deadline(), ctx.is_expired()), (None, false));
            Ok(())
        },
    )
    .unwrap();
    bus.publish(Numbered {
        publisher: 0,
        seq: 1,
    })
    .unwrap();
    bus.flush(WAIT).unwrap();
    // Only the 30 ms subscription's first attempt failed again.
    let stats = bus.stats();
    assert_eq!((stats.failed, stats.succeeded), (2, 5));
    assert!(bus.shutdown().unwrap().is_balanced());
}

#[test]
fn zero_thresholds_are_refused_naming_the_field() {
    let err = Bus::builder()
        .stall_after(Duration::ZERO)
        .build()
        .unwrap_err();
    assert_eq!(err.field(), "stall_after");
    let bus = Bus::builder().build().unwrap();
    for (options, option) in [
        (SubscribeOptions::new().timeout(Duration::ZERO), "timeout"),
        (
            SubscribeOptions::new().stall_after(Duration::ZERO),
            "stall_after",
        ),
    ] {
        let err = bus
            .subscribe_with(options, |_: &Numbered, _: &Context| -> HandlerResult {
                Ok(())
            })
            .unwrap_err();
        assert!(
            matches!(err, SubscribeError::Invalid { option: o, .. } if o == option),
            "{err}"
        );
        assert!(err.to_string().contains(option));
    }
    // Nothing was subscribed.
    assert!(bus.metrics().handlers.is_empty());
    // The longest thresholds are accepted.
    Bus::builder()
        .stall_after(Duration::MAX)
        .build()
        .unwrap()
        .shutdown()
        .unwrap();
}
